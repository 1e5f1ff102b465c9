//! `ztctl failures`: objects that failed closed (a policy that did not compile, one
//! identity's FQDN rules over the slot limit, what a full map could not hold) and the
//! local identities and pods each isolates. From the agent's state file and ZT_ENDPOINTS.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::events::Snapshot;

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct FailureRow {
    pub object: String,
    pub error: String,
    /// `id (spiffe id)` of each local identity failed closed.
    pub identities: Vec<String>,
    /// Pods of those identities (namespace/name).
    pub pods: Vec<String>,
}

/// `identity_of`: the identity the endpoint map gives an address.
pub fn rows(snap: &Snapshot, identity_of: impl Fn(std::net::IpAddr) -> u32) -> Vec<FailureRow> {
    snap.failures
        .iter()
        .map(|f| {
            let identities = f
                .identities
                .iter()
                .map(|id| match snap.identities.get(id) {
                    Some(i) => format!("{id} ({})", i.spiffe_id),
                    None => id.to_string(),
                })
                .collect();
            let pods: BTreeSet<String> =
                snap.pods.iter().filter(|(ip, _)| f.identities.contains(&identity_of(**ip))).map(|(_, p)| format!("{}/{}", p.namespace, p.name)).collect();
            FailureRow { object: f.object.clone(), error: f.error.clone(), identities, pods: pods.into_iter().collect() }
        })
        .collect()
}

pub fn table_header() -> String {
    format!("{:<44} {:<40} {:<40} ERROR", "OBJECT", "IDENTITIES", "PODS")
}

pub fn table_row(r: &FailureRow) -> String {
    let or_dash = |v: &[String]| if v.is_empty() { "-".to_string() } else { v.join(",") };
    format!("{:<44} {:<40} {:<40} {}", r.object, or_dash(&r.identities), or_dash(&r.pods), r.error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Failure, IdentityInfo, PodRef};

    #[test]
    fn rows_name_identities_and_their_pods() {
        let mut snap = Snapshot::default();
        snap.identities.insert(300, IdentityInfo { id: 300, spiffe_id: "spiffe://td/ns/a/sa/web".into(), labels: Default::default() });
        for (ip, name) in [("10.0.0.1", "web-1"), ("10.0.0.2", "web-2"), ("10.0.0.3", "db")] {
            snap.pods.insert(ip.parse().unwrap(), PodRef { namespace: "a".into(), name: name.into() });
        }
        snap.failures.push(Failure { object: "ZeroTrustPolicy a/web-out".into(), error: "boom".into(), identities: [300, 301].into() });
        let r = rows(&snap, |ip| if ip.to_string() == "10.0.0.3" { 302 } else { 300 });
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].identities, ["300 (spiffe://td/ns/a/sa/web)", "301"]);
        assert_eq!(r[0].pods, ["a/web-1", "a/web-2"]);
        assert!(table_row(&r[0]).starts_with("ZeroTrustPolicy a/web-out"));
    }
}
