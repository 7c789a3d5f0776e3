//! Which failure becomes which status: the one table where errors turn into HTTP answers of
//! Breakwater's own (with a short body that says what happened without exposing the origin).

use http::StatusCode;

use super::body;
use crate::target;
use crate::upstream::UpstreamError;

/// Why a request got a response of Breakwater's own instead of the origin's.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("client over per_ip_request_rate")]
    RateLimited,
    #[error("request body slower than min_body_rate")]
    BodyTooSlow,
    #[error("request_buffer_budget is spent")]
    Busy,
    #[error("malformed request body")]
    BadBody,
    #[error("bad request target: {0}")]
    BadTarget(target::BadTarget),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request has passed through this proxy already (Via)")]
    Loop,
    #[error("upstream {upstream} server {server}: {error}")]
    Upstream {
        upstream: std::sync::Arc<str>,
        server: std::sync::Arc<str>,
        #[source]
        error: UpstreamError,
    },
}

impl ProxyError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BadBody | ProxyError::BadTarget(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Loop => StatusCode::LOOP_DETECTED,
            ProxyError::Upstream { error, .. } => match error {
                UpstreamError::ConnectTimeout | UpstreamError::ResponseTimeout => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                UpstreamError::Connect(_)
                | UpstreamError::Handshake(_)
                | UpstreamError::Response(_)
                | UpstreamError::BadUpgrade => StatusCode::BAD_GATEWAY,
                UpstreamError::ClientBody(e) if is_too_slow(e) => StatusCode::REQUEST_TIMEOUT,
                UpstreamError::ClientBody(_) => StatusCode::BAD_REQUEST,
                UpstreamError::QueueTimeout
                | UpstreamError::QueueFull
                | UpstreamError::NoHealthyServer
                | UpstreamError::TooManyTunnels => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// A short body that says what happened without exposing the origin's address.
    pub(super) fn body(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "404 Not Found: no route for this host and path\n",
            ProxyError::RateLimited => "429 Too Many Requests: slow down\n",
            ProxyError::BodyTooSlow => "408 Request Timeout: the request body came too slowly\n",
            ProxyError::Busy => {
                "503 Service Unavailable: too many request bodies in flight, try again shortly\n"
            }
            ProxyError::BadBody => "400 Bad Request: the request body is malformed\n",
            ProxyError::BadTarget(t) => match t {
                target::BadTarget::MissingHost => "400 Bad Request: Host is required\n",
                target::BadTarget::DuplicateHost => "400 Bad Request: more than one Host\n",
                target::BadTarget::InvalidHost | target::BadTarget::Userinfo => {
                    "400 Bad Request: invalid Host or authority\n"
                }
                target::BadTarget::EncodedSlash
                | target::BadTarget::EncodedDotSegment
                | target::BadTarget::InvalidPath => "400 Bad Request: invalid path\n",
            },
            ProxyError::MethodNotAllowed => "405 Method Not Allowed: CONNECT is not served\n",
            ProxyError::Loop => "508 Loop Detected: the request came back to this proxy\n",
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
                UpstreamError::BadUpgrade => {
                    "502 Bad Gateway: the origin did not complete the WebSocket handshake\n"
                }
                UpstreamError::TooManyTunnels => {
                    "503 Service Unavailable: too many WebSocket connections open\n"
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
