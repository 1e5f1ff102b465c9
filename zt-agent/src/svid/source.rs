//! What every SVID backend provides: the X509-SVID of a subject and the trust bundles per trust
//! domain. Streaming backends fit the same shape: `spire` (the Delegated Identity API,
//! `SubscribeToX509SVIDs` by selectors built from `Subject`, bundles from
//! `SubscribeToX509Bundles`) keeps the latest message per subject and answers `fetch_*` from
//! it, so the cache drives every backend the same way; `changes` tells the cache when to ask.
//! The SPIFFE Broker API (pod referenced by `Subject::pod_uid`) is not built.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures::future::BoxFuture;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::spiffe_id::{SpiffeId, TrustDomain};
use super::x509::{check_leaf, check_root, SvidError};

/// Whose SVID to fetch. `spiffe_id` is what zt expects from the Kubernetes state; a backend
/// that identifies workloads otherwise (pod UID, selectors) uses the other fields, and the
/// cache refuses an answer whose SPIFFE ID differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub spiffe_id: SpiffeId,
    /// The pod (Broker API reference, `k8s:pod-uid` selector); None for the node's own SVID.
    pub pod_uid: Option<String>,
}

impl Subject {
    pub fn id(spiffe_id: SpiffeId) -> Subject {
        Subject { spiffe_id, pod_uid: None }
    }
}

/// An X509-SVID with its private key. Constructed only through `from_parts`, which enforces
/// the leaf rules and that the key belongs to the leaf (hence the private fields).
#[derive(Debug)]
pub struct X509Svid {
    spiffe_id: SpiffeId,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Leaf first, then intermediates (no root); the key signs TLS handshakes and proofs.
    certified: Arc<CertifiedKey>,
}

impl X509Svid {
    pub fn from_parts(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<X509Svid, SvidError> {
        let leaf = chain.first().ok_or(SvidError::NoCertificate)?;
        let facts = check_leaf(leaf)?;
        let signer = any_supported_type(&key).map_err(|e| SvidError::BadEncoding(format!("private key: {e}")))?;
        let certified = CertifiedKey::new(chain, signer);
        certified.keys_match().map_err(|_| SvidError::KeyMismatch)?;
        Ok(X509Svid { spiffe_id: facts.spiffe_id, not_before: facts.not_before, not_after: facts.not_after, certified: Arc::new(certified) })
    }

    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Chain and signing key, as rustls presents them.
    pub fn certified(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }
}

/// The roots of each trust domain. During a root rotation a domain holds the old and the new
/// root together (A -> A+B -> B), so SVIDs of both verify.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundles(BTreeMap<TrustDomain, Vec<CertificateDer<'static>>>);

impl TrustBundles {
    /// Sets a domain's roots; refuses an empty set and a root that is not a CA.
    pub fn set(&mut self, td: TrustDomain, roots: Vec<CertificateDer<'static>>) -> Result<(), String> {
        if roots.is_empty() {
            return Err(format!("empty trust bundle for {td}"));
        }
        for r in &roots {
            check_root(r).map_err(|e| format!("trust bundle for {td}: {e}"))?;
        }
        self.0.insert(td, roots);
        Ok(())
    }

    pub fn get(&self, td: &TrustDomain) -> Option<&[CertificateDer<'static>]> {
        self.0.get(td).map(|v| v.as_slice())
    }

    pub fn domains(&self) -> impl Iterator<Item = &TrustDomain> {
        self.0.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where a verifier reads the current bundles at each handshake (the cache, or a fixed set).
pub trait BundleProvider: Send + Sync {
    fn bundles(&self) -> Arc<TrustBundles>;
}

/// Bundles set by hand (tests, and a verifier used outside the cache).
#[derive(Debug, Default)]
pub struct StaticBundles(RwLock<Arc<TrustBundles>>);

impl StaticBundles {
    pub fn new(b: TrustBundles) -> Arc<StaticBundles> {
        Arc::new(StaticBundles(RwLock::new(Arc::new(b))))
    }

    pub fn replace(&self, b: TrustBundles) {
        *self.0.write().unwrap() = Arc::new(b);
    }
}

impl BundleProvider for StaticBundles {
    fn bundles(&self) -> Arc<TrustBundles> {
        self.0.read().unwrap().clone()
    }
}

/// An SVID backend (`builtin`, `files`, `spire` (SPIRE's Delegated Identity API)).
pub trait SvidSource: Send + Sync {
    /// The backend's name for logs and status (`builtin`, `files`, ...).
    fn name(&self) -> &str;

    /// The current X509-SVID for `subject`.
    fn fetch_svid<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>>;

    /// Every trust domain's roots this backend knows (its own and federated ones).
    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>>;

    /// A streaming backend (`spire`) bumps this when a message arrives or a stream fails, so
    /// that the cache fetches at once instead of at its next refresh point. None: poll only.
    fn changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The cache no longer tracks `id`: a streaming backend closes its subscription.
    fn release(&self, _id: &SpiffeId) {}
}
