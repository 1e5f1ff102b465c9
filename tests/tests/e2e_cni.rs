//! End-to-end: the chained CNI plugin `zt-cni`, called exactly as a container runtime
//! calls it (CNI_* variables, the network configuration with a prevResult on stdin),
//! against a real agent in the test bed's node netns.
mod common;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use zt_testbed::{bins, probe_in, Family, Pod, ProbeResult, Proto, Testbed};

/// One plugin run.
#[derive(Debug)]
struct CniOut {
    success: bool,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl CniOut {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}\nstderr: {}", self.stdout, self.stderr))
    }
    /// The CNI error object; panics unless the run failed with one.
    fn error(&self) -> (u64, String) {
        assert!(!self.success, "expected a failure, got success: {}", self.stdout);
        let v = self.json();
        for k in ["cniVersion", "code", "msg", "details"] {
            assert!(v.get(k).is_some(), "error object without {k:?}: {v}");
        }
        (v["code"].as_u64().unwrap(), v["msg"].as_str().unwrap().to_string())
    }
    fn assert_ok(&self) {
        assert!(self.success, "zt-cni failed: {}\nstderr: {}", self.stdout, self.stderr);
    }
}

/// Runs the plugin with only the given environment (as runtimes do) and `stdin`.
fn run_cni(env: &[(String, String)], stdin: &str) -> CniOut {
    let bin = bins::find("zt-cni").expect("zt-cni binary (cargo build -p zt-cni)");
    let t = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning zt-cni");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    CniOut {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
    }
}

/// What a runtime sets for one pod sandbox.
fn pod_env(cmd: &str, container_id: &str, netns: &Path, pod: &Pod) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), cmd.into()),
        ("CNI_CONTAINERID".into(), container_id.into()),
        ("CNI_NETNS".into(), netns.display().to_string()),
        ("CNI_IFNAME".into(), "eth0".into()),
        ("CNI_PATH".into(), "/opt/cni/bin".into()),
        (
            "CNI_ARGS".into(),
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.uid
            ),
        ),
    ]
}

/// The runtime's netns path of a test bed pod (`/var/run/netns/<name>`).
fn var_run_netns(netns_name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(netns_name)
}

/// The cluster CNI's result for a test bed pod: host veth (no sandbox), eth0 in the
/// pod's netns, the pod's addresses on eth0.
fn prev_result(host_veth: &str, netns: &Path, pod: &Pod) -> Value {
    let mut ips = vec![];
    if let Some(v4) = pod.ipv4 {
        ips.push(json!({"address": format!("{v4}/32"), "interface": 1}));
    }
    if let Some(v6) = pod.ipv6 {
        ips.push(json!({"address": format!("{v6}/128"), "interface": 1}));
    }
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": host_veth, "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": netns.display().to_string()}
        ],
        "ips": ips,
        "dns": {}
    })
}

fn netconf(socket: &Path, timeout_ms: u64, prev: Option<&Value>) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "zt-cni",
        "agentSocket": socket.display().to_string(),
        "timeoutMs": timeout_ms,
    });
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c.to_string()
}

/// A pod the tests create, with what the runtime would pass for it.
struct Sandbox {
    pod: Pod,
    id: String,
    netns: PathBuf,
    prev: Value,
}

impl Sandbox {
    fn of(tb: &Testbed, pod: &Pod) -> Sandbox {
        let info = tb.pod(&pod.namespace, &pod.name).expect("pod set up");
        Self::from_info(tb, &info)
    }
    fn from_info(tb: &Testbed, info: &zt_testbed::PodInfo) -> Sandbox {
        let netns = var_run_netns(&info.netns);
        Sandbox {
            pod: info.pod.clone(),
            id: format!("ctr{}{}", tb.run_id(), info.pod.name),
            prev: prev_result(&info.host_veth, &netns, &info.pod),
            netns,
        }
    }
    fn call(&self, cmd: &str, socket: &Path, timeout_ms: u64) -> CniOut {
        run_cni(&pod_env(cmd, &self.id, &self.netns, &self.pod), &netconf(socket, timeout_ms, Some(&self.prev)))
    }
}

fn new_pod(name: &str, v4: &str, v6: &str) -> Pod {
    Pod::new("default", name, "node1", &[v4.parse().unwrap(), v6.parse().unwrap()], &[(Proto::Tcp, 80), (Proto::Udp, 53)])
}

const D_FROM_A: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: d-from-a, namespace: default}
spec:
  podSelector: {matchLabels: {app: d}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{port: 80}]
";

fn unknown_endpoint_drops(bed: &Bed) -> (f64, f64) {
    let m = bed.metrics();
    (m.verdicts("ingress", "drop", "unknown-endpoint"), m.verdicts("egress", "drop", "unknown-endpoint"))
}

fn cni_requests(bed: &Bed, cmd: &str, outcome: &str) -> f64 {
    bed.metrics().get("zt_cni_requests_total", &[("command", cmd), ("outcome", outcome)]).unwrap_or(0.0)
}

fn endpoints_of(bed: &Bed, ips: &[std::net::IpAddr]) -> Vec<Value> {
    let want: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
    bed.ztctl_json(&["endpoints"]).as_array().unwrap().iter().filter(|e| want.iter().any(|w| e["ip"] == w.as_str())).cloned().collect()
}

/// ADD for a pod the source does not know yet: hooked before anything runs in it, its
/// traffic fails closed (`init`) until the Pod object arrives; then its policy applies.
/// CHECK follows the attachment; DEL is idempotent and leaves a known pod enforced.
#[test]
fn add_unknown_pod_fails_closed_until_known() {
    // Without the cgroup programs, to show the window the plugin closes on its own.
    let bed = bed("basic", &[], &["--cgroup-root", "none"]);
    let sock = bed.agent.admin_socket.clone();
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let d = new_pod("d", "10.200.0.4", "fd00:200::4");
    bed.add_pod(d.clone()).unwrap();
    let dp = pod("default", "d");
    let sb = Sandbox::of(&bed, &d);
    // Without the plugin this is the window: the agent does not know d, nothing hooks it.
    assert_eq!(bed.tb.probe(&c, &tgt("default", "d", Family::V4), Proto::Tcp, 80, ALLOWED), ok("default/d"), "the gap the plugin closes");

    let (code, msg) = sb.call("CHECK", &sock, 2000).error();
    assert_eq!(code, 100, "CHECK before ADD: {msg}");
    let (in0, out0) = unknown_endpoint_drops(&bed);

    let add = sb.call("ADD", &sock, 2000);
    add.assert_ok();
    assert_eq!(add.json(), sb.prev, "ADD passes prevResult on unchanged");
    println!("ADD of an unknown pod answered in {:?}", add.took);
    // No waiting: the agent answered only after the maps and links were written.
    for f in FAMILIES {
        assert_eq!(bed.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80), ProbeResult::Timeout, "a -> d@{f} while d is init");
        assert_eq!(bed.probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "d -> a@{f} while d is init");
        assert_eq!(bed.probe(&c, &tgt("default", "d", f), Proto::Udp, 53), ProbeResult::Timeout, "c -> d@{f} udp while d is init");
    }
    let (in1, out1) = unknown_endpoint_drops(&bed);
    println!("unknown-endpoint drops while init: ingress +{}, egress +{}", in1 - in0, out1 - out0);
    assert!(in1 - in0 >= 4.0 && out1 - out0 >= 2.0, "drops must be counted as unknown-endpoint: ingress {in0}->{in1}, egress {out0}->{out1}");
    let eps = endpoints_of(&bed, &d.ips());
    assert_eq!(eps.len(), 2, "{eps:?}");
    for e in &eps {
        assert_eq!((e["identity"].as_u64(), e["local"].as_bool()), (Some(3), Some(true)), "init endpoint: {e}");
    }
    sb.call("CHECK", &sock, 2000).assert_ok();
    // A runtime retrying ADD for the same sandbox gets the same answer.
    sb.call("ADD", &sock, 2000).assert_ok();

    // The Pod object arrives: its policy (ingress from a only) replaces init.
    bed.write("05-pod-d.yaml", &d.to_yaml());
    bed.write("10-d-from-a.yaml", D_FROM_A);
    bed.wait_probe(&a, &tgt("default", "d", Family::V4), Proto::Tcp, 80, &ok("default/d"));
    for f in FAMILIES {
        let dt = tgt("default", "d", f);
        assert_eq!(bed.tb.probe(&a, &dt, Proto::Tcp, 80, ALLOWED), ok("default/d"), "a -> d@{f}");
        assert_eq!(bed.probe(&c, &dt, Proto::Tcp, 80), ProbeResult::Timeout, "c -> d@{f}");
        assert_eq!(bed.tb.probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80, ALLOWED), ok("default/a"), "d -> a@{f} (egress open)");
    }
    for e in endpoints_of(&bed, &d.ips()) {
        assert!(e["identity"].as_u64().unwrap() >= 256 && e["pod"] == "default/d", "real identity: {e}");
    }
    sb.call("CHECK", &sock, 2000).assert_ok();

    // DEL twice: both succeed; the known pod stays enforced by its source.
    sb.call("DEL", &sock, 2000).assert_ok();
    let del2 = sb.call("DEL", &sock, 2000);
    del2.assert_ok();
    assert!(del2.stdout.trim().is_empty(), "DEL prints nothing: {:?}", del2.stdout);
    let (code, _) = sb.call("CHECK", &sock, 2000).error();
    assert_eq!(code, 100, "CHECK after DEL");
    assert_eq!(bed.tb.probe(&a, &tgt("default", "d", Family::V6), Proto::Tcp, 80, ALLOWED), ok("default/d"));
    assert_eq!(bed.probe(&c, &tgt("default", "d", Family::V6), Proto::Tcp, 80), ProbeResult::Timeout);

    // An address the node cannot attribute to an interface: refused, try again later.
    let ghost = new_pod("ghost", "10.200.9.9", "fd00:200:9::9");
    let prev = prev_result("nosuchif0", Path::new("/var/run/netns/none"), &ghost);
    let out = run_cni(&pod_env("ADD", "ghost1", Path::new("/var/run/netns/none"), &ghost), &netconf(&sock, 2000, Some(&prev)));
    let (code, msg) = out.error();
    assert_eq!(code, 11, "{msg}");
    assert!(out.json()["details"].as_str().unwrap().contains("no host interface"), "{}", out.stdout);

    let m = bed.metrics();
    for (cmd, outcome, n) in [("ADD", "ok", 2.0), ("ADD", "error", 1.0), ("DEL", "ok", 2.0), ("CHECK", "ok", 2.0), ("CHECK", "not_attached", 2.0)] {
        assert_eq!(m.get("zt_cni_requests_total", &[("command", cmd), ("outcome", outcome)]), Some(n), "{cmd}/{outcome}:\n{}", m.0);
    }
    assert!(!bed.agent.log().contains("ERROR"), "agent errors:\n{}", tail(&bed.agent.log(), 20));
}

/// ADD for a pod the source already knows keeps its identity (no init moment); the
/// attachments survive an agent restart; a sandbox torn down without DEL is forgotten
/// once its interface is gone.
#[test]
fn add_known_pod_and_restart() {
    let bed = bed("basic", &[("10-d-from-a.yaml", D_FROM_A)], &[]);
    let sock = bed.agent.admin_socket.clone();
    let (a, c) = (pod("default", "a"), pod("default", "c"));
    let d = new_pod("d", "10.200.0.4", "fd00:200::4");
    bed.add_pod(d.clone()).unwrap();
    bed.write("05-pod-d.yaml", &d.to_yaml());
    bed.wait_until("d known", || endpoints_of(&bed, &d.ips()).iter().all(|e| e["pod"] == "default/d") && endpoints_of(&bed, &d.ips()).len() == 2);
    bed.wait_probe(&c, &tgt("default", "d", Family::V4), Proto::Tcp, 80, &ProbeResult::Timeout);
    let sd = Sandbox::of(&bed, &d);
    let before = unknown_endpoint_drops(&bed);
    let add = sd.call("ADD", &sock, 2000);
    add.assert_ok();
    println!("ADD of a known pod answered in {:?}", add.took);
    for f in FAMILIES {
        let dt = tgt("default", "d", f);
        assert_eq!(bed.tb.probe(&a, &dt, Proto::Tcp, 80, ALLOWED), ok("default/d"), "a -> d@{f}");
        assert_eq!(bed.probe(&c, &dt, Proto::Tcp, 80), ProbeResult::Timeout, "c -> d@{f}");
    }
    assert_eq!(unknown_endpoint_drops(&bed), before, "a known pod never goes through init");
    for e in endpoints_of(&bed, &d.ips()) {
        assert!(e["identity"].as_u64().unwrap() >= 256, "{e}");
    }

    // An unknown pod e next to it; then the agent restarts.
    let e = new_pod("e", "10.200.0.5", "fd00:200::5");
    bed.add_pod(e.clone()).unwrap();
    let se = Sandbox::of(&bed, &e);
    se.call("ADD", &sock, 2000).assert_ok();
    bed.agent.restart().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    let state = std::fs::read_to_string(bed.agent.state_dir.join("cni-attachments.json")).unwrap();
    assert!(state.contains(&sd.id) && state.contains(&se.id), "{state}");
    sd.call("CHECK", &sock, 2000).assert_ok();
    se.call("CHECK", &sock, 2000).assert_ok();
    for f in FAMILIES {
        assert_eq!(bed.probe(&a, &tgt("default", "e", f), Proto::Tcp, 80), ProbeResult::Timeout, "a -> e@{f} after restart");
        assert_eq!(bed.probe(&pod("default", "e"), &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "e -> a@{f} after restart");
        assert_eq!(bed.tb.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80, ALLOWED), ok("default/d"), "a -> d@{f} after restart");
    }
    let restart_log = bed.log_of_start(2);
    assert!(!restart_log.contains("applied "), "the first diff after a restart is empty (attachments included):\n{restart_log}");

    // e's sandbox goes without a DEL (runtime crash): the agent forgets it with its veth.
    let veth = bed.host_veth("default", "e").unwrap();
    bed.remove_pod("default", "e").unwrap();
    bed.wait_until("e's attachment to be forgotten", || {
        let s = std::fs::read_to_string(bed.agent.state_dir.join("cni-attachments.json")).unwrap_or_default();
        !s.contains(&se.id)
    });
    bed.wait_until("e's init endpoints to go", || endpoints_of(&bed, &e.ips()).is_empty());
    let links = layout_dir(&bed.agent).join("links");
    bed.wait_until("e's links to be unpinned", || {
        !std::fs::read_dir(&links).unwrap().any(|x| x.unwrap().file_name().to_string_lossy().contains(&format!("-{veth}-")))
    });
    // DEL of the forgotten sandbox still succeeds.
    se.call("DEL", &sock, 2000).assert_ok();
    assert!(!bed.agent.log().contains("ERROR"), "agent errors:\n{}", tail(&bed.agent.log(), 20));
}

/// ADD while the agent has no good state yet (its first policy load failed): the
/// attachment is written and hooked anyway, and the pod stays closed through the first
/// good load until its Pod object arrives.
#[test]
fn add_before_the_first_good_state() {
    let tb = testbed("basic");
    let dir = tb.tmp_dir().join("agent-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(lab("basic")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    let bad = "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: x, namespace: default}\nspec: {bogus: 1}\n";
    std::fs::write(dir.join("30-bad.yaml"), bad).unwrap();
    let d = new_pod("d", "10.200.0.4", "fd00:200::4");
    tb.add_pod(d.clone()).unwrap();
    let agent = tb.start_agent("node1", &bins::find("zt-agent").unwrap(), &dir, &["--poll-ms", "100"]).unwrap();
    let bed = Bed { agent, dir, ztctl: bins::find("ztctl").unwrap(), tb };
    bed.wait_until("the policy error", || std::fs::read_to_string(bed.agent.state_dir.join("last-error")).is_ok());
    assert!(!bed.agent.state_dir.join("ready").exists(), "a bad first load must not make the agent ready");
    let sock = bed.agent.admin_socket.clone();
    let sb = Sandbox::of(&bed, &d);
    let add = sb.call("ADD", &sock, 3000);
    add.assert_ok();
    sb.call("CHECK", &sock, 3000).assert_ok();
    let (a, dp) = (pod("default", "a"), pod("default", "d"));
    for f in FAMILIES {
        assert_eq!(bed.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80), ProbeResult::Timeout, "a -> d@{f} before any good state");
        assert_eq!(bed.probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "d -> a@{f} before any good state");
    }
    // The first good load: d is still unknown to the source, so it stays init.
    bed.remove("30-bad.yaml");
    bed.agent.wait_ready(DEADLINE).unwrap();
    let before = unknown_endpoint_drops(&bed);
    for f in FAMILIES {
        assert_eq!(bed.probe(&a, &tgt("default", "d", f), Proto::Tcp, 80), ProbeResult::Timeout, "a -> d@{f} after the first load");
        assert_eq!(bed.probe(&dp, &tgt("default", "a", f), Proto::Tcp, 80), ProbeResult::Timeout, "d -> a@{f} after the first load");
    }
    let after = unknown_endpoint_drops(&bed);
    assert!(after.0 > before.0 && after.1 > before.1, "init drops: {before:?} -> {after:?}");
    sb.call("CHECK", &sock, 3000).assert_ok();
    bed.write("05-pod-d.yaml", &d.to_yaml());
    bed.wait_probe(&a, &tgt("default", "d", Family::V6), Proto::Tcp, 80, &ok("default/d"));
    assert_eq!(bed.tb.probe(&dp, &tgt("default", "a", Family::V4), Proto::Tcp, 80, ALLOWED), ok("default/a"));
}

/// Removes its directory on drop (also on panic).
struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp_dir(tag: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("zt-cni-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn fake_sandbox() -> (Pod, Vec<(String, String)>, Value) {
    let p = new_pod("x", "10.200.7.7", "fd00:200:7::7");
    let ns = Path::new("/var/run/netns/zt-cni-none");
    (p.clone(), pod_env("ADD", "ctrx1", ns, &p), prev_result("vethx", ns, &p))
}

fn with_cmd(env: &[(String, String)], cmd: &str) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.clone(), if k == "CNI_COMMAND" { cmd.to_string() } else { v.clone() })).collect()
}

/// ADD without an agent, and against a socket that accepts but never answers: a CNI
/// error (try again later) within the configured timeout; DEL succeeds without an agent.
#[test]
fn add_fails_when_the_agent_does_not_answer() {
    let dir = tmp_dir("noagent");
    let (_, env, prev) = fake_sandbox();
    let missing = dir.0.join("missing.sock");
    let out = run_cni(&env, &netconf(&missing, 2000, Some(&prev)));
    let (code, msg) = out.error();
    println!("ADD, no agent socket: exit failure, code {code} in {:?}: {msg}", out.took);
    assert_eq!(code, 11);
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(out.took < Duration::from_secs(2), "no socket fails at once, not after the timeout");
    let del = run_cni(&with_cmd(&env, "DEL"), &netconf(&missing, 2000, Some(&prev)));
    del.assert_ok();
    let (code, _) = run_cni(&with_cmd(&env, "CHECK"), &netconf(&missing, 2000, Some(&prev))).error();
    assert_eq!(code, 11, "CHECK without an agent");

    // A socket file nobody listens on (an agent that died) is the same as none.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let (code, _) = run_cni(&env, &netconf(&stale, 2000, Some(&prev))).error();
    assert_eq!(code, 11);

    // A hung agent: accepts, reads, never answers.
    let hung = dir.0.join("hung.sock");
    let listener = UnixListener::bind(&hung).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let accepted = std::sync::Arc::new(AtomicU64::new(0));
    let (stop2, accepted2) = (stop.clone(), accepted.clone());
    listener.set_nonblocking(true).unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = vec![];
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((s, _)) = listener.accept() {
                accepted2.fetch_add(1, Ordering::Relaxed);
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    for timeout_ms in [300u64, 1200] {
        let out = run_cni(&env, &netconf(&hung, timeout_ms, Some(&prev)));
        let (code, msg) = out.error();
        println!("ADD, hung agent, timeoutMs {timeout_ms}: exit failure, code {code} after {:?}: {msg}", out.took);
        assert_eq!(code, 11);
        assert!(msg.contains(&format!("{timeout_ms} ms")), "{msg}");
        let t = Duration::from_millis(timeout_ms);
        assert!(out.took >= t, "gave up before the timeout: {:?}", out.took);
        assert!(out.took < t + Duration::from_secs(3), "the timeout bounds ADD: {:?}", out.took);
    }
    let out = run_cni(&with_cmd(&env, "DEL"), &netconf(&hung, 300, Some(&prev)));
    assert_eq!(out.error().0, 11, "a hung agent may still hold the attachment: DEL is retried");
    stop.store(true, Ordering::Relaxed);
    holder.join().unwrap();
    assert_eq!(accepted.load(Ordering::Relaxed), 3, "each call reached the socket");
}

/// VERSION, and bad input: every error is a CNI error object whose message names the
/// variable or field, with the spec's code (4 environment, 6 decoding, 7 configuration,
/// 1 version); nothing reaches the agent.
#[test]
fn version_and_bad_input() {
    let dir = tmp_dir("badinput");
    let sock = dir.0.join("agent.sock");
    let (_, env, prev) = fake_sandbox();
    let v = run_cni(&[("CNI_COMMAND".into(), "VERSION".into())], r#"{"cniVersion":"1.0.0"}"#);
    v.assert_ok();
    let j = v.json();
    println!("VERSION: {j}");
    assert_eq!(j["cniVersion"], "1.0.0");
    assert!(j["supportedVersions"].as_array().unwrap().iter().any(|x| x == "1.0.0"), "{j}");
    assert!(run_cni(&[("CNI_COMMAND".into(), "VERSION".into())], "").success, "VERSION needs no configuration");

    let good = netconf(&sock, 500, Some(&prev));
    let without = |k: &str| -> Vec<(String, String)> { env.iter().filter(|(n, _)| n != k).cloned().collect() };
    // (what, environment, stdin, expected code, what the message must name)
    type Case<'a> = (&'a str, Vec<(String, String)>, String, u64, &'a str);
    let cases: Vec<Case> = vec![
        ("no CNI_COMMAND", without("CNI_COMMAND"), good.clone(), 4, "CNI_COMMAND"),
        ("unknown command", with_cmd(&env, "FROB"), good.clone(), 4, "CNI_COMMAND"),
        ("no CNI_CONTAINERID", without("CNI_CONTAINERID"), good.clone(), 4, "CNI_CONTAINERID"),
        ("no CNI_NETNS", without("CNI_NETNS"), good.clone(), 4, "CNI_NETNS"),
        ("no CNI_IFNAME", without("CNI_IFNAME"), good.clone(), 4, "CNI_IFNAME"),
        (
            "CNI_ARGS without the pod",
            env.iter().map(|(k, v)| (k.clone(), if k == "CNI_ARGS" { "IgnoreUnknown=1".into() } else { v.clone() })).collect(),
            good.clone(),
            4,
            "K8S_POD_NAMESPACE",
        ),
        ("stdin not JSON", env.clone(), "{\"cniVersion\": \"1.0.0\", ".into(), 6, "not JSON"),
        ("no prevResult", env.clone(), netconf(&sock, 500, None), 7, "prevResult"),
        ("no name", env.clone(), edit(&good, |c| c["name"] = Value::Null), 7, "\"name\""),
        ("bad timeout", env.clone(), edit(&good, |c| c["timeoutMs"] = json!("soon")), 7, "timeoutMs"),
        ("bad version", env.clone(), edit(&good, |c| c["cniVersion"] = json!("7.0.0")), 1, "cniVersion"),
        ("bad address", env.clone(), edit(&good, |c| c["prevResult"]["ips"][0]["address"] = json!("10.200.7.777/32")), 7, "prevResult.ips[0].address"),
    ];
    for (what, env, stdin, want_code, names) in cases {
        let out = run_cni(&env, &stdin);
        let (code, msg) = out.error();
        println!("{what}: code {code}: {msg}");
        assert_eq!(code, want_code, "{what}: {}", out.stdout);
        assert!(msg.contains(names), "{what}: the message must name {names}: {msg}");
    }
    assert!(!sock.exists());
    // CHECK also needs prevResult; DEL does not (and without an agent it succeeds).
    let (code, msg) = run_cni(&with_cmd(&env, "CHECK"), &netconf(&sock, 500, None)).error();
    assert!(code == 7 && msg.contains("prevResult"), "{msg}");
    run_cni(&with_cmd(&env, "DEL"), &netconf(&sock, 500, None)).assert_ok();
}

fn edit(conf: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(conf).unwrap();
    f(&mut v);
    v.to_string()
}

const NEW_PODS_POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: new-pods, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {role: new}}}]
  enforcementMode: always
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 80}]
";

#[derive(Default)]
struct Tally {
    probes: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
}

/// The race the plugin closes: pods are created, ADD runs between their network setup
/// and their server start, and existing pods probe them (and they probe out) from that
/// instant on, as fast as they can, under a policy that denies all of it. Not one
/// denied packet may be delivered (no reply, no RST, no ICMP unreachable); the allowed
/// pair (a -> new pod) reaches once the Pod objects arrive.
#[test]
fn race_new_pods_denied_from_the_first_packet() {
    const ROUNDS: u32 = 4;
    const PER_ROUND: u32 = 5;
    let bed = bed("basic", &[("10-new-pods.yaml", NEW_PODS_POLICY)], &[]);
    let sock = bed.agent.admin_socket.clone();
    let (ns_a, ns_b, ns_c) = (
        bed.netns_path(&pod("default", "a")).unwrap(),
        bed.netns_path(&pod("default", "b")).unwrap(),
        bed.netns_path(&pod("default", "c")).unwrap(),
    );
    let c_v4 = ip(&bed, "default", "c", Family::V4);
    let c_v6 = ip(&bed, "default", "c", Family::V6);
    let tally = Tally::default();
    let mut reach_ms = vec![];
    let mut add_ms = vec![];
    for round in 0..ROUNDS {
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let mut pods = vec![];
            for i in 0..PER_ROUND {
                let n = round * PER_ROUND + i + 1;
                let mut p = new_pod(&format!("n{n}"), &format!("10.200.1.{n}"), &format!("fd00:200:1::{n}"));
                p.labels.insert("role".into(), "new".into());
                let (tally, stop, sock, ns_b, ns_c) = (&tally, &stop, &sock, &ns_b, &ns_c);
                let tb = &bed.tb;
                let add_ms = &mut add_ms;
                bed.add_pod_with(p.clone(), |info| {
                    let sb = Sandbox::from_info(tb, info);
                    let out = sb.call("ADD", sock, 3000);
                    anyhow::ensure!(out.success, "ADD for {}: {}", info.pod.name, out.stdout);
                    add_ms.push(out.took.as_millis() as u64);
                    // From this instant on: probes in both directions, all denied.
                    let me = info.netns_path();
                    let (v4, v6) = (IpAddr4or6::v4(&info.pod), IpAddr4or6::v6(&info.pod));
                    let flows = vec![
                        (ns_b.clone(), v4, Proto::Tcp, 80),
                        (ns_b.clone(), v6, Proto::Tcp, 80),
                        (ns_c.clone(), v4, Proto::Udp, 53),
                        (ns_c.clone(), v6, Proto::Tcp, 80),
                        (me.clone(), c_v4, Proto::Tcp, 80),
                        (me, c_v6, Proto::Udp, 53),
                    ];
                    for (from, to, proto, port) in flows {
                        s.spawn(move || {
                            while !stop.load(Ordering::Relaxed) {
                                let r = probe_in(&from, to, proto, port, DENIED);
                                tally.probes.fetch_add(1, Ordering::Relaxed);
                                match r {
                                    ProbeResult::Timeout => {}
                                    ProbeResult::Error(e) => {
                                        eprintln!("probe {} -> {to} {proto}/{port}: error {e}", from.display());
                                        tally.errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                    other => {
                                        eprintln!("DELIVERED: {} -> {to} {proto}/{port}: {other}", from.display());
                                        tally.delivered.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                        });
                    }
                    Ok(())
                })
                .unwrap();
                pods.push(p);
            }
            // The servers run; the Pod objects arrive.
            let t = Instant::now();
            for p in &pods {
                bed.write(&format!("05-pod-{}.yaml", p.name), &p.to_yaml());
            }
            for p in &pods {
                let to = IpAddr4or6::v4(p);
                loop {
                    // Short probes: the figure is the time to the switch, not a probe timeout.
                    if matches!(probe_in(&ns_a, to, Proto::Tcp, 80, Duration::from_millis(50)), ProbeResult::Ok(_)) {
                        reach_ms.push(t.elapsed().as_millis() as u64);
                        break;
                    }
                    assert!(t.elapsed() < DEADLINE, "a -> {} never allowed; agent log:\n{}", p.name, tail(&bed.agent.log(), 30));
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // Denied probes continue a little after the switch from init to the policy.
            std::thread::sleep(Duration::from_millis(600));
            stop.store(true, Ordering::Relaxed);
        });
    }
    let (probes, delivered, errors) =
        (tally.probes.load(Ordering::Relaxed), tally.delivered.load(Ordering::Relaxed), tally.errors.load(Ordering::Relaxed));
    reach_ms.sort();
    add_ms.sort();
    let (i_drops, e_drops) = unknown_endpoint_drops(&bed);
    println!(
        "race: {} pods in {ROUNDS} rounds, {probes} denied probes, {delivered} delivered, {errors} errors; \
         unknown-endpoint drops ingress {i_drops} egress {e_drops}; ADD took {}..{} ms (median {}); \
         a -> new pod allowed {}..{} ms after its Pod object (median {})",
        ROUNDS * PER_ROUND,
        add_ms[0],
        add_ms[add_ms.len() - 1],
        add_ms[add_ms.len() / 2],
        reach_ms[0],
        reach_ms[reach_ms.len() - 1],
        reach_ms[reach_ms.len() / 2]
    );
    assert_eq!(delivered, 0, "denied probes were delivered");
    assert_eq!(errors, 0, "probe errors");
    assert!(probes >= (ROUNDS * PER_ROUND * 6) as u64, "too few probes: {probes}");
    assert!(i_drops > 0.0 && e_drops > 0.0, "the init phase was exercised (unknown-endpoint drops)");
    assert_eq!(cni_requests(&bed, "ADD", "ok"), (ROUNDS * PER_ROUND) as f64);
}

/// Addresses of a test pod.
struct IpAddr4or6;
impl IpAddr4or6 {
    fn v4(p: &Pod) -> std::net::IpAddr {
        p.ipv4.unwrap().into()
    }
    fn v6(p: &Pod) -> std::net::IpAddr {
        p.ipv6.unwrap().into()
    }
}
