//! Proofs on real channels over loopback (127.0.0.1 only): a proof sent in a frame is
//! accepted with its identity and expiry; replayed on another channel, signed by another
//! key, expired or not yet valid (a skewed issuer) it is refused with its reason.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rcgen::KeyPair;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use super::*;
use crate::channel::verifier::PeerPolicy;
use crate::channel::NodeChannel;
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::clock::{Clock, ManualClock};
use crate::svid::spiffe_id::TrustDomain;

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

use crate::channel::test_nodes::Nodes as Bed;

fn parts(m: &Message) -> (Vec<String>, u16, String) {
    match m {
        Message::Proof { chain, scheme, signature } => (chain.clone(), *scheme, signature.clone()),
        other => panic!("not a proof: {other:?}"),
    }
}

#[tokio::test]
async fn a_proof_sent_over_the_channel_is_accepted_with_its_identity_and_expiry() {
    let bed = Bed::new().await;
    let (mut n1, mut n2) = bed.channel().await;
    let api = bed.ca.issue(&id("spiffe://zt.test/ns/default/sa/api")).unwrap();
    let proof = make_proof(&n2, &api).unwrap();
    send(n2.stream_mut(), &proof).await.unwrap();
    let got = recv(n1.stream_mut()).await.unwrap().unwrap();
    let (chain, scheme, sig) = parts(&got);
    let p = check_proof(&n1, &bed.verifier(), &chain, scheme, &sig).unwrap();
    assert_eq!(p.spiffe_id, id("spiffe://zt.test/ns/default/sa/api"));
    assert_eq!(p.not_after, api.not_after());
    // Withdraw and clock frames round-trip too.
    for m in [Message::Withdraw { spiffe_id: "spiffe://zt.test/ns/default/sa/api".into() }, Message::Clock { unix_ms: 5, echo: Some(3), installs: false }, Message::Clock { unix_ms: 5, echo: None, installs: true }, Message::Installed { spiffe_id: "spiffe://zt.test/ns/default/sa/api".into(), not_after_unix_s: 1_800_000_000 }] {
        send(n2.stream_mut(), &m).await.unwrap();
        assert_eq!(recv(n1.stream_mut()).await.unwrap().unwrap(), m);
    }
}

#[tokio::test]
async fn a_proof_replayed_on_another_channel_or_signed_by_another_key_is_refused() {
    let bed = Bed::new().await;
    let (n1, n2) = bed.channel().await;
    let (other_n1, _other_n2) = bed.channel().await;
    let api = bed.ca.issue(&id("spiffe://zt.test/ns/default/sa/api")).unwrap();
    let (chain, scheme, sig) = parts(&make_proof(&n2, &api).unwrap());
    assert!(check_proof(&n1, &bed.verifier(), &chain, scheme, &sig).is_ok());
    assert_eq!(check_proof(&other_n1, &bed.verifier(), &chain, scheme, &sig), Err(ProofError::BadSignature), "replayed on another channel");
    // api's chain with a signature by another key (someone who saw api's certificate).
    let other = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KeyPair::generate().unwrap().serialize_der()));
    let thief = X509SvidLike::new(api.chain().to_vec(), other);
    let (chain, scheme, sig) = parts(&thief.proof(&n2));
    assert_eq!(check_proof(&n1, &bed.verifier(), &chain, scheme, &sig), Err(ProofError::BadSignature));
    // Another identity's chain with api's signature: the signature is over api's context.
    let web = bed.ca.issue(&id("spiffe://zt.test/ns/default/sa/web")).unwrap();
    let (web_chain, _, _) = parts(&make_proof(&n2, &web).unwrap());
    let (_, scheme, api_sig) = parts(&make_proof(&n2, &api).unwrap());
    assert_eq!(check_proof(&n1, &bed.verifier(), &web_chain, scheme, &api_sig), Err(ProofError::BadSignature));
    assert!(matches!(check_proof(&n1, &bed.verifier(), &[], scheme, &sig), Err(ProofError::Svid(SvidError::NoCertificate))));
    assert!(matches!(check_proof(&n1, &bed.verifier(), &["zz".into()], scheme, &sig), Err(ProofError::Malformed(_))));
}

/// Signs a proof with any key over any chain (what a thief could send).
struct X509SvidLike(Arc<CertifiedKey>);

impl X509SvidLike {
    fn new(chain: Vec<rustls::pki_types::CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        X509SvidLike(Arc::new(CertifiedKey::new(chain, any_supported_type(&key).unwrap())))
    }
    fn proof(&self, ch: &NodeChannel) -> Message {
        let leaf_id = check_leaf(&self.0.cert[0]).unwrap().spiffe_id;
        let msg = signed_bytes(ch, &leaf_id).unwrap();
        let signer = self.0.key.choose_scheme(SCHEMES).unwrap();
        Message::Proof {
            chain: self.0.cert.iter().map(|c| hex(c.as_ref())).collect(),
            scheme: u16::from(signer.scheme()),
            signature: hex(&signer.sign(&msg).unwrap()),
        }
    }
}

#[tokio::test]
async fn expired_and_not_yet_valid_identity_svids_are_refused_with_their_numbers() {
    let bed = Bed::new().await;
    let (n1, n2) = bed.channel().await;
    let api = bed.ca.issue(&id("spiffe://zt.test/ns/default/sa/api")).unwrap();
    let (chain, scheme, sig) = parts(&make_proof(&n2, &api).unwrap());
    // The receiver's clock passes the SVID's end (the channel is already up).
    let ttl = api.not_after().duration_since(bed.clock.now()).unwrap();
    bed.clock.advance(ttl + Duration::from_secs(1));
    match check_proof(&n1, &bed.verifier(), &chain, scheme, &sig) {
        Err(ProofError::Svid(e @ SvidError::Expired { .. })) => assert_eq!(e.validity_offset_secs(), Some(-1)),
        other => panic!("want expired, got {other:?}"),
    }
    bed.clock.rewind(ttl + Duration::from_secs(1));
    // An issuer whose clock is 45 minutes ahead (the seed's story): its SVID starts 44m50s
    // (45m minus the CA's 10 s backdating) after this node's now. Same CA key: the chain is
    // good, only the time is wrong.
    let ahead = Arc::new(ManualClock::new(bed.clock.now() + Duration::from_secs(45 * 60)));
    let skewed_ca = BuiltinCa::new(BuiltinConfig::new(TrustDomain::parse("zt.test").unwrap()), ahead).unwrap();
    let skewed = skewed_ca.issue(&id("spiffe://zt.test/ns/default/sa/api")).unwrap();
    let mut both = crate::svid::source::TrustBundles::default();
    let mut roots = bed.ca.roots();
    roots.extend(skewed_ca.roots());
    both.set(TrustDomain::parse("zt.test").unwrap(), roots).unwrap();
    let verifier = SvidVerifier::new(
        crate::svid::source::StaticBundles::new(both),
        bed.clock.clone(),
        PeerPolicy::TrustDomains(BTreeSet::from([TrustDomain::parse("zt.test").unwrap()])),
    );
    let (chain, scheme, sig) = parts(&make_proof(&n2, &skewed).unwrap());
    match check_proof(&n1, &verifier, &chain, scheme, &sig) {
        Err(ProofError::Svid(e @ SvidError::NotYetValid { .. })) => assert_eq!(e.validity_offset_secs(), Some(44 * 60 + 50)),
        other => panic!("want not yet valid, got {other:?}"),
    }
}

#[test]
fn clock_offsets_take_the_round_trip_out() {
    assert_eq!(clock_offset_ms(1_000, 2_700_500, 2_000), 2_699_000);
    assert_eq!(clock_offset_ms(1_000, 1_500, 2_000), 0);
    assert_eq!(clock_offset_ms(1_000, 0, 2_000), -1_500);
    assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(), vec![0, 1, 0xab, 0xff]);
}

/// A peer of the version before `Installed` reads a `Clock` that announces it (the field
/// is ignored) and the frames it always knew, byte for byte; `installs: false` is not
/// written at all.
#[test]
fn the_installs_announcement_is_readable_by_the_version_before() {
    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(tag = "type", rename_all = "kebab-case")]
    enum Before {
        Proof { chain: Vec<String>, scheme: u16, signature: String },
        Withdraw { spiffe_id: String },
        Clock { unix_ms: i64, echo: Option<i64> },
    }
    let new = serde_json::to_vec(&Message::Clock { unix_ms: 7, echo: None, installs: true }).unwrap();
    assert_eq!(serde_json::from_slice::<Before>(&new).unwrap(), Before::Clock { unix_ms: 7, echo: None });
    let plain = serde_json::to_string(&Message::Clock { unix_ms: 7, echo: Some(5), installs: false }).unwrap();
    assert_eq!(plain, r#"{"type":"clock","unix_ms":7,"echo":5}"#);
    let installed = serde_json::to_vec(&Message::Installed { spiffe_id: "spiffe://zt.test/ns/a/sa/b".into(), not_after_unix_s: 1 }).unwrap();
    assert!(serde_json::from_slice::<Before>(&installed).is_err(), "why it is only sent to a peer that announced it");
}
