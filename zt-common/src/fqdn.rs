//! FQDN egress policy: map layouts shared by the kernel's DNS capture (zt-ebpf
//! `dns.rs`/`fqdn.rs`), the agent's compiler and runtime, and ztctl; plus the keyed
//! name hash both sides compute, so that the two can never diverge.

// ---------------------------------------------------------------------------
// Identities and endpoint flags
// ---------------------------------------------------------------------------

/// Reserved identity of the configured resolver addresses (`--fqdn-dns-address`).
pub const IDENTITY_DNS: u32 = 5;
/// Capture DNS answers to this local endpoint and learn from them (it has FQDN rules).
pub const EP_FQDN: u32 = 1 << 3;
/// Copy every DNS answer to this endpoint to user space (a `*` pattern applies).
pub const EP_DNS_VISIBILITY: u32 = 1 << 4;

// ---------------------------------------------------------------------------
// Map names (pin names) and capacities
// ---------------------------------------------------------------------------

/// Array of one `FqdnConfig`.
pub const MAP_FQDN_CONFIG: &str = "ZT_FQDN_CONFIG";
/// Hash `FqdnNameKey -> FqdnNameValue`, written by the agent.
pub const MAP_FQDN_NAMES: &str = "ZT_FQDN_NAMES";
/// LPM trie `PolicyKey (peer 0, DIR_EGRESS) -> FqdnPortsValue`, written by the agent.
pub const MAP_FQDN_PORTS: &str = "ZT_FQDN_PORTS";
/// LRU hash `FqdnLearnedKey -> FqdnLearnedValue`, written by the kernel (agent GC).
pub const MAP_FQDN_LEARNED: &str = "ZT_FQDN_LEARNED";
/// Hash `u32 identity -> u32 (1)`: the trusted resolver identities, written by the agent.
pub const MAP_DNS_SERVERS: &str = "ZT_DNS_SERVERS";
/// Per-CPU array of `u64` counters indexed by `DnsStat`.
pub const MAP_DNS_STATS: &str = "ZT_DNS_STATS";
/// Ring buffer of `DnsEvent`.
pub const MAP_DNS_EVENTS: &str = "ZT_DNS_EVENTS";
/// LRU hash `DnsQueryKey -> DnsQueryValue`: the queries capturing pods sent to trusted
/// resolvers and that no answer has matched yet, written and consumed by the kernel.
pub const MAP_DNS_QUERIES: &str = "ZT_DNS_QUERIES";

pub const DEFAULT_FQDN_NAMES_MAX: u32 = 65536;
pub const DEFAULT_FQDN_PORTS_MAX: u32 = 16384;
pub const DEFAULT_FQDN_LEARNED_MAX: u32 = 65536;
pub const DNS_SERVERS_MAX: u32 = 1024;
pub const DNS_EVENTS_RING_BYTES: u32 = 1 << 20;
pub const DEFAULT_DNS_QUERIES_MAX: u32 = 16384;
/// An answer teaches only within this time of its query.
pub const DNS_QUERY_TIMEOUT_NS: u64 = 30_000_000_000;

/// FQDN rules per local identity (bits of the `slots` masks).
pub const FQDN_MAX_SLOTS: u32 = 32;
/// Addresses learned from one answer; the rest count `ips-capped`.
pub const FQDN_MAX_IPS_PER_ANSWER: u32 = 32;
/// Labels of a question name; more is `qname-labels`.
pub const FQDN_MAX_LABELS: u32 = 32;
/// Bytes of a message the kernel parses. A power of two: indexes are `& (DNS_SCRATCH-1)`.
pub const DNS_SCRATCH: usize = 2048;
/// Bytes of a message copied into a `DnsEvent`.
pub const DNS_EVENT_DATA: usize = 1024;

/// `FqdnNameKey::kind`: the exact name.
pub const NAME_EXACT: u8 = 1;
/// `FqdnNameKey::kind`: `*.S`, the name S with one or more labels before it.
pub const NAME_SUFFIX: u8 = 2;

// ---------------------------------------------------------------------------
// Map layouts
// ---------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnConfig {
    /// SipHash key of the name hashes (16 random bytes, kept across restarts).
    pub hash_key: [u64; 2],
    /// A learned address lives at least / at most this long (seconds) past its answer.
    pub min_ttl_s: u32,
    pub max_ttl_s: u32,
    /// New flows stay allowed this long past the expiry (seconds).
    pub grace_s: u32,
    /// DnsEvent budget per CPU per second (also the burst).
    pub events_per_sec: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnNameKey {
    pub name_hash: u64,
    pub local_id: u32,
    /// `NAME_EXACT` or `NAME_SUFFIX`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

impl FqdnNameKey {
    pub const fn new(local_id: u32, kind: u8, name_hash: u64) -> Self {
        FqdnNameKey { name_hash, local_id, kind, _pad: [0; 3] }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnNameValue {
    /// FQDN slots (rules) of the local identity this name matches.
    pub slots: u32,
    pub _pad: u32,
}

/// Value of `ZT_FQDN_PORTS` (key: `PolicyKey` with `peer_id_be = 0`, `dir = DIR_EGRESS`,
/// prefixes 72/80/96 as in the policy trie; each entry already includes the slots of
/// every shorter prefix covering it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnPortsValue {
    /// Slots whose rule allows this (protocol, port).
    pub slots: u32,
    /// Rule id of each slot.
    pub rule_ids: [u32; 32],
}

impl Default for FqdnPortsValue {
    fn default() -> Self {
        FqdnPortsValue { slots: 0, rule_ids: [0; 32] }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnLearnedKey {
    /// Learned address, 16 bytes (IPv4 mapped).
    pub addr: [u8; 16],
    pub local_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnLearnedValue {
    /// `bpf_ktime_get_ns` after which no new flow is allowed (plus `grace_s`).
    pub expires_ns: u64,
    /// Slots of the names this address was learned under.
    pub slots: u32,
    pub _pad: u32,
}

/// One captured answer, copied to user space through `ZT_DNS_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    pub ts_ns: u64,
    pub local_id: u32,
    /// Hook interface (0 for the cgroup programs).
    pub ifindex: u32,
    /// The pod's address and the resolver's address (16 bytes, IPv4 mapped).
    pub client: [u8; 16],
    pub server: [u8; 16],
    /// Slots the question name matched.
    pub slots: u32,
    pub ips_learned: u16,
    /// `DnsStat` value of the answer's outcome.
    pub outcome: u8,
    /// IP protocol (17 UDP, 6 TCP).
    pub proto: u8,
    /// Length of the whole DNS message, and of the part copied into `data`.
    pub msg_len: u16,
    pub copy_len: u16,
    pub _pad: u32,
    pub data: [u8; DNS_EVENT_DATA],
}

/// A query a capturing pod sent to a trusted resolver, as its answer must match it:
/// same addresses and client port, same transaction ID, same protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsQueryKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    /// The DNS transaction ID, as it appears on the wire (big-endian value).
    pub txid: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsQueryValue {
    pub created_ns: u64,
    /// TCP: the sequence number the response stream starts at (the query segment's
    /// acknowledgement number): only a segment starting there is a whole first message.
    pub resp_seq: u32,
    /// `question_hash` of the query's question section: an answer must echo the same
    /// question. 0: the query's question could not be read (nothing to compare; the
    /// parser refuses such answers anyway).
    pub qhash: u32,
}

/// FNV-1a over a DNS question section as it is on the wire (the name's labels up to its
/// zero byte, then QTYPE and QCLASS), which an answer echoes byte for byte. `byte(i)` is
/// the section's i-th byte, None past the end. None when it is no well-formed question
/// within 255 + 4 bytes (a pointer, a label type other than 0, truncated); never 0.
#[inline(always)]
pub fn question_hash(byte: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
    let mut h: u32 = 0x811c_9dc5;
    question_walk(byte, |b| h = (h ^ b).wrapping_mul(0x0100_0193))?;
    Some(h | 1)
}

/// The length of a DNS question section (as `question_hash` reads it), if well formed.
#[inline(always)]
pub fn question_len(byte: impl FnMut(u32) -> Option<u32>) -> Option<u32> {
    question_walk(byte, |_| {})
}

/// Reads a question section byte by byte, handing each to `each`; its length, or None
/// (see `question_hash`).
#[inline(always)]
fn question_walk(mut byte: impl FnMut(u32) -> Option<u32>, mut each: impl FnMut(u32)) -> Option<u32> {
    // Bytes left in the current label; QTYPE/QCLASS bytes left after the zero byte.
    let (mut rem, mut tail) = (0u32, 0u32);
    let mut i: u32 = 0;
    while i < 255 + 4 {
        let b = byte(i)? & 0xff;
        each(b);
        i += 1;
        if tail > 0 {
            tail -= 1;
            if tail == 0 {
                return Some(i);
            }
        } else if rem > 0 {
            rem -= 1;
        } else if b == 0 {
            tail = 4;
        } else if b & 0xc0 != 0 {
            return None;
        } else {
            rem = b;
        }
    }
    None
}

impl Default for DnsEvent {
    fn default() -> Self {
        DnsEvent {
            ts_ns: 0,
            local_id: 0,
            ifindex: 0,
            client: [0; 16],
            server: [0; 16],
            slots: 0,
            ips_learned: 0,
            outcome: 0,
            proto: 0,
            msg_len: 0,
            copy_len: 0,
            _pad: 0,
            data: [0; DNS_EVENT_DATA],
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<FqdnConfig>() == 32);
    assert!(core::mem::size_of::<FqdnNameKey>() == 16);
    assert!(core::mem::size_of::<FqdnNameValue>() == 8);
    assert!(core::mem::size_of::<FqdnPortsValue>() == 132);
    assert!(core::mem::size_of::<FqdnLearnedKey>() == 20);
    assert!(core::mem::size_of::<FqdnLearnedValue>() == 16);
    assert!(core::mem::size_of::<DnsEvent>() == 1088);
    assert!(core::mem::size_of::<DnsQueryKey>() == 40);
    assert!(core::mem::size_of::<DnsQueryValue>() == 16);
    assert!(DNS_SCRATCH.is_power_of_two());
    assert!(DNS_EVENT_DATA.is_power_of_two());
    assert!((DnsStat::ALL.len() as u32) <= DNS_STAT_SLOTS);
};

// ---------------------------------------------------------------------------
// Capture outcomes (ZT_DNS_STATS indexes)
// ---------------------------------------------------------------------------

/// Slots of the `ZT_DNS_STATS` per-CPU array.
pub const DNS_STAT_SLOTS: u32 = 32;

/// What the capture did with a DNS answer; the index of its counter in `ZT_DNS_STATS`.
/// `Answers`, `Learned`, `IpsLearned` and the `Event*` counters add to the outcome of
/// the same answer; the others are each one answer's outcome.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DnsStat {
    /// A trusted answer was parsed (whatever came of it).
    Answers = 0,
    /// Shorter than the 12-byte header.
    Short = 1,
    /// The answer learned at least one address.
    Learned = 2,
    /// Addresses learned (one per address).
    IpsLearned = 3,
    /// The question name matched no FQDN rule of the pod.
    NoMatch = 4,
    /// The answer's source is no trusted resolver identity.
    NotTrusted = 5,
    /// An answer from port 53 to an FQDN pod with no conntrack entry (unsolicited).
    Untracked = 6,
    /// QR = 0: a query, not a response.
    NotResponse = 7,
    /// OPCODE other than QUERY.
    Opcode = 8,
    /// RCODE other than NOERROR (NXDOMAIN, SERVFAIL, ...).
    Rcode = 9,
    /// TC = 1: the client will retry over TCP.
    Truncated = 10,
    /// QDCOUNT other than 1.
    Qdcount = 11,
    /// QTYPE other than A/AAAA, or QCLASS other than IN.
    Qtype = 12,
    /// A compression pointer inside the question name.
    QnamePointer = 13,
    /// A label over 63 bytes, a reserved label type, a name over 255 bytes, or past the end.
    QnameBad = 14,
    /// More than `FQDN_MAX_LABELS` labels.
    QnameLabels = 15,
    /// An unreadable answer record (records before it were learned).
    AnswerBad = 16,
    /// A/AAAA records beyond `FQDN_MAX_IPS_PER_ANSWER`.
    IpsCapped = 17,
    /// The message is longer than `DNS_SCRATCH` or than the packet (first fragment).
    Partial = 18,
    /// A TCP segment that is not exactly one whole DNS message.
    TcpPartial = 19,
    /// A `ZT_FQDN_LEARNED` update failed.
    LearnFailed = 20,
    EventSent = 21,
    EventRateLimited = 22,
    EventRingFull = 23,
    /// An answer from a trusted resolver that matches no query the pod sent (addresses,
    /// client port, transaction ID; over TCP, the start of the response stream), or not
    /// the first answer to match it: nothing learned.
    NoQuery = 24,
    /// Queries recorded (a capturing pod to a trusted resolver).
    Queries = 25,
}

impl DnsStat {
    pub const ALL: [DnsStat; 26] = [
        DnsStat::Answers,
        DnsStat::Short,
        DnsStat::Learned,
        DnsStat::IpsLearned,
        DnsStat::NoMatch,
        DnsStat::NotTrusted,
        DnsStat::Untracked,
        DnsStat::NotResponse,
        DnsStat::Opcode,
        DnsStat::Rcode,
        DnsStat::Truncated,
        DnsStat::Qdcount,
        DnsStat::Qtype,
        DnsStat::QnamePointer,
        DnsStat::QnameBad,
        DnsStat::QnameLabels,
        DnsStat::AnswerBad,
        DnsStat::IpsCapped,
        DnsStat::Partial,
        DnsStat::TcpPartial,
        DnsStat::LearnFailed,
        DnsStat::EventSent,
        DnsStat::EventRateLimited,
        DnsStat::EventRingFull,
        DnsStat::NoQuery,
        DnsStat::Queries,
    ];

    pub fn from_u8(v: u8) -> Option<DnsStat> {
        Self::ALL.iter().copied().find(|s| *s as u8 == v)
    }

    /// Stable name used in metrics labels, events and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            DnsStat::Answers => "answers",
            DnsStat::Short => "short",
            DnsStat::Learned => "learned",
            DnsStat::IpsLearned => "ips-learned",
            DnsStat::NoMatch => "no-match",
            DnsStat::NotTrusted => "not-trusted",
            DnsStat::Untracked => "untracked",
            DnsStat::NotResponse => "not-response",
            DnsStat::Opcode => "opcode",
            DnsStat::Rcode => "rcode",
            DnsStat::Truncated => "truncated",
            DnsStat::Qdcount => "qdcount",
            DnsStat::Qtype => "qtype",
            DnsStat::QnamePointer => "qname-pointer",
            DnsStat::QnameBad => "qname-bad",
            DnsStat::QnameLabels => "qname-labels",
            DnsStat::AnswerBad => "answer-bad",
            DnsStat::IpsCapped => "ips-capped",
            DnsStat::Partial => "partial",
            DnsStat::TcpPartial => "tcp-partial",
            DnsStat::LearnFailed => "learn-failed",
            DnsStat::EventSent => "event-sent",
            DnsStat::EventRateLimited => "event-rate-limited",
            DnsStat::EventRingFull => "event-ring-full",
            DnsStat::NoQuery => "no-query",
            DnsStat::Queries => "queries",
        }
    }
}

// ---------------------------------------------------------------------------
// Name hash: keyed SipHash-1-3, label by label, chained right to left
// ---------------------------------------------------------------------------

/// Streaming SipHash-1-3 over a byte sequence (the reference algorithm: `write_u64`
/// appends 8 little-endian bytes). no_std, wrapping arithmetic and rotations only, so
/// the kernel can run it.
#[derive(Clone, Copy, Debug)]
pub struct Sip13 {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Pending bytes (little-endian) and how many there are (0..8).
    tail: u64,
    ntail: u32,
    /// Total bytes written (only its low byte enters the result).
    len: u32,
}

impl Sip13 {
    #[inline(always)]
    pub const fn new(key: [u64; 2]) -> Self {
        Sip13 {
            v0: key[0] ^ 0x736f6d6570736575,
            v1: key[1] ^ 0x646f72616e646f6d,
            v2: key[0] ^ 0x6c7967656e657261,
            v3: key[1] ^ 0x7465646279746573,
            tail: 0,
            ntail: 0,
            len: 0,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13);
        self.v1 ^= self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16);
        self.v3 ^= self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21);
        self.v3 ^= self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17);
        self.v1 ^= self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    /// One message word: one compression round (the "1" of 1-3).
    #[inline(always)]
    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.v0 ^= m;
    }

    #[inline(always)]
    pub fn write_u8(&mut self, b: u8) {
        self.tail |= (b as u64).wrapping_shl(self.ntail.wrapping_mul(8));
        self.ntail += 1;
        self.len = self.len.wrapping_add(1);
        if self.ntail >= 8 {
            let m = self.tail;
            self.compress(m);
            self.tail = 0;
            self.ntail = 0;
        }
    }

    #[inline(always)]
    pub fn write_u64(&mut self, x: u64) {
        self.len = self.len.wrapping_add(8);
        if self.ntail == 0 {
            self.compress(x);
        } else {
            // ntail is 1..=7 here, so both shifts are within 8..=56.
            let sh = (self.ntail & 7).wrapping_mul(8);
            let m = self.tail | x.wrapping_shl(sh);
            self.compress(m);
            self.tail = x.wrapping_shr(64u32.wrapping_sub(sh));
        }
    }

    /// Appends one whole little-endian word; only valid at a word boundary (after
    /// `new` or whole words), which is how `label_hash_words` uses it.
    #[inline(always)]
    pub fn write_word(&mut self, m: u64) {
        self.len = self.len.wrapping_add(8);
        self.compress(m);
    }

    /// Appends the last `nbytes` (0..=7) bytes of the message, little-endian in `tail`
    /// (higher bytes zero); only valid at a word boundary. Then call `finish`.
    #[inline(always)]
    pub fn write_tail(&mut self, tail: u64, nbytes: u32) {
        self.tail = tail;
        self.ntail = nbytes & 7;
        self.len = self.len.wrapping_add(nbytes & 7);
    }

    #[inline(always)]
    pub fn finish(&self) -> u64 {
        let mut s = *self;
        let b = ((s.len as u64 & 0xff) << 56) | s.tail;
        s.compress(b);
        s.v2 ^= 0xff;
        s.round();
        s.round();
        s.round();
        s.v0 ^ s.v1 ^ s.v2 ^ s.v3
    }
}

/// RFC 4343: only ASCII letters are case-insensitive; every other byte stays as it is
/// (and can never match a validated name).
#[inline(always)]
pub const fn dns_lower(b: u8) -> u8 {
    if b >= b'A' && b <= b'Z' {
        b | 0x20
    } else {
        b
    }
}

/// `dns_lower` of each byte of a little-endian word, branch-free (SWAR): a byte
/// below 0x80 gets 0x20 set when it is in `A..=Z`; bytes with the top bit stay.
#[inline(always)]
pub const fn dns_lower_word(w: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let h = w & LOW7;
    // Per byte, no carry between bytes (h <= 0x7f): bit 7 set iff byte >= 'A' / > 'Z'.
    let ge_a = h.wrapping_add(0x3f3f_3f3f_3f3f_3f3f);
    let gt_z = h.wrapping_add(0x2525_2525_2525_2525);
    let upper = ge_a & !gt_z & !w & HIGH;
    w | (upper >> 2)
}

/// `L_i` of the label whose length byte is at stream offset 0: `load_word(i)` returns
/// the 8 bytes at offsets `i..i+8` of `len, label bytes...` little-endian (bytes past
/// the label may be anything). The length byte (<= 63) is below 'A', so lowering whole
/// words leaves it intact. Whole words, then the tail: the same hash as `label_hash`,
/// without a per-byte loop (the kernel's verifier cost). `len` must be <= 63.
#[inline(always)]
pub fn label_hash_words(key: [u64; 2], len: u32, load_word: impl Fn(u32) -> u64) -> u64 {
    let total = (len & 63) + 1;
    let words = total >> 3;
    let rem = total & 7;
    let mut s = Sip13::new(key);
    let mut w = 0u32;
    while w < 8 {
        if w >= words {
            break;
        }
        s.write_word(dns_lower_word(load_word(w * 8)));
        w += 1;
    }
    // rem <= 7: the shift is at most 56.
    let mask = (1u64 << (rem * 8)) - 1;
    s.write_tail(dns_lower_word(load_word((words & 7) * 8)) & mask, rem);
    s.finish()
}

/// `h_i = Sip13(key) <- L_i <- h_{i+1}`: the hash of the name made of label `i` (whose
/// label hash is `label`) followed by the name whose hash is `next` (0 for the root).
#[inline(always)]
pub fn chain_hash(key: [u64; 2], label: u64, next: u64) -> u64 {
    let mut s = Sip13::new(key);
    s.write_u64(label);
    s.write_u64(next);
    s.finish()
}

/// `L_i = Sip13(key) <- len, lowercase(bytes)` of one label.
pub fn label_hash(key: [u64; 2], label: &[u8]) -> u64 {
    let mut s = Sip13::new(key);
    s.write_u8(label.len() as u8);
    for b in label {
        s.write_u8(dns_lower(*b));
    }
    s.finish()
}

/// Hashes of a dotted name (one trailing dot ignored, ASCII case folded):
/// `(exact, suffixes, count)` where `count` is the number of labels (at most
/// `FQDN_MAX_LABELS` are stored) and `suffixes[j]` is `h_j`, the hash of the name made
/// of labels `j..` (so `suffixes[0] == exact`). The key of the pattern `*.S` is the
/// `exact` hash of `S`; it matches a question name at any `j >= 1`. A name of more than
/// `FQDN_MAX_LABELS` labels never matches in the kernel (`qname-labels`). The root ("" or
/// ".") has no labels and hash 0.
pub fn name_hashes(key: [u64; 2], name: &str) -> (u64, [u64; 32], usize) {
    let mut suffixes = [0u64; 32];
    let bytes = name.as_bytes();
    let bytes = match bytes.last() {
        Some(b'.') => &bytes[..bytes.len() - 1],
        _ => bytes,
    };
    if bytes.is_empty() {
        return (0, suffixes, 0);
    }
    let nlabels = bytes.split(|b| *b == b'.').count();
    // Right to left: label j (0-based from the left) gets h_j.
    let mut h = 0u64;
    for (k, label) in bytes.rsplit(|b| *b == b'.').enumerate() {
        let j = nlabels - 1 - k;
        h = chain_hash(key, label_hash(key, label), h);
        if j < suffixes.len() {
            suffixes[j] = h;
        }
    }
    (h, suffixes, nlabels.min(FQDN_MAX_LABELS as usize))
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for FqdnConfig {}
    unsafe impl aya::Pod for FqdnNameKey {}
    unsafe impl aya::Pod for FqdnNameValue {}
    unsafe impl aya::Pod for FqdnPortsValue {}
    unsafe impl aya::Pod for FqdnLearnedKey {}
    unsafe impl aya::Pod for FqdnLearnedValue {}
    unsafe impl aya::Pod for DnsEvent {}
    unsafe impl aya::Pod for DnsQueryKey {}
    unsafe impl aya::Pod for DnsQueryValue {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn sip13(key: [u64; 2], msg: &[u8]) -> u64 {
        let mut s = Sip13::new(key);
        for b in msg {
            s.write_u8(*b);
        }
        s.finish()
    }

    /// SipHash-1-3 of the messages 00 01 02 .. (len 0..63) with the all-zero key, from
    /// the reference implementation (github.com/veorq/SipHash), as published in OCaml's
    /// test suite (testsuite/tests/hashing/sip13 vectors, seed 0).
    const REF_ZERO_KEY: [u64; 8] = [
        0xd1fba762150c532c,
        0x68a914128e01e473,
        0x010bac45c41e3669,
        0x4d4c9a4a8ef6e0ad,
        0x7cc43f98813e4dbd,
        0x5abe2169dff36275,
        0xe3c25f87624f1cdb,
        0x2f098ab0c751325a,
    ];
    const REF_ZERO_KEY_8_TO_16: [u64; 9] = [
        0xead411e67ebe2eea,
        0x75927f9d95124362,
        0xaf9f77a65ab51a1d,
        0xfe64ce8b6617fcff,
        0xa6baf4fb0f9fe1c2,
        0xa0cf3211850f8e0d,
        0x7f86049379fbfe67,
        0xf30eb725bb91c9ea,
        0x8972188433a5c5b7,
    ];
    const REF_ZERO_KEY_63: u64 = 0x385d3e39e5f37359;

    #[test]
    fn sip13_known_answers() {
        let msg: std::vec::Vec<u8> = (0u8..64).collect();
        for (len, want) in REF_ZERO_KEY.iter().enumerate() {
            assert_eq!(sip13([0, 0], &msg[..len]), *want, "len {len}");
        }
        for (i, want) in REF_ZERO_KEY_8_TO_16.iter().enumerate() {
            assert_eq!(sip13([0, 0], &msg[..8 + i]), *want, "len {}", 8 + i);
        }
        assert_eq!(sip13([0, 0], &msg[..63]), REF_ZERO_KEY_63);
    }

    /// std's DefaultHasher::new() is SipHash-1-3 with the zero key, fed as a byte stream.
    #[test]
    fn sip13_matches_std_default_hasher() {
        use std::hash::Hasher;
        let msg: std::vec::Vec<u8> = (0u8..=200).map(|i| i.wrapping_mul(37)).collect();
        for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 100, 201] {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(&msg[..len]);
            assert_eq!(sip13([0, 0], &msg[..len]), h.finish(), "len {len}");
        }
    }

    /// write_u64 is 8 little-endian write_u8s at every alignment.
    #[test]
    fn write_u64_is_le_bytes() {
        let key = [0x0706050403020100, 0x0f0e0d0c0b0a0908];
        let x = 0x1122334455667788u64;
        for pre in 0..9usize {
            let mut a = Sip13::new(key);
            let mut b = Sip13::new(key);
            for i in 0..pre {
                a.write_u8(i as u8);
                b.write_u8(i as u8);
            }
            a.write_u64(x);
            for byte in x.to_le_bytes() {
                b.write_u8(byte);
            }
            a.write_u8(0xab);
            b.write_u8(0xab);
            assert_eq!(a.finish(), b.finish(), "prefix {pre}");
        }
    }

    #[test]
    fn lower_word_matches_bytes() {
        let mut x = 0x243f_6a88_85a3_08d3u64;
        for _ in 0..20000 {
            // xorshift
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let want = u64::from_le_bytes(x.to_le_bytes().map(dns_lower));
            assert_eq!(dns_lower_word(x), want, "{x:#x}");
        }
        for b in 0..=255u8 {
            let w = u64::from_le_bytes([b, 0x41, b, 0x5a, b, 0x40, b, 0x5b]);
            assert_eq!(dns_lower_word(w), u64::from_le_bytes(w.to_le_bytes().map(dns_lower)));
        }
    }

    #[test]
    fn label_hash_words_matches_streaming() {
        let key = [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210];
        for len in 0..=63usize {
            let label: std::vec::Vec<u8> = (0..len).map(|i| b"AbCzZ-_09xyQ"[i % 12] ^ (i as u8 & 0x80)).collect();
            // The stream as it sits in a message, with junk after it.
            let mut msg = std::vec![len as u8];
            msg.extend_from_slice(&label);
            msg.extend_from_slice(&[0xAA; 16]);
            let load = |i: u32| {
                let i = i as usize;
                u64::from_le_bytes(msg[i..i + 8].try_into().unwrap())
            };
            assert_eq!(label_hash_words(key, len as u32, load), label_hash(key, &label), "len {len}");
        }
    }

    #[test]
    fn key_changes_hash() {
        let (a, _, _) = name_hashes([1, 2], "api.example.com");
        let (b, _, _) = name_hashes([1, 3], "api.example.com");
        assert_ne!(a, b);
    }

    #[test]
    fn name_hashes_chain_and_suffixes() {
        let key = [0xdead_beef, 0x1234_5678_9abc];
        let (exact, suf, n) = name_hashes(key, "api.example.com");
        assert_eq!(n, 3);
        assert_eq!(suf[0], exact);
        // Suffix j is the exact hash of the name made of labels j..
        assert_eq!(suf[1], name_hashes(key, "example.com").0);
        assert_eq!(suf[2], name_hashes(key, "com").0);
        // The chain by hand.
        let com = chain_hash(key, label_hash(key, b"com"), 0);
        let ex = chain_hash(key, label_hash(key, b"example"), com);
        let api = chain_hash(key, label_hash(key, b"api"), ex);
        assert_eq!((suf[2], suf[1], exact), (com, ex, api));
        // Case and one trailing dot do not matter; label boundaries do.
        assert_eq!(name_hashes(key, "API.Example.COM.").0, exact);
        assert_ne!(name_hashes(key, "xexample.com").0, suf[1]);
        assert_ne!(name_hashes(key, "apiexample.com").0, exact);
        assert_ne!(name_hashes(key, "api.example.co.m").0, exact);
        // The root.
        assert_eq!(name_hashes(key, ".").2, 0);
    }

    #[test]
    fn name_hashes_many_labels() {
        let key = [7, 9];
        let name: std::string::String = (0..40).map(|_| "a.").collect::<std::string::String>() + "com";
        let (exact, suf, n) = name_hashes(key, &name);
        assert_eq!(n, 32);
        assert_eq!(suf[0], exact);
        assert_ne!(suf[31], 0);
    }

    #[test]
    fn lowercase_only_ascii_letters() {
        assert_eq!(dns_lower(b'Q'), b'q');
        assert_eq!(dns_lower(b'@'), b'@');
        assert_eq!(dns_lower(b'['), b'[');
        assert_eq!(dns_lower(0xC1), 0xC1);
    }

    #[test]
    fn dns_stat_names_unique_and_indexed() {
        for (i, s) in DnsStat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(DnsStat::from_u8(i as u8), Some(*s));
            for t in &DnsStat::ALL[i + 1..] {
                assert_ne!(s.name(), t.name());
            }
        }
    }
}
