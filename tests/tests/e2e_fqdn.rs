//! End to end: FQDN egress rules learned from DNS answers in the kernel (lab
//! `labs/fqdn`: trusted resolvers `kube-system/dns` (dnsmasq) and `kube-system/dns2` (the
//! tests' Rust responder, and the source of scapy-crafted answers), clients
//! `default/client` and `default/other`, an untrusted resolver `default/fake`, and an
//! external host (identity world) owning 10.78.0.0/16 and fd78::/32).
mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::rr::RecordType;
use zt_testbed::dns::{self, ext_v4, ext_v6, Dnsmasq, ExternalHost, Responder, Zone, EXT_ECHO, EXT_TCP};
use zt_testbed::{Endpoint, Family, TcpFlow};

fn serve_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zt-testbed"))
}

fn connect_in(netns: &Path, ip: IpAddr, port: u16, timeout: Duration) -> bool {
    zt_testbed::sys::in_netns(netns, move || TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout).is_ok())
        .unwrap_or(false)
}

/// The test bed's DNS pieces without an agent: dnsmasq answers the lab zone (CNAME
/// chain, wildcard, 120 records over TCP after TC, AAAA), the external host owns its
/// prefixes, the Rust responder answers over UDP and TCP.
#[test]
fn testbed_dns_pieces() {
    let tb = testbed("fqdn");
    let ext = ExternalHost::add(&tb, "node1", serve_bin()).unwrap();
    let d = dns::Dnsmasq::start(&tb, &pod("kube-system", "dns"), &Zone::lab()).unwrap();
    let client = tb.pod("default", "client").unwrap().netns_path();
    let server = d.addrs[0];
    let t = Duration::from_secs(1);

    let a = dns::resolve_in(&client, server, "api.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips, vec![(dns::ext_v4(1, 1), 5)]);
    let a = dns::resolve_in(&client, d.addrs[1], "API.example.test", RecordType::AAAA, t).unwrap();
    assert_eq!(a.addrs(), vec![dns::ext_v6(1, 1)]);
    let a = dns::resolve_in(&client, server, "c1.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.cnames, vec!["c2.example.test.", "api.example.test."]);
    assert_eq!(a.addrs(), vec![dns::ext_v4(1, 1)]);
    let a = dns::resolve_in(&client, server, "x.y.wild.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.addrs(), vec![dns::ext_v4(2, 1)]);
    let a = dns::resolve_in(&client, server, "many.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips.len(), 120, "{a:?}");
    println!("many.example.test: {} bytes, via TCP: {}", a.size, a.via_tcp);
    let a = dns::resolve_in(&client, server, "r49.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips.len(), 50);
    let a = dns::resolve_in(&client, server, "nowhere.test", RecordType::A, t).unwrap();
    assert_ne!(a.rcode, 0, "a name outside the zone is refused");

    for ip in [dns::ext_v4(1, 1), dns::ext_v4(200, 7), dns::ext_v6(1, 1)] {
        assert!(connect_in(&client, ip, dns::EXT_TCP, ALLOWED), "client -> ext {ip}");
    }
    assert!(!connect_in(&client, dns::ext_v4(1, 1), 9, DENIED), "nothing listens on 9");

    let r = dns::Responder::start(
        &tb.pod("kube-system", "dns2").unwrap().netns_path(),
        &tb.pod("kube-system", "dns2").unwrap().pod.ips(),
        Arc::new(|q| Some(dns::answer(q, &[dns::ext_v4(9, 9)], 1))),
    )
    .unwrap();
    let dns2 = tb.pod_ip("kube-system", "dns2", Family::V4).unwrap();
    let a = dns::resolve_in(&client, dns2, "n1.race.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips, vec![(dns::ext_v4(9, 9), 1)]);
    drop(r);

    // scapy: a crafted answer from dns2's address reaches a waiting client socket, also
    // one that needs IP fragments (150 records).
    for (kind, n) in [("valid", 1usize), ("valid", 150)] {
        let pq = dns::open_query(&client, dns2, "crafted.example.test", RecordType::A).unwrap();
        let ips: Vec<String> = (0..n).map(|i| dns::ext_v4(50 + (i / 250) as u8, (i % 250) as u8).to_string()).collect();
        let out = dns::scapy_send(
            &tb,
            &pod("kube-system", "dns2"),
            serde_json::json!([{"kind": kind, "id": pq.id, "qname": "crafted.example.test", "ips": ips,
                               "src": dns2.to_string(), "dst": tb.pod_ip("default", "client", Family::V4).unwrap().to_string(), "dport": pq.port}]),
        )
        .unwrap();
        let mut buf = vec![0u8; 65536];
        let got = pq.sock.recv(&mut buf).unwrap_or_else(|e| panic!("no crafted answer ({out}): {e}"));
        let m = hickory_proto::op::Message::from_vec(&buf[..got]).unwrap();
        assert_eq!(m.answers.len(), n, "{out}");
    }
    drop(ext);
}

// ---------------------------------------------------------------------------
// With the agent
// ---------------------------------------------------------------------------

/// client: DNS to the trusted resolvers (entity dns) and to the fake resolver pod, and
/// FQDN rules on the external host's ports. other: DNS and one name of its own.
const POLICY: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: client-egress, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: client}}}]
  egress:
  - to: [{entity: dns}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - to: [{podSelector: {matchLabels: {app: fake}}}]
    ports: [{protocol: UDP, port: 53}]
  - to:
    - fqdn: {matchName: api.example.test}
    - fqdn: {matchPattern: \"*.wild.example.test\"}
    - fqdn: {matchName: c1.example.test}
    - fqdn: {matchName: many.example.test}
    - fqdn: {matchPattern: \"*.race.test\"}
    - fqdn: {matchPattern: \"*.crafted.test\"}
    ports: [{protocol: TCP, port: 8443}, {protocol: TCP, port: 8444}]
---
apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: other-egress, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {app: other}}}]
  egress:
  - to: [{entity: dns}]
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
  - to: [{fqdn: {matchName: other.example.test}}]
    ports: [{protocol: TCP, port: 8443}]
";

/// The lab zone plus names the tests need: one outside every pattern, one for `other`.
fn zone() -> Zone {
    let mut z = Zone::lab();
    z.hosts.push(("denied.example.test".into(), vec![ext_v4(4, 1)], Some(5)));
    z.hosts.push(("other.example.test".into(), vec![ext_v4(4, 2)], Some(5)));
    z
}

/// Drop order: the DNS servers and the external host go before the bed.
#[allow(dead_code)] // held for their Drop
struct Fqdn {
    responder: Option<Responder>,
    dnsmasq: Option<Dnsmasq>,
    ext: ExternalHost,
    bed: Bed,
}

impl std::ops::Deref for Fqdn {
    type Target = Bed;
    fn deref(&self) -> &Bed {
        &self.bed
    }
}

fn fqdn_bed(extra_args: &[&str]) -> Fqdn {
    let bed = bed("fqdn", &[("10-fqdn.yaml", POLICY)], extra_args);
    let ext = ExternalHost::add(&bed.tb, "node1", serve_bin()).unwrap();
    let dnsmasq = Some(Dnsmasq::start(&bed.tb, &pod("kube-system", "dns"), &zone()).unwrap());
    Fqdn { responder: None, dnsmasq, ext, bed }
}

impl Fqdn {
    fn ns(&self, name: &str) -> PathBuf {
        self.tb.pod("default", name).unwrap().netns_path()
    }
    fn dns(&self, f: Family) -> IpAddr {
        self.tb.pod_ip("kube-system", "dns", f).unwrap()
    }
    fn dns2(&self) -> IpAddr {
        self.tb.pod_ip("kube-system", "dns2", Family::V4).unwrap()
    }
    fn resolve(&self, who: &str, name: &str, qtype: RecordType) -> dns::Answer {
        let server = self.dns(if qtype == RecordType::AAAA { Family::V6 } else { Family::V4 });
        dns::resolve_in(&self.ns(who), server, name, qtype, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("{who} resolving {name}: {e:#}"))
    }
    fn connects(&self, who: &str, ip: IpAddr) -> bool {
        connect_in(&self.ns(who), ip, EXT_TCP, Duration::from_millis(900))
    }
    /// Connect to many addresses in parallel; which ones succeeded.
    fn connects_many(&self, who: &str, ips: &[IpAddr]) -> Vec<IpAddr> {
        let ns = self.ns(who);
        std::thread::scope(|sc| {
            let hs: Vec<_> = ips.iter().map(|ip| (*ip, sc.spawn(|| connect_in(&ns, *ip, EXT_TCP, Duration::from_millis(900))))).collect();
            hs.into_iter().filter_map(|(ip, h)| h.join().unwrap().then_some(ip)).collect()
        })
    }
    fn denied(&self, who: &str, ip: IpAddr) -> bool {
        !connect_in(&self.ns(who), ip, EXT_TCP, DENIED)
    }
    fn stat(&self, outcome: &str) -> f64 {
        self.metrics().get("zt_fqdn_answers_total", &[("outcome", outcome)]).unwrap_or(0.0)
    }
    fn egress_default_deny(&self) -> f64 {
        self.metrics().verdicts("egress", "drop", "policy-default-deny")
    }
    fn fqdn_allows(&self) -> f64 {
        self.metrics().verdicts("egress", "allow", "fqdn")
    }
    fn start_responder(&mut self, h: dns::Handler) {
        let p = self.tb.pod("kube-system", "dns2").unwrap();
        self.responder = Some(Responder::start(&p.netns_path(), &p.pod.ips(), h).unwrap());
    }
    /// Learned rows of `ztctl fqdn -o json` for the client.
    fn learned(&self) -> Vec<serde_json::Value> {
        self.ztctl_json(&["fqdn", "--identity", "sa/client"]).as_array().unwrap().clone()
    }
    fn open_echo(&self, who: &str, ip: IpAddr) -> TcpFlow {
        self.tb
            .open_tcp(&pod("default", who), &zt_testbed::Target::Ip(ip), EXT_ECHO, ALLOWED)
            .unwrap_or_else(|e| panic!("{who} -> {ip}:{EXT_ECHO}: {e:#}"))
    }
}

/// Resolve, then connect: v4 and v6, wildcard, CNAME chain (through the question name),
/// an unresolved address of the same block stays denied, the pattern `*.wild` does not
/// cover `wild` itself, and the 120-record answer learns at most 32 addresses.
#[test]
fn resolve_then_connect() {
    let f = fqdn_bed(&[]);
    // Before any answer, nothing of the external host is reachable.
    assert!(f.denied("client", ext_v4(1, 1)), "not resolved yet: denied");
    assert_eq!(f.resolve("client", "api.example.test", RecordType::A).addrs(), vec![ext_v4(1, 1)]);
    assert!(f.connects("client", ext_v4(1, 1)), "api.example.test (v4) after resolving");
    assert!(f.denied("client", ext_v4(1, 2)), "an address nobody answered");
    assert!(f.denied("client", ext_v6(1, 1)), "the AAAA was not asked yet");
    assert_eq!(f.resolve("client", "api.example.test", RecordType::AAAA).addrs(), vec![ext_v6(1, 1)]);
    assert!(f.connects("client", ext_v6(1, 1)), "api.example.test (v6) after resolving");

    assert_eq!(f.resolve("client", "x.wild.example.test", RecordType::A).addrs(), vec![ext_v4(2, 1)]);
    assert!(f.connects("client", ext_v4(2, 1)), "a wildcard subdomain");

    // wild.example.test itself (same address, fresh on another identity-free path):
    // the `*.` pattern needs at least one label before it. Checked on the v6 address,
    // which only the bare name resolves here.
    assert_eq!(f.resolve("client", "wild.example.test", RecordType::AAAA).addrs(), vec![ext_v6(2, 1)]);
    assert!(f.denied("client", ext_v6(2, 1)), "*.wild.example.test does not match wild.example.test");

    let before = f.stat("no-match");
    let a = f.resolve("client", "denied.example.test", RecordType::A);
    assert_eq!(a.addrs(), vec![ext_v4(4, 1)]);
    assert!(f.denied("client", ext_v4(4, 1)), "a name outside every rule");
    assert!(f.stat("no-match") > before, "counted as no-match");

    let a = f.resolve("client", "c1.example.test", RecordType::A);
    assert_eq!(a.cnames.len(), 2);
    // api's address is already learned; the chain must also learn under c1 (the
    // question name): ztctl names it once the agent wrote its cache (every 5 s).
    f.wait_until("ztctl fqdn names 10.78.1.1 under c1.example.test", || {
        f.learned().iter().any(|r| r["ip"] == "10.78.1.1" && r["names"].as_array().unwrap().iter().any(|n| n == "c1.example.test"))
    });

    // DNS over TCP: an answer in one segment is learned like a UDP one.
    let (ns, server) = (f.ns("client"), f.dns(Family::V4));
    let a = zt_testbed::sys::in_netns(&ns, move || dns::query_tcp_here(server, "tcp.wild.example.test", RecordType::AAAA, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    assert_eq!(a.addrs(), vec![ext_v6(2, 1)]);
    println!("DNS over TCP: tcp-partial {}", f.stat("tcp-partial"));
    assert!(f.connects("client", ext_v6(2, 1)), "learned from a TCP answer");

    let capped = f.stat("ips-capped") + f.stat("partial");
    let a = f.resolve("client", "many.example.test", RecordType::A);
    assert_eq!(a.ips.len(), 120);
    let ok = f.connects_many("client", &(1..=120u8).map(|i| ext_v4(3, i)).collect::<Vec<_>>());
    println!("many.example.test: answer {} bytes (TCP: {}), {} of 120 addresses reachable", a.size, a.via_tcp, ok.len());
    assert!(!ok.is_empty() && ok.len() <= 32, "at most 32 addresses learned per answer, got {}", ok.len());
    assert!(f.stat("ips-capped") + f.stat("partial") > capped, "ips-capped or partial counted");
    // The same 1966-byte answer over TCP is more than one 1500-byte segment on the wire,
    // but the resolver's socket hands it to the veth as one GSO skb: the capture sees the
    // whole message and learns (or, if it were split, counts tcp-partial and learns
    // nothing: fail closed). Either way the capture must have seen it.
    let ips_learned = || f.metrics().get("zt_fqdn_ips_learned_total", &[]).unwrap_or(0.0);
    let before = (f.stat("tcp-partial"), ips_learned());
    let (ns, server) = (f.ns("client"), f.dns(Family::V4));
    let a = zt_testbed::sys::in_netns(&ns, move || dns::query_tcp_here(server, "many.example.test", RecordType::A, Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    assert_eq!(a.ips.len(), 120);
    let after = (f.stat("tcp-partial"), ips_learned());
    println!("many.example.test over TCP: tcp-partial {} -> {}, ips-learned {} -> {}", before.0, after.0, before.1, after.1);
    assert!(after.0 > before.0 || after.1 >= before.1 + 32.0, "the TCP answer was captured");
    println!("{}", f.ztctl(&["fqdn", "--name", "*.example.test"]));
    let e = f.ztctl(&["explain", "default/client", "10.78.1.1", "tcp/8443"]);
    println!("{e}");
    assert!(e.contains("ALLOW") && e.contains("allow (fqdn)") && e.contains("ZT_FQDN_LEARNED"), "explain names the fqdn step: {e}");
    let e = f.ztctl(&["explain", "default/client", "10.78.1.1", "tcp/9999"]);
    assert!(e.contains("DROP"), "another port: {e}");
    let n = f.ztctl(&["fqdn", "names", "--identity", "sa/client"]);
    println!("{n}");
    assert!(n.contains("*.wild.example.test") && n.contains("api.example.test"), "ztctl fqdn names: {n}");
}

/// Names a pod is not allowed stay denied, also when another identity resolved them, and
/// an address learned for another identity's name does not open it for this one.
#[test]
fn other_identities_names_stay_denied() {
    let f = fqdn_bed(&[]);
    assert_eq!(f.resolve("client", "api.example.test", RecordType::A).addrs(), vec![ext_v4(1, 1)]);
    assert!(f.connects("client", ext_v4(1, 1)));
    assert!(f.denied("other", ext_v4(1, 1)), "other has no rule for api.example.test, whoever resolved it");
    f.resolve("other", "api.example.test", RecordType::A);
    assert!(f.denied("other", ext_v4(1, 1)), "resolving a name outside its rules opens nothing");
    f.resolve("other", "other.example.test", RecordType::A);
    assert!(f.connects("other", ext_v4(4, 2)), "other's own name");
    assert!(f.denied("client", ext_v4(4, 2)), "client did not learn other's name");
    // A name of client's rules resolved by other opens nothing for other.
    f.resolve("other", "y.wild.example.test", RecordType::A);
    assert!(f.denied("other", ext_v4(2, 1)));
}

/// 1000 fresh names, each resolved and connected to at once (TTL 1): every connect
/// succeeds, no egress default-deny drop happens (the proof that no first SYN met the
/// race: a dropped SYN is counted, whatever the timing), and each one counts as an fqdn
/// allow. The connect timeout is generous: on a loaded machine a connect allowed on its
/// first SYN can still take longer than a retransmit interval to be scheduled. Controls: unresolved addresses of the
/// same block and a name outside the pattern are denied.
#[test]
fn race_resolve_connect_1000_fresh_names() {
    let mut f = fqdn_bed(&[]);
    f.start_responder(Arc::new(|q| {
        let name = dns::qname(q)?;
        let i: u32 = name.strip_prefix('n')?.strip_suffix(".race.test")?.parse().ok()?;
        Some(dns::answer(q, &[ext_v4(10 + (i / 250) as u8, (i % 250) as u8)], 1))
    }));
    let (drops0, allows0) = (f.egress_default_deny(), f.fqdn_allows());
    let (ns, server) = (f.ns("client"), f.dns2());
    let (ok, failed) = zt_testbed::sys::in_netns(&ns, move || {
        let (mut ok, mut failed) = (0u32, vec![]);
        for i in 0..1000u32 {
            let name = format!("n{i}.race.test");
            let ip = match dns::query_here(server, &name, RecordType::A, Duration::from_secs(2)) {
                Ok(a) if a.ips.len() == 1 => a.ips[0].0,
                other => {
                    failed.push(format!("{name}: {other:?}"));
                    continue;
                }
            };
            match TcpStream::connect_timeout(&SocketAddr::new(ip, EXT_TCP), Duration::from_secs(5)) {
                Ok(_) => ok += 1,
                Err(e) => failed.push(format!("{name} -> {ip}: {e}")),
            }
        }
        (ok, failed)
    })
    .unwrap();
    let (drops1, allows1) = (f.egress_default_deny(), f.fqdn_allows());
    println!("race: {ok}/1000 connects OK; egress default-deny drops +{}; fqdn allows +{}", drops1 - drops0, allows1 - allows0);
    assert!(failed.is_empty(), "{} failures, first: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert_eq!(ok, 1000);
    assert_eq!(drops1 - drops0, 0.0, "no SYN may meet default deny");
    assert!(allows1 - allows0 >= 1000.0, "each connect allowed by an fqdn rule");
    // Controls: addresses of the same block that no answer named.
    for j in 0..5u8 {
        assert!(f.denied("client", ext_v4(14, 200 + j)), "10.78.14.{} was never answered", 200 + j);
    }
    let a = dns::resolve_in(&f.ns("client"), f.dns(Family::V4), "denied.example.test", RecordType::A, Duration::from_secs(2)).unwrap();
    assert!(f.denied("client", a.ips[0].0), "a name outside the pattern");
}

/// TTL 1 with --fqdn-min-ttl 1 --fqdn-grace 1: a connect at once works; an echo flow
/// opened then keeps working after expiry + grace, also across an unrelated policy change
/// (epoch bump: the tracked re-judge needs only the entry); a new connect after 3 s is
/// denied; removing the FQDN rule revokes the live flow.
#[test]
fn expiry_after_ttl_and_grace() {
    let mut f = fqdn_bed(&["--fqdn-min-ttl", "1", "--fqdn-grace", "1"]);
    f.start_responder(Arc::new(|q| {
        let name = dns::qname(q)?;
        (name == "exp.race.test").then(|| dns::answer(q, &[ext_v4(5, 1)], 1))
    }));
    let ip = ext_v4(5, 1);
    let a = dns::resolve_in(&f.ns("client"), f.dns2(), "exp.race.test", RecordType::A, Duration::from_secs(2)).unwrap();
    assert_eq!(a.addrs(), vec![ip]);
    assert!(f.connects("client", ip), "at once");
    let mut flow = f.open_echo("client", ip);
    assert!(flow.roundtrip(ALLOWED));
    std::thread::sleep(Duration::from_secs(3));
    assert!(f.denied("client", ip), "a new flow after TTL + grace");
    assert!(flow.roundtrip(ALLOWED), "the live flow survives expiry");

    bump_epoch(&f);
    assert!(flow.roundtrip(ALLOWED), "the tracked flow is re-judged after the bump and stays allowed");

    let revoked0 = f.metrics().verdicts("egress", "drop", "revoked") + f.metrics().verdicts("ingress", "drop", "revoked");
    f.write("10-fqdn.yaml", &POLICY.replace("    - fqdn: {matchPattern: \"*.race.test\"}\n", ""));
    f.wait_until("the live flow to be revoked", || !flow.roundtrip(Duration::from_millis(300)));
    let revoked1 = f.metrics().verdicts("egress", "drop", "revoked") + f.metrics().verdicts("ingress", "drop", "revoked");
    assert!(revoked1 > revoked0, "counted as revoked");
}

/// An unrelated allow written, applied and withdrawn: the withdrawal bumps the epoch,
/// so every tracked flow is judged again.
fn bump_epoch(f: &Bed) {
    let epoch0 = f.metrics().val("zt_policy_epoch", &[]);
    let updates0 = f.metrics().val("zt_map_updates_total", &[]);
    f.write("30-unrelated.yaml", &allow_other_tcp(80));
    f.wait_until("the unrelated allow applied", || f.metrics().val("zt_map_updates_total", &[]) > updates0);
    f.remove("30-unrelated.yaml");
    f.wait_until("an epoch bump", || f.metrics().val("zt_policy_epoch", &[]) > epoch0);
}

fn allow_other_tcp(port: u16) -> String {
    format!(
        "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {{name: unrelated, namespace: default}}
spec:
  subjects: [{{podSelector: {{matchLabels: {{app: other}}}}}}]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: fake}}}}}}]
    ports: [{{protocol: TCP, port: {port}}}]
"
    )
}

/// Answers crafted with scapy: malformed ones from the trusted resolver's address to a
/// real pending query, spoofed ones (untrusted resolver; another pod forging the
/// resolver's address; unsolicited), oversized ones (40 records, 3000 bytes in IP
/// fragments). None may allow anything it should not, and the agent, dnsmasq and the
/// datapath keep working.
#[test]
fn crafted_answers_scapy() {
    let f = fqdn_bed(&[]);
    let client_ip = f.tb.pod_ip("default", "client", Family::V4).unwrap();
    let dns2 = f.dns2();
    let client_ns = f.ns("client");
    let from_dns2 = pod("kube-system", "dns2");

    // A crafted answer from `src` (sent in `from`'s netns) to a fresh query of the client.
    let craft = |from: &Endpoint, src: IpAddr, kind: &str, qname: &str, ips: &[IpAddr], extra: serde_json::Value| -> String {
        let pq = dns::open_query(&client_ns, dns2, qname, RecordType::A).unwrap();
        let ips: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        let mut p = serde_json::json!({"kind": kind, "id": pq.id, "qname": qname, "ips": ips, "ttl": 60,
            "src": src.to_string(), "dst": client_ip.to_string(), "dport": pq.port});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        dns::scapy_send(&f.tb, from, serde_json::json!([p])).unwrap()
    };
    let malformed: &[(&str, &str)] = &[
        ("truncated", "truncated"),
        ("nxdomain", "rcode"),
        ("not-response", "not-response"),
        ("qdcount2", "qdcount"),
        ("qname-pointer", "qname-pointer"),
        ("label64", "qname-bad"),
        ("labels33", "qname-labels"),
        ("short", "short"),
    ];
    let mut k = 0u8;
    for (kind, outcome) in malformed {
        k += 1;
        let ip = ext_v4(20, k);
        let before = f.stat(outcome);
        // An answer echoes its query's question: a 33-label answer needs a 33-label query.
        let qname = if *kind == "labels33" { format!("{}m{k}.crafted.test", "l.".repeat(31)) } else { format!("m{k}.crafted.test") };
        let out = craft(&from_dns2, dns2, kind, &qname, &[ip], serde_json::json!({}));
        f.wait_until(&format!("{kind}: counted as {outcome} ({out})"), || f.stat(outcome) > before);
        assert!(f.denied("client", ip), "{kind}: nothing learned");
    }
    // Records before a bad one are learned, the rest are not.
    let before = f.stat("answer-bad");
    craft(&from_dns2, dns2, "rdlength", "rd.crafted.test", &[ext_v4(21, 1)], serde_json::json!({}));
    f.wait_until("rdlength 5 counted as answer-bad", || f.stat("answer-bad") > before);
    assert!(f.denied("client", ext_v4(21, 1)));
    craft(&from_dns2, dns2, "overrun", "ov.crafted.test", &[ext_v4(21, 2)], serde_json::json!({}));
    // An owner name pointer loop is skipped, never followed.
    let before = f.stat("answers");
    craft(&from_dns2, dns2, "owner-loop", "loop.crafted.test", &[ext_v4(21, 3)], serde_json::json!({}));
    f.wait_until("the owner-loop answer parsed", || f.stat("answers") > before);
    for seed in 0..20 {
        craft(&from_dns2, dns2, "garbage", "g.crafted.test", &[], serde_json::json!({"seed": seed, "len": 20 + seed * 37}));
    }

    // Oversized: 40 records learn exactly 32; 3000 bytes arrive in IP fragments.
    let forty: Vec<IpAddr> = (1..=40u8).map(|i| ext_v4(22, i)).collect();
    let before = f.stat("ips-capped");
    craft(&from_dns2, dns2, "valid", "forty.crafted.test", &forty, serde_json::json!({}));
    f.wait_until("40 records: ips-capped", || f.stat("ips-capped") > before);
    let ok = f.connects_many("client", &forty).len();
    assert_eq!(ok, 32, "exactly 32 of 40 addresses learned");
    // Fewer than 32 records but over one MTU (long owner names): only the first IP
    // fragment is parsed, so it learns the records inside it and counts `partial`.
    let big: Vec<IpAddr> = (1..=20u8).map(|i| ext_v4(23, i)).collect();
    let long = format!("{}.{}.{}.big.crafted.test", "a".repeat(60), "b".repeat(60), "c".repeat(60));
    let before = f.stat("partial");
    let out = craft(&from_dns2, dns2, "valid", &long, &big, serde_json::json!({}));
    f.wait_until(&format!("a fragmented answer counted as partial ({out})"), || f.stat("partial") > before);
    let ok = f.connects_many("client", &big);
    println!("fragmented 20-record answer: {} addresses learned from the first fragment", ok.len());
    assert!(ok.contains(&ext_v4(23, 1)), "a record inside the first fragment is learned");
    assert!(!ok.contains(&ext_v4(23, 20)), "a record beyond the first fragment is not learned");
    // Spoofed: an untrusted resolver answering a query sent to it.
    let fake = f.tb.pod_ip("default", "fake", Family::V4).unwrap();
    let pq = dns::open_query(&client_ns, fake, "s1.crafted.test", RecordType::A).unwrap();
    let before = f.stat("not-trusted");
    dns::scapy_send(&f.tb, &pod("default", "fake"), serde_json::json!([{"kind": "valid", "id": pq.id, "qname": "s1.crafted.test",
        "ips": ["10.78.24.1"], "src": fake.to_string(), "dst": client_ip.to_string(), "dport": pq.port}])).unwrap();
    f.wait_until("the fake resolver's answer counted as not-trusted", || f.stat("not-trusted") > before);
    assert!(f.denied("client", ext_v4(24, 1)));
    // Another pod forging the trusted resolver's address: dropped at its own raw socket
    // (the cgroup programs: not the resolver pod's cgroup) before its interface.
    let pq = dns::open_query(&client_ns, dns2, "s2.crafted.test", RecordType::A).unwrap();
    let unknown0 = f.metrics().verdicts("egress", "drop", "spoofed-source");
    dns::scapy_send(&f.tb, &pod("default", "other"), serde_json::json!([{"kind": "valid", "id": pq.id, "qname": "s2.crafted.test",
        "ips": ["10.78.24.2"], "src": dns2.to_string(), "dst": client_ip.to_string(), "dport": pq.port}])).unwrap();
    f.wait_until("the forged answer dropped as spoofed-source", || f.metrics().verdicts("egress", "drop", "spoofed-source") > unknown0);
    assert!(f.denied("client", ext_v4(24, 2)));
    // Unsolicited: from the trusted resolver to a port the client never used.
    let before = f.stat("untracked");
    dns::scapy_send(&f.tb, &from_dns2, serde_json::json!([{"kind": "valid", "id": 1, "qname": "s3.crafted.test",
        "ips": ["10.78.24.3"], "src": dns2.to_string(), "dst": client_ip.to_string(), "dport": 40999}])).unwrap();
    f.wait_until("the unsolicited answer counted as untracked", || f.stat("untracked") > before);
    assert!(f.denied("client", ext_v4(24, 3)));

    // Nothing crashed or stalled: the agent is healthy and real DNS still teaches.
    assert!(f.agent.is_running());
    assert_eq!(f.metrics().val("zt_agent_ready", &[]), 1.0);
    assert_eq!(f.resolve("client", "api.example.test", RecordType::A).addrs(), vec![ext_v4(1, 1)]);
    assert!(f.connects("client", ext_v4(1, 1)));
    // A valid crafted answer (same path) does teach: the crafted ones failed for their content.
    craft(&from_dns2, dns2, "valid", "ok.crafted.test", &[ext_v4(25, 1)], serde_json::json!({}));
    f.wait_until("a valid crafted answer learned", || f.connects("client", ext_v4(25, 1)));
    println!("{}", f.ztctl(&["fqdn", "--stats"]));
}

/// With the agent stopped, DNS and allowed names keep working (the kernel learns alone);
/// ztctl lists the address without a name; a restarted agent applies nothing and names
/// the address after the next resolution.
#[test]
fn agent_stopped_dns_and_names_keep_working() {
    let mut f = fqdn_bed(&[]);
    f.start_responder(Arc::new(|q| {
        let name = dns::qname(q)?;
        (name == "down.race.test").then(|| dns::answer(q, &[ext_v4(6, 1)], 30))
    }));
    assert_eq!(f.resolve("client", "api.example.test", RecordType::A).addrs(), vec![ext_v4(1, 1)]);
    assert!(f.connects("client", ext_v4(1, 1)));
    f.wait_until("the cache file written", || f.agent.state_dir.join("fqdn-cache.json").exists());

    let st = f.agent.stop().expect("agent was running");
    assert!(st.success(), "agent exit on SIGTERM: {st}");
    assert!(f.connects("client", ext_v4(1, 1)), "a learned name, agent down");
    let a = dns::resolve_in(&f.ns("client"), f.dns2(), "down.race.test", RecordType::A, Duration::from_secs(2)).unwrap();
    assert_eq!(a.addrs(), vec![ext_v4(6, 1)]);
    assert!(f.connects("client", ext_v4(6, 1)), "a name resolved while the agent is down");
    assert!(f.denied("client", ext_v4(6, 2)), "still fail closed for the rest");
    let rows = f.learned();
    let row = rows.iter().find(|r| r["ip"] == "10.78.6.1").unwrap_or_else(|| panic!("ztctl fqdn lists 10.78.6.1: {rows:#?}"));
    assert!(row["names"].as_array().unwrap().is_empty(), "no name while the agent is down: {row}");
    let api = rows.iter().find(|r| r["ip"] == "10.78.1.1").unwrap();
    assert_eq!(api["names"][0], "api.example.test", "names from before the stop are kept");
    println!("{}", f.ztctl(&["fqdn"]));

    f.agent.start().unwrap();
    f.agent.wait_ready(Duration::from_secs(20)).unwrap();
    let log = f.log_of_start(2);
    println!("restart log:\n{}", tail(&log, 15));
    assert!(
        !log.lines().any(|l| l.contains("applied ") && !l.contains("applied 0 writes, 0 removals")),
        "the first diff after a restart is empty: {log}"
    );
    assert!(f.connects("client", ext_v4(6, 1)), "after the restart");
    dns::resolve_in(&f.ns("client"), f.dns2(), "down.race.test", RecordType::A, Duration::from_secs(2)).unwrap();
    f.wait_until("the name known after the next resolution", || {
        f.learned().iter().any(|r| r["ip"] == "10.78.6.1" && r["names"][0] == "down.race.test")
    });
}

/// Bad FQDN rules are rejected whole with the field path; the last good state (and what
/// it learned) stays.
#[test]
fn bad_fqdn_rules_are_rejected() {
    let f = fqdn_bed(&[]);
    f.resolve("client", "api.example.test", RecordType::A);
    assert!(f.connects("client", ext_v4(1, 1)));
    let cases = [
        ("a*.x.test", "matchPattern", POLICY.replace("*.race.test", "a*.race.test")),
        ("ingress fqdn", "fqdn", POLICY.replace("  egress:\n  - to: [{entity: dns}]", "  ingress:\n  - from: [{fqdn: {matchName: a.example.test}}]\n  egress:\n  - to: [{entity: dns}]")),
        ("deny fqdn", "deny", POLICY.replace("  - to:\n    - fqdn: {matchName: api.example.test}", "  - action: deny\n    to:\n    - fqdn: {matchName: api.example.test}")),
    ];
    for (what, needle, text) in cases {
        let errs0 = f.metrics().val("zt_policy_errors_total", &[]);
        f.write("10-fqdn.yaml", &text);
        f.wait_until(&format!("{what} rejected"), || f.metrics().val("zt_policy_errors_total", &[]) > errs0);
        let last = std::fs::read_to_string(f.agent.state_dir.join("last-error")).unwrap_or_default();
        assert!(last.contains(needle) && last.contains("spec."), "{what}: the error names the field: {last}");
        assert!(f.connects("client", ext_v4(1, 1)), "{what}: the last good state stays");
    }
    // 33 FQDN rules (33 names of one identity) exceed the 32 slots.
    let mut many = String::from("apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: many-fqdn, namespace: default}\nspec:\n  subjects: [{podSelector: {matchLabels: {app: other}}}]\n  egress:\n");
    for i in 0..33 {
        many.push_str(&format!("  - to: [{{fqdn: {{matchName: n{i}.example.test}}}}]\n    ports: [{{protocol: TCP, port: 8443}}]\n"));
    }
    f.write("10-fqdn.yaml", POLICY);
    let errs0 = f.metrics().val("zt_policy_errors_total", &[]);
    f.write("40-many.yaml", &many);
    f.wait_until("33 FQDN rules rejected", || f.metrics().val("zt_policy_errors_total", &[]) > errs0);
    let last = std::fs::read_to_string(f.agent.state_dir.join("last-error")).unwrap_or_default();
    assert!(last.contains("32"), "the error says the limit: {last}");
    assert!(f.connects("client", ext_v4(1, 1)));
}

/// The agent's GC removes learned entries past expiry + grace + the TCP conntrack timeout
/// (all 1 s here) within its 10 s period, and the name leaves ztctl with them.
#[test]
fn gc_removes_expired_entries() {
    let mut f = fqdn_bed(&["--fqdn-min-ttl", "1", "--fqdn-grace", "1", "--ct-tcp-timeout", "1"]);
    f.start_responder(Arc::new(|q| {
        let name = dns::qname(q)?;
        (name == "gc.race.test").then(|| dns::answer(q, &[ext_v4(7, 1)], 1))
    }));
    dns::resolve_in(&f.ns("client"), f.dns2(), "gc.race.test", RecordType::A, Duration::from_secs(2)).unwrap();
    assert!(f.connects("client", ext_v4(7, 1)));
    assert!(f.learned().iter().any(|r| r["ip"] == "10.78.7.1"), "listed while learned");
    let start = std::time::Instant::now();
    while f.learned().iter().any(|r| r["ip"] == "10.78.7.1") {
        assert!(start.elapsed() < Duration::from_secs(20), "GC did not remove 10.78.7.1 within 20 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("removed by GC after {:?}", start.elapsed());
    assert!(f.metrics().val("zt_fqdn_gc_removed_total", &[]) >= 1.0);
    assert!(f.denied("client", ext_v4(7, 1)));
}

/// The kube-dns Service of the lab: ClusterIP 10.96.0.10 -> the dnsmasq pod `dns`.
const KUBE_DNS: &str = "apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  selector: {app: dns}
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-v4
  namespace: kube-system
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]
endpoints:
- addresses: [10.210.0.53]
  conditions: {ready: true}
  nodeName: node1
";

/// A pod resolves through the kube-dns ClusterIP from inside its cgroup (translated to
/// the dnsmasq pod) and connects to the answer, as an application does. No
/// `--fqdn-dns-address`, and `--fqdn-dns-server` names no pod of the lab: the resolver is
/// `entity: dns` and trusted only because it is the kube-dns Service's backend
/// (`--fqdn-dns-service`, default). With `--fqdn-dns-service none` the client's
/// `entity: dns` rule does not reach it: the query itself is denied.
#[test]
fn dns_through_the_kube_dns_cluster_ip_with_no_flag() {
    let script = "import socket, struct, sys\n\
        q = struct.pack('>HHHHHH', 0x2a2a, 0x0100, 1, 0, 0, 0) + b''.join(bytes([len(l)]) + l.encode() for l in 'api.example.test'.split('.')) + b'\\x00' + struct.pack('>HH', 1, 1)\n\
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
        s.settimeout(2)\n\
        s.connect(('10.96.0.10', 53))\n\
        s.send(q)\n\
        r = s.recv(512)\n\
        an = struct.unpack('>H', r[6:8])[0]\n\
        i = len(q)\n\
        for _ in range(an):\n    i += 2 if r[i] & 0xc0 == 0xc0 else r.index(0, i) + 1 - i\n    t, _, _, n = struct.unpack('>HHIH', r[i:i+10])\n    i += 10\n    if t == 1:\n        print(socket.inet_ntoa(r[i:i+4]), s.getpeername()[0]); sys.exit(0)\n    i += n\n\
        print('none', '-')\n";
    let only_elsewhere = ["--fqdn-dns-server", "spiffe://cluster.local/ns/kube-system/sa/nobody"];
    for (extra, learns) in [(&["--fqdn-dns-service", "none"][..], false), (&[][..], true)] {
        let args: Vec<&str> = only_elsewhere.iter().chain(extra.iter()).copied().collect();
        let bed = bed("fqdn", &[("10-fqdn.yaml", POLICY), ("05-kube-dns.yaml", KUBE_DNS)], &args);
        let _ext = ExternalHost::add(&bed.tb, "node1", serve_bin()).unwrap();
        let _dnsmasq = Dnsmasq::start(&bed.tb, &pod("kube-system", "dns"), &zone()).unwrap();
        bed.wait_until("the agent to hold kube-dns", || bed.metrics().val("zt_service_frontends", &[]) == 2.0);
        let client = pod("default", "client");
        let out = bed.exec_in(&client, &["/usr/bin/python3", "-c", script]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !learns {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains("timed out"), "the query must be denied with {extra:?}: {text} {err}");
            assert!(bed.metrics().verdicts("egress", "drop", "policy-default-deny") >= 1.0);
            println!("kube-dns ClusterIP ({extra:?}): query denied");
            continue;
        }
        assert!(out.status.success(), "resolving through 10.96.0.10: {text} {}", String::from_utf8_lossy(&out.stderr));
        let (answer, peer) = text.split_once(' ').unwrap();
        assert_eq!((answer, peer), (ext_v4(1, 1).to_string().as_str(), "10.96.0.10"), "the answer, from the ClusterIP as the application sees it");
        let c = bed.connect_in(&client, answer, EXT_TCP, Duration::from_secs(2)).unwrap();
        let connected = c.outcome != "timeout" && !c.outcome.starts_with('E');
        println!("kube-dns ClusterIP ({extra:?}): resolved {answer}, connect: {}", c.outcome);
        assert!(connected, "connect to the answer: {}", c.outcome);
        assert!(bed.metrics().get("zt_fqdn_answers_total", &[("outcome", "learned")]).unwrap_or(0.0) >= 1.0, "the answer was learned");
    }
}

/// A connection allowed by an FQDN rule lasts as long as the rule exists: with TTL 1,
/// grace 1 and a 3 s TCP conntrack timeout, an echo flow kept busy for 16 s (past
/// expiry + grace + ct timeout and a GC period) keeps its learned entry, survives an
/// unrelated epoch bump, and once closed the entry goes with its conntrack entry.
#[test]
fn a_live_fqdn_flow_outlives_gc_and_epoch_bumps() {
    let mut f = fqdn_bed(&["--fqdn-min-ttl", "1", "--fqdn-grace", "1", "--ct-tcp-timeout", "3"]);
    f.start_responder(Arc::new(|q| {
        let name = dns::qname(q)?;
        (name == "long.race.test").then(|| dns::answer(q, &[ext_v4(8, 1)], 1))
    }));
    let ip = ext_v4(8, 1);
    dns::resolve_in(&f.ns("client"), f.dns2(), "long.race.test", RecordType::A, Duration::from_secs(2)).unwrap();
    let mut flow = f.open_echo("client", ip);
    for i in 0..16 {
        assert!(flow.roundtrip(ALLOWED), "round trip {i}");
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(f.learned().iter().any(|r| r["ip"] == "10.78.8.1"), "the entry stays while the flow lives: {:?}", f.learned());
    assert!(f.metrics().val("zt_fqdn_learned_kept_for_flows", &[]) >= 1.0, "the GC kept it for the flow");
    assert!(f.denied("client", ip), "a new flow after TTL + grace is still denied");

    bump_epoch(&f);
    assert!(flow.roundtrip(ALLOWED), "re-judged after the bump, the live flow stays allowed");

    drop(flow);
    let start = std::time::Instant::now();
    while f.learned().iter().any(|r| r["ip"] == "10.78.8.1") {
        assert!(start.elapsed() < Duration::from_secs(40), "the entry outlived its closed flow by 40 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("entry removed {:?} after the flow closed", start.elapsed());
}

/// NodeLocal DNSCache: a host-network resolver on 169.254.20.10 in the node (a cgroup
/// under the pods' root, as its pod has) that forwards to the kube-dns ClusterIP. With
/// `--fqdn-dns-address 169.254.20.10` it is `entity: dns` and trusted: the client
/// resolves through it, the answer is learned, the connect is allowed, and the cache's
/// own upstream query is translated at its socket to the CoreDNS pod. Without the flag
/// the address is the node's (`host`), which the client's `entity: dns` rule does not
/// reach: the query is denied.
#[test]
fn dns_through_node_local_dns_cache() {
    let listen: IpAddr = dns::NODE_LOCAL_DNS.parse().unwrap();
    for (extra, works) in [(&[][..], false), (&["--fqdn-dns-address", dns::NODE_LOCAL_DNS][..], true)] {
        let bed = bed("fqdn", &[("10-fqdn.yaml", POLICY), ("05-kube-dns.yaml", KUBE_DNS)], extra);
        let _ext = ExternalHost::add(&bed.tb, "node1", serve_bin()).unwrap();
        let _coredns = Dnsmasq::start(&bed.tb, &pod("kube-system", "dns"), &zone()).unwrap();
        bed.wait_until("the agent to hold kube-dns", || bed.metrics().val("zt_service_frontends", &[]) == 2.0);
        let _cache = Dnsmasq::start_node_local(&bed.tb, "node1", "10.96.0.10".parse().unwrap()).unwrap();
        let client = bed.tb.pod("default", "client").unwrap().netns_path();
        let r = dns::resolve_in(&client, listen, "api.example.test", RecordType::A, Duration::from_secs(2));
        if !works {
            assert!(r.is_err(), "without the flag 169.254.20.10 is the node's: the query must be denied, got {r:?}");
            assert!(bed.metrics().verdicts("egress", "drop", "policy-default-deny") >= 1.0);
            println!("node-local-dns without --fqdn-dns-address: query denied");
            continue;
        }
        let a = r.unwrap_or_else(|e| {
            let log = std::fs::read_to_string(bed.tb.tmp_dir().join("dnsmasq-node-local-node1/dnsmasq.stderr")).unwrap_or_default();
            let ex = bed.ztctl_raw(&["explain", "default/client", "169.254.20.10", "udp/53"]); let ex = format!("{}{}", String::from_utf8_lossy(&ex.stdout), String::from_utf8_lossy(&ex.stderr));
            let drops: Vec<String> = bed.metrics().0.lines().filter(|l| l.starts_with("zt_verdicts_total") && l.contains("drop")).map(String::from).collect();
            panic!("resolving through {listen}: {e:#}\nexplain: {ex}\nnode-local-dns log:\n{}\ndrops: {drops:#?}\nagent:\n{}", tail(&log, 15), tail(&bed.agent.log(), 15))
        });
        assert_eq!(a.addrs(), vec![ext_v4(1, 1)]);
        assert!(connect_in(&client, ext_v4(1, 1), EXT_TCP, ALLOWED), "connect to the answer learned through node-local-dns");
        let m = bed.metrics();
        assert!(m.get("zt_fqdn_answers_total", &[("outcome", "learned")]).unwrap_or(0.0) >= 1.0, "the answer was learned");
        let translated = m.get("zt_service_translations_total", &[("outcome", "translated")]).unwrap_or(0.0);
        assert!(translated >= 1.0, "node-local-dns's upstream query to the kube-dns ClusterIP was translated at its socket");
        println!("node-local-dns: resolved and connected; {translated} translations");
    }
}

/// A record under an allowed wildcard pointed at a ClusterIP (`svc.race.test` →
/// 10.96.0.44, the frontend of a Service whose backend is default/other, which the
/// client's policy does not allow): the client's `*.race.test` rule never allows it.
/// The connects run in the client's netns but outside its cgroup, so the socket
/// programs do not translate them (the path of raw sockets, SCTP, translation off): the
/// frontend is judged against the Service first (`service-backends-denied`), and a
/// learned frontend is never an FQDN allow (kernel_dns covers that step alone). A world
/// address under the same wildcard connects (control). Both agent modes.
#[test]
fn a_name_pointed_at_a_cluster_ip_stays_denied() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata: {name: other-web, namespace: default}\nspec:\n  clusterIP: 10.96.0.44\n  selector: {app: other}\n  \
        ports: [{name: p, protocol: TCP, port: 8443, targetPort: 80}]\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: other-web-1, namespace: default, labels: {kubernetes.io/service-name: other-web}}\n\
        addressType: IPv4\nports: [{name: p, protocol: TCP, port: 80}]\nendpoints:\n- {addresses: [10.210.0.11], conditions: {ready: true}, nodeName: node1}\n";
    for translation in [true, false] {
        let flag = format!("--service-translation={translation}");
        let mut f = fqdn_bed(&[flag.as_str()]);
        f.write("06-other-web.yaml", svc);
        f.wait_until("the agent to hold the Service", || f.metrics().val("zt_service_frontends", &[]) >= 1.0);
        f.start_responder(Arc::new(|q| {
            let name = dns::qname(q)?;
            match name.as_str() {
                "svc.race.test" => Some(dns::answer(q, &[IpAddr::from([10, 96, 0, 44])], 60)),
                "ok.race.test" => Some(dns::answer(q, &[ext_v4(9, 1)], 60)),
                _ => None,
            }
        }));
        for name in ["svc.race.test", "ok.race.test"] {
            dns::resolve_in(&f.ns("client"), f.dns2(), name, RecordType::A, Duration::from_secs(2)).unwrap();
        }
        assert!(f.connects("client", ext_v4(9, 1)), "control: a world address under the wildcard");
        let cip = IpAddr::from([10, 96, 0, 44]);
        assert!(f.denied("client", cip), "translation {translation}: the ClusterIP learned by name must stay denied");
        let m = f.metrics();
        let as_service = m.verdicts("egress", "drop", "service-backends-denied");
        let frontend_denied = m.get("zt_service_translations_total", &[("outcome", "fqdn-frontend-denied")]).unwrap_or(0.0);
        assert!(as_service + frontend_denied >= 1.0, "counted as service-backends-denied or fqdn-frontend-denied");
        println!("translation {translation}: denied (service-backends-denied {as_service}, fqdn-frontend-denied {frontend_denied})");
    }
}
