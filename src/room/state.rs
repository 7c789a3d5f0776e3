//! The line's state behind one small interface, so a fleet can keep it in Redis later (the
//! ticket counter, the cursor, liveness, sessions) while the room's logic stays as it is.
//!
//! `LocalState` keeps it in this process: a ticket is a number; the cursor is the highest
//! admitted one; liveness is one bit per ticket in each slice of `queue_grace` (two door ticks
//! long, at most 32 per grace; a ticket that polled within the last grace of slices is live),
//! so an abandoned ticket costs bits, not bytes, and the door walks past it one slice after
//! its grace ran out: a grace plus two ticks up to 16 s graces, plus 1/32 of it beyond. (Two
//! bitmaps swapped every grace, before, found it only one to two graces later.) A poll reads
//! two bitmaps (the current slice and the union of the others, made once per rotation). At
//! most 34 bits per waiter plus a word per 64 for skipped tickets: far below the 64 bytes per
//! waiter the room may spend.
//!
//! `SharedState` (`state/shared.rs`) is a fleet's line as one instance mirrors it; it reuses
//! `Line` for its bit maps and walk.
//!
//! Why this file is ~650 lines (about 150 of them tests): the interface and the one `Line` both
//! states walk belong together; the fleet's additions are already in `state/shared.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// The most liveness slices per grace: bounds the bits per waiter and the words `ahead` ORs.
pub const MAX_ROTATIONS_PER_GRACE: u32 = 32;

/// Slices per `grace` for a door that ticks every `tick`: each two ticks long, at most
/// `MAX_ROTATIONS_PER_GRACE`, at least one.
pub fn rotations_for(grace: std::time::Duration, tick: std::time::Duration) -> u32 {
    let per = grace.as_nanos() / (tick.as_nanos() * 2).max(1);
    per.clamp(1, u128::from(MAX_ROTATIONS_PER_GRACE)) as u32
}

/// What the door and the request path ask of the line.
pub trait RoomState: Send + Sync + std::fmt::Debug {
    /// A new ticket at the back of the line.
    fn issue(&self) -> u64;
    /// Marks a ticket as still waiting (it polled).
    fn touch(&self, ticket: u64);
    /// Whether the door has passed this ticket: Some(true) admitted, Some(false) skipped (it
    /// had stopped polling when its turn came), None still waiting.
    fn admitted(&self, ticket: u64) -> Option<bool>;
    /// Live tickets ahead of this one.
    fn ahead(&self, ticket: u64) -> u64;
    /// Live tickets waiting.
    fn waiting(&self) -> u64;
    /// Moves the door past up to `slots` live tickets (skipping dead ones); returns how many
    /// were admitted and how many skipped.
    fn advance(&self, slots: u64) -> (u64, u64);
    /// Starts a new liveness slice (every `queue_grace / rotations_per_grace()`).
    fn rotate(&self);
    /// Liveness slices per `queue_grace`, fixed when the state is made (a reload that changes
    /// the grace changes the slices' length, not their count).
    fn rotations_per_grace(&self) -> u32;
    /// At the opening (before anyone was let in): the tickets issued so far are let in in a
    /// random order drawn from `seed`; later tickets follow in order.
    fn shuffle_prequeue(&self, seed: u64);

    /// The holder of an admitted ticket came for its pass: true the first time (the ticket
    /// opens a session once).
    fn claim_ticket(&self, ticket: u64) -> bool;

    /// Sessions (admitted shoppers): add, touch (false when unknown: expired or revoked),
    /// revoke, count, and expire those idle since before `idle_before`.
    fn session_add(&self, id: u64, now: Instant);
    fn session_touch(&self, id: u64, now: Instant) -> bool;
    fn session_revoke(&self, id: u64) -> bool;
    fn sessions(&self) -> u64;
    fn sessions_expire(&self, idle_before: Instant) -> u64;

    // What a line shared by a fleet (`SharedState`) adds; a local line keeps the defaults.

    /// When the line started (unix s), if the state knows better than this process: a
    /// fleet's line is older than any one instance.
    fn started(&self) -> Option<u64> {
        None
    }
    /// Whether this instance's door moves the line (a fleet has one door leader).
    fn leads(&self) -> bool {
        true
    }
    /// The share of the rate this instance may let in directly while nobody waits (a fleet
    /// splits it among its instances).
    fn walk_in_share(&self) -> f64 {
        1.0
    }
    /// A holder came back for its pass here.
    fn claimed(&self) {}
    /// Passes claimed on other instances since the last call (they are no longer unclaimed).
    fn take_remote_claims(&self) -> u64 {
        0
    }
    /// Another instance's origin guard is closed.
    fn others_busy(&self) -> bool {
        false
    }
    /// The least a new ticket waits, however short the line (for the estimate shown).
    fn min_wait(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

mod shared;
pub use shared::{Incoming, Outgoing, SharedState, ENDED_KEEP};

#[derive(Debug, Default)]
struct Line {
    /// Tickets issued so far; ticket numbers start at 1.
    issued: u64,
    /// Every ticket <= cursor has been passed by the door.
    cursor: u64,
    /// The cursor at the last `rotations_per_grace + 1` liveness rotations, newest first:
    /// tickets at or below the oldest were passed at least one grace ago. Only those may be compacted away; a
    /// ticket let in more recently keeps its "admitted" bit until its holder's next poll
    /// (which has a grace to come, as a waiting one has).
    cursor_at_rotation: VecDeque<u64>,
    /// Slices kept: `rotations_per_grace + 1`, so a poll stays visible for a full grace after
    /// its slice ends.
    slices: usize,
    /// Bit i of these is ticket `base + i`.
    base: u64,
    /// Who polled in each slice, newest first (never empty: the front is the current one).
    live: VecDeque<Vec<u64>>,
    /// The union of every slice but the current one, made at each rotation: a poll reads two
    /// bitmaps however many slices a grace has.
    older: Vec<u64>,
    skipped: Vec<u64>,
    /// Admitted tickets whose holders came back for their pass.
    claimed: Vec<u64>,
    /// A fleet's view of liveness (`shared.rs`): who polled on the other instances within a
    /// grace, as the store last said; empty for a local line.
    remote: Vec<u64>,
    /// The store is unreachable (`shared.rs`): every ticket counts as live, since who polls
    /// elsewhere cannot be known; the door lets in abandoned places rather than skip polling ones.
    all_live: bool,
    /// After a pre-queue shuffle: the place in line (rank) of each of the first tickets
    /// (4 bytes per pre-queued ticket). Everything above works in ranks; a ticket above these
    /// is its own rank.
    rank_of: Vec<u32>,
}

impl Line {
    /// A ticket's place in line.
    fn rank(&self, ticket: u64) -> u64 {
        match ticket
            .checked_sub(1)
            .and_then(|i| self.rank_of.get(i as usize))
        {
            Some(&r) => u64::from(r),
            None => ticket,
        }
    }

    fn bit(v: &[u64], i: u64) -> bool {
        v.get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(v: &mut Vec<u64>, i: u64) {
        let w = (i / 64) as usize;
        if v.len() <= w {
            v.resize(w + 1, 0);
        }
        v[w] |= 1 << (i % 64);
    }

    fn live(&self, ticket: u64) -> bool {
        ticket >= self.base && {
            let i = ticket - self.base;
            self.all_live
                || self.live.front().is_some_and(|v| Self::bit(v, i))
                || Self::bit(&self.older, i)
                || Self::bit(&self.remote, i)
        }
    }

    /// The current slice, where a poll is recorded.
    fn current(&mut self) -> &mut Vec<u64> {
        if self.live.is_empty() {
            self.live.push_front(Vec::new());
        }
        &mut self.live[0]
    }

    fn live_between(&self, from: u64, to: u64) -> u64 {
        if self.all_live {
            return to.saturating_sub(from + 1);
        }
        // Tickets in (from, to): counted a word at a time where whole words fit.
        let mut n = 0;
        let mut t = from + 1;
        while t < to {
            let i = t - self.base;
            if i.is_multiple_of(64) && t + 64 <= to {
                let w = (i / 64) as usize;
                let now = self.live.front().and_then(|v| v.get(w)).copied();
                let before = self.older.get(w).copied();
                let remote = self.remote.get(w).copied();
                n += u64::from(
                    (now.unwrap_or(0) | before.unwrap_or(0) | remote.unwrap_or(0)).count_ones(),
                );
                t += 64;
            } else {
                n += u64::from(self.live(t));
                t += 1;
            }
        }
        n
    }

    /// The tickets after the cursor polled within the last grace (this line's own slices).
    fn live_tickets(&self, out: &mut Vec<u64>) {
        let words = self.live.front().map_or(0, Vec::len).max(self.older.len());
        for w in 0..words {
            let now = self.live.front().and_then(|v| v.get(w)).copied();
            let mut bits = now.unwrap_or(0) | self.older.get(w).copied().unwrap_or(0);
            while bits != 0 {
                let t = self.base + w as u64 * 64 + u64::from(bits.trailing_zeros());
                if t > self.cursor {
                    out.push(t);
                }
                bits &= bits - 1;
            }
        }
    }

    /// Whether the door has passed this ticket (by rank): see `RoomState::admitted`.
    fn admitted(&self, rank: u64) -> Option<bool> {
        if rank > self.cursor {
            return None;
        }
        if rank < self.base {
            // Compacted away long ago: its turn came and went.
            return Some(false);
        }
        Some(!Self::bit(&self.skipped, rank - self.base))
    }

    /// Marks an admitted ticket (by rank) claimed; true the first time.
    fn claim(&mut self, rank: u64) -> bool {
        if rank < self.base || rank > self.cursor {
            return false;
        }
        let i = rank - self.base;
        if Self::bit(&self.claimed, i) {
            return false;
        }
        Self::set(&mut self.claimed, i);
        true
    }

    /// Moves the cursor past up to `slots` live tickets, marking dead ones skipped (each is
    /// also handed to `skipped_out`); returns how many were admitted and skipped.
    fn walk(&mut self, slots: u64, skipped_out: &mut dyn FnMut(u64)) -> (u64, u64) {
        let (mut admitted, mut skipped) = (0, 0);
        while admitted < slots && self.cursor < self.issued {
            let t = self.cursor + 1;
            self.cursor = t;
            if self.live(t) {
                admitted += 1;
            } else {
                Line::set(&mut self.skipped, t - self.base);
                skipped_out(t);
                skipped += 1;
            }
        }
        // Dead tickets right behind the cursor are passed too, so `waiting` and `ahead` stay
        // exact and the next tick starts at a live one.
        while self.cursor < self.issued && !self.live(self.cursor + 1) {
            let t = self.cursor + 1;
            self.cursor = t;
            Line::set(&mut self.skipped, t - self.base);
            skipped_out(t);
            skipped += 1;
        }
        self.compact();
        (admitted, skipped)
    }

    /// Starts a new liveness slice (see `RoomState::rotate`).
    fn rotate(&mut self) {
        // The oldest slice's vector is reused for the new one (its capacity kept).
        let mut fresh = if self.live.len() >= self.slices {
            self.live.pop_back().unwrap_or_default()
        } else {
            Vec::new()
        };
        fresh.clear();
        self.live.push_front(fresh);
        let words = self.live.iter().map(Vec::len).max().unwrap_or(0);
        let mut older = std::mem::take(&mut self.older);
        older.clear();
        older.resize(words, 0);
        for v in self.live.iter().skip(1) {
            for (o, w) in older.iter_mut().zip(v) {
                *o |= w;
            }
        }
        self.older = older;
        let cursor = self.cursor;
        self.cursor_at_rotation.push_front(cursor);
        self.cursor_at_rotation.truncate(self.slices);
    }

    /// Drops whole words passed at least a grace ago: memory follows the line, not its
    /// history.
    fn compact(&mut self) {
        let oldest = match self.cursor_at_rotation.len() {
            n if n >= self.slices => self.cursor_at_rotation[n - 1],
            _ => 0,
        };
        let below = oldest.min(self.cursor) + 1;
        let words = (below.saturating_sub(self.base) / 64) as usize;
        if words == 0 {
            return;
        }
        let (older, skipped, remote, claimed) = (
            &mut self.older,
            &mut self.skipped,
            &mut self.remote,
            &mut self.claimed,
        );
        for v in self
            .live
            .iter_mut()
            .chain([older, skipped, remote, claimed])
        {
            let k = words.min(v.len());
            v.drain(..k);
        }
        self.base += words as u64 * 64;
    }
}

#[derive(Debug)]
pub struct LocalState {
    line: Mutex<Line>,
    sessions: Mutex<HashMap<u64, Instant>>,
}

impl Default for LocalState {
    /// Eight slices per grace (two ticks each at the default 4 s grace).
    fn default() -> Self {
        LocalState::new(8)
    }
}

impl Line {
    fn new(rotations_per_grace: u32) -> Line {
        let per = rotations_per_grace.clamp(1, MAX_ROTATIONS_PER_GRACE) as usize;
        Line {
            base: 1,
            slices: per + 1,
            ..Line::default()
        }
    }
}

impl LocalState {
    pub fn new(rotations_per_grace: u32) -> LocalState {
        LocalState {
            line: Mutex::new(Line::new(rotations_per_grace)),
            sessions: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalState {
    fn line(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions_map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RoomState for LocalState {
    fn issue(&self) -> u64 {
        let mut l = self.line();
        l.issued += 1;
        let t = l.issued;
        // A new ticket is live from the start.
        let i = t - l.base;
        Line::set(l.current(), i);
        t
    }

    fn touch(&self, ticket: u64) {
        let mut l = self.line();
        let ticket = l.rank(ticket);
        if ticket > l.cursor && ticket <= l.issued && ticket >= l.base {
            let i = ticket - l.base;
            Line::set(l.current(), i);
        }
    }

    fn admitted(&self, ticket: u64) -> Option<bool> {
        let l = self.line();
        l.admitted(l.rank(ticket))
    }

    fn claim_ticket(&self, ticket: u64) -> bool {
        let mut l = self.line();
        let rank = l.rank(ticket);
        l.claim(rank)
    }

    fn ahead(&self, ticket: u64) -> u64 {
        let l = self.line();
        let ticket = l.rank(ticket);
        if ticket <= l.cursor {
            return 0;
        }
        l.live_between(l.cursor, ticket)
    }

    fn waiting(&self) -> u64 {
        let l = self.line();
        l.live_between(l.cursor, l.issued + 1)
    }

    fn advance(&self, slots: u64) -> (u64, u64) {
        self.line().walk(slots, &mut |_| {})
    }

    fn rotate(&self) {
        self.line().rotate();
    }

    fn rotations_per_grace(&self) -> u32 {
        (self.line().slices - 1) as u32
    }

    fn shuffle_prequeue(&self, seed: u64) {
        let mut l = self.line();
        if l.cursor > 0 || !l.rank_of.is_empty() || l.issued > u64::from(u32::MAX) {
            return;
        }
        let n = l.issued as usize;
        // Fisher-Yates over the ranks, with a xorshift stream from the seed.
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ranks: Vec<u32> = (1..=n as u32).collect();
        for i in (1..n).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            ranks.swap(i, j);
        }
        // Liveness moves with each ticket to its rank (base is 1: nothing was compacted).
        let moved = |v: &[u64]| {
            let mut out = Vec::new();
            for (i, r) in ranks.iter().enumerate() {
                if Line::bit(v, i as u64) {
                    Line::set(&mut out, u64::from(*r) - 1);
                }
            }
            out
        };
        let live: VecDeque<Vec<u64>> = l.live.iter().map(|v| moved(v)).collect();
        l.live = live;
        l.older = moved(&l.older);
        l.rank_of = ranks;
    }

    fn session_add(&self, id: u64, now: Instant) {
        self.sessions_map().insert(id, now);
    }

    fn session_touch(&self, id: u64, now: Instant) -> bool {
        match self.sessions_map().get_mut(&id) {
            Some(t) => {
                *t = now;
                true
            }
            None => false,
        }
    }

    fn session_revoke(&self, id: u64) -> bool {
        self.sessions_map().remove(&id).is_some()
    }

    fn sessions(&self) -> u64 {
        self.sessions_map().len() as u64
    }

    fn sessions_expire(&self, idle_before: Instant) -> u64 {
        let mut m = self.sessions_map();
        let before = m.len();
        m.retain(|_, t| *t >= idle_before);
        (before - m.len()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `queue_grace` of rotations.
    fn grace(s: &LocalState) {
        for _ in 0..s.rotations_per_grace() {
            s.rotate();
        }
    }

    #[test]
    fn slices_are_two_ticks_long_and_at_most_32_per_grace() {
        let tick = std::time::Duration::from_millis(250);
        let s = |secs: f64| rotations_for(std::time::Duration::from_secs_f64(secs), tick);
        assert_eq!(
            (s(0.2), s(1.0), s(4.0), s(16.0), s(60.0)),
            (1, 2, 8, 32, 32)
        );
    }

    #[test]
    fn a_ticket_is_live_for_a_grace_after_its_last_poll_and_no_longer() {
        let s = LocalState::default();
        let polled = s.issue();
        let gone = s.issue();
        // `polled` polls every half grace; `gone` never again.
        let per = s.rotations_per_grace();
        for half in 1..=6u32 {
            for _ in 0..per / 2 {
                s.rotate();
            }
            s.touch(polled);
            let in_line = s.line().live(gone);
            // Issued in the first slice: visible for that slice and a full grace after it.
            assert_eq!(in_line, half * (per / 2) <= per, "half {half}");
            assert!(
                s.line().live(polled),
                "a polling ticket was dropped at half {half}"
            );
        }
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn the_door_admits_live_tickets_in_order_and_skips_dead_ones() {
        let s = LocalState::default();
        let tickets: Vec<u64> = (0..10).map(|_| s.issue()).collect();
        assert_eq!(tickets, (1..=10).collect::<Vec<_>>());
        assert_eq!(s.waiting(), 10);
        // Graces pass; only even tickets poll.
        grace(&s);
        grace(&s);
        for t in (2..=10).step_by(2) {
            s.touch(t);
        }
        assert_eq!(s.waiting(), 5);
        assert_eq!(s.ahead(6), 2);
        let (admitted, skipped) = s.advance(2);
        assert_eq!((admitted, skipped), (2, 3));
        assert_eq!(s.admitted(2), Some(true));
        assert_eq!(s.admitted(3), Some(false));
        assert_eq!(s.admitted(4), Some(true));
        assert_eq!(s.admitted(6), None);
        assert_eq!(s.ahead(8), 1);
    }

    #[test]
    fn a_shuffled_prequeue_lets_everyone_in_once_in_a_new_order_then_fifo() {
        let s = LocalState::default();
        for _ in 0..50 {
            s.issue();
        }
        s.shuffle_prequeue(0x5eed);
        let late: Vec<u64> = (0..5).map(|_| s.issue()).collect();
        let mut order = Vec::new();
        for _ in 0..55 {
            s.advance(1);
            let now_in: Vec<u64> = (1..=55)
                .filter(|t| s.admitted(*t) == Some(true) && !order.contains(t))
                .collect();
            assert_eq!(now_in.len(), 1, "one per slot");
            order.push(now_in[0]);
        }
        // Every ticket once; the first 50 not in ticket order; the late ones last, in order.
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=55).collect::<Vec<_>>());
        assert_ne!(&order[..50], &(1..=50).collect::<Vec<_>>()[..]);
        assert_eq!(&order[50..], &late[..]);
        // Positions follow the shuffled order.
        let s2 = LocalState::default();
        for _ in 0..10 {
            s2.issue();
        }
        s2.shuffle_prequeue(7);
        let mut ahead: Vec<u64> = (1..=10).map(|t| s2.ahead(t)).collect();
        ahead.sort();
        assert_eq!(ahead, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn memory_follows_the_line_not_its_history() {
        let s = LocalState::default();
        for _ in 0..100_000 {
            s.issue();
        }
        s.advance(98_000);
        // Tickets let in are kept a grace for their holders' next poll, then dropped.
        grace(&s);
        grace(&s);
        s.advance(1_000);
        let l = s.line();
        let words = l.live.iter().map(Vec::len).max().unwrap_or(0);
        assert!(words <= 1_000 / 64 + 2, "{words}");
    }

    /// Found by `storm --mode queue`: past 64 tickets, the word holding tickets the door had
    /// just let in was compacted away before their holders polled again, and they were told
    /// they had lost their place.
    #[test]
    fn a_ticket_just_let_in_stays_let_in_until_a_grace_has_passed() {
        let s = LocalState::default();
        for _ in 0..200 {
            s.issue();
        }
        assert_eq!(s.advance(150), (150, 0));
        assert_eq!(s.admitted(10), Some(true));
        assert_eq!(s.admitted(140), Some(true));
        // The ones still waiting keep polling.
        let poll = |s: &LocalState| (151..=200).for_each(|t| s.touch(t));
        grace(&s);
        poll(&s);
        s.advance(10);
        assert_eq!(
            s.admitted(10),
            Some(true),
            "one grace: still within its grace"
        );
        grace(&s);
        poll(&s);
        s.advance(10);
        // Two graces without a poll: its turn came and went.
        assert_eq!(s.admitted(10), Some(false));
        assert_eq!(s.admitted(170), Some(true));
    }
}
