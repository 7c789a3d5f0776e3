//! File descriptors: raise the soft limit at start, size the connection cap below it, and keep
//! a reserve descriptor for the moment accept still hits EMFILE.
//!
//! `accept4` returning EMFILE leaves the connection in the queue and the listener readable, so a
//! loop that only retries spins. Closing the reserve frees one descriptor: the accept loop takes
//! the waiting connection, resets it (the client learns at once instead of hanging), and opens
//! the reserve again.

use std::fs::File;
use std::sync::Mutex;

use rlimit::Resource;

/// Descriptors kept aside for listeners, logs, the admin port, DNS and the like.
const FIXED_MARGIN: u64 = 64;

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit now in force.
pub fn raise_nofile() -> std::io::Result<u64> {
    let (soft, hard) = Resource::NOFILE.get()?;
    if soft < hard {
        Resource::NOFILE.set(hard, hard)?;
    }
    Ok(Resource::NOFILE.get()?.0)
}

/// How many client connections fit under `nofile`: 90 % of it (stop before the limit, not at
/// it), less the origin connections the pools may keep and a fixed margin.
pub fn connection_budget(nofile: u64, origin_connections: u64, listeners: u64) -> u64 {
    (nofile / 10 * 9).saturating_sub(origin_connections + listeners + FIXED_MARGIN)
}

/// The spare descriptor, shared by all accept loops.
#[derive(Debug, Default)]
pub struct Reserve(Mutex<Option<File>>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(Mutex::new(File::open("/dev/null").ok()))
    }

    /// Closes the reserve, runs `f` with the freed descriptor available, then reopens it.
    pub fn with_released<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        drop(slot.take());
        let out = f();
        *slot = File::open("/dev/null").ok();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_stays_below_the_limit() {
        assert_eq!(connection_budget(20_000, 64, 2), 17_870);
        assert_eq!(connection_budget(100, 64, 2), 0);
    }
}
