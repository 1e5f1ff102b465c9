//! Permitted edges: what the compiled policy lets each identity open towards each other
//! identity, from the same entries the datapath and `ztctl explain` use (ZT_POLICY's
//! contents, looked up with its longest-prefix semantics: a deny for the peer or for any
//! peer beats an allow). Only this node's policy is known here: an edge needs a local
//! endpoint on at least one side, and the side that is not local is taken as allowing
//! (its own node judges it).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Serialize;
use zt_common::*;

use crate::state::{Desired, EndpointEntry, IdentityInfo, PolicyEntryKey, RuleInfo};

/// The compiled state the graph reads, taken at each successful compile.
#[derive(Clone, Debug, Default)]
pub struct PolicyView {
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Namespace -> (ingress, egress) default-deny: a policy selects every pod of it.
    pub namespaces: BTreeMap<String, (bool, bool)>,
}

impl PolicyView {
    pub fn from_desired(d: &Desired, namespaces: BTreeMap<String, (bool, bool)>) -> PolicyView {
        PolicyView { identities: d.identities.clone(), endpoints: d.endpoints.clone(), policy: d.policy.clone(), rules: d.rules.clone(), namespaces }
    }

    /// Identities drawn as nodes: workloads and CIDRs of the policy, `world` and `host`;
    /// not `init`, `any` nor Service identities (their backends are drawn instead).
    pub fn node_ids(&self) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.identities.keys().copied().filter(|id| is_node(*id)).collect();
        ids.insert(IDENTITY_WORLD);
        ids.insert(IDENTITY_HOST);
        ids
    }

    /// Local identities and whether each is isolated (ingress, egress): isolated only if
    /// every local endpoint carrying it is (one open pod opens the identity).
    pub fn local(&self) -> BTreeMap<u32, (bool, bool)> {
        let mut out: BTreeMap<u32, (bool, bool)> = BTreeMap::new();
        for e in self.endpoints.values().filter(|e| e.flags & EP_LOCAL != 0 && e.pod.is_some()) {
            let x = out.entry(e.identity).or_insert((true, true));
            x.0 &= e.flags & EP_ENFORCE_INGRESS != 0;
            x.1 &= e.flags & EP_ENFORCE_EGRESS != 0;
        }
        out
    }

    /// The kernel's lookup for one hook (see `PolicyIndex::lookup`).
    pub fn lookup(&self, local: u32, peer: u32, dir: u8, proto: u8, port: u16) -> Option<(u8, u32)> {
        PolicyIndex::new(self).lookup(local, peer, dir, proto, port)
    }
}

/// The policy entries grouped by (local, peer, direction), the part of the key every
/// lookup matches exactly.
pub struct PolicyIndex {
    by: std::collections::HashMap<(u32, u32, u8), Vec<(PolicyEntryKey, PolicyValue)>>,
}

impl PolicyIndex {
    pub fn new(view: &PolicyView) -> PolicyIndex {
        let mut by: std::collections::HashMap<(u32, u32, u8), Vec<(PolicyEntryKey, PolicyValue)>> = Default::default();
        for (k, v) in &view.policy {
            by.entry((k.key.local_id(), k.key.peer_id(), k.key.dir)).or_default().push((*k, *v));
        }
        PolicyIndex { by }
    }

    /// (verdict, rule) of the longest prefix matching (local, peer, dir, proto, port), for
    /// the peer and for any peer; a deny of either wins, else an allow of either: the
    /// datapath's and explain's order.
    pub fn lookup(&self, local: u32, peer: u32, dir: u8, proto: u8, port: u16) -> Option<(u8, u32)> {
        let lpm = |pid: u32| -> Option<PolicyValue> {
            let mut best: Option<(u32, PolicyValue)> = None;
            for (k, v) in self.by.get(&(local, pid, dir)).into_iter().flatten() {
                if covers(k, proto, port) && best.is_none_or(|(p, _)| k.prefix_len > p) {
                    best = Some((k.prefix_len, *v));
                }
            }
            best.map(|(_, v)| v)
        };
        let found: Vec<PolicyValue> = [peer, IDENTITY_ANY].into_iter().filter_map(lpm).collect();
        if let Some(v) = found.iter().find(|v| v.verdict == VERDICT_DENY) {
            return Some((VERDICT_DENY, v.rule_id));
        }
        found.iter().find(|v| v.verdict == VERDICT_ALLOW).map(|v| (VERDICT_ALLOW, v.rule_id))
    }
}

fn is_node(id: u32) -> bool {
    id != IDENTITY_ANY && id != IDENTITY_INIT && id & IDENTITY_SERVICE_FLAG == 0
}

/// Does the entry's prefix cover (proto, port)?
fn covers(k: &PolicyEntryKey, proto: u8, port: u16) -> bool {
    if k.prefix_len <= POLICY_PREFIX_ANY_PROTO {
        return true;
    }
    if k.key.proto != proto {
        return false;
    }
    if k.prefix_len <= POLICY_PREFIX_ANY_PORT {
        return true;
    }
    let host_bits = POLICY_PREFIX_FULL.saturating_sub(k.prefix_len);
    let mask: u16 = if host_bits >= 16 { 0 } else { !0u16 << host_bits };
    port & mask == k.key.port() & mask
}

/// A port set of one entry: protocol (None: any) and port range (None: any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub proto: Option<u8>,
    pub ports: Option<(u16, u16)>,
}

impl PortSpec {
    fn of(k: &PolicyEntryKey) -> PortSpec {
        if k.prefix_len <= POLICY_PREFIX_ANY_PROTO {
            return PortSpec { proto: None, ports: None };
        }
        if k.prefix_len <= POLICY_PREFIX_ANY_PORT {
            return PortSpec { proto: Some(k.key.proto), ports: None };
        }
        let host_bits = POLICY_PREFIX_FULL - k.prefix_len;
        let first = k.key.port();
        let last = (first as u32 + (1u32 << host_bits) - 1).min(65535) as u16;
        PortSpec { proto: Some(k.key.proto), ports: Some((first, last)) }
    }

    /// A port the lookup is made at (the first of the range; 0 for "any").
    fn probe(&self) -> (u8, u16) {
        (self.proto.unwrap_or(PROTO_ANY_PROBE), self.ports.map(|p| p.0).unwrap_or(0))
    }

    pub fn label(&self) -> String {
        match (self.proto, self.ports) {
            (None, _) => "any".into(),
            (Some(p), None) => format!("{}/any", crate::events::proto_name(p)),
            (Some(p), Some((a, b))) if a == b => format!("{}/{a}", crate::events::proto_name(p)),
            (Some(p), Some((a, b))) => format!("{}/{a}-{b}", crate::events::proto_name(p)),
        }
    }

    /// Does an observed (proto, port) fall in it?
    pub fn contains(&self, proto: u8, port: u16) -> bool {
        self.proto.is_none_or(|p| p == proto) && self.ports.is_none_or(|(a, b)| a <= port && port <= b)
    }
}

/// A protocol no rule names: "any protocol" is looked up with it, so only any-protocol
/// entries match.
const PROTO_ANY_PROBE: u8 = 255;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PermittedEdge {
    pub src: u32,
    pub dst: u32,
    #[serde(skip)]
    pub spec: PortSpec,
    pub ports: String,
    /// Rules behind it (ids), egress side then ingress side; none where a side is not
    /// isolated.
    pub rules: BTreeSet<u32>,
    /// Why each side lets it through: `policy`, `no-policy` (not isolated), `remote`
    /// (not judged on this node).
    pub egress: &'static str,
    pub ingress: &'static str,
}

/// Every permitted edge between drawn identities, at most `cap` (the count of the rest
/// is returned beside).
pub fn permitted_edges(view: &PolicyView, cap: usize) -> (Vec<PermittedEdge>, u64) {
    let nodes = view.node_ids();
    let local = view.local();
    let index = PolicyIndex::new(view);
    // Allow entries per (local identity, dir): (peer, spec).
    let mut allows: BTreeMap<(u32, u8), Vec<(u32, PortSpec)>> = BTreeMap::new();
    for (k, v) in &view.policy {
        if v.verdict == VERDICT_ALLOW {
            allows.entry((k.key.local_id(), k.key.dir)).or_default().push((k.key.peer_id(), PortSpec::of(k)));
        }
    }
    let mut out = vec![];
    let mut dropped = 0u64;
    // Peers an isolated side names (None: it allows any peer), so that a pair neither
    // side can allow is skipped without a lookup.
    let named = |id: u32, dir: u8| -> Option<BTreeSet<u32>> {
        let list = allows.get(&(id, dir))?;
        if list.iter().any(|(p, _)| *p == IDENTITY_ANY) {
            return None;
        }
        Some(list.iter().map(|(p, _)| *p).collect())
    };
    let empty = BTreeSet::new();
    for &src in &nodes {
        let sl = local.get(&src);
        let s_named = if sl.is_some_and(|x| x.1) {
            Some(named(src, DIR_EGRESS).unwrap_or_else(|| if allows.contains_key(&(src, DIR_EGRESS)) { nodes.clone() } else { empty.clone() }))
        } else {
            None
        };
        let dsts: Box<dyn Iterator<Item = &u32>> = match &s_named {
            Some(set) => Box::new(set.iter().filter(|d| nodes.contains(d))),
            None => Box::new(nodes.iter()),
        };
        for &dst in dsts {
            if src == dst {
                continue;
            }
            let dl = local.get(&dst);
            if sl.is_none() && dl.is_none() {
                continue;
            }
            if dl.is_some_and(|x| x.0) {
                if let Some(set) = named(dst, DIR_INGRESS) {
                    if !set.contains(&src) {
                        continue;
                    }
                } else if !allows.contains_key(&(dst, DIR_INGRESS)) {
                    continue;
                }
            }
            // Candidate port sets: what either isolated side allows this peer (or any).
            let mut specs: BTreeSet<PortSpec> = BTreeSet::new();
            let s_isolated = sl.is_some_and(|x| x.1);
            let d_isolated = dl.is_some_and(|x| x.0);
            if !s_isolated && !d_isolated {
                specs.insert(PortSpec { proto: None, ports: None });
            }
            if s_isolated {
                for (peer, spec) in allows.get(&(src, DIR_EGRESS)).into_iter().flatten() {
                    if *peer == dst || *peer == IDENTITY_ANY {
                        specs.insert(*spec);
                    }
                }
            }
            if d_isolated {
                for (peer, spec) in allows.get(&(dst, DIR_INGRESS)).into_iter().flatten() {
                    if *peer == src || *peer == IDENTITY_ANY {
                        specs.insert(*spec);
                    }
                }
            }
            for spec in specs {
                let (proto, port) = spec.probe();
                let side = |local_id: u32, peer: u32, dir: u8, is_local: bool, isolated: bool| -> Option<(&'static str, u32)> {
                    if !is_local {
                        return Some(("remote", 0));
                    }
                    if !isolated {
                        return Some(("no-policy", 0));
                    }
                    match index.lookup(local_id, peer, dir, proto, port) {
                        Some((VERDICT_ALLOW, r)) => Some(("policy", r)),
                        _ => None,
                    }
                };
                let Some((eg, r1)) = side(src, dst, DIR_EGRESS, sl.is_some(), s_isolated) else { continue };
                let Some((ing, r2)) = side(dst, src, DIR_INGRESS, dl.is_some(), d_isolated) else { continue };
                if out.len() >= cap {
                    dropped += 1;
                    continue;
                }
                let rules = [r1, r2].into_iter().filter(|r| *r != 0).collect();
                out.push(PermittedEdge { src, dst, spec, ports: spec.label(), rules, egress: eg, ingress: ing });
            }
        }
    }
    (out, dropped)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{Action, PodRef};

    pub fn ident(id: u32, ns: &str, sa: &str) -> IdentityInfo {
        IdentityInfo { id, spiffe_id: format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"), labels: Default::default() }
    }

    pub fn ep(view: &mut PolicyView, ip: &str, id: u32, ns: &str, pod: &str, isolated: (bool, bool)) {
        let mut flags = EP_LOCAL;
        if isolated.0 {
            flags |= EP_ENFORCE_INGRESS;
        }
        if isolated.1 {
            flags |= EP_ENFORCE_EGRESS;
        }
        view.endpoints.insert(ip.parse().unwrap(), EndpointEntry { identity: id, flags, pod: Some(PodRef { namespace: ns.into(), name: pod.into() }) });
    }

    pub fn allow(view: &mut PolicyView, local: u32, peer: u32, dir: u8, proto: u8, port: Option<u16>, rule: u32) {
        let prefix_len = if port.is_some() { POLICY_PREFIX_FULL } else { POLICY_PREFIX_ANY_PORT };
        view.policy.insert(
            PolicyEntryKey { prefix_len, key: PolicyKey::new(local, peer, dir, proto, port.unwrap_or(0)) },
            PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: rule },
        );
        view.rules.insert(
            rule,
            RuleInfo { id: rule, source: format!("ZeroTrustPolicy default/r{rule}"), path: "spec.egress[0]".into(), action: Action::Allow, fqdn: vec![], http: vec![] },
        );
    }

    /// The lab: sleep (256) may reach httpbin (257) on TCP 80; notsleep (258) nothing;
    /// all three isolated both ways.
    pub fn lab() -> PolicyView {
        let mut v = PolicyView::default();
        for (id, sa) in [(256, "sleep"), (257, "httpbin"), (258, "notsleep")] {
            v.identities.insert(id, ident(id, "default", sa));
        }
        v.identities.insert(IDENTITY_HOST, IdentityInfo { id: IDENTITY_HOST, spiffe_id: "reserved:host".into(), labels: Default::default() });
        ep(&mut v, "10.0.0.20", 256, "default", "sleep", (true, true));
        ep(&mut v, "10.0.0.10", 257, "default", "httpbin", (true, true));
        ep(&mut v, "10.0.0.30", 258, "default", "notsleep", (true, true));
        allow(&mut v, 256, 257, DIR_EGRESS, 6, Some(80), 1);
        allow(&mut v, 257, 256, DIR_INGRESS, 6, Some(80), 2);
        v.namespaces.insert("default".into(), (true, true));
        v
    }

    #[test]
    fn lab_permits_only_sleep_to_httpbin() {
        let v = lab();
        let (edges, dropped) = permitted_edges(&v, 100);
        assert_eq!(dropped, 0);
        let got: Vec<(u32, u32, String, BTreeSet<u32>)> = edges.iter().map(|e| (e.src, e.dst, e.ports.clone(), e.rules.clone())).collect();
        assert_eq!(got, vec![(256, 257, "TCP/80".to_string(), BTreeSet::from([1, 2]))]);
    }

    #[test]
    fn both_sides_must_allow_and_deny_beats_allow() {
        let mut v = lab();
        // httpbin's ingress no longer names sleep: nothing is permitted.
        v.policy.retain(|k, _| k.key.dir != DIR_INGRESS);
        assert!(permitted_edges(&v, 100).0.is_empty());
        // An allow from any peer on TCP (any port) restores it, at the narrower port.
        allow(&mut v, 257, IDENTITY_ANY, DIR_INGRESS, 6, None, 3);
        let (edges, _) = permitted_edges(&v, 100);
        let e: Vec<_> = edges.iter().filter(|e| e.src == 256).map(|e| e.ports.clone()).collect();
        assert!(e.contains(&"TCP/80".to_string()), "{edges:?}");
        // notsleep's egress is isolated with no allow: still nothing from it.
        assert!(!edges.iter().any(|e| e.src == 258), "{edges:?}");
        // A deny for sleep on TCP 80 at httpbin's ingress cuts it.
        v.policy.insert(
            PolicyEntryKey { prefix_len: POLICY_PREFIX_FULL, key: PolicyKey::new(257, 256, DIR_INGRESS, 6, 80) },
            PolicyValue { verdict: VERDICT_DENY, flags: 0, _pad: [0; 2], rule_id: 4 },
        );
        assert_eq!(v.lookup(257, 256, DIR_INGRESS, 6, 80), Some((VERDICT_DENY, 4)));
        assert!(!permitted_edges(&v, 100).0.iter().any(|e| e.src == 256 && e.ports == "TCP/80"));
    }

    #[test]
    fn open_sides_and_world() {
        let mut v = lab();
        // notsleep not isolated at all: it may open anything not isolated, and world may
        // reach it on any port.
        ep(&mut v, "10.0.0.30", 258, "default", "notsleep", (false, false));
        let (edges, _) = permitted_edges(&v, 100);
        assert!(edges.iter().any(|e| e.src == IDENTITY_WORLD && e.dst == 258 && e.ports == "any" && e.egress == "remote" && e.ingress == "no-policy"));
        assert!(edges.iter().any(|e| e.src == 258 && e.dst == IDENTITY_WORLD && e.ports == "any"));
        // isolated httpbin admits only sleep.
        assert!(!edges.iter().any(|e| e.src == 258 && e.dst == 257));
        // The cap keeps the count of what it left out.
        let (few, dropped) = permitted_edges(&v, 1);
        assert_eq!(few.len(), 1);
        assert_eq!(dropped as usize, edges.len() - 1);
    }

    #[test]
    fn port_ranges() {
        let k = PolicyEntryKey { prefix_len: POLICY_PREFIX_FULL - 4, key: PolicyKey::new(1, 2, DIR_EGRESS, 6, 8000) };
        assert!(covers(&k, 6, 8015) && covers(&k, 6, 8000) && !covers(&k, 6, 8016) && !covers(&k, 17, 8000));
        assert_eq!(PortSpec::of(&k).label(), "TCP/8000-8015");
        assert!(PortSpec::of(&k).contains(6, 8003));
    }
}
