//! `[fleet]`: several instances sharing their per-client limits and bans through Redis (see
//! `fleet.rs`). The file's shape, its defaults (one `impl Default`, the pattern issue #8 asks
//! of every section) and its validation; every error names the key.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::file::Dur;
use super::{ConfigError, Warnings};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileFleet {
    pub redis_url: Option<Spanned<String>>,
    pub redis_url_file: Option<Spanned<String>>,
    pub namespace: Spanned<String>,
    pub instance: Option<Spanned<String>>,
    pub sync_interval: Spanned<Dur>,
    pub sync_timeout: Spanned<Dur>,
    pub epoch: Spanned<Dur>,
    pub degraded_factor: Spanned<f64>,
    pub share_rooms: bool,
    pub bans: FileBans,
}

impl Default for FileFleet {
    fn default() -> Self {
        let d = FleetConfig::default();
        FileFleet {
            redis_url: None,
            redis_url_file: None,
            namespace: Spanned::new(0..0, d.namespace),
            instance: None,
            sync_interval: Spanned::new(0..0, Dur(d.sync_interval)),
            sync_timeout: Spanned::new(0..0, Dur(d.sync_timeout)),
            epoch: Spanned::new(0..0, Dur(d.epoch)),
            degraded_factor: Spanned::new(0..0, d.degraded_factor),
            share_rooms: d.share_rooms,
            bans: FileBans::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileBans {
    pub after_rejections: u32,
    pub window: Spanned<Dur>,
    pub duration: Spanned<Dur>,
}

impl Default for FileBans {
    fn default() -> Self {
        let d = BansConfig::default();
        FileBans {
            after_rejections: d.after_rejections,
            window: Spanned::new(0..0, Dur(d.window)),
            duration: Spanned::new(0..0, Dur(d.duration)),
        }
    }
}

/// `[fleet]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Where the fleet's counters live; `None`: no store, this instance's limits are its own
    /// (bans still apply here).
    pub redis_url: Option<String>,
    /// Prefix of every key and channel, so several fleets can share one Redis.
    pub namespace: String,
    /// This instance's name in logs and in the store; default host name and pid.
    pub instance: String,
    /// How often this instance's admissions are sent and the fleet's totals read back.
    pub sync_interval: Duration,
    /// A sync slower than this is dropped; its counts go with the next one.
    pub sync_timeout: Duration,
    /// The counting window in the store (counters expire after three of them).
    pub epoch: Duration,
    /// While the store is unreachable, each instance runs at this share of the per-client
    /// rates (1.0: a fleet of N admits up to N times the limit; 1/N: never more than the limit,
    /// some under-admission).
    pub degraded_factor: f64,
    /// With a store, the waiting rooms form one line across the fleet (`room/state/shared.rs`).
    pub share_rooms: bool,
    pub bans: BansConfig,
}

/// `[fleet.bans]`: a client key that keeps hitting its rate limit is refused outright for a
/// while, on every instance.
#[derive(Debug, Clone, PartialEq)]
pub struct BansConfig {
    /// Rate-limit rejections within `window` that ban a client; 0: no bans.
    pub after_rejections: u32,
    pub window: Duration,
    pub duration: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            redis_url: None,
            namespace: "breakwater".into(),
            instance: default_instance(),
            sync_interval: Duration::from_millis(50),
            sync_timeout: Duration::from_millis(250),
            epoch: Duration::from_secs(10),
            degraded_factor: 1.0,
            share_rooms: true,
            bans: BansConfig::default(),
        }
    }
}

impl Default for BansConfig {
    fn default() -> Self {
        BansConfig {
            after_rejections: 0,
            window: Duration::from_secs(10),
            duration: Duration::from_secs(300),
        }
    }
}

impl FleetConfig {
    /// Shares limits through a store (rather than only banning locally).
    pub fn shared(&self) -> bool {
        self.redis_url.is_some()
    }

    /// The waiting rooms' lines are kept in the store.
    pub fn rooms_shared(&self) -> bool {
        self.shared() && self.share_rooms
    }

    /// The store's URL as printed: without its password.
    pub fn shown_url(&self) -> Option<String> {
        let url = self.redis_url.as_deref()?;
        Some(
            redis::parse_redis_url(url).map_or("redis_url".to_string(), |mut u| {
                let _ = u.set_password(None);
                u.to_string()
            }),
        )
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!(
        "{}-{}",
        if host.is_empty() { "breakwater" } else { &host },
        std::process::id()
    )
}

/// Reads and checks `[fleet]`; `None` when the section is absent.
pub(super) fn validate(
    f: Option<FileFleet>,
    warnings: &Warnings<'_>,
) -> Result<Option<FleetConfig>, ConfigError> {
    let Some(f) = f else {
        return Ok(None);
    };
    let err = warnings.err;
    let redis_url = match (f.redis_url, f.redis_url_file) {
        (Some(_), Some(file)) => {
            return Err(err(
                file.span(),
                "redis_url and redis_url_file are both set: keep one".into(),
            ))
        }
        (Some(u), None) => Some((u.span(), u.into_inner())),
        // A secret mounted as a file (the URL may carry a password).
        (None, Some(file)) => match std::fs::read_to_string(file.get_ref()) {
            Ok(t) if !t.trim().is_empty() => Some((file.span(), t.trim().to_string())),
            Ok(_) => {
                return Err(err(
                    file.span(),
                    format!("redis_url_file {:?} is empty", file.get_ref()),
                ))
            }
            Err(e) => {
                return Err(err(
                    file.span(),
                    format!("cannot read redis_url_file {:?}: {e}", file.get_ref()),
                ))
            }
        },
        (None, None) => None,
    };
    let redis_url = match redis_url {
        None => None,
        Some((span, url)) => {
            let ok = redis::parse_redis_url(&url)
                .is_some_and(|u| matches!(u.scheme(), "redis" | "rediss" | "redis+unix" | "unix"));
            if !ok {
                return Err(err(
                    span,
                    "redis_url is not a Redis URL: expected \"redis://host:port/db\" (or \
                     rediss:// or unix://)"
                        .into(),
                ));
            }
            Some(url)
        }
    };
    let ns = f.namespace.get_ref().trim().to_string();
    if ns.is_empty()
        || !ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(err(
            f.namespace.span(),
            format!("namespace {ns:?} must be letters, digits, '-', '_', '.' or ':'"),
        ));
    }
    let instance = match f.instance {
        Some(i) if i.get_ref().trim().is_empty() => {
            return Err(err(
                i.span(),
                "instance is empty: remove it (host name and pid) or name this instance".into(),
            ))
        }
        Some(i) => i.into_inner().trim().to_string(),
        None => default_instance(),
    };
    let dur = |d: &Spanned<Dur>| d.get_ref().0;
    let (interval, timeout, epoch) = (dur(&f.sync_interval), dur(&f.sync_timeout), dur(&f.epoch));
    if !(Duration::from_millis(5)..=Duration::from_secs(10)).contains(&interval) {
        return Err(err(
            f.sync_interval.span(),
            "sync_interval must be between 5ms and 10s".into(),
        ));
    }
    if timeout < Duration::from_millis(1) || timeout > Duration::from_secs(30) {
        return Err(err(
            f.sync_timeout.span(),
            "sync_timeout must be between 1ms and 30s".into(),
        ));
    }
    if epoch < Duration::from_secs(1) || epoch < interval * 10 || epoch.subsec_nanos() != 0 {
        return Err(err(
            f.epoch.span(),
            "epoch must be whole seconds, at least 1s and at least 10 sync intervals".into(),
        ));
    }
    let factor = *f.degraded_factor.get_ref();
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(err(
            f.degraded_factor.span(),
            format!(
                "degraded_factor {factor} is out of range: expected more than 0 and at most 1 \
                 (e.g. 0.25 in a fleet of 4 keeps the fleet at the limit while Redis is down)"
            ),
        ));
    }
    let b = f.bans;
    for (key, d) in [("window", &b.window), ("duration", &b.duration)] {
        if d.get_ref().0 < Duration::from_secs(1) {
            return Err(err(
                d.span(),
                format!("[fleet.bans] {key} must be at least 1s"),
            ));
        }
    }
    Ok(Some(FleetConfig {
        redis_url,
        namespace: ns,
        instance,
        sync_interval: interval,
        sync_timeout: timeout,
        epoch,
        degraded_factor: factor,
        share_rooms: f.share_rooms,
        bans: BansConfig {
            after_rejections: b.after_rejections,
            window: dur(&b.window),
            duration: dur(&b.duration),
        },
    }))
}
