//! The flow and risk map end to end: the demo lab (sleep may reach httpbin on TCP 80,
//! notsleep may reach httpbin only on TCP 9999, which nothing uses), real allowed and
//! denied traffic, then `ztctl graph` / `ztctl posture` and the page in Debian's
//! chromium driven by playwright-core (tests/ui/browser.mjs): the identities grouped by
//! namespace, the three kinds of edge, and the risk the agent propagates once the page
//! marks sleep compromised. The screenshot is left in
//! `$CARGO_TARGET_TMPDIR/e2e_ui/ui.png` (docs/ui.png is a copy of one).
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use zt_testbed::{Endpoint, Family, ProbeResult, Proto};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const HTTPBIN: &str = "spiffe://cluster.local/ns/default/sa/httpbin";
const NOTSLEEP: &str = "spiffe://cluster.local/ns/default/sa/notsleep";
/// Exposed beyond loopback (in the node's netns), so the page runs with a token.
const UI_ADDR: &str = "0.0.0.0:19963";
const UI_TOKEN: &str = "e2e-ui-token-0123456789";

/// The browser test's tools: xtask setup installs them; missing is a failure, never a skip.
fn require_browser_tools() -> PathBuf {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    assert!(Path::new("/usr/bin/chromium").exists(), "/usr/bin/chromium is missing: run `cargo xtask setup` (Debian package chromium)");
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(node.is_ok_and(|o| o.status.success()), "node is missing: run `cargo xtask setup` (Debian packages nodejs, npm)");
    assert!(
        ui.join("node_modules/playwright-core/package.json").exists(),
        "{}/node_modules/playwright-core is missing: run `cargo xtask setup` (npm ci in tests/ui)",
        ui.display()
    );
    ui
}

struct RemoveOnDrop(PathBuf);
impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn graph_json(bed: &Bed) -> Value {
    bed.ztctl_json(&["graph", "--window", "10m"])
}

fn id_of(g: &Value, spiffe: &str) -> u64 {
    g["identities"].as_array().unwrap().iter().find(|n| n["spiffe_id"] == spiffe).unwrap_or_else(|| panic!("{spiffe} not in the graph: {g:#}"))["id"]
        .as_u64()
        .unwrap()
}

fn observed<'a>(g: &'a Value, src: u64, dst: u64, port: u64) -> Option<&'a Value> {
    g["observed"].as_array().unwrap().iter().find(|e| e["src"] == src && e["dst"] == dst && e["port"] == port && e["proto"] == "TCP")
}

#[test]
fn the_map_shows_the_lab_and_propagates_risk_in_a_real_browser() {
    let ui = require_browser_tools();
    // The page's cytoscape is the npm package's own file (tests/ui/package-lock.json pins it).
    let vendored = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../zt-agent/src/ui/vendor/cytoscape.min.js")).unwrap();
    let npm = std::fs::read(ui.join("node_modules/cytoscape/dist/cytoscape.min.js")).unwrap();
    assert!(vendored == npm, "zt-agent/src/ui/vendor/cytoscape.min.js differs from the pinned npm package's dist/cytoscape.min.js");

    let demo = |f: &str| std::fs::read_to_string(lab("demo").join(f)).unwrap();
    let token_file = RemoveOnDrop(std::env::temp_dir().join(format!("zt-e2e-ui-token-{}", std::process::id())));
    std::fs::write(&token_file.0, format!("{UI_TOKEN}\n")).unwrap();
    let bed = bed(
        "e2e-demo",
        &[
            ("10-deny-all.yaml", &demo("10-deny-all.yaml")),
            ("20-allow-sleep.yaml", &demo("20-allow-sleep.yaml")),
            ("30-notsleep-admin.yaml", &allow_tcp("notsleep-admin", "notsleep", "httpbin", &[9999])),
        ],
        &["--graph-ct-interval", "1", "--ui-addr", UI_ADDR, "--ui-token-file", token_file.0.to_str().unwrap()],
    );
    let (sleep, notsleep, httpbin) = (pod("default", "sleep"), pod("default", "notsleep"), tgt("default", "httpbin", Family::V4));
    // Allowed: sleep -> httpbin:80. Denied: notsleep probing httpbin on three ports.
    assert_eq!(bed.tb.probe(&sleep, &httpbin, Proto::Tcp, 80, ALLOWED), ok("default/httpbin"));
    for port in [80, 81, 7000] {
        assert_eq!(bed.probe(&notsleep, &httpbin, Proto::Tcp, port), ProbeResult::Timeout, "notsleep -> httpbin:{port}");
    }

    // The API (over the admin socket) until the conntrack scan and the drops are in.
    let start = Instant::now();
    let g = loop {
        let g = graph_json(&bed);
        let (s, h, n) = (id_of(&g, SLEEP), id_of(&g, HTTPBIN), id_of(&g, NOTSLEEP));
        if observed(&g, s, h, 80).is_some_and(|e| e["allowed"].as_u64() >= Some(1)) && [80, 81, 7000].iter().all(|p| observed(&g, n, h, *p).is_some()) {
            break g;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the graph never showed the lab's traffic: {g:#}\nagent log:\n{}", tail(&bed.agent.log(), 30));
        std::thread::sleep(Duration::from_millis(300));
    };
    let (s, h, n) = (id_of(&g, SLEEP), id_of(&g, HTTPBIN), id_of(&g, NOTSLEEP));
    let node = |id: u64| g["identities"].as_array().unwrap().iter().find(|x| x["id"] == id).unwrap().clone();
    for id in [s, h, n] {
        assert_eq!(node(id)["namespace"], "default");
        assert_eq!((node(id)["isolated_ingress"].as_bool(), node(id)["isolated_egress"].as_bool()), (Some(true), Some(true)));
    }
    assert_eq!(node(s)["pods"], serde_json::json!(["default/sleep"]));
    let allowed = observed(&g, s, h, 80).unwrap();
    assert_eq!(allowed["denied"], 0);
    assert!(allowed["counts"]["allow/policy"].as_u64() >= Some(1), "{allowed:#}");
    let rules: Vec<&str> = allowed["rules"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert!(rules.contains(&"ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]"), "{rules:?}");
    assert!(rules.contains(&"ZeroTrustPolicy default/httpbin-from-sleep spec.ingress[0]"), "{rules:?}");
    for port in [80, 81, 7000] {
        let d = observed(&g, n, h, port).unwrap();
        assert!(d["denied"].as_u64() >= Some(1) && d["allowed"] == 0, "{d:#}");
        assert!(d["counts"]["drop/policy-default-deny"].as_u64() >= Some(1), "{d:#}");
        assert!(d["last_seen"].as_u64() >= d["first_seen"].as_u64());
    }
    // Permitted: exactly the two allowed pairs (Service identities are not drawn).
    let mut permitted: Vec<(u64, u64, String, bool)> = g["permitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["src"].as_u64().unwrap(), e["dst"].as_u64().unwrap(), e["ports"].as_str().unwrap().to_string(), e["used"].as_bool().unwrap()))
        .collect();
    permitted.sort();
    let mut want = vec![(s, h, "TCP/80".to_string(), true), (n, h, "TCP/9999".to_string(), false)];
    want.sort();
    assert_eq!(permitted, want);
    // Probing is an incident before anyone marks anything; nothing is compromised yet.
    let kinds: Vec<(u64, &str)> = g["incidents"].as_array().unwrap().iter().map(|i| (i["identity"].as_u64().unwrap(), i["kind"].as_str().unwrap())).collect();
    assert_eq!(kinds, vec![(n, "probing")]);
    // notsleep's probing reaches httpbin over its permitted (unused) edge: 0.6 x 0.6.
    assert_eq!(node(n)["risk"]["value"].as_f64(), Some(0.6));
    assert_eq!((node(h)["risk"]["colour"].as_str(), node(h)["risk"]["path"].clone()), (Some("yellow"), serde_json::json!([n, h])));
    assert_eq!(node(s)["risk"]["colour"], "green");
    assert_eq!(node(s)["blast_radius"], 1);
    assert_eq!(node(s)["containment"]["edges_cut"], 1);

    // The map's fill on /metrics (updated after each conntrack scan); nothing kept out.
    bed.wait_until("zt_graph_entries >= 4", || bed.metrics().get("zt_graph_entries", &[]).is_some_and(|v| v >= 4.0));
    let m = bed.metrics();
    assert_eq!(m.val("zt_graph_dropped_total", &[("what", "observations")]), 0.0);
    assert_eq!(m.val("zt_graph_dropped_total", &[("what", "evicted")]), 0.0);
    assert_eq!(m.val("zt_graph_entries_max", &[]), 100_000.0);

    // The posture report.
    let p = bed.ztctl_json(&["posture", "--window", "10m"]);
    assert_eq!(p["namespaces_without_default_deny"], serde_json::json!([]), "{p:#}");
    assert_eq!(p["pods_not_isolated"], serde_json::json!([]), "{p:#}");
    assert_eq!(p["reachable_from_world"], serde_json::json!([]), "{p:#}");
    let unused: Vec<&str> = p["rules_unused"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert!(unused.iter().any(|r| r.starts_with("ZeroTrustPolicy default/notsleep-admin")), "{unused:?}");
    assert!(!unused.iter().any(|r| r.contains("sleep-to-httpbin") || r.contains("httpbin-from-sleep")), "{unused:?}");
    let text = bed.ztctl(&["posture"]);
    assert!(text.contains("namespaces without default-deny (0)") && text.contains("allow rules that allowed nothing"), "{text}");
    let e = bed.ztctl_raw(&["graph", "--window", "soon"]);
    assert!(!e.status.success() && String::from_utf8_lossy(&e.stderr).contains("soon"), "{e:?}");

    // The page, in chromium inside the node's network namespace (where the agent listens).
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e_ui");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("ui.png");
    let _ = std::fs::remove_file(&shot);
    let script = ui.join("browser.mjs");
    let url = format!("http://127.0.0.1:19963/?window=10m&token={UI_TOKEN}");
    let mut cmd = bed.tb.command_in(&Endpoint::node("node1"), &["node", script.to_str().unwrap(), &url, shot.to_str().unwrap(), SLEEP]).unwrap();
    cmd.env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1").env("HOME", bed.tb.tmp_dir());
    let out = cmd.output().expect("running node");
    assert!(out.status.success(), "browser.mjs failed ({}):\n{}\n{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let r: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("browser.mjs output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["errors"], serde_json::json!([]), "the page logged errors");
    assert_eq!(r["withoutToken"], 401, "the API without the bearer token");

    let drawn_node = |state: &Value, spiffe: &str| {
        state["nodes"].as_array().unwrap().iter().find(|x| x["spiffe"] == spiffe).unwrap_or_else(|| panic!("{spiffe} not drawn: {state:#}")).clone()
    };
    let before = &r["before"];
    // One compound node for the namespace holds the three workloads.
    let parents: Vec<&Value> = before["nodes"].as_array().unwrap().iter().filter(|x| x["isParent"] == true).collect();
    assert_eq!(parents.len(), 1, "{before:#}");
    assert_eq!(parents[0]["id"], "ns:default");
    for spiffe in [SLEEP, HTTPBIN, NOTSLEEP] {
        assert_eq!(drawn_node(before, spiffe)["parent"], "ns:default");
    }
    assert_eq!(drawn_node(before, SLEEP)["colour"], "green");
    assert_eq!(drawn_node(before, HTTPBIN)["colour"], "yellow", "notsleep's probing, over its permitted edge");
    assert_eq!(drawn_node(before, NOTSLEEP)["colour"], "red", "probing");
    let edges = before["edges"].as_array().unwrap();
    let edge = |src: &str, dst: &str, kind: &str| edges.iter().filter(|e| e["src"] == src && e["dst"] == dst && e["kind"] == kind).cloned().collect::<Vec<_>>();
    let used = edge(SLEEP, HTTPBIN, "used");
    assert_eq!(used.len(), 1, "{edges:#?}");
    assert_eq!((used[0]["lineStyle"].as_str(), used[0]["ports"].as_str()), (Some("solid"), Some("TCP/80")));
    assert!(used[0]["rules"].as_array().unwrap().iter().any(|r| r == "ZeroTrustPolicy default/sleep-to-httpbin spec.egress[0]"), "{used:#?}");
    let unused_edge = edge(NOTSLEEP, HTTPBIN, "permitted");
    assert_eq!(unused_edge.len(), 1, "{edges:#?}");
    assert_eq!(unused_edge[0]["lineStyle"], "dashed");
    let denied = edge(NOTSLEEP, HTTPBIN, "denied");
    assert_eq!(denied.iter().map(|e| e["ports"].as_str().unwrap()).collect::<std::collections::BTreeSet<_>>(), ["TCP/7000", "TCP/80", "TCP/81"].into());
    assert!(denied.iter().all(|e| e["lineColour"] == "rgb(229,57,53)"), "{denied:#?}");
    assert!(before["incidents"].as_str().unwrap().contains("probing"), "{before:#}");
    assert_eq!(r["deniedHidden"], 0, "unchecking 'denied' hides the red edges");
    assert_eq!(r["found"], serde_json::json!([NOTSLEEP]), "the name filter");
    assert!(before["posture"].as_str().unwrap().contains("rules that allowed nothing"), "{before:#}");

    // After marking sleep compromised from the page: the agent's propagation, drawn.
    assert!(r["selected"].as_str().unwrap().contains(SLEEP), "{r:#}");
    let after = &r["after"];
    let sl = drawn_node(after, SLEEP);
    assert!(sl["classes"].as_array().unwrap().iter().any(|c| c == "compromised"), "{sl:#}");
    assert_eq!((sl["colour"].as_str(), sl["risk"].as_f64()), (Some("red"), Some(1.0)));
    let hb = drawn_node(after, HTTPBIN);
    assert_eq!((hb["colour"].as_str(), hb["risk"].as_f64()), (Some("red"), Some(0.8)), "sleep may open httpbin and did: the larger product wins");
    assert!(hb["label"].as_str().unwrap().contains("risk 0.80"), "{hb:#}");
    // Risk does not flow against the connect direction: notsleep keeps its own 0.6.
    assert_eq!(drawn_node(after, NOTSLEEP)["risk"].as_f64(), Some(0.6));
    let path_edge = after["edges"].as_array().unwrap().iter().find(|e| e["src"] == SLEEP && e["dst"] == HTTPBIN && e["kind"] == "used").unwrap();
    assert!(path_edge["classes"].as_array().unwrap().iter().any(|c| c == "risk-path"), "{path_edge:#}");
    let top5 = after["top5"].as_str().unwrap();
    assert!(top5.find(SLEEP) < top5.find(HTTPBIN) && top5.contains(HTTPBIN), "{top5}");
    assert!(after["incidents"].as_str().unwrap().contains("compromised"), "{after:#}");
    assert!(r["detailsAfter"].as_str().unwrap().contains("Clear compromised"), "{r:#}");
    // The agent's own view agrees with what was drawn.
    let g = graph_json(&bed);
    let hb = g["identities"].as_array().unwrap().iter().find(|x| x["id"] == h).unwrap();
    assert_eq!(hb["risk"]["path"], serde_json::json!([s, h]));
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot {}", shot.display());
    eprintln!("screenshot: {}", shot.display());
}

#[test]
fn an_exposed_page_needs_a_token() {
    // Flags are checked before anything is loaded: no test bed needed.
    let out = std::process::Command::new(zt_testbed::bins::find("zt-agent").unwrap())
        .args(["--node-name", "x", "--manifests", "/nonexistent", "--ui-addr", "0.0.0.0:19964"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ui-addr 0.0.0.0:19964") && err.contains("--ui-token-file"), "{err}");
}
