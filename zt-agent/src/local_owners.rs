//! The user side of `ZT_LOCAL_OWNERS`, the cgroup programs' slots for hooked local pods
//! (zt-common owners.rs). The slots follow `ZT_ENDPOINTS`: every writer of that map
//! clears the slots it is about to change first and writes the new ones once the
//! endpoints are in place, so that a slot is either empty (the kernel asks the endpoint
//! map) or says what the endpoint map says.
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use zt_common::*;

use crate::pins::EndpointsMap;

pub type LocalOwnersMap = Array<MapData, LocalOwner>;

/// Slot -> content for `endpoints`: every local pod with a TC hook whose cgroup is known
/// (what the cgroup programs check against the socket's cgroup). Of two addresses on one
/// slot the lower keeps it; the other is left to the endpoint map.
pub fn slots(endpoints: &BTreeMap<[u8; 16], EndpointValue>) -> BTreeMap<u32, LocalOwner> {
    let mut out = BTreeMap::new();
    for (addr, ep) in endpoints {
        let hooked = ep.flags & EP_LOCAL != 0 && ep.ifindex != CGROUP_HOOK_IFINDEX;
        // The kernel passes these before it looks at the interface (cgroup.rs).
        let node_own = ep.identity == IDENTITY_HOST || ep.identity == IDENTITY_DNS;
        if hooked && !node_own && ep.cgroup != 0 {
            out.entry(local_owner_slot(addr)).or_insert(LocalOwner::of(*addr, ep.cgroup));
        }
    }
    out
}

/// Before the endpoints go from `old`'s to `new`'s: empties every slot whose content
/// changes.
pub fn clear_changed(map: &mut LocalOwnersMap, old: &BTreeMap<u32, LocalOwner>, new: &BTreeMap<u32, LocalOwner>) -> Result<()> {
    for (slot, v) in old {
        if new.get(slot) != Some(v) {
            map.set(*slot, LocalOwner::default(), 0).with_context(|| format!("clearing slot {slot} of {MAP_LOCAL_OWNERS}"))?;
        }
    }
    Ok(())
}

/// Once the endpoints are `new`'s: writes every slot `old` did not hold as it is.
pub fn write_changed(map: &mut LocalOwnersMap, old: &BTreeMap<u32, LocalOwner>, new: &BTreeMap<u32, LocalOwner>) -> Result<()> {
    for (slot, v) in new {
        if old.get(slot) != Some(v) {
            map.set(*slot, *v, 0).with_context(|| format!("writing slot {slot} of {MAP_LOCAL_OWNERS}"))?;
        }
    }
    Ok(())
}

/// At start, before this process's programs run: every slot made what `ZT_ENDPOINTS`
/// holds now. An agent that did not know this map (an older build of the same layout)
/// changed the endpoints without it; its slots must not be believed. A slot that
/// changes is emptied before it is written. Returns the slots written.
pub fn rebuild(map: &mut LocalOwnersMap, endpoints: &EndpointsMap) -> Result<usize> {
    let mut eps = BTreeMap::new();
    for item in endpoints.iter() {
        let (k, v) = item.with_context(|| format!("reading {MAP_ENDPOINTS}"))?;
        eps.insert(k.addr, v);
    }
    let want = slots(&eps);
    let mut written = 0;
    for slot in 0..LOCAL_OWNER_SLOTS {
        let have = map.get(&slot, 0).with_context(|| format!("reading slot {slot} of {MAP_LOCAL_OWNERS}"))?;
        let w = want.get(&slot).copied().unwrap_or_default();
        if (LocalOwner { level_hint: 0, ..have }) != w {
            map.set(slot, LocalOwner::default(), 0).with_context(|| format!("clearing slot {slot} of {MAP_LOCAL_OWNERS}"))?;
            if w != LocalOwner::default() {
                map.set(slot, w, 0).with_context(|| format!("writing slot {slot} of {MAP_LOCAL_OWNERS}"))?;
            }
            written += 1;
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(identity: u32, flags: u32, ifindex: u32, cgroup: u32) -> EndpointValue {
        EndpointValue { identity, flags, ifindex, cgroup }
    }

    #[test]
    fn only_hooked_local_pods_with_a_cgroup_get_a_slot() {
        let a = v4_mapped([10, 244, 1, 5]);
        let mut eps = BTreeMap::new();
        eps.insert(a, ep(300, EP_LOCAL, 7, 42));
        eps.insert(v4_mapped([10, 244, 1, 6]), ep(301, EP_LOCAL, 0, 43)); // not hooked yet
        eps.insert(v4_mapped([10, 244, 1, 8]), ep(302, EP_LOCAL, 9, 0)); // cgroup not known
        eps.insert(v4_mapped([10, 244, 2, 9]), ep(303, 0, 0, 0)); // a remote pod
        eps.insert(v4_mapped([10, 0, 0, 1]), ep(IDENTITY_HOST, EP_LOCAL, 3, 44)); // the node's
        let s = slots(&eps);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[&local_owner_slot(&a)], LocalOwner::of(a, 42));
    }

    #[test]
    fn of_two_addresses_on_one_slot_the_lower_keeps_it() {
        let (lo, hi) = (v4_mapped([10, 244, 1, 5]), v4_mapped([10, 245, 1, 5]));
        assert_eq!(local_owner_slot(&lo), local_owner_slot(&hi));
        let mut eps = BTreeMap::new();
        eps.insert(hi, ep(301, EP_LOCAL, 8, 43));
        eps.insert(lo, ep(300, EP_LOCAL, 7, 42));
        assert_eq!(slots(&eps).values().copied().collect::<Vec<_>>(), vec![LocalOwner::of(lo, 42)]);
    }
}
