//! Pure functions on header maps: hop-by-hop removal (RFC 9110 §7.6.1) and the forwarding
//! headers (X-Forwarded-For/-Proto/-Host, Via). No I/O, tested in place.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and never travel past a proxy.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    // Only meaningful with `Upgrade: h2c`, which is never passed on.
    "http2-settings",
];

/// Removes `Connection`, every header it names, and the fixed hop-by-hop list.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        h.remove(name);
    }
    for name in HOP_BY_HOP {
        h.remove(name);
    }
}

fn has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether an HTTP/1.1 request head is a WebSocket opening handshake (RFC 6455 §4.1):
/// `Connection: upgrade`, `Upgrade: websocket` and the `Sec-WebSocket-Key`/`-Version`
/// headers. The caller also requires GET without a body. Only this opens a tunnel: any other
/// `Upgrade` (h2c, TLS, made-up tokens) is stripped and the request goes through the pool.
pub fn is_websocket_upgrade(h: &HeaderMap) -> bool {
    has_token(h, &header::CONNECTION, "upgrade")
        && has_token(h, &header::UPGRADE, "websocket")
        && h.contains_key(header::SEC_WEBSOCKET_KEY)
        && h.contains_key(header::SEC_WEBSOCKET_VERSION)
}

/// Whether an origin's 101 completes a WebSocket handshake: it switches to `websocket` and
/// carries `Sec-WebSocket-Accept`. Anything else is not a tunnel we asked for.
pub fn is_websocket_accept(h: &HeaderMap) -> bool {
    has_token(h, &header::UPGRADE, "websocket") && h.contains_key(header::SEC_WEBSOCKET_ACCEPT)
}

/// Whether a Via list already names `name` as a receiver: the request has looped back.
pub fn via_names(h: &HeaderMap, name: &str) -> bool {
    h.get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        // Each entry is `[protocol/]version received-by [comment]`.
        .filter_map(|entry| entry.split_whitespace().nth(1))
        .any(|by| by.eq_ignore_ascii_case(name))
}

/// HTTP/2 lets a client split `cookie` into several fields; an HTTP/1.1 origin expects one,
/// joined with "; " (RFC 9113 §8.2.3).
pub fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// What the origin should see of a client request.
pub struct Forwarded<'a> {
    pub client: IpAddr,
    /// The host the client asked for (Host or :authority), port included, if any.
    pub host: Option<&'a str>,
    /// "http" or "https".
    pub proto: &'static str,
    /// The protocol version the request came in on, for Via: "1.0", "1.1", "2".
    pub version: &'static str,
    /// This instance's Via pseudonym.
    pub via_name: &'a str,
    pub upgrade: Option<HeaderValue>,
}

pub fn prepare_request(h: &mut HeaderMap, f: &Forwarded<'_>) {
    remove_hop_by_hop(h);
    if let Some(up) = &f.upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up.clone());
    }
    append_list(
        h,
        HeaderName::from_static("x-forwarded-for"),
        &f.client.to_string(),
    );
    h.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(f.proto),
    );
    // The host the request was routed by, in the form routing read it: the origin must not
    // pick a virtual host from anything else.
    if let Some(host) = f.host.and_then(|v| HeaderValue::from_str(v).ok()) {
        h.insert(header::HOST, host.clone());
        h.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    append_list(h, header::VIA, &format!("{} {}", f.version, f.via_name));
}

/// What the client should see of an origin response.
pub fn prepare_response(
    h: &mut HeaderMap,
    origin_version: &'static str,
    via_name: &str,
    upgrade: Option<&HeaderValue>,
) {
    // A response framed by Transfer-Encoding has no meaningful Content-Length (RFC 9112
    // §6.3): the body was de-chunked, so passing the origin's length on would let a
    // downstream cache read the rest as the next response.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(h);
    if let Some(up) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up.clone());
    }
    append_list(h, header::VIA, &format!("{origin_version} {via_name}"));
}

/// Folds every existing value of a list header into one and appends `item`.
fn append_list(h: &mut HeaderMap, name: HeaderName, item: &str) {
    let mut joined = String::new();
    for v in h.get_all(&name) {
        if let Ok(s) = v.to_str() {
            if !s.trim().is_empty() {
                joined.push_str(s.trim());
                joined.push_str(", ");
            }
        }
    }
    joined.push_str(item);
    if let Ok(v) = HeaderValue::from_str(&joined) {
        h.insert(name, v);
    }
}

pub fn version_token(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_connection_and_what_it_names() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn forwarding_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("via", "1.0 cdn"),
        ]);
        prepare_request(
            &mut h,
            &Forwarded {
                client: "127.0.0.9".parse().unwrap(),
                host: Some("shop.example.com:8080"),
                proto: "http",
                version: "1.1",
                via_name: "breakwater",
                upgrade: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com:8080");
        assert_eq!(h["host"], "shop.example.com:8080");
        assert_eq!(h["via"], "1.0 cdn, 1.1 breakwater");
    }

    #[test]
    fn only_websocket_is_an_upgrade() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ]);
        assert!(is_websocket_upgrade(&ws));
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        assert!(!is_websocket_upgrade(&h2c));
        let no_key = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert!(!is_websocket_upgrade(&no_key));
        let mut stripped = h2c.clone();
        remove_hop_by_hop(&mut stripped);
        assert!(stripped.is_empty(), "{stripped:?}");
        assert!(is_websocket_accept(&map(&[
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        ])));
        assert!(!is_websocket_accept(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn via_loops_cookies_and_framing() {
        let h = map(&[("via", "1.1 cdn, HTTP/1.1 Edge-1 (breakwater)")]);
        assert!(via_names(&h, "edge-1"));
        assert!(!via_names(&h, "edge-2"));
        let mut c = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut c);
        assert_eq!(c.get_all("cookie").iter().count(), 1);
        assert_eq!(c["cookie"], "a=1; b=2");
        let mut r = map(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        prepare_response(&mut r, "1.1", "bw", None);
        assert!(r.get("content-length").is_none());
        assert_eq!(r["via"], "1.1 bw");
    }
}
