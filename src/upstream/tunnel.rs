//! Tunnel slots: how many WebSocket tunnels an upstream (and one client of it) may hold open.
//! A tunnel takes a dedicated origin connection for as long as both sides keep it, outside the
//! pool, so without its own cap a client could open origin connections at will.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct TunnelSlots {
    max: usize,
    per_client: usize,
    open: AtomicUsize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One open tunnel; dropping it frees the slot.
#[derive(Debug)]
pub struct TunnelSlot {
    slots: Arc<TunnelSlots>,
    client: IpAddr,
}

impl TunnelSlots {
    /// `max` tunnels in all (0: none allowed), at most `per_client` of them for one client key.
    pub fn new(max: usize, per_client: usize) -> Arc<TunnelSlots> {
        Arc::new(TunnelSlots {
            max,
            per_client: per_client.max(1),
            open: AtomicUsize::new(0),
            by_client: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `client`, or None at either cap. Tunnels are rare next to requests, so one
    /// short lock is fine here.
    pub fn try_take(self: &Arc<Self>, client: IpAddr) -> Option<TunnelSlot> {
        let mut by = self.by_client.lock().unwrap_or_else(|e| e.into_inner());
        if self.open.load(Ordering::Relaxed) >= self.max {
            return None;
        }
        let n = by.entry(client).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(TunnelSlot {
            slots: self.clone(),
            client,
        })
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut by = self
            .slots
            .by_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.client);
            }
        }
        self.slots.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_client_and_frees_on_drop() {
        let s = TunnelSlots::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let a1 = s.try_take(a).unwrap();
        let _a2 = s.try_take(a).unwrap();
        assert!(s.try_take(a).is_none(), "per-client cap");
        let _b1 = s.try_take(b).unwrap();
        assert!(s.try_take(b).is_none(), "total cap");
        drop(a1);
        assert_eq!(s.open(), 2);
        assert!(s.try_take(b).is_some());
    }
}
