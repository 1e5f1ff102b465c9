//! Two channel ends on loopback (127.0.0.1 only): a good pair connects both ways and exports
//! the same keying material; a wrong-trust-domain node, an unexpected node and a presenter
//! without the SVID's key are refused, each with its reason.

use std::time::Duration;

use rcgen::KeyPair;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::cache::CacheConfig;
use crate::svid::clock::ManualClock;
use crate::svid::source::{StaticBundles, Subject, TrustBundles};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

struct Bed {
    clock: Arc<ManualClock>,
    ca: Arc<BuiltinCa>,
    cache: Arc<SvidCache>,
}

async fn bed() -> Bed {
    let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
    let ca = Arc::new(BuiltinCa::new(BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap()), clock.clone()).unwrap());
    let cache = SvidCache::new(ca.clone(), clock.clone(), CacheConfig::default());
    for n in ["n1", "n2"] {
        cache.prefetch(Subject::id(id(&format!("spiffe://zt.test/zt/node/{n}")))).await.unwrap();
    }
    Bed { clock, ca, cache }
}

impl Bed {
    fn setup(&self, credential: Arc<dyn NodeCredential>) -> ChannelSetup {
        ChannelSetup {
            credential,
            bundles: self.cache.clone(),
            clock: self.clock.clone(),
            peer_domains: BTreeSet::from([TrustDomain::parse("zt.test").unwrap()]),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    fn node(&self, n: &str) -> ChannelSetup {
        self.setup(Arc::new(CachedCredential { cache: self.cache.clone(), id: id(&format!("spiffe://zt.test/zt/node/{n}")) }))
    }
}

/// Accepts one connection on a fresh loopback port with `server`; returns the port and the
/// server's outcome.
async fn serve_one(server: ChannelSetup) -> (SocketAddr, tokio::task::JoinHandle<Result<NodeChannel, ChannelError>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        server.accept(tcp).await
    });
    (addr, h)
}

#[tokio::test]
async fn two_nodes_connect_and_export_the_same_keying_material() {
    let bed = bed().await;
    let (addr, server) = serve_one(bed.node("n1")).await;
    let mut client = bed.node("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
    let mut server = server.await.unwrap().unwrap();
    assert_eq!(client.peer(), &id("spiffe://zt.test/zt/node/n1"));
    assert_eq!(server.peer(), &id("spiffe://zt.test/zt/node/n2"));
    for end in [&client, &server] {
        assert_eq!(end.handshake(), (Some(rustls::ProtocolVersion::TLSv1_3), Some(rustls::HandshakeKind::Full)));
    }
    let ck = client.export_keying_material(PROOF_EXPORTER_LABEL, Some(b"ctx")).unwrap();
    let sk = server.export_keying_material(PROOF_EXPORTER_LABEL, Some(b"ctx")).unwrap();
    assert_eq!(ck, sk, "both ends export the same keying material");
    assert_ne!(ck, [0u8; 32]);
    assert_ne!(ck, client.export_keying_material(PROOF_EXPORTER_LABEL, Some(b"other")).unwrap(), "the context changes it");
    // The channel carries data both ways.
    client.stream_mut().write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server.stream_mut().read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    server.stream_mut().write_all(b"pong").await.unwrap();
    client.stream_mut().read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // A second channel between the same nodes is a full handshake again (no resumption) with
    // other keying material.
    let (addr, server2) = serve_one(bed.node("n1")).await;
    let client2 = bed.node("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
    let server2 = server2.await.unwrap().unwrap();
    assert_eq!(client2.handshake().1, Some(rustls::HandshakeKind::Full));
    assert_eq!(server2.handshake().1, Some(rustls::HandshakeKind::Full));
    assert_ne!(client2.export_keying_material(PROOF_EXPORTER_LABEL, Some(b"ctx")).unwrap(), ck);
}

#[tokio::test]
async fn a_node_of_another_trust_domain_is_refused() {
    let bed = bed().await;
    // evil.test's node trusts zt.test's roots too, so only the server's check can stop it.
    let evil = BuiltinCa::new(BuiltinConfig::new(TrustDomain::parse("evil.test").unwrap()), bed.clock.clone()).unwrap();
    let evil_svid = evil.issue(&id("spiffe://evil.test/zt/node/n9")).unwrap();
    let mut both = TrustBundles::default();
    both.set(TrustDomain::parse("zt.test").unwrap(), bed.ca.roots()).unwrap();
    both.set(TrustDomain::parse("evil.test").unwrap(), evil.roots()).unwrap();
    let mut evil_end = bed.setup(Arc::new(FixedCredential(evil_svid.certified().clone())));
    evil_end.bundles = StaticBundles::new(both);
    let (addr, server) = serve_one(bed.node("n1")).await;
    let client = evil_end.connect(addr, &id("spiffe://zt.test/zt/node/n1")).await;
    match server.await.unwrap() {
        Err(ChannelError::Rejected(e)) => assert_eq!(e, SvidError::NoBundle(TrustDomain::parse("evil.test").unwrap())),
        Err(e) => panic!("server: want a rejection for the trust domain, got {e}"),
        Ok(c) => panic!("server accepted {}", c.peer()),
    }
    // The client learns of it by the server's alert, at the latest on its first read.
    // (TLS 1.3: the client may finish before the server has judged its certificate.)
    if let Ok(mut c) = client {
        let mut b = [0u8; 1];
        let r = c.stream_mut().read(&mut b).await;
        assert!(matches!(r, Err(_) | Ok(0)), "the refused client read {r:?}");
    }
}

#[tokio::test]
async fn the_client_refuses_a_server_that_is_not_the_expected_node() {
    let bed = bed().await;
    let (addr, server) = serve_one(bed.node("n1")).await;
    let e = bed.node("n2").connect(addr, &id("spiffe://zt.test/zt/node/n3")).await.err().expect("connected to the wrong node");
    match e {
        ChannelError::Rejected(SvidError::UnexpectedPeer { expected, presented }) => {
            assert_eq!(expected, id("spiffe://zt.test/zt/node/n3"));
            assert_eq!(presented, id("spiffe://zt.test/zt/node/n1"));
        }
        e => panic!("want UnexpectedPeer, got {e}"),
    }
    assert!(server.await.unwrap().is_err(), "the server's handshake fails too");
    // Dialling a node of a trust domain this end does not accept fails before any packet.
    let e = bed.node("n2").connect(addr, &id("spiffe://evil.test/zt/node/n1")).await.err().unwrap();
    assert!(matches!(e, ChannelError::Rejected(SvidError::TrustDomainNotAllowed(_))), "{e}");
}

#[tokio::test]
async fn a_presenter_without_the_svid_key_is_refused() {
    let bed = bed().await;
    // n2's certificate chain, but a handshake signature by another key.
    let n2 = bed.cache.svid(&id("spiffe://zt.test/zt/node/n2")).unwrap();
    let other = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KeyPair::generate().unwrap().serialize_der()));
    let thief = Arc::new(CertifiedKey::new(n2.chain().to_vec(), any_supported_type(&other).unwrap()));
    let (addr, server) = serve_one(bed.node("n1")).await;
    let _ = bed.setup(Arc::new(FixedCredential(thief))).connect(addr, &id("spiffe://zt.test/zt/node/n1")).await;
    match server.await.unwrap() {
        Err(ChannelError::Tls(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))) => {}
        Err(e) => panic!("want a bad handshake signature, got {e}"),
        Ok(_) => panic!("the server accepted a presenter without the key"),
    }
}

#[tokio::test]
async fn an_expired_node_svid_makes_no_channel() {
    let bed = bed().await;
    // Past the node SVIDs' end (no refresh ran): the cache hands out nothing, the server has
    // no certificate to present, the handshake fails.
    bed.clock.advance(Duration::from_secs(3601));
    let (addr, server) = serve_one(bed.node("n1")).await;
    assert!(bed.node("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.is_err());
    assert!(server.await.unwrap().is_err());
}
