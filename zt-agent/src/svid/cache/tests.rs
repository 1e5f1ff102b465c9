use std::sync::atomic::{AtomicBool, Ordering};

use futures::future::BoxFuture;

use super::*;
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::clock::{unix_secs, ManualClock};
use crate::svid::spiffe_id::TrustDomain;

const T0: u64 = 1_800_000_000;

/// The builtin CA behind switches: fail every fetch, answer with another ID, drop the bundle.
struct Flaky {
    ca: BuiltinCa,
    fail: AtomicBool,
    wrong_id: AtomicBool,
    empty_bundles: AtomicBool,
}

impl SvidSource for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn fetch_svid<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>> {
        Box::pin(async move {
            if self.fail.load(Ordering::SeqCst) {
                anyhow::bail!("source down");
            }
            if self.wrong_id.load(Ordering::SeqCst) {
                return self.ca.issue(&SpiffeId::parse("spiffe://zt.test/somebody/else").unwrap());
            }
            self.ca.issue(&subject.spiffe_id)
        })
    }
    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>> {
        Box::pin(async move {
            if self.fail.load(Ordering::SeqCst) {
                anyhow::bail!("source down");
            }
            if self.empty_bundles.load(Ordering::SeqCst) {
                return Ok(TrustBundles::default());
            }
            self.ca.fetch_bundles().await
        })
    }
}

fn setup(ttl: u64) -> (Arc<ManualClock>, Arc<Flaky>, Arc<SvidCache>) {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let mut cfg = BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap());
    cfg.svid_ttl = Duration::from_secs(ttl);
    cfg.backdate = Duration::ZERO;
    let src = Arc::new(Flaky {
        ca: BuiltinCa::new(cfg, clock.clone()).unwrap(),
        fail: AtomicBool::new(false),
        wrong_id: AtomicBool::new(false),
        empty_bundles: AtomicBool::new(false),
    });
    let cache = SvidCache::new(src.clone(), clock.clone(), CacheConfig::default());
    (clock, src, cache)
}

fn id() -> SpiffeId {
    SpiffeId::parse("spiffe://zt.test/ns/default/sa/sleep").unwrap()
}

fn next_refresh(cache: &SvidCache) -> u64 {
    unix_secs(cache.status()[0].next_refresh) as u64
}

#[tokio::test]
async fn refreshes_at_half_life_with_jitter() {
    let (clock, _src, cache) = setup(1000);
    let first = cache.prefetch(Subject::id(id())).await.unwrap();
    let at = next_refresh(&cache);
    assert!((T0 + 400..=T0 + 600).contains(&at), "refresh at +{} s, want 400..600 (half-life ±10%)", at - T0);
    // Nothing is due before the refresh point.
    clock.set(UNIX_EPOCH_PLUS(at - 1));
    cache.refresh_due().await;
    assert!(Arc::ptr_eq(&cache.svid(&id()).unwrap(), &first));
    clock.set(UNIX_EPOCH_PLUS(at));
    cache.refresh_due().await;
    let second = cache.svid(&id()).unwrap();
    assert!(!Arc::ptr_eq(&second, &first), "a new SVID at the refresh point");
    assert_eq!(unix_secs(second.not_after()) as u64, at + 1000);
    // The jitter spreads SVIDs issued at the same instant.
    let points: std::collections::BTreeSet<u64> = (0..20)
        .map(|_| {
            let s = _src.ca.issue(&id()).unwrap();
            unix_secs(refresh_point(&s, 0.1)) as u64
        })
        .collect();
    assert!(points.len() > 10, "20 SVIDs, {} distinct refresh points", points.len());
    assert!(points.iter().all(|p| (at + 400..=at + 600).contains(p)));
}

#[allow(non_snake_case)]
fn UNIX_EPOCH_PLUS(secs: u64) -> SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

#[tokio::test]
async fn keeps_the_last_valid_svid_with_capped_backoff_then_fails_closed() {
    let (clock, src, cache) = setup(120);
    let first = cache.prefetch(Subject::id(id())).await.unwrap();
    src.fail.store(true, Ordering::SeqCst);
    clock.set(UNIX_EPOCH_PLUS(next_refresh(&cache)));
    let mut gaps = Vec::new();
    for _ in 0..8 {
        let before = unix_secs(clock.now()) as u64;
        cache.refresh_due().await;
        let st = &cache.status()[0];
        assert!(st.last_error.as_deref().unwrap().contains("source down"));
        gaps.push(next_refresh(&cache) - before);
        clock.set(st.next_refresh);
        if clock.now() < first.not_after() {
            assert!(Arc::ptr_eq(&cache.svid(&id()).unwrap(), &first), "the last valid SVID stays in use");
        }
    }
    assert_eq!(gaps, vec![1, 2, 4, 8, 16, 30, 30, 30], "doubling backoff capped at 30 s");
    assert_eq!(cache.status()[0].failures, 8);
    // 121 s of failures outlived the 120 s SVID: past its not-after it is not handed out.
    assert!(clock.now() >= first.not_after());
    assert!(cache.svid(&id()).is_none());
    // The source comes back: the next retry gets a fresh SVID.
    src.fail.store(false, Ordering::SeqCst);
    clock.set(cache.status()[0].next_refresh);
    cache.refresh_due().await;
    let fresh = cache.svid(&id()).unwrap();
    assert!(fresh.not_after() > first.not_after());
    assert_eq!(cache.status()[0].failures, 0);
}

#[tokio::test]
async fn refuses_an_svid_for_another_id() {
    let (clock, src, cache) = setup(100);
    let first = cache.prefetch(Subject::id(id())).await.unwrap();
    src.wrong_id.store(true, Ordering::SeqCst);
    clock.set(UNIX_EPOCH_PLUS(next_refresh(&cache)));
    cache.refresh_due().await;
    assert!(Arc::ptr_eq(&cache.svid(&id()).unwrap(), &first));
    let e = cache.status()[0].last_error.clone().unwrap();
    assert!(e.contains("returned an SVID for spiffe://zt.test/somebody/else"), "{e}");
    // prefetch of a new subject whose answer is wrong fails with the reason.
    let other = SpiffeId::parse("spiffe://zt.test/ns/x/sa/y").unwrap();
    let e = cache.prefetch(Subject::id(other)).await.unwrap_err().to_string();
    assert!(e.contains("no valid SVID") && e.contains("somebody/else"), "{e}");
}

#[tokio::test]
async fn bundles_follow_root_rotation_and_refuse_to_drop_a_held_domain() {
    let (clock, src, cache) = setup(100);
    cache.prefetch(Subject::id(id())).await.unwrap();
    let td = TrustDomain::parse("zt.test").unwrap();
    let a = src.ca.roots();
    assert_eq!(cache.bundles().get(&td).unwrap(), a.as_slice());
    src.ca.publish_next_root().unwrap();
    clock.advance(Duration::from_secs(60));
    cache.refresh_due().await;
    assert_eq!(cache.bundles().get(&td).unwrap().len(), 2, "A+B during the overlap");
    src.ca.activate_newest_root();
    src.ca.retire_inactive_roots();
    clock.advance(Duration::from_secs(60));
    cache.refresh_due().await;
    let b = cache.bundles();
    assert_eq!(b.get(&td).unwrap().len(), 1);
    assert_ne!(b.get(&td).unwrap()[0], a[0], "B alone after the rotation");
    // An update without the domain of a held SVID is refused; the last bundles stay.
    src.empty_bundles.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(60));
    cache.refresh_due().await;
    assert_eq!(cache.bundles(), b);
    assert!(cache.bundle_error().unwrap().contains("drops trust domain zt.test"));
}

/// A source that hands out the same certificate until told otherwise, and says so on a watch
/// channel as a streaming source (SPIRE) does.
struct Sticky {
    ca: BuiltinCa,
    current: std::sync::Mutex<(rustls::pki_types::CertificateDer<'static>, Vec<u8>)>,
    tx: tokio::sync::watch::Sender<u64>,
}

impl Sticky {
    fn sign(ca: &BuiltinCa, clock: &ManualClock) -> (rustls::pki_types::CertificateDer<'static>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id().to_string().try_into().unwrap())];
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.not_before = time::OffsetDateTime::from_unix_timestamp(unix_secs(clock.now())).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(unix_secs(clock.now()) + 1000).unwrap();
        (ca.sign_custom(&p, &key).unwrap(), key.serialize_der())
    }
}

impl SvidSource for Sticky {
    fn name(&self) -> &str {
        "sticky"
    }
    fn fetch_svid<'a>(&'a self, _subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>> {
        Box::pin(async move {
            let (leaf, key) = self.current.lock().unwrap().clone();
            Ok(X509Svid::from_parts(vec![leaf], rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))?)
        })
    }
    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>> {
        self.ca.fetch_bundles()
    }
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.tx.subscribe())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_svid_is_kept_and_a_push_wakes_the_loop() {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let ca = BuiltinCa::new(BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap()), clock.clone()).unwrap();
    let first_cert = Sticky::sign(&ca, &clock);
    let src = Arc::new(Sticky { ca, current: std::sync::Mutex::new(first_cert), tx: tokio::sync::watch::channel(0).0 });
    let cache = SvidCache::new(src.clone(), clock.clone(), CacheConfig::default());
    let first = cache.prefetch(Subject::id(id())).await.unwrap();
    // At the refresh point the source still has the same certificate: the held Arc stays, and
    // the next question waits backoff_max instead of coming back every second.
    let at = next_refresh(&cache);
    clock.set(UNIX_EPOCH_PLUS(at));
    cache.refresh_due().await;
    assert!(Arc::ptr_eq(&cache.svid(&id()).unwrap(), &first));
    assert_eq!(next_refresh(&cache), at + 30);
    // The loop would sleep those 30 s; a push wakes it and the new certificate is taken.
    let runner = tokio::spawn(cache.clone().run(Duration::from_secs(3600)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = Sticky::sign(&src.ca, &clock);
    *src.current.lock().unwrap() = second.clone();
    src.tx.send_modify(|v| *v += 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while cache.svid(&id()).unwrap().leaf() != &second.0 {
        assert!(std::time::Instant::now() < deadline, "the push did not wake the cache");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runner.abort();
}
