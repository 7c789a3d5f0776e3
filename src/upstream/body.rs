//! The body that goes to the origin: the part of the client's body read ahead of time, then
//! the rest as it arrives, at no less than the minimum rate. Generic over nothing but hyper's
//! incoming body, so the origin side does not depend on the client side's types.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

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
pub fn hint_with(buffered: u64, rest: Option<&Incoming>) -> SizeHint {
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
