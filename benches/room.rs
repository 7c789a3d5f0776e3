//! The waiting room's per-request costs: verifying a token (goal: under 1 µs), the line's work
//! for one poll with 20,000 people waiting, and the page; plus the server state per waiter.
//! Run: `cargo bench --bench room`.

use std::hint::black_box;

use breakwater::room::page;
use breakwater::room::state::{LocalState, RoomState};
use breakwater::room::token::{Keys, Kind, Token};
use criterion::{criterion_group, criterion_main, Criterion};

fn bench(c: &mut Criterion) {
    let keys = Keys::new(&[b"0123456789abcdef0123456789abcdef".to_vec()]);
    let t = Token {
        bind: None,
        kind: Kind::Ticket,
        id: 12_345,
        issued: 1_764_000_000,
    };
    let signed = keys.sign("drop", t);
    let forged = signed.replacen("v1.t.", "v1.p.", 1);
    c.bench_function("token verify (valid)", |b| {
        b.iter(|| keys.verify("drop", black_box(&signed)))
    });
    c.bench_function("token verify (forged)", |b| {
        b.iter(|| keys.verify("drop", black_box(&forged)))
    });
    c.bench_function("token sign", |b| b.iter(|| keys.sign("drop", black_box(t))));

    // A line of 20,000, the poller in the middle.
    let line = LocalState::default();
    for _ in 0..20_000 {
        line.issue();
    }
    c.bench_function("poll with 20,000 waiting (touch, admitted, ahead)", |b| {
        b.iter(|| {
            line.touch(black_box(10_000));
            let a = line.admitted(10_000);
            (a, line.ahead(10_000))
        })
    });
    let status = page::Status {
        room: "drop",
        state: "queued",
        position: Some(10_001),
        ahead: Some(10_000),
        eta_seconds: Some([80, 120]),
        refresh_seconds: 20,
        token: Some(&signed),
        auto_refresh: false,
        grace_seconds: 60,
    };
    let template = page::Template::new(None);
    c.bench_function("waiting page (HTML)", |b| {
        b.iter(|| template.fill(black_box(&status)))
    });
    c.bench_function("waiting answer (JSON)", |b| {
        b.iter(|| page::json(black_box(&status)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
