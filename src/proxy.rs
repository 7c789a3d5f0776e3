//! ④ The proxy handler: one call per request. Route → rewrite headers → send upstream → relay
//! the response. This is the one place where errors become HTTP responses (`ProxyError`).

pub mod body;
pub mod headers;
pub mod route;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::conn::clock::{ConnActivity, InFlight};
use crate::upstream::pool::Sender;
use crate::upstream::{Lease, Upstream, UpstreamError};
use crate::Shared;
use body::{AccessLog, ProxyBody, UpstreamBody};

/// How long the response prefetch waits for body bytes after the head: short, so a streaming
/// response (server-sent events, long poll) is relayed almost at once. Up to `response_buffer`
/// bytes that come within it are read before the head is relayed: a body that ends within them
/// frees its origin connection before a slow client has read a byte, and a malformed one
/// (broken chunking, short body) becomes a clean 502 instead of a relayed error.
const PREFETCH_WAIT: Duration = Duration::from_millis(50);

/// Why a request got a response of Breakwater's own instead of the origin's.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("client over per_ip_request_rate")]
    RateLimited,
    #[error("request body slower than min_body_rate")]
    BodyTooSlow,
    #[error("upstream {upstream} server {server}: {error}")]
    Upstream {
        upstream: String,
        server: String,
        #[source]
        error: UpstreamError,
    },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Upstream { error, .. } => match error {
                UpstreamError::ConnectTimeout | UpstreamError::ResponseTimeout => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                UpstreamError::Connect(_)
                | UpstreamError::Handshake(_)
                | UpstreamError::Response(_) => StatusCode::BAD_GATEWAY,
                UpstreamError::ClientBody(e) if is_too_slow(e) => StatusCode::REQUEST_TIMEOUT,
                UpstreamError::ClientBody(_) => StatusCode::BAD_REQUEST,
                UpstreamError::QueueTimeout
                | UpstreamError::QueueFull
                | UpstreamError::NoHealthyServer => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// A short body that says what happened without exposing the origin's address.
    fn body(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "404 Not Found: no route for this host and path\n",
            ProxyError::RateLimited => "429 Too Many Requests: slow down\n",
            ProxyError::BodyTooSlow => "408 Request Timeout: the request body came too slowly\n",
            ProxyError::Upstream { error, .. } => match error {
                UpstreamError::ConnectTimeout => {
                    "504 Gateway Timeout: the origin did not accept the connection in time\n"
                }
                UpstreamError::ResponseTimeout => {
                    "504 Gateway Timeout: the origin did not answer in time\n"
                }
                UpstreamError::Connect(_) => "502 Bad Gateway: the origin is unreachable\n",
                UpstreamError::Handshake(_) | UpstreamError::Response(_) => {
                    "502 Bad Gateway: the origin sent no valid response\n"
                }
                UpstreamError::ClientBody(e) if is_too_slow(e) => {
                    "408 Request Timeout: the request body came too slowly\n"
                }
                UpstreamError::ClientBody(_) => "400 Bad Request: the request body broke off\n",
                UpstreamError::QueueTimeout => {
                    "503 Service Unavailable: the origin is busy, try again shortly\n"
                }
                UpstreamError::QueueFull => {
                    "503 Service Unavailable: too many requests waiting, try again shortly\n"
                }
                UpstreamError::NoHealthyServer => "503 Service Unavailable: the origin is down\n",
            },
        }
    }
}

fn is_too_slow(e: &hyper::Error) -> bool {
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<body::BodyTooSlow>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// The routing table and the upstreams, built once from the config.
#[derive(Debug)]
pub struct Proxy {
    pub router: route::Router,
    pub upstreams: Vec<Arc<Upstream>>,
    pub access_log: bool,
    pub ipv6_prefix: u8,
    pub request_buffer: usize,
    pub response_buffer: usize,
    pub min_body_rate: u64,
    /// Grace before `min_body_rate` applies.
    pub body_grace: Duration,
}

struct Relayed {
    head: http::response::Parts,
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    conn: Option<Lease>,
}

pub async fn handle(
    shared: Arc<Shared>,
    peer: SocketAddr,
    activity: Arc<ConnActivity>,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // Dropped with this future: if that happens before a response head exists, the client
    // cancelled the request (an HTTP/2 reset).
    let mut outcome = Outcome {
        activity: &activity,
        answered: false,
    };
    let mut log = AccessLog {
        enabled: shared.proxy.access_log,
        route: None,
        client: peer,
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        status: 0,
        upstream: None,
        server: None,
        start: Instant::now(),
    };
    let result = if shared.admission.check_request(peer.ip()) {
        forward(&shared.proxy, peer, &activity, req, &mut log).await
    } else {
        Err(ProxyError::RateLimited)
    };
    let resp = match result {
        Ok(r) => {
            log.status = r.head.status.as_u16();
            Response::from_parts(
                r.head,
                ProxyBody::origin(r.buffered, r.rest, r.conn, log, in_flight),
            )
        }
        Err(e) => {
            let status = e.status();
            match &e {
                ProxyError::NoRoute => {
                    tracing::debug!(client = %peer, path = %log.path, "no route")
                }
                // Counted and summarised once a second by the admission housekeeping.
                ProxyError::RateLimited => {}
                ProxyError::Upstream {
                    upstream,
                    server,
                    error,
                } => {
                    let sampled = log
                        .route
                        .map(|r| &shared.proxy.upstreams[shared.proxy.router.routes()[r].upstream])
                        .and_then(|u| u.request_failure_log.admit());
                    if let Some(n) = sampled {
                        tracing::warn!(client = %peer, upstream = %upstream, server = %server, error = %error,
                            status = status.as_u16(), failures = n, "upstream request failed");
                    }
                }
                ProxyError::BodyTooSlow => {
                    tracing::debug!(client = %peer, path = %log.path, "request body too slow")
                }
            }
            log.status = status.as_u16();
            let mut r = Response::new(ProxyBody::full(
                Bytes::from_static(e.body().as_bytes()),
                log,
                in_flight,
            ));
            *r.status_mut() = status;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    };
    outcome.answered = true;
    Ok(resp)
}

struct Outcome<'a> {
    activity: &'a ConnActivity,
    answered: bool,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        self.activity.request_done(self.answered);
    }
}

async fn forward(
    proxy: &Proxy,
    peer: SocketAddr,
    activity: &ConnActivity,
    mut req: Request<Incoming>,
    log: &mut AccessLog,
) -> Result<Relayed, ProxyError> {
    // An absolute-form target or an HTTP/2 :authority names the host; otherwise Host does.
    // Either way it only selects among configured routes: the request always goes to a
    // configured upstream, never to the host it names.
    let authority = match req.uri().authority() {
        Some(a) => Some(a.as_str().to_string()),
        None => req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string),
    };
    let host = authority.as_deref().map(route::host_only);
    let route = proxy
        .router
        .pick(host, req.uri().path())
        .ok_or(ProxyError::NoRoute)?;
    let upstream = &proxy.upstreams[proxy.router.routes()[route].upstream];
    log.upstream = Some(upstream.name.clone());
    log.route = Some(route);

    let client_version = req.version();
    let upgrade = if client_version == Version::HTTP_11 {
        headers::upgrade_request(req.headers())
    } else {
        None
    };
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    if authority.is_some() && parts.uri.authority().is_some() {
        // RFC 9112 §3.2.2: with an absolute-form target the Host header is replaced.
        parts.headers.remove(header::HOST);
    }
    headers::prepare_request(
        &mut parts.headers,
        &headers::Forwarded {
            client: peer.ip(),
            host: authority.as_deref(),
            proto: "http",
            version: headers::version_token(client_version),
            upgrade: upgrade.clone(),
        },
    );
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
    parts.version = Version::HTTP_11;
    let is_head = parts.method == http::Method::HEAD;

    if let (Some(client_upgrade), Some(up)) = (client_upgrade, upgrade) {
        return tunnel_request(
            upstream,
            parts,
            body,
            client_upgrade,
            up,
            activity,
            peer,
            log,
        )
        .await;
    }

    // Slow-POST guard: read up to request_buffer of the body before an origin connection is
    // taken, at no less than min_body_rate.
    let body = read_ahead(proxy, body).await?;
    let out = Request::from_parts(parts, body);
    let client = crate::admission::client_key(peer.ip(), proxy.ipv6_prefix);
    let (resp, lease) = upstream
        .send(client, out)
        .await
        .map_err(|(server, error)| ProxyError::Upstream {
            upstream: upstream.name.clone(),
            server: server.unwrap_or_else(|| "-".into()),
            error,
        })?;
    log.server = Some(lease.server().to_string());
    let (mut head, mut body) = resp.into_parts();
    headers::prepare_response(
        &mut head.headers,
        headers::version_token(head.version),
        None,
    );
    head.version = client_version;

    let (buffered, complete) = if is_head {
        (VecDeque::new(), true)
    } else {
        read_ahead_response(&mut body, proxy.response_buffer)
            .await
            .map_err(|e| ProxyError::Upstream {
                upstream: upstream.name.clone(),
                server: lease.server().to_string(),
                error: UpstreamError::Response(e),
            })?
    };
    if complete {
        // The origin's response is read whole: its connection is free before the client
        // has read a byte.
        lease.finish();
        return Ok(Relayed {
            head,
            buffered,
            rest: None,
            conn: None,
        });
    }
    Ok(Relayed {
        head,
        buffered,
        rest: Some(body),
        conn: Some(lease),
    })
}

/// Reads response frames that come within `PREFETCH_WAIT`, up to `limit` bytes. Returns them
/// and whether the body is complete (its end seen, or its last byte read: hyper reports a
/// Content-Length body as ended once that many bytes were yielded).
async fn read_ahead_response(
    body: &mut Incoming,
    limit: usize,
) -> Result<(VecDeque<Frame<Bytes>>, bool), hyper::Error> {
    let mut buffered = VecDeque::new();
    let deadline = tokio::time::Instant::now() + PREFETCH_WAIT;
    let mut size = 0;
    while size < limit && !body.is_end_stream() {
        // `frame()` is cancel-safe: dropping it before it completes loses no data.
        let next = tokio::select! {
            f = body.frame() => f,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        match next {
            Some(f) => {
                let f = f?;
                size += f.data_ref().map_or(0, |d| d.len());
                buffered.push_back(f);
            }
            None => return Ok((buffered, true)),
        }
    }
    Ok((buffered, body.is_end_stream()))
}

/// Reads the start of a request body (all of it when it fits `request_buffer`), requiring
/// `min_body_rate`. What did not fit streams on behind it at the same minimum rate.
async fn read_ahead(proxy: &Proxy, mut body: Incoming) -> Result<UpstreamBody, ProxyError> {
    if body.is_end_stream() {
        return Ok(UpstreamBody::empty());
    }
    let mut rate = body::MinRate::new(proxy.body_grace, proxy.min_body_rate);
    let mut buf = bytes::BytesMut::new();
    while buf.len() < proxy.request_buffer {
        let frame = match &rate {
            Some(r) => tokio::time::timeout_at(r.deadline(), body.frame())
                .await
                .map_err(|_| ProxyError::BodyTooSlow)?,
            None => body.frame().await,
        };
        match frame {
            None => return Ok(UpstreamBody::new(buf.freeze(), None, None)),
            // The client broke off: it is gone, and what it sent cannot be forwarded.
            Some(Err(_)) => return Err(ProxyError::BodyTooSlow),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    buf.extend_from_slice(d);
                    if let Some(r) = rate.as_mut() {
                        r.received += d.len() as u64;
                    }
                }
            }
        }
        if body.is_end_stream() {
            return Ok(UpstreamBody::new(buf.freeze(), None, None));
        }
    }
    Ok(UpstreamBody::new(buf.freeze(), Some(body), rate))
}

/// An Upgrade (WebSocket) request: sent on a dedicated origin connection, and on 101 both
/// sides are joined into a tunnel.
#[allow(clippy::too_many_arguments)]
async fn tunnel_request(
    upstream: &Upstream,
    parts: http::request::Parts,
    body: Incoming,
    client_upgrade: hyper::upgrade::OnUpgrade,
    up: HeaderValue,
    activity: &ConnActivity,
    peer: SocketAddr,
    log: &mut AccessLog,
) -> Result<Relayed, ProxyError> {
    let fail = |server: Option<String>, error| ProxyError::Upstream {
        upstream: upstream.name.clone(),
        server: server.unwrap_or_else(|| "-".into()),
        error,
    };
    let (mut tx, server, drive) = upstream
        .connect_dedicated()
        .await
        .map_err(|(s, e)| fail(s, e))?;
    tokio::spawn(drive);
    log.server = Some(server.clone());
    let req = Request::from_parts(parts, UpstreamBody::new(Bytes::new(), Some(body), None));
    if let Err(e) = tx.ready().await {
        return Err(fail(Some(server), UpstreamError::Response(e)));
    }
    let mut resp = tx.send(req).await.map_err(|e| {
        fail(
            Some(server.clone()),
            UpstreamError::Response(e.into_error()),
        )
    })?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let origin_upgrade = hyper::upgrade::on(&mut resp);
        activity.set_upgraded();
        tokio::spawn(tunnel(client_upgrade, origin_upgrade, tx, peer, server));
    }
    let (mut head, body) = resp.into_parts();
    let switching = head.status == StatusCode::SWITCHING_PROTOCOLS;
    let token = head.headers.get(header::UPGRADE).cloned().unwrap_or(up);
    headers::prepare_response(
        &mut head.headers,
        headers::version_token(head.version),
        switching.then_some(&token),
    );
    head.version = Version::HTTP_11;
    let rest = (!switching && !body.is_end_stream()).then_some(body);
    Ok(Relayed {
        head,
        buffered: VecDeque::new(),
        rest,
        conn: None,
    })
}

/// Relays bytes both ways once client and origin have both switched protocols.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    origin: hyper::upgrade::OnUpgrade,
    conn: Sender,
    peer: SocketAddr,
    server: String,
) {
    let (c, o) = tokio::join!(client, origin);
    // The origin connection's sender is no longer needed once its socket is upgraded.
    drop(conn);
    match (c, o) {
        (Ok(c), Ok(o)) => {
            let mut c = TokioIo::new(c);
            let mut o = TokioIo::new(o);
            match tokio::io::copy_bidirectional(&mut c, &mut o).await {
                Ok((up, down)) => {
                    tracing::debug!(client = %peer, server, up, down, "tunnel closed")
                }
                Err(e) => {
                    tracing::debug!(client = %peer, server, error = %e, "tunnel ended with an error")
                }
            }
        }
        (c, o) => {
            tracing::debug!(client = %peer, server, client_ok = c.is_ok(), origin_ok = o.is_ok(),
            "upgrade did not complete")
        }
    }
}
