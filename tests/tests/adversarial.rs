//! The standing adversarial suite (issue 8): a pod with raw sockets (scapy,
//! `tests/attacks/attack.py`) attacks other pods through the real datapath. Captures in
//! the target's netns (an `AF_PACKET` socket on its `eth0`, sockets that record what
//! arrives) show what got through; a capture in the attacker's netns shows what came
//! back; the agent's verdict counters before and after show which hook dropped it.
//!
//! Lab `labs/adversarial`: pods a (attacker), b (target), c (the pod a impersonates; b's
//! policy allows c) on node1, each serving TCP 80 (readiness probe), UDP 53, SCTP 9000,
//! TCP 7000 (echo). Every test makes its own bed and prints one line
//! `adversarial: attacks=<n> frames=<n> wrong_allows=<n> leaks=<n>`; wrong allows and
//! leaks must be 0, and every control (legitimate traffic over the same path) must arrive.
//!
//! The first seven tests are the bypasses of issue 8 (the seventh across two nodes) and
//! expect the fixed datapath; the rest are regression guards for attacks that already
//! fail.
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use zt_testbed::attack::{self, stop_all, tags, Frame, Listener, Sent, Tally};
use zt_testbed::{sys, Endpoint, Family, ProbeResult, ProbeSpec, Proto};

const LAB: &str = "adversarial";
/// How long frames in flight get before captures stop.
const SETTLE: Duration = Duration::from_millis(300);

/// b's ingress: c may send UDP 5300 and TCP 80, a may send UDP 5301; a and c are not
/// isolated. (The node reaches b as `host` on its probe port.)
const B_ALLOWS_C_AND_A: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: c}}}]
    ports: [{protocol: UDP, port: 5300}, {protocol: TCP, port: 80}]
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 5301}]
";

/// b's ingress: only a on UDP 5300.
const B_ALLOWS_A_5300: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 5300}]
";

/// b isolated both ways, nothing allowed.
const B_ISOLATED: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-isolated, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  enforcementMode: always
";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn adv_bed(policies: &[(&str, &str)]) -> Bed {
    if let Err(e) = attack::require_scapy() {
        panic!("{e:#}");
    }
    bed(LAB, policies, &[])
}

fn a() -> Endpoint {
    pod("default", "a")
}
fn b() -> Endpoint {
    pod("default", "b")
}
fn c() -> Endpoint {
    pod("default", "c")
}
fn node() -> Endpoint {
    Endpoint::node("node1")
}

fn ns(bed: &Bed, ep: &Endpoint) -> PathBuf {
    bed.netns_path(ep).unwrap()
}

fn ips(bed: &Bed, name: &str) -> [IpAddr; 2] {
    [ip(bed, "default", name, Family::V4), ip(bed, "default", name, Family::V6)]
}

fn node_ips(bed: &Bed) -> [IpAddr; 2] {
    [bed.node_ip("node1", Family::V4).unwrap(), bed.node_ip("node1", Family::V6).unwrap()]
}

/// The MAC of a pod's gateway: its host-side veth in its node's netns.
fn gw_mac(bed: &Bed, name: &str) -> String {
    let p = bed.pod("default", name).unwrap();
    attack::mac_of(bed, &Endpoint::node(&p.pod.node), &p.host_veth).unwrap()
}

/// Parameters every scenario takes: `attacker` sends on its eth0 to `victim`.
fn params(bed: &Bed, nonce: &str, attacker: &str, victim: &str) -> Value {
    let [s4, s6] = ips(bed, attacker);
    let [v4, v6] = ips(bed, victim);
    json!({
        "nonce": nonce, "iface": "eth0", "gw_mac": gw_mac(bed, attacker),
        "self4": s4.to_string(), "self6": s6.to_string(),
        "victim4": v4.to_string(), "victim6": v6.to_string(),
    })
}

/// `p` with the keys of `extra` added (or replaced).
fn with(p: &Value, extra: Value) -> Value {
    let mut p = p.clone();
    let m = p.as_object_mut().unwrap();
    for (k, v) in extra.as_object().unwrap() {
        m.insert(k.clone(), v.clone());
    }
    p
}

fn run(bed: &Bed, t: &mut Tally, from: &Endpoint, scenario: &str, p: &Value) -> Sent {
    let s = attack::run(bed, from, scenario, p).unwrap_or_else(|e| panic!("{e:#}"));
    t.sent(&s);
    s
}

fn is_control(label: &str) -> bool {
    label.starts_with("control")
}

/// Tagged frames of this run among `at` (captures and receivers of one place):
/// label -> frames.
fn seen(at: &[&[Frame]], nonce: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for frames in at {
        for (l, n) in tags(frames, nonce) {
            *m.entry(l).or_insert(0) += n;
        }
    }
    m
}

/// Every non-control label seen at `place` is a wrong allow; every control sent must
/// have been seen there.
fn judge_target(t: &mut Tally, sent: &Sent, seen: &BTreeMap<String, usize>, place: &str) {
    for (label, n) in seen {
        if !is_control(label) {
            t.wrong_allow(format!("{label}: {n} frame(s)/datagram(s) reached {place}"));
        }
    }
    for label in sent.labels().filter(|l| is_control(l)) {
        if !seen.contains_key(label) {
            t.problem(format!("control {label} (legitimate traffic over the same path) did not reach {place}: the harness proves nothing"));
        }
    }
}

/// Anything that came back to the attacker from `victims`, and any ICMP unreachable or
/// time exceeded from anywhere, is a leak.
fn judge_attacker(t: &mut Tally, frames: &[Frame], victims: &[IpAddr], place: &str) {
    for f in frames.iter().filter(|f| f.incoming() && !f.is_link_control()) {
        let from_victim = f.ip().is_some_and(|(s, ..)| victims.contains(&s));
        if from_victim || f.is_icmp_unreachable() {
            t.leak(format!("{place} got {}", f.describe()));
        }
    }
}

/// Frames at the target whose source is one of `sources` (untagged attacks: SCTP INITs).
fn judge_sources(t: &mut Tally, frames: &[Frame], sources: &[IpAddr], place: &str, nonce: &str) {
    for f in frames.iter().filter(|f| f.incoming() && f.tag(nonce).is_none()) {
        if f.ip().is_some_and(|(s, ..)| sources.contains(&s)) {
            t.wrong_allow(format!("{place} got {}", f.describe()));
        }
    }
}

fn counter(m: &Metrics, dir: &str, verdict: &str, reason: &str) -> Option<f64> {
    m.get("zt_verdicts_total", &[("direction", dir), ("verdict", verdict), ("reason", reason)])
}

/// Sum of every drop reason in `dir`.
fn drops(m: &Metrics, dir: &str) -> f64 {
    m.get("zt_verdicts_total", &[("direction", dir), ("verdict", "drop")]).unwrap_or(0.0)
}

/// The drop counter `reason` in `dir` must have grown by at least `n`.
fn expect_drops(t: &mut Tally, m0: &Metrics, m1: &Metrics, dir: &str, reason: &str, n: u64) {
    match (counter(m0, dir, "drop", reason), counter(m1, dir, "drop", reason)) {
        (Some(x), Some(y)) if y - x >= n as f64 => {}
        (Some(x), Some(y)) => t.problem(format!("zt_verdicts_total{{direction=\"{dir}\",verdict=\"drop\",reason=\"{reason}\"}} grew by {}, want >= {n}", y - x)),
        _ => t.problem(format!("no series zt_verdicts_total{{direction=\"{dir}\",verdict=\"drop\",reason=\"{reason}\"}} in /metrics: the datapath has no `{reason}` drop reason (want it to grow by >= {n})")),
    }
}

fn delta(m0: &Metrics, m1: &Metrics, dir: &str, verdict: &str, reason: &str) -> f64 {
    counter(m1, dir, verdict, reason).unwrap_or(0.0) - counter(m0, dir, verdict, reason).unwrap_or(0.0)
}

/// VXLAN devices in a node's netns as an overlay CNI makes them (VNI 42, UDP 4789, one
/// per family on the node's addresses). Returns their MACs (v4, v6).
fn add_vxlan(bed: &Bed, node_name: &str) -> (String, String) {
    let (n4, n6) = (bed.node_ip(node_name, Family::V4).unwrap(), bed.node_ip(node_name, Family::V6).unwrap());
    let node = Endpoint::node(node_name);
    let script = format!(
        "ip link add ztvx4 type vxlan id 42 dstport 4789 local {n4} nolearning && ip link set ztvx4 up && \
         ip link add ztvx6 type vxlan id 42 dstport 4789 local {n6} nolearning && ip link set ztvx6 up"
    );
    if let Err(e) = attack::sh(bed, &node, &script) {
        panic!("this test needs VXLAN devices in the node netns (CONFIG_VXLAN): {e:#}");
    }
    (attack::mac_of(bed, &node, "ztvx4").unwrap(), attack::mac_of(bed, &node, "ztvx6").unwrap())
}

fn udp_socket_in(netns: &std::path::Path, to: IpAddr, port: u16) -> UdpSocket {
    sys::in_netns(netns, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        s.connect((to, port))?;
        Ok(s)
    })
    .unwrap()
    .unwrap()
}

// ---------------------------------------------------------------------------
// Issue 8: the bypasses (these fail on the datapath before the fix)
// ---------------------------------------------------------------------------

/// Item 1. Two VLAN tags (802.1Q in 802.1Q, 802.1ad outside) around a packet sourced from
/// c, to the port b allows only c: the kernel strips the first tag before TC ingress, so
/// the hook saw a non-IP ethertype and passed it, then the stack stripped the second and
/// routed c's packet to b. Any tagged frame (also a single tag, also with a's own source
/// to a port b allows a) and any non-IP, non-ARP ethertype must be dropped at a's hook
/// (`vlan`, `ethertype`).
#[test]
fn vlan_tagged_and_non_ip_frames_from_a_pod_are_dropped() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_C_AND_A)]);
    let mut t = Tally::new("vlan_tagged_and_non_ip_frames_from_a_pod_are_dropped");
    let n = attack::nonce();
    let [c4, c6] = ips(&bed, "c");
    let p = with(&params(&bed, &n, "a", "b"), json!({"spoof4": c4.to_string(), "spoof6": c6.to_string(), "dport_spoof": 5300, "dport_own": 5301}));
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&ns(&bed, &b()), 5301).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "vlan", &p);
    // Control: a's own kernel sends to b:5301 (the neighbour resolution, ARP and NDP,
    // must still pass a's hook).
    for (i, to) in ips(&bed, "b").into_iter().enumerate() {
        let s = udp_socket_in(&ns(&bed, &a()), to, 5301);
        s.send(format!("ZTADV:{n}:control-socket/{};", FAMILIES[i]).as_bytes()).unwrap();
    }
    let [at_b, r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();

    let got = seen(&[&at_b, &r5300, &r5301], &n);
    judge_target(&mut t, &sent, &got, "b");
    for f in FAMILIES {
        if !got.contains_key(&format!("control-socket/{f}")) {
            t.problem(format!("control: a's own datagram to b@{f}:5301 (ARP/NDP, then UDP) did not arrive"));
        }
    }
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    expect_drops(&mut t, &m0, &m1, "egress", "vlan", sent.frames_where(|l| l.starts_with("dot1")));
    expect_drops(&mut t, &m0, &m1, "egress", "ethertype", sent.frames_where(|l| l.starts_with("ethertype")));
    t.finish();
}

/// Item 2. With a live UDP flow (b -> a:53) and TCP flow (b -> a:7000), an ICMP port
/// unreachable quoting it, sent by the third pod c with its own source, must not reach b
/// (it was `related`); the same error from the flow's peer a must.
#[test]
fn icmp_errors_about_a_flow_are_delivered_only_from_its_peer() {
    const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-out, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  enforcementMode: always
  egress:
  - to: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 7000}]
---
apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: a-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: a}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 7000}]
";
    let bed = adv_bed(&[("50-icmp.yaml", POLICY)]);
    let mut t = Tally::new("icmp_errors_about_a_flow_are_delivered_only_from_its_peer");
    let n = attack::nonce();
    let (b_ns, a_ips, b_ips, c_ips) = (ns(&bed, &b()), ips(&bed, "a"), ips(&bed, "b"), ips(&bed, "c"));
    // The live flows, from b's netns.
    let mut udp = vec![];
    let mut tcp = vec![];
    for (i, f) in FAMILIES.into_iter().enumerate() {
        let s = udp_socket_in(&b_ns, a_ips[i], 53);
        s.set_read_timeout(Some(ALLOWED)).unwrap();
        s.send(b"flow").unwrap();
        let mut buf = [0u8; 64];
        let got = s.recv(&mut buf).map(|k| String::from_utf8_lossy(&buf[..k]).trim().to_string());
        assert_eq!(got.ok().as_deref(), Some("default/a"), "the UDP flow b -> a@{f}:53 must work (policy)");
        let mut flow = bed.open_tcp(&b(), &tgt("default", "a", f), 7000, ALLOWED).expect("TCP flow b -> a:7000");
        assert!(flow.roundtrip(ALLOWED), "the TCP flow b -> a@{f}:7000 must work (policy)");
        udp.push(s);
        tcp.push(flow);
    }
    let quotes = |who: &str, from: [IpAddr; 2]| -> Value {
        let mut q = vec![];
        for i in 0..2 {
            let fam = if i == 0 { "v4" } else { "v6" };
            let (us, ts) = (udp[i].local_addr().unwrap().port(), tcp[i].stream().local_addr().unwrap().port());
            q.push(json!({"label": format!("{who}/udp/{fam}"), "from": from[i].to_string(), "src": b_ips[i].to_string(), "dst": a_ips[i].to_string(), "proto": "udp", "sport": us, "dport": 53}));
            q.push(json!({"label": format!("{who}/tcp/{fam}"), "from": from[i].to_string(), "src": b_ips[i].to_string(), "dst": a_ips[i].to_string(), "proto": "tcp", "sport": ts, "dport": 7000}));
        }
        Value::Array(q)
    };

    // The third pod: nothing reaches b, b's UDP sockets keep working.
    let l = [Listener::capture(&b_ns, "eth0").unwrap(), Listener::capture(&ns(&bed, &c()), "eth0").unwrap()];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &c(), "icmp-error", &with(&params(&bed, &n, "c", "b"), json!({"quotes": quotes("third-pod", c_ips)})));
    let [at_b, at_c] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b], &n), "b");
    judge_attacker(&mut t, &at_c, &b_ips, "c");
    for (i, s) in udp.iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 64];
        if let Err(e) = s.recv(&mut buf) {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                t.wrong_allow(format!("b's UDP socket to a@{} got ECONNREFUSED from c's forged error", FAMILIES[i]));
            }
        }
    }
    let related = delta(&m0, &m1, "ingress", "allow", "related");
    if related > 0.0 {
        t.wrong_allow(format!("b's hook allowed {related} of c's errors as `related`"));
    }
    let dropped = drops(&m1, "ingress") - drops(&m0, "ingress");
    if dropped < sent.frames() as f64 {
        t.problem(format!("b's hook dropped {dropped} packets, want >= {} (c's errors)", sent.frames()));
    }

    // The flow's peer: every error reaches b, b's UDP sockets get ECONNREFUSED.
    let l = [Listener::capture(&b_ns, "eth0").unwrap()];
    let sent = run(&bed, &mut t, &a(), "icmp-error", &with(&params(&bed, &n, "a", "b"), json!({"quotes": quotes("control-flow-peer", a_ips)})));
    let [at_b] = stop_all(l, SETTLE).unwrap();
    judge_target(&mut t, &sent, &seen(&[&at_b], &n), "b");
    for (i, s) in udp.iter().enumerate() {
        let mut buf = [0u8; 64];
        match s.recv(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            r => t.problem(format!("b's UDP socket to a@{}: want ECONNREFUSED from a's error, got {r:?}", FAMILIES[i])),
        }
    }
    drop(tcp);
    t.finish();
}

/// Item 3 (and item 4's decapsulation path). With VXLAN devices on the node (VNI 42, UDP
/// 4789, as an overlay CNI makes them), a sends VXLAN to the node whose inner packet is
/// sourced from c: it was decapsulated and reached b as c. Pods may not send to the
/// node's tunnel ports (VXLAN 4789, 8472, Geneve 6081) or tunnel protocols (IPIP 4, GRE
/// 47, IPv6 encapsulation 41) on a node address (`tunnel`), unless a policy explicitly
/// allows it (checked last: an allow of UDP 8472 to `entity: host`).
#[test]
fn pods_cannot_send_to_the_node_tunnel_endpoints() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_C_AND_A)]);
    let mut t = Tally::new("pods_cannot_send_to_the_node_tunnel_endpoints");
    let (mac4, mac6) = add_vxlan(&bed, "node1");
    let n = attack::nonce();
    let [c4, c6] = ips(&bed, "c");
    let [n4, n6] = node_ips(&bed);
    let p = with(
        &params(&bed, &n, "a", "b"),
        json!({"spoof4": c4.to_string(), "spoof6": c6.to_string(), "node4": n4.to_string(), "node6": n6.to_string(),
               "vx_mac4": mac4, "vx_mac6": mac6, "vni": 42, "dport": 5300}),
    );
    let node_ns = ns(&bed, &node());
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&node_ns, 8472).unwrap(),
        Listener::udp(&node_ns, 6081).unwrap(),
        Listener::raw(&node_ns, false, 4).unwrap(),
        Listener::raw(&node_ns, false, 41).unwrap(),
        Listener::raw(&node_ns, false, 47).unwrap(),
        Listener::raw(&node_ns, true, 4).unwrap(),
        Listener::raw(&node_ns, true, 41).unwrap(),
        Listener::raw(&node_ns, true, 47).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "tunnel", &p);
    let [at_b, r5300, u8472, u6081, r4, r41, r47, r6_4, r6_41, r6_47, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b, &r5300], &n), "b (decapsulated by the node)");
    judge_target(&mut t, &sent, &seen(&[&u8472, &u6081], &n), "the node's UDP 8472/6081");
    judge_target(&mut t, &sent, &seen(&[&r4, &r41, &r47, &r6_4, &r6_41, &r6_47], &n), "the node's IP stack (protocols 4/41/47)");
    judge_attacker(&mut t, &at_a, &[ips(&bed, "b").as_slice(), node_ips(&bed).as_slice()].concat(), "a");
    expect_drops(&mut t, &m0, &m1, "egress", "tunnel", sent.frames());

    // An explicit allow opens exactly that: a may send UDP 8472 to the node.
    bed.write(
        "60-a-vxlan.yaml",
        "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: a-vxlan, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: a}}}]
  egress:
  - to: [{entity: host}]
    ports: [{protocol: UDP, port: 8472}]
",
    );
    let start = Instant::now();
    loop {
        let n = attack::nonce();
        let p = with(&p, json!({"nonce": n, "only": ["vxlan-8472/outer-v4", "vxlan-8472/outer-v6"]}));
        let l = [Listener::udp(&node_ns, 8472).unwrap()];
        let sent = attack::run(&bed, &a(), "tunnel", &p).unwrap();
        let [u8472] = stop_all(l, SETTLE).unwrap();
        let got = seen(&[&u8472], &n);
        if sent.labels().all(|l| got.contains_key(l)) {
            t.sent(&sent);
            break;
        }
        if start.elapsed() > DEADLINE {
            t.problem(format!("with a policy allowing a UDP 8472 to entity host, VXLAN to the node's 8472 still did not arrive (got {got:?})"));
            break;
        }
    }
    t.finish();
}

/// Item 4. A packet whose source is a local pod (c) but that reaches b's hook from
/// another interface than c's own must be dropped (`spoofed-source`): routed by the
/// node's own stack (raw socket), written onto b's host-side veth, and decapsulated by
/// the node's VXLAN device (the node sends the VXLAN to itself, so no pod's hook is
/// involved).
#[test]
fn local_pod_sources_are_accepted_only_from_their_own_interface() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_C_AND_A)]);
    let mut t = Tally::new("local_pod_sources_are_accepted_only_from_their_own_interface");
    let (mac4, mac6) = add_vxlan(&bed, "node1");
    let n = attack::nonce();
    let ([c4, c6], [b4, b6], [n4, n6]) = (ips(&bed, "c"), ips(&bed, "b"), node_ips(&bed));
    let p = json!({
        "nonce": n, "iface": bed.host_veth("default", "b").unwrap(), "victim_mac": attack::mac_of(&bed, &b(), "eth0").unwrap(),
        "spoof4": c4.to_string(), "spoof6": c6.to_string(), "victim4": b4.to_string(), "victim6": b6.to_string(),
        "node4": n4.to_string(), "node6": n6.to_string(), "vx_mac4": mac4, "vx_mac6": mac6, "vni": 42, "dport": 5300,
    });
    let l = [Listener::capture(&ns(&bed, &b()), "eth0").unwrap(), Listener::udp(&ns(&bed, &b()), 5300).unwrap()];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &node(), "inject", &p);
    // Control: c itself, from its own interface, reaches b on the same port.
    for (i, to) in [b4, b6].into_iter().enumerate() {
        let s = udp_socket_in(&ns(&bed, &c()), to, 5300);
        s.send(format!("ZTADV:{n}:control/{};", FAMILIES[i]).as_bytes()).unwrap();
    }
    let [at_b, r5300] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    let got = seen(&[&at_b, &r5300], &n);
    judge_target(&mut t, &sent, &got, "b");
    for f in FAMILIES {
        if !got.contains_key(&format!("control/{f}")) {
            t.problem(format!("control: c's own datagram to b@{f}:5300 did not arrive"));
        }
    }
    expect_drops(&mut t, &m0, &m1, "ingress", "spoofed-source", sent.frames());
    t.finish();
}

/// Item 5. With NodePort-style masquerade on the node (nftables: `oifname <b's veth>
/// masquerade`), a's connections to b, which b's policy denies, reached b from a node
/// address and passed as `host`. Forwarded traffic with a node source is not `host`; the
/// node's own sockets still reach b's probe port.
#[test]
fn masqueraded_pod_traffic_is_not_host() {
    const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  ingress:
  - from: [{podSelector: {matchLabels: {app: c}}}]
    ports: [{protocol: TCP, port: 80}, {protocol: UDP, port: 53}]
";
    let bed = adv_bed(&[("50-b.yaml", POLICY)]);
    let mut t = Tally::new("masqueraded_pod_traffic_is_not_host");
    let veth = bed.host_veth("default", "b").unwrap();
    let nft = json!({"commands": [
        "add table inet ztadv",
        "add chain inet ztadv post { type nat hook postrouting priority srcnat; policy accept; }",
        format!("add rule inet ztadv post oifname \"{veth}\" masquerade"),
    ]});
    attack::run(&bed, &node(), "nft", &nft).unwrap_or_else(|e| panic!("nftables masquerade (libnftables, from dnsmasq-base): {e:#}"));
    let mut specs = vec![];
    for f in FAMILIES {
        for (proto, port) in [(Proto::Tcp, 80), (Proto::Tcp, 7000), (Proto::Udp, 53)] {
            specs.push(ProbeSpec::new(a(), tgt("default", "b", f), proto, port));
        }
    }
    let m0 = bed.metrics();
    let m = bed.probe_matrix(&specs, DENIED);
    let m1 = bed.metrics();
    t.add(specs.len() as u64, specs.len() as u64);
    for (s, r) in &m.results {
        if r.is_ok() || *r == ProbeResult::Refused {
            t.wrong_allow(format!("{s} (masqueraded to the node's address): {r}"));
        }
    }
    let host = delta(&m0, &m1, "ingress", "allow", "host");
    if host > 0.0 {
        t.wrong_allow(format!("b's hook allowed {host} masqueraded packet(s) as `host`"));
    }
    // The masquerade was in effect (else this test proves nothing).
    let ct = attack::sh(&bed, &node(), "cat /proc/net/nf_conntrack").unwrap_or_default();
    let [n4, n6] = node_ips(&bed);
    for (i, f) in FAMILIES.into_iter().enumerate() {
        let (a_ip, node_ip) = (ips(&bed, "a")[i], [n4, n6][i]);
        // Lines hold the original tuple, then the reply tuple (IPv6 written out in full).
        let addrs = |l: &str, key: &str| -> Vec<IpAddr> { l.split_whitespace().filter_map(|w| w.strip_prefix(key)?.parse().ok()).collect() };
        let natted = ct.lines().any(|l| addrs(l, "src=").contains(&a_ip) && addrs(l, "dst=").contains(&node_ip));
        if !natted {
            t.problem(format!("no masqueraded conntrack entry for a@{f} -> b in the node: the masquerade did not apply\n{ct}"));
        }
    }
    // The node's own sockets reach b's probe port.
    for f in FAMILIES {
        let r = bed.tb.probe(&node(), &tgt("default", "b", f), Proto::Tcp, 80, ALLOWED);
        if r != ok("default/b") {
            t.problem(format!("control: the node's own connection to b@{f}:80 (readiness probe port): {r}"));
        }
    }
    t.finish();
}

/// Item 6. IPv6 fragments where a Destination Options header follows the Fragment
/// header, a -> b on a UDP port b allows a: the first fragment was keyed on the final
/// protocol, later ones on the Fragment header's next header, so the datagram never
/// completed. Controls: the same datagram without the option, and with it before the
/// Fragment header.
#[test]
fn ipv6_fragments_with_destination_options_after_the_fragment_header_are_delivered() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_C_AND_A)]);
    let mut t = Tally::new("ipv6_fragments_with_destination_options_after_the_fragment_header_are_delivered");
    let n = attack::nonce();
    let size = 3000;
    let p = with(&params(&bed, &n, "a", "b"), json!({"sport": 46100, "dport": 5301, "size": size}));
    let l = [Listener::udp(&ns(&bed, &b()), 5301).unwrap()];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "frag6-destopt", &p);
    let [r5301] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    for label in sent.labels() {
        let whole = r5301.iter().filter(|f| f.tag(&n).as_deref() == Some(label)).any(|f| f.data.len() == size);
        if !whole {
            t.problem(format!("{label}: the {size}-byte datagram a -> b:5301 (allowed) was not delivered whole"));
        }
    }
    for dir in ["egress", "ingress"] {
        let d = delta(&m0, &m1, dir, "drop", "fragment");
        if d > 0.0 {
            t.problem(format!("{d} fragment(s) dropped ({dir}, `fragment`) of allowed datagrams"));
        }
    }
    t.finish();
}

/// Items 1 and 3 across nodes (lab `two-nodes`, an agent on each node): a on node1
/// smuggles a packet sourced from c (a pod on node2) to b (node2), which allows c, in
/// two VLAN tags and in VXLAN to node2's address (its VXLAN device decapsulates). Both
/// must die at a's hook (`vlan`, `tunnel`); a plain spoof of c too.
#[test]
fn cross_node_smuggling_in_vlan_tags_or_vxlan_is_dropped() {
    const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: b-in, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: b}}}]
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: c}}}]
    ports: [{protocol: UDP, port: 5300}]
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 5301}]
";
    if let Err(e) = attack::require_scapy() {
        panic!("{e:#}");
    }
    // The agents learn the other node's addresses (`remote-node`) from the Node objects'
    // InternalIPs, which the lab leaves out (the bed's defaults apply): give them.
    let mut pods = std::fs::read_to_string(lab("two-nodes").join("pods.yaml")).unwrap();
    for k in [1, 2] {
        let name = format!("metadata:\n  name: node{k}\n");
        assert!(pods.contains(&name), "labs/two-nodes/pods.yaml changed: no Node node{k}");
        let (v4, v6) = (format!("10.255.0.{k}"), format!("fd00:255::{k}"));
        pods = pods.replace(&name, &format!("{name}status:\n  addresses: [{{type: InternalIP, address: {v4}}}, {{type: InternalIP, address: \"{v6}\"}}]\n"));
    }
    let bed = bed("two-nodes", &[("pods.yaml", &pods), ("50-b.yaml", POLICY)], &[]);
    assert_eq!(bed.node_ip("node2", Family::V4).unwrap().to_string(), "10.255.0.2", "the bed's default address of node2");
    let agent2 = bed.tb.start_agent("node2", &zt_testbed::bins::find("zt-agent").unwrap(), &bed.dir, &["--poll-ms", "100"]).unwrap();
    agent2.wait_ready(Duration::from_secs(20)).unwrap();
    let mut t = Tally::new("cross_node_smuggling_in_vlan_tags_or_vxlan_is_dropped");
    let (mac4, mac6) = add_vxlan(&bed, "node2");
    let n = attack::nonce();
    let (c4, c6) = (ip(&bed, "other", "c", Family::V4), ip(&bed, "other", "c", Family::V6));
    let (n4, n6) = (bed.node_ip("node2", Family::V4).unwrap(), bed.node_ip("node2", Family::V6).unwrap());
    let base = params(&bed, &n, "a", "b");
    let spoof = json!({"spoof4": c4.to_string(), "spoof6": c6.to_string()});
    let vlan = with(
        &with(&base, spoof.clone()),
        json!({"dport_spoof": 5300, "dport_own": 5301,
               "only": ["dot1q-dot1q-vid0/v4", "dot1ad-dot1q-vid0/v4", "dot1q-dot1q-vid0/v6", "dot1ad-dot1q-vid0/v6", "control/v4", "control/v6"]}),
    );
    let tunnel = with(
        &with(&base, spoof),
        json!({"node4": n4.to_string(), "node6": n6.to_string(), "vx_mac4": mac4, "vx_mac6": mac6, "vni": 42, "dport": 5300,
               "only": ["vxlan-4789/outer-v4/inner4", "vxlan-4789/outer-v4/inner6", "vxlan-4789/outer-v6/inner4", "vxlan-4789/outer-v6/inner6"]}),
    );
    let sources: Vec<Value> = [(c4, "v4"), (c6, "v6")]
        .iter()
        .map(|(c, f)| json!({"label": format!("spoof-remote-pod-c/{f}"), "src": c.to_string(), "dport": 5300, "proto": "udp"}))
        .collect();
    let spoofed = with(&base, json!({"sources": sources}));
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&ns(&bed, &b()), 5301).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let mut sent = Sent::default();
    for (scenario, p) in [("vlan", &vlan), ("tunnel", &tunnel), ("spoof", &spoofed)] {
        sent.attacks.extend(run(&bed, &mut t, &a(), scenario, p).attacks);
    }
    let [at_b, r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b, &r5300, &r5301], &n), "b on node2");
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    expect_drops(&mut t, &m0, &m1, "egress", "vlan", sent.frames_where(|l| l.starts_with("dot1")));
    expect_drops(&mut t, &m0, &m1, "egress", "tunnel", sent.frames_where(|l| l.starts_with("vxlan")));
    t.finish();
}

// ---------------------------------------------------------------------------
// Regression guards: attacks that already fail
// ---------------------------------------------------------------------------

/// A SYN scan, UDP and SCTP probes and pings of an isolated pod: nothing reaches it and
/// nothing at all (no SYN-ACK, RST, ICMP error, SCTP ABORT) comes back to the scanner.
#[test]
fn port_scan_of_an_isolated_pod_gets_no_answer() {
    let bed = adv_bed(&[("50-b.yaml", B_ISOLATED)]);
    let mut t = Tally::new("port_scan_of_an_isolated_pod_gets_no_answer");
    let n = attack::nonce();
    let p = with(
        &params(&bed, &n, "a", "b"),
        json!({"tcp_ports": [1, 22, 53, 79, 80, 81, 443, 6443, 7000, 8080, 9000, 10250, 65535],
               "udp_ports": [53, 123, 161, 5353, 9000, 33434], "sctp_ports": [9000, 9999]}),
    );
    let l = [Listener::capture(&ns(&bed, &b()), "eth0").unwrap(), Listener::capture(&ns(&bed, &a()), "eth0").unwrap()];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "scan", &p);
    let [at_b, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b], &n), "b");
    judge_sources(&mut t, &at_b, &ips(&bed, "a"), "b", &n);
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    let d = drops(&m1, "ingress") - drops(&m0, "ingress");
    if d < sent.frames() as f64 {
        t.problem(format!("b's hook dropped {d} packets, want >= {}", sent.frames()));
    }
    t.finish();
}

/// TCP segments without a SYN (ACK, FIN, RST, PSH, URG, none, SYN+FIN, SYN+RST) to a
/// denied port, a forged SYN-ACK and a forged DNS reply: dropped, nothing comes back.
#[test]
fn forged_tcp_flags_and_replies_to_an_isolated_pod_are_dropped() {
    let bed = adv_bed(&[("50-b.yaml", B_ISOLATED)]);
    let mut t = Tally::new("forged_tcp_flags_and_replies_to_an_isolated_pod_are_dropped");
    let n = attack::nonce();
    let p = with(&params(&bed, &n, "a", "b"), json!({"dport": 80}));
    let l = [Listener::capture(&ns(&bed, &b()), "eth0").unwrap(), Listener::capture(&ns(&bed, &a()), "eth0").unwrap()];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "tcp-flags", &p);
    let [at_b, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b], &n), "b");
    judge_sources(&mut t, &at_b, &ips(&bed, "a"), "b", &n);
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    let d = drops(&m1, "ingress") - drops(&m0, "ingress");
    if d < sent.frames() as f64 {
        t.problem(format!("b's hook dropped {d} packets, want >= {}", sent.frames()));
    }
    t.finish();
}

/// Plain (untagged) packets from a with other sources: c (which b allows), the node
/// (which b lets in as `host`), b itself, an unknown pod-range address, link-local and
/// unspecified addresses. All dropped at a's own hook.
#[test]
fn spoofed_sources_without_vlan_tags_are_dropped() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_C_AND_A)]);
    let mut t = Tally::new("spoofed_sources_without_vlan_tags_are_dropped");
    let n = attack::nonce();
    let ([a4, a6], [b4, b6], [c4, c6], [n4, n6]) = (ips(&bed, "a"), ips(&bed, "b"), ips(&bed, "c"), node_ips(&bed));
    let mut sources = vec![];
    for (fam, a_ip, b_ip, c_ip, n_ip, unknown) in [("v4", a4, b4, c4, n4, "10.210.0.99"), ("v6", a6, b6, c6, n6, "fd00:210::99")] {
        let s = |label: &str, src: String, dport: u16, proto: &str| json!({"label": format!("{label}/{fam}"), "src": src, "dport": dport, "proto": proto});
        sources.push(s("spoof-allowed-pod-c", c_ip.to_string(), 5300, "udp"));
        sources.push(s("spoof-allowed-pod-c-tcp", c_ip.to_string(), 80, "tcp"));
        sources.push(s("spoof-node-udp", n_ip.to_string(), 5300, "udp"));
        sources.push(s("spoof-node-tcp", n_ip.to_string(), 7000, "tcp"));
        sources.push(s("spoof-target-itself", b_ip.to_string(), 5300, "udp"));
        sources.push(s("spoof-unknown-pod-range", unknown.into(), 5300, "udp"));
        sources.push(s("spoof-unspecified", if fam == "v4" { "0.0.0.0".into() } else { "::".into() }, 5300, "udp"));
        if fam == "v6" {
            sources.push(s("spoof-node-link-local", "fe80::1".into(), 5300, "udp"));
        }
        sources.push(s("control-own-source", a_ip.to_string(), 5301, "udp"));
    }
    let p = with(&params(&bed, &n, "a", "b"), json!({"sources": sources}));
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&ns(&bed, &b()), 5301).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "spoof", &p);
    let [at_b, r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b, &r5300, &r5301], &n), "b");
    judge_attacker(&mut t, &at_a, &[b4, b6], "a");
    let want = sent.frames_where(|l| !is_control(l));
    let d = drops(&m1, "egress") - drops(&m0, "egress");
    if d < want as f64 {
        t.problem(format!("a's hook dropped {d} packets, want >= {want} (every spoofed one)"));
    }
    t.finish();
}

/// IPv4 and IPv6 fragment games against a port b denies (UDP 5301, TCP 7000) next to
/// one it allows a (UDP 5300): overlapping first fragments that rewrite the port, a
/// later fragment that overlaps the header, tiny first fragments, an empty first
/// fragment, lone later fragments, a fragment id reused with another protocol, atomic
/// fragments, an IPv6 header chain split over two fragments. Nothing arrives on the
/// denied ports and nothing comes back; fragmented datagrams to the allowed port arrive.
#[test]
fn fragment_games_do_not_open_denied_ports() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_A_5300)]);
    let mut t = Tally::new("fragment_games_do_not_open_denied_ports");
    let n = attack::nonce();
    let p = with(&params(&bed, &n, "a", "b"), json!({"allowed_port": 5300, "denied_port": 5301, "tcp_denied": 7000}));
    let l = [Listener::udp(&ns(&bed, &b()), 5300).unwrap(), Listener::udp(&ns(&bed, &b()), 5301).unwrap(), Listener::capture(&ns(&bed, &a()), "eth0").unwrap()];
    let sent = run(&bed, &mut t, &a(), "frag-games", &p);
    let [r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    for d in &r5301 {
        t.wrong_allow(format!("a datagram reached b's denied UDP 5301: {:?} ({} bytes)", d.tag(&n), d.data.len()));
    }
    let allowed = seen(&[&r5300], &n);
    for label in sent.labels().filter(|l| is_control(l)) {
        if !allowed.contains_key(label) {
            t.problem(format!("control {label}: a fragmented datagram to the allowed UDP 5300 did not arrive"));
        }
    }
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    t.finish();
}

/// IPv6 extension header chains longer than the datapath walks (7, 8, 12, 20 headers;
/// hop-by-hop + 6 destination options + routing), a 1 KB option header, a routing header
/// type 0, no next header, an unknown upper protocol: dropped, to a denied port and
/// (fail closed) to the allowed one; short chains to the allowed port arrive.
#[test]
fn long_ipv6_extension_header_chains_are_dropped() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_A_5300)]);
    let mut t = Tally::new("long_ipv6_extension_header_chains_are_dropped");
    let n = attack::nonce();
    let p = with(&params(&bed, &n, "a", "b"), json!({"allowed_port": 5300, "denied_port": 5301, "tcp_denied": 7000}));
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&ns(&bed, &b()), 5301).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "ext6", &p);
    let [at_b, r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b, &r5300, &r5301], &n), "b");
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    // Whatever the walk's bound, 12 and 20 headers are beyond it.
    let long = sent.frames_where(|l| l.contains("x12") || l.contains("x20"));
    let d = delta(&m0, &m1, "egress", "drop", "ipv6-ext-headers") + delta(&m0, &m1, "ingress", "drop", "ipv6-ext-headers");
    if d < long as f64 {
        t.problem(format!("`ipv6-ext-headers` drops grew by {d}, want >= {long}"));
    }
    t.finish();
}

/// Broken headers from a: IHL below 5 or beyond the packet, IHL with options that shift
/// the ports, total / payload lengths that disagree with the frame, the wrong IP version
/// for the ethertype, truncated TCP / UDP / SCTP headers, a TCP data offset of 2, an
/// ICMP error with a truncated quote. Nothing reaches b, nothing comes back; well-formed
/// controls to the allowed port arrive.
#[test]
fn malformed_headers_are_dropped() {
    let bed = adv_bed(&[("50-b.yaml", B_ALLOWS_A_5300)]);
    let mut t = Tally::new("malformed_headers_are_dropped");
    let n = attack::nonce();
    let p = with(&params(&bed, &n, "a", "b"), json!({"allowed_port": 5300, "denied_port": 5301, "tcp_denied": 7000}));
    let l = [
        Listener::capture(&ns(&bed, &b()), "eth0").unwrap(),
        Listener::udp(&ns(&bed, &b()), 5300).unwrap(),
        Listener::udp(&ns(&bed, &b()), 5301).unwrap(),
        Listener::capture(&ns(&bed, &a()), "eth0").unwrap(),
    ];
    let m0 = bed.metrics();
    let sent = run(&bed, &mut t, &a(), "malformed", &p);
    let [at_b, r5300, r5301, at_a] = stop_all(l, SETTLE).unwrap();
    let m1 = bed.metrics();
    judge_target(&mut t, &sent, &seen(&[&at_b, &r5300, &r5301], &n), "b");
    judge_sources(&mut t, &at_b, &ips(&bed, "a"), "b", &n);
    judge_attacker(&mut t, &at_a, &ips(&bed, "b"), "a");
    // Headers no hook can judge are dropped at the first one, a's (the rest are
    // judged by policy at b's, or dropped by the node's stack before b).
    const UNJUDGEABLE: [&str; 11] = [
        "ihl-4",
        "ihl-15",
        "totlen-beyond",
        "totlen-shorter",
        "version-",
        "ipv6-in-ipv4",
        "ipv4-in-ipv6",
        "tcp-truncated",
        "udp-truncated",
        "sctp-truncated",
        "payload-length-beyond",
    ];
    let want = sent.frames_where(|l| UNJUDGEABLE.iter().any(|k| l.starts_with(k)));
    let d = delta(&m0, &m1, "egress", "drop", "malformed");
    if d < want as f64 {
        t.problem(format!("a's hook dropped {d} frames as `malformed`, want >= {want}"));
    }
    t.finish();
}
