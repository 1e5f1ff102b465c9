//! End-to-end observability: /metrics (promtool-valid, the right series, counters
//! that move with real drops) and ztctl against a live datapath.
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use zt_testbed::{Family, ProbeResult, Proto};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const NOTSLEEP: &str = "spiffe://cluster.local/ns/default/sa/notsleep";


#[test]
fn metrics_are_valid_and_count_drops() {
    let bed = bed(
        "basic",
        &[("10-isolate-b.yaml", ISOLATE_B)],
        &["--endpoints-max", "1024", "--cidrs-max", "512", "--policy-max", "4096"],
    );
    let (a, c, b) = (pod("default", "a"), pod("default", "c"), tgt("default", "b", Family::V4));
    let m0 = bed.metrics();
    promtool_check(&m0.0);

    // Every verdict series carries exactly direction, verdict and reason.
    let mut n = 0;
    for l in m0.0.lines().filter(|l| l.starts_with("zt_verdicts_total")) {
        let labels = l.split_once('{').unwrap().1.split_once('}').unwrap().0;
        let keys: Vec<&str> = labels.split(',').map(|kv| kv.split_once('=').unwrap().0).collect();
        assert_eq!(keys, ["direction", "verdict", "reason"], "{l}");
        n += 1;
    }
    assert!(n >= 2 * 16, "only {n} zt_verdicts_total series");
    for dir in ["ingress", "egress"] {
        for (verdict, reason) in [("allow", "policy"), ("allow", "established"), ("allow", "reply"), ("allow", "no-policy"), ("allow", "host"),
            ("drop", "policy-deny"), ("drop", "policy-default-deny"), ("drop", "revoked"), ("drop", "unknown-endpoint"), ("drop", "not-ready")]
        {
            m0.verdicts(dir, verdict, reason);
        }
    }
    // Map sizes follow the flags; entries match what ztctl sees.
    for (map, cap) in [("ZT_ENDPOINTS", 1024.0), ("ZT_CIDRS", 512.0), ("ZT_POLICY", 4096.0)] {
        assert_eq!(m0.val("zt_map_capacity", &[("map", map)]), cap, "{map}");
    }
    let eps = bed.ztctl_json(&["endpoints"]).as_array().unwrap().len() as f64;
    assert_eq!(m0.val("zt_map_entries", &[("map", "ZT_ENDPOINTS")]), eps);
    assert!(m0.val("zt_map_entries", &[("map", "ZT_POLICY")]) >= 1.0);
    assert_eq!(m0.val("zt_map_entries", &[("map", "ZT_CIDRS")]), 0.0);
    let ids = bed.ztctl_json(&["identities"]).as_array().unwrap().len() as f64;
    assert_eq!(m0.val("zt_identities", &[]), ids);
    assert!(ids >= 3.0, "a, b, c have distinct labels: {ids} identities");
    assert_eq!(m0.val("zt_endpoints", &[("scope", "local")]), 6.0);
    assert_eq!(m0.val("zt_endpoints", &[("scope", "remote")]), 0.0);
    assert!(m0.val("zt_policy_compile_seconds_count", &[]) >= 1.0);
    assert!(m0.val("zt_policy_compile_seconds_sum", &[]) > 0.0);
    assert_eq!(m0.val("zt_agent_ready", &[]), 1.0);
    assert_eq!(m0.val("zt_policy_last_load_ok", &[]), 1.0);
    assert_eq!(m0.val("zt_policy_errors_total", &[]), 0.0);
    assert_eq!(m0.val("zt_map_errors_total", &[]), 0.0);

    // One denied SYN (c is not allowed into b) and one allowed connection.
    assert_eq!(bed.probe(&c, &b, Proto::Tcp, 80), ProbeResult::Timeout);
    assert_eq!(bed.tb.probe(&a, &b, Proto::Tcp, 80, ALLOWED), ok("default/b"));
    let m1 = bed.metrics();
    promtool_check(&m1.0);
    let d = |dir: &str, v: &str, r: &str| m1.verdicts(dir, v, r) - m0.verdicts(dir, v, r);
    assert!(d("ingress", "drop", "policy-default-deny") >= 1.0, "ingress default-deny drop not counted");
    assert_eq!(d("egress", "drop", "policy-default-deny"), 0.0, "c's egress is not isolated");
    assert_eq!(d("ingress", "drop", "policy-deny"), 0.0);
    assert!(d("ingress", "allow", "policy") >= 1.0, "a's SYN to b: allow/policy");
    assert!(d("egress", "allow", "no-policy") >= 2.0, "a's and c's SYNs leave unisolated pods");
    // The SYN-ACK and the data of a's accepted connection leave b as tracked traffic.
    assert!(d("egress", "allow", "reply") >= 1.0, "b's replies");
}

fn demo_bed() -> Bed {
    let demo = |f: &str| std::fs::read_to_string(lab("demo").join(f)).unwrap();
    bed("e2e-demo", &[("10-deny-all.yaml", &demo("10-deny-all.yaml")), ("20-allow-sleep.yaml", &demo("20-allow-sleep.yaml"))], &[])
}

fn rows(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a JSON array: {v}"))
}

#[test]
fn ztctl_json_views_name_spiffe_ids() {
    let bed = demo_bed();
    // A tracked connection for `ct`: the echo server keeps it open.
    assert_eq!(bed.tb.probe(&pod("default", "sleep"), &tgt("default", "httpbin", Family::V4), Proto::Tcp, 80, ALLOWED), ok("default/httpbin"));

    let ids = bed.ztctl_json(&["identities"]);
    for spiffe in [SLEEP, HTTPBIN, NOTSLEEP] {
        let n = rows(&ids).iter().filter(|r| r["spiffe_id"] == spiffe).count();
        assert_eq!(n, 1, "{spiffe} in identities: {ids:#}");
    }
    let id_of = |spiffe: &str| rows(&ids).iter().find(|r| r["spiffe_id"] == spiffe).unwrap()["id"].as_u64().unwrap();
    assert!(rows(&ids).iter().any(|r| r["id"] == 1 && r["spiffe_id"] == "reserved:host"));

    let eps = bed.ztctl_json(&["endpoints"]);
    for (ip, who, spiffe) in [
        ("10.201.0.10", "default/httpbin", HTTPBIN),
        ("fd00:201::10", "default/httpbin", HTTPBIN),
        ("10.201.0.20", "default/sleep", SLEEP),
        ("fd00:201::20", "default/sleep", SLEEP),
        ("10.201.0.30", "default/notsleep", NOTSLEEP),
        ("fd00:201::30", "default/notsleep", NOTSLEEP),
    ] {
        let e = rows(&eps).iter().find(|e| e["ip"] == ip).unwrap_or_else(|| panic!("{ip} not in endpoints: {eps:#}"));
        assert_eq!(e["pod"], who, "{e}");
        assert_eq!(e["spiffe_id"], spiffe, "{e}");
        assert_eq!(e["identity"].as_u64().unwrap(), id_of(spiffe), "{e}");
        assert_eq!((&e["local"], &e["ingress_enforced"], &e["egress_enforced"]), (&Value::Bool(true), &Value::Bool(true), &Value::Bool(true)), "{e}");
    }

    let pol = bed.ztctl_json(&["policy"]);
    let mut got: Vec<(String, String, String, String, String, String, String)> = rows(&pol)
        .iter()
        .map(|r| {
            let f = |k: &str| r[k].as_str().unwrap_or_else(|| panic!("{k} in {r}")).to_string();
            (f("local"), f("direction"), f("peer"), f("proto"), f("ports"), f("verdict"), f("rule"))
        })
        .collect();
    got.sort();
    let s = |x: &str| x.to_string();
    assert_eq!(
        got,
        vec![
            (s(HTTPBIN), s("ingress"), s(SLEEP), s("TCP"), s("80"), s("allow"), s("ZeroTrustPolicy default/httpbin-from-sleep spec.ingress[0]")),
            // The httpbin Service (port 8000 -> 80) reached untranslated: its only backend
            // (per family) is allowed, so each family's Service identity is too, on the
            // frontend port.
            (s(SLEEP), s("egress"), s("service:default/httpbin (IPv4)"), s("TCP"), s("8000"), s("allow"), s("ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]")),
            (s(SLEEP), s("egress"), s("service:default/httpbin (IPv6)"), s("TCP"), s("8000"), s("allow"), s("ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]")),
            (s(SLEEP), s("egress"), s(HTTPBIN), s("TCP"), s("80"), s("allow"), s("ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]")),
        ]
    );
    // --identity narrows to one local identity.
    let only = bed.ztctl_json(&["policy", "--identity", HTTPBIN]);
    assert_eq!(rows(&only).len(), 1, "{only:#}");
    assert_eq!(rows(&only)[0]["local"], HTTPBIN);

    let ct = bed.ztctl_json(&["ct"]);
    for (dir, local, peer) in [("egress", SLEEP, HTTPBIN), ("ingress", HTTPBIN, SLEEP)] {
        let hit = rows(&ct).iter().any(|r| {
            r["direction"] == dir && r["local"] == local && r["peer"] == peer && r["proto"] == "TCP"
                && r["dst"] == "10.201.0.10:80" && r["src"].as_str().is_some_and(|x| x.starts_with("10.201.0.20:"))
        });
        assert!(hit, "no {dir} CT entry sleep -> httpbin:80: {ct:#}");
    }
    // Every entry shows its TCP state, its map and the seconds before it expires (the
    // probe's connection was closed by the server: FIN both ways, 10 s by default).
    for r in rows(&ct).iter().filter(|r| r["proto"] == "TCP") {
        let state = r["state"].as_str().unwrap_or("");
        assert!(["tcp-syn", "tcp-established", "tcp-closing", "tcp-closed"].contains(&state), "state {state:?}: {r:#}");
        assert!(r["map"] == "ZT_CT" || r["map"] == "ZT_CT_EST", "{r:#}");
        let left = r["expires_in_s"].as_u64().unwrap();
        assert!(left <= 21600, "{r:#}");
        if state == "tcp-closed" {
            assert!(left <= 10 && r["map"] == "ZT_CT", "a closed flow has the close timeout and left ZT_CT_EST: {r:#}");
        }
    }
    // Denied flows are not tracked.
    assert_eq!(bed.probe(&pod("default", "notsleep"), &tgt("default", "httpbin", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    let ct = bed.ztctl_json(&["ct"]);
    assert!(!rows(&ct).iter().any(|r| r["local"] == NOTSLEEP || r["peer"] == NOTSLEEP), "{ct:#}");
}

#[test]
fn ztctl_services_shows_the_labs_httpbin_service() {
    let bed = demo_bed();
    let httpbin_id = rows(&bed.ztctl_json(&["identities"])).iter().find(|r| r["spiffe_id"] == HTTPBIN).unwrap()["id"].clone();
    let v = bed.ztctl_json(&["services"]);
    let got: Vec<(String, String, String, String, Vec<(String, u64, Value, String, String)>)> = rows(&v)
        .iter()
        .map(|r| {
            let backends = rows(&r["backends"])
                .iter()
                .map(|b| {
                    (b["addr"].as_str().unwrap().to_string(), b["port"].as_u64().unwrap(), b["identity"].clone(), b["spiffe_id"].as_str().unwrap().to_string(), b["pod"].as_str().unwrap_or("-").to_string())
                })
                .collect();
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("frontend"), s("kind"), s("service"), s("port_name"), backends)
        })
        .collect();
    let backend = |ip: &str| vec![(ip.to_string(), 80, httpbin_id.clone(), HTTPBIN.to_string(), "default/httpbin".to_string())];
    assert_eq!(
        got,
        [
            ("10.96.0.80:8000/TCP".into(), "ClusterIP".into(), "default/httpbin".into(), "http".into(), backend("10.201.0.10")),
            ("[fd00:96::80]:8000/TCP".into(), "ClusterIP".into(), "default/httpbin".into(), "http".into(), backend("fd00:201::10")),
        ]
    );
    let text = bed.ztctl(&["services"]);
    assert!(text.starts_with("FRONTEND"), "{text}");
    assert!(text.contains("10.96.0.80:8000/TCP") && text.contains("-> 10.201.0.10:80") && text.contains(HTTPBIN) && text.contains(" ready "), "{text}");
    assert_eq!(rows(&bed.ztctl_json(&["services", "--service", "kube-system/httpbin"])).len(), 0);
}

#[test]
fn ztctl_explain_agrees_with_probes() {
    let bed = demo_bed();
    // (src, dst, proto/port, probe from, probe to, expected verdict)
    let cases = [
        ("default/sleep", "default/httpbin", "tcp/80", "sleep", "httpbin", Family::V4, "allow"),
        ("fd00:201::20", "fd00:201::10", "tcp/80", "sleep", "httpbin", Family::V6, "allow"),
        (SLEEP, HTTPBIN, "tcp/80", "sleep", "httpbin", Family::V4, "allow"),
        ("default/notsleep", "default/httpbin", "tcp/80", "notsleep", "httpbin", Family::V4, "drop"),
        ("default/sleep", "default/httpbin", "tcp/81", "sleep", "httpbin", Family::V4, "drop"),
        ("default/httpbin", "default/sleep", "tcp/80", "httpbin", "sleep", Family::V4, "drop"),
        ("fd00:201::20", "fd00:201::10", "udp/53", "sleep", "httpbin", Family::V6, "drop"),
    ];
    for (src, dst, pp, from, to, fam, want) in cases {
        let e = bed.ztctl_json(&["explain", src, dst, pp]);
        assert_eq!(e["verdict"], want, "explain {src} {dst} {pp}: {e:#}");
        let (proto, port) = pp.split_once('/').unwrap();
        let r = bed.tb.probe(&pod("default", from), &tgt("default", to, fam), proto.parse().unwrap(), port.parse().unwrap(), if want == "allow" { ALLOWED } else { DENIED });
        let probed = if r.is_ok() { "allow" } else { "drop" };
        assert_eq!(probed, want, "probe {from} -> {to}@{fam} {pp}: {r}, explain says {want}");
        if want == "drop" {
            assert_eq!(r, ProbeResult::Timeout);
        }
        let checks = e["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 2, "both pods are local: egress and ingress checks: {e:#}");
    }
    // The allowed flow names both rules; the denied one the reason.
    let e = bed.ztctl_json(&["explain", "default/sleep", "default/httpbin", "tcp/80"]);
    let rules: Vec<&str> = e["checks"].as_array().unwrap().iter().map(|c| c["rule"].as_str().unwrap_or("-")).collect();
    assert_eq!(rules, ["ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]", "ZeroTrustPolicy default/httpbin-from-sleep spec.ingress[0]"]);
    let text = bed.ztctl(&["explain", "default/notsleep", "default/httpbin", "tcp/80"]);
    assert!(text.contains("DROP") && text.contains("policy-default-deny") && text.contains(NOTSLEEP), "{text}");
}

#[test]
fn ztctl_drops_follow_shows_denied_probe() {
    let bed = demo_bed();
    let child = bed
        .ztctl_cmd(&["drops", "--follow", "--count", "1", "--pod", "httpbin", "--timeout", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Probe until ztctl has seen one (it subscribes asynchronously).
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) && std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
    {
        let r = bed.probe(&pod("default", "notsleep"), &tgt("default", "httpbin", Family::V4), Proto::Tcp, 80);
        assert_eq!(r, ProbeResult::Timeout);
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ztctl drops: {}{}", text, String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "--count 1: {text}");
    let l = lines[0];
    for want in ["DROP", NOTSLEEP, HTTPBIN, "default/notsleep", "default/httpbin", ":80 ", "reason=policy-default-deny", "TCP"] {
        assert!(l.contains(want), "{want:?} missing in: {l}");
    }
    assert!(start.elapsed() < Duration::from_secs(3), "ztctl did not stop at --count 1");
}

#[test]
fn ztctl_works_while_agent_down() {
    let bed = demo_bed();
    let before: Vec<Value> = ["policy", "endpoints", "identities"].iter().map(|w| bed.ztctl_json(&[w])).collect();
    bed.agent.stop().unwrap();
    assert!(!bed.agent.is_running());
    let after: Vec<Value> = ["policy", "endpoints", "identities"].iter().map(|w| bed.ztctl_json(&[w])).collect();
    assert_eq!(before, after, "ztctl reads the pinned maps and state.json");
    let table = bed.ztctl(&["policy"]);
    assert!(table.contains(SLEEP) && table.contains(HTTPBIN), "{table}");
    let e = bed.ztctl_json(&["explain", "default/notsleep", "default/httpbin", "tcp/80"]);
    assert_eq!(e["verdict"], "drop");
    // Counters come from the maps too and still move: the datapath is still enforcing.
    let drops = |b: &Bed| -> u64 {
        rows(&b.ztctl_json(&["counters"])).iter().filter(|r| r["reason"] == "policy-default-deny").map(|r| r["packets"].as_u64().unwrap()).sum()
    };
    let d0 = drops(&bed);
    assert_eq!(bed.probe(&pod("default", "notsleep"), &tgt("default", "httpbin", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    assert!(drops(&bed) > d0, "policy-default-deny counter did not move");
    // Live drops need the agent: a clear error, not a hang.
    let out = bed.ztctl_raw(&["drops", "--follow", "--timeout", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.sock") && err.contains("agent"), "{err}");
}

#[test]
fn ztctl_rejects_bad_arguments() {
    let bed = demo_bed();
    let cases: [(&[&str], &[&str]); 7] = [
        (&["explain", "default/sleep", "default/httpbin", "tcp/99999"], &["99999", "0-65535"]),
        (&["explain", "x", "y", "foo/1"], &["unknown protocol \"foo\""]),
        (&["explain", "default/sleep", "default/httpbin", "tcp"], &["expected PROTO/PORT"]),
        (&["explain", "default/nosuch", "default/httpbin", "tcp/80"], &["default/nosuch", "no such pod"]),
        (&["explain", "spiffe://cluster.local/ns/default/sa/nobody", "default/httpbin", "tcp/80"], &["sa/nobody", "no pod with this SPIFFE ID"]),
        (&["explain", "default/sleep", "fd00:201::10", "tcp/80"], &["different address families"]),
        (&["-o", "yaml", "identities"], &["yaml"]),
    ];
    for (args, wants) in cases {
        let out = bed.ztctl_raw(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "ztctl {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        for w in wants {
            assert!(err.contains(w), "ztctl {args:?}: stderr lacks {w:?}: {err}");
        }
    }
}
