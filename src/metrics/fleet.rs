//! Fleet mode's families (`fleet.rs`): whether the store answers, what the syncs cost and what
//! they changed, and the bans.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::{counter, family, gauge};
use crate::admission::Admission;
use crate::fleet::Fleet;

pub(super) fn encode_fleet(
    enc: &mut DescriptorEncoder,
    f: &Fleet,
    admission: &Admission,
) -> Result<(), std::fmt::Error> {
    let s = &f.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let one = |v: u64| vec![(vec![], v)];
    gauge(
        enc,
        "breakwater_fleet_up",
        "1 while limits are synced with the fleet's store; 0 while they run local (no store, or it is unreachable).",
        vec![(vec![], i64::from(s.up.load(Ordering::Relaxed)))],
    )?;
    counter(
        enc,
        "breakwater_fleet_syncs",
        "Sync pipelines answered by the store.",
        one(load(&s.syncs)),
    )?;
    counter(
        enc,
        "breakwater_fleet_room_syncs",
        "The waiting rooms' sync pipelines (one per 125 ms while a room's line is shared), by result.",
        vec![
            (vec![("result", "ok".into())], load(&s.room_syncs)),
            (vec![("result", "failed".into())], load(&s.room_sync_failures)),
        ],
    )?;
    counter(
        enc,
        "breakwater_fleet_sync_failures",
        "Sync pipelines that failed, by reason (timeout: slower than sync_timeout; error).",
        vec![
            (vec![("reason", "timeout".into())], load(&s.sync_timeouts)),
            (vec![("reason", "error".into())], load(&s.sync_errors)),
        ],
    )?;
    family(
        enc,
        "breakwater_fleet_sync_duration_seconds",
        "Time for one sync pipeline's round trip.",
        MetricType::Histogram,
        vec![(vec![], s.sync_seconds.clone())],
    )?;
    counter(
        enc,
        "breakwater_fleet_commands",
        "Commands sent to the store, all from the sync task (never from the accept or request paths).",
        one(load(&s.commands)),
    )?;
    counter(
        enc,
        "breakwater_fleet_keys_synced",
        "Client keys sent in sync pipelines.",
        one(load(&s.keys_synced)),
    )?;
    counter(
        enc,
        "breakwater_fleet_remote_debits",
        "Admissions by other instances charged to this instance's limiters.",
        one(load(&s.remote_debits)),
    )?;
    counter(
        enc,
        "breakwater_fleet_resets",
        "Times the store was found to have lost its counters (a restart); baselines were reset.",
        one(load(&s.resets)),
    )?;
    counter(
        enc,
        "breakwater_fleet_dropped_counts",
        "Admissions counted while the store was unreachable, not sent afterwards.",
        one(load(&s.dropped)),
    )?;
    counter(
        enc,
        "breakwater_fleet_degraded_episodes",
        "Times the limits switched to local because the store stopped answering.",
        one(load(&s.degraded_episodes)),
    )?;
    counter(
        enc,
        "breakwater_fleet_bans",
        "Bans decided here (and published), and received from other instances.",
        vec![
            (vec![("origin", "decided".into())], load(&s.bans_decided)),
            (vec![("origin", "received".into())], load(&s.bans_received)),
        ],
    )?;
    gauge(
        enc,
        "breakwater_fleet_bans_active",
        "Client keys banned now on this instance.",
        vec![(vec![], admission.banned() as i64)],
    )?;
    family(
        enc,
        "breakwater_fleet_ban_propagation_seconds",
        "From a ban decided on another instance to it applying here.",
        MetricType::Histogram,
        vec![(vec![], s.ban_propagation_seconds.clone())],
    )
}
