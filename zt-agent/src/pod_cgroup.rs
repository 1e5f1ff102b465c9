//! A local pod's own cgroup (kubelet's pod level) under the pods' cgroup root, found by
//! the pod's UID. Its id goes into the pod's endpoints (`EndpointValue::cgroup`) so that
//! the cgroup programs leave to a pod's TC hook only the sockets of that pod.
//!
//! Layouts kubelet makes (cgroup v2), relative to the pods' root:
//! - cgroupfs driver: `pod<uid>` (Guaranteed), `burstable/pod<uid>`, `besteffort/pod<uid>`;
//! - systemd driver: `kubepods-pod<uid_>.slice`, `kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`,
//!   `kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` (`uid_`: dashes as underscores).
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use zt_common::cgroup_scope;

/// The pod's cgroup directory, if kubelet has made it.
pub fn find(root: &Path, uid: &str) -> Option<PathBuf> {
    if uid.is_empty() || uid.contains('/') || uid.contains("..") {
        return None;
    }
    let u = uid.replace('-', "_");
    let candidates = [
        format!("pod{uid}"),
        format!("burstable/pod{uid}"),
        format!("besteffort/pod{uid}"),
        format!("kubepods-pod{u}.slice"),
        format!("kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
        format!("kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
    ];
    candidates.iter().map(|c| root.join(c)).find(|p| p.is_dir())
}

/// `cgroup_scope` of a cgroup directory: on cgroup v2 a cgroup's id is its inode number.
pub fn scope_of(dir: &Path) -> Option<u32> {
    std::fs::metadata(dir).ok().map(|m| cgroup_scope(m.ino()))
}

/// Pod UID -> cgroup scope, found once per pod; a pod whose cgroup is not there (yet) is
/// looked for again after `RETRY`.
#[derive(Default)]
pub struct PodCgroups {
    found: BTreeMap<String, u32>,
    missing: BTreeMap<String, Instant>,
}

const RETRY: Duration = Duration::from_secs(10);

impl PodCgroups {
    /// The scope of the pod `uid` under `root` (0: not known).
    pub fn get(&mut self, root: &Path, uid: &str) -> u32 {
        if let Some(s) = self.found.get(uid) {
            return *s;
        }
        if self.missing.get(uid).is_some_and(|t| t.elapsed() < RETRY) {
            return 0;
        }
        match find(root, uid).and_then(|d| scope_of(&d)) {
            Some(s) => {
                self.missing.remove(uid);
                self.found.insert(uid.to_string(), s);
                s
            }
            None => {
                self.missing.insert(uid.to_string(), Instant::now());
                0
            }
        }
    }

    /// Forgets pods that are gone.
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.found.retain(|u, _| live(u));
        self.missing.retain(|u, _| live(u));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kubelet_layout_is_found() {
        let root = std::env::temp_dir().join(format!("zt-podcg-{}", std::process::id()));
        let uid = "0b7c2a4e-1111-4222-8333-444455556666";
        let u = uid.replace('-', "_");
        for (i, rel) in [
            format!("pod{uid}"),
            format!("burstable/pod{uid}"),
            format!("besteffort/pod{uid}"),
            format!("kubepods-pod{u}.slice"),
            format!("kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
        ]
        .iter()
        .enumerate()
        {
            let r = root.join(i.to_string());
            std::fs::create_dir_all(r.join(rel)).unwrap();
            assert_eq!(find(&r, uid), Some(r.join(rel)), "{rel}");
            assert_ne!(scope_of(&r.join(rel)), None);
        }
        assert_eq!(find(&root.join("0"), "other"), None);
        assert_eq!(find(&root, "../x"), None);
        let mut c = PodCgroups::default();
        let s = c.get(&root.join("0"), uid);
        assert_ne!(s, 0);
        assert_eq!(c.get(&root.join("0"), "nope"), 0);
        c.retain(|u| u != uid);
        assert!(c.found.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
