//! The flow and risk map: observed edges (what the datapath did, `observed.rs`),
//! permitted edges (what the compiled policy allows, `permitted.rs`), risk and blast
//! radius (`risk.rs`), the posture report (`posture.rs`). The agent feeds it drop and
//! allow events and conntrack scans (`collect.rs`) and the compiled policy at each
//! compile; `/api/graph` (the page's port) and `ztctl graph` (admin socket) read it.
pub mod collect;
pub mod metrics;
pub mod observed;
pub mod permitted;
pub mod posture;
pub mod risk;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use zt_common::*;

use observed::{Dropped, EdgeKey, Limits, Observation, Observed};
use permitted::{permitted_edges, PolicyView};
use risk::{Containment, Incident, Link, NodeRisk};

/// Default `window` of the API: 15 minutes.
pub const DEFAULT_WINDOW_S: u64 = 900;
/// Default cap on permitted edges drawn.
pub const DEFAULT_MAX_PERMITTED: usize = 20_000;
/// An identity's `reach` lists at most this many identities (`blast_radius` counts all).
pub const MAX_REACH_LISTED: usize = 100;
/// Allow events remembered so that a conntrack scan does not count their flows again.
const RECENT_FLOWS_MAX: usize = 65_536;

pub type FlowTuple = (IpAddr, IpAddr, u16, u16, u8);

pub struct Graph {
    pub node_name: String,
    observed: Observed,
    view: Option<Arc<PolicyView>>,
    /// Identity -> when a user marked it compromised (Unix seconds).
    compromised: BTreeMap<u32, u64>,
    /// Identities that appeared after the first compiled state, and when.
    first_seen: BTreeMap<u32, u64>,
    max_permitted: usize,
    /// Flows counted from allow events, this generation and the previous one.
    recent: [HashSet<FlowTuple>; 2],
    /// Events the graph's subscriber lost to a full channel.
    pub events_lagged: u64,
}

pub type SharedGraph = Arc<Mutex<Graph>>;

pub fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Reason names are the datapath's (`Reason::name`); anything else is `other`.
pub fn reason_static(name: &str) -> &'static str {
    Reason::ALL.iter().map(|r| r.name()).find(|n| *n == name).unwrap_or("other")
}

pub fn proto_number(name: &str) -> u8 {
    match name {
        "ICMP" => 1,
        "TCP" => 6,
        "UDP" => 17,
        "ICMPv6" => 58,
        "SCTP" => 132,
        other => other.strip_prefix("proto-").and_then(|n| n.parse().ok()).unwrap_or(0),
    }
}

/// `300`, `300s`, `5m`, `2h`, `1d`.
pub fn parse_window(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("window {s:?}: expected a duration like 300, 90s, 15m, 2h"))?;
    if n == 0 {
        return Err(format!("window {s:?}: must be more than 0"));
    }
    Ok(n.saturating_mul(mult))
}

/// The window of a query string (`window=15m&...`), default `DEFAULT_WINDOW_S`.
pub fn window_of_query(q: &str) -> Result<u64, String> {
    for kv in q.split('&') {
        if let Some(v) = kv.strip_prefix("window=") {
            return parse_window(v);
        }
    }
    Ok(DEFAULT_WINDOW_S)
}

#[derive(Clone, Debug, Serialize)]
pub struct IdentityNode {
    pub id: u32,
    pub spiffe_id: String,
    /// The namespace of a workload's SPIFFE ID; empty for reserved and CIDR identities.
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub pods: Vec<String>,
    pub local: bool,
    pub isolated_ingress: bool,
    pub isolated_egress: bool,
    pub compromised: bool,
    pub risk: NodeRisk,
    pub blast_radius: usize,
    /// The first `MAX_REACH_LISTED` identities of the blast radius.
    pub reach: Vec<u32>,
    pub containment: Containment,
}

#[derive(Clone, Debug, Serialize)]
pub struct ObservedEdge {
    pub src: u32,
    pub dst: u32,
    pub proto: String,
    pub port: u16,
    pub allowed: u64,
    pub denied: u64,
    /// `allow/<reason>` or `drop/<reason>` -> count.
    pub counts: BTreeMap<String, u64>,
    pub first_seen: u64,
    pub last_seen: u64,
    pub rules: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PermittedOut {
    pub src: u32,
    pub dst: u32,
    pub ports: String,
    pub rules: Vec<String>,
    pub egress: &'static str,
    pub ingress: &'static str,
    /// Observed allowed traffic on it in the window.
    pub used: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct NamespaceOut {
    pub name: String,
    pub default_deny_ingress: bool,
    pub default_deny_egress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Limitsout {
    pub bucket_seconds: u64,
    pub buckets: usize,
    pub max_entries: usize,
    pub entries: usize,
    pub oldest: Option<u64>,
    pub dropped: Dropped,
    pub max_permitted: usize,
    pub permitted_dropped: u64,
    pub events_lagged: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Thresholds {
    pub yellow: f64,
    pub red: f64,
    pub weight_used: f64,
    pub weight_permitted: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GraphOut {
    pub node: String,
    pub generated_at: u64,
    pub window_s: u64,
    /// A compiled policy was seen (false right after the agent started).
    pub policy_loaded: bool,
    pub namespaces: Vec<NamespaceOut>,
    pub identities: Vec<IdentityNode>,
    pub observed: Vec<ObservedEdge>,
    pub permitted: Vec<PermittedOut>,
    /// The five riskiest identities (risk above 0), riskiest first.
    pub top_risk: Vec<u32>,
    pub incidents: Vec<Incident>,
    pub thresholds: Thresholds,
    pub limits: Limitsout,
}

/// Everything the graph and the posture report need, computed once per request.
struct Computed {
    view: Arc<PolicyView>,
    observed: BTreeMap<EdgeKey, observed::EdgeSummary>,
    permitted: Vec<permitted::PermittedEdge>,
    permitted_dropped: u64,
    used: Vec<bool>,
    incidents: Vec<Incident>,
    risk: BTreeMap<u32, NodeRisk>,
    nodes: BTreeSet<u32>,
    blast: BTreeMap<u32, BTreeSet<u32>>,
}

impl Graph {
    pub fn new(node_name: &str, limits: Limits, max_permitted: usize) -> Graph {
        Graph {
            node_name: node_name.to_string(),
            observed: Observed::new(limits),
            view: None,
            compromised: BTreeMap::new(),
            first_seen: BTreeMap::new(),
            max_permitted,
            recent: [HashSet::new(), HashSet::new()],
            events_lagged: 0,
        }
    }

    pub fn shared(self) -> SharedGraph {
        Arc::new(Mutex::new(self))
    }

    /// A new compiled state. Identities absent from the previous one are new (the
    /// first state's are not: they were there before the agent).
    pub fn set_view(&mut self, view: PolicyView, now: u64) {
        if let Some(old) = &self.view {
            for id in view.identities.keys() {
                if !old.identities.contains_key(id) && *id >= IDENTITY_FIRST_WORKLOAD {
                    self.first_seen.entry(*id).or_insert(now);
                }
            }
        }
        self.first_seen.retain(|id, _| view.identities.contains_key(id));
        self.view = Some(Arc::new(view));
    }

    pub fn has_view(&self) -> bool {
        self.view.is_some()
    }

    pub fn add(&mut self, o: Observation) {
        self.observed.add(o);
    }

    /// A flow counted from an allow event: a conntrack scan skips it.
    pub fn remember_flow(&mut self, t: FlowTuple) {
        if self.recent[0].len() >= RECENT_FLOWS_MAX {
            self.recent.swap(0, 1);
            self.recent[0].clear();
        }
        self.recent[0].insert(t);
    }

    pub fn counted_by_event(&self, t: &FlowTuple) -> bool {
        self.recent[0].contains(t) || self.recent[1].contains(t)
    }

    /// Called after each conntrack scan: events older than two scans are forgotten.
    pub fn rotate_recent(&mut self) {
        self.recent.swap(0, 1);
        self.recent[0].clear();
    }

    /// Marks (or unmarks) an identity compromised. Errors on an identity the policy
    /// does not know.
    pub fn mark_compromised(&mut self, id: u32, on: bool, now: u64) -> Result<(), String> {
        let known = self.view.as_ref().is_some_and(|v| v.identities.contains_key(&id)) || id == IDENTITY_WORLD || id == IDENTITY_HOST;
        if on && !known {
            return Err(format!("identity {id} is not known"));
        }
        if on {
            self.compromised.entry(id).or_insert(now);
        } else {
            self.compromised.remove(&id);
        }
        Ok(())
    }

    /// What a request needs, copied under the lock; the computing happens after it is
    /// released, so that a page request never holds up the event and conntrack feeds.
    pub fn freeze(&self, now: u64, window_s: u64) -> Frozen {
        let limits = self.observed.limits();
        Frozen {
            node_name: self.node_name.clone(),
            view: self.view.clone(),
            observed: self.observed.window(now, window_s),
            per_bucket: self.observed.denied_per_bucket(now, window_s),
            compromised: self.compromised.clone(),
            first_seen: self.first_seen.clone(),
            max_permitted: self.max_permitted,
            limits: Limitsout {
                bucket_seconds: limits.bucket_s,
                buckets: limits.buckets,
                max_entries: limits.max_entries,
                entries: self.observed.entries(),
                oldest: self.observed.oldest_s(),
                dropped: self.observed.dropped,
                max_permitted: self.max_permitted,
                permitted_dropped: 0,
                events_lagged: self.events_lagged,
            },
        }
    }

    pub fn name(&self, id: u32) -> String {
        name_in(self.view.as_deref(), id)
    }

    pub fn render(&self, now: u64, window_s: u64) -> GraphOut {
        self.freeze(now, window_s).render(now, window_s)
    }

    pub fn posture(&self, now: u64, window_s: u64) -> Result<posture::Posture, String> {
        self.freeze(now, window_s).posture(now, window_s)
    }
}

fn name_in(view: Option<&PolicyView>, id: u32) -> String {
    match view.and_then(|v| v.identities.get(&id)) {
        Some(i) => i.spiffe_id.clone(),
        None => crate::events::reserved_name(id).map(|n| format!("reserved:{n}")).unwrap_or_else(|| format!("identity {id}")),
    }
}

/// A request's copy of the graph (see `Graph::freeze`).
pub struct Frozen {
    node_name: String,
    view: Option<Arc<PolicyView>>,
    observed: BTreeMap<EdgeKey, observed::EdgeSummary>,
    per_bucket: BTreeMap<u32, Vec<u64>>,
    compromised: BTreeMap<u32, u64>,
    first_seen: BTreeMap<u32, u64>,
    max_permitted: usize,
    limits: Limitsout,
}

impl Frozen {
    fn name(&self, id: u32) -> String {
        name_in(self.view.as_deref(), id)
    }

    fn rule_name(&self, view: &PolicyView, id: u32) -> String {
        view.rules.get(&id).map(|r| format!("{} {}", r.source, r.path)).unwrap_or_else(|| format!("rule {id}"))
    }

    fn compute(&self, now: u64, window_s: u64) -> Option<Computed> {
        let view = self.view.clone()?;
        let observed = self.observed.clone();
        let (permitted, permitted_dropped) = permitted_edges(&view, self.max_permitted);
        // Observed allowed (proto, port) per pair, to tell used permitted edges.
        let mut allowed_by_pair: BTreeMap<(u32, u32), Vec<(u8, u16)>> = BTreeMap::new();
        for (k, _) in observed.iter().filter(|(_, s)| s.allowed > 0) {
            allowed_by_pair.entry((k.src, k.dst)).or_default().push((k.proto, k.port));
        }
        let used: Vec<bool> =
            permitted.iter().map(|p| allowed_by_pair.get(&(p.src, p.dst)).is_some_and(|v| v.iter().any(|(pr, po)| p.spec.contains(*pr, *po)))).collect();
        let links: Vec<Link> = permitted.iter().zip(&used).map(|(p, u)| Link { src: p.src, dst: p.dst, used: *u }).collect();
        let mut nodes = view.node_ids();
        for k in observed.keys() {
            nodes.insert(k.src);
            nodes.insert(k.dst);
        }
        nodes.retain(|id| *id != IDENTITY_ANY && id & IDENTITY_SERVICE_FLAG == 0);
        let mut targets: BTreeMap<u32, BTreeSet<(u32, u16)>> = BTreeMap::new();
        for (k, s) in &observed {
            if s.denied > 0 {
                targets.entry(k.src).or_default().insert((k.dst, k.port));
            }
        }
        let per_bucket = &self.per_bucket;
        let new: BTreeMap<u32, u64> = self.first_seen.iter().filter(|(_, t)| **t + window_s >= now).map(|(a, b)| (*a, *b)).collect();
        let compromised: BTreeMap<u32, u64> = self.compromised.iter().filter(|(id, _)| nodes.contains(id)).map(|(a, b)| (*a, *b)).collect();
        // Sources whose flows were dropped for want of a proven identity (issue 10).
        let mut auth_failures: BTreeMap<u32, u64> = BTreeMap::new();
        for (k, s) in &observed {
            if let Some(n) = s.counts.get("drop/auth-required") {
                *auth_failures.entry(k.src).or_default() += n;
            }
        }
        let incidents = risk::detect(now, &compromised, &targets, per_bucket, &auth_failures, &new);
        let base = risk::base_risk(&incidents);
        let risk = risk::propagate(&nodes, &base, &links);
        let reach = risk::Reach::new(&links);
        let blast = nodes.iter().map(|id| (*id, reach.from(*id))).collect();
        Some(Computed { view, observed, permitted, permitted_dropped, used, incidents, risk, nodes, blast })
    }

    pub fn render(&self, now: u64, window_s: u64) -> GraphOut {
        let mut out = GraphOut {
            node: self.node_name.clone(),
            generated_at: now,
            window_s,
            policy_loaded: false,
            namespaces: vec![],
            identities: vec![],
            observed: vec![],
            permitted: vec![],
            top_risk: vec![],
            incidents: vec![],
            thresholds: Thresholds { yellow: risk::YELLOW, red: risk::RED, weight_used: risk::W_USED, weight_permitted: risk::W_PERMITTED },
            limits: self.limits.clone(),
        };
        let Some(c) = self.compute(now, window_s) else { return out };
        out.policy_loaded = true;
        out.limits.permitted_dropped = c.permitted_dropped;
        out.namespaces =
            c.view.namespaces.iter().map(|(n, (i, e))| NamespaceOut { name: n.clone(), default_deny_ingress: *i, default_deny_egress: *e }).collect();
        let local = c.view.local();
        let mut pods: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for e in c.view.endpoints.values().filter(|e| e.flags & EP_LOCAL != 0) {
            if let Some(p) = &e.pod {
                pods.entry(e.identity).or_default().insert(format!("{}/{}", p.namespace, p.name));
            }
        }
        let mut out_counts: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        for (p, u) in c.permitted.iter().zip(&c.used) {
            let e = out_counts.entry(p.src).or_default();
            e.0 += 1;
            e.1 += *u as usize;
        }
        for id in &c.nodes {
            let spiffe_id = self.name(*id);
            let (namespace, name) = match spiffe_id.split_once("/ns/").and_then(|(_, r)| r.split_once("/sa/")) {
                Some((ns, sa)) => (ns.to_string(), sa.to_string()),
                None => (String::new(), spiffe_id.trim_start_matches("reserved:").to_string()),
            };
            let (isolated_ingress, isolated_egress) = local.get(id).copied().unwrap_or((false, false));
            let (out_n, used) = out_counts.get(id).copied().unwrap_or((0, 0));
            let reach = &c.blast[id];
            out.identities.push(IdentityNode {
                id: *id,
                spiffe_id,
                namespace,
                name,
                labels: c.view.identities.get(id).map(|i| i.labels.clone()).unwrap_or_default(),
                pods: pods.get(id).map(|p| p.iter().cloned().collect()).unwrap_or_default(),
                local: local.contains_key(id),
                isolated_ingress,
                isolated_egress,
                compromised: self.compromised.contains_key(id),
                risk: c.risk[id].clone(),
                blast_radius: reach.len(),
                reach: reach.iter().copied().take(MAX_REACH_LISTED).collect(),
                containment: risk::containment(out_n, used, reach.len()),
            });
        }
        out.observed = c
            .observed
            .iter()
            .map(|(k, s)| ObservedEdge {
                src: k.src,
                dst: k.dst,
                proto: crate::events::proto_name(k.proto),
                port: k.port,
                allowed: s.allowed,
                denied: s.denied,
                counts: s.counts.clone(),
                first_seen: s.first_seen,
                last_seen: s.last_seen,
                rules: s.rules.iter().map(|r| self.rule_name(&c.view, *r)).collect(),
            })
            .collect();
        out.permitted = c
            .permitted
            .iter()
            .zip(&c.used)
            .map(|(p, u)| PermittedOut {
                src: p.src,
                dst: p.dst,
                ports: p.ports.clone(),
                rules: p.rules.iter().map(|r| self.rule_name(&c.view, *r)).collect(),
                egress: p.egress,
                ingress: p.ingress,
                used: *u,
            })
            .collect();
        let mut ranked: Vec<(u32, f64)> = c.risk.iter().filter(|(_, r)| r.value > 0.0).map(|(id, r)| (*id, r.value)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.top_risk = ranked.into_iter().take(5).map(|(id, _)| id).collect();
        out.incidents = c.incidents.clone();
        out.incidents.sort_by(|a, b| b.risk.total_cmp(&a.risk).then(b.at.cmp(&a.at)));
        out
    }

    pub fn posture(&self, now: u64, window_s: u64) -> Result<posture::Posture, String> {
        let c = self.compute(now, window_s).ok_or("no compiled policy yet")?;
        let blast: BTreeMap<u32, usize> = c.blast.iter().map(|(id, r)| (*id, r.len())).collect();
        let rules_used: BTreeSet<u32> = c.observed.values().filter(|s| s.allowed > 0).flat_map(|s| s.rules.iter().copied()).collect();
        let name = |id: u32| self.name(id);
        Ok(posture::report(&c.view, &c.permitted, &blast, &rules_used, &name, window_s))
    }
}

/// The admin socket's `graph <query>` and `posture <query>`: one JSON line (an
/// `{"error": ...}` object when the query is wrong).
pub fn answer(graph: &SharedGraph, what: &str, query: &str) -> String {
    let r = window_of_query(query).and_then(|w| {
        let now = now_s();
        let f = graph.lock().unwrap().freeze(now, w);
        if what == "graph" {
            serde_json::to_string(&f.render(now, w)).map_err(|e| e.to_string())
        } else {
            f.posture(now, w).and_then(|p| serde_json::to_string(&p).map_err(|e| e.to_string()))
        }
    });
    let mut s = r.unwrap_or_else(|e| serde_json::json!({ "error": e }).to_string());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("300"), Ok(300));
        assert_eq!(parse_window("90s"), Ok(90));
        assert_eq!(parse_window("15m"), Ok(900));
        assert_eq!(parse_window("2h"), Ok(7200));
        assert!(parse_window("0").is_err() && parse_window("m").is_err() && parse_window("5x").unwrap_err().contains("5x"));
        assert_eq!(window_of_query("a=b&window=5m"), Ok(300));
        assert_eq!(window_of_query(""), Ok(DEFAULT_WINDOW_S));
    }

    fn lab_graph() -> Graph {
        let mut g = Graph::new("node1", Limits::default(), 1000);
        g.set_view(permitted::tests::lab(), 1000);
        g
    }

    fn obs(src: u32, dst: u32, port: u16, allowed: bool, reason: &'static str, rule: u32, at_s: u64) -> Observation {
        Observation { key: EdgeKey { src, dst, proto: 6, port }, allowed, reason, rule, count: 1, at_s }
    }

    #[test]
    fn the_lab_graph_with_a_compromised_client() {
        let mut g = lab_graph();
        g.add(obs(256, 257, 80, true, "policy", 1, 1000));
        g.add(obs(258, 257, 80, false, "policy-default-deny", 0, 1001));
        g.mark_compromised(256, true, 1002).unwrap();
        assert!(g.mark_compromised(999, true, 1002).is_err());
        let out = g.render(1010, 600);
        assert!(out.policy_loaded);
        let node = |id: u32| out.identities.iter().find(|n| n.id == id).unwrap();
        assert_eq!((node(256).namespace.as_str(), node(256).name.as_str()), ("default", "sleep"));
        assert_eq!(node(256).pods, vec!["default/sleep"]);
        assert!(node(256).isolated_egress && node(256).compromised);
        // sleep -> httpbin is used: httpbin gets 0.8 through it, notsleep nothing.
        assert_eq!(node(257).risk.value, risk::W_USED);
        assert_eq!(node(257).risk.path, vec![256, 257]);
        assert_eq!(node(257).risk.colour, "red");
        assert_eq!(node(258).risk.value, 0.0);
        assert_eq!(out.top_risk, vec![256, 257]);
        assert_eq!(node(256).blast_radius, 1);
        assert_eq!((node(256).containment.edges_cut, node(256).containment.used_edges_cut), (1, 1));
        assert_eq!(out.permitted.len(), 1);
        assert!(out.permitted[0].used);
        assert_eq!(out.permitted[0].rules, vec!["ZeroTrustPolicy default/r1 spec.egress[0]", "ZeroTrustPolicy default/r2 spec.egress[0]"]);
        let denied = out.observed.iter().find(|e| e.src == 258).unwrap();
        assert_eq!((denied.denied, denied.allowed, denied.counts["drop/policy-default-deny"]), (1, 0, 1));
        assert_eq!(out.incidents.len(), 1);
        // Unmarked: the risk is gone.
        g.mark_compromised(256, false, 1020).unwrap();
        assert!(g.render(1020, 600).top_risk.is_empty());
        // Posture: rule 2 (the ingress side) is on the used edge's rules? The
        // observation named rule 1 only.
        let p = g.posture(1020, 600).unwrap();
        assert_eq!(p.rules_unused.iter().map(|r| r.rule).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn probing_and_new_identities_are_incidents() {
        let mut g = lab_graph();
        for port in [22, 23, 80] {
            g.add(obs(258, 257, port, false, "policy-default-deny", 0, 1000));
        }
        let mut v = permitted::tests::lab();
        v.identities.insert(300, permitted::tests::ident(300, "default", "late"));
        g.set_view(v, 1005);
        let out = g.render(1010, 600);
        let kinds: Vec<(u32, &str)> = out.incidents.iter().map(|i| (i.identity, i.kind)).collect();
        assert_eq!(kinds, vec![(258, "probing"), (300, "new-identity")]);
        let n = out.identities.iter().find(|n| n.id == 258).unwrap();
        assert_eq!((n.risk.value, n.risk.colour), (risk::RISK_PROBING, "red"));
        // Outside the window, both are gone.
        assert!(g.render(1000 + 3 * 3600, 600).incidents.is_empty());
    }
}
