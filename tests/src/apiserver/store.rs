//! The stand-in's object store: the objects of the watched kinds loaded from the test
//! bed's manifest directory, one global resourceVersion counter (like etcd's revision),
//! and a bounded history of change events that watches resume from.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::manifest::{fake_uid, DEFAULT_NODE};

/// A kind the stand-in serves.
#[derive(Debug, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    /// `v1`, `networking.k8s.io/v1`, ...
    pub api_version: &'static str,
    /// URL path segment and counter key (`pods`).
    pub plural: &'static str,
    pub namespaced: bool,
    /// Custom resources keep kind/apiVersion on list items; built-in kinds do not.
    pub custom: bool,
}

/// Every kind zt-agent watches (Namespace first: implicit namespaces are made with it).
pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "Namespace",
        api_version: "v1",
        plural: "namespaces",
        namespaced: false,
        custom: false,
    },
    KindInfo {
        kind: "Pod",
        api_version: "v1",
        plural: "pods",
        namespaced: true,
        custom: false,
    },
    KindInfo {
        kind: "ServiceAccount",
        api_version: "v1",
        plural: "serviceaccounts",
        namespaced: true,
        custom: false,
    },
    KindInfo {
        kind: "Node",
        api_version: "v1",
        plural: "nodes",
        namespaced: false,
        custom: false,
    },
    KindInfo {
        kind: "NetworkPolicy",
        api_version: "networking.k8s.io/v1",
        plural: "networkpolicies",
        namespaced: true,
        custom: false,
    },
    KindInfo {
        kind: "ZeroTrustPolicy",
        api_version: "zt.dev/v1alpha1",
        plural: "zerotrustpolicies",
        namespaced: true,
        custom: true,
    },
    KindInfo {
        kind: "Service",
        api_version: "v1",
        plural: "services",
        namespaced: true,
        custom: false,
    },
    KindInfo {
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        namespaced: true,
        custom: false,
    },
];

pub fn kind_by_plural(api_version: &str, plural: &str) -> Option<&'static KindInfo> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.plural == plural)
}

fn kind_of(api_version: &str, kind: &str) -> Option<&'static KindInfo> {
    KINDS
        .iter()
        .find(|k| k.api_version == api_version && k.kind == kind)
}

/// Namespaces every cluster has, even when no manifest declares them.
const BUILTIN_NAMESPACES: &[&str] = &["default", "kube-system"];

/// Store key: (plural, namespace or "", name). Sorted like etcd keys.
pub type Key = (&'static str, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as watches see it. `old` is the object before the change (for
/// selector transitions: an object that stops matching is DELETED for that watch).
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub plural: &'static str,
    pub typ: EventType,
    pub object: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

struct Stored {
    /// What the manifests said (after defaulting the namespace), to detect changes.
    source: Value,
    /// What the API serves (source + uid, creationTimestamp, resourceVersion, ...).
    object: Arc<Value>,
}

/// Objects, the global resourceVersion and the retained event history.
pub struct Store {
    objects: BTreeMap<Key, Stored>,
    rv: u64,
    history: VecDeque<Arc<Event>>,
    /// A watch may resume from resourceVersion R only if R >= this (every event after
    /// it is retained); older ones get 410 Expired.
    compacted_rv: u64,
    history_cap: usize,
    /// Namespaces made because an object used them (a real cluster has them): they
    /// stay, like real namespaces do, when the objects go away.
    implicit_ns: BTreeSet<String>,
    /// Full snapshots of one resource at one rv, for consistent `continue` pages.
    snapshots: HashMap<(&'static str, u64), Arc<Vec<Arc<Value>>>>,
    snapshot_order: VecDeque<(&'static str, u64)>,
    /// Open watches: id -> resourceVersion up to which they have seen every event.
    watches: HashMap<u64, u64>,
    next_watch: u64,
    /// The last manifest load error (cleared by a good load).
    pub last_error: Option<String>,
}

const SNAPSHOTS_KEPT: usize = 32;

impl Store {
    pub fn new(history_cap: usize) -> Store {
        Store {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            compacted_rv: 0,
            history_cap,
            implicit_ns: BTreeSet::new(),
            snapshots: HashMap::new(),
            snapshot_order: VecDeque::new(),
            watches: HashMap::new(),
            next_watch: 0,
            last_error: None,
        }
    }

    /// The current (latest) resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn compacted_rv(&self) -> u64 {
        self.compacted_rv
    }

    /// Drop the whole event history and open continue snapshots. The global rv moves
    /// on by one first, as writes to other resources would in a real cluster, so that
    /// any watch resuming from a resourceVersion seen so far gets 410 Expired.
    /// Open watches that have seen everything stay open (as with a real watch cache);
    /// ones behind get 410 Expired in their stream.
    pub fn compact(&mut self) {
        for pos in self.watches.values_mut() {
            if *pos == self.rv {
                *pos += 1;
            }
        }
        self.rv += 1;
        self.history.clear();
        self.compacted_rv = self.rv;
        self.snapshots.clear();
        self.snapshot_order.clear();
    }

    /// Current objects of one kind (all namespaces), in key order.
    pub fn list(&self, plural: &'static str) -> Vec<Arc<Value>> {
        self.objects
            .range((plural, String::new(), String::new())..)
            .take_while(|((p, _, _), _)| *p == plural)
            .map(|(_, s)| s.object.clone())
            .collect()
    }

    pub fn get(&self, plural: &'static str, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&(plural, ns.to_string(), name.to_string()))
            .map(|s| s.object.clone())
    }

    /// Remember a list snapshot for `continue` pages; returns it.
    pub fn snapshot(&mut self, plural: &'static str) -> Arc<Vec<Arc<Value>>> {
        let key = (plural, self.rv);
        if let Some(s) = self.snapshots.get(&key) {
            return s.clone();
        }
        let s = Arc::new(self.list(plural));
        self.snapshots.insert(key, s.clone());
        self.snapshot_order.push_back(key);
        while self.snapshot_order.len() > SNAPSHOTS_KEPT {
            if let Some(k) = self.snapshot_order.pop_front() {
                self.snapshots.remove(&k);
            }
        }
        s
    }

    pub fn snapshot_at(&self, plural: &'static str, rv: u64) -> Option<Arc<Vec<Arc<Value>>>> {
        self.snapshots.get(&(plural, rv)).cloned()
    }

    /// Register an open watch positioned at `rv`; returns its id.
    pub fn add_watch(&mut self, rv: u64) -> u64 {
        self.next_watch += 1;
        self.watches.insert(self.next_watch, rv);
        self.next_watch
    }

    pub fn watch_position(&self, id: u64) -> u64 {
        self.watches.get(&id).copied().unwrap_or(0)
    }

    pub fn set_watch_position(&mut self, id: u64, rv: u64) {
        self.watches.insert(id, rv);
    }

    pub fn remove_watch(&mut self, id: u64) {
        self.watches.remove(&id);
    }

    /// Number of open watch streams.
    pub fn open_watches(&self) -> usize {
        self.watches.len()
    }

    /// Events of every kind with rv > `after`, or Err if some were compacted away.
    pub fn events_after(&self, after: u64) -> Result<Vec<Arc<Event>>, u64> {
        if after < self.compacted_rv {
            return Err(self.compacted_rv);
        }
        // History is in rv order; skip from the back.
        let n = self
            .history
            .iter()
            .rev()
            .take_while(|e| e.rv > after)
            .count();
        Ok(self
            .history
            .iter()
            .skip(self.history.len() - n)
            .cloned()
            .collect())
    }

    /// Make the store hold exactly `desired` (from the manifests), recording one
    /// event per change. Returns the number of events.
    pub fn apply(&mut self, desired: Vec<Value>, now: SystemTime) -> usize {
        let mut want: BTreeMap<Key, (&'static KindInfo, Value)> = BTreeMap::new();
        for src in desired {
            let k = kind_of(str_at(&src, "apiVersion"), str_at(&src, "kind"))
                .expect("loader keeps only known kinds");
            let key = key_of(k, &src);
            want.insert(key, (k, src));
        }
        // Namespaces used by namespaced objects exist in a real cluster.
        for (p, ns, _) in want.keys() {
            if *p != "namespaces" && !ns.is_empty() {
                self.implicit_ns.insert(ns.clone());
            }
        }
        self.implicit_ns
            .extend(BUILTIN_NAMESPACES.iter().map(|s| s.to_string()));
        let ns_kind = &KINDS[0];
        for ns in &self.implicit_ns {
            let key: Key = ("namespaces", String::new(), ns.clone());
            want.entry(key).or_insert_with(|| {
                (
                    ns_kind,
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                )
            });
        }

        let mut events = 0;
        let gone: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            let old = self.objects.remove(&key).expect("present").object;
            self.rv += 1;
            let mut obj = (*old).clone();
            set_rv(&mut obj, self.rv);
            self.record(key.0, EventType::Deleted, Arc::new(obj), Some(old));
            events += 1;
        }
        for (key, (kind, src)) in want {
            let prev = self.objects.get(&key);
            if prev.is_some_and(|p| p.source == src) {
                continue;
            }
            self.rv += 1;
            let created = prev
                .and_then(|p| p.object.pointer("/metadata/creationTimestamp").cloned())
                .unwrap_or_else(|| Value::String(rfc3339(now)));
            let uid = prev
                .and_then(|p| p.object.pointer("/metadata/uid").cloned())
                .filter(|_| src.pointer("/metadata/uid").is_none());
            // metadata.generation moves on when the spec changes.
            let generation = prev.map_or(1, |p| {
                let g = p
                    .object
                    .pointer("/metadata/generation")
                    .and_then(Value::as_u64);
                g.unwrap_or(1) + u64::from(p.source.get("spec") != src.get("spec"))
            });
            let kept = Kept {
                created,
                uid,
                generation,
            };
            let obj = Arc::new(server_fill(kind, &src, &key, kept, self.rv));
            let (typ, old) = match prev {
                Some(p) => (EventType::Modified, Some(p.object.clone())),
                None => (EventType::Added, None),
            };
            self.objects.insert(
                key.clone(),
                Stored {
                    source: src,
                    object: obj.clone(),
                },
            );
            self.record(key.0, typ, obj, old);
            events += 1;
        }
        events
    }

    fn record(
        &mut self,
        plural: &'static str,
        typ: EventType,
        object: Arc<Value>,
        old: Option<Arc<Value>>,
    ) {
        self.history.push_back(Arc::new(Event {
            rv: self.rv,
            plural,
            typ,
            object,
            old,
        }));
        while self.history.len() > self.history_cap {
            let e = self.history.pop_front().expect("non-empty");
            self.compacted_rv = e.rv;
        }
    }
}

fn str_at<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or("")
}

fn key_of(k: &'static KindInfo, src: &Value) -> Key {
    let ns = if k.namespaced {
        src.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        String::new()
    };
    let name = src
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    (k.plural, ns, name)
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
}

/// The object as the API serves it: the fields the API server (and, for a pod's
/// node, the scheduler) fill in.
/// Server-set metadata carried over from the previous version of an object.
struct Kept {
    created: Value,
    uid: Option<Value>,
    generation: u64,
}

fn server_fill(k: &KindInfo, src: &Value, key: &Key, kept: Kept, rv: u64) -> Value {
    let Kept {
        created,
        uid,
        generation,
    } = kept;
    let mut obj = src.clone();
    let (_, ns, name) = key;
    let meta = obj
        .as_object_mut()
        .expect("loader keeps only mappings")
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .expect("loader checked metadata");
    if !meta.contains_key("uid") {
        // Pods get the uid the test bed uses for their cgroup (pod<uid>).
        let uid = uid.unwrap_or_else(|| {
            Value::String(if k.plural == "pods" {
                fake_uid(ns, name)
            } else {
                fake_uid(ns, &format!("{}/{name}", k.plural))
            })
        });
        meta.insert("uid".into(), uid);
    }
    meta.insert("creationTimestamp".into(), created);
    meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    if matches!(k.kind, "Pod" | "NetworkPolicy" | "ZeroTrustPolicy") {
        meta.insert("generation".into(), Value::from(generation));
    }
    match k.kind {
        "Namespace" => {
            let labels = meta
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(l) = labels.as_object_mut() {
                l.insert(
                    "kubernetes.io/metadata.name".into(),
                    Value::String(name.clone()),
                );
            }
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        "Pod" => {
            if obj.pointer("/spec/nodeName").is_none() {
                if let Some(spec) = obj
                    .as_object_mut()
                    .expect("mapping")
                    .entry("spec")
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                {
                    spec.insert("nodeName".into(), Value::String(DEFAULT_NODE.into()));
                }
            }
            // status.podIP and status.podIPs[0] are always the same address.
            if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
                let first = st
                    .get("podIPs")
                    .and_then(|v| v.get(0))
                    .and_then(|v| v.get("ip"))
                    .cloned();
                match (st.get("podIP").cloned(), first) {
                    (None, Some(ip)) => {
                        st.insert("podIP".into(), ip);
                    }
                    (Some(ip), None) => {
                        st.insert("podIPs".into(), json!([{"ip": ip}]));
                    }
                    _ => {}
                }
            }
        }
        "Service" => default_service(&mut obj),
        "EndpointSlice" => {
            // Ports default to TCP.
            for p in obj.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                if let Some(p) = p.as_object_mut() {
                    p.entry("protocol").or_insert_with(|| json!("TCP"));
                }
            }
        }
        _ => {}
    }
    obj
}

/// What the API server defaults in a Service (it also allocates a clusterIP and node
/// ports; the stand-in does not, so that a manifest means the same to the directory
/// source and to the agent watching the stand-in: a manifest names them).
fn default_service(obj: &mut Value) {
    let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let ty = spec
        .entry("type")
        .or_insert_with(|| json!("ClusterIP"))
        .as_str()
        .unwrap_or("")
        .to_string();
    if ty == "ExternalName" {
        return;
    }
    spec.entry("sessionAffinity").or_insert_with(|| json!("None"));
    spec.entry("internalTrafficPolicy").or_insert_with(|| json!("Cluster"));
    if ty == "NodePort" || ty == "LoadBalancer" {
        spec.entry("externalTrafficPolicy").or_insert_with(|| json!("Cluster"));
    }
    let cluster_ip = spec.get("clusterIP").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string);
    if let Some(ip) = cluster_ip {
        spec.entry("clusterIPs").or_insert_with(|| json!([ip]));
    }
    if spec.get("sessionAffinity").and_then(Value::as_str) == Some("ClientIP") {
        let cfg = spec.entry("sessionAffinityConfig").or_insert_with(|| json!({}));
        if let Some(cfg) = cfg.as_object_mut() {
            let client = cfg.entry("clientIP").or_insert_with(|| json!({}));
            if let Some(client) = client.as_object_mut() {
                client.entry("timeoutSeconds").or_insert_with(|| json!(10800));
            }
        }
    }
    for p in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
        let Some(p) = p.as_object_mut() else { continue };
        p.entry("protocol").or_insert_with(|| json!("TCP"));
        if let Some(port) = p.get("port").cloned() {
            p.entry("targetPort").or_insert(port);
        }
    }
}

/// `2026-11-24T11:44:06Z` (the API's RFC 3339 form, seconds precision).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, sod) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Read the objects of the served kinds from `dir` with the directory source's file
/// rules: `*.yaml`/`*.yml` files directly in `dir` (hidden names skipped), in name
/// order, multi-document, `kind: List` expanded; other kinds ignored. All or nothing:
/// any error (bad YAML, missing name, duplicate object) fails the whole load.
pub fn load_dir(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if (name.ends_with(".yaml") || name.ends_with(".yml"))
            && !name.starts_with('.')
            && path.is_file()
        {
            files.push(path);
        }
    }
    files.sort();
    let mut out = vec![];
    let mut seen: BTreeMap<Key, String> = BTreeMap::new();
    for f in files {
        let label = f
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let loc = format!("{label} doc {}", i + 1);
            let v =
                serde_yaml::Value::deserialize(doc).with_context(|| format!("{loc}: bad YAML"))?;
            let v: Value =
                serde_json::to_value(v).with_context(|| format!("{loc}: not JSON-compatible"))?;
            collect_objects(v, &loc, &mut out, &mut seen)?;
        }
    }
    Ok(out)
}

fn collect_objects(
    v: Value,
    loc: &str,
    out: &mut Vec<Value>,
    seen: &mut BTreeMap<Key, String>,
) -> Result<()> {
    if v.is_null() {
        return Ok(());
    }
    if !v.is_object() {
        bail!("{loc}: document is not a mapping");
    }
    let kind = str_at(&v, "kind");
    if kind.ends_with("List") {
        if let Some(items) = v.get("items").and_then(Value::as_array) {
            for it in items.clone() {
                collect_objects(it, loc, out, seen)?;
            }
        }
        return Ok(());
    }
    let Some(k) = kind_of(str_at(&v, "apiVersion"), kind) else {
        return Ok(());
    };
    let mut v = v;
    let meta = v
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("{loc}: {} without metadata", k.kind))?;
    match meta.get("name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => {}
        _ => bail!("{loc}: {}: metadata.name missing", k.kind),
    }
    if k.namespaced {
        if meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            meta.insert("namespace".into(), Value::String("default".into()));
        }
    } else {
        // The API server clears the namespace of cluster-scoped objects.
        meta.remove("namespace");
    }
    // Server-owned fields in a manifest are not the user's to set.
    meta.remove("resourceVersion");
    meta.remove("creationTimestamp");
    meta.remove("generation");
    let key = key_of(k, &v);
    if let Some(first) = seen.insert(key.clone(), loc.to_string()) {
        bail!(
            "{loc}: {} {}/{} defined twice (first in {first})",
            k.kind,
            key.1,
            key.2
        );
    }
    out.push(v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, label: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "x", "labels": {"app": label}}})
    }

    #[test]
    fn events_and_resource_versions() {
        let mut s = Store::new(100);
        let t = SystemTime::UNIX_EPOCH;
        // Pod x/a + implicit namespaces default, kube-system, x.
        assert_eq!(s.apply(vec![pod("a", "1")], t), 4);
        let rv1 = s.rv();
        let a = s.get("pods", "x", "a").unwrap();
        assert_eq!(a["metadata"]["uid"], fake_uid("x", "a"));
        assert_eq!(a["spec"]["nodeName"], "node1");
        assert_eq!(a["metadata"]["creationTimestamp"], "1970-01-01T00:00:00Z");
        let ns = s.get("namespaces", "", "x").unwrap();
        assert_eq!(ns["metadata"]["labels"]["kubernetes.io/metadata.name"], "x");
        // Same content: no event.
        assert_eq!(s.apply(vec![pod("a", "1")], t), 0);
        assert_eq!(a["metadata"]["generation"], 1);
        // Modified, then deleted; the implicit namespace stays.
        assert_eq!(s.apply(vec![pod("a", "2")], t), 1);
        assert_eq!(
            s.get("pods", "x", "a").unwrap()["metadata"]["generation"],
            1,
            "labels only"
        );
        let mut with_spec = pod("a", "2");
        with_spec["spec"] = json!({"nodeName": "n2"});
        assert_eq!(s.apply(vec![with_spec], t), 1);
        assert_eq!(
            s.get("pods", "x", "a").unwrap()["metadata"]["generation"],
            2
        );
        assert_eq!(s.apply(vec![pod("a", "2")], t), 1);
        let ev = s.events_after(rv1).unwrap();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].typ, EventType::Modified);
        assert_eq!(
            ev[0].object["metadata"]["resourceVersion"],
            (rv1 + 1).to_string()
        );
        assert_eq!(s.apply(vec![], t), 1);
        let ev = s.events_after(rv1 + 3).unwrap();
        assert_eq!((ev[0].typ, ev[0].plural), (EventType::Deleted, "pods"));
        assert!(s.get("namespaces", "", "x").is_some());
        // Compaction expires every rv seen so far.
        let now = s.rv();
        s.compact();
        assert_eq!(s.events_after(now).unwrap_err(), now + 1);
        assert!(s.events_after(s.rv()).unwrap().is_empty());
    }

    #[test]
    fn services_and_endpoint_slices_get_the_api_defaults() {
        let mut s = Store::new(100);
        let svc = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "x"},
            "spec": {"clusterIP": "10.96.0.5", "sessionAffinity": "ClientIP",
                     "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]}});
        let ext = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ext", "namespace": "x"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"}});
        let es = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"]}]});
        s.apply(vec![svc, ext, es], SystemTime::UNIX_EPOCH);
        let web = s.get("services", "x", "web").unwrap();
        assert_eq!(web["spec"]["type"], "ClusterIP");
        assert_eq!(web["spec"]["clusterIPs"], json!(["10.96.0.5"]));
        assert_eq!(web["spec"]["internalTrafficPolicy"], "Cluster");
        assert_eq!(web["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 10800);
        assert_eq!(web["spec"]["ports"][0]["protocol"], "TCP");
        assert_eq!(web["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(web["spec"]["ports"][1]["targetPort"], "dns");
        assert_eq!(web["metadata"]["uid"], fake_uid("x", "services/web"));
        let ext = s.get("services", "x", "ext").unwrap();
        assert!(ext["spec"].get("clusterIPs").is_none() && ext["spec"].get("sessionAffinity").is_none());
        let es = s.get("endpointslices", "x", "web-1").unwrap();
        assert_eq!(es["ports"][0]["protocol"], "TCP");
        assert_eq!(es["endpoints"][0]["addresses"][0], "10.0.0.1");
    }

    #[test]
    fn bounded_history_expires_old_versions() {
        let mut s = Store::new(2);
        let t = SystemTime::UNIX_EPOCH;
        s.apply(vec![pod("a", "0")], t);
        let start = s.rv();
        for i in 1..=3 {
            s.apply(vec![pod("a", &i.to_string())], t);
        }
        assert!(s.events_after(start).is_err());
        assert_eq!(s.events_after(start + 1).unwrap().len(), 2);
    }

    #[test]
    fn rfc3339_dates() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_520_646);
        assert_eq!(rfc3339(t), "2026-11-24T11:44:06Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn load_rejects_duplicates_and_nameless() {
        let d = std::env::temp_dir().join(format!("zt-apiserver-store-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("a.yaml");
        std::fs::write(&p, "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\nkind: ConfigMap\napiVersion: v1\nmetadata: {name: s}\n").unwrap();
        let v = load_dir(&d).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["metadata"]["namespace"], "default");
        std::fs::write(
            d.join("b.yml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: default}\n",
        )
        .unwrap();
        let e = load_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("b.yml doc 1: Pod default/a defined twice (first in a.yaml doc 1)"),
            "{e}"
        );
        std::fs::write(
            d.join("b.yml"),
            "apiVersion: v1\nkind: Node\nmetadata: {labels: {}}\n",
        )
        .unwrap();
        let e = load_dir(&d).unwrap_err().to_string();
        assert!(
            e.contains("b.yml doc 1: Node: metadata.name missing"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
