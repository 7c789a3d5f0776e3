//! The wiring: the one module that sees every stage. It builds a `Generation` (config, routes,
//! upstreams, HTTP settings) from a config, serves bound listeners until shutdown, and applies
//! reloads: a new generation is swapped in whole for new connections and new requests, while
//! what is in flight finishes on the one it started with.
//!
//! Why this file is ~810 lines (about 90 of them the future-size test): it is the one module
//! that sees every stage (the wiring, the generation swap on reload, shutdown and drain), by
//! design (issue #8); splitting it would spread that view. The next split is reload (`apply`) into `engine/reload.rs`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ListenerConfig};
use crate::listener::BoundListener;
use crate::{admin, admission, conn, listener, metrics, proxy, upstream};

pub use crate::conn::Generation;

impl Generation {
    /// Builds a generation; `old` lends it the upstreams whose config did not change (their
    /// pools, warm connections and health state carry over) and the request counters when the
    /// routes are the same. `server` gives the proxy what it reads of the process: admission's
    /// per-request side and the drain flag.
    fn build(config: Config, old: Option<&Generation>, server: &Wired) -> Generation {
        let upstreams: Vec<Arc<upstream::Upstream>> = config
            .upstreams
            .iter()
            .map(|u| {
                old.and_then(|o| {
                    o.proxy
                        .upstreams
                        .iter()
                        .find(|x| *x.name == *u.name && x.cfg == *u)
                        .cloned()
                })
                .unwrap_or_else(|| {
                    let up = upstream::Upstream::new(u, config.express_connections > 0);
                    if let Some(cores) = server.cores.get() {
                        up.set_cores(cores);
                    }
                    up
                })
            })
            .collect();
        let router = proxy::route::Router::new(config.routes.clone(), config.upstreams.len());
        let labels: Vec<(String, String)> = router
            .routes()
            .iter()
            .enumerate()
            .map(|(i, r)| (router.label(i), upstreams[r.upstream].name.to_string()))
            .collect();
        let requests = match old {
            Some(o) if o.proxy.requests.route_labels() == labels.as_slice() => {
                o.proxy.requests.clone()
            }
            _ => Arc::new(proxy::stats::RequestMetrics::new(labels)),
        };
        // A room keeps its line and sessions across reloads (matched by name); its origin guard
        // watches the upstream its path prefix routes to.
        let rooms = config
            .rooms
            .iter()
            .map(|rc| {
                let guard = router
                    .pick(
                        rc.host.as_ref().and_then(|h| match h {
                            crate::config::HostPattern::Exact(h) => Some(h.as_str()),
                            crate::config::HostPattern::Suffix(_) => None,
                        }),
                        &rc.path_prefix,
                    )
                    .map(|r| upstreams[router.routes()[r].upstream].clone());
                let prev = old.and_then(|o| o.proxy.rooms.iter().find(|r| r.cfg.name == rc.name));
                Arc::new(crate::room::Room::new(
                    rc.clone(),
                    guard,
                    prev.map(|r| &**r),
                    config.fleet.as_ref().is_some_and(|f| f.rooms_shared()),
                ))
            })
            .collect();
        let proxy = proxy::Proxy {
            router,
            upstreams,
            access_log: config.log.access_log,
            access_log_query: config.log.access_log_query,
            request_buffer: config.http.request_buffer,
            response_buffer: config.http.response_buffer,
            min_body_rate: config.http.min_body_rate,
            body_grace: config.http.header_read_timeout,
            via: crate::proxy::headers::Via::new(&config.http.via_name),
            shutdown_grace: config.http.shutdown_timeout,
            trusted_proxies: config.http.trusted_proxies.clone(),
            spool: proxy::spool::Settings {
                per_response: config.http.response_spool,
                memory: config.http.spool_memory,
                dir: config.http.spool_dir.clone(),
                send_timeout: config.http.send_timeout,
                min_send_rate: config.http.min_send_rate,
            },
            // One budget for the process: spools of the old generation still count.
            spooler: match old {
                Some(o) => {
                    o.proxy.spooler.set_limit(config.http.spool_budget);
                    o.proxy.spooler.clone()
                }
                None => proxy::spool::Spooler::new(config.http.spool_budget),
            },
            request_budget: match old {
                Some(o) => {
                    o.proxy
                        .request_budget
                        .set_limit(config.http.request_buffer_budget);
                    o.proxy.request_budget.clone()
                }
                None => upstream::body::ByteBudget::new(config.http.request_buffer_budget),
            },
            rooms,
            requests,
            gate: server.gate.clone(),
            draining: server.draining.clone(),
        };
        Generation {
            http: Arc::new(conn::builder(&config.http)),
            proxy: Arc::new(proxy),
            config,
        }
    }
}

/// What every generation's proxy is handed of the process (admission's per-request side, the
/// drain flag); the same for each generation.
struct Wired {
    gate: Arc<dyn crate::client::RequestGate>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The thread-per-core runtimes, once serving (`[runtime] thread_per_core`).
    cores: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
}

/// What the admin endpoints, the metrics and the callers that watch a running engine read.
/// Only the wiring sees it whole: the accept loops get a `listener::Wiring`, connection tasks
/// a `conn::Server`, each request its generation's `proxy::Proxy`.
pub struct Shared {
    pub server: Arc<conn::Server>,
    pub admission: Arc<admission::Admission>,
    /// The accept loops' counters.
    pub shards: Arc<listener::stats::Shards>,
    pub registry: prometheus_client::registry::Registry,
    /// Listeners bound and every warm pool filled (for /readyz).
    pub ready: AtomicBool,
    pub reloads: Arc<metrics::ReloadStats>,
    /// `[fleet]` as started; its counters are what the metrics read (a reload that changes
    /// its settings starts a new task with the same counters).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    wired: Wired,
    wiring: Arc<listener::Wiring>,
}

impl Shared {
    /// The generation in force now: new connections and requests use it.
    pub fn gen(&self) -> Arc<Generation> {
        self.server.gen()
    }

    /// True from the shutdown signal on: /readyz answers 503, HTTP/1 responses carry
    /// `Connection: close` and HTTP/2 connections get GOAWAY, while the listeners still accept
    /// for `drain_delay`.
    pub fn draining(&self) -> &watch::Sender<bool> {
        &self.server.draining
    }
}

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Every connection finished within the shutdown timeout.
    Drained,
    /// The timeout passed; this many connections were still open and are cut.
    TimedOut { open: usize },
}

type ReloadRequest = (Config, oneshot::Sender<Result<String, String>>);

/// Sends a new config to a running engine.
#[derive(Clone, Debug)]
pub struct Reloader {
    tx: mpsc::Sender<ReloadRequest>,
    stats: Arc<metrics::ReloadStats>,
}

impl Reloader {
    /// Applies `config` (already validated) to the running engine; returns what changed, or
    /// why nothing did.
    pub async fn reload(&self, config: Config) -> Result<String, String> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send((config, done))
            .await
            .map_err(|_| "the engine is not running".to_string())?;
        answer
            .await
            .map_err(|_| "the engine stopped during the reload".to_string())?
    }

    /// Counts a reload that failed before reaching the engine (a config that did not parse).
    pub fn record_failure(&self) {
        self.stats.record(false);
    }
}

/// The proxy built from a config, before it serves: lets a caller (a test, the metrics) hold
/// on to its parts.
pub struct Engine {
    shared: Arc<Shared>,
    admin: Option<std::net::TcpListener>,
    tls: Arc<conn::tls::TlsListeners>,
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
}

/// One listener's accept loops, as a reload sees them.
struct Serving {
    config: ListenerConfig,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl Engine {
    pub fn new(config: Config) -> Engine {
        let admission = Arc::new(admission::Admission::new(&config.admission));
        let fleet = config.fleet.clone().map(crate::fleet::Fleet::new);
        let draining = watch::Sender::new(false);
        let wired = Wired {
            gate: admission.clone(),
            draining: Arc::default(),
            cores: std::sync::OnceLock::new(),
        };
        let current = Arc::new(ArcSwap::from_pointee(Generation::build(
            config, None, &wired,
        )));
        let tls = Arc::new(conn::tls::TlsListeners::default());
        let reloads = Arc::new(metrics::ReloadStats::default());
        let shards = Arc::new(listener::stats::Shards::default());
        let registry = metrics::registry(
            admission.clone(),
            shards.clone(),
            current.clone(),
            tls.clone(),
            reloads.clone(),
            fleet.clone(),
        );
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let server = Arc::new(conn::Server::new(current, draining, wired.draining.clone()));
        Engine {
            shared: Arc::new(Shared {
                wiring: Arc::new(listener::Wiring {
                    admission: admission.clone(),
                    shards: shards.clone(),
                    server: server.clone(),
                }),
                server,
                admission,
                shards,
                registry,
                ready: AtomicBool::new(false),
                reloads,
                fleet,
                wired,
            }),
            admin: None,
            tls,
            reload_tx,
            reload_rx,
        }
    }

    /// The TLS listeners (filled by `run`), for re-reading certificates on SIGHUP.
    pub fn tls_listeners(&self) -> Arc<conn::tls::TlsListeners> {
        self.tls.clone()
    }

    /// A handle that applies new configs to this engine once it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tx: self.reload_tx.clone(),
            stats: self.shared.reloads.clone(),
        }
    }

    /// Serves the admin endpoints on `listener` (bound by the caller from `[admin] addr`).
    pub fn with_admin(mut self, listener: std::net::TcpListener) -> Engine {
        self.admin = Some(listener);
        self
    }

    /// The state every connection shares (readiness, counters), kept by callers that watch.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The config in force.
    pub fn config(&self) -> Config {
        self.shared.gen().config.clone()
    }

    pub fn admission(&self) -> &Arc<admission::Admission> {
        &self.shared.admission
    }

    /// The accept loops' counters.
    pub fn shards(&self) -> &Arc<listener::stats::Shards> {
        &self.shared.shards
    }

    pub fn upstreams(&self) -> Vec<Arc<upstream::Upstream>> {
        self.shared.gen().proxy.upstreams.clone()
    }

    /// Serves until `shutdown` completes, applying reloads meanwhile, then: readyz 503 and
    /// `drain_delay` while still accepting, stop accepting, ask every connection to finish
    /// (HTTP/1 closes after its in-flight response, HTTP/2 sends GOAWAY), and wait up to
    /// `http.shutdown_timeout` for them. A request that can finish within that grace period is
    /// not cut.
    pub async fn run(
        mut self,
        listeners: Vec<BoundListener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<Shutdown> {
        let shared = self.shared.clone();
        // Every accept loop and connection task holds a receiver; `closed()` resolves when the
        // last one is gone, which is how we know the drain finished.
        let (stop_tx, stop_rx) = watch::channel(false);
        // However this future ends (dropped unfinished, too), the connections are told to stop,
        // as the dropped `stop_tx` tells the accept loops.
        let _stop_on_drop = StopOnDrop(shared.server.clone());
        let http2 = shared.gen().config.http.http2;
        // Certificates are read before any listener accepts: a bad file stops the start.
        let mut frontends = Vec::with_capacity(listeners.len());
        for bound in &listeners {
            frontends.push(self.frontend(bound, http2)?);
        }
        let lanes = Arc::new(listener::lanes::Lanes::start(
            shared.gen().config.express_connections,
            shared.gen().config.express_nice,
            shared.gen().config.express_accept_above,
            shared.gen().config.express_above,
            shared.gen().config.park_connections,
            if shared.gen().config.thread_per_core {
                shared.gen().config.worker_threads
            } else {
                0
            },
            shared.server.clone(),
            shared.shards.clone(),
        ));
        // The pools open their warm connections on the cores, in turn (`Upstream::set_cores`);
        // upstreams a reload adds get them from `Wired`.
        let cores = lanes.core_handles();
        for u in shared.gen().proxy.upstreams.iter() {
            u.set_cores(&cores);
        }
        let _ = shared.wired.cores.set(cores);
        let mut serving = Vec::new();
        for (bound, frontend) in listeners.into_iter().zip(frontends) {
            serving.push(start_listener(bound, frontend, &shared, &lanes, &stop_rx));
        }
        if let Some(admin) = self.admin.take() {
            admin.set_nonblocking(true)?;
            let admin = tokio::net::TcpListener::from_std(admin)?;
            tokio::spawn(admin::serve(admin, shared.clone(), stop_rx.clone()));
        }
        let reaper = tokio::spawn(maintain_pools(shared.clone()));
        let mut health: HashMap<String, (Arc<upstream::Upstream>, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        sync_health(&shared.gen(), &mut health);
        let housekeeping = tokio::spawn(shared.admission.clone().housekeeping());
        let start_fleet = |f: Arc<crate::fleet::Fleet>| {
            let s = shared.clone();
            let rooms: crate::fleet::Rooms = Arc::new(move || s.gen().proxy.rooms.clone());
            tokio::spawn(f.run(shared.admission.clone(), rooms))
        };
        let mut fleet = shared.fleet.clone().map(start_fleet);
        // The fleet's settings in force (a reload may replace them).
        let mut fleet_now = shared.fleet.clone();

        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some((config, done)) = self.reload_rx.recv() => {
                    let before = shared.gen().config.fleet.clone();
                    let mut r = self.apply(config, &mut serving, &mut health, (&lanes, &stop_rx));
                    // New store settings (a rotated password in redis_url_file, another
                    // namespace, other intervals or bans): the fleet task starts again with them.
                    let after = shared.gen().config.fleet.clone();
                    if let (Ok(msg), Some(f), Some(old), Some(new)) =
                        (&mut r, &mut fleet, &before, after)
                    {
                        if *old != new && crate::fleet::Fleet::reloadable(old, &new) {
                            f.abort();
                            let running = shared.fleet.as_ref().map(|x| x.reconfigured(new));
                            if let Some(next) = running {
                                fleet_now = Some(next.clone());
                                *f = start_fleet(next);
                                *msg += "; [fleet] settings applied (store connections made again)";
                            }
                        }
                    }
                    shared.reloads.record(r.is_ok());
                    let _ = done.send(r);
                }
            }
        }
        drop(stop_rx);
        let gen = shared.gen();
        let grace = gen.config.http.shutdown_timeout;
        // First tell the load balancer (readyz 503) and the clients (Connection: close,
        // GOAWAY) while still accepting: whoever has not noticed yet is still served.
        shared.server.signal(conn::roster::Phase::Draining);
        if let Some(f) = &fleet_now {
            f.retire(&gen.proxy.rooms).await;
        }
        let delay = gen.config.http.drain_delay;
        if !delay.is_zero() {
            tracing::info!(drain_delay = ?delay, "draining: /readyz is 503; still accepting until the drain delay ends");
            tokio::time::sleep(delay).await;
        }
        // Admission slots are held by connections and their tunnels alike.
        let open = shared.admission.open_connections();
        tracing::info!(open_connections = open, grace = ?grace, "shutting down: stopped accepting, draining");
        for s in &serving {
            let _ = s.stop.send(true);
        }
        let _ = stop_tx.send(true);
        shared.server.signal(conn::roster::Phase::Stopping);
        let outcome = match tokio::time::timeout(grace, stop_tx.closed()).await {
            Ok(()) => {
                tracing::info!("shutdown complete: all connections drained");
                Shutdown::Drained
            }
            Err(_) => {
                let open = shared.admission.open_connections();
                tracing::warn!(
                    open_connections = open,
                    "shutdown timeout reached: cutting open connections"
                );
                Shutdown::TimedOut { open }
            }
        };
        reaper.abort();
        housekeeping.abort();
        if let Some(f) = fleet {
            f.abort();
        }
        for (_, (_, h)) in health {
            h.abort();
        }
        Ok(outcome)
    }

    fn frontend(
        &self,
        bound: &BoundListener,
        http2: bool,
    ) -> std::io::Result<Arc<listener::Frontend>> {
        let tls = match &bound.config.tls {
            None => None,
            Some(t) => {
                let a = conn::tls::Acceptor::load(t, bound.local_addr, http2)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let a = Arc::new(a);
                self.tls.add(a.clone());
                Some(a)
            }
        };
        Ok(Arc::new(listener::Frontend {
            proxy_protocol: bound.config.proxy_protocol.clone(),
            tls,
            defer_accept: !bound.config.defer_accept.is_zero(),
        }))
    }

    /// Applies a reloaded config. Listeners are matched by address: new addresses are bound
    /// (a failure leaves everything as it was), removed ones stop accepting while their
    /// connections finish. Then the new generation is swapped in and admission updated.
    fn apply(
        &self,
        config: Config,
        serving: &mut Vec<Serving>,
        health: &mut HashMap<String, (Arc<upstream::Upstream>, tokio::task::JoinHandle<()>)>,
        (lanes, stop_rx): (&Arc<listener::lanes::Lanes>, &watch::Receiver<bool>),
    ) -> Result<String, String> {
        let shared = &self.shared;
        let old = shared.gen();
        let mut notes = Vec::new();
        // Bind the new listeners first: a port in use fails the reload with nothing changed.
        let mut added = Vec::new();
        // Matched by the address as configured: "127.0.0.1:0" is the same listener again, not a
        // new one on another free port.
        for l in &config.listeners {
            if serving.iter().any(|s| s.config.addr == l.addr) {
                continue;
            }
            let bound = listener::bind(l).map_err(|e| e.to_string())?;
            let frontend = self
                .frontend(&bound, config.http.http2)
                .map_err(|e| e.to_string())?;
            added.push((bound, frontend));
        }
        for s in serving.iter() {
            if let Some(l) = config.listeners.iter().find(|l| l.addr == s.config.addr) {
                if *l != s.config {
                    notes.push(format!(
                        "listener {}: its socket options, TLS or PROXY settings changed; they \
                         apply after a restart or takeover",
                        s.addr
                    ));
                }
            }
        }
        for (k, changed) in [
            (
                "[runtime] worker_threads",
                old.config.worker_threads != config.worker_threads,
            ),
            (
                "[admin]",
                old.config.admin.as_ref().map(|a| a.addr) != config.admin.as_ref().map(|a| a.addr),
            ),
            (
                "[fleet] (turning the store or share_rooms on or off)",
                match (&old.config.fleet, &config.fleet) {
                    (Some(a), Some(b)) => !crate::fleet::Fleet::reloadable(a, b),
                    (a, b) => a != b,
                },
            ),
            (
                "[runtime] control_socket",
                old.config.control_socket != config.control_socket,
            ),
            (
                "[runtime] express_connections",
                old.config.express_connections != config.express_connections,
            ),
            (
                "[runtime] park_connections",
                old.config.park_connections != config.park_connections,
            ),
            (
                "[runtime] thread_per_core",
                old.config.thread_per_core != config.thread_per_core,
            ),
            (
                "[runtime] express_nice",
                old.config.express_nice != config.express_nice,
            ),
            (
                "[runtime] express_accept_above",
                old.config.express_accept_above != config.express_accept_above,
            ),
            (
                "[runtime] express_above",
                old.config.express_above != config.express_above,
            ),
            (
                "[log]",
                old.config.log.level != config.log.level
                    || old.config.log.format != config.log.format,
            ),
        ] {
            if changed {
                notes.push(format!("{k} changed: applies after a restart or takeover"));
            }
        }
        // The lanes run as started (and the pools keep their slice for the express lane
        // accordingly); the config in force says so.
        let mut config = config;
        config.express_connections = old.config.express_connections;
        config.park_connections = old.config.park_connections;
        config.thread_per_core = old.config.thread_per_core;
        config.express_nice = old.config.express_nice;
        config.express_accept_above = old.config.express_accept_above;
        config.express_above = old.config.express_above;
        if old.config.log.level != config.log.level {
            match crate::telemetry::set_level(&config.log.level) {
                Ok(()) => notes.push(format!("log level {}", config.log.level)),
                Err(e) => notes.push(format!("log level not changed: {e}")),
            }
        }
        shared.admission.reload(&config.admission);
        let gen = Arc::new(Generation::build(config, Some(&old), &shared.wired));
        shared.server.swap(gen.clone());
        sync_health(&gen, health);
        for (bound, frontend) in added {
            notes.push(format!("listening on {}", bound.local_addr));
            serving.push(start_listener(bound, frontend, shared, lanes, stop_rx));
        }
        serving.retain(|s| {
            let keep = gen.config.listeners.iter().any(|l| l.addr == s.config.addr);
            if !keep {
                notes.push(format!("stopped listening on {}", s.addr));
                let _ = s.stop.send(true);
            }
            keep
        });
        // The certificate files may have changed with the config.
        self.tls.reload();
        Ok(if notes.is_empty() {
            "config reloaded".into()
        } else {
            format!("config reloaded; {}", notes.join("; "))
        })
    }
}

/// Stops every connection when dropped (`Engine::run`).
struct StopOnDrop(Arc<conn::Server>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.signal(conn::roster::Phase::Stopping);
    }
}

/// Spawns one accept loop per shard of `bound`.
fn start_listener(
    bound: BoundListener,
    frontend: Arc<listener::Frontend>,
    shared: &Arc<Shared>,
    lanes: &Arc<listener::lanes::Lanes>,
    conns: &watch::Receiver<bool>,
) -> Serving {
    let (stop, stop_rx) = watch::channel(false);
    let addr = bound.local_addr;
    let config = bound.config.clone();
    let shards = bound.sockets.len();
    for (shard, socket) in bound.sockets.into_iter().enumerate() {
        listener::start_accept(
            socket,
            (shard, shards),
            frontend.clone(),
            shared.wiring.clone(),
            lanes.clone(),
            (stop_rx.clone(), conns.clone()),
        );
    }
    Serving { config, addr, stop }
}

/// One active health-check task per upstream of `gen`: kept for upstreams carried over,
/// started for new ones, stopped for those gone.
fn sync_health(
    gen: &Generation,
    tasks: &mut HashMap<String, (Arc<upstream::Upstream>, tokio::task::JoinHandle<()>)>,
) {
    tasks.retain(|name, (u, h)| {
        let keep = gen
            .proxy
            .upstreams
            .iter()
            .any(|x| *x.name == **name && Arc::ptr_eq(x, u));
        if !keep {
            h.abort();
        }
        keep
    });
    for u in &gen.proxy.upstreams {
        if !tasks.contains_key(&*u.name) {
            tasks.insert(
                u.name.to_string(),
                (u.clone(), tokio::spawn(u.clone().check_health())),
            );
        }
    }
}

/// Keeps the warm pools filled and trims idle connections; logs once when every pool is warm.
async fn maintain_pools(shared: Arc<Shared>) {
    let mut warm_logged = false;
    // Fill the pools at once, then check four times a second (cheap: one short lock per
    // upstream), so /readyz turns ready soon after the pools are warm.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let mut warm = true;
        let gen = shared.gen();
        for u in &gen.proxy.upstreams {
            warm &= u.maintain();
        }
        // The waiting rooms' doors move on the same 250 ms tick (`room::TICK`).
        let now = std::time::Instant::now();
        for r in &gen.proxy.rooms {
            r.tick(now);
        }
        drop(gen);
        // Warming is a start-up state only: once the pools have filled, a pool that runs short
        // later (the origin closed idle connections, a server restarts) is the origin's health
        // to report, not a reason to pull this instance out of a load balancer.
        if warm && !warm_logged {
            shared.ready.store(true, Ordering::Release);
            tracing::info!(
                "warm pools filled: every healthy server holds its pool_min_idle connections"
            );
            warm_logged = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    /// tokio moves every connection's future into its task and hyper every request's into its
    /// slot, so their size is paid per connection and per request (the storm profile had
    /// `memmove` at 5-6 % before the rare paths were boxed). A guard, measured on the futures
    /// the server really builds: it fails when one grows past its bound.
    #[tokio::test]
    async fn the_connection_and_request_futures_stay_small() {
        let cfg = Config::parse(
            "[upstreams.app]\nservers = [\"127.0.0.1:9\"]\npool_min_idle = 0\n",
            "t.toml",
        )
        .unwrap();
        let engine = Engine::new(cfg);
        let server = engine.shared().server.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stream, peer) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (_client_side, (stream, peer)) = (stream.unwrap(), peer.unwrap());
        // The guards a real connection carries, as the accept loop hands them over.
        let slot = engine.admission().try_global_slot().unwrap();
        let admitted = engine.admission().admit(peer, peer.ip(), slot).unwrap();
        let client = admitted.client;
        let (_stop, stop_rx) = watch::channel(false);
        let conn = conn::serve(
            stream,
            client,
            admitted,
            None,
            server.clone(),
            stop_rx.clone(),
        );
        let conn_size = std::mem::size_of_val(&conn);
        drop(conn);

        // A request future, built by a real hyper connection as `conn::serve` builds it.
        let measured = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = measured.clone();
        let activity = Arc::new(conn::clock::ConnActivity::default());
        let hold = Arc::new(proxy::ConnHold {
            id: proxy::ConnHold::next_id(),
            client,
            stop: stop_rx,
            tls: false,
            slots: Box::new(()),
            client_value: Default::default(),
        });
        let svc = hyper::service::service_fn(move |req| {
            let fut = proxy::handle(
                server.proxy(),
                activity.clone(),
                hold.clone(),
                activity.begin(),
                req,
            );
            seen.store(std::mem::size_of_val(&fut), Ordering::Relaxed);
            fut
        });
        let (a, b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(b), svc),
        );
        let (mut tx, c) = hyper::client::conn::http1::handshake(TokioIo::new(a))
            .await
            .unwrap();
        tokio::spawn(c);
        let req = hyper::Request::get("http://x/")
            .header("host", "x")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        // The origin is a closed port: the answer is a 502, the size was taken before.
        let _ = tx.send_request(req).await;
        let request_size = measured.load(Ordering::Relaxed);
        eprintln!("connection future {conn_size} B, request future {request_size} B");
        // Measured 2,288 and 1,248 B in a debug build, admission's guards held inline until the
        // task boxes them (they were 5,384 and 6,584 B before session 5 boxed the rare paths;
        // the connection's was 2,824 B before its first bytes were read ahead of hyper, 3,312 B
        // after, 2,288 B once hyper-util's connection (TLS and HTTP/2 only) was boxed and the
        // stop signals came through the roster; the request's was 4,520 B until `forward`,
        // which only a running request needs, was boxed: hyper keeps one request future's
        // room per HTTP/1 connection for the connection's whole life).
        assert!(
            conn_size > 0 && conn_size <= 2_560,
            "connection future {conn_size} B"
        );
        assert!(
            request_size > 0 && request_size <= 1_536,
            "request future {request_size} B"
        );
    }
}
