//! Authentication end to end (issue 10), lab `two-nodes` with one agent, on node1. node2
//! runs no agent: nothing proves its pods' identities, so node2 stands for a host that
//! puts a pod's address on packets without holding a proof. b (node2) -> a (node1), real
//! sockets:
//! - TCP 80 under an `authentication: required` rule: dropped, counted `auth-required`,
//!   and `ztctl explain` names the missing proof;
//! - UDP 53 under a plain rule from the same peer: allowed;
//! - a (node1) is proven by its own agent: `ztctl auth` lists that proof;
//! - a STRICT namespace: a new pod d of node1 (proven by node1's agent) reaches a and is
//!   counted `authenticated`; b reaches a on no port.
//! A peer agent that proves b over a node channel: `e2e_auth_channels.rs`.
mod common;

use common::*;
use zt_testbed::{Family, ProbeResult, Proto};

const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: a-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: a}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 80}]
    authentication: required
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: UDP, port: 53}]
";

#[test]
fn an_unproven_peer_is_dropped_on_an_auth_required_rule_and_allowed_on_a_plain_one() {
    let bed = bed("two-nodes", &[("50-a.yaml", POLICY)], &[]);
    let (b, a4, a6) = (pod("default", "b"), tgt("default", "a", Family::V4), tgt("default", "a", Family::V6));
    // The plain rule first: once it passes, the policy is in place.
    bed.wait_probe(&b, &a4, Proto::Udp, 53, &ok("default/a"));
    assert_eq!(bed.probe(&b, &a6, Proto::Udp, 53), ok("default/a"));
    let before = auth_drops(&bed);
    for t in [&a4, &a6] {
        assert_eq!(bed.probe(&b, t, Proto::Tcp, 80), ProbeResult::Timeout, "b is not proven for node2: auth-required");
    }
    let after = auth_drops(&bed);
    assert!(after >= before + 2.0, "auth-required drops counted: {before} -> {after}");
    let e = bed.ztctl_json(&["explain", "default/b", "default/a", "tcp/80"]);
    let check = &e["checks"][0];
    assert_eq!((check["verdict"].as_str(), check["reason"].as_str()), (Some("drop"), Some("auth-required")), "{e}");
    assert!(check["trace"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains("ZT_AUTH_PROOFS")), "{e}");
    // a is proven by node1's own agent.
    let auth = bed.ztctl_json(&["auth"]);
    let proofs = auth["proofs"].as_array().unwrap();
    assert!(proofs.iter().any(|p| p["node"] == "this node" && p["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/default"), "{auth}");
    assert_eq!(bed.metrics().get("zt_auth_proofs", &[("by", "self")]), Some(1.0), "a's identity");
}

/// A STRICT namespace (`spec.authentication: required`, no subjects): a, isolated by no
/// other policy, accepts new flows only from proven peers. d, a new pod of node1, is proven
/// by node1's agent and reaches a; b (node2, unproven) does not, on any port.
#[test]
fn a_strict_namespace_admits_proven_peers_only() {
    const STRICT: &str = "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: strict, namespace: default}\nspec:\n  authentication: required\n";
    let bed = bed("two-nodes", &[("60-strict.yaml", STRICT)], &[]);
    let d = zt_testbed::Pod::new("default", "d", "node1", &["10.200.1.9".parse().unwrap(), "fd00:200:1::9".parse().unwrap()], &[(Proto::Tcp, 80)]);
    bed.add_pod(d.clone()).unwrap();
    bed.write("05-pod-d.yaml", &d.to_yaml());
    let (b, dp) = (pod("default", "b"), pod("default", "d"));
    for f in [Family::V4, Family::V6] {
        bed.wait_probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80, &ok("default/a"));
    }
    let before = auth_drops(&bed);
    for f in [Family::V4, Family::V6] {
        assert_eq!(bed.probe(&b, &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "b unproven: STRICT drops it");
        assert_eq!(bed.probe(&b, &tgt("default", "a", f), Proto::Udp, 53), ProbeResult::Timeout, "on every port");
    }
    assert!(auth_drops(&bed) >= before + 4.0);
    let authenticated = bed.metrics().get("zt_verdicts_total", &[("direction", "ingress"), ("reason", "authenticated")]).unwrap_or(0.0);
    assert!(authenticated >= 2.0, "d's flows into a counted authenticated: {authenticated}");
}
