//! Concurrent connections per client key. `Admission` hands the slots out inside its
//! `Admitted` guard, so a slot is returned when the guard drops, on every path. A
//! connection-rate limit does not bound concurrency (slow or idle connections pile up under any
//! rate), hence this separate count. Entries are removed when they reach zero, so the map holds
//! only clients with open connections.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use dashmap::DashMap;

#[derive(Debug)]
pub struct ConnLimit {
    open: DashMap<IpAddr, u32, foldhash::fast::RandomState>,
    /// 0 = no cap. Changed by a config reload.
    max: AtomicU32,
}

impl ConnLimit {
    /// `max` 0 disables the cap (slots are then not counted).
    pub fn new(max: u32) -> ConnLimit {
        ConnLimit {
            open: DashMap::default(),
            max: AtomicU32::new(max),
        }
    }

    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
    }

    pub fn set_max(&self, max: u32) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot for `key`: how many `key` holds now, this one included; None at the cap.
    /// Pair every `Some` with one `release`.
    pub fn take(&self, key: IpAddr) -> Option<u32> {
        let mut n = self.open.entry(key).or_insert(0);
        if *n >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        *n += 1;
        Some(*n)
    }

    pub fn release(&self, key: IpAddr) {
        // Decrement and remove-at-zero under the same shard lock, so a concurrent take never
        // sees a stale zero entry vanish under it.
        self.open.remove_if_mut(&key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// Client keys with at least one open connection.
    pub fn tracked(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back() {
        let l = ConnLimit::new(2);
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.take(ip).is_some() && l.take(ip).is_some());
        assert!(l.take(ip).is_none());
        l.release(ip);
        assert!(l.take(ip).is_some());
        assert!(l.take("127.0.0.3".parse().unwrap()).is_some());
    }

    #[test]
    fn empty_entries_are_removed() {
        let l = ConnLimit::new(5);
        for i in 0..100u8 {
            assert!(l.take(IpAddr::from([127, 0, 1, i])).is_some());
        }
        assert_eq!(l.tracked(), 100);
        for i in 0..100u8 {
            l.release(IpAddr::from([127, 0, 1, i]));
        }
        assert_eq!(l.tracked(), 0);
    }
}
