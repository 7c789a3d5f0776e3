//! Parking: while every upstream's queue already holds two rounds of its pool, a new connection
//! from a client that has others open waits accepted but unread, as a few hundred bytes here,
//! instead of being read into a request that would only wait in the queue. A newcomer is not
//! parked: in the queue it goes first (`lanes.rs` decides).
//!
//! Why: a read connection costs ~25 KB until it is answered (hyper's 8 KB read buffer at the
//! first read and 8 KB reserved for the response head, the connection and request futures, the
//! parsed head), so a 10,000-connection storm held ~270 MB where nginx, which leaves the excess
//! in the kernel, held under 40 MB. Parked connections go on, round-robin across client
//! addresses (the pool's fair queue), as the queues drain; none waits here
//! longer than `MAX_PARK` before it is read and meets the queue (and its timeout or its 503)
//! like any other request. The kernel keeps the request bytes meanwhile, as it did in the
//! accept queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::ClientKey;
use crate::upstream::queue::FairQueue;

/// A connection's task, not yet made: what it needs is kept, not the future (which would
/// weigh what the connection's whole state does).
pub type Start = Box<dyn FnOnce() + Send>;

/// How often the parked are looked at.
const TICK: Duration = Duration::from_millis(2);

/// No connection stays parked longer than this.
pub const MAX_PARK: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Parking {
    queue: Mutex<FairQueue<ClientKey, (Instant, Start)>>,
    /// Wakes the task when the first connection is parked: with none parked it sleeps, so an
    /// idle proxy does not wake every tick.
    parked: tokio::sync::Notify,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parking")
    }
}

impl Parking {
    pub fn park(&self, key: ClientKey, start: Start) {
        self.lock().push(key, (Instant::now(), start));
        self.parked.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairQueue<ClientKey, (Instant, Start)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts parked connections while `room()` says how many the queues can take, and any
    /// parked for `MAX_PARK`; every `TICK`, until `stop` is dropped.
    pub async fn run(
        self: Arc<Self>,
        room: impl Fn() -> usize,
        started: impl Fn(usize),
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        loop {
            let idle = self.lock().is_empty();
            tokio::select! {
                _ = &mut stop => return,
                // `notify_one` keeps a permit, so a park between the check and here is not lost.
                _ = self.parked.notified(), if idle => continue,
                _ = tokio::time::sleep(TICK), if !idle => {}
            }
            let mut go: Vec<Start> = Vec::new();
            {
                let mut q = self.lock();
                for _ in 0..room() {
                    match q.pop(|_, _| true) {
                        Some((_, (_, s))) => go.push(s),
                        None => break,
                    }
                }
                let overdue = Instant::now() - MAX_PARK;
                while let Some((_, (_, s))) = q.pop(|_, (at, _)| *at <= overdue) {
                    go.push(s);
                }
            }
            started(go.len());
            for s in go {
                s();
            }
        }
    }
}
