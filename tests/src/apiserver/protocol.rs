//! The Kubernetes API's request and response shapes, without I/O: URL routing,
//! query parameters, label/field selectors, `Status` errors, list pages and
//! `continue` tokens.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Value};

use super::store::{kind_by_plural, KindInfo, KINDS};

/// A `Status` failure as the API returns it (body and HTTP code).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// What a request asks for.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// A collection; `namespace` None = all namespaces (or a cluster-scoped kind).
    Collection {
        kind: &'static KindInfo,
        namespace: Option<String>,
    },
    Object {
        kind: &'static KindInfo,
        namespace: Option<String>,
        name: String,
    },
    Version,
    /// A discovery document (`/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`).
    Discovery(Value),
}

/// Map a URL path to a route (404 for anything the stand-in does not serve).
pub fn route(path: &str) -> Result<Route, ApiError> {
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    };
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segs == ["version"] {
        return Ok(Route::Version);
    }
    if let Some(d) = discovery(&segs) {
        return Ok(Route::Discovery(d));
    }
    let (api_version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return Err(not_found()),
    };
    let kind = |plural: &str| kind_by_plural(&api_version, plural).ok_or_else(not_found);
    match rest {
        [plural] => Ok(Route::Collection {
            kind: kind(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => {
            let k = kind(plural)?;
            if !k.namespaced {
                return Err(not_found());
            }
            Ok(Route::Collection {
                kind: k,
                namespace: Some(ns.to_string()),
            })
        }
        ["namespaces", ns, plural, name] => {
            let k = kind(plural)?;
            if !k.namespaced {
                return Err(not_found());
            }
            Ok(Route::Object {
                kind: k,
                namespace: Some(ns.to_string()),
                name: name.to_string(),
            })
        }
        [plural, name] => {
            let k = kind(plural)?;
            if k.namespaced {
                return Err(not_found());
            }
            Ok(Route::Object {
                kind: k,
                namespace: None,
                name: name.to_string(),
            })
        }
        _ => Err(not_found()),
    }
}

/// The discovery documents of the served groups (for clients that check that a
/// resource, e.g. the ZeroTrustPolicy CRD, is installed).
fn discovery(segs: &[&str]) -> Option<Value> {
    let groups = ["discovery.k8s.io/v1", "networking.k8s.io/v1", "zt.dev/v1alpha1"];
    let resources = |gv: &str| {
        let rs: Vec<Value> = KINDS
            .iter()
            .filter(|k| k.api_version == gv)
            .map(|k| {
                json!({"name": k.plural, "singularName": k.kind.to_ascii_lowercase(),
                       "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "list", "watch"]})
            })
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
    };
    match segs {
        ["api"] => Some(
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["api", "v1"] => Some(resources("v1")),
        ["apis"] => {
            let gs: Vec<Value> = groups
                .iter()
                .map(|gv| {
                    let (g, v) = gv.split_once('/').expect("group/version");
                    let ver = json!({"groupVersion": gv, "version": v});
                    json!({"name": g, "versions": [ver.clone()], "preferredVersion": ver})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": gs}))
        }
        ["apis", g, v] if groups.contains(&format!("{g}/{v}").as_str()) => {
            Some(resources(&format!("{g}/{v}")))
        }
        _ => None,
    }
}

/// Decode an `application/x-www-form-urlencoded` query string.
pub fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (unescape(k), unescape(v))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The list/watch parameters the stand-in understands. Unknown selectors are
/// rejected, never silently ignored.
#[derive(Debug, Default)]
pub struct Params {
    pub watch: bool,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
    pub timeout_seconds: Option<u64>,
    pub allow_bookmarks: bool,
    pub send_initial_events: bool,
    pub labels: Vec<Requirement>,
    pub fields: Vec<Requirement>,
}

/// One selector term.
#[derive(Debug, Clone, PartialEq)]
pub enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

fn truthy(v: &str) -> bool {
    matches!(v, "true" | "1")
}

impl Params {
    pub fn parse(q: &BTreeMap<String, String>, kind: &KindInfo) -> Result<Params, ApiError> {
        let num = |name: &str| -> Result<Option<u64>, ApiError> {
            q.get(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| ApiError::bad_request(format!("{name}: invalid value {v:?}")))
                })
                .transpose()
        };
        let p = Params {
            watch: q.get("watch").is_some_and(|v| truthy(v)),
            resource_version: q.get("resourceVersion").filter(|v| !v.is_empty()).cloned(),
            resource_version_match: q
                .get("resourceVersionMatch")
                .filter(|v| !v.is_empty())
                .cloned(),
            limit: num("limit")?.filter(|&l| l > 0).map(|l| l as usize),
            continue_token: q.get("continue").filter(|v| !v.is_empty()).cloned(),
            timeout_seconds: num("timeoutSeconds")?,
            allow_bookmarks: q.get("allowWatchBookmarks").is_some_and(|v| truthy(v)),
            send_initial_events: q.get("sendInitialEvents").is_some_and(|v| truthy(v)),
            labels: parse_selector(
                q.get("labelSelector").map(String::as_str).unwrap_or(""),
                "labelSelector",
            )?,
            fields: parse_selector(
                q.get("fieldSelector").map(String::as_str).unwrap_or(""),
                "fieldSelector",
            )?,
        };
        for r in &p.fields {
            let (Requirement::Eq(f, _) | Requirement::NotEq(f, _)) = r else {
                return Err(ApiError::bad_request(format!(
                    "fieldSelector: invalid selector {r:?}: only =, ==, != are supported"
                )));
            };
            if !field_supported(kind, f) {
                return Err(ApiError::bad_request(format!(
                    "fieldSelector: field label not supported: {f}"
                )));
            }
        }
        if let Some(m) = &p.resource_version_match {
            if !matches!(m.as_str(), "NotOlderThan" | "Exact") {
                return Err(ApiError::bad_request(format!(
                    "resourceVersionMatch: unsupported value {m:?}"
                )));
            }
            if p.resource_version.is_none() {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
        }
        if p.send_initial_events && !p.watch {
            return Err(ApiError::bad_request(
                "sendInitialEvents is forbidden for list",
            ));
        }
        if p.send_initial_events && p.resource_version_match.as_deref() != Some("NotOlderThan") {
            return Err(ApiError::bad_request(
                "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
            ));
        }
        if p.continue_token.is_some() && p.resource_version.as_deref().is_some_and(|rv| rv != "0") {
            return Err(ApiError::bad_request(
                "specifying resource version is not allowed when using continue",
            ));
        }
        Ok(p)
    }

    /// True if the object matches the label and field selectors.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let field = |f: &str| {
            let ptr = format!("/{}", f.replace('.', "/"));
            match obj.pointer(&ptr) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(v) if !v.is_null() => v.to_string(),
                _ => String::new(),
            }
        };
        self.labels.iter().all(|r| match r {
            Requirement::Eq(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::NotExists(k) => label(k).is_none(),
        }) && self.fields.iter().all(|r| match r {
            Requirement::Eq(f, v) => field(f) == *v,
            Requirement::NotEq(f, v) => field(f) != *v,
            _ => false,
        })
    }
}

/// Fields the real API server indexes for these kinds (others get 400).
fn field_supported(kind: &KindInfo, f: &str) -> bool {
    matches!(f, "metadata.name" | "metadata.namespace")
        || (kind.kind == "Pod"
            && matches!(
                f,
                "spec.nodeName"
                    | "spec.serviceAccountName"
                    | "spec.restartPolicy"
                    | "spec.schedulerName"
                    | "status.phase"
                    | "status.podIP"
                    | "status.nominatedNodeName"
            ))
        || (kind.kind == "Namespace" && f == "status.phase")
        || (kind.kind == "Service" && matches!(f, "spec.clusterIP" | "spec.type"))
}

/// Equality-based selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, comma-separated.
/// Set-based terms (`in`, `notin`) are rejected with an error naming `param`.
pub fn parse_selector(s: &str, param: &str) -> Result<Vec<Requirement>, ApiError> {
    let mut out = vec![];
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let bad = || {
            ApiError::bad_request(format!(
                "{param}: unsupported selector term {term:?} (the stand-in supports =, ==, !=, key, !key)"
            ))
        };
        if term.contains('(') || term.contains(' ') {
            return Err(bad());
        }
        let r = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEq(k.into(), v.into())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Eq(k.into(), v.into())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Eq(k.into(), v.into())
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.into())
        } else {
            Requirement::Exists(term.into())
        };
        let key = match &r {
            Requirement::Eq(k, _)
            | Requirement::NotEq(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if key.is_empty() || key.contains(['=', '!', '<', '>']) {
            return Err(bad());
        }
        out.push(r);
    }
    Ok(out)
}

/// A `continue` token: the snapshot rv and the last key served.
pub fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    let raw = json!({"v": "zt-standin/1", "rv": rv, "start": format!("{ns}/{name}")});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.to_string())
}

pub fn decode_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue: invalid token {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    Ok((rv, start.to_string()))
}

/// `ns/name` of an object (ns empty for cluster-scoped).
pub fn object_key(obj: &Value) -> String {
    let s = |p: &str| {
        obj.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    format!("{}/{}", s("/metadata/namespace"), s("/metadata/name"))
}

/// A list item as the real API serves it: built-in kinds without kind/apiVersion.
pub fn list_item(kind: &KindInfo, obj: &Value) -> Value {
    let mut o = obj.clone();
    if !kind.custom {
        if let Some(m) = o.as_object_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
    }
    o
}

/// A BOOKMARK event's object: only kind, apiVersion and metadata.resourceVersion
/// (plus the initial-events-end annotation after a streaming list).
pub fn bookmark(kind: &KindInfo, rv: u64, initial_end: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let pods = kind_by_plural("v1", "pods").unwrap();
        assert_eq!(
            route("/api/v1/pods").unwrap(),
            Route::Collection {
                kind: pods,
                namespace: None
            }
        );
        assert_eq!(
            route("/api/v1/namespaces/x/pods/a").unwrap(),
            Route::Object {
                kind: pods,
                namespace: Some("x".into()),
                name: "a".into()
            }
        );
        let ns = kind_by_plural("v1", "namespaces").unwrap();
        assert_eq!(
            route("/api/v1/namespaces/x").unwrap(),
            Route::Object {
                kind: ns,
                namespace: None,
                name: "x".into()
            }
        );
        let np = kind_by_plural("networking.k8s.io/v1", "networkpolicies").unwrap();
        assert_eq!(
            route("/apis/networking.k8s.io/v1/namespaces/y/networkpolicies").unwrap(),
            Route::Collection {
                kind: np,
                namespace: Some("y".into())
            }
        );
        assert!(route("/apis/zt.dev/v1alpha1/zerotrustpolicies").is_ok());
        let svc = kind_by_plural("v1", "services").unwrap();
        assert_eq!(
            route("/api/v1/namespaces/x/services/web").unwrap(),
            Route::Object {
                kind: svc,
                namespace: Some("x".into()),
                name: "web".into()
            }
        );
        assert!(route("/apis/discovery.k8s.io/v1/endpointslices").is_ok());
        assert!(route("/apis/discovery.k8s.io/v1").is_ok());
        for p in [
            "/api/v1/configmaps",
            "/api/v1/endpoints",
            "/apis/discovery.k8s.io/v1beta1/endpointslices",
            "/api/v1/namespaces/x/nodes",
            "/apis/apps/v1/deployments",
            "/",
            "/api/v1/pods/a",
        ] {
            assert_eq!(route(p).unwrap_err().code, 404, "{p}");
        }
        assert_eq!(KINDS.len(), 8);
    }

    #[test]
    fn queries_and_selectors() {
        let q = parse_query("watch=1&labelSelector=app%3Dweb%2Ctier%21%3Dfe&fieldSelector=spec.nodeName%3Dnode1&x=a+b");
        assert_eq!(q["labelSelector"], "app=web,tier!=fe");
        assert_eq!(q["x"], "a b");
        let pods = kind_by_plural("v1", "pods").unwrap();
        let p = Params::parse(&q, pods).unwrap();
        assert!(p.watch);
        let obj = json!({"metadata": {"labels": {"app": "web"}}, "spec": {"nodeName": "node1"}});
        assert!(p.matches(&obj));
        let obj2 = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}, "spec": {"nodeName": "node1"}});
        assert!(!p.matches(&obj2));
        let e = Params::parse(&parse_query("labelSelector=app+in+%28a%29"), pods).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.starts_with("labelSelector:"), "{}", e.message);
        let e = Params::parse(&parse_query("fieldSelector=spec.hostname%3Dx"), pods).unwrap_err();
        assert!(
            e.message
                .contains("field label not supported: spec.hostname"),
            "{}",
            e.message
        );
        let nodes = kind_by_plural("v1", "nodes").unwrap();
        assert!(Params::parse(&parse_query("fieldSelector=spec.nodeName%3Dx"), nodes).is_err());
        assert!(Params::parse(&parse_query("limit=x"), pods)
            .unwrap_err()
            .message
            .starts_with("limit"));
    }

    #[test]
    fn continue_tokens() {
        let t = encode_continue(42, "x", "a");
        assert_eq!(decode_continue(&t).unwrap(), (42, "x/a".to_string()));
        assert_eq!(decode_continue("!!").unwrap_err().code, 400);
    }
}
