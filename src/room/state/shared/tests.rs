//! The mirror without a store: what the room sync hands it is written out by hand.

use super::*;

/// A store bit map (most significant bit first) with `tickets` set.
fn store_map(tickets: &[u64]) -> Vec<u8> {
    let mut v = vec![0u8; 8];
    for t in tickets {
        v[(t / 8) as usize] |= 0x80 >> (t % 8);
    }
    v
}

#[test]
fn the_leader_walks_what_the_counter_handed_out_a_horizon_ago() {
    let s = SharedState::new(8, Duration::from_secs(60));
    let t0 = Instant::now();
    let g = s.outgoing(t0);
    assert_eq!(
        g.lease, MIN_LEASE,
        "a new instance leases before its first ticket"
    );
    let leader = |issued, holes| Incoming {
        lease_end: None,
        issued,
        started: 100,
        leader: true,
        instances: 1,
        holes_total: Some(holes),
        ..Incoming::default()
    };
    // Another instance leased 9..=16 meanwhile.
    s.incoming(
        &g,
        Incoming {
            lease_end: Some(8),
            ..leader(16, 0)
        },
        t0,
    );
    assert_eq!((s.issue(), s.issue()), (1, 2));
    assert_eq!(s.unleased.load(Ordering::Relaxed), 0);
    assert_eq!(s.waiting(), 2);
    // Numbers handed out just now may belong to tickets whose first poll is on its way.
    assert_eq!(s.advance(5), (0, 0));
    let later = t0 + HORIZON;
    // This instance's lease expired with 3..=8 unused: reported as holes (the other
    // instance reports 9..=16 the same way).
    let g = s.outgoing(later);
    assert_eq!(g.holes, 6);
    s.incoming(&g, leader(16, 14), later);
    // 1 and 2 (polled here) are let in; 3..=16 were never issued: passed over, and
    // not counted as abandoned places.
    assert_eq!(s.advance(5), (2, 0));
    let g = s.outgoing(later);
    assert_eq!(g.cursor, Some(16));
    assert_eq!(g.skipped, (3..=16).collect::<Vec<_>>());
    assert_eq!(g.touched, Vec::<u64>::new(), "sent with the first sync");
    assert_eq!(s.admitted(2), Some(true));
    assert_eq!(s.admitted(3), Some(false));
    // A line idle for longer than LEASE_WHILE_BUSY stops leasing.
    assert_eq!(s.outgoing(later + LEASE_WHILE_BUSY).lease, 0);
}

#[test]
fn a_follower_takes_the_door_s_moves_and_liveness_from_the_store() {
    let s = SharedState::new(8, Duration::from_secs(60));
    let now = Instant::now();
    let g = s.outgoing(now);
    let view = |cursor, skipped| Incoming {
        issued: 40,
        cursor,
        first_byte: 0,
        skipped,
        live: store_map(&[22, 24]),
        leader: false,
        instances: 4,
        ..Incoming::default()
    };
    // The first sync learns the counter: nothing asked of the bit maps beyond it.
    s.incoming(&g, view(0, Vec::new()), now);
    let g = s.outgoing(now);
    assert_eq!((g.base, g.top), (1, 40));
    // The store's string of skips ends at the byte of the last skip (9): later tickets
    // the door passed were let in.
    let mut skipped = store_map(&[3, 9]);
    skipped.truncate(2);
    s.incoming(&g, view(20, skipped), now);
    assert_eq!(s.admitted(3), Some(false));
    assert_eq!(s.admitted(4), Some(true));
    assert_eq!(s.admitted(9), Some(false));
    assert_eq!(s.admitted(18), Some(true));
    assert_eq!(s.admitted(21), None);
    // Polled on other instances: in line here too.
    assert_eq!(s.waiting(), 2);
    assert_eq!(s.ahead(24), 1);
    // Not this instance's door to move: it reports what it saw pass, once.
    assert_eq!(s.advance(5), (18, 2));
    assert_eq!(s.advance(5), (0, 0));
    assert!(!s.leads());
    assert_eq!(s.walk_in_share(), 0.25);
    // A poll here for ticket 27 goes to the store.
    s.touch(27);
    assert_eq!(s.outgoing(now).touched, vec![27]);
}

#[test]
fn a_pass_holds_on_every_instance_until_the_fleet_ends_it() {
    let s = SharedState::new(8, Duration::from_secs(60));
    let now = Instant::now();
    // Minted on another instance: adopted and announced.
    assert!(s.session_touch(42, now));
    s.session_add(7, now);
    let g = s.outgoing(now);
    assert_eq!(g.sessions, vec![42, 7]);
    s.incoming(
        &g,
        Incoming {
            sessions: 3,
            ended: vec![42],
            ..Incoming::default()
        },
        now,
    );
    assert!(!s.session_touch(42, now), "ended elsewhere");
    assert!(s.session_touch(7, now));
    assert_eq!(s.sessions(), 3, "the fleet's count");
    assert!(s.session_revoke(7));
    assert_eq!(s.outgoing(now).revoked, vec![7]);
    // Without the store, what this instance knows.
    s.set_degraded(true);
    assert_eq!(s.sessions(), 0);
    assert!(s.leads());
}

#[test]
fn an_outage_does_not_pile_up_polls_for_the_store() {
    let s = SharedState::new(8, Duration::from_secs(60));
    let now = Instant::now();
    s.touch(5);
    // Syncs fail: what they carried comes back, bounded.
    for _ in 0..3 {
        let mut g = s.outgoing(now);
        g.touched.extend(0..MAX_UNSENT_POLLS as u64);
        s.failed(g);
    }
    assert_eq!(s.outgoing(now).touched.len(), MAX_UNSENT_POLLS);
    // The store is gone: polls are not kept for it at all.
    s.touch(7);
    s.set_degraded(true);
    for round in 0..1000 {
        s.rotate();
        s.touch(10 + round % 7);
    }
    assert!(s.outgoing(now).touched.is_empty());
    assert_eq!(
        s.waiting(),
        16,
        "the line itself keeps every ticket while alone"
    );
    // Back: the tickets polled within the last grace go to the store, once each.
    s.set_degraded(false);
    let mut sent = s.outgoing(now).touched;
    sent.sort_unstable();
    assert_eq!(sent, (10..=16).collect::<Vec<_>>());
}

#[test]
fn without_the_store_every_door_walks_every_ticket() {
    let s = SharedState::new(8, Duration::from_secs(60));
    s.set_degraded(true);
    let tickets: Vec<u64> = (0..5).map(|_| s.issue()).collect();
    assert_eq!(tickets, vec![1, 2, 3, 4, 5]);
    assert_eq!(s.unleased.load(Ordering::Relaxed), 5);
    // A ticket from another instance (polled here) is in line too.
    s.touch(9);
    assert_eq!(s.waiting(), 9);
    assert_eq!(s.advance(3), (3, 0));
    assert_eq!(s.admitted(3), Some(true));
    assert_eq!(s.advance(10), (6, 0));
    assert_eq!(s.admitted(9), Some(true));
}
