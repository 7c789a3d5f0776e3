//! The operator tools: `storm` (handshake-storm load tester) and `doctor` (host settings).

use super::*;

#[derive(clap::Args)]
pub(crate) struct StormArgs {
    /// Address to storm (IP:port).
    target: SocketAddr,
    /// Connections to open in all.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// Connections in progress at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// New connections per second; 0 = as fast as the concurrency allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Source addresses to bind, round-robin (each looks like its own client).
    #[arg(long, default_value = "127.0.1.0/24")]
    sources: ipnet::IpNet,
    #[arg(long, value_enum, default_value_t = breakwater::tools::storm::Mode::Request)]
    mode: breakwater::tools::storm::Mode,
    /// Request path (request mode).
    #[arg(long, default_value = "/")]
    path: String,
    /// Host header (default: the target).
    #[arg(long)]
    host: Option<String>,
    /// How long hold and slowloris connections stay open.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: std::time::Duration,
    /// Slowloris: time between header bytes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: std::time::Duration,
    /// Hard limit on the whole run.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Also run a legitimate client from --probe-source: a request on a new connection every 20 ms.
    #[arg(long)]
    probe: bool,
    #[arg(long, default_value = "127.0.0.2")]
    probe_source: std::net::IpAddr,
    /// Queue mode: virtual shoppers in all.
    #[arg(long, default_value_t = 1_000)]
    users: u64,
    /// Queue mode: shoppers arriving per second; 0 = all at once.
    #[arg(long, default_value_t = 100)]
    join_rate: u64,
    /// Queue mode: requests each admitted shopper makes with its pass before leaving.
    #[arg(long, default_value_t = 3)]
    requests_after: u32,
    /// Queue mode: share of shoppers (0 to 1) that stop polling after joining.
    #[arg(long, default_value_t = 0.0)]
    abandon: f64,
    /// Queue mode: poll this often instead of the room's refresh.
    #[arg(long, value_parser = parse_duration)]
    poll: Option<std::time::Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Allow a target outside 127.0.0.0/8 and ::1 (only ever storm servers you run).
    #[arg(long)]
    allow_remote: bool,
}

pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    breakwater::config::file::parse_duration(s)
}

pub(crate) fn storm(a: StormArgs) -> ExitCode {
    if !a.target.ip().is_loopback() && !a.allow_remote {
        eprintln!(
            "error: {} is not a loopback address; a storm is only for servers you run. Pass \
             --allow-remote to storm it anyway.",
            a.target
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if a.mode == breakwater::tools::storm::Mode::Queue {
        if !(0.0..=1.0).contains(&a.abandon) {
            eprintln!(
                "error: --abandon {} is not a share between 0 and 1",
                a.abandon
            );
            return ExitCode::from(EXIT_USAGE);
        }
        let plan = breakwater::tools::storm::queue::QueuePlan {
            target: a.target,
            users: a.users,
            join_rate: a.join_rate,
            sources: a.sources,
            host: a.host.unwrap_or_else(|| a.target.to_string()),
            path: a.path,
            requests_after: a.requests_after,
            abandon: a.abandon,
            poll: a.poll,
            duration: a.duration,
        };
        let rt = match tokio::runtime::Runtime::new() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let report = rt.block_on(breakwater::tools::storm::queue::run(plan));
        if a.json {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        } else {
            print!("{}", report.render());
        }
        return ExitCode::SUCCESS;
    }
    let plan = breakwater::tools::storm::Plan {
        target: a.target,
        connections: a.connections,
        concurrency: a.concurrency,
        rate: a.rate,
        sources: a.sources,
        mode: a.mode,
        host: a.host.unwrap_or_else(|| a.target.to_string()),
        path: a.path,
        hold: a.hold,
        interval: a.interval,
        duration: a.duration,
        probe: a.probe.then_some(a.probe_source),
        progress: !a.json,
    };
    let Some(runtime) = runtime(None) else {
        return ExitCode::FAILURE;
    };
    // Each connection holds a descriptor: use all the process may have.
    let _ = breakwater::admission::fd::raise_nofile();
    let report = runtime.block_on(breakwater::tools::storm::run(plan));
    if a.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render());
    }
    ExitCode::SUCCESS
}

pub(crate) fn room_bypass(
    config: Option<&std::path::Path>,
    room: &str,
    valid: std::time::Duration,
) -> ExitCode {
    use breakwater::room::token::{Keys, Kind, Token};
    let config = match load(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(r) = config.rooms.iter().find(|r| r.name == room) else {
        let names: Vec<&str> = config.rooms.iter().map(|r| r.name.as_str()).collect();
        eprintln!(
            "error: {} has no waiting_room named {room:?} (rooms: {})",
            config.source,
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
        return ExitCode::from(EXIT_CONFIG);
    };
    if r.keys.is_empty() {
        eprintln!(
            "error: waiting_room {room:?} has no keys: it signs with a random key made at each              start, which no bypass printed here would match. Add keys = [\"/path/to/key\"]"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let token = Keys::new(&r.keys).sign(
        room,
        Token {
            kind: Kind::Bypass,
            id: now + valid.as_secs().max(1),
            issued: now,
            bind: None,
        },
    );
    println!("Breakwater-Room-Bypass: {token}");
    eprintln!(
        "good until {} (anyone holding it walks past the line: share it like a password)",
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(now + valid.as_secs().max(1))
        )
    );
    ExitCode::SUCCESS
}

pub(crate) fn doctor(path: Option<PathBuf>, json: bool) -> ExitCode {
    let default = PathBuf::from("config/breakwater.toml");
    let loaded = match &path {
        Some(p) => Config::load(p),
        None if default.exists() => Config::load(&default),
        None => Config::embedded_default(),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let needs = breakwater::tools::doctor::needs(&config);
    let mut checks =
        breakwater::tools::doctor::assess(&breakwater::tools::doctor::read_host(), &needs);
    checks.extend(
        config
            .fleet
            .as_ref()
            .and_then(breakwater::tools::doctor::fleet_check),
    );
    let capped = breakwater::tools::doctor::caps_anything(&checks);
    if json {
        let out = serde_json::json!({ "config": config.source, "ok": !capped, "checks": checks });
        println!("{out}");
    } else {
        println!("host settings against {}:\n", config.source);
        print!("{}", breakwater::tools::doctor::render(&checks));
        println!(
            "\n{}",
            if capped {
                "Some settings cap what this config asks for: apply the fixes above."
            } else {
                "Nothing on this host caps this config."
            }
        );
    }
    if capped {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
