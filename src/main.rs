//! The `breakwater` binary: process edges only. CLI, logging, config (exit 64 when invalid),
//! binding, signals; everything else is the library.
//!
//! Why this file is ~650 lines: the CLI's argument types and `serve` (start, signals, demo)
//! sit together because clap derives from them; the subcommands' bodies are in `cli/`. The
//! next split is the demo (`demo_storm`, `demo_sale`) into `cli/demo.rs`.

// Nothing that input or the network can make fail may panic; tests may (clippy.toml).
#![deny(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

#[cfg(feature = "mimalloc")]
#[path = "cli/alloc.rs"]
mod alloc;
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: alloc::MiMalloc = alloc::MiMalloc;
use std::path::PathBuf;
use std::process::ExitCode;

use breakwater::config::Config;
use clap::{Parser, Subcommand};

const EXIT_CONFIG: u8 = 64;
const EXIT_USAGE: u8 = 2;

#[path = "cli/lifecycle.rs"]
mod lifecycle;
#[path = "cli/ops.rs"]
mod ops;
#[path = "cli/tools.rs"]
mod tools;

use lifecycle::*;
use ops::*;
use tools::*;

#[derive(Parser)]
#[command(
    name = "breakwater",
    version,
    about = "A hardened TCP accept-front HTTP reverse proxy for connection storms",
    after_help = "Examples:\n  \
        breakwater demo                                  built-in origin + proxy on 127.0.0.1:8080, an opening storm\n  \
        breakwater check --config config/breakwater.toml validate a config and show what would run\n  \
        breakwater run --config /etc/breakwater.toml     front your app\n  \
        breakwater doctor --config /etc/breakwater.toml  host settings that would cap the config\n  \
        breakwater storm 127.0.0.1:8080 --probe          rehearse a handshake storm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// TOML config file [default: $BREAKWATER_CONFIG, else ./config/breakwater.toml, else
        /// /etc/breakwater/breakwater.toml].
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Write the process id here (removed at exit), for `breakwater reload`.
        #[arg(long)]
        pid_file: Option<PathBuf>,
        /// Take the listening sockets over from the instance running on `[runtime]
        /// control_socket`, then tell it to drain: a restart or binary upgrade that refuses
        /// no connection.
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config and print what would run; exit 0 when valid, 64 when not.
    Check {
        /// TOML config file [default: as for `run`].
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask a running instance to re-read its TLS certificates (sends SIGHUP to the pid in the
    /// pid file; `kill -HUP <pid>` does the same).
    Reload {
        #[arg(long, default_value = "/run/breakwater/breakwater.pid")]
        pid_file: PathBuf,
    },
    /// Exit 0 when the instance's admin /healthz answers 200, 1 otherwise: a container
    /// HEALTHCHECK that needs no curl.
    Healthcheck {
        /// The config whose [admin] addr to ask [default: as for `run`].
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask this address instead (host:port of the admin listener).
        #[arg(long)]
        addr: Option<SocketAddr>,
    },
    /// Compare the host's network and descriptor settings with what a config needs; exit 0
    /// when nothing caps it, 1 otherwise.
    Doctor {
        /// Config to check against (default: config/breakwater.toml, else the embedded default).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Handshake-storm load tester: many new connections from many loopback source addresses.
    #[command(after_help = "Examples:\n  \
        breakwater storm 127.0.0.1:8080 --connections 20000 --concurrency 1000 --probe\n  \
        breakwater storm 127.0.0.1:8080 --mode slowloris --connections 500 --hold 30s --json")]
    Storm(StormArgs),
    /// Print a signed bypass for a waiting room: a request that carries it in the
    /// `Breakwater-Room-Bypass` header walks past the line until it expires (staff, monitoring,
    /// a partner's checkout). Needs the room's `keys`.
    RoomBypass {
        /// TOML config file [default: as for `run`].
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The room's name.
        #[arg(long)]
        room: String,
        /// How long it stays good, e.g. 30m, 8h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        valid: std::time::Duration,
    },
    /// Start a built-in origin on a loopback port with Breakwater in front of it, on the
    /// default config's settings, until Ctrl-C.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
        /// Where the metrics are served.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// Connections in the opening storm; 0 skips it.
        #[arg(long, default_value_t = 20_000)]
        storm: u64,
        /// Where the storm comes from.
        #[arg(long, default_value = "127.0.1.0/28")]
        sources: ipnet::IpNet,
        /// Instead of the storm: a sale opening on a slow origin behind a waiting room, the
        /// line forming and draining, printed as it happens.
        #[arg(long)]
        waiting_room: bool,
    },
}

/// What `demo` adds around the proxy.
struct Demo {
    admin: SocketAddr,
    storm: u64,
    sources: ipnet::IpNet,
    waiting_room: bool,
}

/// The room `demo --waiting-room` adds to the default config: a sale opening 3 s after start,
/// a door of 10 shoppers a second and 40 inside at once, in front of a slow origin.
fn demo_room() -> String {
    let opens = std::time::SystemTime::now() + std::time::Duration::from_secs(3);
    format!(
        "\n[[waiting_room]]\nname = \"sale\"\nmode = \"auto\"\norder = \"shuffle_prequeue\"\n\
         opens_at = \"{}\"\nnew_sessions_per_minute = 600\nmax_active_sessions = 40\n\
         session_idle = \"5s\"\nrefresh = \"1s\"\nqueue_grace = \"5s\"\ntickets_per_ip = 0\n",
        humantime::format_rfc3339_seconds(opens)
    )
}

fn main() -> ExitCode {
    // One process-wide provider, chosen before anything builds a TLS config (rustls panics
    // when it finds two compiled in and none chosen).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(config.as_deref()) {
            Ok(c) => {
                // The certificate files are part of the config: a listener whose files
                // cannot be used would not start.
                let mut failed = false;
                for l in &c.listeners {
                    let Some(tls) = &l.tls else { continue };
                    let (errors, warnings) = breakwater::conn::tls::check(tls);
                    for w in warnings {
                        eprintln!("warning: listener {}: {w}", l.addr);
                    }
                    for e in &errors {
                        eprintln!("error: listener {}: {e}", l.addr);
                    }
                    failed |= !errors.is_empty();
                }
                if failed {
                    return ExitCode::from(EXIT_CONFIG);
                }
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{}: valid\n{}", c.source, c.summary());
                // What `run` would make of the descriptor limit (it raises the soft limit to
                // the hard one first).
                if let Ok((_, hard)) = breakwater::admission::fd::nofile_limits() {
                    let b = breakwater::admission::fd::Budget::of(&c, hard);
                    println!(
                        "fds       RLIMIT_NOFILE {hard}: max_connections {} in effect \
                         (configured {}), origin pools {}",
                        b.effective.min(b.wanted),
                        b.wanted,
                        b.origin
                    );
                    if let Some(advice) = b.advice(&c) {
                        eprintln!("warning: {advice}");
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run {
            config,
            pid_file,
            takeover,
        } => match Config::locate(config.as_deref())
            .and_then(|p| Config::load(&p).map(|c| (c, p)).map_err(|e| e.to_string()))
        {
            Ok((c, path)) => {
                let path = Some(path);
                let code = serve(c, None, takeover, path, pid_file.as_deref());
                // After a takeover the file holds the new process's pid: leave it.
                if let Some(p) = &pid_file {
                    let mine = std::fs::read_to_string(p)
                        .is_ok_and(|t| t.trim() == std::process::id().to_string());
                    if mine {
                        let _ = std::fs::remove_file(p);
                    }
                }
                code
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Reload { pid_file } => reload(&pid_file),
        Command::Healthcheck { config, addr } => healthcheck(config.as_deref(), addr),
        Command::Doctor { config, json } => doctor(config, json),
        Command::RoomBypass {
            config,
            room,
            valid,
        } => room_bypass(config.as_deref(), &room, valid),
        Command::Storm(args) => storm(args),
        Command::Demo {
            addr,
            admin,
            storm,
            sources,
            waiting_room,
        } => match if waiting_room {
            Config::parse(
                &format!("{}{}", breakwater::config::DEFAULT_TOML, demo_room()),
                "<embedded config/breakwater.toml + the demo's waiting room>",
            )
        } else {
            Config::embedded_default()
        } {
            Ok(mut c) => {
                c.listeners.truncate(1);
                c.listeners[0].addr = addr;
                c.admin = Some(breakwater::config::AdminConfig {
                    addr: admin,
                    token: None,
                    public_health: true,
                    ready_requires_origin: false,
                });
                // 20,000 lines of access log would hide the summary.
                c.log.access_log = false;
                serve(
                    c,
                    Some(Demo {
                        admin,
                        storm,
                        sources,
                        waiting_room,
                    }),
                    false,
                    None,
                    None,
                )
            }
            Err(e) => {
                eprintln!("error: the embedded default config is invalid: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

/// The multi-threaded runtime; `workers` None = one thread per core.
fn runtime(workers: Option<usize>) -> Option<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n.max(1));
    }
    match b.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            None
        }
    }
}

fn serve(
    mut config: Config,
    demo: Option<Demo>,
    takeover: bool,
    config_path: Option<PathBuf>,
    pid_file: Option<&std::path::Path>,
) -> ExitCode {
    if let Err(e) = breakwater::telemetry::init(&config.log) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    fit_to_fd_limit(&mut config);
    // With thread-per-core runtimes serving the connections, the main runtime keeps only the
    // housekeeping (admin, checks, pool upkeep, signals): one worker.
    let workers = if config.thread_per_core {
        1
    } else {
        config.worker_threads
    };
    let Some(runtime) = runtime(Some(workers)) else {
        return ExitCode::FAILURE;
    };
    let origin_accepts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let origin_requests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    runtime.block_on(async move {
        if demo.is_some() {
            let origin = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: cannot start the demo origin: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let origin_addr = origin
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            for u in &mut config.upstreams {
                u.servers = vec![origin_addr.clone()];
            }
            // The sale's shop takes 50 ms an answer; the storm's answers at once.
            let delay = if demo.as_ref().is_some_and(|d| d.waiting_room) {
                std::time::Duration::from_millis(50)
            } else {
                std::time::Duration::ZERO
            };
            tokio::spawn(breakwater::tools::demo::slow_origin(
                origin,
                origin_accepts.clone(),
                origin_requests.clone(),
                delay,
            ));
            tracing::info!(origin = %origin_addr, "demo origin started");
        }
        // With --takeover the listening sockets (and the admin socket) come from the running
        // instance; otherwise they are bound here.
        let mut handover = None;
        let mut passed_admin = None;
        let listeners = if takeover {
            let Some(path) = config.control_socket.clone() else {
                eprintln!("error: --takeover needs [runtime] control_socket");
                return ExitCode::FAILURE;
            };
            let taken = match tokio::task::spawn_blocking(move || {
                breakwater::takeover::take(&path)
            })
            .await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match adopt_listeners(&config, taken) {
                Ok((l, admin, h)) => {
                    passed_admin = admin;
                    handover = Some(h);
                    l
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            match breakwater::bind_all(&config) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        for l in &listeners {
            tracing::info!(addr = %l.local_addr, shards = l.sockets.len(), "listening");
        }
        let control_socket = config.control_socket.clone();
        let mut engine = breakwater::Engine::new(config);
        let mut admin_socket = None;
        if let Some(admin) = engine.config().admin.clone() {
            let bound = match passed_admin.take() {
                Some(l) => Ok(l),
                None => std::net::TcpListener::bind(admin.addr),
            };
            match bound {
                Ok(l) => {
                    // The bound address: with port 0 in the config, the one the kernel chose.
                    let addr = l.local_addr().unwrap_or(admin.addr);
                    tracing::info!(%addr, "admin listening: /metrics /healthz /readyz");
                    admin_socket = l.try_clone().ok();
                    engine = engine.with_admin(l);
                }
                // The demo's metrics are a nicety; a configured admin port is not.
                Err(e) if demo.is_some() => {
                    eprintln!("warning: no metrics for the demo: cannot listen on {}: {e}", admin.addr);
                }
                Err(e) => {
                    eprintln!("error: cannot listen on the admin address {}: {e}", admin.addr);
                    return ExitCode::FAILURE;
                }
            }
        }
        reload_on_sighup(engine.reloader(), engine.tls_listeners(), config_path.clone());
        reopen_on_sigusr1();
        // Only now: a `reload --pid-file` sent before the SIGHUP handler existed would have
        // killed the process (SIGHUP's default action). Found when the test stopped sleeping.
        if let Some(p) = pid_file {
            if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
                eprintln!("error: cannot write the pid file {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
        }
        notify_systemd(engine.shared());
        // Duplicates of every listening socket, for a later `run --takeover`.
        let mut offered: Vec<(breakwater::takeover::Kind, SocketAddr, std::os::fd::OwnedFd)> =
            Vec::new();
        for l in &listeners {
            for sock in &l.sockets {
                if let Ok(dup) = sock.try_clone() {
                    offered.push((breakwater::takeover::Kind::Listener, l.local_addr, dup.into()));
                }
            }
        }
        if let (Some(sock), Some(admin)) = (admin_socket, engine.config().admin.as_ref()) {
            offered.push((breakwater::takeover::Kind::Admin, admin.addr, sock.into()));
        }
        let taken_over = std::sync::Arc::new(tokio::sync::Notify::new());
        let stop = {
            let taken_over = taken_over.clone();
            async move {
                tokio::select! {
                    _ = signal() => {}
                    _ = taken_over.notified() => tracing::info!("taken over: draining"),
                }
            }
        };
        let Some(demo) = demo else {
            let running = tokio::spawn(engine.run(listeners, stop));
            // Serving now: the old instance may go, and this one offers its sockets in turn.
            if let Some(h) = handover {
                match tokio::task::spawn_blocking(move || h.drain()).await {
                    Ok(Ok(())) => tracing::info!("takeover complete: the old instance is draining"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "takeover: the old instance did not confirm"),
                    Err(e) => tracing::warn!(error = %e, "takeover: the old instance did not confirm"),
                }
            }
            if let Some(path) = control_socket {
                offer_takeover(path, offered, taken_over).await;
            }
            return match running.await {
                Ok(Ok(_)) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        };
        drop((handover, offered, control_socket));
        let stop = signal();
        let addr = listeners[0].local_addr;
        let shared = engine.shared();
        let running = tokio::spawn(engine.run(listeners, stop));
        // Wait for the warm pool, so the storm meets the proxy as a user would.
        for _ in 0..50 {
            if shared.ready.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if demo.waiting_room {
            demo_sale(addr, &shared, &origin_requests).await;
        } else if demo.storm > 0 {
            demo_storm(&demo, addr, &shared, &origin_accepts).await;
        }
        println!(
            "\nBreakwater demo is running. Try:\n  curl http://{addr}/\n  curl http://{}/metrics\n  \
             breakwater storm {addr} --connections 20000 --probe\nPress Ctrl-C to stop.",
            demo.admin
        );
        match running.await {
            Ok(Ok(_)) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `demo --waiting-room`: 300 shoppers arrive in the second before a sale opens, keep polling,
/// shop (two requests each) and leave; a line is printed every second while the room drains.
async fn demo_sale(
    addr: SocketAddr,
    shared: &breakwater::Shared,
    origin_requests: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    let Some(room) = shared.gen().proxy.rooms.first().cloned() else {
        return;
    };
    let plan = breakwater::tools::storm::queue::QueuePlan {
        target: addr,
        users: 300,
        join_rate: 300,
        sources: "127.0.2.0/23"
            .parse()
            .unwrap_or_else(|_| ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 2, 0]))),
        path: "/shop".into(),
        host: addr.to_string(),
        requests_after: 2,
        abandon: 0.1,
        poll: Some(std::time::Duration::from_secs(1)),
        duration: std::time::Duration::from_secs(60),
    };
    println!(
        "A sale opens in 3 s on a slow origin (50 ms an answer) behind a waiting room: a door of \
         10 a second, 40 shoppers inside at once. 300 shoppers arrive in the last second before \
         the opening (1 in 10 gives up); everyone who came before the opening is let in in a \
         random order.\n  Try it in a browser meanwhile: http://{addr}/shop\n"
    );
    let shoppers = tokio::spawn(breakwater::tools::storm::queue::run(plan));
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    while !shoppers.is_finished() && started.elapsed() < std::time::Duration::from_secs(70) {
        tick.tick().await;
        let (waiting, inside) = room.snapshot();
        println!(
            "  {:>4.0} s  in line {:>4}  inside {:>3}  let in {:>4}  passed over (gave up) {:>3}  origin requests {:>5}",
            started.elapsed().as_secs_f64(),
            waiting,
            inside,
            room.stats.admitted.load(Ordering::Relaxed)
                + room.stats.admitted_at_once.load(Ordering::Relaxed),
            room.stats.abandoned.load(Ordering::Relaxed),
            origin_requests.load(Ordering::Relaxed),
        );
    }
    if let Ok(r) = shoppers.await {
        println!(
            "\n{}(Out of ticket order by design: everyone who joined before the opening was let in \
             in a random order, order = \"shuffle_prequeue\". The door kept to 40 inside: a shopper \
             counts until idle for session_idle, 5 s.)",
            r.render()
        );
    }
}

/// The opening act: a short, bounded storm from a few loopback addresses, and what it did.
async fn demo_storm(
    demo: &Demo,
    addr: SocketAddr,
    shared: &breakwater::Shared,
    origin_accepts: &std::sync::atomic::AtomicU64,
) {
    use std::sync::atomic::Ordering;
    let plan = breakwater::tools::storm::Plan {
        target: addr,
        connections: demo.storm,
        concurrency: 1000,
        rate: 0,
        sources: demo.sources,
        mode: breakwater::tools::storm::Mode::Request,
        path: "/".into(),
        host: addr.to_string(),
        hold: std::time::Duration::from_secs(5),
        interval: std::time::Duration::from_secs(2),
        duration: std::time::Duration::from_secs(20),
        probe: Some(
            "127.0.0.2"
                .parse()
                .unwrap_or(std::net::IpAddr::from([127, 0, 0, 2])),
        ),
        progress: true,
    };
    println!(
        "Storming {addr} with {} new connections from {}…",
        demo.storm, demo.sources
    );
    let origin_before = origin_accepts.load(Ordering::Relaxed);
    let r = breakwater::tools::storm::run(plan).await;
    let s = &shared.admission.stats;
    let refused = s.rejected_rate.load(Ordering::Relaxed)
        + s.rejected_per_ip_cap.load(Ordering::Relaxed)
        + s.rejected_deny.load(Ordering::Relaxed)
        + s.rejected_banned.load(Ordering::Relaxed);
    let served = r.status.get(&200).copied().unwrap_or(0);
    let origin_total = origin_accepts.load(Ordering::Relaxed);
    let probe = r.probe.clone().unwrap_or_default();
    println!(
        "\n{} connections from {} addresses in {:.1} s: {} refused by per-IP limits, {} served; \
         origin saw {} connections ({} during the storm); probe {:.0}% served, p99 {:.0} ms",
        r.attempted,
        r.sources,
        r.elapsed_s,
        refused,
        served,
        origin_total,
        origin_total - origin_before,
        probe.success_ratio * 100.0,
        probe.latency_ms.p99
    );
}
