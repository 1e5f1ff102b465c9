//! NetworkPolicy (networking.k8s.io/v1) with its real semantics:
//! - policyTypes defaults to [Ingress], plus Egress when spec.egress has rules
//!   (as the API server defaults it: `egress: []` alone does not isolate egress);
//! - an empty podSelector selects every pod of the namespace;
//! - each listed direction isolates the selected pods; `ingress: []` thus allows
//!   nothing, while a rule `{}` allows everything;
//! - absent or empty `from`/`to` = any peer; several peers = OR; a peer with pod and
//!   namespace selectors = AND; absent or empty `ports` = every protocol and port;
//! - policies add up (any allow allows); all NetworkPolicy rules are allows;
//! - ipBlock matches any address inside cidr and outside the excepts, pod IPs
//!   included (the cluster-external ones by CIDR identity, pod IPs by the
//!   `ip-block:` membership their workload identity carries, see workloads.rs).

use std::collections::BTreeSet;

use zt_common::{DIR_EGRESS, DIR_INGRESS};

use super::cidr::{self, block_peers};
use super::failures::{excluded_key, excluded_key_error, isolate_errors, without_excluded};
use super::ports::PortMatch;
use super::{CompileError, Ctx, Peers, Rule, Rules};
use crate::model::k8s::{IntOrString, LabelSelector, NetworkPolicyPeer, NetworkPolicyPort};
use crate::model::{ClusterState, ObjectKind};
use crate::state::{Action, Cidr, Failure};

fn parse(source: &str, path: String, s: &str) -> Result<Cidr, CompileError> {
    cidr::parse_cidr(s).map_err(|m| CompileError::at(source, path, m))
}

/// Every prefix named in an ipBlock (cidr and excepts). A prefix that does not parse is
/// skipped here: its policy fails when compiled.
pub(crate) fn ip_block_prefixes(cluster: &ClusterState) -> Vec<Cidr> {
    let mut out = Vec::new();
    for np in cluster.network_policies.values() {
        let Some(spec) = &np.spec else { continue };
        let ingress = spec.ingress.iter().flatten().map(|r| &r.from);
        let egress = spec.egress.iter().flatten().map(|r| &r.to);
        for b in ingress.chain(egress).flatten().flatten().filter_map(|p| p.ip_block.as_ref()) {
            out.extend(cidr::parse_cidr(&b.cidr).ok());
            out.extend(b.except.iter().flatten().filter_map(|e| cidr::parse_cidr(e).ok()));
        }
    }
    out
}

/// Each policy on its own: one that fails is left out and its subjects quarantined.
pub(crate) fn compile(cluster: &ClusterState, ctx: &Ctx<'_>, out: &mut Rules, failures: &mut Vec<Failure>, pick: super::Pick<'_>) {
    for ((ns, name), np) in &cluster.network_policies {
        if !pick(ObjectKind::NetworkPolicy, ns, name, out) {
            continue;
        }
        let source = ObjectKind::NetworkPolicy.describe(ns, name);
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = spec.pod_selector.clone().unwrap_or_default();
        // The subjects, also when the selector names an excluded key (then a superset).
        let subjects = ctx.select_local(ns, &without_excluded(&ctx.cfg.identity_labels, &pod_selector));
        let quarantine = subjects.clone();
        isolate_errors(out, failures, &source, || quarantine, |out| policy(ctx, &source, ns, &spec, &pod_selector, &subjects, out));
    }
}

fn policy(
    ctx: &Ctx<'_>,
    source: &str,
    ns: &str,
    spec: &k8s_openapi::api::networking::v1::NetworkPolicySpec,
    pod_selector: &LabelSelector,
    subjects: &BTreeSet<u32>,
    out: &mut Rules,
) -> Result<(), CompileError> {
    {
        let (source, subjects) = (source.to_string(), subjects.clone());
        if let Some(k) = excluded_key(&ctx.cfg.identity_labels, pod_selector) {
            return Err(excluded_key_error(&source, "spec.podSelector", k));
        }

        let types: Vec<&str> = match spec.policy_types.as_deref() {
            Some(t) if !t.is_empty() => t.iter().map(String::as_str).collect(),
            _ if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) => vec!["Ingress", "Egress"],
            _ => vec!["Ingress"],
        };

        if types.contains(&"Ingress") {
            out.isolate(&subjects, DIR_INGRESS);
            for (i, r) in spec.ingress.iter().flatten().enumerate() {
                let rule = rule(
                    ctx,
                    &source,
                    ns,
                    &subjects,
                    DIR_INGRESS,
                    r.from.as_deref(),
                    r.ports.as_deref(),
                )?;
                out.add(&source, format!("spec.ingress[{i}]"), rule);
            }
        }
        if types.contains(&"Egress") {
            out.isolate(&subjects, DIR_EGRESS);
            for (i, r) in spec.egress.iter().flatten().enumerate() {
                let rule = rule(
                    ctx,
                    &source,
                    ns,
                    &subjects,
                    DIR_EGRESS,
                    r.to.as_deref(),
                    r.ports.as_deref(),
                )?;
                out.add(&source, format!("spec.egress[{i}]"), rule);
            }
        }
    }
    Ok(())
}

fn rule(
    ctx: &Ctx<'_>,
    source: &str,
    ns: &str,
    subjects: &BTreeSet<u32>,
    dir: u8,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, CompileError> {
    let peers = match peers {
        None | Some([]) => Peers::Any,
        Some(list) => {
            let mut ids = BTreeSet::new();
            for p in list {
                if let Some(b) = &p.ip_block {
                    let c = parse(source, "ipBlock".into(), &b.cidr)?;
                    let ex = b
                        .except
                        .iter()
                        .flatten()
                        .map(|e| parse(source, "ipBlock".into(), e))
                        .collect::<Result<Vec<_>, _>>()?;
                    ids.extend(block_peers(&ctx.cidrs, &c, &ex));
                    // Pod addresses inside the block (see workloads.rs).
                    ids.extend(ctx.select(|w| {
                        w.ip_blocks.contains(&c) && !ex.iter().any(|e| w.ip_blocks.contains(e))
                    }));
                } else {
                    if let Some(k) = p.pod_selector.as_ref().and_then(|s| excluded_key(&ctx.cfg.identity_labels, s)) {
                        return Err(excluded_key_error(source, "podSelector", k));
                    }
                    ids.extend(ctx.select_peers(
                        ns,
                        p.pod_selector.as_ref(),
                        p.namespace_selector.as_ref(),
                    ));
                }
            }
            Peers::Ids(ids)
        }
    };
    let ports = ports
        .unwrap_or(&[])
        .iter()
        .map(port_match)
        .collect::<Result<Vec<_>, String>>();
    let ports = ports.map_err(|m| CompileError {
        object: Some(source.to_string()),
        field: None,
        message: m,
    })?;
    Ok(Rule {
        id: 0,
        dir,
        action: Action::Allow,
        subjects: subjects.clone(),
        peers,
        ports,
        auth: false,
        http: None,
    })
}

/// A Kubernetes-style port (also used by ZeroTrustPolicy ports); validated at load.
pub(crate) fn port_match_of(
    protocol: Option<&str>,
    port: Option<&IntOrString>,
    end_port: Option<i32>,
) -> Result<PortMatch, String> {
    let proto = crate::model::k8s::protocol_number(protocol)
        .ok_or_else(|| format!("unknown protocol {protocol:?}"))?;
    let num = |n: i32| {
        u16::try_from(n)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("port {n} out of range"))
    };
    Ok(match port {
        None => PortMatch::Proto(proto),
        Some(IntOrString::Int(p)) => {
            let lo = num(*p)?;
            let hi = match end_port {
                Some(e) => num(e)?,
                None => lo,
            };
            if hi < lo {
                return Err(format!("endPort {hi} is less than port {lo}"));
            }
            PortMatch::Range { proto, lo, hi }
        }
        Some(IntOrString::String(name)) => PortMatch::Named {
            proto,
            name: name.clone(),
        },
    })
}

fn port_match(p: &NetworkPolicyPort) -> Result<PortMatch, String> {
    port_match_of(p.protocol.as_deref(), p.port.as_ref(), p.end_port)
}

/// Whose pods the policy's peers can name besides its own namespace's (incremental.rs):
/// namespaceSelector peers name the matching namespaces; an ipBlock (pod addresses) and
/// a named port on egress (the peers' container ports) reach every namespace.
pub(crate) fn reach(np: &crate::model::NetworkPolicy) -> super::Reach {
    let mut out = super::Reach::default();
    let Some(spec) = &np.spec else { return out };
    let ingress = spec.ingress.iter().flatten().map(|r| (&r.from, &r.ports, false));
    let egress = spec.egress.iter().flatten().map(|r| (&r.to, &r.ports, true));
    for (peers, ports, egress) in ingress.chain(egress) {
        for p in peers.iter().flatten() {
            if p.ip_block.is_some() {
                out.all = true;
            }
            if let Some(s) = &p.namespace_selector {
                out.namespaces.push(s.clone());
            }
        }
        if egress && ports.iter().flatten().any(|p| matches!(p.port, Some(IntOrString::String(_)))) {
            out.all = true;
        }
    }
    out
}
