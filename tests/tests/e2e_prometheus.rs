//! The agent's metrics as Prometheus and Grafana see them: `promtool check metrics` on a
//! real scrape, a real Debian `prometheus` scraping the agent inside the node's netns
//! while allowed and denied traffic runs, and every panel query of the Grafana
//! dashboard in deploy/ run against that server.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{sys, Family, ProbeResult, Proto};

/// Port of Prometheus's own web/API listener, on the node netns's loopback (the node
/// netns is the bed's own, so no other test shares the port).
const PROM_PORT: u16 = 19090;
/// Scrape interval given to Prometheus: short, so the test waits seconds, not minutes.
const SCRAPE: Duration = Duration::from_secs(1);
/// What the dashboard's `$__rate_interval` stands for in this test (Grafana computes it
/// as max(4 x scrape interval, the query step); 4 x 1 s rounds up to this).
const RATE_INTERVAL: &str = "15s";
/// Cap on identity-pair series given to the agent (`--metrics-identity-pairs`).
const PAIR_CAP: &str = "2";

/// `promtool`'s exit status and output for `text` on stdin.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: `cargo xtask setup` installs Debian's prometheus, which brings it");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A `prometheus` server in a netns, killed and its directory removed on drop.
struct Prometheus {
    child: Child,
    netns: PathBuf,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Debian's prometheus in netns `netns` scraping `target` every [`SCRAPE`],
    /// with its config and TSDB in `dir`.
    fn start(netns: &str, target: SocketAddr, dir: &Path) -> Prometheus {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let config = format!(
            "global:\n  scrape_interval: {s}s\n  evaluation_interval: {s}s\nscrape_configs:\n- job_name: zt-agent\n  scrape_interval: {s}s\n  scrape_timeout: {s}s\n  static_configs:\n  - targets: ['{target}']\n",
            s = SCRAPE.as_secs()
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], PROM_PORT));
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus not found: `cargo xtask setup` installs Debian's prometheus");
        let p = Prometheus { child, netns: sys::netns_path(netns), dir: dir.to_path_buf(), addr };
        let start = Instant::now();
        while p.get("/-/ready").map(|(code, _)| code != 200).unwrap_or(true) {
            assert!(start.elapsed() < Duration::from_secs(30), "prometheus did not get ready; its log:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    fn log(&self) -> String {
        tail(&std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default(), 30)
    }

    /// HTTP GET on Prometheus's listener from inside its netns: (status, body).
    fn get(&self, path_and_query: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr;
        let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let raw = sys::in_netns(&self.netns, move || -> anyhow::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            let mut buf = vec![];
            s.read_to_end(&mut buf)?;
            Ok(buf)
        })??;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("bad HTTP response {text:?}"))?;
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { zt_testbed::agent::dechunk(body) } else { body.to_string() };
        Ok((code, body))
    }

    /// An instant query; panics with Prometheus's error (a parse error names the position).
    fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let (code, body) = self.get(&format!("/api/v1/query?query={}", urlencode(expr))).expect("query prometheus");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{expr}: not JSON ({e}): {body}"));
        assert!(code == 200 && v["status"] == "success", "query {expr:?} failed (HTTP {code}): {body}");
        match v["data"]["resultType"].as_str() {
            Some("vector") | Some("matrix") => v["data"]["result"].as_array().cloned().unwrap_or_default(),
            // A scalar (e.g. a stat panel's `vector(0)` folded away): one result.
            _ => vec![v["data"]["result"].clone()],
        }
    }

    /// The single value of `expr` (summed over series), None while it has no series.
    fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr);
        if r.is_empty() {
            return None;
        }
        Some(r.iter().map(sample_value).sum())
    }

    /// Waits until Prometheus scraped the agent after `since` (a scrape that started
    /// later), so a query then sees every counter as of at least `since`.
    fn wait_scrape_after(&self, since: Instant) {
        // `timestamp(up)` is the time of the last scrape's sample (its start); the
        // instant query's own timestamp, and timestamp() of anything but a plain
        // selector (`up == 1`), is only the evaluation time.
        let since_wall = std::time::SystemTime::now() - since.elapsed();
        let since_s = since_wall.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let start = Instant::now();
        loop {
            let r = self.query("timestamp(up{job=\"zt-agent\"})");
            if r.first().is_some_and(|s| sample_value(s) > since_s) {
                let up = self.value("up{job=\"zt-agent\"}");
                assert_eq!(up, Some(1.0), "the last scrape of the agent failed; prometheus log:\n{}", self.log());
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no successful scrape of the agent after the traffic: {r:?}; prometheus log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sample_value(s: &serde_json::Value) -> f64 {
    let v = if s.is_array() { &s[1] } else { &s["value"][1] };
    v.as_str().and_then(|x| x.parse().ok()).unwrap_or(f64::NAN)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The agent's scrape passes promtool's format check and its lint (counters end in
/// `_total`, base units, HELP on every metric, no reserved suffixes on gauges), with the
/// opt-in identity-pair series present.
#[test]
fn scrape_passes_promtool() {
    let bed = bed("basic", &[("50-isolate-b.yaml", ISOLATE_B)], &["--metrics-identity-pairs", PAIR_CAP]);
    // A drop so that the identity-pair series exist.
    bed.wait_probe(&pod("default", "c"), &tgt("default", "b", Family::V4), Proto::Tcp, 80, &ProbeResult::Timeout);
    bed.wait_until("an identity-pair series", || bed.metrics().get("zt_identity_pair_events_total", &[("verdict", "drop")]).is_some());
    let text = bed.agent.metrics().unwrap();
    let (ok, out) = promtool_check(&text);
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}\nscrape:\n{text}");
    // And promtool does find problems (the check can fail): a counter without `_total`.
    let (ok, out) = promtool_check("# HELP zt_bad Bad.\n# TYPE zt_bad counter\nzt_bad 1\n");
    assert!(!ok && out.contains("_total"), "promtool accepted a counter without _total: {out}");
}

/// A policy input the source rejects (a SPIFFE ID of another trust domain): counted in
/// `zt_policy_errors_total`, nothing else changes.
const REJECTED: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: foreign-domain, namespace: default}
spec:
  subjects: [{spiffeId: spiffe://cluster.local/ns/default/sa/notsleep}]
  ingress:
  - from: [{spiffeId: spiffe://other.domain/ns/default/sa/sleep}]
    ports: [{protocol: TCP, port: 80}]
";

/// A valid policy that cannot compile (a pod selector on `pod-template-hash`, a label
/// identities leave out): it fails closed for its subject notsleep only (already denied
/// everything), so the "Objects failed closed" panel has a row.
const FAIL_CLOSED_NOTSLEEP: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: notsleep-excluded-label, namespace: default}
spec:
  subjects: [{spiffeId: spiffe://cluster.local/ns/default/sa/notsleep}]
  ingress:
  - from: [{podSelector: {matchLabels: {pod-template-hash: abc123}}}]
    ports: [{protocol: TCP, port: 80}]
";

/// The e2e-demo lab (sleep, httpbin, notsleep with their own service accounts and the
/// httpbin Service) served by the API stand-in, an agent watching it with `extra` args.
fn kube_demo_bed(extra: &[&str]) -> (Bed, zt_testbed::ApiServer) {
    let tb = testbed("e2e-demo");
    let dir = tb.tmp_dir().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(lab("e2e-demo")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let api = zt_testbed::ApiServer::start(&dir).unwrap();
    let agent = tb.start_agent_kube("node1", &zt_testbed::bins::find("zt-agent").unwrap(), &api, extra).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    (Bed { agent, dir, ztctl: zt_testbed::bins::find("ztctl").unwrap(), tb }, api)
}

fn demo_policy(name: &str) -> String {
    std::fs::read_to_string(lab("demo").join(name)).unwrap()
}

/// Every `targets[].expr` of every panel (rows' nested panels too), with the panel title.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_string()));
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = vec![];
    walk(&d["panels"], &mut out);
    out
}

/// Grafana's variables as this test's Prometheus sees them: every agent, the rate window.
fn interpolate(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL).replace("$instance", ".+")
}

/// Debian's prometheus scrapes the agent in the node's netns; sleep -> httpbin (allowed)
/// and notsleep -> httpbin (denied) TCP connections are counted exactly in its answers;
/// then every dashboard query parses and returns data.
#[test]
fn prometheus_counts_verdicts_and_answers_every_dashboard_query() {
    // Cap 2 with three dropped pairs below: the third is folded. Conntrack GC every
    // second and closed TCP flows expiring after 1 s: the GC deletes the probes' flows
    // while the test runs (the "Conntrack events" panel's deletions).
    let (bed, api) =
        kube_demo_bed(&["--metrics-identity-pairs", PAIR_CAP, "--ct-gc-interval", "1", "--ct-tcp-close-timeout", "1", "--ct-tcp-fin-timeout", "1"]);
    let args = bed.agent.args();
    let target: SocketAddr = args[args.iter().position(|a| a == "--metrics-addr").unwrap() + 1].parse().unwrap();
    let netns = format!("zt{}-node1", bed.run_id());
    let prom = Prometheus::start(&netns, target, &bed.tmp_dir().join("prometheus"));
    prom.wait_scrape_after(Instant::now());

    // Policy: default deny, then only sleep -> httpbin TCP 80.
    let (sleep, httpbin, notsleep) = (pod("default", "sleep"), tgt("default", "httpbin", Family::V4), pod("default", "notsleep"));
    bed.write("10-deny-all.yaml", &demo_policy("10-deny-all.yaml"));
    bed.write("20-allow-sleep.yaml", &demo_policy("20-allow-sleep.yaml"));
    let _ = api.sync_now();
    bed.wait_probe(&sleep, &httpbin, Proto::Tcp, 80, &ok(""));
    bed.wait_probe(&notsleep, &httpbin, Proto::Tcp, 80, &ProbeResult::Timeout);

    let q_drop = "sum(zt_verdicts_total{direction=\"egress\",verdict=\"drop\",reason=\"policy-default-deny\"})";
    let q_allow_out = "sum(zt_verdicts_total{direction=\"egress\",verdict=\"allow\",reason=\"policy\"})";
    let q_allow_in = "sum(zt_verdicts_total{direction=\"ingress\",verdict=\"allow\",reason=\"policy\"})";
    prom.wait_scrape_after(Instant::now());
    let before: Vec<f64> = [q_drop, q_allow_out, q_allow_in].iter().map(|q| prom.value(q).unwrap_or_else(|| panic!("{q}: no series"))).collect();

    // Traffic. The probes' sockets are the test's (not in a pod cgroup), so only the TC
    // programs judge them: a denied SYN is dropped at notsleep's egress (the probe gives
    // up after 300 ms, usually before the first retransmission at 1 s); an allowed
    // connection is judged `policy` once at sleep's egress and once at httpbin's
    // ingress, its later packets are `established` / `reply`.
    const ALLOWED_N: usize = 20;
    const DENIED_N: usize = 15;
    for i in 0..ALLOWED_N {
        assert_eq!(bed.tb.probe(&sleep, &httpbin, Proto::Tcp, 80, ALLOWED), ok("default/httpbin"), "allowed connection {i}");
    }
    for i in 0..DENIED_N {
        assert_eq!(bed.probe(&notsleep, &httpbin, Proto::Tcp, 80), ProbeResult::Timeout, "denied connection {i}");
    }
    let t1 = Instant::now();
    prom.wait_scrape_after(t1);
    let after: Vec<f64> = [q_drop, q_allow_out, q_allow_in].iter().map(|q| prom.value(q).unwrap()).collect();
    let grew: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    println!(
        "prometheus: drops +{} (sent {DENIED_N} denied SYNs), egress policy allows +{}, ingress +{} (sent {ALLOWED_N} allowed connections)",
        grew[0], grew[1], grew[2]
    );
    // One drop per denied SYN; a loaded machine can hold a probe's socket past the first
    // retransmission at 1 s (seen: 19 for 15), so at least one and at most three each.
    assert!(
        (DENIED_N as f64..=3.0 * DENIED_N as f64).contains(&grew[0]),
        "egress policy-default-deny drops in Prometheus: {} for {DENIED_N} denied connections",
        grew[0]
    );
    assert_eq!(grew[1], ALLOWED_N as f64, "egress policy allows in Prometheus");
    assert_eq!(grew[2], ALLOWED_N as f64, "ingress policy allows in Prometheus");
    // What Prometheus stored is what the agent serves.
    let m = bed.metrics();
    assert_eq!(m.verdicts("egress", "drop", "policy-default-deny"), after[0], "agent /metrics vs prometheus");

    // Data for the remaining panels: two more dropped identity pairs (the cap keeps two
    // series, so httpbin -> sleep or sleep -> notsleep is folded), connections through the
    // httpbin Service from inside sleep's cgroup (socket translation), and a policy
    // change that fails closed (apply time, failed objects, a source event).
    for _ in 0..3 {
        assert_eq!(bed.probe(&pod("default", "httpbin"), &tgt("default", "sleep", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
        assert_eq!(bed.probe(&sleep, &tgt("default", "notsleep", Family::V4), Proto::Tcp, 80), ProbeResult::Timeout);
    }
    for _ in 0..3 {
        let c = bed.connect_in(&sleep, "10.96.0.80", 8000, ALLOWED).unwrap();
        assert_eq!(c.outcome, "default/httpbin", "sleep -> httpbin Service");
    }
    bed.write("30-foreign-domain.yaml", REJECTED);
    bed.write("31-notsleep-excluded-label.yaml", FAIL_CLOSED_NOTSLEEP);
    let _ = api.sync_now();
    bed.wait_until("notsleep's policy failed closed", || bed.metrics().get("zt_policy_failed_identities", &[("name", "notsleep-excluded-label")]).is_some());
    assert!(bed.metrics().val("zt_policy_errors_total", &[]) >= 1.0, "the foreign trust domain must be rejected");
    prom.wait_scrape_after(Instant::now());
    assert!(prom.value("zt_identity_pair_events_folded_total").unwrap() > 0.0, "the third pair must be folded");
    assert_eq!(prom.value("zt_identity_pair_series").unwrap(), 2.0);

    // The cap's two series name the pairs of the first drops (notsleep -> httpbin among them).
    let pairs = prom.query("zt_identity_pair_events_total{verdict=\"drop\"}");
    assert!(
        pairs.iter().any(|s| s["metric"]["src_identity"] == "spiffe://cluster.local/ns/default/sa/notsleep"
            && s["metric"]["dst_identity"] == "spiffe://cluster.local/ns/default/sa/httpbin"
            && sample_value(s) >= DENIED_N as f64),
        "no notsleep -> httpbin pair with >= {DENIED_N} drops: {pairs:?}"
    );
    bed.wait_until("a conntrack GC deletion", || bed.metrics().get("zt_ct_gc_deleted_total", &[]).is_some_and(|n| n > 0.0));
    prom.wait_scrape_after(Instant::now());

    // Every dashboard query, as Grafana would send it.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/zt-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 20, "only {} queries found in {}", queries.len(), path.display());
    let mut empty = vec![];
    for (title, expr) in &queries {
        let r = prom.query(&interpolate(expr));
        let finite = r.iter().map(sample_value).filter(|v| v.is_finite()).count();
        println!("panel {title:?}: {} series, {finite} finite: {expr}", r.len());
        if finite == 0 {
            empty.push(format!("{title}: {expr} -> {r:?}"));
        }
    }
    assert!(empty.is_empty(), "dashboard queries without data:\n{}\nprometheus log:\n{}", empty.join("\n"), prom.log());
}

/// The FQDN lab's client may reach `api.example.test` by name (and DNS at the trusted
/// resolver `kube-system/dns`).
const FQDN_POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: client-egress, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: client}}}]
  egress:
  - to: [{entity: dns}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - to: [{fqdn: {matchName: api.example.test}}]
    ports: [{protocol: TCP, port: 8443}]
";

/// The dashboard's FQDN panels with DNS traffic (the other test's lab has none, so there
/// they only show zeros): the lab `fqdn` with dnsmasq as the trusted resolver; the client
/// resolves `api.example.test` and connects to the answer; every FQDN panel query then
/// has a value above 0.
#[test]
fn fqdn_panels_count_dns_answers() {
    use hickory_proto::rr::RecordType;
    use zt_testbed::dns::{self, ext_v4, Dnsmasq, ExternalHost, Zone, EXT_TCP};
    let bed = bed("fqdn", &[("10-fqdn.yaml", FQDN_POLICY)], &[]);
    let _ext = ExternalHost::add(&bed.tb, "node1", Path::new(env!("CARGO_BIN_EXE_zt-testbed"))).unwrap();
    let _dnsmasq = Dnsmasq::start(&bed.tb, &pod("kube-system", "dns"), &Zone::lab()).unwrap();
    let args = bed.agent.args();
    let target: SocketAddr = args[args.iter().position(|a| a == "--metrics-addr").unwrap() + 1].parse().unwrap();
    let prom = Prometheus::start(&format!("zt{}-node1", bed.run_id()), target, &bed.tmp_dir().join("prometheus"));
    prom.wait_scrape_after(Instant::now());

    let client = bed.tb.pod("default", "client").unwrap().netns_path();
    let server = bed.tb.pod_ip("kube-system", "dns", Family::V4).unwrap();
    for _ in 0..5 {
        let a = dns::resolve_in(&client, server, "api.example.test", RecordType::A, Duration::from_secs(2)).unwrap();
        assert_eq!(a.addrs(), vec![ext_v4(1, 1)]);
    }
    let ip = ext_v4(1, 1);
    let connected = sys::in_netns(&client, move || TcpStream::connect_timeout(&SocketAddr::new(ip, EXT_TCP), ALLOWED).is_ok()).unwrap();
    assert!(connected, "client -> api.example.test after resolving");
    bed.wait_until("the agent cached the name", || bed.metrics().get("zt_fqdn_cache_names", &[]).is_some_and(|n| n > 0.0));
    // Map fill is counted by the FQDN GC pass (every 10 s), not by the scrape.
    let t = Instant::now();
    while !bed.metrics().get("zt_map_entries", &[("map", "ZT_FQDN_LEARNED")]).is_some_and(|n| n > 0.0) {
        assert!(t.elapsed() < Duration::from_secs(25), "the FQDN GC pass did not count the learned address within 25 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    prom.wait_scrape_after(Instant::now());

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/zt-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let fqdn: Vec<(String, String)> = dashboard_queries(&d).into_iter().filter(|(_, e)| e.contains("fqdn") || e.contains("FQDN")).collect();
    assert!(fqdn.len() >= 5, "FQDN queries in the dashboard: {fqdn:?}");
    let mut zero = vec![];
    for (title, expr) in &fqdn {
        let sum: f64 = prom.query(&interpolate(expr)).iter().map(sample_value).filter(|v| v.is_finite()).sum();
        println!("panel {title:?}: {sum}: {expr}");
        if sum <= 0.0 {
            zero.push(format!("{title}: {expr}"));
        }
    }
    assert!(zero.is_empty(), "FQDN queries without a value above 0 after 5 answers:\n{}", zero.join("\n"));
}

/// What Grafana needs of the dashboard beyond the queries (no root, no Prometheus):
/// unique panel ids, every panel on the 24-column grid without overlapping another,
/// every query panel bound to the `$datasource` variable, and every `$variable` a query
/// uses defined in `templating` (or one of Grafana's own `$__` variables).
#[test]
fn dashboard_is_well_formed() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/zt-dashboard.json");
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let vars: Vec<&str> = d["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    let panels = d["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut cells = std::collections::BTreeMap::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id in {title}");
        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64().unwrap(), g["y"].as_u64().unwrap(), g["w"].as_u64().unwrap(), g["h"].as_u64().unwrap());
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title) {
                    panic!("{title} overlaps {other} at ({cx}, {cy})");
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            for var in expr.split('$').skip(1) {
                let name: String = var.trim_start_matches('{').chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                assert!(name.starts_with("__") || vars.contains(&name.as_str()), "{title}: ${name} is not a dashboard variable ({vars:?})");
            }
        }
    }
}
