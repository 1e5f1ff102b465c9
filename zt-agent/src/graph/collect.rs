//! Feeding the graph: drop (and allow) events from the agent's event channel, and
//! periodic conntrack scans for allowed flows. A scan counts a flow once, in the scan
//! after it was created (its `created_ns` falls between the two scans' starts); a
//! flow between two local pods has one entry per hook, counted once by its 5-tuple. A
//! live flow with traffic since the last scan refreshes its edge's last seen.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::broadcast;
use zt_common::*;

use super::observed::{EdgeKey, Observation};
use super::{now_s, proto_number, reason_static, FlowTuple, SharedGraph};
use crate::events::EventRecord;
use crate::net::from_key;
use crate::pins::{open_map, CtMap};

/// Events into the graph until the channel closes.
pub async fn events(graph: SharedGraph, mut rx: broadcast::Receiver<EventRecord>) {
    loop {
        match rx.recv().await {
            Ok(ev) => {
                let mut g = graph.lock().unwrap();
                add_event(&mut g, &ev, now_s());
            }
            Err(broadcast::error::RecvError::Lagged(n)) => graph.lock().unwrap().events_lagged += n,
            Err(_) => return,
        }
    }
}

pub fn add_event(g: &mut super::Graph, ev: &EventRecord, at_s: u64) {
    let allowed = ev.verdict == "allow";
    let proto = proto_number(&ev.proto);
    let key = EdgeKey { src: ev.src.identity, dst: ev.dst.identity, proto, port: ev.dst.port };
    g.add(Observation { key, allowed, reason: reason_static(&ev.reason), rule: ev_rule_id(g, ev), count: 1, at_s });
    if allowed {
        g.remember_flow((ev.src.ip, ev.dst.ip, ev.src.port, ev.dst.port, proto));
    }
}

/// Events carry the rule's name; the graph keeps ids (names come from the policy view).
fn ev_rule_id(g: &super::Graph, ev: &EventRecord) -> u32 {
    let Some(name) = &ev.rule else { return 0 };
    let Some(view) = &g.view else { return 0 };
    view.rules.values().find(|r| format!("{} {}", r.source, r.path) == *name).map(|r| r.id).unwrap_or(0)
}

/// One conntrack entry as the graph reads it.
#[derive(Clone, Copy, Debug)]
pub struct CtFlow {
    pub key: CtKey,
    pub value: CtValue,
}

impl CtFlow {
    fn tuple(&self) -> FlowTuple {
        (from_key(self.key.saddr), from_key(self.key.daddr), self.key.sport, self.key.dport, self.key.proto)
    }

    fn edge(&self) -> EdgeKey {
        let (src, dst) = if self.key.dir == DIR_INGRESS { (self.value.peer_id, self.value.local_id) } else { (self.value.local_id, self.value.peer_id) };
        EdgeKey { src, dst, proto: self.key.proto, port: self.value.policy_port }
    }
}

/// The scan state: the previous scan's start (monotonic ns).
#[derive(Default)]
pub struct CtScan {
    prev_start_ns: u64,
}

impl CtScan {
    /// Adds what `flows` (read at `start_ns`, monotonic) show: new flows counted, live
    /// ones refreshed. `wall_offset_s` turns monotonic seconds into Unix seconds.
    pub fn apply(&mut self, g: &mut super::Graph, flows: &[CtFlow], start_ns: u64, wall_now_s: u64) {
        let to_wall = |mono_ns: u64| wall_now_s.saturating_sub(start_ns.saturating_sub(mono_ns) / 1_000_000_000);
        // One count per 5-tuple: prefer the entry that names a rule.
        let mut new: BTreeMap<FlowTuple, CtFlow> = BTreeMap::new();
        for f in flows {
            if f.value.created_ns >= self.prev_start_ns && f.value.created_ns < start_ns {
                let t = f.tuple();
                if g.counted_by_event(&t) {
                    continue;
                }
                match new.get(&t) {
                    Some(prev) if prev.value.rule_id != 0 || f.value.rule_id == 0 => {
                        // Keep the other hook's rule too.
                        if f.value.rule_id != 0 {
                            g.add(Observation {
                                key: f.edge(),
                                allowed: true,
                                reason: reason_name(f.value.reason),
                                rule: f.value.rule_id,
                                count: 0,
                                at_s: to_wall(f.value.created_ns),
                            });
                        }
                    }
                    _ => {
                        if let Some(prev) = new.insert(t, *f) {
                            if prev.value.rule_id != 0 {
                                g.add(Observation {
                                    key: prev.edge(),
                                    allowed: true,
                                    reason: reason_name(prev.value.reason),
                                    rule: prev.value.rule_id,
                                    count: 0,
                                    at_s: to_wall(prev.value.created_ns),
                                });
                            }
                        }
                    }
                }
            } else if f.value.last_seen_ns >= self.prev_start_ns && f.value.created_ns < self.prev_start_ns {
                g.add(Observation {
                    key: f.edge(),
                    allowed: true,
                    reason: reason_name(f.value.reason),
                    rule: f.value.rule_id,
                    count: 0,
                    at_s: to_wall(f.value.last_seen_ns),
                });
            }
        }
        for f in new.values() {
            g.add(Observation {
                key: f.edge(),
                allowed: true,
                reason: reason_name(f.value.reason),
                rule: f.value.rule_id,
                count: 1,
                at_s: to_wall(f.value.created_ns),
            });
        }
        g.rotate_recent();
        self.prev_start_ns = start_ns;
    }
}

fn reason_name(r: u8) -> &'static str {
    Reason::from_u8(r).map(|r| r.name()).unwrap_or("other")
}

fn read(map: &CtMap, out: &mut Vec<CtFlow>) {
    for item in map.iter() {
        if let Ok((key, value)) = item {
            out.push(CtFlow { key, value });
        }
    }
}

/// Scans both conntrack maps every `interval` on a thread of its own (map walks are
/// syscalls) until the process ends.
pub fn spawn_ct_scanner(bpffs_root: &Path, interval: Duration, graph: SharedGraph, metrics: crate::metrics::Shared) -> Result<()> {
    let new: CtMap = aya::maps::HashMap::try_from(open_map(bpffs_root, MAP_CT)?)?;
    let est: CtMap = open_map(bpffs_root, MAP_CT_EST)?.try_into()?;
    std::thread::Builder::new().name("zt-graph-ct".into()).spawn(move || {
        let mut scan = CtScan::default();
        let mut flows = vec![];
        loop {
            // The conntrack stamps' clock, so that a flow created just after the scan
            // started is never stamped before that start.
            let start = crate::clock::monotonic_coarse_ns();
            flows.clear();
            read(&new, &mut flows);
            read(&est, &mut flows);
            let now = now_s();
            let counts = {
                let mut g = graph.lock().unwrap();
                scan.apply(&mut g, &flows, start, now);
                g.counts()
            };
            metrics.lock().unwrap().graph = Some(counts);
            std::thread::sleep(interval);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{observed::Limits, permitted::tests::lab, Graph};
    use super::*;
    use crate::net::to_key;

    fn flow(dir: u8, local: u32, peer: u32, sport: u16, created_s: u64, last_s: u64, rule: u32) -> CtFlow {
        let (s, d) = ("10.0.0.20".parse().unwrap(), "10.0.0.10".parse().unwrap());
        CtFlow {
            key: CtKey { saddr: to_key(s), daddr: to_key(d), sport, dport: 80, proto: 6, dir, icmp_tag: 0, _pad: 0, ifindex: 7 },
            value: CtValue {
                created_ns: created_s * 1_000_000_000,
                last_seen_ns: last_s * 1_000_000_000,
                local_id: local,
                peer_id: peer,
                rule_id: rule,
                policy_port: 80,
                reason: Reason::AllowPolicy as u8,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_flow_is_counted_once_across_hooks_and_scans() {
        let mut g = Graph::new("n", Limits::default(), 100);
        g.set_view(lab(), 0);
        let mut scan = CtScan::default();
        // sleep -> httpbin seen at both hooks (egress of sleep, ingress of httpbin).
        let both = [flow(DIR_EGRESS, 256, 257, 40000, 5, 6, 1), flow(DIR_INGRESS, 257, 256, 40000, 5, 6, 2)];
        scan.apply(&mut g, &both, 10_000_000_000, 1_000_010);
        // Still there at the next scan, with traffic: not counted again.
        let later = [flow(DIR_EGRESS, 256, 257, 40000, 5, 15, 1), flow(DIR_INGRESS, 257, 256, 40000, 5, 15, 2)];
        scan.apply(&mut g, &later, 20_000_000_000, 1_000_020);
        let w = g.observed.window(1_000_020, 600);
        let e = &w[&EdgeKey { src: 256, dst: 257, proto: 6, port: 80 }];
        assert_eq!(e.allowed, 1);
        assert_eq!(e.rules, std::collections::BTreeSet::from([1, 2]));
        // Monotonic 15 s was 5 s before the scan at wall 1_000_020.
        assert_eq!((e.first_seen, e.last_seen), (1_000_005, 1_000_015));
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn a_flow_an_allow_event_counted_is_not_counted_again() {
        let mut g = Graph::new("n", Limits::default(), 100);
        g.set_view(lab(), 0);
        let f = flow(DIR_EGRESS, 256, 257, 40001, 5, 6, 1);
        g.remember_flow(f.tuple());
        CtScan::default().apply(&mut g, &[f], 10_000_000_000, 1_000_010);
        assert!(g.observed.window(1_000_010, 600).is_empty());
    }

    #[test]
    fn drop_and_allow_events_become_observations() {
        use crate::events::{EventRecord, Side};
        let mut g = Graph::new("n", Limits::default(), 100);
        g.set_view(lab(), 0);
        let side = |ip: &str, port: u16, identity: u32| Side { ip: ip.parse().unwrap(), port, identity, spiffe_id: String::new(), pod: None };
        let ev = |verdict: &str, reason: &str, rule: Option<&str>, sport: u16| EventRecord {
            time_ns: 0,
            direction: "egress".into(),
            verdict: verdict.into(),
            reason: reason.into(),
            proto: "TCP".into(),
            src: side("10.0.0.30", sport, 258),
            dst: side("10.0.0.10", 80, 257),
            rule: rule.map(str::to_string),
            ifindex: 3,
            http: None,
        };
        add_event(&mut g, &ev("drop", "policy-default-deny", None, 5000), 1000);
        add_event(&mut g, &ev("drop", "policy-default-deny", None, 5001), 1001);
        add_event(&mut g, &ev("allow", "policy", Some("ZeroTrustPolicy default/r1 spec.egress[0]"), 5002), 1002);
        add_event(&mut g, &ev("drop", "no-such-reason", None, 5003), 1003);
        let w = g.observed.window(1003, 600);
        let e = &w[&EdgeKey { src: 258, dst: 257, proto: 6, port: 80 }];
        assert_eq!((e.denied, e.allowed), (3, 1));
        assert_eq!((e.counts["drop/policy-default-deny"], e.counts["drop/other"], e.counts["allow/policy"]), (2, 1, 1));
        // The rule's name is mapped back to its id; the allowed flow is not counted again
        // by a conntrack scan.
        assert_eq!(e.rules, std::collections::BTreeSet::from([1]));
        assert!(g.counted_by_event(&("10.0.0.30".parse().unwrap(), "10.0.0.10".parse().unwrap(), 5002, 80, 6)));
        assert!(!g.counted_by_event(&("10.0.0.30".parse().unwrap(), "10.0.0.10".parse().unwrap(), 5000, 80, 6)));
    }
}
