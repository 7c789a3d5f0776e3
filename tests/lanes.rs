//! Where a connection waits and runs. The express lane: a client with nothing else open is
//! served on the accept thread's own runtime, with a slice of the pool kept for it, so a storm
//! that holds every other origin connection does not make a newcomer wait for one. Parking:
//! while the queue holds two rounds of the pool, new connections wait accepted but unread.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Response;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

/// An origin where `/hold` answers only once `release` is set, and anything else at once.
async fn holding_origin() -> (Origin, watch::Sender<bool>) {
    let (release, rx) = watch::channel(false);
    let origin = origin(Arc::new(
        move |req: hyper::Request<hyper::body::Incoming>| {
            let mut rx = rx.clone();
            Box::pin(async move {
                if req.uri().path() == "/hold" {
                    let _ = rx.wait_for(|r| *r).await;
                }
                Response::new(full("ok"))
            })
        },
    ))
    .await;
    (origin, release)
}

/// `express_above = 0`: newcomers take the lane however few connections are open, so that
/// these tests' handfuls show how it works.
fn config(origin: SocketAddr, express: usize) -> String {
    config_with(
        origin,
        &format!("express_connections = {express}\nexpress_above = 0"),
        16,
        "20s",
    )
}

fn config_with(origin: SocketAddr, runtime: &str, pool_max: usize, queue_timeout: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n\n\
         [runtime]\n{runtime}\n\n\
         [admission]\nper_ip_rate = 0\nper_ip_max_connections = 100\n\n\
         [log]\naccess_log = false\n\n\
         [upstreams.app]\nservers = [\"{origin}\"]\npool_min_idle = 2\npool_max = {pool_max}\n\
         max_client_share = 1.0\nmax_connection_share = 1.0\nqueue_timeout = \"{queue_timeout}\"\n"
    )
}

/// A proxy with these `[runtime]` lines (pool of 16) in front of an origin answering "ok".
async fn quick_proxy(runtime: &str) -> (Origin, Proxy) {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&config_with(origin.addr, runtime, 16, "20s")).await;
    (origin, proxy)
}

/// Waits until the proxy counts no client connection open.
async fn all_closed(proxy: &Proxy) {
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .admission
            .open_connections()
            == 0)
        .await,
        "still open: {}",
        proxy.admission.open_connections()
    );
}

/// A keep-alive connection from `src` with one request answered: accepted, and counted open
/// until dropped.
async fn kept_open(src: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let mut c = connect_from(src, addr).await.expect("connect");
    assert_eq!(request_on(&mut c, "/").await, Some(200));
    c
}

/// `n` newcomers one after another, from 127.0.0.`first` on, each answered 200 and closed
/// before the next.
async fn newcomers_one_at_a_time(addr: SocketAddr, first: usize, n: usize) {
    for i in 0..n {
        let src = format!("127.0.0.{}", first + i);
        assert_eq!(try_get_from(&src, addr).await, Some(200), "{src}");
    }
}

/// One address (127.0.0.5) pins the pool: an open keep-alive connection first, so that its
/// others are not newcomers, then `n` requests to `/hold`. Returns their tasks.
async fn pin_the_pool(
    addr: SocketAddr,
    n: usize,
) -> (tokio::net::TcpStream, tokio::task::JoinSet<Option<u16>>) {
    let mut anchor = connect_from("127.0.0.5", addr).await.expect("connect");
    assert_eq!(request_on(&mut anchor, "/").await, Some(200));
    (anchor, held_requests(addr, n).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_is_served_while_a_storm_holds_every_other_origin_connection() {
    let (origin, release) = holding_origin().await;
    let proxy = Proxy::start(&config(origin.addr, 64)).await;
    // 20 held requests: the main pool's 14 connections (16 less the lane's 2) are all busy
    // and 6 requests queue.
    let (_anchor, mut held) = pin_the_pool(proxy.addr, 20).await;
    assert!(
        eventually(Duration::from_secs(5), || proxy.busy() == 14
            && proxy.queued() == 6)
        .await,
        "the storm should hold 14 connections and queue 6 (busy {}, queued {})",
        proxy.busy(),
        proxy.queued()
    );
    let t = Instant::now();
    let got = try_get_from("127.0.0.9", proxy.addr).await;
    let took = t.elapsed();
    assert_eq!(got, Some(200), "the newcomer is served");
    assert!(took < Duration::from_secs(3), "served in {took:?}");
    // ... on a connection of the lane's slice, within pool_max; the storm still waits.
    assert!(origin.max_open() <= 16, "origin saw {}", origin.max_open());
    assert_eq!(proxy.queued(), 6, "the storm's queue is untouched");
    // The lane served the anchor (nothing else open from 127.0.0.5 then) and the newcomer;
    // none of the storm's held requests.
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 2.0);
    release.send_replace(true);
    while let Some(r) = held.join_next().await {
        assert_eq!(r.expect("task"), Some(200));
    }
    assert!(origin.max_open() <= 16, "origin saw {}", origin.max_open());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lane_the_newcomer_waits_for_the_storm() {
    let (origin, release) = holding_origin().await;
    let proxy = Proxy::start(&config(origin.addr, 0)).await;
    // All 16 connections are the main pool's now: 20 held requests fill them and queue 4.
    let (_anchor, mut held) = pin_the_pool(proxy.addr, 20).await;
    assert!(
        eventually(Duration::from_secs(5), || proxy.busy() == 16
            && proxy.queued() == 4)
        .await,
        "busy {}, queued {}",
        proxy.busy(),
        proxy.queued()
    );
    let newcomer = tokio::spawn(try_get_from("127.0.0.9", proxy.addr));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !newcomer.is_finished(),
        "no connection came free: it must still wait"
    );
    release.send_replace(true);
    assert_eq!(newcomer.await.expect("task"), Some(200));
    while let Some(r) = held.join_next().await {
        assert_eq!(r.expect("task"), Some(200));
    }
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_newcomers_hold_no_express_place() {
    let origin = text_origin("ok").await;
    // Two places; the listener defers accept (the default, 1 s).
    let proxy = Proxy::start(&config(origin.addr, 2)).await;
    // Newcomers that send nothing (the kernel hands them over once the defer time is out) and
    // newcomers that trickle a head: six, three times the lane's places.
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            connect_from(&format!("127.0.0.{}", 21 + i), proxy.addr)
                .await
                .expect("connect"),
        );
    }
    for i in 0..2 {
        let mut s = connect_from(&format!("127.0.0.{}", 25 + i), proxy.addr)
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHo").await.expect("write");
        held.push(s);
    }
    assert!(
        eventually(Duration::from_secs(10), || proxy
            .metric("breakwater_express_unready_connections_total")
            == 6.0)
        .await,
        "all six accepted, none whole (unready {})",
        proxy.metric("breakwater_express_unready_connections_total")
    );
    assert_eq!(proxy.metric("breakwater_express_open_connections"), 0.0);
    // A newcomer whose request is there gets a place, and is served.
    assert_eq!(try_get_from("127.0.0.9", proxy.addr).await, Some(200));
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 1.0);
    drop(held);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deferred_accept_a_newcomer_needs_only_a_place() {
    let origin = text_origin("ok").await;
    // Accepted before its bytes may have come: the lane cannot tell, and does not look.
    let cfg = config(origin.addr, 2).replace("shards = 2", "shards = 2\ndefer_accept = \"0s\"");
    let proxy = Proxy::start(&cfg).await;
    let _idle = connect_from("127.0.0.21", proxy.addr)
        .await
        .expect("connect");
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metric("breakwater_express_open_connections")
            == 1.0)
        .await,
        "the idle newcomer takes a place at once"
    );
    assert_eq!(try_get_from("127.0.0.9", proxy.addr).await, Some(200));
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 2.0);
    assert_eq!(
        proxy.metric("breakwater_express_unready_connections_total"),
        0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_lane_opens_one_express_connection_beside_its_first_request() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&config(origin.addr, 64)).await;
    // The warm pool (pool_min_idle 2) is open before any request.
    assert!(eventually(Duration::from_secs(5), || origin.accepts() == 2).await);
    // The first newcomer is answered on a main-pool connection, and one express connection
    // (driven on the lane's thread) is opened beside it, not on its way.
    assert_eq!(try_get_from("127.0.0.9", proxy.addr).await, Some(200));
    assert!(
        eventually(Duration::from_secs(5), || origin.accepts() == 3).await,
        "one express connection opened (origin accepts {})",
        origin.accepts()
    );
    // Later newcomers, one at a time, use it: nothing more is opened.
    newcomers_one_at_a_time(proxy.addr, 30, 5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(origin.accepts(), 3, "no further origin connection");
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 6.0);
    proxy.stop().await;
}

/// A newcomer takes the lane only while more than `express_above` client connections are open
/// (its own counted): while fewer are, the workers' queues are short and it is served there,
/// without the hand-off between threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newcomers_take_the_lane_only_while_more_than_express_above_are_open() {
    let (_origin, proxy) = quick_proxy("express_connections = 64\nexpress_above = 4").await;
    // Newcomers one at a time, each closed before the next: one open at a time.
    newcomers_one_at_a_time(proxy.addr, 50, 3).await;
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 0.0);
    // Four kept open, each from an address of its own (the fourth makes 4: still at home).
    let mut open = Vec::new();
    for i in 0..4 {
        open.push(kept_open(&format!("127.0.0.{}", 60 + i), proxy.addr).await);
    }
    assert_eq!(proxy.admission.open_connections(), 4);
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 0.0);
    // The fifth is one over the mark: the lane.
    assert_eq!(try_get_from("127.0.0.70", proxy.addr).await, Some(200));
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 1.0);
    drop(open);
    all_closed(&proxy).await;
    assert_eq!(try_get_from("127.0.0.71", proxy.addr).await, Some(200));
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 1.0);
    proxy.stop().await;
}

/// The accept loops run on the workers while few connections are open (cheaper: a connection
/// is spawned into the accepting worker's own queue), move to the lane's thread once more than
/// `express_accept_above` are open, and come back once few are open again and a second has
/// passed without a busy sign.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loops_move_to_the_lanes_thread_above_the_mark_and_back_when_quiet() {
    let (_origin, proxy) = quick_proxy("express_connections = 64\nexpress_accept_above = 8").await;
    let on_lane = || proxy.metric("breakwater_accept_loops_on_lane");
    // Keep-alive connections, each with a request answered (so accepted and counted open).
    let mut open = Vec::new();
    let open_one = || kept_open("127.0.0.7", proxy.addr);
    while open.len() < 8 {
        open.push(open_one().await);
        assert_eq!(
            on_lane(),
            0.0,
            "{} open: both loops on the workers",
            open.len()
        );
    }
    // Over the mark: each shard's loop moves at its next batch, so both once each has
    // accepted one more (SO_REUSEPORT hashes connections across the two).
    while on_lane() < 2.0 && open.len() < 100 {
        open.push(open_one().await);
    }
    assert_eq!(
        on_lane(),
        2.0,
        "both loops on the lane with {} open",
        open.len()
    );
    assert_eq!(proxy.metric("breakwater_accept_loop_moves_total"), 2.0);
    drop(open);
    all_closed(&proxy).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Quiet again: each loop goes back at its next batch.
    for _ in 0..100 {
        if on_lane() == 0.0 {
            break;
        }
        assert_eq!(try_get_from("127.0.0.8", proxy.addr).await, Some(200));
    }
    assert_eq!(on_lane(), 0.0, "both loops back on the workers");
    assert_eq!(proxy.metric("breakwater_accept_loop_moves_total"), 4.0);
    proxy.stop().await;
}

/// `express_accept_above = 0` keeps the accept loops on the lane's thread, however quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mark_at_zero_the_accept_loops_stay_on_the_lanes_thread() {
    let (_origin, proxy) = quick_proxy("express_connections = 64\nexpress_accept_above = 0").await;
    newcomers_one_at_a_time(proxy.addr, 40, 4).await;
    assert_eq!(proxy.metric("breakwater_accept_loops_on_lane"), 2.0);
    assert_eq!(proxy.metric("breakwater_accept_loop_moves_total"), 0.0);
    proxy.stop().await;
}

/// `n` connections from 127.0.0.5 (after an anchor, so none is a newcomer), each asking for
/// `/hold`, their statuses in the tasks.
async fn held_requests(addr: SocketAddr, n: usize) -> tokio::task::JoinSet<Option<u16>> {
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..n {
        held.spawn(async move {
            let mut s = connect_from("127.0.0.5", addr).await.ok()?;
            s.write_all(b"GET /hold HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let head = tokio::time::timeout(Duration::from_secs(30), read_head(&mut s))
                .await
                .ok()?
                .ok()?;
            head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
        });
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_queue_full_new_connections_wait_unread_and_are_all_served_in_turn() {
    let (origin, release) = holding_origin().await;
    // Pool of 2: parking starts once 4 requests queue (two rounds). No express lane, so every
    // connection takes the ordinary way.
    let proxy = Proxy::start(&config_with(
        origin.addr,
        "express_connections = 0",
        2,
        "20s",
    ))
    .await;
    let (_anchor, mut first) = pin_the_pool(proxy.addr, 6).await;
    assert!(
        eventually(Duration::from_secs(5), || proxy.busy() == 2
            && proxy.queued() == 4)
        .await,
        "busy {}, queued {}",
        proxy.busy(),
        proxy.queued()
    );
    let mut more = held_requests(proxy.addr, 10).await;
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy.metric("breakwater_parked_connections") == 10.0
        })
        .await,
        "the next 10 connections are parked (gauge {})",
        proxy.metric("breakwater_parked_connections")
    );
    // Unread: none of them reached the queue.
    assert_eq!(proxy.queued(), 4);
    release.send_replace(true);
    while let Some(r) = first.join_next().await {
        assert_eq!(r.expect("task"), Some(200));
    }
    while let Some(r) = more.join_next().await {
        assert_eq!(r.expect("task"), Some(200), "a parked connection is served");
    }
    assert_eq!(proxy.metric("breakwater_parked_connections"), 0.0);
    assert_eq!(proxy.metric("breakwater_connections_parked_total"), 10.0);
    assert!(origin.max_open() <= 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_meets_the_queue_after_two_seconds_and_gets_its_503() {
    let (origin, release) = holding_origin().await;
    let proxy = Proxy::start(&config_with(
        origin.addr,
        "express_connections = 0",
        2,
        "1s",
    ))
    .await;
    // Held for good: the queue stays full.
    let (_anchor, _first) = pin_the_pool(proxy.addr, 6).await;
    assert!(eventually(Duration::from_secs(5), || proxy.queued() >= 4).await);
    let t = Instant::now();
    let mut parked = held_requests(proxy.addr, 1).await;
    let got = parked.join_next().await.expect("one").expect("task");
    let took = t.elapsed();
    // Parked until the queue drains (the stuck requests' own timeouts, which take them out of
    // the queue) or at most 2 s, then read and queued for its whole queue_timeout.
    assert_eq!(got, Some(503), "not a hang: the queue's answer");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "answered after {took:?}"
    );
    assert_eq!(proxy.metric("breakwater_connections_parked_total"), 1.0);
    release.send_replace(true);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_parking_every_connection_is_read_into_the_queue() {
    let (origin, release) = holding_origin().await;
    let proxy = Proxy::start(&config_with(
        origin.addr,
        "express_connections = 0\npark_connections = false",
        2,
        "20s",
    ))
    .await;
    let (_anchor, mut first) = pin_the_pool(proxy.addr, 16).await;
    assert!(
        eventually(Duration::from_secs(5), || proxy.busy() == 2
            && proxy.queued() == 14)
        .await,
        "busy {}, queued {}",
        proxy.busy(),
        proxy.queued()
    );
    assert_eq!(proxy.metric("breakwater_connections_parked_total"), 0.0);
    release.send_replace(true);
    while let Some(r) = first.join_next().await {
        assert_eq!(r.expect("task"), Some(200));
    }
    proxy.stop().await;
}
