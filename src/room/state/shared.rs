//! A waiting room's line shared by a fleet (`[fleet]` with a store): this instance's mirror of
//! it. Nothing here speaks to the store. The request path and the door work on the mirror, so a
//! poll never waits on the network; the fleet's room sync (`fleet/room.rs`) carries what changed
//! here to the store and the store's view back, every 125 ms.
//!
//! - **Tickets** are numbered from one counter in the store, leased in blocks sized to this
//!   instance's recent arrivals (at least 8, at most 4,096), kept ready while tickets were
//!   issued here in the last 10 minutes. A lease is used for 500 ms at most,
//!   and the door never walks past a number the counter handed out less than `HORIZON` ago: by
//!   then whoever took it has said whether it is live. Unused numbers are holes the door skips
//!   (reported, so the leader does not count them as abandoned places).
//!   Tickets from different instances can be out of order by up to one lease (the FIFO error
//!   is at most a lease per instance). A burst beyond the lease, or no store, numbers tickets
//!   above the highest known: such a number may be shared with another instance's ticket
//!   (both holders are let in together), counted in `unleased`.
//! - **Liveness**: polls here are recorded in the local slices (as a local line does) and sent
//!   to the store's slice of the moment; the union of every instance's polls within a grace
//!   comes back as `remote`. A holder whose polls land on other instances stays live.
//! - **The door**: one instance leads (elected in the store). Its door walks the mirror and
//!   publishes the cursor and the tickets it skipped; the others adopt them.
//! - **Sessions**: a pass is honoured by every instance (adopted on first sight) until it is
//!   revoked or idles out fleet-wide; the store counts the fleet's sessions for
//!   `max_active_sessions`.
//! - **Without the store** (`set_degraded`): every instance walks its own mirror at the room's
//!   rate, counting every ticket as live (who polls elsewhere cannot be known), so the line
//!   keeps moving; sessions count locally.
//!
//! Why this file is ~720 lines (its tests are in `shared/tests.rs`): the mirror's request-path side
//! (`RoomState`) and its sync side (`outgoing`, `incoming`) change the same three locks
//! together, and reading one without the other hides the invariants (the horizon, the lease's
//! life, adopting the door's cursor). The store's side is in `fleet/room.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Line, RoomState};

const MIN_LEASE: u64 = 8;
const MAX_LEASE: u64 = 4096;
/// How long a leased block may be drawn from.
const LEASE_LIFE: Duration = Duration::from_millis(500);
/// A lease with less life left than this is renewed (two room syncs).
const LEASE_MARGIN: Duration = Duration::from_millis(250);
/// Leases are kept ready this long after the last ticket issued here (or the start): a line
/// idle for longer stops burning numbers, and the first tickets of the next burst (until the
/// next sync, 125 ms) are numbered without a lease.
const LEASE_WHILE_BUSY: Duration = Duration::from_secs(600);
/// The door walks only up to what the counter had handed out this long ago: the lease's life,
/// plus a sync to send its holders' first poll, plus a timeout, plus margin.
pub const HORIZON: Duration = Duration::from_millis(1500);
/// Polls kept for the next sync while syncs fail (8 bytes each).
const MAX_UNSENT_POLLS: usize = 1 << 18;
/// How long an ended session is remembered (a pass older than this is taken back if it comes
/// back; see the README's fleet section).
pub const ENDED_KEEP: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Default)]
struct Outbox {
    /// Leased blocks: (next, last, leased at).
    blocks: VecDeque<(u64, u64, Instant)>,
    /// Tickets issued here since the last lease was sized, and when the last one was.
    issued_since: u64,
    last_issue: Option<Instant>,
    lease_asked: bool,
    /// Leased numbers dropped unused here (holes the door will skip), to report; and the
    /// fleet's count of them, whose growth the leader's door does not count as abandoned.
    holes: u64,
    holes_total: Option<u64>,
    holes_pending: u64,
    touched: Vec<u64>,
    skipped: Vec<u64>,
    cursor_dirty: bool,
    claims: u64,
    claims_total: Option<u64>,
    /// Admitted and skipped tickets seen passing in the store since the door's last tick here.
    observed: (u64, u64),
    reseed: u64,
    /// The counter's readings, oldest first, for the walking horizon.
    readings: VecDeque<(Instant, u64)>,
    /// Back from running alone: every ticket stays live until then, while the tickets the
    /// others issued meanwhile are first polled into the store.
    all_live_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Sessions {
    /// id -> (last touched here, last announced to the store).
    map: HashMap<u64, (Instant, Instant)>,
    ended: HashMap<u64, Instant>,
    send: Vec<u64>,
    revoke: Vec<u64>,
    /// Added here and not yet in the store's count.
    unsynced: u64,
}

#[derive(Debug)]
pub struct SharedState {
    line: Mutex<Line>,
    out: Mutex<Outbox>,
    sessions: Mutex<Sessions>,
    idle: Duration,
    /// The highest ticket number known (the counter, or a ticket seen here).
    top: AtomicU64,
    leader: AtomicBool,
    degraded: AtomicBool,
    synced: AtomicBool,
    started: AtomicU64,
    fleet_sessions: AtomicU64,
    instances: AtomicU64,
    others_busy: AtomicBool,
    remote_claims: AtomicU64,
    /// Tickets numbered without a lease (see the module's comment).
    pub unleased: AtomicU64,
}

/// What this instance has to tell the store, drained by `outgoing`.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// Tickets to lease from the counter (0: none).
    pub lease: u64,
    /// Leased numbers dropped unused since the last sync.
    pub holes: u64,
    /// Raise the counter by this first: the store lost it (a restart) and higher tickets exist.
    pub reseed: u64,
    /// The line's start as known here (unix s; 0: not yet).
    pub started: u64,
    /// Tickets polled or issued here since the last sync.
    pub touched: Vec<u64>,
    /// As the door's leader: tickets passed over, and the cursor to publish.
    pub skipped: Vec<u64>,
    pub cursor: Option<u64>,
    /// Sessions to announce (or touch) and to end.
    pub sessions: Vec<u64>,
    pub revoked: Vec<u64>,
    pub claims: u64,
    /// The tickets whose bits the reply should carry: `base..=top`.
    pub base: u64,
    pub top: u64,
    pub leader: bool,
    unsynced: u64,
}

/// What the store answered.
#[derive(Debug, Default)]
pub struct Incoming {
    /// The counter after this instance's lease.
    pub lease_end: Option<u64>,
    /// The counter.
    pub issued: u64,
    pub started: u64,
    pub leader: bool,
    pub cursor: u64,
    /// Bit maps as the store keeps them (bit `8·(first_byte + j) + k` is bit k of byte j,
    /// most significant first): the tickets the door skipped, and those polled within a grace.
    pub first_byte: u64,
    pub skipped: Vec<u8>,
    pub live: Vec<u8>,
    /// The fleet's sessions, and sessions ended since the last look.
    pub sessions: u64,
    pub ended: Vec<u64>,
    pub others_busy: bool,
    pub claims_total: Option<u64>,
    /// The fleet's count of leased numbers dropped unused.
    pub holes_total: Option<u64>,
    pub instances: u64,
}

/// The tickets set in a store bit map (see `Incoming`) from `from` on.
fn store_bits(bytes: &[u8], first_byte: u64, from: u64, mut each: impl FnMut(u64)) {
    for (j, &b) in bytes.iter().enumerate() {
        if b == 0 {
            continue;
        }
        for k in 0..8 {
            if b & (0x80 >> k) != 0 {
                let t = (first_byte + j as u64) * 8 + k;
                if t >= from {
                    each(t);
                }
            }
        }
    }
}

/// Ticket `t`'s bit in a store bit map read from `first_byte` to `last_byte`: None when it
/// lies outside what was asked. A byte asked for but not returned is zero (the store's string
/// ends before it: no bit was ever set that far).
fn bit_in(bytes: &[u8], first_byte: u64, last_byte: u64, t: u64) -> Option<bool> {
    if t / 8 > last_byte {
        return None;
    }
    let j = (t / 8).checked_sub(first_byte)?;
    Some(
        bytes
            .get(j as usize)
            .is_some_and(|b| b & (0x80 >> (t % 8)) != 0),
    )
}

impl Outbox {
    /// Drops leases past their life, counting what they had left as holes.
    fn drop_expired(&mut self, now: Instant) {
        let mut holes = 0;
        self.blocks.retain(|b| {
            let keep = now.duration_since(b.2) < LEASE_LIFE;
            if !keep {
                holes += b.1 + 1 - b.0;
            }
            keep
        });
        self.holes += holes;
    }
}

impl SharedState {
    pub fn new(rotations_per_grace: u32, session_idle: Duration) -> SharedState {
        SharedState {
            line: Mutex::new(Line::new(rotations_per_grace)),
            out: Mutex::new(Outbox {
                // A new instance has a lease ready for its first tickets.
                last_issue: Some(Instant::now()),
                ..Outbox::default()
            }),
            sessions: Mutex::new(Sessions::default()),
            idle: session_idle,
            top: AtomicU64::new(0),
            leader: AtomicBool::new(false),
            degraded: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            started: AtomicU64::new(0),
            fleet_sessions: AtomicU64::new(0),
            instances: AtomicU64::new(1),
            others_busy: AtomicBool::new(false),
            remote_claims: AtomicU64::new(0),
            unleased: AtomicU64::new(0),
        }
    }

    fn line(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn out(&self) -> MutexGuard<'_, Outbox> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sess(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this instance's door leads the fleet's (as of the last sync).
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// A poll (or a new ticket) for the store's liveness. Not while the store is gone: the
    /// store cannot use it then (it is about the last grace) and an outage must not grow it.
    fn note_poll(&self, ticket: u64) {
        if !self.degraded.load(Ordering::Relaxed) {
            self.out().touched.push(ticket);
        }
    }

    /// This instance gave its door up (draining): followers from now on, until a sync says
    /// otherwise.
    pub fn stop_leading(&self) {
        self.leader.store(false, Ordering::Relaxed);
    }

    /// The store is unreachable (`true`) or answers again (`false`).
    pub fn set_degraded(&self, on: bool) {
        if self.degraded.swap(on, Ordering::Relaxed) == on {
            return;
        }
        let top = self.top.load(Ordering::Relaxed);
        if on {
            let mut l = self.line();
            l.all_live = true;
            l.remote.clear();
            l.issued = l.issued.max(top);
            drop(l);
            // Each instance walks its own line now; what it walks is published when it leads.
            let mut o = self.out();
            o.cursor_dirty = true;
            o.all_live_until = None;
            o.touched = Vec::new();
        } else {
            // The polls seen here within the last grace go to the store once (the slices hold
            // them, one bit per ticket, however long the outage was), and every ticket stays
            // live a horizon longer, while the other instances send theirs.
            let mut polled = Vec::new();
            {
                let l = self.line();
                l.live_tickets(&mut polled);
            }
            let mut o = self.out();
            o.touched.extend(polled);
            o.all_live_until = Some(Instant::now() + HORIZON);
        }
    }

    /// Drains what the store should hear, at `now`.
    pub fn outgoing(&self, now: Instant) -> Outgoing {
        let leader = self.is_leader() || self.degraded.load(Ordering::Relaxed);
        let (base, cursor) = {
            let l = self.line();
            (l.base, l.cursor)
        };
        let mut o = self.out();
        o.drop_expired(now);
        // What is left beyond the next two syncs: a lease is asked before the current one
        // runs out or expires, so tickets are seldom numbered without one.
        let left: u64 = o
            .blocks
            .iter()
            .filter(|b| now.duration_since(b.2) + LEASE_MARGIN < LEASE_LIFE)
            .map(|b| b.1 + 1 - b.0)
            .sum();
        // Four times the arrivals since the last lease (asked every few syncs while busy):
        // unused numbers cost the door a step each, a ticket without a lease may share its
        // number.
        let want = (o.issued_since * 4).clamp(MIN_LEASE, MAX_LEASE);
        let busy = o
            .last_issue
            .is_some_and(|t| now.duration_since(t) < LEASE_WHILE_BUSY);
        let lease = if busy && left < want / 2 && !o.lease_asked {
            o.issued_since = 0;
            o.lease_asked = true;
            want
        } else {
            0
        };
        let mut s = self.sess();
        let unsynced = s.unsynced;
        Outgoing {
            lease,
            holes: std::mem::take(&mut o.holes),
            reseed: std::mem::take(&mut o.reseed),
            started: self.started.load(Ordering::Relaxed),
            touched: std::mem::take(&mut o.touched),
            skipped: if leader {
                std::mem::take(&mut o.skipped)
            } else {
                Vec::new()
            },
            cursor: (leader && std::mem::take(&mut o.cursor_dirty)).then_some(cursor),
            sessions: std::mem::take(&mut s.send),
            revoked: std::mem::take(&mut s.revoke),
            claims: std::mem::take(&mut o.claims),
            base,
            top: self.top.load(Ordering::Relaxed),
            leader: self.is_leader(),
            unsynced,
        }
    }

    /// A sync failed: what it carried goes with the next one.
    pub fn failed(&self, g: Outgoing) {
        let mut o = self.out();
        o.lease_asked = false;
        o.holes += g.holes;
        o.reseed += g.reseed;
        // Polls waiting for a sync are bounded: past this many, the oldest are dropped (a poll
        // matters for a grace; its holder polls again).
        o.touched.extend(g.touched);
        if o.touched.len() > MAX_UNSENT_POLLS {
            let drop = o.touched.len() - MAX_UNSENT_POLLS;
            o.touched.drain(..drop);
        }
        o.skipped.extend(g.skipped);
        o.cursor_dirty |= g.cursor.is_some();
        o.claims += g.claims;
        drop(o);
        let mut s = self.sess();
        s.send.extend(g.sessions);
        s.revoke.extend(g.revoked);
    }

    /// Applies the store's answer to a sync that sent `g`.
    pub fn incoming(&self, g: &Outgoing, v: Incoming, now: Instant) {
        self.synced.store(true, Ordering::Relaxed);
        self.leader.store(v.leader, Ordering::Relaxed);
        self.instances.store(v.instances.max(1), Ordering::Relaxed);
        self.others_busy.store(v.others_busy, Ordering::Relaxed);
        if v.started > 0 {
            self.started.store(v.started, Ordering::Relaxed);
        }
        let known = self.top.load(Ordering::Relaxed);
        let top = known.max(v.issued);
        self.top.fetch_max(top, Ordering::Relaxed);
        let mut all_live_over = false;
        let horizon = {
            let mut o = self.out();
            o.lease_asked = false;
            if o.all_live_until.is_some_and(|until| now >= until) {
                o.all_live_until = None;
                all_live_over = true;
            }
            if let Some(end) = v.lease_end {
                if g.lease > 0 && end >= g.lease {
                    o.blocks.push_back((end + 1 - g.lease, end, now));
                }
            }
            if v.issued < known {
                // The store lost the counter (a restart): put it back above every ticket out.
                o.reseed = known - v.issued;
            }
            match (o.claims_total, v.claims_total) {
                (Some(before), Some(total)) if total >= before + g.claims => {
                    self.remote_claims
                        .fetch_add(total - before - g.claims, Ordering::Relaxed);
                }
                _ => {}
            }
            o.claims_total = v.claims_total;
            if let (Some(before), Some(total)) = (o.holes_total, v.holes_total) {
                o.holes_pending += total.saturating_sub(before);
            }
            o.holes_total = v.holes_total.or(o.holes_total);
            o.readings.push_back((now, v.issued));
            while o
                .readings
                .get(1)
                .is_some_and(|r| now.duration_since(r.0) >= HORIZON)
            {
                o.readings.pop_front();
            }
            o.readings
                .front()
                .filter(|r| now.duration_since(r.0) >= HORIZON)
                .map_or(0, |r| r.1)
        };
        let mut l = self.line();
        if all_live_over && !self.degraded.load(Ordering::Relaxed) {
            l.all_live = false;
        }
        if l.all_live {
            l.issued = l.issued.max(top);
        } else {
            l.issued = l.issued.max(horizon);
        }
        // The door moved elsewhere: adopt its cursor and what it skipped.
        let (mut admitted, mut skipped) = (0, 0);
        let store_behind = v.cursor < l.cursor && self.is_leader();
        if v.cursor > l.cursor {
            for t in l.cursor + 1..=v.cursor {
                // A ticket whose bit did not come back is taken as skipped: its holder asks
                // again rather than walk in on a guess.
                let was_skipped = bit_in(&v.skipped, v.first_byte, g.top / 8, t).unwrap_or(true);
                if t >= l.base && was_skipped {
                    let i = t - l.base;
                    Line::set(&mut l.skipped, i);
                }
                if was_skipped {
                    skipped += 1;
                } else {
                    admitted += 1;
                }
            }
            l.cursor = v.cursor;
            l.issued = l.issued.max(v.cursor);
        }
        if !l.all_live {
            let base = l.base;
            let mut remote = std::mem::take(&mut l.remote);
            remote.clear();
            store_bits(&v.live, v.first_byte, base, |t| {
                Line::set(&mut remote, t - base)
            });
            l.remote = remote;
        }
        drop(l);
        {
            let mut o = self.out();
            o.observed.0 += admitted;
            o.observed.1 += skipped;
            // The store is behind this door (a restart, or a leader that changed): say it again.
            o.cursor_dirty |= store_behind;
        }
        let mut s = self.sess();
        s.unsynced = s.unsynced.saturating_sub(g.unsynced);
        for id in v.ended {
            s.map.remove(&id);
            s.ended.insert(id, now);
        }
        drop(s);
        self.fleet_sessions.store(v.sessions, Ordering::Relaxed);
    }

    /// Sessions touched here recently enough that the store's score is fresh: re-announced at
    /// most every eighth of `session_idle`.
    fn announce_every(&self) -> Duration {
        self.idle / 8
    }
}

impl RoomState for SharedState {
    fn issue(&self) -> u64 {
        let now = Instant::now();
        let leased = {
            let mut o = self.out();
            o.issued_since += 1;
            o.last_issue = Some(now);
            let cursor = self.line().cursor;
            // A lease past its life, or a number the door already passed (a hole), is
            // dropped: its place may be walked before this ticket's first poll arrives.
            o.drop_expired(now);
            let mut got = None;
            while let Some(b) = o.blocks.front_mut() {
                let (t, spent) = (b.0, b.0 >= b.1);
                b.0 += 1;
                if spent {
                    o.blocks.pop_front();
                }
                if t > cursor {
                    got = Some(t);
                    break;
                }
                o.holes += 1;
            }
            got
        };
        let t = match leased {
            Some(t) => t,
            None => {
                self.unleased.fetch_add(1, Ordering::Relaxed);
                self.top.load(Ordering::Relaxed) + 1
            }
        };
        self.top.fetch_max(t, Ordering::Relaxed);
        let mut l = self.line();
        if l.all_live {
            l.issued = l.issued.max(t);
        }
        if t >= l.base {
            let i = t - l.base;
            Line::set(l.current(), i);
        }
        drop(l);
        self.note_poll(t);
        t
    }

    fn touch(&self, ticket: u64) {
        self.top.fetch_max(ticket, Ordering::Relaxed);
        let mut l = self.line();
        if ticket <= l.cursor || ticket < l.base {
            return;
        }
        if l.all_live {
            // Running alone: a ticket from another instance is walked here too.
            l.issued = l.issued.max(ticket);
        }
        let i = ticket - l.base;
        if Line::bit(l.current(), i) {
            return;
        }
        Line::set(l.current(), i);
        drop(l);
        self.note_poll(ticket);
    }

    fn admitted(&self, ticket: u64) -> Option<bool> {
        self.line().admitted(ticket)
    }

    fn claim_ticket(&self, ticket: u64) -> bool {
        // Per instance: the same ticket claimed on two instances opens the same session (its
        // id follows from the ticket), counted once by the store.
        self.line().claim(ticket)
    }

    fn ahead(&self, ticket: u64) -> u64 {
        let l = self.line();
        if ticket <= l.cursor {
            return 0;
        }
        l.live_between(l.cursor, ticket)
    }

    fn waiting(&self) -> u64 {
        let top = self.top.load(Ordering::Relaxed);
        let l = self.line();
        l.live_between(l.cursor, top + 1)
    }

    fn advance(&self, slots: u64) -> (u64, u64) {
        if !self.leads() {
            // Not this door's to move: report what the leader did, for the ETA.
            return std::mem::take(&mut self.out().observed);
        }
        let mut skipped = Vec::new();
        let (admitted, passed) = self.line().walk(slots, &mut |t| skipped.push(t));
        let mut o = self.out();
        o.observed = (0, 0);
        if (admitted, passed) != (0, 0) {
            o.skipped.extend(skipped);
            o.cursor_dirty = true;
        }
        // Holes (numbers leased and never issued) are passed over too; they are nobody's
        // abandoned place.
        let holes = passed.min(o.holes_pending);
        o.holes_pending -= holes;
        (admitted, passed - holes)
    }

    fn rotate(&self) {
        self.line().rotate();
    }

    fn rotations_per_grace(&self) -> u32 {
        (self.line().slices - 1) as u32
    }

    /// Not offered with a fleet (`check` refuses `shuffle_prequeue` with `[fleet]`): every
    /// instance would have to draw the same order over the same tickets.
    fn shuffle_prequeue(&self, _seed: u64) {}

    fn session_add(&self, id: u64, now: Instant) {
        let mut s = self.sess();
        s.map.insert(id, (now, now));
        s.send.push(id);
        s.unsynced += 1;
    }

    fn session_touch(&self, id: u64, now: Instant) -> bool {
        let every = self.announce_every();
        let mut s = self.sess();
        if s.ended.contains_key(&id) {
            return false;
        }
        let announce = match s.map.get_mut(&id) {
            Some(e) => {
                e.0 = now;
                let due = now.duration_since(e.1) >= every;
                if due {
                    e.1 = now;
                }
                due
            }
            None => {
                // Minted on another instance (the balancer spreads a shopper's connections).
                s.map.insert(id, (now, now));
                true
            }
        };
        if announce {
            s.send.push(id);
        }
        true
    }

    fn session_revoke(&self, id: u64) -> bool {
        let mut s = self.sess();
        s.map.remove(&id);
        if s.ended.insert(id, Instant::now()).is_some() {
            return false;
        }
        s.revoke.push(id);
        true
    }

    fn sessions(&self) -> u64 {
        let s = self.sess();
        if self.synced.load(Ordering::Relaxed) && !self.degraded.load(Ordering::Relaxed) {
            self.fleet_sessions.load(Ordering::Relaxed) + s.unsynced
        } else {
            s.map.len() as u64
        }
    }

    fn sessions_expire(&self, idle_before: Instant) -> u64 {
        let mut s = self.sess();
        let before = s.map.len();
        s.map.retain(|_, e| e.0 >= idle_before);
        let now = Instant::now();
        s.ended.retain(|_, at| now.duration_since(*at) < ENDED_KEEP);
        (before - s.map.len()) as u64
    }

    fn started(&self) -> Option<u64> {
        Some(self.started.load(Ordering::Relaxed))
    }

    fn leads(&self) -> bool {
        self.is_leader() || self.degraded.load(Ordering::Relaxed)
    }

    fn walk_in_share(&self) -> f64 {
        if !self.synced.load(Ordering::Relaxed) && !self.degraded.load(Ordering::Relaxed) {
            // Before the first sync nobody here knows whether a line exists elsewhere.
            return 0.0;
        }
        1.0 / self.instances.load(Ordering::Relaxed).max(1) as f64
    }

    fn claimed(&self) {
        self.out().claims += 1;
    }

    fn take_remote_claims(&self) -> u64 {
        self.remote_claims.swap(0, Ordering::Relaxed)
    }

    fn others_busy(&self) -> bool {
        self.others_busy.load(Ordering::Relaxed)
    }

    fn min_wait(&self) -> Duration {
        // The door walks only tickets handed out a horizon ago (not while running alone).
        if self.degraded.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            HORIZON
        }
    }
}

#[cfg(test)]
mod tests;
