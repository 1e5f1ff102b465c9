//! Fuzzes the kernel DNS parser (zt-ebpf dns.rs) through BPF_PROG_TEST_RUN: random
//! messages, and valid answers (built as in kernel_dns.rs) with bytes, lengths, counts,
//! compression pointers and labels mutated, over UDP and TCP, IPv4 and IPv6. As in life,
//! the pod first sends a query (same client port, same transaction ID) through
//! `zt_from_pod`, then the answer crosses `zt_to_pod`.
//!
//! Each answer is checked against a model of the parser written here from dns.rs's
//! documented rules (header, question name, answer walk, bounds): the verdict is always
//! TC_PASS and the program never errors; the `ZT_DNS_STATS` counters move exactly as the
//! model says (each answer has exactly one outcome); the learned entries are exactly the
//! model's, and every one holds an address that appears as A/AAAA rdata in that answer,
//! with the question's slots and an expiry from its clamped TTL; the event carries the
//! answer and user space (`fqdn::reader::observe`) reads it without panicking.
//!
//! `ZT_FUZZ_ITERS` (default 2000) answers; `ZT_FUZZ_SECONDS` stops earlier; `ZT_FUZZ_SEED`
//! replays a run (the seed and the failing case are printed on failure).
//! Needs root (bpffs mount, BPF syscalls).
mod common;
#[path = "common/dns_packets.rs"]
mod dns_packets;

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use common::*;
use dns_packets::*;
use zt_agent::pins::open_map;
use zt_common::*;

const POD: &str = "10.0.0.10";
const POD6: &str = "fd00::10";
const DNS: &str = "10.0.0.53";
const DNS6: &str = "fd00::53";
const ID_POD: u32 = 300;
const ID_DNS: u32 = 400;
const KEY: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0f1e_2d3c_4b5a_6978];
const MIN_TTL: u32 = 30;
const MAX_TTL: u32 = 86400;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
/// The pod's FQDN names: (kind, name, slots).
const NAMES: &[(u8, &str, u32)] = &[
    (NAME_EXACT, "api.example.com", 1 << 0),
    (NAME_SUFFIX, "example.com", 1 << 1),
    (NAME_EXACT, "db.internal.test", 1 << 2),
    (NAME_SUFFIX, "x.y.z.example.com", 1 << 3),
];
/// Largest message sent: BPF_PROG_TEST_RUN takes about a page of packet data.
const MAX_MSG: usize = 3000;

// ---------------------------------------------------------------------------
// Fixture (the minimal part of kernel_dns.rs's)
// ---------------------------------------------------------------------------

struct Fx {
    dp: Dp,
    learned: HashMap<MapData, FqdnLearnedKey, FqdnLearnedValue>,
    queries: HashMap<MapData, DnsQueryKey, DnsQueryValue>,
    stats: PerCpuArray<MapData, u64>,
    events: RingBuf<MapData>,
    /// (kind, name hash) -> slots, as ZT_FQDN_NAMES holds them for the pod.
    names: StdHashMap<(u8, u64), u32>,
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
        let enforce = EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS;
        dp.endpoint(POD, ID_POD, enforce | EP_FQDN, TEST_IFINDEX);
        dp.endpoint(POD6, ID_POD, enforce | EP_FQDN, TEST_IFINDEX);
        dp.endpoint(DNS, ID_DNS, 0, 0);
        dp.endpoint(DNS6, ID_DNS, 0, 0);
        for proto in [UDP, TCP] {
            dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_DNS, DIR_EGRESS, proto, 53), VERDICT_ALLOW, 1);
        }
        let root = dp._fs.root();
        let open = |n: &str| open_map(&root, n).unwrap();
        let mut fcfg: Array<MapData, FqdnConfig> = Array::try_from(open(MAP_FQDN_CONFIG)).unwrap();
        fcfg.set(0, FqdnConfig { hash_key: KEY, min_ttl_s: MIN_TTL, max_ttl_s: MAX_TTL, grace_s: 60, events_per_sec: 1_000_000 }, 0).unwrap();
        let mut servers: HashMap<MapData, u32, u32> = HashMap::try_from(open(MAP_DNS_SERVERS)).unwrap();
        servers.insert(ID_DNS, 1, 0).unwrap();
        let mut name_map: HashMap<MapData, FqdnNameKey, FqdnNameValue> = HashMap::try_from(open(MAP_FQDN_NAMES)).unwrap();
        let mut names = StdHashMap::new();
        for (kind, name, slots) in NAMES {
            let (h, _, _) = name_hashes(KEY, name);
            name_map.insert(FqdnNameKey::new(ID_POD, *kind, h), FqdnNameValue { slots: *slots, _pad: 0 }, 0).unwrap();
            *names.entry((*kind, h)).or_default() |= *slots;
        }
        Fx {
            learned: HashMap::try_from(open(MAP_FQDN_LEARNED)).unwrap(),
            queries: HashMap::try_from(open(MAP_DNS_QUERIES)).unwrap(),
            stats: PerCpuArray::try_from(open(MAP_DNS_STATS)).unwrap(),
            events: RingBuf::try_from(open(MAP_DNS_EVENTS)).unwrap(),
            names,
            dp,
        }
    }

    fn stats(&self) -> Vec<u64> {
        DnsStat::ALL.iter().map(|s| self.stats.get(&(*s as u32), 0).unwrap().iter().sum()).collect()
    }

    fn learned_entries(&self) -> BTreeMap<[u8; 16], FqdnLearnedValue> {
        self.learned
            .iter()
            .map(|r| r.unwrap())
            .map(|(k, v)| {
                assert_eq!(k.local_id, ID_POD, "learned for another identity");
                (k.addr, v)
            })
            .collect()
    }

    fn clear_learned(&mut self) {
        let keys: Vec<FqdnLearnedKey> = self.learned.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            self.learned.remove(&k).unwrap();
        }
    }

    fn clear_queries(&mut self) {
        let keys: Vec<DnsQueryKey> = self.queries.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            self.queries.remove(&k).unwrap();
        }
    }

    fn dns_events(&mut self) -> Vec<DnsEvent> {
        let mut v = vec![];
        while let Some(item) = self.events.next() {
            assert!(item.len() >= std::mem::size_of::<DnsEvent>(), "short ring item");
            v.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const DnsEvent) });
        }
        v
    }
}

// ---------------------------------------------------------------------------
// PRNG (splitmix64) and the cases it draws
// ---------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// 0..n
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// true with probability 1/n
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueryMode {
    /// A query with the answer's transaction ID: the answer may teach.
    Match,
    /// A query with another transaction ID only: `no-query`.
    Mismatch,
    /// Matched, then the same answer a second time: the copy is `no-query`.
    Replay,
}

#[derive(Clone, Debug)]
struct Case {
    how: String,
    msg: Vec<u8>,
    proto: u8,
    v6: bool,
    client_port: u16,
    /// UDP: the length field (default 8 + message length).
    udp_len: Option<u16>,
    /// TCP: the length prefix (default the message length).
    tcp_prefix: Option<u16>,
    query: QueryMode,
}

const TTLS: &[u32] = &[0, 1, 29, 30, 31, 60, 300, 86399, 86400, 86401, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff];

fn ttl(rng: &mut Rng) -> u32 {
    if rng.one_in(2) {
        *rng.pick(TTLS)
    } else {
        rng.next() as u32
    }
}

fn qname(rng: &mut Rng) -> Vec<u8> {
    let text = match rng.below(14) {
        0 | 1 => "api.example.com".to_string(),
        2 => "API.Example.COM".to_string(),
        3 => "www.example.com".to_string(),
        4 => "a.b.c.d.example.com".to_string(),
        5 => "db.internal.test".to_string(),
        6 => "x.db.internal.test".to_string(),
        7 => rng.pick(&["example.com", "other.org", "com", "", "xexample.com", "example.com.evil.org"]).to_string(),
        8 => "q.x.y.z.example.com".to_string(),
        // Label counts and lengths at the limits.
        9 => format!("{}.example.com", vec!["x"; 29 + rng.below(5)].join(".")),
        10 => format!("{}.example.com", "a".repeat(60 + rng.below(8))),
        11 => {
            let l = "b".repeat(63);
            format!("{l}.{l}.{l}.{}.com", "c".repeat(55 + rng.below(10)))
        }
        _ => {
            // Labels of arbitrary bytes (dots, upper case, high bytes inside labels).
            let mut v = vec![];
            for _ in 0..1 + rng.below(4) {
                let len = 1 + rng.below(12);
                v.push(len as u8);
                for _ in 0..len {
                    v.push(*rng.pick(&[b'a', b'A', b'.', 0xff, 0x00, b'-', b'Z', 0x80, b'e']));
                }
            }
            v.extend_from_slice(&name("example.com"));
            return v;
        }
    };
    // `name()` with over-long labels would wrap the length byte: build it by hand.
    let mut v = vec![];
    for l in text.split('.').filter(|l| !l.is_empty()) {
        v.push(l.len().min(255) as u8);
        v.extend_from_slice(l.as_bytes());
    }
    v.push(0);
    v
}

/// An owner name for a record at offset `at` of a message.
fn owner(rng: &mut Rng, q: &[u8], at: usize) -> Vec<u8> {
    match rng.below(8) {
        0..=3 => PTR_QNAME.to_vec(),
        4 => vec![0],
        5 => q.to_vec(),
        6 => {
            // Labels, then a pointer (possibly forward, to itself, or out of the message).
            let mut v = name("edge.cdn");
            v.pop();
            let target = if rng.one_in(2) { at } else { rng.below(4096) };
            v.extend_from_slice(&(0xc000 | target as u16 & 0x3fff).to_be_bytes());
            v
        }
        _ => name("edge.cdn.example.net"),
    }
}

fn record(rng: &mut Rng, q: &[u8], at: usize) -> Vec<u8> {
    let own = owner(rng, q, at);
    let class = if rng.one_in(12) { 3 } else { C_IN };
    match rng.below(12) {
        0..=4 => {
            let mut ip = rng.bytes(4);
            if rng.one_in(4) {
                ip = vec![93, 184, 216, rng.byte()];
            }
            let mut rd = ip;
            if rng.one_in(20) {
                rd.push(rng.byte()); // rdlength 5
            }
            rr(&own, T_A, class, ttl(rng), &rd)
        }
        5..=6 => {
            let mut rd = rng.bytes(16);
            if rng.one_in(4) {
                rd[..12].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
            }
            if rng.one_in(20) {
                rd.truncate(rng.below(16));
            }
            rr(&own, T_AAAA, class, ttl(rng), &rd)
        }
        7 | 8 => rr(&own, T_CNAME, class, ttl(rng), &name("edge.cdn.example.net")),
        9 => {
            let len = if rng.one_in(6) { 1200 + rng.below(800) } else { rng.below(300) };
            rr(&own, T_TXT, class, ttl(rng), &vec![b'x'; len])
        }
        10 => opt(),
        _ => {
            let (ty, t, len) = (rng.next() as u16, ttl(rng), rng.below(40));
            rr(&own, ty, class, t, &rng.bytes(len))
        }
    }
}

/// A well-formed answer (as far as its builder goes).
fn valid_answer(rng: &mut Rng) -> (String, Vec<u8>) {
    let q = qname(rng);
    let qtype = match rng.below(10) {
        0..=5 => T_A,
        6..=7 => T_AAAA,
        8 => *rng.pick(&[T_TXT, T_CNAME, 255, 0]),
        _ => T_A,
    };
    let qclass = if rng.one_in(15) { 3 } else { C_IN };
    let mut body = q.clone();
    body.extend_from_slice(&qtype.to_be_bytes());
    body.extend_from_slice(&qclass.to_be_bytes());
    let n = match rng.below(10) {
        0 => 0,
        1 => 30 + rng.below(12),
        _ => 1 + rng.below(6),
    };
    let mut an = 0u16;
    for _ in 0..n {
        let r = record(rng, &q, 12 + body.len());
        if 12 + body.len() + r.len() > MAX_MSG {
            break;
        }
        body.extend(r);
        an += 1;
    }
    let ar = if rng.one_in(5) {
        body.extend(opt());
        1
    } else {
        0
    };
    let mut m = msg(RESPONSE, 1, an, ar, &body);
    m[..2].copy_from_slice(&(rng.next() as u16).to_be_bytes());
    (format!("valid answer: {n} records, qtype {qtype}"), m)
}

const INTERESTING8: &[u8] = &[0, 1, 0x3f, 0x40, 0x7f, 0x80, 0xbf, 0xc0, 0xc1, 0xff, 63, 64, 12];
const INTERESTING16: &[u16] = &[0, 1, 2, 4, 16, 28, 32, 33, 255, 256, 0x7fff, 0x8000, 0xffff, 0xc00c, 0xc000, 0xc3ff];

fn mutate(rng: &mut Rng, m: &mut Vec<u8>) -> String {
    if m.is_empty() {
        let n = 1 + rng.below(16);
        m.extend(rng.bytes(n));
        return "append".into();
    }
    let at = rng.below(m.len());
    match rng.below(13) {
        0 => {
            m[at] ^= 1 << rng.below(8);
            format!("flip bit at {at}")
        }
        1 => {
            m[at] = *rng.pick(INTERESTING8);
            format!("byte at {at}")
        }
        2 => {
            let v = if rng.one_in(2) { *rng.pick(INTERESTING16) } else { 0xc000 | rng.below(m.len() + 16) as u16 };
            let at = at.min(m.len().saturating_sub(2));
            let end = (at + 2).min(m.len());
            m[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            format!("u16 {v:#x} at {at}")
        }
        3 => {
            m.truncate(at);
            format!("truncate to {at}")
        }
        4 => {
            let n = 1 + rng.below(64);
            m.extend(rng.bytes(n));
            format!("append {n}")
        }
        5 => {
            let n = 1 + rng.below(8);
            let b = rng.bytes(n);
            m.splice(at..at, b);
            format!("insert {n} at {at}")
        }
        6 => {
            let n = 1 + rng.below(8);
            let end = (at + n).min(m.len());
            m.drain(at..end);
            format!("delete {at}..{end}")
        }
        7 if m.len() >= 8 => {
            let v = if rng.one_in(2) { *rng.pick(INTERESTING16) } else { rng.below(40) as u16 };
            m[6..8].copy_from_slice(&v.to_be_bytes());
            format!("ancount {v}")
        }
        8 if m.len() >= 6 => {
            let v = *rng.pick(&[0u16, 1, 2, 0xffff]);
            m[4..6].copy_from_slice(&v.to_be_bytes());
            format!("qdcount {v}")
        }
        9 if m.len() >= 4 => {
            m[2] = rng.byte();
            m[3] = rng.byte();
            format!("flags {:02x}{:02x}", m[2], m[3])
        }
        10 => {
            // Copy a chunk elsewhere (duplicates records, names).
            let from = rng.below(m.len());
            let n = (1 + rng.below(32)).min(m.len() - from);
            let chunk = m[from..from + n].to_vec();
            m.splice(at..at, chunk);
            format!("copy {from}+{n} to {at}")
        }
        11 => {
            // A label length byte of the question name.
            let mut p = 12;
            let mut labels = vec![];
            while p < m.len() && m[p] != 0 && m[p] & 0xc0 == 0 && labels.len() < 40 {
                labels.push(p);
                p += 1 + m[p] as usize;
            }
            if let Some(&l) = labels.get(rng.below(labels.len().max(1))) {
                m[l] = *rng.pick(&[0, 1, 62, 63, 64, 0x80, 0xc0, 0xff, m[l].wrapping_add(1), m[l].wrapping_sub(1)]);
                format!("question label at {l}")
            } else {
                "no question label".into()
            }
        }
        _ => {
            // A compression pointer anywhere after the header.
            if m.len() > 14 {
                let at = 12 + rng.below(m.len() - 13);
                let anywhere = rng.below(m.len() + 8);
                let target = *rng.pick(&[12, at, at + 2, anywhere, 0x3fff]);
                m[at..at + 2].copy_from_slice(&(0xc000 | (target as u16 & 0x3fff)).to_be_bytes());
                format!("pointer at {at} to {target}")
            } else {
                "short for a pointer".into()
            }
        }
    }
}

fn random_msg(rng: &mut Rng) -> Vec<u8> {
    let n = if rng.one_in(8) { rng.below(600) } else { rng.below(80) };
    let mut m = rng.bytes(n);
    if rng.one_in(2) && m.len() >= 12 {
        m[2..4].copy_from_slice(&RESPONSE.to_be_bytes());
        m[4..6].copy_from_slice(&1u16.to_be_bytes());
        m[6..8].copy_from_slice(&(rng.below(4) as u16).to_be_bytes());
    }
    m
}

fn draw(rng: &mut Rng) -> Case {
    let mut udp_len = None;
    let (how, msg) = match rng.below(10) {
        0 => valid_answer(rng),
        1 => {
            // A first fragment: the UDP length claims the whole answer, part of it came.
            let (how, mut m) = valid_answer(rng);
            udp_len = Some((8 + m.len()) as u16);
            let keep = rng.below(m.len() + 1);
            m.truncate(keep);
            (format!("{how}, first {keep} bytes"), m)
        }
        2 | 3 => (String::from("random bytes"), random_msg(rng)),
        _ => {
            let (how, mut m) = valid_answer(rng);
            let mut steps = vec![];
            for _ in 0..1 + rng.below(6) {
                steps.push(mutate(rng, &mut m));
            }
            m.truncate(MAX_MSG);
            (format!("{how}, mutated: {}", steps.join("; ")), m)
        }
    };
    let (proto, v6) = match rng.below(20) {
        0..=11 => (UDP, false),
        12..=14 => (UDP, true),
        15..=17 => (TCP, false),
        _ => (TCP, true),
    };
    if proto != UDP {
        udp_len = None;
    } else if rng.one_in(20) {
        udp_len = Some(match rng.below(3) {
            0 => rng.below(8) as u16,
            1 => (8 + msg.len() + 1 + rng.below(3000)) as u16,
            _ => (8 + rng.below(msg.len() + 1)) as u16,
        });
    }
    let tcp_prefix = (proto == TCP && rng.one_in(20)).then(|| if rng.one_in(2) { rng.next() as u16 } else { (msg.len() as u16).wrapping_add(1) });
    let query = match rng.below(20) {
        0 => QueryMode::Mismatch,
        1 => QueryMode::Replay,
        _ => QueryMode::Match,
    };
    Case { how, msg, proto, v6, client_port: 40000 + rng.below(4096) as u16, udp_len, tcp_prefix, query }
}

// ---------------------------------------------------------------------------
// The model: what dns.rs must do with a message
// ---------------------------------------------------------------------------

const OK: u32 = 0xff;

#[derive(Debug, Default, PartialEq)]
struct Expect {
    /// DnsStat counter deltas (Queries and the Event* counters are checked apart).
    stats: BTreeMap<&'static str, u64>,
    /// Event outcome, or None when there is no answer to report (short, tcp-partial).
    outcome: Option<u32>,
    slots: u32,
    /// address -> largest clamped TTL among its records.
    learned: BTreeMap<[u8; 16], u32>,
    ips: u32,
    msg_len: u32,
    avail: u32,
}

impl Expect {
    fn add(&mut self, s: DnsStat, n: u64) {
        if n > 0 {
            *self.stats.entry(s.name()).or_default() += n;
        }
    }
}

fn stat_of(r: u32) -> DnsStat {
    DnsStat::from_u8(r as u8).expect("a DnsStat")
}

/// The transport: (message length claimed, bytes present) or the stat that ends it.
fn framing(c: &Case) -> Result<(u32, u32), DnsStat> {
    let present = c.msg.len() as u32;
    if c.proto == UDP {
        let ulen = c.udp_len.unwrap_or((8 + c.msg.len()) as u16) as u32;
        if ulen < 8 {
            return Err(DnsStat::Short);
        }
        let msg_len = ulen - 8;
        Ok((msg_len, msg_len.min(present)))
    } else {
        let prefix = c.tcp_prefix.unwrap_or(c.msg.len() as u16) as u32;
        if present + 2 != prefix + 2 {
            return Err(DnsStat::TcpPartial);
        }
        Ok((prefix, prefix))
    }
}

fn model(c: &Case, names: &StdHashMap<(u8, u64), u32>, query_ok: bool) -> Expect {
    let mut e = Expect::default();
    let (msg_len, avail) = match framing(c) {
        Ok(x) => x,
        Err(s) => {
            e.add(s, 1);
            return e;
        }
    };
    if avail < 12 {
        e.add(DnsStat::Short, 1);
        return e;
    }
    e.msg_len = msg_len;
    e.avail = avail;
    e.add(DnsStat::Answers, 1);
    if !query_ok {
        e.add(DnsStat::NoQuery, 1);
        e.outcome = Some(DnsStat::NoQuery as u32);
        return e;
    }
    let n = avail.min(DNS_SCRATCH as u32) as usize;
    let m = &c.msg[..n];
    let cut = (n as u32) < msg_len;
    let r = parse(m, cut, names, &mut e);
    e.outcome = Some(r);
    e
}

fn be16(m: &[u8], i: usize) -> u32 {
    u16::from_be_bytes([m[i], m[i + 1]]) as u32
}

fn parse(m: &[u8], cut: bool, names: &StdHashMap<(u8, u64), u32>, e: &mut Expect) -> u32 {
    let n = m.len();
    // Header.
    let (b2, b3) = (m[2], m[3]);
    let r = if b2 & 0x80 == 0 {
        DnsStat::NotResponse as u32
    } else if (b2 >> 3) & 0xf != 0 {
        DnsStat::Opcode as u32
    } else if b2 & 0x02 != 0 {
        DnsStat::Truncated as u32
    } else if b3 & 0xf != 0 {
        DnsStat::Rcode as u32
    } else if be16(m, 4) != 1 {
        DnsStat::Qdcount as u32
    } else {
        OK
    };
    if r != OK {
        e.add(stat_of(r), 1);
        return r;
    }
    let an = be16(m, 6);
    // Question.
    let mut p = 12usize;
    let mut labels: Vec<&[u8]> = vec![];
    let qr = loop {
        if p >= n {
            break DnsStat::QnameBad as u32;
        }
        let b = m[p] as usize;
        if b == 0 {
            break OK;
        }
        if b & 0xc0 == 0xc0 {
            break DnsStat::QnamePointer as u32;
        }
        if b & 0xc0 != 0 {
            break DnsStat::QnameBad as u32;
        }
        if labels.len() >= FQDN_MAX_LABELS as usize {
            break DnsStat::QnameLabels as u32;
        }
        if p + 1 + b > n || p + 1 + b - 12 + 1 > 255 {
            break DnsStat::QnameBad as u32;
        }
        labels.push(&m[p + 1..p + 1 + b]);
        p += 1 + b;
    };
    let qr = if qr != OK {
        qr
    } else if p + 5 > n {
        DnsStat::QnameBad as u32
    } else {
        let (qtype, qclass) = (be16(m, p + 1), be16(m, p + 3));
        if (qtype != T_A as u32 && qtype != T_AAAA as u32) || qclass != C_IN as u32 {
            DnsStat::Qtype as u32
        } else {
            OK
        }
    };
    if qr != OK {
        e.add(stat_of(qr), 1);
        return qr;
    }
    p += 5;
    // Slots: the exact name, and every parent suffix for `*.` patterns.
    let mut h = 0u64;
    let mut slots = 0u32;
    for (i, l) in labels.iter().enumerate().rev() {
        h = chain_hash(KEY, label_hash(KEY, l), h);
        let kind = if i == 0 { NAME_EXACT } else { NAME_SUFFIX };
        slots |= names.get(&(kind, h)).copied().unwrap_or(0);
    }
    e.slots = slots;
    if slots == 0 {
        e.add(DnsStat::NoMatch, 1);
        return DnsStat::NoMatch as u32;
    }
    if an == 0 {
        return DnsStat::Answers as u32;
    }
    // Answers.
    let ran_out = if cut { DnsStat::Partial as u32 } else { DnsStat::AnswerBad as u32 };
    let mut r = OK;
    'records: for _ in 0..an.min(FQDN_MAX_IPS_PER_ANSWER) {
        let mut ended = false;
        for _ in 0..FQDN_MAX_LABELS {
            if p >= n {
                r = ran_out;
                break 'records;
            }
            let b = m[p] as usize;
            if b == 0 {
                p += 1;
                ended = true;
                break;
            }
            if b & 0xc0 == 0xc0 {
                p += 2;
                ended = true;
                break;
            }
            if b & 0xc0 != 0 {
                r = DnsStat::AnswerBad as u32;
                break 'records;
            }
            p += 1 + b;
        }
        if !ended {
            r = DnsStat::AnswerBad as u32;
            break;
        }
        if p + 10 > n {
            r = ran_out;
            break;
        }
        let (ty, class) = (be16(m, p), be16(m, p + 2));
        let ttl = u32::from_be_bytes([m[p + 4], m[p + 5], m[p + 6], m[p + 7]]);
        let rdlen = be16(m, p + 8) as usize;
        p += 10;
        if p + rdlen > n {
            r = ran_out;
            break;
        }
        if class == C_IN as u32 && (ty == T_A as u32 || ty == T_AAAA as u32) {
            let want = if ty == T_A as u32 { 4 } else { 16 };
            if rdlen != want {
                r = DnsStat::AnswerBad as u32;
                break;
            }
            let mut a = [0u8; 16];
            if want == 4 {
                a[10] = 0xff;
                a[11] = 0xff;
                a[12..].copy_from_slice(&m[p..p + 4]);
            } else {
                a.copy_from_slice(&m[p..p + 16]);
            }
            let mut t = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
            t = t.clamp(MIN_TTL, MAX_TTL);
            let cur = e.learned.entry(a).or_default();
            *cur = (*cur).max(t);
            e.ips += 1;
        }
        p += rdlen;
    }
    if e.ips != 0 {
        e.add(DnsStat::Learned, 1);
        e.add(DnsStat::IpsLearned, e.ips as u64);
    }
    if r != OK {
        e.add(stat_of(r), 1);
    } else if an > FQDN_MAX_IPS_PER_ANSWER {
        e.add(DnsStat::IpsCapped, 1);
    }
    if e.ips != 0 {
        DnsStat::Learned as u32
    } else if r != OK {
        r
    } else {
        DnsStat::Answers as u32
    }
}

/// Every address that appears as the rdata of an A/AAAA-shaped record anywhere in `m`
/// (type, class IN, TTL, rdlength 4/16, rdata present), whatever the record walk: what
/// a learned entry may hold, independent of the model.
fn rdata_addresses(m: &[u8]) -> Vec<[u8; 16]> {
    let mut out = vec![];
    for p in 0..m.len().saturating_sub(10) {
        let (ty, class, rdlen) = (be16(m, p), be16(m, p + 2), be16(m, p + 8) as usize);
        if class != C_IN as u32 || p + 10 + rdlen > m.len() {
            continue;
        }
        let mut a = [0u8; 16];
        if ty == T_A as u32 && rdlen == 4 {
            a[10] = 0xff;
            a[11] = 0xff;
            a[12..].copy_from_slice(&m[p + 10..p + 14]);
        } else if ty == T_AAAA as u32 && rdlen == 16 {
            a.copy_from_slice(&m[p + 10..p + 26]);
        } else {
            continue;
        }
        out.push(a);
    }
    out
}

// ---------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------

fn hosts(c: &Case) -> (&'static str, &'static str) {
    if c.v6 {
        (POD6, DNS6)
    } else {
        (POD, DNS)
    }
}

fn answer_frame(c: &Case) -> Vec<u8> {
    let (pod, dns) = hosts(c);
    if c.proto == UDP {
        let mut f = udp(dns, pod, 53, c.client_port, &c.msg);
        if let Some(l) = c.udp_len {
            let l4 = f.len() - c.msg.len() - 8;
            f[l4 + 4..l4 + 6].copy_from_slice(&l.to_be_bytes());
        }
        f
    } else {
        let mut p = c.tcp_prefix.unwrap_or(c.msg.len() as u16).to_be_bytes().to_vec();
        p.extend_from_slice(&c.msg);
        tcp(dns, pod, 53, c.client_port, &p)
    }
}

/// The pod's query, with transaction ID `txid`.
fn send_query(fx: &Fx, c: &Case, txid: u16) {
    let (pod, dns) = hosts(c);
    // The question the answer echoes (as a real query would have asked it).
    let asked = question("api.example.com", T_A);
    let mut q = msg(0x0100, 1, 0, 0, question_of(&c.msg).unwrap_or(&asked));
    q[..2].copy_from_slice(&txid.to_be_bytes());
    if c.proto == TCP {
        let syn = if c.v6 { ipv6(pod, dns, TCP, c.client_port, 53) } else { ipv4(pod, dns, TCP, c.client_port, 53) };
        assert_eq!(fx.dp.run(FROM, &syn), TC_PASS, "SYN {pod} -> {dns}");
    }
    let pkt = if c.proto == UDP { udp(pod, dns, c.client_port, 53, &q) } else { tcp_dns(pod, dns, c.client_port, 53, &q) };
    assert_eq!(fx.dp.run(FROM, &pkt), TC_PASS, "query {pod} -> {dns}");
}

fn txid(m: &[u8]) -> u16 {
    u16::from_be_bytes([m.first().copied().unwrap_or(0), m.get(1).copied().unwrap_or(0)])
}

/// Delivers the answer once and checks everything against `want`.
fn deliver_and_check(fx: &mut Fx, c: &Case, want: &Expect) {
    let before = fx.stats();
    let t0 = now_ns();
    let v = fx.dp.run(TO, &answer_frame(c));
    let t1 = now_ns();
    assert_eq!(v, TC_PASS, "a DNS answer is never dropped by the capture");
    let after = fx.stats();

    // Counters: exactly the model's, plus one delivery outcome per reported answer.
    let mut got: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut delivered = 0;
    for (i, s) in DnsStat::ALL.iter().enumerate() {
        let d = after[i] - before[i];
        match s {
            DnsStat::EventSent | DnsStat::EventRateLimited | DnsStat::EventRingFull => delivered += d,
            DnsStat::Queries => assert_eq!(d, 0, "an answer recorded a query"),
            _ if d != 0 => {
                got.insert(s.name(), d);
            }
            _ => {}
        }
    }
    assert_eq!(got, want.stats, "DNS counters");
    assert_eq!(delivered, want.outcome.is_some() as u64, "one event outcome per reported answer");

    // Learned entries: only addresses of A/AAAA rdata of this answer, exactly the model's.
    let learned = fx.learned_entries();
    let shaped = rdata_addresses(&c.msg);
    for a in learned.keys() {
        assert!(shaped.contains(a), "learned {} which is no A/AAAA rdata of the answer", zt_agent::net::from_key(*a));
    }
    let got_addrs: Vec<_> = learned.keys().map(|a| zt_agent::net::from_key(*a)).collect();
    let want_addrs: Vec<_> = want.learned.keys().map(|a| zt_agent::net::from_key(*a)).collect();
    assert_eq!(got_addrs, want_addrs, "learned addresses");
    for (a, v) in &learned {
        let t = want.learned[a] as u64 * 1_000_000_000;
        assert_eq!(v.slots, want.slots, "slots of {}", zt_agent::net::from_key(*a));
        assert!(v.expires_ns >= t0 + t && v.expires_ns <= t1 + t, "expiry of {}: ttl {} s", zt_agent::net::from_key(*a), want.learned[a]);
    }
    fx.clear_learned();

    // The event: the answer as captured, readable by user space.
    let evs = fx.dns_events();
    let sent = after[DnsStat::EventSent as usize] - before[DnsStat::EventSent as usize];
    assert_eq!(evs.len() as u64, sent, "events in the ring");
    if let Some(ev) = evs.first() {
        let copy = want.avail.min(DNS_EVENT_DATA as u32) as usize;
        assert_eq!(ev.local_id, ID_POD);
        assert_eq!(ev.outcome as u32, want.outcome.unwrap(), "event outcome");
        assert_eq!((ev.slots, ev.ips_learned as u32), (want.slots, want.ips), "event slots and addresses learned");
        assert_eq!((ev.proto, ev.msg_len as u32, ev.copy_len as usize), (c.proto, want.msg_len & 0xffff, copy), "event proto and lengths");
        let (pod, dns) = hosts(c);
        assert_eq!((ev.client, ev.server), (addr(pod), addr(dns)));
        assert_eq!(&ev.data[..copy], &c.msg[..copy], "event data");
        if let Some(o) = zt_agent::fqdn::reader::observe(ev, 1_700_000_000) {
            assert_eq!(o.learned, want.ips > 0 && want.slots != 0);
        }
    }
}

fn run_case(fx: &mut Fx, c: &Case) {
    let t = txid(&c.msg);
    match c.query {
        QueryMode::Match | QueryMode::Replay => send_query(fx, c, t),
        QueryMode::Mismatch => {
            // No record anywhere may hold the answer's ID: only the other query's.
            fx.clear_queries();
            send_query(fx, c, t ^ 0x5a5a);
        }
    }
    let want = model(c, &fx.names, c.query != QueryMode::Mismatch);
    deliver_and_check(fx, c, &want);
    if c.query == QueryMode::Replay {
        // Reported answers consumed their query; short and partial segments did not.
        let consumed = want.outcome.is_some();
        let again = model(c, &fx.names, !consumed);
        deliver_and_check(fx, c, &again);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn kernel_dns_parser_fuzz() {
    let iters = env_u64("ZT_FUZZ_ITERS").unwrap_or(2000);
    let limit = env_u64("ZT_FUZZ_SECONDS").map(Duration::from_secs);
    let seed = env_u64("ZT_FUZZ_SEED").unwrap_or_else(|| now_ns() ^ (std::process::id() as u64) << 32);
    println!("kernel DNS fuzz: seed {seed} (ZT_FUZZ_SEED={seed} replays), up to {iters} answers");
    let mut fx = Fx::new("dns-fuzz");
    let mut rng = Rng(seed);
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let start = Instant::now();
    let mut done = 0u64;
    while done < iters && limit.is_none_or(|l| start.elapsed() < l) {
        let c = draw(&mut rng);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&mut fx, &c)));
        if let Err(p) = r {
            let hex: String = c.msg.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!(
                "kernel DNS fuzz FAILED: seed {seed}, answer #{done} (ZT_FUZZ_SEED={seed} ZT_FUZZ_ITERS={}) \n  case: {}\n  {} {} client port {} udp_len {:?} tcp_prefix {:?} query {:?}\n  message ({} bytes): {hex}",
                done + 1,
                c.how,
                if c.proto == UDP { "UDP" } else { "TCP" },
                if c.v6 { "IPv6" } else { "IPv4" },
                c.client_port,
                c.udp_len,
                c.tcp_prefix,
                c.query,
                c.msg.len()
            );
            std::panic::resume_unwind(p);
        }
        let name = match model(&c, &fx.names, c.query != QueryMode::Mismatch).outcome {
            Some(o) => stat_of(o).name(),
            None => framing(&c).err().map_or("short", |s| s.name()),
        };
        *outcomes.entry(name).or_default() += 1;
        done += 1;
    }
    println!("kernel DNS fuzz: {done} answers in {:.1} s, outcomes {outcomes:?}", start.elapsed().as_secs_f64());
    // The generator reaches every part of the parser (else the run proves little).
    if done >= 1000 {
        for s in [
            DnsStat::Learned,
            DnsStat::Answers,
            DnsStat::NoMatch,
            DnsStat::AnswerBad,
            DnsStat::QnameBad,
            DnsStat::QnamePointer,
            DnsStat::Qtype,
            DnsStat::NoQuery,
            DnsStat::Short,
            DnsStat::Partial,
        ] {
            assert!(outcomes.contains_key(s.name()), "no answer ended as {} in {done}: {outcomes:?}", s.name());
        }
    }
}

/// The model agrees with the hand-written cases of kernel_dns.rs (so that it is no
/// copy of whatever the kernel happens to do).
#[test]
fn model_agrees_with_the_hand_written_cases() {
    let mut names = StdHashMap::new();
    for (kind, name, slots) in NAMES {
        *names.entry((*kind, name_hashes(KEY, name).0)).or_default() |= *slots;
    }
    let case =
        |m: Vec<u8>| Case { how: String::new(), msg: m, proto: UDP, v6: false, client_port: 40000, udp_len: None, tcp_prefix: None, query: QueryMode::Match };
    let stats = |c: &Case| model(c, &names, true).stats.into_iter().filter(|(k, _)| *k != "answers").collect::<Vec<_>>();
    let ip1 = "93.184.216.34";
    assert_eq!(stats(&case(answer("api.example.com", T_A, &[a(300, ip1)]))), [("ips-learned", 1), ("learned", 1)]);
    let e = model(&case(answer("API.Example.COM", T_A, &[a(60, ip1), aaaa(60, "2606:2800:220:1::1")])), &names, true);
    assert_eq!((e.slots, e.ips, e.learned.len()), (0b11, 2, 2));
    assert_eq!(stats(&case(answer("www.other.org", T_A, &[a(60, ip1)]))), [("no-match", 1)]);
    let bad = rr(&PTR_QNAME, T_A, C_IN, 60, &[1, 2, 3, 4, 5]);
    assert_eq!(stats(&case(answer("api.example.com", T_A, &[a(60, ip1), bad, a(60, ip1)]))), [("answer-bad", 1), ("ips-learned", 1), ("learned", 1)]);
    let forty: Vec<Vec<u8>> = (0..40).map(|i| a(60, &format!("93.184.217.{i}"))).collect();
    assert_eq!(stats(&case(answer("api.example.com", T_A, &forty))), [("ips-capped", 1), ("ips-learned", 32), ("learned", 1)]);
    assert_eq!(stats(&case(msg(RESPONSE, 1, 1, 0, &[0xc0, 12, 0, 1, 0, 1]))), [("qname-pointer", 1)]);
    assert_eq!(stats(&case(vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1])), [("short", 1)]);
    let mut m = answer("api.example.com", T_A, &[a(60, ip1)]);
    m[2..4].copy_from_slice(&0x8183u16.to_be_bytes());
    assert_eq!(stats(&case(m)), [("rcode", 1)]);
    let e = model(&case(answer("a.x.y.z.example.com", T_A, &[a(0, ip1)])), &names, true);
    assert_eq!((e.slots, e.learned.values().copied().collect::<Vec<_>>()), (0b1010, vec![MIN_TTL]));
    assert_eq!(model(&case(answer("api.example.com", T_A, &[a(60, ip1)])), &names, false).outcome, Some(DnsStat::NoQuery as u32));
    // The UDP length claims more than the packet holds: the walk runs out, partially.
    let m = answer("api.example.com", T_A, &[a(60, ip1), a(60, ip1)]);
    let mut c = case(m[..m.len() - 3].to_vec());
    c.udp_len = Some((8 + m.len()) as u16);
    assert_eq!(model(&c, &names, true).stats.get("partial"), Some(&1));
}
