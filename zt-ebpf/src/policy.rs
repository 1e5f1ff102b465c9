//! Identity resolution and the policy decision for a new flow. Lookups, in order:
//! ENDPOINTS[peer] (else CIDRS[peer], else world), for an egress flow SVC_FRONTENDS[peer,
//! port] (a Service frontend reached untranslated is judged as its Service identity),
//! ENDPOINTS[local], POLICY[(local, peer, ...)], POLICY[(local, any, ...)]. Deny in either
//! wins, also over the host-probe allowance.
use aya_ebpf::maps::lpm_trie::Key;
use zt_common::*;

use crate::{
    auth, fqdn,
    maps::{CIDRS, ENDPOINTS, POLICY, SVC_BACKENDS, SVC_CIDRS, SVC_FRONTENDS, SVC_STATS, TUNNELS},
    parse::Flow,
};

/// The hook a packet is judged at.
pub struct Hook {
    /// The pod interface of a TC hook; `CGROUP_HOOK_IFINDEX` at the cgroup programs.
    pub ifindex: u32,
    pub dir: u8,
    /// What conntrack and fragment entries are bound to, so that only the traffic that
    /// created an entry can match it: the interface at TC, the socket's cgroup at the
    /// cgroup programs (`cgroup_scope`).
    pub scope: u32,
    /// Where the packet entered the node (the skb's ingress interface): 0 for the node's
    /// own sockets, `FROM_UNSEEN` at the cgroup programs, which cannot tell.
    pub from_ifindex: u32,
}

/// `Hook::from_ifindex` at the cgroup programs.
pub const FROM_UNSEEN: u32 = u32::MAX;

impl Hook {
    /// A packet entering a pod that the node forwarded (from another interface) rather
    /// than sent from its own sockets.
    #[inline(always)]
    fn forwarded_in(&self) -> bool {
        self.dir == DIR_INGRESS && self.from_ifindex != 0 && self.from_ifindex != FROM_UNSEEN
    }
}

pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    pub local_id: u32,
    pub peer_id: u32,
    pub rule_id: u32,
    /// The interface a hooked local peer's packets come in through (0: not a hooked
    /// local pod): conntrack keeps it so that a tracked flow needs no lookup to check it.
    pub peer_if: u32,
}

/// A peer address as the endpoint map (else the CIDR trie) knows it.
pub struct Peer {
    pub identity: u32,
    /// A hooked local pod's interface, else 0.
    pub ifindex: u32,
}

/// The peer of an address. The node's addresses are `host` only for the node's own
/// sockets: a packet the node forwarded with a node source (masqueraded, SNATed) is
/// judged by the CIDR rules like any address outside the cluster.
#[inline(always)]
pub fn peer_of(hook: &Hook, addr: &[u8; 16]) -> Peer {
    let key = EndpointKey { addr: *addr };
    if let Some(ep) = unsafe { ENDPOINTS.get(&key) } {
        if !(ep.identity == IDENTITY_HOST && hook.forwarded_in()) {
            let ifindex = if ep.flags & EP_LOCAL != 0 { ep.ifindex } else { 0 };
            return Peer { identity: ep.identity, ifindex };
        }
    }
    let identity = match CIDRS.get(&Key::new(128, CidrKey { addr: *addr })) {
        Some(c) => c.identity,
        None => IDENTITY_WORLD,
    };
    Peer { identity, ifindex: 0 }
}

/// Entering a pod: a hooked local pod's address is genuine only from that pod's own
/// interface (`peer_if`: the interface recorded for it). Anything else (a tunnel's
/// decapsulated inner packet, a frame injected on another interface) claims an identity
/// it has not proven. The cgroup programs cannot see where a packet came in.
#[inline(always)]
pub fn spoofed_from(hook: &Hook, peer_if: u32) -> bool {
    hook.dir == DIR_INGRESS && hook.from_ifindex != FROM_UNSEEN && peer_if != 0 && peer_if != hook.from_ifindex
}

/// Judges a new flow (or re-verifies a tracked one) at the hook of `ifindex`.
/// `local` must be a local endpoint whose interface is this one: a pod that spoofs
/// another pod's address is an unknown endpoint here, never that pod.
/// What a flow is judged as: its original direction (for a reply, the opposite of
/// the hook's) and its policy port.
pub struct Judged {
    pub dir: u8,
    pub port: u16,
    /// Re-verification of a tracked flow (after a policy epoch bump).
    pub tracked: bool,
}

/// Not inlined: its own BPF function and stack frame (BPF calls take 5 arguments).
/// Returns `out.allow` (a value, not `()`: the verifier refuses a function that leaves
/// a stack pointer in R0, which LLVM may do when nothing is returned).
#[inline(never)]
pub fn decide(cfg: &Config, hook: &Hook, f: &Flow, j: &Judged, out: &mut Decision) -> bool {
    // The hook, not the judged direction, says which address is the peer.
    let peer_addr = if hook.dir == DIR_INGRESS { &f.saddr } else { &f.daddr };
    let peer = peer_of(hook, peer_addr);
    // A flow opened to a Service frontend that no socket hook translated: judged against
    // the Service (every backend), not the frontend's address (kube-proxy DNATs it after
    // this hook). Also for a NodePort on a node address, which is otherwise `host`.
    let fe = if j.dir == DIR_EGRESS { frontend_of(peer_addr, f.proto, j.port) } else { Frontend::NONE };
    *out = if spoofed_from(hook, peer.ifindex) {
        deny(Reason::DropSpoofedSource, 0, peer.identity, 0)
    } else if fe.identity != 0 {
        // Its own function: the general decision below is not walked again by the
        // verifier for the Service case.
        service_judgement(cfg, hook, f, &fe)
    } else {
        decide_inner(cfg, hook, f, j, peer.identity)
    };
    out.peer_if = peer.ifindex;
    if !out.allow && hairpin(hook) {
        out.allow = true;
        out.reason = Reason::AllowSelf;
    }
    out.allow
}

/// A packet into a pod that entered the node through the pod's own interface: the pod's
/// own traffic coming back (kube-proxy's hairpin). Only TC hooks know the ingress device.
#[inline(always)]
fn hairpin(hook: &Hook) -> bool {
    hook.dir == DIR_INGRESS && hook.from_ifindex == hook.ifindex && hook.ifindex != CGROUP_HOOK_IFINDEX && hook.from_ifindex != FROM_UNSEEN
}

/// What the untranslated judgement needs of a frontend.
struct Frontend {
    /// `SvcFrontendValue::identity`; 0: no frontend (judged by address).
    identity: u32,
    set: u32,
    backends: u32,
    /// The frontend port (the flow's policy port).
    port: u16,
}

impl Frontend {
    const NONE: Frontend = Frontend { identity: 0, set: 0, backends: 0, port: 0 };
}

#[inline(always)]
fn frontend_of(addr: &[u8; 16], proto: u8, port: u16) -> Frontend {
    match unsafe { SVC_FRONTENDS.get(&SvcFrontendKey { addr: *addr, port, proto, _pad: 0 }) } {
        Some(v) if v.identity & IDENTITY_SERVICE_FLAG != 0 => Frontend { identity: v.identity, set: v.svc_id, backends: v.backends, port },
        _ => Frontend::NONE,
    }
}

/// Whether the frontend's one backend is `local` (one lookup; denied flows only).
#[inline(never)]
fn only_backend_is(fe: &Frontend, local: &[u8; 16]) -> bool {
    match unsafe { SVC_BACKENDS.get(&SvcBackendKey { svc_id: fe.set, slot: 0 }) } {
        Some(b) => b.addr == *local,
        None => false,
    }
}

#[inline(always)]
fn decide_inner(cfg: &Config, hook: &Hook, f: &Flow, j: &Judged, peer_id: u32) -> Decision {
    let (dir, port) = (j.dir, j.port);
    let proto = f.proto;
    let ifindex = hook.ifindex;
    let (local, peer) = if hook.dir == DIR_INGRESS { (&f.daddr, &f.saddr) } else { (&f.saddr, &f.daddr) };
    // The agent marks an address it cannot attribute (e.g. claimed by two pods) `init`.
    let ep = match unsafe { ENDPOINTS.get(&EndpointKey { addr: *local }) } {
        Some(ep) if ep.flags & EP_LOCAL != 0 && ep.ifindex == ifindex && ep.identity != IDENTITY_INIT => *ep,
        _ => return unknown_local(cfg, hook, dir, peer_id),
    };
    let local_id = ep.identity;
    let host_probe = is_host_probe(cfg, dir, peer_id);
    // A pod sending to a node's tunnel endpoint: the node would decapsulate and route
    // the inner packet with whatever source the pod wrote. Only an explicit allow (or a
    // deny) decides, isolated or not.
    if dir == DIR_EGRESS && (peer_id == IDENTITY_HOST || peer_id == IDENTITY_REMOTE_NODE) && is_tunnel(proto, port) {
        return tunnel_decision(local_id, peer_id, proto, port);
    }
    if ep.flags & enforce_flag(dir) == 0 {
        // Not isolated: no policy entries exist for this endpoint in this direction.
        let reason = if host_probe { Reason::AllowHost } else { Reason::AllowNoPolicy };
        return allow(reason, local_id, peer_id, 0);
    }
    let exact = POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local_id, peer_id, dir, proto, port)));
    let any = POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local_id, IDENTITY_ANY, dir, proto, port)));
    let (exact_v, exact_r, exact_f) = match exact {
        Some(v) => (v.verdict, v.rule_id, v.flags),
        None => (0, 0, 0),
    };
    let (any_v, any_r, any_f) = match any {
        Some(v) => (v.verdict, v.rule_id, v.flags),
        None => (0, 0, 0),
    };
    if exact_v == VERDICT_DENY {
        return deny(Reason::DropPolicyDeny, local_id, peer_id, exact_r);
    }
    if any_v == VERDICT_DENY {
        return deny(Reason::DropPolicyDeny, local_id, peer_id, any_r);
    }
    // Host probes pass unless a deny names the host (checked just above).
    if host_probe {
        return allow(Reason::AllowHost, local_id, peer_id, 0);
    }
    if exact_v == VERDICT_ALLOW || any_v == VERDICT_ALLOW {
        // An allow is an allow: authentication is needed only if every entry that allows
        // the flow requires it (a missing entry's flags count as requiring it).
        let rule = if exact_v == VERDICT_ALLOW { exact_r } else { any_r };
        let fe = if exact_v == VERDICT_ALLOW { exact_f } else { POLICY_FLAG_AUTH_REQUIRED };
        let fa = if any_v == VERDICT_ALLOW { any_f } else { POLICY_FLAG_AUTH_REQUIRED };
        if fe & fa & POLICY_FLAG_AUTH_REQUIRED != 0 {
            if auth::proven(hook, f, peer_id) {
                return allow(Reason::AllowAuthenticated, local_id, peer_id, rule);
            }
            return deny(Reason::DropAuthRequired, local_id, peer_id, rule);
        }
        return allow(Reason::AllowPolicy, local_id, peer_id, rule);
    }
    // Names learned from DNS answers: only for peers outside the cluster (a pod keeps
    // its pod identity whatever name resolved to it). Denies were checked above.
    if dir == DIR_EGRESS && ep.flags & EP_FQDN != 0 && (peer_id == IDENTITY_WORLD || peer_id & IDENTITY_CIDR_FLAG != 0) {
        let rule = fqdn::allowed(local_id, peer, proto, port, j.tracked);
        if rule != 0 {
            // A Service frontend reached untranslated, or any address of the Service
            // ranges (kube-proxy would DNAT it to a pod no rule allowed): a name never
            // makes it `world`.
            if is_frontend(peer, proto, port) || SVC_CIDRS.get(&Key::new(128, CidrKey { addr: *peer })).is_some() {
                svc_stat(SvcStat::FqdnFrontend);
                return deny(Reason::DropPolicyDefault, local_id, peer_id, 0);
            }
            return allow(Reason::AllowFqdn, local_id, peer_id, rule);
        }
    }
    deny(Reason::DropPolicyDefault, local_id, peer_id, 0)
}

#[inline(always)]
fn is_frontend(addr: &[u8; 16], proto: u8, port: u16) -> bool {
    unsafe { SVC_FRONTENDS.get(&SvcFrontendKey { addr: *addr, port, proto, _pad: 0 }).is_some() }
}

#[inline(always)]
fn svc_stat(s: SvcStat) {
    if let Some(p) = SVC_STATS.get_ptr_mut(s as u32) {
        unsafe { *p += 1 };
    }
}

/// An egress flow to a Service frontend, untranslated. Isolated pods: only the agent's
/// all-backends entry decides (it already folds in denies and any-peer rules at each
/// backend's target port; an any-peer rule at the frontend port says nothing). A pod's
/// own Service (its only backend is the pod) is its own traffic, which NetworkPolicy
/// never blocks. Counted either way.
#[inline(never)]
fn service_judgement(cfg: &Config, hook: &Hook, f: &Flow, fe: &Frontend) -> Decision {
    let svc_id = fe.identity;
    let local = if hook.dir == DIR_INGRESS { &f.daddr } else { &f.saddr };
    let d = match unsafe { ENDPOINTS.get(&EndpointKey { addr: *local }) } {
        Some(ep) if ep.flags & EP_LOCAL != 0 && ep.ifindex == hook.ifindex && ep.identity != IDENTITY_INIT => {
            let local_id = ep.identity;
            if ep.flags & EP_ENFORCE_EGRESS == 0 {
                allow(Reason::AllowNoPolicy, local_id, svc_id, 0)
            } else {
                match POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local_id, svc_id, DIR_EGRESS, f.proto, fe.port))) {
                    Some(v) if v.verdict == VERDICT_ALLOW => allow(Reason::AllowService, local_id, svc_id, v.rule_id),
                    _ if fe.backends == 1 && only_backend_is(fe, local) => allow(Reason::AllowSelf, local_id, svc_id, 0),
                    _ => deny(Reason::DropService, local_id, svc_id, 0),
                }
            }
        }
        _ => unknown_local(cfg, hook, DIR_EGRESS, svc_id),
    };
    svc_stat(if d.allow { SvcStat::UntranslatedAllowed } else { SvcStat::UntranslatedDenied });
    d
}

#[inline(always)]
fn is_tunnel(proto: u8, port: u16) -> bool {
    unsafe { TUNNELS.get(&tunnel_key(proto, port)).is_some() || TUNNELS.get(&tunnel_key(proto, 0)).is_some() }
}

/// Not inlined: only tunnel traffic pays for it.
#[inline(never)]
fn tunnel_decision(local_id: u32, peer_id: u32, proto: u8, port: u16) -> Decision {
    let mut allowed: Option<u32> = None;
    for pid in [peer_id, IDENTITY_ANY] {
        if let Some(v) = POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local_id, pid, DIR_EGRESS, proto, port))) {
            if v.verdict == VERDICT_DENY {
                return deny(Reason::DropPolicyDeny, local_id, peer_id, v.rule_id);
            }
            if allowed.is_none() && v.verdict == VERDICT_ALLOW {
                allowed = Some(v.rule_id);
            }
        }
    }
    if let Some(rule) = allowed {
        return allow(Reason::AllowPolicy, local_id, peer_id, rule);
    }
    deny(Reason::DropTunnel, local_id, peer_id, 0)
}

#[inline(always)]
fn is_host_probe(cfg: &Config, dir: u8, peer_id: u32) -> bool {
    dir == DIR_INGRESS && peer_id == IDENTITY_HOST && cfg.flags & CONFIG_ALLOW_HOST != 0
}

/// The local address is no endpoint of this hook. At a TC hook that is spoofing or a pod
/// the agent no longer knows: fail closed. At the cgroup programs (hook ifindex 0) it is
/// a pod the agent does not know yet, `initialising`: it fails closed too, except for
/// what the host is allowed (kubelet probes reach a starting pod; their replies pass
/// through conntrack under hook ifindex 0).
#[inline(always)]
fn unknown_local(cfg: &Config, hook: &Hook, dir: u8, peer_id: u32) -> Decision {
    if hook.ifindex != CGROUP_HOOK_IFINDEX {
        return deny(Reason::DropUnknownEndpoint, IDENTITY_INIT, peer_id, 0);
    }
    if is_host_probe(cfg, dir, peer_id) {
        return allow(Reason::AllowHost, IDENTITY_INIT, peer_id, 0);
    }
    deny(Reason::DropInitialising, IDENTITY_INIT, peer_id, 0)
}

#[inline(always)]
fn allow(reason: Reason, local_id: u32, peer_id: u32, rule_id: u32) -> Decision {
    Decision { allow: true, reason, local_id, peer_id, rule_id, peer_if: 0 }
}

#[inline(always)]
fn deny(reason: Reason, local_id: u32, peer_id: u32, rule_id: u32) -> Decision {
    Decision { allow: false, reason, local_id, peer_id, rule_id, peer_if: 0 }
}
