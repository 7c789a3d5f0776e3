//! ④ The proxy handler: one call per request. Route → rewrite headers → send upstream → relay
//! the response. Errors become HTTP responses here, by the table in `proxy/error.rs`.
//!
//! Why this file is long (~745 lines): it is the request's whole path (room gate, route,
//! rewrite, read-ahead, send, relay), whose steps share the `Relayed` type and the access-log
//! line. Already split out: headers, target, route, body, activity, spool (slow readers),
//! tunnel (WebSocket) and error (the status table).

pub mod activity;
pub mod body;
mod error;
pub mod headers;
pub mod route;
pub mod spool;
pub mod stats;
mod tunnel;

use std::borrow::Cow;
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

use crate::client::Client;
use crate::target;
use crate::upstream::{Lease, Upstream, UpstreamError};
use activity::{ConnActivity, InFlight};
use body::{AccessLog, ProxyBody, UpstreamBody};
pub use error::ProxyError;
use tunnel::{tunnel_request, Tunnel};

/// What a connection holds that a WebSocket tunnel made from it must keep after hyper hands
/// the socket over: its admission slots (per-IP and global caps, the fd budget; held here as an
/// opaque guard, since the proxy only keeps them alive) and its place in the shutdown drain
/// (the receiver). Shared by the connection task and its tunnel; the last one to end gives them
/// back.
pub struct ConnHold {
    /// Unique per client connection in this process (`max_connection_share` counts by it).
    pub id: u64,
    pub client: Client,
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The connection came in over TLS (X-Forwarded-Proto: https).
    pub tls: bool,
    pub slots: Box<dyn std::any::Any + Send + Sync>,
    /// The client's address as a header value (X-Forwarded-For), made at the connection's
    /// first request and shared by the rest.
    pub client_value: std::sync::OnceLock<Option<HeaderValue>>,
}

impl ConnHold {
    /// A fresh connection id.
    pub fn next_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn client_value(&self) -> Option<HeaderValue> {
        self.client_value
            .get_or_init(|| headers::ip_value(self.client.addr))
            .clone()
    }
}

impl std::fmt::Debug for ConnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHold")
            .field("client", &self.client)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// How long the response prefetch waits for body bytes after the head: short, so a streaming
/// response (server-sent events, long poll) is relayed almost at once. Up to `response_buffer`
/// bytes that come within it are read before the head is relayed: a body that ends within them
/// frees its origin connection before a slow client has read a byte, and a malformed one
/// (broken chunking, short body) becomes a clean 502 instead of a relayed error.
const PREFETCH_WAIT: Duration = Duration::from_millis(50);

/// The routing table and the upstreams, built once from the config.
#[derive(Debug)]
pub struct Proxy {
    pub router: route::Router,
    pub upstreams: Vec<Arc<Upstream>>,
    pub access_log: bool,
    /// Query strings in the access log (they can carry tokens; off by default).
    pub access_log_query: bool,
    pub request_buffer: usize,
    pub response_buffer: usize,
    pub min_body_rate: u64,
    /// Grace before `min_body_rate` applies.
    pub body_grace: Duration,
    /// This instance's Via pseudonym and the entries made from it.
    pub via: headers::Via,
    /// How long a tunnel may outlive the start of a shutdown.
    pub shutdown_grace: Duration,
    /// `[http] trusted_proxies`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Response spooling for slow clients (`spool.rs`): this generation's settings, and the
    /// process-wide budget.
    pub spool: spool::Settings,
    pub spooler: Arc<spool::Spooler>,
    /// `request_buffer_budget`: what all read-ahead buffers may hold together (process-wide).
    pub request_budget: Arc<crate::upstream::body::ByteBudget>,
    /// `[[waiting_room]]`s, in config order (the first that matches a request takes it).
    pub rooms: Vec<Arc<crate::room::Room>>,
    /// Request counts by this generation's routes.
    pub requests: Arc<stats::RequestMetrics>,
    /// Admission's per-request side (the forwarded client's key, the request rate).
    pub gate: Arc<dyn crate::client::RequestGate>,
    /// True from the shutdown signal on: HTTP/1 responses then carry `Connection: close`.
    /// Read by every request, so a plain flag: a watch's `borrow` takes a read lock whose
    /// count every core's requests would write to (`conn::Server::signal` sets both).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

struct Relayed {
    head: http::response::Parts,
    buffered: VecDeque<Frame<Bytes>>,
    rest: Option<Incoming>,
    conn: Option<Lease>,
    spooled: Option<spool::Spooled>,
    /// The origin's waiting-room command, taken out of `head` (`prepare_response`).
    command: Option<HeaderValue>,
}

fn request_id_text(id: &HeaderValue) -> String {
    id.to_str().unwrap_or("-").to_string()
}

pub async fn handle(
    proxy: Arc<Proxy>,
    activity: Arc<ConnActivity>,
    hold: Arc<ConnHold>,
    in_flight: InFlight,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    // Dropped with this future: if that happens before a response head exists, the client
    // cancelled the request (an HTTP/2 reset).
    let mut outcome = Outcome {
        activity: &activity,
        answered: None,
    };
    // The connection's client, unless it is a proxy we trust, which names the real one.
    let conn_client = hold.client;
    let trusted = proxy
        .trusted_proxies
        .iter()
        .any(|n| n.contains(&conn_client.addr));
    let client_version_h1 = req.version() <= Version::HTTP_11;
    let client = trusted
        .then(|| headers::forwarded_client(req.headers(), &proxy.trusted_proxies))
        .flatten()
        .map_or(conn_client, |ip| Client {
            local: conn_client.local,
            ..proxy.gate.client(conn_client.peer, ip)
        });
    let peer = SocketAddr::new(client.addr, conn_client.peer.port());
    let enabled = proxy.access_log;
    // Only what the log line needs, and only when there is a log line.
    let text = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map_or(String::new(), |v| v.chars().take(256).collect())
    };
    let mut log = AccessLog {
        enabled,
        route: None,
        client: peer,
        method: req.method().clone(),
        // Also in the debug lines about a refused request; not copied when nothing reads it.
        path: if enabled || tracing::enabled!(tracing::Level::DEBUG) {
            req.uri().path().to_string()
        } else {
            String::new()
        },
        status: 0,
        upstream: None,
        server: None,
        start: Instant::now(),
        host: if enabled {
            req.uri()
                .authority()
                .map_or_else(|| text(header::HOST), |a| a.as_str().to_string())
        } else {
            String::new()
        },
        version: headers::version_token(req.version()),
        user_agent: if enabled {
            text(header::USER_AGENT)
        } else {
            String::new()
        },
        // Set below, once the waiting room has passed the request on (a waiter answered
        // from memory needs no id unless a log line names it).
        request_id: String::new(),
        query: if enabled && proxy.access_log_query {
            req.uri().query().map(str::to_string)
        } else {
            None
        },
        bytes_in: req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0),
        metrics: Some(proxy.requests.clone()),
    };
    let allowed = proxy.gate.check_request(&client);
    // The waiting room stands between an admitted request and the pool.
    let mut seated = None;
    if allowed && !proxy.rooms.is_empty() {
        match room_gate(&proxy.rooms, &req, &client, hold.tls) {
            Gate::Through(s) => seated = s,
            Gate::Answered(answer) => {
                if enabled {
                    log.request_id = request_id_text(&headers::request_id(req.headers(), trusted));
                }
                let (mut head, bytes) = answer.into_parts();
                log.status = head.status.as_u16();
                if proxy.draining.load(std::sync::atomic::Ordering::Relaxed) && client_version_h1 {
                    head.headers
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                outcome.answered = Some(false);
                return Ok(Response::from_parts(
                    head,
                    ProxyBody::full(bytes, log, in_flight),
                ));
            }
        }
    }
    let request_id = headers::request_id(req.headers(), trusted);
    if enabled {
        log.request_id = request_id_text(&request_id);
    }
    // Room, at once, for the request id and what `prepare_request` adds (X-Forwarded-For/
    // -Proto/-Host, Via): the map hyper parsed is sized for the client's headers, and growing
    // it one insert at a time reallocated it up to three times per request.
    req.headers_mut().reserve(6);
    // A `HeaderName`: a `&str` name that is not a standard header is copied on every insert.
    req.headers_mut().insert(headers::X_REQUEST_ID, request_id);
    let result = if allowed {
        // Boxed: hyper keeps a box the size of this future for each HTTP/1 connection, from
        // its start and while it idles between requests; with `forward`'s future inline that
        // was 4.5 KB a connection, now ~1.3 KB, and its ~1.9 KB exist only while a request
        // runs. Boxed before the match: a match keeps its scrutinee through its arms, and
        // this future's state would then hold the unboxed future too.
        match forward(&proxy, client, trusted, &activity, &hold, req, &mut log).map(Box::pin) {
            Ok(sending) => sending.await,
            Err(e) => Err(e),
        }
    } else {
        Err(ProxyError::RateLimited)
    };
    let draining = proxy.draining.load(std::sync::atomic::Ordering::Relaxed);
    let from_origin = result.is_ok();
    let resp = match result {
        Ok(mut r) => {
            // The origin may end a shopper's session (`Breakwater-Room: revoke`); the header
            // is Breakwater's, never the client's.
            if let Some(cmd) = r.command.take() {
                if let Some(Seated {
                    room,
                    session: Some(id),
                    ..
                }) = &seated
                {
                    if cmd.as_bytes().eq_ignore_ascii_case(b"revoke") {
                        room.revoke(*id);
                    }
                }
            }
            if let Some(Seated {
                set_cookie: Some(c),
                ..
            }) = seated.take()
            {
                r.head.headers.append(header::SET_COOKIE, c);
            }
            log.status = r.head.status.as_u16();
            let body = match r.spooled {
                Some(s) => ProxyBody::spooled(r.buffered, s, log, in_flight),
                None => ProxyBody::origin(r.buffered, r.rest, r.conn, log, in_flight),
            };
            Response::from_parts(r.head, body)
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
                        .map(|r| &proxy.upstreams[proxy.router.routes()[r].upstream])
                        .and_then(|u| u.request_failure_log.admit());
                    if let Some(n) = sampled {
                        tracing::warn!(client = %peer, upstream = %upstream, server = %server, error = %error,
                            status = status.as_u16(), failures = n, "upstream request failed");
                    }
                }
                ProxyError::BodyTooSlow => {
                    tracing::debug!(client = %peer, path = %log.path, "request body too slow")
                }
                // Counted in breakwater_request_buffer_refused_total.
                ProxyError::Busy => {}
                ProxyError::BadBody
                | ProxyError::BadTarget(_)
                | ProxyError::MethodNotAllowed
                | ProxyError::Loop => {
                    tracing::debug!(client = %peer, path = %log.path, error = %e, "bad request")
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
            if status == StatusCode::METHOD_NOT_ALLOWED {
                r.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
                );
            }
            r
        }
    };
    outcome.answered = Some(from_origin);
    let mut resp = resp;
    if draining && client_version_h1 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // hyper closes an HTTP/1 connection after a response that says so: the client
        // reconnects, to an instance that is not going away.
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// A request the waiting room let through: its room, the shopper's session, and a pass cookie
/// to set on the response when one was just minted.
struct Seated {
    room: Arc<crate::room::Room>,
    session: Option<u64>,
    set_cookie: Option<HeaderValue>,
}

enum Gate {
    Through(Option<Seated>),
    Answered(Response<Bytes>),
}

/// The first room covering the request decides; a request no room covers goes through. The
/// host and path are read the way routing reads them (a request they do not parse goes on and
/// gets its 400 from `forward`).
fn room_gate(
    rooms: &[Arc<crate::room::Room>],
    req: &Request<Incoming>,
    client: &Client,
    tls: bool,
) -> Gate {
    let Ok(path) = target::normalize_path(req.uri().path()) else {
        return Gate::Through(None);
    };
    let Ok(host) = request_host(req) else {
        return Gate::Through(None);
    };
    let host = host.as_ref().map(|h| h.route_name());
    let Some(room) = rooms.iter().find(|r| r.matches(host, &path)) else {
        return Gate::Through(None);
    };
    match room.check(
        req.headers(),
        &path,
        req.uri().query(),
        client.addr,
        client.key.ip,
        tls,
    ) {
        crate::room::Verdict::Pass {
            session,
            set_cookie,
        } => Gate::Through(Some(Seated {
            room: room.clone(),
            session,
            set_cookie,
        })),
        crate::room::Verdict::Answer(r) => Gate::Answered(r),
    }
}

struct Outcome<'a> {
    activity: &'a ConnActivity,
    /// Some(true): the origin answered; Some(false): Breakwater did (404, 429, 503...); None:
    /// the client cancelled first.
    answered: Option<bool>,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        self.activity.request_done(self.answered);
    }
}

/// Checks, routes and rewrites the request at once, and returns the future that sends it and
/// reads the start of the response. Split so: the checks and the rewrite never wait, and the
/// future (boxed by `handle`, and moved whole into its box every request) then holds only
/// what the sending needs, not the request as it came, its parsed host and path and the
/// arguments twice over, as an `async fn` did (3.3 KB).
#[allow(clippy::too_many_arguments)]
fn forward<'a>(
    proxy: &'a Proxy,
    client: Client,
    trusted: bool,
    activity: &'a Arc<ConnActivity>,
    hold: &Arc<ConnHold>,
    mut req: Request<Incoming>,
    log: &'a mut AccessLog,
) -> Result<impl std::future::Future<Output = Result<Relayed, ProxyError>> + 'a, ProxyError> {
    // CONNECT asks for a raw tunnel to a host the client names: never served here (the
    // origin's 2xx would take a pooled connection while the client gets nothing).
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    if headers::via_names(req.headers(), &proxy.via.name) {
        return Err(ProxyError::Loop);
    }
    let host = request_host(&req)?;
    let path = target::normalize_path(req.uri().path()).map_err(ProxyError::BadTarget)?;
    if path == "*" && req.method() != http::Method::OPTIONS {
        return Err(ProxyError::BadTarget(target::BadTarget::InvalidPath));
    }
    // OPTIONS * is about the server: it goes where "/" would.
    let route_path = if path == "*" { "/" } else { &path };
    // Routing only selects among configured routes: the request always goes to a configured
    // upstream, never to the host it names.
    let route = proxy
        .router
        .pick(host.as_ref().map(|h| h.route_name()), route_path)
        .ok_or(ProxyError::NoRoute)?;
    if !proxy.router.routes()[route].allow_encoded_slashes && target::has_encoded_slash(&path) {
        return Err(ProxyError::BadTarget(target::BadTarget::EncodedSlash));
    }
    let upstream = &proxy.upstreams[proxy.router.routes()[route].upstream];
    log.upstream = Some(upstream.name.clone());
    log.route = Some(route);

    // The origin gets the path routing matched, so its own normalisation cannot take the
    // request anywhere else. A request line already in origin form and normal form goes on
    // as it came (no copy); anything else is rebuilt from the normalised path and the query.
    let rebuilt = match (&path, req.uri().authority()) {
        (Cow::Borrowed(_), None) => None,
        _ => Some(match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.into_owned(),
        }),
    };

    let client_version = req.version();
    // Only a real WebSocket handshake (GET, no body) opens a tunnel; any other Upgrade is
    // stripped with the hop-by-hop headers and the request uses the pool like any other.
    let websocket = client_version == Version::HTTP_11
        && req.method() == http::Method::GET
        && req.body().is_end_stream()
        && headers::is_websocket_upgrade(req.headers());
    // The Host the origin is sent: the client's own field when it is already in that form
    // (shared, not copied), else written out. Taken before `upgrade::on` borrows the request
    // mutably: `host` borrows the field.
    let host_as_sent =
        req.uri().authority().is_none() && host.as_ref().is_some_and(|h| h.canonical);
    let host_value = match (&host, host_as_sent) {
        (Some(_), true) => req.headers().get(header::HOST).cloned(),
        (Some(h), false) => HeaderValue::from_str(&h.header_value()).ok(),
        (None, _) => None,
    };
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    headers::join_cookies(&mut parts.headers);
    headers::prepare_request(
        &mut parts.headers,
        &headers::Forwarded {
            client: hold.client_value(),
            trusted,
            host: host_value,
            host_as_sent,
            proto: if hold.tls { "https" } else { "http" },
            version: headers::version_token(client_version),
            via: &proxy.via,
            upgrade: websocket.then(|| HeaderValue::from_static("websocket")),
        },
    );
    if let Some(forwarded) = rebuilt {
        parts.uri = Uri::try_from(forwarded)
            .map_err(|_| ProxyError::BadTarget(target::BadTarget::InvalidPath))?;
    }
    parts.version = Version::HTTP_11;
    let is_head = parts.method == http::Method::HEAD;

    let tunnel = match client_upgrade {
        Some(client_upgrade) => {
            let slot = upstream
                .tunnels
                .try_take(client.key.ip)
                .ok_or(ProxyError::Upstream {
                    upstream: upstream.name.clone(),
                    server: "-".into(),
                    error: UpstreamError::TooManyTunnels,
                })?;
            // Boxed: only a WebSocket handshake has one; inline, it would size every request's
            // future.
            Some(Box::new(Tunnel {
                client_upgrade,
                slot,
                hold: hold.clone(),
                grace: proxy.shutdown_grace,
                peer: client.peer,
                client,
            }))
        }
        None => None,
    };
    let conn_id = hold.id;
    Ok(async move {
        if let Some(tunnel) = tunnel {
            // Boxed for the same reason.
            return Box::pin(tunnel_request(
                upstream, parts, body, *tunnel, activity, &proxy.via, log,
            ))
            .await;
        }

        // Slow-POST guard: read up to request_buffer of the body before an origin connection is
        // taken, at no less than min_body_rate.
        let body = read_ahead(proxy, body).await?;
        let (resp, lease) = upstream
            .send(&client, conn_id, Request::from_parts(parts, body))
            .await
            .map_err(|(server, error)| ProxyError::Upstream {
                upstream: upstream.name.clone(),
                server: server.unwrap_or_else(|| "-".into()),
                error,
            })?;
        log.server = Some(lease.server_name());
        let (mut head, mut body) = resp.into_parts();
        let command = headers::prepare_response(
            &mut head.headers,
            headers::version_token(head.version),
            &proxy.via,
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
                    server: lease.server_name(),
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
                spooled: None,
                command,
            });
        }
        // The rest is longer than the read-ahead: spool it, so a client slower than the origin
        // does not hold the origin connection (a stream meant to be read live is relayed as is).
        if proxy.spool.per_response > 0 && !spool::is_streaming(&head.headers) {
            if proxy.spooler.has_room() {
                let spooled = spool::start(
                    &proxy.spool,
                    proxy.spooler.clone(),
                    activity.clone(),
                    body,
                    lease,
                );
                return Ok(Relayed {
                    head,
                    buffered,
                    rest: None,
                    conn: None,
                    spooled: Some(spooled),
                    command,
                });
            }
            proxy
                .spooler
                .exhausted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Relayed {
            head,
            buffered,
            rest: Some(body),
            conn: Some(lease),
            spooled: None,
            command,
        })
    })
}

/// The host a request is for (RFC 9112 §3.2): an absolute-form target's or HTTP/2
/// :authority's host wins over Host; otherwise exactly one valid Host, required from
/// HTTP/1.1 on. None only for an HTTP/1.0 request without one.
fn request_host(req: &Request<Incoming>) -> Result<Option<target::Host<'_>>, ProxyError> {
    let bad = ProxyError::BadTarget;
    if let Some(a) = req.uri().authority() {
        return target::parse_host(a.as_str()).map(Some).map_err(bad);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err(bad(target::BadTarget::DuplicateHost)),
        (Some(h), None) => {
            let h = h
                .to_str()
                .map_err(|_| bad(target::BadTarget::InvalidHost))?;
            target::parse_host(h).map(Some).map_err(bad)
        }
        (None, _) if req.version() <= Version::HTTP_10 => Ok(None),
        (None, _) => Err(bad(target::BadTarget::MissingHost)),
    }
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
        // Biased: the body is usually there already, and then the timer is never registered.
        let next = tokio::select! {
            biased;
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
    let mut charge = None;
    while buf.len() < proxy.request_buffer {
        let frame = match rate.as_mut() {
            Some(r) => loop {
                // `frame()` is cancel-safe: a window that brought enough starts the next one
                // and the read goes on.
                match tokio::time::timeout_at(r.deadline(), body.frame()).await {
                    Ok(f) => break f,
                    Err(_) if r.roll() => continue,
                    Err(_) => return Err(ProxyError::BodyTooSlow),
                }
            },
            None => body.frame().await,
        };
        match frame {
            None => return Ok(UpstreamBody::new(buf.freeze(), None, None, charge)),
            // Malformed framing (a chunk-size overflow, a bare LF) or a client that broke
            // off: either way what it sent cannot be forwarded. A broken-off client never
            // reads the 400.
            Some(Err(_)) => return Err(ProxyError::BadBody),
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    // Read-ahead memory is bounded across all requests: past the budget this
                    // request is refused (503, retry) rather than memory growing.
                    if !proxy.request_budget.take(&mut charge, d.len() as u64) {
                        proxy
                            .request_budget
                            .refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(ProxyError::Busy);
                    }
                    buf.extend_from_slice(d);
                    if let Some(r) = rate.as_mut() {
                        r.record(d.len() as u64);
                    }
                }
            }
        }
        if body.is_end_stream() {
            return Ok(UpstreamBody::new(buf.freeze(), None, None, charge));
        }
    }
    Ok(UpstreamBody::new(buf.freeze(), Some(body), rate, charge))
}
