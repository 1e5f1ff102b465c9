//! Connection tracking: one entry per admitted flow and hook direction. A packet
//! matches its flow forward (same tuple, same direction) or as a reply (reversed
//! tuple, opposite direction). Entries verified under an older policy epoch are
//! re-checked, which is how a withdrawn allow cuts live flows.
//!
//! Entries live in two maps, so that one pod's connection churn cannot evict another
//! pod's established flows:
//! - `CT_EST`, a plain hash, holds established TCP flows (handshake completed, not yet
//!   closed). Nothing evicts them: they leave when they close, expire (the agent's GC,
//!   or the kernel meeting them expired), or are revoked. When it is full a newly
//!   established flow stays in `CT` and is counted (`CtStat::EstablishedFull`).
//! - `CT`, an LRU, holds everything else: TCP before the handshake completed (SYN
//!   floods, scans, half-open churn) and after it closed, UDP, ICMP, other protocols.
//!   New flows always find room there; churn evicts churn.
//! A plain hash for everything would refuse new flows node-wide once churn (or the agent's
//! absence, with nothing collecting) filled it; an LRU for everything lets any pod evict
//! idle established flows, whose next packet from the server is then judged as new and
//! dropped. The lookup order keeps the established path at today's cost: a TCP packet
//! looks in `CT_EST` first (forward, then reply) and only then in `CT`; other protocols
//! look in `CT` only.
//!
//! TCP state (`zt_common::ct_tcp_next`) picks the idle timeout (`ct_timeout_s`): hours
//! once established, a minute before, seconds once closed by FIN both ways or RST.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use zt_common::*;

use crate::{
    maps::{CT, CT_EST, CT_STATS, ENDPOINTS},
    parse::{Flow, IPPROTO_TCP},
    policy::{Decision, Hook},
};

/// Where `lookup` found a packet's flow, and the time it read.
pub struct Found {
    /// Matched as the reply (reversed tuple).
    pub reply: bool,
    /// In `CT_EST` (else in `CT`).
    pub est: bool,
    pub now: u64,
}

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

/// The key the flow's entry is stored under.
#[inline(always)]
fn stored_key(f: &Flow, hook: &Hook, reply: bool) -> CtKey {
    if reply {
        reply_key(f, hook)
    } else {
        forward_key(f, hook)
    }
}

/// A tracked packet writes the flow's last-seen only when it is older than this, to keep
/// writes off the hot path (`update`; established.rs passes only segments with no write due).
pub const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
fn fresh(cfg: &Config, proto: u8, v: *mut CtValue, now: u64) -> bool {
    let (last, state) = unsafe { ((*v).last_seen_ns, (*v).state) };
    within_timeout(cfg, proto, state, now.saturating_sub(last))
}

/// Is a flow of `proto` in `state`, idle `idle_ns`, still within its idle timeout?
#[inline(always)]
pub fn within_timeout(cfg: &Config, proto: u8, state: u8, idle_ns: u64) -> bool {
    idle_ns < ct_timeout_s(cfg, proto, state) as u64 * 1_000_000_000
}

#[inline(always)]
fn stat(s: CtStat) {
    if let Some(p) = CT_STATS.get_ptr_mut(s as u32) {
        unsafe { *p += 1 };
    }
}

/// A fresh entry of `$map` under `$key`, else null; an expired one is removed on the way.
macro_rules! fresh_in {
    ($map:expr, $cfg:expr, $proto:expr, $key:expr, $now:expr) => {
        match $map.get_ptr_mut($key) {
            Some(v) if fresh($cfg, $proto, v, $now) => v,
            Some(_) => {
                let _ = $map.remove($key);
                core::ptr::null_mut()
            }
            None => core::ptr::null_mut(),
        }
    };
}

/// The tracked flow of this packet (null if none), forward first, then as a reply; TCP
/// in `CT_EST` before `CT`. Expired entries are removed on the way.
#[inline(never)]
pub fn lookup(cfg: &Config, f: &Flow, hook: &Hook, found: &mut Found) -> *mut CtValue {
    let now = found.now;
    let fk = forward_key(f, hook);
    if f.proto == IPPROTO_TCP {
        let v = fresh_in!(CT_EST, cfg, f.proto, &fk, now);
        if !v.is_null() {
            (found.reply, found.est) = (false, true);
            return v;
        }
    }
    // Built once the forward lookup missed: a forward hit never pays for it.
    let rk = reply_key(f, hook);
    if f.proto == IPPROTO_TCP {
        let v = fresh_in!(CT_EST, cfg, f.proto, &rk, now);
        if !v.is_null() {
            (found.reply, found.est) = (true, true);
            return v;
        }
    }
    let v = fresh_in!(CT, cfg, f.proto, &fk, now);
    if !v.is_null() {
        (found.reply, found.est) = (false, false);
        return v;
    }
    let v = fresh_in!(CT, cfg, f.proto, &rk, now);
    if !v.is_null() {
        (found.reply, found.est) = (true, false);
        return v;
    }
    core::ptr::null_mut()
}

/// Is this ICMP error about a live flow tracked at this hook, of the current policy
/// epoch, and sent by someone entitled to speak for that flow's path?
/// - An error goes back to the sender of the packet it quotes: the quoted source is the
///   error's destination (`f.related` is set only then, parse.rs). The quoted packet is
///   then the flow forward as seen at this pod's other hook, or its reply at this one.
/// - Leaving a pod, the error must come from the pod itself (the quoted destination); a
///   pod is no router. Entering a pod, it must come from the flow's peer or from an
///   address that is no pod (the node, a router on the path): a third pod cannot
///   disturb another pod's flows.
/// - A stale entry, or one not verified under the current epoch (a revoked flow whose
///   next packet has not been judged yet), relates nothing.
#[inline(never)]
pub fn related(cfg: &Config, f: &Flow, hook: &Hook, now: u64) -> bool {
    let q = &f.quoted;
    if f.saddr != q.daddr && (hook.dir == DIR_EGRESS || is_pod(&f.saddr)) {
        return false;
    }
    let fwd = CtKey {
        saddr: f.daddr,
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
        daddr: f.daddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        dir: hook.dir,
        icmp_tag: q.icmp_tag,
        _pad: 0,
        ifindex: hook.scope,
    };
    let mut v: *mut CtValue = core::ptr::null_mut();
    if q.proto == IPPROTO_TCP {
        v = match CT_EST.get_ptr_mut(&fwd) {
            Some(v) => v,
            None => CT_EST.get_ptr_mut(&rev).unwrap_or(core::ptr::null_mut()),
        };
    }
    if v.is_null() {
        v = match CT.get_ptr_mut(&fwd) {
            Some(v) => v,
            None => match CT.get_ptr_mut(&rev) {
                Some(v) => v,
                None => return false,
            },
        };
    }
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

/// `CT_PROVEN` for a flow allowed as authenticated (without a branch: no new verifier
/// states on the paths that follow).
#[inline(always)]
fn proven_bit(d: &Decision) -> u8 {
    ((d.reason as u8 == Reason::AllowAuthenticated as u8) as u8) << CT_PROVEN.trailing_zeros()
}

/// Forgets a flow whose allow was withdrawn.
#[inline(never)]
pub fn remove(f: &Flow, hook: &Hook, found: &Found) {
    let k = stored_key(f, hook, found.reply);
    let _ = if found.est { CT_EST.remove(&k) } else { CT.remove(&k) };
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

/// After a tracked packet passed: its TCP flags move the state, last-seen is refreshed
/// (at most once a second, to keep writes off the hot path), and a flow that just became
/// established moves to `CT_EST`, one that closed moves back to `CT`. An established
/// segment without FIN/RST writes nothing but the once-a-second refresh. Called last:
/// after a move `v` points to a deleted element.
#[inline(never)]
pub fn update(f: &Flow, hook: &Hook, v: *mut CtValue, found: &Found) {
    let now = found.now;
    let old = unsafe { (*v).state };
    let stale = now.saturating_sub(unsafe { (*v).last_seen_ns }) > REFRESH_NS;
    if stale {
        unsafe { (*v).last_seen_ns = now };
    }
    if f.proto != IPPROTO_TCP {
        return;
    }
    let state = ct_tcp_next(old, f.tcp_flags, found.reply);
    if state == old && !stale {
        return;
    }
    unsafe { (*v).state = state };
    let st = state & CT_STATE_MASK;
    if found.est && st == CT_TCP_CLOSED {
        // Closed: back to the LRU for its last seconds, off the protected map.
        let key = stored_key(f, hook, found.reply);
        let val = unsafe { *v };
        if CT.insert(&key, &val, 0).is_ok() {
            let _ = CT_EST.remove(&key);
            stat(CtStat::Demoted);
        }
    } else if !found.est && st == CT_TCP_ESTABLISHED {
        // Established (or still waiting for room: retried at most once a second).
        let key = stored_key(f, hook, found.reply);
        let val = unsafe { *v };
        if CT_EST.insert(&key, &val, 0).is_ok() {
            let _ = CT.remove(&key);
            stat(CtStat::Promoted);
        } else {
            stat(CtStat::EstablishedFull);
        }
    }
}

/// A new allowed flow, in `CT` (its handshake promotes it). Should the insert fail, the
/// flow's replies are judged as new flows (fail closed) and the failure is counted.
#[inline(never)]
pub fn create(f: &Flow, hook: &Hook, epoch: u32, d: &Decision) {
    // The clock every tracked packet reads (datapath::handle_flow).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let v = CtValue {
        created_ns: now,
        last_seen_ns: now,
        epoch,
        local_id: d.local_id,
        peer_id: d.peer_id,
        rule_id: d.rule_id,
        policy_port: f.policy_port,
        reason: d.reason as u8,
        state: if f.proto == IPPROTO_TCP { ct_tcp_next(0, f.tcp_flags, false) } else { 0 } | proven_bit(d),
        peer_if: d.peer_if,
    };
    if CT.insert(&forward_key(f, hook), &v, 0).is_err() {
        stat(CtStat::CreateFailed);
    }
}
