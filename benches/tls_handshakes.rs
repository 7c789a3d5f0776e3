//! Full and resumed TLS handshakes per second through Breakwater and through HAProxy (OpenSSL),
//! same ECDSA P-256 certificate, same origin, same machine, in one run; each handshake is
//! followed by one `Connection: close` request so resumption tickets are read. Also the proxy's
//! CPU time per 1,000 handshakes (utime + stime from /proc), which is steadier than a rate on a
//! shared machine. Loopback only; every phase is bounded in time.
//!
//!     cargo bench --bench tls_handshakes            (HAProxy is skipped when not installed)

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PHASE: Duration = Duration::from_secs(4);
const CONCURRENCY: usize = 32;
const REPETITIONS: usize = 3;

mod support;
use support::{free_port, Killed as Proc};

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat; `after` starts at field 3.
    (ticks(11) + ticks(12)) / 100.0
}

async fn origin() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn client_config(roots: &rustls::RootCertStore, resume: bool) -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        c.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(c)
}

/// Handshakes (each with one request) completed in `PHASE`, and how many of them resumed.
async fn load(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> (u64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + PHASE;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (cfg, done, resumed) = (cfg.clone(), done.clone(), resumed.clone());
        tasks.push(tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(cfg);
            while Instant::now() < until {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    continue;
                };
                let name = ServerName::try_from("bench.test").expect("name");
                let Ok(mut tls) = connector.connect(name, tcp).await else {
                    continue;
                };
                let was_resumed =
                    tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                if tls
                    .write_all(b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n")
                    .await
                    .is_err()
                {
                    continue;
                }
                let mut out = Vec::with_capacity(512);
                let _ = tls.read_to_end(&mut out).await;
                if out.starts_with(b"HTTP/1.1 200") {
                    done.fetch_add(1, Ordering::Relaxed);
                    if was_resumed {
                        resumed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (
        done.load(Ordering::Relaxed),
        resumed.load(Ordering::Relaxed),
    )
}

/// Handshakes/s and CPU ms per 1,000, one per repetition, and the resumed count.
type Samples = (Vec<f64>, Vec<f64>, u64);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("P-256 key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .and_then(|p| p.self_signed(&key))
        .expect("certificate");
    let cert_path = dir.path().join("site.pem");
    let key_path = dir.path().join("site.key");
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    let combined = dir.path().join("combined.pem");
    std::fs::write(&combined, format!("{}{}", cert.pem(), key.serialize_pem())).expect("pem");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).expect("root");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let origin = rt.block_on(origin());

    let bw_addr = free_port();
    let bw_cfg = dir.path().join("bw.toml");
    std::fs::write(
        &bw_cfg,
        format!(
            "[[listeners]]\naddr = \"{bw_addr}\"\nshards = 2\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
             [admission]\nallow = [\"127.0.0.1/32\"]\n\
             [upstreams.app]\nservers = [\"{origin}\"]\npool_max = 64\n\
             [log]\nlevel = \"warn\"\naccess_log = false\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .expect("bw config");
    let bw = Proc(
        Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["run", "--config"])
            .arg(&bw_cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start breakwater"),
    );
    wait_listening(bw_addr);

    let hap_addr = free_port();
    let hap = Command::new("haproxy").arg("-v").output().ok().map(|_| {
        let cfg = dir.path().join("haproxy.cfg");
        let mut f = std::fs::File::create(&cfg).expect("haproxy cfg");
        write!(
            f,
            "global\n  nbthread 2\n  tune.ssl.default-dh-param 2048\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 10s\n\
             frontend tls\n  bind {hap_addr} ssl crt {} alpn http/1.1\n  default_backend origin\n\
             backend origin\n  http-reuse always\n  server o {origin} maxconn 64\n",
            combined.display()
        )
        .expect("write haproxy cfg");
        let p = Proc(
            Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start haproxy"),
        );
        wait_listening(hap_addr);
        p
    });

    let mut targets: Vec<(&str, SocketAddr, u32)> = vec![("breakwater", bw_addr, bw.0.id())];
    if let Some(h) = &hap {
        targets.push(("haproxy", hap_addr, h.0.id()));
    }
    // (target, mode) -> rates and CPU ms per 1,000 handshakes, per repetition
    let mut results: std::collections::BTreeMap<(String, &str), Samples> = Default::default();
    for _ in 0..REPETITIONS {
        for mode in ["full", "resumed"] {
            for (name, addr, pid) in &targets {
                let cfg = client_config(&roots, mode == "resumed");
                let cpu0 = cpu_seconds(*pid);
                let (n, resumed) = rt.block_on(load(*addr, cfg));
                let cpu = cpu_seconds(*pid) - cpu0;
                let e = results.entry((name.to_string(), mode)).or_default();
                e.0.push(n as f64 / PHASE.as_secs_f64());
                e.1.push(if n > 0 { cpu * 1e6 / n as f64 } else { 0.0 });
                e.2 += resumed;
            }
        }
    }
    println!(
        "\nTLS handshakes (ECDSA P-256, one request each, {CONCURRENCY} concurrent clients, \
         {REPETITIONS} x {PHASE:?}, medians)\n"
    );
    println!("| target | mode | handshakes/s | proxy CPU ms per 1,000 | resumed |");
    println!("|---|---|---:|---:|---:|");
    for ((name, mode), (rates, cpu, resumed)) in &results {
        println!(
            "| {name} | {mode} | {:.0} | {:.0} | {resumed} |",
            median(rates.clone()),
            median(cpu.clone())
        );
    }
    if hap.is_some() {
        for mode in ["full", "resumed"] {
            let get = |n: &str| results.get(&(n.to_string(), mode));
            if let (Some(b), Some(h)) = (get("breakwater"), get("haproxy")) {
                println!(
                    "\n{mode}: Breakwater/HAProxy handshakes/s = {:.2}x; CPU per handshake = {:.2}x",
                    median(b.0.clone()) / median(h.0.clone()).max(1.0),
                    median(b.1.clone()) / median(h.1.clone()).max(1e-9)
                );
            }
        }
    } else {
        println!("\nhaproxy is not installed: `apt-get install haproxy` to compare.");
    }
}
