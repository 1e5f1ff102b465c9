//! kube-proxy's nftables rules in the test bed. No kube-proxy binary runs here, so this
//! renders what its nftables proxier (kubernetes pkg/proxy/nftables/proxier.go) writes
//! for the lab's Services and EndpointSlices, one `table ip kube-proxy` and one
//! `table ip6 kube-proxy` per node netns, and loads them with the `nft` CLI:
//!
//! - base chains `filter-{prerouting,input,forward,output}` (priority dstnat-10),
//!   `filter-output-post-dnat`, `nat-{prerouting,output}` (dstnat) and `nat-postrouting`
//!   (srcnat), jumping to `services`, `masquerading`, `firewall-check`,
//!   `service-endpoints-check`, `nodeport-endpoints-check`, `cluster-ips-check`;
//! - `service-ips` (frontend . proto . port : goto service chain), `service-nodeports`,
//!   `no-endpoint-services` / `no-endpoint-nodeports` (goto `reject-chain`), the
//!   `cluster-ips` set (other ports of a ClusterIP are rejected, unallocated addresses of
//!   the service CIDR dropped);
//! - per service port `service-<HASH>-ns/name/proto/portname`: optional masquerade of
//!   traffic from outside the cluster CIDR, then `numgen random mod N vmap` over the
//!   endpoint chains; per endpoint `endpoint-<HASH>-...__ip/port`: `saddr <ip> jump
//!   mark-for-masquerade` (hairpin), `dnat to ip:port`;
//! - `mark-for-masquerade` sets 0x4000, `masquerading` masquerades marked packets.
//!
//! Endpoints follow kube-proxy's rule: ready ones; if none, serving-and-terminating ones;
//! `internalTrafficPolicy: Local` keeps this node's. A service port takes its endpoint port
//! from the EndpointSlice port of the same name (the EndpointSlice controller has already
//! resolved named targetPorts per pod). External traffic (NodePorts, externalIPs) is
//! masqueraded and goes to the cluster chain (`externalTrafficPolicy: Cluster` only).
//! Not rendered: session affinity sets, LoadBalancer source ranges, `Local` external
//! policy, UDP conntrack cleanup. Chain names use an FNV hash where kube-proxy uses
//! sha256 (names only). [`Choice::Endpoint`] makes the backend choice deterministic for
//! tests: every slot of the `numgen` map goes to the same endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::topology::Family;
use crate::Testbed;

/// kube-proxy's default masquerade bit (`--masquerade-bit 14`).
pub const MASQ_MARK: u32 = 0x4000;

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    /// Lowercase: tcp, udp, sctp.
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service as kube-proxy reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `clusterIPs` (or `clusterIP`); empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
}

/// One endpoint address of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

/// An EndpointSlice: ports (name, protocol, number) and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// `kubernetes.io/service-name`.
    pub service: String,
    pub ports: Vec<(String, String, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// The Services and EndpointSlices of a lab.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<Slice>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SvcSpec {
    #[serde(rename = "type")]
    type_: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<String>,
    #[serde(rename = "externalIPs", default)]
    external_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<SvcPortDoc>,
    internal_traffic_policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SvcPortDoc {
    name: Option<String>,
    protocol: Option<String>,
    port: u16,
    node_port: Option<u16>,
}

#[derive(Deserialize)]
struct SvcDoc {
    metadata: Meta,
    #[serde(default)]
    spec: SvcSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlicePortDoc {
    name: Option<String>,
    protocol: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize, Default)]
struct Conditions {
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointDoc {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
    node_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceDoc {
    metadata: Meta,
    #[serde(default)]
    ports: Vec<SlicePortDoc>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| anyhow!("{what}: {s:?} is not an IP address"))
}

impl Objects {
    /// Services and EndpointSlices of a multi-document YAML text (other kinds skipped).
    /// `origin` names the text in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Objects> {
        let mut o = Objects::default();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v = serde_yaml::Value::deserialize(doc).with_context(|| format!("{origin}: YAML"))?;
            match v.get("kind").and_then(|k| k.as_str()) {
                Some("Service") => o.services.push(service(v).with_context(|| format!("{origin}: Service"))?),
                Some("EndpointSlice") => o.slices.push(slice(v).with_context(|| format!("{origin}: EndpointSlice"))?),
                _ => {}
            }
        }
        Ok(o)
    }

    /// Every `*.yaml`/`*.yml` directly in `dir` (hidden names skipped), like the agent's
    /// directory source.
    pub fn load_dir(dir: &Path) -> Result<Objects> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        files.sort();
        let mut o = Objects::default();
        for f in files {
            let text = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            let more = Objects::parse(&text, &f.display().to_string())?;
            o.services.extend(more.services);
            o.slices.extend(more.slices);
        }
        Ok(o)
    }

    /// The endpoints kube-proxy uses for a Service port on `node`, sorted like its
    /// endpoint map (by `ip:port`): ready ones, else serving-and-terminating ones;
    /// `internalTrafficPolicy: Local` keeps `node`'s. (address, port).
    pub fn endpoints(&self, svc: &Service, sp: &ServicePort, family: Family, node: &str) -> Vec<(IpAddr, u16)> {
        let mut all: Vec<(IpAddr, u16, &SliceEndpoint)> = vec![];
        for s in self.slices.iter().filter(|s| s.namespace == svc.namespace && s.service == svc.name) {
            let Some(&(_, _, port)) = s.ports.iter().find(|(n, p, _)| *n == sp.name && *p == sp.protocol) else { continue };
            for e in s.endpoints.iter().filter(|e| Family::of(&e.address) == family) {
                if !all.iter().any(|(a, p, _)| *a == e.address && *p == port) {
                    all.push((e.address, port, e));
                }
            }
        }
        let ready: Vec<_> = all.iter().filter(|(_, _, e)| e.ready).collect();
        let usable: Vec<_> = if ready.is_empty() { all.iter().filter(|(_, _, e)| e.serving && e.terminating).collect() } else { ready };
        let mut out: Vec<(IpAddr, u16)> =
            usable.into_iter().filter(|(_, _, e)| !svc.internal_local || e.node.as_deref() == Some(node)).map(|(a, p, _)| (*a, *p)).collect();
        out.sort_by_key(|(a, p)| endpoint_string(*a, *p));
        out
    }
}

fn service(v: serde_yaml::Value) -> Result<Service> {
    let d: SvcDoc = serde_yaml::from_value(v)?;
    let name = d.metadata.name.ok_or_else(|| anyhow!("metadata.name missing"))?;
    let namespace = d.metadata.namespace.unwrap_or_else(|| "default".into());
    let what = format!("{namespace}/{name}");
    let mut ips: Vec<String> = d.spec.cluster_ips.clone();
    if ips.is_empty() {
        ips.extend(d.spec.cluster_ip.clone());
    }
    let headless = ips.iter().any(|i| i == "None") || d.spec.type_.as_deref() == Some("ExternalName");
    let cluster_ips = if headless { vec![] } else { ips.iter().map(|i| parse_ip(i, &format!("{what} spec.clusterIPs"))).collect::<Result<_>>()? };
    let external_ips = d.spec.external_ips.iter().map(|i| parse_ip(i, &format!("{what} spec.externalIPs"))).collect::<Result<_>>()?;
    let ports = d
        .spec
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
            port: p.port,
            node_port: p.node_port,
        })
        .collect();
    Ok(Service { namespace, name, cluster_ips, external_ips, ports, internal_local: d.spec.internal_traffic_policy.as_deref() == Some("Local") })
}

fn slice(v: serde_yaml::Value) -> Result<Slice> {
    let d: SliceDoc = serde_yaml::from_value(v)?;
    let name = d.metadata.name.ok_or_else(|| anyhow!("metadata.name missing"))?;
    let namespace = d.metadata.namespace.unwrap_or_else(|| "default".into());
    let service =
        d.metadata.labels.get("kubernetes.io/service-name").cloned().ok_or_else(|| anyhow!("{namespace}/{name}: label kubernetes.io/service-name missing"))?;
    let ports =
        d.ports.iter().filter_map(|p| Some((p.name.clone().unwrap_or_default(), p.protocol.as_deref().unwrap_or("TCP").to_lowercase(), p.port?))).collect();
    let mut endpoints = vec![];
    for e in &d.endpoints {
        for a in &e.addresses {
            endpoints.push(SliceEndpoint {
                address: parse_ip(a, &format!("{namespace}/{name} endpoints[].addresses"))?,
                // Unset ready means ready (API semantics); serving defaults to ready.
                ready: e.conditions.ready.unwrap_or(true),
                serving: e.conditions.serving.or(e.conditions.ready).unwrap_or(true),
                terminating: e.conditions.terminating.unwrap_or(false),
                node: e.node_name.clone(),
            });
        }
    }
    Ok(Slice { namespace, name, service, ports, endpoints })
}

/// How the service chain picks an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// kube-proxy's `numgen random mod N`.
    Random,
    /// Always the endpoint with this index (modulo their number) in kube-proxy's order.
    Endpoint(usize),
}

/// What a node's rules depend on besides the objects.
#[derive(Clone, Debug)]
pub struct RenderOptions {
    pub node: String,
    /// `--service-cluster-ip-range` per family (unallocated ClusterIPs are dropped).
    pub service_cidrs: Vec<String>,
    /// `--cluster-cidr` (the local-traffic detector): ClusterIP traffic from outside it is
    /// masqueraded. Empty: no detector (kube-proxy then skips that rule).
    pub cluster_cidrs: Vec<String>,
    pub choice: Choice,
}

/// The node's interface the Service ranges are routed to (see [`Testbed::kube_proxy_sync`]).
pub const UPLINK: &str = "ztsvc";

/// The test bed's Service ranges (the labs' ClusterIPs live there).
pub const SERVICE_CIDRS: [&str; 2] = ["10.96.0.0/16", "fd00:96::/64"];

fn endpoint_string(a: IpAddr, p: u16) -> String {
    match a {
        IpAddr::V4(a) => format!("{a}:{p}"),
        IpAddr::V6(a) => format!("[{a}]:{p}"),
    }
}

/// kube-proxy's `hashAndTruncate`, with FNV-1a 64 in place of sha256: 8 base32
/// characters, "-", the name.
fn hashed(name: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    const B32: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let code: String = (0..8).map(|i| B32[((h >> (i * 5)) & 31) as usize] as char).collect();
    let full = format!("{code}-{name}");
    if full.len() > 240 {
        format!("{}...", &full[..237])
    } else {
        full
    }
}

fn in_family(cidr: &str, f: Family) -> bool {
    cidr.contains(':') == (f == Family::V6)
}

/// The nft script for one family of one node: replaces the whole `kube-proxy` table in
/// one transaction.
pub fn render(objs: &Objects, family: Family, opts: &RenderOptions) -> String {
    let (fam, ipx, addr_t, no_localhost) = match family {
        Family::V4 => ("ip", "ip", "ipv4_addr", "ip daddr != 127.0.0.0/8"),
        Family::V6 => ("ip6", "ip6", "ipv6_addr", "ip6 daddr != ::1"),
    };
    let t = format!("{fam} kube-proxy");
    let mut s = String::new();
    let mut chains: Vec<String> = vec![];
    let mut rules: Vec<String> = vec![];
    let mut elements: Vec<String> = vec![];
    let _ = writeln!(s, "add table {t}\ndelete table {t}\nadd table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let base = [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    for (name, ty, hook, prio) in base {
        let _ = writeln!(s, "add chain {t} {name} {{ type {ty} hook {hook} priority {prio} ; }}");
    }
    for c in ["services", "masquerading", "mark-for-masquerade", "firewall-check", "service-endpoints-check", "nodeport-endpoints-check", "cluster-ips-check"] {
        let _ = writeln!(s, "add chain {t} {c}");
    }
    let _ = writeln!(s, "add chain {t} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}");
    let _ = writeln!(s, "add set {t} cluster-ips {{ type {addr_t} ; comment \"Active ClusterIPs\" ; }}");
    for (m, ty, c) in [
        ("no-endpoint-services", format!("{addr_t} . inet_proto . inet_service"), "vmap to drop or reject packets to services with no endpoints"),
        ("no-endpoint-nodeports", "inet_proto . inet_service".to_string(), "vmap to drop or reject packets to service nodeports with no endpoints"),
        ("firewall-ips", format!("{addr_t} . inet_proto . inet_service"), "destinations that are subject to LoadBalancerSourceRanges"),
        ("service-ips", format!("{addr_t} . inet_proto . inet_service"), "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
        ("service-nodeports", "inet_proto . inet_service".to_string(), "NodePort traffic"),
    ] {
        let _ = writeln!(s, "add map {t} {m} {{ type {ty} : verdict ; comment \"{c}\" ; }}");
    }
    // Jumps from the base chains, as setupNFTables adds them.
    for (from, to, extra) in [
        ("filter-input", "nodeport-endpoints-check", "ct state new "),
        ("filter-input", "service-endpoints-check", "ct state new "),
        ("filter-forward", "service-endpoints-check", "ct state new "),
        ("filter-forward", "cluster-ips-check", "ct state new "),
        ("filter-output", "service-endpoints-check", "ct state new "),
        ("filter-output", "firewall-check", "ct state new "),
        ("filter-output-post-dnat", "cluster-ips-check", "ct state new "),
        ("filter-prerouting", "firewall-check", "ct state new "),
        ("nat-output", "services", ""),
        ("nat-prerouting", "services", ""),
        ("nat-postrouting", "masquerading", ""),
    ] {
        rules.push(format!("{from} {extra}jump {to}"));
    }
    rules.push(format!("mark-for-masquerade mark set mark or {MASQ_MARK:#x}"));
    rules.push(format!("masquerading mark and {MASQ_MARK:#x} == 0 return"));
    rules.push(format!("masquerading mark set mark xor {MASQ_MARK:#x}"));
    rules.push("masquerading masquerade fully-random".into());
    rules.push("reject-chain reject".into());
    rules.push(format!("firewall-check {ipx} daddr . meta l4proto . th dport vmap @firewall-ips"));
    rules.push(format!("service-endpoints-check {ipx} daddr . meta l4proto . th dport vmap @no-endpoint-services"));
    rules.push(format!("nodeport-endpoints-check fib daddr type local {no_localhost} meta l4proto . th dport vmap @no-endpoint-nodeports"));
    rules.push(format!("services {ipx} daddr . meta l4proto . th dport vmap @service-ips"));
    rules.push(format!("services fib daddr type local {no_localhost} meta l4proto . th dport vmap @service-nodeports"));
    rules.push(format!("cluster-ips-check {ipx} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""));
    let cidrs: Vec<&String> = opts.service_cidrs.iter().filter(|c| in_family(c, family)).collect();
    if !cidrs.is_empty() {
        let list: Vec<&str> = cidrs.iter().map(|c| c.as_str()).collect();
        rules.push(format!("cluster-ips-check {ipx} daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"", list.join(", ")));
    }
    let local: Vec<&str> = opts.cluster_cidrs.iter().filter(|c| in_family(c, family)).map(|c| c.as_str()).collect();

    for svc in &objs.services {
        let ips: Vec<IpAddr> = svc.cluster_ips.iter().copied().filter(|i| Family::of(i) == family).collect();
        let ext: Vec<IpAddr> = svc.external_ips.iter().copied().filter(|i| Family::of(i) == family).collect();
        let Some(&cip) = ips.first() else { continue };
        for sp in &svc.ports {
            let proto = &sp.protocol;
            let port_name = format!("{}/{}/{proto}/{}", svc.namespace, svc.name, sp.name);
            let svc_chain = format!("service-{}", hashed(&port_name));
            let ext_chain = format!("external-{}", hashed(&port_name));
            let eps = objs.endpoints(svc, sp, family, &opts.node);
            let member = format!("cluster-ips {{ {cip} }}");
            if !elements.contains(&member) {
                elements.push(member);
            }
            if eps.is_empty() {
                elements.push(format!("no-endpoint-services {{ {cip} . {proto} . {} comment \"{port_name}\" : goto reject-chain }}", sp.port));
                for e in &ext {
                    elements.push(format!("no-endpoint-services {{ {e} . {proto} . {} comment \"{port_name}\" : goto reject-chain }}", sp.port));
                }
                if let Some(np) = sp.node_port {
                    elements.push(format!("no-endpoint-nodeports {{ {proto} . {np} comment \"{port_name}\" : goto reject-chain }}"));
                }
                continue;
            }
            chains.push(svc_chain.clone());
            elements.push(format!("service-ips {{ {cip} . {proto} . {} : goto {svc_chain} }}", sp.port));
            if !ext.is_empty() || sp.node_port.is_some() {
                // externalTrafficPolicy Cluster: masquerade (the endpoint may be on
                // another node), then the cluster chain.
                chains.push(ext_chain.clone());
                rules.push(format!("{ext_chain} jump mark-for-masquerade"));
                rules.push(format!("{ext_chain} goto {svc_chain}"));
                for e in &ext {
                    elements.push(format!("service-ips {{ {e} . {proto} . {} : goto {ext_chain} }}", sp.port));
                }
                if let Some(np) = sp.node_port {
                    elements.push(format!("service-nodeports {{ {proto} . {np} : goto {ext_chain} }}"));
                }
            }
            if !local.is_empty() {
                rules.push(format!(
                    "{svc_chain} {ipx} daddr {cip} {proto} dport {} {ipx} saddr != {{ {} }} jump mark-for-masquerade",
                    sp.port,
                    local.join(", ")
                ));
            }
            let mut slots = vec![];
            for (i, (a, p)) in eps.iter().enumerate() {
                let ip_name = a.to_string().replace(':', ".");
                let ep_chain = format!("endpoint-{}", hashed(&format!("{port_name}__{ip_name}/{p}")));
                chains.push(ep_chain.clone());
                // Hairpin: a pod reaching itself through the Service is masqueraded.
                rules.push(format!("{ep_chain} {ipx} saddr {a} jump mark-for-masquerade"));
                rules.push(format!("{ep_chain} meta l4proto {proto} dnat to {}", endpoint_string(*a, *p)));
                let target = match opts.choice {
                    Choice::Random => i,
                    Choice::Endpoint(k) => k % eps.len(),
                };
                slots.push((i, target));
            }
            let ep_chains: Vec<String> =
                eps.iter().map(|(a, p)| format!("endpoint-{}", hashed(&format!("{port_name}__{}/{p}", a.to_string().replace(':', "."))))).collect();
            let vmap: Vec<String> = slots.iter().map(|(i, t)| format!("{i} : goto {}", ep_chains[*t])).collect();
            rules.push(format!("{svc_chain} numgen random mod {} vmap {{ {} }}", eps.len(), vmap.join(", ")));
        }
    }
    chains.dedup();
    for c in &chains {
        let _ = writeln!(s, "add chain {t} {c}");
    }
    for r in &rules {
        let _ = writeln!(s, "add rule {t} {r}");
    }
    for e in &elements {
        let _ = writeln!(s, "add element {t} {e}");
    }
    s
}

/// The ClusterIP the test bed gives a pod's own Service (upstream's netpol suite makes one
/// per pod, `s-<ns>-<pod>`) inside [`SERVICE_CIDRS`]: IPv4 10.96 + the pod address's last
/// two octets, IPv6 fd00:96:: + its segments 2, 3, 6 and 7.
pub fn pod_cluster_ip(pod_ip: IpAddr) -> IpAddr {
    match pod_ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(10, 96, o[2], o[3]))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x96, 0, 0, s[2], s[3], s[6], s[7]))
        }
    }
}

/// YAML of a pod's own Service `s-<ns>-<pod>` (selector `pod: <name>`, one port
/// `service-port-<proto>-<port>` per (protocol, port), targetPort = port, as upstream's
/// kubemanager creates them) and the EndpointSlices the controller would write for it
/// (one per family, the pod ready on `node`). ClusterIPs from [`pod_cluster_ip`].
pub fn pod_service_yaml(ns: &str, pod: &str, node: &str, pod_ips: &[IpAddr], ports: &[(crate::Proto, u16)]) -> String {
    let name = format!("s-{ns}-{pod}");
    let cips: Vec<String> = pod_ips.iter().map(|ip| format!("'{}'", pod_cluster_ip(*ip))).collect();
    let fams: Vec<&str> = pod_ips.iter().map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" }).collect();
    let pname = |p: &crate::Proto, n: u16| format!("service-port-{}-{n}", p.as_str().to_lowercase());
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{pod: {pod}}}\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  ports:\n",
        cips[0].trim_matches('\''),
        cips.join(", "),
        fams.join(", ")
    );
    for (p, n) in ports {
        y.push_str(&format!("  - {{name: {}, protocol: {}, port: {n}, targetPort: {n}}}\n", pname(p, *n), p.as_str()));
    }
    for ip in pod_ips {
        let (fam, suffix) = if ip.is_ipv4() { ("IPv4", "v4") } else { ("IPv6", "v6") };
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-{suffix}, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: {fam}\nports:\n"
        ));
        for (p, n) in ports {
            y.push_str(&format!("- {{name: {}, protocol: {}, port: {n}}}\n", pname(p, *n), p.as_str()));
        }
        y.push_str(&format!(
            "endpoints:\n- addresses: ['{ip}']\n  conditions: {{ready: true}}\n  nodeName: {node}\n  targetRef: {{kind: Pod, namespace: {ns}, name: {pod}}}\n"
        ));
    }
    y
}

/// Run an nft script in a netns (`ip netns exec <ns> nft -f -`).
pub fn nft_apply(netns: &str, script: &str) -> Result<()> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (Debian package nftables; cargo xtask setup installs it)")?;
    c.stdin.take().unwrap().write_all(script.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("nft -f in {netns} failed: {}\nscript:\n{script}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `nft` in a netns; stdout.
pub fn nft_in(netns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(["netns", "exec", netns, "nft"]).args(args).output().context("running nft")?;
    if !out.status.success() {
        bail!("nft {args:?} in {netns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Testbed {
    /// Render and load kube-proxy's rules for `objs` into every node netns (both
    /// families; a re-sync replaces the tables atomically), and route the Service ranges
    /// to [`UPLINK`], as a real node's default route would take them off the node:
    /// an unmatched ClusterIP then reaches the forward hook (`cluster-ips-check`) instead
    /// of failing the route lookup. The pods' own routes already send everything to the
    /// node, so their Service traffic passes the node's prerouting hook.
    pub fn kube_proxy_sync(&self, objs: &Objects, choice: Choice) -> Result<()> {
        for n in self.nodes() {
            // The "uplink": a veth whose peer stays down, so what is routed there leaves
            // through the forward hook and is never seen again (no loop through lo).
            if crate::sys::ipn(&n.netns, &["link", "show", UPLINK]).is_err() {
                crate::sys::ipn(&n.netns, &["link", "add", UPLINK, "type", "veth", "peer", "name", "ztsvc-peer"])?;
                crate::sys::ipn(&n.netns, &["link", "set", UPLINK, "up"])?;
            }
            for c in SERVICE_CIDRS {
                crate::sys::ipn(&n.netns, &["route", "replace", c, "dev", UPLINK])?;
            }
            let opts =
                RenderOptions { node: n.name.clone(), service_cidrs: SERVICE_CIDRS.iter().map(|s| s.to_string()).collect(), cluster_cidrs: vec![], choice };
            for f in [Family::V4, Family::V6] {
                nft_apply(&n.netns, &render(objs, f, &opts)).with_context(|| format!("kube-proxy rules on {} ({f})", n.name))?;
            }
        }
        Ok(())
    }

    /// The node's `kube-proxy` tables as `nft list` prints them (with counters off).
    pub fn kube_proxy_rules(&self, node: &str) -> Result<String> {
        let n = self.node(node).ok_or_else(|| anyhow!("no node {node}"))?;
        Ok(format!("{}{}", nft_in(&n.netns, &["list", "table", "ip", "kube-proxy"])?, nft_in(&n.netns, &["list", "table", "ip6", "kube-proxy"])?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIPs: [10.96.1.1, 'fd00:96::1:1']
  ports:
  - {name: http, port: 8000, targetPort: http, protocol: TCP, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: none, namespace: x}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- {addresses: [10.210.1.2], conditions: {ready: true}, nodeName: node2}
- {addresses: [10.210.1.1], conditions: {ready: true}, nodeName: node1}
- {addresses: [10.210.1.9], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 81, protocol: TCP}]
endpoints:
- {addresses: [10.210.1.3], conditions: {ready: true}}
";

    fn opts(choice: Choice) -> RenderOptions {
        RenderOptions { node: "node1".into(), service_cidrs: SERVICE_CIDRS.iter().map(|s| s.to_string()).collect(), cluster_cidrs: vec![], choice }
    }

    #[test]
    fn endpoints_follow_kube_proxy() {
        let o = Objects::parse(LAB, "lab").unwrap();
        assert!(o.services[1].cluster_ips.is_empty(), "headless");
        let (svc, http) = (&o.services[0], &o.services[0].ports[0]);
        // Ready ones only, sorted; a named port resolves per slice (80 here, 81 there).
        let eps = o.endpoints(svc, http, Family::V4, "node1");
        let want: Vec<(IpAddr, u16)> = vec![("10.210.1.1".parse().unwrap(), 80), ("10.210.1.2".parse().unwrap(), 80), ("10.210.1.3".parse().unwrap(), 81)];
        assert_eq!(eps, want);
        let mut local = svc.clone();
        local.internal_local = true;
        assert_eq!(o.endpoints(&local, http, Family::V4, "node1"), want[..1].to_vec());
        // No ready endpoint: serving-and-terminating ones.
        let t = LAB
            .replace("conditions: {ready: false}", "conditions: {ready: false, serving: true, terminating: true}")
            .replace("conditions: {ready: true}", "conditions: {ready: false}");
        let o2 = Objects::parse(&t, "lab").unwrap();
        assert_eq!(o2.endpoints(&o2.services[0], &o2.services[0].ports[0], Family::V4, "node1"), vec![("10.210.1.9".parse().unwrap(), 80)]);
    }

    #[test]
    fn rendered_rules_have_kube_proxy_structure() {
        let o = Objects::parse(LAB, "lab").unwrap();
        let s = render(&o, Family::V4, &opts(Choice::Random));
        assert!(s.contains("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }"), "{s}");
        assert!(s.contains("numgen random mod 3 vmap { 0 : goto endpoint-"), "{s}");
        assert!(s.contains("ip saddr 10.210.1.3 jump mark-for-masquerade"), "{s}");
        assert!(s.contains("meta l4proto tcp dnat to 10.210.1.3:81"), "{s}");
        assert!(s.contains("service-nodeports { tcp . 30080 : goto external-"), "{s}");
        // UDP port without endpoints: rejected, not captured.
        assert!(s.contains("no-endpoint-services { 10.96.1.1 . udp . 53 comment \"x/web/udp/dns\" : goto reject-chain }"), "{s}");
        // Deterministic: every slot goes to endpoint 1.
        let d = render(&o, Family::V4, &opts(Choice::Endpoint(1)));
        let line = d.lines().find(|l| l.contains("numgen")).unwrap();
        let ep1 = format!("endpoint-{}", hashed("x/web/tcp/http__10.210.1.2/80"));
        assert_eq!(line.matches(&ep1).count(), 3, "{line}");
        let v6 = render(&o, Family::V6, &opts(Choice::Random));
        assert!(v6.contains("ip6 kube-proxy") && !v6.contains("add element ip6 kube-proxy service-ips"), "no IPv6 endpoints: nothing captured\n{v6}");
    }

    #[test]
    fn bad_objects_name_the_field() {
        let e = Objects::parse("kind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.300}\n", "f.yaml").unwrap_err();
        assert!(format!("{e:#}").contains("default/s spec.clusterIPs"), "{e:#}");
        let e = Objects::parse("kind: EndpointSlice\nmetadata: {name: s}\n", "f.yaml").unwrap_err();
        assert!(format!("{e:#}").contains("kubernetes.io/service-name"), "{e:#}");
    }
}
