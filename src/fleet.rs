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

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::admission::Admission;
use crate::config::fleet::FleetConfig;

mod room;
mod sync;
pub use room::Rooms;
use sync::Sync;

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
    /// Commands sent to the store, all in sync pipelines, the limits' and the rooms' (the
    /// accept and request paths send none: this grows only with sync ticks).
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
    /// The waiting rooms' syncs (`fleet/room.rs`), answered and failed.
    pub room_syncs: AtomicU64,
    pub room_sync_failures: AtomicU64,
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
            room_syncs: z(),
            room_sync_failures: z(),
            sync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            ban_propagation_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 12)),
        }
    }
}

#[derive(Debug)]
pub struct Fleet {
    pub cfg: FleetConfig,
    /// Kept across reloads (`reconfigured`): the metrics read these.
    pub stats: Arc<FleetStats>,
    /// Made by a reload: the first totals the store reports are this instance's baseline, not
    /// charged (what it admitted before the reload is in them).
    reloaded: bool,
    /// This instance is draining: it gives up the waiting rooms' doors and takes none.
    retiring: Arc<AtomicBool>,
}

impl Fleet {
    pub fn new(cfg: FleetConfig) -> Arc<Fleet> {
        Arc::new(Fleet {
            cfg,
            stats: Arc::default(),
            reloaded: false,
            retiring: Arc::default(),
        })
    }

    /// The same fleet with new settings, its counters kept; its task is started afresh.
    pub fn reconfigured(&self, cfg: FleetConfig) -> Arc<Fleet> {
        Arc::new(Fleet {
            cfg,
            stats: self.stats.clone(),
            reloaded: true,
            retiring: self.retiring.clone(),
        })
    }

    /// This instance starts draining: the doors it moves are handed over now (their lease in
    /// the store ended, so another instance takes each at its next sync, within 125 ms, rather
    /// than a second later), and it takes no door again.
    pub async fn retire(&self, rooms: &[Arc<crate::room::Room>]) {
        self.retiring.store(true, Ordering::Relaxed);
        let (Some(url), true) = (&self.cfg.redis_url, self.cfg.rooms_shared()) else {
            return;
        };
        let leading: Vec<_> = rooms
            .iter()
            .filter(|r| r.shared().is_some_and(|s| s.is_leader()))
            .collect();
        if leading.is_empty() {
            return;
        }
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        let timeout = self.cfg.sync_timeout;
        let mut conn = None;
        for room in leading {
            let key = format!("{}:room:{}:leader", self.cfg.namespace, room.cfg.name);
            let mut get = redis::pipe();
            get.cmd("GET").arg(&key);
            let holder = query(&client, &mut conn, &get, timeout).await;
            let ours = matches!(holder.as_deref(), Ok([redis::Value::BulkString(b)])
                if b.as_slice() == self.cfg.instance.as_bytes());
            if !ours {
                continue;
            }
            // Expired now rather than deleted: had it changed hands since the GET, the new
            // holder only takes it again at its next sync.
            let mut release = redis::pipe();
            release.cmd("PEXPIRE").arg(&key).arg(1);
            if query(&client, &mut conn, &release, timeout).await.is_ok() {
                if let Some(s) = room.shared() {
                    s.stop_leading();
                }
                tracing::info!(room = %room.cfg.name, "fleet: draining; the waiting room's door is handed over");
            }
        }
    }

    fn retiring(&self) -> bool {
        self.retiring.load(Ordering::Relaxed)
    }

    /// Whether a reload from `old` to `new` can apply without a restart: the store stays on
    /// (the limiters' kind follows it) and the rooms stay shared or not (their lines' kind
    /// follows that).
    pub fn reloadable(old: &FleetConfig, new: &FleetConfig) -> bool {
        old.shared() == new.shared() && old.rooms_shared() == new.rooms_shared()
    }

    /// Syncs until aborted (at shutdown), and with a store also listens for bans and keeps the
    /// waiting rooms' shared lines (`rooms`: those in force) in step.
    pub async fn run(self: Arc<Self>, admission: Arc<Admission>, rooms: Rooms) {
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
        let room_sync = client
            .clone()
            .filter(|_| self.cfg.rooms_shared())
            .map(|c| tokio::spawn(room::RoomSync::new(self.clone(), c).run(rooms)));
        let _room_sync = room_sync.map(AbortOnDrop);
        let mut sync = Sync::new(self.clone(), client, self.reloaded);
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

/// Sends `pipe` on `conn` (connecting first if there is none), within `timeout` for each
/// step. `Err(true)`: timed out; `Err(false)`: failed (the connection is dropped, to be made
/// again next time).
async fn query(
    client: &redis::Client,
    conn: &mut Option<redis::aio::MultiplexedConnection>,
    pipe: &redis::Pipeline,
    timeout: Duration,
) -> Result<Vec<redis::Value>, bool> {
    if conn.is_none() {
        match tokio::time::timeout(timeout, client.get_multiplexed_async_connection()).await {
            Ok(Ok(c)) => *conn = Some(c),
            Ok(Err(_)) => return Err(false),
            Err(_) => return Err(true),
        }
    }
    let Some(c) = conn.as_mut() else {
        return Err(false);
    };
    match tokio::time::timeout(timeout, pipe.query_async::<Vec<redis::Value>>(c)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "fleet sync failed");
            *conn = None;
            Err(false)
        }
        Err(_) => Err(true),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
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
