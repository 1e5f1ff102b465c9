//! The `spire` backend: X509-SVIDs and trust bundles from a SPIRE agent's Delegated Identity
//! API (`spire.api.agent.delegatedidentity.v1.DelegatedIdentity`, served on the SPIRE agent's
//! admin socket; zt-agent must be listed in its `authorized_delegates`).
//!
//! - One `SubscribeToX509SVIDs` stream per subject, subscribed by selectors (`selectors`), and
//!   one `SubscribeToX509Bundles` stream. Each keeps the latest message; `fetch_*` answers from
//!   it, so the cache drives this backend like the others. Every message and every stream
//!   failure bumps `changes`, and the cache fetches at once (a rotation SPIRE pushes is taken
//!   as soon as it arrives, a broken stream shows in the cache's state at once).
//! - A stream that fails or ends is reopened with doubling backoff capped at `backoff_max`.
//!   While it is down `fetch_svid` fails, naming the error: the cache keeps the last valid
//!   SVID (until its not-after) and retries.
//! - What SPIRE hands out is checked before the cache sees it: the X509-SVID leaf rules and
//!   key match (`X509Svid::from_parts`), the trust domain and ID asked for, the validity window
//!   against the injected clock, and the chain against the bundle of the SVID's own trust
//!   domain from the bundle stream (`channel::verifier`). A refusal names its `SvidError`.
//!
//! Limits: the Broker API is not built. Subscriptions are per SPIFFE ID (the cache's key):
//! pods that share an ID share the subscription of the subject the cache tracks, described by
//! that pod's UID; a new subject for the same ID replaces the subscription. No JWT-SVIDs.

mod decode;
pub mod selectors;
mod stream;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail};
use futures::future::BoxFuture;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::X509svidWithKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use selectors::Selector;

use super::clock::Clock;
use super::source::{StaticBundles, Subject, SvidSource, TrustBundles, X509Svid};
use super::spiffe_id::SpiffeId;
use crate::channel::verifier::{PeerPolicy, SvidVerifier, Usage};

#[derive(Clone, Debug)]
pub struct SpireConfig {
    /// The SPIRE agent's admin socket (`admin_socket_path` in its configuration).
    pub socket: PathBuf,
    /// Selectors for a subject without a pod (the node's own SVID).
    pub node_selectors: Vec<Selector>,
    /// Added to every pod's selectors as `k8s:node-name:<name>`.
    pub node_name: Option<String>,
    /// How long a first fetch waits for a stream's first message.
    pub first_message_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl SpireConfig {
    pub fn new(socket: PathBuf) -> SpireConfig {
        SpireConfig {
            socket,
            node_selectors: Vec::new(),
            node_name: None,
            first_message_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// One stream's health (for readiness, metrics and `ztctl auth`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamStatus {
    /// Open and has delivered at least one message since it was (re)opened.
    pub up: bool,
    pub messages: u64,
    /// Times the stream failed or ended (each is followed by a reconnect after backoff).
    pub failures: u64,
    /// The last failure, or the last message's problems (bundle domains left out).
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct SpireStatus {
    pub bundles: StreamStatus,
    pub svids: BTreeMap<SpiffeId, (Vec<Selector>, StreamStatus)>,
}

impl SpireStatus {
    /// Every stream is up (readiness).
    pub fn all_up(&self) -> bool {
        self.bundles.up && self.svids.values().all(|(_, s)| s.up)
    }
}

struct Stream<T> {
    status: StreamStatus,
    /// A first message or a first failure has happened (a first fetch waits for this).
    settled: bool,
    latest: Option<T>,
    /// Tells a replaced stream's task apart from its successor.
    generation: u64,
    task: Option<JoinHandle<()>>,
}

impl<T> Stream<T> {
    fn new(generation: u64) -> Stream<T> {
        Stream { status: StreamStatus::default(), settled: false, latest: None, generation, task: None }
    }
}

impl<T> Drop for Stream<T> {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct SvidStream {
    selectors: Vec<Selector>,
    stream: Stream<Vec<X509svidWithKey>>,
}

#[derive(Default)]
struct State {
    bundles: Option<Stream<(TrustBundles, Vec<String>)>>,
    svids: BTreeMap<SpiffeId, SvidStream>,
    next_generation: u64,
}

pub(crate) struct Shared {
    cfg: SpireConfig,
    state: Mutex<State>,
    changes: watch::Sender<u64>,
}

impl Shared {
    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        self.cfg.backoff_initial.saturating_mul(1 << exp).min(self.cfg.backoff_max)
    }
}

pub struct SpireSource {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
}

impl Drop for SpireSource {
    fn drop(&mut self) {
        // The stream tasks hold `shared`: dropping the streams aborts them.
        let mut st = self.shared.state.lock().unwrap();
        st.bundles = None;
        st.svids.clear();
    }
}

impl SpireSource {
    /// Streams open on first use (inside a tokio runtime).
    pub fn new(cfg: SpireConfig, clock: Arc<dyn Clock>) -> SpireSource {
        let (changes, _) = watch::channel(0);
        SpireSource { shared: Arc::new(Shared { cfg, state: Mutex::default(), changes }), clock }
    }

    pub fn config(&self) -> &SpireConfig {
        &self.shared.cfg
    }

    pub fn status(&self) -> SpireStatus {
        let st = self.shared.state.lock().unwrap();
        SpireStatus {
            bundles: st.bundles.as_ref().map(|b| b.status.clone()).unwrap_or_default(),
            svids: st.svids.iter().map(|(id, s)| (id.clone(), (s.selectors.clone(), s.stream.status.clone()))).collect(),
        }
    }

    fn ensure_bundles(&self) {
        let mut st = self.shared.state.lock().unwrap();
        if st.bundles.is_none() {
            st.next_generation += 1;
            let generation = st.next_generation;
            let mut s = Stream::new(generation);
            s.task = Some(tokio::spawn(stream::bundles(self.shared.clone(), generation)));
            st.bundles = Some(s);
        }
    }

    fn ensure_svid(&self, id: &SpiffeId, selectors: Vec<Selector>) {
        let mut st = self.shared.state.lock().unwrap();
        if st.svids.get(id).is_some_and(|s| s.selectors == selectors) {
            return;
        }
        st.next_generation += 1;
        let generation = st.next_generation;
        let mut s = Stream::new(generation);
        s.task = Some(tokio::spawn(stream::svids(self.shared.clone(), id.clone(), selectors.clone(), generation)));
        // Replacing drops (aborts) a stream subscribed with other selectors.
        st.svids.insert(id.clone(), SvidStream { selectors, stream: s });
    }

    /// Waits until `done` holds or the first-message timeout passes.
    async fn wait_until(&self, done: impl Fn(&State) -> bool) {
        let mut rx = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + self.shared.cfg.first_message_timeout;
        loop {
            if done(&self.shared.state.lock().unwrap()) {
                return;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    fn socket(&self) -> String {
        self.shared.cfg.socket.display().to_string()
    }
}

fn down(what: &str, socket: &str, s: &StreamStatus, settled: bool) -> anyhow::Error {
    if !settled {
        anyhow!("SPIRE at {socket} has not answered the {what} subscription yet")
    } else {
        anyhow!("the SPIRE {what} stream at {socket} is down: {}", s.last_error.as_deref().unwrap_or("no message yet"))
    }
}

impl SvidSource for SpireSource {
    fn name(&self) -> &str {
        "spire"
    }

    fn fetch_svid<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>> {
        Box::pin(async move {
            let id = &subject.spiffe_id;
            let cfg = &self.shared.cfg;
            let sel = selectors::for_subject(subject, &cfg.node_selectors, cfg.node_name.as_deref()).map_err(|e| anyhow!(e))?;
            self.ensure_bundles();
            self.ensure_svid(id, sel.clone());
            self.wait_until(|st| st.bundles.as_ref().is_some_and(|b| b.settled) && st.svids.get(id).is_some_and(|s| s.stream.settled)).await;
            let (msg, bundles) = {
                let st = self.shared.state.lock().unwrap();
                let s = &st.svids.get(id).ok_or_else(|| anyhow!("the subscription for {id} was released"))?.stream;
                let what = format!("X509-SVID (selectors {})", sel.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","));
                let msg = match (&s.latest, s.status.up) {
                    (Some(m), true) => m.clone(),
                    _ => return Err(down(&what, &self.socket(), &s.status, s.settled)),
                };
                // The last bundles received, even if that stream is down right now: they are
                // the roots SPIRE last vouched for.
                let b = st.bundles.as_ref().and_then(|b| b.latest.as_ref().map(|(b, _)| b.clone()));
                let b = b.ok_or_else(|| {
                    let b = st.bundles.as_ref().unwrap();
                    down("X509 bundle", &self.socket(), &b.status, b.settled)
                })?;
                (msg, b)
            };
            let svid = decode::select(&msg, id)?;
            // Chain and time, as a peer will judge it: an SVID this node could not verify
            // itself is not handed out.
            let v = SvidVerifier::new(StaticBundles::new(bundles), self.clock.clone(), PeerPolicy::Exactly(id.clone()));
            v.verify(svid.leaf(), &svid.chain()[1..], Usage::Client)
                .map_err(|e| anyhow::Error::new(e.clone()).context(format!("SPIRE's SVID for {id} is refused ({})", e.reason())))?;
            Ok(svid)
        })
    }

    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>> {
        Box::pin(async move {
            self.ensure_bundles();
            self.wait_until(|st| st.bundles.as_ref().is_some_and(|b| b.settled)).await;
            let st = self.shared.state.lock().unwrap();
            let b = st.bundles.as_ref().unwrap();
            match (&b.latest, b.status.up) {
                (Some((bundles, errors)), true) => {
                    if bundles.is_empty() {
                        bail!("SPIRE's bundle message holds no usable trust domain: {}", errors.join("; "));
                    }
                    Ok(bundles.clone())
                }
                _ => Err(down("X509 bundle", &self.socket(), &b.status, b.settled)),
            }
        })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.shared.changes.subscribe())
    }

    fn release(&self, id: &SpiffeId) {
        self.shared.state.lock().unwrap().svids.remove(id);
    }
}

#[cfg(test)]
mod tests;
