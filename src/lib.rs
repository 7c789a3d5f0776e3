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
//! Below the stages, leaves any of them may read: `config` (TOML → validated `Config`),
//! `client` (who a connection or request is from), `target` (the canonical host and path),
//! `telemetry` (logs), `timer` (deadlines on a reused timer). Above them, the wiring that only
//! the top sees: `engine` (builds a generation, serves, reloads), `metrics` and `admin`
//! (Prometheus, health), `fleet`, `takeover`, `tools` (doctor, storm, demo; feature `tools`)
//! and `main.rs` (CLI, signals).
//! A stage imports only stages after it and the leaves; `.ci/layering` checks this with grep.
//! What a stage is handed instead of the whole server: the accept loops a `listener::Wiring`,
//! connection tasks a `conn::Server`, each request its generation's `proxy::Proxy` (with
//! admission's per-request side as a `client::RequestGate`).
//!
//! # Where is…
//! - the listen backlog, TCP_DEFER_ACCEPT, SO_REUSEPORT, the accept loop: `listener.rs`
//! - the per-IP rate limiter: `admission/rate_limit.rs`; caps: `admission/conn_limit.rs`,
//!   `admission/global_cap.rs`; descriptor budget and reserve: `admission/fd.rs`
//! - the header-read, idle and send timeouts: `conn/clock.rs`; the per-connection request
//!   accounting it reads (in flight, answered, cancelled: the rapid-reset guard):
//!   `proxy/activity.rs`
//! - hop-by-hop headers, X-Forwarded-*: `proxy/headers.rs`; routing: `proxy/route.rs`
//! - which error gives which status: `ProxyError` in `proxy/error.rs`; request counters:
//!   `proxy/stats.rs`
//! - the warm pool and queue: `upstream.rs` (scheduling), `upstream/lease.rs`,
//!   `upstream/pool.rs`, `upstream/queue.rs`; sending and the retry: `upstream/exchange.rs`;
//!   health checks: `upstream/health.rs` (one server's counters), `upstream/checks.rs`
//! - config keys and their defaults: `config/file.rs` and `config/breakwater.toml`; each
//!   section's validated shape and checks: `config/listener.rs`, `http.rs`, `upstream.rs`,
//!   `admission.rs`, `room.rs`, `fleet.rs`
//! - the wiring, hot reload (a new `Generation` swapped in): `engine.rs`
//! - who the client is (PROXY protocol, trusted forwarding headers): `client.rs`,
//!   `listener/proxy_protocol.rs`, `proxy/headers.rs`; TLS: `conn/tls.rs`
//! - the canonical host and path (read by config, the router and the rooms): `target.rs`
//! - zero-downtime restart (socket passing): `takeover.rs`
//! - the waiting room (a line at the door of a sale, opened by the origin's queue wait):
//!   `room.rs`; its tokens `room/token.rs`, its line `room/state.rs`, its page `room/page.rs`,
//!   what a waiter is answered (JSON, page, cookie) `room/answer.rs`; the shopper load mode
//!   `tools/storm/queue.rs`
//! - response spooling for slow readers and the progress deadlines: `proxy/spool.rs`
//! - fleet mode (limits and bans shared through Redis, synced off the accept path): `fleet.rs`
//!   (stats, the ban subscriber), `fleet/sync.rs` (the pipeline per interval); the limiter it
//!   feeds: `admission/shared_rate.rs`
//!
//! # Words
//! *downstream*/*client*: the side that connects to Breakwater. *upstream*: a named group of
//! *servers*; *origin*: the application behind them.
//!
//! The library never binds from the config on its own and never reads signals: `run` takes
//! bound listeners and a shutdown future, so tests start the whole proxy on port 0.

// Nothing that input or the network can make fail may panic; tests may (clippy.toml).
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod admission;
pub mod client;
pub mod config;
pub mod conn;
pub mod engine;
pub mod fleet;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod room;
pub mod takeover;
pub mod target;
pub mod telemetry;
pub mod timer;
#[cfg(feature = "tools")]
pub mod tools;
pub mod upstream;

pub use config::Config;
pub use engine::{Engine, Generation, Reloader, Shared, Shutdown};
pub use listener::BoundListener;

/// Binds every configured listener (before the runtime serves anything, so a port in use is
/// reported at start).
pub fn bind_all(config: &Config) -> std::io::Result<Vec<BoundListener>> {
    config.listeners.iter().map(listener::bind).collect()
}

/// Serves until `shutdown` completes; see `Engine::run`.
pub async fn run(
    config: Config,
    listeners: Vec<BoundListener>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<Shutdown> {
    Engine::new(config).run(listeners, shutdown).await
}
