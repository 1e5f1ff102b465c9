//! Makes the pinned maps equal to the desired state by diff, never by flush-and-refill:
//! additions and changes first, removals last, so that no packet of a live flow meets a
//! half-written state. The first diff after a start is taken against what the maps
//! hold (a restart writes nothing when nothing changed). A state too big for the
//! per-identity maps is cut down by whole local identities (`fit`), which fail closed;
//! the rest is applied.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::Key;
use zt_common::*;

use crate::{
    local_owners,
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
    pub fqdn_names: BTreeMap<FqdnNameKey, FqdnNameValue>,
    pub fqdn_ports: BTreeMap<(u32, PolicyKey), FqdnPortsValue>,
    pub dns_servers: BTreeMap<u32, u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacities {
    pub endpoints: u32,
    pub cidrs: u32,
    pub policy: u32,
    pub fqdn_names: u32,
    pub fqdn_ports: u32,
    pub dns_servers: u32,
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
        for item in maps.fqdn_names.iter() {
            let (k, v) = item?;
            c.fqdn_names.insert(k, v);
        }
        for item in maps.fqdn_ports.iter() {
            let (k, v) = item?;
            c.fqdn_ports.insert((k.prefix_len(), k.data()), v);
        }
        for item in maps.dns_servers.iter() {
            let (k, v) = item?;
            c.dns_servers.insert(k, v);
        }
        Ok(c)
    }

    /// The desired state in map form; `ifindex` gives the host interface of local pods.
    pub fn from_desired(d: &Desired, ifindex: &BTreeMap<std::net::IpAddr, u32>) -> Self {
        let mut c = Contents::default();
        for (ip, ep) in &d.endpoints {
            let idx = ifindex.get(ip).copied().unwrap_or(0);
            // A pod of another node: its node's number where `cgroup` is (zt-common auth.rs).
            let node = if ep.flags & EP_LOCAL == 0 { d.endpoint_nodes.get(ip).copied().unwrap_or(0) } else { 0 };
            c.endpoints.insert(to_key(*ip), EndpointValue { identity: ep.identity, flags: ep.flags, ifindex: idx, cgroup: node });
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
        for (k, slots) in &d.fqdn_names {
            c.fqdn_names.insert(*k, FqdnNameValue { slots: *slots, _pad: 0 });
        }
        for (k, v) in &d.fqdn_ports {
            c.fqdn_ports.insert((k.prefix_len, k.key), *v);
        }
        for id in &d.dns_servers {
            c.dns_servers.insert(*id, 1);
        }
        c
    }
}

/// Local identities whose entries a full map could not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub map: &'static str,
    /// Entries the whole state needs, and the map's capacity.
    pub needed: usize,
    pub capacity: u32,
    pub identities: BTreeSet<u32>,
}

/// Makes `want` fit the maps keyed by local identity (policy, FQDN ports, FQDN names):
/// whole identities are left out until each fits, those with entries in the maps now
/// (`have`) kept first, then by number. A left-out identity keeps its endpoints, isolated
/// in both directions, and has no entry in any of the three maps: default deny, never a
/// partial rule set. Returns what did not fit, per map that overflowed.
pub fn fit(have: &Contents, want: &mut Contents, caps: &Capacities) -> Vec<Overflow> {
    let over = |w: &Contents| {
        [
            (MAP_POLICY, w.policy.len(), caps.policy),
            (MAP_FQDN_PORTS, w.fqdn_ports.len(), caps.fqdn_ports),
            (MAP_FQDN_NAMES, w.fqdn_names.len(), caps.fqdn_names),
        ]
        .into_iter()
        .filter(|(_, n, cap)| *n > *cap as usize)
        .collect::<Vec<_>>()
    };
    let overflowing = over(want);
    if overflowing.is_empty() {
        return Vec::new();
    }
    // Entries per local identity in each map.
    let mut per: BTreeMap<u32, [usize; 3]> = BTreeMap::new();
    for (_, k) in want.policy.keys() {
        per.entry(k.local_id()).or_default()[0] += 1;
    }
    for (_, k) in want.fqdn_ports.keys() {
        per.entry(k.local_id()).or_default()[1] += 1;
    }
    for k in want.fqdn_names.keys() {
        per.entry(k.local_id).or_default()[2] += 1;
    }
    let present: BTreeSet<u32> = have.policy.keys().map(|(_, k)| k.local_id()).chain(have.fqdn_ports.keys().map(|(_, k)| k.local_id())).collect();
    let mut order: Vec<u32> = per.keys().copied().collect();
    order.sort_by_key(|id| (!present.contains(id), *id));
    let cap = [caps.policy as usize, caps.fqdn_ports as usize, caps.fqdn_names as usize];
    let (mut used, mut left_out) = ([0usize; 3], BTreeSet::new());
    for id in order {
        let n = per[&id];
        if (0..3).all(|i| used[i] + n[i] <= cap[i]) {
            (0..3).for_each(|i| used[i] += n[i]);
        } else {
            left_out.insert(id);
        }
    }
    want.policy.retain(|(_, k), _| !left_out.contains(&k.local_id()));
    want.fqdn_ports.retain(|(_, k), _| !left_out.contains(&k.local_id()));
    want.fqdn_names.retain(|k, _| !left_out.contains(&k.local_id));
    for v in want.endpoints.values_mut().filter(|v| v.flags & EP_LOCAL != 0 && left_out.contains(&v.identity)) {
        v.flags |= EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS;
    }
    overflowing.into_iter().map(|(map, needed, capacity)| Overflow { map, needed, capacity, identities: left_out.clone() }).collect()
}

impl Contents {
    /// Every identity number an entry names (key or value): a released number stays
    /// quarantined while this holds it.
    pub fn named_identities(&self) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        out.extend(self.endpoints.values().map(|v| v.identity));
        out.extend(self.cidrs.values().map(|v| v.identity));
        for (_, k) in self.policy.keys().chain(self.fqdn_ports.keys()) {
            out.insert(k.local_id());
            out.insert(k.peer_id());
        }
        out.extend(self.fqdn_names.keys().map(|k| k.local_id));
        out.extend(self.dns_servers.keys().copied());
        out
    }

    /// Names each local endpoint's pod cgroup (`cgroup_scope`), where known.
    pub fn set_cgroups(&mut self, cgroups: &BTreeMap<std::net::IpAddr, u32>) {
        for (ip, scope) in cgroups {
            if let Some(v) = self.endpoints.get_mut(&to_key(*ip)) {
                v.cgroup = *scope;
            }
        }
    }
}

fn diff<K: Ord + Copy, V: PartialEq + Copy>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> (Vec<(K, V)>, Vec<K>) {
    let writes = want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    let removes = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
    (writes, removes)
}

/// Is any entry of `have` removed or changed in `want`?
fn changes<K: Ord, V: PartialEq>(have: &BTreeMap<K, V>, want: &BTreeMap<K, V>) -> bool {
    have.iter().any(|(k, v)| want.get(k) != Some(v))
}

/// Does going from `have` to `want` take anything away from a tracked flow? Every
/// change does except new allow entries: a removal or changed value, a new deny (it may
/// cover a port an existing allow admitted), and a new endpoint or CIDR (a peer address
/// may now resolve to another identity). For the FQDN maps, a removal or a lost slot.
pub fn withdraws(have: &Contents, want: &Contents) -> bool {
    // FQDN entries that only gain slots (a new rule for the same name or port) take
    // nothing away.
    let names = have.fqdn_names.iter().any(|(k, v)| want.fqdn_names.get(k).is_none_or(|w| v.slots & !w.slots != 0));
    let ports = have.fqdn_ports.iter().any(|(k, v)| {
        want.fqdn_ports.get(k).is_none_or(|w| {
            v.slots & !w.slots != 0 || (0..32).any(|s| v.slots & (1 << s) != 0 && v.rule_ids[s] != w.rule_ids[s])
        })
    });
    names || ports || changes(&have.dns_servers, &want.dns_servers) || withdraws_policy(have, want)
}

fn withdraws_policy(have: &Contents, want: &Contents) -> bool {
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
/// Refuses before writing anything if a map cannot hold the new state (after `fit`,
/// only the endpoint, CIDR and DNS server maps can): never a silent state. If only the
/// transition would overflow (old and new together), removals go first for that apply,
/// which is fail-closed. An error midway leaves a mix of old and new entries: the
/// caller bumps the epoch so that tracked flows are judged against it.
pub fn apply(maps: &mut PinnedMaps, have: &mut Contents, want: &Contents, caps: &Capacities) -> Result<ApplyStats> {
    let mut removals_first = false;
    for (name, n, peak, cap) in [
        (MAP_ENDPOINTS, want.endpoints.len(), peak(&have.endpoints, &want.endpoints), caps.endpoints),
        (MAP_CIDRS, want.cidrs.len(), peak(&have.cidrs, &want.cidrs), caps.cidrs),
        (MAP_POLICY, want.policy.len(), peak(&have.policy, &want.policy), caps.policy),
        (MAP_FQDN_NAMES, want.fqdn_names.len(), peak(&have.fqdn_names, &want.fqdn_names), caps.fqdn_names),
        (MAP_FQDN_PORTS, want.fqdn_ports.len(), peak(&have.fqdn_ports, &want.fqdn_ports), caps.fqdn_ports),
        (MAP_DNS_SERVERS, want.dns_servers.len(), peak(&have.dns_servers, &want.dns_servers), caps.dns_servers),
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
    let (na_w, na_r) = diff(&have.fqdn_names, &want.fqdn_names);
    let (fp_w, fp_r) = diff(&have.fqdn_ports, &want.fqdn_ports);
    let (dn_w, dn_r) = diff(&have.dns_servers, &want.dns_servers);
    let stale = Stale { ep: ep_r, ci: ci_r, po: po_r, names: na_r, ports: fp_r, dns: dn_r };
    let mut stats = ApplyStats { withdrew: withdraws(have, want), ..Default::default() };
    // The cgroup programs' slots: emptied before their endpoints change, written last.
    let owner_slots = local_owners::slots(&want.endpoints);
    maps.local_owners.clear_changed(&owner_slots)?;
    if removals_first {
        remove_stale(maps, have, &stale, &mut stats)?;
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
    for (k, v) in dn_w {
        maps.dns_servers.insert(k, v, 0).with_context(|| format!("writing {MAP_DNS_SERVERS}"))?;
        have.dns_servers.insert(k, v);
        stats.written += 1;
    }
    for ((p, k), v) in po_w {
        maps.policy.insert(&Key::new(p, k), v, 0).with_context(|| format!("writing {MAP_POLICY}"))?;
        have.policy.insert((p, k), v);
        stats.written += 1;
    }
    // Ports before names: once a name entry makes the kernel learn, the ports are there.
    for ((p, k), v) in fp_w {
        maps.fqdn_ports.insert(&Key::new(p, k), v, 0).with_context(|| format!("writing {MAP_FQDN_PORTS}"))?;
        have.fqdn_ports.insert((p, k), v);
        stats.written += 1;
    }
    for (k, v) in na_w {
        maps.fqdn_names.insert(k, v, 0).with_context(|| format!("writing {MAP_FQDN_NAMES}"))?;
        have.fqdn_names.insert(k, v);
        stats.written += 1;
    }
    if !removals_first {
        remove_stale(maps, have, &stale, &mut stats)?;
    }
    maps.local_owners.write_changed(&owner_slots)?;
    Ok(stats)
}

/// Keys to remove, per map.
struct Stale {
    ep: Vec<[u8; 16]>,
    ci: Vec<(u32, [u8; 16])>,
    po: Vec<(u32, PolicyKey)>,
    names: Vec<FqdnNameKey>,
    ports: Vec<(u32, PolicyKey)>,
    dns: Vec<u32>,
}

/// Removals: names first (the kernel stops learning them), then ports and policy, then
/// the identities they refer to.
fn remove_stale(maps: &mut PinnedMaps, have: &mut Contents, stale: &Stale, stats: &mut ApplyStats) -> Result<()> {
    let Stale { ep: ep_r, ci: ci_r, po: po_r, names, ports, dns } = stale;
    for k in names {
        maps.fqdn_names.remove(k).with_context(|| format!("removing from {MAP_FQDN_NAMES}"))?;
        have.fqdn_names.remove(k);
        stats.removed += 1;
    }
    for &(p, k) in ports {
        maps.fqdn_ports.remove(&Key::new(p, k)).with_context(|| format!("removing from {MAP_FQDN_PORTS}"))?;
        have.fqdn_ports.remove(&(p, k));
        stats.removed += 1;
    }
    for &(p, k) in po_r {
        maps.policy.remove(&Key::new(p, k)).with_context(|| format!("removing from {MAP_POLICY}"))?;
        have.policy.remove(&(p, k));
        stats.removed += 1;
    }
    for k in dns {
        maps.dns_servers.remove(k).with_context(|| format!("removing from {MAP_DNS_SERVERS}"))?;
        have.dns_servers.remove(k);
        stats.removed += 1;
    }
    for &(p, a) in ci_r {
        maps.cidrs.remove(&Key::new(p, CidrKey { addr: a })).with_context(|| format!("removing from {MAP_CIDRS}"))?;
        have.cidrs.remove(&(p, a));
        stats.removed += 1;
    }
    for &k in ep_r.iter() {
        maps.endpoints.remove(&EndpointKey { addr: k }).with_context(|| format!("removing from {MAP_ENDPOINTS}"))?;
        have.endpoints.remove(&k);
        stats.removed += 1;
    }
    Ok(())
}

/// What clearing freed FQDN slots did to ZT_FQDN_LEARNED.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedCleared {
    pub rewritten: usize,
    pub deleted: usize,
}

/// Makes every ZT_FQDN_LEARNED entry carry only slots its identity still has
/// (`active`: local identity -> slot mask): other bits are cleared, entries left with
/// none (and entries of identities without FQDN rules) are deleted. Run before freed
/// slots are reused, so a stale bit never grants a later rule's ports. An entry the
/// kernel re-learns meanwhile is re-read just before it is rewritten; a race can at
/// worst drop a fresh expiry or bit, which fails closed.
pub fn clear_learned(maps: &mut PinnedMaps, active: &BTreeMap<u32, u32>) -> Result<LearnedCleared> {
    let mut out = LearnedCleared::default();
    let keys: Vec<FqdnLearnedKey> = maps.fqdn_learned.keys().collect::<Result<_, _>>().with_context(|| format!("reading {MAP_FQDN_LEARNED}"))?;
    for k in keys {
        let Ok(mut v) = maps.fqdn_learned.get(&k, 0) else { continue };
        let keep = active.get(&k.local_id).copied().unwrap_or(0);
        if v.slots & !keep == 0 {
            continue;
        }
        v.slots &= keep;
        if v.slots == 0 {
            match maps.fqdn_learned.remove(&k) {
                Ok(()) => out.deleted += 1,
                // Evicted by the LRU meanwhile.
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing from {MAP_FQDN_LEARNED}")),
            }
        } else {
            maps.fqdn_learned.insert(k, v, 0).with_context(|| format!("writing {MAP_FQDN_LEARNED}"))?;
            out.rewritten += 1;
        }
    }
    Ok(out)
}
