//! Map layout upgrades. Pins live under `<bpffs-root>/<MAP_VERSION_DIR>` (`v2`, ...); an
//! agent of a new layout finds the links an agent of an older one pinned (its TC links on
//! every hooked interface, its cgroup links) still running the old programs on maps
//! nobody writes any more: new pods would be unknown to them and dropped.
//!
//! So the links are taken over in place: each older link pin is moved (a rename inside
//! bpffs) to this layout's link directory under the same name, where the loader swaps
//! this process's program into it (BPF_LINK_UPDATE), as it does for its own links after
//! a restart. One program per hook throughout: never unenforced, never two chains. The
//! TC links are taken over as the interfaces are attached, once this agent's first full
//! state is in its maps; the cgroup links likewise (the agent does not attach its own at
//! start while an older layout's are there, which would drop every pod's traffic as
//! not-ready until the first apply). Then the older directories (maps and all) go.
//!
//! Not carried over: the older conntrack and FQDN maps (their layouts differ). A flow
//! tracked before the upgrade is judged again as new: a client that speaks next passes
//! if policy allows it; a server that speaks first after the upgrade is judged as a new
//! flow in its own direction.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use zt_common::MAP_VERSION_DIR;

use crate::pins::link_dir;

/// `<root>/v<N>` directories of other layouts, oldest first.
pub fn older_layouts(bpffs_root: &Path) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(bpffs_root) else { return vec![] };
    let mut found: Vec<(u32, PathBuf)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // This layout moved aside for a resize (resize.rs): the newest of all.
            if name == format!("{MAP_VERSION_DIR}-resized") {
                return e.path().is_dir().then(|| (u32::MAX, e.path()));
            }
            let n: u32 = name.strip_prefix('v')?.parse().ok()?;
            (name != MAP_VERSION_DIR && e.path().is_dir()).then(|| (n, e.path()))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Whether an older layout holds a link pin whose name starts with `prefix`.
pub fn older_link_exists(bpffs_root: &Path, prefix: &str) -> bool {
    older_layouts(bpffs_root).iter().any(|d| {
        std::fs::read_dir(d.join("links")).is_ok_and(|mut r| r.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(prefix))))
    })
}

/// Moves the newest older layout's link pin `name` into this layout's link directory
/// (where the caller then swaps its program in). False if no older layout has it or
/// this layout already does.
pub fn adopt_link(bpffs_root: &Path, name: &str) -> Result<bool> {
    let to = link_dir(bpffs_root).join(name);
    if to.exists() {
        return Ok(false);
    }
    for dir in older_layouts(bpffs_root).iter().rev() {
        let from = dir.join("links").join(name);
        if from.exists() {
            std::fs::create_dir_all(link_dir(bpffs_root))?;
            std::fs::rename(&from, &to).with_context(|| format!("moving link {} to {}", from.display(), to.display()))?;
            log::info!("layout upgrade: took over link {} from {}", name, dir.display());
            return Ok(true);
        }
    }
    Ok(false)
}

/// The TC link pins the older layouts still hold: (ifindex, ifname).
pub fn older_tc_links(bpffs_root: &Path) -> Vec<(u32, String)> {
    let mut out = vec![];
    for dir in older_layouts(bpffs_root) {
        let Ok(r) = std::fs::read_dir(dir.join("links")) else { continue };
        for e in r.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(base) = name.strip_suffix("-from").or_else(|| name.strip_suffix("-to")) else { continue };
            let Some((idx, ifname)) = base.split_once('-') else { continue };
            if let Ok(idx) = idx.parse() {
                out.push((idx, ifname.to_string()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Unpins the older layouts' cgroup links this agent did not take over (its cgroup
/// programs are attached by now): Service socket programs with `--service-translation
/// false`, links of another cgroup root, or `--cgroup-root none`. Their programs would
/// keep running on frozen maps.
pub fn drop_older_cgroup_links(bpffs_root: &Path) -> Result<usize> {
    let mut n = 0;
    for dir in older_layouts(bpffs_root) {
        let Ok(r) = std::fs::read_dir(dir.join("links")) else { continue };
        for e in r.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("cgroup-")) {
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            log::info!("layout upgrade: removed unwanted link {}", e.path().display());
            n += 1;
        }
    }
    Ok(n)
}

/// Removes the older layouts whose links have all been taken over (or whose interfaces
/// are gone): their maps are referenced by nothing that runs. Returns what was removed.
pub fn retire(bpffs_root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = vec![];
    for dir in older_layouts(bpffs_root) {
        let links = dir.join("links");
        let live: Vec<String> = std::fs::read_dir(&links)
            .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !interface_gone(n)).collect())
            .unwrap_or_default();
        if !live.is_empty() {
            log::warn!("layout upgrade: {} still holds links {live:?}; kept", dir.display());
            continue;
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the older layout {}", dir.display()))?;
        log::info!("layout upgrade: removed {}", dir.display());
        removed.push(dir);
    }
    Ok(removed)
}

/// A TC link pin (`<ifindex>-<ifname>-{from,to}`) of an interface that no longer exists.
fn interface_gone(pin: &str) -> bool {
    let Some(base) = pin.strip_suffix("-from").or_else(|| pin.strip_suffix("-to")) else { return false };
    let Some((idx, ifname)) = base.split_once('-') else { return false };
    let Ok(idx) = idx.parse::<u32>() else { return false };
    !crate::net::ifindex(ifname).is_ok_and(|i| i == idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_layouts_are_other_version_dirs_oldest_first() {
        let root = std::env::temp_dir().join(format!("zt-upgrade-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let resized = format!("{MAP_VERSION_DIR}-resized");
        for d in ["v10/links", "v1/links", MAP_VERSION_DIR, "vx", "links", resized.as_str()] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("v9"), b"").unwrap();
        let got: Vec<String> = older_layouts(&root).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(got, ["v1".to_string(), "v10".to_string(), resized.clone()], "a resized layout is the newest");
        std::fs::write(root.join("v1/links/7-veth0-from"), b"").unwrap();
        assert_eq!(older_tc_links(&root), [(7, "veth0".to_string())]);
        assert!(older_link_exists(&root, "7-"));
        assert!(!older_link_exists(&root, "cgroup-"));
        assert!(adopt_link(&root, "7-veth0-from").unwrap());
        assert!(link_dir(&root).join("7-veth0-from").exists() && !root.join("v1/links/7-veth0-from").exists());
        assert!(!adopt_link(&root, "7-veth0-from").unwrap(), "already this layout's");
        let removed = retire(&root).unwrap();
        assert_eq!(removed.len(), 3);
        assert!(older_layouts(&root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
