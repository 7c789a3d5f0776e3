//! The accept loops' own counters, and where the metrics find them. Each loop writes only its
//! own, so counting costs no shared cache line on the accept path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One accept loop's counters.
#[derive(Debug)]
pub struct ShardStats {
    pub listener: SocketAddr,
    pub shard: usize,
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    /// The shard's listening socket, while its accept loop runs (for TCP_INFO).
    socket: std::sync::Weak<socket2::Socket>,
}

impl ShardStats {
    /// The accept queue's length and effective backlog, read from the kernel now.
    pub fn listen_queue(&self) -> Option<super::sockopt::ListenQueue> {
        let s = self.socket.upgrade()?;
        super::sockopt::listen_queue(std::os::fd::AsFd::as_fd(&*s)).ok()
    }
}

/// Every accept loop's counters, registered as the loops start, and the express lane's.
#[derive(Debug, Default)]
pub struct Shards {
    loops: Mutex<Vec<Arc<ShardStats>>>,
    /// Connections served on the express lane since start, and open there now.
    pub express_served: AtomicU64,
    pub express_open: AtomicUsize,
    /// Newcomers sent to the main runtime since start because their first request was not
    /// whole in their socket at accept (`Lanes::first_message_waiting`).
    pub express_unready: AtomicU64,
    /// Accept loops running on the express lane's thread now, and moves between it and the
    /// main runtime since start (`Lanes::accept_on_lane`).
    pub accept_on_lane: AtomicUsize,
    pub accept_moves: AtomicU64,
    /// Connections parked since start, and parked now (`park.rs`).
    pub parked: AtomicU64,
    pub parked_now: AtomicUsize,
}

impl Shards {
    /// Counters for a new accept loop.
    pub fn register(
        &self,
        listener: SocketAddr,
        shard: usize,
        socket: &Arc<socket2::Socket>,
    ) -> Arc<ShardStats> {
        let s = Arc::new(ShardStats {
            listener,
            shard,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            socket: Arc::downgrade(socket),
        });
        self.loops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s.clone());
        s
    }

    pub fn all(&self) -> Vec<Arc<ShardStats>> {
        self.loops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Connections admitted since start, all shards.
    pub fn accepted(&self) -> u64 {
        self.all()
            .iter()
            .map(|s| s.accepted.load(Ordering::Relaxed))
            .sum()
    }
}
