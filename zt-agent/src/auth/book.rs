//! What this node knows is proven, by whom, until when: its own SVIDs (the pods of this
//! node, proven by the agent itself) and the peers' verified proofs, keyed by SPIFFE ID.
//! `want` turns it into the proofs map's contents in this node's identity numbering
//! (every identity number carrying a proven SPIFFE ID: numbers also differ by labels).
use std::collections::BTreeMap;
use std::time::SystemTime;

use zt_common::{auth_node_id, AuthProofKey, AuthProofValue, AUTH_NODE_SELF};

use super::expiry_boot_ns;
use crate::state::IdentityInfo;

/// One proven SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    pub not_after: SystemTime,
}

#[derive(Clone, Debug, Default)]
pub struct ProofBook {
    /// SPIFFE ID -> this node's SVID for it.
    pub local: BTreeMap<String, Proven>,
    /// Peer node name -> SPIFFE ID -> its proof.
    pub peers: BTreeMap<String, BTreeMap<String, Proven>>,
}

impl ProofBook {
    /// A peer proved `spiffe_id`; a newer proof replaces the older (make-before-break: the
    /// new expiry is written before the old one would lapse).
    pub fn proven_by(&mut self, node: &str, spiffe_id: &str, p: Proven) {
        self.peers.entry(node.to_string()).or_default().insert(spiffe_id.to_string(), p);
    }

    /// The peer withdrew `spiffe_id` (its last pod of it left).
    pub fn withdrawn_by(&mut self, node: &str, spiffe_id: &str) {
        if let Some(m) = self.peers.get_mut(node) {
            m.remove(spiffe_id);
        }
    }

    /// The peer's channel is gone: its proofs stay until they expire (a restart of the peer's
    /// agent or a broken connection must not cut flows); `forget_peer` is for a node that
    /// left the cluster.
    pub fn forget_peer(&mut self, node: &str) {
        self.peers.remove(node);
    }

    /// The proofs map's contents: (node, identity number) -> expiry on the kernel's clock,
    /// for every identity number whose SPIFFE ID is proven and not expired at `wall_now`.
    pub fn want(&self, identities: &BTreeMap<u32, IdentityInfo>, wall_now: SystemTime, boot_now: u64) -> BTreeMap<AuthProofKey, AuthProofValue> {
        let mut by_spiffe: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for i in identities.values() {
            by_spiffe.entry(i.spiffe_id.as_str()).or_default().push(i.id);
        }
        let mut out = BTreeMap::new();
        let nodes = std::iter::once((AUTH_NODE_SELF, &self.local)).chain(self.peers.iter().map(|(n, m)| (auth_node_id(n.as_bytes()), m)));
        for (node, proven) in nodes {
            for (sid, p) in proven.iter().filter(|(_, p)| p.not_after > wall_now) {
                for identity in by_spiffe.get(sid.as_str()).into_iter().flatten() {
                    out.insert(AuthProofKey { node, identity: *identity }, AuthProofValue { expires_ns: expiry_boot_ns(p.not_after, wall_now, boot_now) });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(id: u32, spiffe: &str) -> (u32, IdentityInfo) {
        (id, IdentityInfo { id, spiffe_id: spiffe.into(), labels: Default::default() })
    }

    #[test]
    fn want_maps_spiffe_ids_to_every_identity_number_per_node() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ids: BTreeMap<u32, IdentityInfo> =
            [info(300, "spiffe://zt.test/ns/default/sa/api"), info(301, "spiffe://zt.test/ns/default/sa/api"), info(302, "spiffe://zt.test/ns/default/sa/web")]
                .into();
        let mut b = ProofBook::default();
        b.local.insert("spiffe://zt.test/ns/default/sa/web".into(), Proven { not_after: now + Duration::from_secs(600) });
        b.proven_by("node2", "spiffe://zt.test/ns/default/sa/api", Proven { not_after: now + Duration::from_secs(60) });
        b.proven_by("node3", "spiffe://zt.test/ns/default/sa/api", Proven { not_after: now - Duration::from_secs(1) });
        b.proven_by("node2", "spiffe://zt.test/ns/other/sa/x", Proven { not_after: now + Duration::from_secs(60) });
        let w = b.want(&ids, now, 1_000);
        let n2 = auth_node_id(b"node2");
        let keys: Vec<(u32, u32, u64)> = w.iter().map(|(k, v)| (k.node, k.identity, v.expires_ns)).collect();
        let mut expect = vec![(AUTH_NODE_SELF, 302, 1_000 + 600_000_000_000), (n2, 300, 1_000 + 60_000_000_000), (n2, 301, 1_000 + 60_000_000_000)];
        expect.sort();
        assert_eq!(keys, expect, "expired and unknown identities leave nothing");
        b.withdrawn_by("node2", "spiffe://zt.test/ns/default/sa/api");
        assert_eq!(b.want(&ids, now, 1_000).len(), 1);
    }
}
