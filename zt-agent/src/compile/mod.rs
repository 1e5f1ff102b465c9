//! The policy compiler: `ClusterState` in, `Desired` (datapath maps) out.
//!
//! Steps: workloads and their identities (workloads.rs), CIDR identities of every
//! ipBlock, each policy's rules in a direction-neutral form (netpol.rs, ztp.rs), then
//! the LPM entries with deny-beats-allow pruning (policy.rs). Deterministic (BTreeMaps,
//! sources in kind/namespace/name order) and fail-closed per object: a policy or pod
//! that does not compile is left out and its subjects quarantined (failures.rs), and
//! `Desired::failures` says so; only a node-wide error (no identity numbers left, a bad
//! trust domain) fails the whole compile, leaving the identity allocator untouched.

mod auth;
pub mod cidr;
mod failures;
pub(crate) mod fqdn;
pub mod fqdn_slots;
pub mod host_access;
mod netpol;
mod policy;
pub mod ports;
pub mod selector;
mod workloads;
mod ztp;
pub mod incremental;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use zt_common::{
    DIR_EGRESS, DIR_INGRESS, EP_ENFORCE_EGRESS, EP_ENFORCE_INGRESS, EP_LOCAL, IDENTITY_DNS, IDENTITY_FIRST_WORKLOAD,
};

use crate::identity::{self, IdentityAllocator, LabelFilter};
use crate::model::k8s::LabelSelector;
use crate::model::ztp::SpiffePattern;
use crate::model::{ClusterState, ObjectKind};
use crate::state::{Action, Cidr, Desired, EndpointEntry, Failure, RuleInfo};
pub use fqdn::default_dns_servers;
pub use fqdn_slots::FqdnSlots;
pub use host_access::HostAccess;
use ports::PortMatch;
use workloads::Workload;

/// Node-wide default for local endpoints no policy isolates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EnforcementMode {
    /// Kubernetes semantics: an endpoint is isolated in a direction only when a
    /// policy selects it for that direction.
    #[default]
    Default,
    /// Every local endpoint is isolated in both directions (zero trust).
    Always,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileConfig {
    /// This node's name (pods with `spec.nodeName` equal to it are local).
    pub node_name: String,
    /// SPIFFE trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    pub enforcement_mode: EnforcementMode,
    /// The node's own addresses (mapped to IDENTITY_HOST).
    pub host_ips: Vec<IpAddr>,
    /// Key of the FQDN name hashes (what ZT_FQDN_CONFIG holds).
    pub fqdn_hash_key: [u64; 2],
    /// Trusted resolvers by SPIFFE ID (`--fqdn-dns-server`): node configuration, never
    /// policy, so that no namespace can name its own pod a resolver.
    pub dns_servers: Vec<SpiffePattern>,
    /// Resolver addresses that are no pod (`--fqdn-dns-address`: the kube-dns ClusterIP,
    /// node-local-dns), given the identity IDENTITY_DNS.
    pub dns_addresses: Vec<IpAddr>,
    /// What `host` may reach on isolated local pods (`--host-access`).
    pub host_access: HostAccess,
    /// The backend addresses of the resolver Service (`--fqdn-dns-service`, found in the
    /// Service table): the pods behind them are trusted resolvers.
    pub dns_backends: Vec<IpAddr>,
    /// Pod label keys left out of identities (`--identity-exclude-labels`).
    pub identity_labels: LabelFilter,
}

/// Why a compile failed: the object and field at fault when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    /// `Kind ns/name`.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
}

impl CompileError {
    pub fn new(message: impl Into<String>) -> Self {
        CompileError {
            object: None,
            field: None,
            message: message.into(),
        }
    }

    pub fn at(object: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        CompileError {
            object: Some(object.to_string()),
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if let Some(p) = &self.field {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for CompileError {}

impl From<identity::IdentityError> for CompileError {
    fn from(e: identity::IdentityError) -> Self {
        CompileError::new(e.0)
    }
}

/// `compile_with_slots` with FQDN slots that start empty (tests, one-shot tools).
pub fn compile(
    cluster: &ClusterState,
    cfg: &CompileConfig,
    ids: &mut IdentityAllocator,
) -> Result<Desired, CompileError> {
    compile_with_slots(cluster, cfg, ids, &mut FqdnSlots::new())
}

/// Compile the cluster state into the datapath's desired state. On success `ids`
/// holds exactly the identities in use (new ones allocated, unused ones released)
/// and `slots` the FQDN slots (freed ones pending until cleared); on error both are
/// unchanged.
pub fn compile_with_slots(
    cluster: &ClusterState,
    cfg: &CompileConfig,
    ids: &mut IdentityAllocator,
    slots: &mut FqdnSlots,
) -> Result<Desired, CompileError> {
    full(cluster, cfg, ids, slots, false).map(|(d, _)| d)
}

/// The full compile, and what the incremental compile needs to start from it.
pub(crate) fn full(
    cluster: &ClusterState,
    cfg: &CompileConfig,
    ids: &mut IdentityAllocator,
    slots: &mut FqdnSlots,
    want_memo: bool,
) -> Result<(Desired, Option<incremental::Memo>), CompileError> {
    crate::model::ztp::SpiffePattern::parse(&identity::spiffe_id(&cfg.trust_domain, "ns", "sa"))
        .map_err(|_| CompileError::new(format!("invalid trust domain {:?}", cfg.trust_domain)))?;
    let mut alloc = ids.clone();

    let mut failures: Vec<Failure> = Vec::new();
    // NetworkPolicy ipBlocks also match pod IPs: workload identities record them.
    let netpol_blocks: BTreeSet<Cidr> = netpol::ip_block_prefixes(cluster).into_iter().collect();
    let pod_failures = failures.len();
    let workloads::Built { workloads, mut endpoints, claims } = workloads::build(cluster, cfg, &mut alloc, &netpol_blocks, &mut failures)?;
    let pod_failures: Vec<Failure> = failures[pod_failures..].to_vec();

    // One CIDR identity per distinct prefix of any ipBlock, cidr or except.
    let mut cidrs = BTreeMap::new();
    let prefixes = netpol_blocks
        .iter()
        .copied()
        .chain(ztp::ip_block_prefixes(cluster));
    for c in prefixes.collect::<BTreeSet<Cidr>>() {
        cidrs.insert(c, alloc.cidr(c)?);
    }

    // Trusted resolvers: the configured addresses' identity plus every workload whose
    // SPIFFE ID a --fqdn-dns-server pattern matches.
    let mut dns_servers: BTreeSet<u32> = workloads
        .iter()
        .filter(|(_, w)| cfg.dns_servers.iter().any(|p| p.trust_domain == cfg.trust_domain && p.matches(&w.namespace, &w.service_account)))
        .map(|(id, _)| *id)
        .collect();
    dns_servers.insert(IDENTITY_DNS);
    // The resolver Service's pods, whatever their service account (a pod's address only:
    // a host-network resolver stays `host`).
    for ip in &cfg.dns_backends {
        if let Some(ep) = endpoints.get(&ip.to_canonical()).filter(|e| e.pod.is_some() && e.identity >= IDENTITY_FIRST_WORKLOAD) {
            dns_servers.insert(ep.identity);
        }
    }
    for ip in &cfg.dns_addresses {
        // A pod's own address keeps its pod identity; a node's address named here (the
        // 169.254.20.10 of NodeLocal DNSCache, a host-network resolver) is the resolver.
        let e = endpoints.entry(ip.to_canonical()).or_insert(EndpointEntry { identity: IDENTITY_DNS, flags: 0, pod: None });
        if e.pod.is_none() {
            e.identity = IDENTITY_DNS;
        }
    }

    let ctx = Ctx {
        cfg,
        cluster,
        workloads: &workloads,
        cidrs,
        dns_servers,
    };
    let mut out = Rules::default();
    // Where each policy's rules start, in compile order (incremental.rs).
    let mut first_ids: Vec<(ObjectKind, crate::model::ObjectKey, u32)> = Vec::new();
    let mut pick = |k: ObjectKind, ns: &str, name: &str, out: &mut Rules| {
        first_ids.push((k, (ns.to_string(), name.to_string()), out.next_id()));
        true
    };
    netpol::compile(cluster, &ctx, &mut out, &mut failures, &mut pick);
    ztp::compile(cluster, &ctx, &mut out, &mut failures, &mut pick);
    let tail_start = out.next_id();
    // Subjects of failed policies take no FQDN slots; an identity whose FQDN rules need
    // more slots than there are fails closed as a whole.
    let failed_policies: BTreeSet<u32> = failures.iter().flat_map(|f| f.identities.iter().copied()).collect();
    failures::quarantine(&mut out, &failed_policies);
    let mut fqdn_slots = slots.clone();
    let fq = fqdn::build(&ctx, &out.fqdn, cfg.fqdn_hash_key, &mut fqdn_slots, &mut failures);
    let quarantined: BTreeSet<u32> = failures.iter().flat_map(|f| f.identities.iter().copied()).collect();
    failures::quarantine(&mut out, &quarantined);
    // Node configuration, not policy: the host's probes reach quarantined pods too, as
    // every pod under --host-access all.
    if cfg.host_access == HostAccess::Probes {
        host_access::compile(&ctx, &mut out);
    }
    if cfg.enforcement_mode == EnforcementMode::Always {
        out.isolate(&ctx.local_ids(), DIR_INGRESS);
        out.isolate(&ctx.local_ids(), DIR_EGRESS);
    }
    auth::strict_rules(&mut out);

    for e in endpoints.values_mut() {
        if e.flags & EP_LOCAL != 0 {
            e.flags |= out.isolated.get(&e.identity).copied().unwrap_or(0);
            e.flags |= fq.flags.get(&e.identity).copied().unwrap_or(0);
        }
    }
    let mut policy = policy::entries(&ctx, &out.rules);
    auth::strict_flags(&mut policy, &out.strict);
    let http = crate::l7::rules::HttpTable::build(&out.rules);
    let warnings = fqdn::unreachable_dns(&policy, fq.slots.keys().copied(), &ctx.dns_servers)
        .into_iter()
        .map(|id| {
            format!("identity {id} has FQDN rules but no egress allow to a trusted DNS server (entity: dns) on port 53: its names never resolve, nothing is learned")
        })
        .collect();

    let keep: BTreeSet<u32> = ctx
        .workloads
        .keys()
        .chain(ctx.cidrs.values())
        .copied()
        .collect();
    let memo_in = incremental::MemoInput { cluster, cfg, claims, pod_failures, first_ids, tail_start, strict: !out.strict.is_empty(), fqdn: !out.fqdn.is_empty() || !fq.slots.is_empty() };
    alloc.retain(&keep);
    let mut identities = alloc.infos();
    for r in identity::reserved_identities() {
        identities.insert(r.id, r);
    }
    let endpoint_nodes = auth::endpoint_nodes(cluster, &endpoints);
    let cidrs = ctx.cidrs;
    let dns_servers = ctx.dns_servers;
    let desired = Desired {
        identities,
        endpoints,
        cidrs,
        policy,
        rules: out.infos,
        fqdn_names: fq.names,
        fqdn_ports: fq.ports,
        dns_servers,
        fqdn_slots: fq.slots,
        http,
        warnings,
        failures,
        endpoint_nodes,
    };
    let memo = want_memo.then(|| incremental::Memo::new(memo_in, workloads, &out.rules, &desired));
    *ids = alloc;
    *slots = fqdn_slots;
    Ok((desired, memo))
}

/// Everything the per-kind compilers need to resolve subjects and peers.
pub(crate) struct Ctx<'a> {
    pub cfg: &'a CompileConfig,
    pub cluster: &'a ClusterState,
    /// Workload identities of the cluster's pods.
    pub workloads: &'a BTreeMap<u32, Workload>,
    pub cidrs: BTreeMap<Cidr, u32>,
    /// Trusted resolver identities (`entity: dns`, ZT_DNS_SERVERS).
    pub dns_servers: BTreeSet<u32>,
}

impl Ctx<'_> {
    /// Identities with at least one pod on this node: the only ones that get entries.
    pub fn local_ids(&self) -> BTreeSet<u32> {
        self.workloads
            .iter()
            .filter(|(_, w)| w.local)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The pods of a workload identity.
    pub fn pods_of<'w>(&'w self, w: &'w Workload) -> impl Iterator<Item = &'w crate::model::Pod> + 'w {
        w.pods.iter().filter_map(|k| self.cluster.pods.get(k))
    }

    pub fn select(&self, pred: impl Fn(&Workload) -> bool) -> BTreeSet<u32> {
        self.workloads
            .iter()
            .filter(|(_, w)| pred(w))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Kubernetes peer semantics: podSelector alone = pods of `namespace`;
    /// namespaceSelector alone = every pod of the matching namespaces; both = AND.
    pub fn select_peers(
        &self,
        namespace: &str,
        pod_sel: Option<&LabelSelector>,
        ns_sel: Option<&LabelSelector>,
    ) -> BTreeSet<u32> {
        self.select(|w| {
            let ns_ok = match ns_sel {
                Some(s) => selector::matches(s, &w.namespace_labels),
                None => w.namespace == namespace,
            };
            ns_ok && pod_sel.is_none_or(|s| selector::matches(s, &w.pod_labels))
        })
    }

    /// Local identities of `namespace` whose pod labels match.
    pub fn select_local(&self, namespace: &str, pod_sel: &LabelSelector) -> BTreeSet<u32> {
        self.select(|w| {
            w.local && w.namespace == namespace && selector::matches(pod_sel, &w.pod_labels)
        })
    }
}

/// Decides whether the per-kind compiler compiles a policy (and may set `Rules::id_base`).
pub(crate) type Pick<'p> = &'p mut dyn FnMut(ObjectKind, &str, &str, &mut Rules) -> bool;

/// Which other namespaces' pods a policy's peers can name (incremental.rs).
#[derive(Clone, Debug, Default)]
pub(crate) struct Reach {
    /// Any namespace's.
    pub all: bool,
    /// The namespaces these select.
    pub namespaces: Vec<LabelSelector>,
    /// Only the full compile handles this policy (FQDN slots, STRICT).
    pub full_only: bool,
}

/// Who a rule applies to on the other side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    Any,
    Ids(BTreeSet<u32>),
}

impl Peers {
    pub fn union(self, other: Peers) -> Peers {
        match (self, other) {
            (Peers::Ids(mut a), Peers::Ids(b)) => {
                a.extend(b);
                Peers::Ids(a)
            }
            _ => Peers::Any,
        }
    }
}

/// A rule in direction-neutral form; `subjects` are local identities only.
#[derive(Clone, Debug)]
pub struct Rule {
    pub id: u32,
    pub dir: u8,
    pub action: Action,
    pub subjects: BTreeSet<u32>,
    pub peers: Peers,
    /// Empty = any protocol and port.
    pub ports: Vec<PortMatch>,
    /// `authentication: required`: what it allows needs a proof of the peer's identity.
    pub auth: bool,
    /// Allow rules only: the requests allowed on the rule's (TCP) ports; None = L4 only.
    pub http: Option<Vec<crate::model::http::HttpRule>>,
}

/// The compiled rules, their descriptions and which local identities are isolated.
#[derive(Default)]
pub(crate) struct Rules {
    pub rules: Vec<Rule>,
    pub infos: BTreeMap<u32, RuleInfo>,
    /// Local identity -> EP_ENFORCE_* flags.
    pub isolated: BTreeMap<u32, u32>,
    /// The FQDN parts of egress rules (compiled by fqdn.rs).
    pub fqdn: Vec<fqdn::FqdnRule>,
    /// STRICT (a ZeroTrustPolicy's `spec.authentication: required`): local identity ->
    /// the first policy (`Kind ns/name`) that made it so (auth.rs).
    pub strict: BTreeMap<u32, String>,
    /// Rule ids start after this (the incremental compile numbers a policy's rules as the
    /// full compile did).
    pub id_base: u32,
}

impl Rules {
    /// The id the next rule gets.
    pub fn next_id(&self) -> u32 {
        self.id_base + self.infos.len() as u32 + 1
    }

    /// Number the rule (ids from 1, in compile order) and record where it came from.
    pub fn add(&mut self, source: &str, path: String, mut rule: Rule) {
        rule.id = self.next_id();
        self.infos.insert(
            rule.id,
            RuleInfo {
                id: rule.id,
                source: source.to_string(),
                path,
                action: rule.action,
                fqdn: Vec::new(),
                http: rule.http.iter().flatten().map(|h| h.to_string()).collect(),
            },
        );
        self.rules.push(rule);
    }

    pub fn isolate(&mut self, ids: &BTreeSet<u32>, dir: u8) {
        let flag = if dir == DIR_INGRESS {
            EP_ENFORCE_INGRESS
        } else {
            EP_ENFORCE_EGRESS
        };
        for id in ids {
            *self.isolated.entry(*id).or_default() |= flag;
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod incremental_tests;
