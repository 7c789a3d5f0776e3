//! WebSocket tunnels: a real WebSocket handshake (checked in `forward`) goes to the origin on a
//! dedicated connection, and a 101 that completes it joins client and origin into a tunnel that
//! keeps the connection's admission slots until it closes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;

use super::activity::ConnActivity;
use super::body::{AccessLog, UpstreamBody};
use super::{headers, ConnHold, ProxyError, Relayed};
use crate::client::Client;
use crate::upstream::pool::Sender;
use crate::upstream::{Upstream, UpstreamError};

/// What a WebSocket tunnel keeps for its whole life: the client's side of the upgrade, a
/// tunnel slot of the upstream, and the connection's admission slots and place in the drain.
pub(super) struct Tunnel {
    pub(super) client_upgrade: hyper::upgrade::OnUpgrade,
    pub(super) slot: crate::upstream::tunnel::TunnelSlot,
    pub(super) hold: Arc<ConnHold>,
    pub(super) grace: Duration,
    pub(super) peer: SocketAddr,
    pub(super) client: Client,
}

/// A WebSocket handshake: sent on a dedicated origin connection, and on a 101 that completes
/// the handshake both sides are joined into a tunnel. A 101 that does not is a 502.
pub(super) async fn tunnel_request(
    upstream: &Upstream,
    parts: http::request::Parts,
    body: Incoming,
    tunnel: Tunnel,
    activity: &ConnActivity,
    via: &headers::Via,
    log: &mut AccessLog,
) -> Result<Relayed, ProxyError> {
    let fail = |server: Option<std::sync::Arc<str>>, error| ProxyError::Upstream {
        upstream: upstream.name.clone(),
        server: server.unwrap_or_else(|| "-".into()),
        error,
    };
    let (mut tx, server, drive) = upstream
        .connect_dedicated(&tunnel.client)
        .await
        .map_err(|(s, e)| fail(s, e))?;
    tokio::spawn(drive);
    log.server = Some(server.clone());
    let req = Request::from_parts(
        parts,
        UpstreamBody::new(Bytes::new(), Some(body), None, None),
    );
    if let Err(e) = tx.ready().await {
        return Err(fail(Some(server), UpstreamError::Response(e)));
    }
    let mut resp = tokio::time::timeout(upstream.cfg.response_timeout, tx.send(req))
        .await
        .map_err(|_| fail(Some(server.clone()), UpstreamError::ResponseTimeout))?
        .map_err(|e| {
            fail(
                Some(server.clone()),
                UpstreamError::Response(e.into_error()),
            )
        })?;
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && !headers::is_websocket_accept(resp.headers()) {
        return Err(fail(Some(server), UpstreamError::BadUpgrade));
    }
    if switching {
        let origin_upgrade = hyper::upgrade::on(&mut resp);
        activity.set_upgraded();
        tokio::spawn(relay(tunnel, origin_upgrade, tx, server));
    }
    let (mut head, body) = resp.into_parts();
    let token = HeaderValue::from_static("websocket");
    let command = headers::prepare_response(
        &mut head.headers,
        headers::version_token(head.version),
        via,
        switching.then_some(&token),
    );
    head.version = Version::HTTP_11;
    let rest = (!switching && !body.is_end_stream()).then_some(body);
    Ok(Relayed {
        head,
        buffered: VecDeque::new(),
        rest,
        conn: None,
        spooled: None,
        command,
    })
}

/// Relays bytes both ways once client and origin have both switched protocols. The client
/// socket is still under the connection clock, which ends a tunnel silent both ways for
/// `idle_timeout`; a shutdown ends it after the grace period.
async fn relay(
    tunnel: Tunnel,
    origin: hyper::upgrade::OnUpgrade,
    conn: Sender,
    server: std::sync::Arc<str>,
) {
    let Tunnel {
        client_upgrade,
        slot,
        hold,
        grace,
        peer,
        ..
    } = tunnel;
    let (c, o) = tokio::join!(client_upgrade, origin);
    // The origin connection's sender is no longer needed once its socket is upgraded.
    drop(conn);
    let (c, o) = match (c, o) {
        (Ok(c), Ok(o)) => (c, o),
        (c, o) => {
            tracing::debug!(client = %peer, server = &*server, client_ok = c.is_ok(), origin_ok = o.is_ok(),
            "upgrade did not complete");
            return;
        }
    };
    let mut c = TokioIo::new(c);
    let mut o = TokioIo::new(o);
    let mut stop = hold.stop.clone();
    let shutdown = async {
        // Ends when shutdown starts, or when the engine is gone.
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut c, &mut o) => match r {
            Ok((up, down)) => tracing::debug!(client = %peer, server = &*server, up, down, "tunnel closed"),
            Err(e) => tracing::debug!(client = %peer, server = &*server, error = %e, "tunnel ended with an error"),
        },
        _ = shutdown => tracing::debug!(client = %peer, server = &*server, "tunnel cut at the end of the shutdown grace"),
    }
    // Explicit for the reader: the slots go back only now.
    drop(slot);
    drop(hold);
}
