//! The real client behind the edge: trusted forwarding headers and PROXY protocol, on real
//! sockets. Per-client limits must follow the client the edge vouches for, and nothing a
//! client writes itself may pose as that.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Sends `req` on an open keep-alive connection and returns the status.
async fn status_on(s: &mut TcpStream, req: &str) -> u16 {
    s.write_all(req.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(WAIT, read_head(s))
        .await
        .unwrap()
        .unwrap();
    let status = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_peer_cannot_forge_forwarding_headers() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = "GET / HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-For: 1.2.3.4\r\n\
               X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Real-IP: 1.2.3.4\r\n\
               Forwarded: for=1.2.3.4\r\nX-Forwarded-Port: 443\r\n\r\n";
    assert_eq!(status_on(&mut s, req).await, 200);
    let seen = &origin.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com");
    for h in ["x-real-ip", "forwarded", "x-forwarded-port"] {
        assert!(seen.get(h).is_none(), "{h} reached the origin");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_names_the_client_and_limits_follow_it() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[http]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [admission]\nallow = []\nper_ip_request_rate = 1\nper_ip_request_burst = 2",
    ))
    .await;
    // One connection from the trusted terminator carries two clients' requests.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let req = |client: &str| {
        format!(
            "GET /{client} HTTP/1.1\r\nHost: shop.example.com\r\nX-Forwarded-For: 9.9.9.9, {client}\r\n\
             X-Forwarded-Proto: https\r\n\r\n"
        )
    };
    let mut a = Vec::new();
    let mut b = Vec::new();
    for _ in 0..3 {
        a.push(status_on(&mut s, &req("198.51.100.1")).await);
        b.push(status_on(&mut s, &req("198.51.100.2")).await);
    }
    // Each client has its own burst of 2; the third request of each is over it.
    assert_eq!(a, [200, 200, 429]);
    assert_eq!(b, [200, 200, 429]);
    let seen = &origin.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "9.9.9.9, 198.51.100.1, 127.0.0.1");
    // The terminator's proto is kept: no https → http redirect loop.
    assert_eq!(seen["x-forwarded-proto"], "https");
    proxy.stop().await;
}
