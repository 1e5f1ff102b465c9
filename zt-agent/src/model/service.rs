//! Services (v1) and EndpointSlices (discovery.k8s.io/v1): the checks the API server
//! would make on the fields the Service table (`crate::services`) relies on, so that a
//! manifest directory (no API server in front of it) never feeds it a field it would
//! have to guess about. A bad object is rejected with the field's path.

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use k8s_openapi::api::core::v1::Service;
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::error::FieldError;
use super::k8s::{check_dns_label, check_dns_subdomain, check_ip, check_port_name, check_protocol, validate_meta, IntOrString};

/// The label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (3 hours, the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// The largest affinity timeout the API accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

type Result<T = ()> = std::result::Result<T, FieldError>;

/// `spec.type`, defaulted like the API server does (absent: ClusterIP).
pub fn service_type(svc: &Service) -> &str {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")
}

/// A `clusterIP` / `clusterIPs[i]` value: "" (not allocated), "None" (headless) or an IP.
fn check_cluster_ip(s: &str) -> std::result::Result<(), String> {
    if s.is_empty() || s == "None" {
        return Ok(());
    }
    check_ip(s).map_err(|m| format!("{m} (expected an IP address, \"None\" or \"\")"))
}

fn one_of(path: &str, value: Option<&str>, allowed: &[&str]) -> Result {
    match value {
        Some(v) if !allowed.contains(&v) => Err(FieldError::new(path, format!("unknown value {v:?} (expected {})", allowed.join(", ")))),
        _ => Ok(()),
    }
}

pub fn validate_service(svc: &Service) -> Result {
    validate_meta(&svc.metadata, true)?;
    // Service names are DNS labels (they become DNS names under the namespace).
    check_dns_label(svc.metadata.name.as_deref().unwrap_or("")).map_err(|m| FieldError::new("metadata.name", m))?;
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_deref()).unwrap_or(&[]);
    for (i, ing) in ingress.iter().enumerate() {
        if let Some(ip) = ing.ip.as_deref().filter(|s| !s.is_empty()) {
            check_ip(ip).map_err(|m| FieldError::new(format!("status.loadBalancer.ingress[{i}].ip"), m))?;
        }
    }
    let Some(spec) = &svc.spec else { return Ok(()) };
    one_of("spec.type", spec.type_.as_deref(), &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"])?;
    let ty = service_type(svc);

    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip(ip).map_err(|m| FieldError::new("spec.clusterIP", m))?;
    }
    let ips = spec.cluster_ips.as_deref().unwrap_or(&[]);
    for (i, ip) in ips.iter().enumerate() {
        check_cluster_ip(ip).map_err(|m| FieldError::new(format!("spec.clusterIPs[{i}]"), m))?;
        if ip == "None" && ips.len() > 1 {
            return Err(FieldError::new(format!("spec.clusterIPs[{i}]"), "\"None\" (headless) must be the only entry"));
        }
    }
    if ips.len() > 2 {
        return Err(FieldError::new("spec.clusterIPs", format!("{} entries (at most 2, one per IP family)", ips.len())));
    }
    if let [a, b] = ips {
        let fam = |s: &str| s.parse::<IpAddr>().map(|ip| ip.is_ipv4()).ok();
        if fam(a) == fam(b) {
            return Err(FieldError::new("spec.clusterIPs[1]", format!("{b:?} is of the same IP family as clusterIPs[0] {a:?} (dual-stack needs one of each)")));
        }
    }
    if let (Some(first), Some(ip)) = (ips.first(), spec.cluster_ip.as_deref()) {
        if !ip.is_empty() && first != ip {
            return Err(FieldError::new("spec.clusterIPs[0]", format!("{first:?} differs from spec.clusterIP {ip:?}")));
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(ip).map_err(|m| FieldError::new(format!("spec.externalIPs[{i}]"), m))?;
    }

    let ports = spec.ports.as_deref().unwrap_or(&[]);
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut numbers: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    let mut node_ports: BTreeMap<(i32, &str), usize> = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if !(1..=65535).contains(&p.port) {
            return Err(FieldError::new(format!("{path}.port"), format!("port {} out of range 1-65535", p.port)));
        }
        check_protocol(p.protocol.as_deref()).map_err(|m| FieldError::new(format!("{path}.protocol"), m))?;
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        match p.name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => {
                check_dns_label(name).map_err(|m| FieldError::new(format!("{path}.name"), m))?;
                if let Some(j) = names.insert(name, i) {
                    return Err(FieldError::new(format!("{path}.name"), format!("duplicate port name {name:?} (also spec.ports[{j}])")));
                }
            }
            None if ports.len() > 1 => return Err(FieldError::new(format!("{path}.name"), "required when the Service has more than one port")),
            None => {}
        }
        if let Some(j) = numbers.insert((p.port, proto), i) {
            return Err(FieldError::new(format!("{path}.port"), format!("duplicate port {}/{proto} (also spec.ports[{j}])", p.port)));
        }
        match &p.target_port {
            Some(IntOrString::Int(t)) if !(1..=65535).contains(t) => {
                return Err(FieldError::new(format!("{path}.targetPort"), format!("port {t} out of range 1-65535")))
            }
            Some(IntOrString::String(name)) => check_port_name(name).map_err(|m| FieldError::new(format!("{path}.targetPort"), m))?,
            _ => {}
        }
        // 0 is "not allocated (yet)", as the API server reads it.
        if let Some(np) = p.node_port.filter(|n| *n != 0) {
            if !(1..=65535).contains(&np) {
                return Err(FieldError::new(format!("{path}.nodePort"), format!("port {np} out of range 1-65535")));
            }
            if !matches!(ty, "NodePort" | "LoadBalancer") {
                return Err(FieldError::new(format!("{path}.nodePort"), format!("only a NodePort or LoadBalancer Service has node ports (type is {ty})")));
            }
            if let Some(j) = node_ports.insert((np, proto), i) {
                return Err(FieldError::new(format!("{path}.nodePort"), format!("duplicate nodePort {np}/{proto} (also spec.ports[{j}])")));
            }
        }
    }

    one_of("spec.sessionAffinity", spec.session_affinity.as_deref(), &["None", "ClientIP"])?;
    let timeout = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref()).and_then(|c| c.timeout_seconds);
    if let Some(t) = timeout {
        if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) {
            return Err(FieldError::new("spec.sessionAffinityConfig.clientIP.timeoutSeconds", format!("{t} out of range 1-{MAX_AFFINITY_TIMEOUT_S}")));
        }
    }
    one_of("spec.internalTrafficPolicy", spec.internal_traffic_policy.as_deref(), &["Cluster", "Local"])?;
    one_of("spec.externalTrafficPolicy", spec.external_traffic_policy.as_deref(), &["Cluster", "Local"])?;
    Ok(())
}

pub fn validate_endpoint_slice(es: &EndpointSlice) -> Result {
    validate_meta(&es.metadata, true)?;
    if let Some(svc) = es.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
        check_dns_label(svc).map_err(|m| FieldError::new(format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"), format!("not a Service name: {m}")))?;
    }
    let family: Option<fn(&IpAddr) -> bool> = match es.address_type.as_str() {
        "IPv4" => Some(IpAddr::is_ipv4),
        "IPv6" => Some(IpAddr::is_ipv6),
        "FQDN" => None,
        "" => return Err(FieldError::new("addressType", "missing")),
        other => return Err(FieldError::new("addressType", format!("unknown address type {other:?} (expected IPv4, IPv6 or FQDN)"))),
    };
    for (i, ep) in es.endpoints.iter().enumerate() {
        let path = format!("endpoints[{i}]");
        if ep.addresses.is_empty() {
            return Err(FieldError::new(format!("{path}.addresses"), "at least one address is required"));
        }
        if let Some(in_family) = family {
            for (j, a) in ep.addresses.iter().enumerate() {
                let p = format!("{path}.addresses[{j}]");
                let ip: IpAddr = a.parse().map_err(|_| FieldError::new(&p, format!("invalid IP address {a:?}")))?;
                if !in_family(&ip) {
                    return Err(FieldError::new(p, format!("{a} is not an {} address (addressType {})", es.address_type, es.address_type)));
                }
            }
        }
        if let Some(node) = ep.node_name.as_deref().filter(|n| !n.is_empty()) {
            check_dns_subdomain(node).map_err(|m| FieldError::new(format!("{path}.nodeName"), m))?;
        }
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, p) in es.ports.iter().flatten().enumerate() {
        let path = format!("ports[{i}]");
        if let Some(n) = p.port {
            if !(1..=65535).contains(&n) {
                return Err(FieldError::new(format!("{path}.port"), format!("port {n} out of range 1-65535")));
            }
        }
        check_protocol(p.protocol.as_deref()).map_err(|m| FieldError::new(format!("{path}.protocol"), m))?;
        let name = p.name.as_deref().unwrap_or("");
        if !name.is_empty() {
            check_dns_label(name).map_err(|m| FieldError::new(format!("{path}.name"), m))?;
        }
        if let Some(j) = names.insert(name, i) {
            return Err(FieldError::new(format!("{path}.name"), format!("duplicate port name {name:?} (also ports[{j}])")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::source_dir::parse_manifests;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\n";
    const ES: &str =
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: prod, labels: {kubernetes.io/service-name: web}}\n";

    fn load(text: &str) -> Result<(), String> {
        parse_manifests("s.yaml", text, &mut vec![]).map(|_| ()).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_services_and_slices() {
        let ok = [
            format!("{SVC}spec:\n  clusterIP: 10.96.0.5\n  clusterIPs: [10.96.0.5, \"fd00::5\"]\n  ports: [{{name: http, port: 80, targetPort: http}}, {{name: dns, port: 53, protocol: UDP, targetPort: 5353}}]\n"),
            format!("{SVC}spec:\n  clusterIP: None\n  ports: [{{port: 80}}]\n"),
            format!("{SVC}spec:\n  clusterIP: \"\"\n  type: ExternalName\n  externalName: db.example.com\n"),
            format!("{SVC}spec:\n  type: NodePort\n  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.1]\n  ports: [{{port: 80, nodePort: 30080}}]\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 86400}}}}\n  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n"),
            format!("{SVC}spec:\n  type: LoadBalancer\n  ports: [{{port: 80, nodePort: 0}}]\nstatus: {{loadBalancer: {{ingress: [{{hostname: lb.example.com}}, {{ip: 198.51.100.1}}]}}}}\n"),
            SVC.to_string(),
            format!("{ES}addressType: IPv4\nports: [{{name: http, port: 8080}}, {{port: 53, protocol: UDP}}]\nendpoints: [{{addresses: [10.0.0.1], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}]\n"),
            format!("{ES}addressType: IPv6\nports: [{{name: http}}]\nendpoints: [{{addresses: [\"fd00::1\"]}}]\n"),
            format!("{ES}addressType: FQDN\nendpoints: [{{addresses: [db.example.com]}}]\n"),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: loose}\naddressType: IPv4\nendpoints: []\n".to_string(),
        ];
        for text in ok {
            load(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
    }

    #[test]
    fn errors_name_object_and_field() {
        let svc = |spec: &str| format!("{SVC}spec:\n{spec}");
        let es = |rest: &str| format!("{ES}{rest}");
        let cases: Vec<(String, &str)> = vec![
            (
                svc("  type: Internal\n"),
                "s.yaml doc 1: Service prod/web: spec.type: unknown value \"Internal\" (expected ClusterIP, NodePort, LoadBalancer, ExternalName)",
            ),
            (
                svc("  clusterIP: 10.96.0.300\n"),
                "s.yaml doc 1: Service prod/web: spec.clusterIP: invalid IP address \"10.96.0.300\" (expected an IP address, \"None\" or \"\")",
            ),
            (svc("  clusterIPs: [10.96.0.5, x]\n"), "s.yaml doc 1: Service prod/web: spec.clusterIPs[1]: invalid IP address \"x\""),
            (svc("  clusterIPs: [None, \"fd00::5\"]\n"), "s.yaml doc 1: Service prod/web: spec.clusterIPs[0]: \"None\" (headless) must be the only entry"),
            (svc("  clusterIPs: [10.96.0.5, 10.96.0.6]\n"), "s.yaml doc 1: Service prod/web: spec.clusterIPs[1]: \"10.96.0.6\" is of the same IP family"),
            (
                svc("  clusterIPs: [10.96.0.5, \"fd00::5\", 10.96.0.7]\n"),
                "s.yaml doc 1: Service prod/web: spec.clusterIPs: 3 entries (at most 2, one per IP family)",
            ),
            (
                svc("  clusterIP: 10.96.0.5\n  clusterIPs: [10.96.0.6]\n"),
                "s.yaml doc 1: Service prod/web: spec.clusterIPs[0]: \"10.96.0.6\" differs from spec.clusterIP \"10.96.0.5\"",
            ),
            (svc("  externalIPs: [192.0.2.1, 192.0.2]\n"), "s.yaml doc 1: Service prod/web: spec.externalIPs[1]: invalid IP address \"192.0.2\""),
            (
                format!("{SVC}status: {{loadBalancer: {{ingress: [{{ip: lb}}]}}}}\n"),
                "s.yaml doc 1: Service prod/web: status.loadBalancer.ingress[0].ip: invalid IP address \"lb\"",
            ),
            (svc("  ports: [{port: 0}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].port: port 0 out of range 1-65535"),
            (svc("  ports: [{port: 65536}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].port: port 65536 out of range 1-65535"),
            (
                svc("  ports: [{port: 80, protocol: ICMP}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[0].protocol: unknown protocol \"ICMP\" (expected TCP, UDP or SCTP)",
            ),
            (svc("  ports: [{port: 80, targetPort: 0}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].targetPort: port 0 out of range 1-65535"),
            (svc("  ports: [{port: 80, targetPort: 70000}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].targetPort: port 70000 out of range 1-65535"),
            (svc("  ports: [{port: 80, targetPort: \"8080\"}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].targetPort: invalid port name \"8080\""),
            (
                svc("  ports: [{port: 80, targetPort: Http_Port}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[0].targetPort: invalid port name \"Http_Port\"",
            ),
            (
                svc("  ports: [{name: a, port: 80}, {port: 81}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[1].name: required when the Service has more than one port",
            ),
            (
                svc("  ports: [{name: a, port: 80}, {name: a, port: 81}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[1].name: duplicate port name \"a\" (also spec.ports[0])",
            ),
            (svc("  ports: [{name: Web, port: 80}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].name: invalid name \"Web\""),
            (
                svc("  ports: [{name: a, port: 80}, {name: b, port: 80, protocol: TCP}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[1].port: duplicate port 80/TCP (also spec.ports[0])",
            ),
            (
                svc("  ports: [{port: 80, nodePort: 30080}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[0].nodePort: only a NodePort or LoadBalancer Service has node ports (type is ClusterIP)",
            ),
            (
                svc("  type: NodePort\n  ports: [{port: 80, nodePort: 70000}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[0].nodePort: port 70000 out of range 1-65535",
            ),
            (
                svc("  type: NodePort\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]\n"),
                "s.yaml doc 1: Service prod/web: spec.ports[1].nodePort: duplicate nodePort 30080/TCP (also spec.ports[0])",
            ),
            (svc("  sessionAffinity: Cookie\n"), "s.yaml doc 1: Service prod/web: spec.sessionAffinity: unknown value \"Cookie\" (expected None, ClientIP)"),
            (
                svc("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n"),
                "s.yaml doc 1: Service prod/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 out of range 1-86400",
            ),
            (
                svc("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n"),
                "s.yaml doc 1: Service prod/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 out of range 1-86400",
            ),
            (
                svc("  internalTrafficPolicy: Node\n"),
                "s.yaml doc 1: Service prod/web: spec.internalTrafficPolicy: unknown value \"Node\" (expected Cluster, Local)",
            ),
            (
                svc("  externalTrafficPolicy: Global\n"),
                "s.yaml doc 1: Service prod/web: spec.externalTrafficPolicy: unknown value \"Global\" (expected Cluster, Local)",
            ),
            (svc("  ports: [{port: http}]\n"), "s.yaml doc 1: Service prod/web: spec.ports[0].port: invalid type"),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {name: web.v2}\n".to_string(),
                "s.yaml doc 1: Service default/web.v2: metadata.name: invalid name \"web.v2\" (RFC 1123 label",
            ),
            (es("endpoints: []\n"), "s.yaml doc 1: EndpointSlice prod/web-1: addressType: missing"),
            (
                es("addressType: IP\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: addressType: unknown address type \"IP\" (expected IPv4, IPv6 or FQDN)",
            ),
            (
                es("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2, \"fd00::2\"]}]\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: endpoints[1].addresses[1]: fd00::2 is not an IPv4 address (addressType IPv4)",
            ),
            (
                es("addressType: IPv6\nendpoints: [{addresses: [10.0.0.1]}]\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: endpoints[0].addresses[0]: 10.0.0.1 is not an IPv6 address (addressType IPv6)",
            ),
            (
                es("addressType: IPv4\nendpoints: [{addresses: [10.0.0.x]}]\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: endpoints[0].addresses[0]: invalid IP address \"10.0.0.x\"",
            ),
            (
                es("addressType: IPv4\nendpoints: [{addresses: []}]\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: endpoints[0].addresses: at least one address is required",
            ),
            (
                es("addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], nodeName: Node_A}]\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: endpoints[0].nodeName: invalid name \"Node_A\"",
            ),
            (
                es("addressType: IPv4\nports: [{port: 0}]\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: ports[0].port: port 0 out of range 1-65535",
            ),
            (
                es("addressType: IPv4\nports: [{port: 80, protocol: icmp}]\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: ports[0].protocol: unknown protocol \"icmp\"",
            ),
            (
                es("addressType: IPv4\nports: [{name: http, port: 80}, {name: http, port: 81}]\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: ports[1].name: duplicate port name \"http\" (also ports[0])",
            ),
            (
                es("addressType: IPv4\nports: [{port: 80}, {port: 81}]\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: ports[1].name: duplicate port name \"\" (also ports[0])",
            ),
            (
                es("addressType: IPv4\nports: [{name: Http, port: 80}]\nendpoints: []\n"),
                "s.yaml doc 1: EndpointSlice prod/web-1: ports[0].name: invalid name \"Http\"",
            ),
            (
                ES.replace("service-name: web", "service-name: Web") + "addressType: IPv4\nendpoints: []\n",
                "s.yaml doc 1: EndpointSlice prod/web-1: metadata.labels[\"kubernetes.io/service-name\"]: not a Service name: invalid name \"Web\"",
            ),
            (es("addressType: IPv4\nendpoints: {}\n"), "s.yaml doc 1: EndpointSlice prod/web-1: endpoints: invalid type"),
        ];
        for (text, want) in cases {
            let got = load(&text).expect_err(&text);
            assert!(got.starts_with(want), "\n got: {got}\nwant: {want}...\n{text}");
        }
    }
}
