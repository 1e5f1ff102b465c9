//! Connection tracking: one LRU entry per admitted flow and hook direction. A packet
//! matches its flow forward (same tuple, same direction) or as a reply (reversed
//! tuple, opposite direction). Entries verified under an older policy epoch are
//! re-checked, which is how a withdrawn allow cuts live flows.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::*;

use crate::{
    maps::{CT, ENDPOINTS},
    parse::{Flow, IPPROTO_TCP},
    policy::{Decision, Hook},
};

#[inline(always)]
pub fn forward_key(f: &Flow, hook: &Hook) -> CtKey {
    CtKey { saddr: f.saddr, daddr: f.daddr, sport: f.sport, dport: f.dport, proto: f.proto, dir: hook.dir, icmp_tag: f.icmp_tag, _pad: 0, ifindex: hook.scope }
}

#[inline(always)]
fn reply_key(f: &Flow, hook: &Hook) -> CtKey {
    CtKey {
        saddr: f.daddr,
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto: f.proto,
        dir: hook.dir ^ 1,
        icmp_tag: f.icmp_tag,
        _pad: 0,
        ifindex: hook.scope,
    }
}

#[inline(always)]
fn fresh(cfg: &Config, proto: u8, v: *mut CtValue, now: u64) -> bool {
    let timeout_s = if proto == IPPROTO_TCP { cfg.ct_tcp_timeout_s } else { cfg.ct_other_timeout_s };
    let last = unsafe { (*v).last_seen_ns };
    now.saturating_sub(last) < timeout_s as u64 * 1_000_000_000
}

/// The tracked flow of this packet (null if none), forward first, then as a reply
/// (`reply` set). Expired entries are removed on the way.
#[inline(never)]
pub fn lookup(cfg: &Config, f: &Flow, hook: &Hook, now: u64, reply: &mut bool) -> *mut CtValue {
    let fk = forward_key(f, hook);
    if let Some(v) = CT.get_ptr_mut(&fk) {
        if fresh(cfg, f.proto, v, now) {
            *reply = false;
            return v;
        }
        let _ = CT.remove(&fk);
    }
    let rk = reply_key(f, hook);
    if let Some(v) = CT.get_ptr_mut(&rk) {
        if fresh(cfg, f.proto, v, now) {
            *reply = true;
            return v;
        }
        let _ = CT.remove(&rk);
    }
    core::ptr::null_mut()
}

/// Is this ICMP error about a live flow tracked at this hook, of the current policy
/// epoch, and sent by someone entitled to speak for that flow's path?
/// - An error goes back to the sender of the packet it quotes: the quoted source must be
///   the error's destination. The quoted packet is then the flow forward as seen at this
///   pod's other hook, or its reply at this one.
/// - Leaving a pod, the error must come from the pod itself (the quoted destination); a
///   pod is no router. Entering a pod, it must come from the flow's peer or from an
///   address that is no pod (the node, a router on the path): a third pod cannot
///   disturb another pod's flows.
/// - A stale entry, or one not verified under the current epoch (a revoked flow whose
///   next packet has not been judged yet), relates nothing.
#[inline(never)]
pub fn related(cfg: &Config, f: &Flow, hook: &Hook, now: u64) -> bool {
    let q = &f.quoted;
    if q.saddr != f.daddr {
        return false;
    }
    if f.saddr != q.daddr && (hook.dir == DIR_EGRESS || is_pod(&f.saddr)) {
        return false;
    }
    let fwd = CtKey {
        saddr: q.saddr,
        daddr: q.daddr,
        sport: q.sport,
        dport: q.dport,
        proto: q.proto,
        dir: hook.dir ^ 1,
        icmp_tag: q.icmp_tag,
        _pad: 0,
        ifindex: hook.scope,
    };
    let rev = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        dir: hook.dir,
        icmp_tag: q.icmp_tag,
        _pad: 0,
        ifindex: hook.scope,
    };
    let v = match CT.get_ptr_mut(&fwd) {
        Some(v) => v,
        None => match CT.get_ptr_mut(&rev) {
            Some(v) => v,
            None => return false,
        },
    };
    fresh(cfg, q.proto, v, now) && unsafe { (*v).epoch } == cfg.policy_epoch
}

/// An address the endpoint map knows as a workload (local or remote pod, or `init`).
#[inline(always)]
fn is_pod(addr: &[u8; 16]) -> bool {
    match unsafe { ENDPOINTS.get(&EndpointKey { addr: *addr }) } {
        Some(ep) => ep.identity >= IDENTITY_FIRST_WORKLOAD || ep.identity == IDENTITY_INIT,
        None => false,
    }
}

/// Forgets a flow whose allow was withdrawn.
#[inline(never)]
pub fn remove(f: &Flow, hook: &Hook, reply: bool) {
    let k = if reply { reply_key(f, hook) } else { forward_key(f, hook) };
    let _ = CT.remove(&k);
}

/// After a re-verification under a new epoch: the flow's identities and rule may have
/// changed (a relabelled pod keeps its flow if the new identity is allowed too).
#[inline(always)]
pub fn reverified(v: *mut CtValue, epoch: u32, d: &Decision) {
    unsafe {
        (*v).epoch = epoch;
        (*v).local_id = d.local_id;
        (*v).peer_id = d.peer_id;
        (*v).rule_id = d.rule_id;
        (*v).peer_if = d.peer_if;
    }
}

/// Refreshes last-seen at most once a second to keep writes off the hot path.
#[inline(always)]
pub fn touch(v: *mut CtValue, now: u64) {
    unsafe {
        if now.saturating_sub((*v).last_seen_ns) > 1_000_000_000 {
            (*v).last_seen_ns = now;
        }
    }
}

#[inline(never)]
pub fn create(f: &Flow, hook: &Hook, epoch: u32, d: &Decision) {
    let now = unsafe { bpf_ktime_get_ns() };
    let v = CtValue {
        created_ns: now,
        last_seen_ns: now,
        epoch,
        local_id: d.local_id,
        peer_id: d.peer_id,
        rule_id: d.rule_id,
        policy_port: f.policy_port,
        reason: d.reason as u8,
        _pad: 0,
        peer_if: d.peer_if,
    };
    // LRU: inserting evicts the oldest entry when full. Should it still fail, the
    // flow's replies are judged as new flows: fail closed.
    let _ = CT.insert(&forward_key(f, hook), &v, 0);
}
