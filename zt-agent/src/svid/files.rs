//! The `files` backend: SVIDs that another tool keeps on disk in spiffe-helper's layout, one
//! directory per SVID: `svid.pem` (leaf, then intermediates), `svid_key.pem` (PKCS#8 key),
//! `svid_bundle.pem` (the roots of the SVID's own trust domain). spiffe-helper's
//! `add_intermediates_to_bundle` puts intermediates in the bundle file instead: certificates
//! there that are not self-issued are taken as intermediates of the chain, never as roots.
//! Limit: `include_federated_domains` mixes other domains' roots into the same file, where
//! nothing says which domain each belongs to; this backend would file them under the SVID's
//! own domain, so do not point it at such a directory.
//!
//! `--svid-source files:<dir>` names each ID's directory by the ID itself:
//! `<dir>/<trust domain><path>/` (`/run/zt/svids/cluster.local/ns/shop/sa/api/`), so that a
//! new identity needs no agent flag. A SPIFFE ID's path has no `.` or `..` segment, and a
//! trust domain of only dots is refused, so no ID names a directory outside `<dir>`.
//!
//! Files are re-read on every fetch; a half-written set (key and leaf that do not match) is an
//! error, and so is an SVID that this node could not verify itself (as SPIRE's are): not yet
//! valid or expired on the agent's clock, or not chaining to the trust bundle. The cache
//! keeps the last valid SVID and retries. `watch` polls the files of the IDs in use (size and
//! mtime) and wakes the cache when one changes, so that a rotation the writing tool makes is
//! taken within a poll period, not at the cache's next refresh point.
//!
//! Under a root, the trust bundle is the node's own directory's `svid_bundle.pem` alone: a
//! pod's directory, which its own helper may leave stale (a retired root kept) or which may be
//! writable by others, never adds a root. A node directory that does not read leaves the
//! cache's last bundles in place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures::future::BoxFuture;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use super::clock::Clock;
use super::source::{StaticBundles, Subject, SvidSource, TrustBundles, X509Svid};
use super::spiffe_id::SpiffeId;
use crate::channel::verifier::{PeerPolicy, SvidVerifier, Usage};
use super::x509::is_self_issued;

/// File names inside each directory (spiffe-helper's `svid_file_name`, `svid_key_file_name`,
/// `svid_bundle_file_name`).
#[derive(Clone, Debug)]
pub struct FileNames {
    pub svid: String,
    pub key: String,
    pub bundle: String,
}

impl Default for FileNames {
    fn default() -> FileNames {
        FileNames { svid: "svid.pem".into(), key: "svid_key.pem".into(), bundle: "svid_bundle.pem".into() }
    }
}

pub struct FilesSource {
    /// Each ID's directory is `<root>/<trust domain><path>`.
    root: PathBuf,
    /// Its directory holds the trust bundle.
    node: SpiffeId,
    names: FileNames,
    /// The IDs asked for and not released: their directories make the bundles and are watched.
    in_use: Mutex<BTreeSet<SpiffeId>>,
    changes: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
}

/// One directory's contents: chain (with intermediates moved from the bundle), key, roots.
struct Loaded {
    svid: X509Svid,
    roots: Vec<CertificateDer<'static>>,
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let v = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", path.display()))?;
    if v.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(v)
}

/// Size and mtime of a file, None if it cannot be read: what `watch` compares.
type Stamp = Option<(u64, SystemTime)>;

impl FilesSource {
    /// Each SPIFFE ID's files in `<root>/<trust domain><path>/` (`--svid-source files:<root>`),
    /// the trust bundle from `node`'s.
    pub fn under(root: PathBuf, node: SpiffeId, names: FileNames, clock: Arc<dyn Clock>) -> FilesSource {
        let in_use = Mutex::new(BTreeSet::from([node.clone()]));
        FilesSource { root, node, names, in_use, changes: watch::Sender::new(0), clock }
    }

    /// The directory of `id`'s files.
    pub fn dir_of(&self, id: &SpiffeId) -> anyhow::Result<PathBuf> {
        let td = id.trust_domain().as_str();
        if td.chars().all(|c| c == '.') {
            bail!("trust domain {td:?} names no directory under {}", self.root.display());
        }
        // The path's segments are never `.` or `..` (SpiffeId::parse).
        Ok(self.root.join(td).join(id.path().trim_start_matches('/')))
    }

    fn load(&self, dir: &Path) -> anyhow::Result<Loaded> {
        let mut chain = certs(&dir.join(&self.names.svid))?;
        let key_path = dir.join(&self.names.key);
        let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("reading the key {}", key_path.display()))?;
        let mut roots = Vec::new();
        for c in certs(&dir.join(&self.names.bundle))? {
            if is_self_issued(&c).map_err(|e| anyhow!("{}: {e}", self.names.bundle))? {
                roots.push(c);
            } else {
                chain.push(c);
            }
        }
        if roots.is_empty() {
            bail!("{} holds no root (no self-issued certificate)", dir.join(&self.names.bundle).display());
        }
        let svid = X509Svid::from_parts(chain, key).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
        Ok(Loaded { svid, roots })
    }

    /// The roots of the node's directory (under a root), checked to be the node's own: a
    /// directory holding another ID's SVID lends it no roots.
    fn node_roots(&self) -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let node = &self.node;
        let dir = self.dir_of(node)?;
        let l = self.load(&dir).context("the trust bundle (the node's SVID directory)")?;
        if l.svid.spiffe_id() != node {
            bail!("the trust bundle: {} holds an SVID for {}, not the node's {node}", dir.display(), l.svid.spiffe_id());
        }
        Ok(l.roots)
    }

    /// Size and mtime of every file of the IDs in use.
    fn stamps(&self) -> BTreeMap<PathBuf, Stamp> {
        let ids: Vec<SpiffeId> = self.in_use.lock().unwrap().iter().cloned().collect();
        let mut out = BTreeMap::new();
        for dir in ids.iter().filter_map(|id| self.dir_of(id).ok()) {
            for name in [&self.names.svid, &self.names.key, &self.names.bundle] {
                let p = dir.join(name);
                let stamp = std::fs::metadata(&p).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
                out.insert(p, stamp);
            }
        }
        out
    }

    /// Polls the files of the IDs in use every `period` and wakes the cache (`changes`) when
    /// one was written, removed or appeared. Ends when the source is dropped.
    pub fn watch(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let Some(src) = weak.upgrade() else { return };
                let now = src.stamps();
                if last.as_ref().is_some_and(|l| *l != now) {
                    src.changes.send_modify(|n| *n += 1);
                }
                last = Some(now);
                drop(src);
                tokio::time::sleep(period).await;
            }
        });
    }
}

impl SvidSource for FilesSource {
    fn name(&self) -> &str {
        "files"
    }

    fn fetch_svid<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>> {
        Box::pin(async move {
            let id = &subject.spiffe_id;
            let dir = self.dir_of(id)?;
            self.in_use.lock().unwrap().insert(id.clone());
            let l = self.load(&dir)?;
            if l.svid.spiffe_id() != id {
                bail!("{} holds an SVID for {}, not {id}", dir.display(), l.svid.spiffe_id());
            }
            // Chain and time, as a peer will judge it: against the node's bundle.
            let roots = if *id == self.node { l.roots } else { self.node_roots()? };
            let mut b = TrustBundles::default();
            b.set(id.trust_domain().clone(), roots).map_err(|e| anyhow!(e))?;
            let v = SvidVerifier::new(StaticBundles::new(b), self.clock.clone(), PeerPolicy::Exactly(id.clone()));
            v.verify(l.svid.leaf(), &l.svid.chain()[1..], Usage::Client)
                .map_err(|e| anyhow::Error::new(e.clone()).context(format!("the SVID in {} is refused ({})", dir.display(), e.reason())))?;
            Ok(l.svid)
        })
    }

    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>> {
        Box::pin(async move {
            let mut b = TrustBundles::default();
            b.set(self.node.trust_domain().clone(), self.node_roots()?).map_err(|e| anyhow!(e))?;
            Ok(b)
        })
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.changes.subscribe())
    }

    fn release(&self, id: &SpiffeId) {
        // The node's directory is always in use.
        if *id != self.node {
            self.in_use.lock().unwrap().remove(id);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
    use crate::svid::clock::ManualClock;
    use crate::svid::spiffe_id::TrustDomain;

    fn pem(tag: &str, der: &[u8]) -> String {
        use std::fmt::Write;
        let b64 = base64_encode(der);
        let mut s = format!("-----BEGIN {tag}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            writeln!(s, "{}", std::str::from_utf8(chunk).unwrap()).unwrap();
        }
        writeln!(s, "-----END {tag}-----").unwrap();
        s
    }

    fn base64_encode(b: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// A directory laid out as spiffe-helper writes it, from the builtin CA.
    fn write_dir(dir: &Path, ca: &BuiltinCa, id: &SpiffeId) -> X509Svid {
        let svid = ca.issue(id).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("svid.pem"), pem("CERTIFICATE", svid.leaf())).unwrap();
        let roots: String = ca.roots().iter().map(|r| pem("CERTIFICATE", r)).collect();
        std::fs::write(dir.join("svid_bundle.pem"), roots).unwrap();
        svid
    }

    fn tmp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("zt-svid-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[tokio::test]
    async fn reads_the_spiffe_helper_layout_and_refuses_a_mismatched_key() {
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let ca = BuiltinCa::new(BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap()), clock.clone()).unwrap();
        let id = SpiffeId::parse("spiffe://zt.test/zt/node/n1").unwrap();
        let other = SpiffeId::parse("spiffe://zt.test/zt/node/n2").unwrap();
        let base = TmpDir::new("layout");
        let (d1, d2) = (base.0.join("zt.test/zt/node/n1"), base.0.join("zt.test/zt/node/n2"));
        // The key files come from a second issuance whose key we can serialise: issue through
        // rcgen directly so the PKCS#8 bytes are at hand.
        let key1 = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let leaf = ca.sign_custom(&params, &key1).unwrap();
        write_dir(&d1, &ca, &id);
        std::fs::write(d1.join("svid.pem"), pem("CERTIFICATE", &leaf)).unwrap();
        std::fs::write(d1.join("svid_key.pem"), key1.serialize_pem()).unwrap();
        // n2's directory holds n1's SVID: refused for n2.
        std::fs::create_dir_all(&d2).unwrap();
        for f in ["svid.pem", "svid_key.pem", "svid_bundle.pem"] {
            std::fs::copy(d1.join(f), d2.join(f)).unwrap();
        }
        let src = FilesSource::under(base.0.clone(), id.clone(), FileNames::default(), clock.clone());
        let svid = src.fetch_svid(&Subject::id(id.clone())).await.unwrap();
        assert_eq!(svid.spiffe_id(), &id);
        assert_eq!(svid.leaf(), &leaf);
        let e = src.fetch_svid(&Subject::id(other.clone())).await.unwrap_err().to_string();
        assert!(e.contains("holds an SVID for spiffe://zt.test/zt/node/n1"), "{e}");
        let b = src.fetch_bundles().await.unwrap();
        assert_eq!(b.get(id.trust_domain()).unwrap(), ca.roots().as_slice());
        // A key that is not the leaf's (a half-written rotation) is an error.
        std::fs::write(d1.join("svid_key.pem"), rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let e = src.fetch_svid(&Subject::id(id.clone())).await.unwrap_err().to_string();
        assert!(e.contains("private key does not belong"), "{e}");
        // A missing file names itself.
        std::fs::remove_file(d1.join("svid_bundle.pem")).unwrap();
        let e = format!("{:#}", src.fetch_svid(&Subject::id(id)).await.unwrap_err());
        assert!(e.contains("svid_bundle.pem"), "{e}");
    }

    /// A complete directory (leaf, its key, the CA's roots) for `id`; returns the leaf.
    pub(crate) fn write_full(dir: &Path, ca: &BuiltinCa, id: &SpiffeId) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let leaf = ca.sign_custom(&params, &key).unwrap();
        write_dir(dir, ca, id);
        std::fs::write(dir.join("svid.pem"), pem("CERTIFICATE", &leaf)).unwrap();
        std::fs::write(dir.join("svid_key.pem"), key.serialize_pem()).unwrap();
        leaf
    }

    /// A directory (or socket) of the test removed on drop, also when the test fails.
    pub(crate) struct TmpDir(pub PathBuf);

    impl TmpDir {
        pub(crate) fn new(name: &str) -> TmpDir {
            TmpDir(tmp(name))
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// `files:<root>`: each ID's directory is named by the ID (a trust domain of dots names
    /// none); the trust bundle is the node's directory's alone (a pod's directory with an
    /// extra root adds nothing; a node directory holding another ID's SVID lends no roots);
    /// a pod's SVID is verified against it (another CA's refused) and
    /// on the clock (`not-yet-valid`); `watch` wakes the cache when a file of an ID in use is
    /// rewritten in place, not for an ID not in use; a released ID is no longer watched, the
    /// node never released.
    #[tokio::test]
    async fn under_a_root_the_node_directory_holds_the_bundle_and_rewrites_wake_the_cache() {
        let now = 1_800_000_000;
        let clock = Arc::new(ManualClock::at_unix(now));
        let td = TrustDomain::parse("zt.test").unwrap();
        let ca = BuiltinCa::new(BuiltinConfig::new(td.clone()), clock.clone()).unwrap();
        let other_ca = BuiltinCa::new(BuiltinConfig::new(td.clone()), clock.clone()).unwrap();
        let root = TmpDir::new("under");
        let node = SpiffeId::parse("spiffe://zt.test/zt/node/n1").unwrap();
        let api = SpiffeId::parse("spiffe://zt.test/ns/shop/sa/api").unwrap();
        let src = Arc::new(FilesSource::under(root.0.clone(), node.clone(), FileNames::default(), clock.clone()));
        let (node_dir, api_dir) = (root.0.join("zt.test/zt/node/n1"), root.0.join("zt.test/ns/shop/sa/api"));
        assert_eq!(src.dir_of(&api).unwrap(), api_dir);
        let dots = SpiffeId::parse("spiffe://../ns/a/sa/b").unwrap();
        assert!(src.dir_of(&dots).unwrap_err().to_string().contains("names no directory"));
        let e = format!("{:#}", src.fetch_bundles().await.unwrap_err());
        assert!(e.contains("the node's SVID directory") && e.contains("svid.pem"), "{e}");

        let node_leaf = write_full(&node_dir, &ca, &node);
        assert_eq!(src.fetch_svid(&Subject::id(node.clone())).await.unwrap().leaf(), &node_leaf);
        // api's directory is not read until api is asked for.
        assert_eq!(src.stamps().len(), 3);
        write_full(&api_dir, &ca, &api);
        src.fetch_svid(&Subject::id(api.clone())).await.unwrap();
        assert_eq!(src.stamps().len(), 6);

        // api's bundle file with another CA's root: the bundle is still the node's.
        let mixed: String = ca.roots().iter().chain(other_ca.roots().iter()).map(|r| pem("CERTIFICATE", r)).collect();
        std::fs::write(api_dir.join("svid_bundle.pem"), mixed).unwrap();
        assert_eq!(src.fetch_bundles().await.unwrap().get(&td).unwrap(), ca.roots().as_slice());
        // An SVID of that other CA in api's directory is refused: it does not chain to the node's bundle.
        write_full(&api_dir, &other_ca, &api);
        let e = format!("{:#}", src.fetch_svid(&Subject::id(api.clone())).await.unwrap_err());
        // (Both CAs' roots carry the same name: webpki finds the node's and the signature fails.)
        assert!((e.contains("unknown-issuer") || e.contains("bad-signature")) && e.contains("api"), "{e}");
        // Not yet valid on this node's clock: refused.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(api.to_string().try_into().unwrap())];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.not_before = time::OffsetDateTime::from_unix_timestamp(now as i64 + 3600).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(now as i64 + 7200).unwrap();
        std::fs::write(api_dir.join("svid.pem"), pem("CERTIFICATE", &ca.sign_custom(&params, &key).unwrap())).unwrap();
        std::fs::write(api_dir.join("svid_key.pem"), key.serialize_pem()).unwrap();
        let e = format!("{:#}", src.fetch_svid(&Subject::id(api.clone())).await.unwrap_err());
        assert!(e.contains("not-yet-valid"), "{e}");
        // The node's directory holding another ID's SVID lends no roots.
        write_full(&node_dir, &ca, &api);
        let e = format!("{:#}", src.fetch_bundles().await.unwrap_err());
        assert!(e.contains("not the node's"), "{e}");
        write_full(&node_dir, &ca, &node);
        write_full(&api_dir, &ca, &api);

        // In-place rewrites of a file in use wake the cache; a directory not in use does not.
        let mut rx = src.changes().unwrap();
        src.watch(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(100)).await;
        write_full(&root.0.join("zt.test/ns/shop/sa/web"), &ca, &SpiffeId::parse("spiffe://zt.test/ns/shop/sa/web").unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!rx.has_changed().unwrap(), "a directory not in use is not watched");
        let new_leaf = write_full(&api_dir, &ca, &api);
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("woken by the rewrite").unwrap();
        assert_eq!(src.fetch_svid(&Subject::id(api.clone())).await.unwrap().leaf(), &new_leaf);

        // Released: api's directory is no longer watched; the node's cannot be released.
        src.release(&api);
        src.release(&node);
        assert_eq!(src.stamps().len(), 3);
    }

    /// spiffe-helper's `add_intermediates_to_bundle`: the intermediate sits in the bundle file.
    /// It joins the chain, not the roots, and the chain verifies through it.
    #[tokio::test]
    async fn intermediates_in_the_bundle_file_join_the_chain() {
        use crate::channel::verifier::{PeerPolicy, SvidVerifier, Usage};
        use crate::svid::source::StaticBundles;
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let td = TrustDomain::parse("zt.test").unwrap();
        let ca = BuiltinCa::new(BuiltinConfig::new(td.clone()), clock.clone()).unwrap();
        let mut ip = rcgen::CertificateParams::default();
        ip.distinguished_name.push(rcgen::DnType::CommonName, "intermediate");
        ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ip.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ikey = rcgen::KeyPair::generate().unwrap();
        let inter = ca.sign_custom(&ip, &ikey).unwrap();
        let id = SpiffeId::parse("spiffe://zt.test/ns/default/sa/sleep").unwrap();
        let mut lp = rcgen::CertificateParams::default();
        lp.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        lp.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        lp.not_before = time::OffsetDateTime::from_unix_timestamp(1_800_000_000 - 60).unwrap();
        lp.not_after = time::OffsetDateTime::from_unix_timestamp(1_800_003_600).unwrap();
        let lkey = rcgen::KeyPair::generate().unwrap();
        let leaf = lp.signed_by(&lkey, &rcgen::Issuer::from_params(&ip, &ikey)).unwrap().der().clone();
        let root = TmpDir::new("intermediates");
        let dir = root.0.join("zt.test/ns/default/sa/sleep");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("svid.pem"), pem("CERTIFICATE", &leaf)).unwrap();
        std::fs::write(dir.join("svid_key.pem"), lkey.serialize_pem()).unwrap();
        std::fs::write(dir.join("svid_bundle.pem"), pem("CERTIFICATE", &ca.roots()[0]) + &pem("CERTIFICATE", &inter)).unwrap();
        // The SVID's own directory holds the bundle (as the node's would).
        let src = FilesSource::under(root.0.clone(), id.clone(), FileNames::default(), clock.clone());
        let svid = src.fetch_svid(&Subject::id(id.clone())).await.unwrap();
        assert_eq!(svid.chain(), &[leaf.clone(), inter.clone()]);
        let bundles = src.fetch_bundles().await.unwrap();
        assert_eq!(bundles.get(&td).unwrap(), ca.roots().as_slice(), "the intermediate is no root");
        let v = SvidVerifier::new(StaticBundles::new(bundles), clock, PeerPolicy::TrustDomains([td].into()));
        assert_eq!(v.verify(&leaf, &svid.chain()[1..], Usage::Client), Ok(id.clone()));
        // Without the intermediate the chain does not reach the root.
        assert_eq!(v.verify(&leaf, &[], Usage::Client).unwrap_err().reason(), "unknown-issuer");
    }
}
