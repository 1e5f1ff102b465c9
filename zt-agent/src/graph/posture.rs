//! The posture report: what the policy leaves open, from the compiled state and the
//! window's observations. Namespace default-deny is read from the policy objects (a
//! policy that selects every pod of the namespace, so a new pod is isolated too); the
//! rest from the compiled endpoints, permitted edges and rules.
use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use zt_common::*;

use crate::compile::EnforcementMode;
use crate::model::{ztp::PolicyEnforcementMode, ClusterState};

/// Namespace -> (ingress, egress) default-deny: every pod of it, present and future, is
/// isolated in that direction by a policy (or by `--enforcement-mode always`).
pub fn namespace_default_deny(cluster: &ClusterState, mode: EnforcementMode) -> BTreeMap<String, (bool, bool)> {
    let always = mode == EnforcementMode::Always;
    let mut out: BTreeMap<String, (bool, bool)> = cluster.namespaces.keys().map(|n| (n.clone(), (always, always))).collect();
    for ((ns, _), np) in &cluster.network_policies {
        let Some(spec) = &np.spec else { continue };
        let sel = &spec.pod_selector;
        let all_pods =
            sel.as_ref().is_none_or(|s| s.match_labels.as_ref().is_none_or(|m| m.is_empty()) && s.match_expressions.as_ref().is_none_or(|m| m.is_empty()));
        if !all_pods {
            continue;
        }
        // Kubernetes' defaulting of policyTypes (compile/netpol.rs does the same).
        let types: Vec<&str> = match spec.policy_types.as_deref() {
            Some(t) if !t.is_empty() => t.iter().map(String::as_str).collect(),
            _ if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec!["Ingress", "Egress"],
            _ => vec!["Ingress"],
        };
        let e = out.entry(ns.clone()).or_default();
        e.0 |= types.contains(&"Ingress");
        e.1 |= types.contains(&"Egress");
    }
    for ((ns, _), p) in &cluster.zero_trust_policies {
        let whole_ns = p.spec.subjects.is_empty()
            || p.spec.subjects.iter().any(|s| {
                s.spiffe_id.as_deref().is_some_and(|id| id.ends_with(&format!("/ns/{ns}/*")))
                    || s.pod_selector.as_ref().is_some_and(|sel| sel.match_labels.is_empty() && sel.match_expressions.is_empty())
            });
        if !whole_ns {
            continue;
        }
        let always = p.spec.enforcement_mode == PolicyEnforcementMode::Always;
        let e = out.entry(ns.clone()).or_default();
        e.0 |= always || p.spec.ingress.as_ref().is_some_and(|r| !r.is_empty());
        e.1 |= always || p.spec.egress.as_ref().is_some_and(|r| !r.is_empty());
    }
    out
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpenNamespace {
    pub namespace: String,
    /// Directions without a namespace-wide default deny.
    pub open: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpenPod {
    pub pod: String,
    pub identity: u32,
    pub spiffe_id: String,
    pub open: Vec<&'static str>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Named {
    pub identity: u32,
    pub spiffe_id: String,
    /// What it is about: the ports world may use, or the size of the blast radius.
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UnusedRule {
    pub rule: u32,
    pub name: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Posture {
    pub window_s: u64,
    pub namespaces_without_default_deny: Vec<OpenNamespace>,
    pub pods_not_isolated: Vec<OpenPod>,
    pub reachable_from_world: Vec<Named>,
    pub largest_blast_radius: Vec<Named>,
    pub rules_unused: Vec<UnusedRule>,
}

fn dirs(ingress: bool, egress: bool) -> Vec<&'static str> {
    let mut v = vec![];
    if !ingress {
        v.push("ingress");
    }
    if !egress {
        v.push("egress");
    }
    v
}

/// The report from the view, the permitted edges, each identity's blast radius and the
/// rules seen allowing something in the window.
pub fn report(
    view: &super::permitted::PolicyView,
    edges: &[super::permitted::PermittedEdge],
    blast: &BTreeMap<u32, usize>,
    rules_used: &BTreeSet<u32>,
    name: &dyn Fn(u32) -> String,
    window_s: u64,
) -> Posture {
    let namespaces_without_default_deny =
        view.namespaces.iter().filter(|(_, (i, e))| !(*i && *e)).map(|(ns, (i, e))| OpenNamespace { namespace: ns.clone(), open: dirs(*i, *e) }).collect();
    let pods_not_isolated = view
        .endpoints
        .values()
        .filter(|e| e.flags & EP_LOCAL != 0)
        .filter_map(|e| {
            let p = e.pod.as_ref()?;
            let open = dirs(e.flags & EP_ENFORCE_INGRESS != 0, e.flags & EP_ENFORCE_EGRESS != 0);
            (!open.is_empty()).then(|| OpenPod { pod: format!("{}/{}", p.namespace, p.name), identity: e.identity, spiffe_id: name(e.identity), open })
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut from_world: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for e in edges.iter().filter(|e| e.src == IDENTITY_WORLD) {
        from_world.entry(e.dst).or_default().push(e.ports.clone());
    }
    let reachable_from_world = from_world.into_iter().map(|(id, ports)| Named { identity: id, spiffe_id: name(id), detail: ports.join(", ") }).collect();
    let mut largest: Vec<(u32, usize)> = blast.iter().filter(|(id, n)| **n > 0 && **id >= IDENTITY_FIRST_WORKLOAD).map(|(a, b)| (*a, *b)).collect();
    largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let largest_blast_radius =
        largest.into_iter().take(5).map(|(id, n)| Named { identity: id, spiffe_id: name(id), detail: format!("reaches {n} identities") }).collect();
    let rules_unused = view
        .rules
        .values()
        .filter(|r| r.action == crate::state::Action::Allow && !rules_used.contains(&r.id))
        .map(|r| UnusedRule { rule: r.id, name: format!("{} {}", r.source, r.path) })
        .collect();
    Posture { window_s, namespaces_without_default_deny, pods_not_isolated, reachable_from_world, largest_blast_radius, rules_unused }
}

impl PartialOrd for OpenPod {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for OpenPod {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (&self.pod, self.identity, &self.open).cmp(&(&o.pod, o.identity, &o.open))
    }
}
impl Eq for OpenPod {}

#[cfg(test)]
mod tests {
    use super::super::permitted::{permitted_edges, tests as pt};
    use super::*;

    #[test]
    fn namespace_default_deny_from_policy_objects() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Namespace
metadata: {name: c}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: a}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-web, namespace: b}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
---
apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: all, namespace: c}
spec: {enforcementMode: always}
"#;
        let dir = std::env::temp_dir().join(format!("zt-posture-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.yaml"), yaml).unwrap();
        let loaded = ClusterState::load_dir(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = loaded.unwrap().state;
        let got = namespace_default_deny(&cluster, EnforcementMode::Default);
        assert_eq!(got["a"], (true, false));
        assert_eq!(got["b"], (false, false), "a selector that names labels does not cover new pods");
        assert_eq!(got["c"], (true, true));
        assert!(namespace_default_deny(&cluster, EnforcementMode::Always).values().all(|x| *x == (true, true)));
    }

    #[test]
    fn report_lists_open_things() {
        let mut v = pt::lab();
        pt::ep(&mut v, "10.0.0.30", 258, "default", "notsleep", (true, false));
        v.namespaces.insert("other".into(), (true, false));
        pt::allow(&mut v, 257, IDENTITY_WORLD, DIR_INGRESS, 6, Some(443), 9);
        let (edges, _) = permitted_edges(&v, 1000);
        let links: Vec<_> = edges.iter().map(|e| super::super::risk::Link { src: e.src, dst: e.dst, used: false }).collect();
        let blast: BTreeMap<u32, usize> = v.node_ids().iter().map(|id| (*id, super::super::risk::blast_radius(*id, &links).len())).collect();
        let name = |id: u32| format!("id{id}");
        let p = report(&v, &edges, &blast, &BTreeSet::from([1]), &name, 600);
        assert_eq!(p.namespaces_without_default_deny, vec![OpenNamespace { namespace: "other".into(), open: vec!["egress"] }]);
        assert_eq!(p.pods_not_isolated.len(), 1);
        assert_eq!((p.pods_not_isolated[0].pod.as_str(), p.pods_not_isolated[0].open.clone()), ("default/notsleep", vec!["egress"]));
        assert_eq!(p.reachable_from_world.iter().map(|n| (n.identity, n.detail.as_str())).collect::<Vec<_>>(), vec![(257, "TCP/443")]);
        // notsleep's open egress reaches world (and nothing isolated); sleep reaches httpbin.
        assert!(p.largest_blast_radius.iter().any(|n| n.identity == 256 && n.detail == "reaches 1 identities"), "{:?}", p.largest_blast_radius);
        // Rule 1 allowed something; 2 (httpbin's ingress from sleep) and 9 did not.
        assert_eq!(p.rules_unused.iter().map(|r| r.rule).collect::<Vec<_>>(), vec![2, 9]);
    }
}
