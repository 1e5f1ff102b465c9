//! Map resizing without a drop. A pinned map keeps the size it was created with; when a
//! size flag (`--policy-max`, `--ct-max`, ...) asks for another, the agent at start moves
//! this layout's directory aside (`<root>/v2` → `<root>/v2-resized`; bpffs refuses names
//! with a dot), a rename inside bpffs: the running programs and their links keep their
//! maps. It loads fresh maps at the new sizes, then takes the old links over in place
//! exactly as a layout upgrade does
//! (upgrade.rs): the old programs enforce on their maps until this agent's first full
//! state is in the new ones, then each link swaps program atomically.
//!
//! What the agent does not rebuild from the cluster is carried over, since the layout is
//! the same: the config (policy epoch, flags), the FQDN config (hash key), conntrack
//! (both maps), learned FQDN addresses, in-flight DNS queries, and the Service reverse
//! translations and affinities of open sockets. They are copied once at load and again
//! just before the links are taken over; a flow first seen between that copy and the swap
//! is judged again as new (a client that speaks next passes if policy allows it).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData};
use aya::Pod;
use zt_common::*;

use crate::loader::MapSizes;
use crate::pins::{capacity, map_dir};

/// `<root>/<MAP_VERSION_DIR>-resized`: this layout's maps and links, moved aside.
pub fn resized_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("{MAP_VERSION_DIR}-resized"))
}

/// The pinned maps whose size differs from the flags: (name, pinned, wanted).
pub fn differences(bpffs_root: &Path, sizes: &MapSizes) -> Vec<(&'static str, u32, u32)> {
    sized(sizes)
        .into_iter()
        .filter_map(|(name, want)| match capacity(bpffs_root, name) {
            Ok(have) if have != want => Some((name, have, want)),
            _ => None,
        })
        .collect()
}

/// Every map a size flag governs, with the size asked for.
pub fn sized(s: &MapSizes) -> [(&'static str, u32); 9] {
    [
        (MAP_ENDPOINTS, s.endpoints),
        (MAP_CIDRS, s.cidrs),
        (MAP_POLICY, s.policy),
        (MAP_CT, s.ct),
        (MAP_CT_EST, s.ct_est),
        (MAP_FRAGS, s.frags),
        (MAP_FQDN_NAMES, s.fqdn_names),
        (MAP_FQDN_PORTS, s.fqdn_ports),
        (MAP_FQDN_LEARNED, s.fqdn_learned),
    ]
}

/// Moves this layout aside if a size flag changed. Returns the directory the old maps
/// are in now, or None (nothing to resize, or a previous resize is not finished: then
/// the pins are kept as they are and the log says why).
pub fn stage(bpffs_root: &Path, sizes: &MapSizes) -> Result<Option<PathBuf>> {
    let diff = differences(bpffs_root, sizes);
    if diff.is_empty() {
        return Ok(None);
    }
    let aside = resized_dir(bpffs_root);
    if aside.exists() {
        log::warn!("map resize: {} from an unfinished resize is still there; keeping the pinned sizes {diff:?}", aside.display());
        return Ok(None);
    }
    std::fs::rename(map_dir(bpffs_root), &aside).with_context(|| format!("moving {} aside to resize", map_dir(bpffs_root).display()))?;
    for (name, have, want) in &diff {
        log::info!("map resize: {name} {have} -> {want} entries (new maps, links taken over in place)");
    }
    Ok(Some(aside))
}

/// Copies what the cluster does not rebuild from the old maps in `from` into this
/// layout's (entries already there are refreshed). Returns the entries copied per map.
/// `with_config`: the first copy only (later the agent owns the new config).
pub fn carry_over(from: &Path, bpffs_root: &Path, with_config: bool) -> Result<Vec<(&'static str, usize)>> {
    let to = map_dir(bpffs_root);
    let mut out = vec![];
    if with_config {
        out.push((MAP_CONFIG, copy_first::<Config>(from, &to, MAP_CONFIG)?));
        out.push((MAP_FQDN_CONFIG, copy_first::<FqdnConfig>(from, &to, MAP_FQDN_CONFIG)?));
    }
    out.push((MAP_CT_EST, copy_hash::<CtKey, CtValue>(from, &to, MAP_CT_EST)?));
    out.push((MAP_CT, copy_hash::<CtKey, CtValue>(from, &to, MAP_CT)?));
    out.push((MAP_FQDN_LEARNED, copy_hash::<FqdnLearnedKey, FqdnLearnedValue>(from, &to, MAP_FQDN_LEARNED)?));
    out.push((MAP_DNS_QUERIES, copy_hash::<DnsQueryKey, DnsQueryValue>(from, &to, MAP_DNS_QUERIES)?));
    out.push((MAP_SVC_REVNAT, copy_hash::<SvcRevKey, SvcRevValue>(from, &to, MAP_SVC_REVNAT)?));
    out.push((MAP_SVC_AFFINITY, copy_hash::<SvcAffinityKey, SvcAffinityValue>(from, &to, MAP_SVC_AFFINITY)?));
    Ok(out)
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

fn copy_first<V: Pod>(from: &Path, to: &Path, name: &str) -> Result<usize> {
    let src: Array<MapData, V> = open(from, name)?.try_into()?;
    let mut dst: Array<MapData, V> = open(to, name)?.try_into()?;
    let v = src.get(&0, 0).with_context(|| format!("reading {name}[0]"))?;
    dst.set(0, v, 0).with_context(|| format!("writing {name}[0]"))?;
    Ok(1)
}

/// A full new map (a smaller size asked for than the entries held) keeps what fits; the
/// rest are counted in the log, never an error: they are judged again as new.
fn copy_hash<K: Pod, V: Pod>(from: &Path, to: &Path, name: &str) -> Result<usize> {
    let src: HashMap<MapData, K, V> = HashMap::try_from(open(from, name)?)?;
    let mut dst: HashMap<MapData, K, V> = HashMap::try_from(open(to, name)?)?;
    let (mut n, mut failed) = (0, 0);
    for (k, v) in src.iter().filter_map(|r| r.ok()) {
        match dst.insert(k, v, 0) {
            Ok(()) => n += 1,
            Err(_) => failed += 1,
        }
    }
    if failed > 0 {
        log::warn!("map resize: {failed} entries of {name} did not fit the new map");
    }
    Ok(n)
}
