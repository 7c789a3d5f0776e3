//! Bodies in both directions, streamed frame by frame (never buffered whole).
//!
//! `UpstreamBody` is what goes to the origin: the client's body as it arrives, or nothing (a
//! replayed request). `ProxyBody` is what goes to the client: a short local body (errors) or the
//! origin's body, of which the first frames may already be buffered. It owns what the response
//! holds: the origin connection, released to the pool only when the body ended cleanly, the
//! in-flight mark of the client connection, and the access-log line, written when it drops.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::conn::clock::InFlight;
use crate::upstream::pool::Conn;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug)]
pub struct UpstreamBody(Option<Incoming>);

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody(None)
    }
    pub fn stream(b: Incoming) -> Self {
        UpstreamBody(Some(b))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.0.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_end_stream())
    }
    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// One request's line in the access log, filled in as the request goes.
#[derive(Debug)]
pub struct AccessLog {
    pub enabled: bool,
    pub client: SocketAddr,
    pub method: http::Method,
    pub path: String,
    pub status: u16,
    pub upstream: Option<String>,
    pub server: Option<String>,
    pub start: Instant,
}

pub struct ProxyBody {
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    /// The origin connection; released when `rest` ends cleanly.
    conn: Option<Conn>,
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
        conn: Option<Conn>,
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
                    c.release();
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
        match &self.rest {
            None => SizeHint::with_exact(buffered),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + buffered);
                if let Some(u) = h.upper() {
                    out.set_upper(u + buffered);
                }
                out
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if !self.log.enabled {
            return;
        }
        let complete = !self.failed && self.buffered.is_empty() && self.rest.is_none();
        let l = &self.log;
        tracing::info!(
            target: "breakwater::access",
            client = %l.client,
            method = %l.method,
            path = %l.path,
            status = l.status,
            upstream = l.upstream.as_deref().unwrap_or("-"),
            server = l.server.as_deref().unwrap_or("-"),
            duration_ms = l.start.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            complete,
        );
    }
}
