//! `breakwater doctor`: the host settings that decide whether a handshake storm is absorbed or
//! dropped, compared with what the config asks for. Reading is separate from judging, so the
//! judgement is tested on given values.
//!
//! Reading the host is `doctor/host.rs`'s.
//!
//! Why this file is ~600 lines: a third is tests; the rest is one table of host
//! settings, each compared with what the config needs and given a fix, in one place so the
//! table and its fixes stay in step.

mod host;

use serde::Serialize;

pub use host::{read_host, Container, HostFacts};

use crate::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Enough for this config.
    Ok,
    /// Does not cap the config, but a storm would go better with the fix.
    Advice,
    /// Caps what the config asks for.
    Caps,
    /// Could not be read.
    Unknown,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub setting: &'static str,
    /// As read; a number in JSON when it is one.
    #[serde(serialize_with = "number_if_numeric")]
    pub value: String,
    pub needs: String,
    pub verdict: Verdict,
    /// The command or sysctl.d line that fixes it, when the verdict is not ok.
    pub fix: Option<String>,
}

/// What the config needs from the host.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub backlog: u64,
    /// Descriptors: client connections, origin pools, listeners and a margin.
    pub fds: u64,
    /// Origin connections open at once at most.
    pub origin_connections: u64,
    /// The express lane thread's nice value (`[runtime] express_nice`; 0 with no lane).
    pub express_nice: i32,
}

pub fn needs(config: &Config) -> Needs {
    let backlog = config
        .listeners
        .iter()
        .map(|l| u64::from(l.backlog))
        .max()
        .unwrap_or(0);
    // The same count of pools and listening sockets the start-up check uses (its nofile is
    // not read here).
    let b = crate::admission::fd::Budget::of(config, 0);
    Needs {
        backlog,
        // The inverse of admission::fd::connection_budget: stop accepting at 90 %.
        fds: crate::admission::fd::descriptors_needed(b.wanted, b.origin, b.listeners),
        origin_connections: b.origin,
        express_nice: if config.express_connections > 0 {
            config.express_nice
        } else {
            0
        },
    }
}

fn number_if_numeric<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    match v.parse::<u64>() {
        Ok(n) => s.serialize_u64(n),
        Err(_) => s.serialize_str(v),
    }
}

/// How to set a sysctl where Breakwater runs. Network sysctls are per network namespace, so in
/// a container they are set on the container; `fs.*` ones only on the host.
fn sysctl_fix(
    container: Option<Container>,
    name: &str,
    value: impl std::fmt::Display,
) -> Option<String> {
    let host = format!(
        "sysctl -w {name}={value}  (persist: echo '{name} = {value}' >> /etc/sysctl.d/90-breakwater.conf)"
    );
    let namespaced = name.starts_with("net.");
    Some(match container {
        None => host,
        Some(_) if !namespaced => format!("on the host, not in the container: {host}"),
        Some(Container::Docker) => {
            format!("docker run --sysctl {name}={value} (compose: sysctls: {{ {name}: {value} }})")
        }
        Some(Container::Kubernetes) => format!(
            "pod securityContext.sysctls: [{{ name: {name}, value: \"{value}\" }}] (net.core.* \
             ones are \"unsafe\": the kubelet must allow them with --allowed-unsafe-sysctls)"
        ),
    })
}

pub fn assess(h: &HostFacts, n: &Needs) -> Vec<Check> {
    let mut out = Vec::new();
    let mut at_least =
        |setting: &'static str, have: Option<u64>, want: u64, caps: bool, why: &str| {
            let (verdict, fix) = match have {
                None => (Verdict::Unknown, None),
                Some(v) if v >= want => (Verdict::Ok, None),
                Some(_) => (
                    if caps { Verdict::Caps } else { Verdict::Advice },
                    sysctl_fix(h.container, setting, want),
                ),
            };
            out.push(Check {
                setting,
                value: have.map_or("?".into(), |v| v.to_string()),
                needs: format!(">= {want} ({why})"),
                verdict,
                fix,
            });
        };
    at_least(
        "net.core.somaxconn",
        h.somaxconn,
        n.backlog,
        true,
        "the listen backlog",
    );
    at_least(
        "net.ipv4.tcp_max_syn_backlog",
        h.tcp_max_syn_backlog,
        n.backlog,
        true,
        "half-open connections during a storm",
    );
    at_least(
        "net.core.netdev_max_backlog",
        h.netdev_max_backlog,
        16384,
        false,
        "packets queued per CPU in a burst",
    );
    at_least(
        "fs.file-max",
        h.file_max,
        n.fds,
        true,
        "max_connections + pools",
    );
    at_least(
        "fs.nr_open",
        h.nr_open,
        n.fds,
        true,
        "max_connections + pools",
    );

    out.push(match h.tcp_syncookies {
        None => unknown("net.ipv4.tcp_syncookies", "1"),
        Some(1) => ok(
            "net.ipv4.tcp_syncookies",
            "1",
            "1 (cookies when the SYN queue overflows)",
        ),
        Some(v @ 2) => Check {
            setting: "net.ipv4.tcp_syncookies",
            value: v.to_string(),
            needs: "1 (cookies only on overflow)".into(),
            verdict: Verdict::Advice,
            fix: sysctl_fix(h.container, "net.ipv4.tcp_syncookies", 1),
        },
        Some(v) => Check {
            setting: "net.ipv4.tcp_syncookies",
            value: v.to_string(),
            needs: "1 (without cookies a full SYN queue drops new clients)".into(),
            verdict: Verdict::Caps,
            fix: sysctl_fix(h.container, "net.ipv4.tcp_syncookies", 1),
        },
    });
    out.push(match h.ip_local_port_range {
        None => unknown("net.ipv4.ip_local_port_range", "a range"),
        Some((lo, hi)) => {
            let ports = hi.saturating_sub(lo) + 1;
            // Each origin connection holds a port, and a closed one holds it in TIME_WAIT.
            let want = n.origin_connections * 4;
            let verdict = if ports >= want {
                Verdict::Ok
            } else {
                Verdict::Caps
            };
            Check {
                setting: "net.ipv4.ip_local_port_range",
                value: format!("{lo} {hi} ({ports} ports)"),
                needs: format!(">= {want} ports (origin pools, 4x for TIME_WAIT churn)"),
                verdict,
                fix: (verdict != Verdict::Ok).then(|| {
                    sysctl_fix(
                        h.container,
                        "net.ipv4.ip_local_port_range",
                        "\"1024 65000\"",
                    )
                    .unwrap_or_default()
                }),
            }
        }
    });
    out.push(match h.tcp_tw_reuse {
        None => unknown("net.ipv4.tcp_tw_reuse", "1 or 2"),
        Some(v @ (1 | 2)) => ok(
            "net.ipv4.tcp_tw_reuse",
            &v.to_string(),
            "1 or 2 (reuse TIME_WAIT ports for origin connects)",
        ),
        Some(v) => Check {
            setting: "net.ipv4.tcp_tw_reuse",
            value: v.to_string(),
            needs: "1 (reuse TIME_WAIT ports for origin connects)".into(),
            verdict: Verdict::Advice,
            fix: sysctl_fix(h.container, "net.ipv4.tcp_tw_reuse", 1),
        },
    });
    out.push(match h.tcp_fin_timeout {
        None => unknown("net.ipv4.tcp_fin_timeout", "<= 30"),
        Some(v) if v <= 30 => ok(
            "net.ipv4.tcp_fin_timeout",
            &v.to_string(),
            "<= 30 s (orphaned sockets freed sooner)",
        ),
        Some(v) => Check {
            setting: "net.ipv4.tcp_fin_timeout",
            value: v.to_string(),
            needs: "<= 30 s (orphaned sockets freed sooner)".into(),
            verdict: Verdict::Advice,
            fix: sysctl_fix(h.container, "net.ipv4.tcp_fin_timeout", 15),
        },
    });
    out.push(match h.nofile {
        None => unknown("RLIMIT_NOFILE", "enough for max_connections"),
        Some((soft, hard)) => {
            let verdict = if hard >= n.fds {
                Verdict::Ok
            } else {
                Verdict::Caps
            };
            Check {
                setting: "RLIMIT_NOFILE",
                value: format!("soft {soft}, hard {hard}"),
                needs: format!(
                    "hard >= {} (Breakwater raises soft to hard at start)",
                    n.fds
                ),
                verdict,
                fix: (verdict != Verdict::Ok).then(|| {
                    format!(
                        "LimitNOFILE={0} in the systemd unit; docker run --ulimit nofile={0}:{0}; \
                         or lower [admission] max_connections",
                        n.fds
                    )
                }),
            }
        }
    });
    out.push(nice_check(h, n.express_nice));
    out
}

/// Whether the express lane's thread can be given the priority the config asks for. Raising a
/// nice value is always allowed; lowering it needs CAP_SYS_NICE or RLIMIT_NICE. Without it the
/// lane still serves newcomers, only without its head start when CPU is short: advice.
fn nice_check(h: &HostFacts, want: i32) -> Check {
    const SETTING: &str = "CAP_SYS_NICE or RLIMIT_NICE";
    let needs = format!("nice {want} allowed ([runtime] express_nice, the express lane's thread)");
    if want >= 0 {
        return ok(SETTING, "not needed", &needs);
    }
    match h.lowest_nice {
        None => unknown(SETTING, &needs),
        Some(low) if low <= want => ok(SETTING, &format!("down to nice {low}"), &needs),
        Some(low) => Check {
            setting: SETTING,
            value: format!("down to nice {low}"),
            needs,
            verdict: Verdict::Advice,
            // RLIMIT_NICE n allows nice 20 - n; it needs no capability, so it works for a
            // non-root user too, where a capability added to a container does not reach.
            fix: Some(match h.container {
                Some(Container::Docker) => format!(
                    "docker run --ulimit nice={0}:{0} (compose: ulimits: {{ nice: {0} }}); \
                     or [runtime] express_nice = 0",
                    20 - want
                ),
                Some(Container::Kubernetes) => "a pod cannot set RLIMIT_NICE: only a container \
                    running as root with securityContext.capabilities.add: [\"SYS_NICE\"] can \
                    lower it; or [runtime] express_nice = 0"
                    .to_string(),
                None => format!(
                    "LimitNICE={want} in the systemd unit (ulimit -e {} in a shell); or \
                     [runtime] express_nice = 0",
                    20 - want
                ),
            }),
        },
    }
}

fn ok(setting: &'static str, value: &str, needs: &str) -> Check {
    Check {
        setting,
        value: value.into(),
        needs: needs.into(),
        verdict: Verdict::Ok,
        fix: None,
    }
}

fn unknown(setting: &'static str, needs: &str) -> Check {
    Check {
        setting,
        value: "?".into(),
        needs: needs.into(),
        verdict: Verdict::Unknown,
        fix: None,
    }
}

/// The table a person reads.
pub fn render(checks: &[Check]) -> String {
    let w = |f: &dyn Fn(&Check) -> usize| checks.iter().map(f).max().unwrap_or(0);
    let (ws, wv, wn) = (
        w(&|c| c.setting.len()).max(7),
        w(&|c| c.value.len()).max(5),
        w(&|c| c.needs.len()).max(12),
    );
    let mut s = format!(
        "{:ws$}  {:wv$}  {:wn$}  {:7}  fix\n",
        "setting", "value", "config needs", "verdict"
    );
    for c in checks {
        let verdict = match c.verdict {
            Verdict::Ok => "ok",
            Verdict::Advice => "advice",
            Verdict::Caps => "CAPS",
            Verdict::Unknown => "unknown",
        };
        s += &format!(
            "{:ws$}  {:wv$}  {:wn$}  {:7}  {}\n",
            c.setting,
            c.value,
            c.needs,
            verdict,
            c.fix.as_deref().unwrap_or("")
        );
    }
    s
}

/// `[fleet] redis_url`: whether the store answers, and its round trip (a sync interval shorter
/// than a few round trips would spend itself waiting).
pub fn fleet_check(cfg: &crate::config::fleet::FleetConfig) -> Option<Check> {
    let url = cfg.redis_url.as_ref()?;
    let shown = cfg.shown_url().unwrap_or_default();
    let probed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(crate::fleet::probe(url)));
    let needs = format!("answers within sync_timeout ({:?})", cfg.sync_timeout);
    Some(match probed {
        Ok(rtt) => Check {
            setting: "fleet store",
            value: format!("{shown}: PING in {:.2} ms", rtt.as_secs_f64() * 1000.0),
            needs,
            verdict: if rtt < cfg.sync_timeout {
                Verdict::Ok
            } else {
                Verdict::Advice
            },
            fix: (rtt >= cfg.sync_timeout)
                .then(|| "raise [fleet] sync_timeout, or run Redis nearer".to_string()),
        },
        Err(e) => Check {
            setting: "fleet store",
            value: format!("{shown}: {e}"),
            needs,
            verdict: Verdict::Advice,
            fix: Some(
                "start Redis there or fix [fleet] redis_url (until then limits run per instance)"
                    .into(),
            ),
        },
    })
}

pub fn caps_anything(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.verdict == Verdict::Caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            somaxconn: Some(65535),
            tcp_max_syn_backlog: Some(65535),
            tcp_syncookies: Some(1),
            netdev_max_backlog: Some(16384),
            ip_local_port_range: Some((1024, 65000)),
            tcp_tw_reuse: Some(1),
            tcp_fin_timeout: Some(15),
            file_max: Some(1_000_000),
            nr_open: Some(1_000_000),
            nofile: Some((1024, 1_000_000)),
            lowest_nice: Some(-20),
            container: None,
        }
    }

    const NEEDS: Needs = Needs {
        backlog: 65535,
        fds: 55_700,
        origin_connections: 64,
        express_nice: -10,
    };

    fn verdict(checks: &[Check], setting: &str) -> Verdict {
        checks
            .iter()
            .find(|c| c.setting == setting)
            .map(|c| c.verdict)
            .unwrap()
    }

    #[test]
    fn a_tuned_host_caps_nothing() {
        let c = assess(&host(), &NEEDS);
        assert!(!caps_anything(&c), "{}", render(&c));
        assert!(c.iter().all(|c| c.verdict == Verdict::Ok));
    }

    #[test]
    fn somaxconn_below_the_backlog_caps_it_with_the_fix() {
        let c = assess(
            &HostFacts {
                somaxconn: Some(4096),
                ..host()
            },
            &NEEDS,
        );
        let chk = c
            .iter()
            .find(|c| c.setting == "net.core.somaxconn")
            .unwrap();
        assert_eq!(chk.verdict, Verdict::Caps);
        assert!(chk
            .fix
            .as_deref()
            .unwrap()
            .starts_with("sysctl -w net.core.somaxconn=65535"));
        assert!(caps_anything(&c));
    }

    #[test]
    fn descriptors_ports_and_cookies() {
        let c = assess(
            &HostFacts {
                nofile: Some((1024, 20_000)),
                ip_local_port_range: Some((60000, 60100)),
                tcp_syncookies: Some(0),
                tcp_fin_timeout: Some(60),
                ..host()
            },
            &NEEDS,
        );
        assert_eq!(verdict(&c, "RLIMIT_NOFILE"), Verdict::Caps);
        assert_eq!(
            verdict(&c, "net.ipv4.ip_local_port_range"),
            Verdict::Caps,
            "101 ports for 64 pooled"
        );
        assert_eq!(verdict(&c, "net.ipv4.tcp_syncookies"), Verdict::Caps);
        assert_eq!(verdict(&c, "net.ipv4.tcp_fin_timeout"), Verdict::Advice);
    }

    #[test]
    fn a_lane_priority_the_process_may_not_set_is_advice_with_the_grant() {
        let setting = "CAP_SYS_NICE or RLIMIT_NICE";
        // RLIMIT_NICE's default (0) allows no lowering: the process's own 0 is the lowest.
        let plain = HostFacts {
            lowest_nice: Some(0),
            ..host()
        };
        let c = assess(&plain, &NEEDS);
        let chk = c.iter().find(|c| c.setting == setting).unwrap();
        assert_eq!(chk.verdict, Verdict::Advice);
        assert!(chk.fix.as_deref().unwrap().contains("LimitNICE=-10"));
        assert!(!caps_anything(&c));
        let docker = assess(
            &HostFacts {
                container: Some(Container::Docker),
                ..plain.clone()
            },
            &NEEDS,
        );
        let chk = docker.iter().find(|c| c.setting == setting).unwrap();
        assert!(chk.fix.as_deref().unwrap().contains("--ulimit nice=30:30"));
        // LimitNICE=-10 (RLIMIT_NICE 30) is enough for -10; a lane left at 0 needs nothing.
        let limited = HostFacts {
            lowest_nice: Some(-10),
            ..host()
        };
        assert_eq!(verdict(&assess(&limited, &NEEDS), setting), Verdict::Ok);
        let off = Needs {
            express_nice: 0,
            ..NEEDS
        };
        assert_eq!(verdict(&assess(&plain, &off), setting), Verdict::Ok);
    }

    #[test]
    fn advice_alone_does_not_fail() {
        let c = assess(
            &HostFacts {
                netdev_max_backlog: Some(1000),
                tcp_tw_reuse: Some(0),
                ..host()
            },
            &NEEDS,
        );
        assert_eq!(verdict(&c, "net.core.netdev_max_backlog"), Verdict::Advice);
        assert!(!caps_anything(&c));
    }

    #[test]
    fn needs_follow_the_config() {
        let cfg = Config::parse(
            "[upstreams.a]\nservers = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\npool_max = 10\n",
            "t",
        )
        .unwrap();
        let n = needs(&cfg);
        assert_eq!(n.backlog, 65535);
        assert_eq!(n.origin_connections, 20);
        assert!(n.fds > 50_000);
    }

    #[test]
    fn fixes_fit_where_it_runs_and_json_values_are_numbers() {
        let small = HostFacts {
            somaxconn: Some(4096),
            ..host()
        };
        let fix = |h: &HostFacts, setting: &str| {
            assess(h, &NEEDS)
                .into_iter()
                .find(|c| c.setting == setting)
                .and_then(|c| c.fix)
                .unwrap()
        };
        let on_host = fix(&small, "net.core.somaxconn");
        assert!(
            on_host.contains(">> /etc/sysctl.d/90-breakwater.conf"),
            "{on_host}"
        );
        let docker = HostFacts {
            container: Some(Container::Docker),
            ..small.clone()
        };
        assert!(fix(&docker, "net.core.somaxconn")
            .starts_with("docker run --sysctl net.core.somaxconn=65535"));
        let k8s = HostFacts {
            container: Some(Container::Kubernetes),
            ..small.clone()
        };
        assert!(fix(&k8s, "net.core.somaxconn").contains("securityContext.sysctls"));
        let json = serde_json::to_value(assess(&small, &NEEDS)).unwrap();
        let somaxconn = json
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["setting"] == "net.core.somaxconn")
            .unwrap();
        assert_eq!(somaxconn["value"], serde_json::json!(4096));
    }
}
