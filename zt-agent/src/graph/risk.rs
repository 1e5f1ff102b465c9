//! Risk, blast radius and containment, computed here so that the page only draws them.
//!
//! Base risk of an identity is the highest of its incidents:
//! - `compromised` (marked by a user): 1.0
//! - `probing` (denied attempts towards at least `PROBE_TARGETS` distinct
//!   destination/port pairs in the window): 0.6
//! - `drop-spike` (denied attempts in the newest bucket at least `SPIKE_MIN` and at least
//!   `SPIKE_FACTOR` times its mean over the earlier buckets of the window): 0.5
//! - `auth-failures` (flows dropped as `auth-required`: the source claimed an identity its
//!   node has not proven): 0.5
//! - `new-identity` (first seen in the window, after the agent started): 0.2
//!
//! Risk spreads along permitted edges in the direction a connection can be opened (a
//! compromised client endangers what it may connect to): risk(dst) >= risk(src) x w, w =
//! `W_USED` for an edge observed in use, `W_PERMITTED` for one never used. The result is
//! the max-product fixed point (every weight is below 1, so it is reached by a
//! best-first search, Dijkstra on -log w), and each node keeps the path that gave it
//! its maximum.
//!
//! Colours: green below `YELLOW`, yellow below `RED`, red from `RED` on.
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use serde::Serialize;

pub const RISK_COMPROMISED: f64 = 1.0;
pub const RISK_PROBING: f64 = 0.6;
pub const RISK_SPIKE: f64 = 0.5;
pub const RISK_NEW: f64 = 0.2;
pub const RISK_AUTH_FAILURES: f64 = 0.5;
pub const PROBE_TARGETS: usize = 3;
pub const SPIKE_MIN: u64 = 10;
pub const SPIKE_FACTOR: f64 = 3.0;
pub const W_USED: f64 = 0.8;
pub const W_PERMITTED: f64 = 0.6;
pub const YELLOW: f64 = 0.3;
pub const RED: f64 = 0.6;

pub fn colour(risk: f64) -> &'static str {
    if risk >= RED {
        "red"
    } else if risk >= YELLOW {
        "yellow"
    } else {
        "green"
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Incident {
    pub identity: u32,
    pub kind: &'static str,
    pub detail: String,
    pub risk: f64,
    /// Unix seconds.
    pub at: u64,
}

/// One directed edge the risk may travel: src may open a connection to dst.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    pub src: u32,
    pub dst: u32,
    pub used: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeRisk {
    pub base: f64,
    pub value: f64,
    pub colour: &'static str,
    /// Identities from the incident's identity to this one (just itself when its own
    /// incident gave it its risk; empty when it has none).
    pub path: Vec<u32>,
}

#[derive(PartialEq)]
struct Item(f64, u32);
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

/// The max-product fixed point from base risks over links.
pub fn propagate(nodes: &BTreeSet<u32>, base: &BTreeMap<u32, f64>, links: &[Link]) -> BTreeMap<u32, NodeRisk> {
    let mut out_links: BTreeMap<u32, Vec<(u32, f64)>> = BTreeMap::new();
    for l in links {
        if l.src == l.dst {
            continue;
        }
        let w = if l.used { W_USED } else { W_PERMITTED };
        let v = out_links.entry(l.src).or_default();
        // Parallel edges (several ports): the strongest counts.
        match v.iter_mut().find(|(d, _)| *d == l.dst) {
            Some(x) => x.1 = x.1.max(w),
            None => v.push((l.dst, w)),
        }
    }
    let mut value: BTreeMap<u32, f64> = nodes.iter().map(|n| (*n, base.get(n).copied().unwrap_or(0.0))).collect();
    let mut pred: BTreeMap<u32, u32> = BTreeMap::new();
    let mut done: BTreeSet<u32> = BTreeSet::new();
    let mut heap: BinaryHeap<Item> = value.iter().filter(|(_, v)| **v > 0.0).map(|(n, v)| Item(*v, *n)).collect();
    while let Some(Item(r, n)) = heap.pop() {
        if !done.insert(n) || r < value[&n] {
            continue;
        }
        for (d, w) in out_links.get(&n).into_iter().flatten() {
            let cand = r * w;
            if let Some(cur) = value.get_mut(d) {
                if cand > *cur && !done.contains(d) {
                    *cur = cand;
                    pred.insert(*d, n);
                    heap.push(Item(cand, *d));
                }
            }
        }
    }
    value
        .iter()
        .map(|(n, v)| {
            let mut path = vec![];
            if *v > 0.0 {
                let mut at = *n;
                path.push(at);
                while let Some(p) = pred.get(&at) {
                    at = *p;
                    path.push(at);
                    if path.len() > nodes.len() {
                        break;
                    }
                }
                path.reverse();
            }
            let b = base.get(n).copied().unwrap_or(0.0);
            (*n, NodeRisk { base: b, value: *v, colour: colour(*v), path })
        })
        .collect()
}

/// Who each identity may open a connection to, built once per request.
pub struct Reach {
    adj: BTreeMap<u32, Vec<u32>>,
}

impl Reach {
    pub fn new(links: &[Link]) -> Reach {
        let mut adj: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for l in links {
            adj.entry(l.src).or_default().push(l.dst);
        }
        Reach { adj }
    }

    /// What `id` can reach transitively (itself excluded).
    pub fn from(&self, id: u32) -> BTreeSet<u32> {
        let mut seen = BTreeSet::from([id]);
        let mut q = VecDeque::from([id]);
        while let Some(n) = q.pop_front() {
            for d in self.adj.get(&n).into_iter().flatten() {
                if seen.insert(*d) {
                    q.push_back(*d);
                }
            }
        }
        seen.remove(&id);
        seen
    }
}

/// What `id` can reach transitively over links (itself excluded).
pub fn blast_radius(id: u32, links: &[Link]) -> BTreeSet<u32> {
    Reach::new(links).from(id)
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Containment {
    /// Permitted edges a deny of the identity's egress would cut.
    pub edges_cut: usize,
    /// ... of which were observed in use in the window (what would break).
    pub used_edges_cut: usize,
    /// Identities its blast radius would lose.
    pub reach_lost: usize,
}

/// `reach`: the size of its blast radius, all of which a deny of its egress cuts.
pub fn containment(edges: usize, used: usize, reach: usize) -> Containment {
    Containment { edges_cut: edges, used_edges_cut: used, reach_lost: reach }
}

/// Per source identity's denied attempts: (distinct (dst, port) targets, per-bucket
/// counts oldest first). Returns the incidents found.
pub fn detect(
    now: u64,
    compromised: &BTreeMap<u32, u64>,
    denied_targets: &BTreeMap<u32, BTreeSet<(u32, u16)>>,
    denied_per_bucket: &BTreeMap<u32, Vec<u64>>,
    auth_failures: &BTreeMap<u32, u64>,
    new_identities: &BTreeMap<u32, u64>,
) -> Vec<Incident> {
    let mut out = vec![];
    for (id, at) in compromised {
        out.push(Incident { identity: *id, kind: "compromised", detail: "marked compromised".into(), risk: RISK_COMPROMISED, at: *at });
    }
    for (id, t) in denied_targets {
        if t.len() >= PROBE_TARGETS {
            out.push(Incident {
                identity: *id,
                kind: "probing",
                detail: format!("denied attempts towards {} destination/port pairs", t.len()),
                risk: RISK_PROBING,
                at: now,
            });
        }
    }
    for (id, b) in denied_per_bucket {
        let Some((last, earlier)) = b.split_last() else { continue };
        let mean = if earlier.is_empty() { 0.0 } else { earlier.iter().sum::<u64>() as f64 / earlier.len() as f64 };
        if *last >= SPIKE_MIN && *last as f64 >= SPIKE_FACTOR * mean {
            out.push(Incident {
                identity: *id,
                kind: "drop-spike",
                detail: format!("{last} denied attempts in the last bucket (mean before {mean:.1})"),
                risk: RISK_SPIKE,
                at: now,
            });
        }
    }
    for (id, n) in auth_failures.iter().filter(|(_, n)| **n > 0) {
        out.push(Incident {
            identity: *id,
            kind: "auth-failures",
            detail: format!("{n} flows dropped as auth-required (identity not proven for its node)"),
            risk: RISK_AUTH_FAILURES,
            at: now,
        });
    }
    for (id, at) in new_identities {
        out.push(Incident { identity: *id, kind: "new-identity", detail: "first seen in the window".into(), risk: RISK_NEW, at: *at });
    }
    out
}

/// Base risk per identity: the highest of its incidents.
pub fn base_risk(incidents: &[Incident]) -> BTreeMap<u32, f64> {
    let mut b: BTreeMap<u32, f64> = BTreeMap::new();
    for i in incidents {
        let e = b.entry(i.identity).or_default();
        *e = e.max(i.risk);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(src: u32, dst: u32, used: bool) -> Link {
        Link { src, dst, used }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn propagates_in_connect_direction_with_max_product_and_keeps_the_path() {
        // 1 -> 2 (used) -> 3 (permitted); 1 -> 3 directly (permitted); 4 -> 1.
        let nodes = BTreeSet::from([1, 2, 3, 4]);
        let links = [l(1, 2, true), l(2, 3, false), l(1, 3, false), l(4, 1, true)];
        let r = propagate(&nodes, &BTreeMap::from([(1, 1.0)]), &links);
        assert!(close(r[&1].value, 1.0) && r[&1].path == vec![1]);
        assert!(close(r[&2].value, 0.8) && r[&2].path == vec![1, 2]);
        // max(0.8 * 0.6, 0.6) = 0.6, through the direct edge.
        assert!(close(r[&3].value, 0.6) && r[&3].path == vec![1, 3], "{:?}", r[&3]);
        // Against the connect direction nothing flows: 4 connects to 1, not the reverse.
        assert!(close(r[&4].value, 0.0) && r[&4].path.is_empty());
        assert_eq!((r[&1].colour, r[&2].colour, r[&3].colour, r[&4].colour), ("red", "red", "red", "green"));
    }

    #[test]
    fn longer_product_wins_when_larger_and_cycles_terminate() {
        // 1 -> 2 -> 3 all used: 0.64 beats the direct permitted 0.6. A cycle 3 -> 1.
        let nodes = BTreeSet::from([1, 2, 3]);
        let links = [l(1, 2, true), l(2, 3, true), l(1, 3, false), l(3, 1, true), l(2, 1, true)];
        let r = propagate(&nodes, &BTreeMap::from([(1, 1.0)]), &links);
        assert!(close(r[&3].value, 0.64) && r[&3].path == vec![1, 2, 3], "{:?}", r[&3]);
        assert!(close(r[&1].value, 1.0));
        assert_eq!(r[&3].colour, "red");
    }

    #[test]
    fn own_base_beats_a_weaker_neighbour() {
        let nodes = BTreeSet::from([1, 2, 3]);
        let links = [l(1, 2, false), l(2, 3, false)];
        let r = propagate(&nodes, &BTreeMap::from([(1, 0.5), (2, 0.2)]), &links);
        assert!(close(r[&2].value, 0.3) && r[&2].path == vec![1, 2]);
        assert_eq!(r[&2].colour, "yellow");
        assert!(close(r[&2].base, 0.2));
        assert!(close(r[&3].value, 0.18) && r[&3].path == vec![1, 2, 3] && r[&3].colour == "green");
        let r = propagate(&nodes, &BTreeMap::from([(1, 0.2), (2, 0.5)]), &links);
        assert!(close(r[&2].value, 0.5) && r[&2].path == vec![2]);
    }

    #[test]
    fn colours_at_the_thresholds() {
        assert_eq!((colour(0.0), colour(0.29), colour(YELLOW), colour(0.59), colour(RED), colour(1.0)), ("green", "green", "yellow", "yellow", "red", "red"));
    }

    #[test]
    fn blast_radius_and_containment() {
        let links = [l(1, 2, true), l(2, 3, false), l(3, 2, false), l(4, 1, false)];
        assert_eq!(blast_radius(1, &links), BTreeSet::from([2, 3]));
        assert_eq!(blast_radius(3, &links), BTreeSet::from([2]));
        assert!(blast_radius(5, &links).is_empty());
        assert_eq!(blast_radius(4, &links), BTreeSet::from([1, 2, 3]));
        let c = containment(1, 1, blast_radius(1, &links).len());
        assert_eq!(c, Containment { edges_cut: 1, used_edges_cut: 1, reach_lost: 2 });
    }

    #[test]
    fn incidents_from_probing_spikes_and_new_identities() {
        let targets = BTreeMap::from([(5, BTreeSet::from([(1, 80), (1, 81), (2, 80)])), (6, BTreeSet::from([(1, 80), (2, 80)]))]);
        let buckets = BTreeMap::from([(7, vec![1, 1, 12]), (8, vec![10, 10, 12]), (9, vec![0, 9])]);
        let auth = BTreeMap::from([(11, 2), (12, 0)]);
        let inc = detect(100, &BTreeMap::from([(3, 50)]), &targets, &buckets, &auth, &BTreeMap::from([(4, 90)]));
        let kinds: Vec<(u32, &str)> = inc.iter().map(|i| (i.identity, i.kind)).collect();
        assert_eq!(kinds, vec![(3, "compromised"), (5, "probing"), (7, "drop-spike"), (11, "auth-failures"), (4, "new-identity")]);
        let b = base_risk(&inc);
        assert_eq!(b[&3], RISK_COMPROMISED);
        assert_eq!(b[&5], RISK_PROBING);
        assert_eq!(b[&7], RISK_SPIKE);
        assert_eq!(b[&4], RISK_NEW);
        assert_eq!(b[&11], RISK_AUTH_FAILURES);
        // A spike in an identity's first bucket (no history) counts.
        let inc = detect(100, &BTreeMap::new(), &BTreeMap::new(), &BTreeMap::from([(1, vec![10])]), &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(inc.len(), 1);
    }
}
