//! Per-client rate limits (governor's GCRA, one state per client key).
//!
//! governor keeps every key forever (its issue #171), so a storm from 100,000 addresses would
//! leave 100,000 states behind: `prune` drops the keys whose state has fully refilled (they are
//! indistinguishable from new ones) and gives the memory back. `Admission` calls it on a timer.
//! The clock is a type parameter so tests step time instead of sleeping.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, QuantaClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// foldhash instead of the default SipHash: about half the cost per lookup on the accept path,
/// still seeded per process, so clients cannot precompute colliding addresses.
type Hasher = foldhash::fast::RandomState;

pub struct RateLimit<C: Clock = QuantaClock> {
    limiter: RateLimiter<IpAddr, DashMapStateStore<IpAddr, Hasher>, C, NoOpMiddleware<C::Instant>>,
}

impl RateLimit<QuantaClock> {
    /// `None` when `per_second` is 0 (disabled).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        Self::with_clock(per_second, burst, QuantaClock::default())
    }
}

impl<C: Clock> RateLimit<C> {
    pub fn with_clock(per_second: u32, burst: u32, clock: C) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(1))?;
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(RateLimit {
            limiter: RateLimiter::dashmap_with_clock_and_hasher(quota, clock, Hasher::default()),
        })
    }

    /// Takes one cell for `key`; false when it has none left. A refused attempt costs nothing,
    /// so a client that keeps hammering still gets `per_second` through (like nginx's
    /// limit_req, unlike HAProxy's conn_rate, which counts refused connections too).
    pub fn check(&self, key: IpAddr) -> bool {
        self.limiter.check_key(&key).is_ok()
    }

    /// Forgets keys whose state has fully refilled and returns the memory.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys currently tracked.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let clock = FakeRelativeClock::default();
        let rl = RateLimit::with_clock(10, 5, clock.clone()).unwrap();
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
        assert_eq!((0..10).filter(|_| rl.check(ip)).count(), 5);
        clock.advance(Duration::from_millis(100));
        assert!(rl.check(ip));
        assert!(!rl.check(ip));
    }

    #[test]
    fn prune_forgets_idle_keys() {
        let clock = FakeRelativeClock::default();
        let rl = RateLimit::with_clock(100, 200, clock.clone()).unwrap();
        for i in 0..10_000u32 {
            assert!(rl.check(IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + i))));
        }
        assert_eq!(rl.len(), 10_000);
        rl.prune();
        assert_eq!(rl.len(), 10_000, "keys still refilling are kept");
        clock.advance(Duration::from_secs(3));
        rl.prune();
        assert_eq!(rl.len(), 0);
    }

    #[test]
    fn zero_disables() {
        assert!(RateLimit::new(0, 10).is_none());
    }
}
