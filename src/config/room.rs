//! `[[waiting_room]]`: a line at the door for a sale (see `room.rs`). The file's shape and its
//! validation; every error names the key.

use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::file::Dur;
use super::{parse_host_pattern, parse_nets, ConfigError, HostPattern, Warnings};

pub const DEFAULT_MAX_ACTIVE_SESSIONS: u64 = 2000;
pub const DEFAULT_NEW_SESSIONS_PER_MINUTE: u64 = 6000;
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(300);
pub const DEFAULT_QUEUE_GRACE: Duration = Duration::from_secs(60);
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(20);
pub const DEFAULT_TICKETS_PER_IP: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomMode {
    /// Queue only while demand exceeds the door (rate, active sessions, origin guard).
    #[default]
    Auto,
    /// Everyone without a pass takes a ticket, even when the door could admit them at once
    /// (before a sale opens).
    QueueAll,
    /// The room is off: every request goes through.
    Passthrough,
    /// The room is closed: nobody new gets in (sold out); passes still work.
    Reject,
}

/// In which order the line is let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomOrder {
    /// Ticket order.
    #[default]
    Fifo,
    /// Everyone who joined before `opens_at` is let in in a random order (the fastest bot is
    /// not first); later arrivals follow in ticket order.
    ShufflePrequeue,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoom {
    pub name: Spanned<String>,
    #[serde(default)]
    pub host: Option<Spanned<String>>,
    #[serde(default = "root")]
    pub path_prefix: Spanned<String>,
    #[serde(default)]
    pub mode: RoomMode,
    #[serde(default)]
    pub order: RoomOrder,
    #[serde(default)]
    pub opens_at: Option<Spanned<String>>,
    #[serde(default = "default_max_active")]
    pub max_active_sessions: Spanned<u64>,
    #[serde(default = "default_rate")]
    pub new_sessions_per_minute: Spanned<u64>,
    #[serde(default)]
    pub max_queue_wait: Option<Spanned<Dur>>,
    #[serde(default = "default_session_idle")]
    pub session_idle: Spanned<Dur>,
    #[serde(default)]
    pub session_max: Option<Spanned<Dur>>,
    #[serde(default = "default_queue_grace")]
    pub queue_grace: Spanned<Dur>,
    #[serde(default = "default_refresh")]
    pub refresh: Spanned<Dur>,
    #[serde(default = "default_tickets_per_ip")]
    pub tickets_per_ip: u32,
    #[serde(default = "no_binding")]
    pub bind_ipv4_prefix: Spanned<u8>,
    #[serde(default = "no_binding")]
    pub bind_ipv6_prefix: Spanned<u8>,
    #[serde(default)]
    pub keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub bypass_cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub bypass_paths: Vec<Spanned<String>>,
    #[serde(default = "default_api_paths")]
    pub api_paths: Vec<Spanned<String>>,
    #[serde(default)]
    pub page_template: Option<Spanned<String>>,
}

fn root() -> Spanned<String> {
    Spanned::new(0..0, "/".into())
}
fn default_max_active() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_MAX_ACTIVE_SESSIONS)
}
fn default_rate() -> Spanned<u64> {
    Spanned::new(0..0, DEFAULT_NEW_SESSIONS_PER_MINUTE)
}
fn default_session_idle() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_SESSION_IDLE))
}
fn default_queue_grace() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_QUEUE_GRACE))
}
fn default_refresh() -> Spanned<Dur> {
    Spanned::new(0..0, Dur(DEFAULT_REFRESH))
}
fn no_binding() -> Spanned<u8> {
    Spanned::new(0..0, 0)
}
fn default_tickets_per_ip() -> u32 {
    DEFAULT_TICKETS_PER_IP
}
fn default_api_paths() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "/api/".into())]
}

/// One waiting room, validated.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Letters, digits, '-' and '_': it goes into cookie names and tokens.
    pub name: String,
    pub host: Option<HostPattern>,
    pub path_prefix: String,
    pub mode: RoomMode,
    pub order: RoomOrder,
    /// Before this, everyone takes a ticket and nobody is let in (the pre-queue).
    pub opens_at: Option<std::time::SystemTime>,
    pub max_active_sessions: u64,
    pub new_sessions_per_minute: u64,
    /// The door closes while the pool's recent queue wait is above this.
    pub max_queue_wait: Option<Duration>,
    pub session_idle: Duration,
    pub session_max: Option<Duration>,
    pub queue_grace: Duration,
    pub refresh: Duration,
    /// Tickets one client address (IPv6 grouped as in admission) may take per minute.
    pub tickets_per_ip: u32,
    /// Tickets and passes are good only from the client's address prefix of this length (0:
    /// from anywhere): a place in line cannot be passed to, or sold to, another network.
    pub bind_ipv4_prefix: u8,
    pub bind_ipv6_prefix: u8,
    /// Signing keys: the first signs, all verify (rotation). Empty: a random key made at start
    /// (tickets and passes then do not survive a restart).
    pub keys: Vec<Vec<u8>>,
    pub bypass_cidrs: Vec<IpNet>,
    pub bypass_paths: Vec<String>,
    pub api_paths: Vec<String>,
    /// An HTML page of the operator's, read at load (placeholders are escaped when filled).
    pub page_template: Option<String>,
}

/// Reads and checks every `[[waiting_room]]`.
pub(super) fn validate(
    rooms: Vec<Spanned<FileRoom>>,
    shared: bool,
    warnings: &Warnings<'_>,
) -> Result<Vec<RoomConfig>, ConfigError> {
    let err = warnings.err;
    let mut out: Vec<RoomConfig> = Vec::new();
    for r in rooms {
        let r = r.into_inner();
        let name = r.name.get_ref().trim().to_string();
        let ok = !name.is_empty()
            && name.len() <= 32
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(err(
                r.name.span(),
                format!(
                    "waiting_room name {name:?} is not valid: expected 1 to 32 letters, digits, \
                     '-' or '_' (it names the room's cookie)"
                ),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                r.name.span(),
                format!("waiting_room {name:?} is defined twice: names must differ"),
            ));
        }
        let prefix = r.path_prefix.get_ref().clone();
        match crate::target::normalize_path(&prefix) {
            Ok(n) if n == prefix => {}
            _ => {
                return Err(err(
                    r.path_prefix.span(),
                    format!(
                        "path_prefix {prefix:?} must be a path in normal form, such as \
                         \"/checkout\""
                    ),
                ))
            }
        }
        let host = match &r.host {
            None => None,
            Some(h) => Some(parse_host_pattern(h.get_ref()).map_err(|m| err(h.span(), m))?),
        };
        if *r.max_active_sessions.get_ref() == 0 {
            return Err(err(
                r.max_active_sessions.span(),
                "max_active_sessions must be at least 1 (shoppers admitted at once)".into(),
            ));
        }
        if *r.new_sessions_per_minute.get_ref() == 0 {
            return Err(err(
                r.new_sessions_per_minute.span(),
                "new_sessions_per_minute must be at least 1 (the door's rate)".into(),
            ));
        }
        for (key, d, min) in [
            ("session_idle", &r.session_idle, Duration::from_secs(1)),
            ("queue_grace", &r.queue_grace, Duration::from_secs(1)),
            ("refresh", &r.refresh, Duration::from_secs(1)),
        ] {
            if d.get_ref().0 < min {
                return Err(err(d.span(), format!("{key} must be at least 1s")));
            }
        }
        if r.refresh.get_ref().0 >= r.queue_grace.get_ref().0 {
            return Err(err(
                r.refresh.span(),
                format!(
                    "refresh ({}) must be shorter than queue_grace ({}): a waiter who polls \
                     every refresh would otherwise lose its place between polls",
                    humantime::format_duration(r.refresh.get_ref().0),
                    humantime::format_duration(r.queue_grace.get_ref().0)
                ),
            ));
        }
        let mut keys = Vec::new();
        for k in &r.keys {
            match std::fs::read(k.get_ref()) {
                Ok(bytes) => {
                    let secret: Vec<u8> = bytes
                        .into_iter()
                        .filter(|b| !b.is_ascii_whitespace())
                        .collect();
                    if secret.len() < 32 {
                        return Err(err(
                            k.span(),
                            format!(
                                "key file {:?} holds {} bytes: a signing key needs at least 32 \
                                 (e.g. `openssl rand -hex 32 > {}`)",
                                k.get_ref(),
                                secret.len(),
                                k.get_ref()
                            ),
                        ));
                    }
                    keys.push(secret);
                }
                Err(e) => {
                    return Err(err(
                        k.span(),
                        format!("cannot read key file {:?}: {e}", k.get_ref()),
                    ))
                }
            }
        }
        if keys.is_empty() {
            warnings.push(
                r.name.span(),
                format!(
                    "waiting_room {name:?} has no keys: a random signing key is made at start, so \
                     tickets and passes do not survive a restart (and differ between instances)"
                ),
            );
        }
        let opens_at = match &r.opens_at {
            None => None,
            Some(t) => Some(
                humantime::parse_rfc3339_weak(t.get_ref().trim()).map_err(|_| {
                    err(
                        t.span(),
                        format!(
                            "opens_at {:?} is not a time: expected RFC 3339 in UTC, such as \
                         \"2026-12-01T10:00:00Z\"",
                            t.get_ref()
                        ),
                    )
                })?,
            ),
        };
        if r.order == RoomOrder::ShufflePrequeue && opens_at.is_none() {
            return Err(err(
                r.name.span(),
                format!(
                    "waiting_room {name:?} has order = \"shuffle_prequeue\" but no opens_at: \
                     the shuffle applies to everyone who joined before the opening"
                ),
            ));
        }
        if r.keys.is_empty() && shared {
            return Err(err(
                r.name.span(),
                format!(
                    "waiting_room {name:?} has no keys, but its line is shared by the fleet: \
                     every instance must verify the others' tokens. Set keys = [\"/path/key\"] \
                     (the same file on every instance; `openssl rand -hex 32`)"
                ),
            ));
        }
        if r.order == RoomOrder::ShufflePrequeue && shared {
            return Err(err(
                r.name.span(),
                format!(
                    "waiting_room {name:?} has order = \"shuffle_prequeue\", which a fleet's \
                     shared line does not offer yet: use order = \"fifo\", or set \
                     [fleet] share_rooms = false (each instance keeps its own line)"
                ),
            ));
        }
        for (key, v, max) in [
            ("bind_ipv4_prefix", &r.bind_ipv4_prefix, 32),
            ("bind_ipv6_prefix", &r.bind_ipv6_prefix, 128),
        ] {
            if *v.get_ref() > max {
                return Err(err(
                    v.span(),
                    format!(
                        "{key} {} is out of range: expected 0 (off) to {max}",
                        v.get_ref()
                    ),
                ));
            }
        }
        let page_template = match &r.page_template {
            None => None,
            Some(p) => Some(std::fs::read_to_string(p.get_ref()).map_err(|e| {
                err(
                    p.span(),
                    format!("cannot read page_template {:?}: {e}", p.get_ref()),
                )
            })?),
        };
        let paths = |list: &[Spanned<String>], key: &str| -> Result<Vec<String>, ConfigError> {
            list.iter()
                .map(|p| {
                    let v = p.get_ref();
                    if v.starts_with('/') {
                        Ok(v.clone())
                    } else {
                        Err(err(
                            p.span(),
                            format!("{key} entry {v:?} must start with \"/\""),
                        ))
                    }
                })
                .collect()
        };
        out.push(RoomConfig {
            name,
            host,
            path_prefix: prefix,
            mode: r.mode,
            order: r.order,
            opens_at,
            max_active_sessions: *r.max_active_sessions.get_ref(),
            new_sessions_per_minute: *r.new_sessions_per_minute.get_ref(),
            max_queue_wait: r.max_queue_wait.as_ref().map(|d| d.get_ref().0),
            session_idle: r.session_idle.get_ref().0,
            session_max: r.session_max.as_ref().map(|d| d.get_ref().0),
            queue_grace: r.queue_grace.get_ref().0,
            refresh: r.refresh.get_ref().0,
            tickets_per_ip: r.tickets_per_ip,
            bind_ipv4_prefix: *r.bind_ipv4_prefix.get_ref(),
            bind_ipv6_prefix: *r.bind_ipv6_prefix.get_ref(),
            keys,
            bypass_cidrs: parse_nets(&r.bypass_cidrs, warnings)?,
            bypass_paths: paths(&r.bypass_paths, "bypass_paths")?,
            api_paths: paths(&r.api_paths, "api_paths")?,
            page_template,
        });
    }
    Ok(out)
}
