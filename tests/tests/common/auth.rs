//! Shared by the authentication tests (issue 10): the two-node lab with its Nodes'
//! InternalIPs (what agents dial each other at), a CA directory removed on drop, `ztctl
//! auth` as JSON, the `auth-required` counter, and waiting on two agents.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zt_testbed::{AgentHandle, Family, Proto};

use super::{lab, pod, tail, tgt, Bed, ALLOWED};

/// A CA directory of this test process (`--svid-ca-dir`), removed on drop, also when the
/// test fails.
pub struct CaDir(pub PathBuf);

impl CaDir {
    pub fn new(what: &str) -> CaDir {
        let p = std::env::temp_dir().join(format!("zt-auth-ca-{}-{what}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        CaDir(p)
    }

    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for CaDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `labs/two-nodes/pods.yaml` with the Node objects' InternalIPs (the bed's node addresses).
pub fn pods_with_node_ips() -> String {
    let mut pods = std::fs::read_to_string(lab("two-nodes").join("pods.yaml")).unwrap();
    for k in [1, 2] {
        let name = format!("metadata:\n  name: node{k}\n");
        assert!(pods.contains(&name), "labs/two-nodes/pods.yaml changed: no Node node{k}");
        pods = pods.replace(
            &name,
            &format!("{name}status:\n  addresses: [{{type: InternalIP, address: 10.255.0.{k}}}, {{type: InternalIP, address: \"fd00:255::{k}\"}}]\n"),
        );
    }
    pods
}

/// `ztctl -o json auth` against `agent`.
pub fn auth_of(bed: &Bed, agent: &AgentHandle) -> serde_json::Value {
    auth_with(&bed.ztctl, agent)
}

/// `ztctl -o json auth` against `agent`, with the ztctl at `ztctl`.
pub fn auth_with(ztctl: &Path, agent: &AgentHandle) -> serde_json::Value {
    let out = std::process::Command::new(ztctl)
        .arg("--bpffs-root")
        .arg(&agent.bpffs_root)
        .arg("--state-dir")
        .arg(&agent.state_dir)
        .arg("--admin-socket")
        .arg(&agent.admin_socket)
        .args(["-o", "json", "auth"])
        .output()
        .expect("running ztctl");
    assert!(out.status.success(), "ztctl auth: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// New flows the bed's agent (node1) dropped on ingress for want of a proof.
pub fn auth_drops(bed: &Bed) -> f64 {
    bed.metrics().get("zt_verdicts_total", &[("direction", "ingress"), ("reason", "auth-required")]).unwrap_or(0.0)
}

/// Starts f (a second pod of a's identity on node1, echoing lines on TCP 7000) and opens
/// a flow b (node2) -> f that round-trips: the live cross-node flow the tests keep.
pub fn live_flow_b_to_f(bed: &Bed, agent2: &AgentHandle) -> zt_testbed::TcpFlow {
    let addrs = ["10.200.1.9".parse().unwrap(), "fd00:200:1::9".parse().unwrap()];
    let mut f = zt_testbed::Pod::new("default", "f", "node1", &addrs, &[(Proto::Tcp, 7000)]);
    f.labels.insert("app".into(), "a".into());
    f.ports[0].name = Some("echo".into());
    bed.add_pod(f.clone()).unwrap();
    bed.write("05-pod-f.yaml", &f.to_yaml());
    let mut live = None;
    wait_for("a flow b -> f tcp/7000", bed, agent2, || {
        live = bed.open_tcp(&pod("default", "b"), &tgt("default", "f", Family::V4), 7000, ALLOWED).ok();
        live.as_mut().is_some_and(|l| l.roundtrip(ALLOWED))
    });
    live.unwrap()
}

/// Long enough for a peer's dial backoff (at most 10 s) plus a handshake.
pub const CHANNEL_DEADLINE: Duration = Duration::from_secs(30);

/// Polls `f` every 100 ms for `CHANNEL_DEADLINE`; on timeout, fails with both agents' log
/// tails (node1: the bed's agent).
pub fn wait_for(what: &str, bed: &Bed, agent2: &AgentHandle, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < CHANNEL_DEADLINE {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}\nnode1 agent log tail:\n{}\nnode2 agent log tail:\n{}", tail(&bed.agent.log(), 25), tail(&agent2.log(), 25));
}

/// a's ingress from b on TCP 80 and 7000 (the live flow's port), `authentication: required`.
pub const A_IN_AUTH_POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: a-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: a}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: TCP, port: 7000}]
    authentication: required
";

/// a's and b's SPIFFE ID in the two-node lab (namespace default, service account default).
pub const B_ID: &str = "spiffe://cluster.local/ns/default/sa/default";
/// c's (namespace other).
pub const C_ID: &str = "spiffe://cluster.local/ns/other/sa/default";

/// A node's SPIFFE ID in the lab's trust domain.
pub fn node_id(n: &str) -> String {
    format!("spiffe://cluster.local/zt/node/{n}")
}
