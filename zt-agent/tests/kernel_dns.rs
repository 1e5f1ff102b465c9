//! Kernel tests of the DNS capture (zt-ebpf dns.rs) and the FQDN decision (fqdn.rs):
//! the real programs run through BPF_PROG_TEST_RUN. The pod sends a query (zt_from_pod
//! creates the conntrack entry, as in life), then the answer, built byte by byte,
//! crosses zt_to_pod; each test checks the `ZT_DNS_STATS` counter of its branch, the
//! learned entries, and that the answer itself still passes. Every answer is first
//! delivered to a control pod without `EP_FQDN` (same names configured) and must change
//! nothing there: that shows the gate, and that the assertions can fail.
//! Needs root (bpffs mount, BPF syscalls).
mod common;
#[path = "common/dns_packets.rs"]
mod dns_packets;

use aya::maps::{lpm_trie::Key, lpm_trie::LpmTrie, Array, HashMap, MapData, PerCpuArray, RingBuf};
use common::*;
use dns_packets::*;
use zt_agent::pins::open_map;
use zt_common::*;

const POD: &str = "10.0.0.10";
const POD6: &str = "fd00::10";
const PLAIN: &str = "10.0.0.11";
const PLAIN6: &str = "fd00::11";
const DNS: &str = "10.0.0.53";
const DNS6: &str = "fd00::53";
const EVIL: &str = "10.0.0.66";
const OTHER_POD: &str = "10.0.0.20";
const ID_POD: u32 = 300;
const ID_PLAIN: u32 = 302;
const ID_OTHER_POD: u32 = 303;
const ID_DNS: u32 = 400;
const ID_EVIL: u32 = 401;
const CPORT: u16 = 40000;
const KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0f1e_2d3c_4b5a_6978];
const SLOT_EXACT: u32 = 1 << 0; // api.example.com
const SLOT_WILD: u32 = 1 << 1; // *.example.com
const SLOT_DB: u32 = 1 << 2; // db.internal.test, exact only
const RULE_DB: u32 = 9;
/// api.example.com matches both rules.
const SLOTS_API: u32 = SLOT_EXACT | SLOT_WILD;
const RULE_EXACT: u32 = 7;
const RULE_WILD: u32 = 8;
const MIN_TTL: u32 = 30;
const MAX_TTL: u32 = 86400;
const GRACE: u32 = 60;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
const IP1: &str = "93.184.216.34";
const IP2: &str = "93.184.216.35";
const IP3: &str = "93.184.216.36";
const IP6: &str = "2606:2800:220:1::1";

struct Fx {
    dp: Dp,
    names: HashMap<MapData, FqdnNameKey, FqdnNameValue>,
    ports: LpmTrie<MapData, PolicyKey, FqdnPortsValue>,
    learned: HashMap<MapData, FqdnLearnedKey, FqdnLearnedValue>,
    servers: HashMap<MapData, u32, u32>,
    stats: PerCpuArray<MapData, u64>,
    fcfg: Array<MapData, FqdnConfig>,
    events: RingBuf<MapData>,
}

fn fqdn_config() -> FqdnConfig {
    FqdnConfig { hash_key: KEY, min_ttl_s: MIN_TTL, max_ttl_s: MAX_TTL, grace_s: GRACE, events_per_sec: 1_000_000 }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn addr(ip: &str) -> [u8; 16] {
    zt_agent::net::to_key(ip.parse().unwrap())
}

impl Fx {
    fn new(tag: &str) -> Fx {
        let mut dp = Dp::new(tag);
        let root = dp._fs.root();
        let open = |n: &str| open_map(&root, n).unwrap();
        let mut fx = Fx {
            names: HashMap::try_from(open(MAP_FQDN_NAMES)).unwrap(),
            ports: LpmTrie::try_from(open(MAP_FQDN_PORTS)).unwrap(),
            learned: HashMap::try_from(open(MAP_FQDN_LEARNED)).unwrap(),
            servers: HashMap::try_from(open(MAP_DNS_SERVERS)).unwrap(),
            stats: PerCpuArray::try_from(open(MAP_DNS_STATS)).unwrap(),
            fcfg: Array::try_from(open(MAP_FQDN_CONFIG)).unwrap(),
            events: RingBuf::try_from(open(MAP_DNS_EVENTS)).unwrap(),
            dp: {
                let enforce = EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS;
                dp.endpoint(POD, ID_POD, enforce | EP_FQDN, TEST_IFINDEX);
                dp.endpoint(POD6, ID_POD, enforce | EP_FQDN, TEST_IFINDEX);
                dp.endpoint(PLAIN, ID_PLAIN, enforce, TEST_IFINDEX);
                dp.endpoint(PLAIN6, ID_PLAIN, enforce, TEST_IFINDEX);
                dp.endpoint(DNS, ID_DNS, 0, 0);
                dp.endpoint(DNS6, ID_DNS, 0, 0);
                dp.endpoint(EVIL, ID_EVIL, 0, 0);
                dp.endpoint(OTHER_POD, ID_OTHER_POD, 0, 0);
                for local in [ID_POD, ID_PLAIN] {
                    for proto in [UDP, TCP] {
                        dp.policy(POLICY_PREFIX_FULL, pk(local, ID_DNS, DIR_EGRESS, proto, 53), VERDICT_ALLOW, 1);
                        dp.policy(POLICY_PREFIX_FULL, pk(local, ID_EVIL, DIR_EGRESS, proto, 53), VERDICT_ALLOW, 2);
                    }
                    // The other pod may be reached by policy on another port only.
                    dp.policy(POLICY_PREFIX_FULL, pk(local, ID_OTHER_POD, DIR_EGRESS, TCP, 8080), VERDICT_ALLOW, 3);
                }
                dp
            },
        };
        fx.fcfg.set(0, fqdn_config(), 0).unwrap();
        fx.servers.insert(ID_DNS, 1, 0).unwrap();
        for local in [ID_POD, ID_PLAIN] {
            fx.name(local, NAME_EXACT, "api.example.com", SLOT_EXACT);
            fx.name(local, NAME_SUFFIX, "example.com", SLOT_WILD);
            fx.name(local, NAME_EXACT, "db.internal.test", SLOT_DB);
            let mut v = FqdnPortsValue { slots: SLOT_EXACT | SLOT_WILD | SLOT_DB, ..Default::default() };
            v.rule_ids[0] = RULE_EXACT;
            v.rule_ids[1] = RULE_WILD;
            v.rule_ids[2] = RULE_DB;
            fx.ports.insert(&Key::new(POLICY_PREFIX_FULL, pk(local, 0, DIR_EGRESS, TCP, 443)), v, 0).unwrap();
        }
        fx
    }

    fn name(&mut self, local: u32, kind: u8, name: &str, slots: u32) {
        let (h, _, _) = name_hashes(KEY, name);
        self.names.insert(FqdnNameKey::new(local, kind, h), FqdnNameValue { slots, _pad: 0 }, 0).unwrap();
    }

    fn stat(&self, s: DnsStat) -> u64 {
        self.stats.get(&(s as u32), 0).unwrap().iter().sum()
    }

    fn all_stats(&self) -> Vec<u64> {
        DnsStat::ALL.iter().map(|s| self.stat(*s)).collect()
    }

    /// Counters other than `answers` and the event ones that moved, by name.
    fn outcomes(&self) -> Vec<(&'static str, u64)> {
        DnsStat::ALL
            .iter()
            .filter(|s| !matches!(s, DnsStat::Answers | DnsStat::Queries | DnsStat::EventSent | DnsStat::EventRateLimited | DnsStat::EventRingFull))
            .map(|s| (s.name(), self.stat(*s)))
            .filter(|(_, n)| *n != 0)
            .collect()
    }

    fn learned(&self, local: u32, ip: &str) -> Option<FqdnLearnedValue> {
        self.learned.get(&FqdnLearnedKey { addr: addr(ip), local_id: local }, 0).ok()
    }

    fn learned_len(&self) -> usize {
        self.learned.keys().count()
    }

    /// The pod at `client` queries `server` (creates the conntrack entry).
    fn query(&self, client: &str, server: &str, proto: u8) {
        self.query_q(client, server, proto, &question("api.example.com", T_A));
    }

    /// The query whose question the answer `m` echoes (else `api.example.com`).
    fn query_for(&self, client: &str, server: &str, proto: u8, m: &[u8]) {
        match question_of(m) {
            Some(q) => self.query_q(client, server, proto, q),
            None => self.query(client, server, proto),
        }
    }

    fn query_q(&self, client: &str, server: &str, proto: u8, question: &[u8]) {
        let q = msg(0x0100, 1, 0, 0, question);
        if proto == TCP {
            assert_eq!(self.dp.run(FROM, &ipv_syn(client, server, CPORT, 53)), TC_PASS, "SYN {client} -> {server}");
        }
        let pkt = if proto == UDP { udp(client, server, CPORT, 53, &q) } else { tcp_dns(client, server, CPORT, 53, &q) };
        assert_eq!(self.dp.run(FROM, &pkt), TC_PASS, "query {client} -> {server}");
    }

    /// The control pod gets the same answer first (must change no DNS counter and learn
    /// nothing), then the FQDN pod; returns the FQDN pod's verdict.
    fn deliver(&self, server: &str, proto: u8, m: &[u8], frame: impl Fn(&str, &str) -> Vec<u8>) -> u32 {
        let (pod, plain) = if server.contains(':') { (POD6, PLAIN6) } else { (POD, PLAIN) };
        let before = self.all_stats();
        let learned_before = self.learned_len();
        self.query_for(plain, server, proto, m);
        let v = self.dp.run(TO, &frame(server, plain));
        assert_eq!(v, TC_PASS, "control pod: the answer passes");
        assert_eq!(self.all_stats(), before, "control pod (no EP_FQDN): no DNS counter moves");
        assert_eq!(self.learned_len(), learned_before, "control pod: nothing learned");
        self.query_for(pod, server, proto, m);
        self.dp.run(TO, &frame(server, pod))
    }

    /// A UDP answer from the trusted resolver (v4 or v6 by `server`).
    fn answer_udp(&self, server: &str, m: &[u8]) -> u32 {
        let m = m.to_vec();
        self.deliver(server, UDP, &m.clone(), move |s, c| udp(s, c, 53, CPORT, &m))
    }

    fn answer(&self, m: &[u8]) -> u32 {
        self.answer_udp(DNS, m)
    }

    fn dns_events(&mut self) -> Vec<DnsEvent> {
        let mut v = vec![];
        while let Some(item) = self.events.next() {
            v.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DnsEvent) });
        }
        v
    }
}

fn ipv_syn(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    if src.contains(':') {
        ipv6(src, dst, TCP, sport, dport)
    } else {
        ipv4(src, dst, TCP, sport, dport)
    }
}

/// The answer passed, and exactly these outcome counters moved.
fn expect(fx: &Fx, verdict: u32, outcomes: &[(&str, u64)]) {
    assert_eq!(verdict, TC_PASS, "a DNS answer is never dropped by the capture");
    let mut want: Vec<(&str, u64)> = outcomes.to_vec();
    want.sort();
    let mut got = fx.outcomes();
    got.sort();
    assert_eq!(got, want);
}

fn expiry_s(v: &FqdnLearnedValue) -> f64 {
    (v.expires_ns as f64 - now_ns() as f64) / 1e9
}

// ---------------------------------------------------------------------------
// Learned
// ---------------------------------------------------------------------------

#[test]
fn a_record_is_learned_with_its_ttl_and_an_event_carries_the_answer() {
    let mut fx = Fx::new("dns-a");
    let m = answer("api.example.com", T_A, &[a(300, IP1)]);
    let v = fx.answer(&m);
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
    assert_eq!(fx.stat(DnsStat::Answers), 1);
    let l = fx.learned(ID_POD, IP1).expect("learned");
    assert_eq!(l.slots, SLOTS_API);
    let e = expiry_s(&l);
    assert!(e > 295.0 && e <= 300.0, "expiry in {e} s");
    assert_eq!(fx.learned_len(), 1);
    let ev = fx.dns_events();
    assert_eq!(ev.len(), 1);
    let e = &ev[0];
    assert_eq!((e.local_id, e.slots, e.ips_learned, e.proto), (ID_POD, SLOTS_API, 1, UDP));
    assert_eq!(e.outcome, DnsStat::Learned as u8);
    assert_eq!((e.client, e.server), (addr(POD), addr(DNS)));
    assert_eq!((e.msg_len as usize, e.copy_len as usize), (m.len(), m.len()));
    assert_eq!(&e.data[..m.len()], &m[..]);
    assert_eq!(fx.stat(DnsStat::EventSent), 1);
}

#[test]
fn aaaa_record_over_ipv6_is_learned() {
    let fx = Fx::new("dns-aaaa");
    let v = fx.answer_udp(DNS6, &answer("api.example.com", T_AAAA, &[aaaa(120, IP6)]));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
    assert_eq!(fx.learned(ID_POD, IP6).unwrap().slots, SLOTS_API);
}

#[test]
fn v4_and_v6_records_in_one_answer() {
    let fx = Fx::new("dns-mix");
    let v = fx.answer(&answer("api.example.com", T_A, &[a(60, IP1), aaaa(60, IP6), a(60, IP2)]));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 3)]);
    for ip in [IP1, IP6, IP2] {
        assert!(fx.learned(ID_POD, ip).is_some(), "{ip}");
    }
}

#[test]
fn whole_tcp_answer_is_learned() {
    let fx = Fx::new("dns-tcp");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    let v = fx.deliver(DNS, TCP, &m, |s, c| tcp_dns(s, c, 53, CPORT, &m));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
    assert!(fx.learned(ID_POD, IP1).is_some());
    // A pure ACK of the same flow: nothing to parse, nothing counted.
    let before = fx.all_stats();
    assert_eq!(fx.dp.run(TO, &tcp(DNS, POD, 53, CPORT, &[])), TC_PASS);
    assert_eq!(fx.all_stats(), before);
}

#[test]
fn uppercase_question_matches() {
    let fx = Fx::new("dns-case");
    let v = fx.answer(&answer("API.Example.COM", T_A, &[a(60, IP1)]));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
    assert_eq!(fx.learned(ID_POD, IP1).unwrap().slots, SLOTS_API);
    // An exact-only name, in mixed case; its parent is no pattern.
    fx.answer(&answer("DB.Internal.TEST", T_A, &[a(60, IP2)]));
    assert_eq!(fx.learned(ID_POD, IP2).unwrap().slots, SLOT_DB);
    fx.answer(&answer("x.db.internal.test", T_A, &[a(60, "93.184.216.40")]));
    assert!(fx.learned(ID_POD, "93.184.216.40").is_none());
}

// ---------------------------------------------------------------------------
// CNAME chains and patterns
// ---------------------------------------------------------------------------

#[test]
fn cname_chain_is_learned_under_the_question_name() {
    let fx = Fx::new("dns-cname");
    let target = name("edge.cdn.example.net");
    let records = vec![rr(&PTR_QNAME, T_CNAME, C_IN, 60, &target), rr(&target, T_A, C_IN, 60, &[93, 184, 216, 34])];
    let v = fx.answer(&answer("api.example.com", T_A, &records));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
    assert_eq!(fx.learned(ID_POD, IP1).unwrap().slots, SLOTS_API);
}

#[test]
fn cname_target_matching_does_not_count() {
    let fx = Fx::new("dns-cname-target");
    let target = name("api.example.com");
    let records = vec![rr(&PTR_QNAME, T_CNAME, C_IN, 60, &target), rr(&target, T_A, C_IN, 60, &[93, 184, 216, 34])];
    let v = fx.answer(&answer("www.other.org", T_A, &records));
    expect(&fx, v, &[("no-match", 1)]);
    assert_eq!(fx.learned_len(), 0);
}

#[test]
fn wildcard_matches_one_or_more_labels_at_label_boundaries() {
    let fx = Fx::new("dns-wild");
    for (q, ip) in [("a.example.com", "93.184.216.1"), ("a.b.example.com", "93.184.216.2")] {
        fx.answer(&answer(q, T_A, &[a(60, ip)]));
        assert_eq!(fx.learned(ID_POD, ip).map(|v| v.slots), Some(SLOT_WILD), "{q}");
    }
    // api.example.com matches both rules.
    fx.answer(&answer("api.example.com", T_A, &[a(60, "93.184.216.3")]));
    assert_eq!(fx.learned(ID_POD, "93.184.216.3").unwrap().slots, SLOT_EXACT | SLOT_WILD);
    for q in ["example.com", "xexample.com", "example.com.evil.org", "com"] {
        fx.answer(&answer(q, T_A, &[a(60, "93.184.216.9")]));
    }
    assert!(fx.learned(ID_POD, "93.184.216.9").is_none());
    expect(&fx, TC_PASS, &[("learned", 3), ("ips-learned", 3), ("no-match", 4)]);
}

// ---------------------------------------------------------------------------
// Trust
// ---------------------------------------------------------------------------

#[test]
fn answer_from_untrusted_server_creates_nothing() {
    let fx = Fx::new("dns-untrusted");
    let v = fx.answer_udp(EVIL, &answer("api.example.com", T_A, &[a(60, IP1)]));
    expect(&fx, v, &[("not-trusted", 1)]);
    assert_eq!(fx.stat(DnsStat::Answers), 0);
    assert_eq!(fx.learned_len(), 0);
}

#[test]
fn unsolicited_answer_is_untracked_and_left_to_policy() {
    let fx = Fx::new("dns-untracked");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    // No query: no conntrack entry. The pod is isolated for ingress: normal policy drops.
    assert_eq!(fx.dp.run(TO, &udp(DNS, PLAIN, 53, CPORT, &m)), TC_DROP);
    assert_eq!(fx.outcomes(), vec![]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &m)), TC_DROP);
    assert_eq!(fx.outcomes(), vec![("untracked", 1)]);
    assert_eq!(fx.learned_len(), 0);
}

#[test]
fn source_port_other_than_53_is_not_captured() {
    let mut fx = Fx::new("dns-port");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    let q = msg(0x0100, 1, 0, 0, &question("api.example.com", T_A));
    assert_eq!(fx.dp.run(FROM, &udp(POD, DNS, CPORT, 5353, &q)), TC_DROP); // not allowed
    fx.dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_DNS, DIR_EGRESS, UDP, 5353), VERDICT_ALLOW, 9);
    assert_eq!(fx.dp.run(FROM, &udp(POD, DNS, CPORT, 5353, &q)), TC_PASS);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 5353, CPORT, &m)), TC_PASS);
    assert_eq!(fx.all_stats(), vec![0; DnsStat::ALL.len()]);
    assert_eq!(fx.learned_len(), 0);
}

// ---------------------------------------------------------------------------
// Header
// ---------------------------------------------------------------------------

fn with_flags(flags: u16) -> Vec<u8> {
    let mut m = answer("api.example.com", T_A, &[a(60, IP1)]);
    m[2..4].copy_from_slice(&flags.to_be_bytes());
    m
}

#[test]
fn header_checks_each_count_their_reason() {
    let fx = Fx::new("dns-header");
    let qd0 = msg(RESPONSE, 0, 1, 0, &a(60, IP1));
    let mut qd2 = question("api.example.com", T_A);
    qd2.extend(question("api.example.com", T_A));
    qd2.extend(a(60, IP1));
    let qd2 = msg(RESPONSE, 2, 1, 0, &qd2);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not-response", with_flags(0x0180)),
        ("opcode", with_flags(0x8980)), // OPCODE 1 (IQUERY)
        ("truncated", with_flags(0x8380)),
        ("rcode", with_flags(0x8183)), // NXDOMAIN
        ("qdcount", qd0),
        ("qdcount", qd2),
        ("qtype", answer("api.example.com", T_TXT, &[a(60, IP1)])),
    ];
    let mut want: std::collections::BTreeMap<&str, u64> = Default::default();
    for (stat, m) in cases {
        let v = fx.answer(&m);
        *want.entry(stat).or_default() += 1;
        expect(&fx, v, &want.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
    }
    assert_eq!(fx.learned_len(), 0);
    // A NODATA answer (no records) to a matching name: counted as an answer only.
    let v = fx.answer(&answer("api.example.com", T_A, &[]));
    assert_eq!(v, TC_PASS);
    assert_eq!(fx.stat(DnsStat::Answers), 8);
    assert_eq!(fx.learned_len(), 0);
}

#[test]
fn short_message_is_counted() {
    let fx = Fx::new("dns-short");
    let v = fx.answer(&[0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1]);
    expect(&fx, v, &[("short", 1)]);
    assert_eq!(fx.stat(DnsStat::Answers), 0);
}

// ---------------------------------------------------------------------------
// Question name
// ---------------------------------------------------------------------------

/// A response whose question name is these raw bytes (then QTYPE A, QCLASS IN, and one
/// A record whose owner is the root, so that nothing points into the question).
fn raw_qname(qname: &[u8]) -> Vec<u8> {
    let mut body = qname.to_vec();
    body.extend_from_slice(&T_A.to_be_bytes());
    body.extend_from_slice(&C_IN.to_be_bytes());
    body.extend(rr(&[0], T_A, C_IN, 60, &[93, 184, 216, 34]));
    msg(RESPONSE, 1, 1, 0, &body)
}

#[test]
fn question_name_checks_each_count_their_reason() {
    let fx = Fx::new("dns-qname");
    let label63 = "a".repeat(63);
    let long_name = format!("{label63}.{label63}.{label63}.{label63}"); // 4 x 64 + 1 = 257 bytes
    let labels33 = vec!["x"; 33].join(".");
    let labels32 = format!("{}.example.com", vec!["x"; 30].join("."));
    let mut label64 = vec![64u8];
    label64.extend([b'a'; 64]);
    label64.push(0);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("qname-pointer", raw_qname(&[3, b'a', b'p', b'i', 0xc0, 12])),
        ("qname-pointer", raw_qname(&[0xc0, 12])),
        ("qname-bad", raw_qname(&label64)),
        ("qname-bad", raw_qname(&name(&long_name))),
        ("qname-bad", raw_qname(&[0x80, 1, b'a', 0])),
        ("qname-labels", raw_qname(&name(&labels33))),
        // Runs past the end: the message stops inside the label.
        ("qname-bad", msg(RESPONSE, 1, 0, 0, &[20, b'a', b'b'])),
        // The name is whole but QTYPE/QCLASS are missing.
        ("qname-bad", msg(RESPONSE, 1, 0, 0, &name("api.example.com"))),
    ];
    let mut want: std::collections::BTreeMap<&str, u64> = Default::default();
    for (stat, m) in cases {
        let v = fx.answer(&m);
        *want.entry(stat).or_default() += 1;
        expect(&fx, v, &want.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
    }
    assert_eq!(fx.learned_len(), 0);
    // 32 labels is the limit, and still matches *.example.com.
    fx.answer(&answer(&labels32, T_A, &[a(60, IP1)]));
    assert_eq!(fx.learned(ID_POD, IP1).unwrap().slots, SLOT_WILD);
}

// ---------------------------------------------------------------------------
// Answer records
// ---------------------------------------------------------------------------

#[test]
fn bad_rdlength_on_an_a_record_stops_the_walk() {
    let fx = Fx::new("dns-rdlen");
    let bad = rr(&PTR_QNAME, T_A, C_IN, 60, &[1, 2, 3, 4, 5]);
    let v = fx.answer(&answer("api.example.com", T_A, &[a(60, IP1), bad, a(60, IP2)]));
    expect(&fx, v, &[("answer-bad", 1), ("learned", 1), ("ips-learned", 1)]);
    assert!(fx.learned(ID_POD, IP1).is_some(), "records before the bad one are learned");
    assert!(fx.learned(ID_POD, IP2).is_none(), "records after it are not");
}

#[test]
fn record_running_past_the_end_is_answer_bad() {
    let fx = Fx::new("dns-past");
    let mut m = answer("api.example.com", T_A, &[a(60, IP1)]);
    let n = m.len();
    m[n - 6..n - 4].copy_from_slice(&100u16.to_be_bytes()); // rdlength 100 of 4 present
    let v = fx.answer(&m);
    expect(&fx, v, &[("answer-bad", 1)]);
    // Header claims two records, the message holds one.
    let mut m = answer("api.example.com", T_A, &[a(60, IP1)]);
    m[7] = 2;
    let v = fx.answer(&m);
    expect(&fx, v, &[("answer-bad", 2), ("learned", 1), ("ips-learned", 1)]);
}

#[test]
fn owner_name_pointer_loop_is_skipped_not_followed() {
    let fx = Fx::new("dns-loop");
    let q = question("api.example.com", T_A);
    // The first record's owner points at itself (a loop if followed).
    let self_off = 12 + q.len();
    let looping = rr(&[0xc0 | (self_off >> 8) as u8, self_off as u8], T_A, C_IN, 60, &[93, 184, 216, 34]);
    let mut body = q;
    body.extend(looping);
    body.extend(a(60, IP2));
    let v = fx.answer(&msg(RESPONSE, 1, 2, 0, &body));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 2)]);
}

#[test]
fn more_than_32_addresses_are_capped() {
    let fx = Fx::new("dns-cap");
    let records: Vec<Vec<u8>> = (0..40).map(|i| a(60, &format!("93.184.217.{i}"))).collect();
    let v = fx.answer(&answer("api.example.com", T_A, &records));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 32), ("ips-capped", 1)]);
    assert_eq!(fx.learned_len(), 32);
    assert!(fx.learned(ID_POD, "93.184.217.31").is_some());
    assert!(fx.learned(ID_POD, "93.184.217.32").is_none());
}

#[test]
fn edns0_opt_record_has_no_effect() {
    let fx = Fx::new("dns-edns");
    let mut body = question("api.example.com", T_A);
    body.extend(a(60, IP1));
    body.extend(opt());
    let v = fx.answer(&msg(RESPONSE, 1, 1, 1, &body));
    expect(&fx, v, &[("learned", 1), ("ips-learned", 1)]);
}

// ---------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------

fn txt(len: usize) -> Vec<u8> {
    rr(&PTR_QNAME, T_TXT, C_IN, 60, &vec![b'x'; len])
}

#[test]
fn message_over_the_scratch_learns_only_what_fits() {
    let fx = Fx::new("dns-big");
    // IP1 at the start, IP2 just inside 2048 bytes, the third beyond.
    let m = answer("api.example.com", T_A, &[a(60, IP1), txt(1900), a(60, IP2), txt(600), a(60, "93.184.216.36")]);
    assert!(m.len() > 2500);
    let v = fx.answer(&m);
    expect(&fx, v, &[("partial", 1), ("learned", 1), ("ips-learned", 2)]);
    assert!(fx.learned(ID_POD, IP2).is_some());
    assert!(fx.learned(ID_POD, "93.184.216.36").is_none());
    let ev = fx.answer_events_copy_len();
    assert_eq!(ev, (m.len() as u16, DNS_EVENT_DATA as u16));
}

impl Fx {
    fn answer_events_copy_len(&self) -> (u16, u16) {
        let mut rb = RingBuf::try_from(open_map(&self.dp._fs.root(), MAP_DNS_EVENTS).unwrap()).unwrap();
        let mut last = (0, 0);
        while let Some(item) = rb.next() {
            let e = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DnsEvent) };
            last = (e.msg_len, e.copy_len);
        }
        last
    }
}

#[test]
fn first_fragment_is_partial() {
    let fx = Fx::new("dns-frag");
    let m = answer("api.example.com", T_A, &[a(60, IP1), txt(1500), a(60, IP2)]);
    let v = fx.deliver(DNS, UDP, &m, |s, c| udp4_first_fragment(s, c, 53, CPORT, &m, 1000));
    expect(&fx, v, &[("partial", 1), ("learned", 1), ("ips-learned", 1)]);
    assert!(fx.learned(ID_POD, IP1).is_some());
    assert!(fx.learned(ID_POD, IP2).is_none());
}

#[test]
fn tcp_segment_that_is_not_one_whole_message_is_counted() {
    let fx = Fx::new("dns-tcp-partial");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    // The prefix claims more than the segment holds.
    let mut p = ((m.len() + 10) as u16).to_be_bytes().to_vec();
    p.extend_from_slice(&m);
    let v = fx.deliver(DNS, TCP, &m, |s, c| tcp(s, c, 53, CPORT, &p));
    expect(&fx, v, &[("tcp-partial", 1)]);
    // Two messages in one segment.
    let mut two = (m.len() as u16).to_be_bytes().to_vec();
    two.extend_from_slice(&m);
    two.extend(two.clone());
    let v = fx.deliver(DNS, TCP, &m, |s, c| tcp(s, c, 53, CPORT, &two));
    expect(&fx, v, &[("tcp-partial", 2)]);
    assert_eq!(fx.learned_len(), 0);
}

// ---------------------------------------------------------------------------
// TTL
// ---------------------------------------------------------------------------

#[test]
fn ttl_is_clamped_and_relearning_keeps_the_later_expiry() {
    let fx = Fx::new("dns-ttl");
    let cases = [(0u32, "93.184.216.1"), (0x8000_0001, "93.184.216.2"), (10_000_000, "93.184.216.3")];
    for (ttl, ip) in cases {
        fx.answer(&answer("api.example.com", T_A, &[a(ttl, ip)]));
    }
    let e0 = expiry_s(&fx.learned(ID_POD, "93.184.216.1").unwrap());
    let e1 = expiry_s(&fx.learned(ID_POD, "93.184.216.2").unwrap());
    let e2 = expiry_s(&fx.learned(ID_POD, "93.184.216.3").unwrap());
    assert!(e0 > MIN_TTL as f64 - 5.0 && e0 <= MIN_TTL as f64, "ttl 0 -> min ttl, got {e0}");
    assert!(e1 > MIN_TTL as f64 - 5.0 && e1 <= MIN_TTL as f64, "ttl with the top bit -> 0 -> min, got {e1}");
    assert!(e2 > MAX_TTL as f64 - 5.0 && e2 <= MAX_TTL as f64, "clamped to max, got {e2}");
    // Re-learning the same address under another name with a shorter TTL.
    fx.answer(&answer("api.example.com", T_A, &[a(1000, IP1)]));
    fx.answer(&answer("www.example.com", T_A, &[a(100, IP1)]));
    let l = fx.learned(ID_POD, IP1).unwrap();
    assert_eq!(l.slots, SLOT_EXACT | SLOT_WILD);
    let e = expiry_s(&l);
    assert!(e > 995.0 && e <= 1000.0, "the later expiry stays, got {e}");
}

// ---------------------------------------------------------------------------
// Decision
// ---------------------------------------------------------------------------

#[test]
fn learned_address_allows_the_first_packet_by_its_rule() {
    let fx = Fx::new("dns-decide");
    // Before the answer: default deny.
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 41000, 443)), TC_DROP);
    fx.answer(&answer("api.example.com", T_A, &[a(300, IP1)]));
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 41001, 443)), TC_PASS);
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::AllowFqdn), 1);
    let ct: Vec<CtValue> = fx.dp.maps.ct.iter().filter_map(|r| r.ok()).map(|(_, v)| v).filter(|v| v.reason == Reason::AllowFqdn as u8).collect();
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].rule_id, RULE_EXACT);
    // Wrong port: not allowed by the rule.
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 41002, 80)), TC_DROP);
    // Another pod's identity learned nothing.
    assert_eq!(fx.dp.run(FROM, &ipv4(PLAIN, IP1, TCP, 41003, 443)), TC_DROP);
    // A wildcard-only match uses the wildcard rule's id.
    fx.answer(&answer("www.example.com", T_A, &[a(300, IP2)]));
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP2, TCP, 41004, 443)), TC_PASS);
    let rules: Vec<u32> =
        fx.dp.maps.ct.iter().filter_map(|r| r.ok()).map(|(_, v)| v).filter(|v| v.reason == Reason::AllowFqdn as u8).map(|v| v.rule_id).collect();
    assert!(rules.contains(&RULE_WILD), "{rules:?}");
    fx.answer(&answer("db.internal.test", T_A, &[a(300, "93.184.216.50")]));
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, "93.184.216.50", TCP, 41005, 443)), TC_PASS);
    let rules: Vec<u32> =
        fx.dp.maps.ct.iter().filter_map(|r| r.ok()).map(|(_, v)| v).filter(|v| v.reason == Reason::AllowFqdn as u8).map(|v| v.rule_id).collect();
    assert!(rules.contains(&RULE_DB), "the slot's own rule id (bit 2): {rules:?}");
}

#[test]
fn expired_entry_denies_new_flows_after_grace_but_keeps_tracked_ones() {
    let mut fx = Fx::new("dns-expiry");
    fx.answer(&answer("api.example.com", T_A, &[a(300, IP1)]));
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 42000, 443)), TC_PASS);
    // Expired, but within the grace period: still allowed.
    let k = FqdnLearnedKey { addr: addr(IP1), local_id: ID_POD };
    let mut v = fx.learned(ID_POD, IP1).unwrap();
    v.expires_ns = now_ns() - (GRACE as u64 / 2) * 1_000_000_000;
    fx.learned.insert(k, v, 0).unwrap();
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 42001, 443)), TC_PASS);
    // Past expiry + grace: a new flow is denied...
    v.expires_ns = now_ns() - (GRACE as u64 + 5) * 1_000_000_000;
    fx.learned.insert(k, v, 0).unwrap();
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 42002, 443)), TC_DROP);
    // ...but a tracked flow re-judged after a policy change keeps going.
    fx.dp.set_config(Config { policy_epoch: 2, ..config() });
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 42000, 443)), TC_PASS);
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::DropRevoked), 0);
    // Once the entry is gone (GC), the next re-judge revokes it.
    fx.learned.remove(&k).unwrap();
    fx.dp.set_config(Config { policy_epoch: 3, ..config() });
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 42000, 443)), TC_DROP);
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::DropRevoked), 1);
}

#[test]
fn deny_wins_and_pod_peers_never_match() {
    let mut fx = Fx::new("dns-deny");
    // IP1 is inside an ipBlock with a deny; IP2 inside an ipBlock without rules.
    let cidr_deny = IDENTITY_CIDR_FLAG | 1;
    let cidr_plain = IDENTITY_CIDR_FLAG | 2;
    fx.dp.cidr(IP1, 32, cidr_deny);
    fx.dp.cidr(IP2, 32, cidr_plain);
    fx.dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, cidr_deny, DIR_EGRESS, TCP, 443), VERDICT_DENY, 20);
    fx.answer(&answer("api.example.com", T_A, &[a(300, IP1), a(300, IP2), a(300, OTHER_POD)]));
    assert_eq!(fx.learned_len(), 3);
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP1, TCP, 43000, 443)), TC_DROP);
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::DropPolicyDeny), 1);
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP2, TCP, 43001, 443)), TC_PASS, "a CIDR identity is an outside peer");
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, OTHER_POD, TCP, 43002, 443)), TC_DROP, "a pod keeps its pod identity");
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::AllowFqdn), 1);
    let _ = fx.dns_events();
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

#[test]
fn events_are_rate_limited() {
    // The token bucket is per CPU: keep every run on one.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
    let mut fx = Fx::new("dns-events");
    fx.fcfg.set(0, FqdnConfig { events_per_sec: 1, ..fqdn_config() }, 0).unwrap();
    fx.answer(&answer("api.example.com", T_A, &[a(60, IP1)]));
    fx.answer(&answer("api.example.com", T_A, &[a(60, IP2)]));
    assert_eq!(fx.stat(DnsStat::EventSent), 1);
    assert_eq!(fx.stat(DnsStat::EventRateLimited), 1);
    assert_eq!(fx.dns_events().len(), 1);
    // Both were learned all the same.
    assert_eq!(fx.learned_len(), 2);
}

// ---------------------------------------------------------------------------
// Verifier
// ---------------------------------------------------------------------------

#[test]
fn verifier_processed_instructions() {
    let fx = Fx::new("dns-verifier");
    // Every program the agent loads passes the verifier (the loop reads the largest).
    drop(fx.dp.ebpf(&zt_agent::loader::agent_programs()));
    for name in ["zt_from_pod", "zt_to_pod", "zt_cgroup_egress", "zt_cgroup_ingress", "zt_from_uplink", "zt_noop"] {
        let info = fx.dp.ebpf(&[name]).program(name).unwrap().info().unwrap();
        println!("verifier: {name}: processed {} insns", info.verified_instruction_count().unwrap_or(0));
    }
}

// ---------------------------------------------------------------------------
// cgroup programs: capture when they are the judge, never twice
// ---------------------------------------------------------------------------

#[test]
fn cgroup_ingress_captures_for_a_pod_not_hooked_yet_and_tc_hooked_pods_once() {
    const CG_PASS: u32 = 1;
    in_private_netns(|dev, _| {
        let mut fx = Fx::new("dns-cgroup");
        // Known to the agent, interface not hooked yet: the cgroup programs judge it.
        let starting = "10.0.0.12";
        let enforce = EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS | EP_FQDN;
        fx.dp.endpoint(starting, ID_POD, enforce, 0);
        let q = msg(0x0100, 1, 0, 0, &question("api.example.com", T_A));
        assert_eq!(fx.dp.run_cgroup("zt_cgroup_egress", &udp(starting, DNS, CPORT, 53, &q), Some(dev)), CG_PASS);
        let m = answer("api.example.com", T_A, &[a(60, IP1)]);
        assert_eq!(fx.dp.run_cgroup("zt_cgroup_ingress", &udp(DNS, starting, 53, CPORT, &m), Some(dev)), CG_PASS);
        expect(&fx, TC_PASS, &[("learned", 1), ("ips-learned", 1)]);
        assert!(fx.learned(ID_POD, IP1).is_some());
        let ev = fx.dns_events();
        assert_eq!((ev.len(), ev[0].ifindex), (1, CGROUP_HOOK_IFINDEX));
        // A hooked pod's answer is captured at its TC hook; the cgroup program leaves it.
        fx.answer(&answer("api.example.com", T_A, &[a(60, IP2)]));
        assert_eq!(fx.stat(DnsStat::Answers), 2);
        assert_eq!(fx.dp.run_cgroup("zt_cgroup_ingress", &udp(DNS, POD, 53, CPORT, &m), Some(dev)), CG_PASS);
        assert_eq!(fx.stat(DnsStat::Answers), 2);
    });
}

#[test]
fn full_event_ring_is_counted_and_learning_goes_on() {
    let fx = Fx::new("dns-ring");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    fx.query(POD, DNS, UDP);
    // Nobody reads the 1 MiB ring: about 950 events fit.
    let (v, _) = fx.dp.run_n(TO, &udp(DNS, POD, 53, CPORT, &m), 1500);
    assert_eq!(v, TC_PASS);
    let sent = fx.stat(DnsStat::EventSent);
    let full = fx.stat(DnsStat::EventRingFull);
    assert!(sent > 0 && full > 0 && sent + full == 1500, "sent {sent}, ring full {full}");
    // Only the first copy answered the query; the others are reported, not learned.
    assert_eq!((fx.stat(DnsStat::Learned), fx.stat(DnsStat::NoQuery)), (1, 1499));
    // The ring is still full: a new query's answer is learned all the same.
    fx.query(POD, DNS, UDP);
    let m2 = answer("api.example.com", T_A, &[a(60, IP2)]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &m2)), TC_PASS);
    assert_eq!(fx.stat(DnsStat::EventRingFull), full + 1);
    assert!(fx.learned(ID_POD, IP2).is_some());
}

#[test]
fn visibility_only_endpoint_gets_events_and_learns_nothing() {
    let mut fx = Fx::new("dns-visibility");
    let enforce = EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS;
    fx.dp.endpoint(PLAIN, ID_PLAIN, enforce | EP_DNS_VISIBILITY, TEST_IFINDEX);
    fx.query(PLAIN, DNS, UDP);
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, PLAIN, 53, CPORT, &m)), TC_PASS);
    expect(&fx, TC_PASS, &[("no-match", 1)]);
    assert_eq!(fx.learned_len(), 0);
    let ev = fx.dns_events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].local_id, ev[0].slots, ev[0].outcome), (ID_PLAIN, 0, DnsStat::NoMatch as u8));
    assert_eq!(&ev[0].data[..m.len()], &m[..]);
}

// ---------------------------------------------------------------------------
// Answers are bound to the pod's own queries (issue 8)
// ---------------------------------------------------------------------------

/// `m` with another transaction ID.
fn with_txid(m: &[u8], txid: u16) -> Vec<u8> {
    let mut m = m.to_vec();
    m[..2].copy_from_slice(&txid.to_be_bytes());
    m
}

#[test]
fn an_answer_teaches_only_if_it_matches_a_query_of_the_pod() {
    let mut fx = Fx::new("dns-bound");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    // A flow to the resolver exists (an earlier query was answered), then a forged
    // answer arrives when no query is outstanding: reported, not learned.
    fx.query(POD, DNS, UDP);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &answer("api.example.com", T_A, &[a(60, IP2)]))), TC_PASS);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &m)), TC_PASS);
    assert_eq!((fx.stat(DnsStat::Learned), fx.stat(DnsStat::NoQuery)), (1, 1));
    assert!(fx.learned(ID_POD, IP1).is_none(), "the unsolicited answer taught nothing");
    // Another transaction ID, another client port: no match either.
    fx.query(POD, DNS, UDP);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &with_txid(&m, 0x4321))), TC_PASS);
    // (another port has no flow at all: the pod's ingress policy drops it, untracked)
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT + 1, &m)), TC_DROP);
    assert_eq!((fx.stat(DnsStat::NoQuery), fx.stat(DnsStat::Untracked)), (2, 1));
    assert!(fx.learned(ID_POD, IP1).is_none());
    // The matching answer teaches; a second copy of it does not.
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &m)), TC_PASS);
    assert!(fx.learned(ID_POD, IP1).is_some());
    let learned = fx.stat(DnsStat::Learned);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &with_txid(&answer("api.example.com", T_A, &[a(60, IP3)]), 0x1234))), TC_PASS);
    assert_eq!((fx.stat(DnsStat::Learned), fx.stat(DnsStat::NoQuery)), (learned, 3));
    assert!(fx.learned(ID_POD, IP3).is_none());
    let ev = fx.dns_events();
    assert_eq!(ev.iter().filter(|e| e.outcome == DnsStat::NoQuery as u8).count(), 3);
}

/// The answer must echo the query's question: a forged answer with the right port and
/// transaction ID for another name teaches nothing and leaves the query's record for
/// the real answer.
#[test]
fn an_answer_for_another_question_teaches_nothing() {
    let fx = Fx::new("dns-question");
    fx.query(POD, DNS, UDP);
    let forged = answer("api.example.com", T_AAAA, &[a(60, IP2)]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &forged)), TC_PASS);
    let forged = answer("x.example.com", T_A, &[a(60, IP2)]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &forged)), TC_PASS);
    assert_eq!((fx.stat(DnsStat::Learned), fx.stat(DnsStat::NoQuery)), (0, 2));
    assert!(fx.learned(ID_POD, IP2).is_none());
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &answer("api.example.com", T_A, &[a(60, IP1)]))), TC_PASS);
    assert!(fx.learned(ID_POD, IP1).is_some(), "the real answer still matches the query");
}

#[test]
fn a_packet_from_the_resolver_before_the_query_does_not_make_the_answer_unlearnable() {
    let fx = Fx::new("dns-first-packet");
    // The pod is not isolated for ingress: a packet from the resolver's address to the
    // pod's port is admitted and tracked before the pod asks anything.
    let mut fx = fx;
    fx.dp.endpoint(POD, ID_POD, EP_LOCAL | EP_ENFORCE_EGRESS | EP_FQDN, TEST_IFINDEX);
    let forged = answer("api.example.com", T_A, &[a(60, IP2)]);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &forged)), TC_PASS);
    assert!(fx.learned(ID_POD, IP2).is_none());
    // The query now rides that entry as a reply; the real answer as established.
    fx.query(POD, DNS, UDP);
    assert_eq!(fx.dp.run(TO, &udp(DNS, POD, 53, CPORT, &answer("api.example.com", T_A, &[a(60, IP1)]))), TC_PASS);
    assert!(fx.learned(ID_POD, IP1).is_some(), "the answer to the pod's query is learned");
    assert!(fx.learned(ID_POD, IP2).is_none());
}

#[test]
fn tcp_answer_must_start_the_response_stream() {
    let fx = Fx::new("dns-tcp-seq");
    let m = answer("api.example.com", T_A, &[a(60, IP1)]);
    // The query segment acknowledges sequence 0 (the builder's): the response stream
    // starts there. A whole message at another sequence number is not the first one.
    fx.query(POD, DNS, TCP);
    let mut off_stream = tcp_dns(DNS, POD, 53, CPORT, &m);
    let tcp_at = off_stream.len() - (20 + 2 + m.len());
    off_stream[tcp_at + 4..tcp_at + 8].copy_from_slice(&1000u32.to_be_bytes());
    assert_eq!(fx.dp.run(TO, &off_stream), TC_PASS);
    assert_eq!(fx.stat(DnsStat::NoQuery), 1);
    assert!(fx.learned(ID_POD, IP1).is_none());
    assert_eq!(fx.dp.run(TO, &tcp_dns(DNS, POD, 53, CPORT, &m)), TC_PASS);
    assert!(fx.learned(ID_POD, IP1).is_some());
}

/// A name that resolves to a Service frontend (a `*.svc` name, or a record under an
/// allowed wildcard pointed at a ClusterIP): reached untranslated, kube-proxy would DNAT
/// it to a pod no rule allowed, so an FQDN rule never allows it.
#[test]
fn a_learned_address_that_is_a_service_frontend_is_never_allowed_by_name() {
    let fx = Fx::new("dns-frontend");
    let cluster_ip = "10.96.0.44";
    fx.answer(&answer("api.example.com", T_A, &[a(300, cluster_ip)]));
    assert!(fx.learned(ID_POD, cluster_ip).is_some());
    let mut fe: aya::maps::HashMap<aya::maps::MapData, SvcFrontendKey, SvcFrontendValue> =
        aya::maps::HashMap::try_from(open_map(&fx.dp._fs.root(), MAP_SVC_FRONTENDS).unwrap()).unwrap();
    let key = SvcFrontendKey { addr: addr(cluster_ip), port: 443, proto: TCP, _pad: 0 };
    fe.insert(key, SvcFrontendValue { svc_id: 1, backends: 1, affinity_s: 0, identity: 0 }, 0).unwrap();
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, cluster_ip, TCP, 42000, 443)), TC_DROP);
    assert_eq!(fx.dp.counter(DIR_EGRESS, Reason::AllowFqdn), 0);
    let stats: aya::maps::PerCpuArray<aya::maps::MapData, u64> = aya::maps::PerCpuArray::try_from(open_map(&fx.dp._fs.root(), MAP_SVC_STATS).unwrap()).unwrap();
    assert_eq!(stats.get(&(SvcStat::FqdnFrontend as u32), 0).unwrap().iter().sum::<u64>(), 1);
    // The same address once it is no frontend: the rule allows it.
    fe.remove(&key).unwrap();
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, cluster_ip, TCP, 42001, 443)), TC_PASS);
    // Inside a --service-cidr (no frontend needed): denied by name again.
    let range = zt_agent::compile::cidr::parse_cidr("10.96.0.0/12").unwrap();
    zt_agent::services::maps::sync_service_cidrs(&fx.dp._fs.root(), &[range]).unwrap();
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, cluster_ip, TCP, 42002, 443)), TC_DROP);
    assert_eq!(stats.get(&(SvcStat::FqdnFrontend as u32), 0).unwrap().iter().sum::<u64>(), 2);
    // ... and outside it, an address learned by name still passes.
    fx.answer(&answer("api.example.com", T_A, &[a(300, IP3)]));
    assert_eq!(fx.dp.run(FROM, &ipv4(POD, IP3, TCP, 42003, 443)), TC_PASS);
}
