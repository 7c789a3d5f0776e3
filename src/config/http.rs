//! `[http]`: what the HTTP server and the proxy handler apply to every request (timeouts, sizes,
//! buffering, trusted proxies); the validated shape and its checks.

use super::*;

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

/// `[http]`: timeouts, sizes and the response spool.
pub(super) fn validate(
    h: file::FileHttp,
    warnings: &Warnings<'_>,
) -> Result<HttpConfig, ConfigError> {
    let err = warnings.err;
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
        trusted_proxies: parse_nets(&h.trusted_proxies, warnings)?,
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

    Ok(http)
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
