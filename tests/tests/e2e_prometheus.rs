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
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
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
        // `up`'s sample timestamp is the scrape's start time; compare with wall time.
        let since_wall = std::time::SystemTime::now() - since.elapsed();
        let since_s = since_wall.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let start = Instant::now();
        loop {
            let r = self.query("up{job=\"zt-agent\"}");
            if let Some(s) = r.first() {
                let ts = s["value"][0].as_f64().unwrap_or(0.0);
                if ts > since_s && sample_value(s) == 1.0 {
                    return;
                }
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

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
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
