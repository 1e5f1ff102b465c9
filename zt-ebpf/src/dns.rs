//! DNS answer capture: a reply from port 53 of a tracked flow, on its way into a pod
//! whose FQDN rules need it, is parsed here before the pod can read it. Every A/AAAA
//! record of an answer whose question name matches a name the pod's identity may reach
//! becomes a `ZT_FQDN_LEARNED` entry (identity, address) with an expiry from its TTL.
//! The packet itself is never dropped or changed here; every outcome is a `DnsStat`
//! counter, and a copy of the answer goes to user space through `ZT_DNS_EVENTS`.
//!
//! Bounds (the verifier's and memory's): the message is copied (at most `DNS_SCRATCH`
//! bytes) into a per-CPU scratch map value and every index is masked with
//! `DNS_SCRATCH - 1`; the question name has at most `FQDN_MAX_LABELS` labels and is
//! hashed a word at a time; compression pointers are never followed (one in the
//! question is `qname-pointer`, one in an owner name ends that name); at most
//! `FQDN_MAX_IPS_PER_ANSWER` records are walked. The parser's running state (position,
//! counts, slots) lives in the scratch map and is read and written volatile: the
//! verifier then sees it as unknown values, so paths that differ only in it merge and
//! the verification cost stays linear in the bounds.
use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::__sk_buff,
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use zt_common::*;

use crate::{
    maps::{DNS_EVENTS, DNS_QUERIES, DNS_RATELIMIT, DNS_SCRATCH_MAP, DNS_SERVERS, DNS_STATS, ENDPOINTS, FQDN_CONFIG, FQDN_LEARNED, FQDN_NAMES},
    parse::{Flow, IPPROTO_TCP, IPPROTO_UDP},
    policy::Hook,
};

const MASK: u32 = DNS_SCRATCH as u32 - 1;
/// Readable bytes past the last masked index, so that a word read there stays inside.
const SLACK: usize = 64;
/// A phase's status when parsing goes on; otherwise the `DnsStat` that ends it.
const OK: u32 = 0xff;
const TYPE_A: u32 = 1;
const TYPE_AAAA: u32 = 28;
const CLASS_IN: u32 = 1;

/// What the datapath leaves to `run` once it has passed a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Work {
    None,
    /// `note` kept an answer: parse and learn (`capture`).
    Answer,
    /// `note_query` kept a query: record it (`record_query`).
    Query,
}

/// The one call site of the capture and the query record.
#[inline(always)]
pub fn run(skb: *mut __sk_buff, work: Work) {
    match work {
        Work::Answer => capture(skb),
        Work::Query => record_query(skb),
        Work::None => {}
    }
}

/// The identities of a tracked DNS flow (from its conntrack entry).
pub struct Ids {
    pub local: u32,
    pub peer: u32,
}

/// Per-CPU working memory of the parser.
#[repr(C)]
pub struct Scratch {
    pub msg: [u8; DNS_SCRATCH + SLACK],
    /// `L_i` of each question label, left to right.
    pub label_hash: [u64; FQDN_MAX_LABELS as usize],
    pub st: State,
}

/// Parser state, accessed only through `get`/`put` (volatile).
#[repr(C)]
pub struct State {
    /// The answer noted by the datapath (`note`) for `capture`.
    client: [u8; 16],
    server: [u8; 16],
    local: u32,
    /// 1 when the endpoint has FQDN rules (else only visibility).
    learn: u32,
    peer: u32,
    ifindex: u32,
    l4_off: u32,
    ip_end: u32,
    /// Absolute offset of the DNS message in the skb.
    off: u32,
    /// Message bytes present in the skb from `off`.
    avail: u32,
    /// Message length as its header claims (UDP length, TCP length prefix).
    msg_len: u32,
    /// Bytes loaded into `msg` (1..=DNS_SCRATCH).
    n: u32,
    /// 1 when `n < msg_len`: records past `n` are `partial`, not `answer-bad`.
    cut: u32,
    /// Parse position.
    p: u32,
    nlabels: u32,
    ancount: u32,
    slots: u32,
    ips: u32,
    outcome: u32,
    proto: u32,
    /// The pod's port.
    client_port: u32,
    /// TCP: the answer segment's sequence number.
    seq: u32,
    /// The clamped TTL of the record being learned.
    ttl: u32,
}

#[inline(always)]
fn get(v: *const u32) -> u32 {
    unsafe { read_volatile(v) }
}

#[inline(always)]
fn put(v: *mut u32, x: u32) {
    unsafe { write_volatile(v, x) }
}

macro_rules! st {
    ($s:expr, $f:ident) => {
        unsafe { addr_of_mut!((*$s).st.$f) }
    };
}

/// `i & MASK`, with the mask hidden from LLVM: where LLVM can prove `i` small it would
/// drop the AND, and the verifier, which tracks bounds less precisely, then rejects the
/// access. The verifier still sees the constant (a stack spill it tracks).
#[inline(always)]
fn masked(i: u32) -> usize {
    // 64-bit: the verifier tracks a full 8-byte spill of a constant, not a 4-byte one.
    (i as u64 & core::hint::black_box(MASK as u64)) as usize
}

#[inline(always)]
fn byte(s: *const Scratch, i: u32) -> u32 {
    unsafe { *((*s).msg.as_ptr().add(masked(i))) as u32 }
}

#[inline(always)]
fn be16(s: *const Scratch, i: u32) -> u32 {
    (byte(s, i) << 8) | byte(s, i.wrapping_add(1))
}

#[inline(always)]
fn be32(s: *const Scratch, i: u32) -> u32 {
    (be16(s, i) << 16) | be16(s, i.wrapping_add(2))
}

/// 8 bytes from `i`, little-endian (they may run past the message into the slack).
#[inline(always)]
fn word(s: *const Scratch, i: u32) -> u64 {
    unsafe { core::ptr::read_unaligned((*s).msg.as_ptr().add(masked(i)) as *const u64) }
}

#[inline(always)]
fn stat_add(stat: DnsStat, n: u64) {
    if let Some(p) = DNS_STATS.get_ptr_mut(stat as u32) {
        unsafe { *p += n };
    }
}

#[inline(always)]
fn stat(stat: DnsStat) {
    stat_add(stat, 1)
}

/// An answer from port 53 with no conntrack entry, to a pod that captures answers:
/// counted, nothing learned (normal policy decides the packet).
#[inline(never)]
pub fn untracked(f: &Flow) {
    if let Some(ep) = unsafe { ENDPOINTS.get(&EndpointKey { addr: f.daddr }) } {
        if ep.flags & (EP_FQDN | EP_DNS_VISIBILITY) != 0 {
            stat(DnsStat::Untracked);
        }
    }
}

/// The reply `f` of a tracked flow from port 53 at an ingress hook: if its pod captures
/// answers, keeps what `capture` needs and says so (the datapath then calls `capture`
/// once it has passed the packet).
#[inline(never)]
pub fn note(f: &Flow, hook: &Hook, ids: &Ids) -> bool {
    // Gate: pods without FQDN rules pay this one lookup.
    let flags = match unsafe { ENDPOINTS.get(&EndpointKey { addr: f.daddr }) } {
        Some(ep) => ep.flags,
        None => return false,
    };
    if flags & (EP_FQDN | EP_DNS_VISIBILITY) == 0 {
        return false;
    }
    if unsafe { DNS_SERVERS.get(&ids.peer) }.is_none() {
        stat(DnsStat::NotTrusted);
        return false;
    }
    let Some(s) = DNS_SCRATCH_MAP.get_ptr_mut(0) else { return false };
    unsafe {
        (*s).st.client = f.daddr;
        (*s).st.server = f.saddr;
    }
    put(st!(s, local), ids.local);
    // Visibility only: nothing to learn.
    put(st!(s, learn), (flags & EP_FQDN != 0) as u32);
    put(st!(s, peer), ids.peer);
    put(st!(s, ifindex), hook.ifindex);
    put(st!(s, l4_off), f.l4_off as u32);
    put(st!(s, ip_end), f.ip_end);
    put(st!(s, proto), f.proto as u32);
    put(st!(s, client_port), f.dport as u32);
    true
}

/// A packet `f` from a pod to port 53 that the datapath let out: if the pod captures
/// answers and `peer` is a trusted resolver, keeps what `record_query` needs and says
/// so (the datapath then calls `record_query` once it has passed the packet).
#[inline(never)]
pub fn note_query(f: &Flow, peer: u32) -> bool {
    let flags = match unsafe { ENDPOINTS.get(&EndpointKey { addr: f.saddr }) } {
        Some(ep) => ep.flags,
        None => return false,
    };
    if flags & (EP_FQDN | EP_DNS_VISIBILITY) == 0 || unsafe { DNS_SERVERS.get(&peer) }.is_none() {
        return false;
    }
    let Some(s) = DNS_SCRATCH_MAP.get_ptr_mut(0) else { return false };
    unsafe {
        (*s).st.client = f.saddr;
        (*s).st.server = f.daddr;
    }
    put(st!(s, l4_off), f.l4_off as u32);
    put(st!(s, ip_end), f.ip_end);
    put(st!(s, proto), f.proto as u32);
    put(st!(s, client_port), f.sport as u32);
    true
}

/// Records the query `note_query` kept: its transaction ID (and over TCP the sequence
/// number its response must start at). A segment without a whole DNS header records
/// nothing; a TCP segment that continues a message records a key no answer will match.
#[inline(never)]
pub fn record_query(skb: *mut __sk_buff) {
    let Some(s) = DNS_SCRATCH_MAP.get_ptr_mut(0) else { return };
    let ctx = TcContext::new(skb);
    let l4 = get(st!(s, l4_off)) & 0xffff;
    let ip_end = get(st!(s, ip_end));
    let proto = get(st!(s, proto));
    let (txid_at, resp_seq) = if proto == IPPROTO_UDP as u32 {
        (l4 + 8, 0)
    } else {
        let Ok(doff) = ctx.load::<u8>(l4 as usize + 12) else { return };
        let Ok(ack) = ctx.load::<u32>(l4 as usize + 8) else { return };
        // After the 2-byte length prefix.
        (l4 + ((doff as u32) >> 4) * 4 + 2, u32::from_be(ack))
    };
    if txid_at + 12 > ip_end {
        return;
    }
    let Ok(txid) = ctx.load::<u16>(txid_at as usize) else { return };
    let key = query_key(s, u16::from_be(txid), proto);
    // The question the answer must echo.
    let q = txid_at + 12;
    let qhash = question_hash(|i| {
        let at = q + i;
        if at >= ip_end {
            return None;
        }
        ctx.load::<u8>(at as usize).ok().map(|b| b as u32)
    })
    .unwrap_or(0);
    let v = DnsQueryValue { created_ns: unsafe { bpf_ktime_get_ns() }, resp_seq, qhash };
    if DNS_QUERIES.insert(&key, &v, 0).is_ok() {
        stat(DnsStat::Queries);
    }
}

#[inline(always)]
fn query_key(s: *mut Scratch, txid: u16, proto: u32) -> DnsQueryKey {
    let (client, server) = unsafe { ((*s).st.client, (*s).st.server) };
    DnsQueryKey { client, server, client_port: get(st!(s, client_port)) as u16, txid, proto: proto as u8, _pad: [0; 3] }
}

/// Does the located answer match a recorded query of its pod (and is it the first to)?
/// Consumes the record: a second answer to the same query teaches nothing.
#[inline(never)]
fn answers_a_query(s: *mut Scratch) -> bool {
    let proto = get(st!(s, proto));
    let key = query_key(s, be16(s, 0) as u16, proto);
    let Some(v) = (unsafe { DNS_QUERIES.get(&key) }) else { return false };
    let fresh = unsafe { bpf_ktime_get_ns() }.saturating_sub(v.created_ns) < DNS_QUERY_TIMEOUT_NS;
    let starts_stream = proto != IPPROTO_TCP as u32 || v.resp_seq == get(st!(s, seq));
    if !fresh || !starts_stream {
        return false;
    }
    // The answer's question must be the query's (a forged answer for another name with
    // the right ids teaches nothing and leaves the record for the real one). An answer
    // whose question cannot be read is refused by the parser anyway.
    let qhash = v.qhash;
    if qhash != 0 {
        let n = get(st!(s, n));
        let got = question_hash(|i| if 12 + i < n { Some(byte(s, 12 + i)) } else { None });
        if got.is_some_and(|h| h != qhash) {
            return false;
        }
    }
    let _ = DNS_QUERIES.remove(&key);
    true
}

/// Parses the answer `note` kept, learns from it, counts, and sends the event.
#[inline(never)]
pub fn capture(skb: *mut __sk_buff) {
    let Some(s) = DNS_SCRATCH_MAP.get_ptr_mut(0) else { return };
    let Some(cfg) = FQDN_CONFIG.get(0) else { return };
    if !locate(skb, s) {
        return;
    }
    stat(DnsStat::Answers);
    let learn_for = if get(st!(s, learn)) != 0 { get(st!(s, local)) } else { 0 };
    // An answer no query of the pod asked for is still reported, never learned from.
    if learn_for != 0 && !answers_a_query(s) {
        stat(DnsStat::NoQuery);
        put(st!(s, outcome), DnsStat::NoQuery as u32);
        event(skb, s);
        return;
    }
    let outcome = parse(s, cfg, learn_for);
    put(st!(s, outcome), outcome);
    event(skb, s);
}

/// Finds the message in the skb and copies it into the scratch. False when there is
/// nothing to parse (counted, except an empty TCP segment).
#[inline(never)]
fn locate(skb: *mut __sk_buff, s: *mut Scratch) -> bool {
    let ctx = TcContext::new(skb);
    let l4 = get(st!(s, l4_off)) & 0xffff;
    let ip_end = get(st!(s, ip_end));
    let proto = get(st!(s, proto));
    let skb_len = unsafe { (*skb).len };
    let end = if ip_end < skb_len { ip_end } else { skb_len };
    let (off, msg_len, avail);
    if proto == IPPROTO_UDP as u32 {
        let Ok(ulen) = ctx.load::<u16>(l4 as usize + 4) else { return false };
        let ulen = u16::from_be(ulen) as u32;
        off = l4 + 8;
        if ulen < 8 || end < off {
            stat(DnsStat::Short);
            return false;
        }
        msg_len = ulen - 8;
        let present = end - off;
        // A first fragment (or a cut packet) holds less than the UDP length says.
        avail = if msg_len < present { msg_len } else { present };
    } else if proto == IPPROTO_TCP as u32 {
        let Ok(doff) = ctx.load::<u8>(l4 as usize + 12) else { return false };
        let start = l4 + ((doff as u32) >> 4) * 4;
        if end <= start {
            return false; // a pure ACK
        }
        let payload = end - start;
        let Ok(seq) = ctx.load::<u32>(l4 as usize + 4) else { return false };
        put(st!(s, seq), u32::from_be(seq));
        let prefix = match ctx.load::<u16>(start as usize) {
            Ok(p) if payload >= 2 => u16::from_be(p) as u32,
            _ => {
                stat(DnsStat::TcpPartial);
                return false;
            }
        };
        // One whole message per skb, or nothing.
        if payload != prefix + 2 {
            stat(DnsStat::TcpPartial);
            return false;
        }
        off = start + 2;
        msg_len = prefix;
        avail = prefix;
    } else {
        return false;
    }
    if avail < 12 {
        stat(DnsStat::Short);
        return false;
    }
    let want = if avail < DNS_SCRATCH as u32 { avail } else { DNS_SCRATCH as u32 };
    // [1, DNS_SCRATCH] as the verifier sees it (a zero-sized read is rejected).
    let n = ((want.wrapping_sub(1)) & MASK) + 1;
    let r = unsafe { bpf_skb_load_bytes(skb as *const c_void, off, addr_of_mut!((*s).msg) as *mut c_void, n) };
    if r != 0 {
        stat(DnsStat::Short);
        return false;
    }
    put(st!(s, off), off);
    put(st!(s, avail), avail);
    put(st!(s, msg_len), msg_len);
    put(st!(s, n), n);
    put(st!(s, cut), (n < msg_len) as u32);
    put(st!(s, slots), 0);
    put(st!(s, ips), 0);
    put(st!(s, ancount), 0);
    true
}

/// Parses the loaded message, learns for identity `local` (0: learn nothing, the
/// endpoint only wants visibility), counts; returns the outcome for the event.
#[inline(never)]
fn parse(s: *mut Scratch, cfg: &FqdnConfig, local: u32) -> u32 {
    let r = header(s);
    if r != OK {
        stat_n(r);
        return r;
    }
    let r = question(s, cfg);
    if r != OK {
        stat_n(r);
        return r;
    }
    let slots = if local != 0 { name_slots(s, cfg, local) } else { 0 };
    put(st!(s, slots), slots);
    if slots == 0 {
        stat(DnsStat::NoMatch);
        return DnsStat::NoMatch as u32;
    }
    let an = get(st!(s, ancount));
    if an == 0 {
        return DnsStat::Answers as u32; // NODATA
    }
    let r = answers(s, cfg, local);
    let ips = get(st!(s, ips));
    if ips != 0 {
        stat(DnsStat::Learned);
        stat_add(DnsStat::IpsLearned, ips as u64);
    }
    if r != OK {
        stat_n(r);
    } else if an > FQDN_MAX_IPS_PER_ANSWER {
        stat(DnsStat::IpsCapped);
    }
    if ips != 0 {
        DnsStat::Learned as u32
    } else if r != OK {
        r
    } else {
        DnsStat::Answers as u32
    }
}

#[inline(always)]
fn stat_n(r: u32) {
    if let Some(p) = DNS_STATS.get_ptr_mut(r & (DNS_STAT_SLOTS - 1)) {
        unsafe { *p += 1 };
    }
}

/// The fixed header: a standard query response without error, one question.
#[inline(never)]
fn header(s: *mut Scratch) -> u32 {
    let b2 = byte(s, 2);
    let b3 = byte(s, 3);
    if b2 & 0x80 == 0 {
        return DnsStat::NotResponse as u32;
    }
    if (b2 >> 3) & 0xf != 0 {
        return DnsStat::Opcode as u32;
    }
    if b2 & 0x02 != 0 {
        return DnsStat::Truncated as u32;
    }
    if b3 & 0xf != 0 {
        return DnsStat::Rcode as u32;
    }
    if be16(s, 4) != 1 {
        return DnsStat::Qdcount as u32;
    }
    put(st!(s, ancount), be16(s, 6));
    OK
}

/// The question: its name's labels hashed into `label_hash`, then QTYPE A/AAAA and
/// QCLASS IN. Leaves `p` at the answer section.
#[inline(never)]
fn question(s: *mut Scratch, cfg: &FqdnConfig) -> u32 {
    let n = get(st!(s, n));
    let key = cfg.hash_key;
    let mut p: u32 = 12;
    let mut i: u32 = 0;
    // One more round than labels allowed: it reads the terminating zero.
    while i <= FQDN_MAX_LABELS {
        if p >= n {
            return DnsStat::QnameBad as u32;
        }
        let b = byte(s, p);
        if b == 0 {
            break;
        }
        if b & 0xc0 == 0xc0 {
            return DnsStat::QnamePointer as u32;
        }
        if b & 0xc0 != 0 {
            return DnsStat::QnameBad as u32; // 0x40/0x80 label types, or a label over 63
        }
        if i >= FQDN_MAX_LABELS {
            return DnsStat::QnameLabels as u32;
        }
        // The label within the loaded bytes, the whole name (with its final zero
        // byte) within 255.
        if p + 1 + b > n || p + 1 + b - 12 + 1 > 255 {
            return DnsStat::QnameBad as u32;
        }
        let at = p;
        let h = label_hash_words(key, b, |k| word(s, at.wrapping_add(k)));
        unsafe { *(*s).label_hash.as_mut_ptr().add((i & (FQDN_MAX_LABELS - 1)) as usize) = h };
        p = p + 1 + b;
        i += 1;
    }
    if i > FQDN_MAX_LABELS {
        return DnsStat::QnameLabels as u32;
    }
    // The zero byte, QTYPE, QCLASS.
    if p + 5 > n {
        return DnsStat::QnameBad as u32;
    }
    let qtype = be16(s, p + 1);
    let qclass = be16(s, p + 3);
    if (qtype != TYPE_A && qtype != TYPE_AAAA) || qclass != CLASS_IN {
        return DnsStat::Qtype as u32;
    }
    put(st!(s, nlabels), i);
    put(st!(s, p), p + 5);
    OK
}

/// The slots of every FQDN rule of `local` the question name matches: the exact name,
/// and each parent suffix for `*.` patterns (chained right to left).
#[inline(never)]
fn name_slots(s: *mut Scratch, cfg: &FqdnConfig, local: u32) -> u32 {
    let nl = get(st!(s, nlabels));
    let key = cfg.hash_key;
    let mut h = 0u64;
    let mut k = 0u32;
    while k < FQDN_MAX_LABELS {
        if k >= nl {
            break;
        }
        let i = nl.wrapping_sub(1).wrapping_sub(k);
        let l = unsafe { *(*s).label_hash.as_ptr().add((i & (FQDN_MAX_LABELS - 1)) as usize) };
        h = chain_hash(key, l, h);
        let kind = if i == 0 { NAME_EXACT } else { NAME_SUFFIX };
        if let Some(v) = unsafe { FQDN_NAMES.get(&FqdnNameKey::new(local, kind, h)) } {
            let slots = get(st!(s, slots)) | v.slots;
            put(st!(s, slots), slots);
        }
        k += 1;
    }
    get(st!(s, slots))
}

/// Where the record walk stopped at the end of the loaded bytes.
#[inline(always)]
fn ran_out(s: *mut Scratch) -> u32 {
    if get(st!(s, cut)) != 0 {
        DnsStat::Partial as u32
    } else {
        DnsStat::AnswerBad as u32
    }
}

/// The answer section: every A/AAAA record of class IN is learned under the question's
/// slots (CNAME and other types are skipped by their length: the question name governs).
#[inline(never)]
fn answers(s: *mut Scratch, cfg: &FqdnConfig, local: u32) -> u32 {
    let n = get(st!(s, n));
    let an = get(st!(s, ancount));
    let now = unsafe { bpf_ktime_get_ns() };
    let (min_ttl, max_ttl) = (cfg.min_ttl_s, cfg.max_ttl_s);
    let mut r = 0u32;
    while r < FQDN_MAX_IPS_PER_ANSWER {
        if r >= an {
            break;
        }
        let mut p = get(st!(s, p));
        // Owner name: skipped, never followed; a pointer ends it.
        let mut k = 0u32;
        let mut ended = false;
        while k < FQDN_MAX_LABELS {
            if p >= n {
                return ran_out(s);
            }
            let b = byte(s, p);
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
                return DnsStat::AnswerBad as u32;
            }
            p = p + 1 + b;
            k += 1;
        }
        if !ended {
            return DnsStat::AnswerBad as u32;
        }
        // Through memory: the verifier forgets how far each exit above moved `p`, so
        // the 2 x 32 ways out of the owner walk verify the record body once, not each.
        put(st!(s, p), p);
        let mut p = get(st!(s, p));
        if p + 10 > n {
            return ran_out(s);
        }
        let ty = be16(s, p);
        let class = be16(s, p + 2);
        let ttl = be32(s, p + 4);
        let rdlen = be16(s, p + 8);
        p += 10;
        if p + rdlen > n {
            return ran_out(s);
        }
        if class == CLASS_IN && (ty == TYPE_A || ty == TYPE_AAAA) {
            let want = if ty == TYPE_A { 4 } else { 16 };
            if rdlen != want {
                return DnsStat::AnswerBad as u32;
            }
            let mut addr = [0u8; 16];
            if ty == TYPE_A {
                addr[10] = 0xff;
                addr[11] = 0xff;
                addr[12] = byte(s, p) as u8;
                addr[13] = byte(s, p + 1) as u8;
                addr[14] = byte(s, p + 2) as u8;
                addr[15] = byte(s, p + 3) as u8;
            } else {
                let mut j = 0u32;
                while j < 16 {
                    addr[(j & 15) as usize] = byte(s, p + j) as u8;
                    j += 1;
                }
            }
            // RFC 2181 §8: a TTL with the top bit set counts as 0.
            let mut t = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
            if t < min_ttl {
                t = min_ttl;
            }
            if max_ttl != 0 && t > max_ttl {
                t = max_ttl;
            }
            put(st!(s, ttl), t);
            let exp = now + get(st!(s, ttl)) as u64 * 1_000_000_000;
            if learn(local, &addr, exp, get(st!(s, slots))) {
                put(st!(s, ips), get(st!(s, ips)) + 1);
            } else {
                stat(DnsStat::LearnFailed);
            }
        }
        put(st!(s, p), p + rdlen);
        r += 1;
    }
    OK
}

/// (local, addr) allowed until at least `exp` for `slots` as well. Keeps the later expiry
/// and the union of slots; a lost race between two CPUs can drop a slot bit (fails closed).
#[inline(never)]
fn learn(local: u32, addr: &[u8; 16], exp: u64, slots: u32) -> bool {
    let key = FqdnLearnedKey { addr: *addr, local_id: local };
    let (old_exp, old_slots) = match unsafe { FQDN_LEARNED.get(&key) } {
        Some(v) => (v.expires_ns, v.slots),
        None => (0, 0),
    };
    let v = FqdnLearnedValue { expires_ns: if old_exp > exp { old_exp } else { exp }, slots: old_slots | slots, _pad: 0 };
    FQDN_LEARNED.insert(&key, &v, 0).is_ok()
}

/// Token bucket of DNS events: `events_per_sec` a second, as much banked.
#[inline(always)]
fn take_token(rate: u32, now: u64) -> bool {
    match DNS_RATELIMIT.get_ptr_mut(0) {
        Some(rl) => crate::verdict::take_token_from(unsafe { &mut *rl }, rate, rate, now),
        None => false,
    }
}

/// A copy of the answer (its first `DNS_EVENT_DATA` bytes) for user space.
#[inline(never)]
fn event(skb: *mut __sk_buff, s: *mut Scratch) {
    let now = unsafe { bpf_ktime_get_ns() };
    let rate = match FQDN_CONFIG.get(0) {
        Some(c) => c.events_per_sec,
        None => 0,
    };
    if !take_token(rate, now) {
        stat(DnsStat::EventRateLimited);
        return;
    }
    let Some(mut e) = DNS_EVENTS.reserve::<DnsEvent>(0) else {
        stat(DnsStat::EventRingFull);
        return;
    };
    let avail = get(st!(s, avail));
    let want = if avail < DNS_EVENT_DATA as u32 { avail } else { DNS_EVENT_DATA as u32 };
    let copy = (want.wrapping_sub(1) & (DNS_EVENT_DATA as u32 - 1)) + 1;
    let (slots, ips, outcome) = (get(st!(s, slots)), get(st!(s, ips)), get(st!(s, outcome)));
    let (proto, msg_len, off) = (get(st!(s, proto)), get(st!(s, msg_len)), get(st!(s, off)));
    let (local, ifindex) = (get(st!(s, local)), get(st!(s, ifindex)));
    let p = e.as_mut_ptr();
    unsafe {
        addr_of_mut!((*p).ts_ns).write(now);
        addr_of_mut!((*p).local_id).write(local);
        addr_of_mut!((*p).ifindex).write(ifindex);
        addr_of_mut!((*p).client).write((*s).st.client);
        addr_of_mut!((*p).server).write((*s).st.server);
        addr_of_mut!((*p).slots).write(slots);
        addr_of_mut!((*p).ips_learned).write(ips as u16);
        addr_of_mut!((*p).outcome).write(outcome as u8);
        addr_of_mut!((*p).proto).write(proto as u8);
        addr_of_mut!((*p).msg_len).write(msg_len as u16);
        addr_of_mut!((*p)._pad).write(0);
        let r = bpf_skb_load_bytes(skb as *const c_void, off, addr_of_mut!((*p).data) as *mut c_void, copy);
        addr_of_mut!((*p).copy_len).write(if r == 0 { copy as u16 } else { 0 });
    }
    e.submit(0);
    stat(DnsStat::EventSent);
}
