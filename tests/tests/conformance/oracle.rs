//! The expected reachability, from the Kubernetes API documentation of NetworkPolicy
//! (networking.k8s.io/v1), written independently of zt-agent's compiler:
//! - a pod is isolated for a direction when any policy of its namespace selects it
//!   (podSelector; empty = every pod) and lists the direction in policyTypes (default:
//!   Ingress, plus Egress when spec.egress is non-empty);
//! - an isolated direction allows the union of the rules of every such policy;
//! - a rule allows a peer when `from`/`to` is empty or any peer matches, and the
//!   port when `ports` is empty or any port matches;
//! - peer: podSelector alone = pods of the policy's namespace; namespaceSelector alone =
//!   every pod of the matching namespaces; both = AND; ipBlock = the peer's IP inside
//!   cidr and outside every except (pod IPs included, as upstream's e2e tests expect);
//! - port: protocol default TCP; no port = every port of the protocol; a number up to
//!   endPort; a name resolves on the destination pod's container ports (the policy's
//!   pod for ingress, the peer for egress) with the same protocol;
//! - a connection needs the source's egress and the destination's ingress; a pod
//!   reaching itself is always allowed (upstream's loopback).

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{Cluster, ModelPod};

/// Does `sel` select `labels`? (An empty selector selects everything.)
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return false;
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let have = labels.get(&e.key);
        let vals = e.values.clone().unwrap_or_default();
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|h| vals.contains(h)),
            "NotIn" => !have.is_some_and(|h| vals.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            op => panic!("unknown selector operator {op}"),
        };
        if !ok {
            return false;
        }
    }
    true
}

fn in_cidr(ip: IpAddr, cidr: &str) -> bool {
    let (addr, len) = cidr.split_once('/').unwrap_or_else(|| panic!("bad cidr {cidr}"));
    let addr: IpAddr = addr.parse().unwrap();
    let len: u32 = len.parse().unwrap();
    match (ip, addr) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// The direction of a connection as a policy sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dir {
    Ingress,
    Egress,
}

fn policy_types(np: &NetworkPolicy) -> Vec<String> {
    let spec = np.spec.clone().unwrap_or_default();
    match spec.policy_types {
        Some(t) if !t.is_empty() => t,
        _ => {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            t
        }
    }
}

fn peer_matches(c: &Cluster, policy_ns: &str, p: &NetworkPolicyPeer, peer: &ModelPod, peer_ip: IpAddr) -> bool {
    if let Some(b) = &p.ip_block {
        return in_cidr(peer_ip, &b.cidr) && !b.except.iter().flatten().any(|e| in_cidr(peer_ip, e));
    }
    let ns_ok = match &p.namespace_selector {
        None => peer.namespace == policy_ns,
        Some(s) => selects(s, &c.namespace_labels(&peer.namespace)),
    };
    let pod_ok = p.pod_selector.as_ref().is_none_or(|s| selects(s, &peer.labels));
    ns_ok && pod_ok
}

fn port_matches(p: &NetworkPolicyPort, proto: &str, port: i32, dst: &ModelPod) -> bool {
    let want = p.protocol.as_deref().unwrap_or("TCP");
    if want != proto {
        return false;
    }
    match &p.port {
        None => true,
        Some(IntOrString::Int(n)) => port >= *n && port <= p.end_port.unwrap_or(*n),
        Some(IntOrString::String(name)) => dst.ports.iter().any(|(n, pr, num)| n == name && pr == proto && *num == port),
    }
}

/// A connection as one side sees it: the other pod and its address, the pod that
/// serves the port (named ports resolve there), protocol and port.
pub struct Conn<'a> {
    pub peer: &'a ModelPod,
    pub peer_ip: IpAddr,
    pub dst: &'a ModelPod,
    pub proto: &'a str,
    pub port: i32,
}

/// A rule in either direction: peers and ports (None = absent).
type AnyRule = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

/// Does `pod`'s side allow `conn` in `dir`?
pub fn side_allows(c: &Cluster, pod: &ModelPod, dir: Dir, conn: &Conn<'_>) -> bool {
    let tname = match dir {
        Dir::Ingress => "Ingress",
        Dir::Egress => "Egress",
    };
    let mut isolated = false;
    for ((ns, _), np) in &c.policies {
        if *ns != pod.namespace || !policy_types(np).iter().any(|t| t == tname) {
            continue;
        }
        let spec = np.spec.clone().unwrap_or_default();
        if !selects(&spec.pod_selector.clone().unwrap_or_default(), &pod.labels) {
            continue;
        }
        isolated = true;
        let rules: Vec<AnyRule> = match dir {
            Dir::Ingress => spec.ingress.iter().flatten().map(|r| (r.from.clone(), r.ports.clone())).collect(),
            Dir::Egress => spec.egress.iter().flatten().map(|r| (r.to.clone(), r.ports.clone())).collect(),
        };
        for (peers, ports) in rules {
            let peer_ok = match &peers {
                None => true,
                Some(v) if v.is_empty() => true,
                Some(v) => v.iter().any(|p| peer_matches(c, ns, p, conn.peer, conn.peer_ip)),
            };
            let port_ok = match &ports {
                None => true,
                Some(v) if v.is_empty() => true,
                Some(v) => v.iter().any(|p| port_matches(p, conn.proto, conn.port, conn.dst)),
            };
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

/// Is `from` -> `to` on `proto`/`port` over the family `v4` allowed?
pub fn allowed(c: &Cluster, from: &ModelPod, to: &ModelPod, proto: &str, port: i32, v4: bool) -> bool {
    if from.key() == to.key() {
        return true;
    }
    let (Some(src_ip), Some(dst_ip)) = (from.ip(v4), to.ip(v4)) else {
        return false;
    };
    let egress = Conn { peer: to, peer_ip: dst_ip, dst: to, proto, port };
    let ingress = Conn { peer: from, peer_ip: src_ip, dst: to, proto, port };
    side_allows(c, from, Dir::Egress, &egress) && side_allows(c, to, Dir::Ingress, &ingress)
}
