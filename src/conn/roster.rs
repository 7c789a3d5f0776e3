//! The roster of open client connections: how the server's two signals to them, drain (HTTP/2
//! connections are sent GOAWAY) and stop (every connection finishes its request and closes),
//! reach each one.
//!
//! Why not a watch channel each: a connection awaiting a `watch::Receiver` registers a waiter
//! in the channel's notify list, under that list's lock, and takes it out again when it ends;
//! with one channel for drain and one for stop, that was two lock pairs on lists every
//! connection of the process shares, for signals that come once in the process's life
//! (callgrind: ~1,200 instructions of a 58,000-instruction new-connection request). Here a
//! connection enters a slot of a sharded list once, by the address of its own activity record
//! (no counter every thread writes), and the signal walks the lists and wakes each through the
//! waker it already has (`ConnActivity` as a `Wake`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::clock::ConnActivity;

/// Where the server is in its life, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// HTTP/2 connections are sent GOAWAY; HTTP/1 responses carry `Connection: close`.
    Draining = 1,
    /// Every connection finishes what it is doing and closes.
    Stopping = 2,
}

const SHARDS: usize = 16;

pub struct Roster {
    phase: AtomicU8,
    shards: [Mutex<Shard>; SHARDS],
}

#[derive(Default)]
struct Shard {
    slots: Vec<Option<Arc<ConnActivity>>>,
    free: Vec<usize>,
}

/// A connection's place on the roster, given up when dropped.
pub struct Enrolled<'a> {
    roster: &'a Roster,
    shard: usize,
    slot: usize,
}

impl Default for Roster {
    fn default() -> Roster {
        Roster {
            phase: AtomicU8::new(Phase::Serving as u8),
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
        }
    }
}

impl Roster {
    /// Puts a connection on the roster: from now on a signal wakes its task (through
    /// `activity`'s waker) and sets its `signalled` flag. Check `phase` after this, not
    /// before, so that a signal given in between is not missed.
    pub fn enrol<'a>(&'a self, activity: &Arc<ConnActivity>) -> Enrolled<'a> {
        // Records are at least 64 bytes apart: the low bits carry nothing.
        let shard = (Arc::as_ptr(activity) as usize >> 6) % SHARDS;
        let mut s = lock(&self.shards[shard]);
        let slot = match s.free.pop() {
            Some(i) => {
                s.slots[i] = Some(activity.clone());
                i
            }
            None => {
                s.slots.push(Some(activity.clone()));
                s.slots.len() - 1
            }
        };
        Enrolled {
            roster: self,
            shard,
            slot,
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }

    /// Moves the server on to `phase` (never back) and wakes every connection on the roster.
    pub fn signal(&self, phase: Phase) {
        let before = self.phase.fetch_max(phase as u8, Ordering::SeqCst);
        if before >= phase as u8 {
            return;
        }
        for shard in &self.shards {
            for a in lock(shard).slots.iter().flatten() {
                std::task::Wake::wake_by_ref(a);
            }
        }
    }

    /// Connections on the roster now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| lock(s).slots.iter().flatten().count())
            .sum()
    }
}

impl Drop for Enrolled<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.roster.shards[self.shard]);
        s.slots[self.slot] = None;
        s.free.push(self.slot);
    }
}

/// A shard's lock; a panic while it was held (none of the code under it can panic) leaves the
/// list itself intact.
fn lock(m: &Mutex<Shard>) -> std::sync::MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_signal_flags_every_enrolled_connection_once_and_only_moves_forward() {
        let roster = Roster::default();
        let a: Vec<Arc<ConnActivity>> = (0..100).map(|_| Arc::default()).collect();
        let enrolled: Vec<_> = a.iter().map(|x| roster.enrol(x)).collect();
        assert_eq!(roster.len(), 100);
        roster.signal(Phase::Draining);
        assert_eq!(roster.phase(), Phase::Draining);
        assert!(a.iter().all(|x| x.signalled.swap(false, Ordering::AcqRel)));
        // The same phase again, or an earlier one, wakes nobody.
        roster.signal(Phase::Draining);
        roster.signal(Phase::Serving);
        assert_eq!(roster.phase(), Phase::Draining);
        assert!(a.iter().all(|x| !x.signalled.load(Ordering::Acquire)));
        // A connection that left is not woken; its slot is reused.
        drop(enrolled);
        assert_eq!(roster.len(), 0);
        let late = Arc::<ConnActivity>::default();
        let _e = roster.enrol(&late);
        roster.signal(Phase::Stopping);
        assert!(late.signalled.load(Ordering::Acquire));
        assert!(a.iter().all(|x| !x.signalled.load(Ordering::Acquire)));
        assert_eq!(roster.phase(), Phase::Stopping);
    }
}
