//! The upstream's side of server health (`health.rs` holds one server's counters): recording
//! results, ejecting a server and closing its idle connections, re-admitting it, and the active
//! check loop.

use super::*;

impl Upstream {
    pub(super) fn ejected(&self, st: &mut State, server: usize) {
        tracing::warn!(upstream = %self.name, server = %self.servers[server].addr,
            "server ejected: too many consecutive failures");
        self.health_wake.notify_one();
        st.slots[server].clear_idle();
        if !self.servers.iter().any(|s| s.health.is_healthy()) {
            tracing::error!(upstream = %self.name, "every server of the upstream is down: answering 503");
            for w in st.queue.drain() {
                let _ = w.tx.send(Err(UpstreamError::NoHealthyServer));
            }
        } else {
            self.dispatch(st);
        }
    }

    pub(super) fn record(&self, server: usize, ok: bool, active: bool) {
        let h = &self.cfg.health;
        let t = if ok {
            self.servers[server].health.success(active, h.healthy_after)
        } else {
            self.servers[server].health.failure(h.unhealthy_after)
        };
        match t {
            Transition::None => {}
            Transition::Ejected => {
                let mut st = self.lock();
                self.ejected(&mut st, server);
            }
            Transition::Readmitted => self.readmitted(server, "health checks pass"),
        }
    }

    pub(super) fn readmitted(&self, server: usize, why: &str) {
        tracing::info!(upstream = %self.name, server = %self.servers[server].addr,
            "server re-admitted: {why}");
        let mut st = self.lock();
        st.slots[server].refill_after = Instant::now();
        self.refill(&mut st);
        self.dispatch(&mut st);
    }

    /// Active health checks, forever; run as a task per upstream. A healthy server is checked
    /// every `interval`; an ejected one is re-probed with backoff, from `FIRST_REPROBE` doubling
    /// up to `interval`, and back to `FIRST_REPROBE` after each success, so a restarted origin
    /// is re-admitted within a few hundred milliseconds of accepting connections again (with the
    /// defaults, two checks at 2 s apart used to keep it out for seconds).
    pub async fn check_health(self: Arc<Self>) {
        let h = self.cfg.health.clone();
        let now = Instant::now();
        // The warm connects at start are the first check; probing starts one interval later.
        let mut next: Vec<Instant> = vec![now + h.interval; self.servers.len()];
        let mut backoff: Vec<std::time::Duration> = vec![FIRST_REPROBE; self.servers.len()];
        loop {
            let due = next.iter().min().copied().unwrap_or(now + h.interval);
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                // A server was ejected by traffic: start re-probing it now, not at its next tick.
                _ = self.health_wake.notified() => {
                    let soon = Instant::now() + FIRST_REPROBE;
                    for i in 0..self.servers.len() {
                        if !self.servers[i].health.is_healthy() && next[i] > soon {
                            next[i] = soon;
                            backoff[i] = FIRST_REPROBE;
                        }
                    }
                    continue;
                }
            }
            for i in 0..self.servers.len() {
                if next[i] > Instant::now() {
                    continue;
                }
                let server = &self.servers[i];
                let healthy = server.health.is_healthy();
                // Real traffic is the better check; and without a health path, a live pooled
                // connection proves as much as a TCP connect would, without an extra
                // connection to the origin.
                let live = h.path.is_none() && self.has_live_connection(i);
                if healthy && (server.health.recently_ok(h.interval) || live) {
                    next[i] = Instant::now() + h.interval;
                    continue;
                }
                let ok = health::probe(
                    &server.addr,
                    h.path.as_deref(),
                    self.cfg.connect_timeout,
                    &self.local_preface(),
                )
                .await;
                self.record(i, ok, true);
                next[i] = Instant::now()
                    + if server.health.is_healthy() {
                        backoff[i] = FIRST_REPROBE;
                        h.interval
                    } else if ok {
                        backoff[i] = FIRST_REPROBE;
                        FIRST_REPROBE
                    } else {
                        let wait = backoff[i];
                        backoff[i] = (backoff[i] * 2).min(h.interval);
                        wait
                    };
            }
        }
    }

    pub(super) fn has_live_connection(&self, server: usize) -> bool {
        self.lock().slots[server]
            .entries()
            .iter()
            .any(|e| e.tx.as_ref().is_none_or(|t| !t.is_closed()))
    }
}
