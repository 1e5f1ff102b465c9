//! The certificate cache: holds the current X509-SVID of every subject the agent needs (its
//! node SVID, its pods') and the roots of every trust domain, and refreshes them from one
//! `SvidSource`.
//!
//! - An SVID is refreshed at half its lifetime, moved by up to ±`jitter` of the lifetime by a
//!   hash of the certificate, so that pods admitted together do not all renew together.
//! - A failed fetch keeps the last valid SVID and retries with doubling backoff capped at
//!   `backoff_max`; an SVID past its not-after is never handed out (fail closed).
//! - Bundles are replaced whole (A -> A+B -> B is the source's to publish); an update that
//!   drops the trust domain of a held SVID or empties a domain is refused.
//! - A streaming source (`SvidSource::changes`) wakes `run`, which then fetches everything at
//!   once: a pushed rotation is taken when it arrives, a broken stream shows here at once. The
//!   same certificate fetched again after its refresh point is kept as is, and asked for again
//!   after `backoff_max` (a streaming source pushes the new one sooner).
//! - Every decision takes its time from the injected `Clock`; `run` only sleeps.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::clock::Clock;
use super::source::{BundleProvider, Subject, SvidSource, TrustBundles, X509Svid};
use super::spiffe_id::SpiffeId;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Fraction of the lifetime the refresh point moves either way from half-life (0.0..0.5).
    pub jitter: f64,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How often bundles are fetched when nothing fails.
    pub bundle_refresh: Duration,
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        CacheConfig { jitter: 0.1, backoff_initial: Duration::from_secs(1), backoff_max: Duration::from_secs(30), bundle_refresh: Duration::from_secs(60) }
    }
}

/// What the cache knows about one subject (for `ztctl auth` and readiness later).
#[derive(Clone, Debug)]
pub struct SvidStatus {
    pub spiffe_id: SpiffeId,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    pub next_refresh: SystemTime,
    pub failures: u32,
    pub last_error: Option<String>,
}

struct Entry {
    subject: Subject,
    current: Option<Arc<X509Svid>>,
    next_attempt: SystemTime,
    failures: u32,
    last_error: Option<String>,
}

struct Inner {
    entries: BTreeMap<SpiffeId, Entry>,
    bundles: Arc<TrustBundles>,
    bundles_next: SystemTime,
    bundle_failures: u32,
    bundle_error: Option<String>,
    errors_total: u64,
}

pub struct SvidCache {
    source: Arc<dyn SvidSource>,
    clock: Arc<dyn Clock>,
    cfg: CacheConfig,
    inner: Mutex<Inner>,
}

/// Half-life of `svid` moved by the certificate's jitter.
pub fn refresh_point(svid: &X509Svid, jitter: f64) -> SystemTime {
    let life = svid.not_after().duration_since(svid.not_before()).unwrap_or_default();
    let mut h = std::hash::DefaultHasher::new();
    svid.leaf().as_ref().hash(&mut h);
    // u in [-1, 1], fixed per certificate.
    let u = (h.finish() % 2001) as f64 / 1000.0 - 1.0;
    let frac = (0.5 + jitter.clamp(0.0, 0.49) * u).clamp(0.01, 0.99);
    // Whole seconds, as certificates count time.
    svid.not_before() + Duration::from_secs((life.as_secs() as f64 * frac) as u64)
}

fn backoff(cfg: &CacheConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(20);
    cfg.backoff_initial.saturating_mul(1 << exp).min(cfg.backoff_max)
}

impl SvidCache {
    pub fn new(source: Arc<dyn SvidSource>, clock: Arc<dyn Clock>, cfg: CacheConfig) -> Arc<SvidCache> {
        let now = clock.now();
        Arc::new(SvidCache {
            source,
            clock,
            cfg,
            inner: Mutex::new(Inner { entries: BTreeMap::new(), bundles: Arc::default(), bundles_next: now, bundle_failures: 0, bundle_error: None, errors_total: 0 }),
        })
    }

    pub fn source_name(&self) -> &str {
        self.source.name()
    }

    /// Starts tracking `subject`; its first fetch is due now. An ID tracked already under
    /// another subject (the pod it was described by left, another pod of the ID lives) takes
    /// the new subject, keeps its current SVID and is fetched again now.
    pub fn add(&self, subject: Subject) {
        let now = self.clock.now();
        let mut g = self.inner.lock().unwrap();
        match g.entries.get_mut(&subject.spiffe_id) {
            Some(e) if e.subject != subject => {
                e.subject = subject;
                e.next_attempt = now;
            }
            Some(_) => {}
            None => {
                g.entries.insert(subject.spiffe_id.clone(), Entry { subject, current: None, next_attempt: now, failures: 0, last_error: None });
            }
        }
    }

    /// The subject `id` is tracked under.
    pub fn subject(&self, id: &SpiffeId) -> Option<Subject> {
        self.inner.lock().unwrap().entries.get(id).map(|e| e.subject.clone())
    }

    /// Failed fetches (SVIDs and bundles) since the cache was made.
    pub fn errors_total(&self) -> u64 {
        self.inner.lock().unwrap().errors_total
    }

    /// Tracks `subject` and fetches its SVID now (a pod's admission waits on this).
    pub async fn prefetch(&self, subject: Subject) -> anyhow::Result<Arc<X509Svid>> {
        let id = subject.spiffe_id.clone();
        self.add(subject);
        self.refresh_one(&id).await;
        if self.inner.lock().unwrap().bundles.is_empty() {
            self.refresh_bundles().await;
        }
        self.svid(&id).ok_or_else(|| {
            let g = self.inner.lock().unwrap();
            anyhow::anyhow!("no valid SVID for {id}: {}", g.entries.get(&id).and_then(|e| e.last_error.clone()).unwrap_or_default())
        })
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.inner.lock().unwrap().entries.remove(id);
        self.source.release(id);
    }

    /// Makes every fetch due now (the source said something changed).
    pub fn mark_all_due(&self) {
        let now = self.clock.now();
        let mut g = self.inner.lock().unwrap();
        g.bundles_next = now;
        for e in g.entries.values_mut() {
            e.next_attempt = now;
        }
    }

    /// The current SVID of `id`, if it is within its validity window now.
    pub fn svid(&self, id: &SpiffeId) -> Option<Arc<X509Svid>> {
        let now = self.clock.now();
        let g = self.inner.lock().unwrap();
        g.entries.get(id)?.current.clone().filter(|s| s.not_before() <= now && now < s.not_after())
    }

    pub fn status(&self) -> Vec<SvidStatus> {
        let g = self.inner.lock().unwrap();
        g.entries
            .values()
            .map(|e| SvidStatus {
                spiffe_id: e.subject.spiffe_id.clone(),
                not_before: e.current.as_ref().map(|s| s.not_before()),
                not_after: e.current.as_ref().map(|s| s.not_after()),
                next_refresh: e.next_attempt,
                failures: e.failures,
                last_error: e.last_error.clone(),
            })
            .collect()
    }

    /// The last bundle error, if the last bundle fetch failed.
    pub fn bundle_error(&self) -> Option<String> {
        self.inner.lock().unwrap().bundle_error.clone()
    }

    /// When the next fetch (SVID or bundles) is due.
    pub fn next_due(&self) -> SystemTime {
        let g = self.inner.lock().unwrap();
        g.entries.values().map(|e| e.next_attempt).fold(g.bundles_next, |a, b| a.min(b))
    }

    /// Fetches whatever is due now; returns how many fetches it made.
    pub async fn refresh_due(&self) -> usize {
        let now = self.clock.now();
        let (due, bundles_due): (Vec<SpiffeId>, bool) = {
            let g = self.inner.lock().unwrap();
            (g.entries.values().filter(|e| e.next_attempt <= now).map(|e| e.subject.spiffe_id.clone()).collect(), g.bundles_next <= now)
        };
        let mut n = 0;
        if bundles_due {
            self.refresh_bundles().await;
            n += 1;
        }
        for id in due {
            self.refresh_one(&id).await;
            n += 1;
        }
        n
    }

    async fn refresh_one(&self, id: &SpiffeId) {
        let Some(subject) = self.inner.lock().unwrap().entries.get(id).map(|e| e.subject.clone()) else { return };
        let fetched = self.source.fetch_svid(&subject).await;
        let now = self.clock.now();
        let mut g = self.inner.lock().unwrap();
        let Some(e) = g.entries.get_mut(id) else {
            // Removed while fetching: the fetch may have subscribed or watched it again.
            drop(g);
            self.source.release(id);
            return;
        };
        let result = fetched.and_then(|s| {
            if s.spiffe_id() != id {
                anyhow::bail!("{} returned an SVID for {} when asked for {id}", self.source.name(), s.spiffe_id());
            }
            if s.not_after() <= now {
                anyhow::bail!("{} returned an SVID for {id} that expired at unix {}", self.source.name(), super::clock::unix_secs(s.not_after()));
            }
            Ok(s)
        });
        match result {
            Ok(s) if e.current.as_ref().is_some_and(|c| c.leaf() == s.leaf()) => {
                // Unchanged: keep the held one (same Arc for whoever compares), and past its
                // refresh point do not ask again every moment.
                e.next_attempt = refresh_point(&s, self.cfg.jitter).max(now + self.cfg.backoff_max);
                e.failures = 0;
                e.last_error = None;
            }
            Ok(s) => {
                // Never before a short pause: a source that hands out an SVID already past
                // its refresh point would otherwise be asked again at once, forever.
                e.next_attempt = refresh_point(&s, self.cfg.jitter).max(now + self.cfg.backoff_initial);
                e.current = Some(Arc::new(s));
                e.failures = 0;
                e.last_error = None;
            }
            Err(err) => {
                g.errors_total += 1;
                let Some(e) = g.entries.get_mut(id) else { return };
                e.failures += 1;
                e.next_attempt = now + backoff(&self.cfg, e.failures);
                e.last_error = Some(format!("{err:#}"));
                log::warn!("SVID refresh for {id} failed ({} in a row, keeping the last valid one): {err:#}", e.failures);
            }
        }
    }

    async fn refresh_bundles(&self) {
        let fetched = self.source.fetch_bundles().await;
        let now = self.clock.now();
        let mut g = self.inner.lock().unwrap();
        let held: Vec<_> = g.entries.values().filter(|e| e.current.is_some()).map(|e| e.subject.spiffe_id.trust_domain().clone()).collect();
        let result = fetched.and_then(|b| match held.iter().find(|td| b.get(td).is_none()) {
            Some(td) => anyhow::bail!("the bundle update from {} drops trust domain {td}, which a held SVID belongs to", self.source.name()),
            None => Ok(b),
        });
        match result {
            Ok(b) => {
                g.bundles = Arc::new(b);
                g.bundle_failures = 0;
                g.bundle_error = None;
                g.bundles_next = now + self.cfg.bundle_refresh;
            }
            Err(err) => {
                g.errors_total += 1;
                g.bundle_failures += 1;
                g.bundles_next = now + backoff(&self.cfg, g.bundle_failures);
                g.bundle_error = Some(format!("{err:#}"));
                log::warn!("trust bundle refresh failed ({} in a row, keeping the last bundles): {err:#}", g.bundle_failures);
            }
        }
    }

    /// Refreshes forever. Sleeps at most `max_sleep` at a time, so that a wall-clock jump is
    /// noticed within that long.
    pub async fn run(self: Arc<Self>, max_sleep: Duration) {
        let mut changes = self.source.changes();
        loop {
            self.refresh_due().await;
            let wait = self.next_due().duration_since(self.clock.now()).unwrap_or_default();
            let sleep = tokio::time::sleep(wait.clamp(Duration::from_millis(50), max_sleep));
            match changes.as_mut() {
                Some(rx) => tokio::select! {
                    _ = sleep => {}
                    r = rx.changed() => match r {
                        Ok(()) => self.mark_all_due(),
                        Err(_) => changes = None,
                    },
                },
                None => sleep.await,
            }
        }
    }
}

impl BundleProvider for SvidCache {
    fn bundles(&self) -> Arc<TrustBundles> {
        self.inner.lock().unwrap().bundles.clone()
    }
}

#[cfg(test)]
mod tests;
