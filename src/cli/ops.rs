//! Subcommands that talk to a running instance or find its config: `reload`, `healthcheck`.

use super::*;

/// Binds, then runs until SIGTERM or SIGINT. With `demo`, starts the built-in origin first and
/// points the (single) upstream at it.
/// The config named, or found where `Config::locate` looks.
pub(crate) fn load(explicit: Option<&std::path::Path>) -> Result<Config, String> {
    let path = Config::locate(explicit)?;
    Config::load(&path).map_err(|e| e.to_string())
}

pub(crate) fn reload(pid_file: &std::path::Path) -> ExitCode {
    let pid = match std::fs::read_to_string(pid_file) {
        Ok(t) => t.trim().parse::<i32>().ok().filter(|&p| p > 0),
        Err(e) => {
            eprintln!(
                "error: cannot read the pid file {}: {e}",
                pid_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let Some(pid) = pid else {
        eprintln!("error: {} does not hold a process id", pid_file.display());
        return ExitCode::FAILURE;
    };
    // SAFETY: kill(2) with a pid read from the pid file and a constant signal.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc != 0 {
        eprintln!(
            "error: cannot signal process {pid}: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    println!("sent SIGHUP to {pid}");
    ExitCode::SUCCESS
}

pub(crate) fn healthcheck(config: Option<&std::path::Path>, addr: Option<SocketAddr>) -> ExitCode {
    use std::io::{Read, Write};
    let (addr, token) = match addr {
        Some(a) => (a, None),
        None => match load(config) {
            Ok(c) => match c.admin {
                Some(a) => {
                    let token = if a.public_health { None } else { a.token };
                    (a.addr, token)
                }
                None => {
                    eprintln!("error: the config has no [admin] section to ask");
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    // A wildcard bind is reached on loopback.
    let target = match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    };
    let timeout = std::time::Duration::from_secs(3);
    let answer = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(s, "GET /healthz HTTP/1.0\r\nHost: {target}\r\n{auth}\r\n")?;
        let mut out = String::new();
        s.take(4096).read_to_string(&mut out)?;
        Ok(out)
    })();
    match answer {
        Ok(a) if a.starts_with("HTTP/1.1 200") || a.starts_with("HTTP/1.0 200") => {
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("unhealthy: {}", a.lines().next().unwrap_or("no answer"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {target}: {e}");
            ExitCode::FAILURE
        }
    }
}
