//! DNS latency with the kernel's answer capture on and off (`cargo xtask bench`; also runs,
//! unmeasured, in `cargo xtask test`). dnsmasq in `kube-system/dns` answers names with 1,
//! 8 and 50 A records (`r0`, `r7`, `r49.example.test`); `default/client` has an FQDN rule
//! matching them (capture, match, learn 32 at most), `default/fake` the same DNS allow
//! and no FQDN rule (the capture's gate returns at once). Both are isolated the same way,
//! so both answers take the conntrack reply path. Queries alternate between the two in
//! blocks so that machine noise hits both alike. Prints p50/p99 and the on/off ratios;
//! asserts only that every query was answered.
mod common;

use std::net::{IpAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::rr::RecordType;
use zt_testbed::dns::{self, Dnsmasq, Zone};
use zt_testbed::Family;

const QUERIES: usize = 2000;
const BLOCK: usize = 100;

const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: capture-on, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: client}}}]
  egress:
  - to: [{entity: dns}]
    ports: [{protocol: UDP, port: 53}]
  - to: [{fqdn: {matchPattern: \"*.example.test\"}}]
    ports: [{protocol: TCP, port: 8443}]
---
apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: capture-off, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: fake}}}]
  egress:
  - to: [{entity: dns}]
    ports: [{protocol: UDP, port: 53}]
";

/// One query over a socket of the pod's netns; microseconds.
fn timed_query(s: &UdpSocket, wire: &mut [u8], buf: &mut [u8]) -> f64 {
    let id = (dns_id() as u16).to_be_bytes();
    wire[0] = id[0];
    wire[1] = id[1];
    let t = Instant::now();
    s.send(wire).unwrap();
    loop {
        let n = s.recv(buf).expect("a DNS answer within 2 s");
        if n >= 2 && buf[..2] == id {
            return t.elapsed().as_secs_f64() * 1e6;
        }
    }
}

fn dns_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[test]
fn dns_latency_capture_on_vs_off() {
    let bed = bed("fqdn", &[("10-bench.yaml", POLICY)], &[]);
    let _d = Dnsmasq::start(&bed.tb, &pod("kube-system", "dns"), &Zone::lab()).unwrap();
    let server: IpAddr = bed.tb.pod_ip("kube-system", "dns", Family::V4).unwrap();
    let open = |who: &str| -> UdpSocket {
        let ns = bed.tb.pod("default", who).unwrap().netns_path();
        let s = zt_testbed::sys::in_netns(&ns, move || UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
        s.connect((server, 53)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    };
    let (on, off) = (open("client"), open("fake"));
    let learned0 = bed.metrics().get("zt_fqdn_answers_total", &[("outcome", "learned")]).unwrap_or(0.0);
    println!("\nDNS latency over UDP from a pod to dnsmasq, {QUERIES} queries per cell (µs), agent running");
    table(&on, &off);
    let m = bed.metrics();
    let learned = m.get("zt_fqdn_answers_total", &[("outcome", "learned")]).unwrap_or(0.0) - learned0;
    println!("answers that learned during the run (capture on): {learned}");
    // The same with the agent stopped: the kernel still captures and learns, but no reader
    // wakes up for the events (they count event-ring-full once the ring is full).
    bed.agent.stop();
    std::thread::sleep(Duration::from_secs(1));
    println!("\nthe same, agent stopped (capture without the agent's event reader)");
    table(&on, &off);
}

fn table(on: &UdpSocket, off: &UdpSocket) {
    println!("{:<8} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}", "records", "off p50", "off p99", "on p50", "on p99", "p50 on/off", "p99 on/off");
    for (records, name) in [(1, "r0.example.test"), (8, "r7.example.test"), (50, "r49.example.test")] {
        let mut wire = dns::query_message(name, RecordType::A).unwrap().to_vec().unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut t_on, mut t_off) = (vec![], vec![]);
        // Warm-up (neighbour entries, dnsmasq's cache), then alternate blocks.
        for _ in 0..50 {
            timed_query(on, &mut wire, &mut buf);
            timed_query(off, &mut wire, &mut buf);
        }
        for _ in 0..QUERIES / BLOCK {
            for _ in 0..BLOCK {
                t_off.push(timed_query(off, &mut wire, &mut buf));
            }
            for _ in 0..BLOCK {
                t_on.push(timed_query(on, &mut wire, &mut buf));
            }
        }
        let (a50, a99, b50, b99) = (pct(&mut t_off, 0.5), pct(&mut t_off, 0.99), pct(&mut t_on, 0.5), pct(&mut t_on, 0.99));
        println!("{records:<8} {a50:>10.1} {a99:>10.1} {b50:>10.1} {b99:>10.1} {:>9.2} {:>9.2}", b50 / a50, b99 / a99);
    }
}
