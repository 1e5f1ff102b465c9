//! Services: the pods' sockets are translated from a Service frontend (ClusterIP,
//! external IP, load-balancer IP, NodePort on this node) to one of its backends where
//! they are made, by the cgroup sock_addr programs (zt-ebpf `services.rs`); every later
//! hook then judges the backend's identity and port. Map layouts shared with the agent
//! (`zt-agent/src/services/`), which writes the frontends and backends.

/// Hash `SvcFrontendKey -> SvcFrontendValue`, written by the agent.
pub const MAP_SVC_FRONTENDS: &str = "ZT_SVC_FRONTENDS";
/// Hash `SvcBackendKey -> SvcBackendValue`, written by the agent.
pub const MAP_SVC_BACKENDS: &str = "ZT_SVC_BACKENDS";
/// LRU hash `SvcRevKey -> SvcRevValue`: what a translated socket was connected (or sent)
/// to, so that `getpeername` and `recvmsg` report the frontend. Written by the kernel.
pub const MAP_SVC_REVNAT: &str = "ZT_SVC_REVNAT";
/// LRU hash `SvcAffinityKey -> SvcAffinityValue` (sessionAffinity ClientIP). Kernel.
pub const MAP_SVC_AFFINITY: &str = "ZT_SVC_AFFINITY";
/// Per-CPU array of `u64` counters indexed by `SvcStat`.
pub const MAP_SVC_STATS: &str = "ZT_SVC_STATS";
/// LPM trie `CidrKey -> u32 (1)`: the cluster's Service address ranges
/// (`--service-cidr`), which an FQDN rule never allows. Written by the agent.
pub const MAP_SVC_CIDRS: &str = "ZT_SVC_CIDRS";
pub const SVC_CIDRS_MAX: u32 = 16;

pub const DEFAULT_SVC_FRONTENDS_MAX: u32 = 65536;
pub const DEFAULT_SVC_BACKENDS_MAX: u32 = 262144;
pub const DEFAULT_SVC_REVNAT_MAX: u32 = 262144;
pub const DEFAULT_SVC_AFFINITY_MAX: u32 = 65536;

/// A frontend: address (IPv4 mapped), port (host order), L4 protocol (6 TCP, 17 UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcFrontendKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The backend set of a frontend: `backends` entries `SvcBackendKey { svc_id, 0.. }`.
/// The agent writes a changed set under a new `svc_id` and then swaps this value in one
/// update, so a connect never sees a half-written set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcFrontendValue {
    pub svc_id: u32,
    /// 0: the Service has no ready endpoint; connects are refused (ECONNREFUSED).
    pub backends: u32,
    /// sessionAffinity ClientIP: seconds a client keeps its backend; 0 = none.
    pub affinity_s: u32,
    /// The Service's identity (`IDENTITY_SERVICE_FLAG | n`): a packet to this frontend
    /// that reaches a packet hook untranslated is judged as egress to it on the frontend
    /// port; the agent writes an allow for a local identity only if policy allows it
    /// every current backend on its target port. 0: none (judged by address).
    pub identity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcBackendKey {
    pub svc_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcBackendValue {
    /// IPv4 mapped, the frontend's family.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// A translated socket (its cookie) and the backend it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcRevKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcRevValue {
    /// The frontend the application asked for.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// sessionAffinity ClientIP: a client (its network namespace) and a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcAffinityKey {
    pub netns_cookie: u64,
    pub frontend: SvcFrontendKey,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcAffinityValue {
    pub last_ns: u64,
    /// Valid only while the frontend still has this `svc_id` (its backend set unchanged).
    pub svc_id: u32,
    pub slot: u32,
}

pub const SVC_STAT_SLOTS: u32 = 8;

/// What the socket programs did, by `ZT_SVC_STATS` index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvcStat {
    /// A connect or send to a frontend went to a backend.
    Translated = 0,
    /// ... to a frontend without backends: refused.
    NoBackend = 1,
    /// A backend slot the frontend counts was missing (a race with the agent): refused.
    BackendMissing = 2,
    /// A peer or source address reported as the frontend (getpeername, recvmsg).
    Reversed = 3,
    /// The backend kept for a client by sessionAffinity.
    Affinity = 4,
    /// An FQDN rule would have allowed a learned address that is a Service frontend
    /// (reached untranslated) or inside a `--service-cidr`: denied.
    FqdnFrontend = 5,
    /// A new flow to a frontend reached a packet hook untranslated and was allowed
    /// (every backend allowed, or the source not isolated); counted per hook.
    UntranslatedAllowed = 6,
    /// ... and was dropped (`Reason::DropService`).
    UntranslatedDenied = 7,
}

impl SvcStat {
    pub const ALL: [SvcStat; 8] = [
        SvcStat::Translated,
        SvcStat::NoBackend,
        SvcStat::BackendMissing,
        SvcStat::Reversed,
        SvcStat::Affinity,
        SvcStat::FqdnFrontend,
        SvcStat::UntranslatedAllowed,
        SvcStat::UntranslatedDenied,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            SvcStat::Translated => "translated",
            SvcStat::NoBackend => "no-backend",
            SvcStat::BackendMissing => "backend-missing",
            SvcStat::Reversed => "reversed",
            SvcStat::Affinity => "affinity",
            SvcStat::FqdnFrontend => "fqdn-frontend-denied",
            SvcStat::UntranslatedAllowed => "untranslated-allowed",
            SvcStat::UntranslatedDenied => "untranslated-denied",
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<SvcFrontendKey>() == 20);
    assert!(core::mem::size_of::<SvcFrontendValue>() == 16);
    assert!(core::mem::size_of::<SvcBackendKey>() == 8);
    assert!(core::mem::size_of::<SvcBackendValue>() == 20);
    assert!(core::mem::size_of::<SvcRevKey>() == 32);
    assert!(core::mem::size_of::<SvcRevValue>() == 24);
    assert!(core::mem::size_of::<SvcAffinityKey>() == 32);
    assert!(core::mem::size_of::<SvcAffinityValue>() == 16);
    assert!((SvcStat::ALL.len() as u32) <= SVC_STAT_SLOTS);
};

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), Copy, explicit padding, no pointers.
    unsafe impl aya::Pod for SvcFrontendKey {}
    unsafe impl aya::Pod for SvcFrontendValue {}
    unsafe impl aya::Pod for SvcBackendKey {}
    unsafe impl aya::Pod for SvcBackendValue {}
    unsafe impl aya::Pod for SvcRevKey {}
    unsafe impl aya::Pod for SvcRevValue {}
    unsafe impl aya::Pod for SvcAffinityKey {}
    unsafe impl aya::Pod for SvcAffinityValue {}
}
