//! Breakwater as a real process: the CLI contract, signals, memory while streaming, and the
//! listening sockets' options read back from the kernel.
// Tests signal the binaries they start (kill(2)).
#![allow(unsafe_code)]

mod support;

use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Response;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn check(text: &str) -> (i32, String, String) {
    let f = write_config(text);
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    let path = f.path().display().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path, "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn check_warns_about_what_works_but_was_probably_not_meant() {
    let up = "[upstreams.app]\nservers = [\"127.0.0.1:3000\", \"127.0.0.2:3000\"]\n";
    let (code, stdout, stderr) = check(&format!(
        "{up}pool_max = 10000\n[admission]\nallow = [\"10.0.0.1/8\"]\n"
    ));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: FILE:5:10: `admission.allow`: 10.0.0.1/8 has host bits set: it is read as the network 10.0.0.0/8"),
        "{stderr}"
    );
    // The descriptor budget as `run` would apply it, blaming the key that does not fit.
    assert!(stdout.contains("fds       RLIMIT_NOFILE"), "{stdout}");
    assert!(stdout.contains("origin pools 20000"), "{stdout}");
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    if 20_000 >= hard / 10 * 9 / 2 {
        // The pools take most descriptors: the advice names pool_max, not max_connections.
        assert!(
            stderr.contains("[upstreams.app] pool_max 10000 x 2 servers is the largest"),
            "{stderr}"
        );
    } else {
        assert!(!stderr.contains("pool_max 10000 x 2"), "{stderr}");
    }
}

/// `[runtime] express_above` unset: 32 open connections for each worker thread, as `check`
/// reports it; set, as set.
#[test]
fn express_above_defaults_to_32_a_worker_thread() {
    let up = "[upstreams.app]\nservers = [\"127.0.0.1:3000\"]\n";
    for (runtime, want) in [
        ("worker_threads = 3", "express_above 96 "),
        ("worker_threads = 1", "express_above 32 "),
        ("worker_threads = 3\nexpress_above = 0", "express_above 0 "),
        ("express_above = 500", "express_above 500 "),
    ] {
        let (code, stdout, stderr) = check(&format!("{up}[runtime]\n{runtime}\n"));
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(want), "{runtime}: {stdout}");
    }
}

#[test]
fn check_accepts_the_shipped_configs() {
    for path in ["config/breakwater.toml", "config/minimal.toml"] {
        let out = Command::new(bin())
            .args(["check", "--config", path])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("valid") && stdout.contains("upstream app"),
            "{stdout}"
        );
    }
}

#[test]
fn bad_configs_name_file_line_key_and_fix() {
    let up = "[upstreams.app]\nservers = [\"127.0.0.1:3000\"]\n";
    let cases = [
        (
            format!("{up}[admision]\nmax_connections = 5\n"),
            "error: FILE:3:2: unknown field `admision`, expected one of",
        ),
        (
            format!("{up}[http]\nmax_conections = 5\n"),
            "error: FILE:4:1: `http.max_conections`: unknown field `max_conections`, expected one of",
        ),
        (
            format!("{up}[http]\nidle_timeout = \"ten seconds\"\n"),
            "error: FILE:4:16: `http.idle_timeout`: invalid duration \"ten seconds\": expected a number with a unit",
        ),
        (
            format!("{up}[[routes]]\npath_prefix = \"/api\"\nupstream = \"api\"\n"),
            "error: FILE:5:12: `routes.upstream`: route names upstream \"api\", which is not defined; defined upstreams: app",
        ),
        (
            format!("[[listeners]]\naddr = \"localhost:8080\"\n{up}"),
            "error: FILE:2:8: `listeners.addr`: invalid address \"localhost:8080\": expected IP:port",
        ),
        (
            "[upstreams.app]\nservers = [\"10.0.0.1\"]\n".to_string(),
            "error: FILE:2:12: `upstreams.app.servers`: invalid server address \"10.0.0.1\": expected host:port",
        ),
        (
            format!("{up}[[listeners]]\naddr = \"127.0.0.1:8080\"\nproxy_protocol = \"v2\"\n"),
            "error: FILE:5:18: `listeners.proxy_protocol`: proxy_protocol needs proxy_protocol_from",
        ),
        (
            format!("{up}[[listeners]]\naddr = \"127.0.0.1:8080\"\n[[listeners.certs]]\nnames = [\"a.test\"]\ncert = \"a.pem\"\nkey = \"a.key\"\n"),
            "error: FILE:5:1: [[listeners.certs]] without `tls`",
        ),
        (
            format!("{up}[[listeners]]\naddr = \"127.0.0.1:8080\"\n[admin]\naddr = \"127.0.0.1:8080\"\n"),
            "error: FILE:6:8: `admin.addr`: admin addr 127.0.0.1:8080 is also a listener address",
        ),
        (
            format!("{up}pool_min_idle = 9\npool_max = 4\n"),
            "error: FILE:3:17: `upstreams.app.pool_min_idle`: pool_min_idle 9 is above pool_max 4",
        ),
        (
            format!("{up}pool_max = 100000\n"),
            "error: FILE:3:12: `upstreams.app.pool_max`: pool_max 100000 is out of range: expected 1 to 10000",
        ),
        (
            format!("{up}[runtime]\nexpress_nice = -30\n"),
            "error: FILE:4:16: `runtime.express_nice`: express_nice -30 is out of range: expected a nice value, -20 (most CPU) to 19 (least)",
        ),
        (
            format!("{up}[runtime]\nexpress_accept_above = 20000000\n"),
            "error: FILE:4:24: `runtime.express_accept_above`: express_accept_above 20000000 is out of range: expected 0 (the accept loops always on the lane's thread) to 10000000 open connections",
        ),
        (
            format!("{up}[runtime]\nexpress_above = 20000000\n"),
            "error: FILE:4:17: `runtime.express_above`: express_above 20000000 is out of range: expected 0 (newcomers always on the lane) to 10000000 open connections",
        ),
        (
            "[upstreams.app]\nservers = [\"127.0.0.1:0\"]\n".to_string(),
            "error: FILE:2:12: `upstreams.app.servers`: server address \"127.0.0.1:0\" has port 0",
        ),
        (
            format!("{up}[[routes]]\npath_prefix = \"/a\"\nupstream = \"app\"\n[[routes]]\npath_prefix = \"/a\"\nupstream = \"app\"\n"),
            "error: FILE:7:15: `routes.path_prefix`: this route repeats route 1",
        ),
        (
            format!("{up}[http]\nmax_header_bytes = \"big\"\n"),
            "error: FILE:4:20: `http.max_header_bytes`: invalid type: string \"big\", expected a whole number",
        ),
        (
            format!("{up}[http]\ntrusted_proxies = [\"10.0.0.0/33\"]\n"),
            "error: FILE:4:20: `http.trusted_proxies`: invalid network \"10.0.0.0/33\"",
        ),
    ];
    for (text, want) in cases {
        let (code, _, stderr) = check(&text);
        assert_eq!(code, 64, "{text}");
        assert!(
            stderr.starts_with(want),
            "config:\n{text}\nwanted: {want}\ngot:    {stderr}"
        );
    }
    let (code, _, stderr) = {
        let out = Command::new(bin())
            .args(["check", "--config", "/nonexistent/b.toml"])
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(64));
    assert!(
        stderr.contains("/nonexistent/b.toml: cannot read the config file"),
        "{stderr}"
    );
}

/// A running `breakwater run` child; killed if the test fails early.
struct Running {
    child: Child,
    addr: std::net::SocketAddr,
    _config: tempfile::NamedTempFile,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on a free port and waits until it accepts.
async fn run_binary(upstream: std::net::SocketAddr, extra: &str) -> Running {
    run_binary_under(&[], upstream, extra).await
}

/// The same, started through `wrapper` (a command and its arguments before the binary).
async fn run_binary_under(
    wrapper: &[&str],
    upstream: std::net::SocketAddr,
    extra: &str,
) -> Running {
    let port = closed_port().await;
    let text = format!(
        "[[listeners]]\naddr = \"{port}\"\nshards = 1\n{extra}\n[upstreams.app]\nservers = [\"{upstream}\"]\n[log]\naccess_log = false\n"
    );
    start_with(wrapper, port, write_config(&text)).await
}

/// Starts the binary with `config`, through `wrapper` (if any), and waits until it accepts on
/// `port`.
async fn start_with(
    wrapper: &[&str],
    port: std::net::SocketAddr,
    config: tempfile::NamedTempFile,
) -> Running {
    let mut command = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin());
            c
        }
        None => Command::new(bin()),
    };
    let child = command
        .args(["run", "--config"])
        .arg(config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(port).await.is_ok()
        })
        .await,
        "breakwater did not start listening"
    );
    Running {
        child,
        addr: port,
        _config: config,
    }
}

/// Whether `child` exits within `limit`.
async fn exits_within(child: &mut Child, limit: Duration) -> bool {
    eventually(limit, || child.try_wait().unwrap().is_some()).await
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

const FIFTY_MB: usize = 50 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabytes_each_way_stream_through_in_bounded_memory() {
    // Upload: the origin counts what arrives. Download: the origin generates 50 MB lazily.
    let origin = origin(Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            if req.method() == hyper::Method::POST {
                let mut n = 0usize;
                let mut body = req.into_body();
                while let Some(Ok(f)) = body.frame().await {
                    n += f.data_ref().map_or(0, |d| d.len());
                }
                Response::new(full(n.to_string()))
            } else {
                let stream = futures_util::stream::iter((0..FIFTY_MB / CHUNK).map(|_| {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                        Bytes::from(vec![7u8; CHUNK]),
                    ))
                }));
                Response::new(http_body_util::StreamBody::new(stream).boxed())
            }
        })
    }))
    .await;
    let bw = run_binary(origin.addr, "").await;
    let base = peak_rss_kib(bw.child.id());

    let (mut tx, body) =
        http_body_util::channel::Channel::<Bytes, Box<dyn std::error::Error + Send + Sync>>::new(2);
    tokio::spawn(async move {
        for _ in 0..FIFTY_MB / CHUNK {
            if tx.send_data(Bytes::from(vec![1u8; CHUNK])).await.is_err() {
                return;
            }
        }
    });
    let got = send(bw.addr, request("POST", bw.addr, "/upload", body.boxed())).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), FIFTY_MB.to_string());

    let mut tx = client(bw.addr).await;
    let resp = tx
        .send_request(request("GET", bw.addr, "/download", full("")))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut n = 0;
    while let Some(f) = body.frame().await {
        n += f.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(n, FIFTY_MB);

    let peak = peak_rss_kib(bw.child.id());
    eprintln!("breakwater peak RSS: {base} KiB at start, {peak} KiB after 2 x 50 MB");
    assert!(
        peak < base + 16 * 1024,
        "peak RSS grew from {base} KiB to {peak} KiB: bodies were buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_in_flight_request_then_exits_zero() {
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            Response::new(full("done"))
        })
    }))
    .await;
    let mut bw = run_binary(origin.addr, "[http]\nshutdown_timeout = \"10s\"").await;
    let addr = bw.addr;
    let inflight = tokio::spawn(async move { get(addr, "/slow").await });
    // The request is at the origin when the signal comes.
    assert!(eventually(Duration::from_secs(5), || origin.requests().len() == 1).await);
    // SAFETY: plain kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(bw.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let got = inflight.await.unwrap();
    assert_eq!((got.status, got.text().as_str()), (200, "done"));

    let stderr = bw.child.stderr.take().unwrap();
    assert!(
        exits_within(&mut bw.child, Duration::from_secs(10)).await,
        "breakwater did not exit after SIGTERM"
    );
    let status = bw.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut lines = BufReader::new(tokio::process::ChildStderr::from_std(stderr).unwrap()).lines();
    let mut log = String::new();
    while let Ok(Some(l)) = lines.next_line().await {
        log += &l;
        log.push('\n');
    }
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        log.contains("shutdown complete: all connections drained"),
        "{log}"
    );
}

/// A stop reaches connections that are only open: one that has sent nothing yet (its first
/// read) and a keep-alive one between requests. Timeouts are long here, so only the stop can
/// close them, and the process exits as soon as they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_silent_and_idle_connections_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move { Response::new(full("ok")) })
    }))
    .await;
    let mut bw = run_binary(
        origin.addr,
        "defer_accept = \"0s\"\n[http]\nheader_read_timeout = \"30s\"\nidle_timeout = \"30s\"\nshutdown_timeout = \"20s\"",
    )
    .await;
    // Sends nothing: accepted at once (no TCP_DEFER_ACCEPT), waiting for its first bytes.
    let mut silent = tokio::net::TcpStream::connect(bw.addr).await.unwrap();
    // One request answered, then idle in keep-alive.
    let mut idle = tokio::net::TcpStream::connect(bw.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Both are open in the process before the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    // SAFETY: plain kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(bw.child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    for (name, conn) in [("silent", &mut silent), ("idle", &mut idle)] {
        let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "the {name} connection was not closed by the stop: {closed:?}"
        );
    }
    assert!(
        exits_within(&mut bw.child, Duration::from_secs(5)).await,
        "breakwater did not exit after SIGTERM"
    );
    // The first-request grace (0.5 s) is the most a connection without a request waits; the
    // timeouts (30 s) played no part.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(bw.child.wait().unwrap().code(), Some(0));
}

/// Each thread of `pid`: its name, and the text of one of its /proc files (`file`).
fn threads_with(pid: u32, file: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let p = task.path();
        if let (Ok(comm), Ok(text)) = (
            std::fs::read_to_string(p.join("comm")),
            std::fs::read_to_string(p.join(file)),
        ) {
            out.push((comm.trim().to_string(), text));
        }
    }
    out
}

/// Each thread of `pid` by name, with its nice value (/proc/PID/task/TID/stat, field 19).
fn thread_nice(pid: u32) -> Vec<(String, i32)> {
    threads_with(pid, "stat")
        .into_iter()
        .map(|(name, stat)| {
            // After the name's closing parenthesis: field 3 onwards; nice is field 19.
            let after = stat.rsplit(')').next().unwrap();
            let nice = after.split_whitespace().nth(16).unwrap().parse().unwrap();
            (name, nice)
        })
        .collect()
}

/// A request from 127.0.0.9, an address with nothing else open: a newcomer, served on the
/// express lane.
async fn newcomer_is_served(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut c = sock.connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
}

/// The nice values of the lane's thread and of the workers.
fn lane_and_workers(pid: u32) -> (i32, Vec<i32>) {
    let threads = thread_nice(pid);
    let of = |want: &str| -> Vec<i32> {
        threads
            .iter()
            .filter(|(name, _)| name == want)
            .map(|(_, nice)| *nice)
            .collect()
    };
    // The lane's thread is named "breakwater-accept" (15 characters kept by the kernel).
    let lane = of("breakwater-acce");
    assert_eq!(lane.len(), 1, "{threads:?}");
    let workers = of("tokio-rt-worker");
    assert!(!workers.is_empty(), "{threads:?}");
    (lane[0], workers)
}

/// `[runtime] express_nice`: the express lane's thread (accept loops and newcomers) gets the
/// nice value asked for and the workers keep the process's. Where the process may not lower it
/// (no CAP_SYS_NICE and RLIMIT_NICE 0: a container's default, here made with setpriv), the
/// lane stays at the process's, the log says so, and newcomers are still served; RLIMIT_NICE
/// alone (doctor's fix) is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_express_lane_thread_runs_at_the_configured_priority() {
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move { Response::new(full("ok")) })
    }))
    .await;
    let extra = "[runtime]\nexpress_nice = -7";
    let allowed = breakwater::tools::doctor::read_host()
        .lowest_nice
        .is_some_and(|low| low <= -7);
    let drop_cap = [
        "setpriv",
        "--inh-caps=-sys_nice",
        "--bounding-set=-sys_nice",
    ];
    // RLIMIT_NICE 27 allows down to 20 - 27 without the capability (systemd's LimitNICE=-7).
    let rlimit = [
        "prlimit",
        "--nice=27:27",
        "setpriv",
        "--inh-caps=-sys_nice",
        "--bounding-set=-sys_nice",
    ];
    let mut runs = vec![(allowed, run_binary(origin.addr, extra).await)];
    // As root, the refused case too, and the rlimit's grant where this host lets a limit be
    // raised (CAP_SYS_RESOURCE; a container may lack it). setpriv and prlimit are util-linux's,
    // on every Debian.
    let works = |cmd: &[&str]| {
        Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("true")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if allowed && works(&drop_cap) {
        runs.push((false, run_binary_under(&drop_cap, origin.addr, extra).await));
        if works(&rlimit) {
            runs.push((true, run_binary_under(&rlimit, origin.addr, extra).await));
        }
    }
    for (allowed, mut bw) in runs {
        newcomer_is_served(bw.addr).await;
        let (lane, workers) = lane_and_workers(bw.child.id());
        assert!(workers.iter().all(|&n| n == 0), "{workers:?}");
        if allowed {
            assert_eq!(lane, -7);
        } else {
            assert_eq!(lane, 0);
            let _ = bw.child.kill();
            let _ = bw.child.wait();
            let mut log = String::new();
            std::io::Read::read_to_string(&mut bw.child.stderr.take().unwrap(), &mut log).unwrap();
            assert!(
                log.contains("cannot set the express lane thread's nice value"),
                "{log}"
            );
        }
    }
}

/// Each thread of `pid` by name, with the context switches it has made (voluntary and not).
fn thread_switches(pid: u32) -> Vec<(String, u64)> {
    threads_with(pid, "status")
        .into_iter()
        .map(|(name, status)| {
            let switches = status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            (name, switches)
        })
        .collect()
}

/// `[runtime] thread_per_core`: `worker_threads` threads of their own ("breakwater-core-N")
/// serve the connections, each listener shard homed on one, and the main runtime keeps a
/// single worker for the housekeeping. Keep-alive clients are all answered, and both core
/// threads did the serving (each woke for its connections' requests): with two shards, each
/// core its shard's; with one, the shard's connections spread over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_thread_per_core_the_core_threads_serve_the_connections() {
    for shards in [2, 1] {
        core_threads_serve(shards).await;
    }
}

async fn core_threads_serve(shards: usize) {
    let origin = origin(Arc::new(|_req| {
        Box::pin(async move { Response::new(full("ok")) })
    }))
    .await;
    let port = closed_port().await;
    // No express lane: a client's first connection would be served there, not on a core. No
    // warm pool: the origin connections are then opened by the requests, on their own cores,
    // and a core that serves no client connection has nothing to do.
    let config = write_config(&format!(
        "[[listeners]]\naddr = \"{port}\"\nshards = {shards}\n[runtime]\nthread_per_core = true\n\
         worker_threads = 2\nexpress_connections = 0\n[upstreams.app]\nservers = [\"{}\"]\n\
         pool_min_idle = 0\n[log]\naccess_log = false\n",
        origin.addr
    ));
    let bw = start_with(&[], port, config).await;
    let pid = bw.child.id();
    let cores = |threads: &[(String, u64)]| -> Vec<u64> {
        // The kernel keeps 15 characters of a name: "breakwater-core".
        threads
            .iter()
            .filter(|(n, _)| n.starts_with("breakwater-core"))
            .map(|(_, s)| *s)
            .collect()
    };
    // A thread takes its name once it runs: on a loaded machine a core thread may not have yet
    // when the port first answers.
    assert!(
        eventually(Duration::from_secs(5), || cores(&thread_switches(pid))
            .len()
            == 2)
        .await,
        "{:?}",
        thread_switches(pid)
    );
    let before = thread_switches(pid);
    assert_eq!(cores(&before).len(), 2, "{before:?}");
    assert_eq!(
        before
            .iter()
            .filter(|(n, _)| n == "tokio-rt-worker")
            .count(),
        1,
        "the main runtime keeps one worker: {before:?}"
    );
    // 40 connections: SO_REUSEPORT hashes them over both shards, so both cores get some.
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(port).await.unwrap();
            let mut answered = 0;
            for _ in 0..5 {
                assert_eq!(request_on(&mut c, "/").await, Some(200));
                answered += 1;
            }
            answered
        }));
    }
    let mut answered = 0;
    for c in clients {
        answered += c.await.unwrap();
    }
    assert_eq!(answered, 200);
    let after = thread_switches(pid);
    let grew: Vec<u64> = cores(&after)
        .iter()
        .zip(cores(&before))
        .map(|(a, b)| a - b)
        .collect();
    let main = |t: &[(String, u64)]| {
        t.iter()
            .filter(|(n, _)| n == "tokio-rt-worker")
            .map(|(_, s)| *s)
            .sum::<u64>()
    };
    let main_grew = main(&after) - main(&before);
    eprintln!("{shards} shard(s): core threads {grew:?} more switches, main worker {main_grew}");
    assert!(
        main_grew < 20,
        "{shards} shard(s): the main runtime's worker served connections ({main_grew} switches)"
    );
    assert!(
        grew.iter().all(|&g| g >= 5),
        "{shards} shard(s): each core thread serves connections: {grew:?} more switches"
    );
}

#[test]
fn listener_options_are_set_in_the_kernel() {
    let cfg = breakwater::config::ListenerConfig {
        addr: "127.0.0.1:0".parse().unwrap(),
        backlog: 1000,
        defer_accept: Duration::from_secs(1),
        shards: 3,
        tls: None,
        proxy_protocol: None,
    };
    let bound = breakwater::listener::bind(&cfg).unwrap();
    assert_eq!(bound.sockets.len(), 3);
    for s in &bound.sockets {
        assert_eq!(
            s.local_addr().unwrap(),
            bound.local_addr,
            "all shards share one port"
        );
        let sock = socket2::SockRef::from(s);
        assert!(sock.reuse_port().unwrap());
        assert!(breakwater::listener::sockopt::defer_accept(s.as_fd()).unwrap() >= 1);
        let q = breakwater::listener::sockopt::listen_queue(s.as_fd()).unwrap();
        let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(q.backlog, 1000.min(somaxconn));
        assert_eq!(q.queued, 0);
    }
    // Every connection the shards accept has Nagle off (small responses go out at once): set
    // once on the listener, inherited by what accept returns. Defer-accept holds a connection
    // until its first bytes, so the client writes before the accept.
    for s in &bound.sockets {
        s.set_nonblocking(false).unwrap();
    }
    let mut clients = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut accepted = 0;
    while accepted < bound.sockets.len() && std::time::Instant::now() < deadline {
        let mut c = std::net::TcpStream::connect(bound.local_addr).unwrap();
        std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n").unwrap();
        clients.push(c);
        std::thread::sleep(Duration::from_millis(10));
        // SO_REUSEPORT spreads connections over the shards by hash: accept from each one
        // whose queue holds something.
        for s in &bound.sockets {
            let q = breakwater::listener::sockopt::listen_queue(s.as_fd()).unwrap();
            if q.queued > 0 {
                let (conn, _) = s.accept().unwrap();
                assert!(
                    conn.nodelay().unwrap(),
                    "an accepted connection has Nagle on"
                );
                accepted += 1;
            }
        }
    }
    assert!(accepted >= 1, "no connection reached accept");

    let off = breakwater::config::ListenerConfig {
        defer_accept: Duration::ZERO,
        shards: 1,
        ..cfg.clone()
    };
    let bound = breakwater::listener::bind(&off).unwrap();
    assert_eq!(
        breakwater::listener::sockopt::defer_accept(bound.sockets[0].as_fd()).unwrap(),
        0
    );
}

#[test]
fn doctor_json_on_this_host_parses_and_its_exit_code_follows_the_verdicts() {
    for config in ["config/breakwater.toml", "config/minimal.toml"] {
        let out = Command::new(bin())
            .args(["doctor", "--json", "--config", config])
            .output()
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("doctor --json prints JSON");
        let checks = v["checks"].as_array().expect("checks");
        assert!(checks.len() >= 10);
        for c in checks {
            for key in ["setting", "needs", "verdict"] {
                assert!(c[key].is_string(), "{c}");
            }
            // Numbers as numbers; text ("1024 65000 (…)", "?") as text.
            assert!(c["value"].is_u64() || c["value"].is_string(), "{c}");
            // Every non-ok verdict comes with its fix.
            if c["verdict"] == "caps" || c["verdict"] == "advice" {
                assert!(c["fix"].is_string(), "{c}");
            }
        }
        let caps = checks.iter().any(|c| c["verdict"] == "caps");
        assert_eq!(v["ok"], !caps);
        assert_eq!(
            out.status.code(),
            Some(if caps { 1 } else { 0 }),
            "{config}"
        );
        // somaxconn on this host against the default backlog of 65535.
        let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let c = checks
            .iter()
            .find(|c| c["setting"] == "net.core.somaxconn")
            .unwrap();
        assert_eq!(c["verdict"] == "caps", somaxconn < 65535);
    }
}
