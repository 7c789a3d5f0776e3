//! Logging: tracing to stderr, as text or one JSON object per line. `RUST_LOG` overrides the
//! configured level (e.g. `RUST_LOG=breakwater=debug`).
//!
//! Lines are written inline. tracing-appender's non-blocking writer was tried and measured
//! slower on a 2-core host (38k against 45k keep-alive requests/s with the access log on,
//! stderr to a file): its writer thread competes with the proxy for the cores. The access log
//! costs about 15 % of keep-alive throughput; `access_log = false` turns it off.

use tracing_subscriber::EnvFilter;

use crate::config::file::LogFormat;
use crate::config::LogConfig;

pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests starting several proxies in one process) keeps the first subscriber.
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
