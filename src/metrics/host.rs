//! What the host says, read at scrape time: the kernel's TCP counters (SYN and accept queues,
//! SYN cookies) and the process_* families (descriptors, memory, CPU).

use std::collections::HashMap;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;

use super::{counter, gauge};

/// The kernel's TCP counters: the SYN and accept queues overflowing, SYN cookies, passive opens.
const KERNEL_COUNTERS: [(&str, &str, &str); 9] = [
    (
        "TcpExt",
        "ListenOverflows",
        "Connections dropped because an accept queue was full.",
    ),
    (
        "TcpExt",
        "ListenDrops",
        "SYNs dropped at a listening socket, for any reason.",
    ),
    (
        "TcpExt",
        "TCPReqQFullDrop",
        "SYNs dropped because the SYN queue was full (no cookies).",
    ),
    (
        "TcpExt",
        "TCPReqQFullDoCookies",
        "SYN cookies sent because the SYN queue was full.",
    ),
    ("TcpExt", "SyncookiesSent", "SYN cookies sent."),
    ("TcpExt", "SyncookiesRecv", "Valid SYN cookies received."),
    (
        "TcpExt",
        "SyncookiesFailed",
        "Invalid SYN cookies received.",
    ),
    (
        "Tcp",
        "PassiveOpens",
        "Connections accepted by the kernel (SYN-RECV to established).",
    ),
    ("Tcp", "AttemptFails", "Connection attempts that failed."),
];

pub(super) fn encode_kernel(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let mut values = HashMap::new();
    for path in ["/proc/net/netstat", "/proc/net/snmp"] {
        if let Ok(text) = std::fs::read_to_string(path) {
            values.extend(parse_proc_pairs(&text));
        }
    }
    for (section, key, help) in KERNEL_COUNTERS {
        if let Some(v) = values.get(&(section.to_string(), key.to_string())) {
            let name = format!("breakwater_kernel_{}", snake(key));
            counter(
                enc,
                &name,
                &format!("{help} ({section} {key}, whole host namespace.)"),
                vec![(vec![], *v)],
            )?;
        }
    }
    if let Some((tw, orphan)) = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| parse_sockstat(&t))
    {
        gauge(
            enc,
            "breakwater_kernel_tcp_time_wait",
            "TCP sockets in TIME_WAIT (as ss -s shows).",
            vec![(vec![], tw as i64)],
        )?;
        gauge(
            enc,
            "breakwater_kernel_tcp_orphans",
            "Orphaned TCP sockets (as ss -s shows).",
            vec![(vec![], orphan as i64)],
        )?;
    }
    Ok(())
}

pub(super) fn encode_process(enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    gauge(
        enc,
        "breakwater_build_info",
        "Always 1; the version label says which Breakwater this is.",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
    )?;
    // The standard process_* families, as every Prometheus client library exports them.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf with constant names only reads configuration.
    #[allow(unsafe_code)]
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
        )
    };
    if let (Some(utime), Some(stime), true) = (field(14), field(15), ticks > 0.0) {
        let mut m = enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new((utime + stime) / ticks).encode(m.encode_family(&Vec::<(
            String,
            String,
        )>::new(
        ))?)?;
    }
    if let Some(rss) = field(24) {
        gauge(
            enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            vec![(vec![], (rss * page) as i64)],
        )?;
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(btime), Some(start), true) = (boot, field(22), ticks > 0.0) {
        gauge(
            enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            vec![(vec![], (btime + start / ticks) as i64)],
        )?;
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        let open = dir.count() as i64;
        gauge(
            enc,
            "process_open_fds",
            "Number of open file descriptors.",
            vec![(vec![], open)],
        )?;
        gauge(
            enc,
            "breakwater_process_open_fds",
            "File descriptors this process holds.",
            vec![(vec![], open)],
        )?;
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        gauge(
            enc,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            vec![(vec![], soft.min(i64::MAX as u64) as i64)],
        )?;
    }
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        gauge(
            enc,
            "breakwater_process_max_fds",
            "RLIMIT_NOFILE soft limit.",
            vec![(vec![], soft.min(i64::MAX as u64) as i64)],
        )?;
    }
    Ok(())
}

/// Parses /proc/net/netstat or /proc/net/snmp: sections of two lines, names then values.
pub fn parse_proc_pairs(text: &str) -> HashMap<(String, String), u64> {
    let mut out = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let (Some((sec_a, names)), Some((sec_b, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            continue;
        };
        if sec_a != sec_b {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            // Some fields (Tcp MaxConn) are -1; they are not counters.
            if let Ok(v) = v.parse::<u64>() {
                out.insert((sec_a.to_string(), n.to_string()), v);
            }
        }
    }
    out
}

/// TIME_WAIT and orphan counts from /proc/net/sockstat's "TCP:" line.
pub fn parse_sockstat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let get = |key: &str| {
        f.iter()
            .position(|w| *w == key)
            .and_then(|i| f.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    Some((get("tw")?, get("orphan")?))
}

fn snake(camel: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = camel.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let prev_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        let prev_upper = i > 0 && chars[i - 1].is_uppercase();
        if c.is_uppercase() && i > 0 && (prev_lower || (prev_upper && next_lower)) {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent SyncookiesRecv SyncookiesFailed ListenOverflows ListenDrops TCPReqQFullDoCookies TCPReqQFullDrop\n\
TcpExt: 12 3 1 4567 4570 12 0\n\
IpExt: InNoRoutes InTruncatedPkts\n\
IpExt: 0 0\n";
    const SNMP: &str =
        "Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
Tcp: 1 200 120000 -1 100 20345 17\n";

    #[test]
    fn reads_kernel_counters_from_sample_files() {
        let mut v = parse_proc_pairs(NETSTAT);
        v.extend(parse_proc_pairs(SNMP));
        let get = |s: &str, k: &str| v.get(&(s.to_string(), k.to_string())).copied();
        assert_eq!(get("TcpExt", "ListenOverflows"), Some(4567));
        assert_eq!(get("TcpExt", "SyncookiesSent"), Some(12));
        assert_eq!(get("TcpExt", "TCPReqQFullDrop"), Some(0));
        assert_eq!(get("Tcp", "PassiveOpens"), Some(20345));
        assert_eq!(get("Tcp", "AttemptFails"), Some(17));
        assert_eq!(get("Tcp", "MaxConn"), None);
        assert_eq!(
            parse_sockstat("sockets: used 15\nTCP: inuse 4 orphan 2 tw 36 alloc 4 mem 0\n"),
            Some((36, 2))
        );
    }

    #[test]
    fn metric_names() {
        assert_eq!(snake("ListenOverflows"), "listen_overflows");
        assert_eq!(snake("TCPReqQFullDoCookies"), "tcp_req_q_full_do_cookies");
        assert_eq!(snake("SyncookiesSent"), "syncookies_sent");
    }
}
