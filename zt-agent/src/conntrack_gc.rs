//! Conntrack garbage collection and accounting. The kernel keeps tracked flows in two
//! maps (see zt-ebpf/src/conntrack.rs): `ZT_CT_EST`, a plain hash of established TCP
//! flows that nothing evicts, and `ZT_CT`, an LRU of everything else (TCP before its
//! handshake completed and after it closed, UDP, ICMP, other protocols). The kernel only
//! drops an expired entry when a packet of its flow meets it, so an idle flow that never
//! comes back would hold its slot in `ZT_CT_EST` for ever: this pass walks both maps,
//! deletes what is past its state's timeout (the same `ct_timeout_s` the kernel applies,
//! with the timeouts `ZT_CONFIG` holds) and publishes what it counted, so that a
//! Prometheus scrape reads numbers instead of walking the maps. Pressure (a full
//! `ZT_CT_EST`, an `ZT_CT` near capacity, inserts the kernel could not make) is a metric
//! and a log line.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use zt_common::*;

use crate::metrics::Shared;
use crate::pins::{capacity, open_map, ConfigMap, CounterMap, CtMap};

/// `ZT_CT` above this share of its capacity is pressure: new flows evict each other.
pub const PRESSURE_RATIO: f64 = 0.9;

/// Conntrack timeouts (flags `--ct-*`, seconds) and the GC period. The defaults follow
/// Cilium (established TCP 6 h, SYN 60 s, closed 10 s, non-TCP 60 s) and Linux
/// (half-closed 60 s as its CLOSE_WAIT, ICMP 30 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtSettings {
    pub tcp_established_s: u32,
    pub tcp_syn_s: u32,
    pub tcp_fin_s: u32,
    pub tcp_close_s: u32,
    pub udp_s: u32,
    pub icmp_s: u32,
    pub other_s: u32,
    pub gc_interval: Duration,
}

impl Default for CtSettings {
    fn default() -> Self {
        CtSettings {
            tcp_established_s: 21600,
            tcp_syn_s: 60,
            tcp_fin_s: 60,
            tcp_close_s: 10,
            udp_s: 60,
            icmp_s: 30,
            other_s: 60,
            gc_interval: Duration::from_secs(30),
        }
    }
}

impl CtSettings {
    /// The kernel reads its timeouts from `ZT_CONFIG` (no lookup of its own per packet).
    pub fn write_into(&self, cfg: &mut Config) {
        cfg.ct_tcp_timeout_s = self.tcp_established_s;
        cfg.ct_tcp_syn_timeout_s = self.tcp_syn_s;
        cfg.ct_tcp_fin_timeout_s = self.tcp_fin_s;
        cfg.ct_tcp_close_timeout_s = self.tcp_close_s;
        cfg.ct_udp_timeout_s = self.udp_s;
        cfg.ct_icmp_timeout_s = self.icmp_s;
        cfg.ct_other_timeout_s = self.other_s;
    }
}

/// The maps the GC reads and trims.
pub struct CtMaps {
    pub config: ConfigMap,
    /// `ZT_CT` (LRU): flows that are not established TCP.
    pub new: CtMap,
    /// `ZT_CT_EST` (hash): established TCP flows.
    pub est: CtMap,
    pub stats: CounterMap,
    /// `ZT_FRAGS`, counted by each pass (not by the metrics scrape).
    pub frags: crate::pins::FragsMap,
    pub new_capacity: u32,
    pub est_capacity: u32,
}

impl CtMaps {
    pub fn open(bpffs_root: &Path) -> Result<CtMaps> {
        let open = |name: &str| open_map(bpffs_root, name);
        Ok(CtMaps {
            config: open(MAP_CONFIG)?.try_into()?,
            // An LRU hash loads as Map::LruHashMap; aya's HashMap takes both.
            new: aya::maps::HashMap::try_from(open(MAP_CT)?)?,
            est: open(MAP_CT_EST)?.try_into()?,
            stats: open(MAP_CT_STATS)?.try_into()?,
            frags: open(MAP_FRAGS)?.try_into()?,
            new_capacity: capacity(bpffs_root, MAP_CT)?,
            est_capacity: capacity(bpffs_root, MAP_CT_EST)?,
        })
    }

    /// (local identity, peer address) of every live egress flow at `now_ns`, in both
    /// maps: the FQDN GC keeps the learned entries these flows need to be re-judged.
    pub fn live_egress_peers(&self, now_ns: u64) -> Result<std::collections::HashSet<(u32, [u8; 16])>> {
        let cfg: Config = self.config.get(&0, 0).context("reading ZT_CONFIG")?;
        let mut out = std::collections::HashSet::new();
        for map in [&self.est, &self.new] {
            for (k, v) in map.iter().filter_map(|r| r.ok()) {
                if k.dir == DIR_EGRESS && !ct_expired(&cfg, k.proto, &v, now_ns) {
                    out.insert((v.local_id, k.daddr));
                }
            }
        }
        Ok(out)
    }

    /// `ZT_CT_STATS` summed over CPUs, indexed by `CtStat`.
    pub fn kernel_stats(&self) -> Result<Vec<u64>> {
        let mut out = vec![0u64; CT_STAT_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// What one pass found and did; the agent keeps the latest in its metrics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CtCounts {
    /// Live entries by (map, state name) after the pass.
    pub entries: BTreeMap<(&'static str, &'static str), usize>,
    pub new_entries: usize,
    /// Entries of `ZT_FRAGS` at the pass.
    pub frags_entries: usize,
    pub est_entries: usize,
    pub new_capacity: u32,
    pub est_capacity: u32,
    /// Entries deleted by GC since the start, by state name.
    pub deleted: BTreeMap<&'static str, u64>,
    /// Passes made, and the duration of the last one.
    pub passes: u64,
    pub last_pass_seconds: f64,
}

/// One map's walk: expired keys (with the value seen, to re-check before deleting) and
/// the live ones counted by state.
fn walk(map: &CtMap, cfg: &Config, now_ns: u64, name: &'static str, counts: &mut CtCounts) -> (Vec<(CtKey, CtValue)>, usize) {
    let mut expired = vec![];
    let mut live = 0;
    // Keys first, deletes after: deleting while walking with get_next_key restarts the
    // walk at the first key.
    for item in map.iter() {
        let Ok((k, v)) = item else { continue };
        if ct_expired(cfg, k.proto, &v, now_ns) {
            expired.push((k, v));
        } else {
            live += 1;
            *counts.entries.entry((name, ct_state_name(k.proto, v.state))).or_default() += 1;
        }
    }
    (expired, live)
}

/// Has this entry outlived its state's idle timeout at `now_ns` (CLOCK_MONOTONIC, the
/// clock of bpf_ktime_get_ns)? The kernel's test is the same (`fresh` in conntrack.rs).
pub fn ct_expired(cfg: &Config, proto: u8, v: &CtValue, now_ns: u64) -> bool {
    now_ns.saturating_sub(v.last_seen_ns) >= ct_timeout_s(cfg, proto, v.state) as u64 * 1_000_000_000
}

/// Seconds before this entry expires if no packet refreshes it (0: expired).
pub fn ct_remaining_s(cfg: &Config, proto: u8, v: &CtValue, now_ns: u64) -> u64 {
    let idle = now_ns.saturating_sub(v.last_seen_ns) / 1_000_000_000;
    (ct_timeout_s(cfg, proto, v.state) as u64).saturating_sub(idle)
}

pub struct CtGc {
    pub maps: CtMaps,
    counts: CtCounts,
    /// Kernel counters at the previous pass (pressure is logged when they grow).
    last_stats: Vec<u64>,
    /// `ZT_CT` was above `PRESSURE_RATIO` at the previous pass.
    new_pressure: bool,
}

impl CtGc {
    pub fn new(maps: CtMaps) -> CtGc {
        let last_stats = maps.kernel_stats().unwrap_or_else(|_| vec![0; CT_STAT_SLOTS as usize]);
        CtGc { maps, counts: CtCounts::default(), last_stats, new_pressure: false }
    }

    /// One pass at `now_ns`: deletes expired entries of both maps, counts the rest,
    /// logs pressure. Returns the counts (also kept for the next pass's totals).
    pub fn collect(&mut self, now_ns: u64) -> Result<CtCounts> {
        let t = Instant::now();
        let cfg: Config = self.maps.config.get(&0, 0).context("reading ZT_CONFIG")?;
        let mut counts = CtCounts { deleted: std::mem::take(&mut self.counts.deleted), passes: self.counts.passes + 1, ..Default::default() };
        for est in [false, true] {
            let (map, name) = if est { (&mut self.maps.est, MAP_CT_EST) } else { (&mut self.maps.new, MAP_CT) };
            let (expired, live) = walk(map, &cfg, now_ns, name, &mut counts);
            let mut kept = 0;
            for (k, seen) in expired {
                // A packet may have refreshed it since it was read: then it stays.
                match map.get(&k, 0) {
                    Ok(now_v) if now_v.last_seen_ns != seen.last_seen_ns || now_v.state != seen.state => {
                        kept += 1;
                        *counts.entries.entry((name, ct_state_name(k.proto, now_v.state))).or_default() += 1;
                        continue;
                    }
                    Ok(_) => {}
                    // Gone already (the kernel met it expired, LRU eviction, a promotion).
                    Err(_) => continue,
                }
                if map.remove(&k).is_ok() {
                    *counts.deleted.entry(ct_state_name(k.proto, seen.state)).or_default() += 1;
                }
            }
            if est {
                counts.est_entries = live + kept;
            } else {
                counts.new_entries = live + kept;
            }
        }
        counts.frags_entries = self.maps.frags.keys().count();
        counts.new_capacity = self.maps.new_capacity;
        counts.est_capacity = self.maps.est_capacity;
        counts.last_pass_seconds = t.elapsed().as_secs_f64();
        self.log_pressure(&counts);
        self.counts = counts.clone();
        Ok(counts)
    }

    /// Never a silent cut: a full `ZT_CT_EST`, failed inserts and an `ZT_CT` near its
    /// capacity are logged (and counted in the metrics).
    fn log_pressure(&mut self, c: &CtCounts) {
        let Ok(stats) = self.maps.kernel_stats() else { return };
        let delta = |s: CtStat| stats[s as usize].saturating_sub(self.last_stats.get(s as usize).copied().unwrap_or(0));
        let full = delta(CtStat::EstablishedFull);
        if full > 0 {
            log::warn!(
                "conntrack: {MAP_CT_EST} full ({} of {}): {full} established TCP flows stayed in {MAP_CT}, where new flows can evict them (raise --ct-established-max)",
                c.est_entries,
                c.est_capacity
            );
        }
        let failed = delta(CtStat::CreateFailed);
        if failed > 0 {
            log::error!("conntrack: {failed} allowed flows could not be tracked (insert into {MAP_CT} failed): their replies were judged as new flows");
        }
        let high = c.new_capacity > 0 && c.new_entries as f64 >= PRESSURE_RATIO * c.new_capacity as f64;
        if high && !self.new_pressure {
            log::warn!(
                "conntrack: {MAP_CT} holds {} of {} entries: new flows now evict the least recently used flows that are not established TCP (raise --ct-max)",
                c.new_entries,
                c.new_capacity
            );
        } else if !high && self.new_pressure {
            log::info!("conntrack: {MAP_CT} back under {:.0}% ({} of {})", PRESSURE_RATIO * 100.0, c.new_entries, c.new_capacity);
        }
        self.new_pressure = high;
        self.last_stats = stats;
    }
}

/// Runs a pass every `every` on a thread of its own (map walks are syscalls) and
/// publishes the counts to the agent's metrics.
pub fn spawn(bpffs_root: &Path, every: Duration, metrics: Shared) -> Result<()> {
    let mut gc = CtGc::new(CtMaps::open(bpffs_root).context("conntrack maps")?);
    std::thread::Builder::new().name("ct-gc".into()).spawn(move || loop {
        match gc.collect(crate::clock::monotonic_ns()) {
            Ok(c) => metrics.lock().unwrap().ct = Some(c),
            Err(e) => log::error!("conntrack gc: {e:#}"),
        }
        std::thread::sleep(every);
    })?;
    Ok(())
}

/// The conntrack series of `/metrics`, from the last GC pass and the kernel's counters.
/// Every name `ct_state_name` gives.
const CT_STATE_NAMES: [&str; 7] = ["tcp-syn", "tcp-established", "tcp-closing", "tcp-closed", "udp", "icmp", "other"];

pub fn render_metrics(o: &mut String, c: Option<&CtCounts>, stats: Option<&[u64]>) {
    use std::fmt::Write as _;
    let _ = writeln!(o, "# HELP zt_ct_entries Tracked flows by map and state at the last conntrack GC pass.\n# TYPE zt_ct_entries gauge");
    if let Some(c) = c {
        // Every state of both maps, 0 when none: a gauge that vanishes reads as "no data".
        let mut entries: BTreeMap<(&str, &str), usize> = [MAP_CT, MAP_CT_EST].iter().flat_map(|m| CT_STATE_NAMES.iter().map(move |s| ((*m, *s), 0))).collect();
        entries.extend(c.entries.iter().map(|(k, n)| (*k, *n)));
        for ((map, state), n) in &entries {
            let _ = writeln!(o, "zt_ct_entries{{map=\"{map}\",state=\"{state}\"}} {n}");
        }
    }
    let _ = writeln!(
        o,
        "# HELP zt_ct_fill_ratio Fill of each conntrack map (entries / capacity) at the last GC pass; ZT_CT_EST at 1 refuses to protect new established flows, ZT_CT near 1 evicts.\n# TYPE zt_ct_fill_ratio gauge"
    );
    if let Some(c) = c {
        for (map, n, cap) in [(MAP_CT, c.new_entries, c.new_capacity), (MAP_CT_EST, c.est_entries, c.est_capacity)] {
            let _ = writeln!(o, "zt_ct_fill_ratio{{map=\"{map}\"}} {}", if cap == 0 { 0.0 } else { n as f64 / cap as f64 });
        }
    }
    let _ = writeln!(o, "# HELP zt_ct_gc_deleted_total Expired conntrack entries deleted by the agent's GC, by state.\n# TYPE zt_ct_gc_deleted_total counter");
    if let Some(c) = c {
        // Every state from the start at 0, so rate() sees the first deletion.
        let mut deleted: BTreeMap<&str, u64> = CT_STATE_NAMES.iter().map(|s| (*s, 0)).collect();
        deleted.extend(c.deleted.iter().map(|(k, n)| (*k, *n)));
        for (state, n) in &deleted {
            let _ = writeln!(o, "zt_ct_gc_deleted_total{{state=\"{state}\"}} {n}");
        }
    }
    let _ = writeln!(o, "# HELP zt_ct_gc_passes_total Conntrack GC passes.\n# TYPE zt_ct_gc_passes_total counter");
    let _ = writeln!(o, "zt_ct_gc_passes_total {}", c.map(|c| c.passes).unwrap_or(0));
    let _ = writeln!(o, "# HELP zt_ct_gc_last_pass_seconds Duration of the last conntrack GC pass.\n# TYPE zt_ct_gc_last_pass_seconds gauge");
    let _ = writeln!(o, "zt_ct_gc_last_pass_seconds {}", c.map(|c| c.last_pass_seconds).unwrap_or(0.0));
    let _ = writeln!(
        o,
        "# HELP zt_ct_kernel_total Conntrack events in the kernel: promoted (a TCP flow became established and moved to ZT_CT_EST), established-full (ZT_CT_EST refused it: it stays in the LRU), demoted (closed, moved back), create-failed (an allowed flow could not be tracked).\n# TYPE zt_ct_kernel_total counter"
    );
    if let Some(s) = stats {
        for st in CtStat::ALL {
            let _ = writeln!(o, "zt_ct_kernel_total{{event=\"{}\"}} {}", st.name(), s.get(st as usize).copied().unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_follows_the_state() {
        let cfg = Config {
            ct_tcp_timeout_s: 21600,
            ct_tcp_syn_timeout_s: 60,
            ct_tcp_fin_timeout_s: 60,
            ct_tcp_close_timeout_s: 10,
            ct_udp_timeout_s: 60,
            ct_icmp_timeout_s: 30,
            ..Default::default()
        };
        let s = 1_000_000_000u64;
        let v = |state: u8| CtValue { last_seen_ns: 100 * s, state, ..Default::default() };
        let now = 100 * s + 11 * s;
        assert!(ct_expired(&cfg, 6, &v(CT_TCP_CLOSED), now), "closed: 10 s");
        assert!(!ct_expired(&cfg, 6, &v(CT_TCP_SYN), now), "syn: 60 s");
        assert!(!ct_expired(&cfg, 6, &v(CT_TCP_ESTABLISHED), 100 * s + 21599 * s));
        assert!(ct_expired(&cfg, 6, &v(CT_TCP_ESTABLISHED), 100 * s + 21600 * s));
        assert!(!ct_expired(&cfg, 1, &v(0), 100 * s + 29 * s) && ct_expired(&cfg, 1, &v(0), 100 * s + 30 * s), "icmp: 30 s");
        assert_eq!(ct_remaining_s(&cfg, 17, &v(0), now), 49);
    }

    #[test]
    fn state_names_cover_every_state() {
        for proto in 0..=255u8 {
            for state in 0..=255u8 {
                assert!(super::CT_STATE_NAMES.contains(&ct_state_name(proto, state)), "{proto} {state}");
            }
        }
    }
}
