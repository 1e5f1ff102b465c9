//! The stand-in's certificate authority (rcgen): roots that rotate A -> A+B -> B, X509-SVIDs
//! with the validity a test sets, and the bad-SVID set. Shares no code with zt-agent's
//! builtin CA: the stand-in plays SPIRE, not zt.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

/// The ways an SVID the stand-in hands out can break the X509-SVID rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadSvid {
    /// Two URI SANs (the ID and the ID with `/extra` appended).
    TwoUriSans,
    /// basicConstraints CA=true.
    CaLeaf,
    /// Not a CA, but key usage has keyCertSign.
    KeyCertSign,
    /// The same path in trust domain `evil.test`, signed by this CA (SPIRE names it so too).
    WrongTrustDomain,
    /// Valid from two hours ago to one hour ago.
    Expired,
    /// Valid from one hour from now to two.
    NotYetValid,
    /// The private key sent is not the certificate's.
    WrongKey,
}

impl BadSvid {
    pub const ALL: [BadSvid; 7] =
        [BadSvid::TwoUriSans, BadSvid::CaLeaf, BadSvid::KeyCertSign, BadSvid::WrongTrustDomain, BadSvid::Expired, BadSvid::NotYetValid, BadSvid::WrongKey];
}

struct Root {
    params: CertificateParams,
    key: KeyPair,
    der: Vec<u8>,
}

/// An X509-SVID as SPIRE sends it: chain (leaf first, DER), PKCS#8 key, named ID, not-after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedSvid {
    pub trust_domain: String,
    pub path: String,
    pub chain: Vec<Vec<u8>>,
    pub key_pkcs8: Vec<u8>,
    pub expires_at: i64,
}

pub struct Ca {
    pub trust_domain: String,
    roots: Vec<Root>,
    active: usize,
    generation: u32,
    /// The issuer's clock: None follows the system clock.
    pub now: Option<SystemTime>,
    /// not-before relative to the issuer's now (SPIRE backdates by 10 s by default).
    pub backdate: Duration,
    pub ttl: Duration,
}

fn odt(t: SystemTime) -> Result<OffsetDateTime> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| anyhow!("time out of range: {e}"))
}

impl Ca {
    pub fn new(trust_domain: &str) -> Result<Ca> {
        let mut ca = Ca {
            trust_domain: trust_domain.into(),
            roots: Vec::new(),
            active: 0,
            generation: 0,
            now: None,
            backdate: Duration::from_secs(10),
            ttl: Duration::from_secs(3600),
        };
        ca.publish_next_root()?;
        Ok(ca)
    }

    pub fn now(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }

    /// Step 1 of a root rotation: a new root joins the bundle; the active one still signs.
    pub fn publish_next_root(&mut self) -> Result<()> {
        self.generation += 1;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIRE stand-in");
        dn.push(DnType::CommonName, format!("stand-in root {} #{}", self.trust_domain, self.generation));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{}", self.trust_domain).try_into()?)];
        // Roots span far around the issuer's now, so that only leaf times matter in tests.
        let now = self.now();
        params.not_before = odt(now - Duration::from_secs(30 * 86400))?;
        params.not_after = odt(now + Duration::from_secs(365 * 86400))?;
        let key = KeyPair::generate().context("root key")?;
        let der = params.self_signed(&key).context("self-signing a root")?.der().to_vec();
        self.roots.push(Root { params, key, der });
        Ok(())
    }

    /// Step 2: the newest root signs.
    pub fn activate_newest_root(&mut self) {
        self.active = self.roots.len() - 1;
    }

    /// Step 3: only the signing root stays in the bundle.
    pub fn retire_inactive_roots(&mut self) {
        let active = self.roots.swap_remove(self.active);
        self.roots = vec![active];
        self.active = 0;
    }

    /// The bundle: every root, DER.
    pub fn roots(&self) -> Vec<Vec<u8>> {
        self.roots.iter().map(|r| r.der.clone()).collect()
    }

    pub fn active_root(&self) -> Vec<u8> {
        self.roots[self.active].der.clone()
    }

    /// An X509-SVID for `spiffe_id` (of this trust domain), or one broken as `bad` says.
    pub fn issue(&self, spiffe_id: &str, bad: Option<BadSvid>) -> Result<IssuedSvid> {
        let path = spiffe_id
            .strip_prefix(&format!("spiffe://{}", self.trust_domain))
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| anyhow!("{spiffe_id} is not an ID of trust domain {}", self.trust_domain))?
            .to_string();
        let now = self.now();
        let (mut td, mut uri) = (self.trust_domain.clone(), spiffe_id.to_string());
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIRE stand-in");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let (mut nb, mut na) = (now - self.backdate, now + self.ttl);
        match bad {
            Some(BadSvid::CaLeaf) => params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
            Some(BadSvid::KeyCertSign) => params.key_usages.push(KeyUsagePurpose::KeyCertSign),
            Some(BadSvid::WrongTrustDomain) => {
                td = "evil.test".into();
                uri = format!("spiffe://evil.test{path}");
            }
            Some(BadSvid::Expired) => (nb, na) = (now - Duration::from_secs(7200), now - Duration::from_secs(3600)),
            Some(BadSvid::NotYetValid) => (nb, na) = (now + Duration::from_secs(3600), now + Duration::from_secs(7200)),
            _ => {}
        }
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into()?)];
        if bad == Some(BadSvid::TwoUriSans) {
            params.subject_alt_names.push(SanType::URI(format!("{uri}/extra").try_into()?));
        }
        params.not_before = odt(nb)?;
        params.not_after = odt(na)?;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().context("SVID key")?;
        let root = &self.roots[self.active];
        let issuer = Issuer::from_params(&root.params, &root.key);
        let leaf = params.signed_by(&key, &issuer).context("signing an SVID")?.der().to_vec();
        let key_pkcs8 = if bad == Some(BadSvid::WrongKey) { KeyPair::generate()?.serialize_der() } else { key.serialize_der() };
        let expires_at = odt(na)?.unix_timestamp();
        Ok(IssuedSvid { trust_domain: td, path, chain: vec![leaf], key_pkcs8, expires_at })
    }
}
