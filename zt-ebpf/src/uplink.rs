//! The node's uplink (issue 11): `zt_from_uplink` at TC ingress of the interfaces traffic
//! from other nodes arrives on (the agent's `--uplink-interfaces`). The pod's `zt_to_pod`
//! judges; the only drop here is a steered packet with no proxy to take it
//! (`http-proxy-down`). A client on another node whose new TCP
//! flow to a local pod needs the HTTP proxy is steered to it, as `zt_from_pod` steers a
//! local client (l7.rs):
//! - a SYN to a local pod under ingress policy is judged as `zt_to_pod` would judge it
//!   (`policy::decide` with the pod's hook); what `l7::new_flow` would refuse there as
//!   `http-unsteered` (allowed, and the deciding entry carries `POLICY_FLAG_HTTP`) is
//!   tracked here (`CT_L7`, keyed on the uplink's ifindex) and assigned to the proxy's
//!   listener, marked for the local route table (`l7::steer`);
//! - every later packet of a tracked flow is marked (a retransmitted SYN assigned again),
//!   so that the stack delivers it to the proxy's socket for the tuple, not the pod.
//! The uplink sees only the client's direction (the proxy answers through the stack), so
//! the entry is created as having seen the reply: the client's handshake ACK makes it
//! established (`CT_EST`, the long timeout), its FIN or RST closes it.
//! The mirror case, a local client whose egress HTTP rules sent it through this node's
//! proxy to a server on another node: the server's answers to the proxy's upstream
//! connection (from the client's address) are marked for the proxy's socket
//! (`proxy_upstream`), not routed to the pod.
//! Everything else passes untouched: replies to local pods' own connections, flows that
//! stay in the kernel, and what is no SYN of a new flow (a flow without an entry here
//! reaches `zt_to_pod`, which refuses it on an HTTP port: fail closed).
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_release},
    programs::TcContext,
};
use zt_common::*;

use crate::{
    conntrack,
    datapath::TC_PASS,
    l7,
    maps::{CONFIG, ENDPOINTS, L7_CONFIG},
    parse::{self, Flow, Frag, Parsed, IPPROTO_TCP},
    policy::{self, Decision, Hook, Judged},
    verdict,
};

#[inline(always)]
pub fn handle(ctx: &TcContext) -> i32 {
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    let mut f = Flow::zeroed();
    if parse::parse(ctx.skb.skb, &mut f, parse::L3_AFTER_ETH) != Parsed::Flow || f.proto != IPPROTO_TCP || f.related || matches!(f.frag, Frag::Later) {
        return TC_PASS;
    }
    // Only a hooked local pod under policy can have HTTP rules: one lookup for everything
    // else.
    let ep = match unsafe { ENDPOINTS.get(&EndpointKey { addr: f.daddr }) } {
        Some(ep) if ep.flags & EP_LOCAL != 0 && ep.ifindex != 0 && ep.flags & (EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS) != 0 => *ep,
        _ => return TC_PASS,
    };
    let mut how = l7::STEER_NONE;
    if ep.flags & EP_ENFORCE_INGRESS != 0 {
        how = steer_how(uplink, ep.ifindex, &f);
    }
    if how == l7::STEER_NONE && ep.flags & EP_ENFORCE_EGRESS != 0 && proxy_upstream(ctx, uplink, ep.identity, &f) {
        how = l7::STEER_LOCAL;
    }
    if how == l7::STEER_NONE {
        return TC_PASS;
    }
    l7::steer(ctx, DIR_INGRESS, &f, how)
}

/// A packet for this node's proxy rather than the pod: the server's answer to the
/// proxy's upstream connection of a local client whose egress HTTP rules sent it through
/// the proxy (l7.rs, step 1), opened from the client's address to a server on another
/// node. Only when the pod's deciding egress entry for the server's port carries the flag,
/// and a socket of this node's stack holds the tuple, not listening, with the proxy's mark
/// (no other socket of the node has a pod's address).
#[inline(never)]
fn proxy_upstream(ctx: &TcContext, uplink: u32, local_id: u32, f: &Flow) -> bool {
    let pm = match L7_CONFIG.get(0) {
        Some(c) if c.proxy_mark != 0 => c.proxy_mark,
        _ => return false,
    };
    let hook = Hook { ifindex: 0, dir: DIR_INGRESS, scope: uplink, from_ifindex: uplink };
    let peer = policy::peer_of(&hook, &f.saddr);
    if !l7::http_entry(local_id, peer.identity, DIR_EGRESS, f.sport) {
        return false;
    }
    // struct bpf_sock_tuple: IPv4 saddr, daddr, sport, dport (12 bytes) or IPv6 (36),
    // network byte order.
    let mut t = [0u8; 36];
    let v4 = f.daddr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    let size = if v4 {
        t[0..4].copy_from_slice(&f.saddr[12..16]);
        t[4..8].copy_from_slice(&f.daddr[12..16]);
        t[8..10].copy_from_slice(&f.sport.to_be_bytes());
        t[10..12].copy_from_slice(&f.dport.to_be_bytes());
        12
    } else {
        t[0..16].copy_from_slice(&f.saddr);
        t[16..32].copy_from_slice(&f.daddr);
        t[32..34].copy_from_slice(&f.sport.to_be_bytes());
        t[34..36].copy_from_slice(&f.dport.to_be_bytes());
        36
    };
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.skb.skb as *mut _, t.as_mut_ptr() as *mut _, size, u64::MAX, 0) };
    if sk.is_null() {
        return false;
    }
    let ours = unsafe { (*sk).state != TCP_LISTEN && (*sk).mark == pm };
    unsafe { bpf_sk_release(sk as *mut _) };
    ours
}

/// `BPF_TCP_LISTEN` (`struct bpf_sock::state`).
const TCP_LISTEN: u32 = 10;

/// How the packet goes to the proxy (`STEER_NONE`: it does not).
#[inline(never)]
fn steer_how(uplink: u32, pod_if: u32, f: &Flow) -> u8 {
    let cfg = match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => c,
        _ => return l7::STEER_NONE,
    };
    // Judged as the pod's hook judges it, tracked under the uplink's ifindex (apart from
    // the pod's own entries), entered from the uplink (a local pod's address is spoofed
    // here, and the node's addresses are no `host`).
    let hook = Hook { ifindex: pod_if, dir: DIR_INGRESS, scope: uplink, from_ifindex: uplink };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut found = conntrack::Found { reply: false, est: false, now };
    let ct = conntrack::lookup(cfg, f, &hook, &mut found);
    if !ct.is_null() {
        // Only steered flows have entries under an uplink's ifindex.
        if found.reply || unsafe { (*ct).state } & CT_L7 == 0 {
            return l7::STEER_NONE;
        }
        let how = l7::tracked_how(f);
        conntrack::update(f, &hook, ct, &found);
        return how;
    }
    if f.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
        return l7::STEER_NONE;
    }
    let mut d = Decision { allow: false, reason: Reason::DropPolicyDefault, local_id: 0, peer_id: 0, rule_id: 0, peer_if: 0 };
    if !policy::decide(cfg, &hook, f, &Judged { dir: DIR_INGRESS, port: f.policy_port, tracked: false }, &mut d) {
        return l7::STEER_NONE;
    }
    let mut w = l7::Work::NONE;
    if !matches!(l7::new_flow(&hook, f, &d, &mut w), Some(Reason::DropHttpUnsteered)) {
        return l7::STEER_NONE;
    }
    conntrack::create(f, &hook, cfg.policy_epoch, &d);
    l7::track_one_way(f, &hook);
    verdict::count(DIR_INGRESS, Reason::AllowHttpSteered);
    if cfg.flags & CONFIG_EVENTS_ALLOWED != 0 {
        d.reason = Reason::AllowHttpSteered;
        verdict::emit(cfg, &hook, f, &d);
    }
    l7::STEER_LISTENER
}
