//! Leases: a connection checked out for one exchange, given back (or its response drained in
//! the background, or the connection closed) when the lease drops, and the bookkeeping that
//! giving back does under the upstream lock.

use super::*;

/// A connection lent to one request. Dropping it gives the connection back: to the pool when
/// `finish` was called (the response was read to the end), closed otherwise.
#[derive(Debug)]
pub struct Lease {
    pub(super) up: Arc<Upstream>,
    pub(super) server: usize,
    pub(super) conn: u64,
    pub(super) tx: Option<Sender>,
    pub(super) client: Asker,
    pub reused: bool,
    pub(super) reusable: bool,
    /// A connection private to this request (`send_proxy_protocol`): outside the pool, closed
    /// when the lease ends; the permit bounds how many exist.
    pub(super) private: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Lease {
    pub fn server(&self) -> &str {
        &self.up.servers[self.server].addr
    }

    /// The server's address, shared (for a log line or an error that outlives the lease).
    pub fn server_name(&self) -> Arc<str> {
        self.up.servers[self.server].addr.clone()
    }

    /// The response was read to its end: the connection may serve another request.
    pub fn finish(mut self) {
        self.reusable = true;
    }

    /// The client abandoned this response mid-body. Reads the rest (at most `DRAIN_BYTES`
    /// within `DRAIN_TIME`) and gives the connection back for reuse; past the bound it is
    /// closed. A cancelled download then costs the origin no new handshake. (An h2c stream is
    /// simply reset by dropping its body: the connection is unaffected.)
    pub async fn drain_abandoned(self, mut body: Incoming) {
        use http_body_util::BodyExt;
        if self.private.is_some() || matches!(self.tx, Some(pool::Sender::H2(_))) {
            return;
        }
        let stats = &self.up.stats;
        let mut left = DRAIN_BYTES;
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return false };
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                if n > left {
                    return false;
                }
                left -= n;
            }
            true
        })
        .await
        .unwrap_or(false);
        if drained {
            stats.cancel_drained.fetch_add(1, Ordering::Relaxed);
            self.finish();
        } else {
            stats.cancel_closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `drain_abandoned` in a task of its own (for a body being dropped).
    pub fn drain_in_background(self, body: Incoming) {
        tokio::spawn(self.drain_abandoned(body));
    }
}

/// A lease whose request is on the wire. If the handler is dropped before the response head
/// arrives (the client reset its HTTP/2 stream, or hung up), dropping the response future would
/// make hyper close an HTTP/1 connection: instead the head is awaited and the body drained in
/// the background (bounded), and the connection goes back to the pool. The lease keeps
/// counting against its client's share until then, so cancelling buys a client no extra room.
pub(super) struct Pending {
    pub(super) lease: Option<Lease>,
    pub(super) response: Option<pool::ResponseFuture>,
}

impl Pending {
    pub(super) fn new(lease: Lease) -> Pending {
        Pending {
            lease: Some(lease),
            response: None,
        }
    }

    pub(super) fn done(
        mut self,
        resp: Response<Incoming>,
    ) -> Result<(Response<Incoming>, Lease), SendFailure> {
        match self.lease.take() {
            Some(lease) => Ok((resp, lease)),
            None => Err((None, UpstreamError::QueueTimeout)),
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let (Some(response), Some(lease)) = (self.response.take(), self.lease.take()) else {
            return;
        };
        let http1 = lease.tx.as_ref().is_some_and(pool::Sender::is_http1);
        if !http1 || lease.private.is_some() {
            return;
        }
        let wait = lease.up.cfg.response_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(wait, response).await {
                Ok(Ok(resp)) => lease.drain_abandoned(resp.into_body()).await,
                _ => {
                    lease.up.stats.cancel_closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// What an abandoned response may still cost to keep its connection: nginx-like bounds.
const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for Lease {
    fn drop(&mut self) {
        if self.private.is_some() {
            // Dropping the sender lets hyper close the connection once its response is done.
            return;
        }
        let up = self.up.clone();
        let mut st = up.lock();
        let slots = &mut st.slots[self.server];
        slots.checkin(self.conn, self.tx.take(), self.reusable);
        debug_assert!(slots.busy > 0, "a lease given back twice");
        slots.busy = slots.busy.saturating_sub(1);
        release(&mut st, self.client);
        up.dispatch(&mut st);
    }
}

pub(super) fn release(st: &mut State, a: Asker) {
    fn down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize, super::queue::Hasher>, k: K) {
        if let Some(n) = map.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                map.remove(&k);
            }
        }
    }
    down(&mut st.busy_by_client, a.key.ip);
    down(&mut st.busy_by_conn, a.conn);
}

/// Holds a queued request's receiver: if the request gives up (timeout, client gone) after a
/// connection was already sent to it, the connection is given back instead of leaking.
pub(super) struct Waiting<'a> {
    pub(super) rx: oneshot::Receiver<Result<Granted, UpstreamError>>,
    pub(super) up: &'a Upstream,
    pub(super) client: Asker,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Ok(g)) = self.rx.try_recv() {
            let mut st = self.up.lock();
            self.up.ungrant(&mut st, self.client, g);
            self.up.dispatch(&mut st);
        }
    }
}
