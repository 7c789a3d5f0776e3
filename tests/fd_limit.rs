//! Breakwater under a low RLIMIT_NOFILE (set for the child with prlimit): more clients than
//! descriptors. It must stay up, not spin, and serve again once clients leave.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Response;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_it_stays_up_without_spinning_and_recovers() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("prlimit (util-linux) not installed; skipped");
        return;
    }
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(4000)).await;
            Response::new(full("late"))
        })
    }))
    .await;
    let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        config,
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\ndefer_accept = \"0s\"\n\
         [upstreams.app]\nservers = [\"{}\"]\npool_min_idle = 0\n[log]\naccess_log = false\n",
        origin.addr
    )
    .unwrap();
    // A file, not a pipe: a full pipe would block the child's logging and stall it.
    let log_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("prlimit")
        .args(["--nofile=256:256", "--"])
        .arg(bin())
        .args(["run", "--config"])
        .arg(config.path())
        .stdout(Stdio::null())
        .stderr(log_file.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (port, _) = reported_addrs(log_file.path(), false).await;

    // 400 clients from 200 addresses, each with a request the origin holds for 4 s: every
    // admitted one needs a second descriptor towards the origin.
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..400u32 {
        clients.spawn(async move {
            let src = format!("127.0.{}.{}", 5 + i % 2, i / 2 + 1);
            let mut s = connect_from(&src, port).await.ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .ok()?;
            let mut out = Vec::new();
            let t = Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut out)).await;
            let head = String::from_utf8_lossy(&out[..out.len().min(12)]).into_owned();
            Some((head, r.is_err(), t.elapsed().as_millis()))
        });
    }

    // Pinned: the descriptor budget has capped admission and accepting paused.
    let log_path = log_file.path().to_path_buf();
    assert!(
        eventually(Duration::from_secs(10), || {
            std::fs::read_to_string(&log_path)
                .is_ok_and(|l| l.contains("global connection cap reached"))
        })
        .await,
        "the proxy never reached its connection cap"
    );
    let before = cpu_ticks(pid);
    // The measuring window, not a wait for something to happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    assert!(child.try_wait().unwrap().is_none(), "breakwater exited");
    // 2 s at 100 ticks/s: 5 % is 10 ticks.
    assert!(
        used < 10,
        "breakwater used {used} ticks of CPU in 2 s while pinned at its limit"
    );

    let mut outcomes = std::collections::BTreeMap::new();
    while let Some(r) = clients.join_next().await {
        if let Some((head, timed_out, ms)) = r.unwrap() {
            let e = outcomes.entry((head, timed_out)).or_insert((0, 0u128));
            e.0 += 1;
            e.1 = e.1.max(ms);
        }
    }
    eprintln!("client outcomes (head, timed out) -> (count, slowest ms): {outcomes:?}");
    // Everyone left: a new client is served again.
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            try_get_from("127.0.9.1", port).await == Some(200)
        })
        .await,
        "not serving again after clients left"
    );
    assert!(child.try_wait().unwrap().is_none(), "breakwater exited");
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(log_file.path()).unwrap();
    eprintln!(
        "{}",
        log.lines()
            .filter(|l| !l.contains("upstream request failed"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!(
        "502 lines: {}",
        log.matches("upstream request failed").count()
    );
    assert!(
        log.contains("[admission] max_connections 50000 does not fit RLIMIT_NOFILE 256"),
        "{log}"
    );
}
