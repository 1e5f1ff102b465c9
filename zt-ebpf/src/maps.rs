//! Every map of the datapath, pinned by name under the agent's versioned bpffs
//! directory so that a restarted agent (and ztctl) reuse them. Capacities here are
//! defaults; the agent sets the real ones from its flags before loading.
use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use zt_common::*;

#[map(name = "ZT_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Exact IP -> identity: local pods, remote pods, node addresses.
#[map(name = "ZT_ENDPOINTS")]
pub static ENDPOINTS: aya_ebpf::maps::HashMap<EndpointKey, EndpointValue> = aya_ebpf::maps::HashMap::pinned(DEFAULT_ENDPOINTS_MAX, 0);

/// Slot -> a hooked local pod's address and cgroup: the cgroup programs' shortcut past
/// `ENDPOINTS` for a hooked pod's own packets (zt-common owners.rs).
#[map(name = "ZT_LOCAL_OWNERS")]
pub static LOCAL_OWNERS: Array<LocalOwner> = Array::pinned(LOCAL_OWNER_SLOTS, 0);

/// Prefix -> CIDR identity, for peers that are not endpoints.
#[map(name = "ZT_CIDRS")]
pub static CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(DEFAULT_CIDRS_MAX, 0);

/// (local, peer, dir, proto, port) -> allow/deny, ports as prefixes for ranges.
#[map(name = "ZT_POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(DEFAULT_POLICY_MAX, 0);

/// Tunnel endpoints a pod may not send to a node without an explicit allow:
/// `tunnel_key(proto, port)` (port 0: the whole protocol) -> unused.
#[map(name = "ZT_TUNNELS")]
pub static TUNNELS: aya_ebpf::maps::HashMap<u32, u32> = aya_ebpf::maps::HashMap::pinned(TUNNELS_MAX, 0);

/// Tracked flows that are not established TCP (new TCP, closed TCP, UDP, ICMP, other):
/// LRU, so that new flows always find room (evicting the least recently used of these).
#[map(name = "ZT_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CT_MAX, 0);

/// Established TCP flows: a plain hash that nothing evicts (the agent's GC deletes expired
/// entries); when full, a newly established flow stays in `CT` (see conntrack.rs).
#[map(name = "ZT_CT_EST")]
pub static CT_EST: aya_ebpf::maps::HashMap<CtKey, CtValue> = aya_ebpf::maps::HashMap::pinned(DEFAULT_CT_EST_MAX, 0);

/// Conntrack events (`CtStat`): promotions, refusals, demotions, failed inserts.
#[map(name = "ZT_CT_STATS")]
pub static CT_STATS: PerCpuArray<u64> = PerCpuArray::pinned(CT_STAT_SLOTS, 0);

/// First fragments that were allowed, so that their later fragments pass.
#[map(name = "ZT_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::pinned(DEFAULT_FRAGS_MAX, 0);

/// Verdict counters, direction x reason.
#[map(name = "ZT_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_SLOTS, 0);

/// Event delivery statistics (sent, rate-limited, ring full).
#[map(name = "ZT_EVSTATS")]
pub static EVSTATS: PerCpuArray<u64> = PerCpuArray::pinned(EVSTAT_SLOTS, 0);

/// Per-CPU token bucket for events.
#[map(name = "ZT_RATELIMIT")]
pub static RATELIMIT: PerCpuArray<RateLimit> = PerCpuArray::pinned(1, 0);

/// Drop (and optionally allow) events for the agent.
#[map(name = "ZT_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

// ---------------------------------------------------------------------------
// FQDN policy (issue 4): see dns.rs (capture) and fqdn.rs (decision)
// ---------------------------------------------------------------------------

/// Hash key, TTL bounds, grace and event budget of the DNS capture.
#[map(name = "ZT_FQDN_CONFIG")]
pub static FQDN_CONFIG: Array<FqdnConfig> = Array::pinned(1, 0);

/// (local identity, exact/suffix, name hash) -> slots: the names each identity may reach.
#[map(name = "ZT_FQDN_NAMES")]
pub static FQDN_NAMES: aya_ebpf::maps::HashMap<FqdnNameKey, FqdnNameValue> = aya_ebpf::maps::HashMap::pinned(DEFAULT_FQDN_NAMES_MAX, 0);

/// (local, proto, port) -> slots allowing it and their rule ids.
#[map(name = "ZT_FQDN_PORTS")]
pub static FQDN_PORTS: LpmTrie<PolicyKey, FqdnPortsValue> = LpmTrie::pinned(DEFAULT_FQDN_PORTS_MAX, 0);

/// (address, local identity) -> expiry and slots, learned from DNS answers. LRU so that
/// learning goes on (evicting the oldest) when full, also with the agent down.
#[map(name = "ZT_FQDN_LEARNED")]
pub static FQDN_LEARNED: LruHashMap<FqdnLearnedKey, FqdnLearnedValue> = LruHashMap::pinned(DEFAULT_FQDN_LEARNED_MAX, 0);

/// Identities whose DNS answers are trusted.
#[map(name = "ZT_DNS_SERVERS")]
pub static DNS_SERVERS: aya_ebpf::maps::HashMap<u32, u32> = aya_ebpf::maps::HashMap::pinned(DNS_SERVERS_MAX, 0);

/// Outstanding queries of capturing pods to trusted resolvers; an answer learns only if
/// it matches one, and consumes it. LRU: a flood of queries evicts the oldest.
#[map(name = "ZT_DNS_QUERIES")]
pub static DNS_QUERIES: LruHashMap<DnsQueryKey, DnsQueryValue> = LruHashMap::pinned(DEFAULT_DNS_QUERIES_MAX, 0);

/// Capture outcome counters, indexed by `DnsStat`.
#[map(name = "ZT_DNS_STATS")]
pub static DNS_STATS: PerCpuArray<u64> = PerCpuArray::pinned(DNS_STAT_SLOTS, 0);

/// Copies of captured answers for the agent.
#[map(name = "ZT_DNS_EVENTS")]
pub static DNS_EVENTS: RingBuf = RingBuf::pinned(DNS_EVENTS_RING_BYTES, 0);

/// Per-CPU token bucket of DNS events.
#[map(name = "ZT_DNS_RATELIMIT")]
pub static DNS_RATELIMIT: PerCpuArray<RateLimit> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working memory of the DNS parser (not pinned: nothing outlives a packet).
#[map(name = "ZT_DNS_SCRATCH")]
pub static DNS_SCRATCH_MAP: PerCpuArray<crate::dns::Scratch> = PerCpuArray::with_max_entries(1, 0);

// ---------------------------------------------------------------------------
// Services (issue 9): see services.rs
// ---------------------------------------------------------------------------

/// Frontend -> backend set (id, count, affinity).
#[map(name = "ZT_SVC_FRONTENDS")]
pub static SVC_FRONTENDS: aya_ebpf::maps::HashMap<SvcFrontendKey, SvcFrontendValue> =
    aya_ebpf::maps::HashMap::pinned(DEFAULT_SVC_FRONTENDS_MAX, 0);

/// (backend set, slot) -> backend address and port.
#[map(name = "ZT_SVC_BACKENDS")]
pub static SVC_BACKENDS: aya_ebpf::maps::HashMap<SvcBackendKey, SvcBackendValue> =
    aya_ebpf::maps::HashMap::pinned(DEFAULT_SVC_BACKENDS_MAX, 0);

/// (socket, backend) -> the frontend it was translated from.
#[map(name = "ZT_SVC_REVNAT")]
pub static SVC_REVNAT: LruHashMap<SvcRevKey, SvcRevValue> = LruHashMap::pinned(DEFAULT_SVC_REVNAT_MAX, 0);

/// (client netns, frontend) -> the backend sessionAffinity keeps.
#[map(name = "ZT_SVC_AFFINITY")]
pub static SVC_AFFINITY: LruHashMap<SvcAffinityKey, SvcAffinityValue> = LruHashMap::pinned(DEFAULT_SVC_AFFINITY_MAX, 0);

/// The Service address ranges (`--service-cidr`): never allowed by an FQDN rule.
#[map(name = "ZT_SVC_CIDRS")]
pub static SVC_CIDRS: LpmTrie<CidrKey, u32> = LpmTrie::pinned(SVC_CIDRS_MAX, 0);

/// Socket translation counters, indexed by `SvcStat`.
#[map(name = "ZT_SVC_STATS")]
pub static SVC_STATS: PerCpuArray<u64> = PerCpuArray::pinned(SVC_STAT_SLOTS, 0);

/// The HTTP proxy's listeners (issue 11, l7.rs): slot 0 IPv4, 1 IPv6.
#[map(name = "ZT_L7_LISTENER")]
pub static L7_LISTENER: aya_ebpf::maps::SockMap = aya_ebpf::maps::SockMap::pinned(2, 0);

/// The proxy's and the steering marks (`L7Config`).
#[map(name = "ZT_L7_CONFIG")]
pub static L7_CONFIG: Array<L7Config> = Array::pinned(1, 0);
