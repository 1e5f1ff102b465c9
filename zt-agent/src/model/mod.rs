//! The agent's single internal view of the cluster. Every policy source (manifest
//! directory now, Kubernetes API later) produces `ClusterObject`s, runs
//! `ClusterObject::normalize_and_validate` on them and stores them in a
//! `ClusterState`; the compiler reads only this.

pub mod error;
pub mod http;
pub mod k8s;
pub mod service;
pub mod source_dir;
pub mod ztp;

use std::collections::BTreeMap;
use std::fmt;

pub use error::{FieldError, SourceError};
pub use k8s::{Namespace, NetworkPolicy, Node, ObjectMeta, Pod, ServiceAccount};
pub use service::{EndpointSlice, Service};
pub use source_dir::{IgnoredObject, LoadedDir};
pub use ztp::ZeroTrustPolicy;

/// (namespace, name). Cluster-scoped objects (Namespace, Node) use "" as namespace.
pub type ObjectKey = (String, String);

/// The kinds the agent understands. Ordered by name: the compiler numbers rules in
/// (kind, namespace, name) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    EndpointSlice,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    Service,
    ServiceAccount,
    ZeroTrustPolicy,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 8] = [
        ObjectKind::EndpointSlice,
        ObjectKind::Namespace,
        ObjectKind::NetworkPolicy,
        ObjectKind::Node,
        ObjectKind::Pod,
        ObjectKind::Service,
        ObjectKind::ServiceAccount,
        ObjectKind::ZeroTrustPolicy,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::Node => "Node",
            ObjectKind::Pod => "Pod",
            ObjectKind::Service => "Service",
            ObjectKind::ServiceAccount => "ServiceAccount",
            ObjectKind::ZeroTrustPolicy => "ZeroTrustPolicy",
        }
    }

    pub const fn namespaced(self) -> bool {
        !matches!(self, ObjectKind::Namespace | ObjectKind::Node)
    }

    /// `Kind ns/name`, or `Kind name` for cluster-scoped kinds.
    pub fn describe(self, namespace: &str, name: &str) -> String {
        if self.namespaced() {
            format!("{} {namespace}/{name}", self.name())
        } else {
            format!("{} {name}", self.name())
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One object of a kind the agent understands. (Unboxed: objects are moved a few
/// times per load, the size difference costs nothing that matters.)
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum ClusterObject {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    NetworkPolicy(NetworkPolicy),
    ZeroTrustPolicy(ZeroTrustPolicy),
    Node(Node),
    Service(Service),
    EndpointSlice(EndpointSlice),
}

impl ClusterObject {
    pub fn kind(&self) -> ObjectKind {
        match self {
            ClusterObject::Namespace(_) => ObjectKind::Namespace,
            ClusterObject::ServiceAccount(_) => ObjectKind::ServiceAccount,
            ClusterObject::Pod(_) => ObjectKind::Pod,
            ClusterObject::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            ClusterObject::ZeroTrustPolicy(_) => ObjectKind::ZeroTrustPolicy,
            ClusterObject::Node(_) => ObjectKind::Node,
            ClusterObject::Service(_) => ObjectKind::Service,
            ClusterObject::EndpointSlice(_) => ObjectKind::EndpointSlice,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            ClusterObject::Namespace(o) => &o.metadata,
            ClusterObject::ServiceAccount(o) => &o.metadata,
            ClusterObject::Pod(o) => &o.metadata,
            ClusterObject::NetworkPolicy(o) => &o.metadata,
            ClusterObject::ZeroTrustPolicy(o) => &o.metadata,
            ClusterObject::Node(o) => &o.metadata,
            ClusterObject::Service(o) => &o.metadata,
            ClusterObject::EndpointSlice(o) => &o.metadata,
        }
    }

    pub(crate) fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            ClusterObject::Namespace(o) => &mut o.metadata,
            ClusterObject::ServiceAccount(o) => &mut o.metadata,
            ClusterObject::Pod(o) => &mut o.metadata,
            ClusterObject::NetworkPolicy(o) => &mut o.metadata,
            ClusterObject::ZeroTrustPolicy(o) => &mut o.metadata,
            ClusterObject::Node(o) => &mut o.metadata,
            ClusterObject::Service(o) => &mut o.metadata,
            ClusterObject::EndpointSlice(o) => &mut o.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let m = self.metadata();
        let ns = if self.kind().namespaced() {
            m.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        (ns, m.name.clone().unwrap_or_default())
    }

    /// `Kind ns/name` for messages.
    pub fn describe(&self) -> String {
        let (ns, name) = self.key();
        self.kind().describe(&ns, &name)
    }

    /// The defaulting half of `normalize_and_validate` (for keys of objects being
    /// deleted or rejected).
    pub fn normalize(&mut self) {
        let namespaced = self.kind().namespaced();
        let meta = self.metadata_mut();
        if namespaced {
            if meta.namespace.as_deref().is_none_or(str::is_empty) {
                meta.namespace = Some("default".to_string());
            }
        } else {
            meta.namespace = None;
        }
    }

    /// Fill in what the API server would default (namespace "default" for namespaced
    /// objects; none for cluster-scoped ones), then validate. Sources must call this
    /// before `ClusterState::upsert`: the compiler assumes validated objects.
    pub fn normalize_and_validate(&mut self) -> Result<(), FieldError> {
        self.normalize();
        match self {
            ClusterObject::Namespace(o) => k8s::validate_namespace(o),
            ClusterObject::ServiceAccount(o) => k8s::validate_service_account(o),
            ClusterObject::Pod(o) => k8s::validate_pod(o),
            ClusterObject::NetworkPolicy(o) => k8s::validate_network_policy(o),
            ClusterObject::ZeroTrustPolicy(o) => ztp::validate_ztp(o),
            ClusterObject::Node(o) => k8s::validate_node(o),
            ClusterObject::Service(o) => service::validate_service(o),
            ClusterObject::EndpointSlice(o) => service::validate_endpoint_slice(o),
        }
    }
}

/// Everything the compiler needs, keyed by (namespace, name); namespaces by name.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    pub service_accounts: BTreeMap<ObjectKey, ServiceAccount>,
    pub pods: BTreeMap<ObjectKey, Pod>,
    pub network_policies: BTreeMap<ObjectKey, NetworkPolicy>,
    pub zero_trust_policies: BTreeMap<ObjectKey, ZeroTrustPolicy>,
    /// Nodes by name: their addresses are the host / remote-node endpoints.
    pub nodes: BTreeMap<String, Node>,
    /// Services and EndpointSlices: the Service table (`crate::services`).
    pub services: BTreeMap<ObjectKey, Service>,
    pub endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert or replace a (normalized, validated) object; true if it replaced one.
    pub fn upsert(&mut self, obj: ClusterObject) -> bool {
        let (ns, name) = obj.key();
        match obj {
            ClusterObject::Namespace(o) => self.namespaces.insert(name, o).is_some(),
            ClusterObject::ServiceAccount(o) => {
                self.service_accounts.insert((ns, name), o).is_some()
            }
            ClusterObject::Pod(o) => self.pods.insert((ns, name), o).is_some(),
            ClusterObject::NetworkPolicy(o) => {
                self.network_policies.insert((ns, name), o).is_some()
            }
            ClusterObject::ZeroTrustPolicy(o) => {
                self.zero_trust_policies.insert((ns, name), o).is_some()
            }
            ClusterObject::Node(o) => self.nodes.insert(name, o).is_some(),
            ClusterObject::Service(o) => self.services.insert((ns, name), o).is_some(),
            ClusterObject::EndpointSlice(o) => {
                self.endpoint_slices.insert((ns, name), o).is_some()
            }
        }
    }

    /// Remove an object; true if it was there. `namespace` is ignored for cluster-scoped kinds.
    pub fn remove(&mut self, kind: ObjectKind, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            ObjectKind::Namespace => self.namespaces.remove(name).is_some(),
            ObjectKind::ServiceAccount => self.service_accounts.remove(&key).is_some(),
            ObjectKind::Pod => self.pods.remove(&key).is_some(),
            ObjectKind::NetworkPolicy => self.network_policies.remove(&key).is_some(),
            ObjectKind::ZeroTrustPolicy => self.zero_trust_policies.remove(&key).is_some(),
            ObjectKind::Node => self.nodes.remove(name).is_some(),
            ObjectKind::Service => self.services.remove(&key).is_some(),
            ObjectKind::EndpointSlice => self.endpoint_slices.remove(&key).is_some(),
        }
    }

    pub fn contains(&self, kind: ObjectKind, namespace: &str, name: &str) -> bool {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            ObjectKind::Namespace => self.namespaces.contains_key(name),
            ObjectKind::ServiceAccount => self.service_accounts.contains_key(&key),
            ObjectKind::Pod => self.pods.contains_key(&key),
            ObjectKind::NetworkPolicy => self.network_policies.contains_key(&key),
            ObjectKind::ZeroTrustPolicy => self.zero_trust_policies.contains_key(&key),
            ObjectKind::Node => self.nodes.contains_key(name),
            ObjectKind::Service => self.services.contains_key(&key),
            ObjectKind::EndpointSlice => self.endpoint_slices.contains_key(&key),
        }
    }

    /// Every object of one kind, in key order (cloned).
    pub fn objects(&self, kind: ObjectKind) -> Vec<ClusterObject> {
        fn all<K, T: Clone>(m: &BTreeMap<K, T>, f: fn(T) -> ClusterObject) -> Vec<ClusterObject> {
            m.values().cloned().map(f).collect()
        }
        match kind {
            ObjectKind::Namespace => all(&self.namespaces, ClusterObject::Namespace),
            ObjectKind::ServiceAccount => all(&self.service_accounts, ClusterObject::ServiceAccount),
            ObjectKind::Pod => all(&self.pods, ClusterObject::Pod),
            ObjectKind::NetworkPolicy => all(&self.network_policies, ClusterObject::NetworkPolicy),
            ObjectKind::ZeroTrustPolicy => all(&self.zero_trust_policies, ClusterObject::ZeroTrustPolicy),
            ObjectKind::Node => all(&self.nodes, ClusterObject::Node),
            ObjectKind::Service => all(&self.services, ClusterObject::Service),
            ObjectKind::EndpointSlice => all(&self.endpoint_slices, ClusterObject::EndpointSlice),
        }
    }

    /// One object (cloned). `namespace` is ignored for cluster-scoped kinds.
    pub fn get(&self, kind: ObjectKind, namespace: &str, name: &str) -> Option<ClusterObject> {
        let key = (namespace.to_string(), name.to_string());
        match kind {
            ObjectKind::Namespace => self.namespaces.get(name).cloned().map(ClusterObject::Namespace),
            ObjectKind::ServiceAccount => self.service_accounts.get(&key).cloned().map(ClusterObject::ServiceAccount),
            ObjectKind::Pod => self.pods.get(&key).cloned().map(ClusterObject::Pod),
            ObjectKind::NetworkPolicy => self.network_policies.get(&key).cloned().map(ClusterObject::NetworkPolicy),
            ObjectKind::ZeroTrustPolicy => self.zero_trust_policies.get(&key).cloned().map(ClusterObject::ZeroTrustPolicy),
            ObjectKind::Node => self.nodes.get(name).cloned().map(ClusterObject::Node),
            ObjectKind::Service => self.services.get(&key).cloned().map(ClusterObject::Service),
            ObjectKind::EndpointSlice => self.endpoint_slices.get(&key).cloned().map(ClusterObject::EndpointSlice),
        }
    }

    /// Replace every object of `kind` with `objects` (normalized, validated, all of `kind`).
    pub fn replace_kind(&mut self, kind: ObjectKind, objects: Vec<ClusterObject>) {
        match kind {
            ObjectKind::Namespace => self.namespaces.clear(),
            ObjectKind::ServiceAccount => self.service_accounts.clear(),
            ObjectKind::Pod => self.pods.clear(),
            ObjectKind::NetworkPolicy => self.network_policies.clear(),
            ObjectKind::ZeroTrustPolicy => self.zero_trust_policies.clear(),
            ObjectKind::Node => self.nodes.clear(),
            ObjectKind::Service => self.services.clear(),
            ObjectKind::EndpointSlice => self.endpoint_slices.clear(),
        }
        for o in objects {
            debug_assert_eq!(o.kind(), kind);
            self.upsert(o);
        }
    }

    /// Labels of a namespace as selectors see them: its own labels plus the automatic
    /// `kubernetes.io/metadata.name`, also when no Namespace object is known.
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(namespace)
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(k8s::NAMESPACE_NAME_LABEL.to_string(), namespace.to_string());
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_defaulting_and_keys() {
        let mut o = ClusterObject::Pod(Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        o.normalize_and_validate().unwrap();
        assert_eq!(o.key(), ("default".to_string(), "p".to_string()));
        assert_eq!(o.describe(), "Pod default/p");

        let mut n = ClusterObject::Namespace(Namespace {
            metadata: ObjectMeta {
                name: Some("prod".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        n.normalize_and_validate().unwrap();
        assert_eq!(n.describe(), "Namespace prod");

        let mut st = ClusterState::new();
        assert!(!st.upsert(o.clone()));
        assert!(st.upsert(o));
        assert!(st.contains(ObjectKind::Pod, "default", "p"));
        assert!(st.remove(ObjectKind::Pod, "default", "p"));
        assert!(!st.contains(ObjectKind::Pod, "default", "p"));
    }

    #[test]
    fn missing_name_is_rejected() {
        let mut o = ClusterObject::NetworkPolicy(NetworkPolicy::default());
        let e = o.normalize_and_validate().unwrap_err();
        assert_eq!(e.to_string(), "metadata.name: missing");
    }

    #[test]
    fn automatic_namespace_label() {
        let st = ClusterState::new();
        let l = st.namespace_labels("prod");
        assert_eq!(
            l.get("kubernetes.io/metadata.name").map(String::as_str),
            Some("prod")
        );
    }
}
