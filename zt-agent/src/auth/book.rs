//! What this node knows is proven, by whom, until when: its own SVIDs (the pods of this
//! node, proven by the agent itself) and the peers' verified proofs, keyed by SPIFFE ID.
//! `want` turns it into the proofs map's contents in this node's identity numbering
//! (every identity number carrying a proven SPIFFE ID: numbers also differ by labels).
//! Each proof's expiry on the kernel's clock is computed once, when it arrives, so that
//! writing the map again never moves it (a moved expiry would read as a withdrawal).
use std::collections::BTreeMap;
use std::time::SystemTime;

use zt_common::{auth_node_id, AuthProofKey, AuthProofValue, AUTH_NODE_SELF};

use crate::state::IdentityInfo;

/// One proven SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proven {
    pub not_after: SystemTime,
    /// `not_after` on CLOCK_BOOTTIME (`super::expiry_boot_ns`), or earlier once the
    /// proof is only kept for a grace period (`limit_peer`).
    pub expires_ns: u64,
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

    /// The peer's channel is lost: its proofs count until `until_ns` at the latest (a
    /// grace for an agent restart); a new channel proves them again at full length.
    pub fn limit_peer(&mut self, node: &str, until_ns: u64) {
        for p in self.peers.get_mut(node).into_iter().flat_map(|m| m.values_mut()) {
            p.expires_ns = p.expires_ns.min(until_ns);
        }
    }

    /// A new channel of the peer is up and the peer has proven on it what it holds (`kept`):
    /// its other proofs (an identity it withdrew while the channels were swapped) count
    /// until `until_ns` at the latest, as for a lost channel. `kept` are untouched.
    pub fn limit_peer_except(&mut self, node: &str, until_ns: u64, kept: &std::collections::BTreeSet<String>) {
        for (id, p) in self.peers.get_mut(node).into_iter().flat_map(|m| m.iter_mut()) {
            if !kept.contains(id) {
                p.expires_ns = p.expires_ns.min(until_ns);
            }
        }
    }

    /// Drops proofs past their expiry at `boot_now`.
    pub fn prune(&mut self, boot_now: u64) {
        for m in self.peers.values_mut() {
            m.retain(|_, p| p.expires_ns > boot_now);
        }
    }

    /// The proofs map's contents: (node, identity number) -> expiry on the kernel's clock,
    /// for every identity number whose SPIFFE ID is proven and not expired at `boot_now`.
    pub fn want(&self, identities: &BTreeMap<u32, IdentityInfo>, boot_now: u64) -> BTreeMap<AuthProofKey, AuthProofValue> {
        let mut by_spiffe: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for i in identities.values() {
            by_spiffe.entry(i.spiffe_id.as_str()).or_default().push(i.id);
        }
        let mut out = BTreeMap::new();
        let nodes = std::iter::once((AUTH_NODE_SELF, &self.local)).chain(self.peers.iter().map(|(n, m)| (auth_node_id(n.as_bytes()), m)));
        for (node, proven) in nodes {
            for (sid, p) in proven.iter().filter(|(_, p)| p.expires_ns > boot_now) {
                for identity in by_spiffe.get(sid.as_str()).into_iter().flatten() {
                    out.insert(AuthProofKey { node, identity: *identity }, AuthProofValue { expires_ns: p.expires_ns });
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
        let p = |secs: i64| {
            let not_after = if secs >= 0 { now + Duration::from_secs(secs as u64) } else { now - Duration::from_secs((-secs) as u64) };
            Proven { not_after, expires_ns: crate::auth::expiry_boot_ns(not_after, now, 1_000) }
        };
        let ids: BTreeMap<u32, IdentityInfo> =
            [info(300, "spiffe://zt.test/ns/default/sa/api"), info(301, "spiffe://zt.test/ns/default/sa/api"), info(302, "spiffe://zt.test/ns/default/sa/web")]
                .into();
        let mut b = ProofBook::default();
        b.local.insert("spiffe://zt.test/ns/default/sa/web".into(), p(600));
        b.proven_by("node2", "spiffe://zt.test/ns/default/sa/api", p(60));
        b.proven_by("node3", "spiffe://zt.test/ns/default/sa/api", p(-1));
        b.proven_by("node2", "spiffe://zt.test/ns/other/sa/x", p(60));
        let w = b.want(&ids, 1_000);
        let n2 = auth_node_id(b"node2");
        let keys: Vec<(u32, u32, u64)> = w.iter().map(|(k, v)| (k.node, k.identity, v.expires_ns)).collect();
        let mut expect = vec![(AUTH_NODE_SELF, 302, 1_000 + 600_000_000_000), (n2, 300, 1_000 + 60_000_000_000), (n2, 301, 1_000 + 60_000_000_000)];
        expect.sort();
        assert_eq!(keys, expect, "expired and unknown identities leave nothing");
        // A lost channel: node2's proofs count 5 s more, then go.
        b.limit_peer("node2", 1_000 + 5_000_000_000);
        assert!(b.want(&ids, 1_000).iter().filter(|(k, _)| k.node == n2).all(|(_, v)| v.expires_ns == 1_000 + 5_000_000_000));
        b.prune(1_000 + 5_000_000_000);
        assert!(b.want(&ids, 1_000).keys().all(|k| k.node != n2));
        b.proven_by("node2", "spiffe://zt.test/ns/default/sa/api", p(60));
        b.withdrawn_by("node2", "spiffe://zt.test/ns/default/sa/api");
        assert_eq!(b.want(&ids, 1_000).len(), 1);
        // A renewed channel re-proved api, not web: api keeps its expiry, web gets the grace.
        b.proven_by("node2", "spiffe://zt.test/ns/default/sa/api", p(60));
        b.proven_by("node2", "spiffe://zt.test/ns/default/sa/web", p(60));
        b.limit_peer_except("node2", 1_000 + 5_000_000_000, &["spiffe://zt.test/ns/default/sa/api".to_string()].into());
        let w = b.want(&ids, 1_000);
        assert_eq!(w[&AuthProofKey { node: n2, identity: 300 }].expires_ns, 1_000 + 60_000_000_000, "re-proven: untouched");
        assert_eq!(w[&AuthProofKey { node: n2, identity: 302 }].expires_ns, 1_000 + 5_000_000_000, "not re-proven: the grace");
    }
}
