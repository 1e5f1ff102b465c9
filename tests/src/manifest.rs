//! A minimal, agent-independent Kubernetes manifest reader: only what the test bed
//! needs from `Pod` (and optionally `Node`) objects. Every other kind is ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Node name used for pods without `spec.nodeName`.
pub const DEFAULT_NODE: &str = "node1";

/// Layer-4 protocol of a container port (and of probes, plus ICMP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl Proto {
    /// Upper-case Kubernetes spelling ("TCP", ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
            Proto::Icmp => "ICMP",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str().to_ascii_lowercase())
    }
}

impl std::str::FromStr for Proto {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "sctp" => Proto::Sctp,
            "icmp" | "ping" => Proto::Icmp,
            _ => bail!("unknown protocol {s:?} (tcp, udp, sctp, icmp)"),
        })
    }
}

/// A declared container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub port: u16,
    pub proto: Proto,
    /// `ports[].name`; a TCP port whose name starts with "echo" gets a line-echo server.
    pub name: Option<String>,
}

impl Port {
    /// True if the test bed runs a line-echo server (for [`crate::TcpFlow`]) on this port.
    pub fn is_echo(&self) -> bool {
        self.proto == Proto::Tcp && self.name.as_deref().is_some_and(|n| n.starts_with("echo"))
    }
}

/// The parts of a Pod the test bed uses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `metadata.uid`; a deterministic one is made up when missing.
    pub uid: String,
    /// `spec.nodeName`, default [`DEFAULT_NODE`].
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub ports: Vec<Port>,
}

impl Pod {
    /// A pod with the given addresses and ports on `node`; uid derived from ns/name.
    pub fn new(
        namespace: &str,
        name: &str,
        node: &str,
        ips: &[IpAddr],
        ports: &[(Proto, u16)],
    ) -> Pod {
        let mut p = Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: fake_uid(namespace, name),
            node: node.into(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            service_account: None,
            ipv4: None,
            ipv6: None,
            ports: ports
                .iter()
                .map(|&(proto, port)| Port {
                    port,
                    proto,
                    name: None,
                })
                .collect(),
        };
        for ip in ips {
            match ip {
                IpAddr::V4(a) => p.ipv4 = Some(*a),
                IpAddr::V6(a) => p.ipv6 = Some(*a),
            }
        }
        p
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// All pod IPs (v4 first).
    pub fn ips(&self) -> Vec<IpAddr> {
        self.ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.ipv6.map(IpAddr::V6))
            .collect()
    }

    /// A Pod manifest (YAML) for this pod, e.g. to add it to an agent's manifest dir.
    pub fn to_yaml(&self) -> String {
        let mut s = String::new();
        s.push_str("apiVersion: v1\nkind: Pod\nmetadata:\n");
        s.push_str(&format!(
            "  name: {}\n  namespace: {}\n  uid: {}\n",
            q(&self.name),
            q(&self.namespace),
            q(&self.uid)
        ));
        if !self.labels.is_empty() {
            s.push_str("  labels:\n");
            for (k, v) in &self.labels {
                s.push_str(&format!("    {}: {}\n", q(k), q(v)));
            }
        }
        s.push_str(&format!("spec:\n  nodeName: {}\n", q(&self.node)));
        if let Some(sa) = &self.service_account {
            s.push_str(&format!("  serviceAccountName: {}\n", q(sa)));
        }
        s.push_str("  containers:\n  - name: main\n    image: testbed\n");
        if !self.ports.is_empty() {
            s.push_str("    ports:\n");
            for p in &self.ports {
                s.push_str(&format!(
                    "    - containerPort: {}\n      protocol: {}\n",
                    p.port,
                    p.proto.as_str()
                ));
                if let Some(n) = &p.name {
                    s.push_str(&format!("      name: {}\n", q(n)));
                }
            }
        }
        let ips = self.ips();
        if let Some(first) = ips.first() {
            s.push_str(&format!(
                "status:\n  phase: Running\n  podIP: {}\n  podIPs:\n",
                q(&first.to_string())
            ));
            for ip in &ips {
                s.push_str(&format!("  - ip: {}\n", q(&ip.to_string())));
            }
        }
        s
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A deterministic uid-looking string for pods without `metadata.uid`.
pub fn fake_uid(namespace: &str, name: &str) -> String {
    // FNV-1a, twice with different seeds, formatted like a UUID.
    let h = |seed: u64| {
        let mut x = seed;
        for b in namespace.bytes().chain([b'/']).chain(name.bytes()) {
            x ^= b as u64;
            x = x.wrapping_mul(0x100000001b3);
        }
        x
    };
    let a = h(0xcbf29ce484222325);
    let b = h(0x84222325cbf29ce4);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        a as u16,
        (b >> 48) as u16,
        b & 0xffff_ffff_ffff
    )
}

/// A Node object (optional in the manifests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeObj {
    pub name: String,
    /// `status.addresses[type=InternalIP]`, overriding the test bed's default node IPs.
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// Everything read from a manifest directory.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub pods: Vec<Pod>,
    pub nodes: Vec<NodeObj>,
}

// ---- raw serde structs -------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawMeta {
    name: String,
    namespace: Option<String>,
    uid: Option<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawPodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    containers: Vec<RawContainer>,
    init_containers: Vec<RawContainer>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawContainer {
    ports: Vec<RawPort>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawPort {
    container_port: u16,
    protocol: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Vec<RawIp>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawIp {
    ip: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawPod {
    metadata: RawMeta,
    spec: RawPodSpec,
    status: RawPodStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNode {
    metadata: RawMeta,
    status: RawNodeStatus,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNodeStatus {
    addresses: Vec<RawAddr>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawAddr {
    #[serde(rename = "type")]
    typ: String,
    address: String,
}

fn convert_pod(raw: RawPod) -> Result<Pod> {
    let ns = raw.metadata.namespace.unwrap_or_else(|| "default".into());
    let name = raw.metadata.name;
    if name.is_empty() {
        bail!("Pod without metadata.name");
    }
    let mut pod = Pod {
        uid: raw.metadata.uid.unwrap_or_else(|| fake_uid(&ns, &name)),
        namespace: ns,
        name,
        node: raw.spec.node_name.unwrap_or_else(|| DEFAULT_NODE.into()),
        labels: raw.metadata.labels,
        service_account: raw.spec.service_account_name,
        ipv4: None,
        ipv6: None,
        ports: vec![],
    };
    let ips = raw
        .status
        .pod_ip
        .into_iter()
        .chain(raw.status.pod_ips.into_iter().map(|i| i.ip));
    for ip in ips {
        let ip: IpAddr = ip
            .parse()
            .with_context(|| format!("pod {}: bad IP {ip:?}", pod.key()))?;
        match ip {
            IpAddr::V4(a) => {
                pod.ipv4.get_or_insert(a);
            }
            IpAddr::V6(a) => {
                pod.ipv6.get_or_insert(a);
            }
        }
    }
    for c in raw
        .spec
        .containers
        .iter()
        .chain(raw.spec.init_containers.iter())
    {
        for p in &c.ports {
            let proto = match p.protocol.as_deref() {
                None => Proto::Tcp,
                Some(s) => match s.to_ascii_uppercase().as_str() {
                    "TCP" => Proto::Tcp,
                    "UDP" => Proto::Udp,
                    "SCTP" => Proto::Sctp,
                    _ => bail!("pod {}: unknown port protocol {s:?}", pod.key()),
                },
            };
            if p.container_port == 0 {
                bail!("pod {}: containerPort missing or 0", pod.key());
            }
            let port = Port {
                port: p.container_port,
                proto,
                name: p.name.clone(),
            };
            if !pod
                .ports
                .iter()
                .any(|x| x.port == port.port && x.proto == port.proto)
            {
                pod.ports.push(port);
            }
        }
    }
    Ok(pod)
}

fn convert_node(raw: RawNode) -> NodeObj {
    let mut n = NodeObj {
        name: raw.metadata.name,
        ipv4: None,
        ipv6: None,
    };
    for a in raw.status.addresses {
        if a.typ != "InternalIP" {
            continue;
        }
        match a.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v)) => n.ipv4 = n.ipv4.or(Some(v)),
            Ok(IpAddr::V6(v)) => n.ipv6 = n.ipv6.or(Some(v)),
            Err(_) => {}
        }
    }
    n
}

impl Manifests {
    /// Parse one YAML text (multi-document, `kind: List` supported).
    pub fn parse_str(text: &str, origin: &str) -> Result<Manifests> {
        let mut m = Manifests::default();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_yaml::Value::deserialize(doc)
                .with_context(|| format!("{origin}: bad YAML"))?;
            m.add_value(v, origin)?;
        }
        Ok(m)
    }

    fn add_value(&mut self, v: serde_yaml::Value, origin: &str) -> Result<()> {
        if v.is_null() {
            return Ok(());
        }
        let kind = v
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        match kind.as_str() {
            "Pod" => {
                let raw: RawPod =
                    serde_yaml::from_value(v).with_context(|| format!("{origin}: bad Pod"))?;
                self.pods
                    .push(convert_pod(raw).with_context(|| origin.to_string())?);
            }
            "Node" => {
                let raw: RawNode =
                    serde_yaml::from_value(v).with_context(|| format!("{origin}: bad Node"))?;
                self.nodes.push(convert_node(raw));
            }
            k if k.ends_with("List") => {
                if let Some(items) = v.get("items").and_then(|i| i.as_sequence()) {
                    for item in items.clone() {
                        self.add_value(item, origin)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Read every `*.yaml` / `*.yml` file under `dir` (recursively, sorted by path),
    /// or `dir` itself if it is a file.
    pub fn load(dir: &Path) -> Result<Manifests> {
        let mut files = vec![];
        if dir.is_file() {
            files.push(dir.to_path_buf());
        } else {
            collect(dir, &mut files)
                .with_context(|| format!("reading manifests dir {}", dir.display()))?;
        }
        files.sort();
        let mut m = Manifests::default();
        for f in files {
            let text =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let part = Manifests::parse_str(&text, &f.display().to_string())?;
            m.pods.extend(part.pods);
            m.nodes.extend(part.nodes);
        }
        let mut seen = std::collections::HashSet::new();
        for p in &m.pods {
            if !seen.insert(p.key()) {
                bail!("pod {} defined twice", p.key());
            }
        }
        Ok(m)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pods_and_nodes() {
        let y = r#"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: prod, uid: 1234-5}
spec:
  nodeName: n2
  containers:
  - name: c
    ports:
    - containerPort: 80
    - {containerPort: 53, protocol: UDP, name: dns}
    - {containerPort: 7, name: echo}
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]
---
kind: NetworkPolicy
metadata: {name: x}
---
apiVersion: v1
kind: List
items:
- kind: Node
  metadata: {name: n2}
  status: {addresses: [{type: InternalIP, address: 10.9.9.9}]}
- kind: Pod
  metadata: {name: b}
"#;
        let m = Manifests::parse_str(y, "t").unwrap();
        assert_eq!(m.pods.len(), 2);
        let a = &m.pods[0];
        assert_eq!(a.key(), "prod/a");
        assert_eq!(a.node, "n2");
        assert_eq!(a.uid, "1234-5");
        assert_eq!(a.ipv4, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(a.ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(a.ports.len(), 3);
        assert_eq!(a.ports[0].proto, Proto::Tcp);
        assert_eq!(a.ports[1].proto, Proto::Udp);
        assert!(a.ports[2].is_echo());
        let b = &m.pods[1];
        assert_eq!(b.key(), "default/b");
        assert_eq!(b.node, DEFAULT_NODE);
        assert!(b.ips().is_empty());
        assert_eq!(m.nodes[0].ipv4, Some("10.9.9.9".parse().unwrap()));
        // to_yaml round trip
        let back = Manifests::parse_str(&a.to_yaml(), "rt").unwrap();
        assert_eq!(&back.pods[0], a);
    }

    #[test]
    fn services_and_endpoint_slices_are_not_pods() {
        // The labs carry httpbin's Service and EndpointSlices (and policies): the bed builds
        // the same pods; the demo lab adds node2 with sleep2 (its STRICT step).
        for lab in ["demo", "e2e-demo"] {
            let m = Manifests::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("labs").join(lab)).unwrap();
            let pods: Vec<String> = m.pods.iter().map(Pod::key).collect();
            let nodes: Vec<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
            if lab == "demo" {
                assert_eq!(pods, ["default/httpbin", "default/sleep", "default/notsleep", "default/sleep2"], "{lab}");
                assert_eq!(nodes, ["node1", "node2"], "{lab}");
                assert_eq!(m.pods[3].node, "node2");
            } else {
                assert_eq!(pods, ["default/httpbin", "default/sleep", "default/notsleep"], "{lab}");
                assert!(nodes.is_empty());
            }
        }
    }
}
