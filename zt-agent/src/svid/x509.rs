//! The X509-SVID rules that a leaf certificate carries on its own (SPIFFE X509-SVID
//! specification, sections 4 and 5): exactly one URI SAN holding a valid SPIFFE ID, not a CA,
//! key usage present with digitalSignature and without keyCertSign or cRLSign. Sources run them
//! before they hand out an SVID; `channel::verifier` runs them on every peer and adds time and
//! chain. `SvidError` is the one list of reasons, so a rejection reads the same wherever it
//! happens.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::clock::{human, unix_secs};
use super::spiffe_id::{SpiffeId, TrustDomain};

/// Which certificate of a chain a time error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    Leaf,
    /// An intermediate or the root the chain ends at.
    Issuer,
}

/// Why an X509-SVID was rejected. Every rule has its own variant; the two time variants carry
/// both instants, so the skew diagnosis can say how far off the clocks are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SvidError {
    BadEncoding(String),
    NoCertificate,
    /// An X509-SVID carries exactly one URI SAN.
    UriSanCount(usize),
    BadSpiffeId(String),
    LeafIsCa,
    NoKeyUsage,
    NoDigitalSignature,
    KeyCertSign,
    CrlSign,
    NotYetValid {
        cert: CertRole,
        now: SystemTime,
        not_before: SystemTime,
    },
    Expired {
        cert: CertRole,
        now: SystemTime,
        not_after: SystemTime,
    },
    /// No trust bundle is held for the SVID's own trust domain.
    NoBundle(TrustDomain),
    /// The chain does not lead to a root of the SVID's trust domain bundle.
    UnknownIssuer(TrustDomain),
    /// A signature in the chain does not verify (e.g. a leaf signed by another CA's key).
    BadSignature,
    /// Any other chain failure webpki reports.
    Chain(String),
    /// Authentic, but this trust domain is not accepted here.
    TrustDomainNotAllowed(TrustDomain),
    /// Authentic, but not the peer that was expected.
    UnexpectedPeer {
        expected: SpiffeId,
        presented: SpiffeId,
    },
    /// The private key does not belong to the leaf certificate.
    KeyMismatch,
}

impl SvidError {
    /// For the two time errors, how far the clock is from the certificate's window: a positive
    /// number of seconds means "not valid for this much longer" (this clock is behind the
    /// issuer or the certificate is from the future), negative means "expired this long ago".
    pub fn validity_offset_secs(&self) -> Option<i64> {
        match self {
            SvidError::NotYetValid { now, not_before, .. } => Some(unix_secs(*not_before) - unix_secs(*now)),
            SvidError::Expired { now, not_after, .. } => Some(unix_secs(*not_after) - unix_secs(*now)),
            _ => None,
        }
    }

    /// A short stable name per rule (metrics labels, test assertions).
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::BadEncoding(_) => "bad-encoding",
            SvidError::NoCertificate => "no-certificate",
            SvidError::UriSanCount(_) => "uri-san-count",
            SvidError::BadSpiffeId(_) => "bad-spiffe-id",
            SvidError::LeafIsCa => "leaf-is-ca",
            SvidError::NoKeyUsage => "no-key-usage",
            SvidError::NoDigitalSignature => "no-digital-signature",
            SvidError::KeyCertSign => "key-cert-sign",
            SvidError::CrlSign => "crl-sign",
            SvidError::NotYetValid { .. } => "not-yet-valid",
            SvidError::Expired { .. } => "expired",
            SvidError::NoBundle(_) => "no-bundle",
            SvidError::UnknownIssuer(_) => "unknown-issuer",
            SvidError::BadSignature => "bad-signature",
            SvidError::Chain(_) => "chain",
            SvidError::TrustDomainNotAllowed(_) => "trust-domain-not-allowed",
            SvidError::UnexpectedPeer { .. } => "unexpected-peer",
            SvidError::KeyMismatch => "key-mismatch",
        }
    }
}

fn since(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b).unwrap_or_default()
}

impl fmt::Display for SvidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = |c: &CertRole| match c {
            CertRole::Leaf => "the SVID",
            CertRole::Issuer => "an issuer in the SVID's chain",
        };
        match self {
            SvidError::BadEncoding(e) => write!(f, "the certificate does not parse: {e}"),
            SvidError::NoCertificate => write!(f, "no certificate was presented"),
            SvidError::UriSanCount(n) => write!(f, "the certificate has {n} URI SANs; an X509-SVID has exactly one"),
            SvidError::BadSpiffeId(e) => write!(f, "{e}"),
            SvidError::LeafIsCa => write!(f, "the leaf is a CA certificate (basicConstraints CA=true)"),
            SvidError::NoKeyUsage => write!(f, "the leaf has no key usage extension"),
            SvidError::NoDigitalSignature => write!(f, "the leaf's key usage lacks digitalSignature"),
            SvidError::KeyCertSign => write!(f, "the leaf's key usage has keyCertSign"),
            SvidError::CrlSign => write!(f, "the leaf's key usage has cRLSign"),
            SvidError::NotYetValid { cert, now, not_before } => write!(
                f,
                "{} is not valid for another {} (not before unix {}, now unix {}): this clock is behind its issuer's by at least that much",
                which(cert),
                human(since(*not_before, *now)),
                unix_secs(*not_before),
                unix_secs(*now)
            ),
            SvidError::Expired { cert, now, not_after } => write!(
                f,
                "{} expired {} ago (not after unix {}, now unix {})",
                which(cert),
                human(since(*now, *not_after)),
                unix_secs(*not_after),
                unix_secs(*now)
            ),
            SvidError::NoBundle(td) => write!(f, "no trust bundle is held for the SVID's trust domain {td}"),
            SvidError::UnknownIssuer(td) => write!(f, "the chain does not lead to a root of trust domain {td}'s bundle"),
            SvidError::BadSignature => write!(f, "a signature in the chain does not verify"),
            SvidError::Chain(e) => write!(f, "the chain does not validate: {e}"),
            SvidError::TrustDomainNotAllowed(td) => write!(f, "trust domain {td} is not accepted here"),
            SvidError::UnexpectedPeer { expected, presented } => write!(f, "expected {expected}, the peer presented {presented}"),
            SvidError::KeyMismatch => write!(f, "the private key does not belong to the leaf certificate"),
        }
    }
}

impl std::error::Error for SvidError {}

/// What a leaf that passed the leaf rules says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafFacts {
    pub spiffe_id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(unix.unsigned_abs())
    }
}

/// Checks the leaf-only X509-SVID rules and returns the SPIFFE ID and validity window.
pub fn check_leaf(der: &CertificateDer<'_>) -> Result<LeafFacts, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| SvidError::BadEncoding(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::BadEncoding(format!("{} bytes after the certificate", rest.len())));
    }
    let spiffe_id = spiffe_id_of(&cert)?;
    let bc = cert.basic_constraints().map_err(|e| SvidError::BadEncoding(format!("basicConstraints: {e}")))?;
    if bc.is_some_and(|b| b.value.ca) {
        return Err(SvidError::LeafIsCa);
    }
    let ku = cert.key_usage().map_err(|e| SvidError::BadEncoding(format!("keyUsage: {e}")))?.ok_or(SvidError::NoKeyUsage)?;
    if ku.value.key_cert_sign() {
        return Err(SvidError::KeyCertSign);
    }
    if ku.value.crl_sign() {
        return Err(SvidError::CrlSign);
    }
    if !ku.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    let v = cert.validity();
    Ok(LeafFacts { spiffe_id, not_before: to_system_time(v.not_before.timestamp()), not_after: to_system_time(v.not_after.timestamp()) })
}

fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidError> {
    let san = cert.subject_alternative_name().map_err(|e| SvidError::BadEncoding(format!("subjectAltName: {e}")))?;
    let uris: Vec<&str> =
        san.map(|s| s.value.general_names.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }).collect()).unwrap_or_default();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(SvidError::BadSpiffeId),
        _ => Err(SvidError::UriSanCount(uris.len())),
    }
}

/// True when the certificate names itself as its issuer (a root, as a bundle holds them).
pub fn is_self_issued(der: &CertificateDer<'_>) -> Result<bool, SvidError> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| SvidError::BadEncoding(e.to_string()))?;
    Ok(cert.subject().as_raw() == cert.issuer().as_raw())
}

/// The trust bundle rule: a root must be a CA.
pub fn check_root(der: &CertificateDer<'_>) -> Result<(), String> {
    let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| format!("a root does not parse: {e}"))?;
    if !cert.is_ca() {
        return Err(format!("root {} is not a CA certificate", cert.subject()));
    }
    Ok(())
}
