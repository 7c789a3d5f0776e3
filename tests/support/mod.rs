//! Test harness: the whole proxy on port 0, origins that count what they see, and clients.
//! Everything talks over real loopback sockets.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater::Config;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> BoxFut + Send + Sync>;

pub fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

// ---------------------------------------------------------------------------------------------
// The proxy

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin]` (bound on 127.0.0.1:0).
    pub admin: Option<SocketAddr>,
    pub admission: Arc<breakwater::admission::Admission>,
    pub engine_upstreams: Vec<Arc<breakwater::upstream::Upstream>>,
    /// The accept loops' counters.
    pub shards: Arc<breakwater::listener::stats::Shards>,
    /// Applies a new config to the running proxy, as SIGHUP does.
    pub reloader: breakwater::Reloader,
    /// What the running engine shares (its metrics registry among it).
    pub shared: Arc<breakwater::Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<breakwater::Shutdown>>,
}

impl Proxy {
    /// Starts Breakwater in this process on 127.0.0.1:0 with `toml` (whose listeners are
    /// replaced by one on port 0 with `shards` sockets).
    pub async fn start(toml: &str) -> Proxy {
        let mut cfg = Config::parse(toml, "test.toml").expect("test config is valid");
        if cfg.listeners.len() == 1 && cfg.listeners[0].addr.port() != 0 {
            cfg.listeners[0].addr = "127.0.0.1:0".parse().unwrap();
        }
        let bound = breakwater::bind_all(&cfg).expect("bind");
        let addr = bound[0].local_addr;
        let (tx, rx) = oneshot::channel::<()>();
        let mut engine = breakwater::Engine::new(cfg);
        let mut admin = None;
        if engine.config().admin.is_some() {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            admin = Some(l.local_addr().unwrap());
            engine = engine.with_admin(l);
        }
        let admission = engine.admission().clone();
        let engine_upstreams = engine.upstreams().to_vec();
        let reloader = engine.reloader();
        let shards = engine.shards().clone();
        let shared = engine.shared();
        let task = tokio::spawn(engine.run(bound, async move {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            admin,
            admission,
            engine_upstreams,
            reloader,
            shards,
            shared,
            stop: Some(tx),
            task,
        }
    }

    pub async fn stop(mut self) -> breakwater::Shutdown {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await.expect("run task").expect("run")
    }

    /// The value of one metric sample, as /metrics shows it: `name` with its labels exactly as
    /// rendered (e.g. `breakwater_send_progress_cuts_total{reason="stalled"}`); 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let text = breakwater::metrics::render(&self.shared.registry);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Origin connections busy with a request (or draining an abandoned response) now.
    pub fn busy(&self) -> usize {
        self.engine_upstreams
            .iter()
            .flat_map(|u| u.snapshot().0)
            .map(|(_, _, busy)| busy)
            .sum()
    }

    /// Requests waiting in the upstreams' queues now.
    pub fn queued(&self) -> usize {
        self.engine_upstreams.iter().map(|u| u.snapshot().1).sum()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// A config with one upstream pointing at `origin` and the given extra TOML.
pub fn config_for(origin: SocketAddr, extra: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n\n{extra}\n\n[upstreams.app]\nservers = [\"{origin}\"]\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Origins

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: hyper::Version,
    pub headers: HeaderMap,
}

pub struct Origin {
    pub addr: SocketAddr,
    /// TCP connections this origin accepted.
    pub accepts: Arc<AtomicUsize>,
    /// Connections open now, and the most ever open at once.
    pub open: Arc<AtomicUsize>,
    pub max_open: Arc<AtomicUsize>,
    /// Requests it received, in order.
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
    pub fn max_open(&self) -> usize {
        self.max_open.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    pub fn stop(self) {}
}

/// An HTTP/1.1 + h2c origin running `handler` for every request.
pub async fn origin(handler: Handler) -> Origin {
    origin_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), handler)
}

pub fn origin_on(listener: TcpListener, handler: Handler) -> Origin {
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a, s, o, m) = (
        accepts.clone(),
        seen.clone(),
        open.clone(),
        max_open.clone(),
    );
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let now = o.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let handler = handler.clone();
            let s = s.clone();
            let o = o.clone();
            conns.spawn(async move {
                struct Closed(Arc<AtomicUsize>);
                impl Drop for Closed {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _closed = Closed(o);
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    s.lock().unwrap().push(Seen {
                        method: req.method().to_string(),
                        uri: req.uri().to_string(),
                        version: req.version(),
                        headers: req.headers().clone(),
                    });
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Origin {
        addr,
        accepts,
        open,
        max_open,
        seen,
        task,
    }
}

/// Answers "METHOD PATH" for GET and echoes the request body back for other methods.
pub async fn echo_origin() -> Origin {
    origin(Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            if req.method() == hyper::Method::GET || req.method() == hyper::Method::HEAD {
                let text = format!("{} {}", req.method(), req.uri());
                Response::new(full(text))
            } else {
                Response::new(req.into_body().map_err(|e| e.into()).boxed())
            }
        })
    }))
    .await
}

/// Answers `body` to everything.
pub async fn text_origin(body: &'static str) -> Origin {
    origin(Arc::new(move |_req| {
        Box::pin(async move { Response::new(full(body)) })
    }))
    .await
}

/// A TCP origin that reads a request head, writes `response` verbatim, then closes (or holds
/// the connection open for `hold` first).
pub async fn raw_origin(response: &'static [u8], hold: Duration) -> Origin {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let a = accepts.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            a.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = read_head(&mut s).await;
                let _ = s.write_all(response).await;
                tokio::time::sleep(hold).await;
            });
        }
    });
    Origin {
        addr,
        accepts,
        open: Arc::default(),
        max_open: Arc::default(),
        seen: Arc::default(),
        task,
    }
}

/// A listener on a fixed address, with SO_REUSEADDR so an origin can come back on the same
/// port after it was stopped.
/// Retries for a while: a stopped origin's listener closes when its task next runs.
pub async fn listen_on(addr: SocketAddr) -> TcpListener {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        match s.bind(addr) {
            Ok(()) => return s.listen(1024).unwrap(),
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("cannot listen on {addr} again: {e}"),
        }
    }
}

/// A free port's address, for something to listen on next.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// An address nothing listens on, for as long as the test process runs: a socket bound to it
/// without listening holds the port (leaked on purpose), so a connect there is refused. A port
/// merely closed again can be handed to another test's listener, or be the source port of a
/// connect to itself (a self-connect succeeds), and a "dead" origin then answered: seen once
/// in CI, a dead server never ejected.
pub fn dead_addr() -> SocketAddr {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&any.into()).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    std::mem::forget(s);
    addr
}

// ---------------------------------------------------------------------------------------------
// Clients

pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A new HTTP/1.1 client connection, for tests that keep it or read the body themselves.
pub async fn client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    tx
}

/// One request on a new HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Got {
    let resp = client(addr)
        .await
        .send_request(req)
        .await
        .expect("response");
    collect(resp).await
}

pub async fn collect(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str) -> Got {
    send(
        addr,
        request(
            "GET",
            addr,
            path,
            Empty::new().map_err(|e| match e {}).boxed(),
        ),
    )
    .await
}

pub fn request(method: &str, addr: SocketAddr, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(body)
        .unwrap()
}

/// A TCP connection from a chosen loopback source address (127.0.x.y), to look like another
/// client to the per-client limits.
pub async fn connect_from(src: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{src}:0").parse().unwrap())?;
    socket.connect(addr).await
}

/// What a client from `src` gets for one request on a new connection: the status, or None when
/// the connection was refused (reset or closed without a response).
pub async fn try_get_from(src: &str, addr: SocketAddr) -> Option<u16> {
    let mut s = connect_from(src, addr).await.ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends one request on an open connection and reads one response head + body of known length.
pub async fn request_on(s: &mut TcpStream, path: &str) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(s))
        .await
        .ok()?
        .ok()?;
    let status = head.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(status)
}

/// Writes raw bytes on a new connection and reads until the peer closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads up to the end of an HTTP head.
pub async fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Path of the built binary, for tests that run Breakwater as a real process.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_breakwater")
}

/// Polls `check` until it holds or `timeout` passes; returns whether it held. For waiting on
/// something another task does, instead of sleeping "long enough".
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    eventually_async(timeout, || std::future::ready(check())).await
}

/// `eventually` for a check that has to await (a request, a connect).
pub async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Writes raw bytes on a new connection and returns the status of the first response, or None
/// when the connection closed without one within `wait`.
pub async fn raw_status(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<u16> {
    let text = raw(addr, bytes, wait).await;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Starts `breakwater run --config <config>` whose listener (and `[admin]`, when `admin`) is on
/// port 0, its stderr into the file `stderr`, and reads the addresses it reports binding from
/// its log: no free port picked here and rebound there (a race). The config's log level must
/// be info or finer.
pub async fn run_bin_on_port_0(
    config: &std::path::Path,
    stderr: &std::path::Path,
    admin: bool,
) -> (std::process::Child, SocketAddr, Option<SocketAddr>) {
    let child = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    let (listener, admin) = reported_addrs(stderr, admin).await;
    (child, listener, admin)
}

/// The listener (and, when `admin`, the admin) address a starting binary reports in its log
/// file `stderr`; waits for them up to 10 s.
pub async fn reported_addrs(
    stderr: &std::path::Path,
    admin: bool,
) -> (SocketAddr, Option<SocketAddr>) {
    // `addr=127.0.0.1:41234` on the line that says what it is, colours or not.
    let addr_on = |log: &str, what: &str, not: Option<&str>| -> Option<SocketAddr> {
        log.lines()
            .filter(|l| l.contains(what) && not.is_none_or(|n| !l.contains(n)))
            .find_map(|l| {
                let rest = l.split("addr=").nth(1)?;
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '\u{1b}')
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            })
    };
    let found = std::sync::Mutex::new((None, None));
    let up = eventually(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(stderr).unwrap_or_default();
        let mut f = found.lock().unwrap();
        f.0 = addr_on(&log, "listening", Some("admin"));
        f.1 = addr_on(&log, "admin listening", None);
        f.0.is_some() && (!admin || f.1.is_some())
    })
    .await;
    let (listener, admin_addr) = *found.lock().unwrap();
    assert!(
        up,
        "breakwater did not report its listeners: {}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
    (listener.unwrap(), admin_addr)
}

/// Starts `breakwater run --config <config>` (plus `extra` arguments), its stderr into the file
/// `stderr` or discarded, and waits until `port` accepts. RUST_LOG is cleared so the config's
/// level decides.
pub async fn run_bin(
    config: &std::path::Path,
    port: SocketAddr,
    stderr: Option<&std::path::Path>,
    extra: &[&str],
) -> std::process::Child {
    let err = match stderr {
        Some(p) => std::process::Stdio::from(std::fs::File::create(p).unwrap()),
        None => std::process::Stdio::null(),
    };
    let child = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(config)
        .args(extra)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(port).is_ok()
    })
    .await;
    assert!(up, "breakwater did not start listening on {port}");
    child
}

/// A response as a test reads it: status, headers (names lower-cased) and body.
pub struct Answer {
    pub status: u16,
    pub headers: std::collections::HashMap<String, String>,
    pub body: String,
}

/// One request on a new connection from `src`, with extra header lines. A connection closed
/// or reset without an answer reads as status 0.
pub async fn ask(addr: SocketAddr, src: &str, path: &str, extra: &[(&str, &str)]) -> Answer {
    let mut s = connect_from(src, addr).await.unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n");
    for (k, v) in extra {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    let mut out = Vec::new();
    if s.write_all(req.as_bytes()).await.is_ok() {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("answer within 5 s");
        if read.is_err() {
            out.clear();
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The body as JSON (the waiting room's API answer).
pub fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_str(&a.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", a.body))
}
