//! The ZeroTrustPolicy custom resource (`zt.dev/v1alpha1`). Unknown fields are
//! rejected everywhere (a misspelt `matchLabel` must not silently select everything),
//! which is why the selector and ipBlock shapes are our own and not k8s-openapi's.
//! Reserved fields (`fqdn`, `toFQDNs`, `authentication`) parse, and are then rejected
//! as "not supported yet" so that a policy relying on them never half-applies.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::error::FieldError;
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
}

/// Reserved fields take any value in the schema; validation rejects them ("not supported yet").
fn reserved_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Reserved: not supported yet (a policy setting it is rejected).",
        "x-kubernetes-preserve-unknown-fields": true,
    })
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
    /// Reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "reserved_schema")]
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
    /// Reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "reserved_schema")]
    pub authentication: Option<serde_json::Value>,
}

/// The direction-independent view of a rule (ingress `from` / egress `to`).
#[derive(Clone, Copy, Debug)]
pub struct RuleView<'a> {
    pub action: Action,
    pub peers: Option<&'a [Peer]>,
    pub ports: Option<&'a [PortRule]>,
    pub icmp: Option<&'a [IcmpRule]>,
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
            authentication: self.authentication.as_ref(),
            peers_field: "to",
        }
    }
}

/// One of: spiffeId, podSelector and/or namespaceSelector (AND), ipBlock, entity.
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
    /// Reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "reserved_schema")]
    pub fqdn: Option<serde_json::Value>,
    /// Reserved.
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
    for (i, r) in p.spec.ingress.iter().flatten().enumerate() {
        validate_rule(&format!("spec.ingress[{i}]"), &r.view())?;
    }
    for (i, r) in p.spec.egress.iter().flatten().enumerate() {
        validate_rule(&format!("spec.egress[{i}]"), &r.view())?;
    }
    Ok(())
}

fn validate_rule(path: &str, r: &RuleView<'_>) -> Result<(), FieldError> {
    if r.authentication.is_some() {
        return Err(FieldError::new(
            format!("{path}.authentication"),
            "not supported yet",
        ));
    }
    for (j, peer) in r.peers.into_iter().flatten().enumerate() {
        validate_peer(&format!("{path}.{}[{j}]", r.peers_field), peer)?;
    }
    for (j, port) in r.ports.into_iter().flatten().enumerate() {
        k8s::validate_port(
            &format!("{path}.ports[{j}]"),
            port.protocol.as_deref(),
            port.port.as_ref(),
            port.end_port,
        )?;
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

fn validate_peer(path: &str, peer: &Peer) -> Result<(), FieldError> {
    if peer.fqdn.is_some() {
        return Err(FieldError::new(
            format!("{path}.fqdn"),
            "FQDN peers are not supported yet",
        ));
    }
    if peer.to_fqdns.is_some() {
        return Err(FieldError::new(
            format!("{path}.toFQDNs"),
            "FQDN peers are not supported yet",
        ));
    }
    let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    let kinds = [
        peer.spiffe_id.is_some(),
        selectors,
        peer.ip_block.is_some(),
        peer.entity.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return Err(FieldError::new(
            path,
            "set exactly one of spiffeId, podSelector/namespaceSelector, ipBlock or entity",
        ));
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
        assert_eq!(peer["fqdn"]["x-kubernetes-preserve-unknown-fields"], true);
        let port = &spec["egress"]["items"]["properties"]["ports"]["items"]["properties"]["port"];
        assert_eq!(port["x-kubernetes-int-or-string"], true);
        assert_eq!(spec["enforcementMode"]["enum"], serde_json::json!(["default", "always"]));
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
                "spec:\n  ingress: [{from: [{fqdn: example.com}]}]\n",
                "spec.ingress[0].from[0].fqdn",
                "not supported yet",
            ),
            (
                "spec:\n  egress: [{to: [{toFQDNs: [{matchName: x}]}]}]\n",
                "spec.egress[0].to[0].toFQDNs",
                "not supported yet",
            ),
            (
                "spec:\n  ingress: [{authentication: {mode: required}}]\n",
                "spec.ingress[0].authentication",
                "not supported yet",
            ),
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
        ];
        for (spec, path, msg) in cases {
            let p = parse(&format!("{HEAD}{spec}"));
            let e = validate_ztp(&p).unwrap_err();
            assert_eq!(e.path, path, "{spec}: {e}");
            assert!(e.message.contains(msg), "{spec}: {e}");
        }
    }
}
