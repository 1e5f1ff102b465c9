//! The manifest-directory source: every `*.yaml`/`*.yml` file of one directory
//! (not recursive; hidden names skipped, so a mounted ConfigMap's `..data` links
//! are read once through their visible names), multi-document, `kind: List`
//! expanded. Loading is all-or-nothing: any error fails the whole load and the
//! caller keeps its last good state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

use super::error::{FieldError, SourceError};
use super::ztp::{ZTP_API_VERSION, ZTP_KIND};
use super::{ClusterObject, ClusterState, ObjectKind};

/// An object of a kind the agent does not use (the agent logs these).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IgnoredObject {
    /// `file.yaml doc 3`.
    pub location: String,
    pub api_version: String,
    pub kind: String,
    /// `ns/name` or `name` when the object has one.
    pub name: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct LoadedDir {
    pub state: ClusterState,
    pub ignored: Vec<IgnoredObject>,
}

impl ClusterState {
    /// Load every manifest of `dir`. Files are read in name order.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<LoadedDir, SourceError> {
        let dir = dir.as_ref();
        let io =
            |p: &Path, e: std::io::Error| SourceError::at(p.display().to_string(), e.to_string());
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            if yaml && !name.starts_with('.') && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut out = LoadedDir::default();
        // Where each object was first defined, to reject duplicates.
        let mut seen: BTreeMap<(ObjectKind, String, String), String> = BTreeMap::new();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            let label = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for (location, obj) in parse_manifests(&label, &text, &mut out.ignored)? {
                let (ns, name) = obj.key();
                if let Some(first) = seen.insert((obj.kind(), ns, name), location.clone()) {
                    return Err(SourceError {
                        location,
                        object: Some(obj.describe()),
                        field: None,
                        message: format!("duplicate object (first defined in {first})"),
                    });
                }
                out.state.upsert(obj);
            }
        }
        Ok(out)
    }
}

/// Parse the documents of one file (`label` names it in errors), normalize and
/// validate each object. Returns each object with its location.
pub fn parse_manifests(
    label: &str,
    text: &str,
    ignored: &mut Vec<IgnoredObject>,
) -> Result<Vec<(String, ClusterObject)>, SourceError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let location = format!("{label} doc {}", i + 1);
        let value =
            Value::deserialize(doc).map_err(|e| SourceError::at(&location, e.to_string()))?;
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        parse_value(&location, value, &mut out, ignored)?;
    }
    Ok(out)
}

fn parse_value(
    location: &str,
    value: Value,
    out: &mut Vec<(String, ClusterObject)>,
    ignored: &mut Vec<IgnoredObject>,
) -> Result<(), SourceError> {
    if !value.is_mapping() {
        return Err(SourceError::at(location, "document is not a mapping"));
    }
    let field = |f: &str| value.get(f).and_then(Value::as_str).map(str::to_string);
    let api_version = field("apiVersion").ok_or_else(|| SourceError {
        field: Some("apiVersion".into()),
        ..SourceError::at(location, "missing")
    })?;
    let kind = field("kind").ok_or_else(|| SourceError {
        field: Some("kind".into()),
        ..SourceError::at(location, "missing")
    })?;

    let kind_of = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Some(ObjectKind::Namespace),
        ("v1", "ServiceAccount") => Some(ObjectKind::ServiceAccount),
        ("v1", "Pod") => Some(ObjectKind::Pod),
        ("v1", "Node") => Some(ObjectKind::Node),
        ("v1", "Service") => Some(ObjectKind::Service),
        ("discovery.k8s.io/v1", "EndpointSlice") => Some(ObjectKind::EndpointSlice),
        ("networking.k8s.io/v1", "NetworkPolicy") => Some(ObjectKind::NetworkPolicy),
        (ZTP_API_VERSION, ZTP_KIND) => Some(ObjectKind::ZeroTrustPolicy),
        _ => None,
    };
    let Some(k) = kind_of else {
        // `kind: List` (and typed lists such as PodList) hold objects in `items`.
        if kind.ends_with("List") {
            if let Some(items) = value.get("items") {
                let Some(items) = items.as_sequence() else {
                    let err = FieldError::new("items", "must be a list");
                    return Err(SourceError::object(location, kind, err));
                };
                for (j, item) in items.iter().enumerate() {
                    parse_value(
                        &format!("{location} items[{j}]"),
                        item.clone(),
                        out,
                        ignored,
                    )?;
                }
                return Ok(());
            }
        }
        ignored.push(IgnoredObject {
            location: location.to_string(),
            name: meta_name(&value).map(|(ns, n)| {
                if ns.is_empty() {
                    n
                } else {
                    format!("{ns}/{n}")
                }
            }),
            api_version,
            kind,
        });
        return Ok(());
    };

    // Name the object in errors even when it fails to deserialize.
    let (ns, name) = meta_name(&value).unwrap_or_default();
    let ns = if k.namespaced() && ns.is_empty() {
        "default".to_string()
    } else {
        ns
    };
    let describe = k.describe(&ns, if name.is_empty() { "<unnamed>" } else { &name });
    let mut obj = match k {
        ObjectKind::Namespace => ClusterObject::Namespace(typed(location, &describe, value)?),
        ObjectKind::ServiceAccount => {
            ClusterObject::ServiceAccount(typed(location, &describe, value)?)
        }
        ObjectKind::Pod => ClusterObject::Pod(typed(location, &describe, value)?),
        ObjectKind::Node => ClusterObject::Node(typed(location, &describe, value)?),
        ObjectKind::NetworkPolicy => {
            ClusterObject::NetworkPolicy(typed(location, &describe, value)?)
        }
        ObjectKind::ZeroTrustPolicy => {
            ClusterObject::ZeroTrustPolicy(typed(location, &describe, value)?)
        }
        ObjectKind::Service => ClusterObject::Service(typed(location, &describe, value)?),
        ObjectKind::EndpointSlice => {
            ClusterObject::EndpointSlice(typed(location, &describe, value)?)
        }
    };
    obj.normalize_and_validate()
        .map_err(|e| SourceError::object(location, &describe, e))?;
    out.push((location.to_string(), obj));
    Ok(())
}

fn meta_name(value: &Value) -> Option<(String, String)> {
    let meta = value.get("metadata")?;
    let s = |f: &str| {
        meta.get(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    Some((s("namespace"), s("name")))
}

/// Deserialize with the path of the failing field in the error.
fn typed<T: DeserializeOwned>(
    location: &str,
    describe: &str,
    value: Value,
) -> Result<T, SourceError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        SourceError::object(
            location,
            describe,
            FieldError::new(path, e.inner().to_string()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory holding the given files.
    fn dir_with(files: &[(&str, &str)]) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "zt-source-dir-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for (name, text) in files {
            std::fs::write(d.join(name), text).unwrap();
        }
        d
    }

    fn load_err(files: &[(&str, &str)]) -> String {
        let d = dir_with(files);
        let r = ClusterState::load_dir(&d);
        std::fs::remove_dir_all(&d).unwrap();
        r.unwrap_err().to_string()
    }

    const NP_HEAD: &str =
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: allow-x}\n";

    #[test]
    fn loads_fixture_dir() {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/basic");
        let l = ClusterState::load_dir(&d).unwrap();
        let s = &l.state;
        assert!(s.namespaces.contains_key("prod"));
        assert!(s.pods.contains_key(&("default".into(), "httpbin".into())));
        assert!(s.pods.contains_key(&("default".into(), "sleep".into())));
        assert!(s.pods.contains_key(&("prod".into(), "api".into())));
        assert!(s
            .service_accounts
            .contains_key(&("default".into(), "httpbin".into())));
        assert!(s
            .network_policies
            .contains_key(&("default".into(), "allow-sleep".into())));
        assert!(s
            .zero_trust_policies
            .contains_key(&("default".into(), "httpbin".into())));
        // The ConfigMap is reported, not loaded; the List's items were expanded.
        assert_eq!(l.ignored.len(), 1);
        assert_eq!(l.ignored[0].kind, "ConfigMap");
        assert_eq!(l.ignored[0].name.as_deref(), Some("settings"));
        assert!(
            l.ignored[0].location.starts_with("workloads.yaml doc "),
            "{:?}",
            l.ignored[0]
        );
    }

    #[test]
    fn multi_doc_list_and_extensions() {
        let d = dir_with(&[
            (
                "a.yml",
                "---\napiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: ServiceAccount, metadata: {name: s, namespace: a}}\n---\n",
            ),
            ("b.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: c}\n"),
            ("notes.txt", "not: yaml: at all: ["),
            (".hidden.yaml", "garbage: ["),
        ]);
        let l = ClusterState::load_dir(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(
            l.state.namespaces.keys().collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(l
            .state
            .service_accounts
            .contains_key(&("a".into(), "s".into())));
        assert!(l.ignored.is_empty());
    }

    #[test]
    fn namespace_defaults_to_default() {
        let d = dir_with(&[("p.yaml", &format!("{NP_HEAD}spec: {{}}\n"))]);
        let l = ClusterState::load_dir(&d).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert!(l
            .state
            .network_policies
            .contains_key(&("default".into(), "allow-x".into())));
    }

    #[test]
    fn error_messages_name_file_doc_object_field() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{ns}---\n{NP_HEAD}spec:\n  ingress:\n  - ports: [{{port: 80}}, {{port: http, endPort: 90}}]\n"),
                "policies.yaml doc 2: NetworkPolicy default/allow-x: spec.ingress[0].ports[1].port: named port \"http\" cannot have endPort",
            ),
            (
                format!("{NP_HEAD}spec:\n  egress:\n  - ports: [{{protocol: ICMP}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.egress[0].ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/8 is not inside cidr 10.0.0.0/8",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.0.0.0/40}}}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress[0].from[0].ipBlock.cidr: ",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress:\n  - ports: [{{port: 70000}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress[0].ports[0].port: port 70000 out of range 1-65535",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress:\n  - ports: [{{port: 90, endPort: 80}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress[0].ports[0].endPort: endPort 80 is less than port 90",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress:\n  - ports: [{{endPort: 80}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress[0].ports[0].endPort: endPort requires a numeric port",
            ),
            (
                format!("{NP_HEAD}spec:\n  podSelector:\n    matchExpressions: [{{key: app, operator: In}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.podSelector.matchExpressions[0].values: operator In needs at least one value",
            ),
            (
                format!("{NP_HEAD}spec:\n  podSelector:\n    matchExpressions: [{{key: app, operator: Exists, values: [a]}}]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.podSelector.matchExpressions[0].values: operator Exists must not have values",
            ),
            (
                format!("{NP_HEAD}spec:\n  podSelector:\n    matchLabels: {{\"bad key!\": x}}\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.podSelector.matchLabels[\"bad key!\"]: invalid label key",
            ),
            (
                format!("{NP_HEAD}spec:\n  podSelector:\n    matchLabels: {{app: \"a b\"}}\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.podSelector.matchLabels[\"app\"]: invalid label value",
            ),
            (
                format!("{NP_HEAD}spec:\n  policyTypes: [Inbound]\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.policyTypes[0]: unknown policy type",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\nspec: {containers: []}\n".to_string(),
                "policies.yaml doc 1: Pod x/<unnamed>: metadata.name: missing",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.300}\n".to_string(),
                "policies.yaml doc 1: Pod default/p: status.podIP: invalid IP address",
            ),
            (
                format!("{NP_HEAD}spec:\n  ingress: {{}}\n"),
                "policies.yaml doc 1: NetworkPolicy default/allow-x: spec.ingress: invalid type",
            ),
            (
                "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: z, namespace: prod}\nspec:\n  ingress: [{from: [{podSelector: {matchLabel: {a: b}}}]}]\n".to_string(),
                "policies.yaml doc 1: ZeroTrustPolicy prod/z: spec.ingress[0].from[0].podSelector.matchLabel: unknown field `matchLabel`",
            ),
            (
                "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: z}\nspec:\n  egress: [{to: [{fqdn: {matchPattern: \"a*.example.com\"}}]}]\n".to_string(),
                "policies.yaml doc 1: ZeroTrustPolicy default/z: spec.egress[0].to[0].fqdn.matchPattern: \"a*.example.com\": only a leading `*.` label is supported",
            ),
            ("kind: Pod\n".to_string(), "policies.yaml doc 1: apiVersion: missing"),
            ("a: [\n".to_string(), "policies.yaml doc 1: "),
        ];
        for (text, want) in cases {
            let got = load_err(&[("policies.yaml", &text)]);
            assert!(
                got.starts_with(want),
                "\n got: {got}\nwant: {want}...\n{text}"
            );
        }
    }

    #[test]
    fn duplicates_across_files_are_rejected() {
        let np = format!("{NP_HEAD}spec: {{}}\n");
        let got = load_err(&[("a.yaml", &np), ("b.yaml", &np)]);
        assert_eq!(
            got,
            "b.yaml doc 1: NetworkPolicy default/allow-x: duplicate object (first defined in a.yaml doc 1)"
        );
        // Same name, other kind or namespace: fine.
        let d = dir_with(&[
            ("a.yaml", &np),
            (
                "b.yaml",
                &np.replace("{name: allow-x}", "{name: allow-x, namespace: other}"),
            ),
        ]);
        assert!(ClusterState::load_dir(&d).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn all_or_nothing() {
        let good = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
        let bad = format!("{NP_HEAD}spec:\n  ingress:\n  - ports: [{{port: 0}}]\n");
        let d = dir_with(&[("a.yaml", good), ("b.yaml", &bad)]);
        assert!(ClusterState::load_dir(&d).is_err());
        std::fs::remove_dir_all(&d).unwrap();
        assert!(ClusterState::load_dir("/nonexistent/zt-dir")
            .unwrap_err()
            .to_string()
            .starts_with("/nonexistent/zt-dir: "));
    }
}
