//! Services with kube-proxy's real rules in the node (the test bed's nftables renderer),
//! each case in both modes: zt-agent translating at the pod's socket
//! (`--service-translation=true`, `*_translated`) and not (`false`, `*_kube_proxy`:
//! kube-proxy's DNAT picks the backend, zt judges the untranslated frontend, allowed
//! only if policy allows every backend). Lab `labs/services`: x/a, x/b, x/c on node1.
//! Probes come from processes inside the source pod's cgroup (`PodProbers`), so the
//! socket programs see them.
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use zt_testbed::kubeproxy::{Choice, Objects};
use zt_testbed::{PodProbers, ProbeResult, ProbeSpec, Proto, Target};

const T: Duration = Duration::from_millis(600);

/// A ClusterIP Service `name` in x: port -> target (number or name), and its
/// EndpointSlices: one per distinct endpoint port, as the controller writes them for a
/// named targetPort that resolves differently per pod. `backends`: (pod, port).
fn service(name: &str, cip: &str, port: u16, target: &str, backends: &[(&str, u16)]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: x}}\nspec:\n  clusterIP: {cip}\n  ports: [{{name: p, protocol: TCP, port: {port}, targetPort: {target}}}]\n"
    );
    let mut ports: Vec<u16> = backends.iter().map(|(_, p)| *p).collect();
    ports.sort();
    ports.dedup();
    for p in ports {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{p}, namespace: x, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, protocol: TCP, port: {p}}}]\nendpoints:\n"
        ));
        for (pod, _) in backends.iter().filter(|(_, bp)| *bp == p) {
            let n = (pod.as_bytes()[0] - b'a' + 1) as u32;
            y.push_str(&format!(
                "- {{addresses: [10.220.0.{n}], conditions: {{ready: true}}, nodeName: node1, targetRef: {{kind: Pod, namespace: x, name: {pod}}}}}\n"
            ));
        }
    }
    y
}

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{spec}")
}

const DENY_INGRESS: &str = "  podSelector: {}\n  policyTypes: [Ingress]\n";

struct Svc<'a> {
    bed: &'a Bed,
    probers: PodProbers<'a>,
}

/// The lab with `files` (Services, policies) and the agent in the mode.
fn up(translation: bool, files: &[(&str, &str)]) -> Bed {
    let flag = format!("--service-translation={translation}");
    bed("services", files, &[flag.as_str()])
}

impl<'a> Svc<'a> {
    /// Probers in the bed's pods, and kube-proxy's rules for the bed's objects.
    fn new(bed: &'a Bed, choice: Choice) -> Svc<'a> {
        let s = Svc { bed, probers: PodProbers::new(&bed.tb, env!("CARGO_BIN_EXE_zt-testbed")) };
        s.sync(choice);
        s
    }

    fn sync(&self, choice: Choice) {
        let objs = Objects::load_dir(&self.bed.dir).unwrap();
        self.bed.kube_proxy_sync(&objs, choice).unwrap();
    }

    fn probe(&self, from: &str, ip: &str, port: u16) -> ProbeResult {
        let ip: IpAddr = ip.parse().unwrap();
        self.probers.run(&[ProbeSpec::new(pod("x", from), Target::Ip(ip), Proto::Tcp, port)], T).results[0].1.clone()
    }

    /// Poll until the probe finds `want` (the agent applies a change on its next poll).
    fn wait(&self, from: &str, ip: &str, port: u16, want: &ProbeResult) {
        let mut last = ProbeResult::Error("not run".into());
        for _ in 0..40 {
            last = self.probe(from, ip, port);
            if last == *want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("x/{from} -> {ip}:{port}: wanted {want}, last {last}\nagent log:\n{}", tail(&self.bed.agent.log(), 20));
    }

    /// Answers of `n` connects (each may pick another backend).
    fn many(&self, from: &str, ip: &str, port: u16, n: usize) -> Vec<ProbeResult> {
        (0..n).map(|_| self.probe(from, ip, port)).collect()
    }
}

fn drop_() -> ProbeResult {
    ProbeResult::Timeout
}

/// port != targetPort: the policy names the backend's port (80), the client the
/// Service's (8080). Ingress at the backend, then egress at the client.
fn port_is_not_target_port(translation: bool) {
    let web = service("web", "10.96.10.1", 8080, "80", &[("b", 80)]);
    let allow =
        policy("allow-a", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]\n    ports: [{port: 80}]\n");
    let bed = up(translation, &[("10-web.yaml", &web), ("20-deny.yaml", &policy("deny", DENY_INGRESS)), ("30-allow.yaml", &allow)]);
    let s = Svc::new(&bed, Choice::Random);
    s.wait("a", "10.96.10.1", 8080, &ok("x/b"));
    assert_eq!(s.probe("c", "10.96.10.1", 8080), drop_(), "x/c is not allowed into x/b");
    // Egress: a may only reach b on 80; through the Service on 8080 that is allowed.
    s.bed.remove("20-deny.yaml");
    s.bed.remove("30-allow.yaml");
    let egress = policy("a-out", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n");
    s.bed.write("40-egress.yaml", &egress);
    s.bed.write("15-other.yaml", &service("other", "10.96.10.2", 8080, "80", &[("c", 80)]));
    s.sync(Choice::Random);
    s.wait("a", "10.96.10.2", 8080, &drop_());
    assert_eq!(s.probe("a", "10.96.10.1", 8080), ok("x/b"), "egress to b:80 through web:8080");
}

#[test]
fn port_is_not_target_port_translated() {
    port_is_not_target_port(true);
}

#[test]
fn port_is_not_target_port_kube_proxy() {
    port_is_not_target_port(false);
}

/// A Service whose backends are partly allowed: a may reach b but not c.
#[test]
fn partly_allowed_backends_translated() {
    let mix = service("mix", "10.96.10.3", 8080, "80", &[("b", 80), ("c", 80)]);
    let egress = policy("a-out", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n");
    let bed = up(true, &[("10-mix.yaml", &mix)]);
    let s = Svc::new(&bed, Choice::Random);
    s.wait("a", "10.96.10.3", 8080, &ok("x/b"));
    s.bed.write("40-egress.yaml", &egress);
    s.wait("a", "10.96.10.3", 8080, &drop_());
    // Translated per connection to a random backend: the allowed one connects, the
    // denied one drops, and c never answers.
    let got = s.many("a", "10.96.10.3", 8080, 16);
    assert!(got.contains(&ok("x/b")) && got.contains(&drop_()) && got.iter().all(|r| *r == ok("x/b") || *r == drop_()), "{got:?}");
}

#[test]
fn partly_allowed_backends_kube_proxy() {
    let mix = service("mix", "10.96.10.3", 8080, "80", &[("b", 80), ("c", 80)]);
    let egress = policy("a-out", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: b}}}]\n    ports: [{port: 80}]\n");
    // kube-proxy would pick b (the allowed backend): zt still drops, since policy does
    // not allow every backend of the frontend.
    let bed = up(false, &[("10-mix.yaml", &mix)]);
    let s = Svc::new(&bed, Choice::Endpoint(0));
    s.wait("a", "10.96.10.3", 8080, &ok("x/b"));
    s.bed.write("40-egress.yaml", &egress);
    s.wait("a", "10.96.10.3", 8080, &drop_());
    assert!(s.many("a", "10.96.10.3", 8080, 4).iter().all(|r| *r == drop_()));
    // Allowing c too: every backend is allowed, the frontend is.
    s.bed.write("41-egress-c.yaml", &egress.replace("name: a-out", "name: a-out-c").replace("{pod: b}", "{pod: c}"));
    s.wait("a", "10.96.10.3", 8080, &ok("x/b"));
}

/// A pod reaching itself through its own Service. kube-proxy DNATs to the pod itself and
/// masquerades (hairpin); a pod cannot block access to itself (NetworkPolicy API).
fn hairpin(translation: bool) {
    let own = service("own-a", "10.96.10.4", 80, "80", &[("a", 80)]);
    let bed = up(translation, &[("10-own.yaml", &own)]);
    let s = Svc::new(&bed, Choice::Random);
    s.wait("a", "10.96.10.4", 80, &ok("x/a"));
    s.bed.write("20-deny.yaml", &policy("deny", DENY_INGRESS));
    s.wait("b", "10.96.10.4", 80, &drop_());
    assert_eq!(s.probe("a", "10.96.10.4", 80), ok("x/a"), "x/a to itself through its Service under default-deny ingress");
}

#[test]
fn hairpin_translated() {
    hairpin(true);
}

#[test]
fn hairpin_kube_proxy() {
    hairpin(false);
}

/// A headless Service: no ClusterIP, kube-proxy renders nothing, clients use pod IPs;
/// zt keeps judging them as pods.
fn headless(translation: bool) {
    let h = "apiVersion: v1\nkind: Service\nmetadata: {name: head, namespace: x}\nspec:\n  clusterIP: None\n  selector: {pod: b}\n  ports: [{name: p, port: 80}]\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: head-1, namespace: x, labels: {kubernetes.io/service-name: head}}\naddressType: IPv4\n\
        ports: [{name: p, protocol: TCP, port: 80}]\nendpoints:\n- {addresses: [10.220.0.2], conditions: {ready: true}, nodeName: node1}\n";
    let allow = policy("allow-a", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]\n");
    let bed = up(translation, &[("10-head.yaml", h), ("20-deny.yaml", &policy("deny", DENY_INGRESS)), ("30-allow.yaml", &allow)]);
    let s = Svc::new(&bed, Choice::Random);
    let rules = s.bed.kube_proxy_rules("node1").unwrap();
    assert!(!rules.contains("x/head"), "a headless Service gets no kube-proxy rules:\n{rules}");
    s.wait("a", "10.220.0.2", 80, &ok("x/b"));
    assert_eq!(s.probe("c", "10.220.0.2", 80), drop_());
}

#[test]
fn headless_translated() {
    headless(true);
}

#[test]
fn headless_kube_proxy() {
    headless(false);
}

/// A named targetPort that resolves to 82 on a and 83 on b; the policy allows c in on
/// the named port only: both backends are reached on their own number.
fn named_target_port(translation: bool) {
    let alt = service("alt", "10.96.10.5", 9000, "alt", &[("a", 82), ("b", 83)]);
    let allow = policy("allow-c", "  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n    ports: [{port: alt}]\n");
    let bed = up(translation, &[("10-alt.yaml", &alt), ("20-deny.yaml", &policy("deny", DENY_INGRESS)), ("30-allow.yaml", &allow)]);
    let s = Svc::new(&bed, Choice::Endpoint(0));
    let rules = s.bed.kube_proxy_rules("node1").unwrap();
    assert!(rules.contains("dnat to 10.220.0.1:82") && rules.contains("dnat to 10.220.0.2:83"), "{rules}");
    s.wait("c", "10.96.10.5", 9000, &ok("x/a"));
    if translation {
        // zt picks the backend: both show up, never a drop.
        let got = s.many("c", "10.96.10.5", 9000, 16);
        assert!(got.contains(&ok("x/a")) && got.contains(&ok("x/b")) && got.iter().all(|r| r.is_ok()), "{got:?}");
    } else {
        s.sync(Choice::Endpoint(1));
        s.wait("c", "10.96.10.5", 9000, &ok("x/b"));
    }
    // b through the Service: to a, not allowed in; to itself, its own traffic (a pod is
    // never blocked from itself: with kube-proxy the hairpin comes back through b's own
    // interface, translated it stays inside b).
    if translation {
        let got = s.many("b", "10.96.10.5", 9000, 16);
        assert!(got.contains(&drop_()) && got.iter().all(|r| *r == drop_() || *r == ok("x/b")), "{got:?}");
    } else {
        assert_eq!(s.probe("b", "10.96.10.5", 9000), ok("x/b"), "b through the Service to itself");
        s.sync(Choice::Endpoint(0));
        assert_eq!(s.probe("b", "10.96.10.5", 9000), drop_(), "x/b is not allowed into x/a");
    }
}

#[test]
fn named_target_port_translated() {
    named_target_port(true);
}

#[test]
fn named_target_port_kube_proxy() {
    named_target_port(false);
}

/// A long-lived TCP flow from inside a pod (its cgroup, so the socket programs see the
/// connect): python3 connects, then for each `roundtrip` sends a line to the echo server
/// and reports `echo`, `eof` or `error <kind>`.
struct Flow {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Flow {
    fn open(bed: &Bed, from: &str, host: &str, port: u16) -> Flow {
        use std::io::BufRead;
        let script = format!(
            "import socket, sys\ns = socket.create_connection(('{host}', {port}), timeout=2)\nprint('connected', flush=True)\n\
             for line in sys.stdin:\n    try:\n        s.sendall(line.encode()); s.settimeout(1.5); d = s.recv(100)\n        print('echo' if d else 'eof', flush=True)\n\
             \x20   except Exception as e:\n        print('error', type(e).__name__, flush=True)\n"
        );
        let mut c = bed.command_in(&pod("x", from), &["/usr/bin/python3", "-c", &script]).unwrap();
        let mut child = c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let (stdin, mut stdout) = (child.stdin.take().unwrap(), std::io::BufReader::new(child.stdout.take().unwrap()));
        let mut l = String::new();
        stdout.read_line(&mut l).unwrap();
        assert_eq!(l.trim(), "connected", "flow x/{from} -> {host}:{port}");
        Flow { child, stdin, stdout }
    }

    fn roundtrip(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin, "ping").unwrap();
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// x/a holds a flow to the Service's echo port on backend b; then b leaves the
/// EndpointSlice (the pod keeps running, as when it turns unready) and c comes in.
/// New connections go to c in both modes. The established flow: kube-proxy keeps its
/// TCP conntrack entry (it flushes only UDP), so the flow stays on b, and zt must not
/// break it; with zt's translation the issue asks that a socket on a removed backend is
/// destroyed or re-translated.
fn backend_removed_during_a_flow(translation: bool) -> (String, String) {
    let two = |b: &str| {
        let mut y = service("echo", "10.96.10.6", 7000, "7000", &[(b, 7000)]);
        y.push_str("---\n");
        y.push_str(&service("echo-http", "10.96.10.7", 8080, "80", &[(b, 80)]));
        y
    };
    let bed = up(translation, &[("10-echo.yaml", &two("b"))]);
    let s = Svc::new(&bed, Choice::Random);
    s.wait("a", "10.96.10.7", 8080, &ok("x/b"));
    let mut flow = Flow::open(&bed, "a", "10.96.10.6", 7000);
    assert_eq!(flow.roundtrip(), "echo");
    bed.write("10-echo.yaml", &two("c"));
    s.sync(Choice::Random);
    s.wait("a", "10.96.10.7", 8080, &ok("x/c"));
    std::thread::sleep(Duration::from_millis(500));
    (flow.roundtrip(), flow.roundtrip())
}

#[test]
fn backend_removed_during_a_flow_kube_proxy() {
    let (first, second) = backend_removed_during_a_flow(false);
    assert_eq!((first.as_str(), second.as_str()), ("echo", "echo"), "the established flow stays on its backend (kube-proxy keeps TCP conntrack)");
}

/// Translated, a TCP flow on a removed backend stays on it as with kube-proxy (the
/// default `--service-destroy-stale-sockets udp`: a terminating backend still serves its
/// clients); connected UDP sockets, and TCP with `all`, are destroyed
/// (`e2e_service_sockets.rs`).
#[test]
fn backend_removed_during_a_flow_translated() {
    let (first, second) = backend_removed_during_a_flow(true);
    assert_eq!((first.as_str(), second.as_str()), ("echo", "echo"), "the established TCP flow stays on its backend by default");
}

/// A Service without a selector whose EndpointSlice points outside the cluster (the
/// external host, identity `world`): the backend is judged by its address, as an ipBlock
/// peer. x/a may reach 10.78.0.0/16 on the backend's port; x/c may reach nothing.
fn selectorless_external(translation: bool) {
    use zt_testbed::dns::{ExternalHost, EXT_TCP};
    let ext = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: x}}\nspec:\n  clusterIP: 10.96.10.9\n  ports: [{{name: p, protocol: TCP, port: 8080, targetPort: {EXT_TCP}}}]\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: ext-1, namespace: x, labels: {{kubernetes.io/service-name: ext}}}}\naddressType: IPv4\n\
        ports: [{{name: p, protocol: TCP, port: {EXT_TCP}}}]\nendpoints:\n- {{addresses: [10.78.1.1], conditions: {{ready: true}}}}\n"
    );
    let a_out = policy(
        "a-out",
        &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: 10.78.0.0/16}}}}]\n    ports: [{{port: {EXT_TCP}}}]\n"),
    );
    let c_out = policy("c-out", "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n");
    let bed = up(translation, &[("10-ext.yaml", &ext)]);
    let _host = ExternalHost::add(&bed.tb, "node1", std::path::Path::new(env!("CARGO_BIN_EXE_zt-testbed"))).unwrap();
    let s = Svc::new(&bed, Choice::Random);
    s.wait("a", "10.96.10.9", 8080, &ok("ext"));
    s.bed.write("40-a-out.yaml", &a_out);
    s.bed.write("41-c-out.yaml", &c_out);
    s.wait("c", "10.96.10.9", 8080, &drop_());
    assert_eq!(s.probe("a", "10.96.10.9", 8080), ok("ext"), "x/a through the selector-less Service to its external backend");
    // Narrowing a's egress to another block: the external backend is no longer allowed.
    s.bed.write("40-a-out.yaml", &a_out.replace("10.78.0.0/16", "10.79.0.0/16"));
    s.wait("a", "10.96.10.9", 8080, &drop_());
}

#[test]
fn selectorless_external_translated() {
    selectorless_external(true);
}

#[test]
fn selectorless_external_kube_proxy() {
    selectorless_external(false);
}

/// NodePort from another node (lab `two-nodes`, an agent on each node): default/a on
/// node1 calls node2's address on the NodePort of `web` (backend default/b on node2).
/// node1 does not translate another node's address, so kube-proxy on node2 DNATs it and
/// masquerades it (external traffic, `externalTrafficPolicy: Cluster`): b sees node2's
/// address, not a. So under b's default-deny ingress a pod selector for a does not
/// admit the NodePort path (fail closed; it admits a by pod IP), an ipBlock of node2's
/// address does.
fn nodeport_from_another_node(translation: bool) {
    let mut pods = std::fs::read_to_string(lab("two-nodes").join("pods.yaml")).unwrap();
    for k in [1, 2] {
        let name = format!("metadata:\n  name: node{k}\n");
        assert!(pods.contains(&name), "labs/two-nodes/pods.yaml changed: no Node node{k}");
        pods = pods.replace(&name, &format!("{name}status:\n  addresses: [{{type: InternalIP, address: 10.255.0.{k}}}, {{type: InternalIP, address: \"fd00:255::{k}\"}}]\n"));
    }
    let web = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  type: NodePort\n  clusterIP: 10.96.20.1\n  selector: {app: b}\n  \
        ports: [{name: p, protocol: TCP, port: 8080, targetPort: 80, nodePort: 30080}]\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: default, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\n\
        ports: [{name: p, protocol: TCP, port: 80}]\nendpoints:\n- {addresses: [10.200.2.1], conditions: {ready: true}, nodeName: node2, targetRef: {kind: Pod, namespace: default, name: b}}\n";
    let flag = format!("--service-translation={translation}");
    let bed = bed("two-nodes", &[("pods.yaml", &pods), ("10-web.yaml", web)], &[flag.as_str()]);
    let agent2 = bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &bed.dir, &["--poll-ms", "100", flag.as_str()]).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    bed.kube_proxy_sync(&Objects::load_dir(&bed.dir).unwrap(), Choice::Random).unwrap();
    let node2 = bed.node_ip("node2", zt_testbed::Family::V4).unwrap().to_string();
    let probers = PodProbers::new(&bed.tb, env!("CARGO_BIN_EXE_zt-testbed"));
    let probe = |ip: &str, port: u16| {
        probers.run(&[ProbeSpec::new(pod("default", "a"), Target::Ip(ip.parse().unwrap()), Proto::Tcp, port)], T).results[0].1.clone()
    };
    let wait = |ip: &str, port: u16, want: ProbeResult| {
        let mut last = ProbeResult::Error("not run".into());
        for _ in 0..40 {
            last = probe(ip, port);
            if last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("default/a -> {ip}:{port}: wanted {want}, last {last}\nnode2 agent log:\n{}", tail(&agent2.log(), 20));
    };
    wait(&node2, 30080, ok("default/b"));
    let b_in = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-in, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  \
        ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n";
    bed.write("20-b-in.yaml", b_in);
    wait(&node2, 30080, drop_());
    assert_eq!(probe("10.200.2.1", 80), ok("default/b"), "a by its pod IP is allowed");
    bed.write("21-b-nodes.yaml", &b_in.replace("name: b-in", "name: b-nodes").replace("podSelector: {matchLabels: {app: a}}}]", &format!("ipBlock: {{cidr: {node2}/32}}}}]")));
    wait(&node2, 30080, ok("default/b"));
}

#[test]
fn nodeport_from_another_node_translated() {
    nodeport_from_another_node(true);
}

#[test]
fn nodeport_from_another_node_kube_proxy() {
    nodeport_from_another_node(false);
}
