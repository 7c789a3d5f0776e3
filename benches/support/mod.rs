//! Shared by the benches: Breakwater as its own release process, configured with the limits of
//! ../shared/anchors (backlog 65535, TCP_DEFER_ACCEPT, 2 shards, 100 new connections/s and 200
//! open per address with 127.0.0.1 exempt, pool of 64, timeouts 5 s / 2 s / 10 s).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)] // the compare bench starts its own, beside HAProxy and nginx
pub struct Breakwater {
    pub addr: SocketAddr,
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl Drop for Breakwater {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Breakwater's config with the anchors' limits, listening on `addr` in front of `origin`.
pub fn anchor_config(addr: SocketAddr, origin: SocketAddr) -> String {
    format!(
        r#"[[listeners]]
addr = "{addr}"
backlog = 65535
defer_accept = "1s"
shards = 2
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
pool_max = 64
# The anchors exempt 127.0.0.1 (wrk's single address) from per-IP limits; Breakwater's allow
# list lifts only rate limits, so the pool share is lifted here too, or wrk would measure it.
pool_share_exempt = ["127.0.0.1/32"]
queue_timeout = "5s"
connect_timeout = "2s"
response_timeout = "10s"
[log]
level = "warn"
access_log = false
"#
    )
}

/// A storm of `connections` from `sources` against `target`, `concurrency` at once, with the
/// probe client on 127.0.0.2 (a new connection and one request every 20 ms).
#[allow(dead_code)] // not every bench storms
pub fn storm_plan(
    target: SocketAddr,
    connections: u64,
    concurrency: usize,
    sources: &str,
    mode: breakwater::tools::storm::Mode,
) -> breakwater::tools::storm::Plan {
    breakwater::tools::storm::Plan {
        target,
        connections,
        concurrency,
        rate: 0,
        sources: sources.parse().expect("cidr"),
        mode,
        path: "/".into(),
        host: "bench".into(),
        hold: Duration::from_secs(8),
        interval: Duration::from_secs(1),
        duration: Duration::from_secs(30),
        probe: Some("127.0.0.2".parse().expect("ip")),
        progress: false,
    }
}

/// Starts Breakwater in front of `origin` and waits until it accepts and its pool is warm.
#[allow(dead_code)]
pub fn anchor_breakwater(origin: SocketAddr) -> Breakwater {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp config");
    config
        .write_all(anchor_config(addr, origin).as_bytes())
        .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["run", "--config"])
        .arg(config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start breakwater");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "breakwater did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The warm pool fills within a few hundred milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    Breakwater {
        addr,
        child,
        _config: config,
    }
}

/// A child process killed (and reaped) when dropped: a bench that panics leaves nothing
/// running.
#[allow(dead_code)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `cmd` started with its output thrown away (a proxy under test must not block on a pipe
/// nobody reads).
#[allow(dead_code)]
pub fn quiet(cmd: &mut Command) -> Option<Child> {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

/// nginx in the foreground with its prefix, error log, temporary folders and config in `dir`.
#[allow(dead_code)]
pub fn nginx(dir: &std::path::Path, conf: &std::path::Path) -> Option<Child> {
    nginx_with(dir, conf, Command::new("nginx"))
}

/// `nginx`, started by `cmd` (`nginx` itself, or a wrapper such as `taskset -c 0 nginx`).
#[allow(dead_code)]
pub fn nginx_with(
    dir: &std::path::Path,
    conf: &std::path::Path,
    mut cmd: Command,
) -> Option<Child> {
    for d in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join(d)).ok()?;
    }
    quiet(
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(conf)
            .args(["-g", "daemon off;"]),
    )
}

/// Waits up to 10 s for `addr` to accept a connection.
#[allow(dead_code)]
pub fn wait_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The median of `v` (the upper one of an even count), None when it is empty.
#[allow(dead_code)]
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| v[v.len() / 2])
}

/// A loopback port free a moment ago (for processes that need a fixed address).
#[allow(dead_code)]
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}
