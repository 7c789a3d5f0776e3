//! What a request names, once: the host it is for and the path it asks for, each reduced to
//! one canonical form before routing, so that the route table, the forwarded request and the
//! origin all read the same thing. Pure functions, no I/O.
//!
//! Why this is strict: a proxy that routes on one reading of a request and forwards another
//! lets a client reach what the route table never exposed (`/api/../admin` routed as `/api`,
//! then normalised by the origin), or pick a different virtual host than the proxy did (two
//! Host headers, `host:x@evil`). So an ambiguous request is refused with 400 instead of
//! guessed at.

use std::borrow::Cow;
use std::fmt;

/// Why a request target was refused (each is a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadTarget {
    MissingHost,
    DuplicateHost,
    InvalidHost,
    Userinfo,
    /// `%2F` or `%5C` in the path, where the route does not allow it.
    EncodedSlash,
    /// `%2e` spelling a `.` or `..` segment, or a `..;` / `.;` segment.
    EncodedDotSegment,
    /// NUL, a literal backslash, or a malformed percent-escape.
    InvalidPath,
}

impl fmt::Display for BadTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadTarget::MissingHost => "the request has no Host",
            BadTarget::DuplicateHost => "the request has more than one Host",
            BadTarget::InvalidHost => "the Host is not a valid host[:port]",
            BadTarget::Userinfo => "the target carries userinfo (user@host)",
            BadTarget::EncodedSlash => "the path has an encoded slash or backslash",
            BadTarget::EncodedDotSegment => "the path has an encoded or parameterised dot segment",
            BadTarget::InvalidPath => "the path has a NUL, a backslash or a bad percent-escape",
        })
    }
}

/// A host as routing and the origin read it: lower-case, no trailing dot, port split off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host<'a> {
    /// The name or address, lower-cased; an IPv6 literal keeps its brackets. Borrowed from
    /// the field when it is already in that form (the usual case: no copy per request).
    pub name: Cow<'a, str>,
    pub port: Option<u16>,
    /// The text it was parsed from already reads `name[:port]` (`header_value`): a Host field
    /// in that form goes to the origin as it came, shared, not written out again.
    pub canonical: bool,
}

impl Host<'_> {
    /// The name without IPv6 brackets, as route patterns are written.
    pub fn route_name(&self) -> &str {
        self.name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .unwrap_or(&self.name)
    }

    /// `name[:port]`, the Host header the origin is sent.
    pub fn header_value(&self) -> String {
        match self.port {
            Some(p) => format!("{}:{p}", self.name),
            None => self.name.to_string(),
        }
    }
}

/// Classes of a host name's bytes (`parse_host`): a capital, a dot, an `@`, anything else a
/// name may not hold. Letters, digits, `-` and `_` have none.
const UPPER: u8 = 1;
const DOT: u8 = 2;
const AT: u8 = 4;
const OTHER: u8 = 8;
static HOST_CLASS: [u8; 256] = {
    let mut t = [OTHER; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_' {
            t[b] = 0;
        } else if c.is_ascii_uppercase() {
            t[b] = UPPER;
        } else if c == b'.' {
            t[b] = DOT;
        } else if c == b'@' {
            t[b] = AT | OTHER;
        }
        b += 1;
    }
    t
};

/// Parses a Host header value or an authority (RFC 9110 §7.2, RFC 3986 §3.2). Userinfo is
/// refused: in a Host header it is invalid, and in a target it is how `host:x@evil` tricks work.
pub fn parse_host(authority: &str) -> Result<Host<'_>, BadTarget> {
    let (name, port, canonical) = if authority.starts_with('[') {
        if authority.contains('@') {
            return Err(BadTarget::Userinfo);
        }
        let end = authority.find(']').ok_or(BadTarget::InvalidHost)?;
        let literal = &authority[1..end];
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(BadTarget::InvalidHost);
        }
        let rest = &authority[end + 1..];
        let port = match rest.strip_prefix(':') {
            Some(p) => Some(p),
            None if rest.is_empty() => None,
            None => return Err(BadTarget::InvalidHost),
        };
        (
            Cow::Owned(format!("[{}]", literal.to_ascii_lowercase())),
            port,
            false,
        )
    } else {
        // One pass over the name (every request reads its host): its characters, any `@`, no
        // empty label (`..`), and whether it needs lower-casing at all, by a table (the
        // same tests written out were ~550 instructions of a request).
        let bytes = authority.as_bytes();
        let colon = bytes.iter().position(|&b| b == b':');
        let name_end = colon.unwrap_or(bytes.len());
        let (mut seen, mut dots, mut last) = (0u8, false, 0u8);
        for &b in &bytes[..name_end] {
            let class = HOST_CLASS[b as usize];
            seen |= class;
            dots |= class & last & DOT != 0;
            last = class;
        }
        if bytes[name_end..].contains(&b'@') || seen & AT != 0 {
            return Err(BadTarget::Userinfo);
        }
        let (valid, upper) = (seen & OTHER == 0 && !dots, seen & UPPER != 0);
        let (name, port) = match colon {
            Some(c) => (&authority[..c], Some(&authority[c + 1..])),
            None => (authority, None),
        };
        let trimmed = name.strip_suffix('.');
        let name = trimmed.unwrap_or(name);
        if !valid || name.is_empty() || name.len() > 253 || name.starts_with('.') {
            return Err(BadTarget::InvalidHost);
        }
        // Already `name[:port]` as the origin is sent it: no capital, no trailing dot, no
        // empty port or leading zero.
        let canonical = !upper
            && trimmed.is_none()
            && port.is_none_or(|p| p == "0" || p.bytes().next().is_some_and(|d| d != b'0'));
        let name = if upper {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        (name, port, canonical)
    };
    let port = match port {
        // "host:" is allowed by the grammar and means the default port.
        None | Some("") => None,
        Some(p) if p.len() <= 5 => {
            let mut n: u32 = 0;
            for b in p.bytes() {
                if !b.is_ascii_digit() {
                    return Err(BadTarget::InvalidHost);
                }
                n = n * 10 + u32::from(b - b'0');
            }
            Some(u16::try_from(n).map_err(|_| BadTarget::InvalidHost)?)
        }
        Some(_) => return Err(BadTarget::InvalidHost),
    };
    Ok(Host {
        name,
        port,
        canonical,
    })
}

/// The canonical path: unreserved percent-escapes decoded (`%61` → `a`), other escapes in
/// upper case, repeated slashes merged, dot segments removed (RFC 3986 §5.2.4). Refused: NUL
/// (encoded or not), a literal backslash, a malformed escape, a `.`/`..` segment spelled with
/// `%2e`, and `.;`/`..;` segments (which some origins read as dot segments). `%2F` and `%5C`
/// stay encoded and are data, not separators; whether a route accepts them is
/// `has_encoded_slash`'s question, asked after routing.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, BadTarget> {
    if path == "*" {
        // OPTIONS * (asterisk form) names the server, not a path.
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(BadTarget::InvalidPath);
    }
    // The common case, a path already in normal form, costs one scan and no segment vector.
    let plain = !path.bytes().any(|b| matches!(b, b'%' | b'\\' | 0))
        && !path.contains("//")
        && !path.split('/').any(|seg| seg.starts_with('.'))
        && path.is_ascii();
    if plain {
        // Borrowed: the request line can then be forwarded as it came, with no copy.
        return Ok(Cow::Borrowed(path));
    }
    let mut out: Vec<String> = Vec::new();
    let raw_segments: Vec<&str> = path[1..].split('/').collect();
    let last = raw_segments.len() - 1;
    let mut trailing_slash = false;
    for (i, raw) in raw_segments.iter().enumerate() {
        let (seg, had_encoded_dot) = decode_segment(raw)?;
        let before_params = seg.split(';').next().unwrap_or("");
        if seg.contains(';') && (before_params == "." || before_params == "..") {
            return Err(BadTarget::EncodedDotSegment);
        }
        if had_encoded_dot && (seg == "." || seg == "..") {
            return Err(BadTarget::EncodedDotSegment);
        }
        match seg.as_str() {
            // Empty segments (`//`) are merged; a final empty one is a trailing slash.
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            _ => {
                out.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing_slash {
        s.push('/');
    }
    Ok(Cow::Owned(s))
}

/// Decodes one segment's unreserved escapes; says whether a `.` came from `%2e`.
fn decode_segment(raw: &str) -> Result<(String, bool), BadTarget> {
    let b = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut encoded_dot = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or(BadTarget::InvalidPath)?;
                let v = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(BadTarget::InvalidPath)?;
                if v == 0 {
                    return Err(BadTarget::InvalidPath);
                }
                if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                    encoded_dot |= v == b'.';
                    out.push(v as char);
                } else {
                    out.push('%');
                    out.push_str(&format!("{v:02X}"));
                }
                i += 3;
            }
            0 | b'\\' => return Err(BadTarget::InvalidPath),
            c if c.is_ascii() => {
                out.push(c as char);
                i += 1;
            }
            // Non-ASCII bytes cannot come from a parsed URI; refuse rather than re-encode.
            _ => return Err(BadTarget::InvalidPath),
        }
    }
    Ok((out, encoded_dot))
}

/// Whether a normalised path carries an encoded `/` or `\`.
pub fn has_encoded_slash(normalized: &str) -> bool {
    normalized.contains("%2F") || normalized.contains("%5C")
}

/// Whether `path` is under `prefix` on a segment boundary: `/api` matches `/api` and
/// `/api/x`, never `/api-internal`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hosts() {
        let h = parse_host("Shop.Example.COM.:8080").unwrap();
        assert_eq!(h.name, "shop.example.com");
        assert_eq!(h.port, Some(8080));
        assert_eq!(h.header_value(), "shop.example.com:8080");
        assert_eq!(parse_host("[::1]:80").unwrap().route_name(), "::1");
        assert_eq!(parse_host("a:").unwrap().port, None);
        assert_eq!(parse_host("a:65535").unwrap().port, Some(65535));
        assert_eq!(parse_host("a:00080").unwrap().port, Some(80));
        for bad in [
            "shop.example.com:x@evil.test",
            "a b",
            "",
            ".",
            "a:99999",
            "a:65536",
            "a:+80",
            "a:123456",
            ".a",
            "a.b..c",
            "a:8x",
            "[zz]",
            "[::1]x",
            "a..b",
            "a..",
            "a/b",
        ] {
            assert!(parse_host(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(parse_host("u@h"), Err(BadTarget::Userinfo));
        assert_eq!(parse_host("h:1@x"), Err(BadTarget::Userinfo));
        assert_eq!(parse_host("[::1]@x"), Err(BadTarget::Userinfo));
    }

    #[test]
    fn a_host_field_already_in_origin_form_is_recognised() {
        let canonical = |h: &str| parse_host(h).unwrap().canonical;
        assert!(canonical("shop.example:8080"));
        assert!(!canonical("Shop.example:8080"));
        assert!(!canonical("shop.example:08080"));
        assert!(canonical("shop.example"));
        assert!(!canonical("shop.example."));
        assert!(!canonical("shop.example:"));
        assert!(canonical("a:0"));
        assert!(!canonical("[::1]:80"));
        // What is canonical is exactly what the origin would be sent.
        for h in [
            "shop.example:8080",
            "shop.example",
            "a:0",
            "x-y_z.example:1",
        ] {
            assert!(canonical(h), "{h}");
            assert_eq!(parse_host(h).unwrap().header_value(), h);
        }
    }

    #[test]
    fn paths() {
        let n = |p: &str| normalize_path(p).map(Cow::into_owned);
        assert_eq!(n("/api/../internal").unwrap(), "/internal");
        assert_eq!(n("/api/./x/").unwrap(), "/api/x/");
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/a/%7e%2f").unwrap(), "/a/~%2F");
        assert_eq!(n("/../..").unwrap(), "/");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("/a.b/..c").unwrap(), "/a.b/..c");
        assert_eq!(n("/api/%2e%2e/internal"), Err(BadTarget::EncodedDotSegment));
        assert_eq!(n("/api/%2E/x"), Err(BadTarget::EncodedDotSegment));
        assert_eq!(n("/api/..;/admin"), Err(BadTarget::EncodedDotSegment));
        assert_eq!(n("/api\\..\\internal"), Err(BadTarget::InvalidPath));
        assert_eq!(n("/a%00"), Err(BadTarget::InvalidPath));
        assert_eq!(n("/a%zz"), Err(BadTarget::InvalidPath));
        assert_eq!(n("/a%2"), Err(BadTarget::InvalidPath));
        assert!(has_encoded_slash(&n("/a%2fb").unwrap()));
        assert!(has_encoded_slash(&n("/a%5cb").unwrap()));
    }

    #[test]
    fn prefixes_on_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/api-internal"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(!prefix_matches("/api/", "/api"));
        assert!(prefix_matches("/", "/anything"));
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let seg = prop_oneof![
            Just("".to_string()),
            Just(".".to_string()),
            Just("..".to_string()),
            Just("api".to_string()),
            Just("admin".to_string()),
            Just("%2e".to_string()),
            Just("%2F".to_string()),
            Just("%61".to_string()),
            Just("..;".to_string()),
            "[a-z0-9%._~-]{0,6}",
        ];
        prop::collection::vec(seg, 0..8).prop_map(|v| format!("/{}", v.join("/")))
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_has_no_dot_segments(p in path_strategy()) {
            if let Ok(once) = normalize_path(&p) {
                prop_assert_eq!(normalize_path(&once), Ok(Cow::Borrowed(&*once)));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
                for seg in once.split('/') {
                    prop_assert!(seg != "." && seg != "..");
                }
            }
        }

        #[test]
        fn a_matched_prefix_stays_the_forwarded_prefix(
            p in path_strategy(),
            prefix in prop_oneof![Just("/api"), Just("/admin"), Just("/"), Just("/api/")],
        ) {
            if let Ok(path) = normalize_path(&p) {
                if prefix_matches(prefix, &path) {
                    // What is forwarded is `path` itself: it starts with the prefix, and a
                    // second normalisation by the origin cannot climb out of it.
                    prop_assert!(path.starts_with(prefix));
                    let again = normalize_path(&path).unwrap();
                    prop_assert!(prefix_matches(prefix, &again));
                }
            }
        }

        /// The table-driven parse agrees with the rules written out plainly, and what it calls
        /// canonical is exactly what the origin would be sent.
        #[test]
        fn hosts_parse_as_the_rules_read(a in "[a-zA-Z0-9._:@-]{0,14}") {
            let plain = || -> Result<(String, Option<u16>), BadTarget> {
                if a.contains('@') {
                    return Err(BadTarget::Userinfo);
                }
                let (name, port) = match a.split_once(':') {
                    Some((n, p)) => (n, Some(p)),
                    None => (a.as_str(), None),
                };
                let bad = Err(BadTarget::InvalidHost);
                if name.contains("..") {
                    return bad;
                }
                let name = name.strip_suffix('.').unwrap_or(name);
                let chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !chars || name.is_empty() || name.starts_with('.') {
                    return bad;
                }
                let port = match port {
                    None | Some("") => None,
                    Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
                        match p.parse::<u16>() {
                            Ok(n) => Some(n),
                            Err(_) => return bad,
                        }
                    }
                    Some(_) => return bad,
                };
                Ok((name.to_ascii_lowercase(), port))
            };
            let got = parse_host(&a);
            prop_assert_eq!(got.clone().map(|h| (h.name.into_owned(), h.port)), plain());
            if let Ok(h) = got {
                prop_assert_eq!(h.canonical, h.header_value() == a);
            }
        }
    }
}
