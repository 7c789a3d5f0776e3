//! Bodies in both directions, streamed frame by frame (never buffered whole).
//!
//! `UpstreamBody` is what goes to the origin: the client's body as it arrives, or nothing (a
//! replayed request). `ProxyBody` is what goes to the client: a short local body (errors) or the
//! origin's body, of which the first frames may already be buffered. It owns what the response
//! holds: the origin connection, released to the pool only when the body ended cleanly, the
//! in-flight mark of the client connection, and the access-log line, written when it drops.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conn::clock::InFlight;
use crate::upstream::Lease;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What goes to the origin: the part of the client's body read ahead of time (all of it, when
/// it fit in `request_buffer`), then the rest as it arrives, at no less than the minimum rate.
#[derive(Debug, Default)]
pub struct UpstreamBody {
    buffered: Option<Bytes>,
    rest: Option<Incoming>,
    rate: Option<MinRate>,
}

/// The client sent its body too slowly (below `min_body_rate`).
#[derive(Debug, thiserror::Error)]
#[error("request body slower than {0} bytes/s")]
pub struct BodyTooSlow(pub u64);

/// Enforces that a body arrives at `bytes_per_sec` on average once `grace` has passed since
/// `start`: the deadline for the next bytes moves forward as bytes arrive.
#[derive(Debug)]
pub struct MinRate {
    pub start: tokio::time::Instant,
    pub grace: std::time::Duration,
    pub bytes_per_sec: u64,
    pub received: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl MinRate {
    pub fn new(grace: std::time::Duration, bytes_per_sec: u64) -> Option<MinRate> {
        (bytes_per_sec > 0).then(|| MinRate {
            start: tokio::time::Instant::now(),
            grace,
            bytes_per_sec,
            received: 0,
            sleep: None,
        })
    }

    /// When the bytes received so far stop being enough.
    pub fn deadline(&self) -> tokio::time::Instant {
        let secs = (self.received + 1) as f64 / self.bytes_per_sec as f64;
        self.start + self.grace + std::time::Duration::from_secs_f64(secs)
    }

    /// Polls the deadline timer; Ready means too slow.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline();
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        sleep.as_mut().poll(cx)
    }
}

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody::default()
    }

    pub fn new(buffered: Bytes, rest: Option<Incoming>, rate: Option<MinRate>) -> Self {
        UpstreamBody {
            buffered: (!buffered.is_empty()).then_some(buffered),
            rest,
            rate,
        }
    }

    /// The whole body is in memory, so it can be sent again.
    pub fn is_replayable(&self) -> bool {
        self.rest.is_none()
    }

    pub fn replay(&self) -> Option<UpstreamBody> {
        self.is_replayable().then(|| UpstreamBody {
            buffered: self.buffered.clone(),
            rest: None,
            rate: None,
        })
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(b) = this.buffered.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(r), Some(d)) = (this.rate.as_mut(), f.data_ref()) {
                    r.received += d.len() as u64;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                this.rest = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(r) = this.rate.as_mut() else {
                    return Poll::Pending;
                };
                if r.poll_expired(cx).is_pending() {
                    return Poll::Pending;
                }
                let limit = r.bytes_per_sec;
                this.rest = None;
                Poll::Ready(Some(Err(Box::new(BodyTooSlow(limit)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered = self.buffered.as_ref().map_or(0, |b| b.len() as u64);
        hint_with(buffered, self.rest.as_ref())
    }
}

/// The size of `buffered` bytes followed by what `rest` still holds: exact when nothing is left
/// to stream, so hyper can send a Content-Length.
fn hint_with(buffered: u64, rest: Option<&Incoming>) -> SizeHint {
    let Some(r) = rest else {
        return SizeHint::with_exact(buffered);
    };
    let h = r.size_hint();
    let mut out = SizeHint::new();
    out.set_lower(h.lower() + buffered);
    if let Some(u) = h.upper() {
        out.set_upper(u + buffered);
    }
    out
}

/// One request's line in the access log, filled in as the request goes.
#[derive(Debug)]
pub struct AccessLog {
    pub enabled: bool,
    /// Index of the route that matched, for the metrics.
    pub route: Option<usize>,
    pub client: SocketAddr,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub upstream: Option<String>,
    pub server: Option<String>,
    pub start: Instant,
    /// The Host (or :authority) as sent, the protocol version, User-Agent, the request id
    /// sent to the origin, the query (when `access_log_query`), the declared body size.
    pub host: String,
    pub version: &'static str,
    pub user_agent: String,
    pub request_id: String,
    pub query: Option<String>,
    pub bytes_in: u64,
    /// Where the request is counted: its generation's routes.
    pub metrics: Option<std::sync::Arc<crate::metrics::RequestMetrics>>,
}

pub struct ProxyBody {
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// The origin connection; given back for reuse when `rest` ends cleanly.
    conn: Option<Lease>,
    log: AccessLog,
    bytes: u64,
    failed: bool,
    _in_flight: InFlight,
}

impl ProxyBody {
    pub fn full(data: Bytes, log: AccessLog, in_flight: InFlight) -> ProxyBody {
        let mut buffered = VecDeque::new();
        if !data.is_empty() {
            buffered.push_back(Frame::data(data));
        }
        ProxyBody {
            buffered,
            rest: None,
            conn: None,
            log,
            bytes: 0,
            failed: false,
            _in_flight: in_flight,
        }
    }

    /// An origin body: `buffered` frames already read, `rest` still to stream (None when the
    /// body ended while buffering, in which case the connection was released already).
    pub fn origin(
        buffered: VecDeque<Frame<Bytes>>,
        rest: Option<Incoming>,
        conn: Option<Lease>,
        log: AccessLog,
        in_flight: InFlight,
    ) -> ProxyBody {
        ProxyBody {
            buffered,
            rest,
            conn,
            log,
            bytes: 0,
            failed: false,
            _in_flight: in_flight,
        }
    }

    fn count(&mut self, f: &Frame<Bytes>) {
        if let Some(d) = f.data_ref() {
            self.bytes += d.len() as u64;
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(f) = this.buffered.pop_front() {
            this.count(&f);
            return Poll::Ready(Some(Ok(f)));
        }
        let Some(rest) = this.rest.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(rest).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(f))) => {
                this.count(&f);
                // hyper stops polling once `is_end_stream` says the body is complete (a
                // Content-Length body after its last byte) and drops us without a final
                // `None`: give the connection back now, or it would be discarded.
                if this.rest.as_ref().is_some_and(|r| r.is_end_stream()) {
                    this.rest = None;
                    if let Some(c) = this.conn.take() {
                        c.finish();
                    }
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The origin broke off mid-body: drop its connection and fail ours, so the
                // client sees an incomplete response rather than a short one that looks whole.
                this.rest = None;
                this.conn = None;
                this.failed = true;
                tracing::warn!(upstream = ?this.log.upstream, server = ?this.log.server,
                    error = %e, "origin response body failed mid-stream");
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.rest = None;
                if let Some(c) = this.conn.take() {
                    c.finish();
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_empty() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .buffered
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        hint_with(buffered, self.rest.as_ref())
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // hyper drops a body it knows is complete without polling it to its end: if the
        // origin's response was read whole, its connection is reusable.
        if !self.failed && self.rest.as_ref().is_none_or(|r| r.is_end_stream()) {
            if let Some(c) = self.conn.take() {
                c.finish();
            }
        }
        if let Some(m) = &self.log.metrics {
            m.observe(
                self.log.route,
                self.log.status,
                self.log.start.elapsed().as_secs_f64(),
            );
        }
        if !self.log.enabled {
            return;
        }
        let complete = !self.failed && self.buffered.is_empty() && self.rest.is_none();
        let l = &self.log;
        tracing::info!(
            target: "breakwater::access",
            client = %l.client,
            method = %l.method,
            host = %l.host,
            path = %l.path,
            query = l.query.as_deref().unwrap_or(""),
            version = l.version,
            request_id = %l.request_id,
            user_agent = %l.user_agent,
            status = l.status,
            upstream = l.upstream.as_deref().unwrap_or("-"),
            server = l.server.as_deref().unwrap_or("-"),
            duration_ms = (l.start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0,
            bytes = self.bytes,
            bytes_in = l.bytes_in,
            complete,
        );
    }
}
