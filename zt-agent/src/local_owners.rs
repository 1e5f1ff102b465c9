//! The user side of `ZT_LOCAL_OWNERS`, the cgroup programs' slots for hooked local pods
//! (zt-common owners.rs). The slots follow `ZT_ENDPOINTS`: its writers (`sync::apply`,
//! the CNI path before a full state) clear the slots they are about to change first and
//! write the new ones once the endpoints are in place, so that a slot is either empty
//! (the kernel asks the endpoint map) or says what the endpoint map says. The node's own
//! addresses, written at start without them (`seed_host_endpoints`), never have a slot.
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

/// `ZT_LOCAL_OWNERS` and the slots this process knows it holds.
pub struct LocalOwners {
    pub map: LocalOwnersMap,
    /// The non-empty slots (the kernel's level hint left out), read from the map on first
    /// use and kept as written since: what an update compares against, so that slots an
    /// earlier update emptied and could not write (it failed midway) are written by the
    /// next one.
    held: Option<BTreeMap<u32, LocalOwner>>,
}

impl LocalOwners {
    pub fn new(map: LocalOwnersMap) -> Self {
        LocalOwners { map, held: None }
    }

    fn take_held(&mut self) -> Result<BTreeMap<u32, LocalOwner>> {
        if let Some(h) = self.held.take() {
            return Ok(h);
        }
        let mut h = BTreeMap::new();
        for slot in 0..LOCAL_OWNER_SLOTS {
            let v = self.map.get(&slot, 0).with_context(|| format!("reading slot {slot} of {MAP_LOCAL_OWNERS}"))?;
            // The kernel ignores a slot without a scope.
            if v.scope != 0 {
                h.insert(slot, LocalOwner { level_hint: 0, ..v });
            }
        }
        Ok(h)
    }

    /// Before the endpoints change to those `new` is made from: empties every slot whose
    /// content is not `new`'s. Returns the slots emptied.
    pub fn clear_changed(&mut self, new: &BTreeMap<u32, LocalOwner>) -> Result<usize> {
        let mut held = self.take_held()?;
        let stale: Vec<u32> = held.iter().filter(|(slot, v)| new.get(slot) != Some(v)).map(|(slot, _)| *slot).collect();
        let mut r = Ok(0);
        for slot in stale {
            // A slot that could not be emptied is still held: the next update tries again.
            if let Err(e) = self.map.set(slot, LocalOwner::default(), 0) {
                r = Err(e).with_context(|| format!("clearing slot {slot} of {MAP_LOCAL_OWNERS}"));
                break;
            }
            held.remove(&slot);
            r = r.map(|n| n + 1);
        }
        self.held = Some(held);
        r
    }

    /// Once the endpoints are in place, after `clear_changed` with the same `new` (which
    /// left held only what `new` has, so no slot is overwritten in place): writes every
    /// slot of `new` not held. Returns the slots written.
    pub fn write_changed(&mut self, new: &BTreeMap<u32, LocalOwner>) -> Result<usize> {
        let mut held = self.take_held()?;
        let todo: Vec<(u32, LocalOwner)> = new.iter().filter(|(slot, v)| held.get(slot) != Some(v)).map(|(k, v)| (*k, *v)).collect();
        let mut r = Ok(0);
        for (slot, v) in todo {
            if let Err(e) = self.map.set(slot, v, 0) {
                r = Err(e).with_context(|| format!("writing slot {slot} of {MAP_LOCAL_OWNERS}"));
                break;
            }
            held.insert(slot, v);
            r = r.map(|n| n + 1);
        }
        self.held = Some(held);
        r
    }

    /// At start, before this process's programs run: every slot made what `ZT_ENDPOINTS`
    /// holds now, read from the map rather than believed. An agent that did not know this
    /// map (an older build of the same layout) changed the endpoints without it. Returns
    /// the slots emptied and written.
    pub fn rebuild(&mut self, endpoints: &EndpointsMap) -> Result<usize> {
        let mut eps = BTreeMap::new();
        for item in endpoints.iter() {
            let (k, v) = item.with_context(|| format!("reading {MAP_ENDPOINTS}"))?;
            eps.insert(k.addr, v);
        }
        let want = slots(&eps);
        self.held = None;
        Ok(self.clear_changed(&want)? + self.write_changed(&want)?)
    }
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
