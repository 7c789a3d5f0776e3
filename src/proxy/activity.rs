//! What one client connection's requests add up to, shared by the proxy handler (which
//! counts requests in flight, answered and cancelled) and the connection's socket clock (which
//! reads them to pick its deadline and to cut a rapid-reset abuser). It lives with the proxy,
//! which does the counting; `conn` only reads it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::task::AtomicWaker;

/// What the proxy handler and the socket wrapper share about one client connection.
#[derive(Default, Debug)]
pub struct ConnActivity {
    pub(crate) in_flight: AtomicUsize,
    pub(crate) upgraded: AtomicBool,
    pub(crate) waker: AtomicWaker,
    /// Requests answered, and requests the client cancelled (HTTP/2 RST_STREAM) before their
    /// response head: the rapid-reset guard compares the two.
    answered: AtomicUsize,
    cancelled: AtomicUsize,
    abusive: AtomicBool,
}

/// Cancelled requests a connection may have beyond its answered ones before it is closed.
/// Browsers cancel streams (navigation, aborted fetches), but not most of them: a rapid-reset
/// flood (CVE-2023-44487) cancels nearly all, making the proxy start work the client never
/// waits for.
const CANCEL_ALLOWANCE: usize = 100;

impl ConnActivity {
    /// Marks a request in flight until the guard drops (after its response body ended).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub fn set_upgraded(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    /// Called once per request: `answered` when a response head was produced, otherwise the
    /// client cancelled it. Past the allowance the connection is closed at its next read.
    pub fn request_done(&self, answered: bool) {
        if answered {
            self.answered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        if cancelled > CANCEL_ALLOWANCE + self.answered.load(Ordering::Relaxed)
            && !self.abusive.swap(true, Ordering::AcqRel)
        {
            self.waker.wake();
        }
    }

    pub fn is_abusive(&self) -> bool {
        self.abusive.load(Ordering::Acquire)
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
