//! Kubernetes objects. The structs are k8s-openapi's, so that a Kubernetes-API source
//! (kube-rs) feeds exactly what the manifest directory feeds. This file adds the
//! checks the API server would make on the fields the compiler relies on: a
//! manifest directory has no API server in front of it, and the compiler must never
//! guess what a malformed field meant.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
pub use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::error::FieldError;
use crate::compile::cidr;

/// The label every namespace carries automatically (Kubernetes >= 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

type Result<T = ()> = std::result::Result<T, FieldError>;

// ---------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------

pub fn validate_namespace(ns: &Namespace) -> Result {
    validate_meta(&ns.metadata, false)
}

/// Node addresses become host / remote-node endpoints: the IP types must parse
/// (Hostname and DNS entries are not addresses and are not used).
pub fn validate_node(node: &Node) -> Result {
    let name = node.metadata.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    // Node names are DNS subdomains (`ip-10-0-0-1.ec2.internal`), unlike namespaces.
    check_dns_subdomain(name).map_err(|m| FieldError::new("metadata.name", m))?;
    validate_labels(node.metadata.labels.as_ref(), "metadata.labels")?;
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_deref()).unwrap_or(&[]);
    for (i, a) in addresses.iter().enumerate() {
        if is_ip_address_type(&a.type_) {
            check_ip(&a.address).map_err(|m| FieldError::new(format!("status.addresses[{i}].address"), m))?;
        }
    }
    Ok(())
}

/// The node address types that hold an IP (the others are names).
pub fn is_ip_address_type(t: &str) -> bool {
    t == "InternalIP" || t == "ExternalIP"
}

pub fn validate_service_account(sa: &ServiceAccount) -> Result {
    validate_meta(&sa.metadata, true)
}

pub fn validate_pod(pod: &Pod) -> Result {
    validate_meta(&pod.metadata, true)?;
    if let Some(spec) = &pod.spec {
        // The service account is part of the SPIFFE ID.
        for (field, sa) in [
            ("spec.serviceAccountName", &spec.service_account_name),
            ("spec.serviceAccount", &spec.service_account),
        ] {
            if let Some(sa) = sa.as_deref().filter(|s| !s.is_empty()) {
                check_dns_subdomain(sa).map_err(|m| FieldError::new(field, m))?;
            }
        }
        // Named ports of the containers are what named policy ports resolve to.
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| ("spec.initContainers", c));
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        for (list, c) in spec
            .containers
            .iter()
            .map(|c| ("spec.containers", c))
            .chain(init)
        {
            let i = index.entry(list).or_default();
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let path = format!("{list}[{i}].ports[{j}]");
                if !(1..=65535).contains(&p.container_port) {
                    return Err(FieldError::new(
                        format!("{path}.containerPort"),
                        format!("port {} out of range 1-65535", p.container_port),
                    ));
                }
                if let Some(name) = &p.name {
                    check_port_name(name)
                        .map_err(|m| FieldError::new(format!("{path}.name"), m))?;
                }
                check_protocol(p.protocol.as_deref())
                    .map_err(|m| FieldError::new(format!("{path}.protocol"), m))?;
            }
            *i += 1;
        }
    }
    if let Some(status) = &pod.status {
        if let Some(ip) = &status.pod_ip {
            check_ip(ip).map_err(|m| FieldError::new("status.podIP", m))?;
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            check_ip(&ip.ip).map_err(|m| FieldError::new(format!("status.podIPs[{i}].ip"), m))?;
        }
    }
    Ok(())
}

pub fn validate_network_policy(np: &NetworkPolicy) -> Result {
    validate_meta(&np.metadata, true)?;
    let Some(spec) = &np.spec else { return Ok(()) };
    if let Some(sel) = &spec.pod_selector {
        validate_selector(sel, "spec.podSelector")?;
    }
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        if t != "Ingress" && t != "Egress" {
            return Err(FieldError::new(
                format!("spec.policyTypes[{i}]"),
                format!("unknown policy type {t:?} (expected Ingress or Egress)"),
            ));
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        validate_np_rule(
            &format!("spec.ingress[{i}]"),
            "from",
            r.from.as_deref(),
            r.ports.as_deref(),
        )?;
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        validate_np_rule(
            &format!("spec.egress[{i}]"),
            "to",
            r.to.as_deref(),
            r.ports.as_deref(),
        )?;
    }
    Ok(())
}

fn validate_np_rule(
    path: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result {
    for (j, peer) in peers.into_iter().flatten().enumerate() {
        let p = format!("{path}.{peers_field}[{j}]");
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (None, None, None) => {
                return Err(FieldError::new(
                    p,
                    "peer must set podSelector, namespaceSelector or ipBlock",
                ))
            }
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(FieldError::new(
                    p,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ))
            }
            (Some(b), None, None) => validate_ip_block(
                &b.cidr,
                b.except.as_deref().unwrap_or(&[]),
                &format!("{p}.ipBlock"),
            )?,
            (None, ps, ns) => {
                if let Some(s) = ps {
                    validate_selector(s, &format!("{p}.podSelector"))?;
                }
                if let Some(s) = ns {
                    validate_selector(s, &format!("{p}.namespaceSelector"))?;
                }
            }
        }
    }
    for (j, port) in ports.into_iter().flatten().enumerate() {
        validate_port(
            &format!("{path}.ports[{j}]"),
            port.protocol.as_deref(),
            port.port.as_ref(),
            port.end_port,
        )?;
    }
    Ok(())
}

/// `name` is required and must be a DNS name; namespaced objects must have a
/// namespace by now (sources fill in "default").
pub fn validate_meta(meta: &ObjectMeta, namespaced: bool) -> Result {
    let name = meta.name.as_deref().unwrap_or("");
    if name.is_empty() {
        return Err(FieldError::new("metadata.name", "missing"));
    }
    if namespaced {
        check_dns_subdomain(name).map_err(|m| FieldError::new("metadata.name", m))?;
        let ns = meta.namespace.as_deref().unwrap_or("");
        check_dns_label(ns).map_err(|m| FieldError::new("metadata.namespace", m))?;
    } else {
        // Namespace names end up in SPIFFE IDs: DNS labels only.
        check_dns_label(name).map_err(|m| FieldError::new("metadata.name", m))?;
    }
    validate_labels(meta.labels.as_ref(), "metadata.labels")
}

pub fn validate_labels(labels: Option<&BTreeMap<String, String>>, path: &str) -> Result {
    for (k, v) in labels.into_iter().flatten() {
        let p = format!("{path}[{k:?}]");
        check_label_key(k).map_err(|m| FieldError::new(&p, m))?;
        check_label_value(v).map_err(|m| FieldError::new(&p, m))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared pieces (also used by the ZeroTrustPolicy checks)
// ---------------------------------------------------------------------------

/// Label selector: valid keys and values; In/NotIn need values, Exists/DoesNotExist
/// must have none (as the API server requires).
pub fn validate_selector(sel: &LabelSelector, path: &str) -> Result {
    validate_labels(sel.match_labels.as_ref(), &format!("{path}.matchLabels"))?;
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        check_label_key(&req.key).map_err(|m| FieldError::new(format!("{p}.key"), m))?;
        let values = req.values.as_deref().unwrap_or(&[]);
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(FieldError::new(
                    format!("{p}.values"),
                    format!("operator {} needs at least one value", req.operator),
                ))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(FieldError::new(
                    format!("{p}.values"),
                    format!("operator {} must not have values", req.operator),
                ))
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err(FieldError::new(
                    format!("{p}.operator"),
                    format!(
                        "unknown operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                    ),
                ))
            }
        }
        for (j, v) in values.iter().enumerate() {
            check_label_value(v).map_err(|m| FieldError::new(format!("{p}.values[{j}]"), m))?;
        }
    }
    Ok(())
}

/// ipBlock: valid CIDR; every except of the same family and inside the CIDR.
pub fn validate_ip_block(cidr_s: &str, except: &[String], path: &str) -> Result {
    let c = cidr::parse_cidr(cidr_s).map_err(|m| FieldError::new(format!("{path}.cidr"), m))?;
    for (i, e) in except.iter().enumerate() {
        let p = format!("{path}.except[{i}]");
        let ec = cidr::parse_cidr(e).map_err(|m| FieldError::new(&p, m))?;
        if !cidr::contains(&c, &ec) {
            return Err(FieldError::new(
                p,
                format!("{e} is not inside cidr {cidr_s}"),
            ));
        }
    }
    Ok(())
}

/// A policy port: protocol TCP/UDP/SCTP, numeric port 1-65535 or a port name,
/// endPort only with a numeric port and not below it.
pub fn validate_port(
    path: &str,
    protocol: Option<&str>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
) -> Result {
    check_protocol(protocol).map_err(|m| FieldError::new(format!("{path}.protocol"), m))?;
    match port {
        Some(IntOrString::Int(p)) => {
            if !(1..=65535).contains(p) {
                return Err(FieldError::new(
                    format!("{path}.port"),
                    format!("port {p} out of range 1-65535"),
                ));
            }
            if let Some(e) = end_port {
                if !(1..=65535).contains(&e) {
                    return Err(FieldError::new(
                        format!("{path}.endPort"),
                        format!("endPort {e} out of range 1-65535"),
                    ));
                }
                if e < *p {
                    return Err(FieldError::new(
                        format!("{path}.endPort"),
                        format!("endPort {e} is less than port {p}"),
                    ));
                }
            }
        }
        Some(IntOrString::String(name)) => {
            check_port_name(name).map_err(|m| FieldError::new(format!("{path}.port"), m))?;
            if end_port.is_some() {
                return Err(FieldError::new(
                    format!("{path}.port"),
                    format!("named port {name:?} cannot have endPort"),
                ));
            }
        }
        None => {
            if end_port.is_some() {
                return Err(FieldError::new(
                    format!("{path}.endPort"),
                    "endPort requires a numeric port",
                ));
            }
        }
    }
    Ok(())
}

/// IP protocol number of a policy protocol name (absent = TCP).
pub fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

pub(crate) fn check_protocol(protocol: Option<&str>) -> std::result::Result<(), String> {
    match protocol_number(protocol) {
        Some(_) => Ok(()),
        None => Err(format!(
            "unknown protocol {:?} (expected TCP, UDP or SCTP)",
            protocol.unwrap_or_default()
        )),
    }
}

pub(crate) fn check_ip(s: &str) -> std::result::Result<(), String> {
    s.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("invalid IP address {s:?}"))
}

/// IANA service name (what Kubernetes accepts as a port name).
pub fn check_port_name(s: &str) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {s:?} (1-15 lowercase letters, digits and '-', with a letter)"
        ))
    }
}

/// Label key: `[prefix/]name`, prefix a DNS subdomain, name a qualified name.
pub fn check_label_key(k: &str) -> std::result::Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        check_dns_subdomain(p).map_err(|m| format!("invalid label key {k:?}: prefix: {m}"))?;
    }
    if name.is_empty() || !is_qualified_name(name) {
        return Err(format!(
            "invalid label key {k:?} (name part: 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ));
    }
    Ok(())
}

pub fn check_label_value(v: &str) -> std::result::Result<(), String> {
    if v.is_empty() || is_qualified_name(v) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {v:?} (at most 63 alphanumerics, '-', '_' or '.', alphanumeric at both ends)"
        ))
    }
}

fn is_qualified_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// RFC 1123 label: lowercase alphanumerics and '-', at most 63, alphanumeric ends.
pub fn check_dns_label(s: &str) -> std::result::Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {s:?} (RFC 1123 label: lowercase alphanumerics and '-', at most 63)"
        ))
    }
}

/// RFC 1123 subdomain: dot-separated labels, at most 253.
pub fn check_dns_subdomain(s: &str) -> std::result::Result<(), String> {
    if !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| check_dns_label(l).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "invalid name {s:?} (RFC 1123 subdomain: lowercase alphanumerics, '-' and '.')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values() {
        assert!(check_label_key("app").is_ok());
        assert!(check_label_key("app.kubernetes.io/name").is_ok());
        assert!(check_label_key("a_b.C-1").is_ok());
        assert!(check_label_key("").is_err());
        assert!(check_label_key("-app").is_err());
        assert!(check_label_key("Bad_Prefix/app").is_err());
        assert!(check_label_key("a/b/c").is_err());
        assert!(check_label_key(&"x".repeat(64)).is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("v1.2_x-Y").is_ok());
        assert!(check_label_value("bad value").is_err());
        assert!(check_label_value("trailing-").is_err());
    }

    #[test]
    fn selector_operator_rules() {
        let sel = |op: &str, values: Option<Vec<&str>>| LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: op.into(),
                values: values.map(|v| v.into_iter().map(String::from).collect()),
            }]),
            match_labels: None,
        };
        assert!(validate_selector(&sel("In", Some(vec!["a"])), "s").is_ok());
        assert!(validate_selector(&sel("Exists", None), "s").is_ok());
        let e = validate_selector(&sel("In", None), "s").unwrap_err();
        assert_eq!(e.path, "s.matchExpressions[0].values");
        assert!(e.message.contains("needs at least one value"), "{e}");
        let e = validate_selector(&sel("NotIn", Some(vec![])), "s").unwrap_err();
        assert!(e.message.contains("NotIn needs"), "{e}");
        let e = validate_selector(&sel("DoesNotExist", Some(vec!["a"])), "s").unwrap_err();
        assert!(e.message.contains("must not have values"), "{e}");
        let e = validate_selector(&sel("Equals", Some(vec!["a"])), "s").unwrap_err();
        assert_eq!(e.path, "s.matchExpressions[0].operator");
    }

    #[test]
    fn ports() {
        let int = |p| Some(IntOrString::Int(p));
        let vp = |proto: Option<&str>, port: Option<IntOrString>, end: Option<i32>| {
            validate_port("p", proto, port.as_ref(), end)
        };
        assert!(vp(None, int(80), None).is_ok());
        assert!(vp(Some("UDP"), int(80), Some(90)).is_ok());
        assert!(vp(Some("SCTP"), None, None).is_ok());
        let e = vp(Some("ICMP"), int(80), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)"
        );
        let e = vp(None, int(0), None).unwrap_err();
        assert_eq!(e.to_string(), "p.port: port 0 out of range 1-65535");
        let e = vp(None, int(70000), None).unwrap_err();
        assert_eq!(e.path, "p.port");
        let e = vp(None, int(90), Some(80)).unwrap_err();
        assert_eq!(e.to_string(), "p.endPort: endPort 80 is less than port 90");
        let e = vp(None, None, Some(80)).unwrap_err();
        assert_eq!(e.to_string(), "p.endPort: endPort requires a numeric port");
        let e = vp(None, Some(IntOrString::String("http".into())), Some(90)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "p.port: named port \"http\" cannot have endPort"
        );
        let e = vp(None, Some(IntOrString::String("8080".into())), None).unwrap_err();
        assert_eq!(e.path, "p.port");
    }

    #[test]
    fn ip_blocks() {
        assert!(validate_ip_block("10.0.0.0/8", &["10.1.0.0/16".into()], "b").is_ok());
        assert!(validate_ip_block("10.0.0.1/8", &[], "b").is_ok()); // host bits are normalised
        let e = validate_ip_block("10.0.0.0/33", &[], "b").unwrap_err();
        assert_eq!(e.path, "b.cidr");
        let e = validate_ip_block("10.0.0.0/8", &["11.0.0.0/16".into()], "b").unwrap_err();
        assert_eq!(
            e.to_string(),
            "b.except[0]: 11.0.0.0/16 is not inside cidr 10.0.0.0/8"
        );
        let e = validate_ip_block("10.0.0.0/8", &["fd00::/8".into()], "b").unwrap_err();
        assert_eq!(e.path, "b.except[0]");
        let e = validate_ip_block("10.0.0.0/16", &["10.0.0.0/8".into()], "b").unwrap_err();
        assert_eq!(e.path, "b.except[0]");
    }
}
