//! Connection tracking: one LRU entry per admitted flow and hook direction. A packet
//! matches its flow forward (same tuple, same direction) or as a reply (reversed
//! tuple, opposite direction). Entries verified under an older policy epoch are
//! re-checked, which is how a withdrawn allow cuts live flows.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::*;

use crate::{
    maps::CT,
    parse::{Flow, IPPROTO_TCP},
    policy::{Decision, Hook},
};

#[inline(always)]
pub fn forward_key(f: &Flow, hook: &Hook) -> CtKey {
    CtKey { saddr: f.saddr, daddr: f.daddr, sport: f.sport, dport: f.dport, proto: f.proto, dir: hook.dir, _pad: [0; 2], ifindex: hook.scope }
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
        _pad: [0; 2],
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

/// Is this ICMP error about a flow tracked at this interface? An error goes back to the
/// sender of the packet it quotes, so the quoted source must be the error's destination;
/// the quoted packet is then the flow forward as seen at this pod's other hook, or its
/// reply at this one.
#[inline(never)]
pub fn related(f: &Flow, hook: &Hook) -> bool {
    let q = &f.quoted;
    if q.saddr != f.daddr {
        return false;
    }
    let fwd = CtKey { saddr: q.saddr, daddr: q.daddr, sport: q.sport, dport: q.dport, proto: q.proto, dir: hook.dir ^ 1, _pad: [0; 2], ifindex: hook.scope };
    if CT.get_ptr(&fwd).is_some() {
        return true;
    }
    let rev = CtKey { saddr: q.daddr, daddr: q.saddr, sport: q.dport, dport: q.sport, proto: q.proto, dir: hook.dir, _pad: [0; 2], ifindex: hook.scope };
    CT.get_ptr(&rev).is_some()
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
        _pad: [0; 5],
    };
    // LRU: inserting evicts the oldest entry when full. Should it still fail, the
    // flow's replies are judged as new flows: fail closed.
    let _ = CT.insert(&forward_key(f, hook), &v, 0);
}
