//! TCP connections per second from a pod to a Service (`cargo xtask bench`; also runs,
//! unmeasured, in `cargo xtask test`): through zt's socket translation, through
//! kube-proxy's nftables DNAT (the test bed's renderer), and to the backend's pod IP
//! directly, in one run, printed as ratios against the direct rate. Lab `labs/services`:
//! x/a connects to x/b (TCP 80), no policy, one agent with translation on. The
//! kube-proxy frontend is a Service only kube-proxy's rules know (not in the agent's
//! manifests), so the agent neither translates nor judges it as a frontend: it measures
//! kube-proxy's DNAT path, without zt's untranslated-frontend lookup. Blocks alternate
//! between the three targets so that machine noise hits them alike. Asserts only that
//! the connections worked and took the path they name (translation counter).
mod common;

use common::*;
use zt_testbed::connrate;
use zt_testbed::kubeproxy::{Choice, Objects};

const ROUNDS: usize = 10;
const BLOCK_MS: u64 = 400;

const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec:\n  clusterIP: 10.96.10.1\n  ports: [{name: p, protocol: TCP, port: 8080, targetPort: 80}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\n\
ports: [{name: p, protocol: TCP, port: 80}]\nendpoints:\n- {addresses: [10.220.0.2], conditions: {ready: true}, nodeName: node1}\n";

fn translations(bed: &Bed) -> f64 {
    bed.metrics().get("zt_service_translations_total", &[("outcome", "translated")]).unwrap_or(0.0)
}

#[test]
fn bench_service_connections() {
    let bed = bed("services", &[("10-web.yaml", WEB)], &[]);
    bed.wait_until("the agent to hold the Service", || bed.metrics().get("zt_service_frontends", &[]) == Some(1.0));
    // kube-proxy: web, plus `kp` (same backend) that only kube-proxy knows.
    let kp_only =
        WEB.replace("name: web", "name: kp").replace("10.96.10.1", "10.96.10.9").replace("service-name: web", "service-name: kp").replace("web-1", "kp-1");
    let mut objs = Objects::load_dir(&bed.dir).unwrap();
    let more = Objects::parse(&kp_only, "kp").unwrap();
    objs.services.extend(more.services);
    objs.slices.extend(more.slices);
    bed.kube_proxy_sync(&objs, Choice::Random).unwrap();

    let bin = env!("CARGO_BIN_EXE_zt-testbed");
    let targets = [("direct pod IP", "10.220.0.2:80", false), ("zt translation", "10.96.10.1:8080", true), ("kube-proxy DNAT", "10.96.10.9:8080", false)];
    let mut sums = [0f64; 3];
    // Connects that timed out (1 s; seen on every path, rarely: sequential connects
    // reuse source ports quickly); counted and printed, at most 1 % allowed.
    let (mut fails, mut total) = ([0u64; 3], [0u64; 3]);
    for round in 0..ROUNDS {
        for k in 0..3 {
            let i = (k + round) % 3;
            let (name, to, translated) = targets[i];
            let before = translations(&bed);
            let out = bed.exec_in(&pod("x", "a"), &[bin, "connrate", "--to", to, "--ms", &BLOCK_MS.to_string()]).unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{name}: {text} {}", String::from_utf8_lossy(&out.stderr));
            let (rate, conns, failed) = connrate::parse(&text).unwrap();
            fails[i] += failed;
            total[i] += conns;
            let grew = translations(&bed) - before;
            assert_eq!(grew > 0.0, translated, "{name}: translation counter grew by {grew}");
            sums[i] += rate;
        }
    }
    let rate: Vec<f64> = sums.iter().map(|s| s / ROUNDS as f64).collect();
    println!("\nTCP connections/s from x/a to x/b ({ROUNDS} alternating blocks of {BLOCK_MS} ms each, mean rate):");
    for (i, (name, to, _)) in targets.iter().enumerate() {
        println!("  {name:<16} {to:<16} {:>8.0} conn/s  {:.2}x direct  ({} connects, {} timed out)", rate[i], rate[i] / rate[0], total[i], fails[i]);
        assert!(fails[i] * 100 <= total[i], "{name}: {} of {} connects failed", fails[i], total[i]);
    }
    println!("  zt translation / kube-proxy DNAT: {:.2}", rate[1] / rate[2]);
}
