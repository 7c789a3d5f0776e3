//! Breakwater against HAProxy and nginx, configured as hardened accept-fronts with the same
//! limits (../shared/anchors), and against the origin directly, in one run on loopback.
//!
//! Run: `cargo bench --bench compare` (REPS=3 by default; ONLY=keepalive,crowd,storm2k,... to pick
//! scenarios; TARGETS=direct,breakwater,haproxy,nginx to pick targets; ORIGIN=nginx for the
//! anchors' own origin, `origin-nginx.conf`, in place of the in-process one). Needs `haproxy`,
//! `nginx` and `wrk` (Debian packages); a missing one is skipped and said so. TARGETS may name
//! `alt` with BREAKWATER_ALT=/path/to/breakwater to compare two builds in one run, and
//! `floor`: a bare proxy on the same crates (hyper server and client, tokio), the least a
//! proxy built on them costs (compare/floor.rs).
//! Writes a markdown table of medians and same-run ratios to target/tmp/compare.md.
//! `SHARDS=1,2,4,8` makes it a scaling run instead (`scale.rs`): each proxy with that many
//! threads (Breakwater shards and workers, HAProxy `nbthread`, nginx `worker_processes`, the
//! floor's workers), pinned to that many CPUs, the load and the origin on the CPUs left;
//! keep-alive and new connections by default; table in target/tmp/scaling.md.
//! (About 630 lines: one runner for five targets, two origins and eight scenarios, which the
//! scaling run reuses; the floor proxy it compares against lives in compare/floor.rs.)
//!
//! What it measures, per target and scenario: requests/s (wrk) or connections/s (storm), the
//! probe client's p50/p99 and success (a new connection and one request every 20 ms from its
//! own address, during storms), the proxy's CPU time per 1,000 requests (utime+stime of its
//! process tree, from /proc), peak RSS of the process tree (sampled every 50 ms), and the
//! origin's accepted connections. The origin (hyper, answering "ok", on a runtime of its own)
//! and the storm generator run in this process, the probe on a thread of its own (as a
//! newcomer's device would be: on the generator's runtime its latency had measured the
//! generator's run queue as much as the target); wrk is its own process. Everything shares the
//! machine's cores, the same way for every target.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater::tools::storm::{self, Mode, Report};

mod support;
use support::{median, storm_plan as plan};

#[path = "compare/floor.rs"]
mod floor;
#[path = "compare/scale.rs"]
mod scale;

const PROXY: &str = "127.0.0.1:18000";
const ORIGIN: &str = "127.0.0.1:18080";
const ANCHORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/anchors");

/// A proxy under test: its process (tree) and what to clean up.
struct Running {
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // The whole tree: nginx workers outlive a killed master and would keep serving
            // the port (SO_REUSEPORT) for the next target.
            // Frozen first, so a master cannot respawn a worker while the tree is killed.
            let pids: Vec<String> = tree(c.id()).iter().map(u32::to_string).collect();
            let _ = Command::new("kill").arg("-STOP").args(&pids).status();
            let _ = Command::new("kill").arg("-9").args(&pids).status();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(PROXY).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Running {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// What follows `prefix` on the first line of the file at `path` that starts with it.
fn proc_line(path: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
}

/// The hard RLIMIT_NOFILE, from /proc/self/limits ("Max open files  soft  hard  files").
fn nofile() -> u64 {
    proc_line("/proc/self/limits", "Max open files")
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(1024)
}

fn render(template: &str, dir: &std::path::Path) -> String {
    template
        .replace("@RUNDIR@", &dir.display().to_string())
        .replace("@NOFILE@", &nofile().to_string())
}

/// The anchors' origin (`origin-nginx.conf`: 127.0.0.1:18080, and its stub_status on 18081).
fn start_nginx_origin() -> Option<Running> {
    let dir = tempfile::tempdir().ok()?;
    let t = std::fs::read_to_string(format!("{ANCHORS}/origin-nginx.conf")).ok()?;
    let cfg = dir.path().join("origin.conf");
    std::fs::write(&cfg, render(&t, dir.path())).ok()?;
    let child = support::nginx(dir.path(), &cfg)?;
    let running = Running {
        child: Some(child),
        _dir: dir,
    };
    ORIGIN
        .parse()
        .is_ok_and(support::wait_listening)
        .then_some(running)
}

/// The nginx origin's accepted connections so far (stub_status), less those the readings
/// made (each is a connection to it).
fn nginx_accepts() -> u64 {
    use std::io::{Read, Write};
    static READINGS: AtomicU64 = AtomicU64::new(0);
    let made = READINGS.fetch_add(1, Ordering::Relaxed) + 1;
    let read = || -> Option<u64> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:18081").ok()?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: origin\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        // "server accepts handled requests\n 16 16 31"
        let mut lines = text
            .lines()
            .skip_while(|l| !l.starts_with("server accepts"));
        lines.nth(1)?.split_whitespace().next()?.parse().ok()
    };
    read().map_or(0, |n: u64| n.saturating_sub(made))
}

fn wait_listening() -> bool {
    if !PROXY.parse().is_ok_and(support::wait_listening) {
        return false;
    }
    // Warm pools and workers settle.
    std::thread::sleep(Duration::from_millis(500));
    true
}

fn start(target: &str) -> Option<Running> {
    start_on(target, None)
}

/// `target` as `start` does; with `scale` (threads, CPU list), with that many threads and
/// pinned to those CPUs (`scale.rs`).
fn start_on(target: &str, scale: Option<(usize, &str)>) -> Option<Running> {
    let dir = tempfile::tempdir().ok()?;
    // The anchors' configs are written for 2 threads.
    let threads = |cfg: String, from: &str, to: &dyn Fn(usize) -> String| match scale {
        Some((n, _)) => cfg.replace(from, &to(n)),
        None => cfg,
    };
    let pinned = |prog: &str| -> Command {
        match scale {
            Some((_, cpus)) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus, prog]);
                c
            }
            None => Command::new(prog),
        }
    };
    let child = match target {
        "direct" => None,
        // "alt": another Breakwater binary (BREAKWATER_ALT=path), for an A/B of a change in
        // the same run.
        "breakwater" | "alt" => {
            let cfg = dir.path().join("breakwater.toml");
            let (proxy, origin) = (PROXY.parse().ok()?, ORIGIN.parse().ok()?);
            let text = threads(support::anchor_config(proxy, origin), "shards = 2", &|n| {
                format!("shards = {n}\n[runtime]\nworker_threads = {n}")
            });
            // (`[runtime]` right after `[[listeners]]`'s keys: the tables after it start anew.)
            std::fs::write(&cfg, text).ok()?;
            let bin = if target == "alt" {
                std::env::var("BREAKWATER_ALT").ok()?
            } else {
                env!("CARGO_BIN_EXE_breakwater").to_string()
            };
            Some(support::quiet(
                pinned(&bin).args(["run", "--config"]).arg(&cfg),
            )?)
        }
        // The same crates with none of Breakwater's work (compare/floor.rs): this binary
        // again, as its own process.
        "floor" => Some(support::quiet(
            pinned(&std::env::current_exe().ok()?.display().to_string())
                .env("COMPARE_FLOOR", format!("{PROXY},{ORIGIN}"))
                .env(
                    "COMPARE_FLOOR_THREADS",
                    scale.map_or(2, |(n, _)| n).to_string(),
                ),
        )?),
        "haproxy" => {
            let t = std::fs::read_to_string(format!("{ANCHORS}/haproxy.cfg")).ok()?;
            let cfg = dir.path().join("haproxy.cfg");
            let text = threads(render(&t, dir.path()), "nbthread 2", &|n| {
                format!("nbthread {n}")
            });
            std::fs::write(&cfg, text).ok()?;
            Some(support::quiet(
                pinned("haproxy").args(["-db", "-f"]).arg(&cfg),
            )?)
        }
        "nginx" => {
            let t = std::fs::read_to_string(format!("{ANCHORS}/nginx.conf")).ok()?;
            let cfg = dir.path().join("nginx.conf");
            let text = threads(render(&t, dir.path()), "worker_processes 2;", &|n| {
                format!("worker_processes {n};")
            });
            std::fs::write(&cfg, text).ok()?;
            Some(support::nginx_with(dir.path(), &cfg, pinned("nginx"))?)
        }
        _ => return None,
    };
    let r = Running { child, _dir: dir };
    if target != "direct" && !wait_listening() {
        eprintln!("{target} did not start listening on {PROXY}: skipped");
        return None;
    }
    Some(r)
}

/// The pids of `root` and all its descendants.
fn tree(root: u32) -> Vec<u32> {
    let mut parent = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                if let Some(after) = stat.rsplit(')').next() {
                    let f: Vec<&str> = after.split_whitespace().collect();
                    if let Some(pp) = f.get(1).and_then(|p| p.parse::<u32>().ok()) {
                        parent.insert(pid, pp);
                    }
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// CPU seconds (user + system) used by the process tree so far.
fn cpu_s(root: u32) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    tree(root)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let after = s.rsplit(')').next()?.to_string();
            let f: Vec<&str> = after.split_whitespace().collect();
            let u: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((u + st) / tick)
        })
        .sum()
}

/// Resident memory of the process tree now, in MB.
fn rss_mb(root: u32) -> f64 {
    tree(root)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

#[derive(Debug, Clone, Default)]
struct Sample {
    /// Requests/s (wrk) or connections/s (storm).
    rate: f64,
    /// Requests served with 200 in the run (for CPU per 1,000).
    requests: f64,
    cpu_ms_per_1000: Option<f64>,
    peak_rss_mb: Option<f64>,
    probe_p50: Option<f64>,
    probe_p99: Option<f64>,
    probe_ok: Option<f64>,
    origin_accepts: u64,
    failed: u64,
}

fn wrk(args: &[&str]) -> Option<(f64, f64)> {
    let out = Command::new("wrk").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())?;
    let total = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())?;
    Some((rps, total))
}

const SCENARIOS: [&str; 8] = [
    "keepalive",
    "newconn",
    "crowd",
    "storm2k",
    "storm10k",
    "idle",
    "slowloris",
    "abusive",
];

fn describe(s: &str) -> &'static str {
    match s {
        "keepalive" => "keep-alive requests, 256 connections, 5 s (wrk)",
        "newconn" => "one request per new connection, 64 at once, 5 s (wrk)",
        "crowd" => "crowd: 30,000 connections at 10,000/s, 254 addresses",
        "storm2k" => "storm: 20,000 connections, 2,000 in flight, 254 addresses",
        "storm10k" => "storm: 20,000 connections, 10,000 in flight, 254 addresses",
        "idle" => "idle flood: 10,000 connections held 8 s, 254 addresses",
        "slowloris" => "slowloris: 1,000 connections, a byte a second, 8 s",
        "abusive" => "abusive address: 10,000 connections from one address",
        _ => "",
    }
}

fn cpu_model() -> String {
    proc_line("/proc/cpuinfo", "model name")
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

/// What wrk offers: its threads, and the proxy's threads it is scaled to (0: the comparison's
/// fixed 256 keep-alive and 64 new connections).
#[derive(Debug, Clone, Copy)]
struct Load {
    wrk_threads: usize,
    scale: usize,
}

const COMPARE_LOAD: Load = Load {
    wrk_threads: 2,
    scale: 0,
};

fn run_one(
    rt: &tokio::runtime::Runtime,
    (scenario, load): (&str, Load),
    target: &str,
    pid: Option<u32>,
    accepts: &dyn Fn() -> u64,
) -> Sample {
    let addr: SocketAddr = if target == "direct" { ORIGIN } else { PROXY }
        .parse()
        .expect("addr");
    let url = format!("http://{addr}/");
    let cpu0 = pid.map(cpu_s);
    let acc0 = accepts();
    // Peak RSS, sampled while the scenario runs.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = pid.map(|p| {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_mb(p));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    });
    let mut s = Sample::default();
    let threads = format!("-t{}", load.wrk_threads);
    let (ka, nc) = match load.scale {
        0 => (256, 64),
        n => ((64 * n).max(256), 64 * n),
    };
    let (ka, nc) = (format!("-c{ka}"), format!("-c{nc}"));
    let storm_plan = match scenario {
        "keepalive" => {
            if let Some((rps, total)) = wrk(&[&threads, &ka, "-d5s", &url]) {
                s.rate = rps;
                s.requests = total;
            }
            None
        }
        "newconn" => {
            if let Some((rps, total)) =
                wrk(&[&threads, &nc, "-d5s", "-H", "Connection: close", &url])
            {
                s.rate = rps;
                s.requests = total;
            }
            None
        }
        // Many clients that each finish before their next connection, at a rate every target
        // keeps up with: what a proxy costs when it is not overrun (every connection a
        // newcomer; `Lanes::express_room`).
        "crowd" => Some(storm::Plan {
            rate: 10_000,
            ..plan(addr, 30_000, 2_000, "127.0.4.0/24", Mode::Request)
        }),
        "storm2k" => Some(plan(addr, 20_000, 2_000, "127.0.1.0/24", Mode::Request)),
        "storm10k" => Some(plan(addr, 20_000, 10_000, "127.0.1.0/24", Mode::Request)),
        "idle" => Some(plan(addr, 10_000, 10_000, "127.0.3.0/24", Mode::Hold)),
        "slowloris" => Some(plan(addr, 1_000, 1_000, "127.0.2.0/24", Mode::Slowloris)),
        "abusive" => Some(plan(addr, 10_000, 500, "127.0.0.66/32", Mode::Request)),
        _ => None,
    };
    if let Some(p) = storm_plan {
        let r: Report = rt.block_on(storm::run(p));
        s.rate = r.connections_per_s;
        s.requests = r.status.get(&200).copied().unwrap_or(0) as f64;
        if let Some(pr) = &r.probe {
            s.probe_p50 = Some(pr.latency_ms.p50);
            s.probe_p99 = Some(pr.latency_ms.p99);
            s.probe_ok = Some(pr.success_ratio * 100.0);
        }
        if scenario.starts_with("storm") || scenario == "crowd" {
            s.failed = r.answered.saturating_sub(s.requests as u64)
                + r.errors.refused
                + r.errors.reset
                + r.errors.closed
                + r.errors.timeout;
        }
    }
    done.store(true, Ordering::Relaxed);
    s.peak_rss_mb = sampler.and_then(|h| h.join().ok());
    if let (Some(p), Some(c0)) = (pid, cpu0) {
        let used = cpu_s(p) - c0;
        if s.requests > 0.0 {
            s.cpu_ms_per_1000 = Some(used * 1000.0 / s.requests * 1000.0);
        }
    }
    s.origin_accepts = accepts().saturating_sub(acc0);
    // Let TIME_WAIT, queues and timers settle between runs.
    std::thread::sleep(Duration::from_secs(1));
    s
}

fn main() {
    if let Ok(spec) = std::env::var("COMPARE_FLOOR") {
        return floor::run(&spec);
    }
    // Before any thread or child exists: they inherit where this process may run.
    let scaling = std::env::var("SHARDS").ok().map(|s| scale::Plan::new(&s));
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let only: Option<Vec<String>> = std::env::var("ONLY")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let targets: Vec<String> = std::env::var("TARGETS").ok().map_or_else(
        || {
            vec![
                "direct".into(),
                "breakwater".into(),
                "haproxy".into(),
                "nginx".into(),
            ]
        },
        |v| v.split(',').map(str::to_string).collect(),
    );
    let scenarios: Vec<&str> = SCENARIOS
        .iter()
        .copied()
        .filter(|s| only.as_ref().is_none_or(|o| o.iter().any(|x| x == s)))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The origin on a runtime of its own: in production it is another machine, and on the
    // generator's runtime its answers waited behind the storm's own tasks, which made every
    // proxy's latency depend on how hard it let the generator work.
    let origin_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("origin")
        .enable_all()
        .build()
        .expect("origin runtime");
    let accepts = Arc::new(AtomicU64::new(0));
    // ORIGIN=nginx: the origin the anchors were written with (2 nginx workers). The in-process
    // origin is a tokio server, which runs a connection it has just accepted before those
    // already busy: a proxy that opens an origin connection per request gets its probe
    // answered ahead of the storm's requests there, one that reuses pooled connections waits
    // among them. nginx serves its connections in the order their bytes arrive.
    let nginx_origin = std::env::var("ORIGIN").is_ok_and(|o| o == "nginx");
    let _origin_nginx = if nginx_origin {
        let Some(o) = start_nginx_origin() else {
            eprintln!("ORIGIN=nginx: cannot start nginx with the anchors' origin-nginx.conf");
            return;
        };
        Some(o)
    } else {
        origin_rt.block_on(async {
            let l = tokio::net::TcpListener::bind(ORIGIN)
                .await
                .expect("bind origin on 127.0.0.1:18080");
            tokio::spawn(breakwater::tools::demo::origin(l, accepts.clone()));
        });
        None
    };
    let count_accepts = || {
        if nginx_origin {
            nginx_accepts()
        } else {
            accepts.load(Ordering::Relaxed)
        }
    };
    if let Some(plan) = scaling {
        let only = only.unwrap_or_else(|| vec!["keepalive".into(), "newconn".into()]);
        let scenarios: Vec<&str> = SCENARIOS
            .iter()
            .copied()
            .filter(|s| only.iter().any(|x| x == s))
            .collect();
        let targets: Vec<String> = targets.into_iter().filter(|t| t != "direct").collect();
        return plan.run(&rt, reps, &targets, &scenarios, &count_accepts);
    }
    let started = Instant::now();
    // (scenario, target) -> samples
    let mut results: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    for rep in 0..reps {
        for target in &targets {
            let Some(running) = start(target) else {
                if rep == 0 {
                    eprintln!("{target}: not available, skipped");
                }
                continue;
            };
            for sc in &scenarios {
                let s = run_one(
                    &rt,
                    (sc, COMPARE_LOAD),
                    target,
                    running.pid(),
                    &count_accepts,
                );
                eprintln!("rep {rep} {target:>10} {sc:>9}: {s:?}");
                results
                    .entry((sc.to_string(), target.clone()))
                    .or_default()
                    .push(s);
            }
        }
    }

    let fmt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
    let mut t = format!(
        "Machine: {} cores, {}; origin: {}; {} repetitions, medians; run took {:.0} s.\n\n\
         | scenario | target | req/s or conn/s | CPU ms / 1,000 req | peak RSS MB | probe p50 / p99 ms | probe ok % | origin accepts | failed |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        if nginx_origin {
            "nginx, the anchors' origin-nginx.conf"
        } else {
            "in-process hyper"
        },
        reps,
        started.elapsed().as_secs_f64()
    );
    for sc in &scenarios {
        for target in &targets {
            let Some(v) = results.get(&(sc.to_string(), target.clone())) else {
                continue;
            };
            let m = |f: &dyn Fn(&Sample) -> Option<f64>| median(v.iter().filter_map(f).collect());
            t += &format!(
                "| {} | {target} | {} | {} | {} | {} / {} | {} | {} | {} |\n",
                describe(sc),
                fmt(m(&|s| Some(s.rate)), 0),
                fmt(m(&|s| s.cpu_ms_per_1000), 1),
                fmt(m(&|s| s.peak_rss_mb), 0),
                fmt(m(&|s| s.probe_p50), 1),
                fmt(m(&|s| s.probe_p99), 1),
                fmt(m(&|s| s.probe_ok), 1),
                fmt(m(&|s| Some(s.origin_accepts as f64)), 0),
                fmt(m(&|s| Some(s.failed as f64)), 0),
            );
        }
    }
    // Same-run ratios: Breakwater over HAProxy and over nginx.
    t += "\n| scenario | rate BW/HAProxy | CPU BW/HAProxy | probe p99 BW/HAProxy | rate BW/nginx | probe p50 BW/nginx |\n|---|---:|---:|---:|---:|---:|\n";
    for sc in &scenarios {
        let get = |target: &str, f: &dyn Fn(&Sample) -> Option<f64>| {
            results
                .get(&(sc.to_string(), target.to_string()))
                .and_then(|v| median(v.iter().filter_map(f).collect()))
        };
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let rate = |s: &Sample| Some(s.rate);
        let cpu = |s: &Sample| s.cpu_ms_per_1000;
        let p99 = |s: &Sample| s.probe_p99;
        let p50 = |s: &Sample| s.probe_p50;
        t += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            describe(sc),
            ratio(get("breakwater", &rate), get("haproxy", &rate)),
            ratio(get("breakwater", &cpu), get("haproxy", &cpu)),
            ratio(get("breakwater", &p99), get("haproxy", &p99)),
            ratio(get("breakwater", &rate), get("nginx", &rate)),
            ratio(get("breakwater", &p50), get("nginx", &p50)),
        );
    }
    println!("{t}");
    let _ = std::fs::write(concat!(env!("CARGO_TARGET_TMPDIR"), "/compare.md"), &t);
}
