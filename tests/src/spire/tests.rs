//! The stand-in read by another implementation of the client side: spire-api's own
//! `DelegatedIdentityClient` (which parses SVIDs and bundles with the `spiffe` crate), so
//! that the stand-in is checked against the protocol, not against zt-agent's reading of it.

use spire_api::selectors::Selector;
use spire_api::{DelegateAttestationRequest, DelegatedIdentityClient};

use super::{BadSvid, SpireStandIn};

fn socket(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("zt-spire-standin-{name}-{}.sock", std::process::id()))
}

fn k8s(v: &str) -> Selector {
    let (k, rest) = v.split_once(':').unwrap();
    Selector::Generic((k.into(), rest.into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_apis_own_client_reads_the_stand_in() {
    let sock = socket("client");
    let spire = SpireStandIn::start(&sock, "zt.test").await.unwrap();
    spire.register("spiffe://zt.test/ns/shop/sa/api", &["k8s:pod-uid:u-1", "k8s:ns:shop"]);
    let client = DelegatedIdentityClient::connect_to(format!("unix://{}", sock.display())).await.unwrap();

    let req = DelegateAttestationRequest::for_selectors(vec![k8s("k8s:pod-uid:u-1"), k8s("k8s:ns:shop"), k8s("k8s:sa:api")]).unwrap();
    let svid = client.fetch_x509_svid(req).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://zt.test/ns/shop/sa/api");
    assert_eq!(svid.leaf().as_bytes(), spire.current("spiffe://zt.test/ns/shop/sa/api").unwrap().chain[0].as_slice());
    assert!(spire.subscriptions().contains(&vec!["k8s:ns:shop".to_string(), "k8s:pod-uid:u-1".into(), "k8s:sa:api".into()]));

    let bundles = client.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("zt.test").unwrap();
    let roots: Vec<Vec<u8>> = bundles.get(&td).unwrap().authorities().iter().map(|c| c.as_bytes().to_vec()).collect();
    assert_eq!(roots, spire.roots());

    // A subset of the entry's selectors does not match (SPIRE's rule): the answer is empty,
    // which spire-api reports as an error.
    let req = DelegateAttestationRequest::for_selectors(vec![k8s("k8s:pod-uid:u-1")]).unwrap();
    assert!(client.fetch_x509_svid(req).await.is_err());

    // spiffe's own leaf checks refuse a CA leaf from the bad set too.
    spire.set_bad("spiffe://zt.test/ns/shop/sa/api", Some(BadSvid::CaLeaf)).unwrap();
    let req = DelegateAttestationRequest::for_selectors(vec![k8s("k8s:pod-uid:u-1"), k8s("k8s:ns:shop")]).unwrap();
    let e = client.fetch_x509_svid(req).await.unwrap_err().to_string();
    assert!(e.contains("must not have CA flag set"), "{e}");

    // Stopped: nothing answers and the socket is gone; restarted: the same CA answers.
    spire.stop().await;
    assert!(!sock.exists());
    spire.restart().await.unwrap();
    let client = DelegatedIdentityClient::connect_to(format!("unix://{}", sock.display())).await.unwrap();
    let again = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(again.get(&td).unwrap().authorities().len(), 1);
    drop(spire);
    assert!(!sock.exists());
}
