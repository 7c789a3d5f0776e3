//! The serde mirror of the TOML file: exactly the keys a user may write, with the defaults as
//! named constants. Nothing here is validated beyond its type; `config.rs` turns this into the
//! typed `Config` the rest of the proxy reads. Every struct denies unknown fields, so a typo such
//! as `max_conections` fails loudly instead of silently disabling a limit.
//!
//! Why this file is long (~685 lines): it is the whole file format in one place, and more than
//! a third of it is the default constants and `default_*` functions serde needs. It shrinks
//! when each section moves to its own `config/<section>.rs` with its shape, defaults and
//! validation together, as `config/room.rs` already does (structure issue #8).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub const DEFAULT_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 8080),
);
pub const DEFAULT_BACKLOG: u32 = 65535;
pub const DEFAULT_DEFER_ACCEPT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16384;
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_POOL_MIN_IDLE: usize = 8;
pub const DEFAULT_POOL_MAX: usize = 64;
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_QUEUE_MAX: usize = 10_000;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MAX_CLIENT_SHARE: f64 = 0.1;
pub const DEFAULT_MAX_CONNECTION_SHARE: f64 = 0.1;
pub const DEFAULT_MAX_TUNNELS: usize = 256;
/// The express lane's thread runs ahead of the workers when CPU is short (`listener/lanes.rs`).
pub const DEFAULT_EXPRESS_NICE: i32 = -10;
/// The accept loops move to the express lane's thread above this many open connections: by
/// default never (the most the key takes), see `Lanes::accept_on_lane`.
pub const DEFAULT_EXPRESS_ACCEPT_ABOVE: usize = 10_000_000;
/// Newcomers take the express lane only above this many open client connections for each
/// worker thread (see `Lanes::express_room`).
pub const DEFAULT_EXPRESS_ABOVE_PER_WORKER: usize = 32;
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/breakwater/control.sock";
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_REQUEST_BUFFER: usize = 64 * 1024;
pub const DEFAULT_RESPONSE_BUFFER: usize = 64 * 1024;
pub const DEFAULT_MIN_BODY_RATE: u64 = 1024;
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RESPONSE_SPOOL: u64 = 64 << 20;
pub const DEFAULT_SPOOL_MEMORY: u64 = 256 << 10;
pub const DEFAULT_SPOOL_BUDGET: u64 = 1 << 30;
pub const DEFAULT_MIN_SEND_RATE: u64 = 1024;
pub const DEFAULT_REQUEST_BUFFER_BUDGET: u64 = 256 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listeners: Option<Vec<Spanned<FileListener>>>,
    #[serde(default)]
    pub http: FileHttp,
    #[serde(default = "no_upstreams")]
    pub upstreams: Spanned<BTreeMap<String, Spanned<FileUpstream>>>,
    #[serde(default)]
    pub routes: Vec<Spanned<FileRoute>>,
    #[serde(default)]
    pub admission: FileAdmission,
    #[serde(default)]
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub runtime: FileRuntime,
    #[serde(default)]
    pub log: FileLog,
    #[serde(default)]
    pub waiting_room: Vec<Spanned<super::room::FileRoom>>,
    #[serde(default)]
    pub fleet: Option<super::fleet::FileFleet>,
}

pub const DEFAULT_MAX_CONNECTIONS: u32 = 50_000;
pub const DEFAULT_PER_IP_RATE: u32 = 100;
pub const DEFAULT_PER_IP_BURST: u32 = 200;
pub const DEFAULT_PER_IP_MAX_CONNECTIONS: u32 = 200;
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmission {
    #[serde(default = "default_max_connections")]
    pub max_connections: Spanned<u32>,
    #[serde(default = "default_per_ip_rate")]
    pub per_ip_rate: u32,
    #[serde(default = "default_per_ip_burst")]
    pub per_ip_burst: Spanned<u32>,
    #[serde(default = "default_per_ip_max_connections")]
    pub per_ip_max_connections: u32,
    #[serde(default)]
    pub per_ip_request_rate: u32,
    #[serde(default)]
    pub per_ip_request_burst: Option<Spanned<u32>>,
    #[serde(default)]
    pub reject: RejectMode,
    #[serde(default = "default_allow")]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: Spanned<u8>,
    #[serde(default)]
    pub dry_run: bool,
}

impl Default for FileAdmission {
    fn default() -> Self {
        FileAdmission {
            max_connections: default_max_connections(),
            per_ip_rate: DEFAULT_PER_IP_RATE,
            per_ip_burst: default_per_ip_burst(),
            per_ip_max_connections: DEFAULT_PER_IP_MAX_CONNECTIONS,
            per_ip_request_rate: 0,
            per_ip_request_burst: None,
            reject: RejectMode::Reset,
            allow: default_allow(),
            deny: Vec::new(),
            ipv6_prefix: default_ipv6_prefix(),
            dry_run: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRuntime {
    #[serde(default = "default_shards")]
    pub worker_threads: Spanned<usize>,
    #[serde(default = "default_control_socket")]
    pub control_socket: String,
    #[serde(default = "default_express_connections")]
    pub express_connections: Spanned<usize>,
    #[serde(default = "default_park_connections")]
    pub park_connections: bool,
    #[serde(default = "default_thread_per_core")]
    pub thread_per_core: bool,
    #[serde(default = "default_express_nice")]
    pub express_nice: Spanned<i32>,
    #[serde(default = "default_express_accept_above")]
    pub express_accept_above: Spanned<usize>,
    /// None: `DEFAULT_EXPRESS_ABOVE_PER_WORKER` for each worker thread.
    #[serde(default)]
    pub express_above: Option<Spanned<usize>>,
}

impl Default for FileRuntime {
    fn default() -> Self {
        FileRuntime {
            worker_threads: default_shards(),
            control_socket: default_control_socket(),
            express_connections: default_express_connections(),
            park_connections: true,
            thread_per_core: true,
            express_nice: default_express_nice(),
            express_accept_above: default_express_accept_above(),
            express_above: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub addr: Spanned<String>,
    #[serde(default)]
    pub token: Option<Spanned<String>>,
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub public_health: bool,
    #[serde(default)]
    pub ready_requires_origin: bool,
}

/// How a refused connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RejectMode {
    /// RST via SO_LINGER 0: no TIME_WAIT, the descriptor is freed at once.
    #[default]
    Reset,
    /// An orderly FIN.
    Close,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub addr: Spanned<String>,
    #[serde(default = "default_backlog")]
    pub backlog: Spanned<u32>,
    #[serde(default = "default_defer_accept")]
    pub defer_accept: Dur,
    #[serde(default = "default_shards")]
    pub shards: Spanned<usize>,
    /// The default certificate; turns the listener into a TLS one.
    #[serde(default)]
    pub tls: Option<Spanned<FileCertPair>>,
    #[serde(default)]
    pub tls_handshake_timeout: Option<Spanned<Dur>>,
    /// More certificates, chosen by SNI.
    #[serde(default)]
    pub certs: Vec<Spanned<FileSniCert>>,
    #[serde(default)]
    pub proxy_protocol: Option<Spanned<ProxyProtocolVersion>>,
    #[serde(default)]
    pub proxy_protocol_from: Vec<Spanned<String>>,
    #[serde(default)]
    pub proxy_protocol_timeout: Option<Spanned<Dur>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertPair {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSniCert {
    pub names: Spanned<Vec<Spanned<String>>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// Which PROXY protocol versions a listener accepts (or an upstream sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    V1,
    V2,
    Any,
}

pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Spanned<Dur>,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Spanned<Dur>,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: Spanned<usize>,
    #[serde(default = "yes")]
    pub http2: bool,
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: Spanned<u32>,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    #[serde(default = "default_request_buffer")]
    pub request_buffer: Spanned<usize>,
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: u64,
    #[serde(default = "default_request_buffer_budget")]
    pub request_buffer_budget: Spanned<Size>,
    #[serde(default = "default_response_buffer")]
    pub response_buffer: Spanned<usize>,
    #[serde(default = "default_send_timeout")]
    pub send_timeout: Spanned<Dur>,
    #[serde(default = "default_min_send_rate")]
    pub min_send_rate: u64,
    #[serde(default = "default_response_spool")]
    pub response_spool: Spanned<Size>,
    #[serde(default = "default_spool_memory")]
    pub spool_memory: Spanned<Size>,
    #[serde(default = "default_spool_budget")]
    pub spool_budget: Spanned<Size>,
    #[serde(default)]
    pub spool_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub via_name: Option<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub drain_delay: Dur,
}

impl Default for FileHttp {
    fn default() -> Self {
        FileHttp {
            header_read_timeout: default_header_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_header_bytes: default_max_header_bytes(),
            http2: true,
            max_concurrent_streams: default_max_concurrent_streams(),
            shutdown_timeout: default_shutdown_timeout(),
            request_buffer: default_request_buffer(),
            min_body_rate: DEFAULT_MIN_BODY_RATE,
            request_buffer_budget: default_request_buffer_budget(),
            response_buffer: default_response_buffer(),
            send_timeout: default_send_timeout(),
            min_send_rate: DEFAULT_MIN_SEND_RATE,
            response_spool: default_response_spool(),
            spool_memory: default_spool_memory(),
            spool_budget: default_spool_budget(),
            spool_dir: None,
            via_name: None,
            trusted_proxies: Vec::new(),
            drain_delay: Dur(Duration::ZERO),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub servers: Spanned<Vec<Spanned<String>>>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Spanned<Dur>,
    #[serde(default = "default_response_timeout")]
    pub response_timeout: Spanned<Dur>,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default = "default_pool_min_idle")]
    pub pool_min_idle: Spanned<usize>,
    #[serde(default = "default_pool_max")]
    pub pool_max: Spanned<usize>,
    #[serde(default)]
    pub max_requests_per_connection: u64,
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout: Dur,
    #[serde(default = "default_queue_max")]
    pub queue_max: Spanned<usize>,
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: Spanned<Dur>,
    #[serde(default = "yes")]
    pub retry_idempotent: bool,
    #[serde(default = "default_max_client_share")]
    pub max_client_share: Spanned<f64>,
    #[serde(default = "default_max_connection_share")]
    pub max_connection_share: Spanned<f64>,
    #[serde(default)]
    pub pool_share_exempt: Vec<Spanned<String>>,
    /// New connections per second per server (replacements, warm refills); default 2 x
    /// pool_max.
    #[serde(default)]
    pub max_connect_rate: Option<Spanned<u32>>,
    #[serde(default = "default_max_tunnels")]
    pub max_tunnels: usize,
    #[serde(default)]
    pub send_proxy_protocol: Option<Spanned<ProxyProtocolVersion>>,
    #[serde(default)]
    pub health: FileHealth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    LeastOutstanding,
    RoundRobin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default = "default_health_interval")]
    pub interval: Spanned<Dur>,
    #[serde(default = "three")]
    pub unhealthy_after: Spanned<u32>,
    #[serde(default = "two")]
    pub healthy_after: Spanned<u32>,
}

impl Default for FileHealth {
    fn default() -> Self {
        FileHealth {
            path: None,
            interval: default_health_interval(),
            unhealthy_after: three(),
            healthy_after: two(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default)]
    pub allow_encoded_slashes: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLog {
    #[serde(default = "default_level")]
    pub level: Spanned<String>,
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "yes")]
    pub access_log: bool,
    #[serde(default)]
    pub access_log_query: bool,
    #[serde(default)]
    pub access_log_path: Option<String>,
}

impl Default for FileLog {
    fn default() -> Self {
        FileLog {
            level: default_level(),
            format: LogFormat::Text,
            access_log: true,
            access_log_query: false,
            access_log_path: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A duration written as a string with a unit: "250ms", "5s", "2m", "1h". Bare numbers are
/// refused on purpose: `timeout = 5` is ambiguous (seconds? milliseconds?) and a wrong guess
/// either cuts every request or lets slowloris in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration string with a unit, such as \"250ms\", \"5s\" or \"2m\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dur, E> {
                parse_duration(s).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(t).map_err(|_| {
        format!(
            "invalid duration {s:?}: expected a number with a unit (ms, s, m, h), \
             such as \"250ms\", \"5s\" or \"2m\""
        )
    })?;
    // Deadlines are computed as now + duration; an absurd value must be an error, not an
    // overflow at the first connection.
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is too long: at most 30 days"));
    }
    Ok(d)
}

/// A size in bytes: a plain integer, or a string with a unit ("64KiB", "1MiB", "2GiB", or the
/// decimal "1MB"), because `spool_budget = 1073741824` is unreadable and `"1G"` is ambiguous
/// enough that it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a size: bytes as an integer, or a string such as \"64KiB\" or \"1GiB\"",
                )
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("invalid size {s:?}: expected bytes with a unit (B, KiB, MiB, GiB, KB, MB, GB), such as \"64MiB\"")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .filter(|&b| b <= 1 << 50)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn no_upstreams() -> Spanned<BTreeMap<String, Spanned<FileUpstream>>> {
    Spanned::new(0..0, BTreeMap::new())
}
fn default_shards() -> Spanned<usize> {
    Spanned::new(0..0, 0)
}
fn default_max_connections() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_MAX_CONNECTIONS)
}
fn default_per_ip_rate() -> u32 {
    DEFAULT_PER_IP_RATE
}
fn default_per_ip_burst() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_PER_IP_BURST)
}
fn default_per_ip_max_connections() -> u32 {
    DEFAULT_PER_IP_MAX_CONNECTIONS
}
fn default_allow() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "127.0.0.1/32".to_string())]
}
fn default_ipv6_prefix() -> Spanned<u8> {
    Spanned::new(0..0, DEFAULT_IPV6_PREFIX)
}
fn yes() -> bool {
    true
}
fn default_backlog() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_BACKLOG)
}
fn default_defer_accept() -> Dur {
    Dur(DEFAULT_DEFER_ACCEPT)
}
fn default_header_read_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_HEADER_READ_TIMEOUT))
}
fn default_idle_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_IDLE_TIMEOUT))
}
fn default_max_header_bytes() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_MAX_HEADER_BYTES)
}
fn default_max_concurrent_streams() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_MAX_CONCURRENT_STREAMS)
}
fn default_shutdown_timeout() -> Dur {
    Dur(DEFAULT_SHUTDOWN_TIMEOUT)
}
fn default_connect_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_CONNECT_TIMEOUT))
}
fn default_response_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_RESPONSE_TIMEOUT))
}
fn default_pool_min_idle() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_POOL_MIN_IDLE)
}
fn default_pool_max() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_POOL_MAX)
}
fn default_queue_max() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_QUEUE_MAX)
}
fn default_queue_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_QUEUE_TIMEOUT))
}
fn default_max_client_share() -> Spanned<f64> {
    Spanned::new(0..0, DEFAULT_MAX_CLIENT_SHARE)
}
fn default_max_connection_share() -> Spanned<f64> {
    Spanned::new(0..0, DEFAULT_MAX_CONNECTION_SHARE)
}
fn default_park_connections() -> bool {
    true
}
fn default_thread_per_core() -> bool {
    true
}
fn default_express_connections() -> Spanned<usize> {
    Spanned::new(0..0, 64)
}
fn default_express_nice() -> Spanned<i32> {
    Spanned::new(0..0, DEFAULT_EXPRESS_NICE)
}
fn default_express_accept_above() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_EXPRESS_ACCEPT_ABOVE)
}
fn default_control_socket() -> String {
    DEFAULT_CONTROL_SOCKET.to_string()
}
fn default_max_tunnels() -> usize {
    DEFAULT_MAX_TUNNELS
}
fn default_health_interval() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_HEALTH_INTERVAL))
}
fn three() -> Spanned<u32> {
    Spanned::new(0..0, 3)
}
fn two() -> Spanned<u32> {
    Spanned::new(0..0, 2)
}
fn default_request_buffer() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_REQUEST_BUFFER)
}
fn default_min_body_rate() -> u64 {
    DEFAULT_MIN_BODY_RATE
}
fn default_response_buffer() -> Spanned<usize> {
    Spanned::new(0..0, DEFAULT_RESPONSE_BUFFER)
}
fn default_send_timeout() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_SEND_TIMEOUT))
}
fn default_request_buffer_budget() -> Spanned<Size> {
    Spanned::new(0..0, Size(DEFAULT_REQUEST_BUFFER_BUDGET))
}
fn default_min_send_rate() -> u64 {
    DEFAULT_MIN_SEND_RATE
}
fn default_response_spool() -> Spanned<Size> {
    Spanned::new(0..0, Size(DEFAULT_RESPONSE_SPOOL))
}
fn default_spool_memory() -> Spanned<Size> {
    Spanned::new(0..0, Size(DEFAULT_SPOOL_MEMORY))
}
fn default_spool_budget() -> Spanned<Size> {
    Spanned::new(0..0, Size(DEFAULT_SPOOL_BUDGET))
}
fn default_pool_idle_timeout() -> Dur {
    Dur(DEFAULT_POOL_IDLE_TIMEOUT)
}
fn default_path_prefix() -> Spanned<String> {
    Spanned::new(0..0, "/".to_string())
}
fn default_level() -> Spanned<String> {
    Spanned::new(0..0, "info".to_string())
}
