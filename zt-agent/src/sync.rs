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
        // IPv4 lives at ::ffff:0:0/96 in the trie. Pin that block to world (unless an IPv4
        // /0 rule owns it) so that a short IPv6 prefix such as ::/0 never covers IPv4 peers.
        if c.cidrs.keys().any(|(p, _)| *p < 96) {
            c.cidrs.entry((96, to_key(std::net::Ipv4Addr::UNSPECIFIED.into()))).or_insert(CidrValue { identity: IDENTITY_WORLD });
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

/// Does going from `have` to `want` take anything away from a tracked flow? Every
/// change does except new allow entries: a removal or changed value, a new deny (it may
/// cover a port an existing allow admitted), and a new endpoint or CIDR (a peer address
/// may now resolve to another identity).
pub fn withdraws(have: &Contents, want: &Contents) -> bool {
    have.endpoints.iter().any(|(k, v)| want.endpoints.get(k) != Some(v))
        || want.endpoints.keys().any(|k| !have.endpoints.contains_key(k))
        || have.cidrs.iter().any(|(k, v)| want.cidrs.get(k) != Some(v))
        || want.cidrs.keys().any(|k| !have.cidrs.contains_key(k))
        || have.policy.iter().any(|(k, v)| want.policy.get(k) != Some(v))
        || want.policy.iter().any(|(k, v)| v.verdict != VERDICT_ALLOW && !have.policy.contains_key(k))
}

/// Entries a map holds at its fullest during the diff (writes come before removals).
fn peak<K: Ord, V>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> usize {
    have.len() + want.keys().filter(|k| !have.contains_key(k)).count()
}

/// Applies `want` over `have` (which tracks what the maps hold, also on error).
/// Refuses before writing anything if a map cannot hold the new state: map-full is an
/// error, never a partial or silent state. If only the transition would overflow
/// (old and new together), removals go first for that apply, which is fail-closed.
pub fn apply(maps: &mut PinnedMaps, have: &mut Contents, want: &Contents, caps: &Capacities) -> Result<ApplyStats> {
    let mut removals_first = false;
    for (name, n, peak, cap) in [
        (MAP_ENDPOINTS, want.endpoints.len(), peak(&have.endpoints, &want.endpoints), caps.endpoints),
        (MAP_CIDRS, want.cidrs.len(), peak(&have.cidrs, &want.cidrs), caps.cidrs),
        (MAP_POLICY, want.policy.len(), peak(&have.policy, &want.policy), caps.policy),
    ] {
        if n > cap as usize {
            bail!("map {name} full: the policy needs {n} entries, capacity is {cap} (raise the map size flag)");
        }
        if peak > cap as usize {
            log::warn!("map {name}: old and new state together exceed {cap} entries; removing stale entries first");
            removals_first = true;
        }
    }
    let (ep_w, ep_r) = diff(&have.endpoints, &want.endpoints);
    let (ci_w, ci_r) = diff(&have.cidrs, &want.cidrs);
    let (po_w, po_r) = diff(&have.policy, &want.policy);
    let mut stats = ApplyStats { withdrew: withdraws(have, want), ..Default::default() };
    if removals_first {
        remove_stale(maps, have, &ep_r, &ci_r, &po_r, &mut stats)?;
    }

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
    if !removals_first {
        remove_stale(maps, have, &ep_r, &ci_r, &po_r, &mut stats)?;
    }
    Ok(stats)
}

/// Removals, policy before the identities it refers to.
fn remove_stale(
    maps: &mut PinnedMaps,
    have: &mut Contents,
    ep_r: &[[u8; 16]],
    ci_r: &[(u32, [u8; 16])],
    po_r: &[(u32, PolicyKey)],
    stats: &mut ApplyStats,
) -> Result<()> {
    for &(p, k) in po_r {
        maps.policy.remove(&Key::new(p, k)).with_context(|| format!("removing from {MAP_POLICY}"))?;
        have.policy.remove(&(p, k));
        stats.removed += 1;
    }
    for &(p, a) in ci_r {
        maps.cidrs.remove(&Key::new(p, CidrKey { addr: a })).with_context(|| format!("removing from {MAP_CIDRS}"))?;
        have.cidrs.remove(&(p, a));
        stats.removed += 1;
    }
    for &k in ep_r {
        maps.endpoints.remove(&EndpointKey { addr: k }).with_context(|| format!("removing from {MAP_ENDPOINTS}"))?;
        have.endpoints.remove(&k);
        stats.removed += 1;
    }
    Ok(())
}
