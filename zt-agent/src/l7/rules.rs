//! The proxy's rule table: for each local identity and direction, the allow rules of its
//! TCP ports, with their HTTP rules (or none: an L4-only allow lets every request through).
//! Built by the compiler next to the policy entries it flags POLICY_FLAG_HTTP, so the
//! kernel's steering and the proxy's judgement come from the same rules.

use std::collections::{BTreeMap, BTreeSet};

use zt_common::{DIR_EGRESS, DIR_INGRESS};

use crate::compile::ports::PortMatch;
use crate::model::http::HttpRule;
use crate::state::Action;

const TCP: u8 = 6;

/// One allow rule on a TCP port range of one local identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRule {
    pub rule_id: u32,
    /// None: any peer.
    pub peers: Option<BTreeSet<u32>>,
    pub lo: u16,
    pub hi: u16,
    /// None: L4 only (every request).
    pub http: Option<Vec<HttpRule>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpTable {
    /// (direction, local identity) -> its TCP allow rules, by rule id.
    by_local: BTreeMap<(u8, u32), Vec<PortRule>>,
}

/// What the rules of one side (ingress of the server, egress of the client) say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// No allow rule of this side covers the flow: the side has nothing to say at L7.
    NoRules,
    /// An L4-only allow covers the flow: every request.
    L4(u32),
    /// HTTP rule `index` of rule `rule_id` matched.
    Allowed { rule_id: u32, index: usize, rule: String },
    /// HTTP rules cover the flow and none matched: default deny (the rules that were
    /// tried are named).
    Denied { rule_ids: Vec<u32> },
}

impl HttpTable {
    pub fn build(rules: &[crate::compile::Rule]) -> HttpTable {
        let mut t = HttpTable::default();
        for r in rules.iter().filter(|r| r.action == Action::Allow) {
            let ranges: Vec<(u16, u16)> = if r.ports.is_empty() {
                vec![(0, u16::MAX)]
            } else {
                r.ports
                    .iter()
                    .filter_map(|m| match m {
                        PortMatch::AnyProto | PortMatch::Proto(TCP) => Some((0, u16::MAX)),
                        PortMatch::Range { proto: TCP, lo, hi } => Some((*lo, *hi)),
                        // Named L4-only ports are left out: the proxy then denies what they
                        // would allow (fail closed); HTTP rules never have named ports.
                        _ => None,
                    })
                    .collect()
            };
            let peers = match &r.peers {
                crate::compile::Peers::Any => None,
                crate::compile::Peers::Ids(ids) => Some(ids.clone()),
            };
            for &local in &r.subjects {
                for &(lo, hi) in &ranges {
                    t.by_local.entry((r.dir, local)).or_default().push(PortRule { rule_id: r.id, peers: peers.clone(), lo, hi, http: r.http.clone() });
                }
            }
        }
        t
    }

    /// The incremental compile's patch: drops the local identities `gone` says, renumbers
    /// the remaining rules by `rule_id`, and adds `other`'s (built from every rule of the
    /// local identities it holds).
    pub(crate) fn patch(&mut self, gone: impl Fn(u32) -> bool, rule_id: impl Fn(u32) -> u32, other: HttpTable) {
        self.by_local.retain(|(_, local), _| !gone(*local));
        for r in self.by_local.values_mut().flatten() {
            r.rule_id = rule_id(r.rule_id);
        }
        self.by_local.extend(other.by_local);
    }

    /// Whether any rule carries HTTP rules (the proxy is needed at all).
    pub fn has_http(&self) -> bool {
        self.by_local.values().flatten().any(|r| r.http.is_some())
    }

    /// One side's judgement of a request on a flow (`local` is that side's identity).
    pub fn judge(&self, dir: u8, local: u32, peer: u32, port: u16, method: &str, path: &str) -> Judgement {
        let Some(rules) = self.by_local.get(&(dir, local)) else { return Judgement::NoRules };
        let applicable: Vec<&PortRule> = rules.iter().filter(|r| r.lo <= port && port <= r.hi && r.peers.as_ref().is_none_or(|p| p.contains(&peer))).collect();
        if applicable.is_empty() {
            return Judgement::NoRules;
        }
        if let Some(r) = applicable.iter().find(|r| r.http.is_none()) {
            return Judgement::L4(r.rule_id);
        }
        for r in &applicable {
            for (index, h) in r.http.iter().flatten().enumerate() {
                if h.matches(method, path) {
                    return Judgement::Allowed { rule_id: r.rule_id, index, rule: h.to_string() };
                }
            }
        }
        let mut rule_ids: Vec<u32> = applicable.iter().map(|r| r.rule_id).collect();
        rule_ids.dedup();
        Judgement::Denied { rule_ids }
    }
}

/// A request's verdict on a flow from `client` to `server` port `port`: the server's
/// ingress rules and the client's egress rules must both allow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The deciding judgement (a deny if there is one, else the ingress side's allow).
    pub ingress: Judgement,
    pub egress: Judgement,
}

pub fn verdict(t: &HttpTable, client: u32, server: u32, port: u16, method: &str, path: &str) -> Verdict {
    let ingress = t.judge(DIR_INGRESS, server, client, port, method, path);
    let egress = t.judge(DIR_EGRESS, client, server, port, method, path);
    let denied = |j: &Judgement| matches!(j, Judgement::Denied { .. });
    // A steered flow no rule of either side covers: the kernel steered it by a state the
    // proxy does not have (a policy change between the map write and this table's
    // update): fail closed.
    let covered = ingress != Judgement::NoRules || egress != Judgement::NoRules;
    Verdict { allowed: covered && !denied(&ingress) && !denied(&egress), ingress, egress }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Peers, Rule};

    fn rule(id: u32, dir: u8, local: u32, peers: Peers, ports: Vec<PortMatch>, http: Option<Vec<HttpRule>>) -> Rule {
        Rule { id, dir, action: Action::Allow, subjects: BTreeSet::from([local]), peers, ports, http, auth: false }
    }

    fn get(path: &str) -> HttpRule {
        HttpRule { method: Some("GET".into()), path: Some(path.into()), path_prefix: None }
    }

    #[test]
    fn http_rules_deny_what_they_do_not_name() {
        let t = HttpTable::build(&[rule(
            1,
            DIR_INGRESS,
            100,
            Peers::Ids(BTreeSet::from([200])),
            vec![PortMatch::Range { proto: TCP, lo: 80, hi: 80 }],
            Some(vec![get("/headers")]),
        )]);
        assert!(t.has_http());
        let v = verdict(&t, 200, 100, 80, "GET", "/headers");
        assert!(v.allowed);
        assert_eq!(v.ingress, Judgement::Allowed { rule_id: 1, index: 0, rule: "GET /headers".into() });
        let v = verdict(&t, 200, 100, 80, "POST", "/post");
        assert!(!v.allowed);
        assert_eq!(v.ingress, Judgement::Denied { rule_ids: vec![1] });
        // Another peer or port: the HTTP rules do not cover it, and a flow no rule covers
        // is denied (steered by a state the proxy has not seen).
        assert_eq!(t.judge(DIR_INGRESS, 100, 201, 80, "POST", "/post"), Judgement::NoRules);
        assert_eq!(t.judge(DIR_INGRESS, 100, 200, 81, "POST", "/post"), Judgement::NoRules);
        assert!(!verdict(&t, 201, 100, 80, "GET", "/headers").allowed);
    }

    #[test]
    fn an_l4_allow_of_the_same_flow_lets_everything_through() {
        let t = HttpTable::build(&[
            rule(1, DIR_INGRESS, 100, Peers::Any, vec![PortMatch::Range { proto: TCP, lo: 80, hi: 80 }], Some(vec![get("/headers")])),
            rule(2, DIR_INGRESS, 100, Peers::Ids(BTreeSet::from([300])), vec![PortMatch::Range { proto: TCP, lo: 80, hi: 90 }], None),
        ]);
        assert!(verdict(&t, 300, 100, 80, "POST", "/post").allowed);
        assert!(!verdict(&t, 200, 100, 80, "POST", "/post").allowed);
    }

    #[test]
    fn both_sides_must_allow() {
        let t = HttpTable::build(&[
            rule(
                1,
                DIR_INGRESS,
                100,
                Peers::Any,
                vec![PortMatch::Range { proto: TCP, lo: 80, hi: 80 }],
                Some(vec![HttpRule { method: Some("GET".into()), path: None, path_prefix: None }]),
            ),
            rule(
                2,
                DIR_EGRESS,
                200,
                Peers::Ids(BTreeSet::from([100])),
                vec![PortMatch::Range { proto: TCP, lo: 80, hi: 80 }],
                Some(vec![HttpRule { method: None, path: None, path_prefix: Some("/api/".into()) }]),
            ),
        ]);
        assert!(verdict(&t, 200, 100, 80, "GET", "/api/x").allowed);
        let v = verdict(&t, 200, 100, 80, "GET", "/headers");
        assert!(!v.allowed);
        assert_eq!(v.egress, Judgement::Denied { rule_ids: vec![2] });
        assert!(!verdict(&t, 200, 100, 80, "POST", "/api/x").allowed);
    }
}
