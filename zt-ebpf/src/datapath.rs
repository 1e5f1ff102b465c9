//! One hook's decision for one packet: parse, then tracked flow (forward or reply,
//! re-verified on a new policy epoch), else a fresh policy decision.
use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::TcContext};
use zt_common::*;

use crate::{
    conntrack, dns, established, l7,
    maps::{CONFIG, FRAGS},
    parse::{self, Flow, Frag, Parsed, IPPROTO_TCP, IPPROTO_UDP},
    policy::{self, Decision, Hook, Judged, FROM_UNSEEN},
    verdict,
};

/// Allow: let the next TC program (the cluster's CNI) or the stack have the packet.
pub const TC_PASS: i32 = -1; // TC_ACT_UNSPEC / TCX_NEXT
pub const TC_DROP: i32 = 2; // TC_ACT_SHOT / TCX_DROP

/// A TC hook: the interface is the pod's host-side veth, the frame has Ethernet.
/// `SHORT`: try the established segment's short way first, as every attached program
/// does (false only in `zt_bench_general`, which measures what it saves).
#[inline(always)]
pub fn handle<const SHORT: bool>(ctx: &TcContext, dir: u8) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let from_ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // The HTTP proxy's packets come from the node's own stack with a pod's address:
    // where they entered says nothing (l7.rs).
    let from_ifindex = if dir == DIR_INGRESS { l7::from_ifindex(ctx, from_ifindex) } else { from_ifindex };
    let hook = Hook { ifindex, dir, scope: ifindex, from_ifindex };
    // Most TCP and UDP packets: one of an established flow that changes nothing
    // (established.rs); anything else is judged below from the start.
    if SHORT && established::pass(ctx.skb.skb, &hook) {
        return TC_PASS;
    }
    let mut l7 = l7::Work::NONE;
    let mut f = Flow::zeroed();
    let parsed = parse::parse(ctx.skb.skb, &mut f, parse::L3_AFTER_ETH);
    let mut dns_work = dns::Work::None;
    if !judge(&hook, &f, parsed, &mut dns_work, &mut l7) {
        return TC_DROP;
    }
    dns::run(ctx.skb.skb, dns_work);
    if l7.steer == l7::STEER_LISTENER || l7.steer == l7::STEER_LOCAL {
        return l7::steer(ctx, dir, &f, l7.steer);
    }
    TC_PASS
}

/// The verdict for a parsed packet at `hook` (true = pass), counted and reported.
/// Shared by the TC hooks and the cgroup programs (which judge as hook ifindex 0).
/// `dns` is set for a DNS answer to capture or a query to record (`dns::note` and
/// `dns::note_query` hold the details): the caller runs `dns::run` last, from one call
/// site, so that the verifier checks the parser once rather than once per path through
/// the datapath.
#[inline(always)]
pub fn judge(hook: &Hook, f: &Flow, parsed: Parsed, dns: &mut dns::Work, l7: &mut l7::Work) -> bool {
    let dir = hook.dir;
    match parsed {
        Parsed::NonIp => {
            verdict::count(dir, Reason::AllowNonIp);
            return true;
        }
        // Never passes, whatever the agent's state: counted, and reported once the
        // agent has configured the datapath.
        Parsed::Vlan | Parsed::BadEthertype => {
            return drop_whatever_state(hook, f, if parsed == Parsed::Vlan { Reason::DropVlan } else { Reason::DropEthertype });
        }
        _ => {}
    }
    let cfg = match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => c,
        _ => {
            verdict::count(dir, Reason::DropNotReady);
            return false;
        }
    };
    match parsed {
        Parsed::NonIp | Parsed::Vlan | Parsed::BadEthertype => false,
        Parsed::Ndp => {
            verdict::count(dir, Reason::AllowNdp);
            true
        }
        Parsed::Malformed => drop_unjudged(cfg, hook, f, Reason::DropMalformed),
        Parsed::TooManyExtHeaders => drop_unjudged(cfg, hook, f, Reason::DropIpv6ExtHeaders),
        Parsed::Flow => handle_flow(cfg, hook, f, dns, l7),
    }
}

#[inline(always)]
fn handle_flow(cfg: &Config, hook: &Hook, f: &Flow, dns_work: &mut dns::Work, l7: &mut l7::Work) -> bool {
    // Later fragments and ICMP errors match no conntrack entry of their own: their
    // source is checked here (tracked flows carry their peer's interface, new flows are
    // checked where the peer is looked up).
    if (matches!(f.frag, Frag::Later) || f.related) && spoofed_local_source(hook, &f.saddr) {
        return drop_unjudged(cfg, hook, f, Reason::DropSpoofedSource);
    }
    if let Frag::Later = f.frag {
        return later_fragment(cfg, hook, f);
    }
    let dir = hook.dir;
    // The coarse clock (CLOCK_MONOTONIC at tick resolution) is enough for idle timeouts
    // in seconds and the once-a-second last-seen refresh, and reads no clock source: on
    // a virtual machine the precise clock is one of the larger costs of a tracked packet.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if f.related {
        if conntrack::related(cfg, f, hook, now) {
            verdict::count(dir, Reason::AllowRelated);
            return true;
        }
    }
    let mut d = Decision { allow: false, reason: Reason::DropPolicyDefault, local_id: 0, peer_id: 0, rule_id: 0, peer_if: 0 };
    let mut found = conntrack::Found { reply: false, est: false, now };
    let ct = conntrack::lookup(cfg, f, hook, &mut found);
    if !ct.is_null() {
        let reply = found.reply;
        if unsafe { (*ct).epoch } != cfg.policy_epoch {
            // The policy changed since this flow was admitted: judge it again as the
            // flow it is (its original direction and port).
            let (odir, port) = if reply { (dir ^ 1, unsafe { (*ct).policy_port }) } else { (dir, f.policy_port) };
            let j = Judged { dir: odir, port, tracked: true };
            if !policy::decide(cfg, hook, f, &j, &mut d) {
                // A packet claiming the flow's peer from the wrong interface says nothing
                // about the flow: dropped as spoofed, the entry kept for the genuine
                // packets (else any pod knowing a tuple could cut it at every bump).
                if d.reason as u8 == Reason::DropSpoofedSource as u8 {
                    return drop_judged(cfg, hook, f, &d);
                }
                conntrack::remove(f, hook, &found);
                d.reason = Reason::DropRevoked;
                return drop_judged(cfg, hook, f, &d);
            }
            // HTTP rules added to the port of a flow that runs outside the proxy.
            if unsafe { (*ct).state } & CT_L7 == 0 && l7::needs_proxy(f, hook, &d, &j) {
                conntrack::remove(f, hook, &found);
                d.reason = Reason::DropHttpUnsteered;
                return drop_judged(cfg, hook, f, &d);
            }
            conntrack::reverified(ct, cfg.policy_epoch, &d);
        }
        if policy::spoofed_from(hook, unsafe { (*ct).peer_if }) {
            return drop_unjudged(cfg, hook, f, Reason::DropSpoofedSource);
        }
        note_first_fragment(f, hook, now);
        // DNS on a tracked flow, whichever side opened it (a packet from the resolver's
        // address before the query must not make the answer unlearnable): a query is
        // recorded, an answer is learned from only if it matches one.
        if is_dns(f) {
            let ids = dns::Ids { local: unsafe { (*ct).local_id }, peer: unsafe { (*ct).peer_id } };
            *dns_work = dns_work_of(f, hook, &ids);
        }
        if unsafe { (*ct).state } & CT_L7 != 0 {
            l7::tracked(hook, f, l7);
        }
        // Last: TCP state, last-seen, and a move between the conntrack maps.
        conntrack::update(f, hook, ct, &found);
        verdict::count(dir, if reply { Reason::AllowReply } else { Reason::AllowEstablished });
        return true;
    }
    if dir == DIR_INGRESS && f.sport == 53 && (f.proto == IPPROTO_UDP || f.proto == IPPROTO_TCP) {
        dns::untracked(f);
    }
    if !policy::decide(cfg, hook, f, &Judged { dir, port: f.policy_port, tracked: false }, &mut d) {
        return drop_judged(cfg, hook, f, &d);
    }
    if let Some(reason) = l7::new_flow(hook, f, &d, l7) {
        d.reason = reason;
        return drop_judged(cfg, hook, f, &d);
    }
    conntrack::create(f, hook, cfg.policy_epoch, &d);
    if l7.steer != l7::STEER_NONE {
        l7::track(f, hook);
    }
    note_first_fragment(f, hook, now);
    if dir == DIR_EGRESS && f.dport == 53 && (f.proto == IPPROTO_UDP || f.proto == IPPROTO_TCP) {
        *dns_work = if dns::note_query(f, d.peer_id) { dns::Work::Query } else { dns::Work::None };
    }
    verdict::count(dir, d.reason);
    if cfg.flags & CONFIG_EVENTS_ALLOWED != 0 {
        verdict::emit(cfg, hook, f, &d);
    }
    true
}

#[inline(always)]
fn is_dns(f: &Flow) -> bool {
    (f.sport == 53 || f.dport == 53) && (f.proto == IPPROTO_UDP || f.proto == IPPROTO_TCP)
}

/// An answer entering a pod from port 53, or a query leaving it to port 53.
#[inline(always)]
fn dns_work_of(f: &Flow, hook: &Hook, ids: &dns::Ids) -> dns::Work {
    if hook.dir == DIR_INGRESS && f.sport == 53 && dns::note(f, hook, ids) {
        dns::Work::Answer
    } else if hook.dir == DIR_EGRESS && f.dport == 53 && dns::note_query(f, ids.peer) {
        dns::Work::Query
    } else {
        dns::Work::None
    }
}

/// Entering a pod: is the source a hooked local pod that did not send it from its own
/// interface? (One endpoint lookup; see `policy::spoofed_from`.)
#[inline(always)]
fn spoofed_local_source(hook: &Hook, saddr: &[u8; 16]) -> bool {
    hook.dir == DIR_INGRESS && hook.from_ifindex != FROM_UNSEEN && policy::spoofed_from(hook, policy::peer_of(hook, saddr).ifindex)
}

/// Remembers an allowed first fragment so that its later fragments (no L4 header) pass.
#[inline(always)]
fn note_first_fragment(f: &Flow, hook: &Hook, now: u64) {
    if let Frag::First = f.frag {
        let _ = FRAGS.insert(&frag_key(f, hook), &FragValue { created_ns: now }, 0);
    }
}

#[inline(always)]
fn later_fragment(cfg: &Config, hook: &Hook, f: &Flow) -> bool {
    // The clock `note_first_fragment` was given (handle_flow's).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(v) = unsafe { FRAGS.get(&frag_key(f, hook)) } {
        if now.saturating_sub(v.created_ns) < cfg.frag_timeout_s as u64 * 1_000_000_000 {
            verdict::count(hook.dir, Reason::AllowFragment);
            return true;
        }
    }
    drop_unjudged(cfg, hook, f, Reason::DropFragment)
}

#[inline(always)]
fn frag_key(f: &Flow, hook: &Hook) -> FragKey {
    FragKey { saddr: f.saddr, daddr: f.daddr, id: f.frag_id, proto: f.frag_proto, dir: hook.dir, _pad: [0; 2], ifindex: hook.scope }
}

/// A drop that holds whatever the agent's state (ready or not): counted, and reported
/// once the agent has configured the datapath.
#[inline(always)]
pub fn drop_whatever_state(hook: &Hook, f: &Flow, reason: Reason) -> bool {
    match CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_READY != 0 => drop_unjudged(cfg, hook, f, reason),
        _ => {
            verdict::count(hook.dir, reason);
            false
        }
    }
}

/// A drop decided before identities were resolved.
#[inline(always)]
fn drop_unjudged(cfg: &Config, hook: &Hook, f: &Flow, reason: Reason) -> bool {
    let d = Decision { allow: false, reason, local_id: 0, peer_id: 0, rule_id: 0, peer_if: 0 };
    drop_judged(cfg, hook, f, &d)
}

#[inline(always)]
fn drop_judged(cfg: &Config, hook: &Hook, f: &Flow, d: &Decision) -> bool {
    verdict::count(hook.dir, d.reason);
    verdict::emit(cfg, hook, f, d);
    false
}
