//! What a waiting line costs in memory: the release binary's resident memory before and after
//! 20,000 people take a ticket (and after 20,000 more), against the goal of under
//! 2 MB for 20,000 waiters (64 bytes each at most).
//!
//! Run: `cargo bench --bench room_memory`. Loopback only; 40,000 requests over 50 keep-alive
//! connections, bounded. Writes target/tmp/room_memory.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{free_port, Killed};

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `n` requests without a token on one keep-alive connection: `n` new tickets.
fn join(addr: SocketAddr, n: usize) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut r = BufReader::new(s.try_clone().expect("clone"));
    for _ in 0..n {
        if s.write_all(b"GET /sale HTTP/1.1\r\nHost: bench\r\nAccept: application/json\r\n\r\n")
            .is_err()
        {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
    }
}

fn waiting(admin: SocketAddr) -> u64 {
    let Ok(mut s) = TcpStream::connect(admin) else {
        return 0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("breakwater_room_waiting{room=\"sale\"} ")
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0) as u64
}

fn main() {
    let (addr, admin, origin) = (free_port(), free_port(), free_port());
    let opens =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600));
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("room.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"{addr}\"\n[admission]\nper_ip_rate = 0\n\
             per_ip_request_rate = 0\n[admin]\naddr = \"{admin}\"\n[log]\nlevel = \"warn\"\n\
             access_log = false\n[upstreams.app]\nservers = [\"{origin}\"]\npool_min_idle = 0\n\
             [[waiting_room]]\nname = \"sale\"\nopens_at = \"{opens}\"\ntickets_per_ip = 0\n\
             queue_grace = \"10m\"\nrefresh = \"60s\"\n"
        ),
    )
    .expect("config");
    let bw = Killed(
        Command::new(env!("CARGO_BIN_EXE_breakwater"))
            .args(["run", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start breakwater"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(admin).is_err() {
        assert!(Instant::now() < deadline, "breakwater did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Warm up the request path (buffers, allocator arenas) so the figure is the line's.
    std::thread::scope(|s| {
        for _ in 0..50 {
            s.spawn(|| join(addr, 20));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = bw.0.id();
    let mut out =
        String::from("| waiters | RSS MB | added per waiter (bytes) |\n|---:|---:|---:|\n");
    let mut last = rss_kb(pid);
    out += &format!("| {} | {:.1} | |\n", waiting(admin), last as f64 / 1024.0);
    for _ in 0..2 {
        let before = waiting(admin);
        std::thread::scope(|s| {
            for _ in 0..50 {
                s.spawn(|| join(addr, 400));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        let now = rss_kb(pid);
        let w = waiting(admin);
        let per = (now as f64 - last as f64) * 1024.0 / (w - before).max(1) as f64;
        out += &format!("| {w} | {:.1} | {per:.0} |\n", now as f64 / 1024.0);
        last = now;
    }
    println!("{out}");
    let _ = std::fs::create_dir_all("target/tmp");
    let _ = std::fs::write("target/tmp/room_memory.md", &out);
}
