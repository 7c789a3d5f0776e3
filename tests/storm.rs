//! The storm tester's counts against servers that count for themselves.

mod support;

use std::process::Command;
use std::sync::atomic::Ordering;

use support::*;

fn storm(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin())
        .arg("storm")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("storm --json prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_storm_counts_agree_with_the_server() {
    let origin = text_origin("ok").await;
    let target = origin.addr.to_string();
    let r = tokio::task::spawn_blocking(move || {
        storm(&[
            &target,
            "--connections",
            "600",
            "--concurrency",
            "60",
            "--sources",
            "127.0.2.0/28",
        ])
    })
    .await
    .unwrap();
    assert_eq!(r["attempted"], 600);
    assert_eq!(r["connected"], origin.accepts() as u64);
    assert_eq!(r["answered"], origin.requests().len() as u64);
    assert_eq!(r["status"]["200"], 600);
    assert_eq!(r["sources"], 14);
    assert_eq!(r["request_ms"]["count"], 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_seen_by_the_storm_match_breakwaters_count() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n[admission]\nper_ip_rate = 10\nper_ip_burst = 10\n\
         allow = [\"127.0.0.2/32\"]\n[log]\naccess_log = false\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    ))
    .await;
    let target = proxy.addr.to_string();
    let r = tokio::task::spawn_blocking(move || {
        storm(&[
            &target,
            "--connections",
            "400",
            "--concurrency",
            "40",
            "--sources",
            "127.0.3.0/30",
            "--probe",
        ])
    })
    .await
    .unwrap();
    let served = r["status"]["200"].as_u64().unwrap_or(0);
    let refused = r["errors"]["reset"].as_u64().unwrap() + r["errors"]["closed"].as_u64().unwrap();
    assert_eq!(served + refused, 400, "{r}");
    assert_eq!(
        refused,
        proxy.admission.stats.rejected_rate.load(Ordering::Relaxed),
        "{r}"
    );
    // 2 addresses at a 10/s rate with a burst of 10: most of the 400 are refused.
    assert!(refused >= 300, "{r}");
    // The probe has its own address, allowed: never limited. (At one request every 20 ms it
    // would outrun this 10/s limit whenever the storm takes longer than about 0.3 s, as it does
    // on a loaded machine; its refusals then counted in Breakwater's total, not the storm's.)
    assert_eq!(r["probe"]["success_ratio"], 1.0, "{r}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_storm_is_cut_at_the_header_timeout() {
    let origin = text_origin("ok").await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n[http]\nheader_read_timeout = \"1s\"\n\
         [log]\naccess_log = false\n[upstreams.app]\nservers = [\"{}\"]\n",
        origin.addr
    ))
    .await;
    let target = proxy.addr.to_string();
    let r = tokio::task::spawn_blocking(move || {
        storm(&[
            &target,
            "--mode",
            "slowloris",
            "--connections",
            "100",
            "--concurrency",
            "100",
            "--interval",
            "200ms",
            "--hold",
            "5s",
            "--sources",
            "127.0.4.0/28",
        ])
    })
    .await
    .unwrap();
    assert_eq!(r["connected"], 100);
    assert_eq!(r["closed_by_server"], 100, "{r}");
    let p50 = r["closed_after_ms"]["p50"].as_f64().unwrap();
    assert!((800.0..2500.0).contains(&p50), "{r}");
    assert!(origin.requests().is_empty());
    proxy.stop().await;
}
