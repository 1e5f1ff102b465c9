//! The `builtin` backend: an in-memory rcgen CA for the local mode and the demo, so that
//! everything works with no SPIRE. It issues X509-SVIDs (one URI SAN, digitalSignature, not a
//! CA, the configured TTL; P-256 keys) and rotates its root in three steps:
//! `publish_next_root` (bundle A+B, still signing with A), `activate_newest_root` (signing
//! with B), `retire_inactive_roots` (bundle B). Keys live in memory only: a restart is a new CA.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures::future::BoxFuture;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::clock::{unix_secs, Clock};
use super::source::{Subject, SvidSource, TrustBundles, X509Svid};
use super::spiffe_id::{SpiffeId, TrustDomain};

#[derive(Clone, Debug)]
pub struct BuiltinConfig {
    pub trust_domain: TrustDomain,
    /// Lifetime of each X509-SVID.
    pub svid_ttl: Duration,
    /// Lifetime of each root.
    pub root_ttl: Duration,
    /// How far not-before is set before the clock's now, so that a peer slightly behind
    /// accepts a fresh SVID.
    pub backdate: Duration,
}

impl BuiltinConfig {
    pub fn new(trust_domain: TrustDomain) -> BuiltinConfig {
        BuiltinConfig { trust_domain, svid_ttl: Duration::from_secs(3600), root_ttl: Duration::from_secs(30 * 86400), backdate: Duration::from_secs(10) }
    }
}

struct Root {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    not_after: SystemTime,
}

struct State {
    roots: Vec<Root>,
    /// Index of the root that signs.
    active: usize,
    generation: u32,
}

pub struct BuiltinCa {
    cfg: BuiltinConfig,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

fn odt(t: SystemTime) -> anyhow::Result<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(unix_secs(t)).map_err(|e| anyhow!("time out of range: {e}"))
}

impl BuiltinCa {
    pub fn new(cfg: BuiltinConfig, clock: Arc<dyn Clock>) -> anyhow::Result<BuiltinCa> {
        let ca = BuiltinCa { cfg, clock, state: Mutex::new(State { roots: Vec::new(), active: 0, generation: 0 }) };
        let root = ca.new_root(1)?;
        {
            let mut st = ca.state.lock().unwrap();
            st.roots.push(root);
            st.generation = 1;
        }
        Ok(ca)
    }

    /// The local/demo way for several agents to trust each other without SPIRE: the CA's
    /// root and key in `dir/ca.pem` (certificate, then PKCS#8 key), created by the first
    /// agent that finds none (written beside, then hard-linked into place, so that two
    /// agents starting together end up with one CA). Anyone who reads the file can issue
    /// any identity of the trust domain: local mode and demos only, never a production
    /// cluster. The shared root does not rotate.
    pub fn open_shared(cfg: BuiltinConfig, clock: Arc<dyn Clock>, dir: &std::path::Path) -> anyhow::Result<BuiltinCa> {
        use rustls::pki_types::pem::PemObject;
        let path = dir.join("ca.pem");
        if !path.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let ca = BuiltinCa::new(cfg.clone(), clock.clone())?;
            let pem = {
                let st = ca.state.lock().unwrap();
                let r = &st.roots[0];
                pem_block("CERTIFICATE", r.der.as_ref()) + &r.key.serialize_pem()
            };
            let tmp = dir.join(format!(".ca.pem.{}", std::process::id()));
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
                f.write_all(pem.as_bytes())?;
                f.sync_all()?;
            }
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => return Ok(ca),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("writing {}", path.display())),
            }
        }
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let der = CertificateDer::from_pem_slice(&data).with_context(|| format!("{}: no CA certificate", path.display()))?;
        let key_pem = std::str::from_utf8(&data).ok().and_then(|t| t.find("-----BEGIN PRIVATE KEY-----").map(|i| &t[i..]));
        let key = KeyPair::from_pem(key_pem.ok_or_else(|| anyhow!("{}: no PKCS#8 key (BEGIN PRIVATE KEY)", path.display()))?)
            .with_context(|| format!("{}: the CA key", path.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!("{}: the key does not belong to the certificate", path.display());
        }
        let not_after = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
        if not_after <= clock.now() {
            bail!("{}: the shared CA expired (unix {}); remove the file to make a new one", path.display(), unix_secs(not_after));
        }
        let cn = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or_default().to_string();
        let want_uri = format!("spiffe://{}", cfg.trust_domain);
        let uri_ok = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
            san.value.general_names.iter().any(|g| matches!(g, x509_parser::extensions::GeneralName::URI(u) if *u == want_uri))
        });
        if !uri_ok {
            bail!("{}: the shared CA is not the CA of trust domain {} (--trust-domain)", path.display(), cfg.trust_domain);
        }
        // The issuer fields rcgen signs with: the same subject the root was made with.
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zt");
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root = Root { params, key, der: der.into_owned(), not_after };
        Ok(BuiltinCa { cfg, clock, state: Mutex::new(State { roots: vec![root], active: 0, generation: 1 }) })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    fn new_root(&self, generation: u32) -> anyhow::Result<Root> {
        let now = self.clock.now();
        let not_after = now + self.cfg.root_ttl;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zt");
        dn.push(DnType::CommonName, format!("zt builtin CA {} #{generation}", self.cfg.trust_domain));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{}", self.cfg.trust_domain).try_into()?)];
        params.not_before = odt(now - self.cfg.backdate)?;
        params.not_after = odt(not_after)?;
        let key = KeyPair::generate().context("root key")?;
        let der = params.self_signed(&key).context("self-signing the root")?.der().clone();
        Ok(Root { params, key, der, not_after })
    }

    /// The current roots (the trust bundle of this CA's trust domain).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.state.lock().unwrap().roots.iter().map(|r| r.der.clone()).collect()
    }

    /// The root that signs new SVIDs.
    pub fn active_root(&self) -> CertificateDer<'static> {
        let st = self.state.lock().unwrap();
        st.roots[st.active].der.clone()
    }

    /// Rotation step 1: a new root joins the bundle; the old one still signs.
    pub fn publish_next_root(&self) -> anyhow::Result<()> {
        let generation = self.state.lock().unwrap().generation + 1;
        let root = self.new_root(generation)?;
        let mut st = self.state.lock().unwrap();
        st.roots.push(root);
        st.generation = generation;
        Ok(())
    }

    /// Rotation step 2: the newest root signs.
    pub fn activate_newest_root(&self) {
        let mut st = self.state.lock().unwrap();
        st.active = st.roots.len() - 1;
    }

    /// Rotation step 3: only the signing root stays in the bundle.
    pub fn retire_inactive_roots(&self) {
        let mut st = self.state.lock().unwrap();
        let i = st.active;
        let active = st.roots.swap_remove(i);
        st.roots = vec![active];
        st.active = 0;
    }

    /// Issues an X509-SVID for `id`, valid from now (minus the backdate) for the SVID TTL,
    /// never past the signing root's end.
    pub fn issue(&self, id: &SpiffeId) -> anyhow::Result<X509Svid> {
        if id.trust_domain() != &self.cfg.trust_domain {
            bail!("the builtin CA of {} cannot issue {id}", self.cfg.trust_domain);
        }
        let now = self.clock.now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "zt");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = odt(now - self.cfg.backdate)?;
        let key = KeyPair::generate().context("SVID key")?;
        let leaf = {
            let st = self.state.lock().unwrap();
            let root = &st.roots[st.active];
            params.not_after = odt((now + self.cfg.svid_ttl).min(root.not_after))?;
            sign_with(&params, &key, root)?
        };
        let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        X509Svid::from_parts(vec![leaf], pkcs8).map_err(|e| anyhow!("issued SVID for {id} breaks a rule: {e}"))
    }

    /// Signs arbitrary leaf parameters with the active root: test beds build the bad-SVID set
    /// (two URI SANs, a CA leaf, expired, ...) with it. Nothing in the agent calls it.
    pub fn sign_custom(&self, params: &CertificateParams, key: &KeyPair) -> anyhow::Result<CertificateDer<'static>> {
        let st = self.state.lock().unwrap();
        sign_with(params, key, &st.roots[st.active])
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b = String::new();
    for c in der.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            b.push(if i <= c.len() { A[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    let lines: Vec<&str> = b.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

fn sign_with(params: &CertificateParams, key: &KeyPair, root: &Root) -> anyhow::Result<CertificateDer<'static>> {
    let mut params = params.clone();
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_params(&root.params, &root.key);
    Ok(params.signed_by(key, &issuer).context("signing the certificate")?.der().clone())
}

impl SvidSource for BuiltinCa {
    fn name(&self) -> &str {
        "builtin"
    }

    fn fetch_svid<'a>(&'a self, subject: &'a Subject) -> BoxFuture<'a, anyhow::Result<X509Svid>> {
        Box::pin(async move { self.issue(&subject.spiffe_id) })
    }

    fn fetch_bundles(&self) -> BoxFuture<'_, anyhow::Result<TrustBundles>> {
        Box::pin(async move {
            let mut b = TrustBundles::default();
            b.set(self.cfg.trust_domain.clone(), self.roots()).map_err(|e| anyhow!(e))?;
            Ok(b)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::clock::ManualClock;
    use crate::svid::x509::check_leaf;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn ca(clock: Arc<ManualClock>) -> BuiltinCa {
        let mut cfg = BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap());
        cfg.svid_ttl = Duration::from_secs(600);
        BuiltinCa::new(cfg, clock).unwrap()
    }

    #[test]
    fn issues_svids_that_follow_the_rules() {
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let ca = ca(clock.clone());
        let id = SpiffeId::parse("spiffe://zt.test/ns/default/sa/sleep").unwrap();
        let svid = ca.issue(&id).unwrap();
        assert_eq!(svid.spiffe_id(), &id);
        assert_eq!(unix_secs(svid.not_before()), 1_800_000_000 - 10);
        assert_eq!(unix_secs(svid.not_after()), 1_800_000_600);
        let facts = check_leaf(svid.leaf()).unwrap();
        assert_eq!(facts.spiffe_id, id);
        let (_, c) = X509Certificate::from_der(svid.leaf().as_ref()).unwrap();
        assert!(!c.is_ca());
        let ku = c.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        assert!(ca.issue(&SpiffeId::parse("spiffe://other.test/x").unwrap()).unwrap_err().to_string().contains("cannot issue"));
    }

    #[test]
    fn root_rotation_goes_a_then_a_b_then_b() {
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let ca = ca(clock);
        let a = ca.roots();
        assert_eq!(a.len(), 1);
        ca.publish_next_root().unwrap();
        let ab = ca.roots();
        assert_eq!(ab.len(), 2);
        assert_eq!(ab[0], a[0]);
        assert_eq!(ca.active_root(), a[0], "a published root does not sign yet");
        ca.activate_newest_root();
        assert_eq!(ca.active_root(), ab[1]);
        ca.retire_inactive_roots();
        assert_eq!(ca.roots(), vec![ab[1].clone()]);
    }
}
