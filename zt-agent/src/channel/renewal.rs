//! When a node channel is renewed (issue 10, make-before-break): each channel records the
//! node SVIDs it was authenticated with (its own, as this end presented it, and the peer's
//! chain, as the verifier accepted it), and the dialling end opens a new channel, swaps it in
//! and closes the old one (`auth/links.rs`) when:
//!
//! - `own-svid-rotated`: this node's node SVID is no longer the one the channel presented
//!   (the cache refreshed it at half-life, or the source pushed a rotation);
//! - `peer-renewal-point`: the peer's node SVID reached 3/4 of its lifetime. The cache
//!   refreshes an SVID at half-life moved by up to ±10% of the lifetime (`svid::cache`), so at
//!   3/4 the peer has held its next SVID for at least 15% of the lifetime, and a quarter is
//!   left for retries before the old one expires. A fraction and not "not-after minus a
//!   margin": lifetimes run from one minute (`--svid-ttl 60`) to SPIRE's hours, and the
//!   refresh point is a fraction too. The dialler cannot see the peer's rotation before
//!   that point (the peer's own rotation shows at the next renewal);
//! - `peer-svid-invalid`: the peer's chain no longer verifies against the current bundles
//!   and clock (a root was retired, the SVID expired).
//!
//! A channel whose peer SVID no longer verifies is closed by either end (`close_reason`):
//! at once once the peer's SVID expired, after `UNTRUSTED_GRACE` otherwise (the dialler
//! renews within seconds; the old channel keeps the proofs flowing meanwhile).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;

use super::verifier::{SvidVerifier, Usage};
use crate::svid::source::{TrustBundles, X509Svid};
use crate::svid::x509::{check_leaf, CertRole, LeafFacts, SvidError};

/// How long a peer chain that stopped verifying for another reason than its leaf's time
/// (a retired root) keeps its channel: the dialler renews well within it.
pub const UNTRUSTED_GRACE: Duration = Duration::from_secs(20);
/// A peer chain is verified again at least this often (and whenever the bundles change).
pub const RECHECK: Duration = Duration::from_secs(10);

/// The node SVIDs a channel was authenticated with.
#[derive(Clone, Debug)]
pub struct ChannelCerts {
    /// This end dialled (it verified a server certificate).
    pub dialled: bool,
    /// This end's leaf as presented, and what it says (None: nothing recorded).
    pub local_leaf: Option<CertificateDer<'static>>,
    pub local: Option<LeafFacts>,
    /// The peer's chain (leaf first) and what its leaf says.
    pub peer_chain: Vec<CertificateDer<'static>>,
    pub peer: LeafFacts,
}

/// Why a dialling end renews its channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    PeerSvidInvalid,
    OwnSvidRotated,
    PeerRenewalPoint,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::PeerSvidInvalid => "peer-svid-invalid",
            Reason::OwnSvidRotated => "own-svid-rotated",
            Reason::PeerRenewalPoint => "peer-renewal-point",
        }
    }
}

/// 3/4 of the way from `not_before` to `not_after` (whole seconds).
pub fn renewal_point(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_before + Duration::from_secs(life.as_secs() * 3 / 4)
}

impl ChannelCerts {
    pub fn new(dialled: bool, local: Vec<CertificateDer<'static>>, peer_chain: Vec<CertificateDer<'static>>) -> Result<ChannelCerts, SvidError> {
        let peer = check_leaf(peer_chain.first().ok_or(SvidError::NoCertificate)?)?;
        let local_leaf = local.into_iter().next();
        let local = local_leaf.as_ref().and_then(|l| check_leaf(l).ok());
        Ok(ChannelCerts { dialled, local_leaf, local, peer_chain, peer })
    }

    /// When the dialler renews by time: the peer's renewal point.
    pub fn peer_renewal_at(&self) -> SystemTime {
        renewal_point(self.peer.not_before, self.peer.not_after)
    }

    /// Verifies the peer's chain again with `v`'s bundles and clock.
    pub fn verify_peer(&self, v: &SvidVerifier) -> Result<(), SvidError> {
        let (leaf, rest) = self.peer_chain.split_first().ok_or(SvidError::NoCertificate)?;
        let usage = if self.dialled { Usage::Server } else { Usage::Client };
        v.verify(leaf, rest, usage).map(|_| ())
    }

    /// Whether the channel presented `svid`'s leaf.
    pub fn presented(&self, svid: &X509Svid) -> bool {
        self.local_leaf.as_ref().is_some_and(|l| l == svid.leaf())
    }
}

/// Whether the dialling end renews now. `own`: this node's node SVID as the cache holds it
/// now (None: none valid, nothing to renew with); `peer`: the last check of the peer's
/// chain; `hold_until`: time-based renewal is held (a renewal just brought the same peer
/// SVID back).
pub fn due(certs: &ChannelCerts, own: Option<&X509Svid>, peer: &Result<(), SvidError>, now: SystemTime, hold_until: Option<SystemTime>) -> Option<Reason> {
    if peer.is_err() {
        return Some(Reason::PeerSvidInvalid);
    }
    if own.is_some_and(|s| !certs.presented(s)) {
        return Some(Reason::OwnSvidRotated);
    }
    if hold_until.is_some_and(|h| now < h) {
        return None;
    }
    (now >= certs.peer_renewal_at()).then_some(Reason::PeerRenewalPoint)
}

/// How long time-based renewal waits after a renewal that brought the peer's same SVID
/// back (its source did not renew it yet): a quarter of what is left, at least a second.
pub fn hold_after_same(certs: &ChannelCerts, now: SystemTime) -> SystemTime {
    now + (certs.peer.not_after.duration_since(now).unwrap_or_default() / 4).max(Duration::from_secs(1))
}

/// The last verification of a channel's peer chain, redone when the bundles change, every
/// `RECHECK`, and at once when the peer's leaf reaches its not-after.
#[derive(Default)]
pub struct PeerWatch {
    bundles: Option<Arc<TrustBundles>>,
    checked: Option<SystemTime>,
    result: Option<Result<(), SvidError>>,
    /// Since when the chain fails (by this end's clock).
    failing_since: Option<SystemTime>,
}

impl PeerWatch {
    /// The peer chain's state now.
    pub fn check(&mut self, certs: &ChannelCerts, v: &SvidVerifier, bundles: Arc<TrustBundles>, now: SystemTime) -> Result<(), SvidError> {
        let same_bundles = self.bundles.as_ref().is_some_and(|b| Arc::ptr_eq(b, &bundles));
        let recent = self.checked.is_some_and(|c| now >= c && now.duration_since(c).unwrap_or_default() < RECHECK);
        let r = match &self.result {
            Some(r) if same_bundles && recent && now < certs.peer.not_after => r.clone(),
            _ => {
                self.bundles = Some(bundles);
                self.checked = Some(now);
                let r = certs.verify_peer(v);
                self.result = Some(r.clone());
                r
            }
        };
        match &r {
            Ok(()) => self.failing_since = None,
            Err(_) => {
                self.failing_since.get_or_insert(now);
            }
        }
        r
    }

    /// Why the channel is closed now, if it is: its peer SVID expired (at once) or stopped
    /// verifying `UNTRUSTED_GRACE` ago.
    pub fn close_reason(&self, now: SystemTime) -> Option<SvidError> {
        let e = self.result.as_ref()?.as_ref().err()?;
        let expired = matches!(e, SvidError::Expired { cert: CertRole::Leaf, .. });
        let long = self.failing_since.is_some_and(|s| now.duration_since(s).unwrap_or_default() >= UNTRUSTED_GRACE);
        (expired || long).then(|| e.clone())
    }
}

#[cfg(test)]
mod tests;
