//! The fair queue in front of an upstream's connections: requests wait per client address, and
//! connections are handed out round-robin across addresses, so one client with 1,000 queued
//! requests does not make a newcomer wait behind all of them.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// foldhash, seeded per process, as in admission: the keys are client addresses, and SipHash
/// was most of the cost of a lookup on every request's way in and out of the pool.
pub(crate) type Hasher = foldhash::fast::RandomState;

/// Waiters `T` queued per client key `K`.
#[derive(Debug)]
pub struct FairQueue<K, T> {
    by_client: HashMap<K, VecDeque<T>, Hasher>,
    /// Clients with at least one waiter, in serving order.
    ring: VecDeque<K>,
    len: usize,
}

impl<K, T> Default for FairQueue<K, T> {
    fn default() -> Self {
        FairQueue {
            by_client: HashMap::default(),
            ring: VecDeque::new(),
            len: 0,
        }
    }
}

impl<K: Copy + Eq + Hash, T> FairQueue<K, T> {
    pub fn push(&mut self, client: K, item: T) {
        self.push_with(client, item, false);
    }

    /// Queues `item`; a client not already waiting goes to the front of the ring when `first`
    /// (a newcomer with nothing in flight is served before the next round of clients that
    /// already hold connections), else to the back.
    pub fn push_with(&mut self, client: K, item: T, first: bool) {
        let q = self.by_client.entry(client).or_default();
        if q.is_empty() {
            if first {
                self.ring.push_front(client);
            } else {
                self.ring.push_back(client);
            }
        }
        q.push_back(item);
        self.len += 1;
    }

    /// The next waiter of the next client in turn for whom `eligible` holds (asked with the
    /// client's first waiter); that client then goes to the back of the ring.
    pub fn pop(&mut self, mut eligible: impl FnMut(K, &T) -> bool) -> Option<(K, T)> {
        for _ in 0..self.ring.len() {
            let client = self.ring.pop_front()?;
            let first = self.by_client.get(&client).and_then(VecDeque::front);
            if !first.is_some_and(|t| eligible(client, t)) {
                self.ring.push_back(client);
                continue;
            }
            let q = self.by_client.get_mut(&client)?;
            let item = q.pop_front()?;
            self.len -= 1;
            if q.is_empty() {
                self.by_client.remove(&client);
            } else {
                self.ring.push_back(client);
            }
            return Some((client, item));
        }
        None
    }

    /// Drops waiters for which `alive` is false (they gave up).
    pub fn retain(&mut self, mut alive: impl FnMut(&T) -> bool) {
        for q in self.by_client.values_mut() {
            q.retain(&mut alive);
        }
        self.by_client.retain(|_, q| !q.is_empty());
        let by_client = &self.by_client;
        self.ring.retain(|c| by_client.contains_key(c));
        self.len = self.by_client.values().map(VecDeque::len).sum();
    }

    /// Each client with waiters: its key, its first waiter and how many it has.
    pub fn clients(&self) -> impl Iterator<Item = (K, &T, usize)> + '_ {
        self.ring.iter().filter_map(|k| {
            let q = self.by_client.get(k)?;
            Some((*k, q.front()?, q.len()))
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every waiter.
    pub fn drain(&mut self) -> Vec<T> {
        self.ring.clear();
        self.len = 0;
        self.by_client.drain().flat_map(|(_, q)| q).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn a_newcomer_goes_first_a_returning_client_waits_its_turn() {
        let mut q = FairQueue::default();
        for i in 1..=3 {
            q.push(ip(i), u32::from(i));
        }
        q.push_with(ip(9), 9, true);
        // Already queued: `first` does not move a client up.
        q.push_with(ip(2), 22, true);
        let order: Vec<_> = (0..5).map(|_| q.pop(|_, _| true).unwrap().1).collect();
        assert_eq!(order, vec![9, 1, 2, 3, 22]);
    }

    #[test]
    fn round_robin_across_clients() {
        let mut q = FairQueue::default();
        for i in 0..100 {
            q.push(ip(1), i);
        }
        q.push(ip(2), 1000);
        let first: Vec<_> = (0..3).map(|_| q.pop(|_, _| true).unwrap()).collect();
        assert_eq!(first, vec![(ip(1), 0), (ip(2), 1000), (ip(1), 1)]);
        assert_eq!(q.len(), 98);
    }

    #[test]
    fn skips_ineligible_and_retains() {
        let mut q = FairQueue::default();
        q.push(ip(1), 1);
        q.push(ip(2), 2);
        assert_eq!(q.pop(|c, _| c != ip(1)), Some((ip(2), 2)));
        assert_eq!(q.pop(|c, _| c != ip(1)), None);
        q.push(ip(3), 3);
        q.retain(|&v| v != 1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop(|_, _| true), Some((ip(3), 3)));
        assert!(q.is_empty());
    }
}
