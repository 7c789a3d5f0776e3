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
use std::time::Duration;

use tokio::time::Instant;

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
    queue: Mutex<Parked>,
    /// Wakes the task when the first connection is parked: with none parked it sleeps, so an
    /// idle proxy does not wake every tick.
    parked: tokio::sync::Notify,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parking")
    }
}

#[derive(Default)]
struct Parked {
    queue: FairQueue<ClientKey, (Instant, Start)>,
    /// None is overdue before this (it is at most the oldest one's time plus `MAX_PARK`):
    /// without it every tick walked every parked address looking for an overdue one, under
    /// the lock the accept loops park with: ~130 instructions an address, 500 times a second
    /// (a storm from 10,000 addresses would have spent a core on it).
    next_due: Option<Instant>,
    /// Walks of the queue for overdue connections, for the tests.
    #[cfg(test)]
    looks: usize,
}

impl Parked {
    /// The connections parked for `MAX_PARK` by `now`, when any may be.
    fn overdue(&mut self, now: Instant, go: &mut Vec<Start>) {
        if self.next_due.is_none_or(|due| now < due) {
            return;
        }
        #[cfg(test)]
        {
            self.looks += 1;
        }
        let overdue = now - MAX_PARK;
        while let Some((_, (_, s))) = self.queue.pop(|_, (at, _)| *at <= overdue) {
            go.push(s);
        }
        // Each address's first is its oldest, and a connection parked later is younger.
        self.next_due = self
            .queue
            .clients()
            .map(|(_, (at, _), _)| *at + MAX_PARK)
            .min();
    }
}

impl Parking {
    pub fn park(&self, key: ClientKey, start: Start) {
        let mut p = self.lock();
        // Read under the lock, so that times rise in the order connections are queued.
        let now = Instant::now();
        p.queue.push(key, (now, start));
        p.next_due.get_or_insert(now + MAX_PARK);
        drop(p);
        self.parked.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Parked> {
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
            let idle = self.lock().queue.is_empty();
            tokio::select! {
                _ = &mut stop => return,
                // `notify_one` keeps a permit, so a park between the check and here is not lost.
                _ = self.parked.notified(), if idle => continue,
                _ = tokio::time::sleep(TICK), if !idle => {}
            }
            let mut go: Vec<Start> = Vec::new();
            {
                let mut p = self.lock();
                for _ in 0..room() {
                    match p.queue.pop(|_, _| true) {
                        Some((_, (_, s))) => go.push(s),
                        None => break,
                    }
                }
                p.overdue(Instant::now(), &mut go);
            }
            started(go.len());
            for s in go {
                s();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(i: u32) -> ClientKey {
        ClientKey {
            ip: IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + i)),
            exempt: false,
        }
    }

    fn nothing() -> Start {
        Box::new(|| {})
    }

    /// What a tick `ms` from now finds overdue, and whether it had to look.
    async fn after(parking: &Parking, ms: u64) -> (usize, usize) {
        tokio::time::advance(Duration::from_millis(ms)).await;
        tick(parking)
    }

    /// What a tick finds overdue, and whether it had to look.
    fn tick(parking: &Parking) -> (usize, usize) {
        let mut p = parking.lock();
        let before = p.looks;
        let mut go = Vec::new();
        p.overdue(Instant::now(), &mut go);
        (go.len(), p.looks - before)
    }

    #[tokio::test(start_paused = true)]
    async fn a_tick_with_none_overdue_does_not_walk_the_parked() {
        let parking = Parking::default();
        for i in 0..1_000 {
            parking.park(key(i), nothing());
        }
        for _ in 0..900 {
            assert_eq!(after(&parking, 2).await, (0, 0));
        }
        assert_eq!(after(&parking, 2_000).await, (1_000, 1));
        assert!(parking.lock().queue.is_empty());
        assert_eq!(tick(&parking), (0, 0), "none parked, nothing to look at");
    }

    #[tokio::test(start_paused = true)]
    async fn each_parked_connection_goes_on_at_its_own_two_seconds() {
        let parking = Parking::default();
        parking.park(key(1), nothing());
        tokio::time::advance(Duration::from_secs(1)).await;
        parking.park(key(2), nothing());
        parking.park(key(1), nothing());
        assert_eq!(after(&parking, 999).await, (0, 0));
        assert_eq!(
            after(&parking, 1).await,
            (1, 1),
            "the first, parked 2 s ago"
        );
        // The next due is the others' own 2 s, not 2 s from this look.
        assert_eq!(after(&parking, 999).await, (0, 0));
        assert_eq!(after(&parking, 1).await, (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_started_in_turn_leave_a_due_time_that_is_only_early() {
        let parking = Parking::default();
        parking.park(key(1), nothing());
        tokio::time::advance(Duration::from_secs(1)).await;
        parking.park(key(2), nothing());
        // The queues took the first (its due time stays as a bound).
        assert!(parking.lock().queue.pop(|_, _| true).is_some());
        assert_eq!(
            after(&parking, 1000).await,
            (0, 1),
            "looked, found none overdue"
        );
        assert_eq!(after(&parking, 999).await, (0, 0));
        assert_eq!(after(&parking, 1).await, (1, 1));
    }
}
