//! FQDN rules -> ZT_FQDN_NAMES, ZT_FQDN_PORTS and endpoint flags.
//!
//! Each (local identity, FQDN rule) gets a slot (fqdn_slots.rs). The kernel ORs the
//! slots of every name entry the question name hits (the exact name and each parent
//! suffix) into the learned entry of each answered address; a new flow to such an
//! address is allowed when the learned slots and the port entry's slots share a bit.
//! The port trie returns the longest match only, so every port entry is folded: it
//! carries the slots (and rule ids) of each shorter prefix covering it.

use std::collections::{BTreeMap, BTreeSet};

use zt_common::{
    name_hashes, FqdnNameKey, FqdnPortsValue, PolicyKey, PolicyValue, DIR_EGRESS,
    EP_DNS_VISIBILITY, EP_FQDN, IDENTITY_ANY, NAME_EXACT, NAME_SUFFIX, VERDICT_ALLOW,
};

use super::fqdn_slots::FqdnSlots;
use super::ports::{blocks, Block, PortMatch};
use super::{CompileError, Ctx};
use crate::model::ztp::FqdnMatch;
use crate::state::{Failure, PolicyEntryKey};

/// The default trusted resolvers: CoreDNS and NodeLocal DNSCache service accounts.
pub fn default_dns_servers(trust_domain: &str) -> Vec<String> {
    ["coredns", "node-local-dns"]
        .iter()
        .map(|sa| crate::identity::spiffe_id(trust_domain, "kube-system", sa))
        .collect()
}

/// The FQDN part of one egress allow rule.
#[derive(Clone, Debug)]
pub(crate) struct FqdnRule {
    pub rule_id: u32,
    /// `Kind ns/name` and `spec.egress[i]`, for errors and the slot key.
    pub source: String,
    pub path: String,
    pub subjects: BTreeSet<u32>,
    pub matches: BTreeSet<FqdnMatch>,
    /// Empty = any protocol and port.
    pub ports: Vec<PortMatch>,
}

impl FqdnRule {
    /// What a slot stands for: the names a policy learns addresses under. Not the
    /// rule's index: inserting a rule above must not move the others to new slots
    /// (that would revoke their live flows). Rules of one policy with the same names
    /// share a slot (their ports add up); other names take another slot.
    fn slot_key(&self) -> Option<String> {
        let names: Vec<String> =
            self.matches.iter().filter(|m| **m != FqdnMatch::Any).map(|m| m.to_string()).collect();
        (!names.is_empty()).then(|| format!("{} {}", self.source, names.join(",")))
    }
}

/// What the FQDN rules add to the desired state.
#[derive(Clone, Debug, Default)]
pub(crate) struct FqdnOut {
    pub names: BTreeMap<FqdnNameKey, u32>,
    pub ports: BTreeMap<PolicyEntryKey, FqdnPortsValue>,
    /// Local identity -> EP_FQDN / EP_DNS_VISIBILITY.
    pub flags: BTreeMap<u32, u32>,
    /// Local identity -> slot -> rule id.
    pub slots: BTreeMap<u32, BTreeMap<u8, u32>>,
}

/// An identity whose FQDN rules need more than FQDN_MAX_SLOTS slots gets none of them
/// (a failure naming the policy where it ran out; the caller quarantines it).
pub(crate) fn build(ctx: &Ctx<'_>, rules: &[FqdnRule], key: [u64; 2], slots: &mut FqdnSlots, failures: &mut Vec<Failure>) -> FqdnOut {
    let mut out = FqdnOut::default();
    let mut overflowed: BTreeSet<u32> = BTreeSet::new();
    let wanted: BTreeSet<(u32, String)> = rules
        .iter()
        .filter_map(|r| r.slot_key().map(|k| (r, k)))
        .flat_map(|(r, k)| r.subjects.iter().map(move |s| (*s, k.clone())))
        .collect();
    slots.retain(&wanted);

    // (local, block) -> (slots, rule ids), before folding.
    let mut ports: BTreeMap<(u32, Block), FqdnPortsValue> = BTreeMap::new();
    for r in rules {
        if r.matches.contains(&FqdnMatch::Any) {
            for s in &r.subjects {
                *out.flags.entry(*s).or_default() |= EP_DNS_VISIBILITY;
            }
        }
        let Some(slot_key) = r.slot_key() else { continue };
        let port_blocks: Vec<Block> = if r.ports.is_empty() {
            vec![Block::ANY]
        } else {
            // Named ports name ports of peer pods: an FQDN destination has none.
            r.ports.iter().flat_map(blocks).collect()
        };
        for &local in &r.subjects {
            if overflowed.contains(&local) {
                continue;
            }
            let Some(slot) = slots.slot(local, &slot_key) else {
                let who = ctx
                    .workloads
                    .get(&local)
                    .map(|w| format!(" (ns {}, service account {})", w.namespace, w.service_account))
                    .unwrap_or_default();
                let e = CompileError::at(
                    &r.source,
                    &r.path,
                    format!("identity {local}{who} is subject to more than {} FQDN rules: it fails closed", zt_common::FQDN_MAX_SLOTS),
                );
                failures.push(Failure { object: r.source.clone(), error: e.to_string(), identities: BTreeSet::from([local]) });
                overflowed.insert(local);
                continue;
            };
            let bit = 1u32 << slot;
            out.slots.entry(local).or_default().insert(slot, r.rule_id);
            *out.flags.entry(local).or_default() |= EP_FQDN;
            for m in &r.matches {
                let (kind, name) = match m {
                    FqdnMatch::Name(n) => (NAME_EXACT, n),
                    FqdnMatch::Suffix(s) => (NAME_SUFFIX, s),
                    FqdnMatch::Any => continue,
                };
                let h = name_hashes(key, name).0;
                *out.names.entry(FqdnNameKey::new(local, kind, h)).or_default() |= bit;
            }
            for b in &port_blocks {
                let v = ports.entry((local, *b)).or_default();
                v.slots |= bit;
                v.rule_ids[usize::from(slot)] = r.rule_id;
            }
        }
    }

    // Fold: the LPM returns only the longest match, so it must carry the shorter ones.
    for ((local, b), v) in &ports {
        let mut folded = *v;
        for ((l2, b2), v2) in &ports {
            if l2 == local && b2.prefix < b.prefix && b2.covers(b) {
                folded.slots |= v2.slots;
                for s in 0..32 {
                    if v2.slots & (1 << s) != 0 {
                        folded.rule_ids[s] = v2.rule_ids[s];
                    }
                }
            }
        }
        let key = PolicyEntryKey {
            prefix_len: b.prefix,
            key: PolicyKey::new(*local, IDENTITY_ANY, DIR_EGRESS, b.proto, b.port),
        };
        out.ports.insert(key, folded);
    }
    // What the overflowing identities got before they ran out goes too.
    out.names.retain(|k, _| !overflowed.contains(&k.local_id));
    out.ports.retain(|k, _| !overflowed.contains(&k.key.local_id()));
    out.flags.retain(|id, _| !overflowed.contains(id));
    out.slots.retain(|id, _| !overflowed.contains(id));
    out
}

/// Subjects of FQDN rules that no policy entry allows to reach a trusted resolver on
/// port 53 (UDP or TCP): their names will never resolve, so nothing is learned.
pub(crate) fn unreachable_dns(
    policy: &BTreeMap<PolicyEntryKey, PolicyValue>,
    fqdn_subjects: impl IntoIterator<Item = u32>,
    dns_servers: &BTreeSet<u32>,
) -> Vec<u32> {
    let dns53 = [Block::port(17, 53), Block::port(6, 53)];
    fqdn_subjects
        .into_iter()
        .filter(|local| {
            !policy.iter().any(|(k, v)| {
                let block = Block { prefix: k.prefix_len, proto: k.key.proto, port: u16::from_be(k.key.port_be) };
                v.verdict == VERDICT_ALLOW
                    && k.key.local_id() == *local
                    && k.key.dir == DIR_EGRESS
                    && (k.key.peer_id() == IDENTITY_ANY || dns_servers.contains(&k.key.peer_id()))
                    && dns53.iter().any(|d| block.covers(d))
            })
        })
        .collect()
}
