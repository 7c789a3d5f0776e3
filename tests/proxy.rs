//! End-to-end: a client, Breakwater, and an origin, all on loopback.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_post_through_the_proxy() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;

    let got = get(proxy.addr, "/hello?x=1").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "GET /hello?x=1");

    let got = send(
        proxy.addr,
        request("POST", proxy.addr, "/submit", full("order=42")),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "order=42");
    assert_eq!(origin.requests()[1].method, "POST");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_removed_and_forwarding_headers_set() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[http]\nvia_name = \"edge-1\"")).await;
    let req = Request::builder()
        .uri("/h")
        .header("host", "shop.example.com")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-app", "kept")
        .body(full(""))
        .unwrap();
    let got = send(proxy.addr, req).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["via"], "1.1 edge-1");

    let seen = &origin.requests()[0].headers;
    for h in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "proxy-connection",
    ] {
        assert!(seen.get(h).is_none(), "{h} reached the origin");
    }
    assert_eq!(seen["x-app"], "kept");
    assert_eq!(seen["host"], "shop.example.com");
    // From an untrusted peer the client's own X-Forwarded-For is replaced, not extended.
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com");
    assert_eq!(seen["via"], "1.1 edge-1");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_prefix_404_otherwise() {
    let (a, b, c) = (
        text_origin("a").await,
        text_origin("b").await,
        text_origin("c").await,
    );
    let toml = format!(
        r#"
[upstreams.a]
servers = ["{}"]
[upstreams.b]
servers = ["{}"]
[upstreams.c]
servers = ["{}"]

[[routes]]
host = "shop.example.com"
upstream = "a"
[[routes]]
host = "shop.example.com"
path_prefix = "/api"
upstream = "b"
[[routes]]
host = "*.cdn.example.com"
path_prefix = "/static/"
upstream = "c"
"#,
        a.addr, b.addr, c.addr
    );
    let proxy = Proxy::start(&toml).await;
    let at = |host: &'static str, path: &'static str| {
        let addr = proxy.addr;
        async move {
            let req = Request::builder()
                .uri(path)
                .header("host", host)
                .body(full(""))
                .unwrap();
            let got = send(addr, req).await;
            (got.status, got.text())
        }
    };
    assert_eq!(at("shop.example.com", "/").await, (200, "a".into()));
    assert_eq!(
        at("SHOP.example.com:8080", "/api/items").await,
        (200, "b".into())
    );
    assert_eq!(
        at("img.cdn.example.com", "/static/x.png").await,
        (200, "c".into())
    );
    let (status, body) = at("other.example.com", "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("no route"), "{body}");
    assert_eq!(at("img.cdn.example.com", "/other").await.0, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_never_reaches_the_host_it_names() {
    let app = text_origin("app").await;
    let victim = text_origin("victim").await;
    let toml = format!(
        "[upstreams.app]\nservers = [\"{}\"]\n[[routes]]\nhost = \"shop.example.com\"\nupstream = \"app\"\n",
        app.addr
    );
    let proxy = Proxy::start(&toml).await;
    // Asks for the victim by name: no route matches it, so 404, and the victim sees nothing.
    let req = format!(
        "GET http://{v}/steal HTTP/1.1\r\nHost: {v}\r\nConnection: close\r\n\r\n",
        v = victim.addr
    );
    let out = raw(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    // Names a routed host with a Host header that points elsewhere: goes to the app.
    let req = format!(
        "GET http://shop.example.com/x HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        victim.addr
    );
    let out = raw(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("app"),
        "{out}"
    );
    assert_eq!(app.requests()[0].uri, "/x", "origin gets origin-form");
    assert_eq!(app.requests()[0].headers["host"], "shop.example.com");
    assert_eq!(victim.accepts(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gets_431_and_malformed_request_400() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[http]\nmax_header_bytes = 8192")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let out = raw(proxy.addr, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");

    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    let out = raw(
        proxy.addr,
        b"\x16\x03\x01garbage\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    // Still serving after all that.
    assert_eq!(get(proxy.addr, "/ok").await.status, 200);
    assert_eq!(origin.requests().len(), 1);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_header_timeout_but_idle_keepalive_is_not() {
    let origin = echo_origin().await;
    let extra = "[http]\nheader_read_timeout = \"600ms\"\nidle_timeout = \"3s\"";
    let proxy = Proxy::start(&config_for(origin.addr, extra)).await;

    // A head trickled one byte every 200 ms never completes: closed near 600 ms.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_at = None;
    for b in head.iter() {
        if s.write_all(&[*b]).await.is_err() {
            closed_at = Some(start.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
        {
            closed_at = Some(start.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("slowloris connection was never closed");
    assert!(
        closed_at >= Duration::from_millis(500) && closed_at < Duration::from_millis(2000),
        "{closed_at:?}"
    );

    // A kept-alive connection idle for longer than the header timeout survives until idle_timeout.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let r = tx
        .send_request(request("GET", proxy.addr, "/1", full("")))
        .await
        .unwrap();
    collect(r).await;
    // The scenario itself: idle past the header timeout (1 s), within idle_timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = tx
        .send_request(request("GET", proxy.addr, "/2", full("")))
        .await
        .unwrap();
    assert_eq!(collect(r).await.text(), "GET /2");
    let idle_start = Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("idle connection closed");
    let idle = idle_start.elapsed();
    assert!(
        idle >= Duration::from_millis(2500) && idle < Duration::from_secs(6),
        "{idle:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_is_502_and_silent_origin_is_504() {
    let dead = dead_addr();
    let proxy = Proxy::start(&config_for(dead, "")).await;
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, 502);
    assert!(got.text().contains("unreachable"), "{}", got.text());
    proxy.stop().await;

    let silent = raw_origin(b"", Duration::from_secs(30)).await;
    let toml = format!(
        "[upstreams.app]\nservers = [\"{}\"]\nresponse_timeout = \"500ms\"\n",
        silent.addr
    );
    let proxy = Proxy::start(&toml).await;
    let start = Instant::now();
    let got = get(proxy.addr, "/").await;
    assert_eq!(got.status, 504);
    assert!(start.elapsed() < Duration::from_secs(3));
    proxy.stop().await;
}

/// The response deadline sits on a timer the pooled connection keeps from one exchange to the
/// next (`timer.rs`), set for an earlier request: a slow request after a quick one must still
/// get its whole response_timeout, counted from its own start, then 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_reused_connection_gets_its_own_response_timeout() {
    let origin = origin(Arc::new(|req| {
        Box::pin(async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Response::new(full("ok"))
        })
    }))
    .await;
    let toml = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\"]\n\
         pool_max = 1\npool_min_idle = 0\nresponse_timeout = \"600ms\"\n",
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    // The timer of the connection's first exchange is set to fire 600 ms after it; the slow
    // request comes 300 ms later (the timer fires first) and then 1.5 s later (it has fired).
    for pause in [Duration::from_millis(300), Duration::from_millis(1500)] {
        assert_eq!(get(proxy.addr, "/").await.status, 200);
        tokio::time::sleep(pause).await;
        let start = Instant::now();
        let got = get(proxy.addr, "/slow").await;
        let took = start.elapsed();
        assert_eq!(got.status, 504, "after a pause of {pause:?}");
        assert!(
            took >= Duration::from_millis(580) && took < Duration::from_secs(3),
            "504 after {took:?} (pause {pause:?})"
        );
    }
    // Each slow request went on the connection of the quick one before it, and cost it: two
    // connections for four requests.
    assert_eq!(origin.requests().len(), 4);
    assert_eq!(origin.accepts(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_origin_responses_become_502() {
    let cases: [&'static [u8]; 4] = [
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nbroken\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-a-little",
    ];
    for case in cases {
        let origin = raw_origin(case, Duration::ZERO).await;
        let proxy = Proxy::start(&config_for(origin.addr, "")).await;
        let out = raw(
            proxy.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 502"),
            "case {:?} gave {out}",
            String::from_utf8_lossy(case)
        );
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_dying_mid_body_leaves_a_visibly_incomplete_response() {
    // Far more than the prefetch window, then the origin vanishes.
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move {
            let (mut tx, body) = http_body_util::channel::Channel::<
                Bytes,
                Box<dyn std::error::Error + Send + Sync>,
            >::new(4);
            tokio::spawn(async move {
                for _ in 0..20 {
                    if tx
                        .send_data(Bytes::from(vec![b'x'; 16 * 1024]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                tx.abort(Box::new(std::io::Error::other("origin crashed")));
            });
            Response::builder()
                .header("content-length", "10000000")
                .body(body.boxed())
                .unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let mut tx = client(proxy.addr).await;
    let resp = tx
        .send_request(request("GET", proxy.addr, "/big", full("")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let result = resp.into_body().collect().await;
    assert!(result.is_err(), "a truncated body must not look complete");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_prior_knowledge_client() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[http]\nvia_name = \"edge-1\"")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut handles = Vec::new();
    for i in 0..20 {
        let mut tx = tx.clone();
        let uri = format!("http://{}/stream/{i}", proxy.addr);
        handles.push(tokio::spawn(async move {
            let req = Request::builder().uri(uri).body(full("")).unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.version(), hyper::Version::HTTP_2);
            collect(resp).await.text()
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), format!("GET /stream/{i}"));
    }
    let seen = origin.requests();
    assert_eq!(seen[0].headers["via"], "2 edge-1");
    assert_eq!(seen[0].headers["host"], proxy.addr.to_string());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_round_trip() {
    // The origin switches protocols and then echoes bytes upper-cased.
    let origin = origin(Arc::new(|mut req| {
        Box::pin(async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut io = hyper_util::rt::TokioIo::new(up);
                let mut buf = [0u8; 64];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                .body(full(""))
                .unwrap()
        })
    }))
    .await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in ["hello", "again"] {
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, msg.to_ascii_uppercase().as_bytes());
    }
    assert_eq!(origin.requests()[0].headers["upgrade"], "websocket");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_client_connections_share_a_few_origin_connections() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    for i in 0..200 {
        let got = get(proxy.addr, &format!("/{i}")).await;
        assert_eq!(got.status, 200);
    }
    assert_eq!(origin.requests().len(), 200);
    // The warm pool (8 by default) plus at most a couple more.
    assert!(
        origin.accepts() <= 10,
        "origin accepted {} connections for 200 requests",
        origin.accepts()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_pooled_connection_is_retried_for_idempotent_requests() {
    // The origin closes every connection after one response, without saying so: the second
    // request meets a pooled connection that is already gone.
    let origin = raw_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        Duration::ZERO,
    )
    .await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    for _ in 0..10 {
        let got = get(proxy.addr, "/").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "ok");
    }
    proxy.stop().await;
}

/// Every pooled connection goes stale at once (as when an origin restarts): each answers its
/// first request and drops the next one unanswered. With both pooled connections used, the
/// next request meets two stale ones before a new connection answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_meets_another_stale_connection_tries_again() {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Connections that carried a request (the health check only connects).
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = served.clone();
    let origin = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                // A connection closed before a whole head (the health check's) counts nothing.
                if !read_head(&mut s)
                    .await
                    .is_ok_and(|h| h.ends_with("\r\n\r\n"))
                {
                    return;
                }
                counted.fetch_add(1, SeqCst);
                // Slow enough that two requests at once hold both connections.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // The next request's first bytes: dropped without an answer.
                let _ = s.read(&mut [0u8; 64]).await;
            });
        }
    });
    // One client may hold both connections (the pool share would keep it to one).
    let proxy = Proxy::start(&format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n[runtime]\nexpress_connections = 0\n\
         [upstreams.app]\nservers = [\"{addr}\"]\npool_min_idle = 2\npool_max = 2\n\
         pool_share_exempt = [\"127.0.0.1/32\"]\n"
    ))
    .await;
    // The warm pool's two connections open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, b) = tokio::join!(get(proxy.addr, "/a"), get(proxy.addr, "/b"));
    for got in [a, b] {
        assert_eq!((got.status, got.text().as_str()), (200, "ok"));
    }
    let retries = || proxy.metric("breakwater_upstream_retries_total{upstream=\"app\"}");
    assert_eq!((served.load(SeqCst), retries()), (2, 0.0));
    // Both are stale now: the next request meets one, usually the other too (the pool's
    // refill, 4 times a second, can put a new connection in between), then a new connection.
    // With one retry only, meeting both was a 502.
    let got = get(proxy.addr, "/c").await;
    assert_eq!((got.status, got.text().as_str()), (200, "ok"));
    assert_eq!(served.load(SeqCst), 3);
    assert!((1.0..=2.0).contains(&retries()), "{} retries", retries());
    proxy.stop().await;
    origin.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_completes_the_in_flight_request() {
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            Response::new(full("finished"))
        })
    }))
    .await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let addr = proxy.addr;
    let inflight = tokio::spawn(async move { get(addr, "/slow").await });
    assert!(eventually(Duration::from_secs(5), || origin.requests().len() == 1).await);
    let outcome = proxy.stop().await;
    assert_eq!(outcome, breakwater::Shutdown::Drained);
    let got = inflight.await.unwrap();
    assert_eq!((got.status, got.text().as_str()), (200, "finished"));
    // Not accepting any more.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_as_a_real_client() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not installed; skipped");
        return;
    }
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let url = proxy.url("/via-curl");
        let out = tokio::process::Command::new("curl")
            .args([
                "-s",
                "-S",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .args(extra)
            .arg(&url)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = if extra.is_empty() { "200 1.1" } else { "200 2" };
        assert_eq!(
            text,
            format!("GET /via-curl\n{want}"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_and_ipv6_listeners_side_by_side() {
    let origin = echo_origin().await;
    let toml = format!(
        "[[listeners]]\naddr = \"[::1]:0\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let cfg = breakwater::Config::parse(&toml, "t.toml").unwrap();
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback on this machine; skipped");
        return;
    }
    let bound = breakwater::bind_all(&cfg).unwrap();
    let (v6, v4) = (bound[0].local_addr, bound[1].local_addr);
    assert!(v6.is_ipv6() && v4.is_ipv4());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(breakwater::run(cfg, bound, async move {
        let _ = rx.await;
    }));
    assert_eq!(get(v6, "/six").await.text(), "GET /six");
    assert_eq!(get(v4, "/four").await.text(), "GET /four");
    assert_eq!(origin.requests()[0].headers["x-forwarded-for"], "::1");
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// A connection that has to wait at every step loses nothing: a body that comes after a pause,
/// a response the client leaves unread while it outgrows the socket buffers (the proxy's
/// writes wait), and a next request after an idle pause, which asks to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_has_to_wait_loses_nothing() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "")).await;
    let body: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rx, mut tx) = TcpStream::connect(proxy.addr).await.unwrap().into_split();
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            sent.len()
        );
        tx.write_all(head.as_bytes()).await.unwrap();
        tx.write_all(&sent[..1000]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.write_all(&sent[1000..]).await.unwrap();
        tx
    });
    // Unread for a while: the 600 KB echo fills the socket and the proxy's writes wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, got) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut rx))
        .await
        .expect("the echo never came whole");
    assert_eq!(status, 200);
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the echoed body differs from what was sent");
    let mut tx = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the body was never taken whole")
        .unwrap();

    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.write_all(b"GET /again HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, got) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut rx))
        .await
        .expect("no answer to the request after the pause");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&got), "GET /again");
    // `Connection: close` is honoured: the proxy ends the connection after the response.
    let mut more = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(3), rx.read(&mut more)).await;
    assert!(matches!(end, Ok(Ok(0))), "connection not closed: {end:?}");
    proxy.stop().await;
}

/// Reads one response off `s`: its status and body (Content-Length or chunked).
async fn read_response(s: &mut tokio::net::tcp::OwnedReadHalf) -> (u16, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed inside the head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let mut rest = buf.split_off(head_end);
    if let Some(cl) = head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        let len: usize = cl.trim().parse().unwrap();
        while rest.len() < len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside the body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        return (status, rest);
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside a chunk size");
            rest.extend_from_slice(&chunk[..n]);
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                .unwrap();
        rest.drain(..line_end + 2);
        while rest.len() < size + 2 {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed inside a chunk");
            rest.extend_from_slice(&chunk[..n]);
        }
        body.extend_from_slice(&rest[..size]);
        rest.drain(..size + 2);
        if size == 0 {
            return (status, body);
        }
    }
}
