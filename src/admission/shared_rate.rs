//! The per-client rate limit when several instances share one budget (fleet mode, `fleet.rs`).
//!
//! Each instance still decides every connection here, locally, with no network call: a GCRA
//! per client key, the same rate and burst as `RateLimit`. What the fleet adds happens between
//! decisions: the sync task takes what this instance admitted since the last sync
//! (`take_touched`), adds it to the fleet's count in the store, and charges what the other
//! instances admitted to the local state (`debit`), past the burst if need be, so that the
//! next local decisions pay for them.
//!
//! Why not governor here, as `RateLimit` uses: governor cannot charge a key past its burst
//! (`check_key_n` charges nothing when it denies), and it keeps no per-key "admitted since"
//! count, which would need a second map lookup on the accept path. This is one map lookup and
//! a compare-and-swap per decision, like governor's own.
//!
//! Bans live in the same cell, so a fleet-wide ban costs the accept path nothing extra.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;

type Hasher = foldhash::fast::RandomState;

/// Debit beyond this is not charged: a client is never locked out for longer, whatever the
/// store reports.
const MAX_DEBT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Limited,
    Banned,
}

/// What one key did here since the last `take_touched`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touched {
    pub key: IpAddr,
    pub admitted: u32,
    pub refused: u32,
}

/// Bits of `Cell::state`: two 31-bit counts and two flags, so a decision updates one word
/// besides the GCRA time, and a cell is 16 bytes (the map's footprint is what a storm from
/// 100,000 addresses pays for in cache misses).
const ADMITTED: u64 = 1;
const REFUSED: u64 = 1 << 31;
const COUNT: u64 = (1 << 31) - 1;
/// In `touched` already: a key is listed once per sync.
const LISTED: u64 = 1 << 62;
/// Banned until `tat` less the tolerance has passed.
const BANNED: u64 = 1 << 63;

#[derive(Debug, Default)]
struct Cell {
    /// Theoretical arrival time, ns since `start`.
    tat: AtomicU64,
    state: AtomicU64,
}

#[derive(Debug)]
pub struct SharedRate {
    cells: DashMap<IpAddr, Cell, Hasher>,
    /// The emission interval (1 / rate) in ns; larger while the fleet runs degraded with a
    /// `degraded_factor` below 1.
    interval: AtomicU64,
    normal_interval: u64,
    burst: u64,
    /// quanta, as governor uses: the TSC read is a few ns where `Instant::now` is a vDSO call
    /// (measured: about 10 % of a whole admission decision).
    start: quanta::Instant,
    touched: Mutex<Vec<IpAddr>>,
}

impl SharedRate {
    /// `None` when `per_second` is 0 (disabled).
    pub fn new(per_second: u32, burst: u32) -> Option<SharedRate> {
        if per_second == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(per_second);
        Some(SharedRate {
            cells: DashMap::with_hasher(Hasher::default()),
            interval: AtomicU64::new(interval.max(1)),
            normal_interval: interval.max(1),
            burst: u64::from(burst.max(1)),
            start: quanta::Instant::now(),
            touched: Mutex::new(Vec::with_capacity(1024)),
        })
    }

    /// ns since this limiter was made: the time every method but the `_at` ones uses.
    pub fn now(&self) -> u64 {
        quanta::Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos() as u64
    }

    fn tolerance(&self) -> u64 {
        self.interval.load(Ordering::Relaxed) * (self.burst - 1)
    }

    pub fn check(&self, key: IpAddr) -> Verdict {
        self.check_at(key, self.now())
    }

    /// Takes one cell for `key` at `now` (ns): GCRA with tolerance (burst - 1) × interval.
    pub fn check_at(&self, key: IpAddr, now: u64) -> Verdict {
        if let Some(c) = self.cells.get(&key) {
            return self.decide(&c, key, now);
        }
        let c = self.cells.entry(key).or_default();
        self.decide(&c, key, now)
    }

    fn decide(&self, c: &Cell, key: IpAddr, now: u64) -> Verdict {
        let t = self.interval.load(Ordering::Relaxed);
        let tolerance = t * (self.burst - 1);
        let mut tat = c.tat.load(Ordering::Acquire);
        if c.state.load(Ordering::Relaxed) & BANNED != 0 {
            if tat.saturating_sub(now) > tolerance {
                return Verdict::Banned;
            }
            c.state.fetch_and(!BANNED, Ordering::AcqRel);
        }
        let counted = loop {
            let from = tat.max(now);
            if from - now > tolerance {
                break REFUSED;
            }
            match c
                .tat
                .compare_exchange_weak(tat, from + t, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break ADMITTED,
                Err(now_tat) => tat = now_tat,
            }
        };
        let prev = c.state.fetch_add(counted, Ordering::AcqRel);
        if prev & LISTED == 0 && c.state.fetch_or(LISTED, Ordering::AcqRel) & LISTED == 0 {
            // Amortised: the vector keeps its capacity across syncs (`take_touched` swaps it
            // for one as large), so this push does not allocate in steady state.
            if let Ok(mut t) = self.touched.lock() {
                t.push(key);
            }
        }
        if counted == ADMITTED {
            Verdict::Pass
        } else {
            Verdict::Limited
        }
    }

    /// What every key did here since the last call, for the sync task. `buf` is handed back
    /// empty with the old list's capacity, so neither side allocates in steady state.
    pub fn take_touched(&self, buf: &mut Vec<IpAddr>, out: &mut Vec<Touched>) {
        buf.clear();
        if let Ok(mut t) = self.touched.lock() {
            std::mem::swap(&mut *t, buf);
        }
        for &key in buf.iter() {
            if let Some(c) = self.cells.get(&key) {
                // Counts and the listed flag go in one step: a decision that lands after this
                // lists the key again and is counted next time, never lost.
                let st = c.state.fetch_and(BANNED, Ordering::AcqRel);
                out.push(Touched {
                    key,
                    admitted: (st & COUNT) as u32,
                    refused: ((st >> 31) & COUNT) as u32,
                });
            }
        }
    }

    /// Charges `n` admissions made elsewhere since `since` (ns, see `now`) to `key`, past the
    /// burst if need be (at most `MAX_DEBT` ahead). They are charged as of `since`: a client
    /// that used less than the rate elsewhere over that time owes nothing now, as it would
    /// if all its connections had come here.
    pub fn debit(&self, key: IpAddr, n: u64, since: u64) {
        self.debit_at(key, n, since, self.now())
    }

    pub fn debit_at(&self, key: IpAddr, n: u64, since: u64, now: u64) {
        if n == 0 {
            return;
        }
        let t = self.interval.load(Ordering::Relaxed);
        let cap = now + MAX_DEBT.as_nanos() as u64;
        let c = self.cells.entry(key).or_default();
        let _ = c
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some((tat.max(since.min(now)) + n.saturating_mul(t)).min(cap.max(tat)))
            });
    }

    /// Refuses `key` outright for `for_` (a ban).
    pub fn ban(&self, key: IpAddr, for_: Duration) {
        let until = self.now() + for_.as_nanos() as u64 + self.tolerance();
        let c = self.cells.entry(key).or_default();
        c.tat.fetch_max(until, Ordering::AcqRel);
        c.state.fetch_or(BANNED, Ordering::AcqRel);
    }

    /// Keys banned now.
    pub fn banned(&self) -> usize {
        let (now, tolerance) = (self.now(), self.tolerance());
        self.cells
            .iter()
            .filter(|c| {
                c.state.load(Ordering::Relaxed) & BANNED != 0
                    && c.tat.load(Ordering::Relaxed).saturating_sub(now) > tolerance
            })
            .count()
    }

    /// Runs at `1 / factor` of the configured rate (the fleet's store is unreachable and
    /// `degraded_factor` shares the budget out per instance); 1.0 restores it.
    pub fn set_factor(&self, factor: f64) {
        let f = if factor.is_finite() && factor > 0.0 {
            factor
        } else {
            1.0
        };
        let t = (self.normal_interval as f64 / f).round() as u64;
        self.interval.store(t.max(1), Ordering::Relaxed);
    }

    /// Forgets keys whose state has fully refilled, that are not banned and have nothing
    /// waiting for the sync task.
    pub fn prune(&self) {
        let now = self.now();
        self.cells.retain(|_, c| {
            c.tat.load(Ordering::Relaxed) > now || c.state.load(Ordering::Relaxed) & LISTED != 0
        });
        self.cells.shrink_to_fit();
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const MS: u64 = 1_000_000;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
    }

    #[test]
    fn burst_then_rate_like_governor() {
        let r = SharedRate::new(10, 5).unwrap();
        let passed = (0..10)
            .filter(|_| r.check_at(ip(1), 0) == Verdict::Pass)
            .count();
        assert_eq!(passed, 5);
        assert_eq!(r.check_at(ip(1), 99 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(1), 100 * MS), Verdict::Pass);
        assert_eq!(r.check_at(ip(1), 100 * MS), Verdict::Limited);
        // Another key is untouched.
        assert_eq!(r.check_at(ip(2), 100 * MS), Verdict::Pass);
    }

    #[test]
    fn a_debit_is_paid_by_later_local_decisions_past_the_burst() {
        let r = SharedRate::new(10, 5).unwrap();
        // 20 admitted elsewhere: 2 s of this key's rate, more than the burst.
        r.debit_at(ip(1), 20, 0, 0);
        assert_eq!(r.check_at(ip(1), 0), Verdict::Limited);
        // Owed until 2 s, with a tolerance of 4 intervals: the first cell comes back at 1.6 s.
        assert_eq!(r.check_at(ip(1), 1_590 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(1), 1_600 * MS), Verdict::Pass);
    }

    #[test]
    fn a_debit_is_charged_as_of_when_it_was_spent() {
        let r = SharedRate::new(10, 5).unwrap();
        // 9 admitted elsewhere over the last second: under the rate, nothing owed now.
        r.debit_at(ip(1), 9, 0, 1_000 * MS);
        assert_eq!(
            (0..10)
                .filter(|_| r.check_at(ip(1), 1_000 * MS) == Verdict::Pass)
                .count(),
            5
        );
        // 30 over the last second: 2 s owed beyond now.
        r.debit_at(ip(2), 30, 0, 1_000 * MS);
        assert_eq!(r.check_at(ip(2), 2_590 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(2), 2_600 * MS), Verdict::Pass);
    }

    #[test]
    fn debit_is_capped() {
        let r = SharedRate::new(10, 1).unwrap();
        r.debit_at(ip(1), u64::MAX, 0, 0);
        assert_eq!(r.check_at(ip(1), 59_000 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(1), 60_000 * MS), Verdict::Pass);
    }

    #[test]
    fn touched_lists_each_key_once_with_its_counts_and_forgets_them() {
        let r = SharedRate::new(10, 3).unwrap();
        for _ in 0..5 {
            r.check_at(ip(1), 0);
        }
        r.check_at(ip(2), 0);
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        r.take_touched(&mut buf, &mut out);
        out.sort_by_key(|t| t.key);
        assert_eq!(
            out,
            vec![
                Touched {
                    key: ip(1),
                    admitted: 3,
                    refused: 2
                },
                Touched {
                    key: ip(2),
                    admitted: 1,
                    refused: 0
                }
            ]
        );
        out.clear();
        r.take_touched(&mut buf, &mut out);
        assert!(out.is_empty());
        r.check_at(ip(2), 0);
        r.take_touched(&mut buf, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_ban_refuses_and_outlives_pruning() {
        let r = SharedRate::new(10, 3).unwrap();
        r.ban(ip(7), Duration::from_secs(30));
        assert_eq!(r.check(ip(7)), Verdict::Banned);
        assert_eq!(r.banned(), 1);
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        r.take_touched(&mut buf, &mut out);
        r.prune();
        // A debit (capped at a minute) does not shorten it.
        r.debit(ip(7), 1, 0);
        assert_eq!(r.check(ip(7)), Verdict::Banned);
        assert_eq!(r.check_at(ip(7), r.now() + 29_000 * MS), Verdict::Banned);
        assert_eq!(r.check_at(ip(7), r.now() + 31_000 * MS), Verdict::Pass);
        assert_eq!(r.check(ip(8)), Verdict::Pass);
    }

    #[test]
    fn degraded_factor_slows_the_rate() {
        let r = SharedRate::new(10, 1).unwrap();
        r.set_factor(0.5);
        assert_eq!(r.check_at(ip(1), 0), Verdict::Pass);
        assert_eq!(r.check_at(ip(1), 100 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(1), 200 * MS), Verdict::Pass);
        r.set_factor(1.0);
        assert_eq!(r.check_at(ip(1), 300 * MS), Verdict::Limited);
        assert_eq!(r.check_at(ip(1), 400 * MS), Verdict::Pass);
    }
}
