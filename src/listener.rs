//! ① Listeners: bind tuned sockets (backlog, TCP_DEFER_ACCEPT, SO_REUSEPORT shards) and run one
//! accept loop per shard. The accept loop neither spins nor dies: per-connection errors are
//! skipped, resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off exponentially up to a
//! small cap and are logged at most once a second.
//!
//! Why ~620 lines: binding (fresh or adopted from a takeover), the accept loop (with its moves
//! between the workers and the lane's thread) and the three ways out of it (served,
//! PROXY-header first, refused) share its locals; the rest is split out below (lanes, parking,
//! PROXY protocol, socket options, counters).

pub mod lanes;
pub mod park;
pub mod proxy_protocol;
pub mod sockopt;
pub mod stats;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::admission::{Admission, Admitted, GlobalSlot};
use crate::config::{ListenerConfig, ProxyProtocolConfig, RejectMode};
use crate::conn::tls::Acceptor;

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
    if addr.port() != 0 {
        refuse_shared_port(addr)?;
    }
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

/// A listener made of sockets taken over from another process (`run --takeover`): the same
/// kernel sockets, queues included. More shards than were passed are bound beside them
/// (SO_REUSEPORT joins the same group); fewer are not closed, since closing one would reset
/// its queue.
pub fn adopt(
    cfg: &ListenerConfig,
    sockets: Vec<std::net::TcpListener>,
) -> io::Result<BoundListener> {
    let mut sockets = sockets;
    for s in &sockets {
        s.set_nonblocking(true)?;
        // The old process may be a version that set it on each connection instead.
        socket2::SockRef::from(s).set_tcp_nodelay(true)?;
    }
    let local_addr = match sockets.first() {
        Some(s) => s.local_addr()?,
        None => return bind(cfg),
    };
    while sockets.len() < cfg.shards {
        sockets.push(bind_one(local_addr, cfg)?);
    }
    Ok(BoundListener {
        config: cfg.clone(),
        local_addr,
        sockets,
    })
}

/// SO_REUSEPORT lets a second process bind the same address and silently take half the new
/// connections (a second Breakwater started by mistake, an old one still running). A probe
/// bound without SO_REUSEPORT fails if anything listens there already, and that is refused.
fn refuse_shared_port(addr: SocketAddr) -> io::Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR: TIME_WAIT leftovers of an earlier run do not count as a listener.
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {addr}: another process already listens there (another \
                 Breakwater?). With SO_REUSEPORT the two would split the traffic; stop the \
                 other one first"
            ),
        )),
        // Anything else (no such address here, permission) is reported by the real bind.
        Err(_) => Ok(()),
    }
}

fn bind_one(addr: SocketAddr, cfg: &ListenerConfig) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    // Small responses must not wait for Nagle. Set here, not on each accepted connection:
    // Linux copies it to every socket accept returns (one setsockopt a connection less).
    socket.set_tcp_nodelay(true)?;
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

/// What the accept loops are handed at wiring time: the admission they ask, the counters they
/// keep, and the server their connections join.
pub struct Wiring {
    pub admission: Arc<Admission>,
    pub shards: Arc<stats::Shards>,
    pub server: Arc<crate::conn::Server>,
}

/// What a listener's connections go through between accept and HTTP: a PROXY protocol header
/// (which names the client) and TLS.
#[derive(Debug, Default)]
pub struct Frontend {
    pub proxy_protocol: Option<ProxyProtocolConfig>,
    pub tls: Option<Arc<Acceptor>>,
    /// The listener defers accept (`defer_accept`): a client's first bytes are in its socket
    /// when it is accepted, unless it sent none (`Lanes::first_message_waiting`).
    pub defer_accept: bool,
}

/// Accepted connections taken per readiness event before yielding to other tasks.
const ACCEPT_BATCH: usize = 64;

/// One shard's accept loop: its socket and what it hands connections to, carried along when
/// the loop moves between the main runtime and the express lane's thread
/// (`Lanes::accept_on_lane`).
struct Shard {
    listener: Arc<Socket>,
    shard: usize,
    local: Option<SocketAddr>,
    counters: Arc<stats::ShardStats>,
    frontend: Arc<Frontend>,
    wiring: Arc<Wiring>,
    lanes: Arc<lanes::Lanes>,
    /// Where it runs when not on the lane, and its connections run (`Lanes::home`).
    home: tokio::runtime::Handle,
    /// Its listener has fewer shards than there are thread-per-core runtimes: its connections
    /// are spread over all of them, not kept at `home` (`Lanes::spreads`).
    spread: bool,
    stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    /// When the loop last saw a busy sign (`Lanes::accept_on_lane`).
    busy_at: Instant,
}

/// Starts the accept loop of one shard, `shard` of the listener's `of`, on the runtime the
/// lanes say.
/// `stop` ends the loop (shutdown, or this listener removed by a reload); `shutdown` is handed
/// to the connections, which drain on the process-wide signal.
pub fn start_accept(
    listener: std::net::TcpListener,
    (shard, of): (usize, usize),
    frontend: Arc<Frontend>,
    wiring: Arc<Wiring>,
    lanes: Arc<lanes::Lanes>,
    (stop, shutdown): (watch::Receiver<bool>, watch::Receiver<bool>),
) {
    let local = listener.local_addr().ok();
    let listener = Arc::new(Socket::from(listener));
    let counters =
        wiring
            .shards
            .register(local.unwrap_or(([0, 0, 0, 0], 0).into()), shard, &listener);
    let mut busy_at = Instant::now();
    let open = wiring.admission.open_connections();
    let on_lane = lanes.accept_on_lane(false, open, false, &mut busy_at);
    let home = lanes.home();
    let spread = lanes.spreads(of);
    run_accept(
        Shard {
            listener,
            shard,
            local,
            counters,
            frontend,
            wiring,
            lanes,
            home,
            spread,
            stop,
            shutdown,
            busy_at,
        },
        on_lane,
    );
}

/// Spawns `s`'s accept loop on the main runtime or, `on_lane`, on the lane's thread, and
/// again on the other whenever it moves.
fn run_accept(mut s: Shard, on_lane: bool) {
    let runtime = s.lanes.accept_handle(on_lane, &s.home).clone();
    runtime.spawn(async move {
        let shards = s.wiring.shards.clone();
        if on_lane {
            shards.accept_on_lane.fetch_add(1, Ordering::Relaxed);
        }
        let moved = accept_loop(&mut s, on_lane).await;
        // Counted before the gauge changes, so that a reader who sees the loop gone from
        // where it was also sees the move.
        if moved.is_some() {
            shards.accept_moves.fetch_add(1, Ordering::Relaxed);
        }
        if on_lane {
            shards.accept_on_lane.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(to) = moved {
            run_accept(s, to);
        }
    });
}

/// Accepts on one shard until it is stopped (None) or should run elsewhere (where, `Some`:
/// on the lane or not). Admission is decided here, inline: a refused connection costs one
/// accept4 and one close; it is never registered with the reactor, gets no task and no buffer.
///
/// The global slot is taken only once this shard's queue is readable: SO_REUSEPORT hashes each
/// connection to one shard, and a shard that held a slot while its own queue was empty would
/// starve the shard whose queue holds the next connection.
async fn accept_loop(s: &mut Shard, on_lane: bool) -> Option<bool> {
    let (shard, local, counters) = (s.shard, s.local, &s.counters);
    let (frontend, wiring, lanes) = (&s.frontend, &s.wiring, &s.lanes);
    let (home, spread) = (&s.home, s.spread);
    let (stop, shutdown, busy_at) = (&mut s.stop, &s.shutdown, &mut s.busy_at);
    // Registered with this runtime's reactor; dropped (deregistered) when the loop moves.
    let listener = match sockopt::register_listener(s.listener.clone()) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(listener = ?local, shard, error = %e, "cannot register listener");
            return None;
        }
    };
    let admission = &wiring.admission;
    let listen_addr = local.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut backoff = Backoff::default();
    // The last batch was full: the kernel's queue held more than a batch.
    let mut deep = false;
    'outer: loop {
        // Between batches, never with a readiness guard held.
        let want = lanes.accept_on_lane(on_lane, admission.open_connections(), deep, busy_at);
        if want != on_lane {
            return Some(want);
        }
        // Cancel-safe: `changed` only observes a flag; `readable` takes nothing.
        let mut ready = tokio::select! {
            biased;
            _ = stop.changed() => break,
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
                    _ = stop.changed() => break 'outer,
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
                    if let Some(pp) = &frontend.proxy_protocol {
                        // Behind a balancer the peer is the balancer: per-client admission
                        // waits for the address its header carries. Only the source is
                        // checked here, inline, so a stranger still costs nothing.
                        let source = crate::client::unmapped(peer.ip());
                        if pp.from.iter().any(|n| n.contains(&source)) {
                            counters.accepted.fetch_add(1, Ordering::Relaxed);
                            let spread_to = lanes.spread_home(spread);
                            let home = spread_to.as_ref().unwrap_or(home);
                            serve_proxied(
                                socket,
                                (peer, listen_addr),
                                slot,
                                (frontend, wiring, lanes, home),
                                shutdown,
                            );
                        } else {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            admission
                                .stats
                                .rejected_proxy_source
                                .fetch_add(1, Ordering::Relaxed);
                            refuse(socket, admission.reject());
                        }
                        continue;
                    }
                    match admission.admit(peer, peer.ip(), slot) {
                        Ok(mut admitted) => {
                            admitted.client.local = listen_addr;
                            counters.accepted.fetch_add(1, Ordering::Relaxed);
                            let spread_to = lanes.spread_home(spread);
                            let home = spread_to.as_ref().unwrap_or(home);
                            serve(
                                socket,
                                peer,
                                admitted,
                                (frontend, wiring, lanes, home),
                                shutdown,
                            )
                        }
                        Err(_) => {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            refuse(socket, admission.reject())
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    deep = false;
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
                            _ = stop.changed() => break 'outer,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        continue 'outer;
                    }
                }
            }
        }
        drop(ready);
        deep = true;
        // A full batch: let connection tasks run before taking more.
        tokio::task::yield_now().await;
    }
    tracing::debug!(listener = ?local, shard, "accept loop stopped");
    None
}

/// TCP_NODELAY is already set: accepted sockets inherit it from the listener (`bind_one`).
fn register(socket: std::net::TcpStream, peer: SocketAddr) -> Option<TcpStream> {
    match TcpStream::from_std(socket) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(client = %peer, error = %e, "cannot register connection");
            None
        }
    }
}

/// What a connection is handed to: its listener's frontend, the wiring, and the lanes it may
/// run on.
type Handoff<'a> = (
    &'a Arc<Frontend>,
    &'a Arc<Wiring>,
    &'a Arc<lanes::Lanes>,
    &'a tokio::runtime::Handle,
);

fn serve(
    socket: Socket,
    peer: SocketAddr,
    admitted: Admitted,
    (frontend, wiring, lanes, home): Handoff<'_>,
    shutdown: &watch::Receiver<bool>,
) {
    let client = admitted.client;
    let (tls, server, shutdown) = (
        frontend.tls.clone(),
        wiring.server.clone(),
        shutdown.clone(),
    );
    let socket = std::net::TcpStream::from(socket);
    let open = admitted.open_from_client;
    // A newcomer takes an express place only with its first request already here whole (see
    // `lanes::first_message_waiting`); a listener that does not defer accept cannot tell, and
    // a client's bytes may come just after its accept there, so it only needs a place.
    let express = open == 1
        && lanes.express_room(wiring.admission.open_connections())
        && (!frontend.defer_accept || lanes.first_message_waiting(&socket));
    // Registered with the reactor of the runtime it runs on, so inside its task.
    lanes.spawn(
        (open, express, Some(client.key)),
        home,
        move || async move {
            let Some(stream) = register(socket, peer) else {
                return;
            };
            // Boxed here, in the task (see `Lanes::spawn`).
            Box::pin(crate::conn::serve(
                stream, client, admitted, tls, server, shutdown,
            ))
            .await
        },
    );
}

/// A connection from a trusted balancer: read its PROXY header (within the timeout), admit the
/// client it names, then serve. Runs in the connection's own task, so a slow header holds up
/// nobody else; the global slot taken at accept bounds how many can wait.
fn serve_proxied(
    socket: Socket,
    (peer, local): (SocketAddr, SocketAddr),
    slot: GlobalSlot,
    (frontend, wiring, lanes, home): Handoff<'_>,
    shutdown: &watch::Receiver<bool>,
) {
    let Some(pp) = frontend.proxy_protocol.clone() else {
        return;
    };
    let (frontend, wiring, shutdown) = (frontend.clone(), wiring.clone(), shutdown.clone());
    // The client is not known until its header is read: at home, never parked.
    lanes.spawn((0, false, None), home, move || async move {
        let Some(mut stream) = register(socket.into(), peer) else {
            return;
        };
        let admission = &wiring.admission;
        let header = tokio::time::timeout(
            pp.timeout,
            proxy_protocol::read_header(&mut stream, pp.version),
        )
        .await;
        let carried = match header {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return refuse_stream(stream, admission, peer, &e.to_string());
            }
            Err(_) => {
                return refuse_stream(stream, admission, peer, "PROXY header timed out");
            }
        };
        let mut admitted = match carried {
            proxy_protocol::Carried::Local => admission.admit_balancer(peer, slot),
            proxy_protocol::Carried::Client(client) => {
                match admission.admit(peer, client.ip(), slot) {
                    Ok(a) => a,
                    Err(_) => {
                        let _ = stream.set_zero_linger();
                        return;
                    }
                }
            }
        };
        admitted.client.local = local;
        let client = admitted.client;
        let server = wiring.server.clone();
        // Boxed here, in the task (see `Lanes::spawn`).
        Box::pin(crate::conn::serve(
            stream,
            client,
            admitted,
            frontend.tls.clone(),
            server,
            shutdown,
        ))
        .await;
    });
}

fn refuse_stream(stream: TcpStream, admission: &Admission, peer: SocketAddr, why: &str) {
    admission
        .stats
        .rejected_proxy_header
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(balancer = %peer, error = why, "PROXY protocol header refused");
    let _ = stream.set_zero_linger();
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
