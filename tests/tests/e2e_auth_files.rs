//! Node channels on SVID files end to end (issue 10): lab `two-nodes`, one agent per node,
//! each with `--svid-source files:<dir>` over a directory of its own that this test fills
//! as spiffe-helper does (`<dir>/<trust domain><path>/svid.pem`, `svid_key.pem`,
//! `svid_bundle.pem`), from one CA (the SPIRE stand-in's, used here without its socket).
//! b (node2) -> a (node1) TCP 80 under an `authentication: required` rule, real sockets:
//! - both agents read their node SVID and their pods' SVIDs from the files; once node1 holds
//!   node2's proof of b, the first SYN of a new flow passes (both families) with zero
//!   `auth-required` drops; `ztctl auth` and the metrics name the files source, up;
//! - b's files rewritten (a rotation) reach node1 as a new proof within seconds, under a
//!   live cross-node flow, and a root rotation A -> A+B -> B written into the directories
//!   too (c's bundle left at A+B: the trust bundle is the node directory's, so A goes): the
//!   flow keeps working, new flows pass, zero drops;
//! - node2's own directory broken mid-rewrite (no key): node2 reports the source down
//!   (`zt_svid_source_up{source="files"} 0`, /readyz 503 naming it, `ztctl auth` a problem
//!   naming the file) and enforcement continues with the SVIDs held; rewritten: up again.
mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use common::*;
use zt_testbed::spire::{Ca, IssuedSvid};
use zt_testbed::Proto;

const TD: &str = "cluster.local";

/// One node's SVID directory, removed at the start and on drop (also when the test fails).
struct SvidRoot(PathBuf);

impl SvidRoot {
    fn new(node: &str) -> SvidRoot {
        let p = std::env::temp_dir().join(format!("zt-e2e-svid-files-{}-{node}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        SvidRoot(p)
    }

    fn arg(&self) -> String {
        format!("files:{}", self.0.display())
    }

    fn dir_of(&self, id: &str) -> PathBuf {
        self.0.join(id.strip_prefix("spiffe://").unwrap())
    }
}

impl Drop for SvidRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pem(tag: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n", lines.join("\n"))
}

/// Writes a file the way a careful writer does: beside it, then renamed into place.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `id`'s directory as spiffe-helper writes it: the SVID, its key, then the bundle.
fn write_svid(dir: &Path, svid: &IssuedSvid, roots: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).unwrap();
    put(&dir.join("svid.pem"), &svid.chain.iter().map(|c| pem("CERTIFICATE", c)).collect::<String>());
    put(&dir.join("svid_key.pem"), &pem("PRIVATE KEY", &svid.key_pkcs8));
    write_bundle(dir, roots);
}

fn write_bundle(dir: &Path, roots: &[Vec<u8>]) {
    put(&dir.join("svid_bundle.pem"), &roots.iter().map(|r| pem("CERTIFICATE", r)).collect::<String>());
}

/// What each node's directory holds: its node SVID and its pods' identities.
fn ids_of(node: &str) -> Vec<String> {
    match node {
        "node1" => vec![node_id("node1"), B_ID.to_string()],
        _ => vec![node_id("node2"), B_ID.to_string(), C_ID.to_string()],
    }
}

/// Issues and writes every SVID of every node; returns b's SVID as node2 holds it.
fn issue_all(ca: &Ca, roots: &[(&str, &SvidRoot)]) -> i64 {
    let mut b_expiry = 0;
    for (node, root) in roots {
        for id in ids_of(node) {
            let s = ca.issue(&id, None).unwrap();
            if *node == "node2" && id == B_ID {
                b_expiry = s.expires_at;
            }
            write_svid(&root.dir_of(&id), &s, &ca.roots());
        }
    }
    b_expiry
}

/// Seconds left on node2's proof of b in node1's map.
fn node2_proof_of_b(bed: &Bed) -> Option<i64> {
    let a = auth_of(bed, &bed.agent);
    a["proofs"].as_array()?.iter().find(|p| p["node"] == "node2" && p["spiffe_id"] == B_ID).and_then(|p| p["expires_in_s"].as_i64()).filter(|s| *s > 0)
}

fn files_up(agent: &zt_testbed::AgentHandle) -> Option<f64> {
    Metrics(agent.metrics().ok()?).get("zt_svid_source_up", &[("source", "files")])
}

/// New flows b -> a pass from their first SYN, the live one still echoes, and no
/// `auth-required` drop was counted.
fn nothing_lost(bed: &Bed, live: &mut zt_testbed::TcpFlow, drops_before: f64, when: &str) {
    assert!(live.roundtrip(ALLOWED), "{when}: the live flow b -> f keeps working");
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&pod("default", "b"), &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "{when}: b -> a tcp/80 {f:?}");
    }
    assert_eq!(auth_drops(bed), drops_before, "{when}: no auth-required drop");
}

#[test]
fn two_agents_on_svid_files_prove_and_follow_rewrites() {
    let (root1, root2) = (SvidRoot::new("node1"), SvidRoot::new("node2"));
    let mut ca = Ca::new(TD).unwrap();
    issue_all(&ca, &[("node1", &root1), ("node2", &root2)]);

    let pods = pods_with_node_ips();
    let bed = bed("two-nodes", &[("pods.yaml", &pods), ("50-a.yaml", A_IN_AUTH_POLICY)], &["--svid-source", &root1.arg()]);
    let agent2 =
        bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &bed.dir, &["--poll-ms", "100", "--svid-source", &root2.arg()]).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();

    wait_for("node1 to hold node2's proofs of b and c", &bed, &agent2, || {
        let a1 = auth_of(&bed, &bed.agent);
        let has = |id: &str| a1["proofs"].as_array().unwrap().iter().any(|p| p["node"] == "node2" && p["spiffe_id"] == id);
        has(B_ID) && has(C_ID)
    });
    let before = auth_drops(&bed);
    for f in FAMILIES {
        assert_eq!(bed.tb.probe(&pod("default", "b"), &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "b -> a tcp/80 {f:?}");
    }
    assert_eq!(auth_drops(&bed), before, "no auth-required drop: proven before the first SYN");
    for (a, root) in [(&bed.agent, &root1), (&agent2, &root2)] {
        let st = auth_of(&bed, a);
        assert_eq!(st["source"]["source"], root.arg().as_str(), "{st}");
        assert_eq!(st["source"]["up"], true, "{st}");
        assert_eq!(files_up(a), Some(1.0));
    }
    let text = bed.ztctl(&["auth"]);
    assert!(text.contains(&format!("SVID source {} (up), roots cluster.local: 1", root1.arg())), "{text}");

    let mut live = live_flow_b_to_f(&bed, &agent2);
    let drops = auth_drops(&bed);

    // b's files rewritten with a shorter SVID: node2 takes it within its poll, node1 gets the
    // new proof (told apart by its expiry).
    ca.ttl = Duration::from_secs(3000);
    let b = ca.issue(B_ID, None).unwrap();
    write_svid(&root2.dir_of(B_ID), &b, &ca.roots());
    wait_for("node1 to hold node2's proof of b's rewritten SVID", &bed, &agent2, || node2_proof_of_b(&bed).is_some_and(|s| s <= 3000));
    nothing_lost(&bed, &mut live, drops, "after b's files were rewritten");

    // Root rotation A -> A+B -> B, written into every directory as spiffe-helper would.
    ca.publish_next_root().unwrap();
    for (node, root) in [("node1", &root1), ("node2", &root2)] {
        for id in ids_of(node) {
            write_bundle(&root.dir_of(&id), &ca.roots());
        }
    }
    let roots = |a: &zt_testbed::AgentHandle, n: i64| auth_of(&bed, a)["source"]["roots"][TD].as_i64() == Some(n);
    wait_for("both agents to hold A+B", &bed, &agent2, || roots(&bed.agent, 2) && roots(&agent2, 2));
    ca.activate_newest_root();
    ca.ttl = Duration::from_secs(2800);
    issue_all(&ca, &[("node1", &root1), ("node2", &root2)]);
    wait_for("node1 to hold node2's proof of b re-issued after B took over", &bed, &agent2, || node2_proof_of_b(&bed).is_some_and(|s| s <= 2800));
    nothing_lost(&bed, &mut live, drops, "with bundle A+B and SVIDs of B");
    ca.retire_inactive_roots();
    // c's helper on node2 left its bundle at A+B: a pod's directory adds no root.
    for (node, root) in [("node1", &root1), ("node2", &root2)] {
        for id in ids_of(node).into_iter().filter(|id| id != C_ID) {
            write_bundle(&root.dir_of(&id), &ca.roots());
        }
    }
    wait_for("both agents to hold B only", &bed, &agent2, || roots(&bed.agent, 1) && roots(&agent2, 1));
    nothing_lost(&bed, &mut live, drops, "with bundle B");
    let refused = bed.metrics().get("zt_auth_channels_refused_total", &[("peer", "node2")]).unwrap_or(0.0);
    assert_eq!(refused, 0.0, "no channel refused across the root rotation");

    // node2's own directory mid-rewrite (the key not there yet): down, the SVIDs held used.
    let node2_dir = root2.dir_of(&node_id("node2"));
    std::fs::remove_file(node2_dir.join("svid_key.pem")).unwrap();
    wait_for("node2 to report its files source down", &bed, &agent2, || {
        let st = auth_of(&bed, &agent2);
        files_up(&agent2) == Some(0.0)
            && agent2.http_get("/readyz").is_err_and(|e| e.to_string().contains("SVID source files:"))
            && st["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("svid_key.pem"))
    });
    nothing_lost(&bed, &mut live, drops, "while node2's directory is broken");
    let n2 = ca.issue(&node_id("node2"), None).unwrap();
    write_svid(&node2_dir, &n2, &ca.roots());
    wait_for("node2 to report its files source up again", &bed, &agent2, || files_up(&agent2) == Some(1.0) && agent2.http_get("/readyz").is_ok());
    nothing_lost(&bed, &mut live, drops, "after node2's directory was rewritten");
}
