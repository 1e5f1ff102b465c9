//! Names of things in a test bed: endpoints (probe sources), targets (probe
//! destinations), and the topology (nodes, pods, their namespaces and addresses).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::manifest::Pod;
use crate::sys;

/// IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// Family of an address.
    pub fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        })
    }
}

impl FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "v4" | "4" | "ipv4" => Ok(Family::V4),
            "v6" | "6" | "ipv6" => Ok(Family::V6),
            _ => bail!("unknown family {s:?} (v4, v6)"),
        }
    }
}

/// Where a probe (or command) runs: inside a pod's netns, or in a node's host netns
/// (traffic then has the node's host identity).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    Pod { namespace: String, name: String },
    Node(String),
}

impl Endpoint {
    /// A pod endpoint.
    pub fn pod(namespace: &str, name: &str) -> Endpoint {
        Endpoint::Pod {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
    /// A node (host namespace) endpoint.
    pub fn node(name: &str) -> Endpoint {
        Endpoint::Node(name.into())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Endpoint::Node(n) => write!(f, "node:{n}"),
        }
    }
}

/// Parses "ns/name", "name" (namespace default) or "node:NAME".
impl FromStr for Endpoint {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Some(n) = s.strip_prefix("node:") {
            return Ok(Endpoint::node(n));
        }
        Ok(match s.split_once('/') {
            Some((ns, n)) => Endpoint::pod(ns, n),
            None => Endpoint::pod("default", s),
        })
    }
}

/// Where a probe goes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Target {
    /// A pod's IP of the given family.
    Pod {
        namespace: String,
        name: String,
        family: Family,
    },
    /// A node's IP of the given family.
    Node { name: String, family: Family },
    /// Any address.
    Ip(IpAddr),
}

impl Target {
    /// A pod's address of `family`.
    pub fn pod(namespace: &str, name: &str, family: Family) -> Target {
        Target::Pod {
            namespace: namespace.into(),
            name: name.into(),
            family,
        }
    }
    /// A node's address of `family`.
    pub fn node(name: &str, family: Family) -> Target {
        Target::Node {
            name: name.into(),
            family,
        }
    }
    /// The family of the address this target resolves to.
    pub fn family(&self) -> Family {
        match self {
            Target::Pod { family, .. } | Target::Node { family, .. } => *family,
            Target::Ip(ip) => Family::of(ip),
        }
    }
    /// Label without the family (for matrix columns).
    pub fn short_label(&self) -> String {
        match self {
            Target::Pod {
                namespace, name, ..
            } => format!("{namespace}/{name}"),
            Target::Node { name, .. } => format!("node:{name}"),
            Target::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ip(ip) => write!(f, "{ip}"),
            t => write!(f, "{}@{}", t.short_label(), t.family()),
        }
    }
}

/// Parses an IP, or `ns/name[@v4|@v6]`, `name[@fam]`, `node:NAME[@fam]` (default v4).
impl FromStr for Target {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Target::Ip(ip));
        }
        let (base, fam) = match s.rsplit_once('@') {
            Some((b, f)) => (b, f.parse()?),
            None => (s, Family::V4),
        };
        Ok(match base.parse::<Endpoint>()? {
            Endpoint::Pod { namespace, name } => Target::Pod {
                namespace,
                name,
                family: fam,
            },
            Endpoint::Node(name) => Target::Node { name, family: fam },
        })
    }
}

/// A simulated node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based index k (node IPs 10.255.0.k / fd00:255::k by default).
    pub index: u32,
    /// Netns name (`zt<run>-<node>`).
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Interface holding the node IPs: "zthost" (dummy) or "lo".
    pub host_if: String,
}

impl NodeInfo {
    /// The node IP of a family.
    pub fn ip(&self, f: Family) -> IpAddr {
        match f {
            Family::V4 => IpAddr::V4(self.ipv4),
            Family::V6 => IpAddr::V6(self.ipv6),
        }
    }
    /// Path of the node's netns.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }
}

/// A pod as set up in a test bed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    pub pod: Pod,
    /// Sequence number within the run (used in names).
    pub idx: u32,
    /// Netns name (`zt<run>-p<idx>`).
    pub netns: String,
    /// Host-side veth in the node netns (`zth<run><idx>`).
    pub host_veth: String,
    /// The pod's kubelet-style cgroup directory.
    pub cgroup: PathBuf,
    /// PID of the pod's server process (0 when none).
    pub server_pid: u32,
}

impl PodInfo {
    /// The pod's IP of a family.
    pub fn ip(&self, f: Family) -> Option<IpAddr> {
        match f {
            Family::V4 => self.pod.ipv4.map(IpAddr::V4),
            Family::V6 => self.pod.ipv6.map(IpAddr::V6),
        }
    }
    /// Path of the pod's netns.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }
}

/// Nodes and pods of a test bed (also saved as JSON under the run dir so the CLI can
/// probe a running bed).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Topology {
    pub run_id: String,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
}

impl Topology {
    /// A node by name.
    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }
    /// A pod by namespace and name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.pod.namespace == namespace && p.pod.name == name)
    }
    /// The netns name of an endpoint.
    pub fn netns_of(&self, ep: &Endpoint) -> Result<String> {
        match ep {
            Endpoint::Pod { namespace, name } => self
                .pod(namespace, name)
                .map(|p| p.netns.clone())
                .ok_or_else(|| anyhow!("no pod {namespace}/{name} in the test bed")),
            Endpoint::Node(n) => self
                .node(n)
                .map(|n| n.netns.clone())
                .ok_or_else(|| anyhow!("no node {n} in the test bed")),
        }
    }
    /// The address a target resolves to.
    pub fn ip_of(&self, t: &Target) -> Result<IpAddr> {
        match t {
            Target::Ip(ip) => Ok(*ip),
            Target::Pod {
                namespace,
                name,
                family,
            } => self
                .pod(namespace, name)
                .ok_or_else(|| anyhow!("no pod {namespace}/{name} in the test bed"))?
                .ip(*family)
                .ok_or_else(|| anyhow!("pod {namespace}/{name} has no {family} address")),
            Target::Node { name, family } => Ok(self
                .node(name)
                .ok_or_else(|| anyhow!("no node {name} in the test bed"))?
                .ip(*family)),
        }
    }
    /// Save as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
    /// Load a saved topology.
    pub fn load(path: &Path) -> Result<Topology> {
        let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&b)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        assert_eq!(
            "a".parse::<Endpoint>().unwrap(),
            Endpoint::pod("default", "a")
        );
        assert_eq!("x/a".parse::<Endpoint>().unwrap(), Endpoint::pod("x", "a"));
        assert_eq!("node:n1".parse::<Endpoint>().unwrap(), Endpoint::node("n1"));
        assert_eq!(
            "x/a@v6".parse::<Target>().unwrap(),
            Target::pod("x", "a", Family::V6)
        );
        assert_eq!(
            "b".parse::<Target>().unwrap(),
            Target::pod("default", "b", Family::V4)
        );
        assert_eq!(
            "node:n@v6".parse::<Target>().unwrap(),
            Target::node("n", Family::V6)
        );
        assert_eq!(
            "fd00::1".parse::<Target>().unwrap(),
            Target::Ip("fd00::1".parse().unwrap())
        );
    }
}
