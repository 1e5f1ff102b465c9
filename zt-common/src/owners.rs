//! The cgroup programs' shortcut for a hooked pod's own packets. Every packet of a pod's
//! own sockets passes the cgroup programs at the pods' cgroup root, and for a pod whose
//! TC hook judges it they only check that the socket belongs to the pod that owns the
//! address. `ZT_LOCAL_OWNERS` answers that with an array slot, read in place, where the
//! endpoint map costs a hash lookup of the address: one slot per hooked local pod
//! address, chosen by `local_owner_slot`. A slot holds the address it was written for (a
//! packet whose address differs, or an empty slot, falls back to the endpoint map, which
//! holds everything), so two addresses on the same slot cost speed, never a verdict.
//!
//! Written by the agent in step with `ZT_ENDPOINTS` (zt-agent `local_owners.rs`): a slot
//! is cleared before its endpoint changes or goes and written after it is in place. The
//! kernel reads a slot once and checks it again after deciding: a slot rewritten in
//! between (emptied first) leaves the packet to the endpoint map.

/// Array `u32 -> LocalOwner` of `LOCAL_OWNER_SLOTS`.
pub const MAP_LOCAL_OWNERS: &str = "ZT_LOCAL_OWNERS";
/// Half for IPv4, half for IPv6: a node's pods (about a hundred) in a per-node pod range
/// differ in their low bits.
pub const LOCAL_OWNER_SLOTS: u32 = 4096;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalOwner {
    /// The hooked local pod's address (IPv4 mapped).
    pub addr: [u8; 16],
    /// `cgroup_scope` of the pod's cgroup; 0: an empty slot (a pod whose cgroup is not
    /// known is not given one: the endpoint map decides for it).
    pub scope: u32,
    /// Written by the cgroup programs: 1 + the cgroup level at which they found `scope`
    /// above a socket's cgroup (0: not yet), tried first next time. A hint only: a miss
    /// walks every level. The agent writes 0 and ignores it when comparing slots.
    pub level_hint: u32,
}

impl LocalOwner {
    /// The slot's content as the agent writes it (the kernel's hint left out).
    pub const fn of(addr: [u8; 16], scope: u32) -> Self {
        LocalOwner { addr, scope, level_hint: 0 }
    }
}

/// The slot of a local address: its low 11 bits, in the IPv4 half for an address whose
/// bytes 10 and 11 are those of the IPv4-mapped prefix, else in the IPv6 half (a slot
/// is only where an address is looked for first: the whole address is compared).
#[inline(always)]
pub const fn local_owner_slot(addr: &[u8; 16]) -> u32 {
    let half = LOCAL_OWNER_SLOTS / 2;
    let low = (((addr[14] as u32) << 8) | addr[15] as u32) & (half - 1);
    let v4 = addr[10] == 0xff && addr[11] == 0xff;
    if v4 {
        low
    } else {
        low | half
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), Copy, no padding, no pointers.
    unsafe impl aya::Pod for LocalOwner {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn slots_split_by_family_and_stay_in_range() {
        let v4 = crate::v4_mapped([10, 244, 1, 7]);
        let mut v6 = [0u8; 16];
        v6[0] = 0xfd;
        v6[15] = 7;
        assert_eq!(local_owner_slot(&v4), 0x107);
        assert_eq!(local_owner_slot(&v6), LOCAL_OWNER_SLOTS / 2 + 7);
        assert!(local_owner_slot(&[0xff; 16]) < LOCAL_OWNER_SLOTS);
        // A node's /24: 256 addresses, 256 slots.
        let slots: std::collections::BTreeSet<u32> = (0..=255u8).map(|i| local_owner_slot(&crate::v4_mapped([10, 244, 1, i]))).collect();
        assert_eq!(slots.len(), 256);
    }
}
