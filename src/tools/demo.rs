//! The small built-in origin behind `breakwater demo`: answers every request with a short text
//! that says which path it saw and who Breakwater said the client was.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves until the task is dropped, counting the connections it accepts in `accepts`.
pub async fn origin(listener: TcpListener, accepts: Arc<AtomicU64>) {
    slow_origin(listener, accepts, Arc::default(), Duration::ZERO).await
}

/// The same origin, counting requests too and taking `delay` over every answer (a shop under
/// a sale's load).
pub async fn slow_origin(
    listener: TcpListener,
    accepts: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    delay: Duration,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "demo origin accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        accepts.fetch_add(1, Ordering::Relaxed);
        let requests = requests.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                requests.fetch_add(1, Ordering::Relaxed);
                answer(req, delay)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let text = format!(
        "hello from the Breakwater demo origin: {} {} (client {xff})\n",
        req.method(),
        req.uri().path()
    );
    Ok(Response::new(Full::new(Bytes::from(text))))
}
