//! HTTP steering (issue 11). L3/L4 stays here; the flows of ports with HTTP rules
//! (`POLICY_FLAG_HTTP`) go to the agent's transparent proxy, which judges each request:
//! - leaving a client pod (`zt_from_pod`, TC ingress): a new allowed TCP flow whose egress
//!   entry, or whose local server's ingress entry, carries the flag is assigned to the
//!   proxy's listener (`bpf_sk_assign`, the socket from `ZT_L7_LISTENER`) and tracked with
//!   `CT_L7`; every later packet of it is marked `steer_mark`, which the node routes to a
//!   local table, so the stack delivers it to the proxy's socket for that tuple.
//! - entering the server pod (`zt_to_pod`): the proxy's upstream connection (from the
//!   client's own address, `SO_MARK proxy_mark`) is judged by the server's L3/L4 policy like
//!   the client; its entry gets `CT_L7`, so the server's replies (at `zt_from_pod` of the
//!   server) are steered back to the proxy's socket rather than routed to the client.
//!   A new flow to a port with HTTP rules that is not the proxy's drops (`http-unsteered`):
//!   the host, a pod not hooked yet, or a client on another node that no uplink hook
//!   steered (uplink.rs) is refused, never passed.
//! - arriving from another node (`zt_from_uplink`, uplink.rs): the same steering for a
//!   client whose node is not this one, judged as the server's hook would judge it.
//! No listener registered (agent down): steered packets drop (`http-proxy-down`).
use aya_ebpf::{
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use zt_common::*;

use crate::{
    datapath::TC_DROP,
    maps::{L7_CONFIG, L7_LISTENER, POLICY},
    parse::{Flow, IPPROTO_TCP},
    policy::{Decision, Hook, Judged, FROM_UNSEEN},
    verdict,
};

pub const STEER_NONE: u8 = 0;
/// To the proxy's listener (a connection's first packets).
pub const STEER_LISTENER: u8 = 1;
/// Marked for local delivery (the proxy's sockets for this tuple exist).
pub const STEER_LOCAL: u8 = 2;
/// Track with `CT_L7` only (the proxy's upstream, entering the server).
pub const STEER_TRACK: u8 = 3;

/// What the datapath decided for the proxy, per packet.
pub struct Work {
    pub steer: u8,
}

impl Work {
    pub const NONE: Work = Work { steer: STEER_NONE };
}

/// Entering a pod: the interface the packet came in on, or `FROM_UNSEEN` for the proxy's
/// packets (`proxy_mark`; pods cannot set a mark the host sees), which come from the
/// node's own stack with a pod's address. Branch-free, so that the verifier carries one
/// state on, not two, through the whole datapath.
#[inline(always)]
pub fn from_ifindex(ctx: &TcContext, ingress_ifindex: u32) -> u32 {
    let mark = unsafe { (*ctx.skb.skb).mark };
    let pm = match L7_CONFIG.get(0) {
        Some(c) => c.proxy_mark,
        None => 0,
    };
    let nonzero = |x: u32| (x | x.wrapping_neg()) >> 31;
    // 0 only when the mark is the (configured, non-zero) proxy mark.
    let differs = nonzero(mark ^ pm) | (nonzero(pm) ^ 1);
    // All ones (FROM_UNSEEN) when it is the proxy's, else 0.
    let mask = differs.wrapping_sub(1);
    ingress_ifindex | mask
}

/// The HTTP flag of the allow entry that decides (exact peer first, then any peer), as
/// `policy::decide_inner` picks it.
#[inline(always)]
pub fn http_entry(local: u32, peer: u32, dir: u8, port: u16) -> bool {
    let v = match POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local, peer, dir, IPPROTO_TCP, port))) {
        Some(v) if v.verdict == VERDICT_ALLOW => v.flags,
        _ => match POLICY.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local, IDENTITY_ANY, dir, IPPROTO_TCP, port))) {
            Some(v) if v.verdict == VERDICT_ALLOW => v.flags,
            _ => 0,
        },
    };
    v & POLICY_FLAG_HTTP != 0
}

/// A new TCP flow the policy allowed at a TC hook: steer it, mark it for tracking, or
/// refuse it (returns the drop reason, `None` to go on).
#[inline(never)]
pub fn new_flow(hook: &Hook, f: &Flow, d: &Decision, w: &mut Work) -> Option<Reason> {
    if f.proto != IPPROTO_TCP || hook.ifindex == CGROUP_HOOK_IFINDEX {
        return None;
    }
    let port = f.policy_port;
    if hook.dir == DIR_EGRESS {
        let egress = matches!(d.reason, Reason::AllowPolicy | Reason::AllowAuthenticated) && http_entry(d.local_id, d.peer_id, DIR_EGRESS, port);
        // The server's ingress rules, when the server is a pod hooked on this node.
        if egress || (d.peer_if != 0 && http_entry(d.peer_id, d.local_id, DIR_INGRESS, port)) {
            w.steer = STEER_LISTENER;
        }
        return None;
    }
    // The proxy's packets are the only ones a TC hook judges with an unseen ingress
    // interface (datapath::handle): no second flag to carry through the datapath.
    if hook.from_ifindex == FROM_UNSEEN {
        w.steer = STEER_TRACK;
        return None;
    }
    if matches!(d.reason, Reason::AllowPolicy | Reason::AllowAuthenticated) && http_entry(d.local_id, d.peer_id, DIR_INGRESS, port) {
        return Some(Reason::DropHttpUnsteered);
    }
    None
}

/// After a policy change, a tracked flow that runs outside the proxy (no `CT_L7`), judged
/// again in its original direction (`j`): would it now have to go through the proxy? Then
/// it is cut (`http-unsteered`) rather than left to bypass the new HTTP rules.
#[inline(never)]
pub fn needs_proxy(f: &Flow, hook: &Hook, d: &Decision, j: &Judged) -> bool {
    if f.proto != IPPROTO_TCP || hook.ifindex == CGROUP_HOOK_IFINDEX {
        return false;
    }
    let policy = matches!(d.reason, Reason::AllowPolicy | Reason::AllowAuthenticated);
    if j.dir == DIR_EGRESS {
        (policy && http_entry(d.local_id, d.peer_id, DIR_EGRESS, j.port)) || (d.peer_if != 0 && http_entry(d.peer_id, d.local_id, DIR_INGRESS, j.port))
    } else {
        policy && http_entry(d.local_id, d.peer_id, DIR_INGRESS, j.port)
    }
}

/// A tracked packet of a steered flow: the client's packets to the proxy (its SYNs to the
/// listener), and the server's replies to the proxy's upstream socket. Packets entering a
/// pod are the proxy's own and pass as they are.
#[inline(always)]
pub fn tracked(hook: &Hook, f: &Flow, w: &mut Work) {
    if hook.dir == DIR_EGRESS && hook.ifindex != CGROUP_HOOK_IFINDEX {
        w.steer = tracked_how(f);
    }
}

/// A steered flow's packet: its (retransmitted) SYN to the listener, the rest to the
/// proxy's socket for the tuple. Also the uplink's (uplink.rs).
#[inline(always)]
pub fn tracked_how(f: &Flow) -> u8 {
    if f.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        STEER_LISTENER
    } else {
        STEER_LOCAL
    }
}

/// Sets `CT_L7` on the flow's new entry (steered flows only: one more lookup).
#[inline(never)]
pub fn track(f: &Flow, hook: &Hook) {
    if let Some(v) = crate::maps::CT.get_ptr_mut(&crate::conntrack::forward_key(f, hook)) {
        unsafe { (*v).state |= CT_L7 };
    }
}

/// Sets `CT_L7` on a flow steered at an uplink (uplink.rs), and `CT_SEEN_REPLY`: the
/// uplink never sees the proxy's answers, so the client's handshake ACK must make the
/// entry established (`ct_tcp_next`), or an idle keep-alive connection would outlive it.
#[inline(never)]
pub fn track_one_way(f: &Flow, hook: &Hook) {
    if let Some(v) = crate::maps::CT.get_ptr_mut(&crate::conntrack::forward_key(f, hook)) {
        unsafe { (*v).state |= CT_L7 | CT_SEEN_REPLY };
    }
}

/// Hands the packet to the proxy: mark for the local route, and for a connection's first
/// packet the listener socket. Returns the TC verdict (TC_ACT_OK: the stack, no later
/// program, which could send it elsewhere).
#[inline(never)]
pub fn steer(ctx: &TcContext, dir: u8, f: &Flow, how: u8) -> i32 {
    let mark = match L7_CONFIG.get(0) {
        Some(c) if c.steer_mark != 0 => c.steer_mark,
        _ => return proxy_down(dir),
    };
    ctx.set_mark(mark);
    if how == STEER_LISTENER {
        let slot: u32 = if f.daddr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] { L7_LISTENER_V4 } else { L7_LISTENER_V6 };
        let sk = unsafe { bpf_map_lookup_elem(&L7_LISTENER as *const _ as *mut _, &slot as *const u32 as *const _) };
        if sk.is_null() {
            return proxy_down(dir);
        }
        let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut _, sk, 0) };
        unsafe { bpf_sk_release(sk) };
        if ret != 0 {
            return proxy_down(dir);
        }
    }
    0
}

#[inline(always)]
fn proxy_down(dir: u8) -> i32 {
    verdict::count(dir, Reason::DropHttpProxyDown);
    TC_DROP
}
