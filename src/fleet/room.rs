//! The waiting rooms' shared lines (`[fleet] share_rooms`): every 125 ms, one pipeline per
//! instance carries what changed in each room's mirror (`room/state/shared.rs`) to the store
//! and brings back the fleet's view. Polls and the door work on the mirror; nothing on the
//! request path waits for this.
//!
//! Keys of room `r` (prefix `{ns}:room:{r}:`), core commands only:
//!
//! ```text
//! issued         ticket counter; INCRBY leases a block           GET
//! started        the line's start (unix s), SET NX               GET
//! live:{slice}   who polled in each slice of queue_grace (store clock): BITFIELD SET u1,
//!                expiring a grace after; the last grace's OR (BITOP) is read back as bits
//! leader         the door's leader: SET NX PX 1 s, renewed by its holder (PEXPIRE) each sync
//! cursor         every ticket <= it was passed by the door: SET by the leader, GET by all
//! skipped        tickets passed over (stopped polling): BITFIELD by the leader, GETRANGE by all
//! sessions       ZSET id -> last announced (ms): ZCARD is the fleet's active sessions;
//!                the leader moves those idle past session_idle to `ended`
//! ended          ZSET of revoked and idled-out sessions, read since the last look
//! busy           ZSET instance -> until (ms): an instance whose origin guard is closed
//! claims         INCRBY: passes claimed fleet-wide (admitted tickets stop counting as unclaimed)
//! holes          INCRBY: leased numbers dropped unused (the door passes them; not abandoned)
//! {ns}:room-instances   ZSET instance -> last sync (ms): walk-ins are split among these
//! ```
//!
//! When the store fails three syncs running, every instance walks its own mirror (see
//! `SharedState::set_degraded`) and retries with the limits' backoff; one log line each way.
//!
//! Why this file is ~510 lines: one pipeline is built (`pipeline`) and read (`read`) in the
//! same order, and keeping both in one file is what keeps them in step.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::room::state::{Incoming, Outgoing, SharedState, ENDED_KEEP};
use crate::room::Room;

use super::sync::value_u64;
use super::{unix_ms, Fleet, BACKOFF_MAX, BACKOFF_MIN, BREAK_AFTER};

/// How often the rooms sync: twice per door tick, so a leader's walk is published (and a poll
/// here seen by the leader) within a tick.
pub(super) const ROOM_SYNC: Duration = Duration::from_millis(125);
const LEADER_LEASE_MS: u64 = 1000;
/// An instance that has not synced for this long no longer takes a share of the walk-ins.
const INSTANCE_GONE_MS: u64 = 3000;
/// Bits set per BITFIELD command.
const BITFIELD_CHUNK: usize = 4096;
/// A room's keys outlive a fleet that stops by a day.
const KEYS_KEEP_S: u64 = 24 * 3600;

/// The rooms in force now (they change with reloads).
pub type Rooms = Arc<dyn Fn() -> Vec<Arc<Room>> + Send + Sync>;

/// What one sync remembers of a room for the next.
#[derive(Debug, Default)]
struct Memo {
    leader: bool,
    /// `ended` entries up to this score were read.
    ended_after: u64,
    /// Sessions the leader found idle, to end in the next sync.
    expire: Vec<String>,
    /// When the room's keys' expiry was last pushed back (store ms).
    kept_at: u64,
}

/// Which reply is which (the pipeline's other replies are ignored).
#[derive(Debug, Clone, Copy)]
enum Want {
    Time,
    Instances,
    LeaseEnd(usize),
    Issued(usize),
    Started(usize),
    Leader(usize),
    Cursor(usize),
    Skipped(usize),
    Live(usize),
    Sessions(usize),
    Ended(usize),
    Idle(usize),
    Busy(usize),
    Claims(usize),
    Holes(usize),
}

pub(super) struct RoomSync {
    fleet: Arc<Fleet>,
    client: redis::Client,
    conn: Option<redis::aio::MultiplexedConnection>,
    memo: HashMap<String, Memo>,
    offset_ms: i64,
    failures: u32,
    retry_at: Option<Instant>,
    backoff: Duration,
    degraded: bool,
}

impl RoomSync {
    pub(super) fn new(fleet: Arc<Fleet>, client: redis::Client) -> RoomSync {
        RoomSync {
            fleet,
            client,
            conn: None,
            memo: HashMap::new(),
            offset_ms: 0,
            failures: 0,
            retry_at: None,
            backoff: BACKOFF_MIN,
            degraded: false,
        }
    }

    pub(super) async fn run(mut self, rooms: Rooms) {
        let mut tick = tokio::time::interval(ROOM_SYNC);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let rooms = rooms();
            self.tick(&rooms).await;
        }
    }

    async fn tick(&mut self, rooms: &[Arc<Room>]) {
        let shared: Vec<(&Arc<Room>, &Arc<SharedState>)> = rooms
            .iter()
            .filter_map(|r| r.shared().map(|s| (r, s)))
            .collect();
        if shared.is_empty() {
            return;
        }
        let now = Instant::now();
        if self.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let outs: Vec<Outgoing> = shared.iter().map(|(_, s)| s.outgoing(now)).collect();
        let (pipe, wants) = self.pipeline(&shared, &outs);
        let stats = &self.fleet.stats;
        stats
            .commands
            .fetch_add(pipe.cmd_iter().count() as u64, Ordering::Relaxed);
        match self.exchange(pipe).await {
            Ok(values) => {
                self.fleet.stats.room_syncs.fetch_add(1, Ordering::Relaxed);
                let incoming = self.read(&shared, &outs, values, &wants);
                for (((_, s), out), inc) in shared.iter().zip(&outs).zip(incoming) {
                    s.incoming(out, inc, Instant::now());
                }
                self.failures = 0;
                self.retry_at = None;
                self.backoff = BACKOFF_MIN;
                if self.degraded {
                    self.degraded = false;
                    for (_, s) in &shared {
                        s.set_degraded(false);
                    }
                    tracing::info!("fleet: store answers again; waiting rooms share one line");
                }
            }
            Err(timed_out) => {
                self.fleet
                    .stats
                    .room_sync_failures
                    .fetch_add(1, Ordering::Relaxed);
                for ((_, s), out) in shared.iter().zip(outs) {
                    s.failed(out);
                }
                self.failures += 1;
                if !timed_out {
                    self.conn = None;
                }
                if self.failures >= BREAK_AFTER {
                    self.retry_at = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                    if !self.degraded {
                        self.degraded = true;
                        for (_, s) in &shared {
                            s.set_degraded(true);
                        }
                        tracing::warn!(
                            failures = self.failures,
                            reason = if timed_out { "timeout" } else { "error" },
                            "fleet: store unreachable; each waiting room's door runs here alone"
                        );
                    }
                }
            }
        }
    }

    fn pipeline(
        &mut self,
        shared: &[(&Arc<Room>, &Arc<SharedState>)],
        outs: &[Outgoing],
    ) -> (redis::Pipeline, Vec<Want>) {
        let cfg = &self.fleet.cfg;
        let inst = cfg.instance.as_str();
        let now_ms = (unix_ms() as i64 + self.offset_ms).max(0) as u64;
        let mut pipe = redis::pipe();
        let mut wants = vec![Want::Time, Want::Instances];
        pipe.cmd("TIME");
        let instances = format!("{}:room-instances", cfg.namespace);
        pipe.cmd("ZADD")
            .arg(&instances)
            .arg(now_ms)
            .arg(inst)
            .ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&instances)
            .arg("-inf")
            .arg(now_ms.saturating_sub(INSTANCE_GONE_MS))
            .ignore();
        pipe.cmd("ZCARD").arg(&instances);
        for (i, ((room, _), out)) in shared.iter().zip(outs).enumerate() {
            let p = format!("{}:room:{}:", cfg.namespace, room.cfg.name);
            let memo = self.memo.entry(room.cfg.name.clone()).or_default();
            let key = |k: &str| format!("{p}{k}");
            if out.reseed > 0 {
                pipe.cmd("INCRBY")
                    .arg(key("issued"))
                    .arg(out.reseed)
                    .ignore();
            }
            if out.lease > 0 {
                pipe.cmd("INCRBY").arg(key("issued")).arg(out.lease);
                wants.push(Want::LeaseEnd(i));
            }
            pipe.cmd("GET").arg(key("issued"));
            wants.push(Want::Issued(i));
            let started = match out.started {
                // A little before now: tickets issued here before this first sync (by this
                // instance's clock) stay valid.
                0 => (now_ms / 1000).saturating_sub(5),
                s => s,
            };
            pipe.cmd("SET")
                .arg(key("started"))
                .arg(started)
                .arg("NX")
                .ignore();
            pipe.cmd("GET").arg(key("started"));
            wants.push(Want::Started(i));
            // Liveness: this instance's polls into the store's slice of the moment.
            let per = u64::from(room.state_rotations());
            let slice_ms = (room.cfg.queue_grace.as_millis() as u64 / per).max(1);
            let slice = now_ms / slice_ms;
            if !out.touched.is_empty() {
                let live = key(&format!("live:{slice}"));
                for chunk in out.touched.chunks(BITFIELD_CHUNK) {
                    let c = pipe.cmd("BITFIELD").arg(&live);
                    for t in chunk {
                        c.arg("SET").arg("u1").arg(*t).arg(1);
                    }
                    c.ignore();
                }
                pipe.cmd("PEXPIRE")
                    .arg(&live)
                    .arg((per + 2) * slice_ms)
                    .ignore();
            }
            // The door's leader: only ever taken with NX, so one instance holds it. The holder
            // renews its lease by expiry alone; had it lapsed and been taken meanwhile, that
            // extends the new holder's lease, which is harmless (an overwrite with SET would
            // give two instances the door).
            // A draining instance neither renews nor takes a door (`Fleet::retire`).
            let retiring = self.fleet.retiring();
            if memo.leader && !retiring {
                pipe.cmd("PEXPIRE")
                    .arg(key("leader"))
                    .arg(LEADER_LEASE_MS)
                    .ignore();
            }
            if !retiring {
                pipe.cmd("SET")
                    .arg(key("leader"))
                    .arg(inst)
                    .arg("NX")
                    .arg("PX")
                    .arg(LEADER_LEASE_MS)
                    .ignore();
            }
            pipe.cmd("GET").arg(key("leader"));
            wants.push(Want::Leader(i));
            // What the door did here, skipped tickets before the cursor (see `read`).
            if !out.skipped.is_empty() {
                for chunk in out.skipped.chunks(BITFIELD_CHUNK) {
                    let c = pipe.cmd("BITFIELD").arg(key("skipped"));
                    for t in chunk {
                        c.arg("SET").arg("u1").arg(*t).arg(1);
                    }
                    c.ignore();
                }
            }
            if let Some(c) = out.cursor {
                pipe.cmd("SET").arg(key("cursor")).arg(c).ignore();
            }
            pipe.cmd("GET").arg(key("cursor"));
            wants.push(Want::Cursor(i));
            let (b0, b1) = (out.base / 8, out.top / 8);
            pipe.cmd("GETRANGE").arg(key("skipped")).arg(b0).arg(b1);
            wants.push(Want::Skipped(i));
            let union = key(&format!("u:{inst}"));
            let bitop = pipe.cmd("BITOP").arg("OR").arg(&union);
            for s in slice.saturating_sub(per)..=slice {
                bitop.arg(key(&format!("live:{s}")));
            }
            bitop.ignore();
            pipe.cmd("GETRANGE").arg(&union).arg(b0).arg(b1);
            wants.push(Want::Live(i));
            pipe.cmd("DEL").arg(&union).ignore();
            // Sessions.
            if !out.sessions.is_empty() {
                let z = pipe.cmd("ZADD").arg(key("sessions"));
                for id in &out.sessions {
                    z.arg(now_ms).arg(*id);
                }
                z.ignore();
            }
            let ended: Vec<String> = out
                .revoked
                .iter()
                .map(u64::to_string)
                .chain(std::mem::take(&mut memo.expire))
                .collect();
            if !ended.is_empty() {
                pipe.cmd("ZREM").arg(key("sessions")).arg(&ended).ignore();
                let z = pipe.cmd("ZADD").arg(key("ended"));
                for id in &ended {
                    z.arg(now_ms).arg(id);
                }
                z.ignore();
            }
            pipe.cmd("ZCARD").arg(key("sessions"));
            wants.push(Want::Sessions(i));
            pipe.cmd("ZRANGEBYSCORE")
                .arg(key("ended"))
                .arg(memo.ended_after)
                .arg("+inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(10_000);
            wants.push(Want::Ended(i));
            if out.leader {
                let idle = room.cfg.session_idle.as_millis() as u64;
                pipe.cmd("ZRANGEBYSCORE")
                    .arg(key("sessions"))
                    .arg("-inf")
                    .arg(now_ms.saturating_sub(idle + idle / 4))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(1000);
                wants.push(Want::Idle(i));
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(key("ended"))
                    .arg("-inf")
                    .arg(now_ms.saturating_sub(ENDED_KEEP.as_millis() as u64))
                    .ignore();
            }
            // The origin guard: closed anywhere, the door stays shut.
            if room.origin_busy_here() {
                pipe.cmd("ZADD")
                    .arg(key("busy"))
                    .arg(now_ms + LEADER_LEASE_MS)
                    .arg(inst)
                    .ignore();
            } else {
                pipe.cmd("ZREM").arg(key("busy")).arg(inst).ignore();
            }
            pipe.cmd("ZCOUNT").arg(key("busy")).arg(now_ms).arg("+inf");
            wants.push(Want::Busy(i));
            pipe.cmd("INCRBY").arg(key("claims")).arg(out.claims);
            wants.push(Want::Claims(i));
            pipe.cmd("INCRBY").arg(key("holes")).arg(out.holes);
            wants.push(Want::Holes(i));
            if now_ms.saturating_sub(memo.kept_at) > 60_000 {
                memo.kept_at = now_ms;
                for k in [
                    "issued", "started", "cursor", "skipped", "sessions", "ended", "busy",
                    "claims", "holes",
                ] {
                    pipe.cmd("EXPIRE").arg(key(k)).arg(KEYS_KEEP_S).ignore();
                }
            }
        }
        (pipe, wants)
    }

    /// Sends a pipeline. `Err(true)`: timed out; `Err(false)`: failed.
    async fn exchange(&mut self, pipe: redis::Pipeline) -> Result<Vec<redis::Value>, bool> {
        let timeout = self.fleet.cfg.sync_timeout;
        super::query(&self.client, &mut self.conn, &pipe, timeout).await
    }

    fn read(
        &mut self,
        shared: &[(&Arc<Room>, &Arc<SharedState>)],
        outs: &[Outgoing],
        values: Vec<redis::Value>,
        wants: &[Want],
    ) -> Vec<Incoming> {
        let inst = self.fleet.cfg.instance.clone();
        let mut out: Vec<Incoming> = outs
            .iter()
            .map(|o| Incoming {
                first_byte: o.base / 8,
                ..Incoming::default()
            })
            .collect();
        let mut instances = 1;
        for (want, v) in wants.iter().zip(values) {
            match *want {
                Want::Time => {
                    if let redis::Value::Array(t) = &v {
                        let secs = t.first().and_then(value_u64);
                        let micros = t.get(1).and_then(value_u64);
                        if let (Some(s), Some(us)) = (secs, micros) {
                            self.offset_ms = (s * 1000 + us / 1000) as i64 - unix_ms() as i64;
                        }
                    }
                }
                Want::Instances => instances = value_u64(&v).unwrap_or(1),
                Want::LeaseEnd(i) => out[i].lease_end = value_u64(&v),
                Want::Issued(i) => out[i].issued = value_u64(&v).unwrap_or(0),
                Want::Started(i) => out[i].started = value_u64(&v).unwrap_or(0),
                Want::Leader(i) => {
                    let leads = value_string(&v).is_some_and(|l| l == inst);
                    out[i].leader = leads;
                    let name = &shared[i].0.cfg.name;
                    let memo = self.memo.entry(name.clone()).or_default();
                    if leads != memo.leader {
                        tracing::info!(room = %name, leader = leads,
                            "fleet: {} the door of the shared waiting room",
                            if leads { "this instance now moves" } else { "another instance moves" });
                    }
                    memo.leader = leads;
                }
                Want::Cursor(i) => out[i].cursor = value_u64(&v).unwrap_or(0),
                Want::Skipped(i) => out[i].skipped = value_bytes(v),
                Want::Live(i) => out[i].live = value_bytes(v),
                Want::Sessions(i) => out[i].sessions = value_u64(&v).unwrap_or(0),
                Want::Ended(i) => {
                    let memo = self.memo.entry(shared[i].0.cfg.name.clone()).or_default();
                    let flat = flatten(v);
                    for pair in flat.chunks(2) {
                        if let [id, score] = pair {
                            if let Some(id) = value_u64(id) {
                                out[i].ended.push(id);
                            }
                            if let Some(s) = value_string(score).and_then(|s| s.parse::<f64>().ok())
                            {
                                memo.ended_after = memo.ended_after.max(s as u64);
                            }
                        }
                    }
                }
                Want::Idle(i) => {
                    let memo = self.memo.entry(shared[i].0.cfg.name.clone()).or_default();
                    memo.expire = flatten(v).iter().filter_map(value_string).collect();
                }
                Want::Busy(i) => {
                    let here = u64::from(shared[i].0.origin_busy_here());
                    out[i].others_busy = value_u64(&v).unwrap_or(0) > here;
                }
                Want::Claims(i) => out[i].claims_total = value_u64(&v),
                Want::Holes(i) => out[i].holes_total = value_u64(&v),
            }
        }
        for inc in &mut out {
            inc.instances = instances;
        }
        out
    }
}

fn value_string(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::Int(n) => Some(n.to_string()),
        redis::Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

fn value_bytes(v: redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b,
        _ => Vec::new(),
    }
}

/// A reply's array, with RESP3's nested pairs flattened.
fn flatten(v: redis::Value) -> Vec<redis::Value> {
    match v {
        redis::Value::Array(items) => items
            .into_iter()
            .flat_map(|x| match x {
                redis::Value::Array(inner) => inner,
                other => vec![other],
            })
            .collect(),
        _ => Vec::new(),
    }
}
