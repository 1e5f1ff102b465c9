//! The X509-SVID verifier of zt's node-to-node channels, as rustls client and server
//! certificate verifiers (modelled on istio/ztunnel's `tls/workload.rs`, which also replaces
//! rustls's DNS-name check with a SPIFFE one).
//!
//! Every rule of the X509-SVID specification, in this order: the leaf rules of
//! `svid::x509::check_leaf` (exactly one URI SAN with a valid SPIFFE ID, not a CA, key usage
//! with digitalSignature and without keyCertSign/cRLSign); the leaf's validity window against
//! the injected clock (errors carry both instants); the chain against the bundle of the SVID's
//! own trust domain only (webpki, ring), so a root of another domain can never vouch for it;
//! then the peer policy (which trust domains, or exactly which ID). rustls's own `now` is
//! ignored: time comes from the clock. TLS 1.2 signatures are refused (the channel is TLS 1.3
//! only).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};

use crate::svid::clock::Clock;
use crate::svid::source::BundleProvider;
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::x509::{check_leaf, CertRole, SvidError};

/// Whom a verifier accepts once an SVID is authentic.
#[derive(Clone, Debug)]
pub enum PeerPolicy {
    /// Any SPIFFE ID of these trust domains.
    TrustDomains(BTreeSet<TrustDomain>),
    /// Exactly this SPIFFE ID (a client that knows which node it dials).
    Exactly(SpiffeId),
}

/// Which extended key usage the leaf must allow, if it names any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Client,
    Server,
}

#[derive(Clone)]
pub struct SvidVerifier {
    bundles: Arc<dyn BundleProvider>,
    clock: Arc<dyn Clock>,
    policy: PeerPolicy,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for SvidVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidVerifier").field("policy", &self.policy).finish()
    }
}

impl SvidVerifier {
    pub fn new(bundles: Arc<dyn BundleProvider>, clock: Arc<dyn Clock>, policy: PeerPolicy) -> SvidVerifier {
        SvidVerifier { bundles, clock, policy, provider: Arc::new(rustls::crypto::ring::default_provider()) }
    }

    /// Runs every rule on a presented chain (leaf first) and returns the peer's SPIFFE ID.
    pub fn verify(&self, leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], usage: Usage) -> Result<SpiffeId, SvidError> {
        let facts = check_leaf(leaf)?;
        let now = self.clock.now();
        if now < facts.not_before {
            return Err(SvidError::NotYetValid { cert: CertRole::Leaf, now, not_before: facts.not_before });
        }
        if now >= facts.not_after {
            return Err(SvidError::Expired { cert: CertRole::Leaf, now, not_after: facts.not_after });
        }
        let td = facts.spiffe_id.trust_domain();
        let bundles = self.bundles.bundles();
        let roots = bundles.get(td).ok_or_else(|| SvidError::NoBundle(td.clone()))?;
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map_err(|e| SvidError::Chain(format!("a root of {td} is unusable: {e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| SvidError::BadEncoding(format!("{e:?}")))?;
        let time = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
        let eku = match usage {
            Usage::Client => webpki::KeyUsage::client_auth(),
            Usage::Server => webpki::KeyUsage::server_auth(),
        };
        ee.verify_for_usage(self.provider.signature_verification_algorithms.all, &anchors, intermediates, time, eku, None, None)
            .map_err(|e| webpki_error(e, td))?;
        match &self.policy {
            PeerPolicy::TrustDomains(allowed) if !allowed.contains(td) => Err(SvidError::TrustDomainNotAllowed(td.clone())),
            PeerPolicy::Exactly(want) if *want != facts.spiffe_id => Err(SvidError::UnexpectedPeer { expected: want.clone(), presented: facts.spiffe_id }),
            _ => Ok(facts.spiffe_id),
        }
    }

    fn verify_rustls(&self, leaf: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], usage: Usage) -> Result<(), rustls::Error> {
        self.verify(leaf, intermediates, usage).map(|_| ()).map_err(to_rustls)
    }

    fn tls13(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
}

/// webpki's chain errors in SVID terms. The leaf's own time was checked before, so a time
/// error here is about an issuer.
fn webpki_error(e: webpki::Error, td: &TrustDomain) -> SvidError {
    let t = |u: UnixTime| UNIX_EPOCH + std::time::Duration::from_secs(u.as_secs());
    match e {
        webpki::Error::UnknownIssuer => SvidError::UnknownIssuer(td.clone()),
        webpki::Error::InvalidSignatureForPublicKey => SvidError::BadSignature,
        webpki::Error::CaUsedAsEndEntity => SvidError::LeafIsCa,
        webpki::Error::CertExpired { time, not_after } => SvidError::Expired { cert: CertRole::Issuer, now: t(time), not_after: t(not_after) },
        webpki::Error::CertNotValidYet { time, not_before } => SvidError::NotYetValid { cert: CertRole::Issuer, now: t(time), not_before: t(not_before) },
        other => SvidError::Chain(format!("{other:?}")),
    }
}

/// Wraps an `SvidError` so that the side that rejected a handshake can get it back
/// (`svid_error`).
pub fn to_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The SVID rule behind a rustls error, if a verifier of this module raised it.
pub fn svid_error(e: &rustls::Error) -> Option<&SvidError> {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner.downcast_ref::<SvidError>(),
        _ => None,
    }
}

fn no_tls12() -> rustls::Error {
    rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered)
}

/// Verifies the client of a channel (the server side of a TLS handshake).
#[derive(Debug)]
pub struct SvidClientVerifier(pub SvidVerifier);

impl ClientCertVerifier for SvidClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Roots change with rotation; a client has one SVID to offer anyway.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.verify_rustls(end_entity, intermediates, Usage::Client).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies the server of a channel (the client side of a TLS handshake). The server name is
/// ignored: the SPIFFE ID and the policy decide.
#[derive(Debug)]
pub struct SvidServerVerifier(pub SvidVerifier);

impl ServerCertVerifier for SvidServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verify_rustls(end_entity, intermediates, Usage::Server).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, _: &[u8], _: &CertificateDer<'_>, _: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
