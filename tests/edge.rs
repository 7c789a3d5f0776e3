//! HTTP correctness at the edge, tried as an attacker would: raw requests on real sockets
//! against the whole proxy, and origins that record what reached them.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hyper::{Request, Response};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// Two upstreams: `/api` and `/admin` on their own origins, `/files` (encoded slashes allowed)
/// on the api origin, and hosts routed by name.
async fn two_route_proxy() -> (Origin, Origin, Proxy) {
    let api = echo_origin().await;
    let adm = echo_origin().await;
    let toml = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         [upstreams.app]\nservers = [\"{}\"]\npool_min_idle = 1\n\
         [upstreams.adm]\nservers = [\"{}\"]\npool_min_idle = 1\n\
         [[routes]]\npath_prefix = \"/api\"\nupstream = \"app\"\n\
         [[routes]]\npath_prefix = \"/admin\"\nupstream = \"adm\"\n\
         [[routes]]\npath_prefix = \"/files\"\nupstream = \"app\"\nallow_encoded_slashes = true\n\
         [[routes]]\nhost = \"shop.example.com\"\npath_prefix = \"/\"\nupstream = \"app\"\n",
        api.addr, adm.addr
    );
    let proxy = Proxy::start(&toml).await;
    (api, adm, proxy)
}

fn get_req(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_duplicate_or_invalid_host_is_400() {
    let (api, adm, proxy) = two_route_proxy().await;
    let cases: [(&[u8], &str); 5] = [
        (b"GET /api/x HTTP/1.1\r\nConnection: close\r\n\r\n", "no Host"),
        (
            b"GET /api/x HTTP/1.1\r\nHost: a\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
            "two Hosts",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: shop.example.com:x@evil.test\r\nConnection: close\r\n\r\n",
            "userinfo trick in Host",
        ),
        (
            b"GET http://user@shop.example.com/ HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
            "userinfo in an absolute target",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: shop example\r\nConnection: close\r\n\r\n",
            "space in Host",
        ),
    ];
    for (req, what) in cases {
        assert_eq!(raw_status(proxy.addr, req, WAIT).await, Some(400), "{what}");
    }
    assert!(api.requests().is_empty() && adm.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_routed_and_forwarded_in_one_canonical_form() {
    let (api, _adm, proxy) = two_route_proxy().await;
    let req = get_req("/x", "Host: SHOP.Example.com.:8080\r\n");
    assert_eq!(raw_status(proxy.addr, &req, WAIT).await, Some(200));
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    let req = get_req("http://shop.example.com/y", "Host: elsewhere.test\r\n");
    assert_eq!(raw_status(proxy.addr, &req, WAIT).await, Some(200));
    let seen = api.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers["host"], "shop.example.com:8080");
    assert_eq!(seen[0].headers["x-forwarded-host"], "shop.example.com:8080");
    assert_eq!(seen[1].headers["host"], "shop.example.com");
    assert_eq!(seen[1].headers.get_all("host").iter().count(), 1);
    assert_eq!(seen[1].uri, "/y");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalised_matched_on_segments_and_forwarded_as_matched() {
    let (api, adm, proxy) = two_route_proxy().await;
    let h = "Host: x\r\n";
    // (target, status, which origin should see it, the path it should see)
    type Case<'a> = (&'a str, u16, Option<(&'a Origin, &'a str)>);
    let cases: [Case; 12] = [
        ("/api/../internal", 404, None),
        ("/api/%2e%2e/internal", 400, None),
        ("/api/%2E/internal", 400, None),
        ("/api/..;/admin", 400, None),
        ("/api-internal", 404, None),
        ("/api/a%2Fb", 400, None),
        ("/api/a%00", 400, None),
        ("//admin", 200, Some((&adm, "/admin"))),
        ("/%61dmin/x", 200, Some((&adm, "/admin/x"))),
        ("/api/x/../y?q=1", 200, Some((&api, "/api/y?q=1"))),
        ("/api", 200, Some((&api, "/api"))),
        ("/files/a%2fb", 200, Some((&api, "/files/a%2Fb"))),
    ];
    for (target, status, seen) in cases {
        let before = (api.requests().len(), adm.requests().len());
        let got = raw_status(proxy.addr, &get_req(target, h), WAIT).await;
        assert_eq!(got, Some(status), "{target}");
        match seen {
            None => assert_eq!(
                (api.requests().len(), adm.requests().len()),
                before,
                "{target} reached an origin"
            ),
            Some((o, path)) => assert_eq!(o.requests().last().unwrap().uri, path, "{target}"),
        }
    }
    // A backslash never reaches routing: 400 from the parser or from the normaliser.
    let got = raw_status(proxy.addr, &get_req("/api\\..\\internal", h), WAIT).await;
    assert_eq!(got, Some(400));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_405_and_reaches_no_origin() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    for req in [
        &b"CONNECT /x HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"CONNECT shop.example.com:443 HTTP/1.1\r\nHost: shop.example.com:443\r\n\r\n"[..],
    ] {
        let text = raw(proxy.addr, req, Duration::from_secs(2)).await;
        assert!(text.starts_with("HTTP/1.1 405"), "{text}");
        assert!(text.to_ascii_lowercase().contains("allow: get"), "{text}");
    }
    assert!(origin.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_websocket_upgrades_are_stripped_and_use_the_pool() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..30 {
        let req = format!(
            "GET /u/{i} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.unwrap();
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 30);
    for r in &seen {
        assert!(r.headers.get("upgrade").is_none(), "{:?}", r.headers);
        assert!(r.headers.get("http2-settings").is_none());
    }
    // The default warm pool, not a connection per upgrade-looking request.
    assert!(
        origin.accepts() <= 8,
        "origin accepted {}",
        origin.accepts()
    );
    proxy.stop().await;
}

const WS_HANDSHAKE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// An origin that completes WebSocket handshakes (when `accept`) and echoes bytes.
async fn ws_origin(accept: bool) -> Origin {
    origin(Arc::new(move |mut req| {
        Box::pin(async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket");
            if accept {
                r = r.header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
            }
            r.body(full("")).unwrap()
        })
    }))
    .await
}

async fn open_tunnel(addr: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(WS_HANDSHAKE).await.unwrap();
    let head = tokio::time::timeout(WAIT, read_head(&mut s))
        .await
        .unwrap()
        .unwrap();
    (s, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_without_a_websocket_accept_is_502() {
    let origin = ws_origin(false).await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let (_s, head) = open_tunnel(proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_hold_their_admission_slots_are_capped_counted_and_cut_at_shutdown() {
    let origin = ws_origin(true).await;
    let extra = "[http]\nshutdown_timeout = \"1s\"\n\
                 [admission]\nallow = []\nper_ip_max_connections = 4\n\
                 [admin]\naddr = \"127.0.0.1:0\"";
    let toml = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n{extra}\n\
         [upstreams.app]\nservers = [\"{}\"]\npool_min_idle = 1\nmax_tunnels = 3\nmax_client_share = 1.0\n",
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let (mut s, head) = open_tunnel(proxy.addr).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"ping");
        tunnels.push(s);
    }
    // The fourth tunnel is over max_tunnels.
    let (s, head) = open_tunnel(proxy.addr).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    drop(s);
    // The three tunnels still hold three of this address's four connection slots.
    assert!(
        eventually(WAIT, || proxy.admission.open_connections() == 3).await,
        "open connections: {}",
        proxy.admission.open_connections()
    );
    let fourth = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(
        eventually(WAIT, || proxy.admission.open_connections() == 4).await,
        "the fourth connection should be admitted"
    );
    assert_eq!(try_get_from("127.0.0.1", proxy.addr).await, None);
    drop(fourth);

    let metrics = send(
        proxy.admin.unwrap(),
        request("GET", proxy.admin.unwrap(), "/metrics", full("")),
    )
    .await
    .text();
    assert!(
        metrics.contains("breakwater_tunnels_open{upstream=\"app\"} 3"),
        "{metrics}"
    );

    // Shutdown: the tunnels are cut once the 1 s grace is over, not held open for good.
    let started = std::time::Instant::now();
    let _ = proxy.stop().await;
    for mut s in tunnels {
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(WAIT, s.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "tunnel still open");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_content_length_is_dropped_when_the_body_was_chunked() {
    let origin = raw_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
          10\r\n0123456789abcdef\r\n0\r\n\r\n",
        Duration::from_secs(1),
    )
    .await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let text = raw(proxy.addr, &get_req("/", "Host: x\r\n"), WAIT).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length: 5"),
        "{head}"
    );
    // Whatever the framing now, the client reads all 16 bytes as this response's body.
    assert!(
        body.contains("0123456789abcdef") || body == "0123456789abcdef",
        "{body:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_bodies_are_400_not_408() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let overflow = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                     ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n";
    let bare_lf = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\nhello\r\n0\r\n\r\n";
    for (req, what) in [
        (&overflow[..], "chunk-size overflow"),
        (&bare_lf[..], "bare LF"),
    ] {
        let text = raw(proxy.addr, req, Duration::from_secs(3)).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{what}: {text}");
    }
    assert!(origin.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_http2_cookies_reach_an_http1_origin_joined() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(format!("http://{}/c", proxy.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let seen = &origin.requests()[0];
    assert_eq!(seen.headers.get_all("cookie").iter().count(), 1);
    assert_eq!(seen.headers["cookie"], "a=1; b=2");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_looped_back_is_508() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[http]\nvia_name = \"edge-1\"")).await;
    let req = get_req("/", "Host: x\r\nVia: 1.1 cdn, 1.1 edge-1\r\n");
    assert_eq!(raw_status(proxy.addr, &req, WAIT).await, Some(508));
    let req = get_req("/", "Host: x\r\nVia: 1.1 edge-2\r\n");
    assert_eq!(raw_status(proxy.addr, &req, WAIT).await, Some(200));
    assert_eq!(origin.requests().len(), 1);
    assert_eq!(
        origin.requests()[0].headers["via"],
        "1.1 edge-2, 1.1 edge-1"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_deny_entries_more_specific_than_the_prefix_match() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this machine; skipped");
        return;
    }
    let origin = echo_origin().await;
    for deny in ["::1", "::1/128", "::/56"] {
        let toml = format!(
            "[[listeners]]\naddr = \"[::1]:0\"\n[admission]\nallow = []\ndeny = [\"{deny}\"]\n\
             [upstreams.app]\nservers = [\"{}\"]\n",
            origin.addr
        );
        let proxy = Proxy::start(&toml).await;
        let status = raw_status(proxy.addr, &get_req("/", "Host: x\r\n"), WAIT).await;
        assert_eq!(status, None, "deny = [{deny:?}] let ::1 in");
        proxy.stop().await;
    }
    // And a deny elsewhere lets ::1 through.
    let toml = format!(
        "[[listeners]]\naddr = \"[::1]:0\"\n[admission]\nallow = []\ndeny = [\"2001:db8::/56\"]\n\
         [upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    let status = raw_status(proxy.addr, &get_req("/", "Host: x\r\n"), WAIT).await;
    assert_eq!(status, Some(200));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_cuts_slow_heads_and_caps_connections() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[admin]\naddr = \"127.0.0.1:0\"")).await;
    let admin = proxy.admin.unwrap();
    // A partial head is cut at the 5 s header timeout.
    let mut slow = TcpStream::connect(admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Pad: ")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let r = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "a partial admin head was held for 15 s");
    assert!(started.elapsed() >= Duration::from_secs(4));

    // 50 idle connections: beyond the cap they are closed at once.
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..50 {
        // A reset can already be there when connect() reports back.
        match TcpStream::connect(admin).await {
            Ok(s) => held.push(s),
            Err(_) => closed += 1,
        }
    }
    for s in &mut held {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert!(closed >= 50 - 32, "only {closed} of 50 were refused");
    drop(held);
    // Once they are gone, the admin port serves again.
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            let req = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
            raw_status(admin, req, WAIT).await == Some(200)
        })
        .await,
        "the admin port did not serve again"
    );
    proxy.stop().await;
}
