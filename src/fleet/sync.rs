//! The sync loop of fleet mode (see `fleet.rs`): once per `sync_interval`, one pipeline to the
//! store with this instance's admissions and refusals per client, and what the replies change
//! here: remote admissions charged to the local limiters, bans decided, the store's health.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::shared_rate::{SharedRate, Touched};
use crate::admission::Admission;

use super::{unix_ms, Fleet, BACKOFF_MAX, BACKOFF_MIN, BREAK_AFTER, MAX_KEYS};

/// What this instance saw of one client in the current epoch.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The fleet's total at the last reply.
    total: u64,
    /// What this instance sent.
    mine: u64,
    /// When (the limiter's clock) the total was read.
    at: u64,
}

/// One keyspace (connections or requests): what is owed to the store and what was seen.
#[derive(Default)]
struct Space {
    seen: HashMap<IpAddr, Seen>,
    /// Counts whose sync failed, sent with the next one.
    carry: HashMap<IpAddr, u64>,
    /// This tick's batch: (key, count) in pipeline order.
    batch: Vec<(IpAddr, u64)>,
}

pub(super) struct Sync {
    fleet: Arc<Fleet>,
    client: Option<redis::Client>,
    conn: Option<redis::aio::MultiplexedConnection>,
    spaces: [Space; 2],
    /// The epoch the `seen` maps belong to.
    epoch: u64,
    /// ns into `epoch` at this tick (the store's clock).
    into_epoch: u64,
    /// In this epoch a client's first total is a baseline, not charged: the limits came back
    /// from running local, and what was admitted before was charged already.
    baseline_epoch: Option<u64>,
    /// The store's clock minus ours, in ms.
    offset_ms: i64,
    failures: u32,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Rate-limit refusals per client in the current ban window.
    refusals: HashMap<IpAddr, (Instant, u32)>,
    new_bans: Vec<(IpAddr, u64)>,
    /// This tick's refusals per client, summed fleet-wide in the store.
    refused_batch: Vec<(IpAddr, u64)>,
    /// Clients whose fleet-wide refusals crossed `after_rejections` in the last reply.
    to_ban: Vec<IpAddr>,
    touched_buf: Vec<IpAddr>,
    touched: Vec<Touched>,
    last_sweep: Instant,
}

impl Sync {
    /// `reloaded`: started by a reload, so the first totals of this epoch are a baseline.
    pub(super) fn new(fleet: Arc<Fleet>, client: Option<redis::Client>, reloaded: bool) -> Sync {
        Sync {
            fleet,
            client,
            conn: None,
            spaces: Default::default(),
            epoch: 0,
            into_epoch: 0,
            // Epoch ids are never 0 (the store's clock is past 1970), so this baseline applies
            // to whatever epoch the first sync lands in (see `exchange`).
            baseline_epoch: reloaded.then_some(0),
            offset_ms: 0,
            failures: 0,
            retry_at: None,
            backoff: BACKOFF_MIN,
            refusals: HashMap::new(),
            new_bans: Vec::new(),
            refused_batch: Vec::new(),
            to_ban: Vec::new(),
            touched_buf: Vec::new(),
            touched: Vec::new(),
            last_sweep: Instant::now(),
        }
    }

    pub(super) async fn tick(&mut self, admission: &Admission) {
        let limits = admission.shared_limits();
        for key in std::mem::take(&mut self.to_ban) {
            self.decide_ban(key, admission);
        }
        let fleet_counts = self.client.is_some()
            && self.retry_at.is_none()
            && self.fleet.cfg.bans.after_rejections > 0;
        self.refused_batch.clear();
        for (i, limit) in limits.iter().enumerate() {
            self.spaces[i].batch.clear();
            let Some(limit) = limit else {
                continue;
            };
            self.touched.clear();
            limit.take_touched(&mut self.touched_buf, &mut self.touched);
            let touched = std::mem::take(&mut self.touched);
            for t in &touched {
                if t.refused > 0 && fleet_counts {
                    self.refused_batch.push((t.key, u64::from(t.refused)));
                } else if t.refused > 0 {
                    self.count_refusals(t.key, t.refused, admission);
                }
                // A client refused here is read back too (count 0): it is the one whose
                // admissions elsewhere matter.
                self.spaces[i].batch.push((t.key, u64::from(t.admitted)));
            }
            self.touched = touched;
        }
        if self.last_sweep.elapsed() >= self.fleet.cfg.bans.window {
            let window = self.fleet.cfg.bans.window;
            self.refusals
                .retain(|_, (start, _)| start.elapsed() < window);
            self.last_sweep = Instant::now();
        }
        if self.client.is_none() {
            self.new_bans.clear();
            return;
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                // Local: what was counted meanwhile is not sent later.
                let n: u64 = self
                    .spaces
                    .iter()
                    .flat_map(|s| s.batch.iter().map(|b| b.1))
                    .sum();
                self.fleet.stats.dropped.fetch_add(n, Ordering::Relaxed);
                self.new_bans.clear();
                return;
            }
        }
        for s in &mut self.spaces {
            // The carried counts join this batch (a key both carried and new is sent once).
            if !s.carry.is_empty() {
                for (k, n) in s.batch.iter_mut() {
                    if let Some(c) = s.carry.remove(k) {
                        *n += c;
                    }
                }
                s.batch.extend(s.carry.drain());
            }
            if s.batch.len() > MAX_KEYS {
                for (k, n) in s.batch.drain(MAX_KEYS..) {
                    *s.carry.entry(k).or_default() += n;
                }
            }
        }
        let started = Instant::now();
        match self.exchange().await {
            Ok(replies) => {
                self.fleet
                    .stats
                    .sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.fleet.stats.syncs.fetch_add(1, Ordering::Relaxed);
                // Restored first: its baseline applies to this very reply.
                if self.retry_at.is_some() || !self.fleet.stats.up.load(Ordering::Relaxed) {
                    self.restored(&limits);
                }
                self.apply(replies, &limits);
                self.failures = 0;
            }
            Err(timed_out) => {
                let stat = if timed_out {
                    &self.fleet.stats.sync_timeouts
                } else {
                    &self.fleet.stats.sync_errors
                };
                stat.fetch_add(1, Ordering::Relaxed);
                // The refusals this sync did not carry are counted here instead.
                for (key, n) in std::mem::take(&mut self.refused_batch) {
                    self.count_refusals(key, n as u32, admission);
                }
                for s in &mut self.spaces {
                    for (k, n) in s.batch.drain(..) {
                        *s.carry.entry(k).or_default() += n;
                    }
                }
                self.failures += 1;
                if !timed_out {
                    self.conn = None;
                }
                if self.failures >= BREAK_AFTER {
                    self.degraded(&limits, timed_out);
                }
            }
        }
        self.new_bans.clear();
    }

    fn count_refusals(&mut self, key: IpAddr, n: u32, admission: &Admission) {
        let bans = &self.fleet.cfg.bans;
        if bans.after_rejections == 0 {
            return;
        }
        let now = Instant::now();
        let e = self.refusals.entry(key).or_insert((now, 0));
        if now.duration_since(e.0) >= bans.window {
            *e = (now, 0);
        }
        e.1 += n;
        if e.1 >= bans.after_rejections {
            self.refusals.remove(&key);
            self.decide_ban(key, admission);
        }
    }

    /// Bans `key` here now and queues the ban for the store (ZADD + PUBLISH in the next sync).
    fn decide_ban(&mut self, key: IpAddr, admission: &Admission) {
        let bans = &self.fleet.cfg.bans;
        if admission.ban(key, bans.duration) {
            self.fleet
                .stats
                .bans_decided
                .fetch_add(1, Ordering::Relaxed);
            let until =
                (unix_ms() as i64 + self.offset_ms) as u64 + bans.duration.as_millis() as u64;
            self.new_bans.push((key, until));
            tracing::warn!(
                client = %key,
                refusals = bans.after_rejections,
                window = ?bans.window,
                duration = ?bans.duration,
                "fleet: client banned for repeatedly hitting its rate limit"
            );
        }
    }

    /// Sends this tick's pipeline. `Err(true)`: timed out; `Err(false)`: failed.
    async fn exchange(&mut self) -> Result<Vec<redis::Value>, bool> {
        let cfg = &self.fleet.cfg;
        let timeout = cfg.sync_timeout;
        let Some(client) = &self.client else {
            return Err(false);
        };
        let epoch_ms = cfg.epoch.as_millis() as u64;
        let now_ms = (unix_ms() as i64 + self.offset_ms) as u64;
        let epoch = now_ms / epoch_ms;
        self.into_epoch = (now_ms % epoch_ms) * 1_000_000;
        if self.baseline_epoch == Some(0) {
            self.baseline_epoch = Some(epoch);
        }
        if epoch != self.epoch {
            // Every count of the new epoch starts from zero in the store; so does what we saw.
            for s in &mut self.spaces {
                s.seen.clear();
            }
            self.epoch = epoch;
        }
        let ttl = epoch_ms / 1000 * 3;
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        let mut commands = 1u64;
        for (space, s) in ["c", "r"].iter().zip(&self.spaces) {
            if s.batch.is_empty() {
                continue;
            }
            let hash = format!("{}:{space}:{epoch}", cfg.namespace);
            for (key, n) in &s.batch {
                pipe.cmd("HINCRBY").arg(&hash).arg(key.to_string()).arg(*n);
            }
            pipe.cmd("EXPIRE").arg(&hash).arg(ttl).ignore();
            commands += s.batch.len() as u64 + 1;
            self.fleet
                .stats
                .keys_synced
                .fetch_add(s.batch.len() as u64, Ordering::Relaxed);
        }
        if !self.refused_batch.is_empty() {
            let window_ms = cfg.bans.window.as_millis().max(1) as u64;
            let hash = format!("{}:x:{}", cfg.namespace, now_ms / window_ms);
            for (key, n) in &self.refused_batch {
                pipe.cmd("HINCRBY").arg(&hash).arg(key.to_string()).arg(*n);
            }
            pipe.cmd("EXPIRE")
                .arg(&hash)
                .arg((window_ms / 1000).max(1) * 2)
                .ignore();
            commands += self.refused_batch.len() as u64 + 1;
        }
        if !self.new_bans.is_empty() {
            let set = format!("{}:bans", cfg.namespace);
            let decided = unix_ms();
            for (key, until) in &self.new_bans {
                pipe.cmd("ZADD")
                    .arg(&set)
                    .arg(*until)
                    .arg(key.to_string())
                    .ignore();
                pipe.cmd("PUBLISH")
                    .arg(&set)
                    .arg(format!(
                        "{key} {} {decided} {}",
                        (*until as i64 - self.offset_ms) as u64,
                        cfg.instance
                    ))
                    .ignore();
            }
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&set)
                .arg("-inf")
                .arg(now_ms)
                .ignore();
            commands += self.new_bans.len() as u64 * 2 + 1;
        }
        self.fleet
            .stats
            .commands
            .fetch_add(commands, Ordering::Relaxed);
        super::query(client, &mut self.conn, &pipe, timeout).await
    }

    /// Reads the fleet totals back and charges what the other instances admitted.
    fn apply(&mut self, replies: Vec<redis::Value>, limits: &[Option<Arc<SharedRate>>; 2]) {
        let mut it = replies.into_iter();
        if let Some(redis::Value::Array(t)) = it.next() {
            let secs = t.first().and_then(value_u64);
            let micros = t.get(1).and_then(value_u64);
            if let (Some(s), Some(us)) = (secs, micros) {
                self.offset_ms = (s * 1000 + us / 1000) as i64 - unix_ms() as i64;
            }
        }
        let mut reset = false;
        let (baseline, epoch, into_epoch) = (self.baseline_epoch, self.epoch, self.into_epoch);
        for (i, s) in self.spaces.iter_mut().enumerate() {
            let now = limits[i].as_ref().map_or(0, |l| l.now());
            for (key, n) in s.batch.drain(..) {
                let Some(total) = it.next().as_ref().and_then(value_u64) else {
                    continue;
                };
                // What the others admitted, and since when it is charged.
                let charge = match s.seen.get_mut(&key) {
                    // First look in this epoch: charged as of the epoch's start (when they
                    // spent it is not known; a client under the rate since then owes nothing
                    // now, one over it owes the difference). Right after a restore, a
                    // baseline only: that was charged before.
                    None => {
                        s.seen.insert(
                            key,
                            Seen {
                                total,
                                mine: n,
                                at: now,
                            },
                        );
                        (baseline != Some(epoch))
                            .then(|| (total.saturating_sub(n), now.saturating_sub(into_epoch)))
                    }
                    // Less than this instance alone sent: the store lost the counters.
                    Some(seen) if total < seen.mine + n => {
                        reset = true;
                        *seen = Seen {
                            total,
                            mine: total,
                            at: now,
                        };
                        None
                    }
                    Some(seen) => {
                        let remote = total - seen.total - n.min(total - seen.total);
                        let since = seen.at;
                        *seen = Seen {
                            total,
                            mine: seen.mine + n,
                            at: now,
                        };
                        Some((remote, since))
                    }
                };
                if let Some((remote, since)) = charge.filter(|c| c.0 > 0) {
                    if let Some(l) = &limits[i] {
                        l.debit(key, remote, since);
                    }
                    self.fleet
                        .stats
                        .remote_debits
                        .fetch_add(remote, Ordering::Relaxed);
                }
            }
        }
        // Refusals: the reply whose total crosses the line is this instance's to act on (HINCRBY
        // is atomic, so exactly one instance sees the crossing).
        let line = u64::from(self.fleet.cfg.bans.after_rejections);
        for (key, n) in self.refused_batch.drain(..) {
            let Some(total) = it.next().as_ref().and_then(value_u64) else {
                continue;
            };
            if total >= line && total - n.min(total) < line {
                self.to_ban.push(key);
            }
        }
        if reset {
            self.fleet.stats.resets.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("fleet: the store lost its counters (restarted?); baselines reset");
        }
    }

    fn degraded(&mut self, limits: &[Option<Arc<SharedRate>>; 2], timed_out: bool) {
        let first = self.retry_at.is_none();
        self.retry_at = Some(Instant::now() + self.backoff);
        if first {
            self.fleet.stats.up.store(false, Ordering::Relaxed);
            self.fleet
                .stats
                .degraded_episodes
                .fetch_add(1, Ordering::Relaxed);
            for l in limits.iter().flatten() {
                l.set_factor(self.fleet.cfg.degraded_factor);
            }
            tracing::warn!(
                failures = self.failures,
                reason = if timed_out { "timeout" } else { "error" },
                degraded_factor = self.fleet.cfg.degraded_factor,
                retry_in = ?self.backoff,
                "fleet: store unreachable; limits run local until it answers"
            );
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        for s in &mut self.spaces {
            s.carry.clear();
            s.seen.clear();
        }
    }

    fn restored(&mut self, limits: &[Option<Arc<SharedRate>>; 2]) {
        let was_degraded = self.retry_at.take().is_some();
        if was_degraded {
            self.baseline_epoch = Some(self.epoch);
        }
        self.backoff = BACKOFF_MIN;
        self.fleet.stats.up.store(true, Ordering::Relaxed);
        for l in limits.iter().flatten() {
            l.set_factor(1.0);
        }
        if was_degraded {
            tracing::info!("fleet: store answers again; limits shared");
        } else {
            tracing::info!(instance = %self.fleet.cfg.instance, "fleet: syncing limits with the store");
        }
    }
}

pub(super) fn value_u64(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        redis::Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}
