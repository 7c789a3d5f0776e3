//! What fleet mode costs, in one run: storms through HAProxy in `mode tcp` with `send-proxy-v2`
//! (round robin, so every client's connections reach all four instances, as the issue's setup
//! has it) to four Breakwater processes, once with `[fleet]` syncing through a local
//! redis-server and once without. (Four instances cannot share one port: Breakwater refuses
//! to bind a port another process listens on.)
//!
//! Run: `cargo bench --bench fleet` (REPS=2 by default). Needs `redis-server` and `haproxy`
//! (Debian). Reports medians per mode: storm connections/s, connect p99, the probe client's
//! p99, and for the fleet: Redis CPU (% of one core), sync pipelines per instance per sync
//! interval, commands/s; then one waiting room's line shared by the four (`ONLY=room` runs
//! only that): the store's cost and the line's order and rate. Written to target/tmp/fleet.md. Loopback only; every storm is bounded
//! (20,000 connections, 30 s at most).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater::tools::storm::{self, Mode};

mod support;
use support::{free_port, Killed};

const INSTANCES: usize = 4;

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU seconds (user + system) one process used so far.
fn cpu_s(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = s.rsplit(')').next().unwrap_or_default().to_string();
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}

/// One metric's value from an instance's /metrics.
fn metric(admin: SocketAddr, name: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return 0.0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Fleet {
    addr: SocketAddr,
    admins: Vec<SocketAddr>,
    _procs: Vec<Killed>,
    _dir: tempfile::TempDir,
}

/// The anchors' limits (support::anchor_config), behind a PROXY-v2 balancer on 127.0.0.1.
fn instance_config(addr: SocketAddr, admin: SocketAddr, origin: SocketAddr, fleet: &str) -> String {
    format!(
        r#"[[listeners]]
addr = "{addr}"
backlog = 65535
shards = 2
proxy_protocol = "v2"
proxy_protocol_from = ["127.0.0.1/32"]
[http]
header_read_timeout = "5s"
idle_timeout = "5s"
[admission]
per_ip_rate = 100
per_ip_max_connections = 200
allow = ["127.0.0.1/32"]
[upstreams.app]
servers = ["{origin}"]
pool_min_idle = 8
pool_max = 16
queue_timeout = "5s"
[admin]
addr = "{admin}"
[log]
level = "warn"
access_log = false
{fleet}"#
    )
}

/// Four instances (each given `extra` config) behind HAProxy, synced through `redis` if given.
fn start_fleet(origin: SocketAddr, redis: Option<&str>, extra: &str) -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut procs = Vec::new();
    let mut admins = Vec::new();
    let mut backends = String::new();
    for i in 0..INSTANCES {
        let (addr, admin) = (free_port(), free_port());
        let fleet = redis.map_or(String::new(), |url| {
            format!("[fleet]\nredis_url = \"{url}\"\ninstance = \"bench-{i}\"\n")
        });
        let path = dir.path().join(format!("{i}.toml"));
        let config = instance_config(addr, admin, origin, &fleet) + extra;
        std::fs::write(&path, config).expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start breakwater");
        procs.push(Killed(child));
        wait_for("breakwater", || std::net::TcpStream::connect(admin).is_ok());
        admins.push(admin);
        backends += &format!("  server s{i} {addr} send-proxy-v2\n");
    }
    let addr = free_port();
    let hcfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &hcfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\nfrontend f\n  bind {addr}\n  \
             default_backend b\nbackend b\n  balance roundrobin\n{backends}"
        ),
    )
    .expect("haproxy config");
    let haproxy = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&hcfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start haproxy");
    procs.push(Killed(haproxy));
    wait_for("haproxy", || std::net::TcpStream::connect(addr).is_ok());
    if redis.is_some() {
        wait_for("fleet sync", || {
            admins
                .iter()
                .all(|a| metric(*a, "breakwater_fleet_up") == 1.0)
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    Fleet {
        addr,
        admins,
        _procs: procs,
        _dir: dir,
    }
}

#[derive(Debug, Default, Clone)]
struct Sample {
    conns_per_s: f64,
    connect_p99: f64,
    probe_p99: f64,
    redis_cpu_pct: f64,
    pipelines_per_interval: f64,
    commands_per_s: f64,
}

/// The waiting room as one line over the four instances: 2,000 shoppers (`storm --mode
/// queue`) join at 500/s from 254 addresses and poll once a second through HAProxy's round
/// robin; the door lets in 200/s. What it costs the store, and what the line promises.
fn room_line(
    rt: &tokio::runtime::Runtime,
    origin: SocketAddr,
    url: &str,
    redis: &Killed,
    dir: &std::path::Path,
    reps: usize,
) -> String {
    let key = dir.join("room.key");
    std::fs::write(&key, "5a".repeat(32)).expect("room key");
    let room = format!(
        "[[waiting_room]]\nname = \"sale\"\nmode = \"queue_all\"\n\
         new_sessions_per_minute = 12000\nrefresh = \"1s\"\nqueue_grace = \"4s\"\n\
         tickets_per_ip = 0\nkeys = [\"{}\"]\n",
        key.display()
    );
    let mut rows = Vec::new();
    for rep in 0..reps {
        // Each repetition a new sale: the last one's line and sessions would fill the room.
        flush(url);
        let fleet = start_fleet(origin, Some(url), &room);
        let sum = |name: &str| -> f64 { fleet.admins.iter().map(|a| metric(*a, name)).sum() };
        let (syncs0, cmds0) = (
            sum("breakwater_fleet_room_syncs_total{result=\"ok\"}"),
            sum("breakwater_fleet_commands_total"),
        );
        let cpu0 = cpu_s(redis.0.id());
        let started = Instant::now();
        let report = rt.block_on(storm::queue::run(storm::queue::QueuePlan {
            target: fleet.addr,
            users: 2_000,
            join_rate: 500,
            sources: "127.0.2.0/24".parse().expect("cidr"),
            path: "/".into(),
            host: "shop.test".into(),
            requests_after: 1,
            abandon: 0.0,
            poll: None,
            duration: Duration::from_secs(60),
        }));
        let wall = started.elapsed().as_secs_f64();
        let row = [
            (cpu_s(redis.0.id()) - cpu0) / wall * 100.0,
            (sum("breakwater_fleet_room_syncs_total{result=\"ok\"}") - syncs0)
                / INSTANCES as f64
                / wall,
            (sum("breakwater_fleet_commands_total") - cmds0) / wall,
            report.admit_rate,
            report.inversions_beyond_poll as f64,
            report.admitted as f64,
            report.wait_s.p99,
        ];
        eprintln!(
            "room rep {rep}: {row:?} still waiting {} lost their place {} errors {}; \
             unleased {}, room syncs failed {}, abandoned {}; within the first ETA {:.0} %, \
             wait / ETA p50 {:.2} p90 {:.2}",
            report.still_waiting,
            report.lost_place,
            report.errors,
            sum("breakwater_room_tickets_unleased_total{room=\"sale\"}"),
            sum("breakwater_fleet_room_syncs_total{result=\"failed\"}"),
            sum("breakwater_room_ended_total{room=\"sale\",how=\"abandoned\"}"),
            report.eta_within * 100.0,
            report.wait_over_eta.p50,
            report.wait_over_eta.p90,
        );
        rows.push(row);
    }
    let m = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    format!(
        "\n| one waiting line over 4 instances: 2,000 shoppers joining at 500/s, door 200/s | fleet on |\n|---|---:|\n\
         | Redis CPU, % of one core | {:.1} |\n| room sync pipelines per instance per second | {:.1} |\n\
         | commands to Redis per second (all instances, limits and rooms) | {:.0} |\n\
         | shoppers let in per second (door 200) | {:.0} |\n| pairs let in out of order beyond a poll and a tick | {:.0} |\n\
         | shoppers let in (of 2,000) | {:.0} |\n| wait p99, s | {:.1} |\n",
        m(0),
        m(1),
        m(2),
        m(3),
        m(4),
        m(5),
        m(6)
    )
}

/// Empties the store (`unix://` URL).
fn flush(url: &str) {
    let path = url.trim_start_matches("unix://");
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("redis socket");
    s.write_all(b"FLUSHALL\r\n").expect("FLUSHALL");
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).expect("FLUSHALL answer");
    assert_eq!(&ok, b"+OK\r\n");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

fn main() {
    for tool in ["redis-server", "haproxy"] {
        if Command::new(tool).arg("-v").output().is_err() {
            eprintln!("skipped: {tool} is not installed");
            return;
        }
    }
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let accepts = Arc::new(AtomicU64::new(0));
    let origin = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin");
        let a = l.local_addr().expect("origin addr");
        tokio::spawn(breakwater::tools::demo::origin(l, accepts.clone()));
        a
    });
    let rdir = tempfile::tempdir().expect("tempdir");
    let sock = rdir.path().join("redis.sock");
    let redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocket",
            ])
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server"),
    );
    wait_for("redis-server", || sock.exists());
    let url = format!("unix://{}", sock.display());
    let mut results: Vec<(&str, Sample)> = Vec::new();
    // ONLY=room: the waiting line alone.
    let storms = std::env::var("ONLY").map_or(true, |o| o != "room");
    for rep in 0..if storms { reps } else { 0 } {
        for mode in ["off", "fleet"] {
            let fleet = start_fleet(origin, (mode == "fleet").then_some(url.as_str()), "");
            let syncs0: f64 = fleet
                .admins
                .iter()
                .map(|a| metric(*a, "breakwater_fleet_syncs_total"))
                .sum();
            let cmds0: f64 = fleet
                .admins
                .iter()
                .map(|a| metric(*a, "breakwater_fleet_commands_total"))
                .sum();
            let cpu0 = cpu_s(redis.0.id());
            let started = Instant::now();
            let plan =
                support::storm_plan(fleet.addr, 20_000, 2_000, "127.0.1.0/24", Mode::Request);
            let report = rt.block_on(storm::run(plan));
            let wall = started.elapsed().as_secs_f64();
            let syncs: f64 = fleet
                .admins
                .iter()
                .map(|a| metric(*a, "breakwater_fleet_syncs_total"))
                .sum::<f64>()
                - syncs0;
            let cmds: f64 = fleet
                .admins
                .iter()
                .map(|a| metric(*a, "breakwater_fleet_commands_total"))
                .sum::<f64>()
                - cmds0;
            let s = Sample {
                conns_per_s: report.connections_per_s,
                connect_p99: report.connect_ms.p99,
                probe_p99: report.probe.as_ref().map_or(0.0, |p| p.latency_ms.p99),
                redis_cpu_pct: if mode == "fleet" {
                    (cpu_s(redis.0.id()) - cpu0) / wall * 100.0
                } else {
                    0.0
                },
                pipelines_per_interval: syncs / INSTANCES as f64 / (wall / 0.05),
                commands_per_s: cmds / wall,
            };
            eprintln!("rep {rep} {mode:>5}: {s:?}");
            results.push((mode, s));
        }
    }
    let pick = |mode: &str, f: fn(&Sample) -> f64| {
        median(
            results
                .iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, s)| f(s))
                .collect(),
        )
    };
    let mut out = String::from(
        "| storm: 20,000 connections, 2,000 in flight, 254 addresses, HAProxy tcp → 4 instances | fleet off | fleet on | on / off |\n|---|---:|---:|---:|\n",
    );
    for (name, f) in [
        (
            "connections/s",
            (|s: &Sample| s.conns_per_s) as fn(&Sample) -> f64,
        ),
        ("connect p99 ms", |s| s.connect_p99),
        ("probe p99 ms", |s| s.probe_p99),
    ] {
        let (off, on) = (pick("off", f), pick("fleet", f));
        out += &format!("| {name} | {off:.1} | {on:.1} | {:.2} |\n", on / off);
    }
    out += &format!(
        "| Redis CPU, % of one core | | {:.1} | |\n| sync pipelines per instance per 50 ms | | {:.2} | |\n| commands to Redis per second (all instances) | | {:.0} | |\n",
        pick("fleet", |s| s.redis_cpu_pct),
        pick("fleet", |s| s.pipelines_per_interval),
        pick("fleet", |s| s.commands_per_s),
    );
    if !storms {
        out.clear();
    }
    out += &room_line(&rt, origin, &url, &redis, rdir.path(), reps);
    println!("{out}");
    let _ = std::fs::create_dir_all("target/tmp");
    let _ = std::fs::write("target/tmp/fleet.md", &out);
}
