//! The name cache: which names a local identity resolved to which addresses. The kernel
//! decides with `ZT_FQDN_LEARNED` alone; this only names those entries for ztctl,
//! `explain` and people. Bounded (names, addresses per name; least recently seen goes
//! first) and persisted to `<state-dir>/fqdn-cache.json`.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const MAX_NAMES: usize = 16384;
pub const MAX_IPS_PER_NAME: usize = 256;

/// One address of a name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpSeen {
    /// TTL of the record in the answer (the kernel clamps it; `ZT_FQDN_LEARNED` is the truth).
    pub ttl: u32,
    pub seen_unix_s: u64,
}

/// One (identity, question name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    pub local_id: u32,
    /// Lowercased, no trailing dot.
    pub name: String,
    pub ips: BTreeMap<IpAddr, IpSeen>,
    /// CNAME targets of the last answer, in order (the question name decides the rules).
    pub cnames: Vec<String>,
    pub last_seen_unix_s: u64,
    /// `DnsStat` name of the last answer's outcome (e.g. "learned", "no-match").
    pub outcome: String,
    /// The kernel learned addresses under this name (it matched an FQDN rule).
    pub learned: bool,
}

/// What the reader records from one answer.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    pub local_id: u32,
    pub name: String,
    pub ips: Vec<(IpAddr, u32)>,
    pub cnames: Vec<String>,
    pub outcome: String,
    pub learned: bool,
    pub now_unix_s: u64,
}

#[derive(Debug, Default)]
pub struct FqdnCache {
    path: PathBuf,
    entries: BTreeMap<(u32, String), NameEntry>,
    dirty: bool,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    names: Vec<NameEntry>,
}

impl FqdnCache {
    /// Load `path`; a missing or unreadable file starts empty (names come back with the
    /// next resolutions; enforcement never depends on this file).
    pub fn load(path: PathBuf) -> FqdnCache {
        let mut c = FqdnCache { path, ..Default::default() };
        match std::fs::read(&c.path) {
            Ok(data) => match serde_json::from_slice::<File>(&data) {
                Ok(f) => {
                    for e in f.names {
                        c.entries.insert((e.local_id, e.name.clone()), e);
                    }
                }
                Err(e) => log::warn!("{}: {e}; starting with an empty FQDN cache", c.path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: {e}; starting with an empty FQDN cache", c.path.display()),
        }
        c
    }

    /// Read-only view of a cache file (ztctl); missing file = empty.
    pub fn read(path: &Path) -> Result<FqdnCache> {
        let mut c = FqdnCache { path: path.to_path_buf(), ..Default::default() };
        match std::fs::read(path) {
            Ok(data) => {
                let f: File = serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))?;
                for e in f.names {
                    c.entries.insert((e.local_id, e.name.clone()), e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> impl Iterator<Item = &NameEntry> {
        self.entries.values()
    }

    pub fn record(&mut self, o: Observation) {
        let key = (o.local_id, o.name.clone());
        let e = self.entries.entry(key).or_insert_with(|| NameEntry {
            local_id: o.local_id,
            name: o.name.clone(),
            ips: BTreeMap::new(),
            cnames: vec![],
            last_seen_unix_s: 0,
            outcome: String::new(),
            learned: false,
        });
        for (ip, ttl) in &o.ips {
            e.ips.insert(*ip, IpSeen { ttl: *ttl, seen_unix_s: o.now_unix_s });
        }
        while e.ips.len() > MAX_IPS_PER_NAME {
            let oldest = e.ips.iter().min_by_key(|(ip, s)| (s.seen_unix_s, **ip)).map(|(ip, _)| *ip);
            match oldest {
                Some(ip) => e.ips.remove(&ip),
                None => break,
            };
        }
        e.cnames = o.cnames;
        e.last_seen_unix_s = o.now_unix_s;
        e.outcome = o.outcome;
        e.learned |= o.learned;
        while self.entries.len() > MAX_NAMES {
            let oldest = self.entries.iter().min_by_key(|(_, e)| e.last_seen_unix_s).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
        self.dirty = true;
    }

    /// Names under which `local` learned `ip`.
    pub fn names_for(&self, local: u32, ip: IpAddr) -> Vec<&NameEntry> {
        self.entries.values().filter(|e| e.local_id == local && e.learned && e.ips.contains_key(&ip)).collect()
    }

    /// Keep only addresses the kernel still holds for the identity; drop learned names left
    /// with no address (visibility-only names stay until they age out of the bound).
    pub fn retain_learned(&mut self, learned: &BTreeSet<(u32, IpAddr)>) {
        let before: usize = self.entries.values().map(|e| e.ips.len()).sum::<usize>() + self.entries.len();
        for e in self.entries.values_mut() {
            if e.learned {
                e.ips.retain(|ip, _| learned.contains(&(e.local_id, *ip)));
            }
        }
        self.entries.retain(|_, e| !e.learned || !e.ips.is_empty());
        let after: usize = self.entries.values().map(|e| e.ips.len()).sum::<usize>() + self.entries.len();
        if after != before {
            self.dirty = true;
        }
    }

    /// Write the file if anything changed (write beside, then rename: never half a file).
    pub fn save_if_dirty(&mut self) -> Result<()> {
        if self.dirty {
            self.save()?;
        }
        Ok(())
    }

    pub fn save(&mut self) -> Result<()> {
        let f = File { version: 1, names: self.entries.values().cloned().collect() };
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&f)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming to {}", self.path.display()))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(id: u32, name: &str, ips: &[&str], now: u64) -> Observation {
        Observation {
            local_id: id,
            name: name.into(),
            ips: ips.iter().map(|s| (s.parse().unwrap(), 30)).collect(),
            outcome: "learned".into(),
            learned: true,
            now_unix_s: now,
            ..Default::default()
        }
    }

    #[test]
    fn records_names_and_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("zt-fqdn-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fqdn-cache.json");
        let mut c = FqdnCache::load(path.clone());
        c.record(obs(300, "api.example.com", &["10.0.0.1", "fd00::1"], 1));
        c.record(obs(300, "www.example.com", &["10.0.0.1"], 2));
        c.record(obs(301, "api.example.com", &["10.0.0.2"], 3));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let names: Vec<&str> = c.names_for(300, ip).iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["api.example.com", "www.example.com"]);
        assert!(c.names_for(301, ip).is_empty(), "names are per identity");
        c.save_if_dirty().unwrap();
        let back = FqdnCache::read(&path).unwrap();
        assert_eq!(back.len(), 3);
        // The kernel no longer holds 10.0.0.1 for 300: only fd00::1 keeps a name there.
        let mut c = FqdnCache::load(path);
        c.retain_learned(&[(300, "fd00::1".parse().unwrap()), (301, "10.0.0.2".parse().unwrap())].into_iter().collect());
        assert_eq!(c.len(), 2);
        assert!(c.names_for(300, ip).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bounded_per_name_and_in_names() {
        let mut c = FqdnCache { path: "/nonexistent".into(), ..Default::default() };
        for i in 0..(MAX_IPS_PER_NAME as u32 + 10) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i).to_string();
            c.record(obs(1, "many.example.com", &[&ip], i as u64));
        }
        let e = c.entries().next().unwrap();
        assert_eq!(e.ips.len(), MAX_IPS_PER_NAME);
        assert!(!e.ips.contains_key(&"10.0.0.0".parse::<IpAddr>().unwrap()), "the oldest address went first");
        for i in 0..(MAX_NAMES + 5) {
            c.record(obs(2, &format!("n{i}.example.com"), &[], 1000 + i as u64));
        }
        assert_eq!(c.len(), MAX_NAMES);
        assert!(c.entries().all(|e| e.name != "many.example.com"), "least recently seen name evicted");
    }

    #[test]
    fn unreadable_file_starts_empty() {
        let path = std::env::temp_dir().join(format!("zt-fqdn-bad-{}.json", std::process::id()));
        std::fs::write(&path, b"{not json").unwrap();
        assert!(FqdnCache::load(path.clone()).is_empty());
        assert!(FqdnCache::read(&path).is_err(), "ztctl says what is wrong");
        std::fs::remove_file(&path).unwrap();
    }
}
