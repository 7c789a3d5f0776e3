//! Breakwater: a hardened TCP accept-front HTTP reverse proxy.
//!
//! # The data flow
//!
//! ```text
//! client ─TCP─▶ ① listener ─▶ ② admission ─▶ ③ conn ──────────▶ ④ proxy ────────▶ ⑤ upstream ─▶ origin
//!               (bind, shards,  (deny/allow,    (clock: slowloris   (route, headers,   (warm pool per
//!                accept4 loop)   rate, caps:     and idle timeouts;  read-ahead,        server, fair
//!                                guards or RST)  hyper HTTP/1+h2c)   errors → HTTP)     queue, health)
//! ```
//! At the edges: `config` (TOML → validated `Config`), `metrics` and `admin` (Prometheus,
//! health), `telemetry` (logs), `doctor` (host settings), `storm` (load tester), `main.rs`
//! (CLI, signals).
//!
//! # Where is…
//! - the listen backlog, TCP_DEFER_ACCEPT, SO_REUSEPORT, the accept loop: `listener.rs`
//! - the per-IP rate limiter: `admission/rate_limit.rs`; caps: `admission/conn_limit.rs`,
//!   `admission/global_cap.rs`; descriptor budget and reserve: `admission/fd.rs`
//! - the header-read, idle and send timeouts, the rapid-reset guard: `conn/clock.rs`
//! - hop-by-hop headers, X-Forwarded-*: `proxy/headers.rs`; routing: `proxy/route.rs`
//! - which error gives which status: `ProxyError` in `proxy.rs`
//! - the warm pool and queue: `upstream.rs`, `upstream/pool.rs`, `upstream/queue.rs`;
//!   health checks: `upstream/health.rs`
//! - config keys and their defaults: `config/file.rs` and `config/breakwater.toml`
//!
//! # Words
//! *downstream*/*client*: the side that connects to Breakwater. *upstream*: a named group of
//! *servers*; *origin*: the application behind them.
//!
//! The library never binds from the config on its own and never reads signals: `run` takes
//! bound listeners and a shutdown future, so tests start the whole proxy on port 0.

pub mod admin;
pub mod admission;
pub mod client;
pub mod config;
pub mod conn;
pub mod demo;
pub mod doctor;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod storm;
pub mod takeover;
pub mod telemetry;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::watch;

pub use config::Config;
pub use listener::BoundListener;

/// What every connection task reads: the config, the proxy, the HTTP server settings.
pub struct Shared {
    pub config: Config,
    pub admission: Arc<admission::Admission>,
    pub requests: Arc<metrics::RequestMetrics>,
    pub registry: prometheus_client::registry::Registry,
    /// Listeners bound and every warm pool filled (for /readyz).
    pub ready: std::sync::atomic::AtomicBool,
    /// True from the shutdown signal on: /readyz answers 503, HTTP/1 responses carry
    /// `Connection: close` and HTTP/2 connections get GOAWAY, while the listeners still accept
    /// for `drain_delay`.
    pub draining: watch::Sender<bool>,
    pub proxy: proxy::Proxy,
    pub http: auto::Builder<TokioExecutor>,
}

/// Binds every configured listener (before the runtime serves anything, so a port in use is
/// reported at start).
pub fn bind_all(config: &Config) -> std::io::Result<Vec<BoundListener>> {
    config.listeners.iter().map(listener::bind).collect()
}

/// How `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Every connection finished within the shutdown timeout.
    Drained,
    /// The timeout passed; this many connections were still open and are cut.
    TimedOut { open: usize },
}

/// Serves until `shutdown` completes; see `Engine::run`.
pub async fn run(
    config: Config,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<Shutdown> {
    Engine::new(config).run(listeners, shutdown).await
}

/// The proxy built from a config, before it serves: lets a caller (a test, the metrics) hold
/// on to its parts.
pub struct Engine {
    shared: Arc<Shared>,
    admin: Option<std::net::TcpListener>,
    tls: Arc<conn::tls::TlsListeners>,
}

impl Engine {
    pub fn new(config: Config) -> Engine {
        let proxy = proxy::Proxy {
            router: proxy::route::Router::new(config.routes.clone(), config.upstreams.len()),
            upstreams: config
                .upstreams
                .iter()
                .map(upstream::Upstream::new)
                .collect(),
            access_log: config.log.access_log,
            access_log_query: config.log.access_log_query,
            request_buffer: config.http.request_buffer,
            response_buffer: config.http.response_buffer,
            min_body_rate: config.http.min_body_rate,
            body_grace: config.http.header_read_timeout,
            via_name: config.http.via_name.clone(),
            shutdown_grace: config.http.shutdown_timeout,
            trusted_proxies: config.http.trusted_proxies.clone(),
        };
        let http = conn::builder(&config.http);
        let admission = Arc::new(admission::Admission::new(&config.admission));
        let route_labels = (0..proxy.router.routes().len())
            .map(|i| {
                let upstream = proxy.router.routes()[i].upstream;
                (
                    proxy.router.label(i),
                    proxy.upstreams[upstream].name.clone(),
                )
            })
            .collect();
        let requests = Arc::new(metrics::RequestMetrics::new(route_labels));
        let tls = Arc::new(conn::tls::TlsListeners::default());
        let registry = metrics::registry(
            admission.clone(),
            proxy.upstreams.clone(),
            requests.clone(),
            tls.clone(),
        );
        Engine {
            shared: Arc::new(Shared {
                config,
                admission,
                requests,
                registry,
                ready: std::sync::atomic::AtomicBool::new(false),
                draining: watch::Sender::new(false),
                http,
                proxy,
            }),
            admin: None,
            tls,
        }
    }

    /// The TLS listeners (filled by `run`), for re-reading certificates on SIGHUP.
    pub fn tls_listeners(&self) -> Arc<conn::tls::TlsListeners> {
        self.tls.clone()
    }

    /// Serves the admin endpoints on `listener` (bound by the caller from `[admin] addr`).
    pub fn with_admin(mut self, listener: std::net::TcpListener) -> Engine {
        self.admin = Some(listener);
        self
    }

    /// The metrics as `/metrics` would show them now.
    pub fn render_metrics(&self) -> String {
        metrics::render(&self.shared.registry)
    }

    /// The state every connection shares (readiness, counters), kept by callers that watch.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    pub fn admission(&self) -> &Arc<admission::Admission> {
        &self.shared.admission
    }

    pub fn upstreams(&self) -> &[Arc<upstream::Upstream>] {
        &self.shared.proxy.upstreams
    }

    /// Serves until `shutdown` completes, then: stop accepting, ask every connection to finish
    /// (HTTP/1 closes after its in-flight response, HTTP/2 sends GOAWAY), and wait up to
    /// `http.shutdown_timeout` for them. A request that can finish within that grace period is
    /// not cut.
    pub async fn run(
        self,
        listeners: Vec<BoundListener>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<Shutdown> {
        let shared = self.shared;
        let grace = shared.config.http.shutdown_timeout;
        // Every accept loop and connection task holds a receiver; `closed()` resolves when the
        // last one is gone, which is how we know the drain finished.
        let (stop_tx, stop_rx) = watch::channel(false);
        // Certificates are read before any listener accepts: a bad file stops the start.
        let mut frontends = Vec::with_capacity(listeners.len());
        for bound in &listeners {
            let tls = match &bound.config.tls {
                None => None,
                Some(t) => {
                    let a =
                        conn::tls::Acceptor::load(t, bound.local_addr, shared.config.http.http2)
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let a = Arc::new(a);
                    self.tls.add(a.clone());
                    Some(a)
                }
            };
            frontends.push(Arc::new(listener::Frontend {
                proxy_protocol: bound.config.proxy_protocol.clone(),
                tls,
            }));
        }
        for (bound, frontend) in listeners.into_iter().zip(frontends) {
            for (shard, socket) in bound.sockets.into_iter().enumerate() {
                tokio::spawn(listener::accept_loop(
                    socket,
                    shard,
                    frontend.clone(),
                    shared.clone(),
                    stop_rx.clone(),
                ));
            }
        }
        if let Some(admin) = self.admin {
            admin.set_nonblocking(true)?;
            let admin = tokio::net::TcpListener::from_std(admin)?;
            tokio::spawn(admin::serve(admin, shared.clone(), stop_rx.clone()));
        }
        drop(stop_rx);
        let reaper = tokio::spawn(maintain_pools(shared.clone()));
        let health: Vec<_> = shared
            .proxy
            .upstreams
            .iter()
            .map(|u| tokio::spawn(u.clone().check_health()))
            .collect();
        let housekeeping = tokio::spawn(shared.admission.clone().housekeeping());

        shutdown.await;
        // First tell the load balancer (readyz 503) and the clients (Connection: close,
        // GOAWAY) while still accepting: whoever has not noticed yet is still served.
        shared.draining.send_replace(true);
        let delay = shared.config.http.drain_delay;
        if !delay.is_zero() {
            tracing::info!(drain_delay = ?delay, "draining: /readyz is 503; still accepting until the drain delay ends");
            tokio::time::sleep(delay).await;
        }
        // Admission slots are held by connections and their tunnels alike.
        let open = shared.admission.open_connections();
        tracing::info!(open_connections = open, grace = ?grace, "shutting down: stopped accepting, draining");
        let _ = stop_tx.send(true);
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
        for h in health {
            h.abort();
        }
        Ok(outcome)
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
        for u in &shared.proxy.upstreams {
            warm &= u.maintain();
        }
        shared
            .ready
            .store(warm, std::sync::atomic::Ordering::Release);
        if warm && !warm_logged {
            tracing::info!(
                "warm pools filled: every healthy server holds its pool_min_idle connections"
            );
            warm_logged = true;
        }
    }
}
