//! Node-to-node channels (issue 10, first increment): one TLS 1.3 connection per node pair over
//! TCP, authenticated both ways with node X509-SVIDs and `verifier`. Each end can export keying
//! material bound to the connection (RFC 8446 section 7.5); the per-identity proofs
//! (`proofs.rs`) sign it. The agent runs them in `auth/links.rs`.
//!
//! TLS 1.3 only, ring provider, no session resumption (no tickets, no session cache: every
//! channel is a full handshake that checks both SVIDs against the current bundles), ALPN
//! `zt-node/1`. Each handshake takes the node SVID current at that moment from a
//! `NodeCredential`, so a renewed SVID is used by the next channel.

pub mod proofs;
pub mod renewal;
pub mod session;
pub mod verifier;
#[cfg(test)]
mod test_nodes;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use crate::svid::cache::SvidCache;
use crate::svid::clock::Clock;
use crate::svid::source::BundleProvider;
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};
use crate::svid::x509::SvidError;
use verifier::{svid_error, PeerPolicy, SvidClientVerifier, SvidServerVerifier, SvidVerifier};

/// ALPN of the channel, so that it is never mistaken for another TLS service on the port.
pub const ALPN: &[u8] = b"zt-node/1";

/// The exporter label the per-identity proofs will use (RFC 5705 labels start with EXPORTER).
pub const PROOF_EXPORTER_LABEL: &[u8] = b"EXPORTER-zt-identity-proof";

/// The node SVID to present, looked up at each handshake.
pub trait NodeCredential: Send + Sync + std::fmt::Debug {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>>;
}

/// The node SVID as the cache holds it now (None once it expired: no channel then).
pub struct CachedCredential {
    pub cache: Arc<SvidCache>,
    pub id: SpiffeId,
}

impl std::fmt::Debug for CachedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CachedCredential({})", self.id)
    }
}

impl NodeCredential for CachedCredential {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.cache.svid(&self.id).map(|s| s.certified().clone())
    }
}

/// A fixed key (tests; a presenter with a wrong key).
#[derive(Debug)]
pub struct FixedCredential(pub Arc<CertifiedKey>);

impl NodeCredential for FixedCredential {
    fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Presents the credential's key, and remembers which one it presented (one resolver per
/// connection: the channel records the not-after of its own SVID).
#[derive(Debug)]
struct Resolver(Arc<dyn NodeCredential>, std::sync::Mutex<Option<Arc<CertifiedKey>>>);

impl Resolver {
    fn new(c: Arc<dyn NodeCredential>) -> Arc<Resolver> {
        Arc::new(Resolver(c, std::sync::Mutex::new(None)))
    }

    fn pick(&self) -> Option<Arc<CertifiedKey>> {
        let k = self.0.certified_key();
        *self.1.lock().unwrap() = k.clone();
        k
    }

    fn presented(&self) -> Vec<CertificateDer<'static>> {
        self.1.lock().unwrap().as_ref().map(|k| k.cert.clone()).unwrap_or_default()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _root_hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.pick()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a channel end needs: its credential, the bundles and clock its verifier reads, and the
/// trust domains whose nodes it accepts.
#[derive(Clone)]
pub struct ChannelSetup {
    pub credential: Arc<dyn NodeCredential>,
    pub bundles: Arc<dyn BundleProvider>,
    pub clock: Arc<dyn Clock>,
    pub peer_domains: BTreeSet<TrustDomain>,
    pub handshake_timeout: Duration,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ChannelSetup {
    /// The accepting end: requires a client SVID of one of `peer_domains`.
    pub fn acceptor(&self) -> Result<TlsAcceptor, rustls::Error> {
        self.acceptor_with(Resolver::new(self.credential.clone()))
    }

    fn acceptor_with(&self, resolver: Arc<Resolver>) -> Result<TlsAcceptor, rustls::Error> {
        let v = SvidVerifier::new(self.bundles.clone(), self.clock.clone(), PeerPolicy::TrustDomains(self.peer_domains.clone()));
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SvidClientVerifier(v)))
            .with_cert_resolver(resolver);
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(TlsAcceptor::from(Arc::new(cfg)))
    }

    /// The dialling end: requires the server to be exactly `peer`.
    pub fn connector(&self, peer: &SpiffeId) -> Result<TlsConnector, rustls::Error> {
        self.connector_with(peer, Resolver::new(self.credential.clone()))
    }

    fn connector_with(&self, peer: &SpiffeId, resolver: Arc<Resolver>) -> Result<TlsConnector, rustls::Error> {
        let v = SvidVerifier::new(self.bundles.clone(), self.clock.clone(), PeerPolicy::Exactly(peer.clone()));
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SvidServerVerifier(v)))
            .with_client_cert_resolver(resolver);
        cfg.resumption = Resumption::disabled();
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(TlsConnector::from(Arc::new(cfg)))
    }

    /// Completes the server side of a channel on an accepted TCP connection.
    pub async fn accept(&self, tcp: TcpStream) -> Result<NodeChannel, ChannelError> {
        let resolver = Resolver::new(self.credential.clone());
        let acceptor = self.acceptor_with(resolver.clone()).map_err(ChannelError::Tls)?;
        let tls =
            tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await.map_err(|_| ChannelError::Timeout)?.map_err(ChannelError::from_io)?;
        NodeChannel::new(TlsStream::Server(tls), resolver.presented())
    }

    /// Dials `addr`, expecting the node `peer` there.
    pub async fn connect(&self, addr: SocketAddr, peer: &SpiffeId) -> Result<NodeChannel, ChannelError> {
        if !self.peer_domains.contains(peer.trust_domain()) {
            return Err(ChannelError::Rejected(SvidError::TrustDomainNotAllowed(peer.trust_domain().clone())));
        }
        let resolver = Resolver::new(self.credential.clone());
        let connector = self.connector_with(peer, resolver.clone()).map_err(ChannelError::Tls)?;
        let fut = async {
            let tcp = TcpStream::connect(addr).await?;
            connector.connect(ServerName::IpAddress(addr.ip().into()), tcp).await
        };
        let tls = tokio::time::timeout(self.handshake_timeout, fut).await.map_err(|_| ChannelError::Timeout)?.map_err(ChannelError::from_io)?;
        NodeChannel::new(TlsStream::Client(tls), resolver.presented())
    }
}

/// Why a channel did not come up. `Rejected` is this end refusing the peer's SVID.
#[derive(Debug)]
pub enum ChannelError {
    Rejected(SvidError),
    Tls(rustls::Error),
    Io(io::Error),
    Timeout,
}

impl ChannelError {
    fn from_io(e: io::Error) -> ChannelError {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) => match svid_error(t) {
                Some(s) => ChannelError::Rejected(s.clone()),
                None => ChannelError::Tls(t.clone()),
            },
            None => ChannelError::Io(e),
        }
    }
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Rejected(e) => write!(f, "the peer's SVID was rejected: {e}"),
            ChannelError::Tls(e) => write!(f, "TLS: {e}"),
            ChannelError::Io(e) => write!(f, "{e}"),
            ChannelError::Timeout => write!(f, "the handshake timed out"),
        }
    }
}

impl std::error::Error for ChannelError {}

/// An authenticated channel to one peer node.
pub struct NodeChannel {
    stream: TlsStream<TcpStream>,
    peer: SpiffeId,
    certs: renewal::ChannelCerts,
}

impl NodeChannel {
    fn new(stream: TlsStream<TcpStream>, local: Vec<CertificateDer<'static>>) -> Result<NodeChannel, ChannelError> {
        let (certs, dialled) = match &stream {
            TlsStream::Client(s) => (s.get_ref().1.peer_certificates(), true),
            TlsStream::Server(s) => (s.get_ref().1.peer_certificates(), false),
        };
        let peer_chain: Vec<CertificateDer<'static>> = certs.unwrap_or_default().iter().map(|c| c.clone().into_owned()).collect();
        // The verifier accepted this leaf; read its ID (and validity) back from it.
        let certs = renewal::ChannelCerts::new(dialled, local, peer_chain).map_err(ChannelError::Rejected)?;
        Ok(NodeChannel { stream, peer: certs.peer.spiffe_id.clone(), certs })
    }

    /// The node SVIDs this channel was authenticated with (both ends' chains and validity).
    pub fn certs(&self) -> &renewal::ChannelCerts {
        &self.certs
    }

    /// The peer node's SPIFFE ID, as its verified SVID states it.
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }

    /// Keying material both ends derive alike from this connection (RFC 8446 section 7.5).
    pub fn export_keying_material(&self, label: &[u8], context: Option<&[u8]>) -> Result<[u8; 32], rustls::Error> {
        let out = [0u8; 32];
        match &self.stream {
            TlsStream::Client(s) => s.get_ref().1.export_keying_material(out, label, context),
            TlsStream::Server(s) => s.get_ref().1.export_keying_material(out, label, context),
        }
    }

    /// The negotiated protocol and whether the handshake was full (never resumed here).
    pub fn handshake(&self) -> (Option<rustls::ProtocolVersion>, Option<rustls::HandshakeKind>) {
        match &self.stream {
            TlsStream::Client(s) => (s.get_ref().1.protocol_version(), s.get_ref().1.handshake_kind()),
            TlsStream::Server(s) => (s.get_ref().1.protocol_version(), s.get_ref().1.handshake_kind()),
        }
    }

    pub fn stream_mut(&mut self) -> &mut TlsStream<TcpStream> {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests;
