//! Two sessions on a real loopback channel (127.0.0.1 only): each end proves its local
//! identities when the session starts; a new identity, a renewed SVID and a withdrawal
//! reach the peer; the clock offset is measured (one end 45 minutes ahead).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::net::TcpListener;

use super::*;
use crate::channel::verifier::PeerPolicy;
use crate::channel::{CachedCredential, ChannelSetup};
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::cache::{CacheConfig, SvidCache};
use crate::svid::clock::ManualClock;
use crate::svid::source::Subject;
use crate::svid::spiffe_id::TrustDomain;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::parse("zt.test").unwrap()
}

async fn next(rx: &mut mpsc::Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("no session event within 10 s").expect("session ended")
}

#[tokio::test]
async fn sessions_prove_start_changes_renewals_and_withdrawals_and_measure_the_clock() {
    let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
    let ca = Arc::new(BuiltinCa::new(BuiltinConfig::new(td()), clock.clone()).unwrap());
    let cache = SvidCache::new(ca.clone(), clock.clone(), CacheConfig::default());
    for n in ["n1", "n2"] {
        cache.prefetch(Subject::id(id(&format!("spiffe://zt.test/zt/node/{n}")))).await.unwrap();
    }
    let setup = |n: &str| ChannelSetup {
        credential: Arc::new(CachedCredential { cache: cache.clone(), id: id(&format!("spiffe://zt.test/zt/node/{n}")) }),
        bundles: cache.clone(),
        clock: clock.clone(),
        peer_domains: BTreeSet::from([td()]),
        handshake_timeout: Duration::from_secs(10),
    };
    let verifier = || SvidVerifier::new(cache.clone(), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td()])));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = setup("n1");
    let accept = tokio::spawn(async move { server.accept(l.accept().await.unwrap().0).await });
    let c2 = setup("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
    let c1 = accept.await.unwrap().unwrap();

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
    let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
    let ca = Arc::new(BuiltinCa::new(BuiltinConfig::new(td()), clock.clone()).unwrap());
    let cache = SvidCache::new(ca.clone(), clock.clone(), CacheConfig::default());
    for n in ["n1", "n2"] {
        cache.prefetch(Subject::id(id(&format!("spiffe://zt.test/zt/node/{n}")))).await.unwrap();
    }
    let setup = |n: &str| ChannelSetup {
        credential: Arc::new(CachedCredential { cache: cache.clone(), id: id(&format!("spiffe://zt.test/zt/node/{n}")) }),
        bundles: cache.clone(),
        clock: clock.clone(),
        peer_domains: BTreeSet::from([td()]),
        handshake_timeout: Duration::from_secs(10),
    };
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = setup("n1");
    let accept = tokio::spawn(async move { server.accept(l.accept().await.unwrap().0).await });
    let _silent = setup("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
    let c1 = accept.await.unwrap().unwrap();
    let verifier = SvidVerifier::new(cache.clone(), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td()])));
    let (_tx, local) = watch::channel(LocalSvids::new());
    let (ev_tx, _ev) = mpsc::channel(16);
    let started = tokio::time::Instant::now();
    let counts = SentCounts::default();
    let live = Liveness { ping: Duration::from_millis(100), silence: Duration::from_millis(350) };
    let run = run_counted(c1, verifier, clock.clone(), local, ev_tx, &counts, live);
    let e = tokio::time::timeout(Duration::from_secs(10), run).await.expect("the session outlived a silent peer").unwrap_err().to_string();
    assert!(e.contains("nothing heard from the peer"), "{e}");
    let took = started.elapsed();
    assert!(took > live.silence && took < live.silence + Duration::from_secs(5), "ended after {took:?}");
}
