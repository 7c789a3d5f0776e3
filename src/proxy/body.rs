//! The body that goes to the client, streamed frame by frame (never buffered whole). (What goes
//! to the origin, `UpstreamBody`, is the origin side's: `upstream/body.rs`.)
//!
//! `ProxyBody` is a short local body (errors) or the
//! origin's body, of which the first frames may already be buffered. It owns what the response
//! holds: the origin connection, released to the pool only when the body ended cleanly, the
//! in-flight mark of the client connection, and the access-log line, written when it drops.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::activity::InFlight;
use super::spool::Spooled;
use crate::upstream::body::{hint_with, BoxError};
pub use crate::upstream::body::{BodyTooSlow, MinRate, UpstreamBody};
use crate::upstream::Lease;

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
    pub upstream: Option<Arc<str>>,
    pub server: Option<Arc<str>>,
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
    pub metrics: Option<std::sync::Arc<super::stats::RequestMetrics>>,
}

pub struct ProxyBody {
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// The origin connection; given back for reuse when `rest` ends cleanly.
    conn: Option<Lease>,
    /// Or the rest comes from a spool, whose pump holds the origin connection.
    spooled: Option<Spooled>,
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
            spooled: None,
            log,
            bytes: 0,
            failed: false,
            _in_flight: in_flight,
        }
    }

    /// An origin body whose rest comes from a spool (see `spool.rs`).
    pub fn spooled(
        buffered: VecDeque<Frame<Bytes>>,
        spooled: Spooled,
        log: AccessLog,
        in_flight: InFlight,
    ) -> ProxyBody {
        ProxyBody {
            buffered,
            rest: None,
            conn: None,
            spooled: Some(spooled),
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
            spooled: None,
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
        if let Some(spooled) = this.spooled.as_mut() {
            return match spooled.poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(f))) => {
                    this.count(&f);
                    Poll::Ready(Some(Ok(f)))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.spooled = None;
                    this.failed = true;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Ready(None) => {
                    this.spooled = None;
                    Poll::Ready(None)
                }
            };
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
        self.buffered.is_empty()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
            && self
                .spooled
                .as_ref()
                .is_none_or(|s| s.remaining() == Some(0))
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .buffered
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        if let Some(s) = &self.spooled {
            return match s.remaining() {
                Some(n) => SizeHint::with_exact(buffered + n),
                None => {
                    let mut h = SizeHint::new();
                    h.set_lower(buffered);
                    h
                }
            };
        }
        hint_with(buffered, self.rest.as_ref())
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        let complete = !self.failed
            && self.buffered.is_empty()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
            && self
                .spooled
                .as_ref()
                .is_none_or(|s| s.remaining() == Some(0));
        // hyper drops a body it knows is complete without polling it to its end: if the
        // origin's response was read whole, its connection is reusable.
        if !self.failed && self.rest.as_ref().is_none_or(|r| r.is_end_stream()) {
            if let Some(c) = self.conn.take() {
                c.finish();
            }
        } else if let (Some(c), Some(rest)) = (self.conn.take(), self.rest.take()) {
            // The client went away mid-response: read the rest in the background (bounded) so
            // the origin connection survives.
            c.drain_in_background(rest);
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
