//! End-to-end lifecycle: revocation of live flows, agent restart under traffic, bad
//! policy input, pods coming and going.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{Family, Pod, ProbeResult, Proto};

fn revoked(m: &Metrics) -> f64 {
    m.val("zt_verdicts_total", &[("verdict", "drop"), ("reason", "revoked")])
}

#[test]
fn revoked_allow_stops_live_flow() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[7000]))],
        &[],
    );
    let (a, b4, b6) = (pod("default", "a"), tgt("default", "b", Family::V4), tgt("default", "b", Family::V6));
    let mut f4 = bed.open_tcp(&a, &b4, 7000, ALLOWED).expect("a -> b@v4 tcp/7000 allowed");
    let mut f6 = bed.open_tcp(&a, &b6, 7000, ALLOWED).expect("a -> b@v6 tcp/7000 allowed");
    for _ in 0..3 {
        assert!(f4.roundtrip(ALLOWED) && f6.roundtrip(ALLOWED), "roundtrips under the allow");
    }
    // Sanity: what the new policy will allow is not allowed yet.
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 80), ProbeResult::Timeout);
    let m0 = bed.metrics();

    // Withdraw the allow on 7000 (the file now allows 80 instead).
    let t0 = Instant::now();
    bed.write("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80]));
    bed.wait_until("the v4 flow to be cut", || !f4.roundtrip(Duration::from_millis(300)));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "revocation took {took:?} with --poll-ms 100");
    assert!(!f6.roundtrip(Duration::from_millis(300)), "the v6 flow must be cut as well");
    assert!(!f4.roundtrip(Duration::from_millis(300)), "a cut flow stays cut");
    // The new allow applies to new connections, the withdrawn one to new ones too.
    assert_eq!(bed.tb.probe(&a, &b4, Proto::Tcp, 80, ALLOWED), ok("default/b"));
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 7000), ProbeResult::Timeout);

    let m1 = bed.metrics();
    assert!(revoked(&m1) - revoked(&m0) >= 2.0, "zt_verdicts_total{{reason=revoked}}: {} -> {}", revoked(&m0), revoked(&m1));
    assert!(m1.val("zt_policy_epoch", &[]) > m0.val("zt_policy_epoch", &[]), "the epoch must be bumped");
}

#[test]
fn agent_restart_keeps_flows_and_enforcement() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80, 7000]))],
        &[],
    );
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let mut flow = bed.open_tcp(&a, &tgt("default", "b", Family::V4), 7000, ALLOWED).unwrap();
    assert!(flow.roundtrip(ALLOWED));
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut good, mut bad) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                if flow.roundtrip(Duration::from_secs(1)) {
                    good += 1;
                } else {
                    bad += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (good, bad)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bed.metrics().val("zt_agent_ready", &[]), 1.0);

    let st = bed.agent.stop().expect("agent was running");
    assert!(st.success(), "agent exit status on SIGTERM: {st}");
    assert!(!bed.agent.is_running());
    // While the agent is down: allowed stays allowed (also new connections), denied stays denied.
    for f in FAMILIES {
        let b = tgt("default", "b", f);
        assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"), "agent down: new a -> b@{f} tcp/80");
        assert_eq!(bed.probe(&c, &b, Proto::Tcp, 80), ProbeResult::Timeout, "agent down: c -> b@{f}");
        assert_eq!(bed.probe(&a, &tgt("default", "c", f), Proto::Tcp, 80), ProbeResult::Timeout, "agent down: a -> c@{f}");
        assert_eq!(bed.probe(&a, &b, Proto::Udp, 53), ProbeResult::Timeout, "agent down: a -> b@{f} udp/53");
    }
    std::thread::sleep(Duration::from_millis(300));

    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    // A few polls of the new agent.
    std::thread::sleep(Duration::from_millis(600));
    stop.store(true, Ordering::Relaxed);
    let (good, bad) = pinger.join().unwrap();
    assert_eq!(bad, 0, "roundtrips failed across the restart ({good} succeeded)");
    assert!(good >= 20, "only {good} roundtrips made");

    // Unchanged manifests: the new agent's first diff is empty.
    let log2 = bed.log_of_start(2);
    assert!(log2.contains("datapath loaded; pinned maps hold"), "second start log:\n{log2}");
    let held = log2
        .split("pinned maps hold ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap();
    assert!(held >= 6, "the restarted agent found {held} endpoints in the pinned maps");
    assert!(!log2.contains("applied "), "the restarted agent wrote to the maps:\n{log2}");
    let m = bed.metrics();
    assert_eq!(m.val("zt_map_updates_total", &[]), 0.0, "zt_map_updates_total after a restart with unchanged manifests");
    assert_eq!(m.val("zt_agent_ready", &[]), 1.0);

    // And the new agent is in charge: a policy change still takes effect.
    bed.write("30-allow-c.yaml", &allow_tcp("c-to-b", "c", "b", &[80]));
    bed.wait_probe(&c, &tgt("default", "b", Family::V4), Proto::Tcp, 80, &ok(""));
    assert!(bed.metrics().val("zt_map_updates_total", &[]) > 0.0);
}

#[test]
fn agent_crash_keeps_enforcing() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80]))],
        &[],
    );
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    bed.agent.kill();
    for f in FAMILIES {
        let b = tgt("default", "b", f);
        assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"), "agent killed: a -> b@{f}");
        assert_eq!(bed.probe(&c, &b, Proto::Tcp, 80), ProbeResult::Timeout, "agent killed: c -> b@{f}");
    }
    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(!bed.log_of_start(2).contains("applied "), "{}", bed.log_of_start(2));
    assert_eq!(bed.metrics().val("zt_map_updates_total", &[]), 0.0);
    assert_eq!(bed.probe(&c, &tgt("default", "b", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
}

/// A valid ZTP pair allowing c -> b, then an invalid NetworkPolicy in the same file:
/// the whole load must be rejected, so c -> b must stay denied.
fn bad_file() -> String {
    format!(
        "{}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: bad, namespace: default}}
spec:
  podSelector: {{matchLabels: {{app: b}}}}
  ingress:
  - ports: [{{port: 90, endPort: 80}}]
",
        allow_tcp("c-to-b", "c", "b", &[80])
    )
}

#[test]
fn bad_policy_keeps_last_good_state() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80]))],
        &[],
    );
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let check = |c_to_b: bool, when: &str| {
        for f in FAMILIES {
            let b = tgt("default", "b", f);
            assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"), "{when}: a -> b@{f}");
            let want = if c_to_b { ok("default/b") } else { ProbeResult::Timeout };
            let r = bed.tb.probe(&c, &b, Proto::Tcp, 80, if c_to_b { ALLOWED } else { DENIED });
            assert_eq!(r, want, "{when}: c -> b@{f}");
            assert_eq!(bed.probe(&a, &tgt("default", "c", f), Proto::Tcp, 80), ProbeResult::Timeout, "{when}: a -> c@{f}");
        }
    };
    let m = bed.metrics();
    assert_eq!((m.val("zt_policy_errors_total", &[]), m.val("zt_policy_last_load_ok", &[])), (0.0, 1.0));
    check(false, "good state");

    // 1. endPort < port, in a file that also holds a valid allow for c.
    bed.write("30-bad.yaml", &bad_file());
    bed.wait_until("zt_policy_last_load_ok 0", || bed.metrics().val("zt_policy_last_load_ok", &[]) == 0.0);
    std::thread::sleep(Duration::from_millis(300)); // more polls: still one error
    assert_eq!(bed.metrics().val("zt_policy_errors_total", &[]), 1.0);
    let want = "30-bad.yaml doc 3: NetworkPolicy default/bad: spec.ingress[0].ports[0].endPort: endPort 80 is less than port 90";
    let log = bed.agent.log();
    assert!(log.contains(want), "the agent log must name file, object and field ({want}); log tail:\n{}", tail(&log, 10));
    let last = std::fs::read_to_string(bed.agent.state_dir.join("last-error")).unwrap();
    assert!(last.contains(want), "last-error: {last}");
    check(false, "after the bad file");

    // 2. Fixed: applied (the valid half now allows c -> b).
    bed.write("30-bad.yaml", &bad_file().replace("{port: 90, endPort: 80}", "{port: 80, endPort: 90}"));
    bed.wait_probe(&c, &tgt("default", "b", Family::V4), Proto::Tcp, 80, &ok(""));
    let m = bed.metrics();
    assert_eq!((m.val("zt_policy_errors_total", &[]), m.val("zt_policy_last_load_ok", &[])), (1.0, 1.0));
    check(true, "after the fix");

    // 3. A misspelt ZTP field (unknown fields are rejected, never ignored), and at the
    //    same time the allow for a is deleted: nothing of it may apply.
    let typo = allow_tcp("typo", "a", "c", &[80]).replacen("podSelector", "podSelectr", 1);
    bed.write("40-typo.yaml", &typo);
    bed.remove("20-allow.yaml");
    bed.wait_until("zt_policy_last_load_ok 0", || bed.metrics().val("zt_policy_last_load_ok", &[]) == 0.0);
    std::thread::sleep(Duration::from_millis(300));
    let m = bed.metrics();
    assert!(m.val("zt_policy_errors_total", &[]) >= 2.0);
    let log = bed.log_of_start(1);
    let line = log.lines().rev().find(|l| l.contains("40-typo.yaml")).unwrap_or_else(|| panic!("no error naming 40-typo.yaml:\n{}", tail(&log, 10)));
    assert!(line.contains("ZeroTrustPolicy default/typo-in") && line.contains("podSelectr"), "error line: {line}");
    check(true, "after the typo");

    // 4. Fixed again: the deletion of the a -> b allow now applies too.
    bed.remove("40-typo.yaml");
    bed.wait_probe(&a, &tgt("default", "b", Family::V4), Proto::Tcp, 80, &ProbeResult::Timeout);
    assert_eq!(bed.metrics().val("zt_policy_last_load_ok", &[]), 1.0);
}

const NP_INGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: isolate-ingress, namespace: default}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: d-from-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: d}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}]
";

fn endpoint_ips(bed: &Bed, pod_key: &str) -> Vec<serde_json::Value> {
    bed.ztctl_json(&["endpoints"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["pod"] == pod_key)
        .cloned()
        .collect()
}

#[test]
fn pod_churn_is_enforced_and_cleaned_up() {
    let bed = bed("basic", &[("10-netpol.yaml", NP_INGRESS)], &[]);
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    assert_eq!(bed.probe(&c, &tgt("default", "a", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout, "ingress isolated");
    assert_eq!(bed.metrics().val("zt_endpoints", &[("scope", "local")]), 6.0, "3 pods x 2 IPs");

    let d = Pod::new(
        "default",
        "d",
        "node1",
        &["10.200.0.4".parse().unwrap(), "fd00:200::4".parse().unwrap()],
        &[(Proto::Tcp, 80)],
    );
    bed.add_pod(d.clone()).unwrap();
    // Not in the agent's manifests yet: d's interface is not hooked, but its server (in
    // the pods' cgroup hierarchy) is `initialising` for the cgroup programs: fails closed.
    for f in FAMILIES {
        assert_eq!(bed.probe(&c, &tgt("default", "d", f), Proto::Tcp, 80), ProbeResult::Timeout, "unknown pod d@{f}");
    }
    assert!(bed.metrics().verdicts("ingress", "drop", "initialising") >= 2.0);
    bed.write("05-pod-d.yaml", &d.to_yaml());
    bed.wait_probe(&c, &tgt("default", "d", Family::V4), Proto::Tcp, 80, &ProbeResult::Timeout);
    for f in FAMILIES {
        let dt = tgt("default", "d", f);
        assert_eq!(bed.probe(&c, &dt, Proto::Tcp, 80), ProbeResult::Timeout, "c -> d@{f}");
        assert_eq!(bed.tb.probe(&a, &dt, Proto::Tcp, 80, ALLOWED), ok("default/d"), "a -> d@{f}");
        assert_eq!(bed.probe(&pod("default", "d"), &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "d -> a@{f}");
        assert_eq!(bed.tb.probe(&pod("default", "d"), &tgt("default", "c", f), Proto::Tcp, 7000, DENIED), ProbeResult::Timeout);
    }
    let eps = endpoint_ips(&bed, "default/d");
    assert_eq!(eps.len(), 2, "endpoints of d: {eps:?}");
    for e in &eps {
        assert_eq!((e["local"].as_bool(), e["ingress_enforced"].as_bool(), e["egress_enforced"].as_bool()), (Some(true), Some(true), Some(false)), "{e}");
    }
    assert_eq!(bed.metrics().val("zt_endpoints", &[("scope", "local")]), 8.0, "4 pods x 2 IPs");
    let veth = bed.host_veth("default", "d").unwrap();
    let links = layout_dir(&bed.agent).join("links");
    let linked = |name: &str| {
        std::fs::read_dir(&links).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(&format!("-{name}-")))
    };
    assert!(linked(&veth), "no pinned link for {veth} in {}", links.display());

    // Remove it: the CNI deletes the veth, the API server the object.
    bed.remove_pod("default", "d").unwrap();
    bed.remove("05-pod-d.yaml");
    bed.wait_until("d's endpoints to disappear", || endpoint_ips(&bed, "default/d").is_empty());
    let eps = bed.ztctl_json(&["endpoints"]);
    assert!(
        !eps.as_array().unwrap().iter().any(|e| e["ip"] == "10.200.0.4" || e["ip"] == "fd00:200::4"),
        "d's addresses are still known: {eps}"
    );
    bed.wait_until("d's links to be unpinned", || !linked(&veth));
    assert_eq!(bed.metrics().val("zt_endpoints", &[("scope", "local")]), 6.0, "3 pods x 2 IPs");
    assert!(!bed.agent.log().contains("ERROR"), "agent errors:\n{}", tail(&bed.agent.log(), 20));
    // The others are unaffected.
    assert_eq!(bed.probe(&c, &tgt("default", "a", Family::V6), Proto::Tcp, 80), ProbeResult::Timeout);
    assert_eq!(bed.tb.probe(&a, &tgt("default", "c", Family::V6), Proto::Tcp, 80, DENIED), ProbeResult::Timeout);
}

/// Roundtrips until one fails (within 4 s); returns how long that took.
fn cut(flow: &mut zt_testbed::TcpFlow) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(4) {
        if !flow.roundtrip(Duration::from_millis(300)) {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

const DENY_A_INTO_B: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: deny-a, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  ingress:
  - action: deny
    from: [{podSelector: {matchLabels: {app: a}}}]
";

/// Other ways an allow goes away: an explicit deny is added, the client's labels
/// change (new identity), or a pod that was not isolated at all becomes isolated.
#[test]
fn revocation_by_deny_relabel_and_isolation() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[7000]))],
        &[],
    );
    let (a, c, b4, b6) = (pod("default", "a"), pod("default", "c"), tgt("default", "b", Family::V4), tgt("default", "b", Family::V6));

    // 1. A deny rule is added (deny beats allow, also for the live flow).
    let mut flow = bed.open_tcp(&a, &b6, 7000, ALLOWED).unwrap();
    assert!(flow.roundtrip(ALLOWED));
    bed.write("30-deny.yaml", DENY_A_INTO_B);
    assert!(cut(&mut flow).is_some(), "adding a deny did not cut the live flow");
    assert_eq!(bed.probe(&a, &b4, Proto::Tcp, 7000), ProbeResult::Timeout);
    let e = bed.ztctl_json(&["explain", "default/a", "default/b", "tcp/7000"]);
    assert_eq!(e["verdict"], "drop");
    assert_eq!(e["checks"][1]["reason"], "policy-deny", "{e:#}");
    bed.remove("30-deny.yaml");
    bed.wait_probe(&a, &b4, Proto::Tcp, 7000, &ok(""));

    // 2. The client is relabelled: its identity changes and no longer matches app=a.
    let mut flow = bed.open_tcp(&a, &b4, 7000, ALLOWED).unwrap();
    assert!(flow.roundtrip(ALLOWED));
    let pod_a = std::fs::read_to_string(bed.dir.join("pod-a.yaml")).unwrap();
    assert!(pod_a.contains("app: a"));
    bed.write("pod-a.yaml", &pod_a.replace("app: a", "app: x"));
    assert!(cut(&mut flow).is_some(), "relabelling the client did not cut the live flow");
    bed.write("pod-a.yaml", &pod_a);
    bed.wait_probe(&a, &b4, Proto::Tcp, 7000, &ok(""));

    // 3. No policy at all, a flow from c; then c and b become isolated.
    bed.remove("10-deny-all.yaml");
    bed.remove("20-allow.yaml");
    bed.wait_probe(&c, &b4, Proto::Tcp, 7000, &ok(""));
    let mut flow = bed.open_tcp(&c, &b4, 7000, ALLOWED).unwrap();
    assert!(flow.roundtrip(ALLOWED));
    bed.write("10-deny-all.yaml", &deny_all("default"));
    assert!(cut(&mut flow).is_some(), "isolating both ends did not cut their unpoliced flow");
}

#[test]
fn agent_restart_with_bad_manifests_keeps_pinned_state() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80]))],
        &[],
    );
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let policy_before = bed.ztctl_json(&["policy"]);
    bed.agent.stop().unwrap();
    // While it is down the manifests break (and the allow for a is deleted).
    bed.write("30-bad.yaml", "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: x, namespace: default}\nspec: {bogus: 1}\n");
    bed.remove("20-allow.yaml");
    bed.agent.start().unwrap();
    bed.wait_until("the new agent to reject the manifests", || bed.agent.state_dir.join("last-error").exists());
    std::thread::sleep(Duration::from_millis(300));
    assert!(bed.agent.is_running());
    let m = bed.metrics();
    assert_eq!(m.val("zt_policy_errors_total", &[]), 1.0);
    assert_eq!(m.val("zt_policy_last_load_ok", &[]), 0.0);
    assert_eq!(m.val("zt_map_updates_total", &[]), 0.0, "nothing may be written from a rejected load");
    let log = bed.log_of_start(2);
    assert!(log.contains("30-bad.yaml doc 1: ZeroTrustPolicy default/x: spec.bogus: unknown field `bogus`"), "{log}");
    // The pinned state is what the previous agent left: still enforced.
    assert_eq!(bed.ztctl_json(&["policy"]), policy_before);
    for f in FAMILIES {
        let b = tgt("default", "b", f);
        assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"), "a -> b@{f}");
        assert_eq!(bed.probe(&c, &b, Proto::Tcp, 80), ProbeResult::Timeout, "c -> b@{f}");
    }
    // Fixed: the deletion applies now.
    bed.remove("30-bad.yaml");
    bed.agent.wait_ready(DEADLINE).unwrap();
    bed.wait_probe(&a, &tgt("default", "b", Family::V4), Proto::Tcp, 80, &ProbeResult::Timeout);
    assert_eq!(bed.metrics().val("zt_policy_last_load_ok", &[]), 1.0);
}

/// A pod that leaves the manifests while its interface still exists (terminating, or a
/// stale source) keeps its hook: its traffic fails closed instead of running unenforced.
#[test]
fn forgotten_pod_with_live_interface_fails_closed() {
    let bed = bed("basic", &[], &[]);
    let d = Pod::new("default", "d", "node1", &["10.200.0.4".parse().unwrap(), "fd00:200::4".parse().unwrap()], &[(Proto::Tcp, 80)]);
    bed.add_pod(d.clone()).unwrap();
    bed.write("05-pod-d.yaml", &d.to_yaml());
    let (a, dp) = (pod("default", "a"), pod("default", "d"));
    bed.wait_until("d's endpoints", || endpoint_ips(&bed, "default/d").len() == 2);
    // No policy: d is known, hooked and open.
    assert_eq!(bed.probe(&dp, &tgt("default", "a", Family::V4), Proto::Tcp, 80), ok("default/a"));
    // The source forgets d; its veth stays.
    bed.remove("05-pod-d.yaml");
    bed.wait_until("d's endpoints to disappear", || endpoint_ips(&bed, "default/d").is_empty());
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80, DENIED), ProbeResult::Timeout, "d -> a@{f}");
        assert_eq!(bed.tb.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80, DENIED), ProbeResult::Timeout, "a -> d@{f}");
    }
    assert!(bed.metrics().verdicts("egress", "drop", "unknown-endpoint") >= 2.0);
}

/// An address reused while the agent is down: pod d is deleted and a new pod e (no CNI
/// plugin) gets its addresses. The endpoint still names d's interface and d's pod cgroup;
/// e's sockets are not in that cgroup, so the cgroup programs drop them
/// (`spoofed-source`) instead of leaving them to a hook that went away with d's interface.
#[test]
fn address_reused_while_the_agent_is_down_fails_closed() {
    let bed = bed("basic", &[], &[]);
    let ips = ["10.200.0.4".parse().unwrap(), "fd00:200::4".parse().unwrap()];
    let d = Pod::new("default", "d", "node1", &ips, &[(Proto::Tcp, 80)]);
    bed.add_pod(d.clone()).unwrap();
    bed.write("05-pod-d.yaml", &d.to_yaml());
    let a = pod("default", "a");
    bed.wait_until("d's endpoints", || endpoint_ips(&bed, "default/d").len() == 2);
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80, ALLOWED), ok("default/d"), "a -> d@{f}");
    }
    bed.agent.kill();
    bed.tb.remove_pod("default", "d").unwrap();
    let e = Pod::new("default", "e", "node1", &ips, &[(Proto::Tcp, 80)]);
    bed.add_pod(e.clone()).unwrap();
    // ztctl reads the counters from the pinned maps: it works with the agent down.
    let spoofed_in = || -> u64 {
        let c = bed.ztctl_json(&["counters"]);
        c.as_array().unwrap().iter().filter(|r| r["reason"] == "spoofed-source" && r["direction"] == "ingress").map(|r| r["packets"].as_u64().unwrap()).sum()
    };
    let before = spoofed_in();
    for f in FAMILIES {
        assert_eq!(bed.probe(&a, &tgt("default", "e", f), Proto::Tcp, 80), ProbeResult::Timeout, "agent down: a -> e@{f} (d's address)");
    }
    // Dropped on the way in to e's sockets, which are not in d's pod cgroup.
    assert!(spoofed_in() >= before + 2, "e's sockets dropped as spoofed-source: {} -> {}", before, spoofed_in());
    // The agent is back and the source says e: e is judged as itself (open, no policy).
    bed.remove("05-pod-d.yaml");
    bed.write("05-pod-e.yaml", &e.to_yaml());
    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    bed.wait_probe(&a, &tgt("default", "e", Family::V4), Proto::Tcp, 80, &ok("default/e"));
}

/// The id of the BPF link pinned at `pin` (BPF_OBJ_GET, BPF_OBJ_GET_INFO_BY_FD).
fn link_id(pin: &std::path::Path) -> u32 {
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut get = [0u64; 2];
    get[0] = path.as_ptr() as u64;
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, get.as_mut_ptr(), 16) };
    assert!(fd >= 0, "BPF_OBJ_GET {}: {}", pin.display(), std::io::Error::last_os_error());
    let mut info = [0u32; 16];
    let mut attr = [0u64; 2];
    attr[0] = fd as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    let r = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_mut_ptr(), 16) };
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0, "BPF_OBJ_GET_INFO_BY_FD {}: {}", pin.display(), std::io::Error::last_os_error());
    info[1]
}

/// Link pins of a layout directory, by name, with their link ids.
fn links_of(dir: &std::path::Path) -> std::collections::BTreeMap<String, u32> {
    std::fs::read_dir(dir.join("links")).unwrap().map(|e| e.unwrap()).map(|e| (e.file_name().to_string_lossy().into_owned(), link_id(&e.path()))).collect()
}

/// A layout upgrade: the node holds an older layout's pins (`v1/`: its maps and its TC and
/// cgroup links; made here by moving a running agent's directory there, since its
/// programs and maps keep running by reference); the new agent takes every link over in
/// place (same link ids: one program per hook throughout, never a second chain) once its
/// own state is in its maps, and removes the older layout. Enforcement holds throughout,
/// and a live flow whose client speaks survives (conntrack is not carried over: see
/// upgrade.rs).
#[test]
fn layout_upgrade_takes_over_the_links_in_place() {
    let bed = bed(
        "basic",
        &[("10-deny-all.yaml", &deny_all("default")), ("20-allow.yaml", &allow_tcp("a-to-b", "a", "b", &[80, 7000]))],
        &[],
    );
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let b4 = tgt("default", "b", Family::V4);
    let mut flow = bed.open_tcp(&a, &b4, 7000, ALLOWED).unwrap();
    assert!(flow.roundtrip(ALLOWED));
    let root = bed.agent.bpffs_root.clone();
    let current = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("ZT_POLICY").exists()).unwrap();
    let before = links_of(&current);
    assert!(before.keys().any(|k| k.ends_with("-from")) && before.keys().any(|k| k.starts_with("cgroup-")), "{before:?}");

    bed.agent.stop().expect("agent was running");
    let older = root.join("v1");
    std::fs::rename(&current, &older).unwrap();
    assert_eq!(bed.probe(&c, &b4, Proto::Tcp, 80), ProbeResult::Timeout, "the older layout enforces while no agent runs");

    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    bed.wait_until("the older layout removed", || !older.exists());
    let after = links_of(&current);
    assert_eq!(after, before, "the same links, taken over in place");
    let log = bed.log_of_start(2);
    assert!(log.contains("took over link") && log.contains("layout upgrade done"), "{}", tail(&log, 20));
    for f in FAMILIES {
        let b = tgt("default", "b", f);
        assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"), "after the upgrade: a -> b@{f}");
        assert_eq!(bed.probe(&c, &b, Proto::Tcp, 80), ProbeResult::Timeout, "after the upgrade: c -> b@{f}");
    }
    assert!(flow.roundtrip(ALLOWED), "the live flow, its client speaking");
    // The new agent is in charge of the taken-over links: a policy change takes effect.
    bed.write("30-allow-c.yaml", &allow_tcp("c-to-b", "c", "b", &[80]));
    bed.wait_probe(&c, &b4, Proto::Tcp, 80, &ok(""));
}

/// A map resize (resize.rs): the agent restarts with larger `--policy-max`, `--ct-max`
/// and `--ct-established-max` than its pinned maps. It moves its layout aside, loads
/// fresh maps at the new sizes, carries conntrack (and config, FQDN, Service socket
/// state) over, and takes the running links over in place (same link ids). a is
/// isolated both ways with a live flow to b on which the server speaks first after the
/// resize: the push reaches a only because a's tracked flow was carried over.
#[test]
fn map_resize_takes_over_the_links_and_keeps_conntrack() {
    use std::io::{BufRead, BufReader, Write};
    let bed = bed("basic", &[("10-isolate-a.yaml", ISOLATE_A)], &["--policy-max", "512", "--ct-max", "256", "--ct-established-max", "256"]);
    let b_ip = ip(&bed, "default", "b", Family::V4);
    let b_ns = bed.netns_path(&pod("default", "b")).unwrap();
    let listener = zt_testbed::sys::in_netns(&b_ns, move || std::net::TcpListener::bind((b_ip, 7100))).unwrap().expect("listen in b");
    let a_ns = bed.netns_path(&pod("default", "a")).unwrap();
    let addr = std::net::SocketAddr::new(b_ip, 7100);
    let client = zt_testbed::sys::in_netns(&a_ns, move || std::net::TcpStream::connect_timeout(&addr, ALLOWED)).unwrap().expect("a -> b:7100");
    let (mut server, _) = listener.accept().unwrap();
    client.set_read_timeout(Some(ALLOWED)).unwrap();
    let mut client_r = BufReader::new(client.try_clone().unwrap());
    (&client).write_all(b"hello\n").unwrap();
    let mut line = String::new();
    BufReader::new(server.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    let cap = |m: &Metrics, map: &str| m.val("zt_map_capacity", &[("map", map)]);
    assert_eq!((cap(&bed.metrics(), "ZT_POLICY"), cap(&bed.metrics(), "ZT_CT")), (512.0, 256.0));
    let root = bed.agent.bpffs_root.clone();
    let current = layout_dir(&bed.agent);
    let before = links_of(&current);

    bed.agent.stop().expect("agent was running");
    for (flag, v) in [("--policy-max", "1024"), ("--ct-max", "512"), ("--ct-established-max", "512")] {
        bed.agent.set_flag(flag, v);
    }
    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    let aside = root.join(format!("{}-resized", current.file_name().unwrap().to_string_lossy()));
    bed.wait_until("the resized layout removed", || !aside.exists());
    let log = bed.log_of_start(2);
    assert!(log.contains("map resize: ZT_POLICY 512 -> 1024") && log.contains("carried over"), "{}", tail(&log, 20));
    let m = bed.metrics();
    assert_eq!((cap(&m, "ZT_POLICY"), cap(&m, "ZT_CT"), cap(&m, "ZT_CT_EST")), (1024.0, 512.0, 512.0), "the new sizes");
    assert_eq!(links_of(&current), before, "the same links, taken over in place");

    let drops = bed.metrics().verdicts("ingress", "drop", "policy-default-deny");
    server.write_all(b"push\n").unwrap();
    let mut got = String::new();
    let r = client_r.read_line(&mut got);
    assert!(r.is_ok() && got == "push\n", "the server's push after the resize reached a: {r:?} {got:?}");
    assert_eq!(bed.metrics().verdicts("ingress", "drop", "policy-default-deny"), drops);
    // Enforcement holds: c may not reach a; a may not reach b on another port.
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    assert_eq!(bed.probe(&c, &tgt("default", "a", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    assert_eq!(bed.probe(&a, &tgt("default", "b", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
}
