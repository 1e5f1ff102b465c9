//! Node channels on SPIRE end to end (issue 10): lab `two-nodes`, one agent per node, both
//! with `--svid-source spire:<socket>` against ONE SPIRE stand-in (zt_testbed::spire, the
//! Delegated Identity API on a Unix socket) that serves both nodes: a node entry per node
//! (`k8s:ns:zt-system`, `k8s:sa:zt-agent`, `k8s:node-name:<node>`), an entry for a's and b's
//! service account (`k8s:ns`, `k8s:sa`) and one for c by its pod UID. b (node2) -> a (node1)
//! TCP 80 under an `authentication: required` rule, real sockets:
//! - both agents get their node SVID and their pods' SVIDs from SPIRE (node2 asks for b's by
//!   b's pod UID and node name; c's pod-uid entry is proven too); once node1 holds node2's
//!   proof of b, the first SYN of a new flow passes (both families) with zero
//!   `auth-required` drops; `ztctl auth` names the source, its streams up, and the metrics
//!   and /readyz say SPIRE is up;
//! - an SVID rotation SPIRE pushes (b's identity and node2's node SVID) reaches node1 as a
//!   new proof (shorter expiry), and a root rotation A -> A+B -> B (every SVID re-signed by
//!   B) too, under a live cross-node TCP flow: the flow keeps working, new flows pass, zero
//!   `auth-required` drops; node2's agent restarted after it: the channel comes back on
//!   B-signed node SVIDs verified against bundle B;
//! - node1's node SVID rotated (node1 dials): node1 renews the channel make-before-break
//!   (`zt_auth_channel_renewals_total` on both ends, `ztctl auth` shows the new not-after
//!   and when the channel renews next), the live flow keeps working, zero drops;
//! - the stand-in stopped: both agents report SPIRE down (`zt_svid_source_up 0`, /readyz
//!   503 naming the SVID source, `ztctl auth` a problem) and enforcement continues with the
//!   SVIDs held (the live flow and new flows pass, zero drops); back: streams up, ready, and
//!   a rotation pushed then reaches node1 again;
//! - b2, a second pod of b's identity, starts on node2 and b leaves: node2 asks SPIRE again
//!   with b2's pod UID, nothing is withdrawn, b2's first SYN passes.
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use zt_testbed::spire::SpireStandIn;
use zt_testbed::{AgentHandle, Proto};

const B_UID: &str = "00000000-0000-4000-8000-0000000000b2";
const C_UID: &str = "00000000-0000-4000-8000-0000000000c2";

/// The stand-in's socket path, removed at the start and on drop (also when the test fails).
struct Socket(PathBuf);

impl Socket {
    fn new() -> Socket {
        let p = std::env::temp_dir().join(format!("zt-e2e-spire-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Socket(p)
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Seconds left on node2's proof of b in node1's map.
fn node2_proof_of_b(bed: &Bed) -> Option<i64> {
    let a = auth_of(bed, &bed.agent);
    a["proofs"].as_array()?.iter().find(|p| p["node"] == "node2" && p["spiffe_id"] == B_ID).and_then(|p| p["expires_in_s"].as_i64()).filter(|s| *s > 0)
}

/// The not-after `agent` reports for its SVID of `id` (unix seconds).
fn svid_not_after(bed: &Bed, agent: &AgentHandle, id: &str) -> Option<i64> {
    auth_of(bed, agent)["svids"].as_array()?.iter().find(|s| s["spiffe_id"] == id)?["not_after"].as_i64()
}

fn peer<'a>(auth: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    auth["peers"].as_array()?.iter().find(|p| p["node"] == node)
}

fn source_up(agent: &AgentHandle) -> Option<f64> {
    Metrics(agent.metrics().ok()?).get("zt_svid_source_up", &[("source", "spire")])
}

/// One new TCP flow b -> a per family; each must pass from its first SYN.
fn flows_pass(bed: &Bed) {
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&pod("default", "b"), &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "b -> a tcp/80 {f:?}");
    }
}

/// New flows pass, the live one still echoes, and no `auth-required` drop was counted.
fn nothing_lost(bed: &Bed, live: &mut zt_testbed::TcpFlow, drops_before: f64, when: &str) {
    assert!(live.roundtrip(ALLOWED), "{when}: the live flow b -> f keeps working");
    flows_pass(bed);
    assert_eq!(auth_drops(bed), drops_before, "{when}: no auth-required drop");
}

#[test]
fn two_agents_on_one_spire_prove_rotate_and_ride_out_an_outage() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sock = Socket::new();
    let spire = rt.block_on(SpireStandIn::start(&sock.0, "cluster.local")).unwrap();
    for n in ["node1", "node2"] {
        spire.register(&node_id(n), &["k8s:ns:zt-system", "k8s:sa:zt-agent", &format!("k8s:node-name:{n}")]);
    }
    spire.register(B_ID, &["k8s:ns:default", "k8s:sa:default"]);
    // c's entry by its pod UID (as per-pod entries are made).
    spire.register(C_ID, &[&format!("k8s:pod-uid:{C_UID}"), "k8s:ns:other"]);

    let source = format!("spire:{}", sock.0.display());
    let pods = pods_with_node_ips();
    assert!(pods.contains(B_UID), "labs/two-nodes/pods.yaml changed: b's UID");
    let bed = bed("two-nodes", &[("pods.yaml", &pods), ("50-a.yaml", A_IN_AUTH_POLICY)], &["--svid-source", &source]);
    let agent2 = bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &bed.dir, &["--poll-ms", "100", "--svid-source", &source]).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();

    // Proven over the channel, from SPIRE's SVIDs; nothing was sent b -> a before.
    wait_for("node1 to hold node2's proof of b", &bed, &agent2, || node2_proof_of_b(&bed).is_some());
    let before = auth_drops(&bed);
    flows_pass(&bed);
    assert_eq!(auth_drops(&bed), before, "no auth-required drop: proven before the first SYN");
    let subs = spire.subscriptions();
    assert!(
        subs.iter().any(|s| s.contains(&format!("k8s:pod-uid:{B_UID}")) && s.contains(&"k8s:node-name:node2".to_string())),
        "node2 asked for b's SVID by b's pod UID and its node name: {subs:?}"
    );
    assert!(subs.iter().any(|s| *s == ["k8s:node-name:node1", "k8s:ns:zt-system", "k8s:sa:zt-agent"]), "node1's node selectors: {subs:?}");
    wait_for("node1 to hold node2's proof of c (a pod-uid entry)", &bed, &agent2, || {
        auth_of(&bed, &bed.agent)["proofs"].as_array().unwrap().iter().any(|p| p["node"] == "node2" && p["spiffe_id"] == C_ID)
    });
    let a2 = auth_of(&bed, &agent2);
    assert_eq!(a2["source"]["source"], source.as_str(), "{a2}");
    let spire_svid = |a: &AgentHandle, n: &str| svid_not_after(&bed, a, &node_id(n)) == spire.current(&node_id(n)).map(|s| s.expires_at);
    wait_for("node2's node SVID to be SPIRE's", &bed, &agent2, || spire_svid(&agent2, "node2"));
    wait_for("both agents to report SPIRE up and be ready", &bed, &agent2, || {
        [&bed.agent, &agent2].iter().all(|a| {
            let st = auth_of(&bed, a);
            st["source"]["up"] == true
                && st["source"]["streams"].as_array().is_some_and(|s| s.len() >= 3 && s.iter().all(|s| s["up"] == true))
                && source_up(a) == Some(1.0)
                && a.http_get("/readyz").is_ok()
        })
    });
    let m2 = Metrics(agent2.metrics().unwrap());
    assert_eq!(m2.get("zt_svid_source_streams", &[("state", "down")]), Some(0.0));
    // The table form names the source and its streams.
    let text = bed.ztctl(&["auth"]);
    assert!(text.contains(&format!("SVID source {source} (up), roots cluster.local: 1")), "{text}");
    assert!(text.contains(&node_id("node1")) && text.contains("bundles"), "{text}");

    // A live flow b -> f:7000 (f: a's identity on node1, echoing) through all that follows.
    let mut live = live_flow_b_to_f(&bed, &agent2);
    let drops = auth_drops(&bed);

    // SVID rotation pushed by SPIRE (shorter lifetime, so that the new proof is told apart).
    spire.set_validity(Duration::from_secs(3000), Duration::from_secs(10));
    spire.rotate(B_ID).unwrap();
    spire.rotate(&node_id("node2")).unwrap();
    wait_for("node1 to hold node2's proof of b's rotated SVID", &bed, &agent2, || node2_proof_of_b(&bed).is_some_and(|s| s <= 3000));
    wait_for("node2 to hold its rotated node SVID", &bed, &agent2, || spire_svid(&agent2, "node2"));
    nothing_lost(&bed, &mut live, drops, "after an SVID rotation");

    // node1's node SVID rotated (node1 dials node2): node1 renews its channel make-before-break,
    // a new channel on the new SVID swapped in (counted by reason on both ends; both report
    // the new not-after), under the live flow, zero drops.
    let renewals = |m: &Metrics, peer: &str, reason: &str| m.get("zt_auth_channel_renewals_total", &[("peer", peer), ("reason", reason)]).unwrap_or(0.0);
    let (r1, r2) = (renewals(&bed.metrics(), "node2", "own-svid-rotated"), renewals(&Metrics(agent2.metrics().unwrap()), "node1", "by-peer"));
    spire.set_validity(Duration::from_secs(2900), Duration::from_secs(10));
    let rotated = spire.rotate(&node_id("node1")).unwrap().expires_at;
    let channel = |a: &serde_json::Value, n: &str, k: &str| peer(a, n).and_then(|p| p["channel"][k].as_i64());
    wait_for("node1 to renew its channel to node2 on its rotated node SVID", &bed, &agent2, || {
        let (a1, a2) = (auth_of(&bed, &bed.agent), auth_of(&bed, &agent2));
        renewals(&bed.metrics(), "node2", "own-svid-rotated") > r1
            && renewals(&Metrics(agent2.metrics().unwrap()), "node1", "by-peer") > r2
            && channel(&a1, "node2", "svid_not_after") == Some(rotated)
            && channel(&a2, "node1", "peer_svid_not_after") == Some(rotated)
    });
    let a1 = auth_of(&bed, &bed.agent);
    assert_eq!(peer(&a1, "node2").unwrap()["state"], "up", "{a1}");
    let renews_at = channel(&a1, "node2", "renews_at").expect("the dialler shows when it renews");
    let peer_until = channel(&a1, "node2", "peer_svid_not_after").unwrap();
    assert!(renews_at < peer_until, "renewed before node2's SVID expires: {a1}");
    nothing_lost(&bed, &mut live, drops, "after node1's channel was renewed");
    assert!(node2_proof_of_b(&bed).is_some(), "node2's proofs held across the swap");

    // Root rotation A -> A+B -> B, every SVID re-signed by B in between.
    spire.publish_next_root().unwrap();
    let roots = |a: &AgentHandle, n: i64| auth_of(&bed, a)["source"]["roots"]["cluster.local"].as_i64() == Some(n);
    wait_for("both agents to hold A+B", &bed, &agent2, || roots(&bed.agent, 2) && roots(&agent2, 2));
    spire.set_validity(Duration::from_secs(2800), Duration::from_secs(10));
    spire.activate_newest_root();
    spire.rotate_all().unwrap();
    wait_for("node1 to hold node2's proof of b signed by B", &bed, &agent2, || node2_proof_of_b(&bed).is_some_and(|s| s <= 2800));
    wait_for("both agents to hold their B-signed node SVIDs", &bed, &agent2, || spire_svid(&bed.agent, "node1") && spire_svid(&agent2, "node2"));
    nothing_lost(&bed, &mut live, drops, "with bundle A+B and SVIDs of B");
    spire.retire_inactive_roots();
    wait_for("both agents to hold B only", &bed, &agent2, || roots(&bed.agent, 1) && roots(&agent2, 1));
    nothing_lost(&bed, &mut live, drops, "with bundle B");
    let refused = |m: &Metrics| m.get("zt_auth_channels_refused_total", &[("peer", "node2")]).unwrap_or(0.0);
    assert_eq!(refused(&bed.metrics()), 0.0);
    // A new channel on B alone: node2's agent restarted; node1 dials it again (B-signed SVIDs
    // both ways, verified against bundle B). Proofs sent on it reach node1.
    let received = || bed.metrics().get("zt_auth_proofs_received_total", &[("peer", "node2"), ("kind", "proof")]).unwrap_or(0.0);
    let received_before = received();
    agent2.stop();
    agent2.start().unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    wait_for("a new channel node1 <-> node2 under bundle B", &bed, &agent2, || {
        let a1 = auth_of(&bed, &bed.agent);
        let up = a1["peers"].as_array().unwrap().iter().any(|p| p["node"] == "node2" && p["state"] == "up");
        up && received() > received_before
    });
    assert_eq!(refused(&bed.metrics()), 0.0, "no channel refused across the root rotation");
    for m in [bed.metrics(), Metrics(agent2.metrics().unwrap())] {
        assert_eq!(m.get("zt_auth_channels_closed_total", &[]), None, "no channel closed for its peer's SVID across the rotations");
    }
    nothing_lost(&bed, &mut live, drops, "after node2's agent restart under bundle B");

    // SPIRE stops: both agents say so; enforcement continues with what is held.
    rt.block_on(spire.stop());
    wait_for("both agents to report SPIRE down", &bed, &agent2, || {
        [&bed.agent, &agent2].iter().all(|a| {
            let ready = a.http_get("/readyz");
            let Ok(m) = a.metrics().map(Metrics) else { return false };
            let st = auth_of(&bed, a);
            m.get("zt_svid_source_up", &[("source", "spire")]) == Some(0.0)
                && ready.as_ref().is_err_and(|e| e.to_string().contains("SVID source spire:"))
                // The bundle, node and pod streams; failed refreshes counted.
                && m.get("zt_svid_source_streams", &[("state", "down")]).unwrap_or(0.0) >= 3.0
                && m.get("zt_svid_refresh_errors_total", &[]).unwrap_or(0.0) >= 1.0
                && st["source"]["up"] == false
                && st["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("is down"))
        })
    });
    nothing_lost(&bed, &mut live, drops, "while SPIRE is down");
    assert!(node2_proof_of_b(&bed).is_some(), "the proof stays while the SVID is valid");

    // SPIRE back: streams up, ready again, and a rotation it pushes reaches node1.
    rt.block_on(spire.restart()).unwrap();
    wait_for("both agents to report SPIRE up again", &bed, &agent2, || {
        [&bed.agent, &agent2].iter().all(|a| source_up(a) == Some(1.0) && a.http_get("/readyz").is_ok())
    });
    spire.set_validity(Duration::from_secs(2600), Duration::from_secs(10));
    spire.rotate(B_ID).unwrap();
    wait_for("node1 to hold the proof of b's SVID issued after the outage", &bed, &agent2, || node2_proof_of_b(&bed).is_some_and(|s| s <= 2600));
    nothing_lost(&bed, &mut live, drops, "after SPIRE came back");

    // Pods sharing a SPIFFE ID share one subscription (made with b's UID). b2, a second pod
    // of b's identity on node2, starts; b leaves: node2 asks again with b2's UID, its proof
    // is never withdrawn, and b2's flows pass from the first SYN.
    let mut b2 = zt_testbed::Pod::new("default", "b2", "node2", &["10.200.2.9".parse().unwrap(), "fd00:200:2::9".parse().unwrap()], &[(Proto::Tcp, 80)]);
    b2.labels.insert("app".into(), "b".into());
    bed.add_pod(b2.clone()).unwrap();
    bed.write("05-pod-b2.yaml", &b2.to_yaml());
    let withdrawals = || bed.metrics().get("zt_auth_proofs_received_total", &[("peer", "node2"), ("kind", "withdrawal")]).unwrap_or(0.0);
    let withdrawn_before = withdrawals();
    let without_b: Vec<&str> = pods.split("\n---\n").filter(|d| !d.contains(&format!("uid: {B_UID}"))).collect();
    assert_eq!(without_b.len() + 1, pods.split("\n---\n").count(), "one document is b");
    bed.write("pods.yaml", &without_b.join("\n---\n"));
    bed.tb.remove_pod("default", "b").unwrap();
    wait_for("node2 to ask for b's identity with b2's UID", &bed, &agent2, || {
        spire.subscriptions().iter().any(|s| s.contains(&format!("k8s:pod-uid:{}", b2.uid)) && s.contains(&"k8s:node-name:node2".to_string()))
    });
    assert_eq!(withdrawals(), withdrawn_before, "b's identity was never withdrawn: b2 still holds it");
    assert!(node2_proof_of_b(&bed).is_some());
    let before = auth_drops(&bed);
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&pod("default", "b2"), &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "b2 -> a tcp/80 {f:?}");
    }
    assert_eq!(auth_drops(&bed), before, "b2 proven from its first SYN");
    let a2 = auth_of(&bed, &agent2);
    assert!(a2["source"]["streams"].as_array().unwrap().iter().all(|s| s["up"] == true), "the new subscription is up: {a2}");
}
