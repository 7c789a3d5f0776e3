//! Metrics and the admin endpoints, read as Prometheus would.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Response;
use support::*;

const TOKEN: &str = "s3cret";

fn cfg(origin: SocketAddr, upstream: &str, admission: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\ndefer_accept = \"0s\"\n\
         [admin]\naddr = \"127.0.0.1:9901\"\ntoken = \"{TOKEN}\"\n\
         [admission]\n{admission}\n[log]\naccess_log = false\n\
         [upstreams.app]\nservers = [\"{origin}\"]\n{upstream}\n"
    )
}

async fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> Got {
    let mut req = hyper::Request::builder().uri(path).header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    send(admin, req.body(full("")).unwrap()).await
}

/// Samples by "name{labels}" (labels as printed).
async fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let got = admin_get(admin, "/metrics", Some(TOKEN)).await;
    assert_eq!(got.status, 200);
    got.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_a_missing_or_wrong_token() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(origin.addr, "", "")).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(admin_get(admin, "/metrics", None).await.status, 401);
    assert_eq!(
        admin_get(admin, "/metrics", Some("guess")).await.status,
        401
    );
    assert_eq!(admin_get(admin, "/healthz", Some(TOKEN)).await.status, 200);
    assert_eq!(admin_get(admin, "/metrics", Some(TOKEN)).await.status, 200);
    assert_eq!(admin_get(admin, "/nothing", Some(TOKEN)).await.status, 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_ready_when_the_warm_pool_is_filled() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(origin.addr, "pool_min_idle = 4", "")).await;
    let admin = proxy.admin.unwrap();
    let ready = eventually_async(Duration::from_secs(5), || async {
        let g = admin_get(admin, "/readyz", Some(TOKEN)).await;
        assert!(g.status == 200 || g.status == 503, "{}", g.status);
        g.status == 200
    })
    .await;
    assert!(ready, "never ready");
    assert_eq!(origin.open(), 4, "ready before the pool was warm");
    let m = scrape(admin).await;
    let server = format!("server=\"{}\"", origin.addr);
    let open = m.iter().find(|(k, _)| {
        k.starts_with("breakwater_upstream_connections_open") && k.contains(&server)
    });
    assert_eq!(open.map(|(_, v)| *v), Some(4.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepts_and_every_reject_reason_are_counted() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "",
        "per_ip_rate = 5\nper_ip_burst = 5\nper_ip_max_connections = 2\ndeny = [\"127.0.80.9\"]",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    // Each accept loop registers its listener's gauges when it first runs, on its own thread,
    // which a loaded machine can schedule after the first scrape.
    eventually_async(Duration::from_secs(5), || async {
        scrape(admin)
            .await
            .keys()
            .any(|k| k.starts_with("breakwater_listen_backlog{"))
    })
    .await;
    let before = scrape(admin).await;
    assert!(before.contains_key("breakwater_connections_open"));
    assert!(before
        .keys()
        .any(|k| k.starts_with("breakwater_listen_backlog{")));
    assert!(before
        .keys()
        .any(|k| k.starts_with("breakwater_kernel_listen_overflows")));
    assert!(before.contains_key("breakwater_process_open_fds"));

    for _ in 0..3 {
        assert_eq!(try_get_from("127.0.80.1", proxy.addr).await, Some(200));
    }
    assert_eq!(try_get_from("127.0.80.9", proxy.addr).await, None);
    // Over the rate.
    for _ in 0..10 {
        let _ = try_get_from("127.0.80.2", proxy.addr).await;
    }
    // Over the per-IP cap: two held open, the third refused.
    let a = connect_from("127.0.80.3", proxy.addr).await.unwrap();
    let b = connect_from("127.0.80.3", proxy.addr).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .admission
            .open_connections()
            >= 2)
        .await,
        "the two connections were not admitted"
    );
    assert_eq!(try_get_from("127.0.80.3", proxy.addr).await, None);

    let after = scrape(admin).await;
    let delta = |k: &str| sum(&after, k) - sum(&before, k);
    assert!(delta("breakwater_connections_accepted_total") >= 3.0 + 5.0 + 2.0);
    assert_eq!(
        delta("breakwater_connections_rejected_total{reason=\"deny\"}"),
        1.0
    );
    assert_eq!(
        delta("breakwater_connections_rejected_total{reason=\"rate\"}"),
        5.0
    );
    assert_eq!(
        delta("breakwater_connections_rejected_total{reason=\"per_ip_cap\"}"),
        1.0
    );
    assert!(sum(&after, "breakwater_connections_open") >= 2.0);
    assert!(
        delta("breakwater_requests_total{route=\"*/\",upstream=\"app\",status=\"2xx\"}") >= 8.0
    );
    assert!(sum(&after, "breakwater_limiter_keys") >= 3.0);
    drop((a, b));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_and_busy_connections_under_a_saturated_pool() {
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            Response::new(full("slow"))
        })
    }))
    .await;
    let proxy = Proxy::start(&cfg(
        origin.addr,
        "pool_min_idle = 2\npool_max = 2\nmax_client_share = 1.0\nqueue_timeout = \"5s\"",
        "",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let addr = proxy.addr;
    let mut reqs = tokio::task::JoinSet::new();
    for _ in 0..6 {
        reqs.spawn(async move { get(addr, "/").await.status });
    }
    // Two requests on the two connections, four waiting for one.
    let queued = eventually_async(Duration::from_secs(5), || async {
        sum(
            &scrape(admin).await,
            "breakwater_upstream_queue_depth{upstream=\"app\"}",
        ) == 4.0
    })
    .await;
    assert!(queued, "four requests never queued");
    let m = scrape(admin).await;
    assert_eq!(sum(&m, "breakwater_upstream_connections_busy{"), 2.0);
    assert_eq!(sum(&m, "breakwater_upstream_connections_idle{"), 0.0);
    while let Some(s) = reqs.join_next().await {
        assert_eq!(s.unwrap(), 200);
    }
    let m = scrape(admin).await;
    assert_eq!(
        sum(&m, "breakwater_upstream_queue_depth{upstream=\"app\"}"),
        0.0
    );
    assert_eq!(sum(&m, "breakwater_upstream_connections_idle{"), 2.0);
    let waits = sum(
        &m,
        "breakwater_upstream_queue_wait_seconds_count{upstream=\"app\"}",
    );
    assert!(
        waits >= 4.0,
        "{waits}: {:?}",
        m.keys()
            .filter(|k| k.contains("queue_wait"))
            .collect::<Vec<_>>()
    );
    assert!(
        sum(
            &m,
            "breakwater_request_duration_seconds_count{route=\"*/\",upstream=\"app\"}"
        ) >= 6.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_process_metrics_and_build_info() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&cfg(origin.addr, "", "")).await;
    let m = scrape(proxy.admin.unwrap()).await;
    assert!(m.contains_key("process_cpu_seconds_total"), "{m:?}");
    assert!(m["process_resident_memory_bytes"] > 1e6);
    assert!(m["process_open_fds"] >= 3.0);
    assert!(m["process_max_fds"] >= m["process_open_fds"]);
    let started = m["process_start_time_seconds"];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 3600.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
    let version = format!(
        "breakwater_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(m[&version], 1.0);
    proxy.stop().await;
}
