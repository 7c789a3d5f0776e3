//! Reading the host for `breakwater doctor`: sysctls, limits and capabilities as this process
//! sees them, None where unreadable (another OS, a restricted container). Judging them is
//! `doctor.rs`'s, so the judgement is tested on given values.

use serde::Serialize;

/// The host's values; None where unreadable (another OS, a restricted container).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostFacts {
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub tcp_syncookies: Option<u64>,
    pub netdev_max_backlog: Option<u64>,
    pub ip_local_port_range: Option<(u64, u64)>,
    pub tcp_tw_reuse: Option<u64>,
    pub tcp_fin_timeout: Option<u64>,
    pub file_max: Option<u64>,
    pub nr_open: Option<u64>,
    /// RLIMIT_NOFILE (soft, hard) of this process; Breakwater raises soft to hard at start.
    pub nofile: Option<(u64, u64)>,
    /// The lowest nice value this process may give a thread: -20 with CAP_SYS_NICE, else what
    /// RLIMIT_NICE allows (20 - its soft value) or the process's own, whichever is lower.
    pub lowest_nice: Option<i32>,
    /// Running in a container: the network sysctls are then set per container (`--sysctl`,
    /// `securityContext.sysctls`), not with `sysctl -w`.
    pub container: Option<Container>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    Docker,
    Kubernetes,
}

fn detect_container() -> Option<Container> {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Some(Container::Kubernetes);
    }
    let docker = ["/.dockerenv", "/run/.containerenv"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    docker.then_some(Container::Docker)
}

fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_string())
}

fn num(name: &str) -> Option<u64> {
    sysctl(name)?.parse().ok()
}

pub fn read_host() -> HostFacts {
    HostFacts {
        somaxconn: num("net.core.somaxconn"),
        tcp_max_syn_backlog: num("net.ipv4.tcp_max_syn_backlog"),
        tcp_syncookies: num("net.ipv4.tcp_syncookies"),
        netdev_max_backlog: num("net.core.netdev_max_backlog"),
        ip_local_port_range: sysctl("net.ipv4.ip_local_port_range").and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|v| v.parse().ok());
            Some((it.next()?, it.next()?))
        }),
        tcp_tw_reuse: num("net.ipv4.tcp_tw_reuse"),
        tcp_fin_timeout: num("net.ipv4.tcp_fin_timeout"),
        file_max: num("fs.file-max"),
        nr_open: num("fs.nr_open"),
        nofile: rlimit::Resource::NOFILE.get().ok(),
        lowest_nice: lowest_nice(),
        container: detect_container(),
    }
}

/// CAP_SYS_NICE's bit in the capability sets of /proc/self/status.
const CAP_SYS_NICE: u32 = 23;

fn lowest_nice() -> Option<i32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())?;
    if eff & (1 << CAP_SYS_NICE) != 0 {
        return Some(-20);
    }
    let (soft, _) = rlimit::Resource::NICE.get().ok()?;
    // A thread may always keep the process's own value (field 19 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let own: i32 = stat
        .rsplit(')')
        .next()?
        .split_whitespace()
        .nth(16)?
        .parse()
        .ok()?;
    Some((20 - soft.min(40) as i32).clamp(-20, 20).min(own))
}
