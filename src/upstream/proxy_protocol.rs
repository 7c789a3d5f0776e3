//! The PROXY protocol header Breakwater sends an origin on a connection opened for one client
//! (`send_proxy_protocol`). Parsing the header a balancer sends us is `listener::proxy_protocol`.

use std::net::SocketAddr;

use crate::config::ProxyProtocolVersion;

/// The header Breakwater sends an origin for a connection opened on behalf of `client`
/// (`None`: a warm connection that no client caused, sent as LOCAL / UNKNOWN).
pub fn encode(
    version: ProxyProtocolVersion,
    client: Option<SocketAddr>,
    local: SocketAddr,
) -> Vec<u8> {
    // Both ends must be the same family; an IPv4 client reaching an IPv6 socket is written as
    // its mapped form.
    let pair = client.map(|c| match (c, local) {
        (SocketAddr::V4(c), SocketAddr::V6(_)) => {
            (SocketAddr::from((c.ip().to_ipv6_mapped(), c.port())), local)
        }
        (SocketAddr::V6(_), SocketAddr::V4(l)) => {
            (c, SocketAddr::from((l.ip().to_ipv6_mapped(), l.port())))
        }
        _ => (c, local),
    });
    match version {
        ProxyProtocolVersion::V1 => match pair {
            Some(p) => format!("{}\r\n", ppp::v1::Addresses::from(p)).into_bytes(),
            None => b"PROXY UNKNOWN\r\n".to_vec(),
        },
        ProxyProtocolVersion::V2 | ProxyProtocolVersion::Any => {
            use ppp::v2::{Builder, Command, Protocol, Version};
            let built = match pair {
                Some(p) => Builder::with_addresses(
                    Version::Two | Command::Proxy,
                    Protocol::Stream,
                    ppp::v2::Addresses::from(p),
                )
                .build(),
                None => Builder::with_addresses(
                    Version::Two | Command::Local,
                    Protocol::Unspecified,
                    ppp::v2::Addresses::Unspecified,
                )
                .build(),
            };
            // Building from typed addresses cannot fail; an empty header would be refused by
            // the origin rather than misread.
            built.unwrap_or_default()
        }
    }
}
