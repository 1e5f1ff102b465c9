//! The bad-SVID set, each rejected with its own reason; a good SVID accepted; root rotation.

use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::clock::{unix_secs, ManualClock};
use crate::svid::source::{StaticBundles, TrustBundles, X509Svid};

const T0: u64 = 1_800_000_000;
const TTL: u64 = 3600;

struct Bed {
    clock: Arc<ManualClock>,
    ca: BuiltinCa,
    bundles: Arc<StaticBundles>,
    verifier: SvidVerifier,
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::parse(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn new_ca(clock: &Arc<ManualClock>, domain: &str) -> BuiltinCa {
    let mut cfg = BuiltinConfig::new(td(domain));
    cfg.svid_ttl = Duration::from_secs(TTL);
    cfg.backdate = Duration::ZERO;
    BuiltinCa::new(cfg, clock.clone()).unwrap()
}

fn bundles_of(cas: &[&BuiltinCa]) -> TrustBundles {
    let mut b = TrustBundles::default();
    for ca in cas {
        b.set(ca.trust_domain().clone(), ca.roots()).unwrap();
    }
    b
}

fn bed() -> Bed {
    let clock = Arc::new(ManualClock::at_unix(T0));
    let ca = new_ca(&clock, "zt.test");
    let bundles = StaticBundles::new(bundles_of(&[&ca]));
    let verifier = SvidVerifier::new(bundles.clone(), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td("zt.test")])));
    Bed { clock, ca, bundles, verifier }
}

/// Leaf parameters that follow every rule; each bad case changes one thing.
fn good_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.is_ca = IsCa::ExplicitNoCa;
    p.not_before = time::OffsetDateTime::from_unix_timestamp(T0 as i64).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp((T0 + TTL) as i64).unwrap();
    p
}

const SLEEP: &str = "spiffe://zt.test/ns/default/sa/sleep";

fn verify_params(bed: &Bed, p: &CertificateParams) -> Result<SpiffeId, SvidError> {
    let leaf = bed.ca.sign_custom(p, &KeyPair::generate().unwrap()).unwrap();
    bed.verifier.verify(&leaf, &[], Usage::Client)
}

#[test]
fn a_good_svid_is_accepted() {
    let bed = bed();
    assert_eq!(verify_params(&bed, &good_params(&[SLEEP])), Ok(id(SLEEP)));
    let svid = bed.ca.issue(&id(SLEEP)).unwrap();
    assert_eq!(bed.verifier.verify(svid.leaf(), &[], Usage::Server), Ok(id(SLEEP)));
}

#[test]
fn leaf_rules_each_have_their_own_reason() {
    let bed = bed();
    let mut cases: Vec<(&str, CertificateParams, SvidError)> = Vec::new();
    cases.push(("two URI SANs", good_params(&[SLEEP, "spiffe://zt.test/ns/default/sa/admin"]), SvidError::UriSanCount(2)));
    let mut p = good_params(&[]);
    p.subject_alt_names = vec![SanType::DnsName("sleep.default".try_into().unwrap())];
    cases.push(("no URI SAN", p, SvidError::UriSanCount(0)));
    let p = good_params(&["spiffe://zt.test"]);
    cases.push((
        "a trust domain ID",
        p,
        SvidError::BadSpiffeId("invalid SPIFFE ID \"spiffe://zt.test\": no path (a trust domain ID names no workload)".into()),
    ));
    let mut p = good_params(&[SLEEP]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    cases.push(("a CA leaf", p, SvidError::LeafIsCa));
    let mut p = good_params(&[SLEEP]);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    cases.push(("a keyCertSign leaf", p, SvidError::KeyCertSign));
    let mut p = good_params(&[SLEEP]);
    p.key_usages.push(KeyUsagePurpose::CrlSign);
    cases.push(("a cRLSign leaf", p, SvidError::CrlSign));
    let mut p = good_params(&[SLEEP]);
    p.key_usages.clear();
    cases.push(("no key usage", p, SvidError::NoKeyUsage));
    let mut p = good_params(&[SLEEP]);
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    cases.push(("no digitalSignature", p, SvidError::NoDigitalSignature));
    for (what, p, want) in cases {
        let got = verify_params(&bed, &p);
        assert_eq!(got, Err(want.clone()), "{what}");
        // The same reason reaches a TLS handshake through rustls.
        let leaf = bed.ca.sign_custom(&p, &KeyPair::generate().unwrap()).unwrap();
        let e = SvidClientVerifier(bed.verifier.clone()).verify_client_cert(&leaf, &[], UnixTime::now()).unwrap_err();
        assert_eq!(svid_error(&e), Some(&want), "{what} through rustls");
    }
}

#[test]
fn expired_and_not_yet_valid_say_by_how_much() {
    let bed = bed();
    let leaf = bed.ca.issue(&id(SLEEP)).unwrap().leaf().clone();
    // The seed's story: this node's clock 45 minutes behind the issuer's.
    bed.clock.rewind(Duration::from_secs(45 * 60));
    let e = bed.verifier.verify(&leaf, &[], Usage::Client).unwrap_err();
    assert_eq!(e.reason(), "not-yet-valid");
    assert_eq!(e.validity_offset_secs(), Some(45 * 60));
    assert!(e.to_string().contains("not valid for another 45m0s"), "{e}");
    // Two minutes and five seconds past the end.
    bed.clock.set(std::time::UNIX_EPOCH + Duration::from_secs(T0 + TTL + 125));
    let e = bed.verifier.verify(&leaf, &[], Usage::Client).unwrap_err();
    assert_eq!(e.reason(), "expired");
    assert_eq!(e.validity_offset_secs(), Some(-125));
    assert!(e.to_string().contains("expired 2m5s ago"), "{e}");
    assert!(matches!(e, SvidError::Expired { cert: CertRole::Leaf, .. }));
    // At the last valid second it is accepted; at not-after it is not.
    bed.clock.set(std::time::UNIX_EPOCH + Duration::from_secs(T0 + TTL - 1));
    assert!(bed.verifier.verify(&leaf, &[], Usage::Client).is_ok());
    bed.clock.advance(Duration::from_secs(1));
    assert_eq!(bed.verifier.verify(&leaf, &[], Usage::Client).unwrap_err().validity_offset_secs(), Some(0));
}

#[test]
fn time_comes_from_the_clock_not_from_rustls() {
    // The clock says 2027; rustls passes the host's now. An SVID valid only in 2027 passes.
    let bed = bed();
    let leaf = bed.ca.issue(&id(SLEEP)).unwrap().leaf().clone();
    assert!(unix_secs(std::time::SystemTime::now()) < T0 as i64, "this test assumes the host clock is before {T0}");
    SvidClientVerifier(bed.verifier.clone()).verify_client_cert(&leaf, &[], UnixTime::now()).unwrap();
}

#[test]
fn trust_domains_stay_apart() {
    let bed = bed();
    let evil = new_ca(&bed.clock, "evil.test");
    // An SVID of a domain with no bundle here.
    let evil_svid = evil.issue(&id("spiffe://evil.test/ns/default/sa/sleep")).unwrap();
    assert_eq!(bed.verifier.verify(evil_svid.leaf(), &[], Usage::Client), Err(SvidError::NoBundle(td("evil.test"))));
    // With evil.test's bundle held (federation), its SVIDs are authentic but not accepted by
    // a verifier for zt.test peers.
    bed.bundles.replace(bundles_of(&[&bed.ca, &evil]));
    assert_eq!(bed.verifier.verify(evil_svid.leaf(), &[], Usage::Client), Err(SvidError::TrustDomainNotAllowed(td("evil.test"))));
    // evil.test's CA cannot vouch for a zt.test ID: only zt.test's bundle judges it.
    let forged = evil.sign_custom(&good_params(&[SLEEP]), &KeyPair::generate().unwrap()).unwrap();
    assert_eq!(bed.verifier.verify(&forged, &[], Usage::Client), Err(SvidError::UnknownIssuer(td("zt.test"))));
    // Expecting one peer: another authentic ID is refused.
    let v = SvidVerifier::new(bed.bundles.clone(), bed.clock.clone(), PeerPolicy::Exactly(id("spiffe://zt.test/zt/node/n2")));
    let n1 = bed.ca.issue(&id("spiffe://zt.test/zt/node/n1")).unwrap();
    assert_eq!(
        v.verify(n1.leaf(), &[], Usage::Server),
        Err(SvidError::UnexpectedPeer { expected: id("spiffe://zt.test/zt/node/n2"), presented: id("spiffe://zt.test/zt/node/n1") })
    );
}

#[test]
fn a_signature_by_another_key_is_rejected() {
    let bed = bed();
    // A second CA with the very same name: its leaves name zt.test's root as their issuer, but
    // the signature is by another key.
    let twin = new_ca(&bed.clock, "zt.test");
    let forged = twin.issue(&id(SLEEP)).unwrap();
    let e = bed.verifier.verify(forged.leaf(), &[], Usage::Client).unwrap_err();
    assert_eq!(e, SvidError::BadSignature);
    // A key that is not the leaf's cannot make an SVID.
    let leaf = bed.ca.issue(&id(SLEEP)).unwrap().leaf().clone();
    let other_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(KeyPair::generate().unwrap().serialize_der()));
    assert_eq!(X509Svid::from_parts(vec![leaf], other_key).unwrap_err(), SvidError::KeyMismatch);
}

#[test]
fn root_rotation_accepts_both_roots_during_the_overlap() {
    let bed = bed();
    let sv_a = bed.ca.issue(&id(SLEEP)).unwrap();
    bed.ca.publish_next_root().unwrap();
    bed.ca.activate_newest_root();
    let sv_b = bed.ca.issue(&id(SLEEP)).unwrap();
    // A verifier that has not seen B yet refuses B's SVIDs: why B is published before it signs.
    assert_eq!(bed.verifier.verify(sv_b.leaf(), &[], Usage::Client), Err(SvidError::UnknownIssuer(td("zt.test"))));
    // A+B: both accepted.
    bed.bundles.replace(bundles_of(&[&bed.ca]));
    assert_eq!(bed.ca.roots().len(), 2);
    assert_eq!(bed.verifier.verify(sv_a.leaf(), &[], Usage::Client), Ok(id(SLEEP)));
    assert_eq!(bed.verifier.verify(sv_b.leaf(), &[], Usage::Client), Ok(id(SLEEP)));
    // B: A's SVIDs are no longer trusted.
    bed.ca.retire_inactive_roots();
    bed.bundles.replace(bundles_of(&[&bed.ca]));
    assert_eq!(bed.verifier.verify(sv_a.leaf(), &[], Usage::Client), Err(SvidError::UnknownIssuer(td("zt.test"))));
    assert_eq!(bed.verifier.verify(sv_b.leaf(), &[], Usage::Client), Ok(id(SLEEP)));
}
