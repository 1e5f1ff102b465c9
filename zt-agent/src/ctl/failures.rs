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
