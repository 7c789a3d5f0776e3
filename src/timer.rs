//! A deadline kept on one reused timer that moves only when a deadline comes sooner.
//!
//! Both users see their deadline move later nearly every time: a client connection's idle
//! deadline with each keep-alive request (`conn/clock.rs`), an origin connection's response
//! deadline with each exchange on it (`upstream/exchange.rs`). A tokio `Sleep` reset for each
//! comes out of the timer wheel and goes back in, and a new one per exchange goes in and out:
//! ~400 and ~600 instructions of a keep-alive request of ~43k (callgrind). Here the timer stays
//! where it was set; when it fires before the deadline now asked for (at most once per
//! timeout, for a connection kept busy), it is set again to that one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

pub struct LazyDeadline {
    sleep: Pin<Box<Sleep>>,
    /// Where `sleep` is set: at or before the deadline last asked for.
    armed: Instant,
}

impl std::fmt::Debug for LazyDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyDeadline")
            .field("armed", &self.armed)
            .finish()
    }
}

impl LazyDeadline {
    pub fn new(deadline: Instant) -> LazyDeadline {
        LazyDeadline {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
        }
    }

    /// Ready once `deadline` has passed; otherwise the task is woken by then (or earlier, when
    /// an earlier deadline had set the timer: it then asks again).
    pub fn poll_passed(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if deadline < self.armed {
            self.sleep.as_mut().reset(deadline);
            self.armed = deadline;
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.armed >= deadline {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
            self.armed = deadline;
        }
        Poll::Pending
    }
}

/// Paused clock: the exact instants, whatever the machine's load.
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn passed(t: &mut LazyDeadline, deadline: Instant) {
        std::future::poll_fn(|cx| t.poll_passed(cx, deadline)).await
    }

    #[tokio::test(start_paused = true)]
    async fn each_deadline_is_kept_exactly_whether_the_timer_is_earlier_or_later() {
        let start = Instant::now();
        let at = |s| start + Duration::from_secs(s);
        let mut t = LazyDeadline::new(at(10));
        // Later than the timer: it fires at 10 and is set again, without ending the wait.
        passed(&mut t, at(25)).await;
        assert_eq!(Instant::now(), at(25));
        // Sooner than the timer: it moves back.
        let mut t = LazyDeadline::new(at(100));
        passed(&mut t, at(30)).await;
        assert_eq!(Instant::now(), at(30));
        // Already passed: at once.
        passed(&mut t, at(5)).await;
        assert_eq!(Instant::now(), at(30));
        // A wait dropped before its deadline leaves the timer for the next, later one.
        let mut t = LazyDeadline::new(at(40));
        let cut = tokio::time::timeout(Duration::from_secs(3), passed(&mut t, at(40))).await;
        assert!(cut.is_err());
        passed(&mut t, at(60)).await;
        assert_eq!(Instant::now(), at(60));
    }
}
