//! A SPIRE stand-in: a gRPC server on a Unix socket that speaks SPIRE's Delegated Identity API
//! (`spire.api.agent.delegatedidentity.v1.DelegatedIdentity`, the messages spire-api generates
//! from spire-api-sdk's protos) the way a SPIRE agent's admin socket does:
//!
//! - `SubscribeToX509SVIDs { selectors }` streams the SVIDs of every registered entry whose
//!   selectors are a subset of the request's (SPIRE's matching), and sends again whenever one
//!   of them changes; a `pid` or no selectors is refused (InvalidArgument), as SPIRE does for
//!   a request it cannot parse.
//! - `SubscribeToX509Bundles` streams `{ "spiffe://<td>": roots as concatenated DER }` (the
//!   key is the trust domain's SPIFFE ID, as released SPIRE agents send it), again on change.
//! - The CA (`ca`) is rcgen; a test controls its clock, not-before and TTL, rotates an
//!   entry's SVID (pushed on the open streams), rotates roots A -> A+B -> B, and makes an
//!   entry's next SVID one of the bad set (`BadSvid`).
//! - `stop` ends every stream with UNAVAILABLE and closes the socket; `restart` listens again
//!   with the same CA and entries. Caller authorization is modelled only as a switch
//!   (`deny_callers`: PERMISSION_DENIED as for a caller not in `authorized_delegates`).

mod ca;
mod server;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Result};
use tokio::sync::watch;

pub use ca::{BadSvid, Ca, IssuedSvid};

struct Entry {
    selectors: BTreeSet<String>,
    svid: Option<IssuedSvid>,
    bad: Option<BadSvid>,
}

pub(crate) struct State {
    ca: ca::Ca,
    /// Keyed by SPIFFE ID.
    entries: BTreeMap<String, Entry>,
    /// Every selector set a client subscribed with, in order.
    subscriptions: Vec<Vec<String>>,
    /// Streams open now.
    open_streams: usize,
    /// Refuse callers as SPIRE refuses one missing from `authorized_delegates`.
    deny_callers: bool,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Bumped on every change; open streams re-send when what they serve changed.
    changes: watch::Sender<u64>,
}

impl Inner {
    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The SVIDs for a subscription (issuing the ones not issued yet).
    fn svids_for(&self, selectors: &BTreeSet<String>) -> Result<Vec<IssuedSvid>> {
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let mut out = Vec::new();
        for (id, e) in st.entries.iter_mut() {
            if e.selectors.is_empty() || !e.selectors.is_subset(selectors) {
                continue;
            }
            if e.svid.is_none() {
                e.svid = Some(st.ca.issue(id, e.bad)?);
            }
            out.push(e.svid.clone().unwrap());
        }
        Ok(out)
    }

    fn bundle(&self) -> (String, Vec<u8>) {
        let st = self.state.lock().unwrap();
        (format!("spiffe://{}", st.ca.trust_domain), st.ca.roots().concat())
    }
}

pub struct SpireStandIn {
    inner: Arc<Inner>,
    socket: PathBuf,
    server: Mutex<Option<server::Running>>,
}

impl SpireStandIn {
    /// Listens on `socket` (removed first if left over) for trust domain `trust_domain`.
    pub async fn start(socket: &Path, trust_domain: &str) -> Result<SpireStandIn> {
        let (changes, _) = watch::channel(0);
        let state = State { ca: ca::Ca::new(trust_domain)?, entries: BTreeMap::new(), subscriptions: Vec::new(), open_streams: 0, deny_callers: false };
        let s = SpireStandIn { inner: Arc::new(Inner { state: Mutex::new(state), changes }), socket: socket.to_path_buf(), server: Mutex::new(None) };
        s.restart().await?;
        Ok(s)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Listens again (after `stop`), with the same CA and entries.
    pub async fn restart(&self) -> Result<()> {
        if self.server.lock().unwrap().is_some() {
            return Err(anyhow!("the SPIRE stand-in at {} is already running", self.socket.display()));
        }
        let running = server::serve(self.inner.clone(), &self.socket)?;
        *self.server.lock().unwrap() = Some(running);
        Ok(())
    }

    /// Ends every stream with UNAVAILABLE, stops listening and removes the socket.
    pub async fn stop(&self) {
        let running = self.server.lock().unwrap().take();
        if let Some(r) = running {
            r.stop().await;
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Registers `spiffe_id` for a workload described by `selectors` (`k8s:pod-uid:...`).
    pub fn register(&self, spiffe_id: &str, selectors: &[&str]) {
        let e = Entry { selectors: selectors.iter().map(|s| s.to_string()).collect(), svid: None, bad: None };
        self.inner.state.lock().unwrap().entries.insert(spiffe_id.into(), e);
        self.inner.bump();
    }

    pub fn unregister(&self, spiffe_id: &str) {
        self.inner.state.lock().unwrap().entries.remove(spiffe_id);
        self.inner.bump();
    }

    /// Issues a new SVID for `spiffe_id` now (rotation), pushed on the open streams.
    pub fn rotate(&self, spiffe_id: &str) -> Result<IssuedSvid> {
        let svid = {
            let mut g = self.inner.state.lock().unwrap();
            let st = &mut *g;
            let e = st.entries.get_mut(spiffe_id).ok_or_else(|| anyhow!("{spiffe_id} is not registered"))?;
            let svid = st.ca.issue(spiffe_id, e.bad)?;
            e.svid = Some(svid.clone());
            svid
        };
        self.inner.bump();
        Ok(svid)
    }

    /// Every registered entry gets a new SVID (after a root change, as SPIRE re-signs).
    pub fn rotate_all(&self) -> Result<()> {
        let ids: Vec<String> = self.inner.state.lock().unwrap().entries.keys().cloned().collect();
        for id in ids {
            self.rotate(&id)?;
        }
        Ok(())
    }

    /// From now on `spiffe_id`'s SVIDs are broken as `bad` says (None: good again); a new
    /// one is issued and pushed at once.
    pub fn set_bad(&self, spiffe_id: &str, bad: Option<BadSvid>) -> Result<IssuedSvid> {
        {
            let mut st = self.inner.state.lock().unwrap();
            st.entries.get_mut(spiffe_id).ok_or_else(|| anyhow!("{spiffe_id} is not registered"))?.bad = bad;
        }
        self.rotate(spiffe_id)
    }

    /// The issuer's clock (None: the system clock), for the SVIDs issued from now on.
    pub fn set_now(&self, now: Option<SystemTime>) {
        self.inner.state.lock().unwrap().ca.now = now;
    }

    /// Lifetime and backdate of the SVIDs issued from now on.
    pub fn set_validity(&self, ttl: Duration, backdate: Duration) {
        let mut st = self.inner.state.lock().unwrap();
        st.ca.ttl = ttl;
        st.ca.backdate = backdate;
    }

    /// Root rotation step 1 (bundle A+B, A signs), pushed.
    pub fn publish_next_root(&self) -> Result<()> {
        self.inner.state.lock().unwrap().ca.publish_next_root()?;
        self.inner.bump();
        Ok(())
    }

    /// Step 2: B signs the SVIDs issued from now on (call `rotate_all` to re-sign).
    pub fn activate_newest_root(&self) {
        self.inner.state.lock().unwrap().ca.activate_newest_root();
    }

    /// Step 3 (bundle B), pushed.
    pub fn retire_inactive_roots(&self) {
        self.inner.state.lock().unwrap().ca.retire_inactive_roots();
        self.inner.bump();
    }

    /// The current bundle's roots (DER).
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.inner.state.lock().unwrap().ca.roots()
    }

    pub fn active_root(&self) -> Vec<u8> {
        self.inner.state.lock().unwrap().ca.active_root()
    }

    /// The SVID currently issued for `spiffe_id`, if any.
    pub fn current(&self, spiffe_id: &str) -> Option<IssuedSvid> {
        self.inner.state.lock().unwrap().entries.get(spiffe_id)?.svid.clone()
    }

    /// From now on new subscriptions are refused with PERMISSION_DENIED, as a SPIRE agent
    /// refuses a caller that is not in its `authorized_delegates`.
    pub fn deny_callers(&self, deny: bool) {
        self.inner.state.lock().unwrap().deny_callers = deny;
    }

    /// Every selector set a client subscribed with so far.
    pub fn subscriptions(&self) -> Vec<Vec<String>> {
        self.inner.state.lock().unwrap().subscriptions.clone()
    }

    pub fn open_streams(&self) -> usize {
        self.inner.state.lock().unwrap().open_streams
    }
}

impl Drop for SpireStandIn {
    fn drop(&mut self) {
        if let Some(r) = self.server.lock().unwrap().take() {
            r.abort();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests;
