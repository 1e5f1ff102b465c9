//! What the node itself (`host`) may reach on a local pod. The kubelet needs the ports
//! its probes name and nothing else; everything SNATed or masqueraded to a node address
//! is no longer `host` in the datapath (see zt-ebpf policy.rs), so this is the whole of
//! the host's standing access.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, Probe};
use zt_common::{DIR_INGRESS, IDENTITY_HOST};

use super::ports::PortMatch;
use super::{Ctx, Peers, Rule, Rules};
use crate::model::k8s::IntOrString;
use crate::model::Pod;
use crate::state::Action;

const TCP: u8 = 6;

/// `--host-access`: how far the node reaches into isolated local pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostAccess {
    /// The TCP ports the pods' readiness, liveness and startup probes name (httpGet,
    /// tcpSocket, grpc); policy can allow more.
    #[default]
    Probes,
    /// Every port (the kernel's `CONFIG_ALLOW_HOST`; a deny naming the host still wins).
    All,
    /// Only what policy allows.
    None,
}

impl HostAccess {
    pub fn parse(s: &str) -> Result<HostAccess, String> {
        match s {
            "probes" => Ok(HostAccess::Probes),
            "all" => Ok(HostAccess::All),
            "none" => Ok(HostAccess::None),
            other => Err(format!("--host-access {other:?}: expected probes, all or none")),
        }
    }
}

/// One allow from `host` per local identity, on the union of its pods' probe ports.
pub(crate) fn compile(ctx: &Ctx<'_>, out: &mut Rules) {
    for (id, w) in ctx.workloads.iter().filter(|(_, w)| w.local) {
        let ports: BTreeSet<u16> = ctx.pods_of(w).flat_map(probe_ports).collect();
        if ports.is_empty() {
            continue;
        }
        let rule = Rule {
            id: 0,
            dir: DIR_INGRESS,
            action: Action::Allow,
            subjects: BTreeSet::from([*id]),
            peers: Peers::Ids(BTreeSet::from([IDENTITY_HOST])),
            ports: ports.iter().map(|&p| PortMatch::Range { proto: TCP, lo: p, hi: p }).collect(),
            auth: false,
            http: None,
        };
        let path = format!("probes of ns/{} sa/{}: tcp {:?}", w.namespace, w.service_account, ports);
        out.add("kubelet probes (--host-access probes)", path, rule);
    }
}

/// The TCP ports the probes of `pod`'s containers connect to. A named port resolves
/// against the same container's ports, then the pod's; an unknown name or a number out
/// of range names nothing (the kubelet cannot probe it either).
pub(crate) fn probe_ports(pod: &Pod) -> BTreeSet<u16> {
    let Some(spec) = &pod.spec else { return BTreeSet::new() };
    let containers: Vec<&Container> = spec.containers.iter().chain(spec.init_containers.iter().flatten()).collect();
    let named = |c: &Container, name: &str| -> Option<u16> {
        let find = |c: &Container| c.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).map(|p| p.container_port);
        find(c).or_else(|| containers.iter().find_map(|c| find(c))).and_then(|p| u16::try_from(p).ok())
    };
    let mut out = BTreeSet::new();
    for c in &containers {
        let probes: [Option<&Probe>; 3] = [c.readiness_probe.as_ref(), c.liveness_probe.as_ref(), c.startup_probe.as_ref()];
        for p in probes.into_iter().flatten() {
            let port = match (&p.http_get, &p.tcp_socket, &p.grpc) {
                (Some(h), _, _) => resolve(&h.port, |n| named(c, n)),
                (_, Some(t), _) => resolve(&t.port, |n| named(c, n)),
                (_, _, Some(g)) => u16::try_from(g.port).ok(),
                _ => None, // exec: runs inside the container, no network
            };
            out.extend(port.filter(|p| *p != 0));
        }
    }
    out
}

fn resolve(port: &IntOrString, named: impl Fn(&str) -> Option<u16>) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(s) => s.parse::<u16>().ok().or_else(|| named(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn probe_ports_of_every_kind_and_named_ports() {
        let p = pod(r#"
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9901}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
    livenessProbe: {tcpSocket: {port: 8081}}
    startupProbe: {grpc: {port: 9090}}
  - name: sidecar
    livenessProbe: {httpGet: {port: admin}}
    readinessProbe: {exec: {command: [true]}}
  initContainers:
  - name: proxy
    restartPolicy: Always
    readinessProbe: {tcpSocket: {port: "15021"}}
"#);
        assert_eq!(probe_ports(&p), BTreeSet::from([8080, 8081, 9090, 9901, 15021]));
    }

    #[test]
    fn unknown_names_and_bad_numbers_name_nothing() {
        let p = pod(r#"
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: app
    readinessProbe: {httpGet: {port: nosuchport}}
    livenessProbe: {tcpSocket: {port: 70000}}
    startupProbe: {grpc: {port: -1}}
"#);
        assert!(probe_ports(&p).is_empty());
        assert_eq!(HostAccess::parse("probes"), Ok(HostAccess::Probes));
        assert!(HostAccess::parse("some").unwrap_err().contains("--host-access"));
    }
}
