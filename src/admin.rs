//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (listeners bound and every warm pool filled). Off unless `[admin]` is configured;
//! config validation refuses a non-loopback address without a token. Served by a plain hyper
//! HTTP/1 server outside admission control, so an operator can look while a storm is on; it
//! has limits of its own instead (connections, head size, a deadline per connection), so an
//! unauthenticated peer cannot hold it open.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::admission::fd::ADMIN_CONNECTIONS;

/// A request head must arrive within this (also the idle limit between keep-alive requests).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// No admin connection lives longer: a scrape takes milliseconds.
const CONNECTION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest head read (hyper's smallest allowed buffer): admin requests are tiny.
const MAX_HEAD: usize = 8192;

use crate::Shared;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the cap: closed at once, costing nothing more.
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(respond(&shared, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, conn).await;
            drop(slot);
        });
    }
}

fn respond(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    let gen = shared.gen();
    let admin = gen.config.admin.as_ref();
    let health = matches!(req.uri().path(), "/healthz" | "/readyz");
    let public = health && admin.is_none_or(|a| a.public_health);
    if let Some(token) = admin.and_then(|a| a.token.as_deref()).filter(|_| !public) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "401 Unauthorized: bearer token required\n".into(),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = text(StatusCode::OK, crate::metrics::render(&shared.registry));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let (ok, why) = readiness(shared);
            if ok {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "404 Not Found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

/// Whether to take traffic, and why not.
fn readiness(shared: &Shared) -> (bool, String) {
    if *shared.draining().borrow() {
        return (false, "draining: shutting down".into());
    }
    if !shared.ready.load(Ordering::Acquire) {
        return (false, "warming: origin pools not yet filled".into());
    }
    let gen = shared.gen();
    let requires_origin = gen
        .config
        .admin
        .as_ref()
        .is_some_and(|a| a.ready_requires_origin);
    if requires_origin {
        for u in &gen.proxy.upstreams {
            if !u.servers.iter().any(|s| s.health.is_healthy()) {
                return (
                    false,
                    format!("origin down: every server of upstream {} is down", u.name),
                );
            }
        }
    }
    (true, String::new())
}

/// Compares `given` with `token` in time that depends only on `given`'s length (which the
/// caller knows anyway): no early return on the first difference, and none on a length
/// mismatch, so timing leaks neither the token's bytes nor its length. (`subtle`'s slice
/// compare returns early when lengths differ.)
fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    if token.is_empty() {
        return given.is_empty();
    }
    let mut diff = u8::from(given.len() != token.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ token[i % token.len()];
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secretsecret", b"secret"));
        assert!(!constant_time_eq(b"sec", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
