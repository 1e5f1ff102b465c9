//! Shared setup of the end-to-end tests: a test bed from a lab, a private manifests
//! directory for the agent (atomic writes, so the agent never reads half a file),
//! an agent with a fast poll, ztctl, metrics parsing and polling helpers.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

pub mod auth;
#[allow(unused_imports)] // not every test binary uses the authentication helpers
pub use auth::*;

use zt_testbed::{bins, AgentHandle, Endpoint, Family, ProbeResult, Proto, Target, Testbed, TestbedOptions};

pub const DENIED: Duration = Duration::from_millis(300);
pub const ALLOWED: Duration = Duration::from_millis(1500);
pub const DEADLINE: Duration = Duration::from_secs(10);

pub fn lab(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs").join(name)
}

pub fn testbed(lab_name: &str) -> Testbed {
    assert_eq!(unsafe { libc::geteuid() }, 0, "the end-to-end tests need root");
    let opts = TestbedOptions::default().serve_bin(env!("CARGO_BIN_EXE_zt-testbed"));
    Testbed::up(&lab(lab_name), opts).unwrap_or_else(|e| panic!("test bed {lab_name}: {e:#}"))
}

/// A test bed, the agent's manifests dir and a running, ready agent on node1.
pub struct Bed {
    pub agent: AgentHandle,
    pub dir: PathBuf,
    pub ztctl: PathBuf,
    pub tb: Testbed,
}

impl std::ops::Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.tb
    }
}

/// The lab's workloads (its *.yaml files) plus `files` in the agent's manifests dir.
pub fn bed(lab_name: &str, files: &[(&str, &str)], extra_args: &[&str]) -> Bed {
    let tb = testbed(lab_name);
    let dir = tb.tmp_dir().join("agent-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(lab(lab_name)).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut args = vec!["--poll-ms", "100"];
    args.extend_from_slice(extra_args);
    let agent = tb.start_agent("node1", &bins::find("zt-agent").unwrap(), &dir, &args).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    Bed { agent, dir, ztctl: bins::find("ztctl").unwrap(), tb }
}

impl Bed {
    /// Write (or replace) a manifest atomically: write beside, then rename into place.
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.tb.tmp_dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join(name)).unwrap();
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).unwrap();
    }

    pub fn ztctl_cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(&self.ztctl);
        c.arg("--bpffs-root").arg(&self.agent.bpffs_root);
        c.arg("--state-dir").arg(&self.agent.state_dir);
        c.arg("--admin-socket").arg(&self.agent.admin_socket);
        c.args(args);
        c
    }

    pub fn ztctl_raw(&self, args: &[&str]) -> Output {
        self.ztctl_cmd(args).output().expect("running ztctl")
    }

    /// ztctl stdout; panics (with stderr) on failure.
    pub fn ztctl(&self, args: &[&str]) -> String {
        let out = self.ztctl_raw(args);
        assert!(out.status.success(), "ztctl {args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn ztctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let s = self.ztctl(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("ztctl {a:?}: not JSON ({e}): {s}"))
    }

    pub fn metrics(&self) -> Metrics {
        Metrics(self.agent.metrics().expect("GET /metrics"))
    }

    /// Poll until `f` holds (the agent applies manifest changes on its next poll).
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        wait_until(what, &self.agent, &mut f)
    }

    pub fn probe(&self, from: &Endpoint, to: &Target, proto: Proto, port: u16) -> ProbeResult {
        probe(&self.tb, from, to, proto, port)
    }

    /// Poll a probe until its outcome is `want` (compared by kind: Ok(_) matches any Ok).
    pub fn wait_probe(&self, from: &Endpoint, to: &Target, proto: Proto, port: u16, want: &ProbeResult) {
        let mut last = ProbeResult::Error("not run".into());
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            last = self.probe(from, to, proto, port);
            if same_kind(&last, want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{from} -> {to} {proto}/{port}: wanted {want} within {DEADLINE:?}, last {last}; agent log tail:\n{}", tail(&self.agent.log(), 30));
    }

    /// Log lines written after the `n`-th start of the agent (1-based).
    pub fn log_of_start(&self, n: usize) -> String {
        let log = self.agent.log();
        let parts: Vec<&str> = log.split("==== zt-testbed: starting").collect();
        parts.get(n).copied().unwrap_or("").to_string()
    }
}

pub fn wait_until(what: &str, agent: &AgentHandle, f: &mut dyn FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}; agent log tail:\n{}", tail(&agent.log(), 30));
}

pub fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

pub fn same_kind(a: &ProbeResult, b: &ProbeResult) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

/// One probe with the short timeout for expected drops (`DENIED`); probes expected to
/// succeed use `tb.probe(.., ALLOWED)` so that a slow start is not taken for a drop.
pub fn probe(tb: &Testbed, from: &Endpoint, to: &Target, proto: Proto, port: u16) -> ProbeResult {
    tb.probe(from, to, proto, port, DENIED)
}

pub fn pod(ns: &str, name: &str) -> Endpoint {
    Endpoint::pod(ns, name)
}

pub fn tgt(ns: &str, name: &str, f: Family) -> Target {
    Target::pod(ns, name, f)
}

pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

pub fn ok(s: &str) -> ProbeResult {
    ProbeResult::Ok(s.to_string())
}

/// Parsed Prometheus text.
pub struct Metrics(pub String);

impl Metrics {
    /// Value of the series `name{labels}` where `labels` must all match (other labels
    /// are free); None if no such series. Sums over every matching series.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for l in self.0.lines() {
            if l.starts_with('#') {
                continue;
            }
            let Some((series, value)) = l.rsplit_once(' ') else {
                continue;
            };
            let (n, ls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                continue;
            }
            let have: Vec<(&str, &str)> =
                ls.split(',').filter(|s| !s.is_empty()).filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k, v.trim_matches('"'))).collect();
            if labels.iter().all(|want| have.contains(want)) {
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
                *found.get_or_insert(0.0) += v;
            }
        }
        found
    }

    pub fn val(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| panic!("no series {name}{labels:?} in /metrics:\n{}", self.0))
    }

    pub fn verdicts(&self, direction: &str, verdict: &str, reason: &str) -> f64 {
        self.val("zt_verdicts_total", &[("direction", direction), ("verdict", verdict), ("reason", reason)])
    }
}

pub fn ip(tb: &Testbed, ns: &str, name: &str, f: Family) -> IpAddr {
    tb.pod_ip(ns, name, f).unwrap()
}

/// A ZeroTrustPolicy that isolates every pod of `ns` both ways with no rules.
pub fn deny_all(ns: &str) -> String {
    format!("apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {{name: deny-all, namespace: {ns}}}\nspec:\n  enforcementMode: always\n")
}

/// Allow `from` (app label) to reach `to` (app label) on TCP ports, both halves
/// (egress of `from`, ingress of `to`), as ZeroTrustPolicies in namespace default.
pub fn allow_tcp(name: &str, from: &str, to: &str, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("{{protocol: TCP, port: {p}}}")).collect();
    let ports = ports.join(", ");
    format!(
        "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {{name: {name}-in, namespace: default}}
spec:
  subjects: [{{podSelector: {{matchLabels: {{app: {to}}}}}}}]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]
    ports: [{ports}]
---
apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {{name: {name}-out, namespace: default}}
spec:
  subjects: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: {to}}}}}}}]
    ports: [{ports}]
"
    )
}

/// Only b is isolated (a may still reach it on TCP 80); a itself is not isolated, so
/// whatever a gets back comes from b's side.
pub const ISOLATE_B: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: isolate-b, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  enforcementMode: always
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: TCP, port: 80}]
";

/// `promtool check metrics` on an exposition text (Debian package prometheus).
pub fn promtool_check(text: &str) {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by `cargo xtask setup`)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Pod a of lab `basic` isolated both ways (`enforcementMode: always`), allowed only to
/// open TCP 7100 to b: a flow on which the server can speak first after a silence.
#[allow(dead_code)]
pub const ISOLATE_A: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: isolate-a, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: a}}}]
  enforcementMode: always
  egress:
  - to: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: TCP, port: 7100}]
";

/// The agent's current map layout directory (`<bpffs-root>/v<N>`: the one holding
/// `ZT_POLICY`), found rather than named, so that the tests follow a layout bump.
#[allow(dead_code)]
pub fn layout_dir(agent: &AgentHandle) -> PathBuf {
    std::fs::read_dir(&agent.bpffs_root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("ZT_POLICY").exists() && !p.to_string_lossy().ends_with("-resized"))
        .unwrap_or_else(|| panic!("no layout directory with ZT_POLICY under {}", agent.bpffs_root.display()))
}
