//! `[[listeners]]`: addresses, backlog, shards, TLS and PROXY protocol; the validated shape and
//! its checks.

use super::*;
use toml::Spanned;

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

/// `[[listeners]]`, or the one default listener when the section is absent.
pub(super) fn validate(
    raw: Option<Vec<Spanned<file::FileListener>>>,
    warnings: &Warnings<'_>,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    let err = warnings.err;
    let mut listeners = Vec::new();
    match raw {
        None => listeners.push(ListenerConfig {
            addr: file::DEFAULT_LISTEN,
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
                            from: parse_nets(&l.proxy_protocol_from, warnings)?,
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

    Ok(listeners)
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

pub(super) fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
