//! The `spire` backend against the SPIRE stand-in (zt_testbed::spire): a real gRPC server on
//! a Unix socket speaking the Delegated Identity API, with an rcgen CA the tests drive. The
//! cache runs its real loop (`SvidCache::run`), woken by the backend's pushes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::CertificateDer;
use zt_testbed::spire::{BadSvid, SpireStandIn};

use super::{Selector, SpireConfig, SpireSource};
use crate::channel::verifier::{PeerPolicy, SvidVerifier, Usage};
use crate::svid::cache::{CacheConfig, SvidCache};
use crate::svid::clock::{Clock, SystemClock};
use crate::svid::source::{BundleProvider, Subject, SvidSource};
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::x509::SvidError;

const TD: &str = "zt.test";

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("zt-spire-{name}-{}.sock", std::process::id()))
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://{TD}{s}")).unwrap()
}

fn pod(path: &str, uid: &str) -> Subject {
    Subject { spiffe_id: id(path), pod_uid: Some(uid.into()) }
}

struct Lab {
    spire: SpireStandIn,
    source: Arc<SpireSource>,
    cache: Arc<SvidCache>,
    clock: Arc<dyn Clock>,
    runner: Option<tokio::task::JoinHandle<()>>,
}

impl Lab {
    async fn new(name: &str) -> Lab {
        let sock = socket(name);
        let spire = SpireStandIn::start(&sock, TD).await.unwrap();
        let mut cfg = SpireConfig::new(sock);
        cfg.node_name = Some("n1".into());
        cfg.node_selectors = vec![Selector::parse("zt:node:n1").unwrap()];
        cfg.backoff_initial = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(400);
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let source = Arc::new(SpireSource::new(cfg, clock.clone()));
        let cc = CacheConfig {
            jitter: 0.1,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            bundle_refresh: Duration::from_secs(60),
        };
        let cache = SvidCache::new(source.clone() as Arc<dyn SvidSource>, clock.clone(), cc);
        Lab { spire, source, cache, clock, runner: None }
    }

    /// The cache's real refresh loop, woken by the backend's pushes.
    fn run(&mut self) {
        self.runner = Some(tokio::spawn(self.cache.clone().run(Duration::from_millis(200))));
    }

    fn leaf(&self, id: &SpiffeId) -> Option<CertificateDer<'static>> {
        self.cache.svid(id).map(|s| s.leaf().clone())
    }

    fn verifier(&self) -> SvidVerifier {
        SvidVerifier::new(self.cache.clone() as Arc<dyn BundleProvider>, self.clock.clone(), PeerPolicy::TrustDomains([TrustDomain::parse(TD).unwrap()].into()))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(r) = self.runner.take() {
            r.abort();
        }
    }
}

/// Polls `f` every 10 ms for up to 10 s.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn der(v: &[u8]) -> CertificateDer<'static> {
    CertificateDer::from(v.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_svid_arrives_by_its_k8s_selectors() {
    let lab = Lab::new("arrive").await;
    let api = "/ns/shop/sa/api";
    lab.spire.register(&id(api).to_string(), &["k8s:pod-uid:u-1"]);
    // An entry by namespace and service account (another pod's), and the node's.
    lab.spire.register(&id("/ns/shop/sa/web").to_string(), &["k8s:ns:shop", "k8s:sa:web"]);
    lab.spire.register(&id("/zt/node/n1").to_string(), &["zt:node:n1"]);

    let svid = lab.cache.prefetch(pod(api, "u-1")).await.unwrap();
    assert_eq!(svid.spiffe_id(), &id(api));
    assert_eq!(svid.leaf().as_ref(), lab.spire.current(&id(api).to_string()).unwrap().chain[0].as_slice());
    assert!(lab.spire.subscriptions().contains(&vec!["k8s:node-name:n1".to_string(), "k8s:ns:shop".into(), "k8s:pod-uid:u-1".into(), "k8s:sa:api".into()]));
    let roots: Vec<_> = lab.spire.roots().iter().map(|r| der(r)).collect();
    assert_eq!(lab.cache.bundles().get(&TrustDomain::parse(TD).unwrap()).unwrap(), roots.as_slice());
    // The ns/sa entry matches a pod of that service account whatever its UID.
    let web = lab.cache.prefetch(pod("/ns/shop/sa/web", "u-9")).await.unwrap();
    assert_eq!(web.spiffe_id(), &id("/ns/shop/sa/web"));
    // The node's own SVID, by the configured selectors.
    let node = lab.cache.prefetch(Subject::id(id("/zt/node/n1"))).await.unwrap();
    assert_eq!(node.spiffe_id(), &id("/zt/node/n1"));
    // No entry matches: the error says so.
    let e = format!("{:#}", lab.cache.prefetch(pod("/ns/shop/sa/db", "u-3")).await.unwrap_err());
    assert!(e.contains("no registration entry matches"), "{e}");
    // Released subjects close their streams on SPIRE's side (3 SVID streams + bundles before).
    let open = lab.spire.open_streams();
    lab.cache.remove(&id("/ns/shop/sa/db"));
    until("the released stream to close", || lab.spire.open_streams() == open - 1).await;
    assert!(lab.source.status().svids.keys().all(|k| k != &id("/ns/shop/sa/db")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_rotation_switches_the_cache_before_the_old_svid_expires() {
    let mut lab = Lab::new("rotate").await;
    let api = id("/ns/shop/sa/api");
    lab.spire.register(&api.to_string(), &["k8s:pod-uid:u-1"]);
    let first = lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.unwrap();
    lab.run();
    let old = first.leaf().clone();
    let new = der(&lab.spire.rotate(&api.to_string()).unwrap().chain[0]);
    // Make before break: at every look there is a valid SVID, first the old, then the new.
    until("the cache to take the pushed SVID", || {
        let now = lab.leaf(&api).expect("no valid SVID during the rotation");
        assert!(now == old || now == new);
        now == new
    })
    .await;
    assert!(first.not_after() > SystemTime::now(), "the switch happened while the old one was still valid");

    // SPIRE's clock an hour ahead: the pushed SVID is not yet valid here. It is refused with
    // its reason and the held one stays.
    lab.spire.set_now(Some(SystemTime::now() + Duration::from_secs(3600)));
    lab.spire.rotate(&api.to_string()).unwrap();
    until("the refusal to show in the cache", || {
        lab.cache.status().iter().any(|s| s.spiffe_id == api && s.last_error.as_deref().is_some_and(|e| e.contains("(not-yet-valid)")))
    })
    .await;
    assert_eq!(lab.leaf(&api), Some(new.clone()));
    let st = lab.cache.status().into_iter().find(|s| s.spiffe_id == api).unwrap();
    assert!(st.last_error.unwrap().contains("this clock is behind its issuer's by at least that much"));
    // Clocks agree again: the next rotation is taken.
    lab.spire.set_now(None);
    let third = der(&lab.spire.rotate(&api.to_string()).unwrap().chain[0]);
    until("the third SVID", || lab.leaf(&api) == Some(third.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_down_keeps_the_last_valid_svid_reports_it_and_resumes() {
    let mut lab = Lab::new("down").await;
    let api = id("/ns/shop/sa/api");
    lab.spire.register(&api.to_string(), &["k8s:pod-uid:u-1"]);
    let held = lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.unwrap().leaf().clone();
    lab.run();
    assert!(lab.source.status().all_up());

    lab.spire.stop().await;
    until("the stream to be reported down", || !lab.source.status().svids[&api].1.up).await;
    until("the cache to record the failure", || {
        lab.cache.status().iter().any(|s| s.spiffe_id == api && s.failures >= 1 && s.last_error.as_deref().is_some_and(|e| e.contains("is down")))
    })
    .await;
    until("the bundle stream to be reported down", || !lab.source.status().bundles.up).await;
    let st = lab.source.status();
    assert!(!st.all_up());
    assert!(
        st.svids[&api].1.last_error.as_deref().unwrap().contains("stand-in stopped") || st.svids[&api].1.last_error.as_deref().unwrap().contains("connecting")
    );
    // Reconnects keep failing while it is down, with backoff; the SVID stays.
    let failures = lab.source.status().svids[&api].1.failures;
    until("more reconnect attempts", || lab.source.status().svids[&api].1.failures >= failures + 2).await;
    assert_eq!(lab.leaf(&api), Some(held.clone()), "the last valid SVID is kept");

    lab.spire.restart().await.unwrap();
    until("the streams to come back", || lab.source.status().all_up()).await;
    until("the cache to recover", || lab.cache.status().iter().all(|s| s.failures == 0 && s.last_error.is_none())).await;
    assert_eq!(lab.leaf(&api), Some(held), "the same SVID: nothing changed on SPIRE");
    let next = der(&lab.spire.rotate(&api.to_string()).unwrap().chain[0]);
    until("a rotation over the resumed stream", || lab.leaf(&api) == Some(next.clone())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_rotation_a_then_a_b_then_b_never_breaks_verification() {
    let mut lab = Lab::new("roots").await;
    let api = id("/ns/shop/sa/api");
    lab.spire.register(&api.to_string(), &["k8s:pod-uid:u-1"]);
    let signed_by_a = lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.unwrap();
    lab.run();
    let td = TrustDomain::parse(TD).unwrap();
    let v = lab.verifier();
    // A watcher verifies the cache's current SVID against the cache's current bundles all
    // along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (cache, v, stop, api) = (lab.cache.clone(), v.clone(), stop.clone(), api.clone());
        tokio::spawn(async move {
            let (mut checks, mut breaks) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let s = cache.svid(&api).expect("no valid SVID");
                if let Err(e) = v.verify(s.leaf(), &s.chain()[1..], Usage::Client) {
                    breaks.push(e);
                }
                checks += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (checks, breaks)
        })
    };
    let a = der(&lab.spire.active_root());
    // Each state lasts a moment, so the watcher checks every one of them.
    let dwell = || tokio::time::sleep(Duration::from_millis(50));
    dwell().await;

    lab.spire.publish_next_root().unwrap();
    until("bundle A+B", || lab.cache.bundles().get(&td).is_some_and(|r| r.len() == 2)).await;
    let b = der(&lab.spire.roots()[1]);
    dwell().await;
    lab.spire.activate_newest_root();
    lab.spire.rotate_all().unwrap();
    let signed_by_b = der(&lab.spire.current(&api.to_string()).unwrap().chain[0]);
    until("the SVID signed by B", || lab.leaf(&api) == Some(signed_by_b.clone())).await;
    // Both generations verify while the bundle holds both roots.
    assert_eq!(v.verify(signed_by_a.leaf(), &[], Usage::Client), Ok(api.clone()));
    assert_eq!(v.verify(&signed_by_b, &[], Usage::Client), Ok(api.clone()));
    dwell().await;

    lab.spire.retire_inactive_roots();
    until("bundle B", || lab.cache.bundles().get(&td).is_some_and(|r| r == [b.clone()])).await;
    assert_eq!(v.verify(&signed_by_b, &[], Usage::Client), Ok(api.clone()));
    assert_eq!(v.verify(signed_by_a.leaf(), &[], Usage::Client).unwrap_err().reason(), "unknown-issuer", "A is retired");
    assert!(!lab.cache.bundles().get(&td).unwrap().contains(&a));
    dwell().await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checks, breaks) = watcher.await.unwrap();
    assert!(checks > 10, "the watcher ran ({checks} checks)");
    assert!(breaks.is_empty(), "verification broke during the rotation: {breaks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_svid_is_refused_with_its_reason() {
    let lab = Lab::new("bad").await;
    let want = [
        (BadSvid::TwoUriSans, "uri-san-count"),
        (BadSvid::CaLeaf, "leaf-is-ca"),
        (BadSvid::KeyCertSign, "key-cert-sign"),
        (BadSvid::WrongTrustDomain, "trust-domain-not-allowed"),
        (BadSvid::Expired, "expired"),
        (BadSvid::NotYetValid, "not-yet-valid"),
        (BadSvid::WrongKey, "key-mismatch"),
    ];
    assert_eq!(want.len(), BadSvid::ALL.len());
    for (i, (bad, reason)) in want.iter().enumerate() {
        let path = format!("/ns/bad/sa/s{i}");
        lab.spire.register(&id(&path).to_string(), &[&format!("k8s:pod-uid:b-{i}")]);
        lab.spire.set_bad(&id(&path).to_string(), Some(*bad)).unwrap();
        let e = lab.source.fetch_svid(&pod(&path, &format!("b-{i}"))).await.unwrap_err();
        let got = e.downcast_ref::<SvidError>().unwrap_or_else(|| panic!("{bad:?}: not an SVID rule error: {e:#}"));
        assert_eq!(got.reason(), *reason, "{bad:?}: {e:#}");
        assert!(format!("{e:#}").contains(&format!("SPIRE's SVID for {} is refused ({reason})", id(&path))), "{e:#}");
        // Through the cache: refused, nothing held, the reason recorded.
        let e = format!("{:#}", lab.cache.prefetch(pod(&path, &format!("b-{i}"))).await.unwrap_err());
        assert!(e.contains(&format!("({reason})")), "{bad:?}: {e}");
        assert!(lab.cache.svid(&id(&path)).is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rotation_keeps_the_good_svid() {
    let mut lab = Lab::new("badrot").await;
    let api = id("/ns/shop/sa/api");
    lab.spire.register(&api.to_string(), &["k8s:pod-uid:u-1"]);
    let good = lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.unwrap().leaf().clone();
    lab.run();
    lab.spire.set_bad(&api.to_string(), Some(BadSvid::KeyCertSign)).unwrap();
    until("the refusal", || lab.cache.status().iter().any(|s| s.last_error.as_deref().is_some_and(|e| e.contains("(key-cert-sign)")))).await;
    assert_eq!(lab.leaf(&api), Some(good));
    let fixed = der(&lab.spire.set_bad(&api.to_string(), None).unwrap().chain[0]);
    until("the good rotation", || lab.leaf(&api) == Some(fixed.clone())).await;
}

#[test]
fn reconnect_backoff_doubles_and_is_capped() {
    let mut cfg = SpireConfig::new("/nonexistent.sock".into());
    cfg.backoff_initial = Duration::from_millis(200);
    let src = SpireSource::new(cfg, Arc::new(SystemClock));
    let b: Vec<u128> = [1, 2, 3, 8, 9, 40].iter().map(|n| src.shared.backoff(*n).as_millis()).collect();
    assert_eq!(b, [200, 400, 800, 25_600, 30_000, 30_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_spire_at_the_socket_is_an_error_naming_it() {
    let sock = socket("absent");
    let mut cfg = SpireConfig::new(sock.clone());
    cfg.first_message_timeout = Duration::from_secs(2);
    let src = SpireSource::new(cfg, Arc::new(SystemClock));
    let e = format!("{:#}", src.fetch_svid(&pod("/ns/shop/sa/api", "u-1")).await.unwrap_err());
    assert!(e.contains(&format!("connecting to SPIRE at {}", sock.display())), "{e}");
    let e = format!("{:#}", src.fetch_bundles().await.unwrap_err());
    assert!(e.contains("X509 bundle stream") && e.contains("is down"), "{e}");
}

/// Pods that share a SPIFFE ID share one subscription (the cache keys by ID): asking for the
/// ID with another pod's UID replaces the subscription, and the old stream closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_pod_of_the_same_id_replaces_the_subscription() {
    let lab = Lab::new("shared").await;
    let api = id("/ns/shop/sa/api");
    lab.spire.register(&api.to_string(), &["k8s:ns:shop", "k8s:sa:api"]);
    lab.source.fetch_svid(&pod("/ns/shop/sa/api", "u-1")).await.unwrap();
    let open = lab.spire.open_streams();
    let s = lab.source.fetch_svid(&pod("/ns/shop/sa/api", "u-2")).await.unwrap();
    assert_eq!(s.spiffe_id(), &api);
    let sel = &lab.source.status().svids[&api].0;
    assert!(sel.contains(&Selector::new("k8s", "pod-uid:u-2")) && !sel.contains(&Selector::new("k8s", "pod-uid:u-1")), "{sel:?}");
    until("the old stream to close", || lab.spire.open_streams() == open).await;
    assert_eq!(lab.spire.subscriptions().iter().filter(|s| s.iter().any(|x| x.starts_with("k8s:pod-uid:"))).count(), 2);
}

/// The usual misconfiguration: zt-agent is not in the SPIRE agent's `authorized_delegates`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_spire_does_not_authorize_gets_spires_reason() {
    let lab = Lab::new("denied").await;
    lab.spire.register(&id("/ns/shop/sa/api").to_string(), &["k8s:pod-uid:u-1"]);
    lab.spire.deny_callers(true);
    let e = format!("{:#}", lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.unwrap_err());
    assert!(e.contains("SPIRE answered PermissionDenied: caller not configured as an authorized delegate"), "{e}");
    let st = lab.source.status();
    assert!(!st.all_up() && st.svids.values().all(|(_, s)| s.failures >= 1));
    // Authorized later: the next reconnect succeeds.
    lab.spire.deny_callers(false);
    until("the streams to come up", || lab.source.status().all_up()).await;
    assert!(lab.cache.prefetch(pod("/ns/shop/sa/api", "u-1")).await.is_ok());
}
