//! PROXY protocol v1/v2 on a listener: the address an L4 load balancer puts in front of the
//! stream is the client for everything after it (admission, logs, limits).
//!
//! The header is read before anything else, with exact reads: bytes after it belong to the
//! HTTP or TLS stream and must stay in the socket. v2 says its length up front (bounded here,
//! so a peer cannot make us allocate what it claims); v1 ends at CRLF within 107 bytes, found
//! by peeking and consuming only header bytes. Parsing is `ppp`'s; what we do with the result
//! is here.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocolVersion;

/// The v2 signature: 12 bytes no HTTP request or TLS record starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The shortest header of either version ("PROXY UNKNOWN\r\n"): reading this much first can
/// never take a byte that is not header.
const MIN_HEADER: usize = 15;
/// v1's longest header, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The longest v2 address-and-TLV block we accept. Addresses take at most 216 bytes (UNIX);
/// the rest is TLVs, which are parsed and ignored.
const V2_MAX_PAYLOAD: usize = 1024;

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// A proxied connection from this client.
    Client(SocketAddr),
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, or a non-IP family): served as the
    /// balancer itself.
    Local,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("PROXY protocol {0} is not accepted on this listener")]
    WrongVersion(&'static str),
    #[error("PROXY protocol v1 header longer than 107 bytes")]
    V1TooLong,
    #[error("PROXY protocol v2 header claims {0} bytes, over the 1024 accepted")]
    V2TooLong(usize),
    #[error("malformed PROXY protocol header")]
    Malformed,
    #[error("connection closed inside the PROXY protocol header")]
    Closed,
}

/// Reads the header off `s`, leaving the stream just past it.
pub async fn read_header(
    s: &mut TcpStream,
    accept: ProxyProtocolVersion,
) -> Result<Carried, HeaderError> {
    let mut buf = Vec::with_capacity(V1_MAX);
    buf.resize(MIN_HEADER, 0);
    s.read_exact(&mut buf)
        .await
        .map_err(|_| HeaderError::Closed)?;
    if buf.starts_with(&V2_SIGNATURE[..]) {
        if accept == ProxyProtocolVersion::V1 {
            return Err(HeaderError::WrongVersion("v2"));
        }
        let mut rest = [0u8; 1];
        s.read_exact(&mut rest)
            .await
            .map_err(|_| HeaderError::Closed)?;
        buf.push(rest[0]);
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(HeaderError::V2TooLong(len));
        }
        buf.resize(16 + len, 0);
        s.read_exact(&mut buf[16..])
            .await
            .map_err(|_| HeaderError::Closed)?;
        return parse_v2(&buf);
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(HeaderError::Missing);
    }
    if accept == ProxyProtocolVersion::V2 {
        return Err(HeaderError::WrongVersion("v1"));
    }
    // Up to the LF: peek, then consume only what is header. Whatever was peeked without an LF
    // is all header, so consuming it leaves the socket unreadable until more arrives (no spin).
    let mut peeked = [0u8; V1_MAX];
    while !buf.ends_with(b"\n") {
        let room = V1_MAX - buf.len();
        if room == 0 {
            return Err(HeaderError::V1TooLong);
        }
        let n = s
            .peek(&mut peeked[..room])
            .await
            .map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let take = peeked[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let start = buf.len();
        buf.resize(start + take, 0);
        s.read_exact(&mut buf[start..])
            .await
            .map_err(|_| HeaderError::Closed)?;
    }
    parse_v1(&buf)
}

/// A whole v1 header, CRLF included.
pub fn parse_v1(bytes: &[u8]) -> Result<Carried, HeaderError> {
    use ppp::v1::{Addresses, Header};
    let header = Header::try_from(bytes).map_err(|_| HeaderError::Malformed)?;
    Ok(match header.addresses {
        Addresses::Tcp4(a) => Carried::Client(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Carried::Client(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => Carried::Local,
    })
}

/// A whole v2 header: signature, fixed part and payload.
pub fn parse_v2(bytes: &[u8]) -> Result<Carried, HeaderError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|_| HeaderError::Malformed)?;
    if header.command == Command::Local {
        return Ok(Carried::Local);
    }
    // TLVs are walked (a malformed list fails the header) and otherwise ignored.
    if header.tlvs().any(|t| t.is_err()) {
        return Err(HeaderError::Malformed);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Carried::Client(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Carried::Client(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => Carried::Local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::proxy_protocol::encode;
    use proptest::prelude::*;

    fn local() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    #[test]
    fn round_trips_both_versions() {
        let c: SocketAddr = "203.0.113.7:5555".parse().unwrap();
        let v1 = encode(ProxyProtocolVersion::V1, Some(c), local());
        assert!(v1.starts_with(b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 8080\r\n"));
        assert_eq!(parse_v1(&v1), Ok(Carried::Client(c)));
        let v2 = encode(ProxyProtocolVersion::V2, Some(c), local());
        assert_eq!(parse_v2(&v2), Ok(Carried::Client(c)));
        let six: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let v2 = encode(ProxyProtocolVersion::V2, Some(six), local());
        assert_eq!(parse_v2(&v2), Ok(Carried::Client(six)));
        assert_eq!(
            parse_v2(&encode(ProxyProtocolVersion::V2, None, local())),
            Ok(Carried::Local)
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(Carried::Local));
        assert_eq!(
            parse_v1(b"PROXY TCP4 1.2.3.4\r\n"),
            Err(HeaderError::Malformed)
        );
    }

    proptest! {
        // Whatever a peer sends, parsing answers without panicking.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_v1(&bytes);
            let _ = parse_v2(&bytes);
            let mut v2 = V2_SIGNATURE.to_vec();
            v2.extend_from_slice(&bytes);
            let _ = parse_v2(&v2);
            let mut v1 = b"PROXY ".to_vec();
            v1.extend_from_slice(&bytes);
            let _ = parse_v1(&v1);
        }

        #[test]
        fn mutated_valid_headers_never_panic(
            flips in prop::collection::vec((0usize..64, any::<u8>()), 1..6),
            v in prop_oneof![Just(ProxyProtocolVersion::V1), Just(ProxyProtocolVersion::V2)],
        ) {
            let mut h = encode(v, Some("[2001:db8::1]:443".parse().unwrap()), "[::1]:80".parse().unwrap());
            for (i, b) in flips {
                let i = i % h.len();
                h[i] = b;
            }
            let _ = parse_v1(&h);
            let _ = parse_v2(&h);
        }
    }
}
