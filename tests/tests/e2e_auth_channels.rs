//! Node channels end to end (issue 10), lab `two-nodes` with one agent per node, both on
//! one shared builtin CA (`--svid-ca-dir`, local mode). b (node2) -> a (node1) TCP 80
//! under an `authentication: required` rule, real sockets:
//! - node2's agent proves b's identity to node1's over their channel; once node1 holds
//!   the proof, the first SYN of a new flow passes (both families) with no `auth-required`
//!   drop counted; both agents report the channel up, the clock offset, proofs sent and
//!   received, and `ztctl auth` names node2's proof;
//! - a pod of a new identity starting on node2 is proven on the live channel before its
//!   first flow (which passes, no drop); its removal withdraws the proof;
//! - node2's agent killed: its channel is lost, after the grace (`--auth-peer-grace 2`)
//!   node1 drops node2's proofs, new flows from b are dropped as `auth-required` and a
//!   flow opened before is cut (the epoch bump re-judges it);
//!   node2's agent started again: the channel and the proof come back, new flows pass;
//! - node1's agent restarted while node2's is down: the proofs its predecessor wrote are
//!   kept for the grace (a live flow and new flows pass), then go; node2 back: proven again;
//! - node2's agent on another CA: node1 refuses its node SVID (no channel, counted in
//!   `zt_auth_channels_refused_total`, the reason in `ztctl auth`), b stays unproven.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use zt_testbed::{AgentHandle, Family, ProbeResult, Proto};

/// `A_IN_AUTH_POLICY` and a rule without authentication: UDP 53 from b.
const UDP_RULE: &str = "  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: UDP, port: 53}]
";

/// The SPIFFE ID of e, a pod the test adds to node2.
const E_ID: &str = "spiffe://cluster.local/ns/default/sa/e";

/// The bed with node1's agent on `ca1` and node2's on `ca2`.
fn two_agents(ca1: &Path, ca2: &Path) -> (Bed, AgentHandle) {
    let pods = pods_with_node_ips();
    let flags = |ca: &Path| vec!["--svid-ca-dir".to_string(), ca.display().to_string(), "--auth-peer-grace".into(), "2".into()];
    let f1 = flags(ca1);
    let bed = bed("two-nodes", &[("pods.yaml", &pods), ("50-a.yaml", &format!("{A_IN_AUTH_POLICY}{UDP_RULE}"))], &f1.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(bed.node_ip("node2", Family::V4).unwrap().to_string(), "10.255.0.2", "the bed's default address of node2");
    let mut a2 = vec!["--poll-ms".to_string(), "100".into()];
    a2.extend(flags(ca2));
    let agent2 =
        bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &bed.dir, &a2.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    (bed, agent2)
}

fn peer<'a>(auth: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    auth["peers"].as_array()?.iter().find(|p| p["node"] == node)
}

/// Proofs of b's SPIFFE ID by node2 in node1's map.
fn proven_by_node2(auth: &serde_json::Value) -> bool {
    auth["proofs"].as_array().unwrap().iter().any(|p| p["node"] == "node2" && p["spiffe_id"] == B_ID && p["expires_in_s"].as_i64().unwrap() > 0)
}

/// One new TCP flow b -> a per family; each must pass from its first SYN.
fn flows_pass(bed: &Bed) {
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&pod("default", "b"), &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "b -> a tcp/80 {f:?}");
    }
}

#[test]
fn cross_node_flows_pass_from_the_first_syn_once_proven_and_follow_the_peer_agent() {
    let ca = CaDir::new("follow");
    let (bed, agent2) = two_agents(&ca.0, &ca.0);
    // node2's agent proves b to node1 as soon as both are up; nothing is sent b -> a before.
    wait_for("node1 to hold node2's proof of b", &bed, &agent2, || proven_by_node2(&auth_of(&bed, &bed.agent)));
    let before = auth_drops(&bed);
    flows_pass(&bed);
    assert_eq!(auth_drops(&bed), before, "no auth-required drop: the proof was in place before the first SYN");

    // What the agents report (auth.json and metrics follow the proofs within a second).
    wait_for("both agents to report the channel up", &bed, &agent2, || {
        let (a1, a2) = (auth_of(&bed, &bed.agent), auth_of(&bed, &agent2));
        peer(&a1, "node2").is_some_and(|p| p["state"] == "up" && p["clock_offset_s"].is_number()) && peer(&a2, "node1").is_some_and(|p| p["state"] == "up")
    });
    let a1 = auth_of(&bed, &bed.agent);
    let off = peer(&a1, "node2").unwrap()["clock_offset_s"].as_f64().unwrap();
    assert!(off.abs() < 1.0, "one machine's clock on both nodes: {off}");
    assert!(a1["svids"].as_array().unwrap().iter().any(|s| s["spiffe_id"] == "spiffe://cluster.local/zt/node/node1"), "node SVID listed: {a1}");
    let a2 = auth_of(&bed, &agent2);
    assert!(a2["proofs"].as_array().unwrap().iter().any(|p| p["node"] == "node1"), "node2 holds node1's proof of a: {a2}");
    wait_for("the channel metrics", &bed, &agent2, || {
        let (m1, m2) = (bed.metrics(), Metrics(agent2.metrics().unwrap()));
        m1.get("zt_auth_channel_up", &[("peer", "node2")]) == Some(1.0)
            && m1.get("zt_peer_clock_offset_seconds", &[("peer", "node2")]).is_some()
            && m1.get("zt_auth_proofs_received_total", &[("peer", "node2"), ("kind", "proof")]).unwrap_or(0.0) >= 1.0
            && m1.get("zt_auth_proofs", &[("by", "peers")]).unwrap_or(0.0) >= 1.0
            && m2.get("zt_auth_proofs_sent_total", &[("peer", "node1"), ("kind", "proof")]).unwrap_or(0.0) >= 1.0
    });

    // A pod of a new identity starts on node2 (e: app b, service account e): node2 proves
    // it on the live channel; its first flow passes. Its removal withdraws the proof.
    let e_ips: [std::net::IpAddr; 2] = ["10.200.2.9".parse().unwrap(), "fd00:200:2::9".parse().unwrap()];
    let mut e = zt_testbed::Pod::new("default", "e", "node2", &e_ips, &[(Proto::Tcp, 80)]);
    e.labels.insert("app".into(), "b".into());
    e.service_account = Some("e".into());
    bed.add_pod(e.clone()).unwrap();
    bed.write("05-pod-e.yaml", &e.to_yaml());
    let has_e = |a: &serde_json::Value| a["proofs"].as_array().unwrap().iter().any(|p| p["node"] == "node2" && p["spiffe_id"] == E_ID);
    wait_for("node1 to hold node2's proof of e", &bed, &agent2, || has_e(&auth_of(&bed, &bed.agent)));
    let before = auth_drops(&bed);
    for f in FAMILIES {
        let to = tgt("default", "a", f);
        assert_eq!(bed.tb.probe(&pod("default", "e"), &to, Proto::Tcp, 80, ALLOWED), ok("default/a"), "e -> a tcp/80 {f:?}");
    }
    assert_eq!(auth_drops(&bed), before, "e proven before its first SYN");
    bed.remove("05-pod-e.yaml");
    bed.tb.remove_pod("default", "e").unwrap();
    wait_for("node2's withdrawal of e", &bed, &agent2, || {
        let withdrawn = bed.metrics().get("zt_auth_proofs_received_total", &[("peer", "node2"), ("kind", "withdrawal")]).unwrap_or(0.0) >= 1.0;
        withdrawn && !has_e(&auth_of(&bed, &bed.agent))
    });

    // node2's agent dies: node1 loses the channel, and after the grace, the proofs; the
    // epoch bump re-judges live flows, so an open flow b -> f:7000 is cut too.
    // f: a second pod of a's identity on node1 that echoes lines on 7000.
    let mut live = live_flow_b_to_f(&bed, &agent2);
    agent2.kill();
    wait_for("node1 to drop node2's proofs after the grace", &bed, &agent2, || {
        let a = auth_of(&bed, &bed.agent);
        let none = a["proofs"].as_array().unwrap().iter().all(|p| p["node"] == "this node");
        none && peer(&a, "node2").is_some_and(|p| p["state"] != "up")
    });
    let before = auth_drops(&bed);
    for f in FAMILIES {
        assert_eq!(bed.probe(&pod("default", "b"), &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "b unproven now ({f:?})");
    }
    assert!(!live.roundtrip(DENIED), "the live flow is revoked with the proof");
    let after = auth_drops(&bed);
    assert!(after >= before + 3.0, "auth-required drops counted: {before} -> {after}");
    wait_for("zt_auth_channel_up 0", &bed, &agent2, || bed.metrics().get("zt_auth_channel_up", &[("peer", "node2")]) == Some(0.0));

    // Back: the channel and the proof return, new flows pass from their first SYN.
    agent2.start().unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("node1 to hold node2's proof again", &bed, &agent2, || proven_by_node2(&auth_of(&bed, &bed.agent)));
    let before = auth_drops(&bed);
    flows_pass(&bed);
    assert_eq!(auth_drops(&bed), before, "no auth-required drop after the peer came back");

    // node1's agent restarts while node2's is down (stopped first, then node2 killed, so
    // node1 never saw the channel go): only the proofs the old agent left in the map can
    // admit b now. The new agent keeps them for its grace (10 s here): a live flow and new
    // flows pass; after the grace they go. node2 back: proven again.
    let mut live = None;
    wait_for("a flow b -> f tcp/7000 again", &bed, &agent2, || {
        live = bed.open_tcp(&pod("default", "b"), &tgt("default", "f", Family::V4), 7000, ALLOWED).ok();
        live.as_mut().is_some_and(|l| l.roundtrip(ALLOWED))
    });
    let mut live = live.unwrap();
    bed.agent.set_flag("--auth-peer-grace", "10");
    bed.agent.stop();
    agent2.kill();
    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    let before = auth_drops(&bed);
    assert!(live.roundtrip(ALLOWED), "the live flow survives node1's agent restart");
    flows_pass(&bed);
    assert_eq!(auth_drops(&bed), before, "no auth-required drop across node1's restart");
    wait_for("node1's new agent to let the old proofs go after its grace", &bed, &agent2, || {
        // Only this node's own proofs (a peer's number is shown by name once auth.json names it).
        auth_of(&bed, &bed.agent)["proofs"].as_array().unwrap().iter().all(|p| p["node"] == "this node")
    });
    assert!(!live.roundtrip(DENIED), "revoked once the old proofs went");
    assert_eq!(bed.probe(&pod("default", "b"), &tgt("default", "a", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    agent2.start().unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("node1 to hold node2's proof from the new channel", &bed, &agent2, || proven_by_node2(&auth_of(&bed, &bed.agent)));
    flows_pass(&bed);
}

#[test]
fn a_peer_with_an_svid_of_another_ca_is_refused() {
    let (ca1, ca2) = (CaDir::new("refuse1"), CaDir::new("refuse2"));
    let (bed, agent2) = two_agents(&ca1.0, &ca2.0);
    // node1 (the lower name) dials node2, whose node SVID does not chain to node1's root.
    wait_for("node1 to refuse node2's channel", &bed, &agent2, || {
        bed.metrics().get("zt_auth_channels_refused_total", &[("peer", "node2")]).unwrap_or(0.0) >= 1.0
    });
    let a1 = auth_of(&bed, &bed.agent);
    let p = peer(&a1, "node2").unwrap_or_else(|| panic!("{a1}"));
    assert_ne!(p["state"], "up", "{a1}");
    let reason = p["last_error"]["reason"].as_str().unwrap_or_default();
    assert!(matches!(reason, "bad-signature" | "unknown-issuer"), "the chain does not verify: {a1}");
    assert!(!proven_by_node2(&a1), "nothing proven over a refused channel: {a1}");
    assert_eq!(bed.metrics().get("zt_auth_channel_up", &[("peer", "node2")]), Some(0.0));
    assert_eq!(bed.metrics().get("zt_auth_proofs", &[("by", "peers")]), Some(0.0));
    // The plain rule passes (the policy is in place); the authenticated one drops.
    bed.wait_probe(&pod("default", "b"), &tgt("default", "a", Family::V4), Proto::Udp, 53, &ok("default/a"));
    let before = auth_drops(&bed);
    assert_eq!(bed.probe(&pod("default", "b"), &tgt("default", "a", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    assert!(auth_drops(&bed) >= before + 1.0);
    assert!(auth_of(&bed, &agent2)["peers"].as_array().unwrap().iter().all(|p| p["state"] != "up"), "node2 has no channel either");
}
