//! The validated configuration the rest of Breakwater reads: typed values (Duration, SocketAddr,
//! indices instead of names), every cross-reference resolved. Loading is two steps: serde reads
//! the TOML into the mirror in `config/file.rs` (unknown keys are errors), then `validate`
//! checks ranges and references. Every error names the file, line, column and key, says what
//! was wrong and what is expected.
//!
//! Why this file is long (~1,650 lines, about 240 of them tests): validation is one pass over
//! the raw TOML because errors must point at file:line:key, and every section's checks share
//! the located-error and warning helpers. The newest sections already live on their own
//! (`config/room.rs`, `config/fleet.rs`: shape, one `impl Default` and validation together);
//! moving the other sections (listeners,
//! http, upstreams, admission, admin) the same way, with one `impl Default` per section instead
//! of the defaults written in `file.rs`, is the next step of the structure issue (#8); the test
//! that holds `config/breakwater.toml` equal to the defaults guards that move.

pub mod env;
pub mod file;
pub mod fleet;
pub mod room;

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

/// `[admission]`: what is decided right after accept. For every count, 0 disables.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Open client connections, all listeners together; at the cap the accept loops pause.
    pub max_connections: u32,
    /// New connections per second per client address (or IPv6 prefix).
    pub per_ip_rate: u32,
    pub per_ip_burst: u32,
    /// Concurrent connections per client address.
    pub per_ip_max_connections: u32,
    /// Requests per second per client address, over all its connections; over it -> 429.
    pub per_ip_request_rate: u32,
    pub per_ip_request_burst: u32,
    pub reject: RejectMode,
    /// Never limited (but still counted against max_connections).
    pub allow: Vec<IpNet>,
    /// Always rejected.
    pub deny: Vec<IpNet>,
    pub ipv6_prefix: u8,
    /// Count and log what would be rejected, reject nothing.
    pub dry_run: bool,
    /// The rate limits are one budget shared by a fleet (`[fleet] redis_url` is set).
    pub shared_limits: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// Requested listen(2) backlog; the kernel caps it at net.core.somaxconn.
    pub backlog: u32,
    /// TCP_DEFER_ACCEPT; zero disables.
    pub defer_accept: Duration,
    /// SO_REUSEPORT sockets (and accept loops) for this address, already resolved from 0.
    pub shards: usize,
    /// TLS termination on this listener; None = cleartext.
    pub tls: Option<TlsConfig>,
    /// PROXY protocol expected in front of every connection; None = off.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// A certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq)]
pub struct CertPaths {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// Served when no SNI entry matches (or the client sends no SNI).
    pub default: CertPaths,
    /// Chosen by SNI: exact names or "*.suffix" wildcards (one label).
    pub sni: Vec<(Vec<HostPattern>, CertPaths)>,
    /// A client that has not finished its handshake by then is cut.
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxyProtocolConfig {
    pub version: ProxyProtocolVersion,
    /// Only these peers may send a header; any other connection is refused at accept.
    pub from: Vec<IpNet>,
    /// The header must arrive whole within this.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub http2: bool,
    pub max_concurrent_streams: u32,
    pub shutdown_timeout: Duration,
    /// Request body bytes read before an origin connection is taken (slow-POST guard).
    pub request_buffer: usize,
    /// What all requests' read-ahead may hold together; past it new requests get 503.
    pub request_buffer_budget: u64,
    /// Request bodies must arrive at least this fast (bytes/s, after a grace of
    /// `header_read_timeout`); 0 disables.
    pub min_body_rate: u64,
    /// Response bytes read from the origin before relaying starts.
    pub response_buffer: usize,
    /// A response the client takes nothing of for this long (no bytes taken by the socket, no
    /// HTTP/2 window credited) ends, and its connection with it.
    pub send_timeout: Duration,
    /// A spooled response must be taken at this average (bytes/s) over each `send_timeout`
    /// window while bytes wait for the client; 0 disables.
    pub min_send_rate: u64,
    /// Response bytes one response may spool while its client reads slower than the origin
    /// sends (so the origin connection goes back to the pool); 0 disables spooling.
    pub response_spool: u64,
    /// The part of each spool kept in memory; the rest goes to an unlinked file in `spool_dir`.
    pub spool_memory: u64,
    /// Bytes all spools together may hold (memory and files).
    pub spool_budget: u64,
    pub spool_dir: std::path::PathBuf,
    /// This instance's name in Via (`[http] via_name`, default the hostname); a request that
    /// already carries it has looped back here (508).
    pub via_name: String,
    /// Peers whose forwarding headers are believed: the client is then the rightmost
    /// X-Forwarded-For entry that is not itself one of these.
    pub trusted_proxies: Vec<IpNet>,
    /// After SIGTERM: /readyz is 503 at once, but the listeners keep accepting this long (so a
    /// load balancer or Kubernetes stops sending before anything is refused).
    pub drain_delay: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// "host:port" strings; IP literals are parsed once, names are resolved at connect time so
    /// a docker service name keeps working when its address changes.
    pub servers: Vec<String>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub balance: Balance,
    pub protocol: UpstreamProtocol,
    /// Warm connections per server, opened at start and kept open.
    pub pool_min_idle: usize,
    /// Open connections per server, never exceeded.
    pub pool_max: usize,
    /// 0 = unlimited.
    pub max_requests_per_connection: u64,
    /// Idle connections above `pool_min_idle` close after this.
    pub pool_idle_timeout: Duration,
    /// Requests waiting for a connection, per upstream.
    pub queue_max: usize,
    pub queue_timeout: Duration,
    pub retry_idempotent: bool,
    /// The share of the upstream's connections (or HTTP/2 streams) one client address may hold
    /// busy at once, 0 < share <= 1.
    pub max_client_share: f64,
    /// The share one client connection (its HTTP/2 streams) may hold busy, 0 < share <= 1.
    pub max_connection_share: f64,
    /// Client addresses the two shares do not apply to (the admission allow list lifts rate
    /// limits only).
    pub pool_share_exempt: Vec<IpNet>,
    /// New origin connections per second per server, whatever asks for them (requests,
    /// replacements, warm refills): no client behaviour can become an origin handshake storm.
    pub max_connect_rate: u32,
    /// WebSocket tunnels open at once to this upstream (each holds a dedicated origin
    /// connection); one client may hold `max_client_share` of them. 0 refuses upgrades.
    pub max_tunnels: usize,
    /// Send a PROXY header naming the client on each origin connection. Such connections are
    /// private to one request (see `Upstream::send_private`).
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    pub health: HealthConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// HTTP path to GET; None = TCP connect check.
    pub path: Option<String>,
    pub interval: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub host: Option<HostPattern>,
    pub path_prefix: String,
    /// Index into `Config::upstreams`.
    pub upstream: usize,
    /// Whether `%2F`/`%5C` may appear in paths of this route (else 400).
    pub allow_encoded_slashes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Lowercase, without port.
    Exact(String),
    /// "*.example.com" stored as ".example.com": matches any name ending in it.
    Suffix(String),
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h.eq_ignore_ascii_case(host),
            HostPattern::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Suffix(s) => write!(f, "*{s}"),
        }
    }
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
        s += &format!("runtime   worker_threads {}\n", self.worker_threads);
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
                "fleet     store {store}  instance {}  sync every {} (timeout {})  bans {}\n",
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

    let mut listeners = Vec::new();
    match raw.listeners {
        None => listeners.push(ListenerConfig {
            addr: file::DEFAULT_LISTEN
                .parse()
                .expect("the default address parses"),
            backlog: file::DEFAULT_BACKLOG,
            defer_accept: file::DEFAULT_DEFER_ACCEPT,
            shards: default_shards(),
            tls: None,
            proxy_protocol: None,
        }),
        Some(list) => {
            if list.is_empty() {
                return Err(err(
                    0..0,
                    "`listeners` is empty: add at least one [[listeners]] with an addr".into(),
                ));
            }
            for l in list {
                let l = l.into_inner();
                let addr: SocketAddr = l.addr.get_ref().parse().map_err(|_| {
                    err(
                        l.addr.span(),
                        format!(
                            "invalid address {:?}: expected IP:port, such as \"0.0.0.0:8080\" \
                             or \"[::]:8080\"",
                            l.addr.get_ref()
                        ),
                    )
                })?;
                if listeners.iter().any(|x: &ListenerConfig| x.addr == addr) {
                    return Err(err(
                        l.addr.span(),
                        format!(
                            "address {addr} is listed twice: use `shards` for more accept loops"
                        ),
                    ));
                }
                let backlog = *l.backlog.get_ref();
                if backlog == 0 || backlog > i32::MAX as u32 {
                    return Err(err(
                        l.backlog.span(),
                        format!("backlog {backlog} is out of range: expected 1 to 2147483647"),
                    ));
                }
                let shards = match *l.shards.get_ref() {
                    0 => default_shards(),
                    n if n <= 1024 => n,
                    n => {
                        return Err(err(
                            l.shards.span(),
                            format!(
                                "shards {n} is out of range: expected 0 (one per core) to 1024"
                            ),
                        ))
                    }
                };
                let tls = validate_tls(&l, &err)?;
                let proxy_protocol = match &l.proxy_protocol {
                    None => {
                        if let Some(t) = &l.proxy_protocol_timeout {
                            return Err(err(
                                t.span(),
                                "proxy_protocol_timeout is set but proxy_protocol is not".into(),
                            ));
                        }
                        if let Some(f) = l.proxy_protocol_from.first() {
                            return Err(err(
                                f.span(),
                                "proxy_protocol_from is set but proxy_protocol is not".into(),
                            ));
                        }
                        None
                    }
                    Some(v) => {
                        if l.proxy_protocol_from.is_empty() {
                            return Err(err(
                                v.span(),
                                "proxy_protocol needs proxy_protocol_from: the networks of the \
                                 load balancers allowed to send the header, such as \
                                 [\"10.0.0.0/8\"] (a header from anyone else would let them \
                                 pose as any client)"
                                    .into(),
                            ));
                        }
                        let timeout = l.proxy_protocol_timeout.as_ref().map_or(
                            Ok(file::DEFAULT_PROXY_PROTOCOL_TIMEOUT),
                            |t| {
                                let d = t.get_ref().0;
                                if d.is_zero() {
                                    Err(err(
                                        t.span(),
                                        "proxy_protocol_timeout must be above zero".into(),
                                    ))
                                } else {
                                    Ok(d)
                                }
                            },
                        )?;
                        Some(ProxyProtocolConfig {
                            version: *v.get_ref(),
                            from: parse_nets(&l.proxy_protocol_from, &warnings)?,
                            timeout,
                        })
                    }
                };
                listeners.push(ListenerConfig {
                    addr,
                    backlog,
                    defer_accept: l.defer_accept.0,
                    shards,
                    tls,
                    proxy_protocol,
                });
            }
        }
    }

    let h = raw.http;
    for (name, d) in [
        ("header_read_timeout", &h.header_read_timeout),
        ("idle_timeout", &h.idle_timeout),
    ] {
        if d.get_ref().0.is_zero() {
            return Err(err(
                d.span(),
                format!("{name} must be above zero: a zero timeout would cut every connection"),
            ));
        }
    }
    let max_header_bytes = *h.max_header_bytes.get_ref();
    if !(8192..=1 << 20).contains(&max_header_bytes) {
        return Err(err(
            h.max_header_bytes.span(),
            format!(
                "max_header_bytes {max_header_bytes} is out of range: expected 8192 to 1048576"
            ),
        ));
    }
    if !(1..=1000).contains(h.max_concurrent_streams.get_ref()) {
        return Err(err(
            h.max_concurrent_streams.span(),
            format!(
                "max_concurrent_streams {} is out of range: expected 1 to 1000 (each stream \
                 may hold a request's read-ahead)",
                h.max_concurrent_streams.get_ref()
            ),
        ));
    }
    let http = HttpConfig {
        header_read_timeout: h.header_read_timeout.get_ref().0,
        idle_timeout: h.idle_timeout.get_ref().0,
        max_header_bytes,
        http2: h.http2,
        max_concurrent_streams: *h.max_concurrent_streams.get_ref(),
        shutdown_timeout: h.shutdown_timeout.0,
        request_buffer: bounded(
            &h.request_buffer,
            "request_buffer",
            0..=64 << 20,
            " bytes (read ahead per request, so it multiplies by the requests in flight)",
            &err,
        )?,
        min_body_rate: h.min_body_rate,
        request_buffer_budget: h.request_buffer_budget.get_ref().0,
        response_buffer: bounded(
            &h.response_buffer,
            "response_buffer",
            0..=64 << 20,
            " bytes (read ahead per response)",
            &err,
        )?,
        send_timeout: h.send_timeout.get_ref().0,
        min_send_rate: h.min_send_rate,
        response_spool: h.response_spool.get_ref().0,
        spool_memory: h.spool_memory.get_ref().0,
        spool_budget: h.spool_budget.get_ref().0,
        spool_dir: match &h.spool_dir {
            None => std::env::temp_dir(),
            Some(d) => {
                let path = std::path::PathBuf::from(d.get_ref());
                if !path.is_dir() {
                    return Err(err(
                        d.span(),
                        format!(
                            "spool_dir {:?} is not a directory: responses spooled for slow \
                             clients go there (unlinked files); create it or leave the key out \
                             for the system temporary directory",
                            d.get_ref()
                        ),
                    ));
                }
                path
            }
        },
        trusted_proxies: parse_nets(&h.trusted_proxies, &warnings)?,
        drain_delay: h.drain_delay.0,
        via_name: match &h.via_name {
            None => default_via_name(),
            Some(v) => {
                let name = v.get_ref().trim();
                let ok = !name.is_empty()
                    && name.len() <= 255
                    && name.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')
                    });
                if !ok {
                    return Err(err(
                        v.span(),
                        format!(
                            "via_name {name:?} is not a valid Via pseudonym: expected letters, \
                             digits, '-', '.', '_' or ':', such as \"edge-1\""
                        ),
                    ));
                }
                name.to_string()
            }
        },
    };
    if http.spool_memory > 64 << 20 {
        return Err(err(
            h.spool_memory.span(),
            format!(
                "spool_memory {} is out of range: expected at most 64MiB (it is held in memory \
                 per slow response; the rest of a spool goes to a file)",
                http.spool_memory
            ),
        ));
    }
    if http.send_timeout.is_zero() {
        return Err(err(
            h.send_timeout.span(),
            "send_timeout must be above zero".into(),
        ));
    }

    let upstreams_span = raw.upstreams.span();
    let mut upstreams = Vec::new();
    for (name, u) in raw.upstreams.into_inner() {
        let span = u.span();
        let u = u.into_inner();
        if u.servers.get_ref().is_empty() {
            return Err(err(
                u.servers.span(),
                format!("upstream {name:?} has no servers: list at least one \"host:port\""),
            ));
        }
        let mut servers = Vec::new();
        for s in u.servers.get_ref() {
            check_server(s.get_ref()).map_err(|m| err(s.span(), m))?;
            servers.push(s.get_ref().clone());
        }
        for (key, d) in [
            ("connect_timeout", &u.connect_timeout),
            ("response_timeout", &u.response_timeout),
        ] {
            if d.get_ref().0.is_zero() {
                return Err(err(d.span(), format!("{key} must be above zero")));
            }
        }
        let _ = span;
        let pool_max = bounded(
            &u.pool_max,
            "pool_max",
            1..=10_000,
            ": the connections each server may have open (a few dozen is typical; the point \
             of the pool is that the origin sees few)",
            &err,
        )?;
        let pool_min_idle = *u.pool_min_idle.get_ref();
        // The default (8) follows a smaller pool_max; a value written in the file does not.
        let written = u.pool_min_idle.span() != (0..0);
        let pool_min_idle = if written {
            pool_min_idle
        } else {
            pool_min_idle.min(pool_max)
        };
        if pool_min_idle > pool_max {
            return Err(err(
                u.pool_min_idle.span(),
                format!(
                    "pool_min_idle {pool_min_idle} is above pool_max {pool_max}: the warm \
                     connections are part of the pool; lower pool_min_idle or raise pool_max"
                ),
            ));
        }
        let queue_max = bounded(&u.queue_max, "queue_max", 0..=10_000_000, " requests", &err)?;
        let send_proxy_protocol = match &u.send_proxy_protocol {
            None => None,
            Some(v) if *v.get_ref() == ProxyProtocolVersion::Any => return Err(err(
                v.span(),
                "send_proxy_protocol \"any\" names no version to send: expected \"v1\" or \"v2\""
                    .into(),
            )),
            Some(v) => Some(*v.get_ref()),
        };
        let share = *u.max_client_share.get_ref();
        if !(share > 0.0 && share <= 1.0) {
            return Err(err(
                u.max_client_share.span(),
                format!("max_client_share {share} is out of range: expected above 0 and at most 1"),
            ));
        }
        let conn_share = *u.max_connection_share.get_ref();
        if !(conn_share > 0.0 && conn_share <= 1.0) {
            return Err(err(
                u.max_connection_share.span(),
                format!(
                    "max_connection_share {conn_share} is out of range: expected above 0 and at most 1"
                ),
            ));
        }
        let max_connect_rate =
            match &u.max_connect_rate {
                None => (2 * pool_max).min(u32::MAX as usize) as u32,
                Some(r) if *r.get_ref() == 0 => return Err(err(
                    r.span(),
                    "max_connect_rate must be at least 1 (new origin connections per second per \
                     server)"
                        .into(),
                )),
                Some(r) => *r.get_ref(),
            };
        let pool_share_exempt = parse_nets(&u.pool_share_exempt, &warnings)?;
        if u.queue_timeout.get_ref().0.is_zero() {
            return Err(err(
                u.queue_timeout.span(),
                "queue_timeout must be above zero".into(),
            ));
        }
        let h = &u.health;
        for (key, v) in [
            ("unhealthy_after", &h.unhealthy_after),
            ("healthy_after", &h.healthy_after),
        ] {
            if *v.get_ref() == 0 {
                return Err(err(v.span(), format!("{key} must be at least 1")));
            }
        }
        if h.interval.get_ref().0.is_zero() {
            return Err(err(
                h.interval.span(),
                "health interval must be above zero".into(),
            ));
        }
        if let Some(p) = &h.path {
            if !p.get_ref().starts_with('/') {
                return Err(err(
                    p.span(),
                    format!("health path {:?} must start with \"/\"", p.get_ref()),
                ));
            }
        }
        upstreams.push(UpstreamConfig {
            name,
            servers,
            connect_timeout: u.connect_timeout.get_ref().0,
            response_timeout: u.response_timeout.get_ref().0,
            balance: u.balance,
            protocol: u.protocol,
            // With send_proxy_protocol every connection is opened for one request and names its
            // client; a warm connection would have no client to name.
            pool_min_idle: if u.send_proxy_protocol.is_some() {
                0
            } else {
                pool_min_idle
            },
            pool_max,
            max_requests_per_connection: u.max_requests_per_connection,
            pool_idle_timeout: u.pool_idle_timeout.0,
            queue_max,
            queue_timeout: u.queue_timeout.get_ref().0,
            retry_idempotent: u.retry_idempotent,
            max_client_share: share,
            max_connection_share: conn_share,
            pool_share_exempt,
            max_connect_rate,
            max_tunnels: u.max_tunnels,
            send_proxy_protocol,
            health: HealthConfig {
                path: h.path.as_ref().map(|p| p.get_ref().clone()),
                interval: h.interval.get_ref().0,
                unhealthy_after: *h.unhealthy_after.get_ref(),
                healthy_after: *h.healthy_after.get_ref(),
            },
        });
    }
    if upstreams.is_empty() {
        return Err(err(
            upstreams_span,
            "no upstreams: add one, such as [upstreams.app] with servers = [\"127.0.0.1:3000\"]"
                .into(),
        ));
    }

    let mut routes = Vec::new();
    for r in &raw.routes {
        let r = r.get_ref();
        let name = r.upstream.get_ref();
        let Some(upstream) = upstreams.iter().position(|u| &u.name == name) else {
            let known: Vec<&str> = upstreams.iter().map(|u| u.name.as_str()).collect();
            return Err(err(
                r.upstream.span(),
                format!(
                    "route names upstream {name:?}, which is not defined; defined upstreams: {}",
                    known.join(", ")
                ),
            ));
        };
        let prefix = r.path_prefix.get_ref();
        if !prefix.starts_with('/') {
            return Err(err(
                r.path_prefix.span(),
                format!("path_prefix {prefix:?} must start with \"/\""),
            ));
        }
        // Requests are matched in their normalised form, so a prefix that is not would
        // never match (or match something other than it says).
        match crate::target::normalize_path(prefix) {
            Ok(n) if n == prefix.as_str() => {}
            Ok(n) => {
                return Err(err(
                    r.path_prefix.span(),
                    format!(
                        "path_prefix {prefix:?} is not in normal form: requests are matched \
                         after normalisation, write it as {n:?}"
                    ),
                ))
            }
            Err(e) => {
                return Err(err(
                    r.path_prefix.span(),
                    format!("path_prefix {prefix:?} is not a valid path: {e}"),
                ))
            }
        }
        let host = match &r.host {
            None => None,
            Some(h) => Some(parse_host_pattern(h.get_ref()).map_err(|m| err(h.span(), m))?),
        };
        if let Some(first) = routes
            .iter()
            .position(|x: &RouteConfig| x.host == host && &x.path_prefix == prefix)
        {
            return Err(err(
                r.path_prefix.span(),
                format!(
                    "this route repeats route {} (same host and path_prefix {prefix:?}); only \
                     the first would ever match: remove one",
                    first + 1
                ),
            ));
        }
        routes.push(RouteConfig {
            host,
            path_prefix: prefix.clone(),
            upstream,
            allow_encoded_slashes: r.allow_encoded_slashes,
        });
    }
    if routes.is_empty() && upstreams.len() > 1 {
        return Err(err(
            upstreams_span,
            format!(
                "{} upstreams and no [[routes]]: add routes saying which requests go to which \
                 upstream (routes are optional only with exactly one upstream)",
                upstreams.len()
            ),
        ));
    }

    let mut admission = validate_admission(raw.admission, &warnings)?;
    let rooms = room::validate(raw.waiting_room, &warnings)?;
    let fleet = fleet::validate(raw.fleet, &warnings)?;
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

fn validate_admission(
    a: file::FileAdmission,
    warnings: &Warnings<'_>,
) -> Result<AdmissionConfig, ConfigError> {
    let err = warnings.err;
    if *a.max_connections.get_ref() == 0 {
        return Err(err(
            a.max_connections.span(),
            "max_connections must be at least 1: it is the global cap on open client \
             connections and cannot be disabled"
                .into(),
        ));
    }
    let burst = *a.per_ip_burst.get_ref();
    if a.per_ip_rate > 0 && burst == 0 {
        return Err(err(
            a.per_ip_burst.span(),
            "per_ip_burst must be at least 1 when per_ip_rate is set".into(),
        ));
    }
    let request_burst = match &a.per_ip_request_burst {
        Some(b) if *b.get_ref() == 0 && a.per_ip_request_rate > 0 => {
            return Err(err(
                b.span(),
                "per_ip_request_burst must be at least 1 when per_ip_request_rate is set".into(),
            ))
        }
        Some(b) => *b.get_ref(),
        None => a.per_ip_request_rate,
    };
    let prefix = *a.ipv6_prefix.get_ref();
    if !(1..=128).contains(&prefix) {
        return Err(err(
            a.ipv6_prefix.span(),
            format!(
                "ipv6_prefix {prefix} is out of range: expected 1 to 128 (64 groups a host's /64)"
            ),
        ));
    }
    let nets = |list: &[toml::Spanned<String>]| parse_nets(list, warnings);
    Ok(AdmissionConfig {
        max_connections: *a.max_connections.get_ref(),
        per_ip_rate: a.per_ip_rate,
        per_ip_burst: burst,
        per_ip_max_connections: a.per_ip_max_connections,
        per_ip_request_rate: a.per_ip_request_rate,
        per_ip_request_burst: request_burst.max(1),
        reject: a.reject,
        allow: nets(&a.allow)?,
        deny: nets(&a.deny)?,
        ipv6_prefix: prefix,
        dry_run: a.dry_run,
        shared_limits: false,
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

/// The `tls`, `certs` and `tls_handshake_timeout` keys of one listener. Only the shape is
/// checked here; the files are read (and their errors named) by `conn::tls::load`.
fn validate_tls(
    l: &file::FileListener,
    err: &dyn Fn(Range<usize>, String) -> ConfigError,
) -> Result<Option<TlsConfig>, ConfigError> {
    let paths = |cert: &toml::Spanned<String>, key: &toml::Spanned<String>| {
        for p in [cert, key] {
            if p.get_ref().trim().is_empty() {
                return Err(err(p.span(), "empty path: expected a PEM file".into()));
            }
        }
        Ok(CertPaths {
            cert: cert.get_ref().into(),
            key: key.get_ref().into(),
        })
    };
    let Some(default) = &l.tls else {
        if let Some(c) = l.certs.first() {
            return Err(err(
                c.span(),
                "[[listeners.certs]] without `tls`: set tls = { cert = \"...\", key = \"...\" } \
                 on the listener as the default certificate"
                    .into(),
            ));
        }
        if let Some(t) = &l.tls_handshake_timeout {
            return Err(err(
                t.span(),
                "tls_handshake_timeout is set but the listener has no `tls`".into(),
            ));
        }
        return Ok(None);
    };
    let d = default.get_ref();
    let mut sni = Vec::new();
    for c in &l.certs {
        let c = c.get_ref();
        if c.names.get_ref().is_empty() {
            return Err(err(
                c.names.span(),
                "names is empty: list the host names this certificate serves".into(),
            ));
        }
        let names = c
            .names
            .get_ref()
            .iter()
            .map(|n| parse_host_pattern(n.get_ref()).map_err(|m| err(n.span(), m)))
            .collect::<Result<Vec<_>, _>>()?;
        sni.push((names, paths(&c.cert, &c.key)?));
    }
    let handshake_timeout = match &l.tls_handshake_timeout {
        None => file::DEFAULT_TLS_HANDSHAKE_TIMEOUT,
        Some(t) if t.get_ref().0.is_zero() => {
            return Err(err(
                t.span(),
                "tls_handshake_timeout must be above zero".into(),
            ))
        }
        Some(t) => t.get_ref().0,
    };
    Ok(Some(TlsConfig {
        default: paths(&d.cert, &d.key)?,
        sni,
        handshake_timeout,
    }))
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

fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// "host:port" where host is an IP literal or a DNS name.
fn check_server(s: &str) -> Result<(), String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!(
                "server address {s:?} has port 0, which no server listens on: give its port"
            ));
        }
        return Ok(());
    }
    let bad = || {
        format!(
            "invalid server address {s:?}: expected host:port, such as \"127.0.0.1:3000\", \
             \"[::1]:3000\" or \"app:3000\""
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if valid_name {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The machine's hostname, as Via names this instance unless `via_name` is set.
fn default_via_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer it is given.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(h) if rc == 0 && !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()) => {
            h.to_string()
        }
        _ => "breakwater".to_string(),
    }
}

fn parse_host_pattern(h: &str) -> Result<HostPattern, String> {
    let lower = h.trim().to_ascii_lowercase();
    let bad = || {
        format!(
            "invalid host {h:?}: expected a name such as \"shop.example.com\" or a wildcard \
             such as \"*.example.com\""
        )
    };
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with('.')
        && !name.ends_with('.');
    if !ok {
        return Err(bad());
    }
    Ok(if wild {
        HostPattern::Suffix(format!(".{name}"))
    } else {
        HostPattern::Exact(name.to_string())
    })
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
