//! Pods -> workload identities and the endpoint map (every pod IP of the cluster,
//! the addresses of the other nodes, plus this node's own addresses).
//!
//! NetworkPolicy ipBlocks match pod IPs too (Kubernetes semantics, checked by
//! upstream's e2e suite), but the datapath resolves a pod IP to its workload identity,
//! never to a CIDR identity. So a pod IP inside any NetworkPolicy ipBlock prefix gets
//! an identity that also carries which of those prefixes hold it (pseudo-labels
//! `ip-block:<prefix>`, not valid Kubernetes label keys): an ipBlock peer then selects
//! exactly the identities whose addresses are inside its cidr and outside its excepts,
//! per address (a pod's IPv4 and IPv6 addresses may differ).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use zt_common::{EP_LOCAL, IDENTITY_HOST, IDENTITY_INIT, IDENTITY_REMOTE_NODE};

use super::cidr;
use super::{CompileConfig, CompileError};
use crate::identity::{self, IdentityAllocator, NAMESPACE_LABEL_PREFIX};
use crate::model::{k8s, ClusterState, Node, ObjectKey, Pod};
use crate::state::{Cidr, EndpointEntry, Failure, PodRef};

/// Prefix of the pseudo-labels that record ipBlock membership in an identity.
pub(crate) const IP_BLOCK_LABEL_PREFIX: &str = "ip-block:";

/// One workload identity and the pods that carry it (owned: the incremental compile
/// keeps it from one compile to the next).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Workload {
    pub namespace: String,
    pub service_account: String,
    /// Identity labels split back into their two halves, for selectors.
    pub pod_labels: BTreeMap<String, String>,
    pub namespace_labels: BTreeMap<String, String>,
    /// The pods, in key order (look them up in the cluster: `Ctx::pods_of`).
    pub pods: Vec<ObjectKey>,
    /// At least one pod is on this node.
    pub local: bool,
    /// The NetworkPolicy ipBlock prefixes (cidrs and excepts) that hold this
    /// identity's addresses.
    pub ip_blocks: BTreeSet<Cidr>,
}

/// The pod's addresses, or none if it takes no part in policy: host-network pods
/// (their traffic is the node's), finished pods (their IP may already be reused) and
/// pods not yet given an IP.
pub(crate) fn pod_ips(pod: &Pod) -> Result<Vec<IpAddr>, String> {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Ok(Vec::new());
    }
    let Some(status) = &pod.status else {
        return Ok(Vec::new());
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return Ok(Vec::new());
    }
    let listed: Vec<&str> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .collect();
    let raw = if listed.is_empty() {
        status.pod_ip.iter().map(String::as_str).collect()
    } else {
        listed
    };
    raw.into_iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            // Canonical form: an IPv4-mapped address is the IPv4 address.
            s.parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| format!("invalid IP address {s:?}"))
        })
        .collect()
}

/// InternalIP / ExternalIP addresses of a (validated) node, canonical form.
pub(crate) fn node_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or(&[])
        .iter()
        .filter(|a| k8s::is_ip_address_type(&a.type_))
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

/// Workloads by identity, the endpoint map, and what each pod contributed (its
/// addresses with their identities, and whether it is local), for the incremental compile.
pub(crate) struct Built {
    pub workloads: BTreeMap<u32, Workload>,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub claims: BTreeMap<ObjectKey, PodClaim>,
}

/// One pod's part of the endpoint map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodClaim {
    pub ips: Vec<(IpAddr, u32)>,
    pub local: bool,
}

/// `ip_blocks`: every prefix named in a NetworkPolicy ipBlock. A pod whose addresses do
/// not parse is left out (a failure naming it); only running out of identity numbers
/// fails the whole build.
pub(crate) fn build(
    cluster: &ClusterState,
    cfg: &CompileConfig,
    ids: &mut IdentityAllocator,
    ip_blocks: &BTreeSet<Cidr>,
    failures: &mut Vec<Failure>,
) -> Result<Built, CompileError> {
    let mut workloads: BTreeMap<u32, Workload> = BTreeMap::new();
    let mut claims: BTreeMap<ObjectKey, PodClaim> = BTreeMap::new();
    let mut endpoints: BTreeMap<IpAddr, EndpointEntry> = BTreeMap::new();
    let mut conflicts: BTreeMap<IpAddr, Vec<PodRef>> = BTreeMap::new();

    for ((ns, name), pod) in &cluster.pods {
        let Some(ident) = pod_identity(cluster, cfg, ids, ip_blocks, failures, ns, name, pod)? else { continue };
        let key = (ns.clone(), name.clone());
        let pod_ref = PodRef { namespace: ns.clone(), name: name.clone() };
        for (ip, id, w) in ident.ips {
            let w = workloads.entry(id).or_insert(w);
            if w.pods.last() != Some(&key) {
                w.pods.push(key.clone());
            }
            w.local |= ident.local;
            let entry = EndpointEntry { identity: id, flags: if ident.local { EP_LOCAL } else { 0 }, pod: Some(pod_ref.clone()) };
            if let Some(prev) = endpoints.insert(ip, entry) {
                let c = conflicts.entry(ip).or_default();
                c.extend(prev.pod);
            }
        }
        claims.insert(key, PodClaim { ips: ident.claims, local: ident.local });
    }

    // Two live pods claiming one IP (a stale status during churn): we cannot tell
    // which one the packets are from, so the IP gets the fail-closed INIT identity.
    for (ip, others) in conflicts {
        let e = endpoints
            .get_mut(&ip)
            .expect("conflicting IP is in the map");
        log::warn!(
            "IP {ip} claimed by several pods ({:?} and {:?}): treated as unknown",
            others,
            e.pod
        );
        e.identity = IDENTITY_INIT;
    }

    // Other nodes' addresses are remote-node; this node's (from its Node object and
    // its interfaces) are the host. Node addresses win over a pod claiming them.
    let mut host_ips: Vec<IpAddr> = cfg.host_ips.clone();
    for (name, node) in &cluster.nodes {
        let ips = node_ips(node);
        if *name == cfg.node_name {
            host_ips.extend(ips);
            continue;
        }
        for ip in ips {
            let prev = endpoints.insert(
                ip,
                EndpointEntry {
                    identity: IDENTITY_REMOTE_NODE,
                    flags: 0,
                    pod: None,
                },
            );
            if let Some(prev) = prev.filter(|p| p.pod.is_some()) {
                log::warn!("IP {ip} of node {name} is also the IP of pod {:?}: treated as the node", prev.pod);
            }
        }
    }
    for ip in &host_ips {
        let ip = ip.to_canonical();
        let prev = endpoints.insert(
            ip,
            EndpointEntry {
                identity: IDENTITY_HOST,
                flags: 0,
                pod: None,
            },
        );
        if let Some(prev) = prev.filter(|p| p.pod.is_some()) {
            log::warn!(
                "host IP {ip} is also the IP of pod {:?}: treated as the host",
                prev.pod
            );
        }
    }
    Ok(Built { workloads, endpoints, claims })
}

/// One pod's identities: per address, the identity and the workload it would start.
pub(crate) struct PodIdentity {
    pub ips: Vec<(IpAddr, u32, Workload)>,
    pub claims: Vec<(IpAddr, u32)>,
    /// What `IdentityAllocator::infos` says of each address's identity.
    pub infos: Vec<crate::state::IdentityInfo>,
    pub local: bool,
}

/// The identity of each of the pod's addresses (allocated in `ids` if new); None when
/// the pod takes no part in policy or its addresses do not parse (a failure naming it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pod_identity(
    cluster: &ClusterState,
    cfg: &CompileConfig,
    ids: &mut IdentityAllocator,
    ip_blocks: &BTreeSet<Cidr>,
    failures: &mut Vec<Failure>,
    ns: &str,
    name: &str,
    pod: &Pod,
) -> Result<Option<PodIdentity>, CompileError> {
    let ips = match pod_ips(pod) {
        Ok(ips) => ips,
        Err(m) => {
            let e = CompileError::at(&format!("Pod {ns}/{name}"), "status.podIPs", m);
            failures.push(Failure { object: format!("Pod {ns}/{name}"), error: e.to_string(), identities: BTreeSet::new() });
            return Ok(None);
        }
    };
    if ips.is_empty() {
        return Ok(None);
    }
    let spec = pod.spec.as_ref();
    let sa = spec
        .and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()))
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    // Only the labels that identify the workload: a rollout keeps its identity.
    let pod_labels = cfg.identity_labels.apply(&pod.metadata.labels.clone().unwrap_or_default());
    let namespace_labels = cluster.namespace_labels(ns);
    let labels = identity::identity_labels(&pod_labels, &namespace_labels);
    let local = spec.and_then(|s| s.node_name.as_deref()) == Some(cfg.node_name.as_str());
    let spiffe = identity::spiffe_id(&cfg.trust_domain, ns, sa);
    let mut out = PodIdentity { ips: Vec::new(), claims: Vec::new(), infos: Vec::new(), local };
    for ip in ips {
        let host = Cidr { addr: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } };
        let inside: BTreeSet<Cidr> = ip_blocks.iter().filter(|b| cidr::contains(b, &host)).copied().collect();
        let mut id_labels = labels.clone();
        for b in &inside {
            id_labels.insert(format!("{IP_BLOCK_LABEL_PREFIX}{}", cidr::to_string(b)), String::new());
        }
        let id = ids.workload(&spiffe, &id_labels)?;
        let w = Workload {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
            pod_labels: labels.iter().filter(|(k, _)| !k.starts_with(NAMESPACE_LABEL_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect(),
            namespace_labels: namespace_labels.clone(),
            pods: Vec::new(),
            local: false,
            ip_blocks: inside,
        };
        out.ips.push((ip, id, w));
        out.claims.push((ip, id));
        out.infos.push(crate::state::IdentityInfo { id, spiffe_id: spiffe.clone(), labels: id_labels });
    }
    Ok(Some(out))
}
