//! The line's state behind one small interface, so a fleet can keep it in Redis later (the
//! ticket counter, the cursor, liveness, sessions) while the room's logic stays as it is.
//!
//! `LocalState` keeps it in this process: a ticket is a number; the cursor is the highest
//! admitted one; liveness is one bit per ticket in two epochs of `queue_grace` (a ticket that
//! polled in the current or the previous epoch is live), so an abandoned ticket costs one bit
//! and the door walks past it. About 1 bit per waiter plus a word per 64 for skipped tickets:
//! far below the 64 bytes per waiter the room may spend.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

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
    /// Starts a new liveness epoch (every `queue_grace`).
    fn rotate(&self);
    /// At the opening (before anyone was let in): the tickets issued so far are let in in a
    /// random order drawn from `seed`; later tickets follow in order.
    fn shuffle_prequeue(&self, seed: u64);

    /// Sessions (admitted shoppers): add, touch (false when unknown: expired or revoked),
    /// revoke, count, and expire those idle since before `idle_before`.
    fn session_add(&self, id: u64, now: Instant);
    fn session_touch(&self, id: u64, now: Instant) -> bool;
    fn session_revoke(&self, id: u64) -> bool;
    fn sessions(&self) -> u64;
    fn sessions_expire(&self, idle_before: Instant) -> u64;
}

#[derive(Debug, Default)]
struct Line {
    /// Tickets issued so far; ticket numbers start at 1.
    issued: u64,
    /// Every ticket <= cursor has been passed by the door.
    cursor: u64,
    /// The cursor at the last two liveness rotations (every `queue_grace`): tickets at or
    /// below the older one were passed at least one grace ago. Only those may be compacted
    /// away; a ticket let in more recently keeps its "admitted" bit until its holder's next
    /// poll (which has a grace to come, as a waiting one has).
    cursor_at_rotation: [u64; 2],
    /// Bit i of these is ticket `base + i`.
    base: u64,
    current: Vec<u64>,
    previous: Vec<u64>,
    skipped: Vec<u64>,
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
            Self::bit(&self.current, i) || Self::bit(&self.previous, i)
        }
    }

    fn live_between(&self, from: u64, to: u64) -> u64 {
        // Tickets in (from, to): counted a word at a time where whole words fit.
        let mut n = 0;
        let mut t = from + 1;
        while t < to {
            let i = t - self.base;
            if i.is_multiple_of(64) && t + 64 <= to {
                let w = (i / 64) as usize;
                let a = self.current.get(w).copied().unwrap_or(0);
                let b = self.previous.get(w).copied().unwrap_or(0);
                n += u64::from((a | b).count_ones());
                t += 64;
            } else {
                n += u64::from(self.live(t));
                t += 1;
            }
        }
        n
    }

    /// Drops whole words passed at least a grace ago: memory follows the line, not its
    /// history.
    fn compact(&mut self) {
        let below = self.cursor_at_rotation[1].min(self.cursor) + 1;
        let words = (below.saturating_sub(self.base) / 64) as usize;
        if words == 0 {
            return;
        }
        for v in [&mut self.current, &mut self.previous, &mut self.skipped] {
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
    fn default() -> Self {
        LocalState {
            line: Mutex::new(Line {
                base: 1,
                ..Line::default()
            }),
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
        Line::set(&mut l.current, i);
        t
    }

    fn touch(&self, ticket: u64) {
        let mut l = self.line();
        let ticket = l.rank(ticket);
        if ticket > l.cursor && ticket <= l.issued && ticket >= l.base {
            let i = ticket - l.base;
            Line::set(&mut l.current, i);
        }
    }

    fn admitted(&self, ticket: u64) -> Option<bool> {
        let l = self.line();
        let ticket = l.rank(ticket);
        if ticket > l.cursor {
            return None;
        }
        if ticket < l.base {
            // Compacted away long ago: its turn came and went.
            return Some(false);
        }
        Some(!Line::bit(&l.skipped, ticket - l.base))
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
        let mut l = self.line();
        let (mut admitted, mut skipped) = (0, 0);
        while admitted < slots && l.cursor < l.issued {
            let t = l.cursor + 1;
            l.cursor = t;
            if l.live(t) {
                admitted += 1;
            } else {
                let i = t - l.base;
                Line::set(&mut l.skipped, i);
                skipped += 1;
            }
        }
        // Dead tickets right behind the cursor are passed too, so `waiting` and `ahead` stay
        // exact and the next tick starts at a live one.
        while l.cursor < l.issued && !l.live(l.cursor + 1) {
            let t = l.cursor + 1;
            l.cursor = t;
            let i = t - l.base;
            Line::set(&mut l.skipped, i);
            skipped += 1;
        }
        l.compact();
        (admitted, skipped)
    }

    fn rotate(&self) {
        let mut l = self.line();
        let current = std::mem::take(&mut l.current);
        l.previous = current;
        l.cursor_at_rotation = [l.cursor, l.cursor_at_rotation[0]];
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
        l.current = moved(&l.current);
        l.previous = moved(&l.previous);
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

    #[test]
    fn the_door_admits_live_tickets_in_order_and_skips_dead_ones() {
        let s = LocalState::default();
        let tickets: Vec<u64> = (0..10).map(|_| s.issue()).collect();
        assert_eq!(tickets, (1..=10).collect::<Vec<_>>());
        assert_eq!(s.waiting(), 10);
        // Epoch passes; only even tickets poll.
        s.rotate();
        s.rotate();
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
        // Tickets let in are kept a grace or two for their holders' next poll, then dropped.
        s.rotate();
        s.rotate();
        s.advance(1_000);
        let l = s.line();
        assert!(l.current.len() <= 1_000 / 64 + 2, "{}", l.current.len());
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
        s.rotate();
        poll(&s);
        s.advance(10);
        assert_eq!(
            s.admitted(10),
            Some(true),
            "one rotation: still within its grace"
        );
        s.rotate();
        poll(&s);
        s.advance(10);
        // Two graces without a poll: its turn came and went.
        assert_eq!(s.admitted(10), Some(false));
        assert_eq!(s.admitted(170), Some(true));
    }
}
