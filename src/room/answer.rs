//! What a waiter is answered, made in memory: JSON for API clients, the page for browsers
//! (see `page.rs`), the cookie that holds the token, and the page's own-reload choice for
//! browsers without JavaScript. Split from `room.rs`, which decides *whether* a request waits.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::{page, Room, Token, TOKEN_HEADER};

/// How the waiter asked: what kind of answer it gets.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    /// JSON rather than the page.
    pub(super) api: bool,
    pub(super) tls: bool,
    /// The page (without JavaScript) reloads itself.
    pub(super) auto_refresh: bool,
}

impl Room {
    /// The page's "reload automatically" links (for browsers without JavaScript): remember the
    /// choice in a cookie and send the browser back to the page without the parameter, so it
    /// never reaches the origin.
    pub(super) fn refresh_choice(
        &self,
        path: &str,
        query: Option<&str>,
        tls: bool,
    ) -> Option<Response<Bytes>> {
        let query = query?;
        fn choice_of(kv: &str) -> Option<&str> {
            kv.strip_prefix(page::REFRESH_PARAM)?.strip_prefix('=')
        }
        let choice = query.split('&').find_map(choice_of)?;
        let rest: Vec<&str> = query
            .split('&')
            .filter(|kv| choice_of(kv).is_none() && !kv.is_empty())
            .collect();
        let location = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", rest.join("&"))
        };
        let secure = if tls { "; Secure" } else { "" };
        let cookie = match choice {
            "on" => format!(
                "{}=1; Path=/; HttpOnly; SameSite=Lax{secure}",
                self.auto_cookie_name
            ),
            _ => format!(
                "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
                self.auto_cookie_name
            ),
        };
        let mut r = Response::new(Bytes::new());
        *r.status_mut() = StatusCode::SEE_OTHER;
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let (Ok(l), Ok(c)) = (
            HeaderValue::from_str(&location),
            HeaderValue::from_str(&cookie),
        ) {
            h.insert(header::LOCATION, l);
            h.insert(header::SET_COOKIE, c);
        }
        Some(r)
    }

    /// The waiter turned the page's own reloading on (it has no JavaScript).
    pub(super) fn auto_refresh(&self, headers: &HeaderMap) -> bool {
        super::cookie_value(headers, &self.auto_cookie_name) == Some("1")
    }

    /// API clients get JSON: a path under `api_paths`, an Accept that names JSON, or one that
    /// does not ask for HTML (curl's `*/*`, most SDKs). Never HTML to an API client.
    pub(super) fn is_api(&self, headers: &HeaderMap, path: &str) -> bool {
        if self
            .cfg
            .api_paths
            .iter()
            .any(|p| path.starts_with(p.as_str()))
        {
            return true;
        }
        // Read in place, case-insensitively: every waiter's poll asks.
        let (mut json, mut html) = (false, false);
        for v in headers.get_all(header::ACCEPT) {
            let v = v.as_bytes();
            json |= contains_ignore_case(v, b"application/json");
            html |= contains_ignore_case(v, b"text/html");
        }
        json || !html
    }

    pub(super) fn cookie(&self, token: &str, tls: bool) -> Option<HeaderValue> {
        let secure = if tls { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Lax{secure}",
            self.cookie_name
        ))
        .ok()
    }

    /// The waiting answer: JSON (429) for API clients, the page (200) for browsers; 503 when
    /// the room is closed.
    pub(super) fn answer(
        &self,
        state: &'static str,
        ticket: Option<Token>,
        ask: Asked,
        new_token: Option<String>,
    ) -> Response<Bytes> {
        let Asked {
            api,
            tls,
            auto_refresh,
        } = ask;
        let refresh = self.cfg.refresh.as_secs().max(1);
        let (position, ahead, eta) = match ticket {
            Some(t) => {
                let ahead = self.state.ahead(t.id);
                let rate = self.door().rate.max(0.01);
                // Before the opening, the wait starts then.
                let until_open = self
                    .cfg
                    .opens_at
                    .and_then(|o| o.duration_since(SystemTime::now()).ok())
                    .map_or(0.0, |d| d.as_secs_f64());
                // A fleet's door lets nobody in sooner than its horizon after the ticket.
                let floor = self.state.min_wait().as_secs_f64();
                let secs = until_open + (ahead as f64 / rate).max(floor);
                let eta = [
                    ((secs * 0.8).floor() as u64).max(1),
                    ((secs * 1.2).ceil() as u64).max(refresh),
                ];
                (Some(ahead + 1), Some(ahead), Some(eta))
            }
            None => (None, None, None),
        };
        let status = page::Status {
            room: &self.cfg.name,
            state,
            position,
            ahead,
            eta_seconds: eta,
            refresh_seconds: refresh,
            token: new_token.as_deref(),
            auto_refresh,
            grace_seconds: self.cfg.queue_grace.as_secs(),
        };
        let (code, body, kind) = if api {
            self.stats.pages_json.fetch_add(1, Ordering::Relaxed);
            let code = if state == "closed" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            (code, page::json(&status), "application/json")
        } else {
            self.stats.pages_html.fetch_add(1, Ordering::Relaxed);
            let code = if state == "closed" {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            };
            (code, self.page.fill(&status), "text/html; charset=utf-8")
        };
        let mut r = Response::new(Bytes::from(body));
        *r.status_mut() = code;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::RETRY_AFTER, HeaderValue::from(refresh));
        if let Some(t) = &new_token {
            if let Some(c) = self.cookie(t, tls) {
                h.insert(header::SET_COOKIE, c);
            }
            if let Ok(v) = HeaderValue::from_str(t) {
                h.insert(TOKEN_HEADER, v);
            }
        }
        r
    }
}

/// Whether `hay` contains `needle` (lower-case ASCII), ignoring ASCII case.
fn contains_ignore_case(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}
