//! Makes the pinned maps equal to the desired state by diff, never by flush-and-refill:
//! additions and changes first, removals last, so that no packet of a live flow meets a
//! half-written state. The first diff after a start is taken against what the maps
//! hold (a restart writes nothing when nothing changed).
use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::Key;
use zt_common::*;

use crate::{
    net::{key_prefix, to_key},
    pins::PinnedMaps,
    state::Desired,
};

/// Map contents in comparable form.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub endpoints: BTreeMap<[u8; 16], EndpointValue>,
    pub cidrs: BTreeMap<(u32, [u8; 16]), CidrValue>,
    pub policy: BTreeMap<(u32, PolicyKey), PolicyValue>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub cidrs: u32,
    pub policy: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
    /// Something was removed or changed: tracked flows must be re-verified.
    pub withdrew: bool,
}

impl Contents {
    /// What the pinned maps hold now.
    pub fn read(maps: &PinnedMaps) -> Result<Self> {
        let mut c = Contents::default();
        for item in maps.endpoints.iter() {
            let (k, v) = item?;
            c.endpoints.insert(k.addr, v);
        }
        for item in maps.cidrs.iter() {
            let (k, v) = item?;
            c.cidrs.insert((k.prefix_len(), k.data().addr), v);
        }
        for item in maps.policy.iter() {
            let (k, v) = item?;
            c.policy.insert((k.prefix_len(), k.data()), v);
        }
        Ok(c)
    }

    /// The desired state in map form; `ifindex` gives the host interface of local pods.
    pub fn from_desired(d: &Desired, ifindex: &BTreeMap<std::net::IpAddr, u32>) -> Self {
        let mut c = Contents::default();
        for (ip, ep) in &d.endpoints {
            let idx = ifindex.get(ip).copied().unwrap_or(0);
            c.endpoints.insert(to_key(*ip), EndpointValue { identity: ep.identity, flags: ep.flags, ifindex: idx, _pad: 0 });
        }
        for (cidr, id) in &d.cidrs {
            c.cidrs.insert((key_prefix(cidr.addr, cidr.prefix), to_key(cidr.addr)), CidrValue { identity: *id });
        }
        for (k, v) in &d.policy {
            c.policy.insert((k.prefix_len, k.key), *v);
        }
        c
    }
}

fn diff<K: Ord + Copy, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> (Vec<(K, V)>, Vec<K>) {
    let writes = want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    let removes = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
    (writes, removes)
}

/// Applies `want` over `have` (which tracks what the maps hold, also on error).
/// Refuses before writing anything if a map would overflow: map-full is an error,
/// never a partial or silent state.
pub fn apply(maps: &mut PinnedMaps, have: &mut Contents, want: &Contents, caps: &Capacities) -> Result<ApplyStats> {
    for (name, n, cap) in [
        (MAP_ENDPOINTS, want.endpoints.len(), caps.endpoints),
        (MAP_CIDRS, want.cidrs.len(), caps.cidrs),
        (MAP_POLICY, want.policy.len(), caps.policy),
    ] {
        if n > cap as usize {
            bail!("map {name} full: the policy needs {n} entries, capacity is {cap} (raise the map size flag)");
        }
    }
    let (ep_w, ep_r) = diff(&have.endpoints, &want.endpoints);
    let (ci_w, ci_r) = diff(&have.cidrs, &want.cidrs);
    let (po_w, po_r) = diff(&have.policy, &want.policy);
    let withdrew = !(ep_r.is_empty() && ci_r.is_empty() && po_r.is_empty())
        || ep_w.iter().any(|(k, _)| have.endpoints.contains_key(k))
        || ci_w.iter().any(|(k, _)| have.cidrs.contains_key(k))
        || po_w.iter().any(|(k, _)| have.policy.contains_key(k));
    let mut stats = ApplyStats { withdrew, ..Default::default() };

    // Identities first (a new peer resolves before policy mentions it), then policy.
    for (k, v) in ep_w {
        maps.endpoints.insert(EndpointKey { addr: k }, v, 0).with_context(|| format!("writing {MAP_ENDPOINTS}"))?;
        have.endpoints.insert(k, v);
        stats.written += 1;
    }
    for ((p, a), v) in ci_w {
        maps.cidrs.insert(&Key::new(p, CidrKey { addr: a }), v, 0).with_context(|| format!("writing {MAP_CIDRS}"))?;
        have.cidrs.insert((p, a), v);
        stats.written += 1;
    }
    for ((p, k), v) in po_w {
        maps.policy.insert(&Key::new(p, k), v, 0).with_context(|| format!("writing {MAP_POLICY}"))?;
        have.policy.insert((p, k), v);
        stats.written += 1;
    }
    // Removals last, policy before the identities it refers to.
    for (p, k) in po_r {
        maps.policy.remove(&Key::new(p, k)).with_context(|| format!("removing from {MAP_POLICY}"))?;
        have.policy.remove(&(p, k));
        stats.removed += 1;
    }
    for (p, a) in ci_r {
        maps.cidrs.remove(&Key::new(p, CidrKey { addr: a })).with_context(|| format!("removing from {MAP_CIDRS}"))?;
        have.cidrs.remove(&(p, a));
        stats.removed += 1;
    }
    for k in ep_r {
        maps.endpoints.remove(&EndpointKey { addr: k }).with_context(|| format!("removing from {MAP_ENDPOINTS}"))?;
        have.endpoints.remove(&k);
        stats.removed += 1;
    }
    Ok(stats)
}
