//! Zero-downtime restart: a new process takes the listening sockets over from the running one
//! through a Unix control socket (SCM_RIGHTS), as Pingora and Envoy do, then tells it to drain.
//!
//! Why pass sockets rather than bind new ones beside the old (SO_REUSEPORT): closing a
//! reuseport socket resets every connection waiting in its accept queue (unless
//! `net.ipv4.tcp_migrate_req` is on), and the old process must close its sockets to finish.
//! A passed socket is the same kernel object: its queue survives the old process, and not one
//! connection is refused or reset.
//!
//! The exchange, one line each way at a time:
//! ```text
//! new -> old   TAKEOVER
//! old -> new   one line per socket ("listener 0.0.0.0:8080" / "admin 127.0.0.1:9901"),
//!              the file descriptors in the same message (SCM_RIGHTS)
//!              ... the new process starts accepting on them ...
//! new -> old   DRAIN
//! old -> new   OK            (the old process then drains as on SIGTERM and exits)
//! ```
//! Only a peer with our own uid is served (SO_PEERCRED).

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

/// What kind of socket a passed descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Listener,
    Admin,
}

/// One listening socket handed over.
#[derive(Debug)]
pub struct Passed {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub fd: OwnedFd,
}

/// The most descriptors one handover carries (the kernel's SCM_MAX_FD is 253).
const MAX_FDS: usize = 250;

/// How long each step of the exchange may take.
const STEP: Duration = Duration::from_secs(10);

/// Serves takeover requests on `path` from a thread of its own. `sockets` are duplicates of
/// every listening socket; `drain` is called once a new process has taken them and asks this
/// one to go. Returns the path bound, or why not (the instance then runs without takeover).
pub fn serve(
    path: &Path,
    sockets: Vec<(Kind, SocketAddr, OwnedFd)>,
    drain: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<PathBuf> {
    // A file left by a process that is gone: nobody answers on it.
    if path.exists() && UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path)?;
    let bound = path.to_path_buf();
    std::thread::Builder::new()
        .name("takeover".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                match hand_over(conn, &sockets) {
                    Ok(true) => {
                        tracing::info!("takeover: a new process has the listeners; draining");
                        drain();
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "takeover request failed"),
                }
            }
        })?;
    Ok(bound)
}

/// Runs one exchange; true when the peer took the sockets and asked us to drain.
fn hand_over(conn: UnixStream, sockets: &[(Kind, SocketAddr, OwnedFd)]) -> std::io::Result<bool> {
    let creds = getsockopt(&conn, sockopt::PeerCredentials).map_err(std::io::Error::from)?;
    // SAFETY: geteuid has no preconditions.
    #[allow(unsafe_code)]
    let me = unsafe { libc::geteuid() };
    if creds.uid() != me {
        return Err(std::io::Error::other(format!(
            "refused a takeover from uid {} (this process runs as {me})",
            creds.uid()
        )));
    }
    conn.set_read_timeout(Some(STEP))?;
    let mut lines = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    lines.read_line(&mut line)?;
    if line.trim() != "TAKEOVER" {
        return Ok(false);
    }
    let mut text = String::new();
    for (kind, addr, _) in sockets.iter().take(MAX_FDS) {
        let k = match kind {
            Kind::Listener => "listener",
            Kind::Admin => "admin",
        };
        text.push_str(&format!("{k} {addr}\n"));
    }
    text.push_str("end\n");
    let fds: Vec<RawFd> = sockets
        .iter()
        .take(MAX_FDS)
        .map(|(_, _, fd)| fd.as_raw_fd())
        .collect();
    sendmsg::<()>(
        conn.as_raw_fd(),
        &[IoSlice::new(text.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    line.clear();
    lines.read_line(&mut line)?;
    if line.trim() != "DRAIN" {
        return Ok(false);
    }
    (&conn).write_all(b"OK\n")?;
    Ok(true)
}

/// The new side: takes the running instance's listening sockets. Call `Handover::drain` once
/// they are being accepted on.
pub fn take(path: &Path) -> std::io::Result<Handover> {
    let conn = UnixStream::connect(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach a running instance at {} to take over from: {e}",
                path.display()
            ),
        )
    })?;
    conn.set_read_timeout(Some(STEP))?;
    (&conn).write_all(b"TAKEOVER\n")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors in this process for us;
                // nothing else owns them.
                #[allow(unsafe_code)]
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds)
    };
    let text = String::from_utf8_lossy(&buf[..bytes]).into_owned();
    let mut passed = Vec::new();
    let mut fds = fds.into_iter();
    for line in text.lines().take_while(|l| *l != "end") {
        let (kind, addr) = line
            .split_once(' ')
            .ok_or_else(|| std::io::Error::other(format!("bad takeover line {line:?}")))?;
        let kind = match kind {
            "listener" => Kind::Listener,
            "admin" => Kind::Admin,
            other => {
                return Err(std::io::Error::other(format!(
                    "unknown socket kind {other:?}"
                )))
            }
        };
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| std::io::Error::other(format!("bad address {addr:?}")))?;
        let fd = fds
            .next()
            .ok_or_else(|| std::io::Error::other("fewer descriptors than sockets"))?;
        passed.push(Passed { kind, addr, fd });
    }
    if !text.contains("end\n") {
        return Err(std::io::Error::other("the handover message was cut short"));
    }
    Ok(Handover { conn, passed })
}

/// Sockets received from the running instance, and the line to tell it to go.
#[derive(Debug)]
pub struct Handover {
    conn: UnixStream,
    pub passed: Vec<Passed>,
}

impl Handover {
    /// Asks the old instance to drain and exit; returns once it said it will.
    pub fn drain(self) -> std::io::Result<()> {
        (&self.conn).write_all(b"DRAIN\n")?;
        let mut line = String::new();
        BufReader::new(&self.conn).read_line(&mut line)?;
        if line.trim() == "OK" {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the old instance answered {line:?} to DRAIN"
            )))
        }
    }
}
