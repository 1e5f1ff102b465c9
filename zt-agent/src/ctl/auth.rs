//! `ztctl auth` and the authentication step of `ztctl explain` (issue 10): what the
//! proofs map holds for a peer, read the way the kernel reads it (zt-ebpf `auth.rs`).
use std::net::IpAddr;

use zt_common::*;

use crate::{auth::boottime_ns, net::to_key, pins::PinnedMaps};

/// The kernel's proof lookup for a new flow whose allow requires authentication: the
/// peer address must be a workload endpoint of `peer_id`, on a known node, with an
/// unexpired proof of that identity from that node. Returns whether it is proven.
pub fn explain_step(maps: &PinnedMaps, peer: IpAddr, peer_id: u32, trace: &mut Vec<String>) -> bool {
    let ep = match maps.endpoints.get(&EndpointKey { addr: to_key(peer) }, 0) {
        Ok(ep) if ep.identity == peer_id && peer_id >= IDENTITY_FIRST_WORKLOAD => ep,
        _ => {
            trace.push(format!("authentication required: {peer} is no workload endpoint of identity {peer_id}: never proven"));
            return false;
        }
    };
    let node = ep.auth_node();
    let whose = if node == AUTH_NODE_SELF { "this node".to_string() } else { format!("node {node:#x}") };
    if node == AUTH_NODE_UNKNOWN {
        trace.push(format!("authentication required: the node of {peer} is not known (or shares its number with another): never proven"));
        return false;
    }
    let now = boottime_ns();
    match maps.auth_proofs.get(&AuthProofKey { node, identity: peer_id }, 0) {
        Ok(p) if p.expires_ns == u64::MAX => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> proven, no expiry (a pod of this node, while it lives)"));
            true
        }
        Ok(p) if now < p.expires_ns => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> proven for {}s more", (p.expires_ns - now) / 1_000_000_000));
            true
        }
        Ok(p) => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> expired {}s ago", (now - p.expires_ns) / 1_000_000_000));
            false
        }
        Err(_) => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> none: not proven"));
            false
        }
    }
}

// ---------------------------------------------------------------------------
// `ztctl auth`: local SVIDs, peers, proofs, and what is wrong in words
// ---------------------------------------------------------------------------

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::events::Snapshot;
use crate::svid::clock::{human, unix_secs};
use crate::svid::x509::SvidError;

/// The state file the agent's authentication writes (`<state-dir>/auth.json`).
pub const AUTH_STATE_FILE: &str = "auth.json";

/// One SVID this node holds (its node SVID and its pods' identities).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvidRow {
    pub spiffe_id: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    pub next_refresh: i64,
}

/// Why the last proof or channel of a peer failed, with the instants of a time error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerError {
    /// `SvidError::reason` (`not-yet-valid`, `expired`, ...).
    pub reason: String,
    /// The SVID it was about (the peer's node SVID or one of its identities).
    pub spiffe_id: String,
    /// For time errors: this node's clock and the certificate's bound (unix seconds).
    pub now: Option<i64>,
    pub bound: Option<i64>,
    pub message: String,
}

impl PeerError {
    pub fn of(spiffe_id: &str, e: &SvidError) -> PeerError {
        let (now, bound) = match e {
            SvidError::NotYetValid { now, not_before, .. } => (Some(unix_secs(*now)), Some(unix_secs(*not_before))),
            SvidError::Expired { now, not_after, .. } => (Some(unix_secs(*now)), Some(unix_secs(*not_after))),
            _ => (None, None),
        };
        PeerError { reason: e.reason().into(), spiffe_id: spiffe_id.into(), now, bound, message: e.to_string() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerRow {
    pub node: String,
    /// `up`, `connecting`, `down`.
    pub state: String,
    /// The peer's clock minus this node's, measured over the channel (seconds).
    pub clock_offset_s: Option<f64>,
    pub last_error: Option<PeerError>,
    /// The node SVIDs the current channel was authenticated with (absent before renewal
    /// was built, or while no channel ever came up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelRow>,
}

/// A channel's node SVIDs and when it is renewed (unix seconds).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRow {
    /// This node's node SVID as the channel presented it.
    pub svid_not_after: Option<i64>,
    /// The peer's node SVID.
    pub peer_svid_not_after: i64,
    /// The dialling end: when the channel is renewed at the latest (the peer SVID's renewal
    /// point; a rotation of this node's SVID renews it sooner). None on the accepting end.
    pub renews_at: Option<i64>,
    /// Renewals by reason, and channels this end closed (the peer's SVID expired or stopped
    /// verifying) by reason.
    pub renewals: std::collections::BTreeMap<String, u64>,
    pub closed: std::collections::BTreeMap<String, u64>,
}

/// One stream of the SVID source (SPIRE: `bundles` or the SPIFFE ID of an X509-SVID stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRow {
    pub stream: String,
    pub up: bool,
    /// Times it failed or ended (each followed by a reconnect).
    pub failures: u64,
    pub last_error: Option<String>,
}

/// An SVID whose last refresh failed (the last valid one is kept until its not-after).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshError {
    pub spiffe_id: String,
    pub failures: u32,
    pub error: String,
}

/// Where the SVIDs come from (`--svid-source`) and its health.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRow {
    /// `builtin`, `spire:<admin socket>` or `files:<dir>`.
    pub source: String,
    /// Every stream up (builtin: always).
    pub up: bool,
    pub streams: Vec<StreamRow>,
    pub refresh_errors: Vec<RefreshError>,
    pub bundle_error: Option<String>,
    /// Roots held per trust domain (two while a root rotation publishes old and new).
    pub roots: std::collections::BTreeMap<String, usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthState {
    pub node: String,
    /// Absent in the state file of an agent older than `--svid-source`.
    #[serde(default)]
    pub source: Option<SourceRow>,
    pub svids: Vec<SvidRow>,
    pub peers: Vec<PeerRow>,
}

impl AuthState {
    pub fn load(state_dir: &Path) -> Result<AuthState> {
        let path = state_dir.join(AUTH_STATE_FILE);
        let data = std::fs::read(&path).with_context(|| format!("reading {} (does zt-agent run with authentication on this node?)", path.display()))?;
        serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))
    }
}

/// A proof in the kernel's map, named.
#[derive(Clone, Debug, Serialize)]
pub struct ProofRow {
    pub identity: u32,
    pub spiffe_id: String,
    /// `this node`, a peer's name (when the state file names it), or its number.
    pub node: String,
    /// Seconds left (negative: expired, still in the map); `i64::MAX` for a proof without
    /// expiry (this node's own pods: `auth::self_proofs`).
    pub expires_in_s: i64,
}

/// The proofs map, named from the snapshot (identities) and the state file (nodes).
pub fn proofs(maps: &PinnedMaps, snap: &Snapshot, st: &AuthState) -> Result<Vec<ProofRow>> {
    let names: std::collections::BTreeMap<u32, &str> = st.peers.iter().map(|p| (auth_node_id(p.node.as_bytes()), p.node.as_str())).collect();
    let now = boottime_ns() as i128;
    let mut rows = vec![];
    for item in maps.auth_proofs.iter() {
        let (k, v) = item?;
        let node =
            if k.node == AUTH_NODE_SELF { "this node".to_string() } else { names.get(&k.node).map(|n| n.to_string()).unwrap_or(format!("{:#x}", k.node)) };
        rows.push(ProofRow {
            identity: k.identity,
            spiffe_id: snap.identities.get(&k.identity).map(|i| i.spiffe_id.clone()).unwrap_or_default(),
            node,
            expires_in_s: if v.expires_ns == u64::MAX { i64::MAX } else { ((v.expires_ns as i128 - now) / 1_000_000_000) as i64 },
        });
    }
    rows.sort_by(|a, b| (&a.node, a.identity).cmp(&(&b.node, b.identity)));
    Ok(rows)
}

/// What is wrong, in words, one line per problem: clock skew read from a peer's time
/// errors and measured offsets, SVIDs of this node that are expired or not valid yet at
/// `now` (the injected clock in tests).
pub fn diagnose(st: &AuthState, now: SystemTime) -> Vec<String> {
    let mut out = vec![];
    let secs = |s: i64| human(Duration::from_secs(s.unsigned_abs()));
    for p in &st.peers {
        if let Some(e) = &p.last_error {
            match (e.reason.as_str(), e.now, e.bound) {
                ("not-yet-valid", Some(n), Some(b)) => {
                    out.push(format!("{}'s SVID for {} is not yet valid here: this node's clock is ≥ {} behind the issuer", p.node, e.spiffe_id, secs(b - n)))
                }
                ("expired", Some(n), Some(b)) => out.push(format!(
                    "{}'s SVID for {} expired {} ago by this node's clock: this node's clock is ≥ {} ahead of the issuer, or {} did not renew it",
                    p.node,
                    e.spiffe_id,
                    secs(n - b),
                    secs(n - b),
                    p.node
                )),
                _ => out.push(format!("{}: {} ({})", p.node, e.message, e.spiffe_id)),
            }
        }
        if let Some(off) = p.clock_offset_s.filter(|o| o.abs() >= 1.0) {
            let dir = if off > 0.0 { "ahead of" } else { "behind" };
            out.push(format!("{}'s clock is {} {dir} this node's (measured over the channel)", p.node, secs(off.round() as i64)));
        }
    }
    if let Some(src) = st.source.as_ref().filter(|s| !s.up) {
        let mut down: Vec<String> = src
            .streams
            .iter()
            .filter(|s| !s.up)
            .map(|s| format!("{} ({})", s.stream, s.last_error.as_deref().unwrap_or("no message yet")))
            .collect();
        if down.is_empty() {
            // A source without streams (files): what did not read.
            down.extend(src.refresh_errors.iter().map(|r| format!("{} ({})", r.spiffe_id, r.error)));
            down.extend(src.bundle_error.iter().map(|e| format!("bundles ({e})")));
        }
        out.push(format!("the SVID source {} is down: {}; the SVIDs held are used until they expire", src.source, down.join("; ")));
    }
    let now_s = unix_secs(now);
    for s in &st.svids {
        if now_s < s.not_before {
            out.push(format!(
                "this node's SVID for {} is not valid for another {}: this node's clock is behind its issuer",
                s.spiffe_id,
                secs(s.not_before - now_s)
            ));
        } else if now_s >= s.not_after {
            out.push(format!("this node's SVID for {} expired {} ago (refresh due at unix {})", s.spiffe_id, secs(now_s - s.not_after), s.next_refresh));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::clock::{Clock, ManualClock};
    use crate::svid::x509::CertRole;

    /// The seed's failure story: node2 runs 45 minutes ahead and issues 1-hour SVIDs
    /// backdated 10 s; this node (the injected clock) judges one of them.
    #[test]
    fn skew_is_diagnosed_with_the_right_number() {
        let clock = ManualClock::at_unix(1_800_000_000);
        let now = clock.now();
        let issued_at = now + Duration::from_secs(45 * 60);
        let e = SvidError::NotYetValid { cert: CertRole::Leaf, now, not_before: issued_at - Duration::from_secs(10) };
        let st = AuthState {
            node: "node1".into(),
            source: None,
            svids: vec![SvidRow {
                spiffe_id: "spiffe://zt.test/zt/node/node1".into(),
                not_before: 1_799_999_990,
                not_after: 1_800_003_590,
                next_refresh: 1_800_001_790,
            }],
            peers: vec![PeerRow {
                node: "node2".into(),
                state: "up".into(),
                clock_offset_s: Some(2700.2),
                last_error: Some(PeerError::of("spiffe://zt.test/ns/default/sa/api", &e)),
                channel: None,
            }],
        };
        let d = diagnose(&st, now);
        assert_eq!(
            d,
            vec![
                "node2's SVID for spiffe://zt.test/ns/default/sa/api is not yet valid here: this node's clock is ≥ 44m50s behind the issuer".to_string(),
                "node2's clock is 45m0s ahead of this node's (measured over the channel)".to_string(),
            ]
        );
        // An hour later by this clock the node's own SVID has expired; the other way round,
        // a peer SVID judged expired.
        clock.advance(Duration::from_secs(3600));
        let e = SvidError::Expired { cert: CertRole::Leaf, now: clock.now(), not_after: now + Duration::from_secs(3590) };
        let st2 = AuthState {
            peers: vec![PeerRow { last_error: Some(PeerError::of("spiffe://zt.test/ns/default/sa/api", &e)), clock_offset_s: None, ..st.peers[0].clone() }],
            ..st
        };
        let d = diagnose(&st2, clock.now());
        assert_eq!(d[0], "node2's SVID for spiffe://zt.test/ns/default/sa/api expired 10s ago by this node's clock: this node's clock is ≥ 10s ahead of the issuer, or node2 did not renew it");
        assert_eq!(d[1], "this node's SVID for spiffe://zt.test/zt/node/node1 expired 10s ago (refresh due at unix 1800001790)");
        assert!(diagnose(&AuthState::default(), clock.now()).is_empty());
        // SPIRE down: named with the stream's error.
        let down = SourceRow {
            source: "spire:/run/spire/admin.sock".into(),
            up: false,
            streams: vec![
                StreamRow { stream: "bundles".into(), up: true, failures: 0, last_error: None },
                StreamRow { stream: "spiffe://zt.test/zt/node/node1".into(), up: false, failures: 3, last_error: Some("connection refused".into()) },
            ],
            ..SourceRow::default()
        };
        let st3 = AuthState { source: Some(down), ..AuthState::default() };
        assert_eq!(
            diagnose(&st3, clock.now()),
            ["the SVID source spire:/run/spire/admin.sock is down: spiffe://zt.test/zt/node/node1 (connection refused); the SVIDs held are used until they expire"]
        );
    }
}
