//! The scaling run of the compare bench (`SHARDS=1,2,4,8`): how each proxy's keep-alive
//! requests/s and new connections/s grow with its threads, every proxy pinned to the same
//! CPUs (0 to n-1), the load generator and the origin on the CPUs no proxy of the run uses.
//! Near-linear is the goal (issue #13): the table gives each rate over n times the rate of
//! the smallest n measured for that proxy.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use super::{cpu_model, median, run_one, start_on, Load, Sample};

pub struct Plan {
    shards: Vec<usize>,
    /// The machine's CPUs, counted before this process was pinned.
    cpus: usize,
    /// The load's CPUs: those above the largest n, when there are any.
    load: Option<(usize, usize)>,
}

impl Plan {
    /// Parses `1,2,4,8` and pins this process (and so the origin, the storm generator and
    /// wrk, which it starts) to the CPUs above the largest n.
    pub fn new(spec: &str) -> Plan {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut shards: Vec<usize> = spec
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .filter(|&n| n >= 1)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let top = shards.last().copied().unwrap_or(1);
        let mut load = (cpus > top).then_some((top, cpus - 1));
        if let Some((lo, hi)) = load {
            let pinned = Command::new("taskset")
                .args(["-a", "-c", "-p", &format!("{lo}-{hi}")])
                .arg(std::process::id().to_string())
                .output()
                .is_ok_and(|o| o.status.success());
            if !pinned {
                eprintln!("cannot pin the load to CPUs {lo}-{hi} (taskset): left unpinned");
                load = None;
            }
        } else {
            eprintln!(
                "{cpus} CPUs, largest n {top}: no CPU left for the load, which shares the proxies'"
            );
        }
        Plan { shards, cpus, load }
    }

    pub fn run(
        &self,
        rt: &tokio::runtime::Runtime,
        reps: usize,
        targets: &[String],
        scenarios: &[&str],
        accepts: &dyn Fn() -> u64,
    ) {
        let started = Instant::now();
        let wrk_threads = self.load.map_or(2, |(lo, hi)| (hi - lo + 1).clamp(2, 8));
        let mut results: BTreeMap<(String, String, usize), Vec<Sample>> = BTreeMap::new();
        for rep in 0..reps {
            for &n in &self.shards {
                if n > self.cpus {
                    if rep == 0 {
                        eprintln!("n = {n}: more than the {} CPUs, skipped", self.cpus);
                    }
                    continue;
                }
                let cpus = format!("0-{}", n - 1);
                for target in targets {
                    let Some(running) = start_on(target, Some((n, &cpus))) else {
                        eprintln!("{target} with {n} threads: not available, skipped");
                        continue;
                    };
                    for sc in scenarios {
                        let load = Load {
                            wrk_threads,
                            scale: n,
                        };
                        let s = run_one(rt, (sc, load), target, running.pid(), accepts);
                        eprintln!("rep {rep} n={n} {target:>10} {sc:>9}: {s:?}");
                        results
                            .entry((sc.to_string(), target.clone(), n))
                            .or_default()
                            .push(s);
                    }
                }
            }
        }
        let load = self.load.map_or(
            "unpinned, sharing the proxies' CPUs".to_string(),
            |(lo, hi)| match lo == hi {
                true => format!("CPU {lo}"),
                false => format!("CPUs {lo}-{hi}"),
            },
        );
        let mut t = format!(
            "Machine: {} CPUs, {}; proxies on CPUs 0 to n-1, the load (wrk -t{wrk_threads}) and \
             the origin on {load}; {reps} repetitions, medians; run took {:.0} s.\n\n\
             | scenario | target | n | req/s | CPU ms / 1,000 req | rate / (n x rate at smallest n) |\n\
             |---|---|---:|---:|---:|---:|\n",
            self.cpus,
            cpu_model(),
            started.elapsed().as_secs_f64(),
        );
        for sc in scenarios {
            for target in targets {
                let rate = |n: usize| {
                    let v = results.get(&(sc.to_string(), target.clone(), n))?;
                    median(v.iter().map(|s| s.rate).collect())
                };
                let Some((&base_n, base)) = self.shards.iter().find_map(|n| Some((n, rate(*n)?)))
                else {
                    continue;
                };
                for &n in &self.shards {
                    let (Some(r), Some(v)) =
                        (rate(n), results.get(&(sc.to_string(), target.clone(), n)))
                    else {
                        continue;
                    };
                    let cpu = median(v.iter().filter_map(|s| s.cpu_ms_per_1000).collect());
                    let per = if base > 0.0 {
                        format!("{:.2}", r * base_n as f64 / (n as f64 * base))
                    } else {
                        "-".into()
                    };
                    t += &format!(
                        "| {sc} | {target} | {n} | {r:.0} | {} | {per} |\n",
                        cpu.map_or("-".into(), |c| format!("{c:.1}")),
                    );
                }
            }
        }
        println!("{t}");
        let _ = std::fs::write(concat!(env!("CARGO_TARGET_TMPDIR"), "/scaling.md"), &t);
    }
}
