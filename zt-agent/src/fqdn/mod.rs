//! FQDN runtime of the agent: the kernel learns addresses from DNS answers by itself
//! (`zt-ebpf/src/dns.rs`); user space only names them. The reader turns the captured
//! answers of `ZT_DNS_EVENTS` into the name cache (`<state-dir>/fqdn-cache.json`), GC
//! removes learned entries long past their expiry, and ztctl reads both (agent down too).
pub mod cache;
pub mod gc;
pub mod reader;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, MapData, PerCpuArray};
use zt_common::*;

use crate::pins::open_map;

pub use cache::FqdnCache;

pub type LearnedMap = HashMap<MapData, FqdnLearnedKey, FqdnLearnedValue>;
pub type FqdnPortsMap = LpmTrie<MapData, PolicyKey, FqdnPortsValue>;

/// The pinned FQDN maps user space reads (the kernel and the compiler write them).
pub struct FqdnMaps {
    pub config: Array<MapData, FqdnConfig>,
    pub learned: LearnedMap,
    pub ports: FqdnPortsMap,
    pub stats: PerCpuArray<MapData, u64>,
    pub learned_capacity: u32,
}

impl FqdnMaps {
    pub fn open(bpffs_root: &Path) -> Result<FqdnMaps> {
        let open = |name: &str| open_map(bpffs_root, name);
        Ok(FqdnMaps {
            config: open(MAP_FQDN_CONFIG)?.try_into()?,
            // An LRU hash loads as Map::LruHashMap; aya's HashMap takes both.
            learned: HashMap::try_from(open(MAP_FQDN_LEARNED)?)?,
            ports: open(MAP_FQDN_PORTS)?.try_into()?,
            stats: open(MAP_DNS_STATS)?.try_into()?,
            learned_capacity: crate::pins::capacity(bpffs_root, MAP_FQDN_LEARNED)?,
        })
    }

    pub fn config(&self) -> Result<FqdnConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// `ZT_DNS_STATS` summed over CPUs, indexed by `DnsStat`.
    pub fn stats(&self) -> Result<Vec<u64>> {
        let mut out = vec![0u64; DNS_STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }

    /// Every learned entry (IPv4 addresses come back from their mapped form).
    pub fn learned_entries(&self) -> Vec<(u32, std::net::IpAddr, FqdnLearnedValue)> {
        let mut v: Vec<_> = self
            .learned
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, val)| (k.local_id, crate::net::from_key(k.addr), val))
            .collect();
        v.sort_by_key(|(id, ip, _)| (*id, *ip));
        v
    }

    /// Rule ids behind the slots of `local` (from `ZT_FQDN_PORTS`, whose values carry the
    /// rule id of each slot).
    pub fn slot_rules(&self, local: u32) -> [u32; 32] {
        let mut out = [0u32; 32];
        for (k, v) in self.ports.iter().filter_map(|r| r.ok()) {
            if k.data().local_id() != local {
                continue;
            }
            for (s, rule) in v.rule_ids.iter().enumerate() {
                if v.slots & (1 << s) != 0 && *rule != 0 {
                    out[s] = *rule;
                }
            }
        }
        out
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The cache file in the state dir.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join("fqdn-cache.json")
}

/// What the agent runs for FQDN rules: the reader task and the GC/persist task.
pub struct Runtime {
    pub cache: Arc<Mutex<FqdnCache>>,
}

/// How often the cache is written (when dirty) and learned entries are collected.
const PERSIST_EVERY: Duration = Duration::from_secs(5);
const GC_EVERY: Duration = Duration::from_secs(10);

impl Runtime {
    /// Start the reader and the GC. Without the FQDN maps (an older datapath) nothing
    /// runs and the agent goes on; the error says why.
    pub fn start(bpffs_root: &Path, state_dir: &Path, ct_tcp_timeout_s: u32, metrics: crate::metrics::Shared) -> Result<Runtime> {
        let maps = FqdnMaps::open(bpffs_root)?;
        let ring = open_map(bpffs_root, MAP_DNS_EVENTS)?;
        let ring = aya::maps::RingBuf::try_from(ring)?;
        let mut cache = FqdnCache::load(cache_path(state_dir));
        // Names only for what the kernel still holds (entries expire, LRU evicts).
        let learned = maps.learned_entries();
        cache.retain_learned(&learned.iter().map(|(id, ip, _)| (*id, *ip)).collect());
        metrics.lock().unwrap().fqdn_cache_names = cache.len();
        let cache = Arc::new(Mutex::new(cache));
        tokio::spawn(reader::run(ring, cache.clone(), metrics.clone()));
        let ct = crate::conntrack_gc::CtMaps::open(bpffs_root).map_err(|e| log::warn!("fqdn gc without conntrack (expiry alone): {e:#}")).ok();
        let mut gc = gc::Gc { maps, ct_tcp_timeout_s, ct, cache: cache.clone(), metrics };
        tokio::spawn(async move {
            let mut persist = tokio::time::interval(PERSIST_EVERY);
            let mut collect = tokio::time::interval(GC_EVERY);
            loop {
                tokio::select! {
                    _ = persist.tick() => gc.persist(),
                    _ = collect.tick() => gc.collect(),
                }
            }
        });
        Ok(Runtime { cache })
    }

    /// Write the cache now (at shutdown).
    pub fn save(&self) {
        if let Err(e) = self.cache.lock().unwrap().save() {
            log::warn!("fqdn cache: {e:#}");
        }
    }
}

/// The FQDN series of `/metrics` (no per-identity series: cardinality).
pub fn render_metrics(o: &mut String, m: &crate::metrics::AgentMetrics, maps: Option<&FqdnMaps>) {
    use std::fmt::Write as _;
    let stats = maps.and_then(|f| f.stats().ok());
    let is_event = |s: DnsStat| s.name().starts_with("event-");
    let _ = writeln!(o, "# HELP zt_fqdn_answers_total DNS answers to pods with FQDN rules seen by the kernel, by outcome (answers counts every trusted answer parsed; learned and ips-learned add to it; the others say why nothing or not everything was learned).\n# TYPE zt_fqdn_answers_total counter");
    if let Some(s) = &stats {
        for st in DnsStat::ALL.iter().copied().filter(|s| !is_event(*s) && !matches!(s, DnsStat::IpsLearned | DnsStat::Queries)) {
            let _ = writeln!(o, "zt_fqdn_answers_total{{outcome=\"{}\"}} {}", st.name(), s[st as usize]);
        }
    }
    let _ = writeln!(o, "# HELP zt_fqdn_queries_total DNS queries of pods with FQDN rules to trusted resolvers recorded by the kernel (an answer teaches only if it matches one: outcome no-query otherwise).\n# TYPE zt_fqdn_queries_total counter");
    if let Some(s) = &stats {
        let _ = writeln!(o, "zt_fqdn_queries_total {}", s[DnsStat::Queries as usize]);
    }
    let _ = writeln!(o, "# HELP zt_fqdn_ips_learned_total Addresses learned from DNS answers.\n# TYPE zt_fqdn_ips_learned_total counter");
    if let Some(s) = &stats {
        let _ = writeln!(o, "zt_fqdn_ips_learned_total {}", s[DnsStat::IpsLearned as usize]);
    }
    let _ = writeln!(o, "# HELP zt_fqdn_events_total Captured answers copied to user space, by outcome (event-sent, event-rate-limited, event-ring-full).\n# TYPE zt_fqdn_events_total counter");
    if let Some(s) = &stats {
        for st in DnsStat::ALL.iter().copied().filter(|s| is_event(*s)) {
            let _ = writeln!(o, "zt_fqdn_events_total{{outcome=\"{}\"}} {}", st.name(), s[st as usize]);
        }
    }
    let _ = writeln!(o, "# HELP zt_fqdn_events_read_total DNS events the agent read from the ring (undecodable: no question could be read).\n# TYPE zt_fqdn_events_read_total counter");
    let _ = writeln!(o, "zt_fqdn_events_read_total{{result=\"ok\"}} {}", m.fqdn_events_read.saturating_sub(m.fqdn_events_undecodable));
    let _ = writeln!(o, "zt_fqdn_events_read_total{{result=\"undecodable\"}} {}", m.fqdn_events_undecodable);
    let _ = writeln!(o, "# HELP zt_fqdn_cache_names Names in the agent's FQDN cache (per identity).\n# TYPE zt_fqdn_cache_names gauge");
    let _ = writeln!(o, "zt_fqdn_cache_names {}", m.fqdn_cache_names);
    let _ = writeln!(o, "# HELP zt_fqdn_gc_removed_total Learned entries removed by the agent's GC (past expiry + grace + TCP conntrack timeout).\n# TYPE zt_fqdn_gc_removed_total counter");
    let _ = writeln!(o, "zt_fqdn_gc_removed_total {}", m.fqdn_gc_removed);
    let _ = writeln!(o, "# HELP zt_fqdn_learned_kept_for_flows Learned entries past expiry that the last GC pass kept because a live flow needs them.\n# TYPE zt_fqdn_learned_kept_for_flows gauge");
    let _ = writeln!(o, "zt_fqdn_learned_kept_for_flows {}", m.fqdn_gc_kept_for_flows);
}
