//! Concurrent connections per client key, handed out as guards: a slot is returned when its
//! `IpSlot` drops, on every path, so none can leak. A connection-rate limit does not bound
//! concurrency (slow or idle connections pile up under any rate), hence this separate count.
//! Entries are removed when they reach zero, so the map holds only clients with open
//! connections.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

#[derive(Debug)]
pub struct ConnLimit {
    open: DashMap<IpAddr, u32>,
    max: u32,
}

#[derive(Debug)]
pub struct IpSlot {
    limit: Arc<ConnLimit>,
    key: IpAddr,
}

impl ConnLimit {
    /// `None` when `max` is 0 (disabled).
    pub fn new(max: u32) -> Option<Arc<ConnLimit>> {
        (max > 0).then(|| {
            Arc::new(ConnLimit {
                open: DashMap::new(),
                max,
            })
        })
    }

    pub fn try_acquire(self: &Arc<Self>, key: IpAddr) -> Option<IpSlot> {
        let mut n = self.open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limit: self.clone(),
            key,
        })
    }

    pub fn open(&self, key: IpAddr) -> u32 {
        self.open.get(&key).map_or(0, |n| *n)
    }

    /// Client keys with at least one open connection.
    pub fn tracked(&self) -> usize {
        self.open.len()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        // Decrement and remove-at-zero under the same shard lock, so a concurrent acquire
        // never sees a stale zero entry vanish under it.
        self.limit.open.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_back() {
        let l = ConnLimit::new(2).unwrap();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        drop(a);
        assert!(l.try_acquire(ip).is_some());
        assert!(l.try_acquire("127.0.0.3".parse().unwrap()).is_some());
    }

    #[test]
    fn empty_entries_are_removed() {
        let l = ConnLimit::new(5).unwrap();
        let slots: Vec<_> = (0..100u8)
            .map(|i| l.try_acquire(IpAddr::from([127, 0, 1, i])).unwrap())
            .collect();
        assert_eq!(l.tracked(), 100);
        drop(slots);
        assert_eq!(l.tracked(), 0);
    }
}
