//! Keep-alive and new-connection requests per second through Breakwater, each as a ratio to the
//! same load sent straight to the origin in the same run, and the origin connections opened per
//! 10,000 client connections. Run: `cargo bench --bench throughput` (builds the release binary).
//!
//! The origin is a small hyper server in this process; Breakwater runs as its own process with
//! the limits of ../shared/anchors (pool of 64, per-IP limits with 127.0.0.1 exempt, 2 shards).
//! The load generator is a plain tokio client in this process. Everything shares the machine's
//! cores, so the absolute numbers measure the machine; the ratios are the result.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONNECTIONS: usize = 50;
const RUN: Duration = Duration::from_secs(3);

/// The origin: "ok\n" to everything, keep-alive, counting accepted connections.
fn start_origin(accepts: Arc<AtomicUsize>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
            tx.send(l.local_addr().expect("addr")).expect("send addr");
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                accepts.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    let mut buf = vec![0u8; 4096];
                    let mut have = 0;
                    loop {
                        let Ok(n) = s.read(&mut buf[have..]).await else { return };
                        if n == 0 {
                            return;
                        }
                        have += n;
                        // Answer every complete head in the buffer.
                        while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                            let close = find(&buf[..end], b"Connection: close").is_some();
                            let resp: &[u8] = if close {
                                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                            };
                            if s.write_all(resp).await.is_err() || close {
                                return;
                            }
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                        }
                    }
                });
            }
        });
    });
    rx.recv().expect("origin address")
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

/// Reads one response (head + Content-Length body) and returns whether it was a 200.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<bool> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(head.starts_with("http/1.1 200"));
        }
    }
}

/// Requests per second with `CONNECTIONS` keep-alive connections.
async fn keepalive(target: SocketAddr) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(target).await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let mut buf = Vec::new();
            while Instant::now() < end {
                if s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                match read_response(&mut s, &mut buf).await {
                    Some(true) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed) as f64 / RUN.as_secs_f64()
}

/// Requests per second with each request on a new connection (`CONNECTIONS` loops), and the
/// number of client connections made. The server closes first, so TIME_WAIT stays off the
/// client's ephemeral ports.
async fn new_connections(target: SocketAddr) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            while Instant::now() < end {
                let Ok(mut s) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                if s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    .await
                    .is_err()
                {
                    continue;
                }
                if let Some(true) = read_response(&mut s, &mut buf).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = done.load(Ordering::Relaxed);
    (n as f64 / RUN.as_secs_f64(), n)
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let accepts = Arc::new(AtomicUsize::new(0));
    let origin = start_origin(accepts.clone());

    let proxy = support::anchor_breakwater(origin);
    let port = proxy.addr;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ka_direct = rt.block_on(keepalive(origin));
    let ka_proxy = rt.block_on(keepalive(port));
    let (nc_direct, _) = rt.block_on(new_connections(origin));
    let before = accepts.load(Ordering::Relaxed);
    let (nc_proxy, client_conns) = rt.block_on(new_connections(port));
    let origin_conns = accepts.load(Ordering::Relaxed) - before;
    drop(proxy);

    let per_10k = origin_conns as f64 * 10_000.0 / client_conns.max(1) as f64;
    let table = format!(
        "| load ({CONNECTIONS} concurrent, {}s each) | direct to origin | through Breakwater | ratio |\n\
         |---|---|---|---|\n\
         | keep-alive requests/s | {ka_direct:.0} | {ka_proxy:.0} | {:.2} |\n\
         | new-connection requests/s | {nc_direct:.0} | {nc_proxy:.0} | {:.2} |\n\
         | origin connections opened per 10,000 client connections | 10,000 | {per_10k:.1} | |\n",
        RUN.as_secs(),
        ka_proxy / ka_direct,
        nc_proxy / nc_direct,
    );
    println!("{table}");
    let _ = std::fs::write(
        concat!(env!("CARGO_TARGET_TMPDIR"), "/throughput.md"),
        &table,
    );
}
