//! ① Listeners: bind tuned sockets (backlog, TCP_DEFER_ACCEPT, SO_REUSEPORT shards) and run one
//! accept loop per shard. The accept loop neither spins nor dies: per-connection errors are
//! skipped, resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off exponentially up to a
//! small cap and are logged at most once a second.

pub mod sockopt;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::admission::Admission;
use crate::config::{ListenerConfig, RejectMode};
use crate::Shared;

/// The sockets of one configured listener, bound and listening, before any accept loop runs.
#[derive(Debug)]
pub struct BoundListener {
    pub config: ListenerConfig,
    /// The address actually bound (port 0 resolved).
    pub local_addr: SocketAddr,
    pub sockets: Vec<std::net::TcpListener>,
}

/// Binds `shards` SO_REUSEPORT sockets on the configured address. With port 0 the first socket
/// picks the port and the others join it, so tests get a sharded listener too.
pub fn bind(cfg: &ListenerConfig) -> io::Result<BoundListener> {
    let mut addr = cfg.addr;
    let mut sockets = Vec::with_capacity(cfg.shards);
    for _ in 0..cfg.shards.max(1) {
        let socket = bind_one(addr, cfg)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    let somaxconn = read_somaxconn();
    if let Some(max) = somaxconn.filter(|&m| m < cfg.backlog) {
        tracing::warn!(
            listener = %addr,
            requested = cfg.backlog,
            somaxconn = max,
            "listen backlog capped by net.core.somaxconn; raise it with \
             `sysctl -w net.core.somaxconn={}`",
            cfg.backlog
        );
    }
    Ok(BoundListener {
        config: cfg.clone(),
        local_addr: addr,
        sockets,
    })
}

fn bind_one(addr: SocketAddr, cfg: &ListenerConfig) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    if !cfg.defer_accept.is_zero() {
        sockopt::set_defer_accept(socket.as_fd(), cfg.defer_accept)?;
    }
    socket.listen(cfg.backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

fn read_somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Accepted connections taken per readiness event before yielding to other tasks.
const ACCEPT_BATCH: usize = 64;

/// Accepts on one shard until shutdown is signalled, then drops the socket so the kernel stops
/// queueing for it. Admission is decided here, inline: a refused connection costs one accept4
/// and one close; it is never registered with the reactor, gets no task and no buffer.
///
/// The global slot is taken only once this shard's queue is readable: SO_REUSEPORT hashes each
/// connection to one shard, and a shard that held a slot while its own queue was empty would
/// starve the shard whose queue holds the next connection.
pub async fn accept_loop(
    listener: std::net::TcpListener,
    shard: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr().ok();
    let listener = match sockopt::register_listener(Socket::from(listener)) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            tracing::error!(listener = ?local, shard, error = %e, "cannot register listener");
            return;
        }
    };
    let admission = &shared.admission;
    let counters =
        admission.register_shard(local.unwrap_or(([0, 0, 0, 0], 0).into()), shard, &listener);
    let mut backoff = Backoff::default();
    'outer: loop {
        // Cancel-safe: `changed` only observes a flag; `readable` takes nothing.
        let mut ready = tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            r = listener.readable() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(listener = ?local, shard, error = %e, "listener failed");
                    break;
                }
            },
        };
        for _ in 0..ACCEPT_BATCH {
            let slot = match admission.try_global_slot() {
                Some(slot) => slot,
                // Cancel-safe: a semaphore acquire dropped before it completes takes nothing.
                None => tokio::select! {
                    biased;
                    _ = shutdown.changed() => break 'outer,
                    s = admission.global_slot() => match s {
                        Some(s) => s,
                        None => break 'outer,
                    },
                },
            };
            match listener
                .get_ref()
                .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            {
                Ok((socket, peer)) => {
                    backoff.reset();
                    let Some(peer) = peer.as_socket() else {
                        continue;
                    };
                    match admission.admit(peer, peer.ip(), slot) {
                        Ok(admitted) => {
                            counters.accepted.fetch_add(1, Ordering::Relaxed);
                            serve(socket, peer, admitted, &shared, &shutdown)
                        }
                        Err(_) => {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            refuse(socket, admission.reject)
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    continue 'outer;
                }
                Err(e) => {
                    drop(slot);
                    admission.stats.count_accept_error(e.raw_os_error());
                    if is_fd_exhaustion(&e) {
                        admission
                            .stats
                            .accept_fd_exhausted
                            .fetch_add(1, Ordering::Relaxed);
                        shed_one(listener.get_ref(), admission);
                    }
                    if let Some(pause) = backoff.on_error(&e, local, shard) {
                        if !pause.is_zero() {
                            admission
                                .stats
                                .accept_backoffs
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        drop(ready);
                        // Sleep, but wake for shutdown: an exhausted process must still stop.
                        tokio::select! {
                            _ = shutdown.changed() => break 'outer,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        continue 'outer;
                    }
                }
            }
        }
        drop(ready);
        // A full batch: let connection tasks run before taking more.
        tokio::task::yield_now().await;
    }
    tracing::debug!(listener = ?local, shard, "accept loop stopped");
}

fn serve(
    socket: Socket,
    peer: SocketAddr,
    admitted: crate::admission::Admitted,
    shared: &Arc<Shared>,
    shutdown: &watch::Receiver<bool>,
) {
    // Small responses must not wait for Nagle; an error here only means the peer is already
    // gone, which the connection task will find out.
    let _ = socket.set_tcp_nodelay(true);
    let stream = match TcpStream::from_std(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "cannot register connection");
            return;
        }
    };
    tokio::spawn(crate::conn::serve(
        stream,
        peer,
        admitted,
        shared.clone(),
        shutdown.clone(),
    ));
}

/// Closes a refused connection: a reset (SO_LINGER 0) frees the descriptor at once and leaves
/// no TIME_WAIT; a close sends FIN.
fn refuse(socket: Socket, mode: RejectMode) {
    if mode == RejectMode::Reset {
        // Best effort: if it fails the drop below still closes the socket.
        let _ = socket.set_linger(Some(Duration::ZERO));
    }
    drop(socket);
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Out of descriptors, with a connection still waiting: free the reserve descriptor, take that
/// connection and reset it, so its client learns now instead of hanging in the queue, and the
/// listener is not left readable for a loop to spin on.
fn shed_one(listener: &Socket, admission: &Admission) {
    admission.reserve.with_released(|| {
        if let Ok((socket, _)) = listener.accept4(libc::SOCK_CLOEXEC) {
            refuse(socket, RejectMode::Reset);
        }
    });
}

const BACKOFF_START: Duration = Duration::from_millis(5);
/// Capped low so that accepting resumes within ~100 ms of descriptors freeing up.
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What to do after a failed accept: per-connection errors retry at once; resource exhaustion
/// sleeps with exponential backoff. Logging is limited to one line a second per loop, with the
/// count of errors it stood for.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl Backoff {
    fn reset(&mut self) {
        self.next = None;
    }

    fn on_error(
        &mut self,
        e: &io::Error,
        local: Option<SocketAddr>,
        shard: usize,
    ) -> Option<Duration> {
        let errno = e.raw_os_error();
        let resource = matches!(
            errno,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            if resource {
                tracing::warn!(listener = ?local, shard, error = %e, errors = self.unlogged,
                    "accept failed: out of resources, backing off");
            } else {
                tracing::debug!(listener = ?local, shard, error = %e, errors = self.unlogged,
                    "accept failed");
            }
            self.last_log = Some(now);
            self.unlogged = 0;
        }
        if !resource {
            // ECONNABORTED, ECONNRESET, EPROTO, EPERM (firewall): that one connection is gone;
            // the listener is fine. Yielding keeps a flood of them from starving other tasks.
            return Some(Duration::ZERO);
        }
        let pause = self.next.unwrap_or(BACKOFF_START);
        self.next = Some((pause * 2).min(BACKOFF_MAX));
        Some(pause)
    }
}
