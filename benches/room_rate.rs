//! What a waiting room's answers cost at the rate a sale polls them: the waiting page over
//! keep-alive and the JSON answer with a new connection per poll, from Breakwater (release
//! process, a room whose sale opens in an hour, so every poll is answered from memory) against
//! nginx serving the very same bytes as static files (`open_file_cache` on), in one run on the
//! same cores, with wrk as the waiters.
//!
//! Run: `cargo bench --bench room_rate` (REPS=3 by default; `BREAKWATER_ALT=/path/to/binary`
//! adds a second Breakwater build to the same run, for an A/B of a change). Needs `wrk`, and
//! `nginx` for the baseline (Debian packages; a missing nginx is skipped and said so).
//! Loopback only; each measurement is 4 s of wrk, about a minute in all. Writes
//! target/tmp/room_rate.md.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

mod support;
use support::{free_port, median, quiet, wait_listening, Killed};

/// One answer as a client sees it: its headers (lower-cased names) and body.
struct Answer {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn get(addr: SocketAddr, accept: &str) -> Option<Answer> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /sale HTTP/1.1\r\nHost: bench\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = BufReader::new(s);
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body).ok()?;
    Some(Answer { headers, body })
}

/// Requests/s from `wrk -t2 -c64 -d4s` with `headers`, or None when wrk failed or any answer
/// was not the one expected (wrk counts non-2xx apart; a 429 is the JSON answer's own code).
fn wrk(url: &str, headers: &[String], code: &str) -> Option<f64> {
    let mut args = vec!["-t2".to_string(), "-c64".into(), "-d4s".into()];
    for h in headers {
        args.push("-H".into());
        args.push(h.clone());
    }
    args.push(url.into());
    let out = Command::new("wrk").args(&args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let non_2xx: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let total: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())?;
    // Every answer must be of the kind measured: all 200 (page), or all 429 (JSON).
    let expected_non_2xx = if code == "200" { 0 } else { total };
    if non_2xx != expected_non_2xx {
        eprintln!("unexpected answers from {url}: {non_2xx} of {total} not 2xx");
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

/// A Breakwater build serving a room whose sale opens in an hour.
fn breakwater(bin: &str, dir: &std::path::Path) -> Option<(Killed, SocketAddr)> {
    let (addr, origin) = (free_port(), free_port());
    let opens =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3600));
    let cfg = dir.join(format!("room-{}.toml", addr.port()));
    std::fs::write(
        &cfg,
        format!(
            "[[listeners]]\naddr = \"{addr}\"\n[admission]\nper_ip_rate = 0\n\
             per_ip_max_connections = 0\n[log]\nlevel = \"warn\"\naccess_log = false\n\
             [upstreams.app]\nservers = [\"{origin}\"]\npool_min_idle = 0\n\
             [[waiting_room]]\nname = \"sale\"\nopens_at = \"{opens}\"\ntickets_per_ip = 0\n\
             queue_grace = \"10m\"\nrefresh = \"20s\"\n"
        ),
    )
    .ok()?;
    let child = Killed(quiet(
        Command::new(bin).args(["run", "--config"]).arg(&cfg),
    )?);
    wait_listening(addr).then_some((child, addr))
}

/// nginx serving `page` and `json` (the room's own answers) as static files, with the headers
/// Breakwater sends, from 2 workers.
fn nginx(dir: &std::path::Path, page: &[u8], json: &[u8]) -> Option<(Killed, SocketAddr)> {
    let addr = free_port();
    let root = dir.join("www");
    std::fs::create_dir_all(&root).ok()?;
    std::fs::write(root.join("page.html"), page).ok()?;
    std::fs::write(root.join("answer.json"), json).ok()?;
    // Workers run as nobody when started by root: they must be able to read the files.
    use std::os::unix::fs::PermissionsExt;
    for p in [dir, root.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).ok()?;
    }
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  server_tokens off;\n  keepalive_requests 10000000;\n\
               open_file_cache max=16 inactive=60s;\n  open_file_cache_valid 60s;\n  client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen {addr};\n    root {r};\n\
                 location = /sale {{ default_type text/html; add_header Cache-Control no-store; \
                 add_header Retry-After 20; try_files /page.html =404; }}\n\
                 location = /sale.json {{ default_type application/json; \
                 add_header Cache-Control no-store; add_header Retry-After 20; \
                 try_files /answer.json =404; }}\n  }}\n}}\n",
            d = dir.display(),
            r = root.display(),
        ),
    )
    .ok()?;
    let child = Killed(support::nginx(dir, &conf)?);
    wait_listening(addr).then_some((child, addr))
}

fn main() {
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk is not installed (apt-get install wrk): nothing measured");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut builds = vec![(
        "breakwater".to_string(),
        env!("CARGO_BIN_EXE_breakwater").to_string(),
    )];
    if let Ok(alt) = std::env::var("BREAKWATER_ALT") {
        builds.push(("alt".into(), alt));
    }
    let mut running = Vec::new();
    for (name, bin) in &builds {
        let Some(b) = breakwater(bin, dir.path()) else {
            eprintln!("{name} did not start: skipped");
            continue;
        };
        running.push((name.clone(), b));
    }
    let Some((_, (_, first))) = running.first() else {
        return;
    };
    // A waiter's ticket, and the answers to serve the same bytes from nginx.
    let Some(page) = get(*first, "text/html") else {
        eprintln!("no waiting page from Breakwater");
        return;
    };
    let Some(token) = page
        .headers
        .iter()
        .find_map(|(k, v)| (k == "breakwater-room-token").then(|| v.clone()))
    else {
        eprintln!("the waiting page carried no token");
        return;
    };
    let json = get(*first, "application/json").map_or_else(Vec::new, |a| a.body);
    // Tickets are signed with a key of each process's own (none configured): each build
    // gets a ticket of its own.
    let mut targets: Vec<(String, SocketAddr, Option<String>)> = Vec::new();
    for (name, (_, addr)) in &running {
        let tok = if *addr == *first {
            Some(token.clone())
        } else {
            get(*addr, "text/html").and_then(|a| {
                a.headers
                    .into_iter()
                    .find_map(|(k, v)| (k == "breakwater-room-token").then_some(v))
            })
        };
        targets.push((name.clone(), *addr, tok));
    }
    let ng = nginx(dir.path(), &page.body, &json);
    if let Some((_, addr)) = &ng {
        targets.push(("nginx (same bytes, static)".into(), *addr, None));
    } else {
        eprintln!("nginx did not start (apt-get install nginx): no baseline");
    }
    let mut page_rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut json_rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for rep in 0..reps {
        for (i, (name, addr, tok)) in targets.iter().enumerate() {
            let (page_url, json_url) = match tok {
                Some(_) => (format!("http://{addr}/sale"), format!("http://{addr}/sale")),
                None => (
                    format!("http://{addr}/sale"),
                    format!("http://{addr}/sale.json"),
                ),
            };
            let cookie = tok
                .as_ref()
                .map(|t| vec![format!("Cookie: bw_wr_sale={t}")])
                .unwrap_or_default();
            let mut h = vec!["Accept: text/html".to_string()];
            h.extend(cookie.iter().cloned());
            let p = wrk(&page_url, &h, "200");
            let mut h = vec![
                "Accept: application/json".to_string(),
                "Connection: close".to_string(),
            ];
            if let Some(t) = tok {
                h.push(format!("Breakwater-Room-Token: {t}"));
            }
            let code = if tok.is_some() { "429" } else { "200" };
            let j = wrk(&json_url, &h, code);
            eprintln!("rep {rep} {name:>28}: page {p:?}/s, json (new connection) {j:?}/s");
            page_rates[i].extend(p);
            json_rates[i].extend(j);
        }
    }
    let mut out = format!(
        "Waiting-room answers, {} cores, {} repetitions, medians (wrk -t2 -c64 -d4s on the \
         same cores)\n\n| server | page, keep-alive (req/s) | JSON, new connection per poll \
         (req/s) |\n|---|---:|---:|\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        reps
    );
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.0}"));
    let medians: Vec<_> = (0..targets.len())
        .map(|i| (median(page_rates[i].clone()), median(json_rates[i].clone())))
        .collect();
    for (i, (name, _, _)) in targets.iter().enumerate() {
        out += &format!(
            "| {name} | {} | {} |\n",
            fmt(medians[i].0),
            fmt(medians[i].1)
        );
    }
    if ng.is_some() {
        let base = medians[targets.len() - 1];
        for (i, (name, _, tok)) in targets.iter().enumerate() {
            if tok.is_none() {
                continue;
            }
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
                _ => "-".into(),
            };
            out += &format!(
                "\n{name} / nginx: page {}, JSON {}",
                ratio(medians[i].0, base.0),
                ratio(medians[i].1, base.1)
            );
        }
        out += "\n";
    }
    println!("{out}");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp/room_rate.md");
    let _ = std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp"));
    if std::fs::write(path, &out).is_ok() {
        eprintln!("written to {path}");
    }
    drop(ng);
    drop(running);
}
