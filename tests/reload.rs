//! Hot reload: a new config applied to a running proxy while clients keep sending. Nothing in
//! flight fails, the new routes and limits hold within a second, listeners come and go, and a
//! config that does not load changes nothing.
// Tests signal the binaries they start (kill(2)).
#![allow(unsafe_code)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(5);

fn cfg(origin: std::net::SocketAddr, admission: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n[admission]\nallow = []\nper_ip_rate = 0\n{admission}\n\
         [upstreams.app]\nservers = [\"{origin}\"]\npool_min_idle = 2\n[log]\naccess_log = false\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_target_and_rate_limit_change_under_load_without_a_failed_request() {
    let one = text_origin("one").await;
    let two = text_origin("two").await;
    let proxy = Proxy::start(&cfg(one.addr, "")).await;
    let addr = proxy.addr;
    // (when, status, body) of every request, from a keep-alive client and a new-connection one.
    let seen = Arc::new(Mutex::new(Vec::<(Instant, u16, String)>::new()));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for keep_alive in [true, false] {
        let (seen, failures, stop) = (seen.clone(), failures.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut tx = client(addr).await;
            while !stop.load(Ordering::Relaxed) {
                if !keep_alive {
                    tx = client(addr).await;
                }
                let req = request("GET", addr, "/", full(""));
                match tx.send_request(req).await {
                    Ok(resp) => {
                        let got = collect(resp).await;
                        seen.lock()
                            .unwrap()
                            .push((Instant::now(), got.status, got.text()));
                    }
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Answers seen after `from`, with `status` when given.
    let seen_after = |from: Instant, status: Option<u16>| {
        let seen = seen.clone();
        move || {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(t, s, _)| *t > from && status.is_none_or(|x| x == *s))
                .count()
        }
    };
    let began = Instant::now();
    let traffic = seen_after(began - Duration::from_secs(60), None);
    assert!(eventually(WAIT, || traffic() >= 30).await, "no traffic");

    // The route's upstream now points at the second origin.
    let b = breakwater::Config::parse(&cfg(two.addr, ""), "b.toml").unwrap();
    let msg = proxy.reloader.reload(b).await.expect("reload");
    let switched = Instant::now();
    assert!(msg.starts_with("config reloaded"), "{msg}");
    // Traffic past the one-second mark the check below allows the old route.
    let settled = seen_after(switched + Duration::from_secs(1), None);
    assert!(
        eventually(WAIT, || settled() >= 30).await,
        "no traffic after the reload"
    );
    // And a request rate appears for the same client.
    let c = breakwater::Config::parse(
        &cfg(
            two.addr,
            "per_ip_request_rate = 1\nper_ip_request_burst = 1",
        ),
        "c.toml",
    )
    .unwrap();
    let before_limit = Instant::now();
    proxy.reloader.reload(c).await.expect("reload");
    let limited = Instant::now();
    let refused = seen_after(limited + Duration::from_millis(200), Some(429));
    assert!(
        eventually(WAIT, || refused() > 0).await,
        "the new request rate never applied"
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }

    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 100, "only {} requests", seen.len());
    for (t, status, body) in &seen {
        // Nothing but answers from an origin or the new limit: no 5xx, no reset.
        assert!(*status == 200 || *status == 429, "{status} {body}");
        if *t > switched + Duration::from_secs(1) && *status == 200 {
            assert_eq!(
                body, "two",
                "the old route still answered a second after the reload"
            );
        }
        if *t < before_limit {
            assert_eq!(*status, 200, "limited before the limit existed");
        }
    }
    assert!(
        seen.iter().any(|(_, _, b)| b == "one"),
        "never served by the first origin"
    );
    let after_limit = seen
        .iter()
        .filter(|(t, _, _)| *t > limited + Duration::from_millis(200))
        .filter(|(_, s, _)| *s == 429)
        .count();
    assert!(after_limit > 0, "the new request rate never applied");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_listeners() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&cfg(origin.addr, "")).await;
    let first = proxy.addr;
    let both = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[[listeners]]\naddr = \"127.0.0.2:0\"\n\
         [upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let msg = proxy
        .reloader
        .reload(breakwater::Config::parse(&both, "both.toml").unwrap())
        .await
        .expect("reload");
    let second: std::net::SocketAddr = msg
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new listener in {msg:?}"));
    assert_eq!(get(second, "/new").await.status, 200);
    assert_eq!(get(first, "/old").await.status, 200);

    let only_second = format!(
        "[[listeners]]\naddr = \"127.0.0.2:0\"\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    );
    let msg = proxy
        .reloader
        .reload(breakwater::Config::parse(&only_second, "second.toml").unwrap())
        .await
        .expect("reload");
    assert!(
        msg.contains(&format!("stopped listening on {first}")),
        "{msg}"
    );
    assert!(
        eventually(WAIT, || std::net::TcpStream::connect(first).is_err()).await,
        "the removed listener still accepts"
    );
    assert_eq!(get(second, "/still").await.status, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_config_keeps_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let one = text_origin("one").await;
    let two = text_origin("two").await;
    let path = dir.path().join("bw.toml");
    let write = |origin: std::net::SocketAddr, extra: &str| {
        std::fs::write(
            &path,
            format!(
                "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n[admin]\naddr = \"127.0.0.1:0\"\n\
                 [upstreams.app]\nservers = [\"{origin}\"]\n[runtime]\ncontrol_socket = \"\"\n{extra}"
            ),
        )
        .unwrap();
    };
    write(one.addr, "");
    let (mut child, port, admin) = run_bin_on_port_0(&path, &dir.path().join("stderr"), true).await;
    let admin = admin.unwrap();
    assert_eq!(get(port, "/").await.text(), "one");
    let pid = child.id() as i32;
    let hup = || {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGHUP) }
    };
    let metric = |name: &'static str| async move {
        let text = get(admin, "/metrics").await.text();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };

    // Broken: an unknown key. Still serving the old config, and the failure is counted.
    write(two.addr, "[http]\nidle_timout = \"5s\"\n");
    assert_eq!(hup(), 0);
    assert!(
        eventually_async(WAIT, || async {
            metric("breakwater_config_reloads_total{result=\"error\"}").await == 1.0
        })
        .await,
        "the failed reload was not counted"
    );
    assert_eq!(get(port, "/").await.text(), "one");
    assert!(child.try_wait().unwrap().is_none());

    // Fixed: the new upstream serves, the success is counted and time-stamped.
    write(two.addr, "");
    assert_eq!(hup(), 0);
    assert!(
        eventually_async(WAIT, || async { get(port, "/").await.text() == "two" }).await,
        "the new upstream never served"
    );
    assert_eq!(
        metric("breakwater_config_reloads_total{result=\"ok\"}").await,
        1.0
    );
    assert!(metric("breakwater_config_last_reload_success_timestamp_seconds").await > 1.7e9);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_state_survives_a_reload_that_keeps_the_limit() {
    let origin = text_origin("ok").await;
    let limits = "per_ip_request_rate = 1\nper_ip_request_burst = 2";
    let proxy = Proxy::start(&cfg(origin.addr, limits)).await;
    let tx = Arc::new(tokio::sync::Mutex::new(client(proxy.addr).await));
    let addr = proxy.addr;
    let status = || {
        let tx = tx.clone();
        async move {
            let mut tx = tx.lock().await;
            tx.ready().await.unwrap();
            let req = request("GET", addr, "/", full(""));
            collect(tx.send_request(req).await.unwrap()).await.status
        }
    };
    assert_eq!(status().await, 200);
    assert_eq!(status().await, 200);
    // Same limits, another change: the client's spent burst stays spent.
    let same = cfg(
        origin.addr,
        &format!("{limits}\n[http]\nvia_name = \"edge-2\""),
    );
    proxy
        .reloader
        .reload(breakwater::Config::parse(&same, "same.toml").unwrap())
        .await
        .unwrap();
    assert_eq!(status().await, 429);
    // A changed limit starts afresh.
    let raised = cfg(
        origin.addr,
        "per_ip_request_rate = 1\nper_ip_request_burst = 5",
    );
    proxy
        .reloader
        .reload(breakwater::Config::parse(&raised, "raised.toml").unwrap())
        .await
        .unwrap();
    assert_eq!(status().await, 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level() {
    let dir = tempfile::tempdir().unwrap();
    let origin = text_origin("ok").await;
    let port = closed_port().await;
    let path = dir.path().join("bw.toml");
    let write = |level: &str| {
        std::fs::write(
            &path,
            format!(
                "[[listeners]]\naddr = \"{port}\"\nshards = 1\n[upstreams.app]\nservers = [\"{}\"]\n\
                 [runtime]\ncontrol_socket = \"\"\n[log]\nlevel = \"{level}\"\n",
                origin.addr
            ),
        )
        .unwrap();
    };
    write("warn");
    let log = dir.path().join("stderr");
    let mut child = run_bin(&path, port, Some(&log), &[]).await;
    assert_eq!(get(port, "/quiet").await.status, 200);
    write("info");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    let logged = eventually_async(WAIT, || async {
        assert_eq!(get(port, "/loud").await.status, 200);
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("path=/loud")
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(logged, "no access line at info after the reload:\n{text}");
    assert!(!text.contains("path=/quiet"), "logged at warn:\n{text}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_pool_closes_its_connections() {
    let origin = text_origin("ok").await;
    let mut proxy = Proxy::start(&cfg(origin.addr, "")).await;
    // The harness's own handle on the upstreams would keep the old pool alive.
    proxy.engine_upstreams.clear();
    assert!(eventually(WAIT, || origin.open() == 2).await);
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    // A changed upstream gets a fresh pool; the old one's idle connections close, so the origin
    // does not keep both.
    let changed = cfg(origin.addr, "").replace("pool_min_idle = 2", "pool_min_idle = 3");
    proxy
        .reloader
        .reload(breakwater::Config::parse(&changed, "changed.toml").unwrap())
        .await
        .unwrap();
    let settled = eventually(WAIT, || origin.open() == 3).await;
    assert!(
        settled,
        "origin holds {} connections, expected 3",
        origin.open()
    );
    assert_eq!(get(proxy.addr, "/").await.status, 200);
    proxy.stop().await;
    // And a stopped engine leaves none behind.
    assert!(
        eventually(WAIT, || origin.open() == 0).await,
        "{} left open after stop",
        origin.open()
    );
}
