//! SPIRE's Delegated Identity messages in zt's terms. Field meanings are those of
//! spire-api-sdk's `delegatedidentity.proto` and `types/x509svid.proto`:
//! `X509SVIDWithKey { x509_svid { cert_chain (DER, leaf first), id, expires_at }, x509_svid_key
//! (PKCS#8 DER) }`; `SubscribeToX509BundlesResponse.ca_certificates` maps a trust domain to
//! its X.509 authorities, DER certificates concatenated. Released SPIRE agents key that map by
//! the trust domain's SPIFFE ID (`spiffe://example.org`); the proto comment says a name
//! (`example.org`): both are read.

use std::collections::BTreeMap;

use anyhow::bail;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{SubscribeToX509BundlesResponse, X509svidWithKey};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::super::source::{TrustBundles, X509Svid};
use super::super::spiffe_id::{SpiffeId, TrustDomain};
use super::super::x509::SvidError;

/// The SPIFFE ID SPIRE says an SVID carries (`types.SPIFFEID`), if it says one.
pub fn proto_id(s: &X509svidWithKey) -> Option<Result<SpiffeId, String>> {
    let id = s.x509_svid.as_ref()?.id.as_ref()?;
    Some(TrustDomain::parse(&id.trust_domain).and_then(|td| SpiffeId::new(&td, &id.path)))
}

/// One SVID with its key, through `X509Svid::from_parts` (leaf rules, key belongs to leaf).
pub fn svid(s: &X509svidWithKey) -> Result<X509Svid, SvidError> {
    let chain: Vec<CertificateDer<'static>> =
        s.x509_svid.as_ref().map(|x| x.cert_chain.iter().map(|c| CertificateDer::from(c.to_vec())).collect()).unwrap_or_default();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(s.x509_svid_key.to_vec()));
    X509Svid::from_parts(chain, key)
}

/// Splits concatenated DER certificates.
pub fn split_der(mut b: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let (rest, _) = X509Certificate::from_der(b).map_err(|e| format!("certificate {} does not parse: {e}", out.len() + 1))?;
        let used = b.len() - rest.len();
        out.push(CertificateDer::from(b[..used].to_vec()));
        b = rest;
    }
    Ok(out)
}

/// `spiffe://example.org` or `example.org`.
fn bundle_key(k: &str) -> Result<TrustDomain, String> {
    match k.strip_prefix("spiffe://") {
        Some(rest) if rest.contains('/') => Err(format!("bundle key {k:?} is a SPIFFE ID with a path, not a trust domain")),
        Some(rest) => TrustDomain::parse(rest),
        None => TrustDomain::parse(k),
    }
}

/// The bundles of a message. A domain whose key or certificates are bad is left out and
/// named in the second value; the others are kept (one bad domain does not hold back the
/// rest, and the cache refuses an update that drops a domain it holds an SVID of).
pub fn bundles(m: &SubscribeToX509BundlesResponse) -> (TrustBundles, Vec<String>) {
    let mut b = TrustBundles::default();
    let mut errors = Vec::new();
    let sorted: BTreeMap<_, _> = m.ca_certificates.iter().collect();
    for (k, der) in sorted {
        let r = bundle_key(k).and_then(|td| {
            let roots = split_der(der).map_err(|e| format!("bundle of {td}: {e}"))?;
            b.set(td, roots)
        });
        if let Err(e) = r {
            errors.push(e);
        }
    }
    (b, errors)
}

/// The one SVID of `msg` for `want`. SPIRE answers a selector set with every entry that
/// matches it: pick by the ID SPIRE names (or the leaf's, when it names none). A message
/// with exactly one SVID for another ID is judged anyway, so that a wrong trust domain or a
/// broken leaf is refused with its own reason rather than as "missing".
pub fn select(msgs: &[X509svidWithKey], want: &SpiffeId) -> anyhow::Result<X509Svid> {
    let refuse = |e: SvidError| anyhow::Error::new(e.clone()).context(format!("SPIRE's SVID for {want} is refused ({})", e.reason()));
    if msgs.is_empty() {
        bail!("SPIRE returned no SVID for {want}: no registration entry matches the selectors");
    }
    let named: Vec<Option<Result<SpiffeId, String>>> = msgs.iter().map(proto_id).collect();
    let pick = match named.iter().position(|n| matches!(n, Some(Ok(id)) if id == want)) {
        Some(i) => i,
        None if msgs.len() == 1 => 0,
        None => {
            let ids: Vec<String> = named
                .iter()
                .map(|n| match n {
                    Some(Ok(id)) => id.to_string(),
                    Some(Err(e)) => e.clone(),
                    None => "(unnamed)".into(),
                })
                .collect();
            bail!("SPIRE returned SVIDs for {} but none for {want}", ids.join(", "));
        }
    };
    let s = svid(&msgs[pick]).map_err(refuse)?;
    if let Some(Ok(named)) = &named[pick] {
        if named != s.spiffe_id() {
            bail!("SPIRE names its SVID {named} but the certificate says {}", s.spiffe_id());
        }
    }
    if s.spiffe_id().trust_domain() != want.trust_domain() {
        return Err(refuse(SvidError::TrustDomainNotAllowed(s.spiffe_id().trust_domain().clone())));
    }
    if s.spiffe_id() != want {
        bail!("SPIRE returned an SVID for {} when asked for {want}", s.spiffe_id());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(cn: &str) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn bundle_keys_in_both_spellings_and_bad_domains_left_out_by_name() {
        let (a, b, c) = (root("a"), root("b"), root("c"));
        let m = SubscribeToX509BundlesResponse {
            ca_certificates: [
                ("spiffe://zt.test".to_string(), [a.clone(), b.clone()].concat().into()),
                ("other.test".to_string(), c.clone().into()),
                ("spiffe://bad.test/path".to_string(), c.clone().into()),
                ("broken.test".to_string(), vec![0x30, 0x03, 1, 2].into()),
            ]
            .into_iter()
            .collect(),
        };
        let (bundles, errors) = bundles(&m);
        let td = |s| TrustDomain::parse(s).unwrap();
        assert_eq!(bundles.get(&td("zt.test")).unwrap(), &[CertificateDer::from(a), CertificateDer::from(b)]);
        assert_eq!(bundles.get(&td("other.test")).unwrap(), &[CertificateDer::from(c)]);
        assert_eq!(bundles.domains().count(), 2);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("\"spiffe://bad.test/path\" is a SPIFFE ID with a path")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("bundle of broken.test: certificate 1 does not parse")), "{errors:?}");
    }

    #[test]
    fn an_empty_answer_and_several_svids_without_ours_are_named() {
        let want = SpiffeId::parse("spiffe://zt.test/ns/a/sa/b").unwrap();
        let e = select(&[], &want).unwrap_err().to_string();
        assert!(e.contains("no registration entry matches"), "{e}");
        let named = |p: &str| X509svidWithKey {
            x509_svid: Some(spire_api::pb::spire::api::types::X509svid {
                id: Some(spire_api::pb::spire::api::types::Spiffeid { trust_domain: "zt.test".into(), path: p.into() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let e = select(&[named("/x"), named("/y")], &want).unwrap_err().to_string();
        assert!(e.contains("SPIRE returned SVIDs for spiffe://zt.test/x, spiffe://zt.test/y but none for spiffe://zt.test/ns/a/sa/b"), "{e}");
    }
}
