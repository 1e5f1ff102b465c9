//! Where zt keeps its kernel objects under the bpffs root, and typed access to the
//! pinned maps. Shared by the agent and ztctl (which reads them directly, so it still
//! works when the agent is down).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, PerCpuArray};
use zt_common::*;

/// `<root>/<MAP_VERSION_DIR>`: the maps of this layout version.
pub fn map_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(MAP_VERSION_DIR)
}

/// `<root>/<MAP_VERSION_DIR>/links`: one pinned TCX link per hooked interface and direction.
pub fn link_dir(bpffs_root: &Path) -> PathBuf {
    map_dir(bpffs_root).join("links")
}

pub fn open_map(bpffs_root: &Path, name: &str) -> Result<Map> {
    let path = map_dir(bpffs_root).join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {} (is zt-agent running on this node, and is --bpffs-root right?)", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

pub type EndpointsMap = HashMap<MapData, EndpointKey, EndpointValue>;
pub type CidrsMap = LpmTrie<MapData, CidrKey, CidrValue>;
pub type PolicyMap = LpmTrie<MapData, PolicyKey, PolicyValue>;
pub type CtMap = HashMap<MapData, CtKey, CtValue>;
pub type FragsMap = HashMap<MapData, FragKey, FragValue>;
pub type ConfigMap = Array<MapData, Config>;
pub type CounterMap = PerCpuArray<MapData, u64>;
pub type FqdnConfigMap = Array<MapData, FqdnConfig>;
pub type FqdnNamesMap = HashMap<MapData, FqdnNameKey, FqdnNameValue>;
pub type FqdnPortsMap = LpmTrie<MapData, PolicyKey, FqdnPortsValue>;
pub type FqdnLearnedMap = HashMap<MapData, FqdnLearnedKey, FqdnLearnedValue>;
pub type DnsServersMap = HashMap<MapData, u32, u32>;
pub type AuthProofsMap = HashMap<MapData, AuthProofKey, AuthProofValue>;

/// The pinned maps user space reads and writes.
pub struct PinnedMaps {
    pub config: ConfigMap,
    pub endpoints: EndpointsMap,
    pub cidrs: CidrsMap,
    pub policy: PolicyMap,
    /// `ZT_CT` (LRU: flows that are not established TCP) and `ZT_CT_EST` (established TCP).
    pub ct: CtMap,
    pub ct_est: CtMap,
    pub ct_stats: CounterMap,
    pub frags: FragsMap,
    pub counters: CounterMap,
    pub evstats: CounterMap,
    pub fqdn_config: FqdnConfigMap,
    pub fqdn_names: FqdnNamesMap,
    pub fqdn_ports: FqdnPortsMap,
    /// Written by the kernel; the agent clears freed slots and collects expired entries.
    pub fqdn_learned: FqdnLearnedMap,
    pub dns_servers: DnsServersMap,
    pub dns_stats: CounterMap,
    pub tunnels: crate::tunnels::TunnelsMap,
    pub svc_stats: CounterMap,
    /// (node, identity) -> expiry of a proof (issue 10, `crate::auth`).
    pub auth_proofs: AuthProofsMap,
    /// The cgroup programs' slots for hooked local pods, kept in step with `endpoints`
    /// (`crate::local_owners`).
    pub local_owners: crate::local_owners::LocalOwners,
    /// The bpffs root they were opened under (link pins: `crate::uplink::hooked`).
    pub root: std::path::PathBuf,
}

impl PinnedMaps {
    pub fn open(bpffs_root: &Path) -> Result<Self> {
        let open = |name: &str| open_map(bpffs_root, name);
        Ok(PinnedMaps {
            config: open(MAP_CONFIG)?.try_into()?,
            endpoints: open(MAP_ENDPOINTS)?.try_into()?,
            cidrs: open(MAP_CIDRS)?.try_into()?,
            policy: open(MAP_POLICY)?.try_into()?,
            ct: lru_map(open(MAP_CT)?)?,
            ct_est: open(MAP_CT_EST)?.try_into()?,
            ct_stats: open(MAP_CT_STATS)?.try_into()?,
            frags: lru_map(open(MAP_FRAGS)?)?,
            counters: open(MAP_COUNTERS)?.try_into()?,
            evstats: open(MAP_EVENT_STATS)?.try_into()?,
            fqdn_config: open(MAP_FQDN_CONFIG)?.try_into()?,
            fqdn_names: open(MAP_FQDN_NAMES)?.try_into()?,
            fqdn_ports: open(MAP_FQDN_PORTS)?.try_into()?,
            fqdn_learned: lru_map(open(MAP_FQDN_LEARNED)?)?,
            dns_servers: open(MAP_DNS_SERVERS)?.try_into()?,
            dns_stats: open(MAP_DNS_STATS)?.try_into()?,
            tunnels: open(MAP_TUNNELS)?.try_into()?,
            svc_stats: open(MAP_SVC_STATS)?.try_into()?,
            auth_proofs: open(MAP_AUTH_PROOFS)?.try_into()?,
            local_owners: crate::local_owners::LocalOwners::new(open(MAP_LOCAL_OWNERS)?.try_into()?),
            root: bpffs_root.to_path_buf(),
        })
    }

    pub fn read_config(&self) -> Result<Config> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Verdict counters summed over CPUs, indexed by `counter_index`.
    pub fn counters(&self) -> Result<Vec<u64>> {
        sum_per_cpu(&self.counters, COUNTER_SLOTS)
    }

    pub fn event_stats(&self) -> Result<Vec<u64>> {
        sum_per_cpu(&self.evstats, EVSTAT_SLOTS)
    }

    pub fn read_fqdn_config(&self) -> Result<FqdnConfig> {
        Ok(self.fqdn_config.get(&0, 0)?)
    }

    /// Service socket translation counters summed over CPUs, indexed by `SvcStat`.
    pub fn svc_stats(&self) -> Result<Vec<u64>> {
        sum_per_cpu(&self.svc_stats, SVC_STAT_SLOTS)
    }

    /// Conntrack event counters summed over CPUs, indexed by `CtStat`.
    pub fn ct_stats(&self) -> Result<Vec<u64>> {
        sum_per_cpu(&self.ct_stats, CT_STAT_SLOTS)
    }

    /// DNS capture counters summed over CPUs, indexed by `DnsStat`.
    pub fn dns_stats(&self) -> Result<Vec<u64>> {
        sum_per_cpu(&self.dns_stats, DNS_STAT_SLOTS)
    }
}

/// LRU hash maps load as `Map::LruHashMap`; aya's HashMap accepts both.
fn lru_map<K: aya::Pod, V: aya::Pod>(m: Map) -> Result<HashMap<MapData, K, V>> {
    Ok(HashMap::try_from(m)?)
}

fn sum_per_cpu(map: &CounterMap, slots: u32) -> Result<Vec<u64>> {
    let mut out = vec![0u64; slots as usize];
    for (i, slot) in out.iter_mut().enumerate() {
        let values = map.get(&(i as u32), 0)?;
        *slot = values.iter().sum();
    }
    Ok(out)
}

/// Capacity of a pinned map (max_entries as created).
pub fn capacity(bpffs_root: &Path, name: &str) -> Result<u32> {
    let path = map_dir(bpffs_root).join(name);
    let data = MapData::from_pin(&path)?;
    Ok(data.info()?.max_entries())
}
