//! The FQDN decision for a new egress flow to a world/CIDR address: allowed when the
//! address was learned for the local identity from a DNS answer (`dns.rs`) under a
//! name of some FQDN slot, and that slot's rule allows the protocol and port.
//! Two lookups: ZT_FQDN_LEARNED (hash), ZT_FQDN_PORTS (LPM).
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use zt_common::*;

use crate::maps::{FQDN_CONFIG, FQDN_LEARNED, FQDN_PORTS};

/// The rule id allowing (local, peer address, proto, port), or 0. A tracked flow being
/// re-judged (`tracked`) needs only that the entry still exists: a policy change must not
/// cut a live connection whose TTL has run out. A new flow needs `now < expiry + grace`.
#[inline(never)]
pub fn allowed(local_id: u32, peer: &[u8; 16], proto: u8, port: u16, tracked: bool) -> u32 {
    let key = FqdnLearnedKey { addr: *peer, local_id };
    let Some(v) = (unsafe { FQDN_LEARNED.get(&key) }) else { return 0 };
    let learned = v.slots;
    if !tracked {
        let grace_s = match FQDN_CONFIG.get(0) {
            Some(c) => c.grace_s as u64,
            None => 0,
        };
        let now = unsafe { bpf_ktime_get_ns() };
        if now >= v.expires_ns.saturating_add(grace_s * 1_000_000_000) {
            return 0;
        }
    }
    let pk = PolicyKey::new(local_id, 0, DIR_EGRESS, proto, port);
    let Some(p) = FQDN_PORTS.get(&Key::new(POLICY_PREFIX_FULL, pk)) else { return 0 };
    let m = learned & p.slots;
    if m == 0 {
        return 0;
    }
    let s = lowest_bit(m);
    p.rule_ids[(s & 31) as usize]
}

/// Index of the lowest set bit of a non-zero `m`: a branch-free binary search (no loop,
/// no table).
#[inline(always)]
fn lowest_bit(m: u32) -> u32 {
    let mut x = m & m.wrapping_neg();
    let mut n = 0u32;
    let b = ((x & 0xffff) == 0) as u32 * 16;
    n += b;
    x >>= b;
    let b = ((x & 0xff) == 0) as u32 * 8;
    n += b;
    x >>= b;
    let b = ((x & 0xf) == 0) as u32 * 4;
    n += b;
    x >>= b;
    let b = ((x & 0x3) == 0) as u32 * 2;
    n += b;
    x >>= b;
    n + ((x & 0x1) == 0) as u32
}
