//! Waiting-room tokens: a ticket (a place in line) or a pass (an admitted session), signed with
//! HMAC-SHA256 so any instance holding the key can check one without asking anyone.
//!
//! `v1.<t|p|b>.<room>.<id, hex>.<issued, unix s>.<key index>[.<binding>].<mac>`, where the MAC
//! is the first 128 bits of HMAC-SHA256(key, everything before it), base64url. Not encrypted: a
//! ticket number is not a secret (showing it is the point); forging or altering one is what the
//! MAC prevents. The MAC is checked in constant time (`verify_truncated_left`).
//!
//! `b` is a bypass: its id is the unix second it expires; staff and monitoring send it in the
//! `Breakwater-Room-Bypass` header (`breakwater room-bypass` mints one). The optional binding
//! (8 hex digits) ties a ticket or pass to the client's address prefix (`bind_ipv4_prefix`,
//! `bind_ipv6_prefix`): a hash of the prefix, inside the signed part, so a token passed to
//! someone on another network is refused.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the MAC kept (128 bits).
const MAC_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ticket,
    Pass,
    Bypass,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// The ticket number, or the pass's session id.
    pub id: u64,
    /// Unix seconds when it was first issued.
    pub issued: u64,
    /// The client address prefix it is bound to (see `binding`).
    pub bind: Option<u32>,
}

/// What a token bound to `ip`'s prefix carries: `None` when binding is off for its family
/// (prefix 0). A hash, not the prefix, so the token does not show the address.
pub fn binding(ip: std::net::IpAddr, v4_prefix: u8, v6_prefix: u8) -> Option<u32> {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"breakwater room binding");
    match crate::client::unmapped(ip) {
        std::net::IpAddr::V4(a) if v4_prefix > 0 => {
            let p = v4_prefix.min(32);
            let mask = u32::MAX.checked_shl(32 - u32::from(p)).unwrap_or(0);
            h.update([p]);
            h.update((u32::from(a) & mask).to_be_bytes());
        }
        std::net::IpAddr::V6(a) if v6_prefix > 0 => {
            let p = v6_prefix.min(128);
            let mask = u128::MAX.checked_shl(128 - u32::from(p)).unwrap_or(0);
            h.update([p]);
            h.update((u128::from(a) & mask).to_be_bytes());
        }
        _ => return None,
    }
    let d = h.finalize();
    Some(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
}

/// Why a token was refused (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Malformed = 0,
    WrongRoom = 1,
    UnknownKey = 2,
    BadMac = 3,
    /// Bound to another address prefix (index 4 is the room's "expired").
    WrongAddress = 5,
}

impl Invalid {
    pub fn label(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed",
            Invalid::WrongRoom => "wrong_room",
            Invalid::UnknownKey => "unknown_key",
            Invalid::BadMac => "bad_mac",
            Invalid::WrongAddress => "wrong_address",
        }
    }
}

/// The room's signing keys: the first signs, every one verifies (rotation). Each is kept as
/// HMAC's state with the key already absorbed: every waiter's poll verifies a token, and
/// keying HMAC anew each time doubled the hashing (two of its four SHA-256 blocks).
#[derive(Clone)]
pub struct Keys(Vec<HmacSha256>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} keys)", self.0.len())
    }
}

impl Keys {
    /// `keys` from the config, or one random key when there are none.
    pub fn new(keys: &[Vec<u8>]) -> Keys {
        if !keys.is_empty() {
            return Keys(keys.iter().filter_map(|k| keyed(k)).collect());
        }
        let mut k = vec![0u8; 32];
        if getrandom::fill(&mut k).is_err() {
            // No OS randomness at all is not a state a server runs in; still, never sign with
            // a known key: mix what differs per process.
            let seed = format!("{:?}{}", std::time::SystemTime::now(), std::process::id());
            if let Ok(mut mac) = <HmacSha256 as Mac>::new_from_slice(seed.as_bytes()) {
                mac.update(b"breakwater waiting room key");
                k = mac.finalize().into_bytes().to_vec();
            }
        }
        Keys(keyed(&k).into_iter().collect())
    }

    fn mac(&self, index: usize) -> Option<HmacSha256> {
        self.0.get(index).cloned()
    }

    pub fn sign(&self, room: &str, t: Token) -> String {
        let kind = match t.kind {
            Kind::Ticket => 't',
            Kind::Pass => 'p',
            Kind::Bypass => 'b',
        };
        let mut body = format!("v1.{kind}.{room}.{:x}.{}.0", t.id, t.issued);
        if let Some(b) = t.bind {
            body += &format!(".{b:08x}");
        }
        let Some(mut mac) = self.mac(0) else {
            return body;
        };
        mac.update(body.as_bytes());
        let tag = mac.finalize().into_bytes();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..MAC_LEN]);
        format!("{body}.{b64}")
    }

    pub fn verify(&self, room: &str, s: &str) -> Result<Token, Invalid> {
        if s.len() > 200 {
            return Err(Invalid::Malformed);
        }
        let (body, b64) = s.rsplit_once('.').ok_or(Invalid::Malformed)?;
        let mut f = body.split('.');
        let (Some("v1"), Some(kind), Some(r), Some(id), Some(issued), Some(kid), bind, None) = (
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
            f.next(),
        ) else {
            return Err(Invalid::Malformed);
        };
        let kind = match kind {
            "t" => Kind::Ticket,
            "p" => Kind::Pass,
            "b" => Kind::Bypass,
            _ => return Err(Invalid::Malformed),
        };
        // Exactly 8 lowercase hex digits: one spelling per token.
        let bind = match bind {
            None => None,
            Some(b)
                if b.len() == 8 && b.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Some(u32::from_str_radix(b, 16).map_err(|_| Invalid::Malformed)?)
            }
            Some(_) => return Err(Invalid::Malformed),
        };
        // Canonical numbers only, so one token has one spelling.
        let id = parse_hex(id).ok_or(Invalid::Malformed)?;
        let issued = parse_dec(issued).ok_or(Invalid::Malformed)?;
        // The signer's key index is checked for form only (see below).
        parse_dec(kid).ok_or(Invalid::Malformed)?;
        // Decoded on the stack: a tag longer than the buffer is malformed anyway.
        let mut buf = [0u8; 2 * MAC_LEN];
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode_slice(b64, &mut buf)
            .map_err(|_| Invalid::Malformed)?;
        if n != MAC_LEN {
            return Err(Invalid::Malformed);
        }
        let tag = &buf[..n];
        // Every key verifies: the signer's index is not trusted (it is just "0" today), so a
        // rotation keeps old tokens valid until the old key is removed.
        let mut known = false;
        for i in 0..self.0.len() {
            let Some(mut mac) = self.mac(i) else { continue };
            known = true;
            mac.update(body.as_bytes());
            if mac.verify_truncated_left(tag).is_ok() {
                if r != room {
                    return Err(Invalid::WrongRoom);
                }
                return Ok(Token {
                    kind,
                    id,
                    issued,
                    bind,
                });
            }
        }
        Err(if known {
            Invalid::BadMac
        } else {
            Invalid::UnknownKey
        })
    }
}

/// HMAC-SHA256 keyed with `key` (it takes a key of any length: this cannot fail).
fn keyed(key: &[u8]) -> Option<HmacSha256> {
    <HmacSha256 as Mac>::new_from_slice(key).ok()
}

fn parse_hex(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 16 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

fn parse_dec(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys() -> Keys {
        Keys::new(&[b"0123456789abcdef0123456789abcdef".to_vec()])
    }

    #[test]
    fn a_signed_token_verifies_and_only_in_its_room() {
        let k = keys();
        let t = Token {
            kind: Kind::Ticket,
            id: 42,
            issued: 1_764_000_000,
            bind: None,
        };
        let s = k.sign("drop", t);
        assert_eq!(k.verify("drop", &s), Ok(t));
        assert_eq!(k.verify("other", &s), Err(Invalid::WrongRoom));
        let other = Keys::new(&[b"another key, thirty-two bytes long!".to_vec()]);
        assert_eq!(other.verify("drop", &s), Err(Invalid::BadMac));
        // Rotation: a key list that still holds the old key accepts it.
        let rotated = Keys::new(&[
            b"another key, thirty-two bytes long!".to_vec(),
            b"0123456789abcdef0123456789abcdef".to_vec(),
        ]);
        assert_eq!(rotated.verify("drop", &s), Ok(t));
    }

    #[test]
    fn a_ticket_cannot_be_turned_into_a_pass_or_moved_up() {
        let k = keys();
        let s = k.sign(
            "drop",
            Token {
                kind: Kind::Ticket,
                id: 900,
                issued: 1,
                bind: None,
            },
        );
        let pass = s.replacen("v1.t.", "v1.p.", 1);
        assert_eq!(k.verify("drop", &pass), Err(Invalid::BadMac));
        let earlier = s.replacen(".384.", ".1.", 1);
        assert!(k.verify("drop", &earlier).is_err());
    }

    #[test]
    fn a_bound_token_carries_its_prefix_and_a_bypass_its_expiry() {
        let k = keys();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let b = binding(ip("203.0.113.7"), 24, 56);
        assert!(b.is_some());
        // Same /24 (and IPv4-mapped): the same binding; another /24: another.
        assert_eq!(binding(ip("203.0.113.200"), 24, 56), b);
        assert_eq!(binding(ip("::ffff:203.0.113.9"), 24, 56), b);
        assert_ne!(binding(ip("203.0.114.7"), 24, 56), b);
        assert_eq!(
            binding(ip("2001:db8:1:2::1"), 24, 56),
            binding(ip("2001:db8:1:ff::9"), 24, 56)
        );
        assert_eq!(binding(ip("203.0.113.7"), 0, 56), None);
        let t = Token {
            kind: Kind::Pass,
            id: 7,
            issued: 9,
            bind: b,
        };
        let s = k.sign("drop", t);
        assert_eq!(k.verify("drop", &s), Ok(t));
        // The binding is signed: swapping it for another prefix's breaks the MAC.
        let other = format!("{:08x}", binding(ip("198.51.100.1"), 24, 56).unwrap());
        let moved = s.replacen(&format!("{:08x}", b.unwrap()), &other, 1);
        assert_eq!(k.verify("drop", &moved), Err(Invalid::BadMac));
        let bypass = Token {
            kind: Kind::Bypass,
            id: 1_900_000_000,
            issued: 1,
            bind: None,
        };
        assert!(k.sign("drop", bypass).starts_with("v1.b.drop."));
        assert_eq!(k.verify("drop", &k.sign("drop", bypass)), Ok(bypass));
    }

    /// The figure: 100,000 mutated tokens (bound and unbound, tickets, passes and
    /// bypasses; a byte flipped, dropped, inserted, or two fields swapped), none accepted.
    #[test]
    fn a_hundred_thousand_mutated_tokens_are_all_refused() {
        let k = keys();
        // A small deterministic generator (xorshift): the same cases every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut accepted = 0;
        for n in 0..100_000u64 {
            let kind = [Kind::Ticket, Kind::Pass, Kind::Bypass][(n % 3) as usize];
            let t = Token {
                kind,
                id: next() >> (next() % 64),
                issued: next() % 4_000_000_000,
                bind: (n % 2 == 0).then(|| next() as u32),
            };
            let mut m = k.sign("drop", t).into_bytes();
            let i = (next() % m.len() as u64) as usize;
            let byte = (next() % 256) as u8;
            match n % 4 {
                0 if m[i] != byte => m[i] = byte,
                0 => m[i] ^= 1,
                1 => {
                    m.remove(i);
                }
                2 => m.insert(i, byte),
                _ => {
                    // Two dot-separated fields swapped.
                    let text = String::from_utf8(m.clone()).unwrap_or_default();
                    let mut f: Vec<&str> = text.split('.').collect();
                    let a = (next() % f.len() as u64) as usize;
                    let b = (next() % f.len() as u64) as usize;
                    if f[a] == f[b] {
                        m.push(b'x');
                    } else {
                        f.swap(a, b);
                        m = f.join(".").into_bytes();
                    }
                }
            }
            if let Ok(text) = String::from_utf8(m) {
                if k.verify("drop", &text).is_ok() {
                    accepted += 1;
                }
            }
        }
        assert_eq!(accepted, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Flipped, dropped or inserted bytes anywhere: never accepted as another token.
        #[test]
        fn mutated_tokens_are_refused(id in any::<u64>(), issued in any::<u32>(),
                                      bind in any::<Option<u32>>(),
                                      pos in any::<usize>(), byte in any::<u8>(), op in 0u8..3) {
            let k = keys();
            let t = Token { kind: Kind::Ticket, id, issued: u64::from(issued), bind };
            let s = k.sign("drop", t).into_bytes();
            let mut m = s.clone();
            let i = pos % m.len();
            match op {
                0 => { if m[i] == byte { return Ok(()); } m[i] = byte; }
                1 => { m.remove(i); }
                _ => { m.insert(i, byte); }
            }
            if let Ok(text) = String::from_utf8(m) {
                prop_assert!(k.verify("drop", &text).is_err(), "{text} accepted");
            }
        }
    }
}
