//! The untranslated-frontend judgement: what a packet to a Service frontend is allowed
//! when it reaches zt's TC or cgroup skb hooks without a socket hook having translated
//! it (translation off, raw sockets, SCTP, a pod outside the cgroup root). kube-proxy
//! will DNAT it after zt has judged it, to any current backend, so zt allows it only if
//! policy allows the local identity *every* backend on its target port.
//!
//! The kernel judges such a flow as egress to the Service's identity on the frontend
//! port (zt-ebpf policy.rs `service_decision`, one exact lookup); this module writes
//! those entries, allows only: (local, service, egress, proto, frontend port) for each
//! isolated local identity that every backend of the frontend is allowed to. Evaluated
//! on the compiled policy exactly as the kernel evaluates a backend (longest match for
//! the peer and for any peer, deny wins); FQDN allows are not counted (a backend is not
//! `world` to a name rule), so a backend reachable only by an FQDN rule fails closed.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use zt_common::{
    PolicyKey, PolicyValue, DIR_EGRESS, EP_ENFORCE_EGRESS, EP_LOCAL, IDENTITY_ANY, IDENTITY_WORLD, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_FULL, VERDICT_ALLOW, VERDICT_DENY,
};

use super::identities::ServiceIdentities;
use super::ServiceTable;
use crate::state::{Cidr, Desired, IdentityInfo, PolicyEntryKey};

/// Adds the Service identities and their allow entries to `desired`.
pub fn add_to(desired: &mut Desired, table: &ServiceTable, ids: &ServiceIdentities) {
    for ((ns, name), v6, id) in ids.iter() {
        let family = if v6 { "IPv6" } else { "IPv4" };
        desired.identities.insert(id, IdentityInfo { id, spiffe_id: format!("service:{ns}/{name} ({family})"), labels: BTreeMap::new() });
    }
    let entries = entries(desired, table, ids);
    desired.policy.extend(entries);
    // A Service whose every backend is a trusted resolver (kube-dns) is one too: its
    // answers, reaching a pod from the untranslated ClusterIP, teach FQDN rules.
    for id in resolver_services(desired, table, ids) {
        desired.dns_servers.insert(id);
    }
}

/// The Services with backends, all of them trusted resolvers.
fn resolver_services(desired: &Desired, table: &ServiceTable, ids: &ServiceIdentities) -> Vec<u32> {
    let mut verdict: BTreeMap<u32, bool> = BTreeMap::new();
    for (f, e) in &table.frontends {
        let Some(id) = ids.get(&e.service, f.addr.is_ipv6()) else { continue };
        let trusted = !e.backends.is_empty() && e.backends.iter().all(|b| desired.dns_servers.contains(&identity_of(desired, b.addr)));
        *verdict.entry(id).or_insert(true) &= trusted;
    }
    verdict.into_iter().filter(|(_, t)| *t).map(|(id, _)| id).collect()
}

/// The allow entries (see the module comment). Frontends of one Service identity that
/// share a port and protocol (a ClusterIP and an external IP, whose backend sets may
/// differ by traffic policy) share the entry: it is written only if every one of them is
/// allowed.
pub fn entries(desired: &Desired, table: &ServiceTable, ids: &ServiceIdentities) -> BTreeMap<PolicyEntryKey, PolicyValue> {
    let index = EgressIndex::of(desired);
    let mut verdicts: BTreeMap<PolicyEntryKey, Option<PolicyValue>> = BTreeMap::new();
    for (f, e) in &table.frontends {
        let Some(svc_id) = ids.get(&e.service, f.addr.is_ipv6()) else { continue };
        let peers: Vec<(u32, u16)> = e.backends.iter().map(|b| (identity_of(desired, b.addr), b.port)).collect();
        for (&local, rules) in &index.by_local {
            let mut first_rule = None;
            let all = !peers.is_empty()
                && peers.iter().all(|&(peer, port)| match rules.verdict(peer, f.proto, port) {
                    Some(rule) => {
                        first_rule.get_or_insert(rule);
                        true
                    }
                    None => false,
                });
            let key = PolicyEntryKey { prefix_len: POLICY_PREFIX_FULL, key: PolicyKey::new(local, svc_id, DIR_EGRESS, f.proto, f.port) };
            let v = all.then(|| PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: first_rule.unwrap_or(0) });
            let slot = verdicts.entry(key).or_insert(v);
            if v.is_none() {
                *slot = None;
            }
        }
    }
    verdicts.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
}

/// A backend address's identity as the kernel resolves a peer: the endpoint map, else
/// the longest CIDR identity, else `world`.
fn identity_of(desired: &Desired, addr: IpAddr) -> u32 {
    if let Some(ep) = desired.endpoints.get(&addr) {
        return ep.identity;
    }
    desired.cidrs.iter().filter(|(c, _)| crate::compile::cidr::contains(c, &Cidr { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } })).max_by_key(|(c, _)| c.prefix).map_or(IDENTITY_WORLD, |(_, id)| *id)
}

/// The egress entries of each isolated local identity, by peer.
struct EgressIndex {
    by_local: BTreeMap<u32, LocalRules>,
}

#[derive(Default)]
struct LocalRules {
    by_peer: HashMap<u32, Vec<(u32, PolicyKey, PolicyValue)>>,
}

impl EgressIndex {
    fn of(desired: &Desired) -> Self {
        let mut by_local: BTreeMap<u32, LocalRules> = desired
            .endpoints
            .values()
            .filter(|ep| ep.flags & EP_LOCAL != 0 && ep.flags & EP_ENFORCE_EGRESS != 0)
            .map(|ep| (ep.identity, LocalRules::default()))
            .collect();
        for (k, v) in &desired.policy {
            if k.key.dir != DIR_EGRESS {
                continue;
            }
            if let Some(l) = by_local.get_mut(&k.key.local_id()) {
                l.by_peer.entry(k.key.peer_id()).or_default().push((k.prefix_len, k.key, *v));
            }
        }
        EgressIndex { by_local }
    }
}

impl LocalRules {
    /// As the kernel decides an isolated local endpoint's new egress flow: the rule
    /// that allows it, or None (denied, or no allow).
    fn verdict(&self, peer: u32, proto: u8, port: u16) -> Option<u32> {
        let exact = self.longest(peer, proto, port);
        let any = self.longest(IDENTITY_ANY, proto, port);
        if exact.is_some_and(|v| v.verdict == VERDICT_DENY) || any.is_some_and(|v| v.verdict == VERDICT_DENY) {
            return None;
        }
        [exact, any].into_iter().flatten().find(|v| v.verdict == VERDICT_ALLOW).map(|v| v.rule_id)
    }

    /// The LPM trie's answer for (peer, egress, proto, port).
    fn longest(&self, peer: u32, proto: u8, port: u16) -> Option<PolicyValue> {
        let list = self.by_peer.get(&peer)?;
        list.iter().filter(|(plen, k, _)| matches(*plen, k, proto, port)).max_by_key(|(plen, _, _)| *plen).map(|(_, _, v)| *v)
    }
}

/// Whether an entry of prefix `plen` covers (proto, port): bits past the direction are
/// the protocol (8) then the port (16).
fn matches(plen: u32, k: &PolicyKey, proto: u8, port: u16) -> bool {
    if plen <= POLICY_PREFIX_ANY_PROTO {
        return true;
    }
    if k.proto != proto {
        return false;
    }
    let port_bits = plen.min(POLICY_PREFIX_FULL) - POLICY_PREFIX_ANY_PORT;
    if port_bits == 0 {
        return true;
    }
    let shift = 16 - port_bits;
    (k.port() >> shift) == (port >> shift)
}

#[cfg(test)]
mod tests;
