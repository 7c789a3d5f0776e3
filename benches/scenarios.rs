//! Storm scenarios against Breakwater and against the same origin directly, in one run, with
//! the `storm` tester; prints a markdown table (and writes it to target/tmp/scenarios.md).
//! Run: `cargo bench --bench scenarios`.
//!
//! Breakwater runs as its own release process with the limits of ../shared/anchors (2 shards,
//! 100 new connections/s and 200 open per address, pool of 64, header timeout 5 s); the origin
//! (hyper, counting its accepted connections) and the storm run in this process. Traffic stays
//! on 127.0.0.0/8.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use breakwater::tools::storm::{self, Mode, Report};
use support::storm_plan as plan;

struct Row {
    name: &'static str,
    direct: Report,
    proxied: Report,
    origin_direct: u64,
    origin_proxied: u64,
}

fn served(r: &Report) -> u64 {
    r.status.get(&200).copied().unwrap_or(0)
}

fn probe(r: &Report) -> String {
    r.probe.as_ref().map_or("-".into(), |p| {
        format!(
            "{:.0} % ok, p99 {:.1} ms",
            p.success_ratio * 100.0,
            p.latency_ms.p99
        )
    })
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let accepts = Arc::new(AtomicU64::new(0));
    let origin = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind origin");
        let a = l.local_addr().expect("addr");
        tokio::spawn(breakwater::tools::demo::origin(l, accepts.clone()));
        a
    });

    let proxy = support::anchor_breakwater(origin);
    let port = proxy.addr;

    let scenarios: [(&'static str, u64, usize, &str, Mode); 3] = [
        (
            "20,000 new connections from 254 addresses, 1,000 at once",
            20_000,
            1000,
            "127.0.1.0/24",
            Mode::Request,
        ),
        (
            "10,000 new connections from one abusive address",
            10_000,
            500,
            "127.0.0.66/32",
            Mode::Request,
        ),
        (
            "1,000 slowloris connections (a byte a second, 8 s)",
            1_000,
            1000,
            "127.0.2.0/24",
            Mode::Slowloris,
        ),
    ];
    let mut rows = Vec::new();
    for (name, n, c, src, mode) in scenarios {
        let run = |target| {
            let before = accepts.load(Ordering::Relaxed);
            let r = rt.block_on(storm::run(plan(target, n, c, src, mode)));
            // Let TIME_WAIT and the proxy's queues settle between runs.
            std::thread::sleep(Duration::from_secs(1));
            (r, accepts.load(Ordering::Relaxed) - before)
        };
        let (direct, origin_direct) = run(origin);
        let (proxied, origin_proxied) = run(port);
        rows.push(Row {
            name,
            direct,
            proxied,
            origin_direct,
            origin_proxied,
        });
    }
    drop(proxy);

    let mut t = String::from(
        "| scenario | target | conn/s | served (200) | refused or cut | origin connections opened | probe (legitimate client) |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        for (label, rep, opened) in [
            ("direct", &r.direct, r.origin_direct),
            ("Breakwater", &r.proxied, r.origin_proxied),
        ] {
            let e = &rep.errors;
            let cut = match rep.mode {
                Mode::Slowloris | Mode::Hold => {
                    format!("{} closed by server", rep.closed_by_server)
                }
                _ => format!("{}", e.refused + e.reset + e.closed + e.timeout),
            };
            t += &format!(
                "| {} | {label} | {:.0} | {} | {cut} | {opened} | {} |\n",
                r.name,
                rep.connections_per_s,
                served(rep),
                probe(rep)
            );
        }
    }
    println!("{t}");
    let _ = std::fs::write(concat!(env!("CARGO_TARGET_TMPDIR"), "/scenarios.md"), &t);
}
