//! The validated configuration the rest of Breakwater reads: typed values (Duration, SocketAddr,
//! indices instead of names), every cross-reference resolved. Loading is two steps: serde reads
//! the TOML into the mirror in `config/file.rs` (unknown keys are errors), then `validate`
//! checks ranges and references. Every error names the file, line, column and key, says what
//! was wrong and what is expected.
//!
//! Why this file is still ~910 lines (about 270 of them tests) and not split further: each section's
//! validated shape and its checks already live in a file of their own:
//! `config/listener.rs`, `http.rs`, `upstream.rs` (with routes), `admission.rs`, `room.rs`,
//! `fleet.rs`. This file keeps what they share: the top-level `Config`, the one pass that
//! calls them in order (errors must point at file:line:key, so the located-error and warning
//! helpers are threaded through), the small sections (admin, runtime, log), and the tests:
//! about 910 lines, 270 of them tests.
//! The TOML mirror and its defaults are in `config/file.rs`; the test that holds
//! `config/breakwater.toml` equal to those defaults keeps the documented values from drifting.

mod admission;
pub mod env;
pub mod file;
pub mod fleet;
mod http;
mod listener;
pub mod room;
mod upstream;

pub use admission::AdmissionConfig;
pub use http::HttpConfig;
use listener::default_shards;
pub use listener::{CertPaths, ListenerConfig, ProxyProtocolConfig, TlsConfig};
use upstream::parse_host_pattern;
pub use upstream::{HealthConfig, HostPattern, RouteConfig, UpstreamConfig};

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

pub use file::{Balance, ProxyProtocolVersion, RejectMode, UpstreamProtocol};
use file::{FileConfig, LogFormat};
use ipnet::IpNet;

/// The commented default configuration, embedded so `breakwater demo` and `check` work anywhere.
pub const DEFAULT_TOML: &str = include_str!("../config/breakwater.toml");

#[derive(Debug, Clone)]
pub struct Config {
    /// Where this configuration came from, for messages.
    pub source: String,
    pub listeners: Vec<ListenerConfig>,
    pub http: HttpConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub admission: AdmissionConfig,
    /// `[admin]`: metrics and health endpoints; None = off.
    pub admin: Option<AdminConfig>,
    /// `[runtime] worker_threads`, resolved: threads serving connections.
    pub worker_threads: usize,
    /// `[runtime] express_connections`: connections the express lane serves at once (clients
    /// with nothing else open, on the accept thread's own runtime); 0 = no lane, accept loops
    /// on the main runtime.
    pub express_connections: usize,
    /// `[runtime] park_connections`: new connections wait accepted but unread while every
    /// upstream's queue holds two rounds of its pool (`listener/park.rs`).
    pub park_connections: bool,
    /// `[runtime] thread_per_core` (default on): connections run on `worker_threads`
    /// single-threaded runtimes, one thread each, with the origin connections they use
    /// (`listener/lanes.rs`), instead of on one multi-threaded runtime.
    pub thread_per_core: bool,
    /// `[runtime] express_nice`: the express lane thread's nice value (-20 to 19), set when
    /// it starts (`listener/lanes.rs`); 0 leaves it at the process's.
    pub express_nice: i32,
    /// `[runtime] express_accept_above`: open client connections above which the accept loops
    /// run on the express lane's thread (below half of it, on the workers); 0 = always there,
    /// 10,000,000 (the default) = never (`listener/lanes.rs`, `Lanes::accept_on_lane`).
    pub express_accept_above: usize,
    /// `[runtime] express_above`, resolved: open client connections (the process's) at or
    /// below which a newcomer is served at home, not on the express lane; 0 = always on the
    /// lane when it has a place; unset: 32 for each worker thread (`listener/lanes.rs`,
    /// `Lanes::express_room`).
    pub express_above: usize,
    /// What `check` and `run` warn about: valid, but probably not what was meant.
    pub warnings: Vec<String>,
    /// `[runtime] control_socket`: where a running instance offers its listening sockets to
    /// `run --takeover`; None when set to "" (off).
    pub control_socket: Option<std::path::PathBuf>,
    pub log: LogConfig,
    /// `[[waiting_room]]`: lines at the door for sales (see `room.rs`).
    pub rooms: Vec<room::RoomConfig>,
    /// `[fleet]`: limits and bans shared with other instances; None = this instance alone.
    pub fleet: Option<fleet::FleetConfig>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// When set, every admin request needs `Authorization: Bearer <token>` (but see
    /// `public_health`).
    pub token: Option<String>,
    /// `/healthz` and `/readyz` answer without the token (kubelet probes carry none).
    pub public_health: bool,
    /// `/readyz` is 503 while every server of some upstream is down.
    pub ready_requires_origin: bool,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    pub access_log: bool,
    /// Query strings in the access log.
    pub access_log_query: bool,
    /// Access lines go to this file (reopened on SIGUSR1) instead of stderr.
    pub access_log_path: Option<std::path::PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}{message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        /// "`http.idle_timeout`: " or empty when the error is not about one key.
        key: String,
        message: String,
    },
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    /// The config file to use when none is named: `$BREAKWATER_CONFIG`, else
    /// `./config/breakwater.toml`, else `/etc/breakwater/breakwater.toml`. The error lists
    /// where it looked.
    pub fn locate(explicit: Option<&Path>) -> Result<std::path::PathBuf, String> {
        if let Some(p) = explicit {
            return Ok(p.to_path_buf());
        }
        if let Some(p) = std::env::var_os("BREAKWATER_CONFIG").filter(|p| !p.is_empty()) {
            return Ok(p.into());
        }
        let candidates = ["config/breakwater.toml", "/etc/breakwater/breakwater.toml"];
        for c in candidates {
            if Path::new(c).is_file() {
                return Ok(c.into());
            }
        }
        Err(format!(
            "no config file: looked for --config, $BREAKWATER_CONFIG, ./{} and {}",
            candidates[0], candidates[1]
        ))
    }

    /// The embedded default (`config/breakwater.toml`).
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_TOML, "<embedded config/breakwater.toml>")
    }

    /// Parses and validates TOML text; `source` names it in errors. `${NAME}` in strings is
    /// read from the environment first.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let text = &env::interpolate(text, |n| std::env::var(n).ok())
            .map_err(|(span, message)| invalid(text, source, span, message))?;
        let raw: FileConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            invalid(text, source, span, plain_types(e.message().trim_end()))
        })?;
        validate(raw, text, source)
    }

    /// A few lines saying what would run, for `breakwater check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for l in &self.listeners {
            let defer = if l.defer_accept.is_zero() {
                "off".to_string()
            } else {
                humantime::format_duration(l.defer_accept).to_string()
            };
            s += &format!(
                "listener {}  backlog {}  defer_accept {}  shards {}\n",
                l.addr, l.backlog, defer, l.shards
            );
        }
        s += &format!(
            "runtime   worker_threads {}  express_connections {}  express_nice {}  \
             express_above {}  express_accept_above {}  park_connections {}  \
             thread_per_core {}\n",
            self.worker_threads,
            self.express_connections,
            self.express_nice,
            self.express_above,
            self.express_accept_above,
            self.park_connections,
            self.thread_per_core
        );
        let h = &self.http;
        s += &format!(
            "http      header_read_timeout {}  idle_timeout {}  max_header_bytes {}  http2 {}  \
             max_concurrent_streams {}\n",
            humantime::format_duration(h.header_read_timeout),
            humantime::format_duration(h.idle_timeout),
            h.max_header_bytes,
            if h.http2 { "on" } else { "off" },
            h.max_concurrent_streams
        );
        for u in &self.upstreams {
            s += &format!(
                "upstream {}  servers [{}]  {} {}  pool {}..{} per server  queue {} for {}  \
                 connect_timeout {}  response_timeout {}  health {} every {}\n",
                u.name,
                u.servers.join(", "),
                match u.protocol {
                    UpstreamProtocol::Http1 => "http1",
                    UpstreamProtocol::H2c => "h2c",
                },
                match u.balance {
                    Balance::LeastOutstanding => "least_outstanding",
                    Balance::RoundRobin => "round_robin",
                },
                u.pool_min_idle,
                u.pool_max,
                u.queue_max,
                humantime::format_duration(u.queue_timeout),
                humantime::format_duration(u.connect_timeout),
                humantime::format_duration(u.response_timeout),
                u.health
                    .path
                    .as_deref()
                    .map_or("tcp".to_string(), |p| format!("GET {p}")),
                humantime::format_duration(u.health.interval),
            );
        }
        let a = &self.admission;
        let off = |n: u32, unit: &str| {
            if n == 0 {
                "off".to_string()
            } else {
                format!("{n}{unit}")
            }
        };
        s += &format!(
            "admission max_connections {}  per_ip_rate {} (burst {})  per_ip_max_connections {}  \
             per_ip_request_rate {}  reject {}  allow {}  deny {}{}\n",
            a.max_connections,
            off(a.per_ip_rate, "/s"),
            a.per_ip_burst,
            off(a.per_ip_max_connections, ""),
            off(a.per_ip_request_rate, "/s"),
            match a.reject {
                RejectMode::Reset => "reset",
                RejectMode::Close => "close",
            },
            a.allow.len(),
            a.deny.len(),
            if a.dry_run { "  DRY RUN" } else { "" }
        );
        if let Some(f) = &self.fleet {
            let store = f
                .shown_url()
                .unwrap_or_else(|| "none (limits per instance)".into());
            s += &format!(
                "fleet     store {store}  instance {}  sync every {} (timeout {})  bans {}{}\n",
                f.instance,
                humantime::format_duration(f.sync_interval),
                humantime::format_duration(f.sync_timeout),
                if f.bans.after_rejections == 0 {
                    "off".to_string()
                } else {
                    format!(
                        "after {} refusals in {} for {}",
                        f.bans.after_rejections,
                        humantime::format_duration(f.bans.window),
                        humantime::format_duration(f.bans.duration)
                    )
                },
                if f.rooms_shared() && !self.rooms.is_empty() {
                    "  waiting rooms: one line"
                } else {
                    ""
                }
            );
        }
        if let Some(a) = &self.admin {
            s += &format!(
                "admin     {}  /metrics /healthz /readyz{}\n",
                a.addr,
                if a.token.is_some() {
                    "  (bearer token)"
                } else {
                    ""
                }
            );
        }
        if self.routes.is_empty() {
            s += &format!("route     * /  -> {}\n", self.upstreams[0].name);
        }
        for r in &self.routes {
            let host = r.host.as_ref().map_or("*".to_string(), |h| h.to_string());
            s += &format!(
                "route     {} {}  -> {}\n",
                host, r.path_prefix, self.upstreams[r.upstream].name
            );
        }
        s
    }
}

fn validate(raw: FileConfig, text: &str, source: &str) -> Result<Config, ConfigError> {
    let err = |span: Range<usize>, msg: String| invalid(text, source, span, msg);
    // Things that work but probably not as meant, located like errors.
    let warnings = Warnings {
        err: &err,
        list: std::cell::RefCell::new(Vec::new()),
    };

    let listeners = listener::validate(raw.listeners, &warnings)?;

    let http = http::validate(raw.http, &warnings)?;

    let (upstreams, routes) = upstream::validate(raw.upstreams, &raw.routes, &warnings)?;

    let mut admission = admission::validate(raw.admission, &warnings)?;
    let fleet = fleet::validate(raw.fleet, &warnings)?;
    let shared_rooms = fleet.as_ref().is_some_and(|f| f.rooms_shared());
    let rooms = room::validate(raw.waiting_room, shared_rooms, &warnings)?;
    admission.shared_limits = fleet.as_ref().is_some_and(|f| f.shared());
    let worker_threads = match *raw.runtime.worker_threads.get_ref() {
        0 => default_shards(),
        n if n <= 1024 => n,
        n => {
            return Err(err(
                raw.runtime.worker_threads.span(),
                format!("worker_threads {n} is out of range: expected 0 (one per core) to 1024"),
            ))
        }
    };
    let express_connections = *raw.runtime.express_connections.get_ref();
    if express_connections > 100_000 {
        return Err(err(
            raw.runtime.express_connections.span(),
            format!(
                "express_connections {express_connections} is out of range: expected 0 (off) to 100000"
            ),
        ));
    }
    let express_nice = *raw.runtime.express_nice.get_ref();
    if !(-20..=19).contains(&express_nice) {
        return Err(err(
            raw.runtime.express_nice.span(),
            format!(
                "express_nice {express_nice} is out of range: expected a nice value, -20 \
                 (most CPU) to 19 (least); 0 = as the rest of the process"
            ),
        ));
    }
    let express_accept_above = *raw.runtime.express_accept_above.get_ref();
    if express_accept_above > 10_000_000 {
        return Err(err(
            raw.runtime.express_accept_above.span(),
            format!(
                "express_accept_above {express_accept_above} is out of range: expected 0 (the \
                 accept loops always on the lane's thread) to 10000000 open connections"
            ),
        ));
    }
    let express_above = match &raw.runtime.express_above {
        None => worker_threads.saturating_mul(file::DEFAULT_EXPRESS_ABOVE_PER_WORKER),
        Some(v) if *v.get_ref() > 10_000_000 => {
            return Err(err(
                v.span(),
                format!(
                    "express_above {} is out of range: expected 0 (newcomers always on the \
                     lane) to 10000000 open connections",
                    v.get_ref()
                ),
            ))
        }
        Some(v) => *v.get_ref(),
    };
    let admin = match raw.admin {
        None => None,
        Some(a) => {
            let addr: SocketAddr = a.addr.get_ref().parse().map_err(|_| {
                err(
                    a.addr.span(),
                    format!(
                        "invalid address {:?}: expected IP:port, such as \"127.0.0.1:9901\"",
                        a.addr.get_ref()
                    ),
                )
            })?;
            // Port 0 picks a free port each: no clash.
            if addr.port() != 0 && listeners.iter().any(|l| l.addr == addr) {
                return Err(err(
                    a.addr.span(),
                    format!(
                        "admin addr {addr} is also a listener address: the admin port needs an \
                         address of its own, such as \"127.0.0.1:9901\""
                    ),
                ));
            }
            let token = match (a.token, a.token_file) {
                (Some(_), Some(f)) => {
                    return Err(err(
                        f.span(),
                        "token and token_file are both set: keep one".into(),
                    ))
                }
                (Some(t), None) if t.get_ref().trim().is_empty() => {
                    return Err(err(
                        t.span(),
                        "token is empty: remove it or set a secret".into(),
                    ))
                }
                (Some(t), None) => Some(t.into_inner()),
                // A secret mounted as a file (Kubernetes, docker secrets), read at load.
                (None, Some(f)) => match std::fs::read_to_string(f.get_ref()) {
                    Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
                    Ok(_) => {
                        return Err(err(
                            f.span(),
                            format!("token_file {:?} is empty", f.get_ref()),
                        ))
                    }
                    Err(e) => {
                        return Err(err(
                            f.span(),
                            format!("cannot read token_file {:?}: {e}", f.get_ref()),
                        ))
                    }
                },
                (None, None) => None,
            };
            if !addr.ip().is_loopback() && token.is_none() {
                return Err(err(
                    a.addr.span(),
                    format!(
                        "admin addr {addr} is not a loopback address and no token is set: the \
                         metrics would be open to anyone who can reach it. Set token = \"...\" \
                         or listen on 127.0.0.1"
                    ),
                ));
            }
            Some(AdminConfig {
                addr,
                token,
                public_health: a.public_health,
                ready_requires_origin: a.ready_requires_origin,
            })
        }
    };

    let level = raw.log.level.get_ref().to_ascii_lowercase();
    if !["off", "error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
        return Err(err(
            raw.log.level.span(),
            format!(
                "unknown log level {:?}: expected one of off, error, warn, info, debug, trace",
                raw.log.level.get_ref()
            ),
        ));
    }

    Ok(Config {
        source: source.to_string(),
        rooms,
        fleet,
        listeners,
        http,
        upstreams,
        routes,
        admission,
        admin,
        worker_threads,
        express_connections,
        park_connections: raw.runtime.park_connections,
        thread_per_core: raw.runtime.thread_per_core,
        express_nice,
        express_accept_above,
        express_above,
        warnings: warnings.list.take(),
        control_socket: Some(raw.runtime.control_socket.trim())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from),
        log: LogConfig {
            level,
            format: raw.log.format,
            access_log: raw.log.access_log,
            access_log_query: raw.log.access_log_query,
            access_log_path: raw
                .log
                .access_log_path
                .filter(|p| !p.trim().is_empty())
                .map(std::path::PathBuf::from),
        },
    })
}

/// Warnings collected while validating, each located like an error.
struct Warnings<'a> {
    err: &'a dyn Fn(Range<usize>, String) -> ConfigError,
    list: std::cell::RefCell<Vec<String>>,
}

impl Warnings<'_> {
    fn push(&self, span: Range<usize>, message: String) {
        self.list
            .borrow_mut()
            .push((self.err)(span, message).to_string());
    }
}

/// serde names Rust types ("expected usize"); a config's reader wants the kind of value.
fn plain_types(message: &str) -> String {
    let mut m = message.to_string();
    for t in ["usize", "u64", "u32", "u16", "u8", "i64", "i32"] {
        m = m.replace(&format!("expected {t}"), "expected a whole number");
    }
    m.replace("expected f64", "expected a number")
        .replace("expected a boolean", "expected true or false")
}

/// A size key within `range`, or an error naming it with the range.
fn bounded(
    v: &toml::Spanned<usize>,
    key: &str,
    range: std::ops::RangeInclusive<usize>,
    why: &str,
    err: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<usize, ConfigError> {
    let n = *v.get_ref();
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(err(
            v.span(),
            format!(
                "{key} {n} is out of range: expected {} to {}{why}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// A list of networks as `allow`, `deny`, `trusted_proxies` and `proxy_protocol_from` write
/// them: CIDRs or single addresses.
fn parse_nets(
    list: &[toml::Spanned<String>],
    warnings: &Warnings<'_>,
) -> Result<Vec<IpNet>, ConfigError> {
    let err = warnings.err;
    list.iter()
        .map(|s| {
            let t = s.get_ref().trim();
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .inspect(|n| {
                    if n.trunc() != *n {
                        warnings.push(
                            s.span(),
                            format!(
                                "{t} has host bits set: it is read as the network {}; write \
                                 that, or /{} for the one address",
                                n.trunc(),
                                n.max_prefix_len()
                            ),
                        );
                    }
                })
                .map(|n| n.trunc())
                .map_err(|_| {
                    err(
                        s.span(),
                        format!(
                            "invalid network {t:?}: expected an address or CIDR such as \
                             \"192.0.2.0/24\", \"127.0.0.1\" or \"2001:db8::/32\""
                        ),
                    )
                })
        })
        .collect()
}

fn invalid(text: &str, source: &str, span: Range<usize>, message: String) -> ConfigError {
    let (line, column, key) = locate(text, span.start);
    ConfigError::Invalid {
        path: source.to_string(),
        line,
        column,
        key: key.map_or(String::new(), |k| format!("`{k}`: ")),
        message,
    }
}

/// Line and column (1-based) of a byte offset, and the dotted key written on that line
/// (`http.idle_timeout`), found from the nearest table header above it.
fn locate(text: &str, offset: usize) -> (usize, usize, Option<String>) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = line_text
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#') && !k.starts_with('['));
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        });
    let key = match (table, key) {
        (Some(t), Some(k)) if !t.is_empty() => Some(format!("{t}.{k}")),
        (_, k) => k,
    };
    (line, column, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, String> {
        Config::parse(t, "t.toml").map_err(|e| e.to_string())
    }

    const ONE: &str = "[upstreams.app]\nservers = [\"127.0.0.1:3000\"]\n";

    /// The waiting-room example in the shipped config, uncommented, is a valid room (less its
    /// files), and mistakes name their key.
    #[test]
    fn the_documented_waiting_room_parses_and_mistakes_are_named() {
        let shipped = include_str!("../config/breakwater.toml");
        let start = shipped.find("# [[waiting_room]]").unwrap();
        let end = shipped.find("# [fleet]").unwrap();
        let room: String = shipped[start..end]
            .lines()
            .filter(|l| l.starts_with("# ") && l.contains('='))
            .filter(|l| !l.contains("keys =") && !l.contains("page_template"))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let cfg = parse(&format!("{ONE}[[waiting_room]]\n{room}")).unwrap();
        let r = &cfg.rooms[0];
        assert_eq!(r.name, "drop");
        assert_eq!(r.max_queue_wait, Some(Duration::from_millis(200)));
        assert_eq!(r.session_max, Some(Duration::from_secs(1800)));
        assert_eq!(r.api_paths, vec!["/api/".to_string()]);
        for (bad, key) in [
            ("name = \"a b\"", "name"),
            ("name = \"x\"\nrefresh = \"60s\"", "refresh"),
            ("name = \"x\"\npath_prefix = \"/a/../b\"", "path_prefix"),
            ("name = \"x\"\nkeys = [\"/nonexistent/key\"]", "key file"),
            ("name = \"x\"\nmode = \"fast\"", "mode"),
        ] {
            let e = parse(&format!("{ONE}[[waiting_room]]\n{bad}")).unwrap_err();
            assert!(e.contains(key), "{bad}: {e}");
            assert!(e.contains("t.toml:"), "{e}");
        }
    }

    /// The documented `[fleet]`, uncommented, is the defaults (plus its URL and name), and
    /// mistakes name their key.
    #[test]
    fn the_documented_fleet_section_is_the_defaults() {
        let shipped = include_str!("../config/breakwater.toml");
        let start = shipped.find("# [fleet]").unwrap();
        let text: String = shipped[start..]
            .lines()
            .filter(|l| l.starts_with("# ") && (l.contains('=') || l.starts_with("# [")))
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let cfg = parse(&format!("{ONE}{text}")).unwrap();
        let f = cfg.fleet.unwrap();
        assert_eq!(
            f,
            fleet::FleetConfig {
                redis_url: Some("redis://127.0.0.1:6379/0".into()),
                instance: "edge-1".into(),
                ..Default::default()
            }
        );
        assert!(cfg.admission.shared_limits);
        assert!(!parse(ONE).unwrap().admission.shared_limits);
        for (bad, key) in [
            ("[fleet]\nredis_url = \"http://x\"", "redis_url"),
            ("[fleet]\nsync_interval = \"1ms\"", "sync_interval"),
            ("[fleet]\nepoch = \"1500ms\"", "epoch"),
            ("[fleet]\ndegraded_factor = 0.0", "degraded_factor"),
            ("[fleet]\nnamespace = \"a b\"", "namespace"),
            (
                "[fleet]\nredis_url_file = \"/nonexistent\"",
                "redis_url_file",
            ),
            ("[fleet.bans]\nwindow = \"0s\"", "window"),
            ("[fleet]\nsync_intervall = \"1s\"", "sync_intervall"),
        ] {
            let e = parse(&format!("{ONE}{bad}")).unwrap_err();
            assert!(e.contains(key), "{bad}: {e}");
            assert!(e.contains("t.toml:"), "{e}");
        }
        // A line shared by the fleet needs keys every instance has, and offers FIFO only.
        let fleet = "[fleet]\nredis_url = \"redis://127.0.0.1/0\"\n";
        let room = "[[waiting_room]]\nname = \"sale\"\n";
        let e = parse(&format!("{ONE}{fleet}{room}")).unwrap_err();
        assert!(e.contains("has no keys") && e.contains("keys = ["), "{e}");
        let key = std::env::temp_dir().join(format!("bw-fleet-key-{}", std::process::id()));
        std::fs::write(&key, "ab".repeat(32)).unwrap();
        let keyed = format!("{room}keys = [\"{}\"]\n", key.display());
        let shuffled =
            format!("{keyed}order = \"shuffle_prequeue\"\nopens_at = \"2999-01-01T00:00:00Z\"\n");
        let e = parse(&format!("{ONE}{fleet}{shuffled}")).unwrap_err();
        assert!(
            e.contains("shuffle_prequeue") && e.contains("share_rooms"),
            "{e}"
        );
        assert!(parse(&format!("{ONE}{fleet}{keyed}")).is_ok());
        // Each instance its own line: neither applies.
        let own = format!("{ONE}{fleet}share_rooms = false\n{room}");
        assert!(!parse(&own).unwrap().fleet.unwrap().rooms_shared());
        let _ = std::fs::remove_file(&key);
    }

    /// The shipped config documents every default: parsed, it must equal a config that sets
    /// nothing but its upstream, so the documented defaults cannot drift from the code.
    #[test]
    fn the_documented_defaults_are_the_real_ones() {
        let documented = Config::embedded_default().unwrap();
        let bare = parse(ONE).unwrap();
        assert_eq!(
            format!("{:?}", documented.listeners),
            format!("{:?}", bare.listeners)
        );
        assert_eq!(format!("{:?}", documented.http), format!("{:?}", bare.http));
        assert_eq!(
            format!("{:?}", documented.admission),
            format!("{:?}", bare.admission)
        );
        assert_eq!(documented.upstreams, bare.upstreams);
        assert_eq!(format!("{:?}", documented.log), format!("{:?}", bare.log));
        assert_eq!(documented.worker_threads, bare.worker_threads);
        assert_eq!(documented.express_connections, bare.express_connections);
        assert_eq!(documented.park_connections, bare.park_connections);
        assert_eq!(documented.thread_per_core, bare.thread_per_core);
        assert_eq!(documented.express_nice, bare.express_nice);
        assert_eq!(documented.express_accept_above, bare.express_accept_above);
        assert_eq!(documented.express_above, bare.express_above);
        assert_eq!(documented.control_socket, bare.control_socket);
        assert_eq!(
            format!("{:?}", documented.admin),
            format!("{:?}", bare.admin)
        );
    }

    #[test]
    fn embedded_default_parses() {
        let c = Config::embedded_default().expect("default config is valid");
        assert_eq!(c.listeners[0].addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.listeners[0].backlog, 65535);
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.upstreams[0].name, "app");
    }

    #[test]
    fn minimal_parses_with_defaults() {
        let c = parse(ONE).unwrap();
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.max_header_bytes, 16384);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = parse("[http]\nidle_timeot = \"5s\"\n").unwrap_err();
        assert!(e.starts_with("t.toml:2:1: "), "{e}");
        assert!(e.contains("unknown field `idle_timeot`"), "{e}");
    }

    #[test]
    fn bad_duration_names_key_value_and_expectation() {
        let e = parse(&format!(
            "{ONE}[http]\nheader_read_timeout = \"5 parsecs\"\n"
        ))
        .unwrap_err();
        assert!(
            e.starts_with("t.toml:4:23: `http.header_read_timeout`: "),
            "{e}"
        );
        assert!(e.contains("\"5 parsecs\""), "{e}");
        assert!(e.contains("\"250ms\""), "{e}");
    }

    #[test]
    fn absurd_durations_are_errors_not_overflows() {
        let e = parse(&format!("{ONE}[http]\nidle_timeout = \"1000000000y\"\n")).unwrap_err();
        assert!(
            e.contains("`http.idle_timeout`") && e.contains("too long"),
            "{e}"
        );
    }

    #[test]
    fn dangling_upstream() {
        let e = parse(&format!("{ONE}[[routes]]\nupstream = \"ap\"\n")).unwrap_err();
        assert_eq!(
            e,
            "t.toml:4:12: `routes.upstream`: route names upstream \"ap\", which is not defined; \
             defined upstreams: app"
        );
    }

    #[test]
    fn bad_listener_address() {
        let e = parse(&format!("[[listeners]]\naddr = \"0.0.0.0:80800\"\n{ONE}")).unwrap_err();
        assert!(
            e.starts_with("t.toml:2:8: `listeners.addr`: invalid address \"0.0.0.0:80800\""),
            "{e}"
        );
    }

    #[test]
    fn bad_server_address() {
        let e = parse("[upstreams.app]\nservers = [\"no-port\"]\n").unwrap_err();
        assert!(
            e.contains("t.toml:2:12: `upstreams.app.servers`: invalid server address"),
            "{e}"
        );
        assert!(parse("[upstreams.app]\nservers = [\"app:3000\", \"[::1]:80\"]\n").is_ok());
    }

    #[test]
    fn several_upstreams_need_routes() {
        let t = "[upstreams.a]\nservers = [\"127.0.0.1:1\"]\n[upstreams.b]\nservers = [\"127.0.0.1:2\"]\n";
        assert!(parse(t).unwrap_err().contains("add routes"));
    }

    #[test]
    fn no_upstream() {
        assert!(parse("").unwrap_err().contains("no upstreams"));
    }

    #[test]
    fn host_patterns() {
        let p = parse_host_pattern("*.Example.com").unwrap();
        assert!(p.matches("a.example.com"));
        assert!(p.matches("a.b.EXAMPLE.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
        assert!(parse_host_pattern("shop.example.com")
            .unwrap()
            .matches("SHOP.example.com"));
        assert!(parse_host_pattern("a b").is_err());
    }

    #[test]
    fn admission_defaults_and_errors() {
        let c = parse(ONE).unwrap();
        assert_eq!(c.admission.max_connections, 50_000);
        assert_eq!(c.admission.per_ip_rate, 100);
        assert_eq!(
            c.admission.allow,
            vec!["127.0.0.1/32".parse::<IpNet>().unwrap()]
        );
        let e = parse(&format!("{ONE}[admission]\ndeny = [\"10.0.0.0/33\"]\n")).unwrap_err();
        assert!(
            e.starts_with("t.toml:4:9: `admission.deny`: invalid network \"10.0.0.0/33\""),
            "{e}"
        );
        let e = parse(&format!("{ONE}[admission]\nreject = \"drop\"\n")).unwrap_err();
        assert!(
            e.contains("`admission.reject`") && e.contains("reset"),
            "{e}"
        );
        let c = parse(&format!("{ONE}[admission]\nallow = [\"10.1.2.3\"]\n")).unwrap();
        assert_eq!(
            c.admission.allow,
            vec!["10.1.2.3/32".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn small_header_limit_refused() {
        let e = parse(&format!("{ONE}[http]\nmax_header_bytes = 100\n")).unwrap_err();
        assert!(
            e.contains("`http.max_header_bytes`: max_header_bytes 100 is out of range"),
            "{e}"
        );
    }
}
