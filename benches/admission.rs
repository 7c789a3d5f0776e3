//! The cost of one admission decision with 100,000 client addresses tracked, against a naive
//! `Mutex<HashMap>` token bucket, and in fleet mode (the shared-rate limiter, with a thread
//! draining its per-key counts every 50 ms as the sync task does; no store is needed, the
//! accept path never speaks to it). Run: `cargo bench --bench admission`.
//!
//! The drained fleet case is the worst one: with 100,000 keys decided in turn, every decision
//! is its key's first since the last drain and lists the key for the sync. `FLEET_NO_DRAIN=1`
//! measures the other end, a key deciding again within a sync interval (an attacker's address
//! in a storm).
//!
//! "Decision" is what the accept loop does per connection: take a global slot, check deny and
//! allow lists, the per-client connection rate and the per-client concurrency slot, then (when
//! the connection ends) give the slots back.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use breakwater::admission::Admission;
use breakwater::Config;
use criterion::{criterion_group, criterion_main, Criterion};

const TRACKED: u32 = 100_000;

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn peer(i: u32) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip(i), 40_000)
}

/// The baseline makes the same decision the simple way: one lock around one map holding each
/// client's token bucket and open count, plus the same deny/allow lists and global counter.
struct Naive {
    map: Mutex<HashMap<IpAddr, (f64, Instant, u32)>>,
    open: AtomicUsize,
    max: usize,
    deny: Vec<ipnet::IpNet>,
    allow: Vec<ipnet::IpNet>,
    rate: f64,
    burst: f64,
    max_open: u32,
}

impl Naive {
    fn admit(&self, ip: IpAddr) -> bool {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        let now = Instant::now();
        let mut map = self.map.lock().unwrap();
        let e = map.entry(ip).or_insert((self.burst, now, 0));
        e.0 = (e.0 + now.duration_since(e.1).as_secs_f64() * self.rate).min(self.burst);
        e.1 = now;
        if e.0 < 1.0 || e.2 >= self.max_open {
            drop(map);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        e.0 -= 1.0;
        e.2 += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        if let Some(e) = self.map.lock().unwrap().get_mut(&ip) {
            e.2 -= 1;
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `op` `iters` times on each of `threads` threads at once; the time per decision is the
/// wall time divided by all decisions made (a throughput figure).
fn parallel(threads: u32, iters: u64, op: &(dyn Fn(u32) + Sync)) -> std::time::Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for k in 0..iters as u32 {
                    op(k.wrapping_mul(7919).wrapping_add(t * 104_729) % TRACKED);
                }
            });
        }
    });
    start.elapsed() / threads
}

fn bench(c: &mut Criterion) {
    // Rates high enough that the measured decisions are admissions, the common path.
    let toml = "[upstreams.app]\nservers = [\"127.0.0.1:1\"]\n[admission]\nper_ip_rate = 1000000\n\
                per_ip_burst = 1000000\nper_ip_max_connections = 200\ndeny = [\"192.0.2.0/24\"]\n";
    let cfg = Config::parse(toml, "bench").expect("bench config");
    let admission = std::sync::Arc::new(Admission::new(&cfg.admission));
    for i in 0..TRACKED {
        let slot = admission.try_global_slot().expect("slot");
        drop(admission.admit(peer(i), ip(i), slot));
    }
    let naive = Naive {
        map: Mutex::new(HashMap::new()),
        open: AtomicUsize::new(0),
        max: 50_000,
        deny: cfg.admission.deny.clone(),
        allow: cfg.admission.allow.clone(),
        rate: 1e6,
        burst: 1e6,
        max_open: 200,
    };
    for i in 0..TRACKED {
        naive.admit(ip(i));
        naive.release(ip(i));
    }

    let ours = |i: u32| {
        let slot = admission.try_global_slot().expect("slot");
        black_box(admission.admit(peer(i), black_box(ip(i)), slot).is_ok());
    };
    let fleet_toml = format!("{toml}[fleet]\nredis_url = \"redis://127.0.0.1:1/0\"\n");
    let fleet_cfg = Config::parse(&fleet_toml, "bench").expect("bench config");
    assert!(fleet_cfg.admission.shared_limits);
    let fleet = std::sync::Arc::new(Admission::new(&fleet_cfg.admission));
    for i in 0..TRACKED {
        let slot = fleet.try_global_slot().expect("slot");
        drop(fleet.admit(peer(i), ip(i), slot));
    }
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let drainer = {
        let (fleet, draining) = (fleet.clone(), draining.clone());
        std::thread::spawn(move || {
            let (mut buf, mut out) = (Vec::new(), Vec::new());
            while draining.load(Ordering::Relaxed) && std::env::var("FLEET_NO_DRAIN").is_err() {
                if let Some(l) = &fleet.shared_limits()[0] {
                    out.clear();
                    l.take_touched(&mut buf, &mut out);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
    };
    let shared = |i: u32| {
        let slot = fleet.try_global_slot().expect("slot");
        black_box(fleet.admit(peer(i), black_box(ip(i)), slot).is_ok());
    };
    let theirs = |i: u32| {
        let a = black_box(ip(i));
        black_box(naive.admit(a));
        naive.release(a);
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mut counts = vec![1, 2, cores];
    counts.dedup();
    for threads in counts {
        let mut g = c.benchmark_group(format!(
            "admission decision, 100k tracked IPs, {threads} thread(s)"
        ));
        g.bench_function("breakwater", |b| {
            b.iter_custom(|n| parallel(threads, n, &ours))
        });
        g.bench_function("breakwater, fleet mode", |b| {
            b.iter_custom(|n| parallel(threads, n, &shared))
        });
        g.bench_function("naive Mutex<HashMap>", |b| {
            b.iter_custom(|n| parallel(threads, n, &theirs))
        });
        g.finish();
    }
    draining.store(false, Ordering::Relaxed);
    let _ = drainer.join();
}

criterion_group!(benches, bench);
criterion_main!(benches);
