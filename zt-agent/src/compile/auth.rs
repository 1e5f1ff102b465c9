//! Authentication in the compiled policy: `authentication: required` rules carry
//! `POLICY_FLAG_AUTH_REQUIRED` through policy.rs; STRICT (a ZeroTrustPolicy whose spec
//! says `authentication: required`; with no subjects, the whole namespace) is applied
//! here, to every policy's ingress allows of the subjects.
//!
//! Not flagged under STRICT: allows from `host` (the node's own sockets, kubelet probes:
//! the same trust as the agent that proves this node's pods).

use std::collections::{BTreeMap, BTreeSet};

use zt_common::{DIR_INGRESS, IDENTITY_HOST, POLICY_FLAG_AUTH_REQUIRED, VERDICT_ALLOW};

use std::net::IpAddr;

use super::{Peers, Rule, Rules};
use crate::model::ClusterState;
use crate::state::{Action, EndpointEntry, PolicyEntryKey};
use zt_common::{auth_node_id, PolicyValue, AUTH_NODE_UNKNOWN, EP_LOCAL};

/// STRICT subjects that no policy isolates for ingress: isolated, with every new flow
/// from a proven peer allowed (STRICT adds authentication, it takes nothing away).
/// Called once isolation is final (after quarantine and `--enforcement-mode always`).
pub(crate) fn strict_rules(out: &mut Rules) {
    let open: Vec<(u32, String)> = out
        .strict
        .iter()
        .filter(|(id, _)| out.isolated.get(id).copied().unwrap_or(0) & zt_common::EP_ENFORCE_INGRESS == 0)
        .map(|(id, src)| (*id, src.clone()))
        .collect();
    for (id, source) in open {
        out.isolate(&BTreeSet::from([id]), DIR_INGRESS);
        let rule = Rule { id: 0, dir: DIR_INGRESS, action: Action::Allow, subjects: BTreeSet::from([id]), peers: Peers::Any, ports: Vec::new(), auth: true, http: None };
        out.add(&source, "spec.authentication".into(), rule);
    }
}

/// Every ingress allow of a STRICT local identity requires authentication, whichever
/// policy wrote it (but `host`'s).
pub(crate) fn strict_flags(policy: &mut BTreeMap<PolicyEntryKey, PolicyValue>, strict: &BTreeMap<u32, String>) {
    for (k, v) in policy.iter_mut() {
        let key = &k.key;
        if v.verdict == VERDICT_ALLOW && key.dir == DIR_INGRESS && key.peer_id() != IDENTITY_HOST && strict.contains_key(&key.local_id()) {
            v.flags |= POLICY_FLAG_AUTH_REQUIRED;
        }
    }
}

/// The node number of every pod endpoint of another node. Two node names with one
/// number leave both unknown (never proven: fail closed), with a warning.
pub(crate) fn endpoint_nodes(cluster: &ClusterState, endpoints: &BTreeMap<IpAddr, EndpointEntry>) -> BTreeMap<IpAddr, u32> {
    let node_of = |e: &EndpointEntry| -> Option<&str> {
        let p = e.pod.as_ref()?;
        cluster.pods.get(&(p.namespace.clone(), p.name.clone()))?.spec.as_ref()?.node_name.as_deref()
    };
    let mut names: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for n in cluster.nodes.keys().map(String::as_str).chain(endpoints.values().filter_map(node_of)) {
        names.entry(auth_node_id(n.as_bytes())).or_default().insert(n);
    }
    for (id, ns) in names.iter().filter(|(_, ns)| ns.len() > 1) {
        log::warn!("nodes {ns:?} share the proof number {id:#x}: their pods' identities are never proven");
    }
    endpoints
        .iter()
        .filter(|(_, e)| e.flags & EP_LOCAL == 0)
        .filter_map(|(ip, e)| {
            let id = auth_node_id(node_of(e)?.as_bytes());
            Some((*ip, if names[&id].len() > 1 { AUTH_NODE_UNKNOWN } else { id }))
        })
        .collect()
}
