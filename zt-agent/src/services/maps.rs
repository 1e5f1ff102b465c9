//! The user side of the Service socket translation maps (`ZT_SVC_FRONTENDS`,
//! `ZT_SVC_BACKENDS`): makes them hold exactly the wanted frontends, each change
//! atomic for a connecting socket. A frontend whose backend set changes gets its new set
//! written under a fresh id first, then its frontend entry is swapped to that id in one
//! update, then the old set goes: a connect sees the old set or the new one, never a mix.
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use zt_common::*;

use super::identities::ServiceIdentities;
use super::ServiceTable;
use crate::net::to_key;
use crate::pins::open_map;

/// The frontends of `table` with their Service identities. SCTP frontends are written
/// too: the socket hooks translate only TCP and UDP, but the packet hooks judge an SCTP
/// packet to a frontend by its Service identity.
pub fn want_of(table: &ServiceTable, ids: &ServiceIdentities) -> BTreeMap<SvcFrontendKey, WantFrontend> {
    table
        .frontends
        .iter()
        .map(|(f, e)| {
            let key = SvcFrontendKey { addr: to_key(f.addr), port: f.port, proto: f.proto, _pad: 0 };
            let backends = e.backends.iter().map(|b| SvcBackendValue { addr: to_key(b.addr), port: b.port, _pad: [0; 2] }).collect();
            (key, WantFrontend { backends, affinity_s: e.affinity_timeout_s, identity: ids.get(&e.service, f.addr.is_ipv6()).unwrap_or(0) })
        })
        .collect()
}

pub type FrontendsMap = HashMap<MapData, SvcFrontendKey, SvcFrontendValue>;
pub type BackendsMap = HashMap<MapData, SvcBackendKey, SvcBackendValue>;

/// What one frontend should translate to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantFrontend {
    /// In slot order (the kernel picks `random % len`).
    pub backends: Vec<SvcBackendValue>,
    pub affinity_s: u32,
    /// `SvcFrontendValue::identity`.
    pub identity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    svc_id: u32,
    want: WantFrontend,
}

/// The maps and what they hold.
pub struct ServiceMaps {
    frontends: FrontendsMap,
    backends: BackendsMap,
    stats: PerCpuArray<MapData, u64>,
    held: BTreeMap<SvcFrontendKey, Held>,
    next_id: u32,
    /// Backends taken out of a frontend's set by a sync, until `take_removed`.
    removed: Vec<super::destroy::Removed>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
}

impl ServiceMaps {
    /// Opens the pinned maps and reads back what an earlier agent left (sets nothing
    /// references are removed).
    pub fn open(bpffs_root: &Path) -> Result<Self> {
        let frontends: FrontendsMap = open_map(bpffs_root, MAP_SVC_FRONTENDS)?.try_into()?;
        let mut backends: BackendsMap = open_map(bpffs_root, MAP_SVC_BACKENDS)?.try_into()?;
        let stats = open_map(bpffs_root, MAP_SVC_STATS)?.try_into()?;
        let mut by_id: BTreeMap<u32, BTreeMap<u32, SvcBackendValue>> = BTreeMap::new();
        for kv in backends.iter() {
            let (k, v) = kv.context("reading ZT_SVC_BACKENDS")?;
            by_id.entry(k.svc_id).or_default().insert(k.slot, v);
        }
        let mut held = BTreeMap::new();
        for kv in frontends.iter() {
            let (k, v) = kv.context("reading ZT_SVC_FRONTENDS")?;
            let set = by_id.get(&v.svc_id).cloned().unwrap_or_default();
            let backends = (0..v.backends).filter_map(|s| set.get(&s).copied()).collect();
            held.insert(k, Held { svc_id: v.svc_id, want: WantFrontend { backends, affinity_s: v.affinity_s, identity: v.identity } });
        }
        let used: std::collections::BTreeSet<u32> = held.values().map(|h| h.svc_id).collect();
        for (id, slots) in &by_id {
            if !used.contains(id) {
                for slot in slots.keys() {
                    let _ = backends.remove(&SvcBackendKey { svc_id: *id, slot: *slot });
                }
            }
        }
        let next_id = by_id.keys().chain(used.iter()).max().map_or(1, |m| m.wrapping_add(1).max(1));
        Ok(ServiceMaps { frontends, backends, stats, held, next_id, removed: vec![] })
    }

    /// Makes the maps hold exactly `want`. On an error (a full map) the frontend being
    /// written keeps its previous set and the error names it; the ones before it are done.
    pub fn sync(&mut self, want: &BTreeMap<SvcFrontendKey, WantFrontend>) -> Result<SyncStats> {
        let mut st = SyncStats::default();
        for (k, w) in want {
            if self.held.get(k).is_some_and(|h| &h.want == w) {
                continue;
            }
            let id = self.alloc_id();
            for (slot, b) in w.backends.iter().enumerate() {
                let key = SvcBackendKey { svc_id: id, slot: slot as u32 };
                if let Err(e) = self.backends.insert(key, *b, 0) {
                    self.remove_set(id, slot as u32);
                    return Err(e).with_context(|| format!("writing backend {slot} of frontend {} to ZT_SVC_BACKENDS", show(k)));
                }
                st.backends_written += 1;
            }
            let v = SvcFrontendValue { svc_id: id, backends: w.backends.len() as u32, affinity_s: w.affinity_s, identity: w.identity };
            if let Err(e) = self.frontends.insert(k, v, 0) {
                self.remove_set(id, w.backends.len() as u32);
                return Err(e).with_context(|| format!("writing frontend {} to ZT_SVC_FRONTENDS", show(k)));
            }
            st.frontends_written += 1;
            if let Some(old) = self.held.insert(*k, Held { svc_id: id, want: w.clone() }) {
                self.note_removed(k, &old.want.backends, &w.backends);
                self.remove_set(old.svc_id, old.want.backends.len() as u32);
            }
        }
        let gone: Vec<SvcFrontendKey> = self.held.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for k in gone {
            let _ = self.frontends.remove(&k);
            if let Some(old) = self.held.remove(&k) {
                self.note_removed(&k, &old.want.backends, &[]);
                self.remove_set(old.svc_id, old.want.backends.len() as u32);
            }
            st.frontends_removed += 1;
        }
        Ok(st)
    }

    fn note_removed(&mut self, k: &SvcFrontendKey, old: &[SvcBackendValue], new: &[SvcBackendValue]) {
        for b in old.iter().filter(|b| !new.iter().any(|n| n.addr == b.addr && n.port == b.port)) {
            self.removed.push(super::destroy::Removed { frontend: *k, addr: b.addr, port: b.port });
        }
    }

    /// The (frontend, backend) pairs the syncs since the last call took out (written to
    /// the maps already, so no new connect picks them).
    pub fn take_removed(&mut self) -> Vec<super::destroy::Removed> {
        std::mem::take(&mut self.removed)
    }

    fn alloc_id(&mut self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.held.values().map(|h| h.svc_id).collect();
        while self.next_id == 0 || used.contains(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn remove_set(&mut self, id: u32, n: u32) {
        for slot in 0..n {
            let _ = self.backends.remove(&SvcBackendKey { svc_id: id, slot });
        }
    }

    /// The Service identity each held frontend carries (what an earlier agent wrote).
    pub fn held_identities(&self) -> BTreeMap<SvcFrontendKey, u32> {
        self.held.iter().map(|(k, h)| (*k, h.want.identity)).collect()
    }

    /// Frontends and backends held.
    pub fn counts(&self) -> (usize, usize) {
        (self.held.len(), self.held.values().map(|h| h.want.backends.len()).sum())
    }

    /// `SvcStat` counters summed over CPUs.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let mut out = vec![0u64; SVC_STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

fn show(k: &SvcFrontendKey) -> String {
    let ip = crate::net::from_key(k.addr);
    let proto = if k.proto == 6 {
        "tcp"
    } else if k.proto == 17 {
        "udp"
    } else if k.proto == 132 {
        "sctp"
    } else {
        "?"
    };
    match ip {
        std::net::IpAddr::V6(a) => format!("[{a}]:{}/{proto}", k.port),
        a => format!("{a}:{}/{proto}", k.port),
    }
}

/// Makes `ZT_SVC_CIDRS` hold exactly `cidrs` (`--service-cidr`).
pub fn sync_service_cidrs(bpffs_root: &Path, cidrs: &[crate::state::Cidr]) -> Result<()> {
    use crate::net::key_prefix;
    use aya::maps::lpm_trie::{Key, LpmTrie};
    let mut map: LpmTrie<MapData, CidrKey, u32> = open_map(bpffs_root, MAP_SVC_CIDRS)?.try_into()?;
    if cidrs.len() > SVC_CIDRS_MAX as usize {
        anyhow::bail!("--service-cidr: {} ranges, at most {SVC_CIDRS_MAX}", cidrs.len());
    }
    let want: Vec<(u32, CidrKey)> = cidrs.iter().map(|c| (key_prefix(c.addr, c.prefix), CidrKey { addr: to_key(c.addr) })).collect();
    for (p, k) in &want {
        map.insert(&Key::new(*p, *k), 1, 0).context("writing ZT_SVC_CIDRS")?;
    }
    let stale: Vec<Key<CidrKey>> = map.keys().filter_map(|k| k.ok()).filter(|k| !want.contains(&(k.prefix_len(), k.data()))).collect();
    for k in stale {
        map.remove(&k).context("removing from ZT_SVC_CIDRS")?;
    }
    Ok(())
}
