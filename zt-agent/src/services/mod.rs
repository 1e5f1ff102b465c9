//! The agent's Service state: which (address, port, protocol) a pod may connect to as a
//! Service frontend, and the backends kube-proxy would send it to. Built from the
//! cluster state's Services and EndpointSlices (`table::build`, kube-proxy's rules),
//! published in the agent's snapshot for `ztctl services`; the socket-level translation
//! writes it to its maps.

pub mod destroy;
pub mod identities;
pub mod judge;
pub mod maps;
pub mod table;

pub use table::{build, nodeport_ips};

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One translatable frontend: an address, port and L4 protocol a pod may connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendEntry {
    /// (namespace, name)
    pub service: (String, String),
    /// The Service port's name ("" if unnamed).
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted, deduplicated; same family as the frontend. Empty: the frontend exists but
    /// has no endpoint.
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// No endpoint is ready: `backends` are the serving-and-terminating ones (kube-proxy's
    /// fallback while a rollout replaces the last ready pod).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
}

/// Every frontend of the cluster state as seen from one node. In JSON (`state.json`,
/// `ztctl services -o json`) `frontends` is a list of objects, each a frontend's fields
/// and its entry's side by side (JSON object keys cannot be structs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceTable {
    #[serde(with = "frontend_list")]
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
}

impl ServiceTable {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty()
    }
}

/// Every backend address of the Service `name` (namespace, name), if given.
pub fn backend_addresses(table: &ServiceTable, name: Option<&(String, String)>) -> Vec<IpAddr> {
    let Some(name) = name else { return vec![] };
    let mut out: Vec<IpAddr> = table.frontends.values().filter(|e| &e.service == name).flat_map(|e| e.backends.iter().map(|b| b.addr)).collect();
    out.sort();
    out.dedup();
    out
}

/// The IP protocol's name as Kubernetes spells it.
pub fn proto_name(proto: u8) -> String {
    match proto {
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}"),
    }
}

/// `10.96.0.10:53/UDP`, `[fd00::10]:53/UDP`.
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, proto_name(self.proto)),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, proto_name(self.proto)),
        }
    }
}

/// `10.0.0.1:8080`, `[fd00::1]:8080`.
impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::NodePort => "NodePort",
        })
    }
}

/// `frontends` as a JSON list of `{addr, port, proto, service, port_name, kind, ...}`.
mod frontend_list {
    use super::*;
    use serde::{Deserializer, Serializer};

    #[derive(Serialize)]
    struct RowRef<'a> {
        #[serde(flatten)]
        frontend: &'a Frontend,
        #[serde(flatten)]
        entry: &'a FrontendEntry,
    }

    #[derive(Deserialize)]
    struct Row {
        #[serde(flatten)]
        frontend: Frontend,
        #[serde(flatten)]
        entry: FrontendEntry,
    }

    pub fn serialize<S: Serializer>(m: &BTreeMap<Frontend, FrontendEntry>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter().map(|(frontend, entry)| RowRef { frontend, entry }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<Frontend, FrontendEntry>, D::Error> {
        let rows: Vec<Row> = Vec::deserialize(d)?;
        Ok(rows.into_iter().map(|r| (r.frontend, r.entry)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_display() {
        let fe = Frontend { addr: "fd00:96::10".parse().unwrap(), port: 53, proto: 17 };
        let entry = FrontendEntry {
            service: ("kube-system".into(), "kube-dns".into()),
            port_name: "dns".into(),
            kind: FrontendKind::ClusterIp,
            backends: vec![Backend { addr: "fd00::1".parse().unwrap(), port: 53 }],
            affinity_timeout_s: 0,
            terminating: false,
        };
        let t = ServiceTable { frontends: BTreeMap::from([(fe, entry)]) };
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"frontends": [{
                "addr": "fd00:96::10", "port": 53, "proto": 17,
                "service": ["kube-system", "kube-dns"], "port_name": "dns", "kind": "ClusterIp",
                "backends": [{"addr": "fd00::1", "port": 53}], "affinity_timeout_s": 0
            }]})
        );
        let back: ServiceTable = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        assert_eq!(fe.to_string(), "[fd00:96::10]:53/UDP");
        assert_eq!(t.frontends[&fe].backends[0].to_string(), "[fd00::1]:53");
        let v4 = Frontend { addr: "10.96.0.10".parse().unwrap(), port: 8000, proto: 6 };
        assert_eq!(v4.to_string(), "10.96.0.10:8000/TCP");
        assert_eq!(FrontendKind::LoadBalancer.to_string(), "LoadBalancer");
    }
}
