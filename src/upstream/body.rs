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
    /// The read-ahead's share of `request_buffer_budget`, given back when the body is dropped.
    _charge: Option<Charge>,
}

/// A byte budget shared by every request (`request_buffer_budget`): what read-ahead buffers may
/// hold together, so many HTTP/2 streams each reading ahead cannot grow memory without bound.
#[derive(Debug, Default)]
pub struct ByteBudget {
    limit: std::sync::atomic::AtomicU64,
    in_use: std::sync::atomic::AtomicU64,
    /// Requests refused (503) because the budget was spent.
    pub refused: std::sync::atomic::AtomicU64,
}

impl ByteBudget {
    pub fn new(limit: u64) -> std::sync::Arc<ByteBudget> {
        let b = ByteBudget::default();
        b.set_limit(limit);
        std::sync::Arc::new(b)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit
            .store(limit, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds `n` bytes to `charge` if the budget has them.
    pub fn take(self: &std::sync::Arc<Self>, charge: &mut Option<Charge>, n: u64) -> bool {
        use std::sync::atomic::Ordering;
        let limit = self.limit();
        let ok = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= limit).then_some(u + n)
            })
            .is_ok();
        if ok {
            charge
                .get_or_insert_with(|| Charge {
                    budget: self.clone(),
                    n: 0,
                })
                .n += n;
        }
        ok
    }
}

/// Bytes held against a `ByteBudget`, released on drop.
#[derive(Debug)]
pub struct Charge {
    budget: std::sync::Arc<ByteBudget>,
    n: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget
            .in_use
            .fetch_sub(self.n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The client sent its body too slowly (below `min_body_rate`).
#[derive(Debug, thiserror::Error)]
#[error("request body slower than {0} bytes/s")]
pub struct BodyTooSlow(pub u64);

/// Enforces that a body arrives at `bytes_per_sec` in every window of `window` once `grace`
/// has passed: each window must bring `bytes_per_sec x window` bytes. A sliding requirement,
/// not a cumulative average, so bytes sent up front cannot buy a long silence: what arrives
/// during the grace counts toward the first window only.
#[derive(Debug)]
pub struct MinRate {
    /// The end of the current window.
    window_end: tokio::time::Instant,
    window: std::time::Duration,
    bytes_per_sec: u64,
    /// Bytes received in the current window.
    received: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl MinRate {
    /// `window` is also the grace: the first window ends `grace + window` after now.
    pub fn new(grace: std::time::Duration, bytes_per_sec: u64) -> Option<MinRate> {
        let window = grace.max(std::time::Duration::from_secs(1));
        (bytes_per_sec > 0).then(|| MinRate {
            window_end: tokio::time::Instant::now() + grace + window,
            window,
            bytes_per_sec,
            received: 0,
            sleep: None,
        })
    }

    pub fn record(&mut self, n: u64) {
        self.received += n;
    }

    /// When the current window's bytes are due.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.window_end
    }

    /// At the deadline: whether the window brought enough. If it did, the next window starts.
    pub fn roll(&mut self) -> bool {
        let quota = (self.bytes_per_sec as f64 * self.window.as_secs_f64()) as u64;
        if self.received < quota {
            return false;
        }
        self.received = 0;
        self.window_end += self.window;
        true
    }

    /// Polls the deadline timer; Ready means too slow.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let deadline = self.deadline();
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if !self.roll() {
                return Poll::Ready(());
            }
        }
    }
}

impl UpstreamBody {
    pub fn empty() -> Self {
        UpstreamBody::default()
    }

    pub fn new(
        buffered: Bytes,
        rest: Option<Incoming>,
        rate: Option<MinRate>,
        charge: Option<Charge>,
    ) -> Self {
        UpstreamBody {
            buffered: (!buffered.is_empty()).then_some(buffered),
            rest,
            rate,
            _charge: charge,
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
            _charge: None,
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
                    r.record(d.len() as u64);
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
