//! Who a connection or a request comes from, worked out once and passed along by value.
//!
//! The client is not always the TCP peer: behind an L4 load balancer speaking PROXY protocol it
//! is the address the header carries, and behind a trusted TLS terminator it is the rightmost
//! untrusted `X-Forwarded-For` entry. Every per-client limit (admission, the per-client request
//! rate, the fair queue, `max_client_share`, tunnels) reads this, never the socket.

use std::net::{IpAddr, SocketAddr};

/// A client as the limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The TCP peer: the client itself, or the load balancer / proxy in front of it.
    pub peer: SocketAddr,
    /// The client's address: the peer's, or what a trusted PROXY header or forwarding header
    /// carries.
    pub addr: IpAddr,
    /// What per-client limits count under: `addr` with IPv6 grouped by prefix.
    pub key: ClientKey,
    /// The address the client reached (the listener's), for a PROXY header sent upstream.
    pub local: SocketAddr,
}

/// What the proxy asks of admission for each request, handed to it at wiring time so that the
/// proxy stage does not reach back up the flow: admission implements it.
pub trait RequestGate: Send + Sync + std::fmt::Debug {
    /// The client a trusted proxy names (`addr`), reached through `peer`: keyed and checked
    /// against the allow list as admission keys a connection.
    fn client(&self, peer: SocketAddr, addr: IpAddr) -> Client;
    /// Whether `client` may send one more request now (`[admission] request_rate`).
    fn check_request(&self, client: &Client) -> bool;
}

/// The identity a per-client limit applies to, and whether the allow list exempts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub ip: IpAddr,
    /// On `[admission] allow`: not rate-limited or capped per client.
    pub exempt: bool,
}

impl Client {
    /// The client at `addr` reached through `peer`, keyed with `ipv6_prefix` grouping.
    pub fn new(peer: SocketAddr, addr: IpAddr, ipv6_prefix: u8, exempt: bool) -> Client {
        Client {
            peer,
            addr: unmapped(addr),
            key: ClientKey {
                ip: client_key(addr, ipv6_prefix),
                exempt,
            },
            local: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// The address itself, with IPv4-mapped IPv6 read as the IPv4 address it carries.
pub fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The identity a limit applies to: IPv4-mapped IPv6 is the IPv4 address, and IPv6 is grouped
/// by `prefix` bits, or one host with a /64 could mint unlimited keys.
pub fn client_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match unmapped(ip) {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if prefix >= 128 {
                u128::MAX
            } else {
                !(u128::MAX >> prefix)
            };
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_grouped_and_mapped_ipv4_unwrapped() {
        let a = client_key("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = client_key("2001:db8:1:2:bbbb::9".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(
            client_key("::ffff:127.0.0.5".parse().unwrap(), 64),
            "127.0.0.5".parse::<IpAddr>().unwrap()
        );
        let c = Client::new(
            "[::ffff:127.0.0.5]:9".parse().unwrap(),
            "::ffff:127.0.0.5".parse().unwrap(),
            64,
            false,
        );
        assert_eq!(c.addr, "127.0.0.5".parse::<IpAddr>().unwrap());
    }
}
