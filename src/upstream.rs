//! ⑤ Upstreams: many clients onto a few steady, warm origin connections.
//!
//! Each server keeps `pool_min_idle` connections open from the start (refilled when they
//! close) and never more than `pool_max`. A request takes a connection that has room, most
//! recently used first; when none has and the pool is at `pool_max`, it waits in a bounded
//! queue, fair across client addresses, for at most `queue_timeout` (then 503 with
//! Retry-After; a full queue answers 503 at once). A released connection goes straight to the
//! next waiter under the same lock, so nobody waits while a connection sits idle. One client
//! address may hold at most `max_client_share` of the upstream's capacity busy, so a few
//! addresses that read slowly or trickle bodies cannot take the whole pool.
//!
//! Lock discipline: all scheduling state is in one `Mutex<State>` per upstream, held for short
//! non-async sections. Inside it only plain `Granted` values are made; a `Lease` (whose drop
//! takes the lock) exists only outside it.
//!
//! Why this file is long (~900 lines): the scheduler (fair queue, slot accounting), leases,
//! the exchange with retry, private `send_proxy_protocol` connections and health bookkeeping
//! all work under the one upstream lock, and splitting them means choosing which state each
//! owns. That split (a pure scheduler with unit tests, the exchange, health) is planned in the
//! structure issue (#8); pool, queue, health, body and tunnel are separate files already.

pub mod body;
pub mod health;
pub mod pool;
pub mod proxy_protocol;
pub mod queue;
pub mod tunnel;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use http::request::Parts;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::client::{Client, ClientKey};
use crate::config::{Balance, UpstreamConfig, UpstreamProtocol};
use body::UpstreamBody;
use health::{Health, Transition};
use pool::{Entry, Sender, Slots};
use queue::FairQueue;

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

/// Counters since start, for logs and metrics.
#[derive(Debug)]
pub struct UpstreamStats {
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub reuses: AtomicU64,
    pub retries: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub queue_full: AtomicU64,
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
            queue_wait: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
        }
    }
}

#[derive(Debug)]
pub struct Server {
    pub addr: String,
    pub health: Health,
}

type Waiter = oneshot::Sender<Result<Granted, UpstreamError>>;

#[derive(Debug, Default)]
struct State {
    slots: Vec<Slots>,
    queue: FairQueue<ClientKey, Waiter>,
    busy_by_client: HashMap<IpAddr, usize>,
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
    pub name: String,
    pub cfg: UpstreamConfig,
    pub servers: Vec<Server>,
    state: Mutex<State>,
    next_conn: AtomicU64,
    rr: AtomicUsize,
    /// Busy connections (or h2c streams) one client address may hold.
    client_cap: usize,
    /// With `send_proxy_protocol`: how many private connections may be open at once.
    private: Option<Arc<tokio::sync::Semaphore>>,
    pub stats: UpstreamStats,
    /// WebSocket tunnels open to this upstream, capped by `max_tunnels`.
    pub tunnels: Arc<tunnel::TunnelSlots>,
    /// Connect failures and failed requests are logged at most once a second each.
    connect_failure_log: crate::telemetry::Sampled,
    pub request_failure_log: crate::telemetry::Sampled,
    me: Weak<Upstream>,
}

/// A connection lent to one request. Dropping it gives the connection back: to the pool when
/// `finish` was called (the response was read to the end), closed otherwise.
#[derive(Debug)]
pub struct Lease {
    up: Arc<Upstream>,
    server: usize,
    conn: u64,
    tx: Option<Sender>,
    client: ClientKey,
    pub reused: bool,
    reusable: bool,
    /// A connection private to this request (`send_proxy_protocol`): outside the pool, closed
    /// when the lease ends; the permit bounds how many exist.
    private: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Lease {
    pub fn server(&self) -> &str {
        &self.up.servers[self.server].addr
    }

    /// The response was read to its end: the connection may serve another request.
    pub fn finish(mut self) {
        self.reusable = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.private.is_some() {
            // Dropping the sender lets hyper close the connection once its response is done.
            return;
        }
        let up = self.up.clone();
        let mut st = up.lock();
        let slots = &mut st.slots[self.server];
        slots.checkin(self.conn, self.tx.take(), self.reusable);
        slots.busy = slots.busy.saturating_sub(1);
        release_client(&mut st.busy_by_client, self.client.ip);
        up.dispatch(&mut st);
    }
}

fn release_client(map: &mut HashMap<IpAddr, usize>, client: IpAddr) {
    if let Some(n) = map.get_mut(&client) {
        *n -= 1;
        if *n == 0 {
            map.remove(&client);
        }
    }
}

/// Holds a queued request's receiver: if the request gives up (timeout, client gone) after a
/// connection was already sent to it, the connection is given back instead of leaking.
struct Waiting<'a> {
    rx: oneshot::Receiver<Result<Granted, UpstreamError>>,
    up: &'a Upstream,
    client: ClientKey,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(g)) = self.rx.try_recv() {
            let mut st = self.up.lock();
            self.up.ungrant(&mut st, self.client, g);
            self.up.dispatch(&mut st);
        }
    }
}

/// A request that can be sent again if a reused connection turns out dead: idempotent, no body.
pub struct Replay(Parts);

impl Replay {
    pub fn of(req: &Request<UpstreamBody>) -> Option<Replay> {
        let m = req.method();
        let idempotent = m == http::Method::GET
            || m == http::Method::HEAD
            || m == http::Method::OPTIONS
            || m == http::Method::TRACE
            || m == http::Method::PUT
            || m == http::Method::DELETE;
        if !idempotent || !req.body().is_replayable() {
            return None;
        }
        let mut b = Request::builder()
            .method(m.clone())
            .uri(req.uri().clone())
            .version(req.version());
        if let Some(h) = b.headers_mut() {
            *h = req.headers().clone();
        }
        b.body(()).ok().map(|r| Replay(r.into_parts().0))
    }

    fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.0.method.clone();
        *r.uri_mut() = self.0.uri.clone();
        *r.version_mut() = self.0.version;
        *r.headers_mut() = self.0.headers.clone();
        r
    }
}

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
    pub fn new(cfg: &UpstreamConfig) -> Arc<Upstream> {
        let streams = match cfg.protocol {
            UpstreamProtocol::Http1 => 1,
            UpstreamProtocol::H2c => pool::H2_STREAMS,
        };
        let capacity = cfg.pool_max * cfg.servers.len() * streams;
        let client_cap = ((capacity as f64 * cfg.max_client_share).floor() as usize).max(1);
        Arc::new_cyclic(|me| Upstream {
            name: cfg.name.clone(),
            servers: cfg
                .servers
                .iter()
                .map(|addr| Server {
                    addr: addr.clone(),
                    health: Health::default(),
                })
                .collect(),
            state: Mutex::new(State {
                slots: cfg
                    .servers
                    .iter()
                    .map(|_| Slots {
                        max_requests: cfg.max_requests_per_connection,
                        ..Slots::default()
                    })
                    .collect(),
                ..State::default()
            }),
            next_conn: AtomicU64::new(1),
            rr: AtomicUsize::new(0),
            client_cap,
            private: cfg
                .send_proxy_protocol
                .map(|_| Arc::new(tokio::sync::Semaphore::new(capacity.max(1)))),
            stats: UpstreamStats::default(),
            tunnels: tunnel::TunnelSlots::new(
                cfg.max_tunnels,
                ((cfg.max_tunnels as f64 * cfg.max_client_share).ceil() as usize).max(1),
            ),
            connect_failure_log: crate::telemetry::Sampled::new(std::time::Duration::from_secs(1)),
            request_failure_log: crate::telemetry::Sampled::new(std::time::Duration::from_secs(1)),
            cfg: cfg.clone(),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arc(&self) -> Arc<Upstream> {
        // `me` is set by `new` and this method is only reachable through an `Arc`.
        self.me.upgrade().expect("upstream is alive while used")
    }

    /// Healthy servers in the order the balancing policy prefers them.
    fn order(&self, st: &State) -> Vec<usize> {
        let mut healthy: Vec<usize> = (0..self.servers.len())
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

    /// Whether `client` may take another connection under `max_client_share`.
    fn under_cap(&self, busy: &HashMap<IpAddr, usize>, client: ClientKey) -> bool {
        client.exempt || busy.get(&client.ip).copied().unwrap_or(0) < self.client_cap
    }

    fn checkout(&self, st: &mut State, client: ClientKey) -> Option<Granted> {
        for i in self.order(st) {
            if let Some((conn, tx, reused)) = st.slots[i].checkout() {
                st.slots[i].busy += 1;
                *st.busy_by_client.entry(client.ip).or_insert(0) += 1;
                if reused {
                    self.stats.reuses.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Granted {
                    server: i,
                    conn,
                    tx,
                    reused,
                });
            }
        }
        None
    }

    /// Undoes a grant that found no taker.
    fn ungrant(&self, st: &mut State, client: ClientKey, g: Granted) {
        let slots = &mut st.slots[g.server];
        slots.checkin(g.conn, Some(g.tx), true);
        slots.busy = slots.busy.saturating_sub(1);
        release_client(&mut st.busy_by_client, client.ip);
    }

    fn lease(&self, g: Granted, client: ClientKey) -> Lease {
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
    pub async fn acquire(&self, client: ClientKey) -> Result<Lease, UpstreamError> {
        let rx = {
            let mut st = self.lock();
            if !self.servers.iter().any(|s| s.health.is_healthy()) {
                return Err(UpstreamError::NoHealthyServer);
            }
            let under_cap = self.under_cap(&st.busy_by_client, client);
            if st.queue.is_empty() && under_cap {
                if let Some(g) = self.checkout(&mut st, client) {
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
            st.queue.push(client, tx);
            self.dispatch(&mut st);
            rx
        };
        let mut waiting = Waiting {
            rx,
            up: self,
            client,
        };
        let queued_at = Instant::now();
        let outcome = tokio::time::timeout(self.cfg.queue_timeout, &mut waiting.rx).await;
        self.stats
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(Ok(g))) => Ok(self.lease(g, client)),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) | Err(_) => {
                // A grant that raced the timeout is handed back by `Waiting`'s drop.
                self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(UpstreamError::QueueTimeout)
            }
        }
    }

    /// Hands connections with room to eligible waiters, then opens connections (up to
    /// `pool_max`) for those still waiting. Called whenever capacity may have appeared.
    fn dispatch(&self, st: &mut State) {
        while !st.queue.is_empty() {
            let any_room = (0..self.servers.len())
                .any(|i| self.servers[i].health.is_healthy() && st.slots[i].has_room());
            if !any_room {
                break;
            }
            let State {
                queue,
                busy_by_client,
                ..
            } = &mut *st;
            let Some((client, waiter)) = queue.pop(|c| self.under_cap(busy_by_client, c)) else {
                break;
            };
            if waiter.is_closed() {
                continue;
            }
            let Some(g) = self.checkout(st, client) else {
                st.queue.push(client, waiter);
                break;
            };
            if let Err(Ok(g)) = waiter.send(Ok(g)) {
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
        let connecting: usize = st.slots.iter().map(|s| s.connecting).sum();
        let mut need = st.queue.len().div_ceil(per_conn).saturating_sub(connecting);
        for i in self.order(st) {
            while need > 0 && st.slots[i].open < self.cfg.pool_max {
                self.spawn_connect(st, i, Purpose::Waiter);
                need -= 1;
            }
        }
    }

    /// Keeps `pool_min_idle` connections open to every healthy server. After a failed warm
    /// connect the server is left alone for a second: a restarting origin is not hammered, and
    /// the active checks judge it meanwhile.
    fn refill(&self, st: &mut State) {
        let want = self.cfg.pool_min_idle.min(self.cfg.pool_max);
        let now = Instant::now();
        for i in 0..self.servers.len() {
            if self.servers[i].health.is_healthy() && st.slots[i].refill_after <= now {
                while st.slots[i].open < want {
                    self.spawn_connect(st, i, Purpose::Warm);
                }
            }
        }
    }

    fn spawn_connect(&self, st: &mut State, server: usize, purpose: Purpose) {
        st.slots[server].open += 1;
        st.slots[server].connecting += 1;
        let up = self.arc();
        tokio::spawn(async move {
            let addr = up.servers[server].addr.clone();
            let preface = up.local_preface();
            let result =
                pool::connect(&addr, up.cfg.protocol, up.cfg.connect_timeout, &preface).await;
            up.connected(server, purpose, result);
        });
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
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
                let up = self.arc();
                tokio::spawn(async move {
                    drive.await;
                    up.closed(server, id);
                });
                self.servers[server]
                    .health
                    .success(false, self.cfg.health.healthy_after);
                let mut st = self.lock();
                let slots = &mut st.slots[server];
                slots.connecting = slots.connecting.saturating_sub(1);
                slots.entries.push(Entry {
                    id,
                    tx: Some(tx),
                    in_use: 0,
                    requests: 0,
                    idle_since: Instant::now(),
                });
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
                    if let Some((_, w)) = st.queue.pop(|_| true) {
                        let _ = w.send(Err(e));
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

    /// A connection's socket closed (origin closed it, or we retired it).
    fn closed(&self, server: usize, id: u64) {
        let mut st = self.lock();
        st.slots[server].open = st.slots[server].open.saturating_sub(1);
        st.slots[server].remove(id);
        self.refill(&mut st);
        self.dispatch(&mut st);
    }

    fn ejected(&self, st: &mut State, server: usize) {
        tracing::warn!(upstream = %self.name, server = %self.servers[server].addr,
            "server ejected: too many consecutive failures");
        st.slots[server].clear_idle();
        if !self.servers.iter().any(|s| s.health.is_healthy()) {
            tracing::error!(upstream = %self.name, "every server of the upstream is down: answering 503");
            for w in st.queue.drain() {
                let _ = w.send(Err(UpstreamError::NoHealthyServer));
            }
        } else {
            self.dispatch(st);
        }
    }

    fn record(&self, server: usize, ok: bool, active: bool) {
        let h = &self.cfg.health;
        let t = if ok {
            self.servers[server].health.success(active, h.healthy_after)
        } else {
            self.servers[server].health.failure(h.unhealthy_after)
        };
        match t {
            Transition::None => {}
            Transition::Ejected => {
                let mut st = self.lock();
                self.ejected(&mut st, server);
            }
            Transition::Readmitted => {
                tracing::info!(upstream = %self.name, server = %self.servers[server].addr,
                    "server re-admitted: health checks pass");
                let mut st = self.lock();
                st.slots[server].refill_after = Instant::now();
                self.refill(&mut st);
                self.dispatch(&mut st);
            }
        }
    }

    /// Sends a request and waits for its response head. A request that was never written, or
    /// an idempotent replayable one that failed on a reused connection before any response
    /// byte (the stale keep-alive race), is tried once more.
    pub async fn send(
        &self,
        client: &Client,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), (Option<String>, UpstreamError)> {
        if let Some(private) = &self.private {
            return self.send_private(private.clone(), client, req).await;
        }
        let client = client.key;
        let replay = if self.cfg.retry_idempotent {
            Replay::of(&req)
        } else {
            None
        };
        let replay_body = req.body().replay();
        let mut lease = self.acquire(client).await.map_err(|e| (None, e))?;
        let failed = match self.exchange(&mut lease, req).await {
            Ok(resp) => return Ok((resp, lease)),
            Err(f) => f,
        };
        let server = lease.server;
        let reused = lease.reused;
        drop(lease);
        let again = match (failed.unsent, replay, replay_body) {
            (Some(req), _, _) => req,
            (None, Some(r), Some(body))
                if reused && matches!(failed.error, UpstreamError::Response(_)) =>
            {
                r.request(body)
            }
            _ => {
                let addr = self.servers[server].addr.clone();
                return Err((Some(addr), failed.error));
            }
        };
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(upstream = %self.name, server = %self.servers[server].addr, error = %failed.error,
            "origin connection failed before answering; retrying");
        let mut lease = self.acquire(client).await.map_err(|e| (None, e))?;
        match self.exchange(&mut lease, again).await {
            Ok(resp) => Ok((resp, lease)),
            Err(f) => Err((Some(lease.server().to_string()), f.error)),
        }
    }

    async fn exchange(
        &self,
        lease: &mut Lease,
        req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, Failed> {
        let server = lease.server;
        let reused = lease.reused;
        let Some(tx) = lease.tx.as_mut() else {
            return Err(Failed {
                error: UpstreamError::QueueTimeout,
                unsent: Some(req),
            });
        };
        // A pooled connection can close between checkout and use; `ready` says so without
        // consuming the request.
        if let Err(e) = tx.ready().await {
            return Err(Failed {
                error: UpstreamError::Response(e),
                unsent: Some(req),
            });
        }
        let sent = tokio::time::timeout(self.cfg.response_timeout, tx.send(req)).await;
        let result = match sent {
            Err(_) => Err(Failed {
                error: UpstreamError::ResponseTimeout,
                unsent: None,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(mut e)) => {
                let unsent = e.take_message();
                let err = e.into_error();
                let error = if err.is_user() {
                    UpstreamError::ClientBody(err)
                } else {
                    UpstreamError::Response(err)
                };
                Err(Failed { error, unsent })
            }
        };
        match &result {
            Ok(_) => self.record(server, true, false),
            // A stale pooled connection or a client's broken body says nothing about the server.
            Err(f)
                if f.unsent.is_some()
                    || reused
                    || matches!(f.error, UpstreamError::ClientBody(_)) => {}
            Err(_) => self.record(server, false, false),
        }
        result
    }

    /// A dedicated HTTP/1.1 connection outside the pool, for a request that upgrades (a
    /// WebSocket tunnel holds its socket for good).
    pub async fn connect_dedicated(
        &self,
        client: &Client,
    ) -> Result<
        (
            Sender,
            String,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        (Option<String>, UpstreamError),
    > {
        let order = self.order(&self.lock());
        let Some(&server) = order.first() else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        let addr = self.servers[server].addr.clone();
        let preface = self.client_preface(client);
        match pool::connect(
            &addr,
            UpstreamProtocol::Http1,
            self.cfg.connect_timeout,
            &preface,
        )
        .await
        {
            Ok((tx, drive)) => Ok((tx, addr, drive)),
            Err(e) => Err((Some(addr), e)),
        }
    }

    /// The PROXY header for a connection no client caused (warm, health check): LOCAL.
    fn local_preface(&self) -> Vec<u8> {
        self.cfg.send_proxy_protocol.map_or_else(Vec::new, |v| {
            proxy_protocol::encode(v, None, std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
        })
    }

    /// The PROXY header naming `client`, with `send_proxy_protocol`.
    fn client_preface(&self, client: &Client) -> Vec<u8> {
        self.cfg.send_proxy_protocol.map_or_else(Vec::new, |v| {
            proxy_protocol::encode(
                v,
                Some(std::net::SocketAddr::new(client.addr, client.peer.port())),
                client.local,
            )
        })
    }

    /// `send_proxy_protocol`: a PROXY header names one client per connection, and a pooled
    /// connection carries many clients' requests, so it would name the wrong one for all but
    /// the first. Each request therefore gets a connection of its own, opened with its
    /// client's header and closed after its response. Those connections stay bounded by
    /// `pool_max` per server (waiting up to `queue_timeout` for one, FIFO); the price is an
    /// origin handshake per request, which is why this is opt-in and X-Forwarded-For is the
    /// default way to tell the origin who the client is.
    async fn send_private(
        &self,
        permits: Arc<tokio::sync::Semaphore>,
        client: &Client,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), (Option<String>, UpstreamError)> {
        let queued_at = Instant::now();
        let permit =
            match tokio::time::timeout(self.cfg.queue_timeout, permits.acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err((None, UpstreamError::QueueTimeout));
                }
            };
        self.stats
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        let Some(&server) = self.order(&self.lock()).first() else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        let addr = self.servers[server].addr.clone();
        let preface = self.client_preface(client);
        let (tx, drive) =
            match pool::connect(&addr, self.cfg.protocol, self.cfg.connect_timeout, &preface).await
            {
                Ok(c) => c,
                Err(e) => {
                    self.record(server, false, false);
                    return Err((Some(addr), e));
                }
            };
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive);
        let mut lease = Lease {
            up: self.arc(),
            server,
            conn: 0,
            tx: Some(tx),
            client: client.key,
            reused: false,
            reusable: false,
            private: Some(permit),
        };
        match self.exchange(&mut lease, req).await {
            Ok(resp) => Ok((resp, lease)),
            Err(f) => Err((Some(addr), f.error)),
        }
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
                || st.slots[i].entries.len() >= keep.min(self.cfg.pool_max)
        })
    }

    /// Active health checks, forever; run as a task per upstream.
    pub async fn check_health(self: Arc<Self>) {
        let h = self.cfg.health.clone();
        // The warm connects at start are the first check; probing starts one interval later.
        let mut tick = tokio::time::interval_at(Instant::now() + h.interval, h.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for i in 0..self.servers.len() {
                let server = &self.servers[i];
                // Real traffic is the better check; and without a health path, a live pooled
                // connection proves as much as a TCP connect would, without an extra
                // connection to the origin.
                let live = h.path.is_none() && self.has_live_connection(i);
                if server.health.is_healthy() && (server.health.recently_ok(h.interval) || live) {
                    continue;
                }
                let ok = health::probe(
                    &server.addr,
                    h.path.as_deref(),
                    self.cfg.connect_timeout,
                    &self.local_preface(),
                )
                .await;
                self.record(i, ok, true);
            }
        }
    }

    fn has_live_connection(&self, server: usize) -> bool {
        self.lock().slots[server]
            .entries
            .iter()
            .any(|e| e.tx.as_ref().is_none_or(|t| !t.is_closed()))
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
