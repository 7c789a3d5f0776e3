//! Connections to one origin server: opening them (HTTP/1.1 or h2c) and the per-server pool
//! bookkeeping. The scheduling across servers and the queue live in `upstream.rs`, under the
//! same lock as this state, so a released connection goes straight to the next waiter.
//!
//! Invariants:
//! - `open` counts connections from the start of their connect until their driver task ends
//!   (the socket is closed), so `open <= pool_max` bounds what the origin sees.
//! - an entry's HTTP/1 sender is out of the pool (`tx: None`) while a lease holds it; an h2c
//!   entry lends clones, up to its stream limit.

use std::future::Future;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::UpstreamBody;
use super::UpstreamError;
use crate::config::UpstreamProtocol;
use crate::timer::LazyDeadline;

/// Concurrent requests Breakwater puts on one h2c connection.
pub const H2_STREAMS: usize = 100;

pub type ResponseFuture = std::pin::Pin<
    Box<
        dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>> + Send,
    >,
>;

pub enum Sender {
    /// With the timer of its exchanges' response deadlines, made at its first and reused by
    /// each after (`timer.rs`): one request at a time, each deadline later than the last.
    H1(http1::SendRequest<UpstreamBody>, Option<LazyDeadline>),
    H2(http2::SendRequest<UpstreamBody>),
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sender::H1(..) => "Sender::H1",
            Sender::H2(_) => "Sender::H2",
        })
    }
}

impl Sender {
    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s, _) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    pub async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::H1(s, _) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    /// Sends `req`; the returned future owns nothing of the sender, so it can outlive the
    /// request's handler (see `upstream::Pending`).
    pub fn send(&mut self, req: Request<UpstreamBody>) -> ResponseFuture {
        match self {
            Sender::H1(s, _) => Box::pin(s.try_send_request(req)),
            Sender::H2(s) => Box::pin(s.try_send_request(req)),
        }
    }

    pub fn is_http1(&self) -> bool {
        matches!(self, Sender::H1(..))
    }

    /// Requests this connection can carry at once.
    pub fn capacity(&self) -> usize {
        match self {
            Sender::H1(..) => 1,
            // hyper exposes the origin's own stream limit only on the connection future, which
            // the driver task owns; if the origin allows fewer, `ready()` waits for a stream.
            Sender::H2(_) => H2_STREAMS,
        }
    }

    fn lend(&mut self) -> Option<Sender> {
        match self {
            Sender::H1(..) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

/// One established connection in a server's pool.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    /// HTTP/1: None while leased. h2c: always Some, lent by clone.
    pub tx: Option<Sender>,
    pub in_use: usize,
    pub requests: u64,
    pub idle_since: Instant,
    /// Driven on the express lane's thread and lent only to its requests (`upstream/express.rs`).
    pub express: bool,
    /// The thread-per-core runtime that drives it (`current_core`); None: the main runtime.
    pub core: Option<usize>,
}

thread_local! {
    /// Set on each thread-per-core runtime's thread (`listener/lanes.rs`): its index and
    /// handle. That runtime is single-threaded, so "on this thread" is "a task of that core".
    static CORE: std::cell::RefCell<Option<(usize, tokio::runtime::Handle)>> =
        const { std::cell::RefCell::new(None) };
}

/// Marks the calling thread as thread-per-core runtime `index`, whose handle is `handle`.
pub fn mark_core_thread(index: usize, handle: tokio::runtime::Handle) {
    CORE.with(|c| *c.borrow_mut() = Some((index, handle)));
}

/// The thread-per-core runtime the caller runs on, if any.
pub fn current_core() -> Option<usize> {
    CORE.with(|c| c.borrow().as_ref().map(|(i, _)| *i))
}

/// The handle of the thread-per-core runtime the caller runs on, if any.
pub fn core_handle() -> Option<tokio::runtime::Handle> {
    CORE.with(|c| c.borrow().as_ref().map(|(_, h)| h.clone()))
}

impl Entry {
    fn usable(&self, max_requests: u64) -> bool {
        let fresh = max_requests == 0 || self.requests < max_requests;
        match &self.tx {
            Some(tx) => fresh && !tx.is_closed() && self.in_use < tx.capacity(),
            None => false,
        }
    }

    /// Lends this connection to one request.
    fn lend(&mut self) -> Option<Sender> {
        let tx = self.tx.as_mut()?;
        let lent = match tx.lend() {
            Some(clone) => clone,
            None => self.tx.take()?,
        };
        self.in_use += 1;
        self.requests += 1;
        Some(lent)
    }
}

/// A connection `Slots::checkout` lent: its id, its sender, whether it carried requests
/// before, and the core that drives it.
#[derive(Debug)]
pub struct Lent {
    pub id: u64,
    pub tx: Sender,
    pub reused: bool,
    pub core: Option<usize>,
}

/// A server's connections, guarded by the upstream's lock.
#[derive(Debug)]
pub struct Slots {
    entries: Vec<Entry>,
    /// Connecting + established, until each connection's socket is closed.
    pub open: usize,
    /// Of `open`, those of the express lane.
    pub express_open: usize,
    pub connecting: usize,
    /// Requests holding a connection of this server now.
    pub busy: usize,
    /// Requests after which a connection is retired; 0 = never.
    pub max_requests: u64,
    /// No warm refill before this (after a failed warm connect).
    pub refill_after: Instant,
    /// The connect pacing bucket (`max_connect_rate`): tokens left, and when it was topped up.
    /// None until the first connect, which finds it full.
    pub tokens: Option<(f64, Instant)>,
    /// Where the entry last given back is (a hint: an index that a removal may have made
    /// stale, so whatever is there is checked like any other entry). `room_core` and
    /// `checkout` look there first.
    hint: usize,
    /// Entries holding their sender (`tx` Some): none, and no entry has room, without a look.
    ///
    /// Why both: while requests queue, the connection just given back is usually the only one
    /// free, and the release that frees it hands it to the next waiter at once. `room_core`
    /// and then `checkout` each scanned the entries from the back until they met it (half a
    /// full pool on average), and after the grant `room_core` scanned all of them again to
    /// find none. callgrind, wrk's 256 keep-alive connections on a pool of 64 (nginx origin):
    /// ~1,300 of a request's 42.8k instructions.
    senders: usize,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            entries: Vec::new(),
            open: 0,
            express_open: 0,
            connecting: 0,
            busy: 0,
            max_requests: 0,
            refill_after: Instant::now(),
            tokens: None,
            hint: 0,
            senders: 0,
        }
    }
}

impl Slots {
    /// No connection yet; each retired after `max_requests` requests (0: never).
    pub fn new(max_requests: u64) -> Slots {
        Slots {
            max_requests,
            ..Slots::default()
        }
    }

    /// The established connections (changed only through `Slots`, which counts their senders).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// A connection that has just finished connecting.
    pub fn add(&mut self, e: Entry) {
        self.senders += usize::from(e.tx.is_some());
        self.entries.push(e);
    }

    /// Entry `i` out of the pool (`swap_remove`: the last entry takes its place).
    fn drop_entry(&mut self, i: usize) {
        if self.entries.swap_remove(i).tx.is_some() {
            self.senders -= 1;
        }
    }

    /// Counts the senders again after entries went by `retain`.
    fn recount(&mut self) {
        self.senders = self.entries.iter().filter(|e| e.tx.is_some()).count();
    }

    fn senders_counted(&self) -> bool {
        self.senders == self.entries.iter().filter(|e| e.tx.is_some()).count()
    }

    /// Takes a connect token: at most `rate` connects per second, in bursts of up to `rate`.
    pub fn take_connect_token(&mut self, rate: u32) -> bool {
        let rate = f64::from(rate.max(1));
        let now = Instant::now();
        let (tokens, at) = self.tokens.unwrap_or((rate, now));
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate).min(rate);
        if tokens >= 1.0 {
            self.tokens = Some((tokens - 1.0, now));
            true
        } else {
            self.tokens = Some((tokens, now));
            false
        }
    }

    /// A connection of the lane asked for (`express`) with room for a request, the last one
    /// given back first. On a thread-per-core runtime (`core`), one driven there if any is
    /// free: a request lent one driven elsewhere hands its work to that thread and back
    /// (correct, only slower).
    pub fn checkout(&mut self, express: bool, core: Option<usize>) -> Option<Lent> {
        let max = self.max_requests;
        let fits = |e: &Entry| e.express == express && e.usable(max);
        debug_assert!(self.senders_counted());
        let mut pick = None;
        if self
            .entries
            .get(self.hint)
            .is_some_and(|e| fits(e) && e.core == core)
        {
            pick = Some(self.hint);
        } else if self.senders > 0 {
            for (i, e) in self.entries.iter().enumerate().rev() {
                if fits(e) {
                    if e.core == core {
                        pick = Some(i);
                        break;
                    }
                    pick.get_or_insert(i);
                }
            }
        }
        let e = &mut self.entries[pick?];
        let tx = e.lend()?;
        if e.tx.is_none() {
            self.senders -= 1;
        }
        Some(Lent {
            id: e.id,
            tx,
            reused: e.requests > 1,
            core: e.core,
        })
    }

    /// Where a connection the queue may be given (not the express lane's) has room: the core
    /// that drives the one `checkout` would lend first, None for the main runtime. Outer None:
    /// no such connection.
    pub fn room_core(&self) -> Option<Option<usize>> {
        debug_assert!(self.senders_counted());
        let free = |e: &&Entry| !e.express && e.usable(self.max_requests);
        if let Some(e) = self.entries.get(self.hint).filter(free) {
            return Some(e.core);
        }
        if self.senders == 0 {
            return None;
        }
        self.entries.iter().rev().find(free).map(|e| e.core)
    }

    /// Open connections that are not the express lane's.
    pub fn main_open(&self) -> usize {
        self.open.saturating_sub(self.express_open)
    }

    pub fn idle(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.in_use == 0 && e.tx.is_some())
            .count()
    }

    /// Gives a lent connection back. An HTTP/1 sender returns to the pool only when `reusable`
    /// (its response was read to the end); dropping it otherwise lets hyper close the
    /// connection, and its driver task then lowers `open`.
    pub fn checkin(&mut self, id: u64, tx: Option<Sender>, reusable: bool) {
        // From the back: `checkout` lends the last free entry, so under light load the one
        // given back is there, and a scan from the front read every entry (a cache line each,
        // 64 with a full pool: ~60 L1 misses a keep-alive request in callgrind's simulation).
        let Some(i) = self.entries.iter().rposition(|e| e.id == id) else {
            return;
        };
        let max = self.max_requests;
        self.hint = i;
        let e = &mut self.entries[i];
        e.in_use = e.in_use.saturating_sub(1);
        if e.in_use == 0 {
            e.idle_since = Instant::now();
        }
        let retired = max > 0 && e.requests >= max;
        match tx {
            Some(Sender::H1(s, timer)) => {
                if reusable && !retired && !s.is_closed() {
                    if e.tx.replace(Sender::H1(s, timer)).is_none() {
                        self.senders += 1;
                    }
                } else {
                    self.drop_entry(i);
                }
            }
            // An h2c stream ended; the entry keeps its own sender until it is retired.
            Some(Sender::H2(_)) | None => {
                if retired && e.in_use == 0 {
                    self.drop_entry(i);
                }
            }
        }
    }

    /// Drops closed connections, then idle ones unused for `idle_timeout`, least recently used
    /// first, while more than `keep` remain.
    pub fn reap(&mut self, keep: usize, idle_timeout: Duration) {
        self.entries
            .retain(|e| e.in_use > 0 || e.tx.as_ref().is_some_and(|t| !t.is_closed()));
        self.recount();
        let now = Instant::now();
        let mut stale: Vec<(Instant, u64)> = self
            .entries
            .iter()
            .filter(|e| e.in_use == 0 && now.duration_since(e.idle_since) >= idle_timeout)
            .map(|e| (e.idle_since, e.id))
            .collect();
        stale.sort();
        for (_, id) in stale {
            if self.entries.len() <= keep {
                break;
            }
            self.remove(id);
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.entries.retain(|e| e.id != id);
        self.recount();
    }

    /// Closes every connection not in use (an ejected server).
    pub fn clear_idle(&mut self) {
        self.entries.retain(|e| e.in_use > 0);
        self.recount();
    }
}

/// Opens one connection and returns its sender and the task future that drives it; the caller
/// spawns the future and learns from its end that the socket is closed.
pub async fn connect(
    addr: &str,
    protocol: UpstreamProtocol,
    timeout: Duration,
    preface: &[u8],
) -> Result<(Sender, impl Future<Output = ()> + Send + 'static), UpstreamError> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(UpstreamError::Connect)?;
        if !preface.is_empty() {
            // A PROXY protocol header goes before any HTTP byte.
            tokio::io::AsyncWriteExt::write_all(&mut stream, preface)
                .await
                .map_err(UpstreamError::Connect)?;
        }
        // Best effort: a failure only costs latency.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        let server = addr.to_string();
        match protocol {
            UpstreamProtocol::Http1 => {
                let (tx, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(UpstreamError::Handshake)?;
                let drive: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(
                    async move {
                        if let Err(e) = conn.with_upgrades().await {
                            tracing::debug!(server, error = %e, "origin connection ended with an error");
                        }
                    },
                );
                Ok((Sender::H1(tx, None), drive))
            }
            UpstreamProtocol::H2c => {
                let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                    .handshake(io)
                    .await
                    .map_err(UpstreamError::Handshake)?;
                let drive: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(
                    async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(server, error = %e, "origin h2c connection ended with an error");
                        }
                    },
                );
                Ok((Sender::H2(tx), drive))
            }
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| UpstreamError::ConnectTimeout)?
}
