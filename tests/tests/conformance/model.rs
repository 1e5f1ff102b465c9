//! The cluster as the conformance suite sees it: namespaces, pods and NetworkPolicies
//! (k8s-openapi types), loaded from the lab and changed by the cases' steps. The same
//! state is written to the agent's manifests dir and judged by the oracle.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

/// One pod of the model, with what the oracle needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelPod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// (name, protocol, port) of every container port.
    pub ports: Vec<(String, String, i32)>,
}

impl ModelPod {
    /// `ns/name` as upstream's PodString.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
    /// Does the pod declare (and the test bed serve) this container port?
    pub fn serves(&self, proto: &str, port: i32) -> bool {
        self.ports.iter().any(|(_, p, n)| p == proto && *n == port)
    }
    /// The pod's address of the family of `v4`.
    pub fn ip(&self, v4: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv4() == v4)
    }
}

/// Namespaces (name -> labels as written, without the automatic name label), pods and
/// policies ((namespace, name) -> object).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: Vec<Pod>,
    pub policies: BTreeMap<(String, String), NetworkPolicy>,
}

fn labels_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> BTreeMap<String, String> {
    m.labels.clone().unwrap_or_default()
}

impl Cluster {
    /// Namespaces and pods of a lab directory (every `*.yaml`; other kinds are skipped).
    pub fn load(dir: &Path) -> Cluster {
        let mut c = Cluster::default();
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v = serde_yaml::Value::deserialize(doc).unwrap();
                match v.get("kind").and_then(|k| k.as_str()) {
                    Some("Namespace") => {
                        let ns: Namespace = serde_yaml::from_value(v).unwrap();
                        c.namespaces.insert(ns.metadata.name.clone().unwrap(), ns);
                    }
                    Some("Pod") => c.pods.push(serde_yaml::from_value(v).unwrap()),
                    _ => {}
                }
            }
        }
        c
    }

    /// Labels of a namespace as the API server shows them (with
    /// `kubernetes.io/metadata.name`).
    pub fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self.namespaces.get(ns).map(|n| labels_of(&n.metadata)).unwrap_or_default();
        l.insert("kubernetes.io/metadata.name".into(), ns.into());
        l
    }

    /// Every pod, in lab order.
    pub fn model_pods(&self) -> Vec<ModelPod> {
        self.pods
            .iter()
            .map(|p| {
                let spec = p.spec.clone().unwrap_or_default();
                let status = p.status.clone().unwrap_or_default();
                ModelPod {
                    namespace: p.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
                    name: p.metadata.name.clone().unwrap(),
                    labels: labels_of(&p.metadata),
                    ips: status.pod_ips.iter().flatten().map(|i| i.ip.parse().unwrap()).collect(),
                    ports: spec
                        .containers
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .map(|cp| (cp.name.clone().unwrap_or_default(), cp.protocol.clone().unwrap_or_else(|| "TCP".into()), cp.container_port))
                        .collect(),
                }
            })
            .collect()
    }

    fn pod_mut(&mut self, key: &str) -> &mut Pod {
        let (ns, name) = key.split_once('/').unwrap();
        self.pods
            .iter_mut()
            .find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no pod {key} in the model"))
    }

    /// Set (Some) or remove (None) a pod label.
    pub fn label_pod(&mut self, key: &str, k: &str, v: Option<&str>) {
        let l = self.pod_mut(key).metadata.labels.get_or_insert_with(Default::default);
        match v {
            Some(v) => l.insert(k.into(), v.into()),
            None => l.remove(k),
        };
    }

    /// Set (Some) or remove (None) a namespace label.
    pub fn label_namespace(&mut self, ns: &str, k: &str, v: Option<&str>) {
        let n = self.namespaces.get_mut(ns).unwrap_or_else(|| panic!("no namespace {ns}"));
        let l = n.metadata.labels.get_or_insert_with(Default::default);
        match v {
            Some(v) => l.insert(k.into(), v.into()),
            None => l.remove(k),
        };
    }

    /// Add pod `ns/name` on `node`: the base pod of that name if there is one (same
    /// uid and addresses), else a copy of `<ns>/a` (same ports) with label `pod: <name>`
    /// and the next free addresses of the namespace.
    pub fn add_pod(&mut self, key: &str, node: &str, base: &Cluster) {
        let (ns, name) = key.split_once('/').unwrap();
        assert!(!self.model_pods().iter().any(|p| p.key() == key), "pod {key} exists");
        if let Some(p) = base.pods.iter().find(|p| p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)) {
            let mut p = p.clone();
            p.spec.as_mut().unwrap().node_name = Some(node.into());
            self.pods.push(p);
            return;
        }
        let mut p = self.pod_mut(&format!("{ns}/a")).clone();
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!(
            "0c0f0000-0000-4000-8000-0000{:08x}",
            u32::from_be_bytes({
                let mut b = [0u8; 4];
                for (i, c) in key.bytes().enumerate() {
                    b[i % 4] ^= c;
                }
                b
            })
        ));
        p.metadata.labels = Some(BTreeMap::from([("pod".to_string(), name.to_string())]));
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        let used: Vec<IpAddr> = self.model_pods().iter().chain(base.model_pods().iter()).flat_map(|p| p.ips.clone()).collect();
        let status = p.status.as_mut().unwrap();
        let ips: Vec<IpAddr> = status.pod_ips.iter().flatten().map(|i| i.ip.parse().unwrap()).collect();
        let mut new = vec![];
        for ip in ips {
            let mut n = 10u8;
            let bump = |ip: IpAddr, n: u8| match ip {
                IpAddr::V4(a) => IpAddr::V4(std::net::Ipv4Addr::from((u32::from(a) & !0xff) | n as u32)),
                IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from((u128::from(a) & !0xffff) | n as u128)),
            };
            while used.contains(&bump(ip, n)) {
                n += 1;
            }
            new.push(bump(ip, n));
        }
        status.pod_ip = Some(new[0].to_string());
        status.pod_ips = Some(new.iter().map(|ip| k8s_openapi::api::core::v1::PodIP { ip: ip.to_string() }).collect());
        self.pods.push(p);
    }

    /// Remove pod `ns/name`.
    pub fn remove_pod(&mut self, key: &str) {
        let before = self.pods.len();
        self.pods.retain(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or("")) != key);
        assert_eq!(self.pods.len() + 1, before, "no pod {key} to remove");
    }

    /// A pod of the model as the test bed's Pod (to create its netns and server).
    pub fn bed_pod(&self, key: &str) -> zt_testbed::Pod {
        let p = self
            .pods
            .iter()
            .find(|p| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or("")) == key)
            .unwrap();
        let m = zt_testbed::Manifests::parse_str(&serde_yaml::to_string(p).unwrap(), key).unwrap();
        m.pods.into_iter().next().unwrap()
    }

    /// Create or replace a policy.
    pub fn put_policy(&mut self, np: NetworkPolicy) {
        let ns = np.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = np.metadata.name.clone().expect("policy without a name");
        self.policies.insert((ns, name), np);
    }

    /// The whole state as one multi-document YAML text (what the agent reads).
    pub fn to_yaml(&self) -> String {
        let mut docs: Vec<String> = vec![];
        for ns in self.namespaces.values() {
            docs.push(serde_yaml::to_string(ns).unwrap());
        }
        for p in &self.pods {
            docs.push(serde_yaml::to_string(p).unwrap());
        }
        for np in self.policies.values() {
            docs.push(serde_yaml::to_string(np).unwrap());
        }
        docs.join("---\n")
    }
}
