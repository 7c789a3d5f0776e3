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

/// Descriptors kept aside for listeners, logs, DNS and the like.
const FIXED_MARGIN: u64 = 64;

/// Connections the admin listener serves at once; more are closed at accept. Counted in the
/// budget so an operator scraping during a storm cannot push the proxy into EMFILE.
pub const ADMIN_CONNECTIONS: usize = 32;

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
    (nofile / 10 * 9).saturating_sub(
        origin_connections
            .saturating_add(listeners)
            .saturating_add(FIXED_MARGIN + ADMIN_CONNECTIONS as u64),
    )
}

/// The RLIMIT_NOFILE that `clients` connections need beside the pools and listeners: the
/// inverse of `connection_budget`, for the fix a warning or `doctor` suggests.
pub fn descriptors_needed(clients: u64, origin_connections: u64, listeners: u64) -> u64 {
    clients
        .saturating_add(origin_connections)
        .saturating_add(listeners)
        .saturating_add(FIXED_MARGIN + ADMIN_CONNECTIONS as u64)
        .saturating_mul(10)
        .div_ceil(9)
        // connection_budget rounds nofile down to a multiple of 10.
        .saturating_add(10)
}

/// How a config's connections fit a descriptor limit.
#[derive(Debug, Clone)]
pub struct Budget {
    pub nofile: u64,
    /// Client connections that fit (what `max_connections` is capped to).
    pub effective: u64,
    /// `[admission] max_connections` as configured.
    pub wanted: u64,
    /// Origin connections the pools may hold.
    pub origin: u64,
    pub listeners: u64,
}

impl Budget {
    pub fn of(config: &crate::Config, nofile: u64) -> Budget {
        let origin = config
            .upstreams
            .iter()
            .map(|u| (u.servers.len() as u64).saturating_mul(u.pool_max as u64))
            .fold(0u64, u64::saturating_add);
        let listeners = config.listeners.iter().map(|l| l.shards as u64).sum();
        Budget {
            nofile,
            effective: connection_budget(nofile, origin, listeners).max(1),
            wanted: u64::from(config.admission.max_connections),
            origin,
            listeners,
        }
    }

    /// What to tell the operator when the config does not fit, naming the key to change:
    /// when the origin pools take most of the descriptors, it is `pool_max`, not
    /// `max_connections`.
    pub fn advice(&self, config: &crate::Config) -> Option<String> {
        if self.effective >= self.wanted {
            return None;
        }
        let need = descriptors_needed(self.wanted, self.origin, self.listeners);
        let usable = self.nofile / 10 * 9;
        if self.origin >= usable / 2 {
            let biggest = config
                .upstreams
                .iter()
                .max_by_key(|u| u.servers.len() * u.pool_max)?;
            return Some(format!(
                "the origin pools may hold {} connections ([upstreams.{}] pool_max {} x {} \
                 servers is the largest), which leaves {} of RLIMIT_NOFILE {} for clients: \
                 lower pool_max, or raise the limit to at least {need}",
                self.origin,
                biggest.name,
                biggest.pool_max,
                biggest.servers.len(),
                self.effective,
                self.nofile
            ));
        }
        Some(format!(
            "[admission] max_connections {} does not fit RLIMIT_NOFILE {}: capped to {}. Raise \
             the limit (LimitNOFILE= in the systemd unit, `ulimit -n`, --ulimit nofile= for \
             docker) to at least {need}, or lower max_connections",
            self.wanted, self.nofile, self.effective
        ))
    }
}

/// The soft and hard RLIMIT_NOFILE now.
pub fn nofile_limits() -> std::io::Result<(u64, u64)> {
    Resource::NOFILE.get()
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
        assert_eq!(
            connection_budget(20_000, 64, 2),
            17_870 - ADMIN_CONNECTIONS as u64
        );
        assert_eq!(connection_budget(u64::MAX, u64::MAX, 2), 0);
        assert_eq!(connection_budget(100, 64, 2), 0);
        let need = descriptors_needed(10_000, 64, 2);
        assert!(connection_budget(need, 64, 2) >= 10_000);
    }
}
