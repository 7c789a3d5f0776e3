//! The express lane's slice of the pool: a few origin connections per server opened and driven
//! on the lane's own thread (`listener/lanes.rs`) and lent only to its requests, so a newcomer
//! during a storm neither waits for the storm's connections to come free nor has its response
//! read by the busy main runtime. They count in `pool_max` like any other (the main pool gets
//! the rest), are opened when a lane request first finds none free, and are reaped when idle
//! like the rest.

use std::cell::Cell;

use super::*;

thread_local! {
    /// Set on the lane's own thread (by `listener/lanes.rs`). Its runtime is single-threaded
    /// and runs nothing else, so "on this thread" is exactly "a task of the express lane": the
    /// pool asks this instead of every request carrying a flag from accept to here.
    static ON_LANE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as the express lane's.
pub fn mark_lane_thread() {
    ON_LANE.with(|c| c.set(true));
}

/// Whether the caller is a task of the express lane.
pub(super) fn on_lane() -> bool {
    ON_LANE.with(Cell::get)
}

/// Express connections per server when the lane is on (`lane`): two where the pool is big
/// enough to spare them (`pool_max` 16 or more), none for h2c (one connection already
/// carries many streams) or `send_proxy_protocol` (every request gets a connection of its own
/// there).
pub(super) fn slice(cfg: &UpstreamConfig, lane: bool) -> usize {
    let pooled = cfg.protocol == UpstreamProtocol::Http1 && cfg.send_proxy_protocol.is_none();
    if lane && pooled {
        if cfg.pool_max >= 16 {
            2
        } else {
            0
        }
    } else {
        0
    }
}

/// What `take_express` found.
pub(super) enum Express {
    Lease(Lease),
    /// A main-pool connection for this request, and room in the slice on this server,
    /// counted: an express connection is to be opened there in the background for the next.
    Warm(Lease, usize),
    /// Room in the slice on this server, counted: a connection is to be opened there.
    Open(usize),
    Neither,
}

/// Undoes the counts of an express connect that did not finish (failed, or its request was
/// dropped while connecting).
struct Opening<'a> {
    up: &'a Upstream,
    server: usize,
    done: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut st = self.up.lock();
        let slots = &mut st.slots[self.server];
        slots.connecting = slots.connecting.saturating_sub(1);
        slots.open = slots.open.saturating_sub(1);
        slots.express_open = slots.express_open.saturating_sub(1);
    }
}

impl Upstream {
    pub(super) fn express_slice(&self) -> usize {
        self.express_slice
    }

    /// What the main pool may open per server.
    pub(super) fn main_max(&self) -> usize {
        self.cfg.pool_max.saturating_sub(self.express_slice())
    }

    /// A connection for an express-lane request: a free express connection; else a free
    /// connection of the main pool when nobody queues for one, with an express connection
    /// opened beside it for the next newcomer while the slice has room (`Warm`); else room in
    /// the slice for a new express connection, counted here and opened by `open_express`.
    /// `Neither` sends the request the ordinary way (the fair queue, where it counts as a
    /// newcomer).
    ///
    /// Why an express connection even when the main pool is free: a main-pool connection is
    /// driven on the main runtime, so a lane request on it crosses threads twice (the request
    /// to the worker that writes it, the response back), and on a machine whose cores idle
    /// each crossing wakes a sleeping thread. Measured with the lane's readiness check
    /// (`listener/lanes.rs`), in the compare bench against the build before both (3
    /// repetitions, same run): idle flood probe p50/p99 0.8/8.0 -> 0.7/6.0 ms (nginx 0.5/9.0);
    /// slowloris 0.7/1.6 -> 0.7/1.7 (nginx 0.5/1.2), no change beyond the noise; storm 2,000
    /// 0.5/13.2 -> 0.4/13.8 (nginx 0.5/105). Opened in the background, not for this request:
    /// a connect on its way would cost more than the crossing it saves.
    pub(super) fn take_express(&self, client: Asker) -> Express {
        let mut st = self.lock();
        if !self.under_cap(&st, client) {
            return Express::Neither;
        }
        if let Some(g) = self.checkout(&mut st, client, true, pool::current_core()) {
            return Express::Lease(self.lease(g, client));
        }
        let slice = self.express_slice();
        let room = self
            .order(&st)
            .into_iter()
            .find(|&i| st.slots[i].express_open < slice && st.slots[i].open < self.cfg.pool_max);
        let main = if st.queue.is_empty() {
            self.checkout(&mut st, client, false, pool::current_core())
        } else {
            None
        };
        // Speculative, so paced like the pool's own refills (`max_connect_rate`).
        let room = room.filter(|&i| {
            main.is_none() || st.slots[i].take_connect_token(self.cfg.max_connect_rate)
        });
        let Some(server) = room else {
            return main.map_or(Express::Neither, |g| Express::Lease(self.lease(g, client)));
        };
        let slots = &mut st.slots[server];
        slots.open += 1;
        slots.connecting += 1;
        slots.express_open += 1;
        match main {
            Some(g) => Express::Warm(self.lease(g, client), server),
            None => Express::Open(server),
        }
    }

    /// Opens the express connection `take_express` counted on `server` (`Warm`) and pools it
    /// idle, for the lane's next request. Runs as a task of its own on the lane's runtime.
    pub(super) async fn warm_express(&self, server: usize) {
        drop(self.connect_express(server).await);
    }

    /// Opens the express connection `take_express` counted on `server`, for `client`'s request.
    pub(super) async fn open_express(&self, server: usize, client: Asker) -> Option<Lease> {
        let mut st = self.connect_express(server).await?;
        let g = self.checkout(&mut st, client, true, pool::current_core())?;
        drop(st);
        Some(self.lease(g, client))
    }

    /// Connects the express connection counted on `server`, drives it on this runtime (the
    /// lane's: express tasks run there) and pools it; returns the pool, still locked, so that
    /// `open_express` takes the connection before anyone else can. None if the connect failed
    /// (the counts are undone).
    async fn connect_express(&self, server: usize) -> Option<std::sync::MutexGuard<'_, State>> {
        let mut opening = Opening {
            up: self,
            server,
            done: false,
        };
        let addr = self.servers[server].addr.clone();
        let preface = self.local_preface();
        let (tx, drive) =
            match pool::connect(&addr, self.cfg.protocol, self.cfg.connect_timeout, &preface).await
            {
                Ok(c) => c,
                Err(e) => {
                    // The ordinary path reports it, if the server is really down.
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(upstream = %self.name, server = %addr, error = %e,
                        "express-lane origin connect failed");
                    return None;
                }
            };
        let id = self.drive(server, drive, true);
        let mut st = self.lock();
        opening.done = true;
        self.pooled(&mut st, server, id, tx, true);
        Some(st)
    }
}
