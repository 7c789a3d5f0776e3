//! ④½ The waiting room: a fair line at the door of a sale, opened by what the origin is doing.
//!
//! Stage: after the proxy handler has the client and the path, before a request is routed to
//! the pool. A request matching a `[[waiting_room]]` goes through if it carries a valid pass
//! (an admitted shopper), or if the room is not queueing and the door has a slot (it gets a
//! pass on the way). Otherwise it is answered from memory: a ticket (a place in line, in a
//! signed cookie or the `Breakwater-Room-Token` header) and a page or JSON saying where it
//! stands. The door ticks every 250 ms and admits up to `new_sessions_per_minute / 240` live
//! tickets in ticket order, never past `max_active_sessions`, and not at all while the origin's
//! pool queue wait is above `max_queue_wait` (a door no edge waiting room has: Breakwater sees
//! the origin's real queue). Admitted tickets become passes on their holder's next poll.
//!
//! The line itself (ticket counter, cursor, liveness, sessions) is behind `state::RoomState`,
//! so a fleet can keep it in Redis; tokens are self-checking (`token.rs`), so any instance with
//! the key verifies any token without asking the state.
//!
//! Why this file is ~680 lines (about 40 of them tests): it is the room's decision (`check`), its
//! door (`tick`) and the counters both keep, which share the door's lock; what a waiter is answered
//! is already in `room/answer.rs`. A fleet's shared line did not need a second door: the one door
//! runs on every instance and the state decides whose moves the line (`RoomState::leads`). The
//! next split is the door (`tick`, `Door`) into `room/door.rs` if it grows further.

mod answer;
pub mod page;
pub mod state;
pub mod token;

use answer::Asked;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response};

use crate::config::room::{RoomConfig, RoomMode};
use crate::upstream::Upstream;
use state::RoomState;
use token::{Invalid, Keys, Kind, Token};

/// How often the door moves.
pub const TICK: Duration = Duration::from_millis(250);
/// The header an app without a cookie jar sends its token in (and gets it back in).
pub const TOKEN_HEADER: &str = "breakwater-room-token";
/// A signed bypass (`breakwater room-bypass`): staff, monitoring, partners walk past the line
/// until it expires.
pub const BYPASS_HEADER: &str = "breakwater-room-bypass";
/// The origin's response header that ends a shopper's session at once (stripped).
pub const COMMAND_HEADER: &str = "breakwater-room";

/// Counters since start, for the metrics.
#[derive(Debug)]
pub struct RoomStats {
    pub tickets_issued: AtomicU64,
    pub tickets_refused: AtomicU64,
    /// Tickets the door let in, and shoppers let in at once (the room was not queueing).
    pub admitted: AtomicU64,
    pub admitted_at_once: AtomicU64,
    /// Tickets passed over because they had stopped polling.
    pub abandoned: AtomicU64,
    pub revoked: AtomicU64,
    pub sessions_expired: AtomicU64,
    pub pages_html: AtomicU64,
    pub pages_json: AtomicU64,
    /// Requests let past by a signed bypass header.
    pub bypassed: AtomicU64,
    pub invalid: [AtomicU64; 6],
    /// Milliseconds the door stayed shut, by reason: full (max_active_sessions), origin guard.
    pub closed_full_ms: AtomicU64,
    pub closed_origin_ms: AtomicU64,
    pub closed_prequeue_ms: AtomicU64,
    /// Seconds from ticket to pass, for shoppers who waited.
    pub wait: prometheus_client::metrics::histogram::Histogram,
}

impl Default for RoomStats {
    fn default() -> Self {
        RoomStats {
            tickets_issued: AtomicU64::new(0),
            tickets_refused: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            admitted_at_once: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            sessions_expired: AtomicU64::new(0),
            pages_html: AtomicU64::new(0),
            pages_json: AtomicU64::new(0),
            bypassed: AtomicU64::new(0),
            invalid: Default::default(),
            closed_full_ms: AtomicU64::new(0),
            closed_origin_ms: AtomicU64::new(0),
            closed_prequeue_ms: AtomicU64::new(0),
            wait: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 14),
            ),
        }
    }
}

/// Labels of `RoomStats::invalid`.
pub const INVALID_REASONS: [&str; 6] = [
    "malformed",
    "wrong_room",
    "unknown_key",
    "bad_mac",
    "expired",
    "wrong_address",
];

#[derive(Debug)]
struct Door {
    /// Admissions the rate allows now (carried over up to one second's worth).
    budget: f64,
    last: Instant,
    epoch_started: Instant,
    /// Tickets admitted but not yet come back for their pass, by tick: they count as active
    /// until claimed or until `queue_grace` has passed.
    unclaimed: VecDeque<(Instant, u64)>,
    /// Admissions per second, smoothed over ~10 s, for the ETA.
    rate: f64,
    /// A fleet's walk-ins (nobody waiting) draw on this, this instance's share of the rate;
    /// alone, they draw on `budget` as the door does.
    walk_in: f64,
}

/// One room, built from its config; the line's state survives reloads (see `carry_over`).
#[derive(Debug)]
pub struct Room {
    pub cfg: RoomConfig,
    keys: Keys,
    state: Arc<dyn RoomState>,
    /// The same state when a fleet shares the line, for the fleet's room sync.
    shared: Option<Arc<state::SharedState>>,
    door: Mutex<Door>,
    /// Tickets taken per client key in the current minute.
    joins: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    pub stats: Arc<RoomStats>,
    /// The upstream its requests go to, whose queue wait is the origin guard.
    guard: Option<Arc<Upstream>>,
    /// When this line started (unix s): a ticket issued before it belongs to a line that no
    /// longer exists (a restart with the same keys), and its number means nothing here.
    line_started: u64,
    page: page::Template,
    /// `bw_wr_<name>` (the token) and `bw_wr_<name>_auto` (the no-JavaScript reload choice),
    /// made once: every waiter's poll reads them.
    cookie_name: String,
    auto_cookie_name: String,
    /// The door has opened (`opens_at` passed, the pre-queue shuffled if asked).
    opened: std::sync::atomic::AtomicBool,
}

/// What the room decides about a request.
#[derive(Debug)]
pub enum Verdict {
    /// Forward it; `session` is the shopper's (for a revoke from the origin); `set_cookie`
    /// goes on the response (a pass just minted).
    Pass {
        session: Option<u64>,
        set_cookie: Option<HeaderValue>,
    },
    /// Answer it from here.
    Answer(Response<Bytes>),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        static FALLBACK: AtomicU64 = AtomicU64::new(1);
        return FALLBACK.fetch_add(1, Ordering::Relaxed) ^ unix_now().rotate_left(32);
    }
    u64::from_le_bytes(b)
}

impl Room {
    /// A room; `old` (the same room before a reload) lends its line, sessions, counters and,
    /// when no keys are configured, its random key. With `shared`, a new line is a fleet's
    /// (`state::SharedState`, kept in step by the fleet's room sync).
    pub fn new(
        cfg: RoomConfig,
        guard: Option<Arc<Upstream>>,
        old: Option<&Room>,
        shared: bool,
    ) -> Room {
        let keys = match old {
            Some(o) if cfg.keys.is_empty() && o.cfg.keys.is_empty() => o.keys.clone(),
            _ => Keys::new(&cfg.keys),
        };
        let now = Instant::now();
        let per = state::rotations_for(cfg.queue_grace, TICK);
        let (state, shared): (Arc<dyn RoomState>, _) = match old {
            Some(o) => (o.state.clone(), o.shared.clone()),
            None if shared => {
                let s = Arc::new(state::SharedState::new(per, cfg.session_idle));
                (s.clone(), Some(s))
            }
            None => (Arc::new(state::LocalState::new(per)), None),
        };
        Room {
            keys,
            state,
            shared,
            door: Mutex::new(Door {
                budget: 1.0,
                last: now,
                epoch_started: now,
                unclaimed: VecDeque::new(),
                rate: cfg.new_sessions_per_minute as f64 / 60.0,
                walk_in: 1.0,
            }),
            joins: Mutex::new(HashMap::new()),
            stats: old.map_or_else(Default::default, |o| o.stats.clone()),
            guard,
            line_started: old.map_or_else(unix_now, |o| o.line_started),
            page: page::Template::new(cfg.page_template.as_deref()),
            cookie_name: format!("bw_wr_{}", cfg.name),
            auto_cookie_name: format!("bw_wr_{}_auto", cfg.name),
            // Without an opening time the room is open from the start.
            opened: std::sync::atomic::AtomicBool::new(
                cfg.opens_at.is_none() || old.is_some_and(|o| o.opened.load(Ordering::Acquire)),
            ),
            cfg,
        }
    }

    /// Liveness slices per `queue_grace` (fixed when the line was made).
    pub fn state_rotations(&self) -> u32 {
        self.state.rotations_per_grace()
    }

    /// Whether this instance's door moves the line (always, unless a fleet shares it and
    /// another instance leads).
    pub fn leads(&self) -> bool {
        self.state.leads()
    }

    /// The line's state when a fleet shares it.
    pub fn shared(&self) -> Option<&Arc<state::SharedState>> {
        self.shared.as_ref()
    }

    fn door(&self) -> std::sync::MutexGuard<'_, Door> {
        self.door.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this room covers the request.
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match (&self.cfg.host, host) {
            (None, _) => true,
            (Some(p), Some(h)) => p.matches(h),
            (Some(_), None) => false,
        };
        host_ok && prefix_matches(&self.cfg.path_prefix, path)
    }

    /// The token the request carries: the header first (apps), then the room's cookie.
    fn token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        if let Some(v) = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
            return Some(v.trim());
        }
        cookie_value(headers, &self.cookie_name)
    }

    fn invalid(&self, i: usize) {
        self.stats.invalid[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Decides about one request from `client` (its address, and the key its limits count
    /// under) for `path`.
    pub fn check(
        &self,
        headers: &HeaderMap,
        path: &str,
        query: Option<&str>,
        client: IpAddr,
        client_key: IpAddr,
        tls: bool,
    ) -> Verdict {
        let pass = Verdict::Pass {
            session: None,
            set_cookie: None,
        };
        if self.cfg.mode == RoomMode::Passthrough
            || self.cfg.bypass_cidrs.iter().any(|n| n.contains(&client))
            || self
                .cfg
                .bypass_paths
                .iter()
                .any(|p| path.starts_with(p.as_str()))
        {
            return pass;
        }
        if let Some(raw) = headers.get(BYPASS_HEADER).and_then(|v| v.to_str().ok()) {
            match self.keys.verify(&self.cfg.name, raw.trim()) {
                Ok(Token {
                    kind: Kind::Bypass,
                    id: expires,
                    ..
                }) if expires > unix_now() => {
                    self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
                    return pass;
                }
                Ok(Token {
                    kind: Kind::Bypass, ..
                }) => self.invalid(4),
                Ok(_) => self.invalid(Invalid::Malformed as usize),
                Err(e) => self.invalid(e as usize),
            }
        }
        if let Some(answer) = self.refresh_choice(path, query, tls) {
            return Verdict::Answer(answer);
        }
        let bind = token::binding(client, self.cfg.bind_ipv4_prefix, self.cfg.bind_ipv6_prefix);
        let now = Instant::now();
        let api = self.is_api(headers, path);
        let ask = Asked {
            api,
            tls,
            auto_refresh: self.auto_refresh(headers),
        };
        let mut ticket = None;
        if let Some(raw) = self.token(headers) {
            match self.keys.verify(&self.cfg.name, raw) {
                // Shared with, or taken to, another network.
                Ok(t) if t.bind != bind => self.invalid(Invalid::WrongAddress as usize),
                Ok(Token {
                    kind: Kind::Pass,
                    id,
                    issued,
                    ..
                }) => {
                    let too_old = self
                        .cfg
                        .session_max
                        .is_some_and(|m| unix_now().saturating_sub(issued) > m.as_secs());
                    if too_old {
                        self.state.session_revoke(id);
                        self.invalid(4);
                    } else if self.state.session_touch(id, now) {
                        return Verdict::Pass {
                            session: Some(id),
                            set_cookie: None,
                        };
                    } else {
                        // Idle too long, or revoked: back to the door like anyone else.
                        self.invalid(4);
                    }
                }
                // A bypass belongs in its own header.
                Ok(Token {
                    kind: Kind::Bypass, ..
                }) => self.invalid(Invalid::Malformed as usize),
                Ok(t) if t.issued < self.state.started().unwrap_or(self.line_started) => {
                    self.invalid(4)
                }
                Ok(t) => ticket = Some(t),
                Err(e) => self.invalid(e as usize),
            }
        }
        if self.cfg.mode == RoomMode::Reject {
            return Verdict::Answer(self.answer("closed", None, ask, None));
        }
        if let Some(t) = ticket {
            self.state.touch(t.id);
            match self.state.admitted(t.id) {
                Some(true) => {
                    // One session per ticket: the first claim opens it; the same ticket again
                    // (a retry that lost its answer, or the ticket handed around) gets the same
                    // session's pass while it lasts, and nothing once it has ended.
                    let id = self.session_for(t.id);
                    if self.state.claim_ticket(t.id) {
                        self.claim(t.issued);
                        self.state.session_add(id, now);
                        return self.pass(id, tls, bind);
                    }
                    if self.state.session_touch(id, now) {
                        return self.pass(id, tls, bind);
                    }
                    self.invalid(4);
                }
                // Its turn came while it was not polling: it lost its place.
                Some(false) => {}
                None => return Verdict::Answer(self.answer("queued", Some(t), ask, None)),
            }
        }
        // No place in line yet. While nobody waits and the door has room, walk straight in.
        if self.cfg.mode == RoomMode::Auto
            && self.opened.load(Ordering::Acquire)
            && self.state.waiting() == 0
            && self.take_slot_now()
        {
            self.stats.admitted_at_once.fetch_add(1, Ordering::Relaxed);
            let id = random_id();
            self.state.session_add(id, now);
            return self.pass(id, tls, bind);
        }
        if !self.may_join(client_key, now) {
            self.stats.tickets_refused.fetch_add(1, Ordering::Relaxed);
            return Verdict::Answer(self.answer("refused", None, ask, None));
        }
        let t = Token {
            kind: Kind::Ticket,
            id: self.state.issue(),
            issued: unix_now(),
            bind,
        };
        self.stats.tickets_issued.fetch_add(1, Ordering::Relaxed);
        let signed = self.keys.sign(&self.cfg.name, t);
        Verdict::Answer(self.answer("queued", Some(t), ask, Some(signed)))
    }

    /// In auto mode with nobody waiting: one slot from the door's budget, if it has one and the
    /// room is not full and the origin guard is open.
    fn take_slot_now(&self) -> bool {
        let mut d = self.door();
        let active = self.state.sessions() + unclaimed(&d);
        let alone = self.shared.is_none();
        let budget = if alone { d.budget } else { d.walk_in };
        if budget < 1.0 || active >= self.cfg.max_active_sessions || self.origin_busy() {
            return false;
        }
        if !alone {
            d.walk_in -= 1.0;
        }
        d.budget -= 1.0;
        true
    }

    fn claim(&self, issued: u64) {
        self.state.claimed();
        take_unclaimed(&mut self.door(), 1);
        let waited = unix_now().saturating_sub(issued) as f64;
        self.stats.wait.observe(waited);
    }

    /// The session a ticket opens: the same for every claim of that ticket in this line (a
    /// mix of the ticket and the line's start; any instance of a fleet computes the same).
    fn session_for(&self, ticket: u64) -> u64 {
        let started = self.state.started().unwrap_or(self.line_started);
        // splitmix64's finaliser.
        let mut z = ticket ^ started.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A signed pass for session `id`, as the cookie to set.
    fn pass(&self, id: u64, tls: bool, bind: Option<u32>) -> Verdict {
        let signed = self.keys.sign(
            &self.cfg.name,
            Token {
                kind: Kind::Pass,
                id,
                issued: unix_now(),
                bind,
            },
        );
        Verdict::Pass {
            session: Some(id),
            set_cookie: self.cookie(&signed, tls),
        }
    }

    /// `tickets_per_ip` per minute per client key.
    fn may_join(&self, key: IpAddr, now: Instant) -> bool {
        if self.cfg.tickets_per_ip == 0 {
            return true;
        }
        let mut j = self.joins.lock().unwrap_or_else(|p| p.into_inner());
        let e = j.entry(key).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            *e = (now, 0);
        }
        if e.1 >= self.cfg.tickets_per_ip {
            return false;
        }
        e.1 += 1;
        true
    }

    /// The origin said `Breakwater-Room: revoke`: the shopper's session ends now, and its slot
    /// is free at the next tick.
    pub fn revoke(&self, session: u64) {
        if self.state.session_revoke(session) {
            self.stats.revoked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn origin_busy(&self) -> bool {
        self.origin_busy_here() || self.state.others_busy()
    }

    /// This instance's origin guard: its upstream's queue wait is above `max_queue_wait`.
    pub fn origin_busy_here(&self) -> bool {
        match (self.cfg.max_queue_wait, &self.guard) {
            (Some(max), Some(u)) => u.recent_queue_wait() > max,
            _ => false,
        }
    }

    /// One door tick: expire idle sessions, start a liveness epoch every `queue_grace`, and
    /// admit what the rate, the room's capacity and the origin allow.
    pub fn tick(&self, now: Instant) {
        let expired = self
            .state
            .sessions_expire(now.checked_sub(self.cfg.session_idle).unwrap_or(now));
        self.stats
            .sessions_expired
            .fetch_add(expired, Ordering::Relaxed);
        let mut d = self.door();
        let dt = now.duration_since(d.last).as_secs_f64();
        d.last = now;
        let per_s = self.cfg.new_sessions_per_minute as f64 / 60.0;
        d.budget = (d.budget + per_s * dt).min(per_s.max(1.0));
        let share = per_s * self.state.walk_in_share();
        d.walk_in = (d.walk_in + share * dt).min(share.max(1.0));
        let claimed_elsewhere = self.state.take_remote_claims();
        take_unclaimed(&mut d, claimed_elsewhere);
        // Liveness slices on a fixed grid (`epoch_started` moves by whole slices), so a late
        // tick never stretches a slice and a waiter's grace stays exactly `queue_grace`.
        let per = self.state.rotations_per_grace();
        let slice = (self.cfg.queue_grace / per).max(Duration::from_millis(1));
        let mut turns = 0;
        while now.duration_since(d.epoch_started) >= slice && turns <= per {
            d.epoch_started += slice;
            self.state.rotate();
            turns += 1;
        }
        if turns > per {
            // Far behind (a stalled tick): every slice has turned over; start the grid now.
            d.epoch_started = now;
        }
        let grace = self.cfg.queue_grace;
        while d
            .unclaimed
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > grace)
        {
            d.unclaimed.pop_front();
        }
        let active = self.state.sessions() + unclaimed(&d);
        let room_left = self.cfg.max_active_sessions.saturating_sub(active);
        let ms = (dt * 1000.0) as u64;
        if !self.opened.load(Ordering::Acquire) {
            if self.cfg.opens_at.is_some_and(|o| SystemTime::now() < o) {
                // The pre-queue: everyone takes a ticket, nobody is let in yet.
                self.stats
                    .closed_prequeue_ms
                    .fetch_add(ms, Ordering::Relaxed);
                d.budget = d.budget.min(1.0);
                return;
            }
            if self.cfg.order == crate::config::room::RoomOrder::ShufflePrequeue {
                self.state.shuffle_prequeue(random_id());
                tracing::info!(room = %self.cfg.name, shuffled = self.state.waiting(),
                    "waiting room opened: the pre-queue is let in in a random order");
            }
            self.opened.store(true, Ordering::Release);
        }
        let slots = if room_left == 0 {
            self.stats.closed_full_ms.fetch_add(ms, Ordering::Relaxed);
            0
        } else if self.origin_busy() {
            self.stats.closed_origin_ms.fetch_add(ms, Ordering::Relaxed);
            0
        } else {
            (d.budget.floor() as u64).min(room_left)
        };
        let (admitted, skipped) = if slots > 0 || self.state.waiting() == 0 {
            self.state.advance(slots)
        } else {
            (0, 0)
        };
        // A follower's `admitted` is what the leader let in: not this door's budget to spend.
        if self.state.leads() {
            d.budget -= admitted as f64;
        }
        if admitted > 0 {
            d.unclaimed.push_back((now, admitted));
        }
        // The ETA follows what the door actually did while people waited.
        if dt > 0.0 && (admitted > 0 || self.state.waiting() > 0) {
            let alpha = (dt / 10.0).min(1.0);
            d.rate = d.rate * (1.0 - alpha) + (admitted as f64 / dt) * alpha;
        }
        // A fleet's admissions are counted by the door that made them (summing the fleet's
        // metrics counts each once).
        if self.state.leads() {
            self.stats.admitted.fetch_add(admitted, Ordering::Relaxed);
            self.stats.abandoned.fetch_add(skipped, Ordering::Relaxed);
        }
    }

    /// Live waiters and active sessions now, for the metrics.
    pub fn snapshot(&self) -> (u64, u64) {
        let d = self.door();
        (self.state.waiting(), self.state.sessions() + unclaimed(&d))
    }
}

/// The value of the cookie `name` in the request, if it carries one.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// `/sale` covers `/sale` and `/sale/...`, not `/sales` (paths arrive normalised).
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// `n` admitted tickets came back for their passes.
fn take_unclaimed(d: &mut Door, mut n: u64) {
    for front in d.unclaimed.iter_mut() {
        if n == 0 {
            break;
        }
        let k = front.1.min(n);
        front.1 -= k;
        n -= k;
    }
}

fn unclaimed(d: &Door) -> u64 {
    d.unclaimed.iter().map(|(_, n)| n).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The door's tick driven with made-up instants: liveness slices stay on their grid, so a
    /// waiter that stops polling is passed over a grace plus at most two ticks after its last
    /// poll, and one that polls every second never is.
    #[test]
    fn an_abandoned_place_is_found_two_ticks_after_its_grace() {
        let toml = "[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n[[waiting_room]]\n\
                    name = \"drop\"\nqueue_grace = \"4s\"\nrefresh = \"1s\"\n\
                    opens_at = \"2999-01-01T00:00:00Z\"\n";
        let cfg = crate::config::Config::parse(toml, "test.toml").unwrap();
        let grace = cfg.rooms[0].queue_grace;
        let room = Room::new(cfg.rooms[0].clone(), None, None, false);
        let start = Instant::now();
        let keeps = room.state.issue();
        let _leaves = room.state.issue();
        let mut gone_at = None;
        // 10 s of ticks (the door shut until its opening, so nobody is let in).
        for i in 1..=40u32 {
            let now = start + TICK * i;
            if i % 4 == 0 {
                room.state.touch(keeps);
            }
            room.tick(now);
            if gone_at.is_none() && room.state.waiting() < 2 {
                gone_at = Some(now - start);
            }
        }
        let gone_at = gone_at.expect("the abandoned place was never found");
        assert!(
            gone_at >= grace && gone_at <= grace + TICK * 2,
            "found {gone_at:?} after the last poll, grace {grace:?}"
        );
        assert_eq!(room.state.waiting(), 1, "the polling waiter lost its place");
    }
}
