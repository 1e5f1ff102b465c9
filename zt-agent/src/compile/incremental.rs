//! Incremental compile: when only pods changed since the last compile, recompute what
//! those pods can affect and patch the last result, instead of compiling the cluster.
//!
//! Why it is sound: every policy entry, HTTP rule and isolation flag is keyed by a local
//! identity, and a local identity's rules come only from the policies of its own
//! namespace (subjects never leave the policy's namespace). A pod change in namespaces C
//! changes the workloads of C only, so the entries that can change are those of the
//! namespaces A = C plus every namespace with a policy whose peers can name a pod of C
//! (namespaceSelector matching a namespace of C; ipBlock, SPIFFE ID, `entity: cluster`
//! or `dns` and named egress ports: any namespace, `Reach`). Those namespaces' policies
//! are compiled again against all workloads, with the rule ids the full compile gave
//! them (a policy's rule count and failure do not depend on pods); everything else is
//! kept. The host-probe rules (numbered after every policy rule, one per local identity)
//! are rebuilt and the kept entries renumbered.
//!
//! Anything else falls back to the full compile: a first compile, a changed
//! configuration, namespace, policy or node, FQDN rules or STRICT anywhere, a pod listing
//! one address twice, a changed trusted resolver, a node number that a change makes
//! shared. `tests.rs` (`incremental_*`) checks the result equals a full compile after
//! every event of random churn.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use zt_common::{auth_node_id, AUTH_NODE_UNKNOWN, DIR_EGRESS, DIR_INGRESS, EP_LOCAL, IDENTITY_DNS, IDENTITY_HOST, IDENTITY_INIT, IDENTITY_REMOTE_NODE};

use super::workloads::{self, PodClaim, Workload};
use super::{failures, host_access, netpol, policy, ztp, CompileConfig, CompileError, Ctx, EnforcementMode, FqdnSlots, HostAccess, Reach, Rule, Rules};
use crate::identity::IdentityAllocator;
use crate::model::{ClusterState, ObjectKey, ObjectKind, Pod};
use crate::state::{Cidr, Desired, EndpointEntry, Failure, PodRef};

/// How the last `Compiler::compile` went (for metrics and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Full,
    /// Pods of these many namespaces changed; these many namespaces were recompiled.
    Incremental {
        changed: usize,
        recompiled: usize,
    },
    Unchanged,
}

/// Compiles, incrementally when it can (see the module comment).
#[derive(Default)]
pub struct Compiler {
    memo: Option<Memo>,
    pub last: Option<Mode>,
}

impl Compiler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `desired()` what `compile_with_slots` gives for `cluster` (the equivalence
    /// the tests check). On error the next call compiles in full.
    pub fn compile(&mut self, cluster: &ClusterState, cfg: &CompileConfig, ids: &mut IdentityAllocator, slots: &mut FqdnSlots) -> Result<Mode, CompileError> {
        if let Some(mut memo) = self.memo.take() {
            if let Step::Done(mode) = memo.step(cluster, cfg, ids) {
                self.memo = Some(memo);
                self.last = Some(mode);
                return Ok(mode);
            }
        }
        self.last = None;
        let (d, memo) = super::full(cluster, cfg, ids, slots, true)?;
        let mut memo = memo.expect("asked for");
        memo.desired = d;
        self.memo = Some(memo);
        self.last = Some(Mode::Full);
        Ok(Mode::Full)
    }

    /// The last successful compile's result.
    pub fn desired(&self) -> Option<&Desired> {
        self.memo.as_ref().map(|m| &m.desired)
    }

    /// Forget the last result: the next compile is a full one.
    pub fn reset(&mut self) {
        self.memo = None;
    }
}

enum Step {
    Done(Mode),
    Full,
}

/// What the full compile hands over besides `Desired`.
pub(crate) struct MemoInput<'a> {
    pub cluster: &'a ClusterState,
    pub cfg: &'a CompileConfig,
    pub claims: BTreeMap<ObjectKey, PodClaim>,
    pub pod_failures: Vec<Failure>,
    pub first_ids: Vec<(ObjectKind, ObjectKey, u32)>,
    pub tail_start: u32,
    pub strict: bool,
    pub fqdn: bool,
}

struct PolicyMemo {
    kind: ObjectKind,
    key: ObjectKey,
    first_id: u32,
    reach: Reach,
    failure: Option<Failure>,
}

/// The last compile's inputs and result.
pub(crate) struct Memo {
    usable: bool,
    cfg: CompileConfig,
    namespaces: BTreeMap<String, crate::model::Namespace>,
    network_policies: BTreeMap<ObjectKey, crate::model::NetworkPolicy>,
    zero_trust_policies: BTreeMap<ObjectKey, crate::model::ZeroTrustPolicy>,
    nodes: BTreeMap<String, crate::model::Node>,
    pods: BTreeMap<ObjectKey, Pod>,
    workloads: BTreeMap<u32, Workload>,
    claims: BTreeMap<ObjectKey, PodClaim>,
    /// Address -> the pods claiming it (key order: the last one names the entry).
    ip_claims: BTreeMap<IpAddr, BTreeSet<ObjectKey>>,
    pod_failures: BTreeMap<ObjectKey, Failure>,
    policies: Vec<PolicyMemo>,
    netpol_blocks: BTreeSet<Cidr>,
    /// The host-probe rules: rule `tail_start + i` is the one of local identity `tail[i]`.
    tail_start: u32,
    tail: Vec<u32>,
    /// Node names the endpoints' pods name, with how many; node number -> names.
    node_names: BTreeMap<String, usize>,
    pub desired: Desired,
}

impl Memo {
    pub(crate) fn new(m: MemoInput<'_>, workloads: BTreeMap<u32, Workload>, rules: &[Rule], desired: &Desired) -> Memo {
        let cluster = m.cluster;
        let mut policies = Vec::new();
        let mut full_only = false;
        for (kind, key, first_id) in m.first_ids {
            let reach = match kind {
                ObjectKind::NetworkPolicy => netpol::reach(&cluster.network_policies[&key]),
                _ => ztp::reach(&cluster.zero_trust_policies[&key]),
            };
            full_only |= reach.full_only;
            let object = kind.describe(&key.0, &key.1);
            let failure = desired.failures.iter().find(|f| f.object == object).cloned();
            policies.push(PolicyMemo { kind, key, first_id, reach, failure });
        }
        let mut ip_claims: BTreeMap<IpAddr, BTreeSet<ObjectKey>> = BTreeMap::new();
        let mut duplicate = false;
        for (key, c) in &m.claims {
            for (ip, _) in &c.ips {
                duplicate |= !ip_claims.entry(*ip).or_default().insert(key.clone());
            }
        }
        let pod_failures = m
            .pod_failures
            .into_iter()
            .filter_map(|f| {
                let (ns, name) = f.object.strip_prefix("Pod ")?.split_once('/')?;
                Some(((ns.to_string(), name.to_string()), f))
            })
            .collect();
        let tail = rules.iter().filter(|r| r.id >= m.tail_start).map(|r| r.subjects.first().copied().unwrap_or(0)).collect();
        let mut node_names: BTreeMap<String, usize> = BTreeMap::new();
        for e in desired.endpoints.values() {
            if let Some(n) = node_of(&cluster.pods, e) {
                *node_names.entry(n.to_string()).or_default() += 1;
            }
        }
        let usable = !m.strict && !m.fqdn && !full_only && !duplicate;
        // An unusable memo copies nothing: every compile is a full one.
        let empty = ClusterState::default();
        let c = if usable { cluster } else { &empty };
        Memo {
            usable,
            cfg: m.cfg.clone(),
            namespaces: c.namespaces.clone(),
            network_policies: c.network_policies.clone(),
            zero_trust_policies: c.zero_trust_policies.clone(),
            nodes: c.nodes.clone(),
            pods: c.pods.clone(),
            workloads,
            claims: m.claims,
            ip_claims,
            pod_failures,
            policies,
            netpol_blocks: netpol::ip_block_prefixes(cluster).into_iter().collect(),
            tail_start: m.tail_start,
            tail,
            node_names,
            desired: Desired::default(),
        }
    }

    fn step(&mut self, cluster: &ClusterState, cfg: &CompileConfig, ids: &mut IdentityAllocator) -> Step {
        if !self.usable
            || *cfg != self.cfg
            || cluster.namespaces != self.namespaces
            || cluster.network_policies != self.network_policies
            || cluster.zero_trust_policies != self.zero_trust_policies
            || cluster.nodes != self.nodes
        {
            return Step::Full;
        }
        let changed = changed_pods(&self.pods, &cluster.pods);
        if changed.is_empty() {
            return Step::Done(Mode::Unchanged);
        }
        // From here on the memo is patched in place; `Full` drops it.
        match self.patch(cluster, cfg, ids, &changed) {
            Ok(Some(mode)) => Step::Done(mode),
            Ok(None) => Step::Full,
            // Only running out of identity numbers gets here; the full compile then fails
            // the same way (the numbers allocated meanwhile are released by a later compile).
            Err(_) => Step::Full,
        }
    }

    fn patch(
        &mut self,
        cluster: &ClusterState,
        cfg: &CompileConfig,
        ids: &mut IdentityAllocator,
        changed: &BTreeSet<ObjectKey>,
    ) -> Result<Option<Mode>, CompileError> {
        let c_ns: BTreeSet<&str> = changed.iter().map(|(ns, _)| ns.as_str()).collect();
        // A trusted resolver among the changed pods: its `entity: dns` peers move.
        let resolver = |p: &Pod, ns: &str| {
            let sa =
                p.spec.as_ref().and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref())).filter(|s| !s.is_empty()).unwrap_or("default");
            let by_id = cfg.dns_servers.iter().any(|pat| pat.trust_domain == cfg.trust_domain && pat.matches(ns, sa));
            let by_ip = workloads::pod_ips(p).unwrap_or_default().iter().any(|ip| cfg.dns_backends.iter().any(|b| b.to_canonical() == *ip));
            by_id || by_ip
        };
        for key in changed {
            for p in [self.pods.get(key), cluster.pods.get(key)].into_iter().flatten() {
                if resolver(p, &key.0) {
                    return Ok(None);
                }
            }
        }
        let ns_labels: Vec<BTreeMap<String, String>> = c_ns.iter().map(|ns| cluster.namespace_labels(ns)).collect();
        let mut a_ns: BTreeSet<String> = c_ns.iter().map(|s| s.to_string()).collect();
        for p in &self.policies {
            let r = &p.reach;
            if r.all || r.namespaces.iter().any(|s| ns_labels.iter().any(|l| super::selector::matches(s, l))) {
                a_ns.insert(p.key.0.clone());
            }
        }

        // 1. Pods: take the changed pods' old claims out, then add their new ones in key
        //    order (new identities are numbered in the order the full compile would).
        let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
        let mut touched_ids: BTreeSet<u32> = BTreeSet::new();
        let mut new_infos = Vec::new();
        for key in changed {
            self.pod_failures.remove(key);
            if let Some(old) = self.claims.remove(key) {
                for (ip, id) in old.ips {
                    touched_ips.insert(ip);
                    touched_ids.insert(id);
                    if let Some(set) = self.ip_claims.get_mut(&ip) {
                        set.remove(key);
                        if set.is_empty() {
                            self.ip_claims.remove(&ip);
                        }
                    }
                    if let Some(w) = self.workloads.get_mut(&id) {
                        w.pods.retain(|k| k != key);
                    }
                }
            }
        }
        for key in changed {
            let Some(pod) = cluster.pods.get(key) else { continue };
            let mut fails = Vec::new();
            let ident = workloads::pod_identity(cluster, cfg, ids, &self.netpol_blocks, &mut fails, &key.0, &key.1, pod)?;
            if let Some(f) = fails.pop() {
                self.pod_failures.insert(key.clone(), f);
            }
            let Some(ident) = ident else { continue };
            let distinct: BTreeSet<IpAddr> = ident.claims.iter().map(|(ip, _)| *ip).collect();
            if distinct.len() != ident.claims.len() {
                return Ok(None);
            }
            for (ip, id, w) in ident.ips {
                touched_ips.insert(ip);
                touched_ids.insert(id);
                self.ip_claims.entry(ip).or_default().insert(key.clone());
                let w = self.workloads.entry(id).or_insert(w);
                if let Err(at) = w.pods.binary_search(key) {
                    w.pods.insert(at, key.clone());
                }
            }
            new_infos.extend(ident.infos);
            self.claims.insert(key.clone(), PodClaim { ips: ident.claims, local: ident.local });
        }
        let mut removed_ids = BTreeSet::new();
        for id in &touched_ids {
            let Some(w) = self.workloads.get_mut(id) else { continue };
            if w.pods.is_empty() {
                self.workloads.remove(id);
                removed_ids.insert(*id);
            } else {
                w.local = w.pods.iter().any(|k| self.claims.get(k).is_some_and(|c| c.local));
            }
        }
        // Every touched identity belongs to a namespace of C (identities carry theirs).
        let a_locals: BTreeSet<u32> = self.workloads.iter().filter(|(_, w)| w.local && a_ns.contains(&w.namespace)).map(|(id, _)| *id).collect();
        let in_a = |id: u32| a_locals.contains(&id) || removed_ids.contains(&id) || touched_ids.contains(&id);

        // 2. Endpoints of the touched addresses, as workloads::build and the full compile
        //    write them (conflicts, nodes, host, resolver addresses).
        let mut host_ips: BTreeSet<IpAddr> = cfg.host_ips.iter().map(|ip| ip.to_canonical()).collect();
        let mut remote: BTreeSet<IpAddr> = BTreeSet::new();
        for (name, node) in &cluster.nodes {
            let ips = workloads::node_ips(node);
            if *name == cfg.node_name {
                host_ips.extend(ips);
            } else {
                remote.extend(ips);
            }
        }
        let dns_addresses: BTreeSet<IpAddr> = cfg.dns_addresses.iter().map(|ip| ip.to_canonical()).collect();
        let mut moved_names: BTreeSet<String> = BTreeSet::new();
        for ip in &touched_ips {
            let mut entry = self.ip_claims.get(ip).and_then(|set| {
                let last = set.last()?;
                let claim = &self.claims[last];
                let id = claim.ips.iter().find(|(i, _)| i == ip).map(|(_, id)| *id)?;
                let identity = if set.len() > 1 {
                    log::warn!("IP {ip} claimed by several pods ({set:?}): treated as unknown");
                    IDENTITY_INIT
                } else {
                    id
                };
                Some(EndpointEntry {
                    identity,
                    flags: if claim.local { EP_LOCAL } else { 0 },
                    pod: Some(PodRef { namespace: last.0.clone(), name: last.1.clone() }),
                })
            });
            if remote.contains(ip) {
                entry = Some(EndpointEntry { identity: IDENTITY_REMOTE_NODE, flags: 0, pod: None });
            }
            if host_ips.contains(ip) {
                entry = Some(EndpointEntry { identity: IDENTITY_HOST, flags: 0, pod: None });
            }
            if dns_addresses.contains(ip) {
                let e = entry.get_or_insert(EndpointEntry { identity: IDENTITY_DNS, flags: 0, pod: None });
                if e.pod.is_none() {
                    e.identity = IDENTITY_DNS;
                }
            }
            let old = match entry {
                Some(e) => self.desired.endpoints.insert(*ip, e),
                None => self.desired.endpoints.remove(ip),
            };
            // The names the node numbers are drawn from (auth::endpoint_nodes).
            if let Some(n) = old.as_ref().and_then(|e| node_of(&self.pods, e)) {
                let c = self.node_names.get_mut(n).expect("counted");
                *c -= 1;
                if *c == 0 {
                    moved_names.insert(n.to_string());
                    self.node_names.remove(n);
                }
            }
            if let Some(n) = self.desired.endpoints.get(ip).and_then(|e| node_of(&cluster.pods, e)) {
                let c = self.node_names.entry(n.to_string()).or_default();
                *c += 1;
                if *c == 1 {
                    moved_names.insert(n.to_string());
                }
            }
        }
        // A node name that came or went must not change which node numbers are shared.
        let all_names: BTreeSet<&str> = cluster.nodes.keys().map(String::as_str).chain(self.node_names.keys().map(String::as_str)).collect();
        let sharing = |n: &str| all_names.iter().any(|o| *o != n && auth_node_id(o.as_bytes()) == auth_node_id(n.as_bytes()));
        if moved_names.iter().any(|n| !cluster.nodes.contains_key(n) && sharing(n)) {
            return Ok(None);
        }
        for ip in &touched_ips {
            let node = self.desired.endpoints.get(ip).filter(|e| e.flags & EP_LOCAL == 0).and_then(|e| node_of(&cluster.pods, e));
            match node {
                Some(n) => self.desired.endpoint_nodes.insert(*ip, if sharing(n) { AUTH_NODE_UNKNOWN } else { auth_node_id(n.as_bytes()) }),
                None => self.desired.endpoint_nodes.remove(ip),
            };
        }
        for key in changed {
            match cluster.pods.get(key) {
                Some(p) => self.pods.insert(key.clone(), p.clone()),
                None => self.pods.remove(key),
            };
        }

        // 3. The policies of A, numbered as before; the host-probe rules, renumbered.
        let ctx = Ctx { cfg, cluster, workloads: &self.workloads, cidrs: self.desired.cidrs.clone(), dns_servers: self.desired.dns_servers.clone() };
        let first: BTreeMap<(ObjectKind, &ObjectKey), u32> = self.policies.iter().map(|p| ((p.kind, &p.key), p.first_id)).collect();
        let mut out = Rules::default();
        let mut fails = Vec::new();
        {
            let mut pick = |kind: ObjectKind, ns: &str, name: &str, out: &mut Rules| {
                if !a_ns.contains(ns) {
                    return false;
                }
                let id = first[&(kind, &(ns.to_string(), name.to_string()))];
                out.id_base = id - 1 - out.infos.len() as u32;
                true
            };
            netpol::compile(cluster, &ctx, &mut out, &mut fails, &mut pick);
            ztp::compile(cluster, &ctx, &mut out, &mut fails, &mut pick);
        }
        for p in self.policies.iter_mut().filter(|p| a_ns.contains(&p.key.0)) {
            let object = p.kind.describe(&p.key.0, &p.key.1);
            p.failure = fails.iter().find(|f| f.object == object).cloned();
        }
        let failures: Vec<Failure> = self.pod_failures.values().cloned().chain(self.policies.iter().filter_map(|p| p.failure.clone())).collect();
        let quarantined: BTreeSet<u32> = failures.iter().flat_map(|f| f.identities.iter().copied()).collect();
        failures::quarantine(&mut out, &quarantined);
        let mut tail = Rules { id_base: self.tail_start - 1, ..Default::default() };
        if cfg.host_access == HostAccess::Probes {
            host_access::compile(&ctx, &mut tail);
        }
        if cfg.enforcement_mode == EnforcementMode::Always {
            out.isolate(&a_locals, DIR_INGRESS);
            out.isolate(&a_locals, DIR_EGRESS);
        }
        let new_tail: Vec<u32> = tail.rules.iter().map(|r| r.subjects.first().copied().unwrap_or(0)).collect();
        let new_tail_id: BTreeMap<u32, u32> = new_tail.iter().enumerate().map(|(i, s)| (*s, self.tail_start + i as u32)).collect();
        // A kept identity keeps its probe rule (its pods did not change).
        if self.tail.iter().any(|s| !in_a(*s) && !new_tail_id.contains_key(s)) {
            return Ok(None);
        }
        let (tail_start, old_tail) = (self.tail_start, std::mem::take(&mut self.tail));
        let remap = |id: u32| if id >= tail_start { new_tail_id[&old_tail[(id - tail_start) as usize]] } else { id };

        // 4. Endpoint flags of A's local identities.
        for w in self.workloads.iter().filter(|(id, _)| a_locals.contains(id)).map(|(_, w)| w) {
            for k in &w.pods {
                for (ip, _) in &self.claims[k].ips {
                    if let Some(e) = self.desired.endpoints.get_mut(ip).filter(|e| e.flags & EP_LOCAL != 0) {
                        e.flags = EP_LOCAL | out.isolated.get(&e.identity).copied().unwrap_or(0);
                    }
                }
            }
        }
        for ip in &touched_ips {
            if let Some(e) = self.desired.endpoints.get_mut(ip).filter(|e| e.flags & EP_LOCAL != 0) {
                e.flags = EP_LOCAL | out.isolated.get(&e.identity).copied().unwrap_or(0);
            }
        }

        // 5. Entries, HTTP rules and rule descriptions.
        let mut rules_a = out.rules;
        rules_a.extend(tail.rules.iter().filter(|r| r.subjects.iter().all(|s| a_locals.contains(s))).cloned());
        let entries = policy::entries(&ctx, &rules_a);
        let http = crate::l7::rules::HttpTable::build(&rules_a);
        drop(ctx);
        self.desired.policy.retain(|k, v| {
            if in_a(k.key.local_id()) {
                return false;
            }
            v.rule_id = remap(v.rule_id);
            true
        });
        self.desired.policy.extend(entries);
        self.desired.http.patch(in_a, remap, http);
        self.desired.rules.retain(|id, _| *id < tail_start);
        self.desired.rules.extend(tail.infos);
        self.tail = new_tail;
        self.desired.failures = failures;

        // 6. Identities: the unused ones released as the full compile does.
        let keep: BTreeSet<u32> = self.workloads.keys().chain(self.desired.cidrs.values()).copied().collect();
        ids.retain(&keep);
        for id in &removed_ids {
            self.desired.identities.remove(id);
        }
        for info in new_infos {
            if self.workloads.contains_key(&info.id) {
                self.desired.identities.entry(info.id).or_insert(info);
            }
        }
        let mode = Mode::Incremental { changed: c_ns.len(), recompiled: a_ns.len() };
        Ok(Some(mode))
    }
}

/// Pods added, removed or changed in what the compiler reads of them.
fn changed_pods(before: &BTreeMap<ObjectKey, Pod>, now: &BTreeMap<ObjectKey, Pod>) -> BTreeSet<ObjectKey> {
    let mut out = BTreeSet::new();
    for (k, p) in now {
        if !before.get(k).is_some_and(|b| same_for_compile(b, p)) {
            out.insert(k.clone());
        }
    }
    out.extend(before.keys().filter(|k| !now.contains_key(*k)).cloned());
    out
}

/// Equal in every field the compiler reads (workloads.rs, policy.rs named ports,
/// host_access.rs probes, auth.rs nodes): labels, node, service account, host network,
/// containers, phase and addresses. Cheaper than comparing whole objects, whose status
/// (conditions, container statuses) and metadata (managed fields) change far more often.
fn same_for_compile(a: &Pod, b: &Pod) -> bool {
    let (sa, sb) = (a.spec.as_ref(), b.spec.as_ref());
    let spec_same = match (sa, sb) {
        (Some(x), Some(y)) => {
            x.node_name == y.node_name
                && x.service_account_name == y.service_account_name
                && x.service_account == y.service_account
                && x.host_network == y.host_network
                && x.containers == y.containers
                && x.init_containers == y.init_containers
        }
        (None, None) => true,
        _ => false,
    };
    let status_same = match (a.status.as_ref(), b.status.as_ref()) {
        (Some(x), Some(y)) => x.phase == y.phase && x.pod_ip == y.pod_ip && x.pod_ips == y.pod_ips,
        (None, None) => true,
        _ => false,
    };
    a.metadata.labels == b.metadata.labels && spec_same && status_same
}

/// The node an endpoint's pod runs on (auth::endpoint_nodes).
fn node_of<'c>(pods: &'c BTreeMap<ObjectKey, Pod>, e: &EndpointEntry) -> Option<&'c str> {
    let p = e.pod.as_ref()?;
    pods.get(&(p.namespace.clone(), p.name.clone()))?.spec.as_ref()?.node_name.as_deref()
}
