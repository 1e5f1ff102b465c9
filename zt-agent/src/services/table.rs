//! Services and EndpointSlices -> the Service table, with kube-proxy's rules:
//!
//! - Frontends: every address of `spec.clusterIPs` (or `spec.clusterIP`),
//!   `spec.externalIPs` and `status.loadBalancer.ingress[].ip` (not with `ipMode: Proxy`,
//!   which kube-proxy leaves to the load balancer), and for NodePort and
//!   LoadBalancer Services the `nodePort` on each of the node's addresses; each Service
//!   port with its protocol. Headless (`clusterIP: None`) and ExternalName Services have
//!   none. kube-proxy runs one proxier per IP family and hands each only the Services
//!   with a clusterIP of its family, so an external, load-balancer or node address of a
//!   family the Service has no clusterIP in gives no frontend either.
//! - Backends: the EndpointSlices labelled `kubernetes.io/service-name=<service>` in
//!   the Service's namespace whose addressType is the frontend's family (FQDN slices are
//!   ignored). The port is the slice's port with the Service port's name and protocol,
//!   which is how a named targetPort resolves per endpoint (slices may carry different
//!   numbers); a slice without such a port, or whose port has no number, contributes
//!   nothing. An endpoint's first address is its address (as kube-proxy reads it).
//! - Endpoint choice: the ready endpoints (`conditions.ready` unset counts as ready);
//!   if none is ready, the ones both serving and terminating. `internalTrafficPolicy:
//!   Local` keeps only endpoints whose `nodeName` is this node, for the ClusterIP
//!   frontends: traffic from pods to external, load-balancer and node addresses goes to
//!   every endpoint whatever the policies (kube-proxy short-circuits pod traffic to
//!   the cluster-wide endpoints; `externalTrafficPolicy` is about traffic from outside).
//! - `sessionAffinity: ClientIP`: `sessionAffinityConfig.clientIP.timeoutSeconds`
//!   (default 10800).
//!
//! A frontend two Services claim stays with the first in (namespace, name) order; the
//! other gets a warning. The objects were validated by the sources
//! (`model::service`), so nothing here fails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

use super::{Backend, Frontend, FrontendEntry, FrontendKind, ServiceTable};
use crate::model::k8s::protocol_number;
use crate::model::service::{service_type, EndpointSlice, DEFAULT_AFFINITY_TIMEOUT_S, SERVICE_NAME_LABEL};
use crate::model::{ClusterState, ObjectKey};

/// The Service table of `cluster` as seen from node `node_name` with addresses
/// `node_ips` (NodePort frontends), and warnings naming the objects they are about.
pub fn build(cluster: &ClusterState, node_name: &str, node_ips: &[IpAddr]) -> (ServiceTable, Vec<String>) {
    let node_ips: BTreeSet<IpAddr> = node_ips.iter().copied().filter(node_port_address).collect();
    let mut slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for ((ns, _), es) in &cluster.endpoint_slices {
        if let Some(svc) = es.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            slices.entry((ns.clone(), svc.clone())).or_default().push(es);
        }
    }
    let mut b = Builder { table: ServiceTable::default(), warnings: vec![] };
    for (key, svc) in &cluster.services {
        let Some(spec) = &svc.spec else { continue };
        // Served by another proxy, not kube-proxy: zt must not judge its addresses as
        // if kube-proxy DNATed them.
        if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key("service.kubernetes.io/service-proxy-name")) {
            continue;
        }
        let ty = service_type(svc);
        if ty == "ExternalName" {
            continue;
        }
        let what = format!("Service {}/{}", key.0, key.1);
        let raw_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => spec.cluster_ip.as_deref().into_iter().filter(|s| !s.is_empty()).collect(),
        };
        if raw_ips.first() == Some(&"None") {
            continue; // headless: clients reach the pods' own addresses
        }
        let cluster_ips: Vec<IpAddr> = raw_ips.iter().filter_map(|s| s.parse().ok()).collect();
        if cluster_ips.is_empty() {
            b.warnings
                .push(format!("{what}: spec.clusterIP is not set, so the Service has no frontend (the API server allocates one; a manifest must name it)"));
            continue;
        }
        let families: BTreeSet<bool> = cluster_ips.iter().map(IpAddr::is_ipv4).collect();
        let mut external: Vec<(IpAddr, FrontendKind)> = vec![];
        for (i, s) in spec.external_ips.iter().flatten().enumerate() {
            if let Ok(ip) = s.parse::<IpAddr>() {
                if families.contains(&ip.is_ipv4()) {
                    external.push((ip, FrontendKind::ExternalIp));
                } else {
                    b.warnings.push(format!("{what}: spec.externalIPs[{i}] {ip}: no clusterIP of its family, no frontend"));
                }
            }
        }
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_deref()).unwrap_or(&[]);
        for (i, ing) in ingress.iter().enumerate() {
            // ipMode Proxy: kube-proxy does not DNAT it; traffic goes to the load balancer.
            if ing.ip_mode.as_deref() == Some("Proxy") {
                continue;
            }
            if let Some(ip) = ing.ip.as_deref().and_then(|s| s.parse::<IpAddr>().ok()) {
                if families.contains(&ip.is_ipv4()) {
                    external.push((ip, FrontendKind::LoadBalancer));
                } else {
                    b.warnings.push(format!("{what}: status.loadBalancer.ingress[{i}].ip {ip}: no clusterIP of its family, no frontend"));
                }
            }
        }
        let slices = slices.get(key).map(Vec::as_slice).unwrap_or(&[]);
        let affinity_timeout_s = affinity_timeout(spec);
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        for (i, port) in spec.ports.iter().flatten().enumerate() {
            let Ok(number) = u16::try_from(port.port) else { continue };
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            let Some(proto) = protocol_number(Some(protocol)) else { continue };
            let port_name = port.name.clone().unwrap_or_default();
            let candidates = Candidates::collect(slices, &port_name, protocol, node_name);
            let entry = |kind, ip: &IpAddr, local: bool| {
                let (backends, terminating) = candidates.select(ip.is_ipv4(), local);
                FrontendEntry { service: key.clone(), port_name: port_name.clone(), kind, backends, affinity_timeout_s, terminating }
            };
            for ip in &cluster_ips {
                b.add(Frontend { addr: *ip, port: number, proto }, entry(FrontendKind::ClusterIp, ip, local_only));
            }
            for (ip, kind) in &external {
                b.add(Frontend { addr: *ip, port: number, proto }, entry(*kind, ip, false));
            }
            if !matches!(ty, "NodePort" | "LoadBalancer") {
                continue;
            }
            match node_port(port) {
                Some(np) => {
                    for ip in node_ips.iter().filter(|ip| families.contains(&ip.is_ipv4())) {
                        b.add(Frontend { addr: *ip, port: np, proto }, entry(FrontendKind::NodePort, ip, false));
                    }
                }
                // A LoadBalancer may do without (allocateLoadBalancerNodePorts: false).
                None if ty == "NodePort" => b.warnings.push(format!(
                    "{what}: spec.ports[{i}].nodePort is not set, so it has no NodePort frontend (the API server allocates one; a manifest must name it)"
                )),
                None => {}
            }
        }
    }
    (b.table, b.warnings)
}

struct Builder {
    table: ServiceTable,
    warnings: Vec<String>,
}

impl Builder {
    /// Adds a frontend unless an earlier Service (or an earlier address of the same
    /// Service) holds it. A ClusterIP (allocated by the API server, unique) always wins
    /// over an external, load-balancer or node address any Service may name
    /// (CVE-2020-8554: a Service claiming another's ClusterIP as its externalIP).
    fn add(&mut self, fe: Frontend, entry: FrontendEntry) {
        match self.table.frontends.get(&fe) {
            None => {
                self.table.frontends.insert(fe, entry);
            }
            Some(first) if first.service == entry.service => {}
            Some(first) if entry.kind == FrontendKind::ClusterIp && first.kind != FrontendKind::ClusterIp => {
                self.warnings.push(format!(
                    "Service {}/{}: frontend {fe} ({}) is Service {}/{}'s ClusterIP; the {} of {}/{} is ignored",
                    first.service.0, first.service.1, first.kind, entry.service.0, entry.service.1, first.kind, first.service.0, first.service.1
                ));
                self.table.frontends.insert(fe, entry);
            }
            Some(first) => self.warnings.push(format!(
                "Service {}/{}: frontend {fe} ({}) is already Service {}/{}'s ({}); it stays theirs",
                entry.service.0, entry.service.1, entry.kind, first.service.0, first.service.1, first.kind
            )),
        }
    }
}

/// The node's addresses inside `allowed` (`--nodeport-addresses`; empty: all of them).
pub fn nodeport_ips(host_ips: &[IpAddr], allowed: &[crate::state::Cidr]) -> Vec<IpAddr> {
    let host = |ip: &IpAddr| crate::state::Cidr { addr: ip.to_canonical(), prefix: if ip.to_canonical().is_ipv4() { 32 } else { 128 } };
    host_ips.iter().copied().filter(|ip| allowed.is_empty() || allowed.iter().any(|c| crate::compile::cidr::contains(c, &host(ip)))).collect()
}

/// Node addresses that carry NodePorts for pods: not loopback (a pod's own), not
/// unspecified or multicast, not IPv6 link-local (needs a scope).
fn node_port_address(ip: &IpAddr) -> bool {
    let link_local_v6 = matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || link_local_v6)
}

fn node_port(p: &ServicePort) -> Option<u16> {
    p.node_port.filter(|n| *n != 0).and_then(|n| u16::try_from(n).ok())
}

fn affinity_timeout(spec: &ServiceSpec) -> u32 {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return 0;
    }
    spec.session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
}

/// One endpoint of one Service port, as kube-proxy reads it.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    backend: Backend,
    ready: bool,
    serving: bool,
    terminating: bool,
    local: bool,
}

/// Every endpoint of one Service port, both families, deduplicated by address and port.
struct Candidates(Vec<Candidate>);

impl Candidates {
    fn collect(slices: &[&EndpointSlice], port_name: &str, protocol: &str, node_name: &str) -> Candidates {
        let mut by_backend: BTreeMap<Backend, Candidate> = BTreeMap::new();
        for es in slices {
            let v4 = match es.address_type.as_str() {
                "IPv4" => true,
                "IPv6" => false,
                _ => continue, // FQDN: nothing to translate to
            };
            let port = es.ports.iter().flatten().find(|p| p.name.as_deref().unwrap_or("") == port_name && p.protocol.as_deref().unwrap_or("TCP") == protocol);
            // No such port, or one without a number ("all ports", which kube-proxy skips).
            let Some(port) = port.and_then(|p| p.port).and_then(|n| u16::try_from(n).ok()) else { continue };
            for ep in &es.endpoints {
                let Some(addr) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else { continue };
                if addr.is_ipv4() != v4 {
                    continue;
                }
                let c = ep.conditions.as_ref();
                let cand = Candidate {
                    backend: Backend { addr, port },
                    ready: c.and_then(|c| c.ready).unwrap_or(true),
                    serving: c.and_then(|c| c.serving).unwrap_or(true),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                    local: ep.node_name.as_deref() == Some(node_name),
                };
                // Overlapping slices (mid-update): the first copy holds, a local one wins.
                match by_backend.get(&cand.backend) {
                    Some(have) if !cand.local || have.local => {}
                    _ => {
                        by_backend.insert(cand.backend, cand);
                    }
                }
            }
        }
        Candidates(by_backend.into_values().collect())
    }

    /// The backends of one family: ready ones, else serving-and-terminating ones (then
    /// `true`); only this node's with `local_only`. Sorted (the candidates are).
    fn select(&self, v4: bool, local_only: bool) -> (Vec<Backend>, bool) {
        let pool: Vec<&Candidate> = self.0.iter().filter(|c| c.backend.addr.is_ipv4() == v4 && (!local_only || c.local)).collect();
        let ready: Vec<Backend> = pool.iter().filter(|c| c.ready).map(|c| c.backend).collect();
        if !ready.is_empty() {
            return (ready, false);
        }
        let terminating: Vec<Backend> = pool.iter().filter(|c| c.serving && c.terminating).map(|c| c.backend).collect();
        let any = !terminating.is_empty();
        (terminating, any)
    }
}

#[cfg(test)]
mod tests;
