//! Logging: tracing to stderr, as text or one JSON object per line. `RUST_LOG` overrides the
//! configured level (e.g. `RUST_LOG=breakwater=debug`).
//!
//! Lines are written inline. tracing-appender's non-blocking writer was tried and measured
//! slower on a 2-core host (38k against 45k keep-alive requests/s with the access log on,
//! stderr to a file): its writer thread competes with the proxy for the cores. The access log
//! costs about 15 % of keep-alive throughput; `access_log = false` turns it off.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::file::LogFormat;
use crate::config::LogConfig;

/// The access log's own file (`[log] access_log_path`), reopened on SIGUSR1 for logrotate.
static ACCESS_FILE: OnceLock<(PathBuf, Mutex<File>)> = OnceLock::new();

const ACCESS_TARGET: &str = "breakwater::access";

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Reopens the access log file (after logrotate moved it). A no-op without one.
pub fn reopen_access_log() -> std::io::Result<()> {
    let Some((path, file)) = ACCESS_FILE.get() else {
        return Ok(());
    };
    let fresh = open_append(path)?;
    *file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    Ok(())
}

/// Sends access lines to the access file when there is one, everything else to stderr.
struct Route;

enum Out<'a> {
    Stderr(std::io::Stderr),
    File(std::sync::MutexGuard<'a, File>),
}

impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::Stderr(s) => s.write(buf),
            Out::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::Stderr(s) => s.flush(),
            Out::File(f) => f.flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for Route {
    type Writer = Out<'a>;
    fn make_writer(&'a self) -> Out<'a> {
        Out::Stderr(std::io::stderr())
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Out<'a> {
        match ACCESS_FILE.get() {
            Some((_, f)) if meta.target() == ACCESS_TARGET => {
                Out::File(f.lock().unwrap_or_else(|p| p.into_inner()))
            }
            _ => self.make_writer(),
        }
    }
}

/// Sets up logging. Fails only when `access_log_path` cannot be opened.
pub fn init(cfg: &LogConfig) -> std::io::Result<()> {
    if let Some(path) = &cfg.access_log_path {
        let file = open_append(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot open access_log_path {}: {e}", path.display()),
            )
        })?;
        let _ = ACCESS_FILE.set((path.clone(), Mutex::new(file)));
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    // Colour codes only for a person at a terminal: in a file, journald or a pipe they are
    // noise that breaks grep (and the access file shares the formatter).
    let ansi =
        std::io::IsTerminal::is_terminal(&std::io::stderr()) && cfg.access_log_path.is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Route);
    // A second init (tests starting several proxies in one process) keeps the first subscriber.
    // The filter is reloadable, so a config reload can change the level.
    match cfg.format {
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = SET_LEVEL.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let h = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = SET_LEVEL.set(Box::new(move |f| h.reload(f).map_err(|e| e.to_string())));
            }
        }
    }
    Ok(())
}

type SetLevel = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Changes the filter of the subscriber `init` installed.
static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

/// Applies a reloaded `[log] level` (RUST_LOG, when set, still wins).
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(());
    }
    match SET_LEVEL.get() {
        Some(set) => set(EnvFilter::new(level)),
        None => Ok(()),
    }
}

/// At most one line per `every` for a kind of event that can repeat per connection (a dead
/// origin during a storm fails thousands of requests a second); the line says how many it
/// stands for. Lock-free: one atomic load on the common, suppressed path.
#[derive(Debug)]
pub struct Sampled {
    every_ms: u64,
    epoch: std::time::Instant,
    next_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Sampled {
    pub fn new(every: std::time::Duration) -> Sampled {
        Sampled {
            every_ms: every.as_millis() as u64,
            epoch: std::time::Instant::now(),
            next_ms: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many it stands for (itself
    /// and those suppressed since the last line); None when it is only counted.
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + self.every_ms, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed) + 1);
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count() {
        let s = Sampled::new(std::time::Duration::from_secs(3600));
        assert_eq!(s.admit(), Some(1));
        for _ in 0..99 {
            assert_eq!(s.admit(), None);
        }
        let s = Sampled::new(std::time::Duration::ZERO);
        assert_eq!(s.admit(), Some(1));
        assert_eq!(s.admit(), Some(1));
    }
}
