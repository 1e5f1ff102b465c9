//! The ZeroTrustPolicy custom resource (`zt.dev/v1alpha1`). Unknown fields are
//! rejected everywhere (a misspelt `matchLabel` must not silently select everything),
//! which is why the selector and ipBlock shapes are our own and not k8s-openapi's.
//! Reserved fields (`toFQDNs`) parse, and are then rejected so that a policy relying on
//! them never half-applies. `authentication: required` (on a rule, or on the spec for all
//! of the subjects' ingress: the namespace-wide STRICT setting when there are no subjects)
//! makes an allowed new flow need a proof of the peer's identity (compile/auth.rs). `fqdn` peers select egress destinations by
//! DNS name (learned from trusted DNS answers in the kernel, see compile/fqdn.rs).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::FieldError;
pub use super::http::HttpRule;
use super::k8s::{self, IntOrString, LabelSelector, LabelSelectorRequirement};
use crate::state::Action;

pub const ZTP_API_VERSION: &str = "zt.dev/v1alpha1";
pub const ZTP_KIND: &str = "ZeroTrustPolicy";

// `ZeroTrustPolicy` (metadata + spec) and its CRD (`deploy/crd-zerotrustpolicy.yaml`, written
// by `zt-agent crd`) are derived from the spec, so the schema cannot drift from the parser.
/// Whom the policy applies to and which traffic it allows or denies.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "zt.dev",
    version = "v1alpha1",
    kind = "ZeroTrustPolicy",
    namespaced,
    shortname = "ztp",
    derive = "PartialEq",
    doc = "Identity-based allow/deny policy for the pods of one namespace."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZeroTrustPolicySpec {
    /// Local endpoints the policy applies to (OR). Empty = every pod of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<Subject>,
    #[serde(default)]
    pub enforcement_mode: PolicyEnforcementMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
    /// `required`: STRICT for the subjects (every pod of the namespace when there are
    /// none): every new flow into them, allowed by any policy, needs a proof of the
    /// peer's identity, and subjects no policy isolates for ingress are isolated with
    /// everything allowed from proven peers. Isolates nothing else by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "authentication_schema")]
    pub authentication: Option<serde_json::Value>,
}

/// Reserved fields take any value in the schema; validation rejects them ("not supported yet").
fn reserved_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Reserved: not supported yet (a policy setting it is rejected).",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// `authentication`: `required` only (absent: no proof needed). Typed as any value in
/// Rust so that a wrong value fails validation naming its field, not deserialisation.
fn authentication_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "`required`: an allowed new flow passes only if the peer's SPIFFE identity is proven for the node its address is on.",
        "type": "string",
        "enum": ["required"],
    })
}

/// Whether an `authentication` value says `required`; any other value is an error
/// naming the field `path`.
pub fn authentication_required(path: &str, v: Option<&serde_json::Value>) -> Result<bool, FieldError> {
    match v {
        None => Ok(false),
        Some(serde_json::Value::String(s)) if s == "required" => Ok(true),
        Some(other) => Err(FieldError::new(path, format!("{other}: the only value is `required` (leave the field out for no authentication)"))),
    }
}

/// An ICMP type: 0-255 (no `uint8` format, which the API server does not know).
fn icmp_type_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The ICMP type (the \"port\" of ICMP).",
        "type": "integer",
        "minimum": 0,
        "maximum": 255,
    })
}

/// `default`: a direction is isolated only if the policy has rules for it;
/// `always`: the subjects are isolated in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyEnforcementMode {
    #[default]
    Default,
    Always,
}

/// Exactly one of the fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<Selector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Vec<IcmpRule>>,
    /// Requests allowed on the rule's TCP ports (every other request gets 403): the
    /// ports' connections go through the agent's HTTP proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
    /// `required`: what this rule allows needs a proof of the peer's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "authentication_schema")]
    pub authentication: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<Peer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Vec<IcmpRule>>,
    /// Requests allowed on the rule's TCP ports (every other request gets 403): the
    /// ports' connections go through the agent's HTTP proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRule>>,
    /// `required`: what this rule allows needs a proof of the peer's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "authentication_schema")]
    pub authentication: Option<serde_json::Value>,
}

/// The direction-independent view of a rule (ingress `from` / egress `to`).
#[derive(Clone, Copy, Debug)]
pub struct RuleView<'a> {
    pub action: Action,
    pub peers: Option<&'a [Peer]>,
    pub ports: Option<&'a [PortRule]>,
    pub icmp: Option<&'a [IcmpRule]>,
    pub http: Option<&'a [HttpRule]>,
    pub authentication: Option<&'a serde_json::Value>,
    /// "from" or "to", for error paths.
    pub peers_field: &'static str,
}

impl IngressRule {
    pub fn view(&self) -> RuleView<'_> {
        RuleView {
            action: self.action.unwrap_or(Action::Allow),
            peers: self.from.as_deref(),
            ports: self.ports.as_deref(),
            icmp: self.icmp.as_deref(),
            http: self.http.as_deref(),
            authentication: self.authentication.as_ref(),
            peers_field: "from",
        }
    }
}

impl EgressRule {
    pub fn view(&self) -> RuleView<'_> {
        RuleView {
            action: self.action.unwrap_or(Action::Allow),
            peers: self.to.as_deref(),
            ports: self.ports.as_deref(),
            icmp: self.icmp.as_deref(),
            http: self.http.as_deref(),
            authentication: self.authentication.as_ref(),
            peers_field: "to",
        }
    }
}

/// One of: spiffeId, podSelector and/or namespaceSelector (AND), ipBlock, entity, fqdn.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<Selector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
    /// Egress only: destinations whose addresses trusted DNS answers gave for this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<FqdnSelector>,
    /// Reserved (use `fqdn`).
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "reserved_schema")]
    pub to_fqdns: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// The node itself.
    Host,
    /// Outside the cluster: the world identity and every CIDR identity.
    World,
    /// Other nodes.
    RemoteNode,
    /// Every pod of the cluster, the host and other nodes.
    Cluster,
    /// Any peer.
    All,
    /// The trusted DNS resolvers (node configuration: `--fqdn-dns-server`/`--fqdn-dns-address`).
    Dns,
}

/// A DNS name (`matchName`) or a pattern (`matchPattern`): exactly one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FqdnSelector {
    /// An exact name, e.g. `api.example.com` (case-insensitive, one trailing dot allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_name: Option<String>,
    /// `*.example.com` (one or more labels before `example.com`), or `*` alone: DNS
    /// visibility only, which allows nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_pattern: Option<String>,
}

/// A validated, normalised FQDN selector.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FqdnMatch {
    /// This name exactly (lowercase, no trailing dot).
    Name(String),
    /// Any name with one or more labels before this suffix.
    Suffix(String),
    /// `*`: visibility only.
    Any,
}

impl std::fmt::Display for FqdnMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FqdnMatch::Name(n) => f.write_str(n),
            FqdnMatch::Suffix(s) => write!(f, "*.{s}"),
            FqdnMatch::Any => f.write_str("*"),
        }
    }
}

impl FqdnSelector {
    /// Checks and normalises; errors name the field under `path` (the peer's `.fqdn`).
    pub fn parse(&self, path: &str) -> Result<FqdnMatch, FieldError> {
        match (&self.match_name, &self.match_pattern) {
            (Some(n), None) => {
                let at = format!("{path}.matchName");
                if n.contains('*') {
                    return Err(FieldError::new(at, format!("{n:?}: a name has no `*` (use matchPattern)")));
                }
                let name = normalize_name(n).map_err(|m| FieldError::new(&at, format!("{n:?}: {m}")))?;
                if name.split('.').count() < 2 {
                    return Err(FieldError::new(at, format!("{n:?}: a name has at least 2 labels")));
                }
                Ok(FqdnMatch::Name(name))
            }
            (None, Some(p)) => {
                let at = format!("{path}.matchPattern");
                if p == "*" {
                    return Ok(FqdnMatch::Any);
                }
                let rest = p.strip_prefix("*.").unwrap_or(p);
                if rest.contains('*') || !p.starts_with("*.") {
                    return Err(FieldError::new(
                        at,
                        format!("{p:?}: only a leading `*.` label is supported (`*.example.com`, or `*` alone); use matchName for an exact name"),
                    ));
                }
                let suffix = normalize_name(rest).map_err(|m| FieldError::new(&at, format!("{p:?}: {m}")))?;
                Ok(FqdnMatch::Suffix(suffix))
            }
            _ => Err(FieldError::new(path, "set exactly one of matchName or matchPattern")),
        }
    }
}

/// Lowercases, strips one trailing dot and checks the name: at most 253 characters,
/// labels of 1-63 characters from `[a-z0-9_-]`.
pub fn normalize_name(raw: &str) -> Result<String, String> {
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err("empty name".into());
    }
    if name.len() > 253 {
        return Err(format!("name of {} characters (at most 253)", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label {label:?} must have 1-63 characters"));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_')) {
            return Err(format!("label {label:?} has {c:?} (allowed: a-z, 0-9, `-`, `_`)"));
        }
    }
    Ok(name.to_string())
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    /// TCP (default), UDP or SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// A number, or a container port name. Absent = every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IcmpRule {
    #[serde(default)]
    pub family: IcmpFamily,
    /// The ICMP type (the "port" of ICMP).
    #[serde(rename = "type")]
    #[schemars(schema_with = "icmp_type_schema")]
    pub icmp_type: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IcmpFamily {
    #[default]
    IPv4,
    IPv6,
}

/// A label selector with the same meaning as Kubernetes' LabelSelector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl Selector {
    /// The Kubernetes form, so both policy kinds share validation and matching.
    pub fn to_label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.match_labels.clone()),
            match_expressions: Some(
                self.match_expressions
                    .iter()
                    .map(|r| LabelSelectorRequirement {
                        key: r.key.clone(),
                        operator: r.operator.clone(),
                        values: Some(r.values.clone()),
                    })
                    .collect(),
            ),
        }
    }
}

/// Where the generated CRD is committed (relative to the workspace root).
pub const CRD_PATH: &str = "deploy/crd-zerotrustpolicy.yaml";

/// The ZeroTrustPolicy CustomResourceDefinition as YAML (what `zt-agent crd` prints).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&ZeroTrustPolicy::crd()).expect("a CRD serializes");
    format!("# Generated from zt-agent/src/model/ztp.rs by `zt-agent crd`: do not edit by hand.\n{body}")
}

// ---------------------------------------------------------------------------
// SPIFFE IDs
// ---------------------------------------------------------------------------

/// A parsed `spiffe://<td>/ns/<ns>/sa/<sa>` or the namespace pattern
/// `spiffe://<td>/ns/<ns>/*` (`service_account` None).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffePattern {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: Option<String>,
}

impl SpiffePattern {
    pub fn parse(s: &str) -> Result<SpiffePattern, String> {
        let bad = |why: &str| {
            format!(
                "invalid SPIFFE ID {s:?}: {why} (expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> or spiffe://<trust-domain>/ns/<namespace>/*)"
            )
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("missing spiffe:// scheme"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("missing path"))?;
        let td_ok = !td.is_empty()
            && td.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
            });
        if !td_ok {
            return Err(bad("invalid trust domain"));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let (ns, sa) = match parts.as_slice() {
            ["ns", ns, "sa", sa] => (*ns, Some(*sa)),
            ["ns", ns, "*"] => (*ns, None),
            _ => return Err(bad("unsupported path")),
        };
        k8s::check_dns_label(ns).map_err(|m| bad(&format!("namespace: {m}")))?;
        if let Some(sa) = sa {
            k8s::check_dns_subdomain(sa).map_err(|m| bad(&format!("service account: {m}")))?;
        }
        Ok(SpiffePattern {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.map(str::to_string),
        })
    }

    /// Does the SPIFFE ID of a workload (namespace, service account) match?
    pub fn matches(&self, namespace: &str, service_account: &str) -> bool {
        self.namespace == namespace
            && self
                .service_account
                .as_deref()
                .is_none_or(|sa| sa == service_account)
    }
}

// ---------------------------------------------------------------------------
// Validation (what does not need the compile config: the trust domain is checked
// by the compiler)
// ---------------------------------------------------------------------------

pub fn validate_ztp(p: &ZeroTrustPolicy) -> Result<(), FieldError> {
    k8s::validate_meta(&p.metadata, true)?;
    let ns = p.metadata.namespace.as_deref().unwrap_or_default();
    for (i, s) in p.spec.subjects.iter().enumerate() {
        let path = format!("spec.subjects[{i}]");
        match (&s.spiffe_id, &s.pod_selector) {
            (Some(id), None) => {
                let sp = SpiffePattern::parse(id)
                    .map_err(|m| FieldError::new(format!("{path}.spiffeId"), m))?;
                if sp.namespace != ns {
                    return Err(FieldError::new(
                        format!("{path}.spiffeId"),
                        format!(
                            "subject {id:?} is in namespace {:?}, but subjects must be in the policy's namespace {ns:?}",
                            sp.namespace
                        ),
                    ));
                }
            }
            (None, Some(sel)) => {
                k8s::validate_selector(&sel.to_label_selector(), &format!("{path}.podSelector"))?
            }
            _ => {
                return Err(FieldError::new(
                    path,
                    "set exactly one of spiffeId or podSelector",
                ))
            }
        }
    }
    authentication_required("spec.authentication", p.spec.authentication.as_ref())?;
    for (i, r) in p.spec.ingress.iter().flatten().enumerate() {
        validate_rule(&format!("spec.ingress[{i}]"), &r.view())?;
    }
    // Each distinct set of fqdn names takes one of an identity's 32 FQDN slots. Checked
    // per policy here, so that one policy over the limit is rejected alone; several
    // policies together can still exceed it for one identity (a compile error).
    let mut name_sets = std::collections::BTreeSet::new();
    for (i, r) in p.spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        validate_rule(&path, &r.view())?;
        let names: std::collections::BTreeSet<FqdnMatch> = r
            .to
            .iter()
            .flatten()
            .filter_map(|peer| peer.fqdn.as_ref()?.parse("").ok())
            .filter(|m| *m != FqdnMatch::Any)
            .collect();
        if !names.is_empty() && name_sets.insert(names) && name_sets.len() > zt_common::FQDN_MAX_SLOTS as usize {
            return Err(FieldError::new(
                path,
                format!(
                    "more than {} FQDN rules (distinct sets of fqdn names) in one policy: an identity can be subject to at most {}",
                    zt_common::FQDN_MAX_SLOTS,
                    zt_common::FQDN_MAX_SLOTS
                ),
            ));
        }
    }
    Ok(())
}

fn validate_rule(path: &str, r: &RuleView<'_>) -> Result<(), FieldError> {
    let at = format!("{path}.authentication");
    if authentication_required(&at, r.authentication)? && r.action == Action::Deny {
        return Err(FieldError::new(at, "a deny rule needs no authentication: it denies whoever the peer is"));
    }
    for (j, peer) in r.peers.into_iter().flatten().enumerate() {
        let at = format!("{path}.{}[{j}]", r.peers_field);
        validate_peer(&at, peer)?;
        if peer.fqdn.is_some() {
            validate_fqdn_rule(&at, path, r)?;
        }
    }
    for (j, port) in r.ports.into_iter().flatten().enumerate() {
        k8s::validate_port(
            &format!("{path}.ports[{j}]"),
            port.protocol.as_deref(),
            port.port.as_ref(),
            port.end_port,
        )?;
    }
    if let Some(http) = r.http {
        super::http::validate(path, http, r.action == Action::Allow, http_ports(r))?;
    }
    Ok(())
}

/// HTTP rules need ports, every one of them TCP, and no ICMP types beside them.
fn http_ports(r: &RuleView<'_>) -> Result<(), String> {
    let ports = r.ports.unwrap_or(&[]);
    if ports.is_empty() {
        return Err("http rules need ports (the TCP ports the HTTP server listens on)".into());
    }
    if r.icmp.is_some_and(|i| !i.is_empty()) {
        return Err("a rule with http rules cannot match ICMP types".into());
    }
    for (j, p) in ports.iter().enumerate() {
        if k8s::protocol_number(p.protocol.as_deref()) != Some(6) {
            return Err(format!("ports[{j}] is not TCP: http rules apply to TCP ports only"));
        }
        if !matches!(p.port, Some(IntOrString::Int(_))) {
            return Err(format!("ports[{j}]: http rules need the HTTP server's port numbers (no named or absent ports in this version)"));
        }
    }
    if r.peers.into_iter().flatten().any(|p| p.fqdn.is_some()) {
        return Err("http rules cannot be combined with fqdn peers in this version".into());
    }
    Ok(())
}

/// Every SPIFFE ID of the policy names `trust_domain` (the compiler fails on any other;
/// the Kubernetes source checks it per object so one such policy cannot block the rest).
pub fn check_trust_domain(p: &ZeroTrustPolicy, trust_domain: &str) -> Result<(), FieldError> {
    let mut ids: Vec<(String, &Option<String>)> = Vec::new();
    for (i, s) in p.spec.subjects.iter().enumerate() {
        ids.push((format!("spec.subjects[{i}].spiffeId"), &s.spiffe_id));
    }
    let ingress = p.spec.ingress.iter().flatten().map(|r| ("ingress", "from", r.from.as_deref()));
    let egress = p.spec.egress.iter().flatten().map(|r| ("egress", "to", r.to.as_deref()));
    let mut index = BTreeMap::new();
    for (dir, field, peers) in ingress.chain(egress) {
        let i: &mut usize = index.entry(dir).or_default();
        for (j, peer) in peers.unwrap_or(&[]).iter().enumerate() {
            ids.push((format!("spec.{dir}[{i}].{field}[{j}].spiffeId"), &peer.spiffe_id));
        }
        *i += 1;
    }
    for (path, id) in ids {
        let Some(id) = id else { continue };
        let sp = SpiffePattern::parse(id).map_err(|m| FieldError::new(&path, m))?;
        if sp.trust_domain != trust_domain {
            return Err(FieldError::new(path, format!("SPIFFE ID {id:?} is not of trust domain {trust_domain:?}")));
        }
    }
    Ok(())
}

/// Where an fqdn peer may stand: an egress allow rule without ICMP matches.
fn validate_fqdn_rule(peer_path: &str, rule_path: &str, r: &RuleView<'_>) -> Result<(), FieldError> {
    let at = format!("{peer_path}.fqdn");
    if r.peers_field != "to" {
        return Err(FieldError::new(at, "fqdn peers select destinations: use them in egress rules only"));
    }
    if r.action == Action::Deny {
        return Err(FieldError::new(
            at,
            "fqdn peers cannot deny (a deny by name is bypassed by not resolving the name): use ipBlock",
        ));
    }
    if r.icmp.is_some_and(|i| !i.is_empty()) {
        return Err(FieldError::new(format!("{rule_path}.icmp"), "a rule with fqdn peers cannot match ICMP types"));
    }
    Ok(())
}

fn validate_peer(path: &str, peer: &Peer) -> Result<(), FieldError> {
    if peer.to_fqdns.is_some() {
        return Err(FieldError::new(
            format!("{path}.toFQDNs"),
            "not supported: use `fqdn: {matchName|matchPattern}`",
        ));
    }
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    let kinds = [
        peer.spiffe_id.is_some(),
        selectors,
        peer.ip_block.is_some(),
        peer.entity.is_some(),
        peer.fqdn.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(FieldError::new(
            path,
            "set exactly one of spiffeId, podSelector/namespaceSelector, ipBlock, entity or fqdn",
        ));
    }
    if let Some(f) = &peer.fqdn {
        f.parse(&format!("{path}.fqdn"))?;
    }
    if let Some(id) = &peer.spiffe_id {
        SpiffePattern::parse(id).map_err(|m| FieldError::new(format!("{path}.spiffeId"), m))?;
    }
    if let Some(s) = &peer.pod_selector {
        k8s::validate_selector(&s.to_label_selector(), &format!("{path}.podSelector"))?;
    }
    if let Some(s) = &peer.namespace_selector {
        k8s::validate_selector(&s.to_label_selector(), &format!("{path}.namespaceSelector"))?;
    }
    if let Some(b) = &peer.ip_block {
        k8s::validate_ip_block(&b.cidr, &b.except, &format!("{path}.ipBlock"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ZeroTrustPolicy {
        let mut p: ZeroTrustPolicy = serde_yaml::from_str(yaml).unwrap();
        p.metadata.namespace.get_or_insert_with(|| "default".into());
        p
    }

    const HEAD: &str = "apiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: p}\n";

    /// The committed CRD is the generated one (regenerate with
    /// `cargo run -p zt-agent -- crd > deploy/crd-zerotrustpolicy.yaml`, or run this test
    /// with ZT_UPDATE_CRD=1).
    #[test]
    fn committed_crd_is_generated() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(CRD_PATH);
        let want = crd_yaml();
        if std::env::var_os("ZT_UPDATE_CRD").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{CRD_PATH} differs from the Rust types: run `cargo run -p zt-agent -- crd > {CRD_PATH}`"
        );
    }

    #[test]
    fn crd_schema_is_structural_where_it_matters() {
        let crd: serde_json::Value = serde_yaml::from_str(&crd_yaml()).unwrap();
        assert_eq!(crd["spec"]["group"], "zt.dev");
        assert_eq!(crd["spec"]["scope"], "Namespaced");
        let v = &crd["spec"]["versions"][0];
        assert_eq!(v["name"], "v1alpha1");
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let peer = &spec["ingress"]["items"]["properties"]["from"]["items"]["properties"];
        assert_eq!(peer["ipBlock"]["required"], serde_json::json!(["cidr"]));
        assert_eq!(peer["toFQDNs"]["x-kubernetes-preserve-unknown-fields"], true);
        let fqdn = &spec["egress"]["items"]["properties"]["to"]["items"]["properties"]["fqdn"]["properties"];
        assert_eq!(fqdn["matchName"]["type"], "string");
        assert_eq!(fqdn["matchPattern"]["type"], "string");
        let port = &spec["egress"]["items"]["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true);
        assert_eq!(spec["enforcementMode"]["enum"], serde_json::json!(["default", "always"]));
        assert_eq!(spec["authentication"]["enum"], serde_json::json!(["required"]));
        assert_eq!(spec["ingress"]["items"]["properties"]["authentication"]["enum"], serde_json::json!(["required"]));
        // Structural schemas forbid additionalProperties next to properties.
        assert!(!crd_yaml().contains("additionalProperties: false"));
    }

    #[test]
    fn spiffe_ids() {
        let p = SpiffePattern::parse("spiffe://cluster.local/ns/default/sa/httpbin").unwrap();
        assert_eq!(p.trust_domain, "cluster.local");
        assert_eq!(p.service_account.as_deref(), Some("httpbin"));
        assert!(p.matches("default", "httpbin"));
        assert!(!p.matches("default", "sleep"));
        assert!(!p.matches("other", "httpbin"));
        let p = SpiffePattern::parse("spiffe://cluster.local/ns/default/*").unwrap();
        assert!(p.service_account.is_none());
        assert!(p.matches("default", "anything"));
        assert!(!p.matches("kube-system", "anything"));
        for bad in [
            "http://cluster.local/ns/default/sa/x",
            "spiffe://cluster.local/ns/default/sa/*",
            "spiffe://cluster.local/ns/*",
            "spiffe://cluster.local/ns/default/sa/x/y",
            "spiffe:///ns/default/sa/x",
            "spiffe://Cluster/ns/default/sa/x",
            "spiffe://cluster.local/ns/Default/sa/x",
        ] {
            assert!(SpiffePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn full_policy_parses() {
        let p = parse(&format!(
            "{HEAD}spec:
  subjects:
    - spiffeId: spiffe://cluster.local/ns/default/sa/httpbin
    - podSelector: {{matchLabels: {{app: web}}, matchExpressions: [{{key: tier, operator: Exists}}]}}
  enforcementMode: always
  ingress:
    - from:
        - spiffeId: spiffe://cluster.local/ns/other/*
        - podSelector: {{}}
          namespaceSelector: {{matchLabels: {{team: a}}}}
        - ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}
        - entity: remote-node
      ports: [{{port: 80}}, {{protocol: UDP, port: 53, endPort: 54}}]
      icmp: [{{type: 8}}, {{family: IPv6, type: 128}}]
    - action: deny
  egress:
    - to: [{{entity: world}}]
"
        ));
        assert_eq!(p.spec.enforcement_mode, PolicyEnforcementMode::Always);
        assert_eq!(p.spec.subjects.len(), 2);
        let ing = p.spec.ingress.as_ref().unwrap();
        assert_eq!(ing[0].view().action, Action::Allow);
        assert_eq!(ing[1].view().action, Action::Deny);
        assert_eq!(ing[0].icmp.as_ref().unwrap()[1].family, IcmpFamily::IPv6);
        validate_ztp(&p).unwrap();
    }

    #[test]
    fn unknown_fields_rejected() {
        let r: Result<ZeroTrustPolicy, _> = serde_yaml::from_str(&format!(
            "{HEAD}spec:\n  ingress:\n    - from: [{{podSelector: {{matchLabel: {{a: b}}}}}}]\n"
        ));
        assert!(r.unwrap_err().to_string().contains("matchLabel"));
    }

    #[test]
    fn validation_errors() {
        let cases = [
            (
                "spec:\n  subjects: [{spiffeId: spiffe://cluster.local/ns/other/sa/x}]\n",
                "spec.subjects[0].spiffeId",
                "policy's namespace",
            ),
            ("spec:\n  subjects: [{}]\n", "spec.subjects[0]", "exactly one"),
            (
                "spec:\n  egress: [{to: [{toFQDNs: [{matchName: x}]}]}]\n",
                "spec.egress[0].to[0].toFQDNs",
                "use `fqdn: {matchName|matchPattern}`",
            ),
            (
                "spec:\n  ingress: [{authentication: {mode: required}}]\n",
                "spec.ingress[0].authentication",
                "the only value is `required`",
            ),
            (
                "spec:\n  egress: [{}, {authentication: requird}]\n",
                "spec.egress[1].authentication",
                "the only value is `required`",
            ),
            (
                "spec:\n  ingress: [{action: deny, authentication: required}]\n",
                "spec.ingress[0].authentication",
                "deny rule",
            ),
            ("spec:\n  authentication: STRICT\n", "spec.authentication", "the only value is `required`"),
            (
                "spec:\n  ingress: [{from: [{entity: host, ipBlock: {cidr: 1.2.3.0/24}}]}]\n",
                "spec.ingress[0].from[0]",
                "exactly one",
            ),
            (
                "spec:\n  egress: [{to: [{spiffeId: spiffe://x/ns/a/sa/b/c}]}]\n",
                "spec.egress[0].to[0].spiffeId",
                "invalid SPIFFE ID",
            ),
            (
                "spec:\n  egress: [{ports: [{port: 80, endPort: 79}]}]\n",
                "spec.egress[0].ports[0].endPort",
                "less than",
            ),
            (
                "spec:\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}]}]\n",
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "not inside",
            ),
            ("spec:\n  ingress: [{http: [{method: GET}]}]\n", "spec.ingress[0].http", "need ports"),
            ("spec:\n  ingress: [{ports: [{protocol: UDP, port: 53}], http: [{method: GET}]}]\n", "spec.ingress[0].http", "not TCP"),
            ("spec:\n  ingress: [{ports: [{port: http}], http: [{method: GET}]}]\n", "spec.ingress[0].http", "port numbers"),
            ("spec:\n  ingress: [{action: deny, ports: [{port: 80}], http: [{method: GET}]}]\n", "spec.ingress[0].http", "allow rules only"),
            ("spec:\n  egress: [{ports: [{port: 80}], http: [{method: GET, path: /a/../b}]}]\n", "spec.egress[0].http[0].path", "not normalised"),
            ("spec:\n  ingress: [{ports: [{port: 80}], http: [{method: get}]}]\n", "spec.ingress[0].http[0].method", "upper-case"),
        ];
        for (spec, path, msg) in cases {
            let p = parse(&format!("{HEAD}{spec}"));
            let e = validate_ztp(&p).unwrap_err();
            assert_eq!(e.path, path, "{spec}: {e}");
            assert!(e.message.contains(msg), "{spec}: {e}");
        }
    }

    #[test]
    fn fqdn_peers_parse_and_normalise() {
        let p = parse(&format!(
            "{HEAD}spec:
  egress:
    - to:
        - fqdn: {{matchName: API.Example.COM.}}
        - fqdn: {{matchPattern: \"*.example.com\"}}
        - podSelector: {{}}
      ports: [{{protocol: TCP, port: 443}}]
    - to: [{{fqdn: {{matchPattern: \"*\"}}}}]
    - to: [{{entity: dns}}]
      ports: [{{protocol: UDP, port: 53}}, {{protocol: TCP, port: 53}}]
"
        ));
        validate_ztp(&p).unwrap();
        let eg = p.spec.egress.as_ref().unwrap();
        let m = |r: usize, j: usize| eg[r].to.as_ref().unwrap()[j].fqdn.as_ref().unwrap().parse("x").unwrap();
        assert_eq!(m(0, 0), FqdnMatch::Name("api.example.com".into()));
        assert_eq!(m(0, 1), FqdnMatch::Suffix("example.com".into()));
        assert_eq!(m(1, 0), FqdnMatch::Any);
        assert_eq!(eg[2].to.as_ref().unwrap()[0].entity, Some(Entity::Dns));
        assert_eq!(m(0, 1).to_string(), "*.example.com");
        // Unknown fields inside fqdn are rejected at parse time.
        let r: Result<ZeroTrustPolicy, _> =
            serde_yaml::from_str(&format!("{HEAD}spec:\n  egress: [{{to: [{{fqdn: {{matchNames: x.com}}}}]}}]\n"));
        assert!(r.unwrap_err().to_string().contains("matchNames"));
    }

    #[test]
    fn fqdn_validation_errors_name_the_field() {
        let long_label = "a".repeat(64);
        let long_name = format!("{}.com", ["abcdefghi"; 26].join("."));
        let cases = [
            ("egress: [{to: [{fqdn: {matchPattern: \"a*.x.com\"}}]}]", "spec.egress[0].to[0].fqdn.matchPattern", "only a leading `*.` label"),
            ("egress: [{to: [{fqdn: {matchPattern: \"*.*.x.com\"}}]}]", "spec.egress[0].to[0].fqdn.matchPattern", "only a leading `*.` label"),
            ("egress: [{to: [{fqdn: {matchPattern: x.com}}]}]", "spec.egress[0].to[0].fqdn.matchPattern", "only a leading `*.` label"),
            ("egress: [{to: [{fqdn: {matchPattern: \"*.\"}}]}]", "spec.egress[0].to[0].fqdn.matchPattern", "empty name"),
            ("egress: [{to: [{fqdn: {matchName: \"*.x.com\"}}]}]", "spec.egress[0].to[0].fqdn.matchName", "no `*`"),
            ("egress: [{to: [{fqdn: {matchName: localhost}}]}]", "spec.egress[0].to[0].fqdn.matchName", "at least 2 labels"),
            ("egress: [{to: [{fqdn: {matchName: a..com}}]}]", "spec.egress[0].to[0].fqdn.matchName", "1-63 characters"),
            ("egress: [{to: [{fqdn: {matchName: a b.com}}]}]", "spec.egress[0].to[0].fqdn.matchName", "allowed: a-z"),
            (&*format!("egress: [{{to: [{{fqdn: {{matchName: {long_label}.com}}}}]}}]"), "spec.egress[0].to[0].fqdn.matchName", "1-63 characters"),
            (&*format!("egress: [{{to: [{{fqdn: {{matchName: {long_name}}}}}]}}]"), "spec.egress[0].to[0].fqdn.matchName", "at most 253"),
            ("egress: [{to: [{fqdn: {}}]}]", "spec.egress[0].to[0].fqdn", "exactly one of matchName or matchPattern"),
            ("egress: [{to: [{fqdn: {matchName: a.com, matchPattern: \"*.a.com\"}}]}]", "spec.egress[0].to[0].fqdn", "exactly one of matchName"),
            ("egress: [{to: [{fqdn: {matchName: a.com}, entity: world}]}]", "spec.egress[0].to[0]", "exactly one of"),
            ("ingress: [{from: [{fqdn: {matchName: a.com}}]}]", "spec.ingress[0].from[0].fqdn", "select destinations"),
            ("egress: [{action: deny, to: [{fqdn: {matchName: a.com}}]}]", "spec.egress[0].to[0].fqdn", "use ipBlock"),
            ("egress: [{to: [{entity: dns}, {fqdn: {matchName: a.com}}], icmp: [{type: 8}]}]", "spec.egress[0].icmp", "ICMP"),
            ("egress: [{}, {to: [{podSelector: {}}, {fqdn: {matchPattern: \"**\"}}]}]", "spec.egress[1].to[1].fqdn.matchPattern", "only a leading"),
        ];
        for (spec, path, msg) in cases {
            let p = parse(&format!("{HEAD}spec:\n  {spec}\n"));
            let e = validate_ztp(&p).unwrap_err();
            assert_eq!(e.path, path, "{spec}: {e}");
            assert!(e.message.contains(msg), "{spec}: {e}");
        }
        // 33 distinct name sets in one policy; 32, or repeated sets, are fine.
        let rules = |n: usize, distinct: bool| -> String {
            (0..n).map(|i| format!("{{to: [{{fqdn: {{matchName: n{}.x.com}}}}]}}", if distinct { i } else { 0 })).collect::<Vec<_>>().join(", ")
        };
        let e = validate_ztp(&parse(&format!("{HEAD}spec:\n  egress: [{}]\n", rules(33, true)))).unwrap_err();
        assert_eq!(e.path, "spec.egress[32]");
        assert!(e.message.contains("at most 32"), "{e}");
        validate_ztp(&parse(&format!("{HEAD}spec:\n  egress: [{}]\n", rules(32, true)))).unwrap();
        validate_ztp(&parse(&format!("{HEAD}spec:\n  egress: [{}]\n", rules(40, false)))).unwrap();
        // The limits themselves are accepted.
        let ok = format!("{}.{}.com", "a".repeat(63), ["b"; 93].join("."));
        assert_eq!(ok.len(), 253);
        assert!(normalize_name(&ok).is_ok());
        assert!(normalize_name(&format!("{ok}.")).is_ok(), "one trailing dot is stripped");
        assert!(normalize_name(&format!("{ok}..")).is_err());
    }
}
