//! The global cap on open client connections: a counter and a wake-up for the accept loops.
//!
//! tokio's `Semaphore` would do, but its release takes the waiter-list mutex every time and its
//! owned permits bounce an `Arc` refcount between cores: on the accept path of a storm that was
//! a large part of an admission decision. Here taking and giving back a slot is one atomic
//! operation; only accept loops waiting at the cap (at most one per shard) touch the `Notify`.
//! The guard that pairs `try_take` with `release` is `admission::GlobalSlot`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

#[derive(Debug)]
pub struct GlobalCap {
    open: AtomicUsize,
    /// Changed by a config reload; connections over a lowered cap stay until they end.
    max: AtomicUsize,
    /// Set by a loop about to wait, so releases only notify when someone listens.
    waiting: AtomicBool,
    freed: Notify,
}

impl GlobalCap {
    pub fn new(max: usize) -> GlobalCap {
        GlobalCap {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            waiting: AtomicBool::new(false),
            freed: Notify::new(),
        }
    }

    /// Takes a slot; false at the cap. Pair every `true` with one `release`.
    pub fn try_take(&self) -> bool {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max.load(Ordering::Relaxed) {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
    }

    /// Waits for a slot and takes it. Cancel-safe: dropping the future takes nothing.
    pub async fn take(&self) {
        loop {
            if self.try_take() {
                return;
            }
            let notified = self.freed.notified();
            tokio::pin!(notified);
            // Registered before the re-check, so a release in between is not missed.
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if self.try_take() {
                return;
            }
            notified.await;
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A new cap (config reload); a raised one wakes the loops waiting at the old one.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
        self.freed.notify_waiters();
    }
}

impl GlobalCap {
    pub fn release(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if self.waiting.load(Ordering::SeqCst) {
            self.waiting.store(false, Ordering::SeqCst);
            // Every waiting loop retries; those that lose the race wait again.
            self.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn waits_at_the_cap_and_wakes_on_release() {
        let cap = Arc::new(GlobalCap::new(2));
        assert!(cap.try_take() && cap.try_take());
        assert!(!cap.try_take());
        let c2 = cap.clone();
        let waiter = tokio::spawn(async move { c2.take().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        cap.release();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cap.open(), 2);
        cap.release();
        assert_eq!(cap.open(), 1);
    }
}
