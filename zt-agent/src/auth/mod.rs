//! The user side of `ZT_AUTH_PROOFS` (issue 10): which (node, identity) pairs are proven
//! until when. The kernel compares expiries with CLOCK_BOOTTIME (`bpf_ktime_get_boot_ns`),
//! which setting the wall clock does not move; SVID lifetimes are wall-clock times, so
//! they are converted once, when a proof is written (`expiry_boot_ns`).
//!
//! Writes are make-before-break: additions and longer expiries first, removals last; a
//! removal or a shortened expiry is a withdrawal, after which the caller bumps the policy
//! epoch so that tracked flows are judged again (as a policy change does).
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use zt_common::{AuthProofKey, AuthProofValue};

use crate::pins::AuthProofsMap;

pub mod book;
pub mod links;
pub mod status;

/// CLOCK_BOOTTIME now, nanoseconds: the kernel's `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A wall-clock expiry (an SVID's not-after) on the kernel's clock, given one reading of
/// both clocks taken together. An expiry already past is `boot_now` (never valid).
pub fn expiry_boot_ns(not_after: SystemTime, wall_now: SystemTime, boot_now: u64) -> u64 {
    let left = not_after.duration_since(wall_now).unwrap_or(Duration::ZERO);
    boot_now.saturating_add(left.as_nanos().min(u64::MAX as u128) as u64)
}

/// What `sync` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProofSync {
    pub written: usize,
    pub removed: usize,
    /// A proof was removed or its expiry moved earlier: re-verify tracked flows.
    pub withdrew: bool,
}

/// Makes the map's entries of `node` exactly `want` (entries of other nodes untouched):
/// writes first, removals last.
pub fn sync_node(map: &mut AuthProofsMap, node: u32, want: &BTreeMap<AuthProofKey, AuthProofValue>) -> Result<ProofSync> {
    let mut all: BTreeMap<AuthProofKey, AuthProofValue> = read(map)?.into_iter().filter(|(k, _)| k.node != node).collect();
    all.extend(want.iter().filter(|(k, _)| k.node == node).map(|(k, v)| (*k, *v)));
    sync(map, &all)
}

/// Makes the map's entries of every other node exactly `want` (this node's own proofs,
/// `AUTH_NODE_SELF`, untouched): writes first, removals last.
pub fn sync_peers(map: &mut AuthProofsMap, want: &BTreeMap<AuthProofKey, AuthProofValue>) -> Result<ProofSync> {
    let self_node = zt_common::AUTH_NODE_SELF;
    let mut all: BTreeMap<AuthProofKey, AuthProofValue> = read(map)?.into_iter().filter(|(k, _)| k.node == self_node).collect();
    all.extend(want.iter().filter(|(k, _)| k.node != self_node).map(|(k, v)| (*k, *v)));
    sync(map, &all)
}

/// This node's own proofs: every workload identity of a local endpoint, proven by the
/// agent itself (it made the pod's interface and knows its address). They do not expire;
/// they leave with the identity's last local pod (a withdrawal: the caller bumps the epoch).
pub fn self_proofs(endpoints: &BTreeMap<[u8; 16], zt_common::EndpointValue>) -> BTreeMap<AuthProofKey, AuthProofValue> {
    endpoints
        .values()
        .filter(|v| v.flags & zt_common::EP_LOCAL != 0 && v.identity >= zt_common::IDENTITY_FIRST_WORKLOAD)
        .map(|v| (AuthProofKey { node: zt_common::AUTH_NODE_SELF, identity: v.identity }, AuthProofValue { expires_ns: u64::MAX }))
        .collect()
}

/// The proofs the map holds now.
pub fn read(map: &AuthProofsMap) -> Result<BTreeMap<AuthProofKey, AuthProofValue>> {
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Makes the map hold exactly `want`: writes first, removals last.
pub fn sync(map: &mut AuthProofsMap, want: &BTreeMap<AuthProofKey, AuthProofValue>) -> Result<ProofSync> {
    let have = read(map)?;
    let mut s = ProofSync::default();
    for (k, v) in want {
        match have.get(k) {
            Some(h) if h == v => continue,
            Some(h) if v.expires_ns < h.expires_ns => s.withdrew = true,
            _ => {}
        }
        map.insert(k, v, 0)?;
        s.written += 1;
    }
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        map.remove(k)?;
        s.removed += 1;
        s.withdrew = true;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_expiries_convert_to_boot_time() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(expiry_boot_ns(wall + Duration::from_secs(60), wall, 5), 5 + 60_000_000_000);
        assert_eq!(expiry_boot_ns(wall - Duration::from_secs(60), wall, 5), 5, "already expired");
        assert!(boottime_ns() > 0);
    }
}
