//! The connection's clock: slowloris and idle timeouts enforced on the socket itself.
//!
//! Why this file is ~520 lines: about 200 of them are its tests, which run the deadlines under
//! tokio's paused clock beside the code that keeps them.
//!
//! hyper's own `header_read_timeout` starts whenever it waits for a request head, including
//! between keep-alive requests, so it cannot give a 5 s head deadline together with a 60 s idle
//! timeout. This wrapper tracks which phase the connection is in and fails the read that is
//! waiting past its deadline, which makes hyper close the connection:
//!
//! - Fresh: accepted, no request yet: the head must be complete `header_read_timeout` after
//!   accept (TCP_DEFER_ACCEPT time is not counted, the kernel held it).
//! - Idle: between requests: closed after `idle_timeout` without a new request byte.
//! - Head: the first byte of the next HTTP/1 head arrived: the head must complete within
//!   `header_read_timeout` of that byte.
//! - Busy: a request is in flight (the proxy holds an `InFlight` guard): no deadline here, the
//!   upstream timeouts govern.
//! - Upgraded: a tunnel (WebSocket): closed after `idle_timeout` without a byte either way.
//!
//! HTTP/2 connections skip the Head phase: PING and WINDOW_UPDATE frames are not request heads.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use crate::proxy::activity::{ConnActivity, InFlight};
use crate::timer::LazyDeadline;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Fresh(Instant),
    Idle(Instant),
    Head(Instant),
    Busy,
    Upgraded,
}

pub struct Timed<T> {
    inner: T,
    send_timeout: Duration,
    /// Armed while a write waits for the client to take bytes (slow-read guard).
    write_sleep: Option<Pin<Box<Sleep>>>,
    activity: Arc<ConnActivity>,
    phase: Phase,
    /// None until the first bytes say whether this is HTTP/2 (its preface) or HTTP/1.
    http2: Option<bool>,
    header_timeout: Duration,
    idle_timeout: Duration,
    last_io: Instant,
    /// The phase's deadline; each keep-alive request moves it later, the timer stays.
    timer: LazyDeadline,
    /// The first bytes, read by `poll_first_bytes` before hyper starts and served to its first
    /// reads; its buffer is freed once they are all served.
    ahead: bytes::BytesMut,
}

/// How much the first read takes: most request heads whole (hyper's own buffer starts at
/// 8 KB; a larger head is read on by hyper). Read on the stack, then kept on the heap only as
/// large as what came: a connection that sends nothing (an idle flood) holds no buffer.
const READ_AHEAD: usize = 4096;

const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

impl<T> Timed<T> {
    pub fn new(
        inner: T,
        activity: Arc<ConnActivity>,
        header_timeout: Duration,
        idle_timeout: Duration,
        send_timeout: Duration,
    ) -> Self {
        let now = Instant::now();
        Timed {
            inner,
            send_timeout,
            write_sleep: None,
            activity,
            phase: Phase::Fresh(now),
            http2: None,
            header_timeout,
            idle_timeout,
            last_io: now,
            timer: LazyDeadline::new(now + header_timeout),
            ahead: bytes::BytesMut::new(),
        }
    }

    /// Reads the connection's first bytes, enough to tell HTTP/2's preface from an HTTP/1
    /// head, under the head deadline; hyper's first reads get them. `Ok(None)`: the client
    /// closed without sending a byte. This replaces hyper-util's own sniff, which reads 24
    /// bytes and leaves the rest of the head to a second `recv` (one syscall more on every
    /// new connection). Cancel-safe: what was read stays here.
    ///
    /// An HTTP/1 head that comes in pieces is read here to its end (up to `READ_AHEAD`), so a
    /// client trickling it (slowloris) holds only the bytes it sent until it finishes or meets
    /// the deadline, not hyper's connection with its 8 KB read buffer (storm --mode slowloris:
    /// 18 KB a connection before).
    pub fn poll_first_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<bool>>>
    where
        T: AsyncRead + Unpin,
    {
        loop {
            let n = self.ahead.len().min(H2_PREFACE_START.len());
            if n > 0 && self.ahead[..n] != H2_PREFACE_START[..n] {
                if self.ahead.len() >= READ_AHEAD || head_complete(&self.ahead) {
                    return Poll::Ready(Ok(Some(false)));
                }
            } else if n == H2_PREFACE_START.len() {
                return Poll::Ready(Ok(Some(true)));
            }
            // What came is kept in `ahead` in the same poll, so a cancelled wait loses nothing.
            let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_AHEAD];
            let mut buf = ReadBuf::uninit(&mut stack);
            match self.poll_read_socket(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // A short prefix of the preface or a partial head, then the end: hyper answers
                // what it is.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Ok((!self.ahead.is_empty()).then_some(false)));
                }
                Poll::Ready(Ok(())) => self.ahead.extend_from_slice(buf.filled()),
            }
        }
    }

    fn update_phase(&mut self) {
        if self.activity.upgraded.load(Ordering::Acquire) {
            self.phase = Phase::Upgraded;
            return;
        }
        let busy = self.activity.in_flight.load(Ordering::Acquire) > 0;
        self.phase = match (self.phase, busy) {
            (_, true) => Phase::Busy,
            (Phase::Busy, false) => Phase::Idle(Instant::now()),
            (p, false) => p,
        };
    }

    fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Fresh(t) | Phase::Head(t) => Some(t + self.header_timeout),
            Phase::Idle(t) => Some(t + self.idle_timeout),
            Phase::Upgraded => Some(self.last_io + self.idle_timeout),
            Phase::Busy => None,
        }
    }
}

/// Whether `b` holds the end of an HTTP/1 head: an empty line, CRLF or bare LF (as hyper
/// accepts). The usual head, read whole, ends the buffer with it: one comparison.
fn head_complete(b: &[u8]) -> bool {
    if b.ends_with(b"\n\r\n") || b.ends_with(b"\n\n") {
        return true;
    }
    let mut from = 0;
    while let Some(p) = b[from..].iter().position(|&c| c == b'\n') {
        from += p + 1;
        if let [b'\n', ..] | [b'\r', b'\n', ..] = &b[from..] {
            return true;
        }
    }
    false
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ahead.is_empty() {
            let n = buf.remaining().min(this.ahead.len());
            buf.put_slice(&this.ahead[..n]);
            bytes::Buf::advance(&mut this.ahead, n);
            if this.ahead.is_empty() {
                // Its buffer goes: a kept-alive connection holds nothing here.
                this.ahead = bytes::BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_read_socket(cx, buf)
    }
}

impl<T: AsyncRead + Unpin> Timed<T> {
    fn poll_read_socket(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self;
        if let Some(why) = this.activity.closing() {
            return Poll::Ready(Err(closed(why)));
        }
        this.update_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    if this.http2.is_none() {
                        let n = got.len().min(H2_PREFACE_START.len());
                        this.http2 = Some(got[..n] == H2_PREFACE_START[..n] && n > 0);
                    }
                    match this.phase {
                        Phase::Idle(_) if this.http2 == Some(false) => {
                            this.phase = Phase::Head(Instant::now())
                        }
                        Phase::Upgraded => this.last_io = Instant::now(),
                        _ => {}
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Register for the end of the last in-flight request, whatever the phase.
                this.activity.waker.register(cx.waker());
                // The request may have finished between update_phase and register.
                this.update_phase();
                let Some(deadline) = this.deadline() else {
                    return Poll::Pending;
                };
                if this.timer.poll_passed(cx, deadline).is_ready() {
                    let what = match this.phase {
                        Phase::Fresh(_) | Phase::Head(_) => "request head not received in time",
                        _ => "idle timeout",
                    };
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)));
                }
                Poll::Pending
            }
        }
    }
}

fn closed(why: crate::proxy::activity::Closing) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, why.reason())
}

impl<T> Timed<T> {
    /// After a write attempt: a write the client does not take within `send_timeout` fails, so
    /// a client that never reads cannot hold its response (and the origin connection feeding
    /// it) forever.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending => {
                let timeout = self.send_timeout;
                let sleep = self
                    .write_sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client did not read its response within send_timeout",
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.write_sleep = None;
                if self.phase == Phase::Upgraded && matches!(r, Ok(n) if n > 0) {
                    self.last_io = Instant::now();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = self.activity.closing() {
            return Poll::Ready(Err(closed(why)));
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(why) = self.activity.closing() {
            return Poll::Ready(Err(closed(why)));
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(why) = self.activity.closing() {
            return Poll::Ready(Err(closed(why)));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // hyper (and TLS, after its close_notify) shuts the write side down just before the
        // connection is dropped, and the close that follows sends the same FIN: one syscall
        // less for every connection that ends (strace of one request per connection: accept4,
        // 2 recvfrom, 2 writev, 2 epoll_ctl, shutdown, close, where nginx makes no shutdown).
        // A tunnel half-closes for real: its client may still be sending.
        if !self.activity.upgraded.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The deadlines under tokio's paused clock: time moves only when every task waits, so each
/// test runs in microseconds and asserts the exact deadline, whatever the machine's load.
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HEAD: Duration = Duration::from_secs(5);
    const IDLE: Duration = Duration::from_secs(60);
    const SEND: Duration = Duration::from_secs(10);

    fn timed(
        capacity: usize,
    ) -> (
        tokio::io::DuplexStream,
        Timed<tokio::io::DuplexStream>,
        Arc<ConnActivity>,
    ) {
        let (client, server) = tokio::io::duplex(capacity);
        let activity = Arc::new(ConnActivity::default());
        let t = Timed::new(server, activity.clone(), HEAD, IDLE, SEND);
        (client, t, activity)
    }

    async fn first_bytes(t: &mut Timed<tokio::io::DuplexStream>) -> io::Result<Option<bool>> {
        std::future::poll_fn(|cx| t.poll_first_bytes(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_bytes_tell_the_protocol_and_reach_the_reader_whole() {
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let (mut client, mut t, _) = timed(64 * 1024);
        client.write_all(head).await.unwrap();
        assert_eq!(first_bytes(&mut t).await.unwrap(), Some(false));
        client.write_all(b"next").await.unwrap();
        let mut got = vec![0u8; head.len() + 4];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..head.len()], head);
        assert_eq!(&got[head.len()..], b"next");
        // Served, the read-ahead buffer is given back.
        assert_eq!(t.ahead.capacity(), 0);

        // HTTP/2's preface, in pieces: decided only once its start is all there.
        let (mut client, mut t, _) = timed(64 * 1024);
        let h2 = tokio::spawn(async move { first_bytes(&mut t).await.map(|p| (p, t)) });
        client.write_all(b"PRI * HT").await.unwrap();
        tokio::task::yield_now().await;
        assert!(!h2.is_finished());
        client.write_all(b"TP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let (proto, mut t) = h2.await.unwrap().unwrap();
        assert_eq!(proto, Some(true));
        let mut preface = [0u8; 24];
        t.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

        // Closed before a byte: nothing to serve; a head that stops short: HTTP/1's to answer.
        let (client, mut t, _) = timed(1024);
        drop(client);
        assert_eq!(first_bytes(&mut t).await.unwrap(), None);
        let (mut client, mut t, _) = timed(1024);
        client.write_all(b"PR").await.unwrap();
        drop(client);
        assert_eq!(first_bytes(&mut t).await.unwrap(), Some(false));
    }

    #[test]
    fn the_end_of_a_head_is_found_with_either_line_ending() {
        for (b, end) in [
            (&b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..], true),
            (b"GET / HTTP/1.1\nhost: x\n\n", true),
            (b"POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\nab", true),
            (b"GET / HTTP/1.1\r\nhost: x\r\n", false),
            (b"GET / HTTP/1.1\r\nhost: x\r\n\r", false),
            (b"GET / HTTP/1.1\r\n", false),
            (b"\r\n", false),
            (b"", false),
        ] {
            assert_eq!(head_complete(b), end, "{:?}", String::from_utf8_lossy(b));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_in_pieces_is_read_to_its_end_before_hyper_gets_it() {
        let (mut client, mut t, _) = timed(64 * 1024);
        let read = tokio::spawn(async move { first_bytes(&mut t).await.map(|p| (p, t)) });
        for piece in [&b"GET / HT"[..], b"TP/1.1\r\nhost:", b" x\r\n"] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if read.is_finished() {
                let r = read.await.unwrap().map(|(p, _)| p);
                panic!("decided before the head ended: {r:?} after {piece:?}");
            }
        }
        client.write_all(b"\r\n").await.unwrap();
        let (proto, mut t) = read.await.unwrap().unwrap();
        assert_eq!(proto, Some(false));
        let head = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let mut got = vec![0u8; head.len()];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], head);

        // A head that never ends meets the head deadline here.
        let (mut client, mut t, _) = timed(1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let started = Instant::now();
        let e = first_bytes(&mut t).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HEAD);

        // A head longer than the read-ahead goes to hyper unfinished (its limit applies).
        let (mut client, mut t, _) = timed(64 * 1024);
        let mut long = b"GET / HTTP/1.1\r\nx-long: ".to_vec();
        long.resize(READ_AHEAD + 100, b'a');
        client.write_all(&long).await.unwrap();
        assert_eq!(first_bytes(&mut t).await.unwrap(), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_holds_no_read_buffer() {
        let (_client, mut t, _) = timed(1024);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(t.poll_first_bytes(&mut cx).is_pending());
        assert_eq!(t.ahead.capacity(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_meets_the_head_deadline_in_the_first_read() {
        let (_client, mut t, _) = timed(1024);
        let started = Instant::now();
        let e = first_bytes(&mut t).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_cut_at_the_head_deadline() {
        let (_client, mut conn, _) = timed(1024);
        let start = Instant::now();
        let err = conn.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_deadline_runs_from_accept_not_from_each_byte() {
        let (mut client, mut conn, _) = timed(1024);
        let start = Instant::now();
        // A slowloris client: one byte every 2 s never completes a head within 5 s.
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\n" {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if client.write_all(&[*b]).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match conn.read(&mut buf).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), HEAD);
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn between_requests_the_idle_timeout_applies_and_a_request_in_flight_has_none() {
        let (mut client, mut conn, activity) = timed(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        // The request is dispatched: no deadline while it runs, however long.
        let in_flight = activity.begin();
        let waiting = tokio::time::timeout(IDLE * 3, conn.read(&mut buf)).await;
        assert!(
            waiting.is_err(),
            "a read timed out while a request was in flight"
        );
        // Answered: now idle, and cut after idle_timeout (not the head deadline).
        drop(in_flight);
        let idle_from = Instant::now();
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn each_request_moves_the_idle_deadline_on_though_the_timer_stays() {
        let (mut client, mut conn, activity) = timed(1024);
        let mut buf = [0u8; 64];
        // A first request at once, then three, each 50 s after the last answer: every idle
        // deadline is later than the timer set for the one before, which fires in between and
        // must not cut.
        let mut answered = Instant::now();
        for gap in [0, 50, 50, 50] {
            let wait = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(gap)).await;
                client
                    .write_all(b"GET / HTTP/1.1\r\n\r\n")
                    .await
                    .map(|_| client)
            });
            assert!(conn.read(&mut buf).await.unwrap() > 0);
            assert_eq!(answered.elapsed(), Duration::from_secs(gap));
            client = wait.await.unwrap().unwrap();
            // hyper reads on while the request runs: the phase is Busy.
            let in_flight = activity.begin();
            let busy = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
            assert!(busy.is_err());
            drop(in_flight);
            answered = Instant::now();
        }
        // Then nothing: cut exactly idle_timeout after the last answer.
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(answered.elapsed(), IDLE);
        // A head begun after that late an idle deadline still gets only header_timeout.
        let (mut client, mut conn, activity) = timed(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        let in_flight = activity.begin();
        let busy = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await;
        assert!(busy.is_err());
        drop(in_flight);
        assert!(tokio::time::timeout(IDLE / 2, conn.read(&mut buf))
            .await
            .is_err());
        client.write_all(b"GET / HT").await.unwrap();
        let begun = Instant::now();
        assert!(conn.read(&mut buf).await.unwrap() > 0);
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(begun.elapsed(), HEAD);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_fails_the_write_at_send_timeout() {
        let (_client, mut conn, _) = timed(64);
        let start = Instant::now();
        let err = conn.write_all(&[b'x'; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), SEND);
    }
}
