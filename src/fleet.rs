//! Fleet mode: several instances behind one L4 balancer share their per-client rate limits and
//! bans through Redis, so the fleet limits a client as one Breakwater would.
//!
//! The accept path never waits on the store. Every decision is local (`admission/
//! shared_rate.rs`); this task, once per `sync_interval`, sends one pipeline:
//!
//! ```text
//! TIME                                      the store's clock: epochs follow it, not ours
//! HINCRBY {ns}:c:{epoch} {client} {n} ...   connections admitted here since the last sync
//! HINCRBY {ns}:r:{epoch} {client} {n} ...   requests admitted here (per_ip_request_rate)
//! EXPIRE  {ns}:{c|r}:{epoch} 3 epochs
//! ZADD {ns}:bans {until_ms} {client}; PUBLISH {ns}:bans ...   bans this instance decided
//! ```
//!
//! Each HINCRBY answers the fleet's total for that client in the epoch; what the other
//! instances admitted since the last look is charged to the local limiter (`debit`), past the
//! burst if need be. HAProxy's `peers` overwrites counters instead (active-active undercounts
//! by up to N×); Envoy's global limit asks a service per connection. Here the fleet can
//! over-admit by at most what the others admit within one sync interval plus a burst each.
//!
//! When the store fails three times running, the limits run local (at `degraded_factor` of
//! the rate) and the task retries (see `BACKOFF_MIN`); counts made meanwhile are not
//! sent later (they would charge every other instance for the outage). A total below what this
//! instance alone sent in the epoch means the store lost its data (a restart): baselines are
//! reset, nothing is charged. One log line per change of state, never one per connection.
//!
//! Bans: a client refused `after_rejections` times within `window` by the whole fleet (the
//! refusals are summed in the store like the admissions, `HINCRBY {ns}:x:{window}`; the
//! instance whose count crosses the line decides) is banned for `duration`: there at once,
//! everywhere else through PUBLISH (a subscriber task applies it to the local limiter; the
//! accept path sees it in the same map lookup as the rate). An instance that (re)subscribes
//! reads the bans in force from the sorted set. Without the store, each instance counts its own
//! refusals.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::admission::shared_rate::{SharedRate, Touched};
use crate::admission::Admission;
use crate::config::fleet::FleetConfig;

/// Failures in a row that switch the limits to local.
const BREAK_AFTER: u32 = 3;
/// Retries while the store is unreachable. The issue suggested 1 s doubling to 10 s; a retry is
/// one connect and one pipeline per instance, nothing a recovering Redis notices, while a
/// 10 s cap would leave the fleet unshared for up to 10 s after the store is back (the goal is
/// 2 s). So: 250 ms doubling to 2 s.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Keys per keyspace in one pipeline; the rest wait for the next sync (a storm from a million
/// addresses costs the store a bounded batch per interval, not a million commands).
const MAX_KEYS: usize = 20_000;

/// What the fleet task did, read by the metrics.
#[derive(Debug)]
pub struct FleetStats {
    /// 1 while syncing with the store; 0 while the limits run local.
    pub up: AtomicBool,
    pub syncs: AtomicU64,
    pub sync_timeouts: AtomicU64,
    pub sync_errors: AtomicU64,
    /// Commands sent to the store, all in sync pipelines (the accept and request paths send
    /// none: this grows only with sync ticks).
    pub commands: AtomicU64,
    pub keys_synced: AtomicU64,
    /// Admissions by other instances charged to the local limiters.
    pub remote_debits: AtomicU64,
    /// Times the store was found to have lost its counters.
    pub resets: AtomicU64,
    /// Counts made while the store was unreachable, not sent.
    pub dropped: AtomicU64,
    pub bans_decided: AtomicU64,
    pub bans_received: AtomicU64,
    pub degraded_episodes: AtomicU64,
    pub sync_seconds: Histogram,
    /// From a ban decided on another instance to it applying here.
    pub ban_propagation_seconds: Histogram,
}

impl Default for FleetStats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        FleetStats {
            up: AtomicBool::new(false),
            syncs: z(),
            sync_timeouts: z(),
            sync_errors: z(),
            commands: z(),
            keys_synced: z(),
            remote_debits: z(),
            resets: z(),
            dropped: z(),
            bans_decided: z(),
            bans_received: z(),
            degraded_episodes: z(),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            ban_propagation_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
        }
    }
}

#[derive(Debug)]
pub struct Fleet {
    pub cfg: FleetConfig,
    pub stats: FleetStats,
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Arc<Fleet> {
        Arc::new(Fleet {
            cfg,
            stats: FleetStats::default(),
        })
    }

    /// Syncs until aborted (at shutdown), and with a store also listens for bans.
    pub async fn run(self: Arc<Self>, admission: Arc<Admission>) {
        let client = match &self.cfg.redis_url {
            None => None,
            Some(url) => match redis::Client::open(url.as_str()) {
                Ok(c) => Some(c),
                Err(e) => {
                    // `check` validated the URL; what is left is e.g. an unsupported TLS URL.
                    tracing::error!(error = %e, "fleet: cannot use redis_url; limits run local");
                    None
                }
            },
        };
        let bans = client
            .clone()
            .map(|c| tokio::spawn(self.clone().listen_bans(c, admission.clone())));
        let mut sync = Sync::new(self.clone(), client);
        let mut tick = tokio::time::interval(self.cfg.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Aborting this task drops `_bans` and with it the subscriber.
        let _bans = bans.map(AbortOnDrop);
        loop {
            tick.tick().await;
            sync.tick(&admission).await;
        }
    }

    /// Applies the bans other instances publish; on every (re)subscription first reads the
    /// bans in force.
    async fn listen_bans(self: Arc<Self>, client: redis::Client, admission: Arc<Admission>) {
        let channel = format!("{}:bans", self.cfg.namespace);
        let mut backoff = BACKOFF_MIN;
        loop {
            let subscribed = async {
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                // Subscribed first, then read: a ban published in between is seen twice,
                // harmlessly, rather than not at all.
                let mut conn = client.get_multiplexed_async_connection().await?;
                let (now_s, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
                let now_ms = now_s * 1000;
                let current: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
                    .arg(&channel)
                    .arg(now_ms)
                    .arg("+inf")
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await?;
                for (key, until) in current {
                    if let Ok(ip) = key.parse::<IpAddr>() {
                        admission.ban(ip, Duration::from_millis(until.saturating_sub(now_ms)));
                    }
                }
                Ok::<_, redis::RedisError>(ps)
            };
            match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
                Ok(Ok(mut ps)) => {
                    backoff = BACKOFF_MIN;
                    let mut messages = ps.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        self.apply_ban_message(&text, &admission);
                    }
                    tracing::debug!("fleet: ban subscription closed; resubscribing");
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "fleet: cannot subscribe to bans"),
                Err(_) => tracing::debug!("fleet: subscribing to bans timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// `"{client} {until_unix_ms} {decided_unix_ms} {instance}"`.
    fn apply_ban_message(&self, text: &str, admission: &Admission) {
        let mut parts = text.splitn(4, ' ');
        let (Some(key), Some(until), Some(decided), Some(instance)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        if instance == self.cfg.instance {
            return;
        }
        let (Ok(ip), Ok(until), Ok(decided)) = (
            key.parse::<IpAddr>(),
            until.parse::<u64>(),
            decided.parse::<u64>(),
        ) else {
            return;
        };
        let now = unix_ms();
        if until <= now {
            return;
        }
        if admission.ban(ip, Duration::from_millis(until - now)) {
            self.stats.bans_received.fetch_add(1, Ordering::Relaxed);
            self.stats
                .ban_propagation_seconds
                .observe(now.saturating_sub(decided) as f64 / 1000.0);
            tracing::info!(client = %ip, from = instance, "fleet: client banned by another instance");
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

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

struct Sync {
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
    fn new(fleet: Arc<Fleet>, client: Option<redis::Client>) -> Sync {
        Sync {
            fleet,
            client,
            conn: None,
            spaces: Default::default(),
            epoch: 0,
            into_epoch: 0,
            baseline_epoch: None,
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

    async fn tick(&mut self, admission: &Admission) {
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
        if self.conn.is_none() {
            let Some(client) = &self.client else {
                return Err(false);
            };
            match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
                Ok(Ok(c)) => self.conn = Some(c),
                Ok(Err(_)) => return Err(false),
                Err(_) => return Err(true),
            }
        }
        let epoch_ms = cfg.epoch.as_millis() as u64;
        let now_ms = (unix_ms() as i64 + self.offset_ms) as u64;
        let epoch = now_ms / epoch_ms;
        self.into_epoch = (now_ms % epoch_ms) * 1_000_000;
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
        let Some(conn) = self.conn.as_mut() else {
            return Err(false);
        };
        match tokio::time::timeout(timeout, pipe.query_async::<Vec<redis::Value>>(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "fleet sync failed");
                Err(false)
            }
            Err(_) => Err(true),
        }
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
                let Some(seen) = s.seen.get_mut(&key) else {
                    // First look in this epoch: what the others admitted is charged as of the
                    // epoch's start (when they spent it is not known; a client under the rate
                    // since then owes nothing now, one over it owes the difference).
                    s.seen.insert(
                        key,
                        Seen {
                            total,
                            mine: n,
                            at: now,
                        },
                    );
                    let remote = total.saturating_sub(n);
                    if remote > 0 && baseline != Some(epoch) {
                        if let Some(l) = &limits[i] {
                            l.debit(key, remote, now.saturating_sub(into_epoch));
                        }
                        self.fleet
                            .stats
                            .remote_debits
                            .fetch_add(remote, Ordering::Relaxed);
                    }
                    continue;
                };
                if total < seen.mine + n {
                    // Less than this instance alone sent: the store lost the counters.
                    reset = true;
                    *seen = Seen {
                        total,
                        mine: total,
                        at: now,
                    };
                    continue;
                }
                let remote = total - seen.total - n.min(total - seen.total);
                let since = seen.at;
                *seen = Seen {
                    total,
                    mine: seen.mine + n,
                    at: now,
                };
                if remote > 0 {
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

fn value_u64(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        redis::Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Connects and measures one round trip, for `doctor`.
pub async fn probe(url: &str) -> Result<Duration, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let work = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok::<_, redis::RedisError>(started.elapsed())
    };
    match tokio::time::timeout(Duration::from_secs(2), work).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2s".into()),
    }
}
