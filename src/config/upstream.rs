//! `[upstreams.*]` and `[[routes]]`: servers, pools, queue, health checks and which requests go
//! where; the validated shape and its checks.

use super::*;
use toml::Spanned;

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

/// `[upstreams.*]` and `[[routes]]` (routes name upstreams, so they are checked together).
pub(super) fn validate(
    raw_upstreams: Spanned<std::collections::BTreeMap<String, Spanned<file::FileUpstream>>>,
    raw_routes: &[Spanned<file::FileRoute>],
    warnings: &Warnings<'_>,
) -> Result<(Vec<UpstreamConfig>, Vec<RouteConfig>), ConfigError> {
    let err = warnings.err;
    let upstreams_span = raw_upstreams.span();
    let mut upstreams = Vec::new();
    for (name, u) in raw_upstreams.into_inner() {
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
        let pool_share_exempt = parse_nets(&u.pool_share_exempt, warnings)?;
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
    for r in raw_routes {
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

    Ok((upstreams, routes))
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

pub(super) fn parse_host_pattern(h: &str) -> Result<HostPattern, String> {
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
