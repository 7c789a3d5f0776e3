//! Waiting-room tokens: a ticket (a place in line) or a pass (an admitted session), signed with
//! HMAC-SHA256 so any instance holding the key can check one without asking anyone.
//!
//! `v1.<t|p>.<room>.<id, hex>.<issued, unix s>.<key index>.<mac>`, where the MAC is the first 128
//! bits of HMAC-SHA256(key, everything before it), base64url. Not encrypted: a ticket number is
//! not a secret (showing it is the point); forging or altering one is what the MAC prevents. The
//! MAC is checked in constant time (`verify_truncated_left`).

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// The ticket number, or the pass's session id.
    pub id: u64,
    /// Unix seconds when it was first issued.
    pub issued: u64,
}

/// Why a token was refused (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Malformed,
    WrongRoom,
    UnknownKey,
    BadMac,
}

impl Invalid {
    pub fn label(self) -> &'static str {
        match self {
            Invalid::Malformed => "malformed",
            Invalid::WrongRoom => "wrong_room",
            Invalid::UnknownKey => "unknown_key",
            Invalid::BadMac => "bad_mac",
        }
    }
}

/// The room's signing keys: the first signs, every one verifies (rotation).
#[derive(Clone)]
pub struct Keys(Vec<Vec<u8>>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} keys)", self.0.len())
    }
}

impl Keys {
    /// `keys` from the config, or one random key when there are none.
    pub fn new(keys: &[Vec<u8>]) -> Keys {
        if !keys.is_empty() {
            return Keys(keys.to_vec());
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
        Keys(vec![k])
    }

    fn mac(&self, index: usize) -> Option<HmacSha256> {
        // HMAC takes a key of any length: this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(self.0.get(index)?).ok()
    }

    pub fn sign(&self, room: &str, t: Token) -> String {
        let kind = match t.kind {
            Kind::Ticket => 't',
            Kind::Pass => 'p',
        };
        let body = format!("v1.{kind}.{room}.{:x}.{}.0", t.id, t.issued);
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
        let (Some("v1"), Some(kind), Some(r), Some(id), Some(issued), Some(kid), None) = (
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
            _ => return Err(Invalid::Malformed),
        };
        // Canonical numbers only, so one token has one spelling.
        let id = parse_hex(id).ok_or(Invalid::Malformed)?;
        let issued = parse_dec(issued).ok_or(Invalid::Malformed)?;
        // The signer's key index is checked for form only (see below).
        parse_dec(kid).ok_or(Invalid::Malformed)?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|_| Invalid::Malformed)?;
        if tag.len() != MAC_LEN {
            return Err(Invalid::Malformed);
        }
        // Every key verifies: the signer's index is not trusted (it is just "0" today), so a
        // rotation keeps old tokens valid until the old key is removed.
        let mut known = false;
        for i in 0..self.0.len() {
            let Some(mut mac) = self.mac(i) else { continue };
            known = true;
            mac.update(body.as_bytes());
            if mac.verify_truncated_left(&tag).is_ok() {
                if r != room {
                    return Err(Invalid::WrongRoom);
                }
                return Ok(Token { kind, id, issued });
            }
        }
        Err(if known {
            Invalid::BadMac
        } else {
            Invalid::UnknownKey
        })
    }
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
            },
        );
        let pass = s.replacen("v1.t.", "v1.p.", 1);
        assert_eq!(k.verify("drop", &pass), Err(Invalid::BadMac));
        let earlier = s.replacen(".384.", ".1.", 1);
        assert!(k.verify("drop", &earlier).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Flipped, dropped or inserted bytes anywhere: never accepted as another token.
        #[test]
        fn mutated_tokens_are_refused(id in any::<u64>(), issued in any::<u32>(),
                                      pos in any::<usize>(), byte in any::<u8>(), op in 0u8..3) {
            let k = keys();
            let t = Token { kind: Kind::Ticket, id, issued: u64::from(issued) };
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
