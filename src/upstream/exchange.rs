//! The exchange: sending a request on a leased connection, the one retry on a pooled
//! connection that went stale (with the request head kept for it), panic mode, and private
//! connections (a PROXY header per client, WebSocket tunnels).

use std::future::Future;
use std::task::Poll;

use super::*;
use crate::timer::LazyDeadline;

/// A request that can be sent again if a reused connection turns out dead: idempotent, no body.
pub struct Replay(Parts);

/// Attempts of one request after its first failed on a stale connection (`send_again`).
const STALE_TRIES: u32 = 4;

/// The request to send again after `failed`, or the error to answer with: one never written
/// goes again as it is; an idempotent one with a replayable body goes again as `replay` kept
/// it if it failed on a reused connection before any response byte (the stale keep-alive race).
fn retryable(
    failed: Failed,
    reused: bool,
    replay: &Option<Replay>,
    replay_body: Option<UpstreamBody>,
) -> Result<Request<UpstreamBody>, UpstreamError> {
    match (failed.unsent, replay, replay_body) {
        (Some(req), _, _) => Ok(req),
        (None, Some(r), Some(body))
            if reused && matches!(failed.error, UpstreamError::Response(_)) =>
        {
            Ok(r.request(body))
        }
        _ => Err(failed.error),
    }
}

impl Replay {
    pub fn of(req: &Request<UpstreamBody>) -> Option<Replay> {
        let m = req.method();
        let idempotent = m == http::Method::GET
            || m == http::Method::HEAD
            || m == http::Method::OPTIONS
            || m == http::Method::TRACE
            || m == http::Method::PUT
            || m == http::Method::DELETE;
        if !idempotent || !req.body().is_replayable() {
            return None;
        }
        // Set part by part: the builder's checks (already passed) cost more than the copy.
        let mut r = Request::new(());
        *r.method_mut() = m.clone();
        *r.uri_mut() = req.uri().clone();
        *r.version_mut() = req.version();
        *r.headers_mut() = req.headers().clone();
        Some(Replay(r.into_parts().0))
    }

    fn request(&self, body: UpstreamBody) -> Request<UpstreamBody> {
        let mut r = Request::new(body);
        *r.method_mut() = self.0.method.clone();
        *r.uri_mut() = self.0.uri.clone();
        *r.version_mut() = self.0.version;
        *r.headers_mut() = self.0.headers.clone();
        r
    }
}

impl Upstream {
    /// Every server is ejected. Rather than answer 503 to everyone until the checks re-admit
    /// one, a trickle of real requests (one at a time) still goes to the server that failed
    /// least recently, on a connection of its own (Envoy's panic routing, rate-limited). An
    /// answer re-admits the server at once; the others get 503 as before.
    pub(super) async fn send_panic(
        &self,
        client: &Client,
        conn: u64,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), SendFailure> {
        let Ok(permit) = self.panic.clone().try_acquire_owned() else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        {
            // And at most one every PANIC_SPACING: a dead origin costs one connect attempt
            // per spacing, not one per client request.
            let mut next = self.panic_next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if now < *next {
                return Err((None, UpstreamError::NoHealthyServer));
            }
            *next = now + PANIC_SPACING;
        }
        let Some(server) =
            (0..self.servers.len()).min_by_key(|&i| self.servers[i].health.last_failure())
        else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        if !self.lock().slots[server].take_connect_token(self.cfg.max_connect_rate) {
            self.stats.paced_connects.fetch_add(1, Ordering::Relaxed);
            return Err((None, UpstreamError::NoHealthyServer));
        }
        self.stats.panic_requests.fetch_add(1, Ordering::Relaxed);
        let addr = self.servers[server].addr.clone();
        let preface = if self.private.is_some() {
            self.client_preface(client)
        } else {
            self.local_preface()
        };
        let (tx, drive) =
            match pool::connect(&addr, self.cfg.protocol, self.cfg.connect_timeout, &preface).await
            {
                Ok(c) => c,
                Err(e) => return Err((Some(addr), e)),
            };
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive);
        let lease = self.private_lease(server, tx, client, conn, permit);
        let mut pending = Pending::new(lease);
        match self.exchange(&mut pending, req).await {
            Ok(resp) => {
                if self.servers[server].health.readmit() == Transition::Readmitted {
                    self.readmitted(server, "it answered a request while every server was down");
                }
                pending.done(resp)
            }
            Err(f) => Err((Some(addr), f.error)),
        }
    }

    /// Sends a request and waits for its response head. A request that was never written, or
    /// an idempotent replayable one that failed on a reused connection before any response
    /// byte (the stale keep-alive race), is tried once more.
    ///
    /// An `async` block rather than an `async fn`, here and in `exchange`: an `async fn` keeps
    /// each argument twice in its future (as it came and as its local), and the request is
    /// 368 bytes; each future is moved whole into the one that awaits it, every request.
    // Not an `async fn` on purpose: see above.
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        client: &'a Client,
        conn: u64,
        req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), SendFailure>> + 'a {
        async move {
            if !self.servers.iter().any(|s| s.health.is_healthy()) {
                // Boxed, as is `send_private`: rare paths whose state would otherwise size (and be moved
                // with) every request's future.
                return Box::pin(self.send_panic(client, conn, req)).await;
            }
            if let Some(private) = &self.private {
                return Box::pin(self.send_private(private.clone(), client, conn, req)).await;
            }
            let client = Asker {
                key: client.key,
                conn,
            };
            let replay = if self.cfg.retry_idempotent {
                Replay::of(&req)
            } else {
                None
            };
            let replay_body = req.body().replay();
            let lease = self.acquire(client).await.map_err(|e| (None, e))?;
            let server = lease.server;
            let reused = lease.reused;
            let mut pending = Pending::new(lease);
            let failed = match self.exchange(&mut pending, req).await {
                Ok(resp) => return pending.done(resp),
                Err(f) => f,
            };
            drop(pending);
            let again = match retryable(failed, reused, &replay, replay_body) {
                Ok(req) => req,
                Err(error) => {
                    let addr = self.servers[server].addr.clone();
                    return Err((Some(addr), error));
                }
            };
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %self.name, server = %self.servers[server].addr,
            "origin connection failed before answering; retrying");
            Box::pin(self.send_again(client, again, replay)).await
        }
    }

    /// The retries of `send`, in a future of their own: boxed there, their state is paid only
    /// by the requests that retry, not carried in every request's future. (Each try repeats
    /// `send`'s first one, lease to exchange, on purpose: as a shared async helper that try
    /// cost every request ~800 instructions more, in its own state machine and moves.) Every pooled
    /// connection can go stale at the same moment (an origin that restarts, or closes idle
    /// connections, closes them all, and the pool learns of each close only once its driver
    /// has read it), so a retry that meets another stale one tries again, `STALE_TRIES`
    /// attempts in all; a failure on a fresh connection, or after a response byte, is the
    /// answer.
    pub(super) async fn send_again(
        &self,
        client: Asker,
        mut again: Request<UpstreamBody>,
        replay: Option<Replay>,
    ) -> Result<(Response<Incoming>, Lease), SendFailure> {
        let mut tries = 1;
        loop {
            let replay_body = again.body().replay();
            let lease = self.acquire(client).await.map_err(|e| (None, e))?;
            let addr = lease.server_name();
            let reused = lease.reused;
            let mut pending = Pending::new(lease);
            let failed = match self.exchange(&mut pending, again).await {
                Ok(resp) => return pending.done(resp),
                Err(f) => f,
            };
            drop(pending);
            if tries == STALE_TRIES {
                return Err((Some(addr), failed.error));
            }
            again = retryable(failed, reused, &replay, replay_body)
                .map_err(|error| (Some(addr.clone()), error))?;
            tries += 1;
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %self.name, server = %addr,
                "origin connection failed before answering again; retrying");
        }
    }

    // Not an `async fn` on purpose: its request would be kept twice (see `send`).
    #[allow(clippy::manual_async_fn)]
    pub(super) fn exchange<'a>(
        &'a self,
        pending: &'a mut Pending,
        req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, Failed>> + 'a {
        async move {
            let Some(lease) = pending.lease.as_mut() else {
                return Err(Failed {
                    error: UpstreamError::QueueTimeout,
                    unsent: Some(req),
                });
            };
            let server = lease.server;
            let reused = lease.reused;
            let Some(tx) = lease.tx.as_mut() else {
                return Err(Failed {
                    error: UpstreamError::QueueTimeout,
                    unsent: Some(req),
                });
            };
            // A pooled connection can close between checkout and use; `ready` says so without
            // consuming the request.
            if let Err(e) = tx.ready().await {
                return Err(Failed {
                    error: UpstreamError::Response(e),
                    unsent: Some(req),
                });
            }
            let deadline = tokio::time::Instant::now() + self.cfg.response_timeout;
            let response = pending.response.insert(tx.send(req));
            let sent = match tx {
                // The connection's own timer, moved only when it fires early (`timer.rs`): a
                // `timeout` per exchange was ~600 instructions of a keep-alive request.
                pool::Sender::H1(_, timer) => {
                    let timer = timer.get_or_insert_with(|| LazyDeadline::new(deadline));
                    std::future::poll_fn(|cx| match response.as_mut().poll(cx) {
                        Poll::Ready(r) => Poll::Ready(Some(r)),
                        Poll::Pending => timer.poll_passed(cx, deadline).map(|()| None),
                    })
                    .await
                }
                pool::Sender::H2(_) => tokio::time::timeout_at(deadline, response).await.ok(),
            };
            pending.response = None;
            let result = match sent {
                None => Err(Failed {
                    error: UpstreamError::ResponseTimeout,
                    unsent: None,
                }),
                Some(Ok(resp)) => Ok(resp),
                Some(Err(mut e)) => {
                    let unsent = e.take_message();
                    let err = e.into_error();
                    let error = if err.is_user() {
                        UpstreamError::ClientBody(err)
                    } else {
                        UpstreamError::Response(err)
                    };
                    Err(Failed { error, unsent })
                }
            };
            match &result {
                Ok(_) => self.record(server, true, false),
                // A stale pooled connection or a client's broken body says nothing about the server.
                Err(f)
                    if f.unsent.is_some()
                        || reused
                        || matches!(f.error, UpstreamError::ClientBody(_)) => {}
                Err(_) => self.record(server, false, false),
            }
            result
        }
    }

    /// A dedicated HTTP/1.1 connection outside the pool, for a request that upgrades (a
    /// WebSocket tunnel holds its socket for good).
    pub async fn connect_dedicated(
        &self,
        client: &Client,
    ) -> Result<
        (
            Sender,
            Arc<str>,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        SendFailure,
    > {
        let order = self.order(&self.lock());
        let Some(&server) = order.first() else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        let addr = self.servers[server].addr.clone();
        let preface = self.client_preface(client);
        match pool::connect(
            &addr,
            UpstreamProtocol::Http1,
            self.cfg.connect_timeout,
            &preface,
        )
        .await
        {
            Ok((tx, drive)) => Ok((tx, addr, drive)),
            Err(e) => Err((Some(addr), e)),
        }
    }

    /// The PROXY header for a connection no client caused (warm, health check): LOCAL.
    pub(super) fn local_preface(&self) -> Vec<u8> {
        self.cfg.send_proxy_protocol.map_or_else(Vec::new, |v| {
            proxy_protocol::encode(v, None, std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
        })
    }

    /// The PROXY header naming `client`, with `send_proxy_protocol`.
    pub(super) fn client_preface(&self, client: &Client) -> Vec<u8> {
        self.cfg.send_proxy_protocol.map_or_else(Vec::new, |v| {
            proxy_protocol::encode(
                v,
                Some(std::net::SocketAddr::new(client.addr, client.peer.port())),
                client.local,
            )
        })
    }

    /// `send_proxy_protocol`: a PROXY header names one client per connection, and a pooled
    /// connection carries many clients' requests, so it would name the wrong one for all but
    /// the first. Each request therefore gets a connection of its own, opened with its
    /// client's header and closed after its response. Those connections stay bounded by
    /// `pool_max` per server (waiting up to `queue_timeout` for one, FIFO); the price is an
    /// origin handshake per request, which is why this is opt-in and X-Forwarded-For is the
    /// default way to tell the origin who the client is.
    pub(super) async fn send_private(
        &self,
        permits: Arc<tokio::sync::Semaphore>,
        client: &Client,
        conn: u64,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Lease), SendFailure> {
        let queued_at = Instant::now();
        let permit =
            match tokio::time::timeout(self.cfg.queue_timeout, permits.acquire_owned()).await {
                Ok(Ok(p)) => p,
                _ => {
                    self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Err((None, UpstreamError::QueueTimeout));
                }
            };
        self.stats
            .queue_wait
            .observe(queued_at.elapsed().as_secs_f64());
        let Some(&server) = self.order(&self.lock()).first() else {
            return Err((None, UpstreamError::NoHealthyServer));
        };
        let addr = self.servers[server].addr.clone();
        let preface = self.client_preface(client);
        let (tx, drive) =
            match pool::connect(&addr, self.cfg.protocol, self.cfg.connect_timeout, &preface).await
            {
                Ok(c) => c,
                Err(e) => {
                    self.record(server, false, false);
                    return Err((Some(addr), e));
                }
            };
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive);
        let lease = self.private_lease(server, tx, client, conn, permit);
        let mut pending = Pending::new(lease);
        match self.exchange(&mut pending, req).await {
            Ok(resp) => pending.done(resp),
            Err(f) => Err((Some(addr), f.error)),
        }
    }

    /// A lease on a connection opened for one request (panic mode, `send_proxy_protocol`):
    /// outside the pool, closed when the lease ends; `permit` bounds how many exist.
    pub(super) fn private_lease(
        &self,
        server: usize,
        tx: Sender,
        client: &Client,
        conn: u64,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Lease {
        Lease {
            up: self.arc(),
            server,
            conn: 0,
            tx: Some(tx),
            client: Asker {
                key: client.key,
                conn,
            },
            reused: false,
            reusable: false,
            private: Some(permit),
        }
    }
}
