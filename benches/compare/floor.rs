//! The floor: what a proxy built on the same crates costs with none of Breakwater's work. A
//! hyper HTTP/1 server on a two-thread tokio runtime, each request sent on a pooled hyper
//! HTTP/1 client connection to the origin and the response streamed back: no admission, no
//! limits, no queue, no header rewriting, no log, no metrics. Run as its own process (the
//! compare bench starts itself with `COMPARE_FLOOR=listen,origin`), so its CPU is measured
//! like every other target's. What Breakwater costs above this row is its own; what this row
//! costs above HAProxy is the price of the crates.

use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

type Pool = Arc<Mutex<Vec<client::SendRequest<Incoming>>>>;

async fn forward(
    pool: Pool,
    origin: std::net::SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    // Hop-by-hop: a client's `Connection: close` must not close the pooled connection.
    req.headers_mut().remove(hyper::header::CONNECTION);
    let popped = pool.lock().map_err(|_| "pool lock")?.pop();
    let mut sender = match popped {
        Some(s) if !s.is_closed() => s,
        _ => {
            let stream = tokio::net::TcpStream::connect(origin).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = client::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    // The previous response on this connection may still be streaming.
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    pool.lock().map_err(|_| "pool lock")?.push(sender);
    Ok(resp)
}

/// Serves until killed.
pub fn run(spec: &str) {
    let Some((listen, origin)) = spec.split_once(',') else {
        eprintln!("COMPARE_FLOOR=listen,origin");
        return;
    };
    let (Ok(listen), Ok(origin)) = (
        listen.parse::<std::net::SocketAddr>(),
        origin.parse::<std::net::SocketAddr>(),
    ) else {
        eprintln!("COMPARE_FLOOR: bad addresses");
        return;
    };
    // 2 as the anchors; a scaling run (`scale.rs`) sets its own.
    let threads = std::env::var("COMPARE_FLOOR_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let Ok(l) = tokio::net::TcpListener::bind(listen).await else {
            eprintln!("floor: cannot bind {listen}");
            return;
        };
        let pool: Pool = Arc::default();
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let pool = pool.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| forward(pool.clone(), origin, req));
                let _ = server::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
}
