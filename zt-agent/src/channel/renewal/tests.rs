//! Renewal decisions on a real loopback channel (127.0.0.1 only) with the injectable clock:
//! when the dialler renews (its own SVID rotated, the peer's at 3/4 of its life, the peer's
//! chain no longer verifying) and when either end closes (expired at once, untrusted after
//! `UNTRUSTED_GRACE`); and that a new channel's session has the peer's proofs of everything
//! it holds before its first clock answer, which is when links.rs swaps channels.

use std::collections::{BTreeMap, BTreeSet};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::channel::session::{run, LocalSvids, SessionEvent};
use crate::channel::verifier::PeerPolicy;
use crate::channel::{ChannelSetup, FixedCredential, NodeChannel};
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::clock::{Clock, ManualClock};
use crate::svid::source::{BundleProvider, StaticBundles, TrustBundles};
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};

const T0: u64 = 1_800_000_000;
const TTL: u64 = 3600;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::parse("zt.test").unwrap()
}

fn ca(clock: &Arc<ManualClock>) -> BuiltinCa {
    let mut cfg = BuiltinConfig::new(td());
    cfg.svid_ttl = Duration::from_secs(TTL);
    cfg.backdate = Duration::ZERO;
    BuiltinCa::new(cfg, clock.clone()).unwrap()
}

fn bundles_of(ca: &BuiltinCa) -> TrustBundles {
    let mut b = TrustBundles::default();
    b.set(td(), ca.roots()).unwrap();
    b
}

fn setup(clock: &Arc<ManualClock>, bundles: &Arc<StaticBundles>, svid: &X509Svid) -> ChannelSetup {
    ChannelSetup {
        credential: Arc::new(FixedCredential(svid.certified().clone())),
        bundles: bundles.clone(),
        clock: clock.clone(),
        peer_domains: BTreeSet::from([td()]),
        handshake_timeout: Duration::from_secs(10),
    }
}

/// n2 dials n1; returns (n2's end, n1's end).
async fn pair(clock: &Arc<ManualClock>, bundles: &Arc<StaticBundles>, n1: &X509Svid, n2: &X509Svid) -> (NodeChannel, NodeChannel) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = setup(clock, bundles, n1);
    let accept = tokio::spawn(async move { server.accept(l.accept().await.unwrap().0).await });
    let dialled = setup(clock, bundles, n2).connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
    (dialled, accept.await.unwrap().unwrap())
}

#[test]
fn the_renewal_point_is_three_quarters_of_the_lifetime() {
    let nb = std::time::UNIX_EPOCH + Duration::from_secs(T0);
    assert_eq!(renewal_point(nb, nb + Duration::from_secs(3600)), nb + Duration::from_secs(2700));
    assert_eq!(renewal_point(nb, nb + Duration::from_secs(60)), nb + Duration::from_secs(45));
}

#[tokio::test]
async fn the_dialler_renews_on_rotation_at_the_peer_renewal_point_and_on_a_new_bundle_and_ends_close_expired_peers() {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let ca = ca(&clock);
    let bundles = StaticBundles::new(bundles_of(&ca));
    let verifier = SvidVerifier::new(bundles.clone(), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td()])));
    let (n1, n2) = (ca.issue(&id("spiffe://zt.test/zt/node/n1")).unwrap(), ca.issue(&id("spiffe://zt.test/zt/node/n2")).unwrap());
    let (dialled, accepted) = pair(&clock, &bundles, &n1, &n2).await;
    let (d, a) = (dialled.certs().clone(), accepted.certs().clone());
    // Each end recorded both SVIDs: its own as presented, the peer's as verified.
    assert!(d.dialled && !a.dialled);
    assert!(d.presented(&n2) && a.presented(&n1));
    assert_eq!((d.peer.spiffe_id.clone(), d.peer.not_after), (n1.spiffe_id().clone(), n1.not_after()));
    assert_eq!((a.peer.spiffe_id.clone(), a.local.as_ref().unwrap().not_after), (n2.spiffe_id().clone(), n1.not_after()));
    assert_eq!(d.peer_renewal_at(), n1.not_before() + Duration::from_secs(TTL * 3 / 4));

    let mut watch = PeerWatch::default();
    let check = |w: &mut PeerWatch, c: &ChannelCerts| w.check(c, &verifier, bundles.bundles(), clock.now());
    let ok = check(&mut watch, &d);
    assert_eq!(due(&d, Some(&n2), &ok, clock.now(), None), None, "a fresh channel stays");
    assert_eq!(due(&d, None, &ok, clock.now(), None), None, "no own SVID to renew with: stays");
    // The cache refreshed this node's SVID (half-life): renewed at once.
    clock.advance(Duration::from_secs(TTL / 2));
    let n2b = ca.issue(n2.spiffe_id()).unwrap();
    assert_eq!(due(&d, Some(&n2b), &check(&mut watch, &d), clock.now(), None), Some(Reason::OwnSvidRotated));
    // The peer's SVID at 3/4 of its life: renewed (the peer holds its next one by then),
    // unless held after a renewal that brought the same SVID back.
    clock.advance(Duration::from_secs(TTL / 4 - 1));
    assert_eq!(due(&d, Some(&n2), &check(&mut watch, &d), clock.now(), None), None, "a second before the renewal point");
    clock.advance(Duration::from_secs(1));
    let now = clock.now();
    assert_eq!(due(&d, Some(&n2), &check(&mut watch, &d), now, None), Some(Reason::PeerRenewalPoint));
    let hold = hold_after_same(&d, now);
    assert_eq!(hold, now + Duration::from_secs(TTL / 4 / 4), "a quarter of what is left");
    assert_eq!(due(&d, Some(&n2), &check(&mut watch, &d), now, Some(hold)), None);
    assert_eq!(due(&d, Some(&n2b), &check(&mut watch, &d), now, Some(hold)), Some(Reason::OwnSvidRotated), "a rotation is not held");
    assert!(watch.close_reason(clock.now()).is_none(), "valid: never closed");

    // A new bundle without the root that signed the peer (a retired root): the dialler renews
    // at once; either end closes only after UNTRUSTED_GRACE (the renewal comes first).
    let other = self::ca(&clock);
    bundles.replace(bundles_of(&other));
    let r = check(&mut watch, &d);
    assert!(r.is_err(), "the peer's chain no longer verifies");
    assert_eq!(due(&d, Some(&n2), &r, clock.now(), Some(hold)), Some(Reason::PeerSvidInvalid));
    assert!(watch.close_reason(clock.now()).is_none());
    clock.advance(UNTRUSTED_GRACE);
    let _ = check(&mut watch, &d);
    let e = watch.close_reason(clock.now()).expect("closed after the grace");
    assert!(matches!(e.reason(), "unknown-issuer" | "bad-signature"), "{e}");
    // Bundle back, then past the peer's not-after (never renewed): closed at once, expired.
    bundles.replace(bundles_of(&ca));
    let mut watch = PeerWatch::default();
    assert!(check(&mut watch, &a).is_ok());
    clock.set(n2.not_after());
    let e = check(&mut watch, &a).unwrap_err();
    assert_eq!(e.reason(), "expired");
    assert_eq!(watch.close_reason(clock.now()).map(|e| e.reason()), Some("expired"), "the accepting end closes at once");
}

/// links.rs swaps channels at the new session's first clock answer: by then the peer has
/// proven on the new channel every identity it holds (a session proves before it answers).
/// Then the receiver's proofs, fed by the old channel and the new one, never lack an identity.
#[tokio::test]
async fn a_new_session_proves_everything_before_its_first_clock_answer() {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let ca = ca(&clock);
    let bundles = StaticBundles::new(bundles_of(&ca));
    let verifier = || SvidVerifier::new(bundles.clone(), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td()])));
    let (n1, n2) = (ca.issue(&id("spiffe://zt.test/zt/node/n1")).unwrap(), ca.issue(&id("spiffe://zt.test/zt/node/n2")).unwrap());
    let ids: Vec<String> = (0..20).map(|i| format!("spiffe://zt.test/ns/default/sa/s{i}")).collect();
    let local: LocalSvids = ids.iter().map(|s| (id(s), Arc::new(ca.issue(&id(s)).unwrap()))).collect();
    let (_tx, local_rx) = watch::channel(local);
    let (_none_tx, none_rx) = watch::channel(LocalSvids::new());
    // The receiver's proof set (as links.rs books it): identity -> not-after.
    let mut held: BTreeMap<String, std::time::SystemTime> = BTreeMap::new();
    let mut sessions = Vec::new();
    for round in 0..3 {
        // n2 (the prover) dials n1 (the receiver) again: a renewal.
        clock.advance(Duration::from_secs(60));
        let (dialled, accepted) = pair(&clock, &bundles, &n1, &n2).await;
        let (ev_tx, mut ev) = mpsc::channel(64);
        let (ev2_tx, _ev2) = mpsc::channel(64);
        sessions.push(tokio::spawn(run(dialled, verifier(), clock.clone(), local_rx.clone(), ev2_tx)));
        let receiver = tokio::spawn(run(accepted, verifier(), clock.clone(), none_rx.clone(), ev_tx));
        let mut proven_here = BTreeSet::new();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), ev.recv()).await.expect("no event").expect("ended");
            match e {
                SessionEvent::Proven(p) => {
                    proven_here.insert(p.spiffe_id.to_string());
                    held.insert(p.spiffe_id.to_string(), p.not_after);
                }
                SessionEvent::ClockOffsetMs(_) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(proven_here.len(), ids.len(), "round {round}: every identity re-proven before the first clock answer");
        assert_eq!(held.len(), ids.len(), "round {round}: the receiver's set never lacked one");
        // The swap: the old channel closes now (its sessions end).
        if round > 0 {
            let old: tokio::task::JoinHandle<anyhow::Result<()>> = sessions.remove(0);
            old.abort();
        }
        drop(receiver);
    }
}
