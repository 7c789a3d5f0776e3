//! Shared by the benches: Breakwater as its own release process, configured with the limits of
//! ../shared/anchors (backlog 65535, TCP_DEFER_ACCEPT, 2 shards, 100 new connections/s and 200
//! open per address with 127.0.0.1 exempt, pool of 64, timeouts 5 s / 2 s / 10 s).

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Breakwater {
    pub addr: SocketAddr,
    child: Child,
    _config: tempfile::NamedTempFile,
}

impl Drop for Breakwater {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Breakwater in front of `origin` and waits until it accepts and its pool is warm.
pub fn anchor_breakwater(origin: SocketAddr) -> Breakwater {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp config");
    write!(
        config,
        r#"[[listeners]]
addr = "{addr}"
backlog = 65535
defer_accept = "1s"
shards = 2
[http]
header_read_timeout = "5s"
idle_timeout = "5s"
[admission]
per_ip_rate = 100
per_ip_max_connections = 200
allow = ["127.0.0.1/32"]
[upstreams.app]
servers = ["{origin}"]
pool_min_idle = 8
pool_max = 64
queue_timeout = "5s"
connect_timeout = "2s"
response_timeout = "10s"
[log]
level = "warn"
access_log = false
"#
    )
    .expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["run", "--config"])
        .arg(config.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start breakwater");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "breakwater did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The warm pool fills within a few hundred milliseconds.
    std::thread::sleep(Duration::from_millis(500));
    Breakwater {
        addr,
        child,
        _config: config,
    }
}
