//! The fair queue in front of an upstream's connections: requests wait per client address, and
//! connections are handed out round-robin across addresses, so one client with 1,000 queued
//! requests does not make a newcomer wait behind all of them. With thread-per-core runtimes
//! the queue is split by the core its waiters run on (`CoreQueues`), so a connection freed on a
//! core goes to a request of that core.

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
    /// How many clients at the front of the ring are newcomers (`push_with`'s `first`) not yet
    /// served: what `CoreQueues::pop_for` looks at before locality and age.
    newcomers: usize,
    len: usize,
}

impl<K, T> Default for FairQueue<K, T> {
    fn default() -> Self {
        FairQueue {
            by_client: HashMap::default(),
            ring: VecDeque::new(),
            newcomers: 0,
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
                self.newcomers += 1;
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
            // Served now or passed over to the back: no longer ahead as a newcomer.
            self.newcomers = self.newcomers.saturating_sub(1);
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

    /// Puts back a waiter `pop` gave out that could not be served after all: first in its
    /// client's line again, so its turn and its deadline (`expire_fronts`) are kept.
    pub fn unpop(&mut self, client: K, item: T) {
        let q = self.by_client.entry(client).or_default();
        if q.is_empty() {
            self.ring.push_back(client);
        }
        q.push_front(item);
        self.len += 1;
    }

    /// Takes the waiters `expired` picks from the front of each client's line into `out`. A
    /// line is in the order its waiters came, so those past a common timeout are at its front:
    /// this looks at one waiter per client more than it takes out.
    pub fn expire_fronts(&mut self, mut expired: impl FnMut(&T) -> bool, out: &mut Vec<T>) {
        let before = out.len();
        for q in self.by_client.values_mut() {
            while q.front().is_some_and(&mut expired) {
                out.extend(q.pop_front());
            }
        }
        if out.len() > before {
            self.len -= out.len() - before;
            self.by_client.retain(|_, q| !q.is_empty());
            let by_client = &self.by_client;
            self.ring.retain(|c| by_client.contains_key(c));
            // Which of the first clients were newcomers is not kept: they keep their places
            // in the ring, only not their precedence over another core's next.
            self.newcomers = 0;
        }
    }

    /// Drops waiters for which `alive` is false (they gave up).
    pub fn retain(&mut self, mut alive: impl FnMut(&T) -> bool) {
        for q in self.by_client.values_mut() {
            q.retain(&mut alive);
        }
        self.by_client.retain(|_, q| !q.is_empty());
        let by_client = &self.by_client;
        self.ring.retain(|c| by_client.contains_key(c));
        self.newcomers = 0;
        self.len = self.by_client.values().map(VecDeque::len).sum();
    }

    /// The first waiter of the client next in turn.
    pub fn front(&self) -> Option<&T> {
        self.by_client.get(self.ring.front()?)?.front()
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
        self.newcomers = 0;
        self.len = 0;
        self.by_client.drain().flat_map(|(_, q)| q).collect()
    }
}

/// The fair queue in parts, one per thread-per-core runtime (a single part without them).
///
/// Why: a request lent a connection driven on another core hands its work to that thread and
/// back; measured with 256 keep-alive clients on a pool of 64 and two cores, that was 1.6
/// cross-thread wake-ups (an eventfd write and often a context switch) per request. So a
/// connection freed on a core goes to the next waiter of that core's part, round-robin across
/// its addresses as before, unless another part's next waiter has waited clearly longer
/// (`SLACK`): then that one goes first, which bounds how much a core with fewer connections
/// (a pool smaller than the cores, or one h2c connection) makes its waiters wait.
#[derive(Debug)]
pub struct CoreQueues<K, T> {
    parts: Vec<FairQueue<K, T>>,
    len: usize,
}

impl<K, T> Default for CoreQueues<K, T> {
    fn default() -> Self {
        CoreQueues {
            parts: Vec::new(),
            len: 0,
        }
    }
}

/// Another core's waiter goes first when it has waited longer than this core's next waiter
/// by more than a quarter plus 2 ms: the ages of the next waiters of two busy parts differ by
/// chance, and locality should not be given up for noise.
fn waited_clearly_longer(other: std::time::Duration, own: std::time::Duration) -> bool {
    other > own + own / 4 + std::time::Duration::from_millis(2)
}

impl<K: Copy + Eq + Hash, T> CoreQueues<K, T> {
    fn part(&mut self, part: usize) -> &mut FairQueue<K, T> {
        if self.parts.len() <= part {
            self.parts.resize_with(part + 1, FairQueue::default);
        }
        &mut self.parts[part]
    }

    /// Queues `item` in `part` (the waiter's core; 0 without thread-per-core), as
    /// `FairQueue::push_with`.
    pub fn push_with(&mut self, part: usize, client: K, item: T, first: bool) {
        self.part(part).push_with(client, item, first);
        self.len += 1;
    }

    pub fn push(&mut self, part: usize, client: K, item: T) {
        self.push_with(part, client, item, false);
    }

    /// `FairQueue::unpop` in `part`.
    pub fn unpop(&mut self, part: usize, client: K, item: T) {
        self.part(part).unpop(client, item);
        self.len += 1;
    }

    /// `FairQueue::expire_fronts` in every part.
    pub fn expire_fronts(&mut self, mut expired: impl FnMut(&T) -> bool, out: &mut Vec<T>) {
        let before = out.len();
        for q in &mut self.parts {
            q.expire_fronts(&mut expired, out);
        }
        self.len -= out.len() - before;
    }

    /// The next eligible waiter for a connection freed on `part`, and the part it came from:
    /// that part's next in turn, unless another part's next has waited clearly longer
    /// (`since`: when a waiter was queued), or has a newcomer next where this one has not;
    /// when the chosen part has nobody eligible, any other part's.
    pub fn pop_for(
        &mut self,
        part: usize,
        mut eligible: impl FnMut(K, &T) -> bool,
        since: impl Fn(&T) -> tokio::time::Instant,
    ) -> Option<(usize, K, T)> {
        let own = part.min(self.parts.len().checked_sub(1)?);
        let mut first = own;
        // A newcomer (a client with nothing in flight) goes before the next round of clients
        // that hold connections on any core: where every free connection is driven on one core,
        // another core's newcomer otherwise waited until that core's older waiters were all
        // served (seen: a light client behind ~150 requests of a heavy one, 1.8 s).
        let newcomer = (0..self.parts.len()).find(|&i| self.parts[i].newcomers > 0);
        if let (Some(i), true) = (newcomer, self.parts[own].newcomers == 0) {
            first = i;
        } else if self.parts.len() > 1 {
            let now = tokio::time::Instant::now();
            let age = |q: &FairQueue<K, T>| q.front().map(|t| now.duration_since(since(t)));
            let oldest = (0..self.parts.len())
                .filter_map(|i| Some((age(&self.parts[i])?, i)))
                .max();
            first = match (age(&self.parts[own]), oldest) {
                (None, Some((_, i))) => i,
                (Some(mine), Some((theirs, i))) if waited_clearly_longer(theirs, mine) => i,
                _ => own,
            };
        }
        let order = std::iter::once(first).chain((0..self.parts.len()).filter(|&i| i != first));
        for i in order {
            if let Some((client, item)) = self.parts[i].pop(&mut eligible) {
                self.len -= 1;
                return Some((i, client, item));
            }
        }
        None
    }

    /// Drops waiters for which `alive` is false (they gave up).
    pub fn retain(&mut self, mut alive: impl FnMut(&T) -> bool) {
        for q in &mut self.parts {
            q.retain(&mut alive);
        }
        self.len = self.parts.iter().map(FairQueue::len).sum();
    }

    /// Each client with waiters, part by part: its key, its first waiter and how many it has
    /// in that part (a client whose connections run on two cores shows twice).
    pub fn clients(&self) -> impl Iterator<Item = (K, &T, usize)> + '_ {
        self.parts.iter().flat_map(FairQueue::clients)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every waiter.
    pub fn drain(&mut self) -> Vec<T> {
        self.len = 0;
        self.parts.iter_mut().flat_map(FairQueue::drain).collect()
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
    fn the_expired_are_taken_from_the_fronts_and_an_unpopped_waiter_keeps_its_place() {
        // Waiters are their queue times; a line holds them in order.
        let mut q = CoreQueues::default();
        for (part, client, t) in [(0, 1, 10), (0, 1, 20), (0, 2, 15), (1, 3, 5), (1, 3, 30)] {
            q.push(part, ip(client), t);
        }
        let mut out = Vec::new();
        q.expire_fronts(|&t| t <= 15, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![5, 10, 15]);
        assert_eq!(q.len(), 2);
        let fronts: Vec<_> = q.clients().map(|(c, &t, n)| (c, t, n)).collect();
        assert_eq!(fronts, vec![(ip(1), 20, 1), (ip(3), 30, 1)]);
        // Nothing more is due: nothing is taken, the count stands.
        q.expire_fronts(|&t| t <= 15, &mut out);
        assert_eq!((out.len(), q.len()), (3, 2));
        // A waiter given back goes first in its line again.
        q.push(0, ip(1), 40);
        let (part, client, t) = q
            .pop_for(0, |_, _| true, |_| tokio::time::Instant::now())
            .unwrap();
        assert_eq!((part, client, t), (0, ip(1), 20));
        q.unpop(part, client, t);
        assert_eq!(q.len(), 3);
        assert_eq!(
            q.pop_for(0, |_, _| true, |_| tokio::time::Instant::now())
                .unwrap()
                .2,
            20
        );
    }

    #[test]
    fn a_newcomer_on_another_core_goes_before_this_cores_older_waiters() {
        let t0 = tokio::time::Instant::now();
        let since = |w: &(u32, tokio::time::Instant)| w.1;
        let mut q = CoreQueues::default();
        // A heavy client's old requests on core 0; later a newcomer on core 1.
        for i in 0..5 {
            q.push(0, ip(1), (i, t0));
        }
        let later = t0 + std::time::Duration::from_millis(500);
        q.push_with(1, ip(2), (100, later), true);
        // Every connection comes back on core 0: the newcomer is served first all the same.
        let order: Vec<_> = (0..3)
            .map(|_| q.pop_for(0, |_, _| true, since).unwrap().2 .0)
            .collect();
        assert_eq!(order, vec![100, 0, 1]);
        // A client that already waits is no newcomer: age and locality decide as before.
        q.push(1, ip(3), (200, later));
        assert_eq!(q.pop_for(0, |_, _| true, since).unwrap().2 .0, 2);
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

    #[test]
    fn a_freed_connection_goes_to_its_cores_waiters_unless_another_waited_clearly_longer() {
        use std::time::Duration;
        use tokio::time::Instant;
        let now = Instant::now();
        let mut q: CoreQueues<IpAddr, (u32, Instant)> = CoreQueues::default();
        q.push(0, ip(1), (10, now));
        q.push(1, ip(2), (20, now));
        q.push(1, ip(3), (21, now));
        let since = |t: &(u32, Instant)| t.1;
        // Same age: the freed connection's own core.
        assert_eq!(q.pop_for(1, |_, _| true, since).map(|p| p.2 .0), Some(20));
        assert_eq!(q.pop_for(0, |_, _| true, since).map(|p| p.2 .0), Some(10));
        // Core 0 has nobody: core 1's waiter gets it, and says where it came from.
        assert_eq!(
            q.pop_for(0, |_, _| true, since).map(|p| (p.0, p.2 .0)),
            Some((1, 21))
        );
        assert!(q.is_empty());
        // A waiter queued 50 ms before core 1's goes first, wherever the connection was freed.
        q.push(0, ip(1), (30, now - Duration::from_millis(50)));
        q.push(1, ip(2), (40, now));
        assert_eq!(q.pop_for(1, |_, _| true, since).map(|p| p.2 .0), Some(30));
        // Nobody eligible on the chosen part: another part's.
        q.push(0, ip(4), (50, now));
        assert_eq!(
            q.pop_for(1, |c, _| c != ip(2), since).map(|p| p.2 .0),
            Some(50)
        );
        assert_eq!(q.len(), 1);
        assert_eq!(q.clients().count(), 1);
        // Asked for a core with no part yet: served from the others.
        assert_eq!(q.pop_for(7, |_, _| true, since).map(|p| p.2 .0), Some(40));
        assert!(q.pop_for(0, |_, _| true, since).is_none());
    }
}
