//! ZeroTrustPolicy -> rules. Differences from NetworkPolicy: subjects and peers may
//! be named by SPIFFE ID, rules can deny (deny beats allow, see policy.rs), peers
//! can be entities, ICMP types can be matched, and a direction is isolated when the
//! policy has rules for it (or always, with `enforcementMode: always`).

use std::collections::BTreeSet;

use zt_common::{DIR_EGRESS, DIR_INGRESS, IDENTITY_HOST, IDENTITY_REMOTE_NODE, IDENTITY_WORLD};

use super::cidr;
use super::failures::{excluded_key, excluded_key_error, isolate_errors, without_excluded};
use super::netpol::port_match_of;
use super::ports::{PortMatch, PROTO_ICMP, PROTO_ICMPV6};
use super::fqdn::FqdnRule;
use super::{CompileError, Ctx, Peers, Rule, Rules};
use crate::model::k8s::LabelSelector;
use crate::model::ztp::{
    authentication_required, Entity, FqdnMatch, IcmpFamily, Peer, PolicyEnforcementMode, RuleView, SpiffePattern,
};
use crate::state::Action;
use crate::model::{ClusterState, ObjectKind};
use crate::state::{Cidr, Failure};

/// Every prefix named in an ipBlock (cidr and excepts). A prefix that does not parse is
/// skipped here: its policy fails when compiled.
pub(crate) fn ip_block_prefixes(cluster: &ClusterState) -> Vec<Cidr> {
    let mut out = Vec::new();
    for p in cluster.zero_trust_policies.values() {
        for (_, r) in views(p) {
            for b in r.peers.into_iter().flatten().filter_map(|peer| peer.ip_block.as_ref()) {
                out.extend(cidr::parse_cidr(&b.cidr).ok());
                out.extend(b.except.iter().filter_map(|e| cidr::parse_cidr(e).ok()));
            }
        }
    }
    out
}

/// (path, rule) of every rule, ingress first.
fn views(p: &crate::model::ZeroTrustPolicy) -> Vec<(String, RuleView<'_>)> {
    let ingress = p
        .spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| (format!("spec.ingress[{i}]"), r.view()));
    let egress = p
        .spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| (format!("spec.egress[{i}]"), r.view()));
    ingress.chain(egress).collect()
}

/// Each policy on its own: one that fails is left out and its subjects quarantined
/// (all local pods of its namespace when the subjects themselves are at fault).
pub(crate) fn compile(cluster: &ClusterState, ctx: &Ctx<'_>, out: &mut Rules, failures: &mut Vec<Failure>, pick: super::Pick<'_>) {
    for ((ns, name), p) in &cluster.zero_trust_policies {
        if !pick(ObjectKind::ZeroTrustPolicy, ns, name, out) {
            continue;
        }
        let source = ObjectKind::ZeroTrustPolicy.describe(ns, name);
        let quarantine = || subjects(ctx, &source, ns, p).unwrap_or_else(|_| ctx.select_local(ns, &LabelSelector::default()));
        isolate_errors(out, failures, &source, quarantine, |out| policy(ctx, &source, ns, p, out));
    }
}

fn policy(ctx: &Ctx<'_>, source: &str, ns: &str, p: &crate::model::ZeroTrustPolicy, out: &mut Rules) -> Result<(), CompileError> {
    let source = source.to_string();
    {
        let subjects = subjects(ctx, &source, ns, p)?;
        for (i, s) in p.spec.subjects.iter().enumerate() {
            let sel = s.pod_selector.as_ref().map(|sel| sel.to_label_selector());
            if let Some(k) = sel.as_ref().and_then(|sel| excluded_key(&ctx.cfg.identity_labels, sel)) {
                return Err(excluded_key_error(&source, &format!("spec.subjects[{i}].podSelector"), k));
            }
        }
        let strict = authentication_required("spec.authentication", p.spec.authentication.as_ref())
            .map_err(|e| CompileError::at(&source, e.path, e.message))?;
        if strict {
            for id in &subjects {
                out.strict.entry(*id).or_insert_with(|| source.clone());
            }
        }
        let always = p.spec.enforcement_mode == PolicyEnforcementMode::Always;
        if always || p.spec.ingress.as_ref().is_some_and(|r| !r.is_empty()) {
            out.isolate(&subjects, DIR_INGRESS);
        }
        if always || p.spec.egress.as_ref().is_some_and(|r| !r.is_empty()) {
            out.isolate(&subjects, DIR_EGRESS);
        }
        for (path, r) in views(p) {
            let dir = if path.starts_with("spec.ingress") {
                DIR_INGRESS
            } else {
                DIR_EGRESS
            };
            let peers = match r.peers {
                None | Some([]) => Peers::Any,
                Some(list) => {
                    let mut all = Peers::Ids(BTreeSet::new());
                    for (j, peer) in list.iter().enumerate() {
                        let at = format!("{path}.{}[{j}]", r.peers_field);
                        all = all.union(peer_ids(ctx, &source, &at, ns, peer)?);
                    }
                    all
                }
            };
            let mut ports = Vec::new();
            for (j, pr) in r.ports.into_iter().flatten().enumerate() {
                let m = port_match_of(pr.protocol.as_deref(), pr.port.as_ref(), pr.end_port)
                    .map_err(|m| CompileError::at(&source, format!("{path}.ports[{j}]"), m))?;
                ports.push(m);
            }
            for ic in r.icmp.into_iter().flatten() {
                let proto = match ic.family {
                    IcmpFamily::IPv4 => PROTO_ICMP,
                    IcmpFamily::IPv6 => PROTO_ICMPV6,
                };
                ports.push(PortMatch::Icmp {
                    proto,
                    icmp_type: ic.icmp_type,
                });
            }
            let matches = fqdn_matches(&source, &path, dir, &r)?;
            let auth = authentication_required(&format!("{path}.authentication"), r.authentication)
                .map_err(|e| CompileError::at(&source, e.path, e.message))?;
            let rule = Rule {
                id: 0,
                dir,
                action: r.action,
                subjects: subjects.clone(),
                peers,
                ports: ports.clone(),
                auth,
                http: r.http.map(|h| h.to_vec()),
            };
            out.add(&source, path.clone(), rule);
            if !matches.is_empty() {
                let rule_id = out.next_id() - 1;
                if let Some(info) = out.infos.get_mut(&rule_id) {
                    info.fqdn = matches.iter().map(|m| m.to_string()).collect();
                }
                out.fqdn.push(FqdnRule { rule_id, source: source.clone(), path, subjects: subjects.clone(), matches, ports });
            }
        }
    }
    Ok(())
}

/// The rule's FQDN peers, normalised. Validation has rejected them outside egress
/// allow rules without ICMP already; checked again here because a wrong place would
/// grant or deny more than written.
fn fqdn_matches(source: &str, path: &str, dir: u8, r: &RuleView<'_>) -> Result<BTreeSet<FqdnMatch>, CompileError> {
    let mut out = BTreeSet::new();
    for (j, peer) in r.peers.into_iter().flatten().enumerate() {
        let Some(f) = &peer.fqdn else { continue };
        let at = format!("{path}.{}[{j}].fqdn", r.peers_field);
        if dir != DIR_EGRESS || r.action != Action::Allow || r.icmp.is_some_and(|i| !i.is_empty()) {
            return Err(CompileError::at(source, at, "fqdn peers are allowed in egress allow rules without icmp only"));
        }
        out.insert(f.parse(&at).map_err(|e| CompileError::at(source, e.path, e.message))?);
    }
    Ok(out)
}

/// Parse a SPIFFE ID of a policy and check it is of our trust domain.
fn spiffe(
    ctx: &Ctx<'_>,
    source: &str,
    path: &str,
    id: &str,
) -> Result<SpiffePattern, CompileError> {
    let p = SpiffePattern::parse(id).map_err(|m| CompileError::at(source, path, m))?;
    if p.trust_domain != ctx.cfg.trust_domain {
        return Err(CompileError::at(
            source,
            path,
            format!(
                "SPIFFE ID {id:?} is not of trust domain {:?}",
                ctx.cfg.trust_domain
            ),
        ));
    }
    Ok(p)
}

/// The local identities a policy applies to (subjects are OR; none = whole namespace).
fn subjects(
    ctx: &Ctx<'_>,
    source: &str,
    ns: &str,
    p: &crate::model::ZeroTrustPolicy,
) -> Result<BTreeSet<u32>, CompileError> {
    if p.spec.subjects.is_empty() {
        return Ok(ctx.select_local(ns, &LabelSelector::default()));
    }
    let mut out = BTreeSet::new();
    for (i, s) in p.spec.subjects.iter().enumerate() {
        let path = format!("spec.subjects[{i}]");
        if let Some(id) = &s.spiffe_id {
            let sp = spiffe(ctx, source, &format!("{path}.spiffeId"), id)?;
            if sp.namespace != ns {
                return Err(CompileError::at(
                    source,
                    format!("{path}.spiffeId"),
                    "subject outside the policy's namespace",
                ));
            }
            out.extend(ctx.select(|w| w.local && sp.matches(&w.namespace, &w.service_account)));
        } else if let Some(sel) = &s.pod_selector {
            // Requirements on excluded keys left out: a superset (the policy then fails).
            out.extend(ctx.select_local(ns, &without_excluded(&ctx.cfg.identity_labels, &sel.to_label_selector())));
        } else {
            return Err(CompileError::at(
                source,
                path,
                "set exactly one of spiffeId or podSelector",
            ));
        }
    }
    Ok(out)
}

fn peer_ids(
    ctx: &Ctx<'_>,
    source: &str,
    path: &str,
    ns: &str,
    peer: &Peer,
) -> Result<Peers, CompileError> {
    if let Some(id) = &peer.spiffe_id {
        let sp = spiffe(ctx, source, &format!("{path}.spiffeId"), id)?;
        return Ok(Peers::Ids(
            ctx.select(|w| sp.matches(&w.namespace, &w.service_account)),
        ));
    }
    if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
        let ps = peer.pod_selector.as_ref().map(|s| s.to_label_selector());
        if let Some(k) = ps.as_ref().and_then(|s| excluded_key(&ctx.cfg.identity_labels, s)) {
            return Err(excluded_key_error(source, &format!("{path}.podSelector"), k));
        }
        let nss = peer
            .namespace_selector
            .as_ref()
            .map(|s| s.to_label_selector());
        return Ok(Peers::Ids(ctx.select_peers(ns, ps.as_ref(), nss.as_ref())));
    }
    if let Some(b) = &peer.ip_block {
        let bad = |m: String| CompileError::at(source, format!("{path}.ipBlock"), m);
        let c = cidr::parse_cidr(&b.cidr).map_err(bad)?;
        let ex = b
            .except
            .iter()
            .map(|e| cidr::parse_cidr(e).map_err(bad))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Peers::Ids(cidr::block_peers(&ctx.cidrs, &c, &ex)));
    }
    // FQDN peers compile separately (fqdn.rs): they add no identity-keyed entries.
    if peer.fqdn.is_some() {
        return Ok(Peers::Ids(BTreeSet::new()));
    }
    let ids = match peer.entity {
        Some(Entity::All) => return Ok(Peers::Any),
        Some(Entity::Dns) => ctx.dns_servers.clone(),
        Some(Entity::Host) => BTreeSet::from([IDENTITY_HOST]),
        Some(Entity::RemoteNode) => BTreeSet::from([IDENTITY_REMOTE_NODE]),
        // Outside the cluster: no CIDR matched (WORLD) or some ipBlock prefix did.
        Some(Entity::World) => ctx
            .cidrs
            .values()
            .copied()
            .chain([IDENTITY_WORLD])
            .collect(),
        Some(Entity::Cluster) => ctx
            .workloads
            .keys()
            .copied()
            .chain([IDENTITY_HOST, IDENTITY_REMOTE_NODE])
            .collect(),
        None => return Err(CompileError::at(source, path, "peer names nothing")),
    };
    Ok(Peers::Ids(ids))
}

/// Whose pods the policy's peers can name besides its own namespace's (incremental.rs).
/// Conservative: a SPIFFE ID peer, `entity: cluster` or `dns`, and a named port on
/// egress (the peers' container ports) reach every namespace.
pub(crate) fn reach(p: &crate::model::ZeroTrustPolicy) -> super::Reach {
    let mut out = super::Reach::default();
    for (path, r) in views(p) {
        for peer in r.peers.into_iter().flatten() {
            if peer.spiffe_id.is_some() || matches!(peer.entity, Some(Entity::Cluster | Entity::Dns)) {
                out.all = true;
            }
            if let Some(s) = &peer.namespace_selector {
                out.namespaces.push(s.to_label_selector());
            }
            if peer.fqdn.is_some() {
                out.full_only = true;
            }
        }
        let named = r.ports.into_iter().flatten().any(|pr| matches!(pr.port, Some(crate::model::k8s::IntOrString::String(_))));
        if named && path.starts_with("spec.egress") {
            out.all = true;
        }
    }
    // STRICT adds rules after the probes' (auth.rs): left to the full compile.
    if p.spec.authentication.is_some() {
        out.full_only = true;
    }
    out
}
