//! The waiting rooms' families, read at scrape time from each room's counters.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::{counter, family, gauge};

/// The waiting rooms: the line, the door and what waiters were shown.
pub(super) fn encode_rooms(
    enc: &mut DescriptorEncoder,
    rooms: &[Arc<crate::room::Room>],
) -> Result<(), std::fmt::Error> {
    if rooms.is_empty() {
        return Ok(());
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let l = |r: &crate::room::Room| vec![("room", r.cfg.name.clone())];
    let with = |r: &crate::room::Room, k: &'static str, v: &str| {
        let mut x = l(r);
        x.push((k, v.to_string()));
        x
    };
    let snaps: Vec<(u64, u64)> = rooms.iter().map(|r| r.snapshot()).collect();
    gauge(
        enc,
        "breakwater_room_mode",
        "The room's mode: 0 auto, 1 queue_all, 2 passthrough, 3 reject.",
        rooms
            .iter()
            .map(|r| {
                let m = match r.cfg.mode {
                    crate::config::room::RoomMode::Auto => 0,
                    crate::config::room::RoomMode::QueueAll => 1,
                    crate::config::room::RoomMode::Passthrough => 2,
                    crate::config::room::RoomMode::Reject => 3,
                };
                (l(r), m)
            })
            .collect(),
    )?;
    gauge(
        enc,
        "breakwater_room_waiting",
        "Tickets in line that are still polling (a line shared by a fleet: the whole line, on every instance; do not sum).",
        rooms
            .iter()
            .zip(&snaps)
            .map(|(r, s)| (l(r), s.0 as i64))
            .collect(),
    )?;
    gauge(
        enc,
        "breakwater_room_active_sessions",
        "Shoppers admitted and not yet idle, revoked or expired (admitted tickets not yet back for their pass included; a line shared by a fleet: the fleet's, on every instance; do not sum).",
        rooms.iter().zip(&snaps).map(|(r, s)| (l(r), s.1 as i64)).collect(),
    )?;
    counter(
        enc,
        "breakwater_room_tickets",
        "Tickets issued, and refused (tickets_per_ip reached: answered without a place).",
        rooms
            .iter()
            .flat_map(|r| {
                [
                    (with(r, "result", "issued"), load(&r.stats.tickets_issued)),
                    (with(r, "result", "refused"), load(&r.stats.tickets_refused)),
                ]
            })
            .collect(),
    )?;
    counter(
        enc,
        "breakwater_room_admitted",
        "Shoppers let in: by the door from the line, or at once (the room was not queueing).",
        rooms
            .iter()
            .flat_map(|r| {
                [
                    (with(r, "how", "door"), load(&r.stats.admitted)),
                    (with(r, "how", "at_once"), load(&r.stats.admitted_at_once)),
                ]
            })
            .collect(),
    )?;
    counter(
        enc,
        "breakwater_room_ended",
        "Places and sessions that ended: tickets abandoned (not polling when their turn came), sessions revoked by the origin, sessions expired (idle).",
        rooms
            .iter()
            .flat_map(|r| {
                [
                    (with(r, "how", "abandoned"), load(&r.stats.abandoned)),
                    (with(r, "how", "revoked"), load(&r.stats.revoked)),
                    (with(r, "how", "expired"), load(&r.stats.sessions_expired)),
                ]
            })
            .collect(),
    )?;
    counter(
        enc,
        "breakwater_room_pages",
        "Waiting answers served from memory, by kind.",
        rooms
            .iter()
            .flat_map(|r| {
                [
                    (with(r, "kind", "html"), load(&r.stats.pages_html)),
                    (with(r, "kind", "json"), load(&r.stats.pages_json)),
                ]
            })
            .collect(),
    )?;
    counter(
        enc,
        "breakwater_room_bypassed",
        "Requests let past the line by a signed Breakwater-Room-Bypass header.",
        rooms
            .iter()
            .map(|r| (l(r), load(&r.stats.bypassed)))
            .collect(),
    )?;
    counter(
        enc,
        "breakwater_room_invalid_tokens",
        "Tokens refused, by reason (a pass that expired or was revoked, or a bypass past its time, counts as expired; wrong_address: bound to another client prefix).",
        rooms
            .iter()
            .flat_map(|r| {
                crate::room::INVALID_REASONS
                    .iter()
                    .enumerate()
                    .map(|(i, why)| (with(r, "reason", why), load(&r.stats.invalid[i])))
                    .collect::<Vec<_>>()
            })
            .collect(),
    )?;
    family(
        enc,
        "breakwater_room_door_closed_seconds",
        "Time the door admitted nobody although people waited, by reason: full (max_active_sessions), origin (the pool's queue wait above max_queue_wait), not_open (before opens_at).",
        MetricType::Counter,
        rooms
            .iter()
            .flat_map(|r| {
                [
                    (
                        with(r, "reason", "full"),
                        prometheus_client::metrics::counter::ConstCounter::new(
                            load(&r.stats.closed_full_ms) as f64 / 1000.0,
                        ),
                    ),
                    (
                        with(r, "reason", "origin"),
                        prometheus_client::metrics::counter::ConstCounter::new(
                            load(&r.stats.closed_origin_ms) as f64 / 1000.0,
                        ),
                    ),
                    (
                        with(r, "reason", "not_open"),
                        prometheus_client::metrics::counter::ConstCounter::new(
                            load(&r.stats.closed_prequeue_ms) as f64 / 1000.0,
                        ),
                    ),
                ]
            })
            .collect(),
    )?;
    family(
        enc,
        "breakwater_room_wait_seconds",
        "How long admitted shoppers waited in line (ticket to pass).",
        MetricType::Histogram,
        rooms.iter().map(|r| (l(r), r.stats.wait.clone())).collect(),
    )?;
    // A fleet's shared line (`[fleet] share_rooms`): which instance moves the door, and tickets
    // numbered without a lease from the store's counter.
    let shared: Vec<_> = rooms
        .iter()
        .filter_map(|r| r.shared().map(|s| (r, s)))
        .collect();
    if shared.is_empty() {
        return Ok(());
    }
    gauge(
        enc,
        "breakwater_room_door_leader",
        "1 where this instance's door moves the fleet's shared line (one instance at a time; every instance while the store is unreachable).",
        shared.iter().map(|(r, _)| (l(r), i64::from(r.leads()))).collect(),
    )?;
    counter(
        enc,
        "breakwater_room_tickets_unleased",
        "Tickets numbered here without a lease from the fleet's counter (a burst beyond the lease, or no store): such a number may be shared with another instance's ticket.",
        shared
            .iter()
            .map(|(r, s)| (l(r), load(&s.unleased)))
            .collect(),
    )
}
