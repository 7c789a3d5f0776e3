//! Keep-alive connections to one origin server, reused most-recently-used first.
//!
//! This is the simple pool the core proxy needs: idle connections are kept (up to
//! `pool_max_idle`) and reused, never one connection per request. The warm, capped pool with a
//! fair queue replaces it (see the warm-pool issue); its callers only use `checkout`, `checkin`
//! and `connect`, so the change stays inside this file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::UpstreamError;
use crate::proxy::body::UpstreamBody;

pub type Sender = http1::SendRequest<UpstreamBody>;

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    tx: Sender,
    since: Instant,
}

/// A connection taken out of the pool (or fresh), owned by one request until its response body
/// has been read to the end; only then may it go back.
#[derive(Debug)]
pub struct Conn {
    pub tx: Sender,
    /// Came from the pool rather than a new connect: a failure before any response byte may be
    /// the stale keep-alive race, which makes a retry on a fresh connection safe.
    pub reused: bool,
    pool: Arc<Pool>,
}

impl Conn {
    /// Returns the connection to the pool; call only after the whole response was read.
    pub fn release(self) {
        self.pool.checkin(self.tx);
    }
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
        })
    }

    /// The most recently used live connection, if any. Closed and expired ones are dropped.
    pub fn checkout(self: &Arc<Self>) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if !c.tx.is_closed() && now.duration_since(c.since) < self.idle_timeout {
                return Some(Conn {
                    tx: c.tx,
                    reused: true,
                    pool: self.clone(),
                });
            }
        }
        None
    }

    fn checkin(&self, tx: Sender) {
        if tx.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections past their idle timeout or closed by the origin.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| !c.tx.is_closed() && now.duration_since(c.since) < self.idle_timeout);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Opens a new HTTP/1.1 connection to `addr` ("host:port"; names resolved now).
    pub async fn connect(
        self: &Arc<Self>,
        addr: &str,
        timeout: Duration,
    ) -> Result<Conn, UpstreamError> {
        let attempt = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(UpstreamError::Connect)?;
            // Best effort: a failure only costs latency.
            let _ = stream.set_nodelay(true);
            let (tx, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(UpstreamError::Handshake)?;
            let server = addr.to_string();
            tokio::spawn(async move {
                // with_upgrades: a 101 response hands the socket to the tunnel instead of
                // closing it.
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(server, error = %e, "origin connection ended with an error");
                }
            });
            Ok(tx)
        };
        let tx = tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)??;
        Ok(Conn {
            tx,
            reused: false,
            pool: self.clone(),
        })
    }
}
