//! The agent's desired datapath state: what the policy compiler produces from the
//! cluster state and what the map writer makes the pinned maps equal to.
//! Every policy source (manifest directory, Kubernetes API) ends here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use zt_common::{PolicyKey, PolicyValue};

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
}

/// Everything the datapath maps must hold, minus interface indexes (the runtime adds them).
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub endpoints: BTreeMap<IpAddr, EndpointEntry>,
    pub cidrs: BTreeMap<Cidr, u32>,
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    pub rules: BTreeMap<u32, RuleInfo>,
}
