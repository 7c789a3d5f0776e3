//! `breakwater storm --mode queue`: virtual shoppers in a waiting room. Each arrives from its
//! own source address, takes a ticket (JSON, as an app would), keeps its token and polls at the
//! interval the room asks for; once let in it makes its requests with the pass and leaves. A
//! share of them abandon after joining. The report is what the room promises: the order people
//! were let in against the order they joined, the wait against the first estimate shown, the
//! rate the door kept, and the admitted shoppers' request latency.
//!
//! Bounded by the number of users and by the hard time limit; every request has a timeout.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::Percentiles;

#[derive(Debug, Clone)]
pub struct QueuePlan {
    pub target: SocketAddr,
    pub users: u64,
    /// Users arriving per second; 0 = all at once.
    pub join_rate: u64,
    pub sources: IpNet,
    pub path: String,
    pub host: String,
    /// Requests each admitted user makes with its pass before leaving.
    pub requests_after: u32,
    /// Share of users (0.0–1.0) that stop polling after joining.
    pub abandon: f64,
    /// Poll this often instead of the room's `refresh_seconds`.
    pub poll: Option<Duration>,
    /// Hard bound on the whole run.
    pub duration: Duration,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QueueReport {
    pub users: u64,
    /// Took a ticket.
    pub joined: u64,
    /// Let in at once (the room was not queueing).
    pub walked_in: u64,
    /// Answered without a place (tickets_per_ip).
    pub refused: u64,
    /// Stopped polling on purpose (the plan's share).
    pub abandoned: u64,
    /// Kept polling and were let in.
    pub admitted: u64,
    /// Kept polling and were still waiting when the run ended.
    pub still_waiting: u64,
    /// Kept polling, yet were handed a new ticket (the room took them for gone): should be 0.
    pub lost_place: u64,
    pub errors: u64,
    /// Pairs of polling users let in in the opposite order of their tickets, by more than one
    /// poll interval plus one door tick (what a poll can see); and all such pairs.
    pub inversions_beyond_poll: u64,
    pub inversions_seen: u64,
    /// Admitted users whose wait fell within the first estimate shown (widened by one poll
    /// interval, the lag with which a poll sees its turn), of those shown one.
    pub eta_within: f64,
    /// The first estimate's midpoint against the actual wait, percentiles of actual / midpoint.
    pub wait_over_eta: Percentiles,
    /// Users let in per second, from the first to the last admission.
    pub admit_rate: f64,
    /// The same over the second half of the admissions: with abandoned places ahead, the
    /// rate once the door has learned they are gone (after `queue_grace`).
    pub admit_rate_late: f64,
    /// When each polling user was let in, seconds from the start, in order.
    #[serde(skip)]
    pub admit_times: Vec<f64>,
    /// Seconds from joining to being let in.
    pub wait_s: Percentiles,
    /// The admitted users' requests with their pass, ms.
    pub request_ms: Percentiles,
    pub elapsed_s: f64,
}

/// One user's story, for the report.
#[derive(Debug, Clone, Default)]
struct Story {
    ticket: Option<u64>,
    joined_at: Option<f64>,
    admitted_at: Option<f64>,
    eta: Option<[f64; 2]>,
    walked_in: bool,
    refused: bool,
    abandoned: bool,
    /// Polled on time, yet was handed a new ticket: the room took its place as abandoned.
    lost_place: bool,
    error: bool,
    request_us: Vec<u64>,
    /// Seconds between polls.
    poll_s: f64,
}

struct Answer {
    status: u16,
    /// The room's JSON (a waiting answer), when it was one.
    json: Option<serde_json::Value>,
    /// A pass cookie's token, when the request was let in.
    pass: Option<String>,
}

async fn ask(plan: &QueuePlan, src: IpAddr, token: Option<&str>) -> Option<Answer> {
    let work = async {
        let mut s = super::connect_from(src, plan.target).await.ok()?;
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nConnection: close\r\n\
             User-Agent: breakwater-storm-queue\r\n",
            plan.path, plan.host
        );
        if let Some(t) = token {
            req += &format!("Breakwater-Room-Token: {t}\r\n");
        }
        req += "\r\n";
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(1024);
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.get(9..12)?.parse().ok()?;
        let mut json = None;
        let mut pass = None;
        for line in head.lines().skip(1) {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-type" && v.starts_with("application/json") {
                json = serde_json::from_str(body).ok();
            }
            if k == "set-cookie" {
                // bw_wr_<room>=v1.p....; a pass.
                if let Some((_, t)) = v.split(';').next().and_then(|kv| kv.split_once('=')) {
                    if t.starts_with("v1.p.") {
                        pass = Some(t.to_string());
                    }
                }
            }
        }
        Some(Answer { status, json, pass })
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .ok()
        .flatten()
}

async fn user(plan: &QueuePlan, i: u64, src: IpAddr, start: Instant, deadline: Instant) -> Story {
    let mut story = Story::default();
    let now = || start.elapsed().as_secs_f64();
    let Some(first) = ask(plan, src, None).await else {
        story.error = true;
        return story;
    };
    story.joined_at = Some(now());
    let pass = match (&first.json, first.pass) {
        (_, Some(p)) => {
            story.walked_in = true;
            story.admitted_at = story.joined_at;
            Some(p)
        }
        (Some(j), None) if j["state"] == "queued" => {
            // The ticket number, from the token (`v1.t.<room>.<id, hex>...`): the order of
            // arrival in line, which the position shown is not once people have gone in.
            story.ticket = j["token"]
                .as_str()
                .and_then(|t| t.split('.').nth(3))
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            story.eta = j["eta_seconds"]
                .as_array()
                .and_then(|e| Some([e.first()?.as_f64()?, e.get(1)?.as_f64()?]));
            None
        }
        (Some(j), None) if j["state"] == "refused" => {
            story.refused = true;
            return story;
        }
        _ => {
            // The origin answered without a pass: the room did not cover the path.
            story.walked_in = true;
            story.admitted_at = story.joined_at;
            story.error = first.status >= 500;
            return story;
        }
    };
    // Every n-th user walks away after joining (spread evenly through the line).
    let abandons = plan.abandon > 0.0 && {
        let every = 1.0 / plan.abandon.min(1.0);
        ((i as f64) % every) < 1.0
    };
    let token = first
        .json
        .as_ref()
        .and_then(|j| j["token"].as_str().map(str::to_string));
    let pass = match pass {
        Some(p) => p,
        None if abandons => {
            story.abandoned = true;
            return story;
        }
        None => {
            let Some(mut token) = token else {
                story.error = true;
                return story;
            };
            let every = plan.poll.unwrap_or_else(|| {
                let s = first
                    .json
                    .as_ref()
                    .and_then(|j| j["refresh_seconds"].as_u64())
                    .unwrap_or(1);
                Duration::from_secs(s.max(1))
            });
            story.poll_s = every.as_secs_f64();
            loop {
                tokio::time::sleep(every).await;
                if Instant::now() >= deadline {
                    return story;
                }
                let Some(a) = ask(plan, src, Some(&token)).await else {
                    story.error = true;
                    continue;
                };
                if let Some(p) = a.pass {
                    story.admitted_at = Some(now());
                    break p;
                }
                let Some(j) = &a.json else {
                    // Let in without a pass (a bypass or the room went to passthrough).
                    story.admitted_at = Some(now());
                    return story;
                };
                // A waiting answer carries a token only when it is a new ticket: this user's
                // place was given up. It goes on with the new one, as a browser's cookie would.
                if let Some(t) = j["token"].as_str() {
                    story.lost_place = true;
                    token = t.to_string();
                }
            }
        }
    };
    for _ in 0..plan.requests_after {
        let t = Instant::now();
        match ask(plan, src, Some(&pass)).await {
            Some(a) if a.json.is_none() => story.request_us.push(t.elapsed().as_micros() as u64),
            _ => story.error = true,
        }
    }
    story
}

pub async fn run(plan: QueuePlan) -> QueueReport {
    let start = Instant::now();
    let deadline = start + plan.duration;
    let sources = super::source_list(plan.sources);
    let stories = Mutex::new(Vec::with_capacity(plan.users as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let plan = std::sync::Arc::new(plan);
    let stories = std::sync::Arc::new(stories);
    for i in 0..plan.users {
        if plan.join_rate > 0 {
            let at = start + Duration::from_secs_f64(i as f64 / plan.join_rate as f64);
            tokio::time::sleep_until(at).await;
        }
        if Instant::now() >= deadline {
            break;
        }
        let src = sources[(i as usize) % sources.len().max(1)];
        let (plan, stories) = (plan.clone(), stories.clone());
        tasks.spawn(async move {
            let s = user(&plan, i, src, start, deadline).await;
            stories.lock().unwrap_or_else(|p| p.into_inner()).push(s);
        });
    }
    // Users stop by themselves at the deadline; this bounds the wait for the last requests.
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let stories = std::mem::take(&mut *stories.lock().unwrap_or_else(|p| p.into_inner()));
    report(&plan, stories, start.elapsed().as_secs_f64())
}

fn report(plan: &QueuePlan, stories: Vec<Story>, elapsed: f64) -> QueueReport {
    let poll = stories.iter().map(|s| s.poll_s).fold(0.0, f64::max);
    let mut r = QueueReport {
        users: plan.users,
        elapsed_s: elapsed,
        ..Default::default()
    };
    let mut waited: Vec<(u64, f64, f64)> = Vec::new(); // (ticket, admitted_at, wait)
    let mut wait_us = Vec::new();
    let mut request_us = Vec::new();
    let mut ratios = Vec::new();
    let (mut eta_shown, mut eta_hit) = (0u64, 0u64);
    for s in &stories {
        r.errors += u64::from(s.error);
        r.lost_place += u64::from(s.lost_place);
        request_us.extend_from_slice(&s.request_us);
        if s.refused {
            r.refused += 1;
            continue;
        }
        if s.walked_in {
            r.walked_in += 1;
            continue;
        }
        if s.ticket.is_some() {
            r.joined += 1;
        }
        if s.abandoned {
            r.abandoned += 1;
            continue;
        }
        let (Some(ticket), Some(joined)) = (s.ticket, s.joined_at) else {
            continue;
        };
        let Some(at) = s.admitted_at else {
            r.still_waiting += 1;
            continue;
        };
        r.admitted += 1;
        let wait = at - joined;
        wait_us.push((wait * 1e6) as u64);
        waited.push((ticket, at, wait));
        if let Some([lo, hi]) = s.eta {
            eta_shown += 1;
            if wait >= lo - poll && wait <= hi + poll {
                eta_hit += 1;
            }
            let mid = (lo + hi) / 2.0;
            if mid > 0.0 {
                ratios.push((wait / mid * 1e6) as u64);
            }
        }
    }
    // Inversions: an earlier ticket seen let in after a later one.
    waited.sort_by_key(|w| w.0);
    let slack = poll + crate::room::TICK.as_secs_f64();
    for (i, a) in waited.iter().enumerate() {
        for b in &waited[i + 1..] {
            if a.1 > b.1 {
                r.inversions_seen += 1;
                if a.1 - b.1 > slack {
                    r.inversions_beyond_poll += 1;
                }
            }
        }
    }
    let rate = |times: &[f64]| match (times.first(), times.last()) {
        (Some(a), Some(b)) if b > a => (times.len() - 1) as f64 / (b - a),
        _ => 0.0,
    };
    let mut times: Vec<f64> = waited.iter().map(|w| w.1).collect();
    times.sort_by(f64::total_cmp);
    r.admit_rate = rate(&times);
    r.admit_rate_late = rate(&times[times.len() / 2..]);
    r.admit_times = times;
    r.eta_within = if eta_shown > 0 {
        eta_hit as f64 / eta_shown as f64
    } else {
        0.0
    };
    // Percentiles works in µs and reports ms: the ratio ×1e6 comes back ×1e3, undone here.
    let mut w = Percentiles::of(ratios);
    for v in [&mut w.p50, &mut w.p90, &mut w.p99, &mut w.max] {
        *v /= 1000.0;
    }
    r.wait_over_eta = w;
    let mut s = Percentiles::of(wait_us);
    for v in [&mut s.p50, &mut s.p90, &mut s.p99, &mut s.max] {
        *v /= 1000.0;
    }
    r.wait_s = s;
    r.request_ms = Percentiles::of(request_us);
    r
}

impl QueueReport {
    pub fn render(&self) -> String {
        format!(
            "{} users in {:.1} s: {} joined the line, {} walked in, {} refused a place, {} \
             abandoned; of those who kept polling {} were let in ({:.1}/s, {:.1}/s over the \
             second half), {} still waiting, {} lost their place; {} errors\n\
             order: {} pairs let in out of ticket order beyond one poll + one tick ({} seen \
             at all)\n\
             wait: p50 {:.1} s, p90 {:.1} s, max {:.1} s; within the first estimate shown: \
             {:.0}% (actual / estimate p50 {:.2}, p90 {:.2})\n\
             admitted users' requests: p50 {:.1} ms, p99 {:.1} ms ({} requests)\n",
            self.users,
            self.elapsed_s,
            self.joined,
            self.walked_in,
            self.refused,
            self.abandoned,
            self.admitted,
            self.admit_rate,
            self.admit_rate_late,
            self.still_waiting,
            self.lost_place,
            self.errors,
            self.inversions_beyond_poll,
            self.inversions_seen,
            self.wait_s.p50,
            self.wait_s.p90,
            self.wait_s.max,
            self.eta_within * 100.0,
            self.wait_over_eta.p50,
            self.wait_over_eta.p90,
            self.request_ms.p50,
            self.request_ms.p99,
            self.request_ms.count,
        )
    }
}
