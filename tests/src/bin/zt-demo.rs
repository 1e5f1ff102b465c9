//! `cargo xtask demo`: the classic zero-trust lab on a simulated node. sleep and
//! httpbin (and notsleep, a third identity) in namespace default; sleep calls httpbin
//! through its Service (httpbin:8000, the ClusterIP: the bed has no DNS), from inside
//! its own cgroup so that zt translates the frontend at the socket; before policy the
//! call succeeds, after default-deny it fails, after an allow for the sleep identity
//! only sleep gets through (and sleep2, sleep's identity on node2, a second node
//! without an agent); then STRICT mutual authentication in the namespace: sleep, proven
//! by its own node's agent, still gets through, sleep2, proven by nobody, is dropped as
//! `auth-required`; then HTTP rules on another port: GET /headers 200, POST 403 from
//! the node's proxy. Each step shows what ztctl says and the verdict counters. Any step
//! that does not behave ends the demo with an error.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zt_testbed::{bins, Endpoint, Family, Proto, ProbeResult, Target, Testbed, TestbedOptions};

const LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/labs/demo");
const L7_LAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/labs/l7");

fn main() -> Result<()> {
    let agent_bin = bins::find("zt-agent")?;
    let ztctl = bins::find("ztctl")?;
    let serve = bins::find("zt-testbed")?;
    println!("== zt demo: bringing up node1 with pods sleep, httpbin, notsleep and node2 (no agent) with sleep2 (network namespaces)");
    let bed = Testbed::up(Path::new(LAB), TestbedOptions::default().serve_bin(serve))?;
    // The agent watches its own manifests directory; the demo adds policy files to it.
    let manifests = bed.tmp_dir().join("agent-manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::copy(Path::new(LAB).join("00-workloads.yaml"), manifests.join("00-workloads.yaml"))?;
    std::fs::copy(Path::new(LAB).join("01-node2.yaml"), manifests.join("01-node2.yaml"))?;
    std::fs::copy(Path::new(LAB).join("05-service.yaml"), manifests.join("05-service.yaml"))?;
    let agent = bed.start_agent("node1", &agent_bin, &manifests, &[])?;
    agent.wait_ready(Duration::from_secs(20))?;
    let ctl = Ctl { bin: ztctl, agent: &agent };
    println!("== zt-agent is up; identities on this node:");
    ctl.show(&["identities"])?;

    let sleep = Endpoint::pod("default", "sleep");
    let notsleep = Endpoint::pod("default", "notsleep");
    let sleep2 = Endpoint::pod("default", "sleep2");
    let httpbin = |f| Target::Pod { namespace: "default".into(), name: "httpbin".into(), family: f };
    println!("== the Service httpbin (ClusterIP 10.96.0.80, fd00:96::80; port 8000 -> http/80), ztctl services:");
    ctl.show(&["services"])?;

    step("1. no policy: sleep -> http://httpbin:8000 (Kubernetes default: allowed)");
    call_service(&bed, &sleep, SERVICE_V4, true)?;
    call_service(&bed, &sleep, SERVICE_V6, true)?;
    expect(&bed, &sleep, &httpbin(Family::V4), true)?;

    step("2. default deny (ZeroTrustPolicy deny-all, enforcementMode: always)");
    std::fs::copy(Path::new(LAB).join("10-deny-all.yaml"), manifests.join("10-deny-all.yaml"))?;
    wait_for(&bed, &sleep, &httpbin(Family::V4), false)?;
    let drops = ctl.spawn_drops()?;
    call_service(&bed, &sleep, SERVICE_V4, false)?;
    call_service(&bed, &sleep, SERVICE_V6, false)?;
    println!("   ztctl drops --follow says:");
    print_indented(&drops.finish()?);

    step("3. allow only spiffe://cluster.local/ns/default/sa/sleep -> httpbin on TCP 80");
    std::fs::copy(Path::new(LAB).join("20-allow-sleep.yaml"), manifests.join("20-allow-sleep.yaml"))?;
    wait_for(&bed, &sleep, &httpbin(Family::V4), true)?;
    call_service(&bed, &sleep, SERVICE_V4, true)?;
    call_service(&bed, &sleep, SERVICE_V6, true)?;
    let drops = ctl.spawn_drops()?;
    call_service(&bed, &notsleep, SERVICE_V4, false)?;
    println!("   ztctl drops --follow says:");
    print_indented(&drops.finish()?);
    println!("   ztctl explain default/notsleep default/httpbin tcp/80:");
    print_indented(&ctl.output(&["explain", "default/notsleep", "default/httpbin", "tcp/80"])?);
    println!("   ztctl explain default/sleep default/httpbin tcp/80:");
    print_indented(&ctl.output(&["explain", "default/sleep", "default/httpbin", "tcp/80"])?);
    println!("   ztctl policy:");
    print_indented(&ctl.output(&["policy"])?);
    println!("   sleep2 runs on node2 with sleep's ServiceAccount: the same identity, allowed as well");
    expect(&bed, &sleep2, &httpbin(Family::V4), true)?;
    expect(&bed, &sleep2, &httpbin(Family::V6), true)?;

    step("4. STRICT: mutual authentication required in namespace default (spec.authentication: required)");
    println!("   a new flow into the namespace's pods now also needs the peer's identity proven for its node:");
    println!("   node1's agent proves its own pods (sleep); node2 runs no agent, so nobody proves sleep2 there");
    std::fs::copy(Path::new(LAB).join("30-strict.yaml"), manifests.join("30-strict.yaml"))?;
    wait_for(&bed, &sleep2, &httpbin(Family::V4), false)?;
    call_service(&bed, &sleep, SERVICE_V4, true)?;
    call_service(&bed, &sleep, SERVICE_V6, true)?;
    expect(&bed, &sleep, &httpbin(Family::V4), true)?;
    let drops = ctl.spawn_drops_of(&["--reason", "auth-required", "--count", "2"])?;
    expect(&bed, &sleep2, &httpbin(Family::V4), false)?;
    expect(&bed, &sleep2, &httpbin(Family::V6), false)?;
    let seen = drops.finish()?;
    println!("   ztctl drops --follow --reason auth-required says:");
    print_indented(&seen);
    if seen.lines().filter(|l| l.contains("default/sleep2") && l.contains("reason=auth-required")).count() < 2 {
        bail!("ztctl drops did not show sleep2's two drops as auth-required:\n{seen}");
    }
    let explained = ctl.output(&["explain", "default/sleep2", "default/httpbin", "tcp/80"])?;
    println!("   ztctl explain default/sleep2 default/httpbin tcp/80:");
    print_indented(&explained);
    if !explained.contains("drop (auth-required)") || !explained.contains("not proven") {
        bail!("ztctl explain default/sleep2 does not name auth-required:\n{explained}");
    }
    let explained = ctl.output(&["explain", "default/sleep", "default/httpbin", "tcp/80"])?;
    println!("   ztctl explain default/sleep default/httpbin tcp/80:");
    print_indented(&explained);
    if !explained.contains("allow (authenticated)") {
        bail!("ztctl explain default/sleep does not say allow (authenticated):\n{explained}");
    }
    let auth = ctl.output(&["auth"])?;
    println!("   ztctl auth (this node's SVIDs, its channel to node2, the proofs in the datapath):");
    print_indented(&auth);
    if !auth.lines().any(|l| l.contains("spiffe://cluster.local/ns/default/sa/sleep ") && l.contains("this node")) {
        bail!("ztctl auth lists no proof of sleep's identity:\n{auth}");
    }
    let metrics = agent.metrics()?;
    for reason in ["authenticated", "auth-required"] {
        let n: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("zt_verdicts_total{") && l.contains("direction=\"ingress\"") && l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        println!("   zt_verdicts_total{{direction=\"ingress\",reason=\"{reason}\"}} {n}");
        if n == 0.0 {
            bail!("no ingress verdict counted {reason}");
        }
    }

    step("5. HTTP rules: sleep may GET /headers on httpbin's port 8080, nothing else there");
    // A real HTTP server in httpbin, its Service (httpbin-http:8080) and the rules.
    let _server = zt_testbed::HttpServer::start(&bed, &Endpoint::pod("default", "httpbin"), &[8080])?;
    std::fs::copy(Path::new(L7_LAB).join("06-service-http.yaml"), manifests.join("06-service-http.yaml"))?;
    std::fs::copy(Path::new(L7_LAB).join("demo/40-http-rules.yaml"), manifests.join("40-http-rules.yaml"))?;
    let get = ["-sS", "--max-time", "3", "--resolve", "httpbin-http:8080:10.96.0.81", "-w", "%{http_code}", "http://httpbin-http:8080/headers"];
    let start = Instant::now();
    while curl(&bed, &sleep, &get)?.1 != 200 {
        if start.elapsed() > Duration::from_secs(10) {
            bail!("GET /headers through the Service did not get 200 within 10 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (body, code) = curl(&bed, &sleep, &get)?;
    println!("   sleep: curl http://httpbin-http:8080/headers -> {code}: {}", body.trim());
    let drops = ctl.spawn_drops_of(&["--reason", "http-denied", "--count", "1"])?;
    let post = ["-sS", "--max-time", "3", "--resolve", "httpbin-http:8080:10.96.0.81", "-w", "%{http_code}", "-X", "POST", "-d", "a=1", "http://httpbin-http:8080/post"];
    let (body, code) = curl(&bed, &sleep, &post)?;
    println!("   sleep: curl -X POST http://httpbin-http:8080/post -> {code}: {}", body.trim());
    if code != 403 {
        bail!("POST /post: expected 403, got {code}");
    }
    println!("   ztctl drops --follow says:");
    print_indented(&drops.finish()?);
    println!("   ztctl explain default/sleep default/httpbin tcp/8080:");
    print_indented(&ctl.output(&["explain", "default/sleep", "default/httpbin", "tcp/8080"])?);
    let metrics = agent.metrics()?;
    for l in metrics.lines().filter(|l| l.starts_with("zt_http_requests_total")) {
        println!("   {l}");
    }

    step("6. verdict counters from /metrics (non-zero)");
    let metrics = agent.metrics()?;
    for l in metrics.lines().filter(|l| l.starts_with("zt_verdicts_total") && !l.ends_with(" 0")) {
        println!("   {l}");
    }
    agent.stop();
    println!("\n== demo done: every step behaved as expected; cleaning up");
    Ok(())
}

const SERVICE_V4: &str = "10.96.0.80";
const SERVICE_V6: &str = "fd00:96::80";

/// `from` calls httpbin's Service on port 8000 from inside its own cgroup.
fn call_service(bed: &Testbed, from: &Endpoint, cluster_ip: &str, allowed: bool) -> Result<()> {
    let c = bed.connect_in(from, cluster_ip, 8000, Duration::from_millis(800))?;
    let ok = c.connected();
    let shown = if cluster_ip.contains(':') { format!("[{cluster_ip}]") } else { cluster_ip.to_string() };
    println!(
        "   {from} -> httpbin:8000 ({shown}): {}",
        if ok { format!("connected, answered by {} (peer {})", c.outcome, c.peer) } else { format!("no connection ({})", c.outcome) }
    );
    if ok != allowed {
        bail!("expected {} but got {c:?}", if allowed { "a connection" } else { "no connection" });
    }
    Ok(())
}

/// curl in `from` (its netns and cgroup, so the Service is translated at its socket):
/// (body, status), with `-w %{http_code}` last in `args`' output.
fn curl(bed: &Testbed, from: &Endpoint, args: &[&str]) -> Result<(String, u16)> {
    let mut a = vec!["/usr/bin/curl"];
    a.extend_from_slice(args);
    let out = bed.exec_in(from, &a)?;
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.split_at(s.len().saturating_sub(3));
    Ok((body.to_string(), code.parse().unwrap_or(0)))
}

fn step(s: &str) {
    println!("\n== {s}");
}

fn print_indented(s: &str) {
    for l in s.lines() {
        println!("     {l}");
    }
}

fn expect(bed: &Testbed, from: &Endpoint, to: &Target, allowed: bool) -> Result<()> {
    let r = bed.probe(from, to, Proto::Tcp, 80, Duration::from_millis(500));
    let ok = matches!(r, ProbeResult::Ok(_));
    println!("   {from} -> {to} tcp/80: {}", if ok { "connected".to_string() } else { format!("no connection ({r:?})") });
    if ok != allowed {
        bail!("expected {} but got {r:?}", if allowed { "a connection" } else { "no connection" });
    }
    Ok(())
}

/// The agent picks up manifest changes within its poll interval.
fn wait_for(bed: &Testbed, from: &Endpoint, to: &Target, allowed: bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let ok = bed.probe(from, to, Proto::Tcp, 80, Duration::from_millis(200)).is_ok();
        if ok == allowed {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("policy change not enforced within 10 s")
}

struct Ctl<'a> {
    bin: PathBuf,
    agent: &'a zt_testbed::AgentHandle,
}

impl Ctl<'_> {
    fn base(&self) -> std::process::Command {
        let mut c = std::process::Command::new(&self.bin);
        c.arg("--bpffs-root").arg(&self.agent.bpffs_root);
        c.arg("--state-dir").arg(&self.agent.state_dir);
        c.arg("--admin-socket").arg(&self.agent.admin_socket);
        c
    }
    fn output(&self, args: &[&str]) -> Result<String> {
        let out = self.base().args(args).output().context("running ztctl")?;
        if !out.status.success() {
            bail!("ztctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
    fn show(&self, args: &[&str]) -> Result<()> {
        print_indented(&self.output(args)?);
        Ok(())
    }
    fn spawn_drops_of(&self, filter: &[&str]) -> Result<Drops> {
        let child = self.base().args(["drops", "--follow", "--timeout", "3"]).args(filter).stdout(std::process::Stdio::piped()).spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Drops { child })
    }
    fn spawn_drops(&self) -> Result<Drops> {
        let child = self
            .base()
            .args(["drops", "--follow", "--count", "2", "--timeout", "3"])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Drops { child })
    }
}

struct Drops {
    child: std::process::Child,
}

impl Drops {
    fn finish(self) -> Result<String> {
        let out = self.child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
