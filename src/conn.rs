//! ③ One task per accepted connection: wraps the socket in the connection clock, reads the
//! first bytes to tell an HTTP/1 head from HTTP/2's preface, serves HTTP/1.1 with hyper's own
//! connection and HTTP/2 (and anything under TLS) through hyper-util's auto builder, and closes
//! gracefully on shutdown. The task owns everything the connection holds, so ending it releases
//! all of it.

pub mod clock;
pub mod roster;
pub mod tls;

use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;

use arc_swap::ArcSwap;

use crate::client::Client;
use crate::config::{Config, HttpConfig};
use crate::proxy::{ConnHold, Proxy};
use clock::{ConnActivity, Timed};

/// At shutdown, how long a connection that has not yet dispatched a request gets to do so.
const FIRST_REQUEST_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How often an HTTP/2 connection is pinged (each PING must be answered within `send_timeout`).
const H2_PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// Everything a reload replaces, swapped whole: new connections and new requests read the one
/// in force, while what is in flight finishes on the one it started with. `engine.rs` builds it.
pub struct Generation {
    pub config: Config,
    pub http: Arc<Builders>,
    /// Routes, upstreams, rooms and the request counters; each request holds it while it runs.
    pub proxy: Arc<Proxy>,
}

/// What the accept loops and connection tasks read from the running server: the generation in
/// force and the drain flag. Narrow on purpose: the wiring (`engine.rs`) holds the rest.
pub struct Server {
    current: Arc<ArcSwap<Generation>>,
    /// True from the shutdown signal on: /readyz answers 503.
    pub draining: watch::Sender<bool>,
    /// The same, for the requests (`Proxy::draining`), which only read it. The roster's phase
    /// says it too, but the proxy stands after this stage and does not see the roster.
    draining_flag: Arc<std::sync::atomic::AtomicBool>,
    /// Every open connection, and where the server is in its life (`roster.rs`): drain sends
    /// HTTP/2 connections GOAWAY, stop closes every connection.
    pub roster: roster::Roster,
}

impl Server {
    pub fn new(
        current: Arc<ArcSwap<Generation>>,
        draining: watch::Sender<bool>,
        draining_flag: Arc<std::sync::atomic::AtomicBool>,
    ) -> Server {
        Server {
            current,
            draining,
            draining_flag,
            roster: roster::Roster::default(),
        }
    }

    /// Drain (`Phase::Draining`) or stop (`Phase::Stopping`) every connection; the flag
    /// /readyz reads goes up with the first.
    pub fn signal(&self, phase: roster::Phase) {
        self.draining_flag
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.draining.send_replace(true);
        self.roster.signal(phase);
    }

    /// The generation in force now.
    pub fn gen(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The proxy of the generation in force, for one request (without taking the generation).
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load().proxy.clone()
    }

    /// Puts `gen` in force for new connections and requests.
    pub fn swap(&self, gen: Arc<Generation>) {
        self.current.store(gen);
    }
}

/// The HTTP server settings shared by every connection, built once from `[http]`.
pub struct Builders {
    /// Either protocol, told apart by hyper-util from the first bytes: under TLS (where they
    /// are already in memory) and for a cleartext HTTP/2 preface.
    pub auto: auto::Builder<TokioExecutor>,
    /// HTTP/1 alone, for a cleartext connection whose first bytes (read by the connection's
    /// clock) are an HTTP/1 head.
    pub http1: http1::Builder,
    /// `[http] http2`: off, every cleartext connection is HTTP/1 without a look.
    pub http2: bool,
}

pub fn builder(cfg: &HttpConfig) -> Builders {
    let mut h1 = http1::Builder::new();
    // The same settings as `auto.http1()` below.
    h1.header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes);
    Builders {
        auto: auto_builder(cfg),
        http1: h1,
        http2: cfg.http2,
    }
}

fn auto_builder(cfg: &HttpConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        // The clock in conn/clock.rs does this job; hyper's timer would also cut idle
        // keep-alive connections at the head deadline.
        .header_read_timeout(None)
        .keep_alive(true)
        // The read buffer bounds the head: a larger head gets 431 from hyper.
        .max_buf_size(cfg.max_header_bytes);
    b.http2()
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        // Rapid-reset (CVE-2023-44487) guard: streams reset before we answered them count
        // against this, and the connection is closed with GOAWAY beyond it.
        .max_pending_accept_reset_streams(Some(cfg.max_concurrent_streams as usize))
        .max_local_error_reset_streams(Some(1024))
        // A peer that stopped answering (half-open, or a middlebox that dropped the flow) is
        // found by PING while a response waits on it, not after the idle timeout.
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(cfg.send_timeout);
    if cfg.http2 {
        b
    } else {
        b.http1_only()
    }
}

/// Serves one admitted connection: the TLS handshake when the listener has one, then HTTP.
///
/// `slots` is whatever admission handed over for this connection (its guards): held until the
/// connection, or a tunnel it became, ends. Generic, so that boxing it happens here in the
/// connection's task, not in the accept loop that spawns it.
pub async fn serve<S: std::any::Any + Send + Sync>(
    mut stream: TcpStream,
    client: Client,
    slots: S,
    tls: Option<Arc<tls::Acceptor>>,
    server: Arc<Server>,
    shutdown: watch::Receiver<bool>,
) {
    // The HTTP settings of the generation in force at accept serve the whole connection; each
    // request picks up the routes and upstreams in force when it arrives.
    // Only the HTTP server settings are kept for the connection's life, not the generation: a
    // keep-alive connection must not keep a reloaded-away generation (its upstreams, and their
    // pools of origin connections) alive.
    let (builder, timeouts) = {
        let gen = server.gen();
        let h = &gen.config.http;
        (
            gen.http.clone(),
            (h.header_read_timeout, h.idle_timeout, h.send_timeout),
        )
    };
    let peer = client.peer;
    let slots: Box<dyn std::any::Any + Send + Sync> = Box::new(slots);
    let activity = Arc::new(ConnActivity::default());
    let Some(acceptor) = tls else {
        let io = Timed::new(stream, activity.clone(), timeouts.0, timeouts.1, timeouts.2);
        // Told apart inside serve_http: a connection clock awaited here and then moved into it
        // would take room in this future twice.
        let proto = if builder.http2 {
            Proto::Sniff
        } else {
            Proto::Http1
        };
        return serve_http(
            io,
            activity,
            (client, slots),
            (false, proto),
            builder,
            server,
            shutdown,
        )
        .await;
    };
    // Boxed: the TLS state machine is several KB, and a future is as large as its largest
    // branch, so unboxed every plain-HTTP connection would carry (and move) it too.
    Box::pin(async move {
        if !acceptor.sniff(&mut stream).await {
            let _ = stream.set_zero_linger();
            return;
        }
        // The clock runs under TLS, so a slow handshake also spends the head deadline.
        let io = Timed::new(stream, activity.clone(), timeouts.0, timeouts.1, timeouts.2);
        let Some(tls) = acceptor.accept(io).await else {
            tracing::debug!(client = %peer, "TLS handshake did not complete");
            return;
        };
        serve_http(
            tls,
            activity,
            (client, slots),
            (true, Proto::Auto),
            builder,
            server,
            shutdown,
        )
        .await;
    })
    .await;
}

/// Which hyper connection serves: hyper-util's (it tells the protocols apart itself) or
/// hyper's HTTP/1 directly; `Sniff`: the first bytes, read by the connection's clock, decide.
/// Cleartext connections (`Sniff`, `Http1`) have their first head read by the clock.
#[derive(Clone, Copy)]
enum Proto {
    Auto,
    Http1,
    Sniff,
}

/// The connection's clock, under whatever serves it, when it is there to read the first bytes
/// (not under TLS: hyper-util's own look reads the plaintext already in memory).
trait Preface {
    fn poll_preface(&mut self, cx: &mut std::task::Context<'_>) -> PollPreface;
}

type PollPreface = std::task::Poll<std::io::Result<Option<bool>>>;

impl Preface for Timed<TcpStream> {
    fn poll_preface(&mut self, cx: &mut std::task::Context<'_>) -> PollPreface {
        self.poll_first_bytes(cx)
    }
}

impl<T> Preface for tokio_rustls::server::TlsStream<T> {
    fn poll_preface(&mut self, _: &mut std::task::Context<'_>) -> PollPreface {
        // Never asked: a TLS connection is served by `Proto::Auto`.
        std::task::Poll::Ready(Ok(Some(true)))
    }
}

/// A cleartext connection's first bytes, read into its clock (`Timed::poll_first_bytes`): is it
/// HTTP/2's preface, and did the server start stopping meanwhile (None: nothing came). Like a
/// connection already in hyper's hands, one accepted just before a stop gets
/// `FIRST_REQUEST_GRACE` for its request (with TCP_DEFER_ACCEPT it has usually arrived).
async fn first_bytes<I: Preface>(
    io: &mut I,
    activity: &ConnActivity,
    roster: &roster::Roster,
) -> (Option<bool>, bool) {
    let first = std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(r) = io.poll_preface(cx) {
            return std::task::Poll::Ready(Some(r));
        }
        // Woken by a stop through the roster (the connection is on it already).
        activity.waker.register(cx.waker());
        if roster.phase() == roster::Phase::Stopping {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Pending
    })
    .await;
    let (read, stopping) = match first {
        Some(r) => (r, false),
        None => (
            tokio::time::timeout(
                FIRST_REQUEST_GRACE,
                std::future::poll_fn(|cx| io.poll_preface(cx)),
            )
            .await
            .unwrap_or(Ok(None)),
            true,
        ),
    };
    match read {
        Ok(proto) => (proto, stopping),
        Err(e) => {
            tracing::debug!(error = %e, "connection ended before its first request");
            (None, stopping)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_http<I>(
    mut io: I,
    activity: Arc<ConnActivity>,
    (client, slots): (Client, Box<dyn std::any::Any + Send + Sync>),
    (tls, proto): (bool, Proto),
    http: Arc<Builders>,
    server: Arc<Server>,
    shutdown: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Preface + Unpin + Send + 'static,
{
    // On the roster from here: a drain or stop now reaches this connection.
    let _enrolled = server.roster.enrol(&activity);
    let (proto, stopping) = match proto {
        // HTTP/1 alone (`[http] http2 = false`) reads its first head here too: a trickled one
        // then costs no hyper connection until it is whole (`Timed::poll_first_bytes`).
        Proto::Sniff | Proto::Http1 => {
            match first_bytes(&mut io, &activity, &server.roster).await {
                (Some(true), stopping) if matches!(proto, Proto::Sniff) => (Proto::Auto, stopping),
                (Some(_), stopping) => (Proto::Http1, stopping),
                (None, _) => return,
            }
        }
        Proto::Auto => (Proto::Auto, false),
    };
    let peer = client.peer;
    let svc_server = server.clone();
    let hold = Arc::new(ConnHold {
        id: ConnHold::next_id(),
        client,
        // Also what tells the engine this connection is still open (its receivers are
        // counted).
        stop: shutdown,
        tls,
        slots,
        client_value: Default::default(),
    });
    let svc_hold = hold.clone();
    // Seen an HTTP/2 request: such a connection is told to go away (GOAWAY) when draining
    // starts; HTTP/1 responses carry `Connection: close` instead.
    let h2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc_h2 = h2.clone();
    let watch_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        if req.version() == hyper::Version::HTTP_2 {
            svc_h2.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Counted before the future first runs, so the clock never sees a dispatched request
        // as idle.
        let in_flight = activity.begin();
        crate::proxy::handle(
            svc_server.proxy(),
            activity.clone(),
            svc_hold.clone(),
            in_flight,
            req,
        )
    });
    let io = TokioIo::new(io);
    let signals = Signals {
        activity: &watch_activity,
        roster: &server.roster,
        stopping,
        h2: &h2,
    };
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> = match proto {
        // Boxed: hyper-util's connection (HTTP/1 and HTTP/2 in one) is about twice the size
        // of hyper's HTTP/1 one, and a future is as large as its largest branch, so unboxed
        // every plain HTTP/1 connection would carry ~900 B more while it lives (and a
        // 10,000-connection idle flood ~9 MB). Only TLS and cleartext HTTP/2 pay the box.
        Proto::Auto | Proto::Sniff => {
            Box::pin(async move {
                let conn = http.auto.serve_connection_with_upgrades(io, svc);
                tokio::pin!(conn);
                drive(conn, |c| c.graceful_shutdown(), signals).await
            })
            .await
        }
        Proto::Http1 => {
            let conn = http.http1.serve_connection(io, svc).with_upgrades();
            tokio::pin!(conn);
            let r = drive(conn, |c| c.graceful_shutdown(), signals).await;
            r.map_err(Into::into)
        }
    };
    // The slots go back only now, with the socket closed (or later, with its tunnel).
    drop(hold);
    if let Err(e) = result {
        // Timeouts, resets and malformed requests are routine at an edge.
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

/// What tells a connection to stop or go away, and what it has seen (`drive`).
struct Signals<'a> {
    activity: &'a Arc<ConnActivity>,
    /// The connection is on it: a drain or stop sets `activity.signalled` and wakes the task.
    roster: &'a roster::Roster,
    /// The stop came before hyper had the connection (during its first read).
    stopping: bool,
    /// An HTTP/2 request was seen: draining sends GOAWAY.
    h2: &'a std::sync::atomic::AtomicBool,
}

/// Drives a connection to its end: at a stop, lets a connection with no request yet dispatch
/// its first (`FIRST_REQUEST_GRACE`), then shuts it down gracefully; at the start of draining,
/// tells an HTTP/2 one to go away.
///
/// The signals come through the roster, which sets `activity.signalled` and wakes the task:
/// the phase is read at the first poll and then only when that flag is up (polling watch
/// channels here cost a lock on lists every connection shared, see `roster.rs`).
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    graceful: fn(Pin<&mut C>),
    signals: Signals<'_>,
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    let Signals {
        activity,
        roster,
        stopping,
        h2,
    } = signals;
    use std::sync::atomic::Ordering;
    use std::task::Poll;
    if !stopping {
        let (mut first, mut drained) = (true, false);
        let ended = std::future::poll_fn(|cx| {
            // The same task's waker the clock registers (this task polls both).
            activity.waker.register(cx.waker());
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            let fired = activity.signalled.swap(false, Ordering::AcqRel);
            if std::mem::take(&mut first) || fired {
                let phase = roster.phase();
                if phase == roster::Phase::Stopping {
                    return Poll::Ready(None);
                }
                if !drained && phase == roster::Phase::Draining {
                    drained = true;
                    if h2.load(Ordering::Relaxed) {
                        graceful(conn.as_mut());
                        // Polled again to act on it.
                        cx.waker().wake_by_ref();
                    }
                }
            }
            Poll::Pending
        })
        .await;
        if let Some(r) = ended {
            return r;
        }
    }
    // hyper closes an HTTP/1 connection with no request in progress at once, and one accepted
    // just before the stop has its request unread in the socket (with TCP_DEFER_ACCEPT it was
    // accepted because the request arrived): serve that first request (its response says
    // Connection: close) rather than drop it.
    if !activity.started() {
        let grace = tokio::time::sleep(FIRST_REQUEST_GRACE);
        tokio::pin!(grace);
        let mut check = tokio::time::interval(std::time::Duration::from_millis(5));
        let ended = loop {
            tokio::select! {
                r = conn.as_mut() => break Some(r),
                _ = &mut grace => break None,
                _ = check.tick() => if activity.started() { break None },
            }
        };
        if let Some(r) = ended {
            return r;
        }
    }
    graceful(conn.as_mut());
    conn.as_mut().await
}
