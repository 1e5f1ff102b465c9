//! Requests through a port with HTTP rules (steered to the node's proxy) against the same
//! server on an L4-only port, in one run: requests/s and p50/p99 latency, printed as
//! ratios (HTTP / L4). The server is Python's http.server in httpbin, the client Python's
//! http.client in sleep (one keep-alive connection per round, rounds interleaved), so the
//! absolute figures are the test bed's, the ratio is the proxy's cost in that setting.
//! No timed assertions. `cargo test -p zt-tests --test bench_l7 -- --nocapture`.
mod common;

use common::*;
use zt_testbed::{Family, HttpServer};

const CLIENT: &str = r#"
import sys, time, json, socket, http.client
ip, rounds, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ports = [int(p) for p in sys.argv[4:]]
lat = {p: [] for p in ports}
wall = {p: 0.0 for p in ports}
for r in range(rounds):
    for p in ports:
        c = http.client.HTTPConnection(ip, p, timeout=5)
        c.connect()
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            c.request("GET", "/headers")
            resp = c.getresponse()
            resp.read()
            if resp.status != 200:
                print("status", p, resp.status); sys.exit(1)
            lat[p].append(time.perf_counter() - t)
        wall[p] += time.perf_counter() - t0
        c.close()
print(json.dumps({"lat": {str(p): v for p, v in lat.items()}, "wall": {str(p): v for p, v in wall.items()}}))
"#;

fn pct(v: &[f64], p: f64) -> f64 {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn http_rules_port_against_l4_only_port() {
    let bed = bed("l7", &[], &[]);
    let _server = HttpServer::start(&bed, &pod("default", "httpbin"), &[8080, 8081]).unwrap();
    let ip = bed.pod_ip("default", "httpbin", Family::V4).unwrap().to_string();
    let (rounds, n) = (3, 2000);
    let out = bed.exec_in(&pod("default", "sleep"), &["/usr/bin/python3", "-c", CLIENT, &ip, &rounds.to_string(), &n.to_string(), "8081", "8080"]).unwrap();
    assert!(out.status.success(), "client: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stats = |port: &str| {
        let mut l: Vec<f64> = v["lat"][port].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() * 1e6).collect();
        assert_eq!(l.len(), rounds * n);
        l.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let rps = l.len() as f64 / v["wall"][port].as_f64().unwrap();
        (rps, pct(&l, 0.5), pct(&l, 0.99))
    };
    let (l4, http) = (stats("8081"), stats("8080"));
    println!("bench_l7: GET /headers, {rounds} rounds x {n} requests per port on one keep-alive connection each (python http.server <- python http.client)");
    println!("  L4 only    :8081  {:8.0} req/s  p50 {:7.0} us  p99 {:7.0} us", l4.0, l4.1, l4.2);
    println!("  HTTP rules :8080  {:8.0} req/s  p50 {:7.0} us  p99 {:7.0} us", http.0, http.1, http.2);
    println!("  HTTP / L4: req/s x{:.2}, p50 x{:.2}, p99 x{:.2}", http.0 / l4.0, http.1 / l4.1, http.2 / l4.2);
    // Every request went through the proxy on 8080 and none on 8081.
    let m = bed.metrics();
    assert_eq!(m.get("zt_http_requests_total", &[("verdict", "allowed"), ("method", "GET")]), Some((rounds * n) as f64));
}
