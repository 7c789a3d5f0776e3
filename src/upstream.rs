//! ⑤ Upstreams: many clients onto a few steady, warm origin connections.
//!
//! Each server keeps `pool_min_idle` connections open from the start (refilled when they
//! close) and never more than `pool_max`. A request takes a connection that has room, most
//! recently used first; when none has and the pool is at `pool_max`, it waits in a bounded
//! queue, fair across client addresses, for at most `queue_timeout` (then 503 with
//! Retry-After; a full queue answers 503 at once). A released connection goes straight to the
//! next waiter under the same lock, so nobody waits while a connection sits idle. One client
//! address may hold at most `max_client_share` of the upstream's capacity busy, so a few
//! addresses that read slowly or trickle bodies cannot take the whole pool. With
//! thread-per-core runtimes the queue has a part per core and a released connection goes to a
//! waiter of its own core first (`queue::CoreQueues`), so a request and its origin connection
//! share a thread.
//!
//! Lock discipline: all scheduling state is in one `Mutex<State>` per upstream, held for short
//! non-async sections. Inside it only plain `Granted` values are made; a `Lease` (whose drop
//! takes the lock) exists only outside it.
//!
//! Why this file is still ~835 lines: it is the scheduler (fair queue, client and connection
//! shares, slot accounting, dispatch, connect pacing and the warm refill), which all works
//! under the one upstream lock on one `State`. What does not need that state as a whole lives
//! beside it: leases and giving back (`lease.rs`), the exchange with its retry, panic mode and
//! private connections (`exchange.rs`), the queue's timeouts (`expiry.rs`), the express lane's
//! slice (`express.rs`), health bookkeeping (`checks.rs`, with one server's counters in
//! `health.rs`), the pool, queue, body, tunnel and PROXY-header pieces. A pure scheduler over
//! plain values, unit-tested without sockets, would be the next split.

pub mod body;
mod checks;
mod exchange;
mod expiry;
pub mod express;
pub mod health;
mod lease;
pub mod pool;
pub mod proxy_protocol;
pub mod queue;
pub mod tunnel;

pub use exchange::Replay;
pub use lease::Lease;
use lease::{release, Pending, Waiting};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use http::request::Parts;
use hyper::body::Incoming;
use hyper::{Request, Response};
use smallvec::SmallVec;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::client::{Client, ClientKey};
use crate::config::{Balance, UpstreamConfig, UpstreamProtocol};
use body::UpstreamBody;
use health::{Health, Transition};
use pool::{Entry, Sender, Slots};
use queue::CoreQueues;

/// Why an upstream exchange failed. `proxy.rs` maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("no response head within the response timeout")]
    ResponseTimeout,
    #[error("bad or missing response: {0}")]
    Response(#[source] hyper::Error),
    #[error("the client's request body failed: {0}")]
    ClientBody(#[source] hyper::Error),
    #[error("no connection free within the queue timeout")]
    QueueTimeout,
    #[error("the queue is full")]
    QueueFull,
    #[error("every server is down")]
    NoHealthyServer,
    #[error("max_tunnels reached for this upstream or this client")]
    TooManyTunnels,
    #[error("the origin answered 101 without a matching WebSocket upgrade")]
    BadUpgrade,
}

/// What a failed send reports: the server it failed on (when one was picked; shared, for
/// the error and the log line) and why.
pub type SendFailure = (Option<Arc<str>>, UpstreamError);

/// Counters since start, for logs and metrics.
#[derive(Debug)]
pub struct UpstreamStats {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub reuses: AtomicU64,
    pub retries: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub queue_full: AtomicU64,
    /// Responses abandoned by their client mid-body, read to their end in the background so
    /// the connection served again / closed because they exceeded the drain bound.
    pub cancel_drained: AtomicU64,
    pub cancel_closed: AtomicU64,
    /// Connects put off by `max_connect_rate`.
    pub paced_connects: AtomicU64,
    /// Requests lent a connection driven on another thread-per-core runtime than theirs.
    pub cross_core: AtomicU64,
    /// Requests sent while every server was ejected (panic mode).
    pub panic_requests: AtomicU64,
    /// Requests in the queue as of the last change (read without the lock, by parking).
    pub queued: AtomicUsize,
    /// Smoothed queue wait (µs) of queued requests, and when it last changed (ms since epoch).
    pub queue_wait_ewma_us: AtomicU64,
    pub queue_wait_at_ms: AtomicU64,
    pub epoch: std::time::Instant,
    /// Seconds requests waited in the queue (only those that waited).
    pub queue_wait: prometheus_client::metrics::histogram::Histogram,
}

impl Default for UpstreamStats {
    fn default() -> Self {
        UpstreamStats {
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            reuses: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            queue_timeouts: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            cancel_drained: AtomicU64::new(0),
            cancel_closed: AtomicU64::new(0),
            paced_connects: AtomicU64::new(0),
            cross_core: AtomicU64::new(0),
            panic_requests: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
            queue_wait_ewma_us: AtomicU64::new(0),
            queue_wait_at_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            queue_wait: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
        }
    }
}

#[derive(Debug)]
pub struct Server {
    pub addr: Arc<str>,
    pub health: Health,
}

/// A queued request: the client connection it came on (for `max_connection_share`), where
/// its connection is sent, the thread-per-core runtime it runs on (its part of the queue) and
/// when it was queued.
#[derive(Debug)]
struct Waiter {
    conn: u64,
    tx: oneshot::Sender<Result<Granted, UpstreamError>>,
    core: Option<usize>,
    since: Instant,
}

impl Waiter {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slots>,
    queue: CoreQueues<ClientKey, Waiter>,
    busy_by_client: HashMap<IpAddr, usize, queue::Hasher>,
    /// Busy slots per client connection (an HTTP/2 connection can ask for many at once).
    busy_by_conn: HashMap<u64, usize, queue::Hasher>,
}

/// Who is asking for a connection: the client's key and the client connection's id.
#[derive(Debug, Clone, Copy)]
pub struct Asker {
    pub key: ClientKey,
    pub conn: u64,
}

/// A connection assigned to a request, before it is wrapped in a `Lease`.
#[derive(Debug)]
struct Granted {
    server: usize,
    conn: u64,
    tx: Sender,
    reused: bool,
}

#[derive(Debug)]
pub struct Upstream {
    /// Shared with every request's access log and error (a clone per request is a count).
    pub name: Arc<str>,
    pub cfg: UpstreamConfig,
    pub servers: Vec<Server>,
    state: Mutex<State>,
    next_conn: AtomicU64,
    rr: AtomicUsize,
    /// Requests all servers' connections carry at once (pool_max × servers × streams).
    capacity: usize,
    /// Busy connections (or h2c streams) one client address may hold.
    client_cap: usize,
    /// ... and one client connection (its HTTP/2 streams).
    conn_cap: usize,
    /// Addresses `max_client_share` and `max_connection_share` do not apply to.
    share_exempt: Vec<ipnet::IpNet>,
    /// With `send_proxy_protocol`: how many private connections may be open at once.
    private: Option<Arc<tokio::sync::Semaphore>>,
    pub stats: UpstreamStats,
    /// WebSocket tunnels open to this upstream, capped by `max_tunnels`.
    pub tunnels: Arc<tunnel::TunnelSlots>,
    /// Wakes the health checker when traffic ejects a server.
    health_wake: tokio::sync::Notify,
    /// The one panic-mode request that may be in flight (every server ejected: `send_panic`).
    panic: Arc<tokio::sync::Semaphore>,
    panic_next: Mutex<Instant>,
    /// Origin connections per server kept for the express lane while it runs (`express.rs`).
    express_slice: usize,
    /// The runtime pooled connections are opened and driven on, whichever thread asks.
    spawner: Option<tokio::runtime::Handle>,
    /// With `[runtime] thread_per_core`: the cores, where connections are opened and driven
    /// instead (`spawn_connect`), and which one opens the next warm connection.
    cores: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
    next_core: AtomicUsize,
    /// Connect failures and failed requests are logged at most once a second each.
    connect_failure_log: crate::telemetry::Sampled,
    pub request_failure_log: crate::telemetry::Sampled,
    /// The task that times out queued requests (`expiry.rs`).
    expiry: expiry::Expiry,
    me: Weak<Upstream>,
}

/// The first re-probe of an ejected server comes this soon; each failure doubles the wait, up to
/// the health interval.
const FIRST_REPROBE: std::time::Duration = std::time::Duration::from_millis(100);

/// Panic-mode requests (every server ejected) go at most this often.
const PANIC_SPACING: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a connection is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Keeping `pool_min_idle` warm.
    Warm,
    /// Requests are waiting for it.
    Waiter,
}

struct Failed {
    error: UpstreamError,
    /// The request back, when it was never written.
    unsent: Option<Request<UpstreamBody>>,
}

impl Upstream {
    /// `lane`: an express lane runs (`[runtime] express_connections`), so the pool keeps its
    /// slice of connections for it.
    pub fn new(cfg: &UpstreamConfig, lane: bool) -> Arc<Upstream> {
        let streams = match cfg.protocol {
            UpstreamProtocol::Http1 => 1,
            UpstreamProtocol::H2c => pool::H2_STREAMS,
        };
        let capacity = cfg.pool_max * cfg.servers.len() * streams;
        let client_cap = ((capacity as f64 * cfg.max_client_share).floor() as usize).max(1);
        let conn_cap = ((capacity as f64 * cfg.max_connection_share).floor() as usize).max(1);
        Arc::new_cyclic(|me| Upstream {
            name: cfg.name.as_str().into(),
            servers: cfg
                .servers
                .iter()
                .map(|addr| Server {
                    addr: addr.as_str().into(),
                    health: Health::default(),
                })
                .collect(),
            state: Mutex::new(State {
                slots: cfg
                    .servers
                    .iter()
                    .map(|_| Slots::new(cfg.max_requests_per_connection))
                    .collect(),
                ..State::default()
            }),
            next_conn: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            capacity,
            client_cap,
            conn_cap,
            share_exempt: cfg.pool_share_exempt.clone(),
            private: cfg
                .send_proxy_protocol
                .map(|_| Arc::new(tokio::sync::Semaphore::new(capacity.max(1)))),
            stats: UpstreamStats::default(),
            tunnels: tunnel::TunnelSlots::new(
                cfg.max_tunnels,
                ((cfg.max_tunnels as f64 * cfg.max_client_share).ceil() as usize).max(1),
            ),
            health_wake: tokio::sync::Notify::new(),
            panic: Arc::new(tokio::sync::Semaphore::new(1)),
            panic_next: Mutex::new(Instant::now()),
            express_slice: express::slice(cfg, lane),
            spawner: tokio::runtime::Handle::try_current().ok(),
            cores: std::sync::OnceLock::new(),
            next_core: AtomicUsize::new(0),
            connect_failure_log: crate::telemetry::Sampled::new(std::time::Duration::from_secs(1)),
            request_failure_log: crate::telemetry::Sampled::new(std::time::Duration::from_secs(1)),
            expiry: expiry::Expiry::default(),
            cfg: cfg.clone(),
            me: me.clone(),
        })
    }

    /// Opens and drives this upstream's connections on `cores` (`[runtime] thread_per_core`);
    /// set once, when they start serving.
    pub fn set_cores(&self, cores: &[tokio::runtime::Handle]) {
        let _ = self.cores.set(cores.to_vec());
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arc(&self) -> Arc<Upstream> {
        // `me` is set by `new` and this method is only reachable through an `Arc`: an invariant,
        // not something input or the network can break.
        #[allow(clippy::expect_used)]
        self.me.upgrade().expect("upstream is alive while used")
    }

    /// Healthy servers in the order the balancing policy prefers them.
    /// Inline up to 8 servers: this runs under the lock for every request, and a heap
    /// vector there was one allocation per request (tests/allocations.rs).
    fn order(&self, st: &State) -> SmallVec<[usize; 8]> {
        let mut healthy: SmallVec<[usize; 8]> = (0..self.servers.len())
            .filter(|&i| self.servers[i].health.is_healthy())
            .collect();
        if healthy.len() > 1 {
            let start = self.rr.fetch_add(1, Ordering::Relaxed) % healthy.len();
            healthy.rotate_left(start);
            if self.cfg.balance == Balance::LeastOutstanding {
                // Stable: ties keep the rotated order, so equal servers share the load.
                healthy.sort_by_key(|&i| st.slots[i].busy);
            }
        }
        healthy
    }

    /// Whether `a` may take another connection under `max_client_share` and
    /// `max_connection_share`. The admission allow list does not exempt anyone here: it lifts
    /// rate limits, not fairness (`pool_share_exempt` does).
    fn under_cap(&self, st: &State, a: Asker) -> bool {
        let by_client = st.busy_by_client.get(&a.key.ip).copied().unwrap_or(0);
        let by_conn = st.busy_by_conn.get(&a.conn).copied().unwrap_or(0);
        (by_client < self.client_cap && by_conn < self.conn_cap)
            || self.share_exempt.iter().any(|n| n.contains(&a.key.ip))
    }

    /// A connection for `client`'s request, which runs on thread-per-core runtime `core`.
    fn checkout(
        &self,
        st: &mut State,
        client: Asker,
        express: bool,
        core: Option<usize>,
    ) -> Option<Granted> {
        for i in self.order(st) {
            if let Some(lent) = st.slots[i].checkout(express, core) {
                st.slots[i].busy += 1;
                *st.busy_by_client.entry(client.key.ip).or_insert(0) += 1;
                *st.busy_by_conn.entry(client.conn).or_insert(0) += 1;
                if lent.reused {
                    self.stats.reuses.fetch_add(1, Ordering::Relaxed);
                }
                if lent.core != core {
                    self.stats.cross_core.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Granted {
                    server: i,
                    conn: lent.id,
                    tx: lent.tx,
                    reused: lent.reused,
                });
            }
        }
        None
    }

    /// Undoes a grant that found no taker.
    fn ungrant(&self, st: &mut State, client: Asker, g: Granted) {
        let slots = &mut st.slots[g.server];
        slots.checkin(g.conn, Some(g.tx), true);
        debug_assert!(slots.busy > 0, "a grant given back twice");
        slots.busy = slots.busy.saturating_sub(1);
        release(st, client);
    }

    fn lease(&self, g: Granted, client: Asker) -> Lease {
        Lease {
            up: self.arc(),
            server: g.server,
            conn: g.conn,
            tx: Some(g.tx),
            client,
            reused: g.reused,
            reusable: false,
            private: None,
        }
    }

    /// A connection for a request from `client`: at once when one has room and nobody waits,
    /// else through the queue.
    pub async fn acquire(&self, client: Asker) -> Result<Lease, UpstreamError> {
        if self.express_slice() > 0 && express::on_lane() {
            match self.take_express(client) {
                express::Express::Lease(lease) => return Ok(lease),
                express::Express::Warm(lease, server) => {
                    // On the lane's runtime, where this request runs: the new connection is
                    // driven there.
                    let up = self.me.clone();
                    tokio::spawn(async move {
                        if let Some(up) = up.upgrade() {
                            up.warm_express(server).await;
                        }
                    });
                    return Ok(lease);
                }
                // Boxed: a connect is rare, and its state would size every request's future.
                express::Express::Open(server) => {
                    if let Some(lease) = Box::pin(self.open_express(server, client)).await {
                        return Ok(lease);
                    }
                }
                express::Express::Neither => {}
            }
        }
        let (rx, queued_at, first) = {
            let mut st = self.lock();
            if !self.servers.iter().any(|s| s.health.is_healthy()) {
                return Err(UpstreamError::NoHealthyServer);
            }
            let under_cap = self.under_cap(&st, client);
            let core = pool::current_core();
            if st.queue.is_empty() && under_cap {
                if let Some(g) = self.checkout(&mut st, client, false, core) {
                    drop(st);
                    return Ok(self.lease(g, client));
                }
            }
            if st.queue.len() >= self.cfg.queue_max {
                st.queue.retain(|w| !w.is_closed());
                if st.queue.len() >= self.cfg.queue_max {
                    self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                    return Err(UpstreamError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            let queued_at = Instant::now();
            // A client with nothing in flight here (a newcomer during a storm) is served
            // before the next round of clients that already hold connections.
            let newcomer = !st.busy_by_client.contains_key(&client.key.ip);
            let first = st.queue.is_empty();
            st.queue.push_with(
                core.unwrap_or(0),
                client.key,
                Waiter {
                    conn: client.conn,
                    tx,
                    core,
                    since: queued_at,
                },
                newcomer,
            );
            self.dispatch(&mut st);
            (rx, queued_at, first)
        };
        if first {
            self.first_waiter_queued();
        }
        let mut waiting = Waiting {
            rx,
            up: self,
            client,
        };
        // No timer here: `expiry.rs` answers QueueTimeout when the wait is over.
        let outcome = (&mut waiting.rx).await;
        let waited = queued_at.elapsed();
        self.stats.queue_wait.observe(waited.as_secs_f64());
        self.note_queue_wait(waited);
        match outcome {
            Ok(Ok(g)) => Ok(self.lease(g, client)),
            // Timed out by `expiry.rs` (under the lock that grants: no grant can race it), or
            // the queue was emptied (shutdown).
            Ok(Err(UpstreamError::QueueTimeout)) | Err(_) => {
                self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(UpstreamError::QueueTimeout)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    /// Hands connections with room to eligible waiters, then opens connections (up to
    /// `pool_max`) for those still waiting. Called whenever capacity may have appeared.
    fn dispatch(&self, st: &mut State) {
        self.dispatch_waiters(st);
        self.stats.queued.store(st.queue.len(), Ordering::Relaxed);
    }

    fn dispatch_waiters(&self, st: &mut State) {
        while !st.queue.is_empty() {
            // The core of a connection with room (usually the one just given back): a waiter
            // of that core gets it, so the request and its connection share a thread.
            let room = (0..self.servers.len())
                .filter(|&i| self.servers[i].health.is_healthy())
                .find_map(|i| st.slots[i].room_core());
            let Some(core) = room else {
                break;
            };
            let mut queue = std::mem::take(&mut st.queue);
            let popped = queue.pop_for(
                core.unwrap_or(0),
                |key, w| self.under_cap(st, Asker { key, conn: w.conn }),
                |w| w.since,
            );
            st.queue = queue;
            let Some((part, key, waiter)) = popped else {
                break;
            };
            if waiter.is_closed() {
                continue;
            }
            let client = Asker {
                key,
                conn: waiter.conn,
            };
            let Some(g) = self.checkout(st, client, false, waiter.core) else {
                st.queue.unpop(part, key, waiter);
                break;
            };
            if let Err(Ok(g)) = waiter.tx.send(Ok(g)) {
                self.ungrant(st, client, g);
            }
        }
        if st.queue.is_empty() {
            return;
        }
        let per_conn = match self.cfg.protocol {
            UpstreamProtocol::Http1 => 1,
            UpstreamProtocol::H2c => pool::H2_STREAMS,
        };
        // At pool_max everywhere (a storm) nothing can be opened: skip counting waiters, which
        // walks every queued client, under the lock, on every release.
        let main_max = self.main_max();
        let can_open = (0..self.servers.len())
            .any(|i| self.servers[i].health.is_healthy() && st.slots[i].main_open() < main_max);
        if !can_open {
            return;
        }
        // Only waiters that could take a connection count: one over its share waits for its own
        // requests to finish, and a new connection would only sit idle.
        let eligible: usize = st
            .queue
            .clients()
            .map(|(key, first, len)| {
                let asker = Asker {
                    key,
                    conn: first.conn,
                };
                if first.is_closed() || !self.under_cap(st, asker) {
                    0
                } else if self.share_exempt.iter().any(|n| n.contains(&key.ip)) {
                    len
                } else {
                    let busy = st.busy_by_client.get(&key.ip).copied().unwrap_or(0);
                    len.min(self.client_cap.saturating_sub(busy))
                }
            })
            .sum();
        let connecting: usize = st.slots.iter().map(|s| s.connecting).sum();
        let mut need = eligible.div_ceil(per_conn).saturating_sub(connecting);
        for i in self.order(st) {
            while need > 0 && st.slots[i].main_open() < main_max {
                if !st.slots[i].take_connect_token(self.cfg.max_connect_rate) {
                    // Paced: the pool maintenance (4 times a second) tries again.
                    self.stats.paced_connects.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                self.spawn_connect(st, i, Purpose::Waiter);
                need -= 1;
            }
        }
    }

    /// Keeps `pool_min_idle` connections open to every healthy server. After a failed warm
    /// connect the server is left alone for a second: a restarting origin is not hammered, and
    /// the active checks judge it meanwhile.
    fn refill(&self, st: &mut State) {
        let want = self.cfg.pool_min_idle.min(self.main_max());
        let now = Instant::now();
        for i in 0..self.servers.len() {
            if self.servers[i].health.is_healthy() && st.slots[i].refill_after <= now {
                while st.slots[i].main_open() < want {
                    if !st.slots[i].take_connect_token(self.cfg.max_connect_rate) {
                        self.stats.paced_connects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    self.spawn_connect(st, i, Purpose::Warm);
                }
            }
        }
    }

    fn spawn_connect(&self, st: &mut State, server: usize, purpose: Purpose) {
        st.slots[server].open += 1;
        st.slots[server].connecting += 1;
        let up = self.arc();
        // A pool connection is driven where it was opened: on the main runtime even when an
        // express-lane task asked (a release or a queued request there); with thread-per-core
        // runtimes, on the asker's core, or (asked from elsewhere: the warm refill) on each
        // core in turn.
        let connect = async move {
            let addr = up.servers[server].addr.clone();
            let preface = up.local_preface();
            let result =
                pool::connect(&addr, up.cfg.protocol, up.cfg.connect_timeout, &preface).await;
            up.connected(server, purpose, result);
        };
        if let Some(core) = pool::core_handle() {
            drop(core.spawn(connect));
            return;
        }
        if let Some(cores) = self.cores.get().filter(|c| !c.is_empty()) {
            let i = self.next_core.fetch_add(1, Ordering::Relaxed) % cores.len();
            drop(cores[i].spawn(connect));
            return;
        }
        match &self.spawner {
            Some(main) => drop(main.spawn(connect)),
            None => drop(tokio::spawn(connect)),
        }
    }

    fn connected(
        &self,
        server: usize,
        purpose: Purpose,
        result: Result<
            (
                Sender,
                impl std::future::Future<Output = ()> + Send + 'static,
            ),
            UpstreamError,
        >,
    ) {
        match result {
            Ok((tx, drive)) => {
                let id = self.drive(server, drive, false);
                self.servers[server]
                    .health
                    .success(false, self.cfg.health.healthy_after);
                let mut st = self.lock();
                debug_assert!(st.slots[server].connecting > 0, "a connect finished twice");
                self.pooled(&mut st, server, id, tx, false);
                self.dispatch(&mut st);
            }
            Err(e) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.connect_failure_log.admit() {
                    tracing::warn!(upstream = %self.name, server = %self.servers[server].addr, error = %e,
                        failures = n, "origin connect failed");
                }
                // A connect made for waiting requests counts against the server; warm connects
                // fail together (one event seen several times) and only pause the refill.
                let transition = match purpose {
                    Purpose::Waiter => self.servers[server]
                        .health
                        .failure(self.cfg.health.unhealthy_after),
                    Purpose::Warm => Transition::None,
                };
                let mut st = self.lock();
                debug_assert!(
                    st.slots[server].connecting > 0 && st.slots[server].open > 0,
                    "a failed connect counted twice"
                );
                st.slots[server].connecting = st.slots[server].connecting.saturating_sub(1);
                st.slots[server].open = st.slots[server].open.saturating_sub(1);
                if purpose == Purpose::Warm {
                    st.slots[server].refill_after =
                        Instant::now() + std::time::Duration::from_secs(1);
                    return;
                }
                // With no other server to turn to, the request this connect was for learns why
                // now (502/504) rather than after its queue timeout.
                let others = (0..self.servers.len())
                    .any(|i| i != server && self.servers[i].health.is_healthy());
                if !others {
                    let part = pool::current_core().unwrap_or(0);
                    if let Some((_, _, w)) = st.queue.pop_for(part, |_, _| true, |w| w.since) {
                        let _ = w.tx.send(Err(e));
                    }
                }
                if transition == Transition::Ejected {
                    self.ejected(&mut st, server);
                } else {
                    self.dispatch(&mut st);
                }
            }
        }
    }

    /// Spawns a new connection's driver on the runtime this runs on, which learns from its end
    /// that the socket is closed; returns the connection's id.
    fn drive(
        &self,
        server: usize,
        drive: impl std::future::Future<Output = ()> + Send + 'static,
        express: bool,
    ) -> u64 {
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // Weak: the pool holds the connection's sender, so a strong reference here would keep a
        // retired upstream (removed or changed by a reload, or a stopped engine) and its idle
        // connections alive forever.
        let up = self.me.clone();
        tokio::spawn(async move {
            drive.await;
            if let Some(up) = up.upgrade() {
                up.closed(server, id, express);
            }
        });
        id
    }

    /// Puts a connection that has just finished connecting into `server`'s pool.
    fn pooled(&self, st: &mut State, server: usize, id: u64, tx: Sender, express: bool) {
        let slots = &mut st.slots[server];
        slots.connecting = slots.connecting.saturating_sub(1);
        slots.add(Entry {
            id,
            tx: Some(tx),
            in_use: 0,
            requests: 0,
            idle_since: Instant::now(),
            express,
            core: pool::current_core(),
        });
    }

    /// A connection's socket closed (origin closed it, or we retired it).
    fn closed(&self, server: usize, id: u64, express: bool) {
        let mut st = self.lock();
        debug_assert!(st.slots[server].open > 0, "a connection closed twice");
        st.slots[server].open = st.slots[server].open.saturating_sub(1);
        if express {
            st.slots[server].express_open = st.slots[server].express_open.saturating_sub(1);
        }
        st.slots[server].remove(id);
        self.refill(&mut st);
        self.dispatch(&mut st);
    }

    /// Once a second: close idle connections past their timeout, refill the warm pools, retry
    /// dispatch. Returns whether every healthy server holds its warm connections.
    pub fn maintain(&self) -> bool {
        let mut st = self.lock();
        let keep = self.cfg.pool_min_idle;
        for i in 0..self.servers.len() {
            if self.servers[i].health.is_healthy() {
                st.slots[i].reap(keep, self.cfg.pool_idle_timeout);
            } else {
                st.slots[i].clear_idle();
            }
        }
        self.refill(&mut st);
        self.dispatch(&mut st);
        (0..self.servers.len()).all(|i| {
            !self.servers[i].health.is_healthy()
                || st.slots[i].entries().len() >= keep.min(self.main_max())
        })
    }

    /// How many more queued requests this upstream takes before new connections are parked
    /// (`listener/park.rs`): two rounds of its connections wait at most.
    pub fn queue_room(&self) -> usize {
        (2 * self.capacity).saturating_sub(self.stats.queued.load(Ordering::Relaxed))
    }

    /// Keeps a smoothed recent queue wait (for the waiting room's origin guard).
    fn note_queue_wait(&self, waited: std::time::Duration) {
        let us = waited.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.stats.queue_wait_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.stats.queue_wait_ewma_us.store(new, Ordering::Relaxed);
        self.stats.queue_wait_at_ms.store(
            self.stats.epoch.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// How long requests have lately waited for a connection: the smoothed wait of the last
    /// queued requests, or zero when nobody has queued for two seconds.
    pub fn recent_queue_wait(&self) -> std::time::Duration {
        let at = self.stats.queue_wait_at_ms.load(Ordering::Relaxed);
        let now = self.stats.epoch.elapsed().as_millis() as u64;
        if at == 0 || now.saturating_sub(at) > 2000 {
            // Nobody queued lately; but a queue that is long now is busy whatever the past.
            let queued = self.lock().queue.len();
            return if queued > 0 {
                self.cfg.queue_timeout / 2
            } else {
                std::time::Duration::ZERO
            };
        }
        std::time::Duration::from_micros(self.stats.queue_wait_ewma_us.load(Ordering::Relaxed))
    }

    /// Open, idle and busy connections per server, and the queue length, for metrics.
    pub fn snapshot(&self) -> (Vec<(usize, usize, usize)>, usize) {
        let st = self.lock();
        let per = st
            .slots
            .iter()
            .map(|s| (s.open, s.idle(), s.busy))
            .collect();
        (per, st.queue.len())
    }
}
