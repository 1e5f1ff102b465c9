//! The cgroup skb programs, attached once at the root of the pods' cgroup hierarchy:
//! they see every pod's own socket traffic from its first packet, whatever its network
//! namespace, before the agent has hooked (or even heard of) the pod. The data starts
//! at the IP header. Per packet:
//! - loopback (ifindex 1 in every netns) and non-IP pass;
//! - a local endpoint with a TC hook (`ifindex != 0`) passes if the socket is in that
//!   pod's cgroup: its hook judges it (no double counting). It is found in its
//!   `LOCAL_OWNERS` slot, else in `ENDPOINTS`.
//! - an address of the host identity (host-network pods) or of `dns` that is no pod (a
//!   host-network resolver: NodeLocal DNSCache) passes;
//! - anything else is judged by the shared datapath as hook ifindex 0: a known pod not
//!   hooked yet by its policy, an unknown address as `initialising` (fails closed
//!   except for host probes).
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    programs::SkBuffContext,
};
use zt_common::*;

use crate::{
    datapath, dns,
    maps::{ENDPOINTS, LOCAL_OWNERS},
    parse::{self, Flow, Parsed},
    policy::{Hook, FROM_UNSEEN},
};

pub const CG_PASS: i32 = 1;
pub const CG_DROP: i32 = 0;
/// The loopback device has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

#[inline(always)]
pub fn handle(ctx: &SkBuffContext, dir: u8) -> i32 {
    let skb = ctx.skb.skb;
    if unsafe { (*skb).ifindex } == LOOPBACK_IFINDEX {
        return CG_PASS;
    }
    let mut f = Flow::zeroed();
    let parsed = parse::parse(skb, &mut f, parse::L3_AT_START);
    if parsed == Parsed::NonIp {
        return CG_PASS;
    }
    let local = if dir == DIR_INGRESS { &f.daddr } else { &f.saddr };
    let owner = owner_of(skb, local);
    if owner == Owner::Elsewhere {
        return CG_PASS;
    }
    // Flows judged here are tracked per socket cgroup, not per (absent) interface: a pod
    // that starts later with a recycled address, or forges a tuple, cannot ride another
    // pod's tracked flow.
    let scope = cgroup_scope(unsafe { bpf_skb_cgroup_id(skb) });
    let hook = Hook { ifindex: CGROUP_HOOK_IFINDEX, dir, scope, from_ifindex: FROM_UNSEEN };
    if owner == Owner::AnotherPod {
        datapath::drop_whatever_state(&hook, &f, Reason::DropSpoofedSource);
        return CG_DROP;
    }
    let mut dns_work = dns::Work::None;
    // No steering here: cgroup programs cannot assign sockets (l7.rs).
    let mut l7 = crate::l7::Work::NONE;
    if !datapath::judge(&hook, &f, parsed, &mut dns_work, &mut l7) {
        return CG_DROP;
    }
    dns::run(skb, dns_work);
    CG_PASS
}

#[derive(PartialEq, Eq)]
enum Owner {
    /// A hooked local pod's own socket (its TC hook judges it), or the node's address.
    Elsewhere,
    /// Judged here: an address the agent does not know or has not hooked.
    Here,
    /// The address of a hooked pod, from a socket outside that pod's cgroup: a pod
    /// forging another pod's address with a raw socket, or a new pod that got the
    /// address of a pod deleted while the agent was down (`spoofed-source`).
    AnotherPod,
}

#[inline(always)]
fn owner_of(skb: *mut __sk_buff, addr: &[u8; 16]) -> Owner {
    match slot_owner(skb, addr) {
        SLOT_MINE => return Owner::Elsewhere,
        SLOT_NOT_MINE => return Owner::AnotherPod,
        _ => {}
    }
    match unsafe { ENDPOINTS.get(&EndpointKey { addr: *addr }) } {
        // The node's, or a host-network resolver's address named by --fqdn-dns-address
        // (NodeLocal DNSCache): the node's own traffic, as for host-network pods.
        Some(ep) if ep.identity == IDENTITY_HOST || ep.identity == IDENTITY_DNS => Owner::Elsewhere,
        Some(ep) if ep.flags & EP_LOCAL != 0 && ep.ifindex != CGROUP_HOOK_IFINDEX => {
            if ep.cgroup == 0 || cgroup_level(skb, ep.cgroup) >= 0 {
                Owner::Elsewhere
            } else {
                Owner::AnotherPod
            }
        }
        _ => Owner::Here,
    }
}

const SLOT_MINE: i32 = 1;
const SLOT_NOT_MINE: i32 = 0;
const SLOT_NONE: i32 = -1;

/// A hooked pod's address in its slot: no hash lookup (zt-common owners.rs). A slot
/// holding another address, or none, decides nothing (`SLOT_NONE`): the endpoint map
/// does. Its own function (and fields read one by one): its own stack frame, the cgroup
/// programs' is near the limit.
#[inline(never)]
fn slot_owner(skb: *mut __sk_buff, addr: &[u8; 16]) -> i32 {
    let Some(slot) = LOCAL_OWNERS.get_ptr_mut(local_owner_slot(addr)) else { return SLOT_NONE };
    // Read once: the agent may rewrite the slot meanwhile.
    let scope = unsafe { core::ptr::read_volatile(&(*slot).scope) };
    let hint = unsafe { core::ptr::read_volatile(&(*slot).level_hint) };
    if scope == 0 || unsafe { (*slot).addr != *addr } {
        return SLOT_NONE;
    }
    let mine = in_owner_cgroup(skb, slot, scope, hint);
    // The agent empties a slot before it writes another pod into it: a slot that is not
    // what it was decides nothing.
    if unsafe { core::ptr::read_volatile(&(*slot).scope) } != scope || unsafe { (*slot).addr != *addr } {
        return SLOT_NONE;
    }
    if mine {
        SLOT_MINE
    } else {
        SLOT_NOT_MINE
    }
}

/// Levels of the cgroup tree searched for a pod's cgroup at or above a socket's (kubelet
/// puts pods at level 2 or 3 under the root, and their containers one below).
const MAX_CGROUP_LEVEL: i32 = 8;

/// Is the socket's cgroup the slot's pod cgroup or inside it? The level it was last found
/// at is tried first (one helper call where the walk from the root makes one per level),
/// and a walk that finds it there records it.
#[inline(always)]
fn in_owner_cgroup(skb: *mut __sk_buff, slot: *mut LocalOwner, scope: u32, hint: u32) -> bool {
    if hint != 0 && hint <= MAX_CGROUP_LEVEL as u32 + 1 && cgroup_scope(unsafe { bpf_skb_ancestor_cgroup_id(skb, hint as i32 - 1) }) == scope {
        return true;
    }
    let level = cgroup_level(skb, scope);
    if level < 0 {
        return false;
    }
    unsafe { (*slot).level_hint = level as u32 + 1 };
    true
}

/// The level of the cgroup of `scope` (`cgroup_scope`) at or above the socket's cgroup,
/// or -1 if the socket's cgroup is not inside it.
#[inline(never)]
fn cgroup_level(skb: *mut __sk_buff, scope: u32) -> i32 {
    for level in 0..=MAX_CGROUP_LEVEL {
        let id = unsafe { bpf_skb_ancestor_cgroup_id(skb, level) };
        if id == 0 {
            return -1;
        }
        if cgroup_scope(id) == scope {
            return level;
        }
    }
    -1
}
