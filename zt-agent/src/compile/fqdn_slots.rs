//! FQDN slots: each (local identity, FQDN rule) owns one bit (0..31) of the `slots`
//! masks in ZT_FQDN_NAMES, ZT_FQDN_PORTS and ZT_FQDN_LEARNED. Learned entries live in the
//! kernel across agent restarts, so a slot must mean the same rule after a restart
//! (persisted in `<state-dir>/fqdn-slots.json`), and a slot whose rule went away is only
//! reused once the agent has cleared its bit from ZT_FQDN_LEARNED: a stale bit must
//! never grant a later rule's ports to addresses learned for another name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use zt_common::FQDN_MAX_SLOTS;

const FILE_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FqdnSlots {
    /// (local identity, rule key) -> slot. The rule key names the policy, the rule
    /// and its sorted patterns, so that editing the names of a rule takes a new slot.
    active: BTreeMap<(u32, String), u8>,
    /// Local identity -> slots whose rule is gone but whose bit may still be set in
    /// ZT_FQDN_LEARNED: not reusable until `release_cleared`.
    pending: BTreeMap<u32, u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    version: u32,
    slots: Vec<SlotRecord>,
    pending: Vec<PendingRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SlotRecord {
    identity: u32,
    rule: String,
    slot: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PendingRecord {
    identity: u32,
    mask: u32,
}

impl FqdnSlots {
    pub fn new() -> Self {
        Self::default()
    }

    /// A missing file is an empty table (first start); a corrupt one is an error.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, String> {
        let path = path.as_ref();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = |m: String| format!("{}: {m}", path.display());
        let file: File = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != FILE_VERSION {
            return Err(bad(format!("unsupported version {}", file.version)));
        }
        let mut s = Self::new();
        let mut used: BTreeMap<u32, u32> = BTreeMap::new();
        for r in file.slots {
            let bit = 1u32.checked_shl(u32::from(r.slot)).filter(|_| u32::from(r.slot) < FQDN_MAX_SLOTS);
            let Some(bit) = bit else {
                return Err(bad(format!("slot {} of identity {} out of range", r.slot, r.identity)));
            };
            let u = used.entry(r.identity).or_default();
            if *u & bit != 0 || s.active.insert((r.identity, r.rule), r.slot).is_some() {
                return Err(bad(format!("identity {} has slot {} or its rule twice", r.identity, r.slot)));
            }
            *u |= bit;
        }
        for p in file.pending {
            if used.get(&p.identity).is_some_and(|u| u & p.mask != 0) {
                return Err(bad(format!("identity {} has slots both in use and pending", p.identity)));
            }
            *s.pending.entry(p.identity).or_default() |= p.mask;
        }
        s.pending.retain(|_, m| *m != 0);
        Ok(s)
    }

    /// Persist atomically (temporary file, then rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), String> {
        use std::io::Write;
        let path = path.as_ref();
        let file = File {
            version: FILE_VERSION,
            slots: self
                .active
                .iter()
                .map(|((identity, rule), slot)| SlotRecord { identity: *identity, rule: rule.clone(), slot: *slot })
                .collect(),
            pending: self.pending.iter().map(|(identity, mask)| PendingRecord { identity: *identity, mask: *mask }).collect(),
        };
        let err = |e: std::io::Error| format!("{}: {e}", path.display());
        let text = serde_json::to_vec_pretty(&file).map_err(|e| e.to_string())?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Frees (into pending) every slot whose (identity, rule) is not in `wanted`.
    pub fn retain(&mut self, wanted: &BTreeSet<(u32, String)>) {
        let pending = &mut self.pending;
        self.active.retain(|k, slot| {
            wanted.contains(k) || {
                *pending.entry(k.0).or_default() |= 1 << *slot;
                false
            }
        });
    }

    /// The slot of (identity, rule), allocating the lowest one neither in use nor
    /// pending. None: the identity has no free slot.
    pub fn slot(&mut self, identity: u32, rule: &str) -> Option<u8> {
        if let Some(s) = self.active.get(&(identity, rule.to_string())) {
            return Some(*s);
        }
        let taken = self.used(identity) | self.pending.get(&identity).copied().unwrap_or(0);
        let free = (0..FQDN_MAX_SLOTS).find(|i| taken & (1 << i) == 0)? as u8;
        self.active.insert((identity, rule.to_string()), free);
        Some(free)
    }

    fn used(&self, identity: u32) -> u32 {
        self.active
            .range((identity, String::new())..)
            .take_while(|((id, _), _)| *id == identity)
            .fold(0, |m, (_, s)| m | 1 << *s)
    }

    /// Local identity -> mask of slots in use: every bit a learned entry may keep.
    pub fn active_masks(&self) -> BTreeMap<u32, u32> {
        let mut out: BTreeMap<u32, u32> = BTreeMap::new();
        for ((id, _), s) in &self.active {
            *out.entry(*id).or_default() |= 1 << *s;
        }
        out
    }

    /// Slots waiting for their bits to be cleared from ZT_FQDN_LEARNED.
    pub fn pending(&self) -> &BTreeMap<u32, u32> {
        &self.pending
    }

    /// The agent cleared every bit outside `active_masks()` from ZT_FQDN_LEARNED: the
    /// pending slots can be reused.
    pub fn release_cleared(&mut self) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(keys: &[(u32, &str)]) -> BTreeSet<(u32, String)> {
        keys.iter().map(|(i, r)| (*i, r.to_string())).collect()
    }

    #[test]
    fn lowest_free_stable_and_pending_until_cleared() {
        let mut s = FqdnSlots::new();
        assert_eq!(s.slot(300, "a"), Some(0));
        assert_eq!(s.slot(300, "b"), Some(1));
        assert_eq!(s.slot(301, "a"), Some(0), "slots are per identity");
        assert_eq!(s.slot(300, "a"), Some(0), "stable");
        s.retain(&wanted(&[(300, "b"), (301, "a")]));
        assert_eq!(s.pending(), &BTreeMap::from([(300, 1)]));
        assert_eq!(s.slot(300, "c"), Some(2), "slot 0 is pending: not reused before clearing");
        assert_eq!(s.active_masks(), BTreeMap::from([(300, 0b110), (301, 1)]));
        s.release_cleared();
        assert_eq!(s.slot(300, "d"), Some(0), "reused once cleared");
    }

    #[test]
    fn thirty_two_slots_then_none() {
        let mut s = FqdnSlots::new();
        for i in 0..32 {
            assert_eq!(s.slot(300, &format!("r{i}")), Some(i as u8));
        }
        assert_eq!(s.slot(300, "r32"), None);
        assert_eq!(s.slot(301, "r32"), Some(0));
    }

    #[test]
    fn save_load_roundtrip_and_corrupt() {
        let dir = std::env::temp_dir().join(format!("zt-fqdn-slots-{}", std::process::id()));
        let path = dir.join("fqdn-slots.json");
        let mut s = FqdnSlots::new();
        s.slot(300, "a");
        s.slot(300, "b");
        s.retain(&wanted(&[(300, "b")]));
        s.save(&path).unwrap();
        let mut l = FqdnSlots::load(&path).unwrap();
        assert_eq!(l, s);
        assert_eq!(l.slot(300, "b"), Some(1));
        assert_eq!(l.slot(300, "c"), Some(2));
        std::fs::write(&path, r#"{"version":1,"slots":[{"identity":1,"rule":"x","slot":32}],"pending":[]}"#).unwrap();
        assert!(FqdnSlots::load(&path).unwrap_err().contains("out of range"));
        std::fs::write(&path, r#"{"version":1,"slots":[{"identity":1,"rule":"x","slot":3}],"pending":[{"identity":1,"mask":8}]}"#).unwrap();
        assert!(FqdnSlots::load(&path).unwrap_err().contains("pending"));
        assert!(FqdnSlots::load(dir.join("missing.json")).unwrap().active_masks().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
