//! Two sessions on a real loopback channel (127.0.0.1 only): each end proves its local
//! identities when the session starts; a new identity, a renewed SVID and a withdrawal
//! reach the peer; the clock offset is measured (one end 45 minutes ahead).

use std::time::Duration;

use super::*;
use crate::svid::clock::ManualClock;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

async fn next(rx: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no session event within 10 s").expect("session ended")
}

use crate::channel::test_nodes::Nodes;

#[tokio::test]
async fn sessions_prove_start_changes_renewals_and_withdrawals_and_measure_the_clock() {
    let nodes = Nodes::new().await;
    let (clock, ca) = (&nodes.clock, &nodes.ca);
    let verifier = || nodes.verifier();
    let (c1, c2) = nodes.channel().await;

    let svid = |s: &str| Arc::new(ca.issue(&id(s)).unwrap());
    let (web, api, db) = ("spiffe://zt.test/ns/default/sa/web", "spiffe://zt.test/ns/default/sa/api", "spiffe://zt.test/ns/default/sa/db");
    let (tx1, local1) = watch::channel(LocalSvids::from([(id(web), svid(web))]));
    let (tx2, local2) = watch::channel(LocalSvids::from([(id(api), svid(api))]));
    let (ev1_tx, mut ev1) = mpsc::channel(16);
    let (ev2_tx, mut ev2) = mpsc::channel(16);
    // n2's session clock runs 45 minutes ahead (the seed's skewed node).
    let ahead = Arc::new(ManualClock::new(clock.now() + Duration::from_secs(45 * 60)));
    let s1 = tokio::spawn(run(c1, verifier(), clock.clone(), local1, ev1_tx));
    let s2 = tokio::spawn(run(c2, verifier(), ahead.clone(), local2, ev2_tx));

    // Start: each end learns the other's identity and clock offset (order of arrival free).
    let mut got1 = vec![next(&mut ev1).await, next(&mut ev1).await];
    let mut got2 = vec![next(&mut ev2).await, next(&mut ev2).await];
    got1.sort_by_key(|e| format!("{e:?}"));
    got2.sort_by_key(|e| format!("{e:?}"));
    assert!(matches!(&got1[0], SessionEvent::ClockOffsetMs(o) if *o == 45 * 60 * 1000), "n1 sees n2 ahead: {got1:?}");
    assert!(matches!(&got1[1], SessionEvent::Proven(p) if p.spiffe_id == id(api)), "{got1:?}");
    assert!(matches!(&got2[0], SessionEvent::ClockOffsetMs(o) if *o == -45 * 60 * 1000), "n2 sees n1 behind: {got2:?}");
    assert!(matches!(&got2[1], SessionEvent::Proven(p) if p.spiffe_id == id(web)), "{got2:?}");

    // A pod of a new identity starts on n2: proven to n1.
    let first_api_end = match &got1[1] {
        SessionEvent::Proven(p) => p.not_after,
        _ => unreachable!(),
    };
    tx2.send_modify(|m| {
        m.insert(id(db), svid(db));
    });
    assert!(matches!(next(&mut ev1).await, SessionEvent::Proven(p) if p.spiffe_id == id(db)));
    // api's SVID is renewed (later): proven again, the new expiry replaces the old.
    clock.advance(Duration::from_secs(60));
    tx2.send_modify(|m| {
        m.insert(id(api), svid(api));
    });
    match next(&mut ev1).await {
        SessionEvent::Proven(p) => assert_eq!((p.spiffe_id, p.not_after), (id(api), first_api_end + Duration::from_secs(60))),
        other => panic!("want api's renewed proof, got {other:?}"),
    }
    // db's last pod leaves n2: withdrawn.
    tx2.send_modify(|m| {
        m.remove(&id(db));
    });
    assert_eq!(next(&mut ev1).await, SessionEvent::Withdrawn(db.to_string()));
    // Closing one end ends both sessions.
    drop(tx1);
    drop(tx2);
    let _ = tokio::time::timeout(Duration::from_secs(10), s1).await.expect("session 1 ended");
    let _ = tokio::time::timeout(Duration::from_secs(10), s2).await.expect("session 2 ended");
}

/// A peer that holds its connection open but says nothing (a node gone without closing it)
/// ends the session after `SILENCE_LIMIT`, having been asked its clock every
/// `PING_INTERVAL` (both shortened here).
#[tokio::test]
async fn a_silent_peer_ends_the_session() {
    let nodes = Nodes::new().await;
    let clock = &nodes.clock;
    let (c1, _silent) = nodes.channel().await;
    let verifier = nodes.verifier();
    let (_tx, local) = watch::channel(LocalSvids::new());
    let (ev_tx, _ev) = mpsc::channel(16);
    let started = tokio::time::Instant::now();
    let counts = SentCounts::default();
    let live = Liveness { ping: Duration::from_millis(100), silence: Duration::from_millis(350) };
    let run = run_inner(c1, verifier, clock.clone(), local, ev_tx, &counts, live, None);
    let e = tokio::time::timeout(Duration::from_secs(10), run).await.expect("the session outlived a silent peer").unwrap_err().to_string();
    assert!(e.contains("nothing heard from the peer"), "{e}");
    let took = started.elapsed();
    assert!(took > live.silence && took < live.silence + Duration::from_secs(5), "ended after {took:?}");
}

/// `Installed` (issue 10, a CNI ADD waits for it): both ends of `run_installs` announce it;
/// what one end acknowledges reaches the other as `SessionEvent::Installed`, and a
/// withdrawal is reported to the end that sent it. An end of the version before
/// (`run`) never announces it and is never sent it: its session goes on (a clock round trip
/// after the acknowledgement is answered).
#[tokio::test]
async fn installed_acknowledgements_reach_the_prover_and_skip_an_older_peer() {
    let nodes = Nodes::new().await;
    let (clock, ca) = (&nodes.clock, &nodes.ca);
    let verifier = || nodes.verifier();
    let api = "spiffe://zt.test/ns/default/sa/api";
    for older_n1 in [false, true] {
        let (c1, c2) = nodes.channel().await;
        let (_tx1, local1) = watch::channel(LocalSvids::new());
        let (tx2, local2) = watch::channel(LocalSvids::from([(id(api), Arc::new(ca.issue(&id(api)).unwrap()))]));
        let (ev1_tx, mut ev1) = mpsc::channel(16);
        let (ev2_tx, mut ev2) = mpsc::channel(16);
        let (ack1, ack1_rx) = mpsc::unbounded_channel();
        let (_ack2, ack2_rx) = mpsc::unbounded_channel();
        let v1 = verifier();
        let c = clock.clone();
        let s1 = tokio::spawn(async move {
            if older_n1 {
                drop(ack1_rx);
                run(c1, v1, c, local1, ev1_tx).await
            } else {
                run_installs(c1, v1, c, local1, ev1_tx, &SentCounts::default(), Liveness::default(), ack1_rx).await
            }
        });
        let c = clock.clone();
        let v2 = verifier();
        let s2 = tokio::spawn(async move { run_installs(c2, v2, c, local2, ev2_tx, &SentCounts::default(), Liveness::default(), ack2_rx).await });
        // n1 gets n2's proof of api (and, unless older, n2's announcement first).
        let mut got = vec![];
        while !got.iter().any(|e| matches!(e, SessionEvent::Proven(_))) {
            got.push(next(&mut ev1).await);
        }
        assert_eq!(got.contains(&SessionEvent::PeerInstalls), !older_n1, "{got:?}");
        let p = match got.last() {
            Some(SessionEvent::Proven(p)) => p.clone(),
            other => panic!("{other:?}"),
        };
        let secs = crate::svid::clock::unix_secs(p.not_after);
        if !older_n1 {
            let _ = ack1.send((api.to_string(), secs));
        }
        // n2: the clock offset, and n1's announcement and acknowledgement unless older.
        let mut got2 = vec![];
        let want_events = if older_n1 { 1 } else { 3 };
        while got2.len() < want_events {
            got2.push(next(&mut ev2).await);
        }
        got2.sort_by_key(|e| format!("{e:?}"));
        if older_n1 {
            assert!(matches!(got2[..], [SessionEvent::ClockOffsetMs(_)]), "{got2:?}");
        } else {
            assert_eq!(got2[1], SessionEvent::Installed { spiffe_id: api.into(), not_after_unix_s: secs }, "{got2:?}");
            assert_eq!(got2[2], SessionEvent::PeerInstalls, "{got2:?}");
            // api's last pod leaves n2: its own session reports the withdrawal.
            tx2.send_modify(|m| {
                m.clear();
            });
            assert_eq!(next(&mut ev2).await, SessionEvent::WithdrawSent(api.into()));
            let mut e = next(&mut ev1).await;
            while matches!(e, SessionEvent::ClockOffsetMs(_)) {
                e = next(&mut ev1).await;
            }
            assert_eq!(e, SessionEvent::Withdrawn(api.into()));
        }
        assert!(!s1.is_finished() && !s2.is_finished(), "both sessions live");
        s1.abort();
        s2.abort();
    }
}

/// A frame of a message type this version does not know (a newer peer's) is skipped; the
/// frames around it are read; a malformed frame of a known type is an error.
#[test]
fn unknown_message_types_are_skipped() {
    let frame = |json: &str| {
        let mut f = (json.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(json.as_bytes());
        f
    };
    let mut buf = frame(r#"{"type":"renew-please","x":1}"#);
    buf.extend(frame(r#"{"type":"withdraw","spiffe_id":"spiffe://zt.test/ns/a/sa/b"}"#));
    buf.extend(frame(r#"{"type":"from-the-future"}"#));
    assert_eq!(take_frame(&mut buf).unwrap(), Some(Message::Withdraw { spiffe_id: "spiffe://zt.test/ns/a/sa/b".into() }));
    assert_eq!(take_frame(&mut buf).unwrap(), None);
    assert!(buf.is_empty(), "the unknown frame after it is consumed too");
    let mut bad = frame(r#"{"type":"withdraw"}"#);
    assert!(take_frame(&mut bad).unwrap_err().to_string().contains("malformed"));
    let mut not_json = frame("{nope");
    assert!(take_frame(&mut not_json).is_err());
}
