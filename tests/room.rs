//! The waiting room, end to end: shoppers on their own addresses join a line, poll with their
//! token and are let in by the door in ticket order at the configured rate; browsers get the
//! page, API clients JSON; the origin revokes sessions; a cookie-less bot cannot mint places.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Response;
use support::*;

fn config(origin: SocketAddr, room: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 2\n[admission]\nper_ip_rate = 0\n\
         [log]\naccess_log = false\n[upstreams.app]\nservers = [\"{origin}\"]\n\
         [[waiting_room]]\nname = \"drop\"\nrefresh = \"1s\"\nqueue_grace = \"4s\"\n{room}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoppers_are_let_in_in_ticket_order_at_the_door_rate() {
    let origin = text_origin("shop").await;
    // 1,200 a minute: 5 per 250 ms tick.
    let proxy = Proxy::start(&config(
        origin.addr,
        "mode = \"queue_all\"\nnew_sessions_per_minute = 1200\ntickets_per_ip = 0",
    ))
    .await;
    let addr = proxy.addr;
    let start = Instant::now();
    let mut tokens = Vec::new();
    for i in 0..40u32 {
        let src = format!("127.0.60.{}", i + 1);
        let a = ask(addr, &src, "/", &[("Accept", "application/json")]).await;
        assert_eq!(a.status, 429, "{}", a.body);
        assert_eq!(a.headers.get("retry-after").map(String::as_str), Some("1"));
        let j = json(&a);
        assert_eq!(j["state"], "queued");
        // The door is already letting the first ones in while the others join.
        let p = j["position"].as_u64().unwrap_or(0);
        assert!(p >= 1 && p <= u64::from(i) + 1, "{j}");
        tokens.push((src, j["token"].as_str().unwrap().to_string()));
    }
    // Everyone polls every 100 ms with the token in the header (an app without cookies).
    let mut tasks = Vec::new();
    for (i, (src, token)) in tokens.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let a = ask(addr, &src, "/", &[("Breakwater-Room-Token", &token)]).await;
                if a.status == 200 {
                    assert_eq!(a.body, "shop");
                    assert!(a
                        .headers
                        .get("set-cookie")
                        .is_some_and(|c| c.starts_with("bw_wr_drop=")));
                    return (i, Instant::now());
                }
                assert_eq!(a.status, 429);
                assert!(Instant::now() < deadline, "shopper {i} never admitted");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let mut admitted = Vec::new();
    for t in tasks {
        admitted.push(t.await.unwrap());
    }
    let took = start.elapsed();
    // FIFO: nobody is let in more than a tick (plus a poll) before someone who joined earlier.
    let slack = Duration::from_millis(350);
    let mut inversions = 0;
    for a in &admitted {
        for b in &admitted {
            if a.0 < b.0 && b.1 + slack < a.1 {
                inversions += 1;
            }
        }
    }
    eprintln!(
        "40 shoppers let in over {took:?} at 20/s; inversions beyond one tick: {inversions}; \
         origin requests {}",
        origin.requests().len()
    );
    assert_eq!(inversions, 0);
    // 40 at 20 a second, counted from the first join: about 2 s (the first tick's budget lets
    // one in at once).
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // The origin saw only admitted shoppers' requests, never a waiter's poll.
    assert_eq!(origin.requests().len(), 40);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_get_the_page_and_api_clients_get_json() {
    let origin = text_origin("shop").await;
    // One a minute: after the first place the door stays shut for the rest of the test.
    let proxy = Proxy::start(&config(
        origin.addr,
        "mode = \"queue_all\"\nnew_sessions_per_minute = 1",
    ))
    .await;
    let addr = proxy.addr;
    let _first = ask(addr, "127.0.62.9", "/", &[]).await;
    // The door's one slot goes to the first ticket at its next tick.
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy.metric("breakwater_room_admitted_total{room=\"drop\",how=\"door\"}") >= 1.0
        })
        .await,
        "the door never let the first ticket in"
    );
    let browser = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8";
    let page = ask(addr, "127.0.62.1", "/", &[("Accept", browser)]).await;
    assert_eq!(page.status, 200);
    assert!(page.headers["content-type"].starts_with("text/html"));
    assert_eq!(page.headers["cache-control"], "no-store");
    let cookie = &page.headers["set-cookie"];
    assert!(cookie.starts_with("bw_wr_drop=v1.t.drop."), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(page.body.contains("aria-live=\"polite\""));
    assert!(page.body.contains("Pause automatic updates"));
    // Without JavaScript the page reloads itself only when the waiter turns that on.
    assert!(!page.body.contains("http-equiv=\"refresh\""));
    assert!(page.body.contains("bw_room_refresh=on"));
    let on = ask(
        addr,
        "127.0.62.1",
        "/item?bw_room_refresh=on&id=7",
        &[("Accept", browser)],
    )
    .await;
    assert_eq!(on.status, 303);
    assert_eq!(
        on.headers["location"], "/item?id=7",
        "the choice is not passed on"
    );
    assert!(on.headers["set-cookie"].starts_with("bw_wr_drop_auto=1;"));
    let auto = ask(
        addr,
        "127.0.62.1",
        "/",
        &[("Accept", browser), ("Cookie", "bw_wr_drop_auto=1")],
    )
    .await;
    assert!(auto
        .body
        .contains("<meta http-equiv=\"refresh\" content=\"1\">"));
    assert!(auto.body.contains("bw_room_refresh=off"));
    // The cookie keeps the place: the same position on the next visit.
    let token = cookie.split(';').next().unwrap().to_string();
    let again = ask(
        addr,
        "127.0.62.1",
        "/",
        &[("Accept", browser), ("Cookie", &token)],
    )
    .await;
    let position = |body: &str| {
        body.split("id=\"position\">")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .map(str::to_string)
    };
    assert_eq!(again.status, 200);
    assert!(position(&page.body).is_some());
    assert_eq!(
        position(&again.body),
        position(&page.body),
        "the place changed"
    );
    assert!(!again.headers.contains_key("set-cookie"));
    // curl's */*, an explicit JSON Accept, and an API path are all answered in JSON.
    for (path, accept) in [
        ("/", "*/*"),
        ("/", "application/json"),
        ("/api/cart", browser),
    ] {
        let a = ask(addr, "127.0.62.2", path, &[("Accept", accept)]).await;
        assert_eq!(a.status, 429, "{path} {accept}");
        assert_eq!(a.headers["content-type"], "application/json");
        assert!(a.headers.contains_key("retry-after"));
        let j = json(&a);
        assert_eq!(j["room"], "drop");
        assert!(j["eta_seconds"].is_array(), "{j}");
    }
    // A forged token is refused (and counted), and its bearer just gets a fresh place.
    let forged = "bw_wr_drop=v1.p.drop.1.1700000000.0.AAAAAAAAAAAAAAAAAAAAAA";
    let f = ask(
        addr,
        "127.0.62.3",
        "/",
        &[("Accept", "*/*"), ("Cookie", forged)],
    )
    .await;
    assert_eq!(f.status, 429);
    assert_eq!(
        proxy.metric("breakwater_room_invalid_tokens_total{room=\"drop\",reason=\"bad_mac\"}"),
        1.0
    );
    assert_eq!(origin.requests().len(), 0, "a waiter reached the origin");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_revokes_a_session_and_the_next_shopper_gets_the_slot() {
    let origin = origin(Arc::new(|req: hyper::Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let mut r = Response::new(full("ok"));
            if req.uri().path() == "/checkout/done" {
                r.headers_mut()
                    .insert("breakwater-room", "revoke".parse().unwrap());
            }
            r
        })
    }))
    .await;
    let proxy = Proxy::start(&config(
        origin.addr,
        "path_prefix = \"/checkout\"\nmax_active_sessions = 1\nnew_sessions_per_minute = 6000",
    ))
    .await;
    let addr = proxy.addr;
    // Outside the room's prefix nothing is held up.
    assert_eq!(ask(addr, "127.0.63.9", "/about", &[]).await.status, 200);
    // A walks in at once (nobody waits, a slot is free) and gets a pass.
    // The pass cookie an answer sets (`name=value`, its attributes cut off).
    let pass_cookie = |a: &Answer| {
        let c = a.headers["set-cookie"]
            .split(';')
            .next()
            .unwrap()
            .to_string();
        assert!(c.starts_with("bw_wr_drop=v1.p."), "{c}");
        c
    };
    let a = ask(addr, "127.0.63.1", "/checkout", &[]).await;
    assert_eq!(a.status, 200);
    let pass = pass_cookie(&a);
    // B finds the room full and takes a ticket.
    let b = ask(addr, "127.0.63.2", "/checkout", &[]).await;
    assert_eq!(b.status, 429);
    let ticket = json(&b)["token"].as_str().unwrap().to_string();
    // A's pass keeps working; A finishes and the origin ends the session.
    assert_eq!(
        ask(addr, "127.0.63.1", "/checkout/cart", &[("Cookie", &pass)])
            .await
            .status,
        200
    );
    let done = ask(addr, "127.0.63.1", "/checkout/done", &[("Cookie", &pass)]).await;
    assert_eq!(done.status, 200);
    assert!(
        !done.headers.contains_key("breakwater-room"),
        "the command reached the client"
    );
    // B is let in within a tick or two.
    let t = Instant::now();
    let b_in = loop {
        let r = ask(
            addr,
            "127.0.63.2",
            "/checkout",
            &[("Breakwater-Room-Token", &ticket)],
        )
        .await;
        if r.status == 200 {
            break t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(3), "B was never let in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("revoke -> next shopper in after {b_in:?}");
    // A's pass is no longer a pass.
    let a_again = ask(addr, "127.0.63.1", "/checkout", &[("Cookie", &pass)]).await;
    assert_eq!(a_again.status, 429);
    assert_eq!(
        proxy.metric("breakwater_room_ended_total{room=\"drop\",how=\"revoked\"}"),
        1.0
    );
    // B's admitted ticket, shown again (a retry) and handed to two others, opens no second
    // session: each gets the pass of B's one session, and the room still counts one inside.
    let session = |a: &Answer| {
        let c = pass_cookie(a);
        (c.split('.').nth(3).unwrap().to_string(), c)
    };
    let with_ticket = [("Breakwater-Room-Token", ticket.as_str())];
    let mut seen = Vec::new();
    for src in ["127.0.63.2", "127.0.63.3", "127.0.63.4"] {
        let r = ask(addr, src, "/checkout", &with_ticket).await;
        assert_eq!(r.status, 200, "{src}");
        seen.push(session(&r));
    }
    assert!(seen.iter().all(|s| s.0 == seen[0].0), "{seen:?}");
    assert_eq!(
        proxy.metric("breakwater_room_active_sessions{room=\"drop\"}"),
        1.0
    );
    // Once that session ends, the ticket is spent: it buys a new place, not a pass.
    let b_pass = seen[0].1.clone();
    let done = ask(addr, "127.0.63.2", "/checkout/done", &[("Cookie", &b_pass)]).await;
    assert_eq!(done.status, 200);
    let spent = ask(addr, "127.0.63.3", "/checkout", &with_ticket).await;
    // (A, back in line since its pass ended, is ahead: nobody walks straight in.)
    assert_eq!(spent.status, 429, "a spent ticket opened a session");
    assert!(json(&spent)["token"].is_string(), "{}", spent.body);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookieless_bot_cannot_mint_places() {
    let origin = text_origin("shop").await;
    let proxy = Proxy::start(&config(
        origin.addr,
        "mode = \"queue_all\"\ntickets_per_ip = 5\nnew_sessions_per_minute = 600",
    ))
    .await;
    let addr = proxy.addr;
    // 50 requests without a cookie from one address: 5 places, then refusals without one.
    let mut with_token = 0;
    for _ in 0..50 {
        let a = ask(addr, "127.0.64.1", "/", &[]).await;
        assert_eq!(a.status, 429);
        if json(&a)["token"].is_string() {
            with_token += 1;
        } else {
            assert_eq!(json(&a)["state"], "refused");
        }
    }
    assert_eq!(with_token, 5);
    assert_eq!(
        proxy.metric("breakwater_room_tickets_total{room=\"drop\",result=\"refused\"}"),
        45.0
    );
    // Other shoppers are unaffected: each gets a place and is let in.
    for i in 0..5 {
        let src = format!("127.0.65.{}", i + 1);
        let a = ask(addr, &src, "/", &[]).await;
        let tok = json(&a)["token"].as_str().unwrap().to_string();
        let t = Instant::now();
        while ask(addr, &src, "/", &[("Breakwater-Room-Token", &tok)])
            .await
            .status
            != 200
        {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "shopper {i} not let in"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_nobody_polls_for_are_passed_over() {
    let origin = text_origin("shop").await;
    // One a second, and a place lapses after two quiet grace epochs (2-4 s).
    let proxy = Proxy::start(
        &config(
            origin.addr,
            "mode = \"queue_all\"\nnew_sessions_per_minute = 60\ntickets_per_ip = 0",
        )
        .replace("queue_grace = \"4s\"", "queue_grace = \"2s\""),
    )
    .await;
    let addr = proxy.addr;
    let mut tokens = Vec::new();
    for i in 0..10 {
        let a = ask(addr, &format!("127.0.66.{}", i + 1), "/", &[]).await;
        tokens.push(json(&a)["token"].as_str().unwrap().to_string());
    }
    // Only the even places are kept (polled); the odd ones walked away.
    let t = Instant::now();
    let mut done = [false; 10];
    while (0..10).step_by(2).any(|i| !done[i]) {
        assert!(t.elapsed() < Duration::from_secs(12), "{done:?}");
        for i in (0..10).step_by(2) {
            if !done[i] {
                let r = ask(
                    addr,
                    &format!("127.0.66.{}", i + 1),
                    "/",
                    &[("Breakwater-Room-Token", &tokens[i])],
                )
                .await;
                done[i] = r.status == 200;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t.elapsed();
    let skipped = proxy.metric("breakwater_room_ended_total{room=\"drop\",how=\"abandoned\"}");
    eprintln!("5 of 10 places kept: all in after {took:?}, {skipped} passed over");
    // Without skipping, the tenth place's holder would wait ~10 s at one a second.
    assert!(took < Duration::from_millis(9500), "{took:?}");
    assert!(skipped >= 2.0, "{skipped}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_places_and_passes() {
    let origin = text_origin("shop").await;
    let before = config(
        origin.addr,
        "mode = \"auto\"\nmax_active_sessions = 1\nnew_sessions_per_minute = 600",
    );
    let proxy = Proxy::start(&before).await;
    let addr = proxy.addr;
    let a = ask(addr, "127.0.67.1", "/", &[]).await;
    assert_eq!(a.status, 200);
    let pass = a.headers["set-cookie"]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let b = ask(addr, "127.0.67.2", "/", &[]).await;
    assert_eq!(b.status, 429);
    let ticket = json(&b)["token"].as_str().unwrap().to_string();
    // Reload: the room now takes two shoppers at once.
    let after = before.replace("max_active_sessions = 1", "max_active_sessions = 2");
    proxy
        .reloader
        .reload(breakwater::Config::parse(&after, "after.toml").unwrap())
        .await
        .unwrap();
    // A's pass still works and B's place is honoured (and, with room for two, B is let in).
    assert_eq!(
        ask(addr, "127.0.67.1", "/", &[("Cookie", &pass)])
            .await
            .status,
        200
    );
    let t = Instant::now();
    while ask(
        addr,
        "127.0.67.2",
        "/",
        &[("Breakwater-Room-Token", &ticket)],
    )
    .await
    .status
        != 200
    {
        assert!(t.elapsed() < Duration::from_secs(3), "B's place was lost");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.stop().await;
}

/// RFC 3339 (UTC) for a moment `after` from now.
fn rfc3339_in(after: Duration) -> String {
    let t = std::time::SystemTime::now() + after;
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prequeue_waits_for_the_opening_then_goes_in_shuffled() {
    let origin = text_origin("shop").await;
    let opens = rfc3339_in(Duration::from_secs(5));
    let proxy = Proxy::start(&config(
        origin.addr,
        &format!(
            "order = \"shuffle_prequeue\"\nopens_at = \"{opens}\"\n\
             new_sessions_per_minute = 600\ntickets_per_ip = 0"
        ),
    ))
    .await;
    let addr = proxy.addr;
    // 30 shoppers join before the opening (auto mode, but nobody walks in before it).
    let mut tokens = Vec::new();
    for i in 0..30 {
        let src = format!("127.0.68.{}", i + 1);
        let a = ask(addr, &src, "/", &[]).await;
        assert_eq!(a.status, 429, "someone walked in before the opening");
        let j = json(&a);
        assert!(j["eta_seconds"][0].as_u64().unwrap_or(0) >= 1, "{j}");
        tokens.push((src, j["token"].as_str().unwrap().to_string()));
    }
    let mut order: Vec<usize> = Vec::new();
    let t = Instant::now();
    while order.len() < 30 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "only {} in",
            order.len()
        );
        for (i, (src, tok)) in tokens.iter().enumerate() {
            if !order.contains(&i) {
                let r = ask(addr, src, "/", &[("Breakwater-Room-Token", tok)]).await;
                if r.status == 200 {
                    order.push(i);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody got in before the opening; everyone did after; not in arrival order.
    let first_in = proxy
        .metric("breakwater_room_door_closed_seconds_total{room=\"drop\",reason=\"not_open\"}");
    eprintln!("pre-queue of 30 let in as {order:?} (door shut {first_in} s before opening)");
    assert!(first_in >= 0.5, "{first_in}");
    let inversions = (0..30)
        .flat_map(|a| (a + 1..30).map(move |b| (a, b)))
        .filter(|&(a, b)| order[a] > order[b])
        .count();
    eprintln!("{inversions} of 435 pairs out of arrival order");
    // A random order of 30 has ~217 inversions on average; arrival order has 0.
    assert!(inversions > 50, "{inversions} inversions: not shuffled");
    proxy.stop().await;
}

/// Staff and monitoring walk past the line with a bypass minted by `breakwater room-bypass`
/// (signed with the room's key, good until it expires); and with `bind_ipv4_prefix` a place in
/// line works only from the network it was taken on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_bypass_walks_past_and_a_bound_place_stays_on_its_network() {
    let origin = text_origin("shop").await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("room.key");
    std::fs::write(
        &key,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    )
    .unwrap();
    let toml = config(
        origin.addr,
        &format!(
            "mode = \"queue_all\"\nopens_at = \"{}\"\ntickets_per_ip = 0\n\
             bind_ipv4_prefix = 24\nkeys = [\"{}\"]",
            rfc3339_in(Duration::from_secs(3600)),
            key.display()
        ),
    );
    let file = dir.path().join("breakwater.toml");
    std::fs::write(&file, &toml).unwrap();
    let minted = std::process::Command::new(bin())
        .args([
            "room-bypass",
            "--room",
            "drop",
            "--valid",
            "10m",
            "--config",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let line = String::from_utf8(minted.stdout).unwrap();
    let bypass = line
        .trim()
        .strip_prefix("Breakwater-Room-Bypass: ")
        .expect("a header line")
        .to_string();
    let wrong_room = std::process::Command::new(bin())
        .args(["room-bypass", "--room", "nope", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!wrong_room.status.success());
    assert!(String::from_utf8_lossy(&wrong_room.stderr).contains("rooms: drop"));

    let proxy = Proxy::start(&toml).await;
    let addr = proxy.addr;
    // Before the opening everyone waits, except a request with the bypass.
    let waiting = ask(addr, "127.0.7.1", "/", &[("Accept", "text/html")]).await;
    assert!(waiting.body.contains("You are in line"));
    let staff = ask(
        addr,
        "127.0.9.1",
        "/",
        &[("Breakwater-Room-Bypass", &bypass)],
    )
    .await;
    assert_eq!((staff.status, staff.body.as_str()), (200, "shop"));
    // Altered (a later expiry), it is refused and the request waits like any other.
    let forged = bypass.replacen(".b.drop.", ".b.drop.f", 1);
    let refused = ask(
        addr,
        "127.0.9.1",
        "/",
        &[("Breakwater-Room-Bypass", &forged), ("Accept", "text/html")],
    )
    .await;
    assert!(refused.body.contains("You are in line"));
    assert_eq!(
        proxy.metric(r#"breakwater_room_bypassed_total{room="drop"}"#),
        1.0
    );

    // A place taken from 127.0.7.1 keeps its number from the same /24 ...
    let ticket = waiting.headers["set-cookie"]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let place = |a: &Answer| json(a)["position"].as_u64();
    let same_net = ask(addr, "127.0.7.200", "/api/x", &[("Cookie", &ticket)]).await;
    assert_eq!(place(&same_net), Some(1));
    assert!(
        !same_net.headers.contains_key("set-cookie"),
        "the same ticket"
    );
    // ... and from another network it is refused: a new place at the back of the line (behind
    // the forged bypass's request, which took the second).
    let other_net = ask(addr, "127.0.8.1", "/api/x", &[("Cookie", &ticket)]).await;
    assert_eq!(place(&other_net), Some(3));
    assert!(other_net.headers["set-cookie"].starts_with("bw_wr_drop="));
    assert_eq!(
        proxy.metric(r#"breakwater_room_invalid_tokens_total{room="drop",reason="wrong_address"}"#),
        1.0
    );
    proxy.stop().await;
}

/// `breakwater storm --mode queue` against a room: shoppers who keep polling are let in in
/// ticket order at the door's rate, their wait matches the estimate they were first shown, and
/// when half of them walk away the door passes over their places and keeps its rate for the
/// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_users_get_in_in_order_at_the_rate_and_as_estimated() {
    use breakwater::tools::storm::queue::{run, QueuePlan};
    let origin = text_origin("shop").await;
    // 1,200 a minute: 20 a second, 5 per tick; shoppers stay inside (no session limit bites).
    let proxy = Proxy::start(&config(
        origin.addr,
        "mode = \"queue_all\"\nnew_sessions_per_minute = 1200\ntickets_per_ip = 0\n\
         max_active_sessions = 100000",
    ))
    .await;
    let plan = |users, abandon, sources: &str| QueuePlan {
        target: proxy.addr,
        users,
        // All polling: a steady arrival (the estimate is checked); half abandoning: everyone
        // within the first second, so the line outlasts the grace and the door's recovery
        // shows (and the polls are spread over each second, so a window counts fairly).
        join_rate: if abandon > 0.0 { 360 } else { 50 },
        sources: sources.parse().unwrap(),
        path: "/".into(),
        host: "shop.test".into(),
        requests_after: 2,
        abandon,
        poll: None,
        duration: Duration::from_secs(40),
    };
    let r = run(plan(240, 0.0, "127.0.64.0/24")).await;
    eprintln!("all polling: {}", r.render());
    assert_eq!(r.joined, 240);
    assert_eq!(r.admitted, 240, "{r:?}");
    assert_eq!(r.errors, 0);
    assert_eq!(r.inversions_beyond_poll, 0, "let in out of order");
    assert!(
        (r.admit_rate - 20.0).abs() <= 20.0 * 0.05,
        "door rate {}",
        r.admit_rate
    );
    assert!(r.eta_within >= 0.9, "estimates: {:?}", r.wait_over_eta);
    assert_eq!(r.request_ms.count, 480);

    let r = run(plan(360, 0.5, "127.0.65.0/23")).await;
    eprintln!("half walk away: {}", r.render());
    assert_eq!(r.abandoned, 180);
    assert_eq!(r.admitted, 180, "{r:?}");
    assert_eq!(r.inversions_beyond_poll, 0);
    // Places nobody polls for cost the door a slot until they are found out (a queue_grace
    // plus two ticks after their last poll: 4.5 s here), then nothing: from then on the others
    // go in at the door's rate.
    // The abandoned stopped within the first second: by 6 s every one of them is found out
    // (and by 11 s the 180 who stayed are all in, so the window ends before that).
    let seen = r
        .admit_times
        .iter()
        .filter(|t| (6.0..9.0).contains(*t))
        .count();
    eprintln!("let in between 6 s and 9 s: {seen} (door: 60)");
    assert!(
        seen as f64 >= 60.0 * 0.95,
        "door rate once the abandoned are passed over: {seen} in 3 s; {:?}",
        r.admit_times
    );
    proxy.stop().await;
}
