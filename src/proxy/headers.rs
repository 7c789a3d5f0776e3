//! Pure functions on header maps: hop-by-hop removal (RFC 9110 §7.6.1) and the forwarding
//! headers (X-Forwarded-For/-Proto/-Host, Via). No I/O, tested in place.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and never travel past a proxy.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
];

const VIA_NAME: &str = "breakwater";

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

/// The protocol token a request asked to switch to, when it is a valid HTTP/1.1 upgrade
/// (`Connection: upgrade` plus `Upgrade: X`).
pub fn upgrade_request(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
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
    if let Some(host) = f.host.and_then(|v| HeaderValue::from_str(v).ok()) {
        if !h.contains_key(header::HOST) {
            h.insert(header::HOST, host.clone());
        }
        h.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    append_list(h, header::VIA, &format!("{} {VIA_NAME}", f.version));
}

/// What the client should see of an origin response.
pub fn prepare_response(
    h: &mut HeaderMap,
    origin_version: &'static str,
    upgrade: Option<&HeaderValue>,
) {
    remove_hop_by_hop(h);
    if let Some(up) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up.clone());
    }
    append_list(h, header::VIA, &format!("{origin_version} {VIA_NAME}"));
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
    fn upgrade_survives() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        let up = upgrade_request(&h);
        assert_eq!(up.as_ref().unwrap(), "websocket");
        prepare_request(
            &mut h,
            &Forwarded {
                client: "::1".parse().unwrap(),
                host: None,
                proto: "http",
                version: "1.1",
                upgrade: up,
            },
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(upgrade_request(&map(&[("upgrade", "websocket")])).is_none());
    }
}
