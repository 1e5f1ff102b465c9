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
pub static ENDPOINTS: aya_ebpf::maps::HashMap<EndpointKey, EndpointValue> =
    aya_ebpf::maps::HashMap::pinned(DEFAULT_ENDPOINTS_MAX, 0);

/// Prefix -> CIDR identity, for peers that are not endpoints.
#[map(name = "ZT_CIDRS")]
pub static CIDRS: LpmTrie<CidrKey, CidrValue> = LpmTrie::pinned(DEFAULT_CIDRS_MAX, 0);

/// (local, peer, dir, proto, port) -> allow/deny, ports as prefixes for ranges.
#[map(name = "ZT_POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyValue> = LpmTrie::pinned(DEFAULT_POLICY_MAX, 0);

/// Tracked flows; LRU so that state stays bounded.
#[map(name = "ZT_CT")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CT_MAX, 0);

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
