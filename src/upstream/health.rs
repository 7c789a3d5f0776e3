//! Server health: passive (connect failures and failed exchanges count against a server) and
//! active (a TCP connect, or a GET of `health.path`, every `health.interval`). A server with
//! `unhealthy_after` consecutive failures is ejected: no new requests, idle connections closed.
//! Only active checks re-admit it, after `healthy_after` consecutive successes. A server that
//! answered real traffic within the last interval is not probed: traffic is the better check.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug)]
pub struct Health {
    healthy: AtomicBool,
    fails: AtomicU32,
    oks: AtomicU32,
    /// Milliseconds since `epoch` of the last success, 0 = never.
    last_ok_ms: AtomicU64,
    /// Milliseconds since `epoch` of the last failure, 0 = never.
    last_fail_ms: AtomicU64,
    epoch: Instant,
}

/// What a recorded result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Ejected,
    Readmitted,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            healthy: AtomicBool::new(true),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            last_ok_ms: AtomicU64::new(0),
            last_fail_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub fn success(&self, active: bool, healthy_after: u32) -> Transition {
        self.fails.store(0, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ok_ms.store(ms.max(1), Ordering::Relaxed);
        if !active {
            return Transition::None;
        }
        let oks = self.oks.fetch_add(1, Ordering::Relaxed) + 1;
        if oks >= healthy_after && !self.healthy.swap(true, Ordering::AcqRel) {
            return Transition::Readmitted;
        }
        Transition::None
    }

    pub fn failure(&self, unhealthy_after: u32) -> Transition {
        self.oks.store(0, Ordering::Relaxed);
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_fail_ms.store(ms.max(1), Ordering::Relaxed);
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails >= unhealthy_after && self.healthy.swap(false, Ordering::AcqRel) {
            return Transition::Ejected;
        }
        Transition::None
    }

    /// A real request to this (ejected) server was answered: that is proof enough.
    pub fn readmit(&self) -> Transition {
        self.fails.store(0, Ordering::Relaxed);
        if self.healthy.swap(true, Ordering::AcqRel) {
            Transition::None
        } else {
            Transition::Readmitted
        }
    }

    /// When this server last failed (for picking the least recently failed one).
    pub fn last_failure(&self) -> u64 {
        self.last_fail_ms.load(Ordering::Relaxed)
    }

    /// True when real traffic succeeded within `within`.
    pub fn recently_ok(&self, within: Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        last > 0
            && (self.epoch.elapsed().as_millis() as u64).saturating_sub(last)
                < within.as_millis() as u64
    }
}

/// One active check: TCP connect, and with `path` a GET answered below 500.
/// `preface` (a PROXY LOCAL header, with `send_proxy_protocol`) is written before the GET.
pub async fn probe(addr: &str, path: Option<&str>, timeout: Duration, preface: &[u8]) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let Some(path) = path else { return Some(true) };
        if !preface.is_empty() {
            tokio::io::AsyncWriteExt::write_all(&mut stream, preface)
                .await
                .ok()?;
        }
        let (mut tx, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::get(path)
            .header(http::header::HOST, addr)
            .header(http::header::USER_AGENT, "breakwater-health")
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = tx.send_request(req).await.ok()?;
        Some(resp.status().as_u16() < 500)
    };
    matches!(tokio::time::timeout(timeout, check).await, Ok(Some(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejects_and_readmits() {
        let h = Health::default();
        assert_eq!(h.failure(3), Transition::None);
        assert_eq!(h.failure(3), Transition::None);
        assert_eq!(h.failure(3), Transition::Ejected);
        assert!(!h.is_healthy());
        assert_eq!(
            h.success(false, 2),
            Transition::None,
            "passive success never re-admits"
        );
        assert_eq!(h.success(true, 2), Transition::None);
        assert_eq!(h.success(true, 2), Transition::Readmitted);
        assert!(h.is_healthy());
    }
}
