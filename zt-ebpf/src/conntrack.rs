//! Connection tracking: one LRU entry per admitted flow and hook direction. A packet
//! matches its flow forward (same tuple, same direction) or as a reply (reversed
//! tuple, opposite direction). Entries verified under an older policy epoch are
//! re-checked, which is how a withdrawn allow cuts live flows.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::*;

use crate::{
    maps::CT,
    parse::{Flow, Quoted, IPPROTO_TCP},
    policy::Decision,
};

#[inline(always)]
pub fn forward_key(f: &Flow, dir: u8) -> CtKey {
    CtKey { saddr: f.saddr, daddr: f.daddr, sport: f.sport, dport: f.dport, proto: f.proto, dir, _pad: [0; 2] }
}

#[inline(always)]
fn reply_key(f: &Flow, dir: u8) -> CtKey {
    CtKey {
        saddr: f.daddr,
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto: f.proto,
        dir: dir ^ 1,
        _pad: [0; 2],
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
pub fn lookup(cfg: &Config, f: &Flow, dir: u8, now: u64, reply: &mut bool) -> *mut CtValue {
    let fk = forward_key(f, dir);
    if let Some(v) = CT.get_ptr_mut(&fk) {
        if fresh(cfg, f.proto, v, now) {
            *reply = false;
            return v;
        }
        let _ = CT.remove(&fk);
    }
    let rk = reply_key(f, dir);
    if let Some(v) = CT.get_ptr_mut(&rk) {
        if fresh(cfg, f.proto, v, now) {
            *reply = true;
            return v;
        }
        let _ = CT.remove(&rk);
    }
    core::ptr::null_mut()
}

/// Is this ICMP error about a tracked flow? The quoted packet travelled the other way,
/// so it is that flow forward as seen at the opposite hook, or its reply at this one.
#[inline(never)]
pub fn related(q: &Quoted, dir: u8) -> bool {
    let fwd = CtKey { saddr: q.saddr, daddr: q.daddr, sport: q.sport, dport: q.dport, proto: q.proto, dir: dir ^ 1, _pad: [0; 2] };
    if CT.get_ptr(&fwd).is_some() {
        return true;
    }
    let rev = CtKey { saddr: q.daddr, daddr: q.saddr, sport: q.dport, dport: q.sport, proto: q.proto, dir, _pad: [0; 2] };
    CT.get_ptr(&rev).is_some()
}

/// Forgets a flow whose allow was withdrawn.
#[inline(never)]
pub fn remove(f: &Flow, dir: u8, reply: bool) {
    let k = if reply { reply_key(f, dir) } else { forward_key(f, dir) };
    let _ = CT.remove(&k);
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
pub fn create(f: &Flow, dir: u8, epoch: u32, d: &Decision) {
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
    let _ = CT.insert(&forward_key(f, dir), &v, 0);
}
