//! Pure functions on header maps: hop-by-hop removal (RFC 9110 §7.6.1) and the forwarding
//! headers (X-Forwarded-For/-Proto/-Host, Via). No I/O, tested in place.
//!
//! Why this file is ~805 lines: about 260 of them are its tests, kept beside the functions
//! they pin down (each rule of RFC 9110 and of the forwarding headers has one); the rest is
//! one head's rewrite and the values it adds (request id, client address, Via), which share
//! the one-pass scan and the shared-allocation helper.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and never travel past a proxy. As names, not strings: a
/// `&str` key is parsed into a name on every lookup, and every request and every response
/// pass through this list.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    // Only meaningful with `Upgrade: h2c`, which is never passed on.
    HeaderName::from_static("http2-settings"),
];

/// The forwarding headers: the first three Breakwater sets, and (from an untrusted client)
/// removes the rest, which it does not set.
static FORWARDING: [HeaderName; 6] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
];

/// The request id's header. A `const`: `from_static` outside a const context checks the name
/// on every call (~110 instructions of every request).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Bits of `scan`: the hop-by-hop list (bit i for `HOP_BY_HOP[i]`), then the forwarding
/// headers (bit 10 + i for `FORWARDING[i]`), then Via, then the room's command.
const HOP_MASK: u32 = (1 << HOP_BY_HOP.len()) - 1;
const FORWARDING_SHIFT: u32 = HOP_BY_HOP.len() as u32;
const VIA_BIT: u32 = 1 << (HOP_BY_HOP.len() + FORWARDING.len());
/// `Transfer-Encoding`'s bit (HOP_BY_HOP[4]).
const TE_BIT: u32 = 1 << 4;
/// The waiting room's command header (`room::COMMAND_HEADER`), after Via.
const ROOM_BIT: u32 = VIA_BIT << 1;
/// A header named `close` (reserved by RFC 9110 §7.6.1, but a `Connection: close` would name it).
const CLOSE_BIT: u32 = ROOM_BIT << 1;

/// Which of the names this module rewrites a head carries, in one pass over its names. Each
/// lookup by name costs a hash and most heads carry few of them (callgrind: the two scans and
/// two `contains_key`s this replaced were ~900 instructions of a request and its response).
fn scan(h: &HeaderMap) -> u32 {
    h.keys().fold(0, |bits, k| bits | bit_of(k.as_str()))
}

/// A name's bit in `scan`, by its lower-case text (a `match` on strings: a length switch and
/// one compare, where comparing with each name of the lists took one compare per name).
fn bit_of(name: &str) -> u32 {
    let i = match name {
        "connection" => 0,
        "keep-alive" => 1,
        "te" => 2,
        "trailer" => 3,
        "transfer-encoding" => 4,
        "upgrade" => 5,
        "proxy-connection" => 6,
        "proxy-authenticate" => 7,
        "proxy-authorization" => 8,
        "http2-settings" => 9,
        "x-forwarded-for" => 10,
        "x-forwarded-proto" => 11,
        "x-forwarded-host" => 12,
        "forwarded" => 13,
        "x-real-ip" => 14,
        "x-forwarded-port" => 15,
        "via" => 16,
        "breakwater-room" => 17,
        "close" => 18,
        _ => return 0,
    };
    1 << i
}

/// Removes `Connection`, every header it names, and the fixed hop-by-hop list.
#[cfg(test)]
fn remove_hop_by_hop(h: &mut HeaderMap) {
    strip_hop_by_hop(h, scan(h));
}

/// `remove_hop_by_hop` on a head `scan` read as `bits`. `Connection` may name any header, so
/// bits of other names may be stale after this (set for a header it removed), never missing.
fn strip_hop_by_hop(h: &mut HeaderMap, bits: u32) {
    let present = bits & HOP_MASK;
    if present == 0 {
        return;
    }
    // `Connection` (the list's first) names more to remove, one at a time, each found by a
    // lookup that allocates nothing: the usual `keep-alive` or `close` names only what the
    // fixed list removes anyway. Each turn removes a header that is present, so this ends.
    if present & 1 == 0 || names_only_the_list(h, bits) {
        return remove_marked(h, &HOP_BY_HOP, present);
    }
    loop {
        let named = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|f| t.eq_ignore_ascii_case(f.as_str()))
                    && h.contains_key(*t)
            })
            .and_then(|t| HeaderName::from_bytes(t.as_bytes()).ok());
        match named {
            Some(name) => {
                h.remove(name);
            }
            None => break,
        }
    }
    remove_marked(h, &HOP_BY_HOP, present);
}

/// Whether `Connection` says only `keep-alive` or `close` (nearly every message that has it),
/// so it names no header but those the fixed list removes: one look at its bytes, where the
/// general search was ~600 instructions of every response from a keep-alive origin.
fn names_only_the_list(h: &HeaderMap, bits: u32) -> bool {
    bits & CLOSE_BIT == 0
        && h.get_all(header::CONNECTION).iter().all(|v| {
            v.as_bytes().split(|&b| b == b',').all(|t| {
                let t = t.trim_ascii();
                t.is_empty()
                    || t.eq_ignore_ascii_case(b"keep-alive")
                    || t.eq_ignore_ascii_case(b"close")
            })
        })
}

/// Removes the headers of `names` marked in `present` (bit i for `names[i]`).
fn remove_marked(h: &mut HeaderMap, names: &[HeaderName], present: u32) {
    for (i, name) in names.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Appends this hop's Via entry; `bits` from `scan` (a head without Via takes a plain insert).
fn append_via(h: &mut HeaderMap, bits: u32, item: HeaderValue) {
    if bits & VIA_BIT == 0 {
        h.insert(header::VIA, item);
    } else {
        append_list(h, header::VIA, item);
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

/// The client a trusted proxy in front of us vouches for: walking `X-Forwarded-For` (or, when
/// absent, `Forwarded: for=`, RFC 7239) from the right, the first address that is not itself a
/// trusted proxy. Entries to the right of it were appended by proxies we trust; entries to the
/// left were written by the client and prove nothing. None when the headers are absent or the
/// entry that would decide is not an address (then the peer stays the client).
pub fn forwarded_client(h: &HeaderMap, trusted: &[ipnet::IpNet]) -> Option<IpAddr> {
    let xff: Vec<&str> = list_items(h, "x-forwarded-for");
    let items = if xff.is_empty() {
        list_items(h, "forwarded")
            .into_iter()
            .filter_map(|item| {
                item.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
                })
            })
            .collect()
    } else {
        xff
    };
    let mut last = None;
    for item in items.iter().rev() {
        let ip = parse_node(item)?;
        last = Some(ip);
        if !trusted
            .iter()
            .any(|n| n.contains(&crate::client::unmapped(ip)))
        {
            return Some(ip);
        }
    }
    // Every hop is a trusted proxy: the leftmost is as close to the client as we can see.
    last
}

fn list_items<'a>(h: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// An address as forwarding headers write it: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`,
/// and in `Forwarded` also quoted.
fn parse_node(item: &str) -> Option<IpAddr> {
    let item = item.trim_matches('"');
    if let Ok(ip) = item.parse() {
        return Some(ip);
    }
    if let Some(rest) = item.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    item.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// The request's id: kept from a trusted proxy (which already logged it under that id),
/// generated otherwise: a client must not pick the id another system files it under.
pub fn request_id(h: &HeaderMap, trusted: bool) -> HeaderValue {
    if trusted {
        if let Some(v) = h.get(X_REQUEST_ID).filter(|v| {
            !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        }) {
            return v.clone();
        }
    }
    new_request_id()
}

/// 32 hex digits: 16 drawn at start (so instances of a fleet do not share ids), then a counter
/// scrambled by a keyed bijection (splitmix64's finaliser between two random keys), so ids never
/// repeat within a process and do not show how many requests came. Not a UUID: nothing here
/// needs the format. Two SipHash rounds and a copy that the retry's copy of the head turned
/// into a second allocation cost ~400 of a keep-alive request's ~43k instructions; this is one
/// allocation, shared by every later copy of the value.
fn new_request_id() -> HeaderValue {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    static KEYS: std::sync::OnceLock<([u8; 16], u64, u64)> = std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (prefix, k1, k2) = KEYS.get_or_init(|| {
        let random = std::hash::RandomState::new();
        let (p, mut prefix) = (random.hash_one(0u8), [0u8; 16]);
        for (i, d) in prefix.iter_mut().enumerate() {
            *d = HEX[((p >> (60 - 4 * i)) & 0xf) as usize];
        }
        (prefix, random.hash_one(1u8), random.hash_one(2u8))
    });
    let mut x = COUNTER.fetch_add(1, Ordering::Relaxed) ^ k1;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x = (x ^ (x >> 31)) ^ k2;
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(prefix);
    for (i, d) in id[16..].iter_mut().enumerate() {
        *d = HEX[((x >> (60 - 4 * i)) & 0xf) as usize];
    }
    shared_value(Text(id, 32)).unwrap_or_else(|| HeaderValue::from_static("-"))
}

/// An address as a header value, formatted on the stack (the value's copy is the one
/// allocation).
pub fn ip_value(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    // IPv4 by hand: `Display` goes through the formatting machinery (~1,300 instructions, the
    // most of any step of a new connection's first request after hyper's own).
    if let IpAddr::V4(v4) = ip {
        let mut buf = [0u8; 15];
        let mut n = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            let digits = [octet / 100, octet / 10 % 10, octet % 10];
            let skip = if octet >= 100 {
                0
            } else if octet >= 10 {
                1
            } else {
                2
            };
            for d in &digits[skip..] {
                buf[n] = b'0' + d;
                n += 1;
            }
        }
        return shared_value(Text(buf, n as u8));
    }
    let mut buf = [0u8; 48];
    let mut w = &mut buf[..];
    write!(w, "{ip}").ok()?;
    let n = 48 - w.len();
    shared_value(Text(buf, n as u8))
}

/// Text on the stack, as the owner of a `Bytes`.
struct Text<const N: usize>([u8; N], u8);

impl<const N: usize> AsRef<[u8]> for Text<N> {
    fn as_ref(&self) -> &[u8] {
        &self.0[..usize::from(self.1)]
    }
}

/// A header value in one allocation that its copies share: the address is copied into every
/// request's X-Forwarded-For, and a value made from a slice is copied again at its first clone.
fn shared_value<const N: usize>(text: Text<N>) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

/// This instance's Via entries (`<version> <name>`), made once: a request or response that
/// arrives without a Via header gets a shared copy instead of a formatted string.
#[derive(Debug, Clone)]
pub struct Via {
    pub name: String,
    /// For "1.0", "1.1", "2", "3", and anything else.
    by_version: [HeaderValue; 4],
}

impl Via {
    pub fn new(name: &str) -> Via {
        let make = |v: &str| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(format!("{v} {name}")))
                .unwrap_or_else(|_| HeaderValue::from_static("1.1 breakwater"))
        };
        Via {
            name: name.to_string(),
            by_version: [make("1.0"), make("1.1"), make("2"), make("3")],
        }
    }

    /// The entry for a message received over `version` (a `version_token`).
    pub fn entry(&self, version: &str) -> HeaderValue {
        match version {
            "1.0" => self.by_version[0].clone(),
            "2" => self.by_version[2].clone(),
            "3" => self.by_version[3].clone(),
            "1.1" => self.by_version[1].clone(),
            other => HeaderValue::from_str(&format!("{other} {}", self.name))
                .unwrap_or_else(|_| self.by_version[1].clone()),
        }
    }
}

/// What the origin should see of a client request.
pub struct Forwarded<'a> {
    /// The address the connection came from (the TCP peer, or what a PROXY header carried), as
    /// a header value (`ip_value`).
    pub client: Option<HeaderValue>,
    /// Whether that address is a trusted proxy (`[http] trusted_proxies`): then the forwarding
    /// headers it sent are kept and extended; otherwise they are replaced.
    pub trusted: bool,
    /// The host the client asked for (Host or :authority), port included, if any, as the
    /// origin is sent it.
    pub host: Option<HeaderValue>,
    /// `host` is the request's own Host field, which then stays as it is.
    pub host_as_sent: bool,
    /// "http" or "https".
    pub proto: &'static str,
    /// The protocol version the request came in on, for Via: "1.0", "1.1", "2".
    pub version: &'static str,
    /// This instance's Via entries.
    pub via: &'a Via,
    pub upgrade: Option<HeaderValue>,
}

pub fn prepare_request(h: &mut HeaderMap, f: &Forwarded<'_>) {
    let bits = scan(h);
    strip_hop_by_hop(h, bits);
    if let Some(up) = &f.upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up.clone());
    }
    let [xff, xfp, xfh, ..] = &FORWARDING;
    let proto = HeaderValue::from_static(f.proto);
    let host = f.host.clone();
    if f.trusted {
        // A proxy we trust already says who the client is and how it came in: extend the
        // chain, keep its proto and host (overwriting them is the classic https redirect loop).
        if let Some(ip) = f.client.clone() {
            append_list(h, xff.clone(), ip);
        }
        if !h.contains_key(xfp) {
            h.insert(xfp, proto);
        }
        if let (false, Some(host)) = (h.contains_key(xfh), &host) {
            h.insert(xfh, host.clone());
        }
    } else {
        // From anyone else these headers are the client's own words: replaced, not extended,
        // so nothing downstream reads a forged leftmost entry. Those that are not set below
        // are removed when present, as `scan` found them (most requests carry none: a lookup
        // each cost a hash and a name parse).
        let mut present = (bits >> (FORWARDING_SHIFT + 2)) & 0xf;
        if host.is_some() {
            // X-Forwarded-Host (bit 0 here) is replaced below instead.
            present &= !1;
        }
        remove_marked(h, &FORWARDING[2..], present);
        if let Some(v) = f.client.clone() {
            h.insert(xff.clone(), v);
        }
        h.insert(xfp, proto);
        if let Some(host) = &host {
            h.insert(xfh, host.clone());
        }
    }
    // The host the request was routed by, in the form routing read it: the origin must not
    // pick a virtual host from anything else.
    if let (Some(host), false) = (host, f.host_as_sent) {
        h.insert(header::HOST, host);
    }
    append_via(h, bits, f.via.entry(f.version));
}

/// What the client should see of an origin response.
///
/// Returns the origin's waiting-room command (`room::COMMAND_HEADER`), taken out of the head:
/// it is Breakwater's, never the client's. Found by the same pass as the rest, so a response
/// without one pays no lookup (a `remove` by name on every response was ~420 instructions).
pub fn prepare_response(
    h: &mut HeaderMap,
    origin_version: &'static str,
    via: &Via,
    upgrade: Option<&HeaderValue>,
) -> Option<HeaderValue> {
    // A response framed by Transfer-Encoding has no meaningful Content-Length (RFC 9112
    // §6.3): the body was de-chunked, so passing the origin's length on would let a
    // downstream cache read the rest as the next response.
    let bits = scan(h);
    let command = if bits & ROOM_BIT != 0 {
        h.remove(crate::room::COMMAND_HEADER)
    } else {
        None
    };
    if bits & TE_BIT != 0 {
        h.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(h, bits);
    if let Some(up) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, up.clone());
    }
    append_via(h, bits, via.entry(origin_version));
    command
}

/// Folds every existing value of a list header into one and appends `item`.
fn append_list(h: &mut HeaderMap, name: HeaderName, item: HeaderValue) {
    if !h.contains_key(&name) {
        h.insert(name, item);
        return;
    }
    let Ok(item) = item.to_str() else { return };
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

    #[test]
    fn scan_marks_each_listed_name_by_its_place_in_the_lists() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(bit_of(name.as_str()), 1 << i, "{name}");
        }
        for (i, name) in FORWARDING.iter().enumerate() {
            assert_eq!(
                bit_of(name.as_str()),
                1 << (FORWARDING_SHIFT as usize + i),
                "{name}"
            );
        }
        assert_eq!(bit_of(header::VIA.as_str()), VIA_BIT);
        assert_eq!(bit_of(header::TRANSFER_ENCODING.as_str()), TE_BIT);
        assert_eq!(bit_of(crate::room::COMMAND_HEADER), ROOM_BIT);
        let h = map(&[("Via", "1.1 a"), ("X-Real-IP", "1.2.3.4"), ("Host", "x")]);
        assert_eq!(scan(&h), VIA_BIT | 1 << (FORWARDING_SHIFT + 4));
    }

    #[test]
    fn a_header_named_by_connection_is_removed_and_via_is_still_extended_right() {
        // `Connection: via` removes the client's Via before this hop's entry is added: the
        // scan saw Via, the append must not assume it is still there.
        let mut h = map(&[("Connection", "via"), ("Via", "1.1 other"), ("Host", "x")]);
        let via = Via::new("me");
        prepare_response(&mut h, "1.1", &via, None);
        let vias: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(vias, ["1.1 me"]);
        assert!(!h.contains_key(header::CONNECTION));
    }

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
        // Several named, one absent, across two Connection fields.
        let mut h = map(&[
            ("connection", "close, X-A"),
            ("connection", "x-missing , x-b"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-c"]);
        // The usual fields, which name nothing beyond the list (the quick path), in any case
        // and spacing; a header named `close`, which `Connection: close` names, still goes.
        for (connection, extra, left) in [
            ("keep-alive", None, vec!["accept"]),
            (" Keep-Alive ,CLOSE,", None, vec!["accept"]),
            ("close", Some(("close", "x")), vec!["accept"]),
            ("close", Some(("x-close", "x")), vec!["accept", "x-close"]),
            (
                "keep-alive, x-close",
                Some(("x-close", "x")),
                vec!["accept"],
            ),
        ] {
            let mut pairs = vec![("connection", connection), ("keep-alive", "timeout=5")];
            pairs.extend(extra);
            pairs.push(("accept", "*/*"));
            let mut h = map(&pairs);
            remove_hop_by_hop(&mut h);
            let mut got: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            got.sort_unstable();
            assert_eq!(got, left, "Connection: {connection}");
        }
    }

    #[test]
    fn forwarded_client_walks_from_the_right_past_trusted_hops() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = map(&[
            ("x-forwarded-for", "1.2.3.4, 203.0.113.9"),
            ("x-forwarded-for", "10.0.0.7"),
        ]);
        assert_eq!(forwarded_client(&h, &trusted), "203.0.113.9".parse().ok());
        let h = map(&[(
            "forwarded",
            "for=\"[2001:db8::1]:4711\";proto=https, for=10.1.1.1",
        )]);
        assert_eq!(forwarded_client(&h, &trusted), "2001:db8::1".parse().ok());
        let h = map(&[("x-forwarded-for", "10.0.0.1, 10.0.0.2")]);
        assert_eq!(forwarded_client(&h, &trusted), "10.0.0.1".parse().ok());
        let h = map(&[("x-forwarded-for", "1.2.3.4, unknown")]);
        assert_eq!(forwarded_client(&h, &trusted), None);
        assert_eq!(forwarded_client(&HeaderMap::new(), &trusted), None);
        let h = map(&[("x-forwarded-for", "198.51.100.1:5000")]);
        assert_eq!(forwarded_client(&h, &trusted), "198.51.100.1".parse().ok());
    }

    #[test]
    fn addresses_are_written_as_their_text_form() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.200.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(addr).unwrap(), addr.to_string().as_str());
        }
    }

    #[test]
    fn request_ids_are_kept_from_trusted_peers_only_and_unique() {
        let h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&h, true), "abc-123");
        let mine = request_id(&h, false);
        assert_ne!(mine, "abc-123");
        assert_eq!(mine.len(), 32);
        assert!(mine.as_bytes().iter().all(u8::is_ascii_hexdigit));
        let ids: std::collections::HashSet<_> = (0..1000)
            .map(|_| request_id(&HeaderMap::new(), false))
            .collect();
        assert_eq!(ids.len(), 1000);
        assert_ne!(request_id(&map(&[("x-request-id", "a b")]), true), "a b");
    }

    #[test]
    fn forwarding_headers_from_an_untrusted_peer_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded-port", "443"),
        ]);
        prepare_request(
            &mut h,
            &Forwarded {
                client: ip_value("127.0.0.9".parse().unwrap()),
                trusted: false,
                host: Some(HeaderValue::from_static("shop.example.com")),
                host_as_sent: false,
                proto: "http",
                version: "1.1",
                via: &Via::new("bw"),
                upgrade: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        for gone in ["forwarded", "x-real-ip", "x-forwarded-port"] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
    }

    #[test]
    fn forwarding_headers_from_a_trusted_peer_are_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("via", "1.0 cdn"),
        ]);
        prepare_request(
            &mut h,
            &Forwarded {
                client: ip_value("127.0.0.9".parse().unwrap()),
                trusted: true,
                host: Some(HeaderValue::from_static("shop.example.com:8080")),
                host_as_sent: false,
                proto: "http",
                version: "1.1",
                via: &Via::new("breakwater"),
                upgrade: None,
            },
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
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
        prepare_response(&mut r, "1.1", &Via::new("bw"), None);
        assert_eq!(r["via"], "1.1 bw");
        let mut r = map(&[("via", "1.1 origin-lb")]);
        prepare_response(&mut r, "2", &Via::new("bw"), None);
        assert_eq!(r["via"], "1.1 origin-lb, 2 bw");
        let mut r = HeaderMap::new();
        assert_eq!(prepare_response(&mut r, "1.1", &Via::new("bw"), None), None);
        assert!(r.get("content-length").is_none());
        assert_eq!(r["via"], "1.1 bw");
        // The room's command is handed to the caller and never reaches the client.
        let mut r = map(&[("Breakwater-Room", "revoke"), ("x", "1")]);
        let command = prepare_response(&mut r, "1.1", &Via::new("bw"), None);
        assert_eq!(command.as_ref().map(|v| v.as_bytes()), Some(&b"revoke"[..]));
        assert!(r.get("breakwater-room").is_none());
        assert_eq!(r["x"], "1");
    }
}
