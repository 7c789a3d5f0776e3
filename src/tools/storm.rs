//! `breakwater storm`: a handshake-storm load tester. It opens many new connections from many
//! source addresses (bound before connect, so one machine looks like many clients), in one of
//! four modes, and measures what each saw; a probe, a legitimate client on its own address,
//! makes one request on a new connection every 20 ms throughout and reports how it fared.
//!
//! Every loop here is bounded by the connection count and by the hard time limit.
//!
//! Why this file is ~570 lines: the four connection modes share one connect/measure/tally path
//! and one report; the shopper mode, which does not, is `storm/queue.rs`. The next split is
//! the report (`Report`, `render`) into `storm/report.rs`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

pub mod queue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Handshake only, then close.
    Connect,
    /// One request per connection.
    #[default]
    Request,
    /// Connect and stay idle for --hold.
    Hold,
    /// Send a header byte every --interval until the server gives up or --hold passes.
    Slowloris,
    /// Shoppers in a waiting room: join, keep the token, poll, get in, make requests, leave
    /// (see `storm/queue.rs`).
    Queue,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub target: SocketAddr,
    pub connections: u64,
    pub concurrency: usize,
    /// New connections per second; 0 = as fast as the concurrency allows.
    pub rate: u64,
    pub sources: IpNet,
    pub mode: Mode,
    pub path: String,
    pub host: String,
    pub hold: Duration,
    pub interval: Duration,
    /// Hard bound on the whole run.
    pub duration: Duration,
    /// Probe source address; None = no probe.
    pub probe: Option<IpAddr>,
    pub progress: bool,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(mut micros: Vec<u64>) -> Percentiles {
        if micros.is_empty() {
            return Percentiles::default();
        }
        micros.sort_unstable();
        let at = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Percentiles {
            count: micros.len(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Errors {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    /// The server closed the connection without a response.
    pub closed: u64,
    /// Source address not usable, ephemeral ports exhausted, and the like.
    pub local: u64,
    pub other: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Probe {
    pub sent: u64,
    pub ok: u64,
    pub success_ratio: f64,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: Mode,
    pub sources: usize,
    pub attempted: u64,
    pub connected: u64,
    /// Request mode: connections that got a response (any status).
    pub answered: u64,
    pub elapsed_s: f64,
    pub connections_per_s: f64,
    pub connect_ms: Percentiles,
    pub request_ms: Percentiles,
    pub errors: Errors,
    /// Status code -> count.
    pub status: std::collections::BTreeMap<u16, u64>,
    /// Hold and slowloris: connections the server closed before the client let go, and after
    /// how long (ms).
    pub closed_by_server: u64,
    pub closed_after_ms: Percentiles,
    pub probe: Option<Probe>,
    /// The hard time limit stopped the run before every connection was made.
    pub cut_by_time_limit: bool,
}

#[derive(Default)]
struct Tally {
    connect_us: Vec<u64>,
    request_us: Vec<u64>,
    closed_after_us: Vec<u64>,
    errors: Errors,
    status: std::collections::BTreeMap<u16, u64>,
    closed_by_server: u64,
    answered: u64,
}

enum Failure {
    Refused,
    Reset,
    Timeout,
    Closed,
    Local,
    Other,
}

fn classify(e: &std::io::Error) -> Failure {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => Failure::Refused,
        ConnectionReset | ConnectionAborted | BrokenPipe => Failure::Reset,
        TimedOut => Failure::Timeout,
        UnexpectedEof => Failure::Closed,
        AddrInUse | AddrNotAvailable => Failure::Local,
        _ => Failure::Other,
    }
}

impl Tally {
    fn fail(&mut self, f: Failure) {
        let e = &mut self.errors;
        match f {
            Failure::Refused => e.refused += 1,
            Failure::Reset => e.reset += 1,
            Failure::Timeout => e.timeout += 1,
            Failure::Closed => e.closed += 1,
            Failure::Local => e.local += 1,
            Failure::Other => e.other += 1,
        }
    }
}

/// Source addresses to bind, in order (network and broadcast addresses of IPv4 nets skipped).
fn source_list(net: IpNet) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = match net {
        IpNet::V4(n) if n.prefix_len() < 31 => n.hosts().map(IpAddr::V4).take(65536).collect(),
        n => n.hosts().take(65536).collect(),
    };
    if out.is_empty() {
        out.push(net.addr());
    }
    out
}

async fn connect_from(src: IpAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Many connections per source address: let the kernel reuse ports left in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(src, 0))?;
    socket.connect(target).await
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one GET and reads the response; Ok(status).
async fn request(s: &mut TcpStream, path: &str, host: &str) -> Result<u16, Failure> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: breakwater-storm\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| classify(&e))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| classify(&e))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        // The status line is all we need; the body is drained until close.
        if buf.len() > 64 * 1024 {
            break;
        }
    }
    let head = std::str::from_utf8(&buf[..buf.len().min(16)]).unwrap_or("");
    head.strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or(Failure::Closed)
}

async fn one(plan: &Plan, src: IpAddr, tally: &Mutex<Tally>, connected: &AtomicU64) {
    let start = Instant::now();
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect_from(src, plan.target)).await;
    let mut s = match conn {
        Err(_) => {
            return tally
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail(Failure::Timeout)
        }
        Ok(Err(e)) => {
            return tally
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail(classify(&e))
        }
        Ok(Ok(s)) => s,
    };
    let connect_us = start.elapsed().as_micros() as u64;
    connected.fetch_add(1, Ordering::Relaxed);
    let outcome = match plan.mode {
        // Queue mode runs its own users (`queue::run`); here it is a plain connect.
        Mode::Connect | Mode::Queue => Ok(None),
        Mode::Request => {
            let t = Instant::now();
            match tokio::time::timeout(RESPONSE_TIMEOUT, request(&mut s, &plan.path, &plan.host))
                .await
            {
                Err(_) => Err(Failure::Timeout),
                Ok(Err(f)) => Err(f),
                Ok(Ok(code)) => Ok(Some((code, t.elapsed().as_micros() as u64))),
            }
        }
        Mode::Hold | Mode::Slowloris => {
            let t = Instant::now();
            let closed = hold(&mut s, plan).await;
            let mut tl = tally.lock().unwrap_or_else(|p| p.into_inner());
            tl.connect_us.push(connect_us);
            if closed {
                tl.closed_by_server += 1;
                tl.closed_after_us.push(t.elapsed().as_micros() as u64);
            }
            return;
        }
    };
    let mut tl = tally.lock().unwrap_or_else(|p| p.into_inner());
    tl.connect_us.push(connect_us);
    match outcome {
        Ok(None) => {}
        Ok(Some((code, us))) => {
            tl.answered += 1;
            tl.request_us.push(us);
            *tl.status.entry(code).or_insert(0) += 1;
        }
        Err(f) => tl.fail(f),
    }
}

/// Holds the connection idle (or trickles a header byte each interval for slowloris); returns
/// whether the server closed it first.
async fn hold(s: &mut TcpStream, plan: &Plan) -> bool {
    let end = Instant::now() + plan.hold;
    let trickle = b"GET / HTTP/1.1\r\nHost: storm\r\nX-Slow: ";
    let mut i = 0;
    let mut buf = [0u8; 512];
    loop {
        let step = match plan.mode {
            Mode::Slowloris => plan.interval,
            _ => plan.hold,
        };
        let wake = (Instant::now() + step).min(end);
        match tokio::time::timeout_at(wake, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {} // a response (e.g. 408): keep reading until close
            Err(_) => {}
        }
        if Instant::now() >= end {
            return false;
        }
        if plan.mode == Mode::Slowloris {
            let byte = trickle.get(i).copied().unwrap_or(b'a');
            i += 1;
            if s.write_all(&[byte]).await.is_err() {
                return true;
            }
        }
    }
}

/// Runs the probe on a thread and runtime of its own. A newcomer's device does not share a run
/// queue with the storm: on the generator's runtime the probe's own connect and read waited
/// behind thousands of storm tasks, and its figures measured the generator as much as the
/// target (p50 18 ms through a proxy whose part of it, timed inside, was under 8 ms).
fn probe_thread(
    src: IpAddr,
    plan: Plan,
    done: Arc<std::sync::atomic::AtomicBool>,
    deadline: Instant,
) -> tokio::sync::oneshot::Receiver<Option<Probe>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("storm-probe".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()
                .map(|rt| rt.block_on(probe(src, plan, done, deadline)));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        // The receiver then reports no probe, as the report says.
        eprintln!("storm: cannot start the probe thread: {e}");
    }
    rx
}

/// The probe: one request on a new connection every 20 ms until the storm is over (`done`) or
/// the deadline.
async fn probe(
    src: IpAddr,
    plan: Plan,
    done: Arc<std::sync::atomic::AtomicBool>,
    deadline: Instant,
) -> Probe {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut lat = Vec::new();
    let (mut sent, mut ok) = (0, 0);
    while Instant::now() < deadline && !done.load(Ordering::Relaxed) {
        tick.tick().await;
        sent += 1;
        let t = Instant::now();
        let attempt = async {
            let mut s = connect_from(src, plan.target).await.ok()?;
            request(&mut s, &plan.path, &plan.host).await.ok()
        };
        if let Ok(Some(code)) = tokio::time::timeout(RESPONSE_TIMEOUT, attempt).await {
            if code < 500 && code != 429 {
                ok += 1;
                lat.push(t.elapsed().as_micros() as u64);
            }
        }
    }
    Probe {
        sent,
        ok,
        success_ratio: if sent == 0 {
            0.0
        } else {
            ok as f64 / sent as f64
        },
        latency_ms: Percentiles::of(lat),
    }
}

pub async fn run(plan: Plan) -> Report {
    let sources = source_list(plan.sources);
    let start = Instant::now();
    let deadline = start + plan.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let connected = Arc::new(AtomicU64::new(0));
    let attempted = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let plan = Arc::new(plan);

    let storm_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe_task = plan
        .probe
        .map(|src| probe_thread(src, (*plan).clone(), storm_done.clone(), deadline));
    let progress = plan.progress.then(|| {
        let (a, c) = (attempted.clone(), connected.clone());
        let total = plan.connections;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                eprint!(
                    "\rstorm: {} / {total} started, {} connected, {:.1}s   ",
                    a.load(Ordering::Relaxed),
                    c.load(Ordering::Relaxed),
                    start.elapsed().as_secs_f64()
                );
            }
        })
    });

    let mut pace = (plan.rate > 0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate as f64));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        i
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut cut = false;
    for n in 0..plan.connections {
        if Instant::now() >= deadline {
            cut = true;
            break;
        }
        if let Some(p) = pace.as_mut() {
            if tokio::time::timeout_at(deadline, p.tick()).await.is_err() {
                cut = true;
                break;
            }
        }
        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, gate.clone().acquire_owned()).await
        else {
            cut = true;
            break;
        };
        attempted.fetch_add(1, Ordering::Relaxed);
        let src = sources[(n as usize) % sources.len()];
        let (plan, tally, connected) = (plan.clone(), tally.clone(), connected.clone());
        tasks.spawn(async move {
            // Every connection ends by the deadline, whatever it is waiting for.
            let _ = tokio::time::timeout_at(deadline, one(&plan, src, &tally, &connected)).await;
            drop(permit);
        });
        // Reap finished tasks as we go so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed();
    storm_done.store(true, Ordering::Relaxed);
    let probe = match probe_task {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|p| p.into_inner()));
    let attempted = attempted.load(Ordering::Relaxed);
    Report {
        target: plan.target.to_string(),
        mode: plan.mode,
        sources: sources.len().min(attempted as usize),
        attempted,
        connected: connected.load(Ordering::Relaxed),
        answered: t.answered,
        elapsed_s: elapsed.as_secs_f64(),
        connections_per_s: attempted as f64 / elapsed.as_secs_f64().max(1e-9),
        connect_ms: Percentiles::of(t.connect_us),
        request_ms: Percentiles::of(t.request_us),
        errors: t.errors,
        status: t.status,
        closed_by_server: t.closed_by_server,
        closed_after_ms: Percentiles::of(t.closed_after_us),
        probe,
        cut_by_time_limit: cut,
    }
}

impl Report {
    /// The table a person reads.
    pub fn render(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms",
                x.p50, x.p90, x.p99, x.max
            )
        };
        let mut s = format!(
            "storm against {} ({:?} mode) from {} source addresses\n\
             connections   {} attempted, {} connected in {:.2} s ({:.0}/s){}\n\
             connect       {}\n",
            self.target,
            self.mode,
            self.sources,
            self.attempted,
            self.connected,
            self.elapsed_s,
            self.connections_per_s,
            if self.cut_by_time_limit {
                "  (cut by the time limit)"
            } else {
                ""
            },
            p(&self.connect_ms),
        );
        if self.mode == Mode::Request {
            let codes: Vec<String> = self
                .status
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            s += &format!(
                "request       {}\nstatus        {}\n",
                p(&self.request_ms),
                if codes.is_empty() {
                    "none".into()
                } else {
                    codes.join(", ")
                }
            );
        }
        if matches!(self.mode, Mode::Hold | Mode::Slowloris) {
            s += &format!(
                "closed by server {}  after {}\n",
                self.closed_by_server,
                p(&self.closed_after_ms)
            );
        }
        let e = &self.errors;
        s += &format!(
            "errors        refused {}  reset {}  timeout {}  closed without response {}  local {}  other {}\n",
            e.refused, e.reset, e.timeout, e.closed, e.local, e.other
        );
        if let Some(pr) = &self.probe {
            s += &format!(
                "probe         {}/{} served ({:.1} %), {}\n",
                pr.ok,
                pr.sent,
                pr.success_ratio * 100.0,
                p(&pr.latency_ms)
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 51.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }

    #[test]
    fn sources_skip_network_and_broadcast() {
        let s = source_list("127.0.1.0/24".parse().unwrap());
        assert_eq!(s.len(), 254);
        assert_eq!(s[0], "127.0.1.1".parse::<IpAddr>().unwrap());
        assert_eq!(source_list("127.0.0.5/32".parse().unwrap()).len(), 1);
    }
}
