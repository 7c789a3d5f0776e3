//! The real client behind the edge: trusted forwarding headers and PROXY protocol, on real
//! sockets. Per-client limits must follow the client the edge vouches for, and nothing a
//! client writes itself may pose as that.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
               Forwarded: for=1.2.3.4\r\nX-Forwarded-Port: 443\r\nX-Request-ID: forged\r\n\r\n";
    assert_eq!(status_on(&mut s, req).await, 200);
    let seen = &origin.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com");
    for h in ["x-real-ip", "forwarded", "x-forwarded-port"] {
        assert!(seen.get(h).is_none(), "{h} reached the origin");
    }
    // A request id of our own, not the client's.
    let id = seen["x-request-id"].to_str().unwrap();
    assert!(id != "forged" && id.len() == 32, "{id}");
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
             X-Forwarded-Proto: https\r\nX-Request-ID: rid-{client}\r\n\r\n"
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
    // The terminator's request id is kept, so its logs and ours name the same request.
    assert_eq!(seen["x-request-id"], "rid-198.51.100.1");
    // The terminator's proto is kept: no https → http redirect loop.
    assert_eq!(seen["x-forwarded-proto"], "https");
    proxy.stop().await;
}

/// A v2 header (as HAProxy writes it) for an IPv4 TCP client, or LOCAL when `src` is None.
fn v2(src: Option<([u8; 4], u16)>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match src {
        Some((ip, port)) => {
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&ip);
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&port.to_be_bytes());
            h.extend_from_slice(&443u16.to_be_bytes());
        }
        None => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    h
}

async fn proxied_proxy(origin: std::net::SocketAddr) -> Proxy {
    let toml = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = \"any\"\n\
         proxy_protocol_from = [\"127.0.0.2\"]\nproxy_protocol_timeout = \"1s\"\n\
         [admission]\nallow = []\nper_ip_max_connections = 1\n\
         [upstreams.app]\nservers = [\"{origin}\"]\n"
    );
    Proxy::start(&toml).await
}

/// Sends a header then a request from the balancer's address; the status, or None if cut.
async fn via_balancer(addr: std::net::SocketAddr, header: &[u8]) -> (TcpStream, Option<u16>) {
    let mut s = connect_from("127.0.0.2", addr).await.unwrap();
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(b"GET /pp HTTP/1.1\r\nHost: x\r\n\r\n");
    if s.write_all(&bytes).await.is_err() {
        return (s, None);
    }
    let head = tokio::time::timeout(WAIT, read_head(&mut s)).await;
    let status = head
        .ok()
        .and_then(|h| h.ok())
        .and_then(|h| h.get(9..12).and_then(|c| c.parse().ok()));
    (s, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_client_for_admission_and_headers() {
    let origin = echo_origin().await;
    let proxy = proxied_proxy(origin.addr).await;

    // v1 and v2 from the trusted balancer: served, and the origin sees the carried client.
    let (_a, st) = via_balancer(proxy.addr, b"PROXY TCP4 203.0.113.1 127.0.0.1 5000 443\r\n").await;
    assert_eq!(st, Some(200));
    let (_b, st) = via_balancer(proxy.addr, &v2(Some(([203, 0, 113, 2], 5001)))).await;
    assert_eq!(st, Some(200));
    let seen = origin.requests();
    assert_eq!(seen[0].headers["x-forwarded-for"], "203.0.113.1");
    assert_eq!(seen[1].headers["x-forwarded-for"], "203.0.113.2");

    // Per-client limits follow the carried address: 203.0.113.1 already holds its one
    // connection (`_a`), so a second is refused, while a new address is admitted.
    let (_c, st) = via_balancer(proxy.addr, b"PROXY TCP4 203.0.113.1 127.0.0.1 5002 443\r\n").await;
    assert_eq!(st, None, "a second connection for a capped client");
    let (_d, st) = via_balancer(proxy.addr, &v2(Some(([203, 0, 113, 3], 5003)))).await;
    assert_eq!(st, Some(200));

    // The balancer's own health check (v2 LOCAL) is served, and the balancer is not capped
    // as a client: two at once.
    let (_e, st) = via_balancer(proxy.addr, &v2(None)).await;
    assert_eq!(st, Some(200));
    let (_f, st) = via_balancer(proxy.addr, &v2(None)).await;
    assert_eq!(st, Some(200));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_refuses_strangers_bad_and_slow_headers() {
    let origin = echo_origin().await;
    let proxy = proxied_proxy(origin.addr).await;

    // A header from outside proxy_protocol_from would let anyone pose as any client.
    let mut s = connect_from("127.0.0.3", proxy.addr).await.unwrap();
    let _ = s
        .write_all(
            b"PROXY TCP4 203.0.113.1 127.0.0.1 5000 443\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "a stranger was served");

    for (bytes, what) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], "no header"),
        (&b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n"[..], "malformed v1"),
        (&b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 and then far too much text to be a header at all, past 107 bytes\r\n"[..], "over-long v1"),
        (&b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff"[..], "v2 claiming 64 KiB"),
    ] {
        let (_s, st) = via_balancer(proxy.addr, bytes).await;
        assert_eq!(st, None, "{what} was served");
    }

    // Half a header, then silence: cut at proxy_protocol_timeout (1 s).
    let started = std::time::Instant::now();
    let mut s = connect_from("127.0.0.2", proxy.addr).await.unwrap();
    s.write_all(b"PROXY TCP4 203.0.113.9").await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "a stalled header held the connection");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(origin.requests().is_empty());
    assert_eq!(
        proxy
            .admission
            .stats
            .rejected_proxy_source
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    proxy.stop().await;
}

/// An origin behind `send_proxy_protocol`: reads the PROXY header, records what it carried,
/// then serves HTTP/1.1 on the rest of the stream.
async fn pp_origin() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<String>>>,
    Arc<AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let accepts = Arc::new(AtomicUsize::new(0));
    let (s2, a2) = (seen.clone(), accepts.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            a2.fetch_add(1, Ordering::SeqCst);
            let seen = s2.clone();
            tokio::spawn(async move {
                let carried = breakwater::listener::proxy_protocol::read_header(
                    &mut stream,
                    breakwater::config::ProxyProtocolVersion::Any,
                )
                .await;
                seen.lock().unwrap().push(format!("{carried:?}"));
                if carried.is_err() {
                    return;
                }
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(full("behind pp")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen, accepts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_protocol_names_each_requests_client_to_the_origin() {
    let (origin, seen, accepts) = pp_origin().await;
    let toml = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[admission]\nallow = []\n\
         [upstreams.app]\nservers = [\"{origin}\"]\nsend_proxy_protocol = \"v1\"\npool_max = 2\n\
         [upstreams.app.health]\npath = \"/health\"\ninterval = \"100ms\"\n"
    );
    let proxy = Proxy::start(&toml).await;
    for src in ["127.0.0.5", "127.0.0.6", "127.0.0.5"] {
        assert_eq!(try_get_from(src, proxy.addr).await, Some(200), "{src}");
    }
    // Wait for one active health check, which must speak PROXY protocol too (LOCAL).
    assert!(
        eventually(WAIT, || seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.contains("Local")))
        .await
    );
    let seen = seen.lock().unwrap().clone();
    let clients: Vec<&String> = seen.iter().filter(|s| s.contains("Client")).collect();
    assert_eq!(clients.len(), 3, "{seen:?}");
    assert!(clients[0].contains("127.0.0.5:"), "{seen:?}");
    assert!(clients[1].contains("127.0.0.6:"), "{seen:?}");
    assert!(clients[2].contains("127.0.0.5:"), "{seen:?}");
    // Private connections: one per request, none shared between clients, no warm ones.
    assert!(accepts.load(Ordering::SeqCst) >= 3);
    assert!(!seen.iter().any(|s| s.contains("Err")), "{seen:?}");
    proxy.stop().await;
}
