//! Where accepted connections run: at their accept loop's home, one of the thread-per-core
//! runtimes (`Core`, `[runtime] thread_per_core`) or the multi-threaded main runtime without
//! them; and an "express lane" of connections from clients with nothing else open, while
//! enough others are open to make a queue at home (`Lanes::express_room`), runs on a
//! thread of its own, where the accept loops can be made to run while a storm lasts
//! (`Lanes::accept_on_lane`; by default they stay at home).
//!
//! Why: during a storm the main runtime's run queue holds hundreds of ready connection tasks,
//! and an accept loop there runs once per pass over that queue, so a newcomer's connection
//! waits in the kernel's accept queue, then behind the storm's tasks, for every step of its
//! request (timed inside, in the compare bench's 2,000 storm: ~7.5 ms of a newcomer's wait was
//! its origin response being read on the busy main runtime; with the lane its p50 went from
//! ~15 to 1-5 ms, and with only the accept loop moved, to ~5). On its own thread the
//! accept loop drains the kernel queue as connections arrive (storm connections then wait as
//! tasks in the main runtime, bounded by the global cap as before), and a newcomer's connection
//! is served by a runtime whose queue is nearly empty. The lane is bounded
//! (`[runtime] express_connections`), so a flood of distinct addresses overflows to the main
//! runtime instead of swamping it.
//!
//! That was measured on the multi-threaded main runtime. With thread-per-core runtimes, the
//! storm's connections parked until the queues have room (`park.rs`) and newcomers first in
//! the pool's queue, a newcomer's p50 stays near 1 ms with the accept loops at home, and
//! moving them costs the storm about 10 % more CPU per connection (`accept_on_lane`).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use super::park::{Parking, Start};
use super::stats::Shards;
use crate::client::ClientKey;

pub struct Lanes {
    main: Handle,
    express: Option<Express>,
    /// With `[runtime] thread_per_core`: the single-threaded runtimes that serve the
    /// connections, one thread each (`Core`); empty: the main runtime serves them.
    cores: Vec<Core>,
    /// The core the next accept loop is homed on.
    next_core: std::sync::atomic::AtomicUsize,
    /// With `[runtime] park_connections`: where new connections wait while the queues are
    /// full (`park.rs`), and what tells how full they are.
    parking: Option<(Arc<Parking>, Arc<crate::conn::Server>)>,
    stats: Arc<Shards>,
    /// Dropping it stops the parking task.
    _parking_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Debug)]
struct Express {
    handle: Handle,
    max: usize,
    /// Open client connections above which the accept loops run here (`accept_on_lane`).
    accept_above: usize,
    /// Open client connections at or below which newcomers stay at home (`express_room`).
    above: usize,
    /// Dropping it ends the lane's thread (and cancels what still runs there).
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// One thread-per-core runtime (`[runtime] thread_per_core`): a thread running a
/// single-threaded runtime, where the accept loops homed on it run (between storms), with the
/// tasks of the connections they accept, the requests on them, and the origin connections
/// those requests open (`upstream/pool.rs`, `current_core`).
///
/// Why: on the multi-threaded runtime a request's task and the task driving its origin
/// connection are spread over workers that steal each other's tasks, and every hand-over can
/// cross cores. Measured on the 2-core machine before this mode existed, with wrk's 64
/// keep-alive connections and the nginx origin: two Breakwater processes of one worker and half
/// the pool each took 9 % less CPU per request and served 12 % more than one process of two
/// workers; a first cut of this mode, 8 % and 13 % (keep-alive) and 11 % and 10 % (a request
/// per new connection), medians of 5 and 3 interleaved runs.
#[derive(Debug)]
struct Core {
    handle: Handle,
    /// Dropping it ends the thread (and cancels what still runs there).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Core {
    fn start(index: usize) -> std::io::Result<Core> {
        let (handle, stop) = runtime_thread(format!("breakwater-core-{index}"), move |h| {
            crate::upstream::pool::mark_core_thread(index, h)
        })?;
        Ok(Core {
            handle,
            _stop: stop,
        })
    }
}

/// A single-threaded runtime on a thread of its own named `name`, which runs `setup` (given
/// the runtime's handle) and then serves until the returned sender is dropped.
fn runtime_thread(
    name: String,
    setup: impl FnOnce(Handle) + Send + 'static,
) -> std::io::Result<(Handle, tokio::sync::oneshot::Sender<()>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let given = handle.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new().name(name).spawn(move || {
        setup(given);
        rt.block_on(async {
            let _ = stopped.await;
        });
    })?;
    Ok((handle, stop))
}

/// An express-lane place, given back when the connection's task ends.
struct Place(Arc<Shards>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.express_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lanes {
    /// Lanes beside the runtime this is called on; `express_max` 0 keeps everything there.
    /// `nice`: the lane thread's nice value (0 leaves it). `accept_above`: open connections
    /// above which the accept loops run on the lane's thread (`accept_on_lane`); `above`: at or
    /// below which newcomers stay at home (`express_room`). `park`: park
    /// new connections while every upstream's queue is full (`server` says). `cores`: how many
    /// thread-per-core runtimes serve the connections (`Core`); 0 = the main runtime does.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        express_max: usize,
        nice: i32,
        accept_above: usize,
        above: usize,
        park: bool,
        cores: usize,
        server: Arc<crate::conn::Server>,
        stats: Arc<Shards>,
    ) -> Lanes {
        let main = Handle::current();
        let express = (express_max > 0)
            .then(|| Express::start(express_max, nice, (accept_above, above)))
            .flatten();
        let mut started = Vec::with_capacity(cores);
        for i in 0..cores {
            match Core::start(i) {
                Ok(c) => started.push(c),
                Err(e) => {
                    // Fewer cores still serve (the accept loops are spread over those there
                    // are); none, and the main runtime serves as without the mode.
                    tracing::warn!(core = i, error = %e, "cannot start a thread-per-core runtime");
                    break;
                }
            }
        }
        let mut lanes = Lanes {
            main,
            express,
            cores: started,
            next_core: std::sync::atomic::AtomicUsize::new(0),
            parking: None,
            stats,
            _parking_stop: None,
        };
        if park {
            let parking = Arc::new(Parking::default());
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let room_server = server.clone();
            let stats = lanes.stats.clone();
            lanes.lane_or_main().spawn(parking.clone().run(
                move || queue_room(&room_server),
                move |n| {
                    stats.parked_now.fetch_sub(n, Ordering::Relaxed);
                },
                stopped,
            ));
            lanes.parking = Some((parking, server));
            lanes._parking_stop = Some(stop);
        }
        lanes
    }

    /// The lane's runtime, or the main one without a lane: where the parking task runs.
    pub fn lane_or_main(&self) -> &Handle {
        self.express.as_ref().map_or(&self.main, |e| &e.handle)
    }

    /// Where an accept loop runs: `on_lane`, on the lane's thread (if there is a lane), else
    /// at its `home` (`home`).
    pub fn accept_handle<'a>(&'a self, on_lane: bool, home: &'a Handle) -> &'a Handle {
        match &self.express {
            Some(e) if on_lane => &e.handle,
            _ => home,
        }
    }

    /// Where a new accept loop's connections run: the next thread-per-core runtime in turn,
    /// or the main runtime without them.
    pub fn home(&self) -> Handle {
        if self.cores.is_empty() {
            return self.main.clone();
        }
        let i = self.next_core.fetch_add(1, Ordering::Relaxed) % self.cores.len();
        self.cores[i].handle.clone()
    }

    /// Whether a listener of `shards` spreads its connections over the thread-per-core
    /// runtimes instead of keeping each shard's at its home: with fewer shards than runtimes,
    /// some would serve nothing (a config written for the multi-threaded runtime, `shards = 1`).
    /// The accept loop then hands each connection to the next runtime in turn, once.
    pub fn spreads(&self, shards: usize) -> bool {
        shards < self.cores.len()
    }

    /// Where a connection accepted by a loop that `spread`s runs instead of the loop's home
    /// (`spreads`); None: at the home (no handle cloned on the accept path).
    pub fn spread_home(&self, spread: bool) -> Option<Handle> {
        spread.then(|| self.home())
    }

    /// The thread-per-core runtimes (empty without them): where the pools open their warm
    /// connections.
    pub fn core_handles(&self) -> Vec<Handle> {
        self.cores.iter().map(|c| c.handle.clone()).collect()
    }

    /// Whether an accept loop should run on the lane's thread: while busy, with more than
    /// `[runtime] express_accept_above` client connections `open`, or more than half that and
    /// `deep` (its last batch found the kernel's queue holding a full batch: a storm arriving
    /// faster than its connections are admitted and counted); `busy_at` is when it last was.
    /// `on_lane`: where it runs now. The way back needs half as many open and `ACCEPT_LINGER`
    /// without a busy sign: a storm's open count dips between its waves, and in the compare
    /// bench's 2,000 storm the loops moved 18 times with the count alone.
    ///
    /// By default (`express_accept_above` at its most, 10,000,000) they never move: measured
    /// on 2026-12-03 (2 cores, nginx origin, `breakwater storm` of 50,000 connections from 254
    /// addresses with its probe, 3 runs each, same build), on the lane's thread during the
    /// storm against on the workers throughout: 2,000 in flight 50.0-53.2 against 42.2-45.6 us
    /// of CPU per connection, 17.4-18.4k against 19.3-20.7k connections/s; 10,000 in flight
    /// 51.8-55.4 against 45.4-49.2 us, 16.3-17.6k against 17.6-19.1k; the probe's p50 0.2-0.3
    /// against 0.7-1.1 ms, its p99 6-38 against 7-21 ms. The lane's thread slept and woke for
    /// every one or two connections (27,000 voluntary context switches in a 3 s storm) and
    /// spent more CPU than either worker; on the workers the accept loop runs between the
    /// connections' tasks and rarely sleeps.
    ///
    /// Why it moves: on its own thread the accept loop drains the kernel's queue at once
    /// during a storm (the module's note), but every connection it hands the main runtime
    /// then crosses threads: the lane's thread wakes for the accept, a worker is woken for the
    /// task. With few connections open the main runtime's queue is short anyway, and accepting
    /// on a worker spawns the task into that worker's own queue. With wrk's 64 connections of
    /// one request each (the anchors' config, nginx origin), the loops on the lane's thread
    /// cost 1.33-1.48 context switches a request, on the workers 0.66-0.83, and 15 % less CPU
    /// a request; in the compare bench's new-connection row (same run, 3 repetitions) 9 % less
    /// CPU and 9 % more requests/s, with the storms' probe as before within the noise (p50
    /// 0.40-0.53 ms against 0.41-0.46, 5 repetitions of the 2,000 storm).
    pub fn accept_on_lane(
        &self,
        on_lane: bool,
        open: usize,
        deep: bool,
        busy_at: &mut Instant,
    ) -> bool {
        let Some(e) = &self.express else {
            return false;
        };
        if e.accept_above == 0 || open > e.accept_above || (deep && open > e.accept_above / 2) {
            *busy_at = Instant::now();
            return true;
        }
        on_lane && (open > e.accept_above / 2 || busy_at.elapsed() < ACCEPT_LINGER)
    }

    /// Whether a newcomer should take the express lane, with `open` client connections open
    /// in the process (its own counted): when more than `[runtime] express_above` are, and the
    /// lane has a place free now (a hint: `spawn` takes the place).
    ///
    /// Why not always: a client with nothing else open is a newcomer whether a storm is on or
    /// not, and load from many addresses that each finish before their next connection (a
    /// crowd of real users, a storm the proxy keeps up with) is all newcomers. With every one
    /// on the lane, the lane's thread did most of the work, each connection crossing threads
    /// (accepted on a worker, served on the lane, its origin connection a worker's). Measured
    /// 2026-12-03 (2 cores, nginx origin, `breakwater storm` of 40,000 connections at a fixed
    /// rate from 254 addresses with its probe, 2 runs each, same build): at 14,000
    /// connections/s the lane took 99.7 % of them with 0 and 49.0-52.7 us of CPU per
    /// connection, with 64 (the default on 2 cores) 0-0.3 % and 37.7 us, the lane off 35.0-38.5;
    /// at 17,000/s 49.7-51.2 against 34.0-39.0 us; the probe's p50 0.4-0.7 ms in all of them.
    /// Few connections open means short queues on the workers, so a newcomer loses little by
    /// staying (32 open a worker at ~20 us of work each: under a millisecond); in a storm of
    /// 2,000 in flight the lane takes the newcomers as before (rate, CPU and probe alike within
    /// the noise, 2 runs at 0, 64 and 256).
    pub fn express_room(&self, open: usize) -> bool {
        self.express.as_ref().is_some_and(|e| {
            open > e.above && self.stats.express_open.load(Ordering::Relaxed) < e.max
        })
    }

    /// Whether a newcomer's first message is already in its socket: whole (an HTTP/1 head, or
    /// HTTP/2's preface, which ends like one, or a TLS record: the ClientHello), or at least a
    /// full segment of it (`FULL_SEGMENT`). Looked at without taking them (`MSG_PEEK`: one
    /// syscall, paid only by newcomers the lane has room for).
    ///
    /// Why: a place on the lane is held for the connection's life, and an idle or trickling
    /// connection holds it doing nothing. On a listener that defers accept, a real client's
    /// request is there when it is accepted; an idle flood's connections come with nothing
    /// (the kernel hands them over once the defer time is out), a slowloris's with a byte or
    /// two. Before this check, 10,000 idle connections from 254 addresses took all 64 places
    /// for the 5 s of their header timeout, and the newcomers of that time went to the main
    /// runtime (`breakwater_express_open_connections` at 64 throughout). The probe's figures
    /// with this and the warm express connection are in `upstream/express.rs`.
    pub fn first_message_waiting(&self, socket: &std::net::TcpStream) -> bool {
        let mut buf = [0u8; PEEK_WINDOW];
        let waiting = match socket.peek(&mut buf) {
            Ok(n) => whole_first_message(&buf[..n]),
            // Nothing yet (WouldBlock), or an error the connection's task will meet.
            Err(_) => false,
        };
        if !waiting {
            self.stats.express_unready.fetch_add(1, Ordering::Relaxed);
        }
        waiting
    }

    /// Runs a connection's task, made by `make`: on the express lane when `express` (its client,
    /// `key`, had nothing else open and its request is here: `first_message_waiting`) and the
    /// lane has room; else on the main runtime, at once or, while the queues are full, once
    /// parking lets it go. Only a client with other connections open (`open` over 1) is
    /// parked: a newcomer must reach the pool's fair queue, where it goes first, and where
    /// connections are not counted (`open` 0) nobody can be told apart. A connection whose
    /// client is not known yet (`key` None) is never parked.
    ///
    /// `make`'s future should be small: tokio keeps a task's future inline in the task's cell
    /// and moves it whole at every step of spawning, then writes the whole cell's stage at the
    /// end (two or three more copies of its size); a ~3 KB connection future cost ~2,600
    /// instructions of `memcpy` a connection that way (callgrind), and its 128-byte-aligned
    /// cell, of no power-of-two size, took mimalloc's slow aligned path. `listener.rs` boxes the
    /// connection inside the task, so that the box and its copy are made on the worker, not on
    /// the accept thread. (tokio boxes by itself only futures over 16 KB.)
    pub fn spawn<M, F>(
        &self,
        (open, express, key): (u32, bool, Option<ClientKey>),
        home: &Handle,
        make: M,
    ) where
        M: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if let Some(e) = self.express.as_ref().filter(|_| express) {
            if self.stats.express_open.fetch_add(1, Ordering::Relaxed) < e.max {
                self.stats.express_served.fetch_add(1, Ordering::Relaxed);
                let place = Place(self.stats.clone());
                let task = make();
                e.handle.spawn(async move {
                    task.await;
                    drop(place);
                });
                return;
            }
            self.stats.express_open.fetch_sub(1, Ordering::Relaxed);
        }
        if let (Some((parking, server)), Some(key), true) = (&self.parking, key, open > 1) {
            // Behind those already parked too, so that nobody overtakes them.
            let parked = self.stats.parked_now.load(Ordering::Relaxed) > 0;
            if parked || queue_room(server) == 0 {
                let home = home.clone();
                let start: Start = Box::new(move || drop(home.spawn(make())));
                parking.park(key, start);
                self.stats.parked.fetch_add(1, Ordering::Relaxed);
                self.stats.parked_now.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        home.spawn(make());
    }
}

impl Express {
    fn start(max: usize, nice: i32, (accept_above, above): (usize, usize)) -> Option<Express> {
        let started = runtime_thread("breakwater-accept".into(), move |_| {
            crate::upstream::express::mark_lane_thread();
            if nice != 0 {
                prioritise(nice);
            }
        });
        let (handle, stop) = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the express lane; serving without it");
                return None;
            }
        };
        Some(Express {
            handle,
            max,
            accept_above,
            above,
            _stop: stop,
        })
    }
}

/// Sets the calling thread's nice value: Linux keeps one per thread, and `setpriority` with a
/// thread id changes only that thread, so the workers keep the process's. A thread this one
/// starts inherits it: only its runtime's blocking pool (the name lookups of express
/// connections to an origin named by host), short work done for the lane anyway.
///
/// Why the lane runs ahead: when the host's CPUs are all busy (a storm on a small machine, a
/// sidecar sharing its pod's cores with the app), a woken thread waits for the scheduler behind
/// the ones already running, and the lane is woken for every step of a newcomer's request (its
/// accept, its read, its origin response). In a 2,000-connection storm on 2 cores (the storm
/// tool with the compare bench's config and origin) the probe's p50 was 0.35-0.58 ms at nice 0
/// and 0.21-0.27 ms at -5, -10 or -19; the price was 12-15 % more CPU per storm connection and
/// a 7-9 % lower storm rate, since the accept loops run here too and now take their turn in
/// smaller batches. The lane is one thread, so it never takes more than one core from the
/// workers. What buys the head start is the
/// accept loops draining the kernel's queue at once: with them on a thread of their own at the
/// process's priority and only the lane's tasks ahead, the p50 and the CPU were both as at 0
/// (0.41-0.55 ms); raising the lane only while a newcomer was on it gave 0.31-0.46 ms for 4 %
/// more CPU.
fn prioritise(nice: i32) {
    // SAFETY: gettid and setpriority take no pointers; a failure is reported in errno.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r == 0 {
        tracing::debug!(nice, "express lane thread prioritised");
    } else {
        let e = std::io::Error::last_os_error();
        // Not a warning: without RLIMIT_NICE or CAP_SYS_NICE (a container's default) the lane
        // still works, it only loses its head start.
        tracing::info!(nice, error = %e,
            "cannot set the express lane thread's nice value; it runs at the process's. Raise \
             RLIMIT_NICE (systemd LimitNICE=, docker --ulimit nice=) or grant CAP_SYS_NICE; \
             `breakwater doctor` says how here. [runtime] express_nice = 0 turns this off");
    }
}

/// How long an accept loop stays on the lane's thread after its last busy sign.
const ACCEPT_LINGER: Duration = Duration::from_secs(1);

/// How much of a newcomer's first bytes `first_message_waiting` looks at: no more than it takes
/// to decide.
const PEEK_WINDOW: usize = FULL_SEGMENT;

/// Bytes that make a first message "here" even when it is not whole: over a real network a
/// message larger than a segment (a ClientHello with a post-quantum key share, ~1.8 KB; a head
/// with large cookies) wakes the accept with its first segment alone, and a segment is ~1,200
/// to 1,460 bytes wherever the path's MTU is 1,280 (IPv6's least) or more. A trickler sends
/// bytes, not segments' worth.
const FULL_SEGMENT: usize = 1000;

/// A whole HTTP/1 head, or a whole TLS record (type 22, handshake: a ClientHello), at the start
/// of `bytes`, or a full segment's worth of either.
fn whole_first_message(bytes: &[u8]) -> bool {
    if bytes.len() >= FULL_SEGMENT {
        return true;
    }
    match bytes {
        [0x16, _, _, hi, lo, rest @ ..] => {
            rest.len() >= usize::from(u16::from_be_bytes([*hi, *lo]))
        }
        [0x16, ..] => false,
        _ => bytes.windows(4).any(|w| w == b"\r\n\r\n"),
    }
}

/// How many more requests the queues take before new connections are parked: the most any
/// upstream of the generation in force takes (a new connection may be for any of them).
fn queue_room(server: &crate::conn::Server) -> usize {
    server
        .proxy()
        .upstreams
        .iter()
        .map(|u| u.queue_room())
        .max()
        .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::whole_first_message;

    #[test]
    fn a_first_message_is_whole_with_its_head_ended_or_its_tls_record_complete() {
        assert!(whole_first_message(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(whole_first_message(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!whole_first_message(b"GET / HTTP/1.1\r\nHo"));
        assert!(!whole_first_message(b""));
        // A TLS handshake record of 4 bytes: whole with all 4, not with 3.
        assert!(whole_first_message(&[0x16, 3, 1, 0, 4, 1, 0, 0, 0]));
        assert!(!whole_first_message(&[0x16, 3, 1, 0, 4, 1, 0, 0]));
        assert!(!whole_first_message(&[0x16, 3]));
        // The first segment of a larger one: a ClientHello of 1,800 bytes, a long head.
        let mut hello = vec![0x16, 3, 1, 0x07, 0x08];
        hello.resize(1400, 0);
        assert!(whole_first_message(&hello));
        let mut head = b"GET / HTTP/1.1\r\nCookie: ".to_vec();
        head.resize(1400, b'a');
        assert!(whole_first_message(&head));
        head.truncate(900);
        assert!(!whole_first_message(&head));
    }
}
