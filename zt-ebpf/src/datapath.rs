//! One hook's decision for one packet: parse, then tracked flow (forward or reply,
//! re-verified on a new policy epoch), else a fresh policy decision.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use zt_common::*;

use crate::{
    conntrack,
    maps::{CONFIG, FRAGS},
    parse::{self, Flow, Frag, Parsed},
    policy::{self, Decision, Hook, Judged},
    verdict,
};

/// Allow: let the next TC program (the cluster's CNI) or the stack have the packet.
pub const TC_PASS: i32 = -1; // TC_ACT_UNSPEC / TCX_NEXT
pub const TC_DROP: i32 = 2; // TC_ACT_SHOT / TCX_DROP

/// A TC hook: the interface is the pod's host-side veth, the frame has Ethernet.
#[inline(always)]
pub fn handle(ctx: &TcContext, dir: u8) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let hook = Hook { ifindex, dir, scope: ifindex };
    let mut f = Flow::zeroed();
    let parsed = parse::parse(ctx.skb.skb, &mut f, parse::L3_AFTER_ETH);
    if judge(&hook, &f, parsed) {
        TC_PASS
    } else {
        TC_DROP
    }
}

/// The verdict for a parsed packet at `hook` (true = pass), counted and reported.
/// Shared by the TC hooks and the cgroup programs (which judge as hook ifindex 0).
#[inline(always)]
pub fn judge(hook: &Hook, f: &Flow, parsed: Parsed) -> bool {
    let dir = hook.dir;
    if parsed == Parsed::NonIp {
        verdict::count(dir, Reason::AllowNonIp);
        return true;
    }
    let cfg = match CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_READY != 0 => c,
        _ => {
            verdict::count(dir, Reason::DropNotReady);
            return false;
        }
    };
    match parsed {
        Parsed::NonIp => true,
        Parsed::Ndp => {
            verdict::count(dir, Reason::AllowNdp);
            true
        }
        Parsed::Malformed => drop_unjudged(cfg, hook, f, Reason::DropMalformed),
        Parsed::TooManyExtHeaders => drop_unjudged(cfg, hook, f, Reason::DropIpv6ExtHeaders),
        Parsed::Flow => handle_flow(cfg, hook, f),
    }
}

#[inline(always)]
fn handle_flow(cfg: &Config, hook: &Hook, f: &Flow) -> bool {
    if let Frag::Later = f.frag {
        return later_fragment(cfg, hook, f);
    }
    let dir = hook.dir;
    if f.related {
        if conntrack::related(f, hook) {
            verdict::count(dir, Reason::AllowRelated);
            return true;
        }
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let mut d = Decision { allow: false, reason: Reason::DropPolicyDefault, local_id: 0, peer_id: 0, rule_id: 0 };
    let mut reply = false;
    let ct = conntrack::lookup(cfg, f, hook, now, &mut reply);
    if !ct.is_null() {
        if unsafe { (*ct).epoch } != cfg.policy_epoch {
            // The policy changed since this flow was admitted: judge it again as the
            // flow it is (its original direction and port).
            let (odir, port) = if reply { (dir ^ 1, unsafe { (*ct).policy_port }) } else { (dir, f.policy_port) };
            policy::decide(cfg, hook, f, &Judged { dir: odir, port }, &mut d);
            if !d.allow {
                conntrack::remove(f, hook, reply);
                d.reason = Reason::DropRevoked;
                return drop_judged(cfg, hook, f, &d);
            }
            conntrack::reverified(ct, cfg.policy_epoch, &d);
        }
        conntrack::touch(ct, now);
        note_first_fragment(f, hook, now);
        verdict::count(dir, if reply { Reason::AllowReply } else { Reason::AllowEstablished });
        return true;
    }
    policy::decide(cfg, hook, f, &Judged { dir, port: f.policy_port }, &mut d);
    if !d.allow {
        return drop_judged(cfg, hook, f, &d);
    }
    conntrack::create(f, hook, cfg.policy_epoch, &d);
    note_first_fragment(f, hook, now);
    verdict::count(dir, d.reason);
    if cfg.flags & CONFIG_EVENTS_ALLOWED != 0 {
        verdict::emit(cfg, hook, f, &d);
    }
    true
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
    let now = unsafe { bpf_ktime_get_ns() };
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
    FragKey { saddr: f.saddr, daddr: f.daddr, id: f.frag_id, proto: f.proto, dir: hook.dir, _pad: [0; 2], ifindex: hook.scope }
}

/// A drop decided before identities were resolved.
#[inline(always)]
fn drop_unjudged(cfg: &Config, hook: &Hook, f: &Flow, reason: Reason) -> bool {
    let d = Decision { allow: false, reason, local_id: 0, peer_id: 0, rule_id: 0 };
    drop_judged(cfg, hook, f, &d)
}

#[inline(always)]
fn drop_judged(cfg: &Config, hook: &Hook, f: &Flow, d: &Decision) -> bool {
    verdict::count(hook.dir, d.reason);
    verdict::emit(cfg, hook, f, d);
    false
}
