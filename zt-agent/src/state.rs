//! The agent's desired datapath state: what the policy compiler produces from the
//! cluster state and what the map writer makes the pinned maps equal to.
//! Every policy source (manifest directory, Kubernetes API) ends here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use zt_common::{FqdnNameKey, FqdnPortsValue, PolicyKey, PolicyValue};

/// An IP prefix (ipBlock CIDR). `prefix` counts bits of the family's own length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// A numeric security identity: one SPIFFE ID plus its identity-relevant labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub id: u32,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`; reserved identities use `reserved:<name>`,
    /// CIDR identities `cidr:<prefix>`.
    pub spiffe_id: String,
    /// Pod labels plus namespace labels (`namespace-label:` prefixed, see identity.rs).
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// One IP of the cluster and who it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub identity: u32,
    /// `zt_common::EP_*` flags (LOCAL, ENFORCE_INGRESS, ENFORCE_EGRESS).
    pub flags: u32,
    /// The pod behind the IP (None for host addresses).
    pub pod: Option<PodRef>,
}

/// An LPM policy entry: the key data plus its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyEntryKey {
    pub prefix_len: u32,
    pub key: PolicyKey,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// Where a policy entry came from, for `ztctl explain` and drop events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub id: u32,
    /// e.g. "NetworkPolicy default/allow-sleep" or "ZeroTrustPolicy default/httpbin".
    pub source: String,
    /// e.g. "spec.ingress[0]".
    pub path: String,
    pub action: Action,
    /// The FQDN patterns of the rule (`api.example.com`, `*.example.com`), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fqdn: Vec<String>,
    /// The HTTP rules of the rule (`GET /headers`, `* /api/*`), if any: the proxy allows
    /// only these requests on its ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<String>,
}

/// Everything the datapath maps must hold, minus interface indexes (the runtime adds them).
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub cidrs: BTreeMap<Cidr, u32>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    pub rules: BTreeMap<u32, RuleInfo>,
    /// ZT_FQDN_NAMES: (local identity, exact/suffix, name hash) -> slots.
    pub fqdn_names: BTreeMap<FqdnNameKey, u32>,
    /// ZT_FQDN_PORTS (peer 0, egress), folded: each entry includes its shorter covers.
    pub fqdn_ports: BTreeMap<PolicyEntryKey, FqdnPortsValue>,
    /// ZT_DNS_SERVERS: trusted resolver identities.
    pub dns_servers: BTreeSet<u32>,
    /// Local identity -> FQDN slot -> rule id (the slots a learned entry may carry).
    pub fqdn_slots: BTreeMap<u32, BTreeMap<u8, u32>>,
    /// The HTTP rules the agent's proxy judges requests by (entries flagged POLICY_FLAG_HTTP).
    pub http: crate::l7::rules::HttpTable,
    /// Problems that do not fail the compile (e.g. FQDN rules without a DNS allow).
    pub warnings: Vec<String>,
    /// Objects that failed to compile, and the local identities that fail closed for them.
    pub failures: Vec<Failure>,
    /// Pods of other nodes: their node's number (`zt_common::auth_node_id`; 0 when two
    /// node names share one), where proofs of their identity are looked up.
    pub endpoint_nodes: BTreeMap<IpAddr, u32>,
}

/// One object (a policy, a pod) or one identity's rules that could not be compiled or
/// applied. Only `identities` pay for it: they are isolated in both directions and get
/// no allow from any policy (host probes under `--host-access probes` excepted); the
/// rest of the node is enforced as compiled.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Failure {
    /// `Kind ns/name`, or `map ZT_...` for what a full map could not hold.
    pub object: String,
    pub error: String,
    /// Local identities failed closed (empty: nothing local was affected).
    pub identities: BTreeSet<u32>,
}
