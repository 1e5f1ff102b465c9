//! Numeric security identities. A workload identity stands for one SPIFFE ID plus
//! its identity labels (pod labels minus the excluded ones, see `LabelFilter`, and
//! namespace labels keyed `namespace-label:<key>` so selectors can tell the two apart);
//! a CIDR identity for one ipBlock prefix. Numbers are allocated lowest-free and
//! persisted, so that a restarted agent gives every identity the number it had: numbers
//! live in the pinned maps and in tracked flows, which survive the agent. A released
//! number stays quarantined until the maps name it no more (`release_unnamed`), so a
//! new identity never inherits a stale entry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use zt_common::{
    IDENTITY_CIDR_FLAG, IDENTITY_FIRST_WORKLOAD, IDENTITY_HOST, IDENTITY_INIT,
    IDENTITY_REMOTE_NODE, IDENTITY_WORLD,
};

use crate::state::{Cidr, IdentityInfo};

/// Key prefix of namespace labels among identity labels.
pub const NAMESPACE_LABEL_PREFIX: &str = "namespace-label:";

/// Last workload number (the CIDR flag bit starts the next range).
const LAST_WORKLOAD: u32 = IDENTITY_CIDR_FLAG - 1;
const FIRST_CIDR: u32 = IDENTITY_CIDR_FLAG | 1;
const LAST_CIDR: u32 = (IDENTITY_CIDR_FLAG << 1) - 1;
const FILE_VERSION: u32 = 1;

/// The reserved identities, as listed in `Desired::identities`.
pub fn reserved_identities() -> Vec<IdentityInfo> {
    [
        (IDENTITY_HOST, "host"),
        (IDENTITY_WORLD, "world"),
        (IDENTITY_INIT, "init"),
        (IDENTITY_REMOTE_NODE, "remote-node"),
        (zt_common::IDENTITY_DNS, "dns"),
    ]
    .into_iter()
    .map(|(id, name)| IdentityInfo {
        id,
        spiffe_id: format!("reserved:{name}"),
        labels: BTreeMap::new(),
    })
    .collect()
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// Pod labels that controllers set per rollout, per pod or per Job run: in an
/// identity they would give every ReplicaSet, StatefulSet pod and Job run its own
/// identity. A `*` at the end makes a key prefix. (Cilium's default filter leaves out
/// the same per-rollout keys; it also drops every other `kubernetes.io` key, which zt
/// keeps.)
pub const DEFAULT_EXCLUDED_LABELS: &[&str] = &[
    "pod-template-hash",
    "pod-template-generation",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/*",
];

/// Which pod label keys are left out of identities (`--identity-exclude-labels`).
/// Namespace labels are never filtered (they do not change with rollouts, and
/// namespace selectors rely on `kubernetes.io/metadata.name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelFilter {
    /// Exact keys, or prefixes ending in `*`.
    patterns: Vec<String>,
}

impl Default for LabelFilter {
    fn default() -> Self {
        LabelFilter { patterns: DEFAULT_EXCLUDED_LABELS.iter().map(|s| s.to_string()).collect() }
    }
}

impl LabelFilter {
    /// Comma-separated keys or `prefix*`; the entry `default` stands for
    /// DEFAULT_EXCLUDED_LABELS (so `default,example.com/build` extends it); an empty
    /// string excludes nothing.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "default" {
                patterns.extend(DEFAULT_EXCLUDED_LABELS.iter().map(|s| s.to_string()));
                continue;
            }
            let body = item.strip_suffix('*').unwrap_or(item);
            let bad = body.is_empty() || body.contains('*') || !body.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if bad {
                return Err(format!("--identity-exclude-labels: {item:?} is not a label key or a key prefix ending in '*'"));
            }
            patterns.push(item.to_string());
        }
        patterns.sort();
        patterns.dedup();
        Ok(LabelFilter { patterns })
    }

    pub fn excludes(&self, key: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => key.starts_with(prefix),
            None => key == p,
        })
    }

    /// The labels that make an identity.
    pub fn apply(&self, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        labels.iter().filter(|(k, _)| !self.excludes(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

/// Pod labels plus namespace labels under `namespace-label:`.
pub fn identity_labels(
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = pod_labels.clone();
    for (k, v) in namespace_labels {
        out.insert(format!("{NAMESPACE_LABEL_PREFIX}{k}"), v.clone());
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityError(pub String);

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for IdentityError {}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct WorkloadKey {
    spiffe_id: String,
    labels: BTreeMap<String, String>,
}

/// One number space with lowest-free allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Numbers {
    used: BTreeSet<u32>,
    /// No number below this is free (amortises the lowest-free scan).
    hint: u32,
}

impl Numbers {
    fn allocate(&mut self, first: u32, last: u32, what: &str) -> Result<u32, IdentityError> {
        let mut n = self.hint.max(first);
        while self.used.contains(&n) {
            n += 1;
        }
        if n > last {
            return Err(IdentityError(format!(
                "{what} identities exhausted ({first}..={last} all in use)"
            )));
        }
        self.used.insert(n);
        self.hint = n + 1;
        Ok(n)
    }

    fn release(&mut self, n: u32) {
        self.used.remove(&n);
        self.hint = self.hint.min(n);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityAllocator {
    workloads: BTreeMap<WorkloadKey, u32>,
    workload_numbers: Numbers,
    cidrs: BTreeMap<Cidr, u32>,
    cidr_numbers: Numbers,
    /// Released numbers (both kinds) that map entries may still name: still taken in
    /// `*_numbers`, freed by `release_unnamed`.
    quarantined: BTreeSet<u32>,
}

/// On-disk form (JSON).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct File {
    version: u32,
    workloads: Vec<WorkloadRecord>,
    cidrs: Vec<CidrRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    quarantined: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadRecord {
    id: u32,
    spiffe_id: String,
    labels: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CidrRecord {
    id: u32,
    cidr: Cidr,
}

impl IdentityAllocator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Load the persisted numbers; a missing file is an empty allocator (first start).
    /// A corrupt file is an error: the caller decides whether to start afresh.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, IdentityError> {
        let path = path.as_ref();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(e) => return Err(IdentityError(format!("{}: {e}", path.display()))),
        };
        let bad = |m: String| IdentityError(format!("{}: {m}", path.display()));
        let file: File = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if file.version != FILE_VERSION {
            return Err(bad(format!("unsupported version {}", file.version)));
        }
        let mut a = Self::new();
        for w in file.workloads {
            if !(IDENTITY_FIRST_WORKLOAD..=LAST_WORKLOAD).contains(&w.id)
                || !a.workload_numbers.used.insert(w.id)
            {
                return Err(bad(format!(
                    "workload identity {} out of range or duplicate",
                    w.id
                )));
            }
            let key = WorkloadKey {
                spiffe_id: w.spiffe_id,
                labels: w.labels,
            };
            if a.workloads.insert(key, w.id).is_some() {
                return Err(bad(format!(
                    "identity {} duplicates another's SPIFFE ID and labels",
                    w.id
                )));
            }
        }
        for c in file.cidrs {
            if !(FIRST_CIDR..=LAST_CIDR).contains(&c.id) || !a.cidr_numbers.used.insert(c.id) {
                return Err(bad(format!(
                    "CIDR identity {} out of range or duplicate",
                    c.id
                )));
            }
            if a.cidrs.insert(c.cidr, c.id).is_some() {
                return Err(bad(format!(
                    "CIDR identity {} duplicates another's prefix",
                    c.id
                )));
            }
        }
        for n in file.quarantined {
            let numbers = if (IDENTITY_FIRST_WORKLOAD..=LAST_WORKLOAD).contains(&n) {
                &mut a.workload_numbers
            } else if (FIRST_CIDR..=LAST_CIDR).contains(&n) {
                &mut a.cidr_numbers
            } else {
                return Err(bad(format!("quarantined identity {n} out of range")));
            };
            if !numbers.used.insert(n) {
                return Err(bad(format!("identity {n} is both in use and quarantined")));
            }
            a.quarantined.insert(n);
        }
        Ok(a)
    }

    /// Persist atomically: write a temporary file beside `path`, then rename.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), IdentityError> {
        use std::io::Write;
        let path = path.as_ref();
        let file = File {
            version: FILE_VERSION,
            workloads: self
                .workloads
                .iter()
                .map(|(k, id)| WorkloadRecord {
                    id: *id,
                    spiffe_id: k.spiffe_id.clone(),
                    labels: k.labels.clone(),
                })
                .collect(),
            cidrs: self
                .cidrs
                .iter()
                .map(|(c, id)| CidrRecord { id: *id, cidr: *c })
                .collect(),
            quarantined: self.quarantined.iter().copied().collect(),
        };
        let err = |e: std::io::Error| IdentityError(format!("{}: {e}", path.display()));
        let text = serde_json::to_vec_pretty(&file).map_err(|e| IdentityError(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp_name);
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The number of a workload identity, allocating the lowest free one if new.
    pub fn workload(
        &mut self,
        spiffe_id: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<u32, IdentityError> {
        let key = WorkloadKey {
            spiffe_id: spiffe_id.to_string(),
            labels: labels.clone(),
        };
        if let Some(id) = self.workloads.get(&key) {
            return Ok(*id);
        }
        let id =
            self.workload_numbers
                .allocate(IDENTITY_FIRST_WORKLOAD, LAST_WORKLOAD, "workload")?;
        self.workloads.insert(key, id);
        Ok(id)
    }

    /// The number of a CIDR identity (`IDENTITY_CIDR_FLAG | n`), allocating if new.
    pub fn cidr(&mut self, cidr: Cidr) -> Result<u32, IdentityError> {
        if let Some(id) = self.cidrs.get(&cidr) {
            return Ok(*id);
        }
        let id = self.cidr_numbers.allocate(FIRST_CIDR, LAST_CIDR, "CIDR")?;
        self.cidrs.insert(cidr, id);
        Ok(id)
    }

    /// Release every identity not in `keep` (both kinds) into quarantine: the numbers
    /// are not reused until `release_unnamed` finds no map entry naming them.
    pub fn retain(&mut self, keep: &BTreeSet<u32>) {
        let q = &mut self.quarantined;
        self.workloads.retain(|_, id| keep.contains(id) || !q.insert(*id));
        self.cidrs.retain(|_, id| keep.contains(id) || !q.insert(*id));
    }

    /// Frees the quarantined numbers for which `named` is false (no entry of the
    /// pinned maps names them any more); returns them.
    pub fn release_unnamed(&mut self, named: impl Fn(u32) -> bool) -> Vec<u32> {
        let freed: Vec<u32> = self.quarantined.iter().copied().filter(|n| !named(*n)).collect();
        for n in &freed {
            self.quarantined.remove(n);
            if *n & IDENTITY_CIDR_FLAG != 0 {
                self.cidr_numbers.release(*n);
            } else {
                self.workload_numbers.release(*n);
            }
        }
        freed
    }

    pub fn quarantined(&self) -> &BTreeSet<u32> {
        &self.quarantined
    }

    /// Every allocated identity as `IdentityInfo` (CIDR ones as `cidr:<prefix>`).
    pub fn infos(&self) -> BTreeMap<u32, IdentityInfo> {
        let mut out = BTreeMap::new();
        for (k, id) in &self.workloads {
            out.insert(
                *id,
                IdentityInfo {
                    id: *id,
                    spiffe_id: k.spiffe_id.clone(),
                    labels: k.labels.clone(),
                },
            );
        }
        for (c, id) in &self.cidrs {
            let name = format!("cidr:{}", crate::compile::cidr::to_string(c));
            out.insert(
                *id,
                IdentityInfo {
                    id: *id,
                    spiffe_id: name,
                    labels: BTreeMap::new(),
                },
            );
        }
        out
    }

    pub fn len(&self) -> usize {
        self.workloads.len() + self.cidrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::cidr::parse_cidr;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn tmp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("zt-identity-{}-{name}", std::process::id()))
    }

    #[test]
    fn lowest_free_and_stable() {
        let mut a = IdentityAllocator::new();
        let web = a
            .workload("spiffe://td/ns/a/sa/web", &labels(&[("app", "web")]))
            .unwrap();
        let db = a.workload("spiffe://td/ns/a/sa/db", &labels(&[])).unwrap();
        assert_eq!(
            (web, db),
            (IDENTITY_FIRST_WORKLOAD, IDENTITY_FIRST_WORKLOAD + 1)
        );
        // Same SPIFFE ID, other labels: another identity. Same both: same number.
        let web2 = a
            .workload("spiffe://td/ns/a/sa/web", &labels(&[("app", "web2")]))
            .unwrap();
        assert_eq!(web2, IDENTITY_FIRST_WORKLOAD + 2);
        assert_eq!(
            a.workload("spiffe://td/ns/a/sa/web", &labels(&[("app", "web")]))
                .unwrap(),
            web
        );
        // Released numbers are reused lowest first, once no map entry names them.
        a.retain(&[db, web2].into_iter().collect());
        a.release_unnamed(|_| false);
        let x = a.workload("spiffe://td/ns/a/sa/x", &labels(&[])).unwrap();
        assert_eq!(x, IDENTITY_FIRST_WORKLOAD);
        let y = a.workload("spiffe://td/ns/a/sa/y", &labels(&[])).unwrap();
        assert_eq!(y, IDENTITY_FIRST_WORKLOAD + 3);
        let c = a.cidr(parse_cidr("10.0.0.0/8").unwrap()).unwrap();
        assert_eq!(c, IDENTITY_CIDR_FLAG | 1);
        assert_eq!(a.cidr(parse_cidr("10.0.0.0/8").unwrap()).unwrap(), c);
        assert_eq!(
            a.cidr(parse_cidr("fd00::/8").unwrap()).unwrap(),
            IDENTITY_CIDR_FLAG | 2
        );
    }

    #[test]
    fn save_load_roundtrip() {
        let path = tmp_path("roundtrip.json");
        let mut a = IdentityAllocator::new();
        let ids: Vec<u32> = (0..5)
            .map(|i| {
                a.workload(
                    &format!("spiffe://td/ns/a/sa/s{i}"),
                    &labels(&[("i", &i.to_string())]),
                )
                .unwrap()
            })
            .collect();
        let c = a.cidr(parse_cidr("192.168.0.0/16").unwrap()).unwrap();
        a.retain(&[ids[0], ids[2], ids[4], c].into_iter().collect());
        a.release_unnamed(|_| false);
        a.save(&path).unwrap();
        let mut b = IdentityAllocator::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(b.infos(), a.infos());
        // Same keys give the same numbers after the restart; new ones fill the holes.
        assert_eq!(
            b.workload("spiffe://td/ns/a/sa/s2", &labels(&[("i", "2")]))
                .unwrap(),
            ids[2]
        );
        assert_eq!(b.cidr(parse_cidr("192.168.0.0/16").unwrap()).unwrap(), c);
        assert_eq!(
            b.workload("spiffe://td/ns/a/sa/new", &labels(&[])).unwrap(),
            ids[1]
        );
        assert_eq!(b.infos()[&c].spiffe_id, "cidr:192.168.0.0/16");
    }

    #[test]
    fn load_missing_and_corrupt() {
        assert!(IdentityAllocator::load(tmp_path("missing.json"))
            .unwrap()
            .is_empty());
        let path = tmp_path("corrupt.json");
        std::fs::write(
            &path,
            r#"{"version":1,"workloads":[{"id":5,"spiffeId":"x","labels":{}}],"cidrs":[]}"#,
        )
        .unwrap();
        let e = IdentityAllocator::load(&path).unwrap_err();
        assert!(e.0.contains("out of range"), "{e}");
        std::fs::write(&path, "{").unwrap();
        assert!(IdentityAllocator::load(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn reserved_and_labels() {
        let r = reserved_identities();
        assert_eq!(r.len(), 5);
        assert_eq!(r[4].spiffe_id, "reserved:dns");
        assert_eq!(r[0].spiffe_id, "reserved:host");
        assert_eq!(r[3].id, IDENTITY_REMOTE_NODE);
        let l = identity_labels(&labels(&[("app", "x")]), &labels(&[("team", "a")]));
        assert_eq!(l, labels(&[("app", "x"), ("namespace-label:team", "a")]));
        assert_eq!(spiffe_id("td", "ns1", "sa1"), "spiffe://td/ns/ns1/sa/sa1");
    }

    #[test]
    fn released_numbers_stay_quarantined_until_no_entry_names_them() {
        let path = tmp_path("quarantine.json");
        let mut a = IdentityAllocator::new();
        let old = a.workload("spiffe://td/ns/a/sa/old", &labels(&[])).unwrap();
        let cidr = a.cidr(parse_cidr("10.0.0.0/8").unwrap()).unwrap();
        a.retain(&BTreeSet::new());
        assert_eq!(a.quarantined(), &BTreeSet::from([old, cidr]));
        // The maps still name `old`: a new identity must not get its number.
        let new = a.workload("spiffe://td/ns/a/sa/new", &labels(&[])).unwrap();
        assert_ne!(new, old, "a released number is not reused while entries may name it");
        // Quarantine survives a restart.
        a.save(&path).unwrap();
        let mut b = IdentityAllocator::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(b.quarantined(), &BTreeSet::from([old, cidr]));
        assert_eq!(b.release_unnamed(|n| n == old), vec![cidr], "still named: stays");
        assert_eq!(b.cidr(parse_cidr("192.0.2.0/24").unwrap()).unwrap(), cidr, "the unnamed one is free again");
        assert_eq!(b.release_unnamed(|_| false), vec![old]);
        assert_eq!(b.workload("spiffe://td/ns/a/sa/third", &labels(&[])).unwrap(), old);
    }

    #[test]
    fn label_filter_default_parse_and_extend() {
        let f = LabelFilter::default();
        for k in ["pod-template-hash", "controller-revision-hash", "statefulset.kubernetes.io/pod-name", "batch.kubernetes.io/job-name", "job-name", "controller-uid", "apps.kubernetes.io/pod-index"] {
            assert!(f.excludes(k), "{k}");
        }
        for k in ["app", "app.kubernetes.io/name", "version"] {
            assert!(!f.excludes(k), "{k}");
        }
        let l = labels(&[("app", "web"), ("pod-template-hash", "5d8f7"), ("batch.kubernetes.io/controller-uid", "u")]);
        assert_eq!(f.apply(&l), labels(&[("app", "web")]));
        let ext = LabelFilter::parse("default, example.com/build-*").unwrap();
        assert!(ext.excludes("example.com/build-id") && ext.excludes("pod-template-hash"));
        let only = LabelFilter::parse("version").unwrap();
        assert!(only.excludes("version") && !only.excludes("pod-template-hash"));
        assert!(LabelFilter::parse("").unwrap().patterns().is_empty());
        for bad in ["a*b", "*", "key with space", "k=v"] {
            assert!(LabelFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
