//! What one client connection's requests add up to, shared by the proxy handler (which
//! counts requests in flight, answered and cancelled) and the connection's socket clock (which
//! reads them to pick its deadline and to cut a rapid-reset abuser). It lives with the proxy,
//! which does the counting; `conn` only reads it.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::task::AtomicWaker;

/// What the proxy handler and the socket wrapper share about one client connection.
#[derive(Default, Debug)]
pub struct ConnActivity {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) upgraded: AtomicBool,
    /// A request has been dispatched on this connection.
    started: AtomicBool,
    pub(crate) waker: AtomicWaker,
    /// Requests answered, and requests the client cancelled (HTTP/2 RST_STREAM) before their
    /// response head: the rapid-reset guard compares the two.
    answered: AtomicUsize,
    cancelled: AtomicUsize,
    /// Why the connection is being closed (a `Closing` as u8), 0 while it is not.
    closing: AtomicU8,
    /// A stop signal (shutdown, draining) woke the connection's task: as a `Waker`, this
    /// activity flags it and wakes the task registered in `waker` (`conn::drive`).
    pub(crate) signalled: AtomicBool,
}

/// The connection's own Arc serves as the stop signals' waker: no allocation of its own.
impl std::task::Wake for ConnActivity {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.signalled.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// Why the proxy closes a client connection from outside hyper (the socket clock fails the
/// connection's next read or write with this reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Closing {
    /// The client cancels nearly every request (rapid reset).
    RapidReset = 1,
    /// A response waited `send_timeout` with no byte taken (no socket progress, no HTTP/2
    /// window credited).
    Stalled = 2,
    /// A response was taken slower than `min_send_rate`.
    TooSlow = 3,
}

impl Closing {
    pub fn reason(self) -> &'static str {
        match self {
            Closing::RapidReset => "closing: the client cancels nearly every request (rapid reset)",
            Closing::Stalled => "closing: the client took no response bytes within send_timeout",
            Closing::TooSlow => "closing: the client reads its response slower than min_send_rate",
        }
    }
}

/// Cancelled requests a connection may have beyond its answered ones before it is closed.
/// Browsers cancel streams (navigation, aborted fetches), but not most of them: a rapid-reset
/// flood (CVE-2023-44487) cancels nearly all, making the proxy start work the client never
/// waits for.
const CANCEL_ALLOWANCE: usize = 100;

impl ConnActivity {
    /// Marks a request in flight until the guard drops (after its response body ended).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.started.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Whether any request has been dispatched on this connection yet.
    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// Called once per request: `Some(true)` when the origin answered, `Some(false)` when
    /// Breakwater answered itself, None when the client cancelled first. Only origin answers
    /// earn cancels: a local 404 or 429 costs the attacker nothing, so counting it would let a
    /// flood pad its allowance. Past the allowance the connection is closed.
    pub fn request_done(&self, answered: Option<bool>) {
        match answered {
            Some(true) => {
                self.answered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(false) => return,
            None => {}
        }
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        if cancelled > CANCEL_ALLOWANCE + self.answered.load(Ordering::Relaxed) {
            self.close(Closing::RapidReset);
        }
    }

    /// Closes the connection at its next read or write (the first reason given sticks).
    pub fn close(&self, why: Closing) {
        if self
            .closing
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// Why the connection is to be closed, if it is.
    pub fn closing(&self) -> Option<Closing> {
        match self.closing.load(Ordering::Acquire) {
            1 => Some(Closing::RapidReset),
            2 => Some(Closing::Stalled),
            3 => Some(Closing::TooSlow),
            _ => None,
        }
    }
}

/// Held by a request from the moment it is dispatched until its response body is done.
#[derive(Debug)]
pub struct InFlight(Arc<ConnActivity>);

impl InFlight {
    pub fn activity(&self) -> &ConnActivity {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Wake the connection so an HTTP/2 connection starts its idle clock now rather than
            // at its next frame.
            self.0.waker.wake();
        }
    }
}
