//! The one seam between the agent and its SVID backend (`--svid-source`): the node channels
//! (auth/links.rs) ask it for the node SVID, for the SVIDs of the local pods' identities and
//! for the trust bundles, and never see which backend answers.
//!
//! - `builtin`: the rcgen CA (`--svid-ca-dir` shares one between agents; `--svid-ttl`).
//! - `spire:<admin socket>`: SPIRE's Delegated Identity API (`svid::spire`). The node SVID is
//!   asked for with the configured node selectors (`--spire-node-selectors`), a pod identity
//!   with the selectors of one live local pod of it (`k8s:pod-uid`, `k8s:ns`, `k8s:sa`,
//!   `k8s:node-name`). The cache is keyed by SPIFFE ID, so pods sharing an ID share one
//!   subscription; when the pod it was made for leaves while another pod of the ID lives,
//!   the ID is fetched again with the live pod (its SVID held meanwhile). Bundles come from
//!   the bundle stream: every root of every trust domain SPIRE sends (A, A+B, B).
//! - `files:<dir>`: spiffe-helper's layout, one directory per SPIFFE ID under `<dir>`
//!   (`svid::files`), written by another tool; the files are polled every second and a
//!   rewrite is taken at once. Missing files at start are waited for, as a SPIRE down.
//!
//! Both go through one `SvidCache` (refresh, backoff, last valid SVID kept); `status` says
//! which backend it is and, for SPIRE, which streams are up (readiness, metrics, `ztctl auth`).
//! A SPIRE that is down at start does not stop the agent: the node SVID is fetched as soon
//! as SPIRE answers (channels are refused until then).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};

use super::builtin::{BuiltinCa, BuiltinConfig};
use super::cache::{CacheConfig, SvidCache};
use super::clock::Clock;
use super::files::{FileNames, FilesSource};
use super::source::{BundleProvider, Subject, SvidSource, X509Svid};
use super::spec::SvidSourceSpec;
use super::spiffe_id::{SpiffeId, TrustDomain};
use super::spire::{SpireConfig, SpireSource};

/// How the agent gets its SVIDs (`--svid-source` and the flags of each backend).
#[derive(Clone, Debug)]
pub struct ProviderOptions {
    pub source: SvidSourceSpec,
    /// `builtin`: a CA directory shared between agents (None: a CA of this agent alone).
    pub ca_dir: Option<PathBuf>,
    /// `builtin`: the lifetime of the SVIDs it issues.
    pub svid_ttl: Duration,
    /// `spire:`: the selectors of the node's own SVID (`type:value`, comma-separated).
    pub node_selectors: String,
}

enum Backend {
    Builtin,
    Spire(Arc<SpireSource>),
    Files,
}

/// One stream of the backend, as status and metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamState {
    /// `bundles`, or the SPIFFE ID an X509-SVID stream is for.
    pub stream: String,
    pub up: bool,
    pub failures: u64,
    pub last_error: Option<String>,
}

/// The backend's health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceState {
    /// `builtin`, `spire:<socket>` or `files:<dir>`.
    pub source: String,
    /// Every stream up (builtin: always; files: the node SVID and the bundle read cleanly).
    pub up: bool,
    pub streams: Vec<StreamState>,
    /// SVIDs whose last fetch failed: (SPIFFE ID, failures in a row, error).
    pub failing: Vec<(String, u32, String)>,
    /// The last bundle fetch's error, if it failed.
    pub bundle_error: Option<String>,
    /// Failed fetches (SVIDs and bundles) since start.
    pub errors_total: u64,
    /// Roots held per trust domain (2 while a rotation publishes A+B).
    pub roots: BTreeMap<String, usize>,
}

/// How often the `files` backend looks at its files.
const FILES_POLL: Duration = Duration::from_secs(1);

pub struct SvidProvider {
    cache: Arc<SvidCache>,
    backend: Backend,
    node: SpiffeId,
    source_name: String,
    /// Serializes `track` (one caller, the channels' local loop, but keep it simple).
    tracking: tokio::sync::Mutex<()>,
    tracked: Mutex<BTreeSet<SpiffeId>>,
    /// Identities logged as having no pod with a UID (logged once, not every second).
    no_uid: Mutex<BTreeSet<SpiffeId>>,
}

impl SvidProvider {
    /// Builds the backend and the cache, fetches the node SVID and starts the refresh loop.
    /// `builtin` fails if it cannot issue; `spire:` logs a SPIRE that does not answer yet and
    /// keeps asking, and `files:` files not written yet.
    pub async fn start(opts: &ProviderOptions, node_name: &str, node: SpiffeId, td: &TrustDomain, clock: Arc<dyn Clock>) -> Result<Arc<SvidProvider>> {
        let (source, backend, source_name): (Arc<dyn SvidSource>, Backend, String) = match &opts.source {
            SvidSourceSpec::Builtin => {
                let mut cfg = BuiltinConfig::new(td.clone());
                cfg.svid_ttl = opts.svid_ttl;
                let ca = match &opts.ca_dir {
                    Some(dir) => BuiltinCa::open_shared(cfg, clock.clone(), dir).with_context(|| format!("--svid-ca-dir {}", dir.display()))?,
                    None => BuiltinCa::new(cfg, clock.clone())?,
                };
                (Arc::new(ca), Backend::Builtin, "builtin".to_string())
            }
            SvidSourceSpec::Spire { socket } => {
                let mut cfg: SpireConfig =
                    opts.source.spire_config(node_name, &opts.node_selectors).map_err(|e| anyhow::anyhow!("--spire-node-selectors: {e}"))?.unwrap();
                // A local socket: reconnecting is cheap, and a SPIRE agent back from a
                // restart is used within seconds.
                cfg.backoff_max = Duration::from_secs(5);
                let spire = Arc::new(SpireSource::new(cfg, clock.clone()));
                (spire.clone(), Backend::Spire(spire), format!("spire:{}", socket.display()))
            }
            SvidSourceSpec::Files { dir } => {
                let files = Arc::new(FilesSource::under(dir.clone(), node.clone(), FileNames::default(), clock.clone()));
                // Fails only for a trust domain that names no directory: a start error.
                files.dir_of(&node).map_err(|e| anyhow::anyhow!("--svid-source files:{}: {e}", dir.display()))?;
                files.watch(FILES_POLL);
                (files, Backend::Files, format!("files:{}", dir.display()))
            }
        };
        let cache = SvidCache::new(source, clock, CacheConfig::default());
        let p = Arc::new(SvidProvider {
            cache,
            backend,
            node: node.clone(),
            source_name,
            tracking: tokio::sync::Mutex::new(()),
            tracked: Mutex::default(),
            no_uid: Mutex::default(),
        });
        match (p.cache.prefetch(Subject::id(node.clone())).await, &p.backend) {
            (Ok(_), _) => {}
            (Err(e), Backend::Builtin) => return Err(e.context("the node SVID")),
            (Err(e), Backend::Spire(_) | Backend::Files) => {
                log::warn!("no node SVID for {node} from {} yet (retrying; no channel until then): {e:#}", p.source_name)
            }
        }
        tokio::spawn(p.cache.clone().run(Duration::from_secs(5)));
        Ok(p)
    }

    /// The cache: the credential and the bundles the channels verify with.
    pub fn cache(&self) -> &Arc<SvidCache> {
        &self.cache
    }

    pub fn node_id(&self) -> &SpiffeId {
        &self.node
    }

    /// `builtin`, `spire:<socket>` or `files:<dir>`.
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The current SVID of `id`, if valid now.
    pub fn svid(&self, id: &SpiffeId) -> Option<Arc<X509Svid>> {
        self.cache.svid(id)
    }

    /// The subject `id` is asked for with, given the UIDs of its live local pods. None: no
    /// pod can describe it to SPIRE (no UID known).
    fn subject_for(&self, id: &SpiffeId, pods: &BTreeSet<String>) -> Option<Subject> {
        match self.backend {
            Backend::Builtin | Backend::Files => Some(Subject::id(id.clone())),
            Backend::Spire(_) => {
                // Keep the pod the subscription was made for while it lives.
                let cur = self.cache.subject(id).and_then(|s| s.pod_uid).filter(|u| pods.contains(u));
                let uid = cur.or_else(|| pods.iter().find(|u| !u.is_empty()).cloned())?;
                Some(Subject { spiffe_id: id.clone(), pod_uid: Some(uid) })
            }
        }
    }

    /// Makes the tracked local identities `want` (SPIFFE ID -> UIDs of its live local pods):
    /// new ones and ones whose pod left are fetched now, all at once (a fetch SPIRE does not
    /// answer waits out its first-message timeout: one at a time, N new identities would hold
    /// every other change, withdrawals included, N timeouts long), gone ones released.
    pub async fn track(&self, want: &BTreeMap<SpiffeId, BTreeSet<String>>) {
        let _one = self.tracking.lock().await;
        let before = self.tracked.lock().unwrap().clone();
        let mut fetch = Vec::new();
        for (id, pods) in want {
            if *id == self.node {
                continue;
            }
            let Some(subject) = self.subject_for(id, pods) else {
                if self.no_uid.lock().unwrap().insert(id.clone()) {
                    log::warn!("no SVID for local identity {id}: none of its pods has a UID to describe it to {}", self.source_name);
                }
                continue;
            };
            self.no_uid.lock().unwrap().remove(id);
            let fresh = !before.contains(id);
            if fresh || self.cache.subject(id).as_ref() != Some(&subject) {
                if !fresh {
                    log::info!("local identity {id}: its pod left, asking {} with another live pod of it", self.source_name);
                }
                fetch.push(async move {
                    if let Err(e) = self.cache.prefetch(subject).await {
                        log::warn!("no SVID for local identity {id} yet (retrying): {e:#}");
                    }
                });
            }
        }
        futures::future::join_all(fetch).await;
        let now: BTreeSet<SpiffeId> = want.keys().filter(|id| **id != self.node && self.cache.subject(id).is_some()).cloned().collect();
        for id in before.difference(&now) {
            self.cache.remove(id);
        }
        *self.tracked.lock().unwrap() = now;
    }

    pub fn status(&self) -> SourceState {
        let failing: Vec<(String, u32, String)> =
            self.cache.status().into_iter().filter_map(|s| Some((s.spiffe_id.to_string(), s.failures, s.last_error?))).collect();
        let bundle_error = self.cache.bundle_error();
        let errors_total = self.cache.errors_total();
        let b = self.cache.bundles();
        let roots = b.domains().map(|td| (td.to_string(), b.get(td).map_or(0, |r| r.len()))).collect();
        match &self.backend {
            Backend::Builtin => SourceState { source: self.source_name.clone(), up: true, streams: Vec::new(), failing, bundle_error, errors_total, roots },
            Backend::Files => {
                // A pod's directory that does not read is that SVID's problem (`failing`),
                // not the source's.
                let node_ok = self.cache.svid(&self.node).is_some() && !failing.iter().any(|(id, ..)| *id == self.node.to_string());
                let up = node_ok && bundle_error.is_none();
                SourceState { source: self.source_name.clone(), up, streams: Vec::new(), failing, bundle_error, errors_total, roots }
            }
            Backend::Spire(s) => {
                let st = s.status();
                let row =
                    |stream: String, s: &super::spire::StreamStatus| StreamState { stream, up: s.up, failures: s.failures, last_error: s.last_error.clone() };
                let mut streams = vec![row("bundles".into(), &st.bundles)];
                streams.extend(st.svids.iter().map(|(id, (_, s))| row(id.to_string(), s)));
                // No stream yet (never asked) counts as down: the node SVID is always asked for.
                let up = st.all_up() && !st.svids.is_empty();
                SourceState { source: self.source_name.clone(), up, streams, failing, bundle_error, errors_total, roots }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::clock::SystemClock;
    use zt_testbed::spire::SpireStandIn;

    const TD: &str = "zt.test";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://{TD}{s}")).unwrap()
    }

    async fn wait(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Node and pods from one SPIRE: the node by its selectors, a pod identity by the selectors
    /// of one of its pods; that pod leaving while another lives moves the subscription to the
    /// live pod (the SVID held throughout); the last pod leaving releases it. SPIRE stopped:
    /// the streams are down and the SVIDs are kept; back: up again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spire_node_and_pods_follow_the_live_pods() {
        let sock = std::env::temp_dir().join(format!("zt-provider-{}.sock", std::process::id()));
        let spire = SpireStandIn::start(&sock, TD).await.unwrap();
        let node = id("/zt/node/n1");
        spire.register(&node.to_string(), &["k8s:ns:zt-system", "k8s:sa:zt-agent", "k8s:node-name:n1"]);
        let api = id("/ns/shop/sa/api");
        spire.register(&api.to_string(), &["k8s:ns:shop", "k8s:sa:api", "k8s:node-name:n1"]);
        let opts = ProviderOptions {
            source: format!("spire:{}", sock.display()).parse().unwrap(),
            ca_dir: None,
            svid_ttl: Duration::from_secs(3600),
            node_selectors: crate::svid::spec::DEFAULT_NODE_SELECTORS.into(),
        };
        let td = TrustDomain::parse(TD).unwrap();
        let p = SvidProvider::start(&opts, "n1", node.clone(), &td, Arc::new(SystemClock)).await.unwrap();
        assert!(p.svid(&node).is_some(), "the node SVID at start");
        assert_eq!(p.source_name(), format!("spire:{}", sock.display()));

        let pods = |u: &[&str]| BTreeMap::from([(api.clone(), u.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>())]);
        p.track(&pods(&["u-1", "u-2"])).await;
        let held = p.svid(&api).expect("the pod identity's SVID");
        assert_eq!(p.cache().subject(&api).unwrap().pod_uid.as_deref(), Some("u-1"));
        let with = |uid: &str| spire.subscriptions().iter().any(|s| s.contains(&format!("k8s:pod-uid:{uid}")));
        assert!(with("u-1") && !with("u-2"), "one subscription per ID: {:?}", spire.subscriptions());
        let st = p.status();
        assert!(st.up, "{st:?}");
        assert_eq!(st.streams.len(), 3, "bundles, node, api: {st:?}");

        // u-1 leaves, u-2 lives: asked again with u-2; the SVID was held meanwhile.
        p.track(&pods(&["u-2"])).await;
        assert_eq!(p.cache().subject(&api).unwrap().pod_uid.as_deref(), Some("u-2"));
        assert!(with("u-2"), "{:?}", spire.subscriptions());
        assert!(p.svid(&api).is_some_and(|s| s.leaf() == held.leaf()), "the same SVID (SPIRE did not rotate it)");
        // Unchanged pods: no new subscription.
        let n = spire.subscriptions().len();
        p.track(&pods(&["u-2", "u-3"])).await;
        assert_eq!(spire.subscriptions().len(), n);

        // SPIRE stopped: down, SVIDs kept; back: up, and a rotation is taken.
        spire.stop().await;
        wait("every stream down with its error", || p.status().streams.iter().all(|s| !s.up && s.last_error.is_some())).await;
        assert!(!p.status().up);
        assert!(p.svid(&node).is_some() && p.svid(&api).is_some(), "kept while valid");
        spire.restart().await.unwrap();
        wait("the streams up again", || p.status().up).await;
        let new = spire.rotate(&api.to_string()).unwrap();
        wait("the rotated SVID", || p.svid(&api).is_some_and(|s| s.leaf().as_ref() == new.chain[0].as_slice())).await;

        // The last pod leaves: released.
        p.track(&BTreeMap::new()).await;
        assert!(p.svid(&api).is_none() && p.cache().subject(&api).is_none());
        assert_eq!(p.status().streams.len(), 2, "bundles and the node: {:?}", p.status());
        assert!(p.svid(&node).is_some());
        drop(spire);
    }

    /// New identities are fetched at once, not one after another: behind a socket that
    /// accepts and never answers (a hung SPIRE agent), each fetch waits out the
    /// first-message timeout (5 s); all three are being fetched before the first has failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_identities_are_fetched_together() {
        let sock = crate::svid::files::tests::TmpDir(std::env::temp_dir().join(format!("zt-provider-hung-{}.sock", std::process::id())));
        let _ = std::fs::remove_file(&sock.0);
        let opts = ProviderOptions {
            source: format!("spire:{}", sock.0.display()).parse().unwrap(),
            ca_dir: None,
            svid_ttl: Duration::from_secs(3600),
            node_selectors: crate::svid::spec::DEFAULT_NODE_SELECTORS.into(),
        };
        // Nothing at the socket yet: the start's node fetch fails at once.
        let p = SvidProvider::start(&opts, "n1", id("/zt/node/n1"), &TrustDomain::parse(TD).unwrap(), Arc::new(SystemClock)).await.unwrap();
        let _hung = std::os::unix::net::UnixListener::bind(&sock.0).unwrap();
        let want: BTreeMap<SpiffeId, BTreeSet<String>> =
            ["a", "b", "c"].iter().map(|sa| (id(&format!("/ns/shop/sa/{sa}")), BTreeSet::from([format!("u-{sa}")]))).collect();
        let track = tokio::spawn({
            let (p, want) = (p.clone(), want.clone());
            async move { p.track(&want).await }
        });
        wait("all three identities being fetched", || want.keys().all(|i| p.cache().subject(i).is_some())).await;
        let failed = p.cache().status().into_iter().filter(|s| s.failures > 0 && want.contains_key(&s.spiffe_id)).count();
        assert_eq!(failed, 0, "the three were asked for while the first fetch still waited");
        assert!(!track.is_finished(), "the fetches wait for the hung socket");
        track.abort();
    }

    /// No SPIRE at the socket when the agent starts: the provider starts anyway, down and
    /// without a node SVID; SPIRE appears: the node SVID arrives without being asked again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spire_down_at_start_is_waited_for() {
        let sock = std::env::temp_dir().join(format!("zt-provider-late-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let opts = ProviderOptions {
            source: format!("spire:{}", sock.display()).parse().unwrap(),
            ca_dir: None,
            svid_ttl: Duration::from_secs(3600),
            node_selectors: crate::svid::spec::DEFAULT_NODE_SELECTORS.into(),
        };
        let node = id("/zt/node/n1");
        let p = SvidProvider::start(&opts, "n1", node.clone(), &TrustDomain::parse(TD).unwrap(), Arc::new(SystemClock)).await.unwrap();
        assert!(p.svid(&node).is_none());
        let st = p.status();
        assert!(!st.up && st.streams.iter().all(|s| !s.up), "{st:?}");
        assert!(st.failing.iter().any(|(i, _, e)| *i == node.to_string() && e.contains(&sock.display().to_string())), "the socket named: {st:?}");
        let spire = SpireStandIn::start(&sock, TD).await.unwrap();
        spire.register(&node.to_string(), &["k8s:ns:zt-system", "k8s:sa:zt-agent", "k8s:node-name:n1"]);
        wait("the node SVID once SPIRE answers", || p.svid(&node).is_some() && p.status().up).await;
        assert!(p.status().errors_total >= 1);
        drop(spire);
    }

    /// `files:<root>`: the node's files missing at start are waited for (down, no SVID), then
    /// taken when written; a pod identity is read from its own directory; a rewrite the
    /// writing tool makes is taken within the poll period (not at half-life); the node's
    /// directory broken mid-rewrite keeps the last valid SVID and says down; a pod's broken
    /// directory is that SVID's failure, not the source's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_are_waited_for_and_rewrites_taken() {
        use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
        use crate::svid::files::tests::write_full;
        let td = TrustDomain::parse(TD).unwrap();
        let dir = crate::svid::files::tests::TmpDir(std::env::temp_dir().join(format!("zt-provider-files-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        let root = dir.0.clone();
        let opts = ProviderOptions {
            source: format!("files:{}", root.display()).parse().unwrap(),
            ca_dir: None,
            svid_ttl: Duration::from_secs(3600),
            node_selectors: String::new(),
        };
        let node = id("/zt/node/n1");
        let p = SvidProvider::start(&opts, "n1", node.clone(), &td, Arc::new(SystemClock)).await.unwrap();
        assert!(p.svid(&node).is_none() && !p.status().up, "{:?}", p.status());
        assert_eq!(p.source_name(), format!("files:{}", root.display()));
        let ca = BuiltinCa::new(BuiltinConfig::new(td.clone()), Arc::new(SystemClock)).unwrap();
        let node_leaf = write_full(&root.join("zt.test/zt/node/n1"), &ca, &node);
        wait("the node SVID once written", || p.svid(&node).is_some_and(|s| *s.leaf() == node_leaf) && p.status().up).await;

        let api = id("/ns/shop/sa/api");
        let api_dir = root.join("zt.test/ns/shop/sa/api");
        write_full(&api_dir, &ca, &api);
        p.track(&BTreeMap::from([(api.clone(), BTreeSet::from(["u-1".to_string()]))])).await;
        assert!(p.svid(&api).is_some());
        // Twice: the second rewrite is seen by its files' size and mtime alone (api's files
        // were already watched).
        for _ in 0..2 {
            let rotated = write_full(&api_dir, &ca, &api);
            wait("the rewritten SVID", || p.svid(&api).is_some_and(|s| *s.leaf() == rotated)).await;
        }

        // A pod's directory broken: its failure, the source still up.
        std::fs::remove_file(api_dir.join("svid_key.pem")).unwrap();
        wait("api's refresh to fail", || p.status().failing.iter().any(|(i, ..)| *i == api.to_string())).await;
        assert!(p.status().up && p.svid(&api).is_some(), "kept, and the source up: {:?}", p.status());
        // The node's: kept, down.
        std::fs::remove_file(root.join("zt.test/zt/node/n1/svid.pem")).unwrap();
        wait("the source down", || !p.status().up).await;
        assert!(p.svid(&node).is_some(), "the last valid node SVID kept");
    }

    #[tokio::test]
    async fn builtin_is_always_up_and_ignores_pods() {
        let td = TrustDomain::parse(TD).unwrap();
        let opts = ProviderOptions { source: SvidSourceSpec::Builtin, ca_dir: None, svid_ttl: Duration::from_secs(600), node_selectors: String::new() };
        let node = id("/zt/node/n1");
        let p = SvidProvider::start(&opts, "n1", node.clone(), &td, Arc::new(SystemClock)).await.unwrap();
        let api = id("/ns/shop/sa/api");
        p.track(&BTreeMap::from([(api.clone(), BTreeSet::new())])).await;
        assert!(p.svid(&api).is_some() && p.svid(&node).is_some());
        let st = p.status();
        assert!(st.up && st.streams.is_empty() && st.source == "builtin", "{st:?}");
    }
}
