//! Operating Breakwater: the drain an orchestrator needs, health endpoints a kubelet can read,
//! and logs fit for files and journald.
//!
//! Why this file is ~570 lines: each test runs a whole drain, a health check or a log format
//! against a real process, and they share its helpers here (the drain's HTTP/1 and HTTP/2
//! cases most of all).
// Tests signal the binaries they start (kill(2)).
#![allow(unsafe_code)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(5);

async fn admin_status(
    admin: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut req = hyper::Request::builder().uri(path).header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let got = send(admin, req.body(full("")).unwrap()).await;
    (got.status, got.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_keeps_accepting_for_the_delay_while_readyz_says_go_away() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[http]\ndrain_delay = \"1500ms\"\nshutdown_timeout = \"2s\"\n[admin]\naddr = \"127.0.0.1:0\"",
    ))
    .await;
    let (addr, admin) = (proxy.addr, proxy.admin.unwrap());
    let ready = eventually_async(Duration::from_secs(5), || async {
        admin_status(admin, "/readyz", None).await.0 == 200
    })
    .await;
    assert!(ready, "never ready");
    // A keep-alive client connected before the signal.
    let mut keep = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(request_on(&mut keep, "/before").await, Some(200));

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    let draining = eventually_async(Duration::from_secs(2), || async {
        let (status, body) = admin_status(admin, "/readyz", None).await;
        status == 503 && body.contains("draining")
    })
    .await;
    assert!(draining, "/readyz did not turn 503");
    // Still accepting during the delay: a new client is served, and told to close.
    let text = raw(addr, b"GET /during HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    // The kept-alive client's next response says close too, and the connection ends.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    keep.write_all(b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, keep.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(
        out.starts_with("http/1.1 200") && out.contains("connection: close"),
        "{out}"
    );

    // After the delay the listener stops accepting, and the drain completes.
    let shutdown = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shutdown, breakwater::Shutdown::Drained);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(try_get_from("127.0.0.1", addr).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_told_to_go_away_when_the_drain_starts_not_when_it_ends() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[http]\ndrain_delay = \"1500ms\"\nshutdown_timeout = \"2s\"",
    ))
    .await;
    let addr = proxy.addr;
    // Cleartext HTTP/2 (prior knowledge), one request answered before the signal.
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(stream).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("http://{addr}/before"))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);

    let started = Instant::now();
    let stopping = tokio::spawn(proxy.stop());
    // GOAWAY, then the connection closes (nothing in flight): long before the drain delay
    // (1.5 s) ends, which is when a connection nobody told would be closed.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let took = started.elapsed();
    assert!(matches!(ended, Ok(Ok(Ok(())))), "{ended:?}");
    assert!(took < Duration::from_millis(1200), "ended after {took:?}");
    // Meanwhile the listener still takes new clients.
    let text = raw(addr, b"GET /during HTTP/1.1\r\nHost: x\r\n\r\n", WAIT).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let shutdown = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shutdown, breakwater::Shutdown::Drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_public_by_default_metrics_keep_the_token() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"s3cret\"",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    assert_eq!(admin_status(admin, "/healthz", None).await.0, 200);
    assert_ne!(admin_status(admin, "/readyz", None).await.0, 401);
    assert_eq!(admin_status(admin, "/metrics", None).await.0, 401);
    assert_eq!(admin_status(admin, "/metrics", Some("s3cret")).await.0, 200);
    proxy.stop().await;

    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"s3cret\"\npublic_health = false",
    ))
    .await;
    assert_eq!(
        admin_status(proxy.admin.unwrap(), "/healthz", None).await.0,
        401
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_can_require_a_live_origin() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(
        origin.addr,
        "[admin]\naddr = \"127.0.0.1:0\"\nready_requires_origin = true",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let ready = eventually_async(Duration::from_secs(5), || async {
        admin_status(admin, "/readyz", None).await.0 == 200
    })
    .await;
    assert!(ready);
    // The origin goes away; traffic finds it down and the instance reports not ready.
    drop(origin);
    let said = std::sync::Mutex::new(String::new());
    let down = eventually_async(Duration::from_secs(10), || async {
        let _ = try_get_from("127.0.0.9", proxy.addr).await;
        let (status, body) = admin_status(admin, "/readyz", None).await;
        if status != 503 {
            return false;
        }
        // Once warm, readiness never falls back to "warming": the only 503 is the origin.
        assert!(!body.contains("warming"), "{body:?}");
        let found = body.contains("origin down");
        *said.lock().unwrap() = body;
        found
    })
    .await;
    assert!(down, "{:?}", said.lock().unwrap());
    proxy.stop().await;
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bw.toml");
    std::fs::write(
        &cfg,
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n",
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref().take(10) {
        let line = line.unwrap();
        let done = line.contains("listening");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("listening addr=127.0.0.1:")),
        "{seen:#?}"
    );
    assert!(!seen.iter().any(|l| l.contains('\u{1b}')), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_follows_the_admin_endpoint() {
    let origin = echo_origin().await;
    let proxy = Proxy::start(&config_for(origin.addr, "[admin]\naddr = \"127.0.0.1:0\"")).await;
    let admin = proxy.admin.unwrap();
    let status = tokio::process::Command::new(bin())
        .args(["healthcheck", "--addr", &admin.to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    proxy.stop().await;
    let gone = dead_addr();
    let out = tokio::process::Command::new(bin())
        .args(["healthcheck", "--addr", &gone.to_string()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unhealthy"));
}

#[test]
fn config_is_found_by_env_and_default_paths_and_interpolates_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bw.toml");
    std::fs::write(
        &cfg,
        "[upstreams.app]\nservers = [\"${APP_ADDR:-127.0.0.1:3000}\"]\n\
         [admin]\naddr = \"0.0.0.0:9901\"\ntoken = \"${ADMIN_TOKEN}\"\n",
    )
    .unwrap();
    let check = |envs: &[(&str, &str)]| {
        let mut c = Command::new(bin());
        c.arg("check")
            .current_dir(dir.path())
            .env_remove("ADMIN_TOKEN");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // No --config, no $BREAKWATER_CONFIG, nothing at the default paths.
    let (code, _, err) = check(&[]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("looked for --config, $BREAKWATER_CONFIG"),
        "{err}"
    );
    // Found through the environment; an unset variable is named with its line.
    let path = cfg.display().to_string();
    let (code, _, err) = check(&[("BREAKWATER_CONFIG", &path)]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(":5:10:") && err.contains("ADMIN_TOKEN is not set"),
        "{err}"
    );
    let (code, out, err) = check(&[("BREAKWATER_CONFIG", &path), ("ADMIN_TOKEN", "s3cret")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("127.0.0.1:3000"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_writes_a_pid_file_and_reload_signals_it_without_stopping_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bw.toml");
    let pid_file = dir.path().join("bw.pid");
    // A file, not a pipe: nothing drains a pipe while the test waits.
    let log = tempfile::NamedTempFile::new().unwrap();
    let origin = echo_origin().await;
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n[upstreams.app]\nservers = [\"{}\"]\n",
            origin.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--pid-file")
        .arg(&pid_file)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    assert!(eventually(WAIT, || pid_file.exists()).await);
    let out = Command::new(bin())
        .args(["reload", "--pid-file"])
        .arg(&pid_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The process handled the signal (it logs the reload) and is still there.
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(log.path()).is_ok_and(|l| l.contains("SIGHUP: "))
        })
        .await,
        "the reload was never logged"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the process"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(!pid_file.exists(), "the pid file outlived the process");
}

#[test]
fn the_container_and_kubernetes_configs_we_ship_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let mut configs = vec![(
        "docker/breakwater.toml".to_string(),
        std::fs::read_to_string("docker/breakwater.toml").unwrap(),
    )];
    // The TOML inside each ConfigMap: the indented block under `breakwater.toml: |`.
    for yaml in [
        "docker/kubernetes/sidecar.yaml",
        "docker/kubernetes/daemonset-proxy-protocol.yaml",
    ] {
        let text = std::fs::read_to_string(yaml).unwrap();
        let block: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("breakwater.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
            .map(|l| l.get(4..).unwrap_or(""))
            .collect();
        assert!(!block.is_empty(), "no config in {yaml}");
        // The secret is mounted in the cluster; here it is a temp file.
        let toml = block.join("\n").replace(
            "/run/secrets/breakwater/token",
            &token.display().to_string(),
        );
        configs.push((yaml.to_string(), toml));
    }
    for (name, toml) in configs {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .env("BREAKWATER_ADMIN_TOKEN", "s3cret")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The unit file at least names the binary's real subcommands and flags.
    let unit = std::fs::read_to_string("docker/breakwater.service").unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("run --config")
            && unit.contains("--pid-file")
    );
}

#[test]
fn a_second_instance_on_the_same_address_is_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = breakwater::Config::parse(
        &format!("[[listeners]]\naddr = \"{port}\"\nshards = 2\n[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n"),
        "t.toml",
    )
    .unwrap();
    let first = breakwater::bind_all(&cfg).expect("the first instance binds");
    let err = breakwater::bind_all(&cfg).expect_err("the second must not share the port");
    assert!(
        err.to_string()
            .contains("another process already listens there"),
        "{err}"
    );
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_replaces_the_process_without_failing_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let origin = echo_origin().await;
    let port = closed_port().await;
    let control = dir.path().join("control.sock");
    let cfg = dir.path().join("bw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"{port}\"\nshards = 2\n[admission]\nallow = [\"127.0.0.0/8\"]\n\
             [upstreams.app]\nservers = [\"{}\"]\n[runtime]\ncontrol_socket = \"{}\"\n\
             [log]\naccess_log = false\n",
            origin.addr,
            control.display()
        ),
    )
    .unwrap();
    let start = |takeover: bool| {
        let mut c = Command::new(bin());
        c.args(["run", "--config"]).arg(&cfg);
        if takeover {
            c.arg("--takeover");
        }
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut old = start(false);
    assert!(
        eventually(Duration::from_secs(10), || control.exists()).await,
        "the old instance did not offer takeover"
    );
    assert!(eventually(WAIT, || std::net::TcpStream::connect(port).is_ok()).await);

    // Clients open new connections back to back, one request each, the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, served) = (stop.clone(), served.clone());
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let src = format!("127.0.3.{}", i + 1);
                match try_get_from(&src, port).await {
                    Some(200) => {
                        ok += 1;
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => failed.push(other),
                }
            }
            (ok, failed)
        }));
    }
    let served_at_least = |n: u32| {
        let served = served.clone();
        move || served.load(std::sync::atomic::Ordering::Relaxed) >= n
    };
    // Traffic is flowing through the old instance before the new one starts.
    assert!(eventually(Duration::from_secs(10), served_at_least(100)).await);
    let mut new = start(true);
    // The old process drains and exits by itself.
    assert!(
        eventually(Duration::from_secs(15), || old
            .try_wait()
            .unwrap()
            .is_some())
        .await,
        "the old instance did not exit"
    );
    let status = old.wait().unwrap();
    assert!(status.success(), "old instance exit: {status}");
    // And keeps flowing through the new one alone.
    let now = served.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(10), served_at_least(now + 100)).await,
        "traffic stopped after the takeover"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} failed connections: {failed:?} ({ok} ok)",
        failed.len()
    );
    assert!(new.try_wait().unwrap().is_none(), "the new instance exited");
    // And the new one offers takeover in its turn.
    assert!(
        eventually(WAIT, || std::os::unix::net::UnixStream::connect(&control)
            .is_ok())
        .await
    );
    let _ = new.kill();
    let _ = new.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_goes_to_its_file_and_is_reopened_on_sigusr1() {
    let dir = tempfile::tempdir().unwrap();
    let origin = echo_origin().await;
    let log = dir.path().join("access.log");
    let cfg = dir.path().join("bw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n[upstreams.app]\nservers = [\"{}\"]\n\
             [runtime]\ncontrol_socket = \"\"\n[log]\naccess_log_path = \"{}\"\n",
            origin.addr,
            log.display()
        ),
    )
    .unwrap();
    let stderr_file = dir.path().join("stderr");
    let (mut child, port, _) = run_bin_on_port_0(&cfg, &stderr_file, false).await;
    assert_eq!(get(port, "/first").await.status, 200);
    assert!(
        eventually(WAIT, || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("/first")))
        .await
    );
    // logrotate moves the file, then signals.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    assert!(eventually(WAIT, || log.exists()).await, "not reopened");
    assert_eq!(get(port, "/second").await.status, 200);
    assert!(
        eventually(WAIT, || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("/second")))
        .await
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/first") && !old.contains("/second"), "{old}");
    let stderr = std::fs::read_to_string(&stderr_file).unwrap();
    assert!(
        !stderr.contains("/first"),
        "access lines leaked to stderr:\n{stderr}"
    );
    let _ = child.kill();
    let _ = child.wait();
}
