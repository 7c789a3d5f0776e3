//! ② Admission: keep or drop a new connection right after accept, before anything is spent on
//! it. A refused connection gets no task, no buffer and no HTTP work; it is reset (or closed)
//! inline in the accept loop. An admitted one carries `Admitted`, the guards for its global and
//! per-client slots, which its connection task owns until it ends.
//!
//! Order of checks: deny list, allow list (skips the per-client limits), per-client connection
//! rate, per-client concurrency. The global cap is not a rejection: at `max_connections` the
//! accept loops stop accepting and the kernel's backlog absorbs the excess, as HAProxy does
//! with maxconn. SO_REUSEPORT spreads one client over every shard, so all of this state is
//! shared by all accept loops.
//!
//! Why this file is ~550 lines: `Admission` is one decision made under one policy snapshot
//! (lists, rate, caps), and its counters and housekeeping read the same state; each limit
//! already lives in `admission/`. The next split is `Stats` and `housekeeping` into
//! `admission/stats.rs`.

pub mod conn_limit;
pub mod fd;
pub mod global_cap;
pub mod rate_limit;
pub mod shared_rate;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;

use crate::client::Client;
use crate::config::{AdmissionConfig, RejectMode};
use conn_limit::ConnLimit;
use global_cap::GlobalCap;
use rate_limit::RateLimit;
use shared_rate::{SharedRate, Verdict};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Deny,
    Rate,
    PerIpCap,
    /// Banned for repeatedly hitting the rate limit (`[fleet.bans]`), here or on another
    /// instance of the fleet.
    Banned,
}

/// A place under the global cap, taken before accept; given back on drop. It holds the one
/// `Arc` an admitted connection needs for all its slots (refcounts bounce between cores on the
/// accept path, so there is one, not one per limit).
#[derive(Debug)]
pub struct GlobalSlot(Arc<Admission>);

impl Drop for GlobalSlot {
    fn drop(&mut self) {
        self.0.global.release();
    }
}

/// The slots an admitted connection holds; dropping it gives them back.
#[derive(Debug)]
pub struct Admitted {
    /// Who the connection is from, as every later stage sees it.
    pub client: Client,
    /// The per-client slot's key, when one was taken.
    per_ip: Option<IpAddr>,
    global: GlobalSlot,
    /// The client's open connections, this one included, when it was admitted; 0 where they
    /// are not counted (`per_ip_max_connections` off, or an exempt client). 1 is a newcomer
    /// (the express lane); more, a client that may be parked while the queues are full.
    pub open_from_client: u32,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(key) = self.per_ip {
            self.global.0.per_ip.release(key);
        }
    }
}

impl crate::client::RequestGate for Admission {
    fn client(&self, peer: SocketAddr, addr: IpAddr) -> Client {
        Admission::client(self, peer, addr)
    }

    fn check_request(&self, client: &Client) -> bool {
        Admission::check_request(self, client)
    }
}

/// Counters since start, read by the reject log and the metrics.
#[derive(Debug)]
pub struct Stats {
    pub rejected_deny: AtomicU64,
    pub rejected_rate: AtomicU64,
    pub rejected_per_ip_cap: AtomicU64,
    pub rejected_banned: AtomicU64,
    /// On a PROXY-protocol listener: a peer outside `proxy_protocol_from`.
    pub rejected_proxy_source: AtomicU64,
    /// On a PROXY-protocol listener: no valid header within the timeout.
    pub rejected_proxy_header: AtomicU64,
    /// Dry run: connections that would have been rejected.
    pub would_reject: AtomicU64,
    pub global_cap_pauses: AtomicU64,
    pub requests_limited: AtomicU64,
    pub accept_fd_exhausted: AtomicU64,
    /// Failed accepts by errno name.
    pub accept_errors: [(&'static str, AtomicU64); 6],
    /// Accept-loop sleeps after resource errors.
    pub accept_backoffs: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Stats {
            rejected_deny: z(),
            rejected_rate: z(),
            rejected_per_ip_cap: z(),
            rejected_banned: z(),
            rejected_proxy_source: z(),
            rejected_proxy_header: z(),
            would_reject: z(),
            global_cap_pauses: z(),
            requests_limited: z(),
            accept_fd_exhausted: z(),
            accept_errors: [
                ("EMFILE", z()),
                ("ENFILE", z()),
                ("ENOBUFS", z()),
                ("ENOMEM", z()),
                ("ECONNABORTED", z()),
                ("other", z()),
            ],
            accept_backoffs: z(),
        }
    }
}

impl Stats {
    pub fn count_accept_error(&self, errno: Option<i32>) {
        let name = match errno {
            Some(libc::EMFILE) => "EMFILE",
            Some(libc::ENFILE) => "ENFILE",
            Some(libc::ENOBUFS) => "ENOBUFS",
            Some(libc::ENOMEM) => "ENOMEM",
            Some(libc::ECONNABORTED) => "ECONNABORTED",
            _ => "other",
        };
        if let Some((_, c)) = self.accept_errors.iter().find(|(n, _)| *n == name) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("open", &self.global.open())
            .finish_non_exhaustive()
    }
}

pub struct Admission {
    /// What a config reload may change, swapped whole (one lock-free load per decision).
    policy: ArcSwap<Policy>,
    per_ip: ConnLimit,
    global: GlobalCap,
    paused: AtomicBool,
    pub reserve: fd::Reserve,
    pub stats: Stats,
}

/// The reloadable part of admission. Rate limiters are kept across a reload when their rate and
/// burst did not change, so a reload does not hand every client a fresh burst.
struct Policy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    ipv6_prefix: u8,
    dry_run: bool,
    reject: RejectMode,
    conn_rate: Option<Limiter>,
    request_rate: Option<Limiter>,
    /// (rate, burst, shared) of each limiter, to tell whether a reload changed it.
    conn_rate_cfg: (u32, u32, bool),
    request_rate_cfg: (u32, u32, bool),
}

/// A per-client rate limit: this instance's alone (governor), or one budget shared by a fleet
/// (see `shared_rate.rs` for why that one is not governor).
#[derive(Clone)]
enum Limiter {
    Local(Arc<RateLimit>),
    Shared(Arc<SharedRate>),
}

impl Limiter {
    fn new((rate, burst, shared): (u32, u32, bool)) -> Option<Limiter> {
        if shared {
            SharedRate::new(rate, burst).map(|l| Limiter::Shared(Arc::new(l)))
        } else {
            RateLimit::new(rate, burst).map(|l| Limiter::Local(Arc::new(l)))
        }
    }

    fn check(&self, key: IpAddr) -> Verdict {
        match self {
            Limiter::Local(l) if l.check(key) => Verdict::Pass,
            Limiter::Local(_) => Verdict::Limited,
            Limiter::Shared(s) => s.check(key),
        }
    }

    fn prune(&self) {
        match self {
            Limiter::Local(l) => l.prune(),
            Limiter::Shared(s) => s.prune(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Limiter::Local(l) => l.len(),
            Limiter::Shared(s) => s.len(),
        }
    }

    fn shared(&self) -> Option<Arc<SharedRate>> {
        match self {
            Limiter::Local(_) => None,
            Limiter::Shared(s) => Some(s.clone()),
        }
    }
}

impl Policy {
    fn new(cfg: &AdmissionConfig, old: Option<&Policy>) -> Policy {
        let conn_rate_cfg = (cfg.per_ip_rate, cfg.per_ip_burst, cfg.shared_limits);
        let request_rate_cfg = (
            cfg.per_ip_request_rate,
            cfg.per_ip_request_burst,
            cfg.shared_limits,
        );
        let keep = |same: bool, old: Option<&Option<Limiter>>, rate| match old {
            Some(o) if same => o.clone(),
            _ => Limiter::new(rate),
        };
        Policy {
            allow: cfg.allow.clone(),
            deny: cfg.deny.clone(),
            ipv6_prefix: cfg.ipv6_prefix,
            dry_run: cfg.dry_run,
            reject: cfg.reject,
            conn_rate: keep(
                old.is_some_and(|o| {
                    o.conn_rate_cfg == conn_rate_cfg && o.ipv6_prefix == cfg.ipv6_prefix
                }),
                old.map(|o| &o.conn_rate),
                conn_rate_cfg,
            ),
            request_rate: keep(
                old.is_some_and(|o| {
                    o.request_rate_cfg == request_rate_cfg && o.ipv6_prefix == cfg.ipv6_prefix
                }),
                old.map(|o| &o.request_rate),
                request_rate_cfg,
            ),
            conn_rate_cfg,
            request_rate_cfg,
        }
    }
}

impl Admission {
    pub fn new(cfg: &AdmissionConfig) -> Admission {
        Admission {
            policy: ArcSwap::from_pointee(Policy::new(cfg, None)),
            per_ip: ConnLimit::new(cfg.per_ip_max_connections),
            global: GlobalCap::new(cfg.max_connections as usize),
            paused: AtomicBool::new(false),
            reserve: fd::Reserve::new(),
            stats: Stats::default(),
        }
    }

    /// Applies a reloaded `[admission]`: lists, rates and caps change for the next decision;
    /// limiter state survives where the limit did not change; open connections keep their slots.
    pub fn reload(&self, cfg: &AdmissionConfig) {
        let old = self.policy.load();
        self.policy.store(Arc::new(Policy::new(cfg, Some(&old))));
        self.per_ip.set_max(cfg.per_ip_max_connections);
        self.global.set_max(cfg.max_connections as usize);
    }

    /// How a refused connection is closed.
    pub fn reject(&self) -> RejectMode {
        self.policy.load().reject
    }

    /// A global slot if one is free now.
    pub fn try_global_slot(self: &Arc<Self>) -> Option<GlobalSlot> {
        self.global.try_take().then(|| GlobalSlot(self.clone()))
    }

    /// A global slot, taken before accepting: at the cap this waits, so the accept loop stops
    /// taking connections off the kernel's queue. Logs once per episode, not per connection.
    pub async fn global_slot(self: &Arc<Self>) -> Option<GlobalSlot> {
        if let Some(p) = self.try_global_slot() {
            return Some(p);
        }
        if !self.paused.swap(true, Ordering::AcqRel) {
            self.stats.global_cap_pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max_connections = self.global.max(),
                "global connection cap reached: pausing accept; new connections wait in the \
                 kernel backlog"
            );
        }
        // The episode ends in `housekeeping`, once the count falls well below the cap: at the
        // cap every freed slot is taken at once, and logging each would be a line per connection.
        self.global.take().await;
        Some(GlobalSlot(self.clone()))
    }

    /// Open client connections now.
    pub fn open_connections(&self) -> usize {
        self.global.open()
    }

    /// The client at `addr` (reached through `peer`): its key and whether the allow list
    /// exempts it.
    pub fn client(&self, peer: SocketAddr, addr: IpAddr) -> Client {
        client_under(&self.policy.load(), peer, addr)
    }

    /// Decides on a freshly accepted connection from `addr` (the peer, or the address its
    /// PROXY header carries), which already holds `global`.
    pub fn admit(
        &self,
        peer: SocketAddr,
        addr: IpAddr,
        global: GlobalSlot,
    ) -> Result<Admitted, Rejected> {
        // One policy snapshot for the whole decision: one lock-free load per accept.
        let p = self.policy.load();
        let client = client_under(&p, peer, addr);
        let verdict = self.decide(&p, &client);
        match verdict {
            Ok((per_ip, open_from_client)) => Ok(Admitted {
                client,
                per_ip,
                global,
                open_from_client,
            }),
            Err(r) => {
                let counter = match r {
                    Rejected::Deny => &self.stats.rejected_deny,
                    Rejected::Rate => &self.stats.rejected_rate,
                    Rejected::PerIpCap => &self.stats.rejected_per_ip_cap,
                    Rejected::Banned => &self.stats.rejected_banned,
                };
                if p.dry_run {
                    self.stats.would_reject.fetch_add(1, Ordering::Relaxed);
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Ok(Admitted {
                        client,
                        per_ip: None,
                        global,
                        open_from_client: 0,
                    });
                }
                counter.fetch_add(1, Ordering::Relaxed);
                Err(r)
            }
        }
    }

    /// Whether `ip` is on the allow list (matched on the address itself, like deny).
    pub fn is_allowed(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        self.policy.load().allow.iter().any(|n| n.contains(&ip))
    }

    /// Admits the load balancer's own connection on a PROXY-protocol listener (a v2 LOCAL
    /// health check): it is trusted by `proxy_protocol_from`, so no per-client limit applies.
    pub fn admit_balancer(&self, peer: SocketAddr, global: GlobalSlot) -> Admitted {
        Admitted {
            client: Client::new(peer, peer.ip(), self.policy.load().ipv6_prefix, true),
            per_ip: None,
            global,
            open_from_client: 0,
        }
    }

    /// The per-client slot's key when one was taken.
    /// With it, the client's open connections now (0: not counted).
    fn decide(&self, p: &Policy, client: &Client) -> Result<(Option<IpAddr>, u32), Rejected> {
        // Lists match the address itself (`client.addr`): an entry more specific than
        // `ipv6_prefix` (a /128 deny) must still match. The grouped key is only for counting.
        if p.deny.iter().any(|n| n.contains(&client.addr)) {
            return Err(Rejected::Deny);
        }
        if client.key.exempt {
            return Ok((None, 0));
        }
        let key = client.key.ip;
        if let Some(rl) = &p.conn_rate {
            match rl.check(key) {
                Verdict::Pass => {}
                Verdict::Limited => return Err(Rejected::Rate),
                Verdict::Banned => return Err(Rejected::Banned),
            }
        }
        if self.per_ip.max() == 0 {
            return Ok((None, 0));
        }
        match self.per_ip.take(key) {
            Some(n) => Ok((Some(key), n)),
            None => Err(Rejected::PerIpCap),
        }
    }

    /// Per-client request rate over keep-alive and HTTP/2; false means answer 429.
    pub fn check_request(&self, client: &Client) -> bool {
        let p = self.policy.load();
        let Some(rl) = &p.request_rate else {
            return true;
        };
        if client.key.exempt || rl.check(client.key.ip) == Verdict::Pass {
            return true;
        }
        self.stats.requests_limited.fetch_add(1, Ordering::Relaxed);
        // In a dry run the request is counted, not refused.
        p.dry_run
    }

    /// The limiters a fleet shares (connection rate, request rate), as configured now; `None`
    /// where a limit is off or this instance is not in a fleet. The sync task reads them every
    /// tick, so a reload that replaces one is followed.
    pub fn shared_limits(&self) -> [Option<Arc<SharedRate>>; 2] {
        let p = self.policy.load();
        [
            p.conn_rate.as_ref().and_then(Limiter::shared),
            p.request_rate.as_ref().and_then(Limiter::shared),
        ]
    }

    /// Refuses the client key `key` at accept for `for_` (a fleet ban). False when there is no
    /// shared connection-rate limit to hold it.
    pub fn ban(&self, key: IpAddr, for_: Duration) -> bool {
        match self
            .policy
            .load()
            .conn_rate
            .as_ref()
            .and_then(Limiter::shared)
        {
            Some(s) => {
                s.ban(key, for_);
                true
            }
            None => false,
        }
    }

    /// Client keys banned now.
    pub fn banned(&self) -> usize {
        self.policy
            .load()
            .conn_rate
            .as_ref()
            .and_then(Limiter::shared)
            .map_or(0, |s| s.banned())
    }

    /// Drops rate-limiter state for clients that went quiet.
    pub fn prune(&self) {
        let p = self.policy.load();
        for rl in [&p.conn_rate, &p.request_rate].into_iter().flatten() {
            rl.prune();
        }
    }

    /// Client keys the limiters hold state for.
    pub fn tracked_keys(&self) -> usize {
        let p = self.policy.load();
        [&p.conn_rate, &p.request_rate]
            .into_iter()
            .flatten()
            .map(|r| r.len())
            .sum::<usize>()
            + self.per_ip.tracked()
    }

    /// Once a second: a summary line when connections were rejected (never one line per
    /// connection), and every `PRUNE_EVERY` the limiter pruning.
    pub async fn housekeeping(self: Arc<Self>) {
        const PRUNE_EVERY: u32 = 10;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = [0u64; 4];
        let mut n = 0u32;
        loop {
            tick.tick().await;
            let s = &self.stats;
            let now = [
                s.rejected_rate.load(Ordering::Relaxed),
                s.rejected_per_ip_cap.load(Ordering::Relaxed),
                s.rejected_deny.load(Ordering::Relaxed),
                s.requests_limited.load(Ordering::Relaxed),
            ];
            if now != last {
                let d: Vec<u64> = now.iter().zip(last).map(|(a, b)| a - b).collect();
                tracing::info!(
                    rate = d[0],
                    per_ip_cap = d[1],
                    deny = d[2],
                    requests_429 = d[3],
                    dry_run = self.policy.load().dry_run,
                    open = self.open_connections(),
                    "{} in the last second",
                    if self.policy.load().dry_run {
                        "would have rejected"
                    } else {
                        "rejected"
                    }
                );
                last = now;
            }
            let open = self.open_connections();
            if open < self.global.max() / 10 * 9 && self.paused.swap(false, Ordering::AcqRel) {
                tracing::info!(
                    open,
                    "global connection cap episode over: below 90% of max_connections"
                );
            }
            n += 1;
            if n.is_multiple_of(PRUNE_EVERY) {
                self.prune();
            }
        }
    }
}

/// The client at `addr` as `p` sees it: its key and whether the allow list exempts it.
fn client_under(p: &Policy, peer: SocketAddr, addr: IpAddr) -> Client {
    let raw = unmapped(addr);
    Client::new(
        peer,
        addr,
        p.ipv6_prefix,
        p.allow.iter().any(|n| n.contains(&raw)),
    )
}

pub use crate::client::{client_key, unmapped};
