//! Admission end to end, with clients on many loopback source addresses (127.0.x.y).

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cfg(origin: std::net::SocketAddr, admission: &str) -> String {
    // defer_accept off: some tests open connections that say nothing at first.
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\ndefer_accept = \"0s\"\n\n[admission]\n{admission}\n\n[upstreams.app]\nservers = [\"{origin}\"]\n[log]\naccess_log = false\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_the_rate_is_refused_while_another_is_served() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "per_ip_rate = 10\nper_ip_burst = 10\nper_ip_max_connections = 0",
    ))
    .await;
    let start = Instant::now();
    let (mut served, mut refused, mut other_served) = (0, 0, 0);
    for i in 0..40 {
        match try_get_from("127.0.0.3", proxy.addr).await {
            Some(200) => served += 1,
            None => refused += 1,
            Some(s) => panic!("unexpected status {s}"),
        }
        // The other address stays within its own burst: it must be served every time.
        if i % 4 == 0 && try_get_from("127.0.0.4", proxy.addr).await == Some(200) {
            other_served += 1;
        }
    }
    let allowed = 10.0 + 10.0 * start.elapsed().as_secs_f64() + 1.0;
    assert!(
        (served as f64) <= allowed,
        "served {served}, allowed at most {allowed}"
    );
    assert!(served >= 10, "the burst must get through: {served}");
    assert!(refused >= 1);
    assert_eq!(other_served, 10, "the other address must not be limited");
    assert!(proxy.admission.stats.rejected_rate.load(Ordering::Relaxed) >= refused);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_concurrency_holds_and_slots_come_back() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(origin.addr, "per_ip_max_connections = 3")).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.5", proxy.addr).await.unwrap();
        assert_eq!(request_on(&mut s, "/").await, Some(200));
        open.push(s);
    }
    assert_eq!(
        try_get_from("127.0.0.5", proxy.addr).await,
        None,
        "a fourth connection is refused"
    );
    assert_eq!(
        try_get_from("127.0.0.6", proxy.addr).await,
        Some(200),
        "others are not affected"
    );

    drop(open.pop());
    assert!(
        eventually_async(Duration::from_secs(3), || async {
            try_get_from("127.0.0.5", proxy.addr).await == Some(200)
        })
        .await,
        "the slot never came back"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_cap_pauses_accepting_and_recovers() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(origin.addr, "max_connections = 4")).await;
    let mut open = Vec::new();
    for i in 0..4 {
        let mut s = connect_from(&format!("127.0.2.{}", i + 1), proxy.addr)
            .await
            .unwrap();
        assert_eq!(request_on(&mut s, "/").await, Some(200));
        open.push(s);
    }
    // The fifth completes the TCP handshake (the kernel's backlog) but is not served...
    let mut fifth = connect_from("127.0.2.9", proxy.addr).await.unwrap();
    fifth
        .write_all(b"GET /fifth HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), fifth.read(&mut buf)).await;
    assert!(early.is_err(), "served past the global cap");
    assert_eq!(proxy.admission.open_connections(), 4);
    assert!(
        proxy
            .admission
            .stats
            .global_cap_pauses
            .load(Ordering::Relaxed)
            >= 1
    );
    // ...until a slot frees: then it is accepted and answered, having lost nothing.
    drop(open.pop());
    let n = tokio::time::timeout(Duration::from_secs(3), fifth.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_lists() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "per_ip_rate = 1\nper_ip_burst = 1\nallow = [\"127.0.0.7/32\"]\ndeny = [\"127.0.3.0/24\"]",
    ))
    .await;
    for _ in 0..50 {
        assert_eq!(
            try_get_from("127.0.0.7", proxy.addr).await,
            Some(200),
            "allow-listed address limited"
        );
    }
    for i in 1..5 {
        assert_eq!(
            try_get_from(&format!("127.0.3.{i}"), proxy.addr).await,
            None,
            "denied address served"
        );
    }
    assert_eq!(
        proxy.admission.stats.rejected_deny.load(Ordering::Relaxed),
        4
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_answers_429_on_one_keepalive_connection() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(origin.addr, "per_ip_request_rate = 5")).await;
    let mut s = connect_from("127.0.0.9", proxy.addr).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            request_on(&mut s, "/")
                .await
                .expect("connection stays open"),
        );
    }
    assert!(statuses[..5].iter().all(|&c| c == 200), "{statuses:?}");
    assert!(
        statuses.iter().filter(|&&c| c == 429).count() >= 10,
        "{statuses:?}"
    );
    assert!(origin.requests().len() <= 10);
    let raw = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 200"),
        "127.0.0.1 is allow-listed by default: {raw}"
    );
    // 429s carry Retry-After.
    let mut s = connect_from("127.0.0.9", proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 429") && head.contains("retry-after: 1"),
        "{head}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_counts_but_refuses_nothing() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "per_ip_rate = 1\nper_ip_burst = 1\ndeny = [\"127.0.4.1\"]\ndry_run = true",
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(try_get_from("127.0.4.1", proxy.addr).await, Some(200));
    }
    let s = &proxy.admission.stats;
    assert_eq!(s.would_reject.load(Ordering::Relaxed), 10);
    assert_eq!(s.rejected_deny.load(Ordering::Relaxed), 10);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_memory_returns_to_small_after_10000_addresses() {
    let origin = text_origin("ok").await;
    // A fast refill (burst 10 at 1000/s: 10 ms) lets the keys go stale quickly.
    let proxy = Proxy::start(&cfg(origin.addr, "per_ip_rate = 1000\nper_ip_burst = 10")).await;
    let addr = proxy.addr;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..50u32 {
        tasks.spawn(async move {
            let mut ok = 0;
            for i in (worker..10_000).step_by(50) {
                let src = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                if let Ok(s) = connect_from(&src, addr).await {
                    drop(s);
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut connected = 0;
    while let Some(n) = tasks.join_next().await {
        connected += n.unwrap();
    }
    assert_eq!(connected, 10_000);
    // Every address was seen (accepts may trail the client's connects a little).
    assert!(
        eventually(Duration::from_secs(10), || proxy.shards.accepted()
            >= 10_000)
        .await,
        "not all connections were accepted"
    );
    assert!(
        proxy.admission.tracked_keys() >= 9_000,
        "tracked {}",
        proxy.admission.tracked_keys()
    );
    // A key is pruned once its limiter has refilled (at 1,000/s, within milliseconds).
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy.admission.prune();
            proxy.admission.tracked_keys() < 100
        })
        .await,
        "{} keys left after pruning",
        proxy.admission.tracked_keys()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_cap_and_rapid_reset_flood() {
    let origin = origin(std::sync::Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            hyper::Response::new(full("ok"))
        })
    }))
    .await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "max_connections = 100\n[http]\nmax_concurrent_streams = 20",
    ))
    .await;

    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    // Settings arrive with the first exchange.
    assert!(
        eventually(Duration::from_secs(5), || client.current_max_send_streams()
            == 20)
        .await,
        "max streams {}",
        client.current_max_send_streams()
    );

    let start = Instant::now();
    let mut sent = 0;
    for i in 0..10_000 {
        client = match tokio::time::timeout(Duration::from_secs(2), client.ready()).await {
            Ok(Ok(c)) => c,
            _ => break,
        };
        let req = hyper::Request::get(format!("http://x/r{i}"))
            .body(())
            .unwrap();
        let Ok((_resp, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        closed.is_ok(),
        "the flooding connection was never closed ({sent} resets sent)"
    );
    assert!(sent < 10_000, "all 10,000 resets were accepted");
    let reached = origin.requests().len();
    assert!(
        reached < 1_000,
        "{reached} requests reached the origin from {sent} cancelled streams"
    );
    eprintln!(
        "rapid reset: connection closed after {sent} streams in {:?}; origin saw {reached}",
        start.elapsed()
    );

    // Everyone else is still served.
    assert_eq!(try_get_from("127.0.8.1", proxy.addr).await, Some(200));
    proxy.stop().await;
}
