//! End to end under churn and failure: a rollout keeps its identity; a policy that
//! fails (FQDN slots over the limit) or does not fit a full map fails closed for its
//! own subjects only while everyone else, a new pod in another namespace included, is
//! enforced; an apply that fails midway bumps the epoch so tracked flows are re-judged.
mod common;

use std::time::Duration;

use common::*;
use zt_testbed::{bpfmap::PinnedMap, Family, Pod, ProbeResult, Proto};

/// pod-b.yaml of the basic lab with extra labels under `app: b`.
fn pod_b_with(labels: &str) -> String {
    let text = std::fs::read_to_string(lab("basic").join("pod-b.yaml")).unwrap();
    let out = text.replacen("    app: b\n", &format!("    app: b\n{labels}"), 1);
    assert_ne!(out, text, "pod-b.yaml has no `    app: b` line");
    out
}

/// A TCP connection that completes a roundtrip (the echo port answers only then).
fn echo_ok(bed: &Bed, from: &zt_testbed::Endpoint, to: &zt_testbed::Target, port: u16) -> bool {
    bed.open_tcp(from, to, port, DENIED).is_ok_and(|mut f| f.roundtrip(DENIED))
}

fn identity_of(bed: &Bed, pod_key: &str) -> u64 {
    let eps = bed.ztctl_json(&["endpoints"]);
    let ids: Vec<u64> = eps.as_array().unwrap().iter().filter(|e| e["pod"] == pod_key).map(|e| e["identity"].as_u64().unwrap()).collect();
    assert!(!ids.is_empty() && ids.iter().all(|i| *i == ids[0]), "{pod_key}: {eps}");
    ids[0]
}

/// A new ReplicaSet (another pod-template-hash) keeps the workload's identity: same
/// number, same identity count, same policy entries; tracked flows survive it.
#[test]
fn a_rollout_keeps_the_identity() {
    let b_old = pod_b_with("    pod-template-hash: 5d8f7c\n");
    let bed = bed("basic", &[("pod-b.yaml", &b_old), ("10-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80, 7000]))], &[]);
    let (a, b4) = (pod("default", "a"), tgt("default", "b", Family::V4));
    let id0 = identity_of(&bed, "default/b");
    let m0 = bed.metrics();
    let mut flow = bed.open_tcp(&a, &b4, 7000, ALLOWED).expect("a -> b tcp/7000 allowed");
    assert!(flow.roundtrip(ALLOWED));
    let ids = bed.ztctl(&["identities"]);
    assert!(!ids.contains("pod-template-hash"), "the hash is no identity label:\n{ids}");

    // The rollout: the pod comes back with the new ReplicaSet's hash.
    bed.write("pod-b.yaml", &pod_b_with("    pod-template-hash: 9a7e21\n"));
    let compiles = m0.val("zt_policy_compile_seconds_count", &[]);
    bed.wait_until("the new manifest compiled", || bed.metrics().val("zt_policy_compile_seconds_count", &[]) > compiles);
    std::thread::sleep(Duration::from_millis(300));
    let m1 = bed.metrics();
    assert_eq!(identity_of(&bed, "default/b"), id0, "same identity number after the rollout");
    assert_eq!(m1.val("zt_identities", &[]), m0.val("zt_identities", &[]), "identity count flat");
    assert_eq!(m1.val("zt_map_entries", &[("map", "ZT_POLICY")]), m0.val("zt_map_entries", &[("map", "ZT_POLICY")]), "policy entries flat");
    assert_eq!(m1.val("zt_policy_epoch", &[]), m0.val("zt_policy_epoch", &[]), "nothing withdrawn, no re-judging");
    assert!(flow.roundtrip(ALLOWED), "the tracked flow survives the rollout");
    assert_eq!(bed.tb.probe(&a, &b4, Proto::Tcp, 80, ALLOWED), ok("default/b"));
}

/// FQDN rules for `app: a` in two policies, `n` names from `from`.
fn fqdn_policy(name: &str, from: usize, n: usize) -> String {
    let rules: String = (from..from + n).map(|i| format!("  - to: [{{fqdn: {{matchName: n{i}.example.com}}}}]\n")).collect();
    format!("apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  subjects: [{{podSelector: {{matchLabels: {{app: a}}}}}}]\n  egress:\n{rules}")
}

/// 33 FQDN slots for one identity across two policies in `default`: that identity fails
/// closed and is reported; a pod that arrives meanwhile in namespace `other` is
/// enforced as its own policy says.
#[test]
fn fqdn_overflow_in_one_namespace_holds_back_no_other() {
    let bed = bed("basic", &[("10-a-fqdn-1.yaml", &fqdn_policy("a-fqdn-1", 0, 20))], &[]);
    let (a, b, c) = (pod("default", "a"), pod("default", "b"), pod("default", "c"));
    let b4 = tgt("default", "b", Family::V4);
    bed.wait_probe(&c, &b4, Proto::Tcp, 80, &ok("default/b"));
    // The 13 more slots, and a new pod d in namespace other, isolated: only b may reach it.
    bed.write("11-a-fqdn-2.yaml", &fqdn_policy("a-fqdn-2", 20, 13));
    let d = Pod::new("other", "d", "node1", &["10.200.0.4".parse().unwrap(), "fd00:200::4".parse().unwrap()], &[(Proto::Tcp, 80)]);
    bed.add_pod(d.clone()).unwrap();
    let d_policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: d-from-b, namespace: other}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: 80}]\n";
    bed.write("05-pod-d.yaml", &format!("{}---\n{d_policy}", d.to_yaml()));
    for f in FAMILIES {
        bed.wait_probe(&b, &tgt("other", "d", f), Proto::Tcp, 80, &ok("other/d"));
        assert_eq!(bed.probe(&c, &tgt("other", "d", f), Proto::Tcp, 80), ProbeResult::Timeout, "c -> d@{f}: d's policy holds");
    }
    // a fails closed both ways; b and c, in the same namespace, are untouched.
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 80), ProbeResult::Timeout, "a's egress is closed");
    assert_eq!(bed.probe(&b, &tgt("default", "a", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout, "a's ingress is closed");
    assert_eq!(bed.tb.probe(&c, &b4, Proto::Tcp, 80, ALLOWED), ok("default/b"));
    // Reported: metric per object, ztctl, last-error, log.
    let m = bed.metrics();
    assert_eq!(m.val("zt_policy_failed_identities", &[("kind", "ZeroTrustPolicy"), ("namespace", "default"), ("name", "a-fqdn-2")]), 1.0);
    let rows = bed.ztctl_json(&["failures"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["object"], "ZeroTrustPolicy default/a-fqdn-2");
    assert_eq!(rows[0]["pods"], serde_json::json!(["default/a"]));
    assert!(rows[0]["error"].as_str().unwrap().contains("more than 32 FQDN rules"), "{rows:?}");
    let last = std::fs::read_to_string(bed.agent.state_dir.join("last-error")).unwrap();
    assert!(last.contains("ZeroTrustPolicy default/a-fqdn-2") && last.contains("more than 32 FQDN rules"), "last-error: {last}");
    assert!(bed.agent.log().contains("failed closed for identities"), "{}", tail(&bed.agent.log(), 20));

    // Fixed: a is enforced as before (not isolated: no policy isolates it in ingress).
    bed.remove("11-a-fqdn-2.yaml");
    bed.wait_probe(&b, &tgt("default", "a", Family::V4), Proto::Tcp, 80, &ok("default/a"));
    bed.wait_until("the failure cleared", || bed.ztctl_json(&["failures"]).as_array().unwrap().is_empty());
    bed.remove_pod("other", "d").unwrap();
}

/// A policy for c that the full policy map cannot hold: c fails closed (isolated, no
/// entries), the rest of the same change (a -> b on 7000) is applied.
#[test]
fn a_full_map_fails_closed_for_what_does_not_fit_and_applies_the_rest() {
    // deny-all + a -> b tcp/80: two entries (a's egress, b's ingress); room for four.
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80]))],
        &["--policy-max", "4", "--host-access", "none"],
    );
    let (a, c, b4) = (pod("default", "a"), pod("default", "c"), tgt("default", "b", Family::V4));
    bed.wait_probe(&a, &b4, Proto::Tcp, 80, &ok("default/b"));
    assert!(!echo_ok(&bed, &a, &b4, 7000), "not allowed yet");
    assert_eq!(bed.metrics().val("zt_map_entries", &[("map", "ZT_POLICY")]), 2.0);
    // One change: a -> b also on 7000 (two more: 4, fits) and c to three ports of an
    // outside range (three more: 7 > 4).
    let c_out = "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: c-out, namespace: default}\nspec:\n  subjects: [{podSelector: {matchLabels: {app: c}}}]\n  egress:\n  - to: [{ipBlock: {cidr: 192.0.2.0/24}}]\n    ports: [{protocol: TCP, port: 443}, {protocol: TCP, port: 8443}, {protocol: TCP, port: 9443}]\n";
    bed.write("20-allow.yaml", &format!("{}---\n{c_out}", allow_tcp("a-to-b", "a", "b", &[80, 7000])));
    // The rest applied: the new port works, the old one too.
    bed.wait_until("a -> b tcp/7000 allowed", || echo_ok(&bed, &a, &b4, 7000));
    assert_eq!(bed.tb.probe(&a, &b4, Proto::Tcp, 80, ALLOWED), ok("default/b"));
    bed.wait_until("ZT_POLICY overflow reported", || bed.ztctl_json(&["failures"]).as_array().is_some_and(|r| !r.is_empty()));
    let rows = bed.ztctl_json(&["failures"]);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows[0]["object"], "map ZT_POLICY", "{rows:?}");
    assert_eq!(rows[0]["pods"], serde_json::json!(["default/c"]), "{rows:?}");
    assert!(rows[0]["error"].as_str().unwrap().contains("needs 7 entries, capacity is 4"), "{rows:?}");
    let m = bed.metrics();
    assert_eq!(m.val("zt_map_entries", &[("map", "ZT_POLICY")]), 4.0);
    assert_eq!(m.val("zt_policy_failed_identities", &[("kind", "map"), ("namespace", ""), ("name", "ZT_POLICY")]), 1.0);
    promtool_check(&bed.agent.metrics().unwrap());
    // c: isolated both ways, no entries.
    let eps = bed.ztctl_json(&["endpoints"]);
    for e in eps.as_array().unwrap().iter().filter(|e| e["pod"] == "default/c") {
        assert_eq!((e["ingress_enforced"].as_bool(), e["egress_enforced"].as_bool()), (Some(true), Some(true)), "{e}");
    }
    assert_eq!(bed.probe(&c, &b4, Proto::Tcp, 80), ProbeResult::Timeout);
    assert!(bed.agent.log().contains("map ZT_POLICY full"), "{}", tail(&bed.agent.log(), 20));
}

/// The policy map is filled behind the agent's back, then b gets a new identity (a new
/// label): the apply writes b's endpoint, then fails on the first policy entry. The
/// epoch is bumped all the same, so the tracked a -> b flow is judged against what the
/// maps hold now (b's new identity has no entries yet) and is cut, instead of running
/// on under a verdict for a state the maps no longer hold.
#[test]
fn an_apply_failing_midway_rejudges_tracked_flows() {
    let bed = bed("basic", &[("10-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[7000]))], &["--policy-max", "64"]);
    let (a, b4) = (pod("default", "a"), tgt("default", "b", Family::V4));
    let mut flow = bed.open_tcp(&a, &b4, 7000, ALLOWED).expect("a -> b tcp/7000 allowed");
    assert!(flow.roundtrip(ALLOWED));
    let m0 = bed.metrics();
    // The agent's layout directory (`v<N>`, the only one there).
    let layout = std::fs::read_dir(&bed.agent.bpffs_root).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("ZT_POLICY").exists()).expect("the agent's map directory");
    let map = PinnedMap::open(&layout.join("ZT_POLICY")).unwrap();
    let filled = map.fill_lpm().unwrap();
    assert!(filled > 0 && (filled as f64) + m0.val("zt_map_entries", &[("map", "ZT_POLICY")]) == 64.0, "filled {filled}");
    assert!(flow.roundtrip(ALLOWED), "junk entries change no verdict");

    let old_b = identity_of(&bed, "default/b");
    bed.write("pod-b.yaml", &pod_b_with("    rev: \"2\"\n"));
    bed.wait_until("the failed apply counted", || bed.metrics().val("zt_map_errors_total", &[]) >= 1.0);
    let m1 = bed.metrics();
    assert!(m1.val("zt_policy_epoch", &[]) > m0.val("zt_policy_epoch", &[]), "a failed apply bumps the epoch");
    assert!(!flow.roundtrip(Duration::from_millis(500)), "the tracked flow is re-judged against the half-applied state");
    let log = bed.agent.log();
    assert!(log.contains("applying the policy to the maps failed") && log.contains("writing ZT_POLICY"), "{}", tail(&log, 20));

    // b's old number is released but entries still name it: quarantined, not reusable.
    let quarantined = || -> Vec<u64> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(bed.agent.state_dir.join("identities.json")).unwrap()).unwrap();
        v["quarantined"].as_array().map(|a| a.iter().map(|n| n.as_u64().unwrap()).collect()).unwrap_or_default()
    };
    assert_ne!(identity_of(&bed, "default/b"), old_b, "b's endpoint already carries its new identity");
    assert_eq!(quarantined(), vec![old_b]);
    let names_old = || bed.ztctl_json(&["policy"]).as_array().unwrap().iter().any(|r| r["local_id"].as_u64() == Some(old_b) || r["peer_id"].as_u64() == Some(old_b));
    assert!(names_old(), "the old entries are still in the map");
    // Room again: the apply completes, removes the old entries, the number is free.
    map.unfill_lpm(filled).unwrap();
    bed.wait_until("the quarantine lifted", || quarantined().is_empty());
    assert!(!names_old(), "no entry names the released number any more");
    bed.wait_until("a -> b (new identity) tcp/7000 allowed again", || echo_ok(&bed, &a, &b4, 7000));
}
