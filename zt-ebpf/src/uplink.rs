//! The node's uplink (issue 11): `zt_from_uplink` at TC ingress of the interfaces traffic
//! from other nodes arrives on (the agent's `--uplink-interfaces`). Nothing is judged or
//! dropped here (the pod's `zt_to_pod` does that); a client on another node whose new TCP
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
//! Everything else passes untouched: replies to local pods' own connections, flows that
//! stay in the kernel, and what is no SYN of a new flow (a flow without an entry here
//! reaches `zt_to_pod`, which refuses it on an HTTP port: fail closed).
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use zt_common::*;

use crate::{
    conntrack,
    datapath::TC_PASS,
    l7,
    maps::{CONFIG, ENDPOINTS},
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
    // Only a hooked local pod under ingress policy can have HTTP rules: one lookup for
    // everything else.
    let pod_if = match unsafe { ENDPOINTS.get(&EndpointKey { addr: f.daddr }) } {
        Some(ep) if ep.flags & (EP_LOCAL | EP_ENFORCE_INGRESS) == EP_LOCAL | EP_ENFORCE_INGRESS && ep.ifindex != 0 => ep.ifindex,
        _ => return TC_PASS,
    };
    let how = steer_how(uplink, pod_if, &f);
    if how == l7::STEER_NONE {
        return TC_PASS;
    }
    l7::steer(ctx, DIR_INGRESS, &f, how)
}

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
    policy::decide(cfg, &hook, f, &Judged { dir: DIR_INGRESS, port: f.policy_port, tracked: false }, &mut d);
    if !d.allow {
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
