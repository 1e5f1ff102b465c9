//! Types and constants shared by the kernel programs (zt-ebpf) and user space
//! (zt-agent, ztctl, tests). Every map key and value lives here once, `#[repr(C)]`,
//! with explicit padding fields and a compile-time size check, so that both sides
//! agree on the layout byte for byte.
#![no_std]

pub mod fqdn;
pub use fqdn::*;
pub mod services;
pub use services::*;
pub mod auth;
pub use auth::*;
pub mod l7;
pub use l7::*;
pub mod owners;
pub use owners::*;

/// Map pin directory name under the bpffs root. Bump on any layout change so that an
/// upgraded agent never reads maps written with another layout.
pub const MAP_VERSION_DIR: &str = "v3";

// ---------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------

/// Wildcard in a policy key: any peer.
pub const IDENTITY_ANY: u32 = 0;
/// The node itself (its addresses in the node's network namespace).
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside the cluster that no CIDR rule names.
pub const IDENTITY_WORLD: u32 = 2;
/// A local endpoint the agent does not know yet: always fails closed.
pub const IDENTITY_INIT: u32 = 3;
/// Another node of the cluster.
pub const IDENTITY_REMOTE_NODE: u32 = 4;
/// First identity allocated to workloads (SPIFFE ID + labels).
pub const IDENTITY_FIRST_WORKLOAD: u32 = 256;
/// CIDR identities (ipBlock peers) carry this bit.
pub const IDENTITY_CIDR_FLAG: u32 = 1 << 24;
/// Service identities (flag | number): what a packet to a Service frontend is judged
/// against when it reaches a packet hook untranslated (`SvcFrontendValue::identity`).
pub const IDENTITY_SERVICE_FLAG: u32 = 1 << 25;

// ---------------------------------------------------------------------------
// Directions, verdicts, reasons
// ---------------------------------------------------------------------------

/// Traffic entering the pod (TC egress on the host-side interface).
pub const DIR_INGRESS: u8 = 0;
/// Traffic leaving the pod (TC ingress on the host-side interface).
pub const DIR_EGRESS: u8 = 1;
pub const DIR_COUNT: u32 = 2;

/// The hook interface the cgroup programs judge as: no interface. Conntrack, fragment
/// and event records of packets judged there carry it; a local endpoint whose ifindex
/// is 0 (known, not hooked yet) is judged there by its policy.
pub const CGROUP_HOOK_IFINDEX: u32 = 0;
/// Conntrack and fragment keys made by the cgroup programs carry, instead of an
/// interface, the socket's cgroup id folded to 32 bits with this bit set.
pub const CGROUP_SCOPE_FLAG: u32 = 1 << 31;

/// The `ifindex` field of a CtKey/FragKey made by the cgroup programs for a socket in
/// cgroup `id` (same fold as the kernel side).
pub const fn cgroup_scope(id: u64) -> u32 {
    ((id ^ (id >> 32)) as u32) | CGROUP_SCOPE_FLAG
}

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;

/// Why a packet got its verdict. Values below `REASON_FIRST_DROP` allow.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A new flow matched an allow rule.
    AllowPolicy = 1,
    /// A packet of a tracked flow in its original direction.
    AllowEstablished = 2,
    /// A reply of a tracked flow.
    AllowReply = 3,
    /// The local endpoint is not isolated in this direction (Kubernetes default mode).
    AllowNoPolicy = 4,
    /// From the node to a local pod (kubelet probes); flag-controlled.
    AllowHost = 5,
    /// IPv6 neighbour discovery on the pod's link.
    AllowNdp = 6,
    /// ARP at a pod's interface (the only non-IP ethertype that passes), and anything
    /// that is not IP at the cgroup programs (which only see IP): not policy-controlled.
    AllowNonIp = 7,
    /// A non-first IP fragment whose first fragment was allowed.
    AllowFragment = 8,
    /// An ICMP error (unreachable, packet too big, time exceeded, parameter problem)
    /// about a tracked flow.
    AllowRelated = 9,
    /// A new egress flow to a world/CIDR address learned from a DNS answer for a name
    /// an FQDN rule of the local identity allows.
    AllowFqdn = 10,
    /// A new egress flow to a Service frontend that reached a packet hook untranslated
    /// (translation off, a raw socket, SCTP): policy allows every current backend on its
    /// target port. kube-proxy then DNATs it.
    AllowService = 11,
    /// At a pod's interface: a packet to the pod that entered the node through that same
    /// interface (a Service hairpin kube-proxy DNATed back to the pod, masqueraded or
    /// not). NetworkPolicy never blocks a pod from itself, and only the pod receives it.
    AllowSelf = 12,
    /// A new flow matched an allow rule that requires authentication, and the peer's
    /// identity is proven for the node its address is on (`ZT_AUTH_PROOFS`). Conntrack
    /// marks the flow `CT_PROVEN`.
    AllowAuthenticated = 13,
    /// At a node's uplink (`zt_from_uplink`): a new TCP flow from another node to a port
    /// of a local pod whose ingress entry carries `POLICY_FLAG_HTTP`, handed to this
    /// node's HTTP proxy (`bpf_sk_assign`). The proxy's upstream is then judged at the
    /// pod's hook like any flow.
    AllowHttpSteered = 15,

    /// An explicit deny rule matched.
    DropPolicyDeny = 16,
    /// No allow rule matched an isolated endpoint (default deny).
    DropPolicyDefault = 17,
    /// At a TC hook: the local address is no endpoint of this interface (spoofed, an
    /// address the agent no longer knows or cannot attribute, `init`): fail closed.
    DropUnknownEndpoint = 18,
    /// Truncated or inconsistent L3/L4 header.
    DropMalformed = 19,
    /// A non-first fragment with no allowed first fragment on record.
    DropFragment = 20,
    /// A tracked flow whose allow was removed (revocation).
    DropRevoked = 21,
    /// The agent has not configured the datapath yet: fail closed.
    DropNotReady = 22,
    /// Too many IPv6 extension headers to parse within the verifier's bound.
    DropIpv6ExtHeaders = 23,
    /// Seen by the cgroup programs: a pod's own traffic whose address the agent does not
    /// know yet (initialising); fails closed except for what the host is allowed.
    DropInitialising = 24,
    /// At a pod's interface: a frame carrying a VLAN tag (in the skb or in the header,
    /// 802.1Q or 802.1ad, stacked or not). zt cannot judge what the stack would do with
    /// the inner frame, so it never passes, ready or not.
    DropVlan = 25,
    /// At a pod's interface: an ethertype other than IPv4, IPv6 and ARP.
    DropEthertype = 26,
    /// A local pod's address as the source of a packet that did not come in through that
    /// pod's own interface (decapsulated, injected, forged): fail closed.
    DropSpoofedSource = 27,
    /// A pod sending to a node's tunnel port or protocol (VXLAN, Geneve, IPIP, GRE, ...)
    /// that no policy explicitly allows: the node would decapsulate and route the inner
    /// packet under a source address the pod chose.
    DropTunnel = 28,
    /// A new egress flow to a Service frontend that reached a packet hook untranslated,
    /// and policy does not allow every current backend on its target port (or there is
    /// none): kube-proxy could DNAT it to a backend no rule allowed.
    DropService = 29,
    /// A new flow on a rule that requires authentication (`authentication: required`, or
    /// a STRICT namespace) whose peer identity is not proven, or no longer, for the node
    /// its address is on (`ZT_AUTH_PROOFS`): the address claims an identity nobody proved.
    DropAuthRequired = 30,
    /// A new flow to a port with HTTP rules that did not come through this node's HTTP
    /// proxy (the host, a pod not hooked yet, a client on another node that arrived on
    /// an interface without the uplink hook, a NodePort): fail closed.
    DropHttpUnsteered = 31,
    /// A flow steered to the HTTP proxy while no proxy listener is registered (agent
    /// down or restarting): fail closed.
    DropHttpProxyDown = 32,
}

pub const REASON_FIRST_DROP: u8 = 16;
/// Size of the reason dimension of the counter array.
pub const REASON_SLOTS: u32 = 48;
/// Counter array size: direction x reason.
pub const COUNTER_SLOTS: u32 = DIR_COUNT * REASON_SLOTS;

impl Reason {
    pub const ALL: [Reason; 31] = [
        Reason::AllowPolicy,
        Reason::AllowEstablished,
        Reason::AllowReply,
        Reason::AllowNoPolicy,
        Reason::AllowHost,
        Reason::AllowNdp,
        Reason::AllowNonIp,
        Reason::AllowFragment,
        Reason::AllowRelated,
        Reason::AllowFqdn,
        Reason::AllowService,
        Reason::AllowSelf,
        Reason::AllowAuthenticated,
        Reason::AllowHttpSteered,
        Reason::DropPolicyDeny,
        Reason::DropPolicyDefault,
        Reason::DropUnknownEndpoint,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropRevoked,
        Reason::DropNotReady,
        Reason::DropIpv6ExtHeaders,
        Reason::DropInitialising,
        Reason::DropVlan,
        Reason::DropEthertype,
        Reason::DropSpoofedSource,
        Reason::DropTunnel,
        Reason::DropService,
        Reason::DropAuthRequired,
        Reason::DropHttpUnsteered,
        Reason::DropHttpProxyDown,
    ];

    pub const fn is_drop(self) -> bool {
        self as u8 >= REASON_FIRST_DROP
    }

    pub fn from_u8(v: u8) -> Option<Reason> {
        Self::ALL.iter().copied().find(|r| *r as u8 == v)
    }

    /// Stable name used in metrics labels, events and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::AllowPolicy => "policy",
            Reason::AllowEstablished => "established",
            Reason::AllowReply => "reply",
            Reason::AllowNoPolicy => "no-policy",
            Reason::AllowHost => "host",
            Reason::AllowNdp => "ndp",
            Reason::AllowNonIp => "non-ip",
            Reason::AllowFragment => "fragment",
            Reason::AllowRelated => "related",
            Reason::AllowFqdn => "fqdn",
            Reason::AllowService => "service",
            Reason::AllowSelf => "self",
            Reason::AllowAuthenticated => "authenticated",
            Reason::AllowHttpSteered => "http-steered",
            Reason::DropPolicyDeny => "policy-deny",
            Reason::DropPolicyDefault => "policy-default-deny",
            Reason::DropUnknownEndpoint => "unknown-endpoint",
            Reason::DropMalformed => "malformed",
            Reason::DropFragment => "fragment",
            Reason::DropRevoked => "revoked",
            Reason::DropNotReady => "not-ready",
            Reason::DropIpv6ExtHeaders => "ipv6-ext-headers",
            Reason::DropInitialising => "initialising",
            Reason::DropVlan => "vlan",
            Reason::DropEthertype => "ethertype",
            Reason::DropSpoofedSource => "spoofed-source",
            Reason::DropTunnel => "tunnel",
            Reason::DropService => "service-backends-denied",
            Reason::DropAuthRequired => "auth-required",
            Reason::DropHttpUnsteered => "http-unsteered",
            Reason::DropHttpProxyDown => "http-proxy-down",
        }
    }
}

/// Index into the verdict counter array.
#[inline(always)]
pub const fn counter_index(dir: u8, reason: u8) -> u32 {
    (dir as u32) * REASON_SLOTS + (reason as u32 % REASON_SLOTS)
}

// ---------------------------------------------------------------------------
// Map names (also the pin names under <bpffs>/zt/<MAP_VERSION_DIR>/)
// ---------------------------------------------------------------------------

pub const MAP_CONFIG: &str = "ZT_CONFIG";
pub const MAP_ENDPOINTS: &str = "ZT_ENDPOINTS";
pub const MAP_CIDRS: &str = "ZT_CIDRS";
pub const MAP_POLICY: &str = "ZT_POLICY";
pub const MAP_CT: &str = "ZT_CT";
pub const MAP_CT_EST: &str = "ZT_CT_EST";
pub const MAP_CT_STATS: &str = "ZT_CT_STATS";
pub const MAP_FRAGS: &str = "ZT_FRAGS";
pub const MAP_COUNTERS: &str = "ZT_COUNTERS";
pub const MAP_EVENT_STATS: &str = "ZT_EVSTATS";
pub const MAP_EVENTS: &str = "ZT_EVENTS";
pub const MAP_RATELIMIT: &str = "ZT_RATELIMIT";
pub const MAP_TUNNELS: &str = "ZT_TUNNELS";

/// Default capacities; the agent overrides them from flags before loading.
pub const DEFAULT_ENDPOINTS_MAX: u32 = 65536;
pub const DEFAULT_CIDRS_MAX: u32 = 16384;
pub const DEFAULT_POLICY_MAX: u32 = 262144;
pub const DEFAULT_CT_MAX: u32 = 262144;
pub const DEFAULT_CT_EST_MAX: u32 = 262144;
pub const DEFAULT_FRAGS_MAX: u32 = 8192;
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
pub const TUNNELS_MAX: u32 = 64;

// ---------------------------------------------------------------------------
// Tunnels: what a pod may not send to a node unless a policy explicitly allows it
// ---------------------------------------------------------------------------

/// Key of ZT_TUNNELS (value: u32, unused): an IP protocol and a destination port, or
/// port 0 for the whole protocol (IPIP, GRE, ...). `tunnel_key(17, 4789)` is VXLAN.
#[inline(always)]
pub const fn tunnel_key(proto: u8, port: u16) -> u32 {
    ((proto as u32) << 16) | port as u32
}

// ---------------------------------------------------------------------------
// Config (array of one)
// ---------------------------------------------------------------------------

/// Set once the agent has written its first full state; until then every packet of a
/// managed interface drops (`DropNotReady`).
pub const CONFIG_READY: u32 = 1 << 0;
/// Allow traffic from the host identity to local pods (kubelet probes).
pub const CONFIG_ALLOW_HOST: u32 = 1 << 1;
/// Also emit events for newly allowed flows (drops are always emitted).
pub const CONFIG_EVENTS_ALLOWED: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// Bumped by the agent whenever an allow may have been withdrawn; tracked flows
    /// verified under an older epoch are re-checked against the policy on their next packet.
    pub policy_epoch: u32,
    /// Idle lifetime of an established TCP flow, seconds.
    pub ct_tcp_timeout_s: u32,
    /// Idle lifetime of a tracked flow of another protocol than TCP, UDP, ICMP, seconds.
    pub ct_other_timeout_s: u32,
    /// Event budget per CPU per second, and burst.
    pub events_per_sec: u32,
    pub events_burst: u32,
    /// Lifetime of a fragment-tracking entry, seconds.
    pub frag_timeout_s: u32,
    /// Idle lifetime of a TCP flow whose handshake has not completed, seconds.
    pub ct_tcp_syn_timeout_s: u32,
    /// ... of a half-closed TCP flow (FIN seen one way), seconds.
    pub ct_tcp_fin_timeout_s: u32,
    /// ... of a closed TCP flow (FIN both ways, or RST), seconds.
    pub ct_tcp_close_timeout_s: u32,
    /// ... of a UDP flow, seconds.
    pub ct_udp_timeout_s: u32,
    /// ... of an ICMP / ICMPv6 flow (echo and queries), seconds.
    pub ct_icmp_timeout_s: u32,
}

// ---------------------------------------------------------------------------
// Endpoints: exact IP -> identity (local pods, remote pods, host addresses)
// ---------------------------------------------------------------------------

/// Addresses are 16 bytes; IPv4 uses the IPv4-mapped form ::ffff:a.b.c.d.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub addr: [u8; 16],
}

/// The endpoint is a pod on this node (its traffic passes a zt hook).
pub const EP_LOCAL: u32 = 1 << 0;
/// Some policy selects this endpoint for ingress: default deny applies.
pub const EP_ENFORCE_INGRESS: u32 = 1 << 1;
/// Some policy selects this endpoint for egress: default deny applies.
pub const EP_ENFORCE_EGRESS: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub identity: u32,
    pub flags: u32,
    /// Host-side interface of a local pod (0 otherwise).
    pub ifindex: u32,
    /// `cgroup_scope` of a local pod's own cgroup (kubelet's pod level), 0 if not known:
    /// the cgroup programs leave a packet to the pod's TC hook only if its socket is in
    /// that cgroup, so that a new pod reusing the address (while the agent is down) is
    /// never taken for the old one.
    /// A pod of another node: its node's number (`auth_node_id`, 0 if not known), where
    /// proofs of its identity are looked up (`EndpointValue::auth_node`, auth.rs).
    pub cgroup: u32,
}

#[inline(always)]
pub const fn enforce_flag(dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        EP_ENFORCE_INGRESS
    } else {
        EP_ENFORCE_EGRESS
    }
}

// ---------------------------------------------------------------------------
// CIDRs: LPM trie, prefix -> identity (ipBlock peers)
// ---------------------------------------------------------------------------

/// Data part of the CIDR trie key (the prefix length is aya's `Key::prefix_len`):
/// IPv4 prefixes are stored mapped, so an IPv4 /n is prefix 96 + n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrValue {
    pub identity: u32,
}

// ---------------------------------------------------------------------------
// Policy: LPM trie keyed by (local, peer, direction, protocol, port)
// ---------------------------------------------------------------------------

/// Data part of the policy trie key. Compared bit by bit from the first byte, so the
/// fields are ordered from always-exact to wildcardable and the port is big-endian:
/// prefix `POLICY_PREFIX_ANY_PROTO` = any protocol, `POLICY_PREFIX_ANY_PORT` = the
/// protocol with any port, 80..96 = a port range block, 96 = one port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Local endpoint identity, big-endian.
    pub local_id_be: u32,
    /// Peer identity, big-endian; `IDENTITY_ANY` = any peer.
    pub peer_id_be: u32,
    pub dir: u8,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6).
    pub proto: u8,
    /// Destination port (ICMP: the type), big-endian.
    pub port_be: u16,
}

pub const POLICY_PREFIX_ANY_PROTO: u32 = 72;
pub const POLICY_PREFIX_ANY_PORT: u32 = 80;
pub const POLICY_PREFIX_FULL: u32 = 96;

impl PolicyKey {
    pub const fn new(local_id: u32, peer_id: u32, dir: u8, proto: u8, port: u16) -> Self {
        PolicyKey { local_id_be: local_id.to_be(), peer_id_be: peer_id.to_be(), dir, proto, port_be: port.to_be() }
    }
    pub const fn local_id(&self) -> u32 {
        u32::from_be(self.local_id_be)
    }
    pub const fn peer_id(&self) -> u32 {
        u32::from_be(self.peer_id_be)
    }
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port_be)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    /// `POLICY_FLAG_*`: what an allowed flow needs beyond L3/L4 (0: nothing).
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Agent-assigned id of the rule that produced the entry (for events and `explain`).
    pub rule_id: u32,
}

/// The allowed flow goes through the agent's HTTP proxy (issue 11, `l7.rs`).
pub const POLICY_FLAG_HTTP: u8 = 1 << 0;
/// The peer's identity must be proven for the node it comes from (issue 10, `auth.rs`).
pub const POLICY_FLAG_AUTH_REQUIRED: u8 = 1 << 1;

// ---------------------------------------------------------------------------
// Connection tracking: established TCP flows in a hash (ZT_CT_EST), the rest in an LRU
// (ZT_CT); see zt-ebpf/src/conntrack.rs
// ---------------------------------------------------------------------------

/// A flow as first seen at a hook, in its original direction. `dir` is the direction
/// of the check that admitted it (a flow between two local pods has one entry per side)
/// and `ifindex` the hook's interface, so that only the pod behind that interface can
/// match it (another pod forging the tuple is judged as a new flow, and fails). Entries
/// of the cgroup programs carry `cgroup_scope(socket's cgroup id)` there instead.
/// ICMP: see `icmp_ct_ports`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    /// ICMP other than echo: the type of the query (a reply carries its query's type),
    /// so that a flow of one type never carries another. 0 for echo and non-ICMP.
    pub icmp_tag: u8,
    pub _pad: u8,
    pub ifindex: u32,
}

/// Conntrack ports and tag of an ICMP message of type `ty` (`id`: the echo identifier).
/// - echo: tag 0, request (id, 0), reply (0, id): a reply's reversed tuple is its
///   request's, and a request never matches as the reply of one going the other way;
/// - a query with a reply type (v4 timestamp, information, address mask; v6 node
///   information): tag = the query's type, query (1, 0), reply (0, 1);
/// - any other type: tag = its type, (1, 0): it matches only itself, in its own
///   direction, and never as a reply.
/// Returns (sport, dport, tag).
#[inline(always)]
pub const fn icmp_ct_ports(ty: u8, v6: bool, id: u16) -> (u16, u16, u8) {
    let (echo_req, echo_rep) = if v6 { (128, 129) } else { (8, 0) };
    if ty == echo_req {
        return (id, 0, 0);
    }
    if ty == echo_rep {
        return (0, id, 0);
    }
    let reply_of = if v6 {
        match ty {
            140 => 139,
            _ => 0,
        }
    } else {
        match ty {
            14 => 13,
            16 => 15,
            18 => 17,
            _ => 0,
        }
    };
    if reply_of != 0 {
        (0, 1, reply_of)
    } else {
        (1, 0, ty)
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Config.policy_epoch under which the flow was last verified against policy.
    pub epoch: u32,
    pub local_id: u32,
    pub peer_id: u32,
    pub rule_id: u32,
    /// Policy port of the flow (dport, or ICMP type) for re-verification.
    pub policy_port: u16,
    pub reason: u8,
    /// TCP: `CT_TCP_*` state in the low bits, plus `CT_SEEN_REPLY`, `CT_FIN_ORIG`,
    /// `CT_FIN_REPLY`; 0 for other protocols. Picks the idle timeout (`ct_timeout_s`).
    pub state: u8,
    /// A hooked local peer's interface when the flow was judged (0: another peer, or an
    /// entry made before this field): packets from that peer entering the pod must come
    /// in through it (`spoofed-source` otherwise).
    pub peer_if: u32,
}

/// TCP header flags (byte 13 of the header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// TCP states of a tracked flow (`CtValue::state & CT_STATE_MASK`), as far as a hook
/// that sees both directions can tell, and what they keep the entry for:
/// - SYN: opened, the handshake not complete (`ct_tcp_syn_timeout_s`);
/// - ESTABLISHED: a reply was seen, then a segment without SYN (`ct_tcp_timeout_s`);
/// - CLOSING: FIN seen in one direction only (`ct_tcp_fin_timeout_s`);
/// - CLOSED: FIN seen both ways, or RST (`ct_tcp_close_timeout_s`).
pub const CT_TCP_SYN: u8 = 0;
pub const CT_TCP_ESTABLISHED: u8 = 1;
pub const CT_TCP_CLOSING: u8 = 2;
pub const CT_TCP_CLOSED: u8 = 3;
pub const CT_STATE_MASK: u8 = 3;
/// A packet of the reply direction was seen.
pub const CT_SEEN_REPLY: u8 = 1 << 2;
/// FIN seen from the side that opened the flow / from the other side.
pub const CT_FIN_ORIG: u8 = 1 << 3;
pub const CT_FIN_REPLY: u8 = 1 << 4;
/// The flow's peer identity was proven when it was judged (issue 10): its allowing entry
/// required authentication. A flow attribute, not TCP state: kept across port reuse.
pub const CT_PROVEN: u8 = 1 << 5;
/// Reserved: the flow is steered to the agent's HTTP proxy (issue 11).
pub const CT_L7: u8 = 1 << 6;

/// The state after a TCP segment with `flags` (`reply`: in the reply direction).
/// Pure, shared by the kernel and the tests.
#[inline(always)]
pub const fn ct_tcp_next(state: u8, flags: u8, reply: bool) -> u8 {
    let st = state & CT_STATE_MASK;
    // A new SYN from the opener on a closed tuple (port reuse): a new connection.
    if st == CT_TCP_CLOSED && !reply && flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN {
        // Steering to the HTTP proxy (issue 11) and the proof of admission (issue 10) stay
        // with the tuple: the new connection's packets must take the same way as its SYN.
        return CT_TCP_SYN | (state & (CT_L7 | CT_PROVEN));
    }
    let mut bits = state & !CT_STATE_MASK;
    if reply {
        bits |= CT_SEEN_REPLY;
    }
    if flags & TCP_RST != 0 {
        return bits | CT_TCP_CLOSED;
    }
    if flags & TCP_FIN != 0 {
        bits |= if reply { CT_FIN_REPLY } else { CT_FIN_ORIG };
    }
    let fins = bits & (CT_FIN_ORIG | CT_FIN_REPLY);
    let next = if st == CT_TCP_CLOSED || fins == CT_FIN_ORIG | CT_FIN_REPLY {
        CT_TCP_CLOSED
    } else if fins != 0 {
        CT_TCP_CLOSING
    } else if st == CT_TCP_SYN && bits & CT_SEEN_REPLY != 0 && flags & TCP_SYN == 0 {
        CT_TCP_ESTABLISHED
    } else {
        st
    };
    bits | next
}

/// The idle timeout of a tracked flow of `proto` in `state`, seconds.
#[inline(always)]
pub const fn ct_timeout_s(cfg: &Config, proto: u8, state: u8) -> u32 {
    match proto {
        6 => match state & CT_STATE_MASK {
            CT_TCP_ESTABLISHED => cfg.ct_tcp_timeout_s,
            CT_TCP_CLOSING => cfg.ct_tcp_fin_timeout_s,
            CT_TCP_CLOSED => cfg.ct_tcp_close_timeout_s,
            _ => cfg.ct_tcp_syn_timeout_s,
        },
        17 => cfg.ct_udp_timeout_s,
        1 | 58 => cfg.ct_icmp_timeout_s,
        _ => cfg.ct_other_timeout_s,
    }
}

/// Name of a flow's state in metrics and ztctl.
pub const fn ct_state_name(proto: u8, state: u8) -> &'static str {
    match proto {
        6 => match state & CT_STATE_MASK {
            CT_TCP_ESTABLISHED => "tcp-established",
            CT_TCP_CLOSING => "tcp-closing",
            CT_TCP_CLOSED => "tcp-closed",
            _ => "tcp-syn",
        },
        17 => "udp",
        1 | 58 => "icmp",
        _ => "other",
    }
}

/// Conntrack events counted by the kernel (`ZT_CT_STATS`, per CPU).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtStat {
    /// A TCP flow became established and moved to `ZT_CT_EST`.
    Promoted = 0,
    /// ... but `ZT_CT_EST` was full: it stays in the LRU, where churn can evict it.
    EstablishedFull = 1,
    /// A closed TCP flow moved back from `ZT_CT_EST` to the LRU.
    Demoted = 2,
    /// An allowed new flow could not be inserted: its replies are judged as new flows.
    CreateFailed = 3,
}

pub const CT_STAT_SLOTS: u32 = 8;

impl CtStat {
    pub const ALL: [CtStat; 4] = [CtStat::Promoted, CtStat::EstablishedFull, CtStat::Demoted, CtStat::CreateFailed];
    pub const fn name(self) -> &'static str {
        match self {
            CtStat::Promoted => "promoted",
            CtStat::EstablishedFull => "established-full",
            CtStat::Demoted => "demoted",
            CtStat::CreateFailed => "create-failed",
        }
    }
}

// ---------------------------------------------------------------------------
// Fragments: LRU hash of first fragments that were allowed
// ---------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
    /// The hook's interface (or cgroup scope), as in `CtKey`.
    pub ifindex: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub created_ns: u64,
}

// ---------------------------------------------------------------------------
// Events (ring buffer) and their rate limit
// ---------------------------------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub reason: u8,
    pub verdict: u8,
    pub local_id: u32,
    pub peer_id: u32,
    pub rule_id: u32,
    pub ifindex: u32,
}

/// Per-CPU token bucket for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub tokens: u64,
    pub last_ns: u64,
}

pub const EVSTAT_SENT: u32 = 0;
pub const EVSTAT_RATE_LIMITED: u32 = 1;
pub const EVSTAT_RING_FULL: u32 = 2;
pub const EVSTAT_SLOTS: u32 = 4;

// ---------------------------------------------------------------------------
// Layout checks: sizes are fixed and there is no implicit padding.
// ---------------------------------------------------------------------------

const _: () = {
    assert!(core::mem::size_of::<Config>() == 48);
    assert!(core::mem::size_of::<EndpointKey>() == 16);
    assert!(core::mem::size_of::<EndpointValue>() == 16);
    assert!(core::mem::size_of::<CidrKey>() == 16);
    assert!(core::mem::size_of::<CidrValue>() == 4);
    assert!(core::mem::size_of::<PolicyKey>() == 12);
    assert!(core::mem::size_of::<PolicyValue>() == 8);
    assert!(core::mem::size_of::<CtKey>() == 44);
    assert!(core::mem::size_of::<CtValue>() == 40);
    assert!(core::mem::size_of::<FragKey>() == 44);
    assert!(core::mem::size_of::<FragValue>() == 8);
    assert!(core::mem::size_of::<Event>() == 64);
    assert!(core::mem::size_of::<RateLimit>() == 16);
};

/// IPv4-mapped IPv6 form of an IPv4 address (network-order bytes in).
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for CidrValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for RateLimit {}
}

#[cfg(test)]
mod ct_tests {
    use super::*;

    #[test]
    fn port_reuse_keeps_the_http_steering() {
        let closed = CT_L7 | CT_SEEN_REPLY | CT_FIN_ORIG | CT_FIN_REPLY | CT_TCP_CLOSED;
        assert_eq!(ct_tcp_next(closed, TCP_SYN, false), CT_L7 | CT_TCP_SYN);
        assert_eq!(ct_tcp_next(CT_TCP_CLOSED, TCP_SYN, false), CT_TCP_SYN);
        assert_eq!(ct_tcp_next(CT_L7 | CT_TCP_SYN | CT_SEEN_REPLY, TCP_ACK, false), CT_L7 | CT_SEEN_REPLY | CT_TCP_ESTABLISHED);
    }

    /// Runs segments (flags, reply) through the state machine from a fresh entry.
    fn run(segs: &[(u8, bool)]) -> u8 {
        segs.iter().fold(0, |s, (f, r)| ct_tcp_next(s, *f, *r))
    }

    #[test]
    fn tcp_states() {
        const SA: u8 = TCP_SYN | TCP_ACK;
        const FA: u8 = TCP_FIN | TCP_ACK;
        assert_eq!(run(&[(TCP_SYN, false)]) & CT_STATE_MASK, CT_TCP_SYN);
        assert_eq!(run(&[(TCP_SYN, false), (SA, true)]) & CT_STATE_MASK, CT_TCP_SYN, "SYN-ACK alone does not establish");
        let est = run(&[(TCP_SYN, false), (SA, true), (TCP_ACK, false)]);
        assert_eq!(est & CT_STATE_MASK, CT_TCP_ESTABLISHED);
        // Picked up mid-stream: a reply without SYN establishes.
        assert_eq!(run(&[(TCP_ACK, false), (TCP_ACK, true)]) & CT_STATE_MASK, CT_TCP_ESTABLISHED);
        // Retransmitted SYNs keep it in SYN.
        assert_eq!(run(&[(TCP_SYN, false), (TCP_SYN, false)]) & CT_STATE_MASK, CT_TCP_SYN);
        let half = ct_tcp_next(est, FA, true);
        assert_eq!(half & CT_STATE_MASK, CT_TCP_CLOSING);
        assert_eq!(ct_tcp_next(half, TCP_ACK, false) & CT_STATE_MASK, CT_TCP_CLOSING, "data after one FIN");
        assert_eq!(ct_tcp_next(half, FA, true) & CT_STATE_MASK, CT_TCP_CLOSING, "the same side's FIN again");
        let closed = ct_tcp_next(half, FA, false);
        assert_eq!(closed & CT_STATE_MASK, CT_TCP_CLOSED);
        assert_eq!(ct_tcp_next(closed, TCP_ACK, true) & CT_STATE_MASK, CT_TCP_CLOSED);
        assert_eq!(ct_tcp_next(est, TCP_RST, false) & CT_STATE_MASK, CT_TCP_CLOSED);
        assert_eq!(ct_tcp_next(run(&[(TCP_SYN, false)]), TCP_RST | TCP_ACK, true) & CT_STATE_MASK, CT_TCP_CLOSED);
        // Port reuse: a fresh SYN from the opener restarts; one from the other side does not.
        assert_eq!(ct_tcp_next(closed, TCP_SYN, false), CT_TCP_SYN);
        // ... keeping what the flow was judged with (proven), not its TCP bits.
        assert_eq!(ct_tcp_next(closed | CT_PROVEN | CT_SEEN_REPLY, TCP_SYN, false), CT_PROVEN | CT_TCP_SYN);
        assert_eq!(ct_tcp_next(closed, TCP_SYN, true) & CT_STATE_MASK, CT_TCP_CLOSED);
    }

    #[test]
    fn timeouts_by_protocol_and_state() {
        let cfg = Config {
            ct_tcp_timeout_s: 1,
            ct_tcp_syn_timeout_s: 2,
            ct_tcp_fin_timeout_s: 3,
            ct_tcp_close_timeout_s: 4,
            ct_udp_timeout_s: 5,
            ct_icmp_timeout_s: 6,
            ct_other_timeout_s: 7,
            ..Default::default()
        };
        let t: [u32; 8] = [
            ct_timeout_s(&cfg, 6, CT_TCP_ESTABLISHED | CT_SEEN_REPLY),
            ct_timeout_s(&cfg, 6, CT_TCP_SYN),
            ct_timeout_s(&cfg, 6, CT_TCP_CLOSING | CT_FIN_ORIG),
            ct_timeout_s(&cfg, 6, CT_TCP_CLOSED),
            ct_timeout_s(&cfg, 17, 0),
            ct_timeout_s(&cfg, 1, 0),
            ct_timeout_s(&cfg, 58, 0),
            ct_timeout_s(&cfg, 132, 0),
        ];
        assert_eq!(t, [1, 2, 3, 4, 5, 6, 6, 7]);
    }
}
