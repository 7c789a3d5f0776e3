//! `[admission]`: what is decided right after accept (rates, caps, allow and deny lists); its
//! validated shape and checks.

use super::*;

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

pub(super) fn validate(
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
