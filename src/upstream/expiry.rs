//! The queue's deadline: one task per upstream answers `QueueTimeout` to the waiters past
//! `queue_timeout`, so a queued request registers no timer of its own.
//!
//! Why: a `tokio::time::timeout` around each wait put a timer into the runtime's wheel and took
//! it out again, ~900 instructions of every queued request (callgrind: in a storm on a pool of
//! 64, or 256 keep-alive clients on it, nearly every request queues). A client's line is in the
//! order its waiters came, so those past the timeout are at the fronts
//! (`FairQueue::expire_fronts`) and the next to expire is the oldest front: the task sleeps
//! until then on one timer (`timer.rs`), which only moves later.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::*;
use crate::timer::LazyDeadline;

/// How long the task waits for a first waiter before it looks whether its upstream still
/// exists (a reload drops the old generation's; the task holds it only weakly).
const IDLE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(super) struct Expiry {
    wake: Arc<tokio::sync::Notify>,
    started: AtomicBool,
}

impl Upstream {
    /// After a waiter was queued into an empty queue: the task (started on first use, on the
    /// runtime that queued it) looks for the new oldest waiter.
    pub(super) fn first_waiter_queued(&self) {
        if !self.expiry.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(run(self.me.clone(), self.expiry.wake.clone()));
        }
        self.expiry.wake.notify_one();
    }

    /// Answers the waiters past `queue_timeout`; returns when the next one will be.
    fn expire_waiters(&self) -> Option<Instant> {
        let timeout = self.cfg.queue_timeout;
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut st = self.lock();
            st.queue
                .expire_fronts(|w| w.since + timeout <= now, &mut expired);
            if !expired.is_empty() {
                self.stats.queued.store(st.queue.len(), Ordering::Relaxed);
            }
            st.queue.clients().map(|(_, w, _)| w.since).min()
        };
        for w in expired {
            // A waiter that gave up meanwhile has dropped its end: nothing to answer.
            let _ = w.tx.send(Err(UpstreamError::QueueTimeout));
        }
        next.map(|since| since + timeout)
    }
}

async fn run(up: Weak<Upstream>, wake: Arc<tokio::sync::Notify>) {
    let mut timer: Option<LazyDeadline> = None;
    loop {
        let Some(next) = up.upgrade().map(|u| u.expire_waiters()) else {
            return;
        };
        match next {
            Some(at) => {
                let t = timer.get_or_insert_with(|| LazyDeadline::new(at));
                std::future::poll_fn(|cx| t.poll_passed(cx, at)).await;
            }
            // A waiter queued since `expire_waiters` looked has left a permit: no wake is lost.
            None => {
                let _ = tokio::time::timeout(IDLE_CHECK, wake.notified()).await;
            }
        }
    }
}
