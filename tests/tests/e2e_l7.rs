//! L7 end to end (issue 11): HTTP method and path rules enforced by the node's proxy.
//! httpbin runs a real HTTP/1.1 server (Python's http.server, Debian python3) on 8080
//! (HTTP rules: GET /headers, POST /upload, GET /api/*) and 8081 (L4 only); sleep's
//! clients are curl and small Python socket scripts in the sleep pod (its netns and
//! cgroup), so every byte goes through the hooks on the pods' veths and the proxy.
//! The two-node tests add sleep2 (ServiceAccount sleep, so sleep's identity) on node2,
//! with its own agent: its flows reach httpbin through node1's uplink (`fabric0`), where
//! `zt_from_uplink` steers them to node1's proxy.
mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{AgentHandle, Family, HttpServer, Pod};


/// Raw client: `mode ip port`; prints what came back, or `RESET` / `TIMEOUT`.
const CLIENT: &str = r#"
import sys, socket, time
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(5)
try:
    s.connect((ip, port))
except socket.timeout:
    print("CONNECT-TIMEOUT"); sys.exit(0)
if mode == "pipelined":
    s.sendall(b"GET /headers HTTP/1.1\r\nHost: httpbin\r\n\r\nPOST /post HTTP/1.1\r\nHost: httpbin\r\nContent-Length: 4\r\n\r\nabcdGET /headers HTTP/1.1\r\nHost: httpbin\r\n\r\n")
elif mode == "split":
    for b in b"GET /api/split HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n":
        s.send(bytes([b]))
        time.sleep(0.005)
elif mode == "tls":
    # The start of a TLS 1.2 ClientHello record.
    s.sendall(bytes.fromhex("16030100a5010000a10303") + b"\x00" * 32)
elif mode == "h2":
    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
elif mode == "garbage":
    s.sendall(b"GET /headers HTTP/1.1\r\nHost httpbin\r\n\r\n")
out = b""
try:
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
except ConnectionResetError:
    print(out.decode(errors="replace") + "RESET"); sys.exit(0)
except socket.timeout:
    print(out.decode(errors="replace") + "TIMEOUT"); sys.exit(0)
print(out.decode(errors="replace") + "EOF")
"#;

struct L7Bed {
    bed: Bed,
    _server: HttpServer,
}

fn l7_bed() -> L7Bed {
    l7_bed_with(&[])
}

fn l7_bed_with(agent_args: &[&str]) -> L7Bed {
    for tool in ["/usr/bin/python3", "/usr/bin/curl"] {
        assert!(std::path::Path::new(tool).exists(), "{tool} is missing: `cargo xtask setup` installs python3 and curl");
    }
    let bed = bed("l7", &[], agent_args);
    let server = HttpServer::start(&bed, &pod("default", "httpbin"), &[8080, 8081]).unwrap();
    L7Bed { bed, _server: server }
}

impl L7Bed {
    fn httpbin(&self, f: Family) -> String {
        let ip = self.bed.pod_ip("default", "httpbin", f).unwrap();
        if f == Family::V6 {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    }

    /// curl in `from`: (status code, body). Status 0: no HTTP response (curl's exit code in the body).
    fn curl(&self, from: &str, args: &[&str]) -> (u16, String) {
        let mut a = vec!["/usr/bin/curl", "-sS", "--max-time", "5", "--path-as-is", "-o", "/dev/stdout", "-w", "\n%{http_code}"];
        a.extend_from_slice(args);
        let out = self.bed.exec_in(&pod("default", from), &a).unwrap();
        let s = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = s.rsplit_once('\n').unwrap_or(("", "0"));
        let code: u16 = code.trim().parse().unwrap_or(0);
        if code == 0 {
            return (0, format!("curl exit {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr)));
        }
        (code, body.to_string())
    }

    fn raw(&self, mode: &str, f: Family, port: u16) -> String {
        let ip = self.bed.pod_ip("default", "httpbin", f).unwrap().to_string();
        let out = self.bed.exec_in(&pod("default", "sleep"), &["/usr/bin/python3", "-c", CLIENT, mode, &ip, &port.to_string()]).unwrap();
        assert!(out.status.success(), "client {mode}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn url(&self, f: Family, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.httpbin(f))
    }

    fn log_tail(&self) -> String {
        tail(&self.bed.agent.log(), 40)
    }
}

#[test]
fn get_allowed_post_denied_with_403_naming_the_rule() {
    let b = l7_bed();
    for f in FAMILIES {
        let (code, body) = b.curl("sleep", &[&b.url(f, 8080, "/headers")]);
        assert_eq!((code, body.as_str()), (200, "GET /headers\n"), "{f}: agent log:\n{}", b.log_tail());
        let (code, body) = b.curl("sleep", &["-X", "POST", "-d", "x=1", &b.url(f, 8080, "/post")]);
        assert_eq!(code, 403, "{f}: {body}");
        assert!(body.contains("POST /post") && body.contains("ZeroTrustPolicy default/httpbin-http spec.ingress[0]"), "{f}: {body}");
        // The L4-only port lets every request through, through no proxy.
        let (code, body) = b.curl("sleep", &["-X", "POST", "-d", "x=1", &b.url(f, 8081, "/post")]);
        assert_eq!((code, body.as_str()), (200, "POST /post 3\n"), "{f}");
        // notsleep has no L4 allow: dropped in the kernel, no HTTP answer.
        let (code, body) = b.curl("notsleep", &["--connect-timeout", "1", &b.url(f, 8080, "/headers")]);
        assert_eq!(code, 0, "{f}: notsleep got an answer: {body}");
    }
    let m = b.bed.metrics();
    assert_eq!(m.get("zt_http_requests_total", &[("verdict", "allowed"), ("method", "GET")]), Some(2.0), "{}", m.0);
    assert_eq!(m.get("zt_http_requests_total", &[("verdict", "denied"), ("method", "POST")]), Some(2.0));
    // The kernel dropped notsleep's SYNs as policy (the proxy never saw them).
    assert!(m.get("zt_verdicts_total", &[("reason", "policy-default-deny")]).unwrap_or(0.0) >= 2.0, "{}", m.0);
}

#[test]
fn the_normalised_path_is_judged_and_sent_upstream() {
    let b = l7_bed();
    let f = Family::V4;
    for (path, want_code, want_body) in [
        // Allowed once normalised: the server sees the normalised path.
        ("/post/../headers", 200, "GET /headers\n"),
        ("//headers", 200, "GET /headers\n"),
        ("/x/%2e%2e/headers", 200, "GET /headers\n"),
        ("/%68eaders", 200, "GET /headers\n"),
        ("/api/v1/../v2?q=/post", 200, "GET /api/v2?q=/post\n"),
        // Denied once normalised.
        ("/headers/../post", 403, ""),
        ("/headers/%2e%2e/post", 403, ""),
        ("/api/../post", 403, ""),
        // Ambiguous: refused with 400, never guessed.
        ("/headers%2f..%2fpost", 400, ""),
        ("/api/%252e%252e/post", 400, ""),
        ("/headers%00", 400, ""),
    ] {
        let (code, body) = b.curl("sleep", &[&b.url(f, 8080, path)]);
        assert_eq!(code, want_code, "{path}: {body}");
        if !want_body.is_empty() {
            assert_eq!(body, want_body, "{path}");
        }
    }
}

#[test]
fn pipelined_split_and_large_requests() {
    let b = l7_bed();
    for f in FAMILIES {
        // Three pipelined requests, the second denied: 200, then 403 and the connection
        // closes (the third is never forwarded).
        let out = b.raw("pipelined", f, 8080);
        let statuses: Vec<&str> = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
        assert_eq!(statuses, ["HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden"], "{f}: {out}");
        assert!(out.contains("GET /headers\n") && out.ends_with("EOF\n") && out.matches("GET /headers").count() == 1, "{f}: {out}");
        // A request written one byte per segment.
        let out = b.raw("split", f, 8080);
        assert!(out.starts_with("HTTP/1.1 200 OK") && out.contains("GET /api/split\n"), "{f}: {out}");
    }
    // A 1 MiB upload on an allowed POST (curl sends Expect: 100-continue; the proxy
    // answers it and streams the body).
    let file = b.bed.tmp_dir().join("upload.bin");
    std::fs::write(&file, vec![b'z'; 1 << 20]).unwrap();
    let data = format!("@{}", file.display());
    for f in FAMILIES {
        let (code, body) = b.curl("sleep", &["--data-binary", &data, &b.url(f, 8080, "/upload")]);
        assert_eq!((code, body.as_str()), (200, "POST /upload 1048576\n"), "{f}");
    }
}

#[test]
fn tls_http2_and_malformed_requests_are_refused_and_counted() {
    let b = l7_bed();
    for f in FAMILIES {
        assert_eq!(b.raw("tls", f, 8080), "RESET\n", "{f}: a TLS ClientHello is reset");
        assert_eq!(b.raw("h2", f, 8080), "RESET\n", "{f}: the HTTP/2 preface is reset");
        let out = b.raw("garbage", f, 8080);
        assert!(out.starts_with("HTTP/1.1 400") || out.trim_end().ends_with("RESET"), "{f}: a malformed request is refused: {out}");
        assert!(!out.contains("GET /headers\n"), "{f}: forwarded: {out}");
        // The L4-only port is not the proxy's: TLS goes straight to the server.
        assert!(!b.raw("tls", f, 8081).contains("RESET"), "{f}: port 8081 has no HTTP rules");
    }
    let m = b.bed.metrics();
    assert_eq!(m.get("zt_http_connections_refused_total", &[("reason", "tls")]), Some(2.0), "{}", m.0);
    assert_eq!(m.get("zt_http_connections_refused_total", &[("reason", "http2")]), Some(2.0));
    assert_eq!(m.get("zt_http_connections_refused_total", &[("reason", "malformed")]), Some(2.0));
}

#[test]
fn proxy_down_fails_closed_and_a_restart_serves_again() {
    let b = l7_bed();
    let f = Family::V4;
    assert_eq!(b.curl("sleep", &[&b.url(f, 8080, "/headers")]).0, 200);
    // An established keep-alive connection (the proxy's socket) dies with the agent.
    b.bed.agent.kill();
    let (code, body) = b.curl("sleep", &["--connect-timeout", "2", &b.url(f, 8080, "/headers")]);
    assert_eq!(code, 0, "proxy down: {body}");
    let (code, _) = b.curl("sleep", &["--connect-timeout", "2", "-X", "POST", &b.url(f, 8080, "/post")]);
    assert_eq!(code, 0, "proxy down: nothing passes, denied or not");
    // The L4-only port never depended on the proxy.
    assert_eq!(b.curl("sleep", &[&b.url(f, 8081, "/post")]).0, 200);
    b.bed.agent.start().unwrap();
    b.bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    b.bed.wait_until("GET /headers through the restarted proxy", || b.curl("sleep", &[&b.url(f, 8080, "/headers")]).0 == 200);
    assert_eq!(b.curl("sleep", &["-X", "POST", &b.url(f, 8080, "/post")]).0, 403, "the restarted agent opens nothing");
    // The kernel counted the steered SYNs it had no listener for.
    let m = b.bed.metrics();
    assert!(m.get("zt_verdicts_total", &[("reason", "http-proxy-down")]).unwrap_or(0.0) >= 1.0, "{}", m.0);
}

#[test]
fn ztctl_shows_the_http_step_and_the_403_event() {
    let b = l7_bed();
    let bed = &b.bed;
    // explain: the proxy's step with the rules it allows.
    let e = bed.ztctl(&["explain", "default/sleep", "default/httpbin", "tcp/8080"]);
    assert!(e.contains("HTTP-RULES") && e.contains("HTTP proxy: http (http-rules)") && e.contains("GET /headers, POST /upload, GET /api/*"), "{e}");
    let e = bed.ztctl(&["explain", "default/sleep", "default/httpbin", "tcp/8081"]);
    assert!(e.contains(": ALLOW") && !e.contains("HTTP proxy"), "{e}");
    let e = bed.ztctl(&["explain", "default/notsleep", "default/httpbin", "tcp/8080"]);
    assert!(e.contains(": DROP") && !e.contains("HTTP proxy"), "{e}");
    // drops -f: the proxy's 403, with both identities, the request and the rule.
    let child = bed
        .ztctl_cmd(&["drops", "--follow", "--count", "1", "--reason", "http-denied", "--timeout", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ") {
        assert_eq!(b.curl("sleep", &["-X", "POST", &b.url(Family::V4, 8080, "/post")]).0, 403);
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ztctl drops: {text}{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "DROP",
        "HTTP",
        "default/sleep",
        "default/httpbin",
        "spiffe://cluster.local/ns/default/sa/sleep",
        ":8080 ",
        "reason=http-denied",
        "http=\"POST /post\" status=403",
        "rule=\"ZeroTrustPolicy default/httpbin-http spec.ingress[0]\"",
    ] {
        assert!(text.contains(want), "{want:?} missing in: {text}");
    }
}

/// sleep2 on node2: sleep's ServiceAccount, so sleep's identity and sleep's rules.
const SLEEP2: &str = "apiVersion: v1
kind: Pod
metadata: {name: sleep2, namespace: default, uid: 6b7e0000-0000-4000-8000-000000000042, labels: {app: sleep2}}
spec:
  nodeName: node2
  serviceAccountName: sleep
  containers:
  - {name: sleep, image: curlimages/curl}
status:
  phase: Running
  podIP: 10.202.0.40
  podIPs: [{ip: 10.202.0.40}, {ip: \"fd00:202::40\"}]
";

/// The L7 bed plus node2 with sleep2 and an agent of its own (it translates the Service
/// at sleep2's socket; node1's agent steers at its uplink).
struct TwoNodes {
    b: L7Bed,
    agent2: AgentHandle,
}

fn two_nodes() -> TwoNodes {
    two_nodes_with(&[])
}

/// `node1_args`: extra flags of node1's agent.
fn two_nodes_with(node1_args: &[&str]) -> TwoNodes {
    let b = l7_bed_with(node1_args);
    let mut p = Pod::new("default", "sleep2", "node2", &["10.202.0.40".parse().unwrap(), "fd00:202::40".parse().unwrap()], &[]);
    p.uid = "6b7e0000-0000-4000-8000-000000000042".into();
    p.service_account = Some("sleep".into());
    b.bed.tb.add_pod(p).unwrap();
    b.bed.write("40-sleep2.yaml", SLEEP2);
    let agent2 = b.bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &b.bed.dir, &["--poll-ms", "100"]).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    TwoNodes { b, agent2 }
}

impl TwoNodes {
    fn logs(&self) -> String {
        format!("node1 agent log:\n{}\nnode2 agent log:\n{}", self.b.log_tail(), tail(&self.agent2.log(), 20))
    }

    /// Until sleep2's GET passes (node1 learned sleep2 and hooked its uplink).
    fn wait_steered(&self, f: Family) {
        let start = Instant::now();
        let mut last = (0, String::new());
        while start.elapsed() < Duration::from_secs(15) {
            last = self.b.curl("sleep2", &[&self.b.url(f, 8080, "/headers")]);
            if last.0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("sleep2 -> httpbin {f} GET /headers: {last:?}\n{}", self.logs());
    }
}

#[test]
fn a_client_on_another_node_is_steered_at_the_uplink() {
    let t = two_nodes();
    let b = &t.b;
    for f in FAMILIES {
        t.wait_steered(f);
        let (code, body) = b.curl("sleep2", &[&b.url(f, 8080, "/headers")]);
        assert_eq!((code, body.as_str()), (200, "GET /headers\n"), "{f}");
        let (code, body) = b.curl("sleep2", &["-X", "POST", "-d", "x=1", &b.url(f, 8080, "/post")]);
        assert_eq!(code, 403, "{f}: {body}\n{}", t.logs());
        assert!(body.contains("POST /post") && body.contains("ZeroTrustPolicy default/httpbin-http spec.ingress[0]"), "{f}: {body}");
        // A path trick is judged normalised, as for a local client.
        assert_eq!(b.curl("sleep2", &[&b.url(f, 8080, "/headers/../post")]).0, 403, "{f}");
        // The L4-only port stays in the kernel, whatever the request.
        let (code, body) = b.curl("sleep2", &["-X", "POST", "-d", "x=1", &b.url(f, 8081, "/post")]);
        assert_eq!((code, body.as_str()), (200, "POST /post 3\n"), "{f}");
    }
    // Through the Service (ClusterIP 10.96.0.81:8080): node2's agent translates it at
    // sleep2's socket, node1's uplink steers the translated flow.
    let svc = "http://10.96.0.81:8080";
    b.bed.wait_until("node2 to translate the Service", || b.curl("sleep2", &[&format!("{svc}/headers")]).0 == 200);
    assert_eq!(b.curl("sleep2", &[&format!("{svc}/api/v1")]), (200, "GET /api/v1\n".to_string()));
    let (code, body) = b.curl("sleep2", &["-X", "POST", &format!("{svc}/post")]);
    assert_eq!(code, 403, "{body}");
    // node1 counted the steering and the proxy's decisions; sleep2's requests never
    // reached httpbin unjudged (no http-unsteered drop: every flow was steered).
    let m = b.bed.metrics();
    assert!(m.get("zt_verdicts_total", &[("reason", "http-steered")]).unwrap_or(0.0) >= 8.0, "{}", m.0);
    assert_eq!(m.get("zt_verdicts_total", &[("reason", "http-unsteered")]).unwrap_or(0.0), 0.0, "{}", m.0);
    assert!(m.get("zt_http_requests_total", &[("verdict", "denied"), ("method", "POST")]).unwrap_or(0.0) >= 3.0, "{}", m.0);
    // explain on node1 shows the uplink step.
    let e = b.bed.ztctl(&["explain", "default/sleep2", "default/httpbin", "tcp/8080"]);
    assert!(e.contains("HTTP proxy: http (http-rules)") && e.contains("zt_from_uplink") && e.contains("fabric0"), "{e}");
}

#[test]
fn proxy_down_refuses_clients_on_another_node_and_a_restart_serves_again() {
    let t = two_nodes();
    let b = &t.b;
    let f = Family::V4;
    t.wait_steered(f);
    b.bed.agent.kill();
    // The uplink's link stays pinned: a steered SYN meets no listener and drops (never
    // reaches httpbin unjudged), on both families.
    for f in FAMILIES {
        let (code, body) = b.curl("sleep2", &["--connect-timeout", "2", &b.url(f, 8080, "/headers")]);
        assert_eq!(code, 0, "{f}: proxy down: {body}");
        let (code, _) = b.curl("sleep2", &["--connect-timeout", "2", "-X", "POST", &b.url(f, 8080, "/post")]);
        assert_eq!(code, 0, "{f}: proxy down: nothing passes, denied or not");
    }
    // The L4-only port never depended on the proxy.
    assert_eq!(b.curl("sleep2", &[&b.url(f, 8081, "/post")]).0, 200);
    b.bed.agent.start().unwrap();
    b.bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    t.wait_steered(f);
    assert_eq!(b.curl("sleep2", &["-X", "POST", &b.url(f, 8080, "/post")]).0, 403, "the restarted agent opens nothing");
    let m = b.bed.metrics();
    assert!(m.get("zt_verdicts_total", &[("reason", "http-proxy-down")]).unwrap_or(0.0) >= 2.0, "{}", m.0);
}

/// `--uplink-interfaces none` on node1: nothing steers sleep2's flows, and httpbin's hook
/// refuses them on the HTTP port (`http-unsteered`); the L4-only port still works, and
/// explain says why.
#[test]
fn without_an_uplink_hook_clients_on_another_node_are_refused() {
    let t = two_nodes_with(&["--uplink-interfaces", "none"]);
    let b = &t.b;
    let f = Family::V4;
    b.bed.wait_until("sleep2 to reach the L4-only port", || b.curl("sleep2", &[&b.url(f, 8081, "/post")]).0 == 200);
    for f in FAMILIES {
        let (code, body) = b.curl("sleep2", &["--connect-timeout", "2", &b.url(f, 8080, "/headers")]);
        assert_eq!(code, 0, "{f}: not steered, yet answered: {body}");
    }
    let m = b.bed.metrics();
    assert!(m.get("zt_verdicts_total", &[("reason", "http-unsteered")]).unwrap_or(0.0) >= 2.0, "{}", m.0);
    assert_eq!(m.get("zt_verdicts_total", &[("reason", "http-steered")]).unwrap_or(0.0), 0.0, "{}", m.0);
    let e = b.bed.ztctl(&["explain", "default/sleep2", "default/httpbin", "tcp/8080"]);
    assert!(e.contains(": DROP") && e.contains("http-unsteered") && e.contains("no uplink of this node is hooked"), "{e}");
}

/// The mirror case: sleep2's own egress HTTP rules (node2's proxy judges them) to httpbin
/// on node1. node2's proxy connects upstream from sleep2's address; httpbin's answers
/// come back through node2's uplink, which hands them to that proxy socket instead of
/// routing them to sleep2. node1 still applies httpbin's ingress rules (its uplink steers
/// node2's proxy's connection like any client's).
#[test]
fn egress_http_rules_to_a_server_on_another_node() {
    let t = two_nodes();
    let b = &t.b;
    t.wait_steered(Family::V4);
    b.bed.write(
        "50-sleep2-out.yaml",
        "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: sleep2-out, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: sleep2}}}]
  egress:
    - to: [{spiffeId: spiffe://cluster.local/ns/default/sa/httpbin}]
      ports: [{port: 8080}]
      http:
        - {method: GET, pathPrefix: /}
        - {method: POST, path: /upload}
",
    );
    // Denied by node2's proxy (egress rules): the 403 names sleep2-out.
    b.bed.wait_until("node2 to apply sleep2's egress rules", || {
        let (code, body) = b.curl("sleep2", &["-X", "PUT", &b.url(Family::V4, 8080, "/upload")]);
        code == 403 && body.contains("ZeroTrustPolicy default/sleep2-out spec.egress[0]")
    });
    for f in FAMILIES {
        // Allowed by both sides: through both proxies.
        let (code, body) = b.curl("sleep2", &[&b.url(f, 8080, "/headers")]);
        assert_eq!((code, body.as_str()), (200, "GET /headers\n"), "{f}\n{}", t.logs());
        let (code, body) = b.curl("sleep2", &["--data-binary", "abc", &b.url(f, 8080, "/upload")]);
        assert_eq!((code, body.as_str()), (200, "POST /upload 3\n"), "{f}");
        // Allowed by sleep2's egress rules, denied by httpbin's ingress rules (node1).
        let (code, body) = b.curl("sleep2", &[&b.url(f, 8080, "/status")]);
        assert_eq!(code, 403, "{f}: {body}");
        assert!(body.contains("ZeroTrustPolicy default/httpbin-http spec.ingress[0]"), "{f}: {body}");
    }
    // explain on node2 shows the proxy's step and where the answers come back.
    let out = std::process::Command::new(&b.bed.ztctl)
        .arg("--bpffs-root")
        .arg(&t.agent2.bpffs_root)
        .arg("--state-dir")
        .arg(&t.agent2.state_dir)
        .arg("--admin-socket")
        .arg(&t.agent2.admin_socket)
        .args(["explain", "default/sleep2", "default/httpbin", "tcp/8080"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stdout);
    assert!(e.contains("HTTP proxy: http (http-rules)") && e.contains("go to the proxy's socket (zt_from_uplink)") && e.contains("fabric0"), "{e}");
    let m2 = Metrics(t.agent2.metrics().expect("node2 metrics"));
    assert!(m2.get("zt_http_requests_total", &[("verdict", "allowed"), ("method", "GET")]).unwrap_or(0.0) >= 4.0, "{}", m2.0);
}
