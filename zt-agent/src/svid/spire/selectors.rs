//! Which selectors the SPIRE backend subscribes with. SPIRE's Delegated Identity API hands out
//! the SVIDs of every registration entry whose selectors are a subset of the selectors the
//! caller sends (it does not attest them: the caller, an authorized delegate, vouches for
//! them). So a pod is described the way SPIRE's k8s workload attestor would describe it, with
//! the facts zt has: `k8s:pod-uid:<uid>`, `k8s:ns:<ns>` and `k8s:sa:<sa>` (from a SPIFFE ID of
//! zt's `/ns/<ns>/sa/<sa>` shape), `k8s:node-name:<node>`. Entries that also need labels,
//! images or owners (`k8s:pod-label:...`) do not match. A subject without a pod (the node's
//! own SVID) uses the selectors the operator configured (`svid::spec` defaults them to
//! zt-agent's own pod: `k8s:ns:zt-system`, `k8s:sa:zt-agent`), plus `k8s:node-name:<node>`.

use std::fmt;

use super::super::source::Subject;
use spire_api::pb::spire::api::types::Selector as ProtoSelector;

/// One selector, `type:value` (SPIRE's own spelling: the type is the attestor's name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    pub kind: String,
    pub value: String,
}

impl Selector {
    pub fn new(kind: &str, value: &str) -> Selector {
        Selector { kind: kind.into(), value: value.into() }
    }

    /// `type:value`; the value may itself hold colons (`k8s:pod-label:app:web`).
    pub fn parse(s: &str) -> Result<Selector, String> {
        match s.split_once(':') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok(Selector::new(k, v)),
            _ => Err(format!("selector {s:?} is not of the form type:value (e.g. k8s:sa:zt-agent)")),
        }
    }

    pub fn to_proto(&self) -> ProtoSelector {
        ProtoSelector { r#type: self.kind.clone(), value: self.value.clone() }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// `ns` and `sa` of a path of zt's workload shape `/ns/<ns>/sa/<sa>`.
fn ns_sa(path: &str) -> Option<(&str, &str)> {
    let mut it = path.strip_prefix('/')?.split('/');
    match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some("ns"), Some(ns), Some("sa"), Some(sa), None) if !ns.is_empty() && !sa.is_empty() => Some((ns, sa)),
        _ => None,
    }
}

/// The selectors for `subject`, sorted (one subscription per distinct set).
pub fn for_subject(subject: &Subject, node_selectors: &[Selector], node_name: Option<&str>) -> Result<Vec<Selector>, String> {
    let mut v = match &subject.pod_uid {
        None if node_selectors.is_empty() => {
            return Err(format!("no SPIRE selectors are configured for {} (a subject without a pod, such as the node's own SVID)", subject.spiffe_id))
        }
        None => node_selectors.to_vec(),
        Some(uid) if uid.is_empty() => return Err(format!("empty pod UID for {}", subject.spiffe_id)),
        Some(uid) => {
            let mut v = vec![Selector::new("k8s", &format!("pod-uid:{uid}"))];
            if let Some((ns, sa)) = ns_sa(subject.spiffe_id.path()) {
                v.push(Selector::new("k8s", &format!("ns:{ns}")));
                v.push(Selector::new("k8s", &format!("sa:{sa}")));
            }
            v
        }
    };
    if let Some(n) = node_name {
        v.push(Selector::new("k8s", &format!("node-name:{n}")));
    }
    v.sort();
    v.dedup();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::spiffe_id::SpiffeId;

    #[test]
    fn pods_are_described_as_the_k8s_attestor_would() {
        let s = Subject { spiffe_id: SpiffeId::parse("spiffe://zt.test/ns/shop/sa/api").unwrap(), pod_uid: Some("u-1".into()) };
        let v: Vec<String> = for_subject(&s, &[], Some("n1")).unwrap().iter().map(|s| s.to_string()).collect();
        assert_eq!(v, ["k8s:node-name:n1", "k8s:ns:shop", "k8s:pod-uid:u-1", "k8s:sa:api"]);
        // Another ID shape: only what zt knows for sure.
        let s = Subject { spiffe_id: SpiffeId::parse("spiffe://zt.test/workload/x").unwrap(), pod_uid: Some("u-2".into()) };
        assert_eq!(for_subject(&s, &[], None).unwrap(), vec![Selector::new("k8s", "pod-uid:u-2")]);
    }

    #[test]
    fn the_node_uses_configured_selectors() {
        let s = Subject::id(SpiffeId::parse("spiffe://zt.test/zt/node/n1").unwrap());
        assert!(for_subject(&s, &[], Some("n1")).unwrap_err().contains("no SPIRE selectors are configured for spiffe://zt.test/zt/node/n1"));
        let sel = [Selector::parse("k8s:sa:zt-agent").unwrap(), Selector::parse("k8s:ns:zt-system").unwrap()];
        assert_eq!(for_subject(&s, &sel, None).unwrap(), vec![Selector::new("k8s", "ns:zt-system"), Selector::new("k8s", "sa:zt-agent")]);
        let with_node: Vec<String> = for_subject(&s, &sel, Some("n1")).unwrap().iter().map(|s| s.to_string()).collect();
        assert_eq!(with_node, ["k8s:node-name:n1", "k8s:ns:zt-system", "k8s:sa:zt-agent"]);
        assert_eq!(Selector::parse("k8s:pod-label:app:web").unwrap(), Selector::new("k8s", "pod-label:app:web"));
        assert!(Selector::parse("nocolon").is_err());
        assert!(Selector::parse("k8s:").is_err());
    }
}
