//! The waiting room's page in a real browser: headless Chromium (Debian's `chromium`) loads it
//! through Breakwater; axe-core finds no serious or critical problem; the pause control stops
//! the page's background polls and resumes them; with JavaScript off the page refreshes itself
//! and says so. The screenshot is written to `target/tmp/waiting-room.png` for a person to look
//! at.
//!
//! The browser side is `tests/browser/room.mjs` (puppeteer-core, axe-core; `npm ci` in
//! tests/browser). Skipped, saying so, where node, chromium or those packages are missing;
//! `.ci/run` installs all three.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn missing() -> Option<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("node is not installed (apt-get install nodejs npm)".into());
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} is missing (apt-get install chromium)"));
    }
    if !dir.join("node_modules/puppeteer-core").exists() {
        return Some(
            "tests/browser/node_modules is missing (npm ci --prefix tests/browser)".into(),
        );
    }
    None
}

/// Takes a ticket from `src` (someone ahead in line).
async fn join_from(src: &str, addr: std::net::SocketAddr) {
    let mut s = connect_from(src, addr).await.unwrap();
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: shop.test\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(String::from_utf8_lossy(&out).contains("You are in line"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waiting_page_is_accessible_pausable_and_works_without_javascript() {
    if let Some(why) = missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let origin = text_origin("shop").await;
    // The sale opens in an hour: everyone takes a ticket and stays in line (the three first
    // ones do not poll, so the grace outlasts the browser's run).
    let opens = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    let proxy = Proxy::start(&format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[admission]\nper_ip_rate = 0\n\
         [upstreams.app]\nservers = [\"{}\"]\n\
         [[waiting_room]]\nname = \"drop\"\nrefresh = \"1s\"\nqueue_grace = \"60s\"\n\
         opens_at = \"{opens}\"\ntickets_per_ip = 0\n",
        origin.addr
    ))
    .await;
    for i in 1..=3 {
        join_from(&format!("127.0.5.{i}"), proxy.addr).await;
    }
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("waiting-room.png");
    let _ = std::fs::remove_file(&shot);
    let url = format!("http://{}/checkout", proxy.addr);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/room.mjs");
    let run = tokio::process::Command::new("node")
        .arg(&script)
        .arg(&url)
        .arg(&shot)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser check finished within 90 s")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let r: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "no result from the browser ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    eprintln!("browser: {r}");
    assert!(r.get("error").is_none(), "{}", r["error"]);
    assert_eq!(r["title"], "You are in line");
    assert_eq!(r["position"], "4", "three took tickets first");
    for key in ["violations", "nojs_violations"] {
        let serious: Vec<_> = r[key]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .collect();
        assert!(serious.is_empty(), "{key}: {serious:?}");
    }
    // With JavaScript the page polls the JSON answer (refresh 1 s) and says it does not reload.
    assert!(r["note"].as_str().unwrap().contains("without reloading"));
    assert!(r["polls_running"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["pressed_after_pause"], "true");
    assert_eq!(r["label_after_pause"], "Resume automatic updates");
    assert_eq!(r["polls_while_paused"], 0, "paused, yet it polled");
    assert_eq!(r["pressed_after_resume"], "false");
    assert!(r["polls_after_resume"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["still_in_line"], "4");
    // Without JavaScript: no timed refresh the waiter did not ask for (axe's meta-refresh rule,
    // WCAG 2.2.1); the page says so and offers one; turned on it reloads at the room's
    // interval and offers the way out; no dead button, no sentence that is not true.
    assert_eq!(r["nojs_refresh"], serde_json::Value::Null);
    assert!(
        r["nojs_note"]
            .as_str()
            .unwrap()
            .contains("does not update by itself"),
        "{r}"
    );
    assert_eq!(r["nojs_pause_hidden"], true);
    assert_eq!(r["nojs_how_hidden"], true);
    assert_eq!(r["nojs_position"], "4");
    assert_eq!(
        r["nojs_on_url"],
        url.as_str(),
        "the parameter is not left in the URL"
    );
    assert_eq!(r["nojs_on_refresh"], "1");
    assert!(r["nojs_on_note"]
        .as_str()
        .unwrap()
        .contains("reloads itself"));
    assert_eq!(r["nojs_on_position"], "4", "the same place in line");
    assert_eq!(r["nojs_off_refresh"], serde_json::Value::Null);
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 5_000);
    proxy.stop().await;
}
