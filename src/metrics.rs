//! Prometheus metrics: what the proxy counts as it goes (requests, durations, queue waits), and
//! what is read at scrape time (connection and pool state, the listening sockets' accept queues,
//! the kernel's own SYN/accept-queue counters, descriptors). Application metrics look fine while
//! a server drowns in handshakes; the kernel counters here are the ones that move first.
//!
//! Scrape-time values come from one `Collector`, so nothing is duplicated into a second set of
//! atomics on the hot path: the accept loop and the pool keep their own counters, and this
//! module only reads them.
//!
//! Why this file is still ~635 lines: it is one Prometheus collector that reads every stage's
//! counters at scrape time (connections, listeners, requests, TLS, pools, spools), and those
//! families share the encoding helpers. What stands apart is split out: the host's counters
//! (`metrics/host.rs`: kernel /proc and process_*) and the waiting rooms (`metrics/room.rs`).

mod fleet;
mod host;
mod room;

pub use host::{parse_proc_pairs, parse_sockstat};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::admission::Admission;
use crate::proxy::stats::RequestMetrics;
use crate::upstream::Upstream;

/// Status classes counted per upstream and per route: 1xx..5xx.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Config reloads since start, for the metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Unix seconds of the last successful reload (0: none yet).
    pub last_ok: AtomicU64,
}

impl ReloadStats {
    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.last_ok.store(now, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Builds the registry for one engine.
pub fn registry(
    admission: Arc<Admission>,
    shards: Arc<crate::listener::stats::Shards>,
    current: Arc<arc_swap::ArcSwap<crate::conn::Generation>>,
    tls: Arc<crate::conn::tls::TlsListeners>,
    reloads: Arc<ReloadStats>,
    fleet: Option<Arc<crate::fleet::Fleet>>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Snapshot {
        admission,
        shards,
        current,
        tls,
        reloads,
        fleet,
    }));
    r
}

/// Renders the registry in the Prometheus text format (0.0.4).
pub fn render(r: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, r);
    out
}

/// Reads the counters the stages keep, from the generation in force at each scrape.
struct Snapshot {
    admission: Arc<Admission>,
    shards: Arc<crate::listener::stats::Shards>,
    current: Arc<arc_swap::ArcSwap<crate::conn::Generation>>,
    tls: Arc<crate::conn::tls::TlsListeners>,
    reloads: Arc<ReloadStats>,
    fleet: Option<Arc<crate::fleet::Fleet>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

type Labels<'a> = Vec<(&'static str, String)>;

/// Writes one metric family with one sample per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Labels<'_>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels<'_>, i64)>,
) -> Result<(), std::fmt::Error> {
    family(
        enc,
        name,
        help,
        MetricType::Gauge,
        samples
            .into_iter()
            .map(|(l, v)| (l, ConstGauge::new(v)))
            .collect(),
    )
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels<'_>, u64)>,
) -> Result<(), std::fmt::Error> {
    family(
        enc,
        name,
        help,
        MetricType::Counter,
        samples
            .into_iter()
            .map(|(l, v)| (l, ConstCounter::new(v)))
            .collect(),
    )
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let a = &self.admission;
        let s = &a.stats;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let shards = self.shards.all();
        let shard_labels = |sh: &crate::listener::stats::ShardStats| {
            vec![
                ("listener", sh.listener.to_string()),
                ("shard", sh.shard.to_string()),
            ]
        };

        counter(
            &mut enc,
            "breakwater_connections_accepted",
            "Client connections admitted, by listener and accept shard.",
            shards
                .iter()
                .map(|sh| (shard_labels(sh), load(&sh.accepted)))
                .collect(),
        )?;
        counter(
            &mut enc,
            "breakwater_connections_rejected",
            "Client connections refused at accept, by reason (dry-run refusals included).",
            vec![
                (vec![("reason", "rate".into())], load(&s.rejected_rate)),
                (
                    vec![("reason", "per_ip_cap".into())],
                    load(&s.rejected_per_ip_cap),
                ),
                (vec![("reason", "deny".into())], load(&s.rejected_deny)),
                (vec![("reason", "banned".into())], load(&s.rejected_banned)),
                (
                    vec![("reason", "proxy_protocol_source".into())],
                    load(&s.rejected_proxy_source),
                ),
                (
                    vec![("reason", "proxy_protocol_header".into())],
                    load(&s.rejected_proxy_header),
                ),
            ],
        )?;
        counter(
            &mut enc,
            "breakwater_connections_would_reject",
            "Dry run: connections that would have been refused.",
            vec![(vec![], load(&s.would_reject))],
        )?;
        counter(
            &mut enc,
            "breakwater_global_cap_pauses",
            "Episodes in which the accept loops paused at max_connections.",
            vec![(vec![], load(&s.global_cap_pauses))],
        )?;
        gauge(
            &mut enc,
            "breakwater_connections_open",
            "Client connections open now.",
            vec![(vec![], a.open_connections() as i64)],
        )?;
        counter(
            &mut enc,
            "breakwater_accept_errors",
            "Failed accept calls, by errno.",
            s.accept_errors
                .iter()
                .map(|(errno, c)| (vec![("errno", (*errno).to_string())], load(c)))
                .collect(),
        )?;
        counter(
            &mut enc,
            "breakwater_accept_backoffs",
            "Accept-loop pauses after resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM).",
            vec![(vec![], load(&s.accept_backoffs))],
        )?;
        counter(
            &mut enc,
            "breakwater_requests_rate_limited",
            "Requests answered 429 for per_ip_request_rate.",
            vec![(vec![], load(&s.requests_limited))],
        )?;
        counter(
            &mut enc,
            "breakwater_express_connections",
            "Client connections served on the express lane (clients with nothing else open).",
            vec![(vec![], load(&self.shards.express_served))],
        )?;
        counter(
            &mut enc,
            "breakwater_express_unready_connections",
            "Newcomers served on the main runtime because their first request had not come whole by their accept (idle or trickling connections hold no express place).",
            vec![(vec![], load(&self.shards.express_unready))],
        )?;
        gauge(
            &mut enc,
            "breakwater_express_open_connections",
            "Client connections on the express lane now.",
            vec![(
                vec![],
                self.shards.express_open.load(Ordering::Relaxed) as i64,
            )],
        )?;
        gauge(
            &mut enc,
            "breakwater_accept_loops_on_lane",
            "Accept loops running on the express lane's thread now (the rest run on the workers; see [runtime] express_accept_above).",
            vec![(
                vec![],
                self.shards.accept_on_lane.load(Ordering::Relaxed) as i64,
            )],
        )?;
        counter(
            &mut enc,
            "breakwater_accept_loop_moves",
            "Times an accept loop moved between the workers and the express lane's thread.",
            vec![(vec![], load(&self.shards.accept_moves))],
        )?;
        counter(
            &mut enc,
            "breakwater_connections_parked",
            "Client connections that waited accepted but unread while the origin queues were full.",
            vec![(vec![], load(&self.shards.parked))],
        )?;
        gauge(
            &mut enc,
            "breakwater_parked_connections",
            "Client connections waiting accepted but unread now.",
            vec![(
                vec![],
                self.shards.parked_now.load(Ordering::Relaxed) as i64,
            )],
        )?;
        gauge(
            &mut enc,
            "breakwater_limiter_keys",
            "Client addresses the rate limiters and per-IP caps hold state for.",
            vec![(vec![], a.tracked_keys() as i64)],
        )?;

        let mut queued = Vec::new();
        let mut backlog = Vec::new();
        for sh in &shards {
            if let Some(q) = sh.listen_queue() {
                queued.push((shard_labels(sh), i64::from(q.queued)));
                backlog.push((shard_labels(sh), i64::from(q.backlog)));
            }
        }
        gauge(
            &mut enc,
            "breakwater_listen_queue_length",
            "Connections waiting in the listening socket's accept queue (TCP_INFO).",
            queued,
        )?;
        gauge(
            &mut enc,
            "breakwater_listen_backlog",
            "The listening socket's effective backlog, after the somaxconn cap (TCP_INFO).",
            backlog,
        )?;

        let gen = self.current.load_full();
        self.encode_requests(&mut enc, &gen.proxy.requests)?;
        self.encode_tls(&mut enc)?;
        self.encode_upstreams(&mut enc, &gen.proxy.upstreams)?;
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        room::encode_rooms(&mut enc, &gen.proxy.rooms)?;
        if let Some(f) = &self.fleet {
            fleet::encode_fleet(&mut enc, f, &self.admission)?;
        }
        let sp = &gen.proxy.spooler;
        let rb = &gen.proxy.request_budget;
        gauge(
            &mut enc,
            "breakwater_request_buffer_bytes",
            "Request body bytes held in read-ahead buffers now (state=in_use) and at most (state=limit, request_buffer_budget).",
            vec![
                (vec![("state", "in_use".into())], rb.in_use() as i64),
                (vec![("state", "limit".into())], rb.limit() as i64),
            ],
        )?;
        counter(
            &mut enc,
            "breakwater_request_buffer_refused",
            "Requests answered 503 because request_buffer_budget was spent.",
            vec![(vec![], load(&rb.refused))],
        )?;
        counter(
            &mut enc,
            "breakwater_spooled_responses",
            "Responses relayed through a spool (their origin connection freed once the origin finished), and those that went past spool_memory into a file.",
            vec![
                (vec![("to", "memory_or_file".into())], load(&sp.responses)),
                (vec![("to", "file".into())], load(&sp.to_file)),
            ],
        )?;
        counter(
            &mut enc,
            "breakwater_spooled_bytes",
            "Response bytes that passed through a spool.",
            vec![(vec![], load(&sp.bytes))],
        )?;
        gauge(
            &mut enc,
            "breakwater_spool_budget_bytes",
            "Bytes all spools hold now (state=in_use) and may hold (state=limit, spool_budget).",
            vec![
                (vec![("state", "in_use".into())], sp.in_use() as i64),
                (vec![("state", "limit".into())], sp.limit() as i64),
            ],
        )?;
        counter(
            &mut enc,
            "breakwater_spool_budget_exhausted",
            "Responses relayed unspooled (holding their origin connection) because spool_budget was spent.",
            vec![(vec![], load(&sp.exhausted))],
        )?;
        counter(
            &mut enc,
            "breakwater_send_progress_cuts",
            "Client connections closed because a response waiting for them made no progress for send_timeout (stalled) or went slower than min_send_rate (too_slow).",
            vec![
                (vec![("reason", "stalled".into())], load(&sp.stalled)),
                (vec![("reason", "too_slow".into())], load(&sp.too_slow)),
            ],
        )?;
        counter(
            &mut enc,
            "breakwater_config_reloads",
            "Config reloads (SIGHUP), by result; a failed one keeps the running config.",
            vec![
                (vec![("result", "ok".into())], load(&self.reloads.ok)),
                (vec![("result", "error".into())], load(&self.reloads.failed)),
            ],
        )?;
        gauge(
            &mut enc,
            "breakwater_config_last_reload_success_timestamp_seconds",
            "When the config was last reloaded successfully (0: never).",
            vec![(vec![], load(&self.reloads.last_ok) as i64)],
        )?;
        host::encode_kernel(&mut enc)?;
        host::encode_process(&mut enc)
    }
}

impl Snapshot {
    fn encode_tls(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.tls.all();
        if all.is_empty() {
            return Ok(());
        }
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (mut done, mut resumed, mut failed, mut hist) = (vec![], vec![], vec![], vec![]);
        for a in &all {
            let st = &a.stats;
            let l = vec![("listener", st.listener.to_string())];
            done.push((l.clone(), load(&st.completed)));
            resumed.push((l.clone(), load(&st.resumed)));
            for (i, reason) in crate::conn::tls::FAILURE_REASONS.iter().enumerate() {
                let mut l = l.clone();
                l.push(("reason", reason.to_string()));
                failed.push((l, load(&st.failed[i])));
            }
            hist.push((l, st.duration.clone()));
        }
        counter(
            enc,
            "breakwater_tls_handshakes",
            "TLS handshakes completed, by listener (resumed ones included).",
            done,
        )?;
        counter(
            enc,
            "breakwater_tls_handshakes_resumed",
            "TLS handshakes that resumed a session (ticket or cache).",
            resumed,
        )?;
        counter(enc, "breakwater_tls_handshake_failures", "TLS handshakes that failed, by reason: timeout, protocol (garbage or a TLS error), incompatible (no shared version or cipher), cleartext_http, io.", failed)?;
        family(
            enc,
            "breakwater_tls_handshake_duration_seconds",
            "Time from the first TLS byte to a completed handshake.",
            MetricType::Histogram,
            hist,
        )
    }

    fn encode_requests(
        &self,
        enc: &mut DescriptorEncoder,
        r: &RequestMetrics,
    ) -> Result<(), std::fmt::Error> {
        let labels = |i: usize| {
            vec![
                ("route", r.labels()[i].0.clone()),
                ("upstream", r.labels()[i].1.clone()),
            ]
        };
        let mut counts = Vec::new();
        for (i, (classes, _)) in r.by_route().iter().enumerate() {
            for (c, counter) in classes.iter().enumerate() {
                let mut l = labels(i);
                l.push(("status", CLASSES[c].to_string()));
                counts.push((l, counter.get()));
            }
        }
        counter(enc, "breakwater_requests", "Requests answered, by route, upstream (\"-\": answered by Breakwater before routing) and status class.", counts)?;
        family(
            enc,
            "breakwater_request_duration_seconds",
            "Time from request head to the end of the response body.",
            MetricType::Histogram,
            r.by_route()
                .iter()
                .enumerate()
                .map(|(i, (_, h))| (labels(i), h.clone()))
                .collect(),
        )
    }

    fn encode_upstreams(
        &self,
        enc: &mut DescriptorEncoder,
        upstreams: &[Arc<Upstream>],
    ) -> Result<(), std::fmt::Error> {
        let (mut open, mut idle, mut busy, mut healthy, mut depth) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut connects, mut failures, mut reuses, mut retries, mut timeouts, mut full) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut waits = Vec::new();
        let mut tunnels = Vec::new();
        let mut cancels = Vec::new();
        let mut paced = Vec::new();
        let mut panics = Vec::new();
        let mut cross = Vec::new();
        for u in upstreams {
            let (per_server, queue) = u.snapshot();
            for (i, (o, id, b)) in per_server.into_iter().enumerate() {
                let l = vec![
                    ("upstream", u.name.to_string()),
                    ("server", u.servers[i].addr.to_string()),
                ];
                open.push((l.clone(), o as i64));
                idle.push((l.clone(), id as i64));
                busy.push((l.clone(), b as i64));
                healthy.push((l, i64::from(u.servers[i].health.is_healthy())));
            }
            let l = vec![("upstream", u.name.to_string())];
            depth.push((l.clone(), queue as i64));
            tunnels.push((l.clone(), u.tunnels.open() as i64));
            let st = &u.stats;
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            connects.push((l.clone(), load(&st.connects)));
            failures.push((l.clone(), load(&st.connect_failures)));
            reuses.push((l.clone(), load(&st.reuses)));
            retries.push((l.clone(), load(&st.retries)));
            timeouts.push((l.clone(), load(&st.queue_timeouts)));
            full.push((l.clone(), load(&st.queue_full)));
            let with = |outcome: &str| {
                let mut l = l.clone();
                l.push(("outcome", outcome.to_string()));
                l
            };
            cancels.push((with("drained"), load(&st.cancel_drained)));
            cancels.push((with("closed"), load(&st.cancel_closed)));
            paced.push((l.clone(), load(&st.paced_connects)));
            panics.push((l.clone(), load(&st.panic_requests)));
            cross.push((l.clone(), load(&st.cross_core)));
            waits.push((l, st.queue_wait.clone()));
        }
        gauge(
            enc,
            "breakwater_tunnels_open",
            "WebSocket tunnels open, per upstream (each holds a client connection and a dedicated origin connection).",
            tunnels,
        )?;
        gauge(
            enc,
            "breakwater_upstream_connections_open",
            "Origin connections open (connecting included), per server.",
            open,
        )?;
        gauge(
            enc,
            "breakwater_upstream_connections_idle",
            "Origin connections idle in the pool, per server.",
            idle,
        )?;
        gauge(
            enc,
            "breakwater_upstream_connections_busy",
            "Requests holding an origin connection, per server.",
            busy,
        )?;
        gauge(
            enc,
            "breakwater_upstream_server_healthy",
            "1 when the server takes traffic, 0 when ejected.",
            healthy,
        )?;
        gauge(
            enc,
            "breakwater_upstream_queue_depth",
            "Requests waiting for an origin connection.",
            depth,
        )?;
        counter(
            enc,
            "breakwater_upstream_connects",
            "Origin connections opened.",
            connects,
        )?;
        counter(
            enc,
            "breakwater_upstream_connect_failures",
            "Origin connects that failed.",
            failures,
        )?;
        counter(
            enc,
            "breakwater_upstream_reuses",
            "Requests sent on an already-used origin connection.",
            reuses,
        )?;
        counter(
            enc,
            "breakwater_upstream_retries",
            "Requests retried after a dead pooled connection.",
            retries,
        )?;
        counter(
            enc,
            "breakwater_upstream_queue_timeouts",
            "Requests answered 503 after queue_timeout.",
            timeouts,
        )?;
        counter(
            enc,
            "breakwater_upstream_queue_full",
            "Requests answered 503 because the queue was full.",
            full,
        )?;
        counter(
            enc,
            "breakwater_upstream_abandoned_responses",
            "HTTP/1 origin responses their client abandoned mid-body: drained in the background and the connection kept, or closed (over 1 MiB or 1 s left).",
            cancels,
        )?;
        counter(
            enc,
            "breakwater_upstream_paced_connects",
            "Origin connects put off because the server's max_connect_rate was reached.",
            paced,
        )?;
        counter(
            enc,
            "breakwater_upstream_panic_requests",
            "Requests sent, one at a time, to the least recently failed server while every server was ejected.",
            panics,
        )?;
        counter(
            enc,
            "breakwater_upstream_cross_core_requests",
            "Requests sent on an origin connection driven by another thread-per-core runtime than the client's (each costs cross-thread wake-ups).",
            cross,
        )?;
        family(
            enc,
            "breakwater_upstream_queue_wait_seconds",
            "Time requests waited in the queue for a connection.",
            MetricType::Histogram,
            waits,
        )
    }
}
