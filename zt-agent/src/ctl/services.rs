//! `ztctl services`: every Service frontend this node translates (ClusterIP, external,
//! load-balancer and node addresses), with the backends behind it and who they are:
//! the identity the datapath resolves each backend address to (pinned `ZT_ENDPOINTS`,
//! then `ZT_CIDRS`, else world) and its pod. The table is the agent's (`state.json`).
use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use serde::Serialize;
use zt_common::*;

use crate::events::Snapshot;
use crate::net::to_key;
use crate::pins::PinnedMaps;
use crate::services::{proto_name, Frontend, FrontendEntry};

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    /// `10.96.0.10:53/UDP`
    pub frontend: String,
    pub addr: IpAddr,
    pub port: u16,
    pub proto: String,
    /// ClusterIP, ExternalIP, LoadBalancer or NodePort.
    pub kind: String,
    /// `namespace/name`
    pub service: String,
    pub port_name: String,
    /// sessionAffinity ClientIP timeout; 0: none.
    pub affinity_timeout_s: u32,
    /// Empty: the frontend has no endpoint.
    pub backends: Vec<BackendRow>,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct BackendRow {
    pub addr: IpAddr,
    pub port: u16,
    pub identity: u32,
    pub spiffe_id: String,
    pub pod: Option<String>,
    /// `ready`, or `serving-terminating` when no endpoint of the Service is ready
    /// (kube-proxy's fallback).
    pub condition: String,
}

/// The identity the datapath gives `ip`: its endpoint, else the longest CIDR, else world.
pub fn identity_from_maps(maps: &PinnedMaps, ip: IpAddr) -> u32 {
    if let Ok(ep) = maps.endpoints.get(&EndpointKey { addr: to_key(ip) }, 0) {
        return ep.identity;
    }
    match maps.cidrs.get(&Key::new(128, CidrKey { addr: to_key(ip) }), 0) {
        Ok(c) => c.identity,
        Err(_) => IDENTITY_WORLD,
    }
}

/// `service` filter: `namespace/name`, or a name in any namespace.
fn selected(entry: &FrontendEntry, service: Option<&str>) -> bool {
    let (ns, name) = (&entry.service.0, &entry.service.1);
    match service {
        None => true,
        Some(f) => match f.split_once('/') {
            Some((fns, fname)) => fns == ns && fname == name,
            None => f == name,
        },
    }
}

/// One row per frontend (in frontend order), backends with their identities.
pub fn rows(snap: &Snapshot, identity_of: impl Fn(IpAddr) -> u32, service: Option<&str>) -> Vec<ServiceRow> {
    snap.services
        .frontends
        .iter()
        .filter(|(_, e)| selected(e, service))
        .map(|(fe, e): (&Frontend, &FrontendEntry)| ServiceRow {
            frontend: fe.to_string(),
            addr: fe.addr,
            port: fe.port,
            proto: proto_name(fe.proto),
            kind: e.kind.to_string(),
            service: format!("{}/{}", e.service.0, e.service.1),
            port_name: e.port_name.clone(),
            affinity_timeout_s: e.affinity_timeout_s,
            backends: e
                .backends
                .iter()
                .map(|b| {
                    let identity = identity_of(b.addr);
                    BackendRow {
                        addr: b.addr,
                        port: b.port,
                        identity,
                        spiffe_id: snap.identity_name(identity),
                        pod: snap.pods.get(&b.addr).map(|p| format!("{}/{}", p.namespace, p.name)),
                        condition: if e.terminating { "serving-terminating" } else { "ready" }.into(),
                    }
                })
                .collect(),
        })
        .collect()
}

pub fn table_header() -> String {
    format!("{:<44} {:<12} {:<40} {:<16} {:<9} BACKENDS", "FRONTEND", "KIND", "SERVICE", "PORT", "AFFINITY")
}

/// The frontend's line, then one indented line per backend.
pub fn table_row(r: &ServiceRow) -> String {
    let affinity = if r.affinity_timeout_s > 0 { format!("{}s", r.affinity_timeout_s) } else { "-".into() };
    let port = if r.port_name.is_empty() { "-" } else { &r.port_name };
    let mut s = format!("{:<44} {:<12} {:<40} {:<16} {:<9} {}", r.frontend, r.kind, r.service, port, affinity, r.backends.len());
    if r.backends.is_empty() {
        s.push_str("\n    -> no endpoint");
    }
    for b in &r.backends {
        let addr = match b.addr {
            IpAddr::V4(a) => format!("{a}:{}", b.port),
            IpAddr::V6(a) => format!("[{a}]:{}", b.port),
        };
        s.push_str(&format!("\n    -> {addr:<42} {:<8} {:<56} {:<20} {}", b.identity, b.spiffe_id, b.condition, b.pod.as_deref().unwrap_or("-")));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::services::{Backend, FrontendKind, ServiceTable};
    use crate::state::{IdentityInfo, PodRef};

    fn snapshot() -> Snapshot {
        let fe = |a: &str, port, proto| Frontend { addr: a.parse().unwrap(), port, proto };
        let be = |a: &str, port| Backend { addr: a.parse().unwrap(), port };
        let entry = |ns: &str, name: &str, port: &str, kind, backends, affinity| FrontendEntry {
            service: (ns.into(), name.into()),
            port_name: port.into(),
            kind,
            backends,
            affinity_timeout_s: affinity,
            terminating: false,
        };
        let frontends = BTreeMap::from([
            (fe("10.96.0.80", 8000, 6), entry("default", "httpbin", "http", FrontendKind::ClusterIp, vec![be("10.201.0.10", 80), be("192.0.2.1", 80)], 0)),
            (fe("fd00:96::80", 8000, 6), entry("default", "httpbin", "http", FrontendKind::ClusterIp, vec![], 0)),
            (fe("10.96.0.10", 53, 17), entry("kube-system", "kube-dns", "", FrontendKind::ClusterIp, vec![], 10800)),
        ]);
        let mut snap = Snapshot { services: ServiceTable { frontends }, ..Default::default() };
        snap.identities.insert(300, IdentityInfo { id: 300, spiffe_id: "spiffe://cluster.local/ns/default/sa/httpbin".into(), labels: Default::default() });
        snap.pods.insert("10.201.0.10".parse().unwrap(), PodRef { namespace: "default".into(), name: "httpbin".into() });
        snap
    }

    fn identity(ip: IpAddr) -> u32 {
        if ip.to_string() == "10.201.0.10" {
            300
        } else {
            IDENTITY_WORLD
        }
    }

    #[test]
    fn frontends_with_backend_identities_and_pods() {
        let rows = rows(&snapshot(), identity, None);
        let fronts: Vec<&str> = rows.iter().map(|r| r.frontend.as_str()).collect();
        assert_eq!(fronts, ["10.96.0.10:53/UDP", "10.96.0.80:8000/TCP", "[fd00:96::80]:8000/TCP"]);
        let web = &rows[1];
        assert_eq!((web.kind.as_str(), web.service.as_str(), web.port_name.as_str(), web.proto.as_str()), ("ClusterIP", "default/httpbin", "http", "TCP"));
        assert_eq!(
            web.backends,
            [
                BackendRow {
                    addr: "10.201.0.10".parse().unwrap(),
                    port: 80,
                    identity: 300,
                    spiffe_id: "spiffe://cluster.local/ns/default/sa/httpbin".into(),
                    pod: Some("default/httpbin".into()),
                    condition: "ready".into(),
                },
                BackendRow {
                    addr: "192.0.2.1".parse().unwrap(),
                    port: 80,
                    identity: IDENTITY_WORLD,
                    spiffe_id: "reserved:world".into(),
                    pod: None,
                    condition: "ready".into(),
                },
            ]
        );
        let text = table_row(web);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("10.96.0.80:8000/TCP") && lines[0].ends_with(" 2"), "{text}");
        assert!(
            lines[1].contains("10.201.0.10:80")
                && lines[1].contains("spiffe://cluster.local/ns/default/sa/httpbin")
                && lines[1].contains(" ready ")
                && lines[1].ends_with("default/httpbin"),
            "{text}"
        );
        assert!(lines[2].contains("192.0.2.1:80") && lines[2].contains("reserved:world") && lines[2].ends_with(" -"), "{text}");
        let dns = table_row(&rows[0]);
        assert!(dns.contains("10800s") && dns.ends_with("-> no endpoint"), "{dns}");
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["frontend"], "10.96.0.10:53/UDP");
        assert_eq!(json["backends"], serde_json::json!([]));
    }

    #[test]
    fn filter_by_service() {
        let snap = snapshot();
        assert_eq!(rows(&snap, identity, Some("httpbin")).len(), 2);
        assert_eq!(rows(&snap, identity, Some("default/httpbin")).len(), 2);
        assert_eq!(rows(&snap, identity, Some("kube-system/httpbin")).len(), 0);
        assert_eq!(rows(&snap, identity, Some("kube-system/kube-dns")).len(), 1);
    }
}
