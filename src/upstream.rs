//! ⑤ Upstreams: the configured origin servers, how a server is picked, and sending a request
//! over a pooled connection with the connect and response timeouts and the one safe retry.

pub mod pool;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::config::UpstreamConfig;
use crate::proxy::body::UpstreamBody;
use pool::{Conn, Pool};

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub servers: Vec<Server>,
    next: AtomicUsize,
    connect_timeout: Duration,
    response_timeout: Duration,
}

#[derive(Debug)]
pub struct Server {
    pub addr: String,
    pub pool: Arc<Pool>,
}

/// Why an upstream exchange failed. Every variant is the origin's fault (or the path to it);
/// `proxy.rs` maps them to 502 or 504.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("HTTP handshake failed: {0}")]
    Handshake(#[source] hyper::Error),
    #[error("no response head within the response timeout")]
    ResponseTimeout,
    #[error("bad or missing response: {0}")]
    Response(#[source] hyper::Error),
}

/// A request that can be sent again if a reused connection turns out dead: idempotent, no body.
pub struct Replay(Parts);

impl Replay {
    pub fn of(req: &Request<UpstreamBody>) -> Option<Replay> {
        let m = req.method();
        let idempotent = m == http::Method::GET
            || m == http::Method::HEAD
            || m == http::Method::OPTIONS
            || m == http::Method::TRACE
            || m == http::Method::PUT
            || m == http::Method::DELETE;
        if !idempotent || !http_body::Body::is_end_stream(req.body()) {
            return None;
        }
        let mut b = Request::builder()
            .method(m.clone())
            .uri(req.uri().clone())
            .version(req.version());
        if let Some(h) = b.headers_mut() {
            *h = req.headers().clone();
        }
        b.body(()).ok().map(|r| Replay(r.into_parts().0))
    }

    fn request(&self) -> Request<UpstreamBody> {
        let mut r = Request::new(UpstreamBody::empty());
        *r.method_mut() = self.0.method.clone();
        *r.uri_mut() = self.0.uri.clone();
        *r.version_mut() = self.0.version;
        *r.headers_mut() = self.0.headers.clone();
        r
    }
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig) -> Upstream {
        Upstream {
            name: cfg.name.clone(),
            servers: cfg
                .servers
                .iter()
                .map(|addr| Server {
                    addr: addr.clone(),
                    pool: Pool::new(cfg.pool_max_idle, cfg.pool_idle_timeout),
                })
                .collect(),
            next: AtomicUsize::new(0),
            connect_timeout: cfg.connect_timeout,
            response_timeout: cfg.response_timeout,
        }
    }

    /// Round robin over the servers.
    pub fn pick(&self) -> &Server {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.servers.len();
        &self.servers[i]
    }

    /// Sends `req` to `server` and waits for the response head. `fresh` forces a new connection
    /// (upgrades take theirs over for good). A request that never left, or an idempotent,
    /// bodiless one that failed on a reused connection before any response byte, is tried once
    /// more on a fresh connection.
    pub async fn send(
        &self,
        server: &Server,
        req: Request<UpstreamBody>,
        fresh: bool,
    ) -> Result<(Response<Incoming>, Conn), UpstreamError> {
        let replay = Replay::of(&req);
        let conn = match (fresh, server.pool.checkout()) {
            (false, Some(c)) => c,
            _ => {
                server
                    .pool
                    .connect(&server.addr, self.connect_timeout)
                    .await?
            }
        };
        match self.exchange(conn, req).await {
            Ok(done) => Ok(done),
            Err(Failed {
                error,
                unsent,
                reused,
            }) => {
                let again = match (unsent, &replay) {
                    (Some(req), _) => req,
                    (None, Some(r)) if reused && matches!(error, UpstreamError::Response(_)) => {
                        r.request()
                    }
                    _ => return Err(error),
                };
                tracing::debug!(upstream = %self.name, server = %server.addr, error = %error,
                    "reused origin connection failed; retrying on a fresh one");
                let conn = server
                    .pool
                    .connect(&server.addr, self.connect_timeout)
                    .await?;
                self.exchange(conn, again).await.map_err(|f| f.error)
            }
        }
    }

    async fn exchange(
        &self,
        mut conn: Conn,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Conn), Failed> {
        let reused = conn.reused;
        // A pooled connection can close between checkout and use; `ready` reports that
        // without consuming the request.
        if let Err(e) = conn.tx.ready().await {
            return Err(Failed {
                error: UpstreamError::Response(e),
                unsent: Some(req),
                reused,
            });
        }
        let sent = tokio::time::timeout(self.response_timeout, conn.tx.try_send_request(req)).await;
        match sent {
            Err(_) => Err(Failed {
                error: UpstreamError::ResponseTimeout,
                unsent: None,
                reused,
            }),
            Ok(Ok(resp)) => Ok((resp, conn)),
            Ok(Err(mut e)) => {
                let unsent = e.take_message();
                Err(Failed {
                    error: UpstreamError::Response(e.into_error()),
                    unsent,
                    reused,
                })
            }
        }
    }
}

struct Failed {
    error: UpstreamError,
    /// The request back, when hyper never wrote it.
    unsent: Option<Request<UpstreamBody>>,
    reused: bool,
}
