//! Every verdict is counted (per CPU, by direction and reason); drops, and allowed new
//! flows when enabled, become ring-buffer events under a per-CPU token bucket so that a
//! flood cannot starve the agent.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::*;

use crate::{
    maps::{COUNTERS, EVENTS, EVSTATS, RATELIMIT},
    parse::Flow,
    policy::{Decision, Hook},
};

#[inline(always)]
pub fn count(dir: u8, reason: Reason) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter_index(dir, reason as u8)) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn evstat(slot: u32) {
    if let Some(p) = EVSTATS.get_ptr_mut(slot) {
        unsafe { *p += 1 };
    }
}

/// Token bucket: `events_per_sec` tokens a second, at most `events_burst` banked.
#[inline(always)]
fn take_token(cfg: &Config, now: u64) -> bool {
    match RATELIMIT.get_ptr_mut(0) {
        Some(rl) => take_token_from(unsafe { &mut *rl }, cfg.events_per_sec, cfg.events_burst, now),
        None => false,
    }
}

/// One token from the (per-CPU) bucket `rl`: `rate` tokens a second, at most `burst`
/// banked. Shared by drop events and DNS answer copies.
#[inline(always)]
pub fn take_token_from(rl: &mut RateLimit, rate: u32, burst: u32, now: u64) -> bool {
    let elapsed = now.saturating_sub(rl.last_ns);
    let burst = burst as u64;
    // Cap the interval first so that the multiplication cannot overflow.
    let rate = rate as u64;
    if elapsed >= 1_000_000_000 {
        rl.tokens = burst;
        rl.last_ns = now;
    } else {
        let refill = elapsed * rate / 1_000_000_000;
        if refill > 0 {
            rl.tokens = core::cmp::min(burst, rl.tokens + refill);
            // Advance only by the time the granted tokens stand for: the remainder
            // carries over instead of being lost at every refill.
            // (checked: a division that could panic has no place in a BPF program)
            rl.last_ns += (refill * 1_000_000_000).checked_div(rate).unwrap_or(elapsed);
        }
    }
    if rl.tokens == 0 {
        return false;
    }
    rl.tokens -= 1;
    true
}

/// Sends one event for a packet judged at `hook`. Not inlined: its own stack frame.
#[inline(never)]
pub fn emit(cfg: &Config, hook: &Hook, f: &Flow, d: &Decision) {
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(cfg, now) {
        evstat(EVSTAT_RATE_LIMITED);
        return;
    }
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(Event {
                ts_ns: now,
                saddr: f.saddr,
                daddr: f.daddr,
                sport: f.sport,
                dport: f.dport,
                proto: f.proto,
                dir: hook.dir,
                reason: d.reason as u8,
                verdict: if d.reason.is_drop() { VERDICT_DENY } else { VERDICT_ALLOW },
                local_id: d.local_id,
                peer_id: d.peer_id,
                rule_id: d.rule_id,
                ifindex: hook.ifindex,
            });
            entry.submit(0);
            evstat(EVSTAT_SENT);
        }
        None => evstat(EVSTAT_RING_FULL),
    }
}
