//! The two-node fixture of the channel's tests: n1's and n2's node SVIDs from one builtin
//! CA at a fixed instant, their channel setups, a verifier of the trust domain, and a
//! channel between them over loopback (127.0.0.1 only).
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::channel::verifier::{PeerPolicy, SvidVerifier};
use crate::channel::{CachedCredential, ChannelSetup, NodeChannel};
use crate::svid::builtin::{BuiltinCa, BuiltinConfig};
use crate::svid::cache::{CacheConfig, SvidCache};
use crate::svid::clock::ManualClock;
use crate::svid::source::Subject;
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::parse("zt.test").unwrap()
}

pub struct Nodes {
    pub clock: Arc<ManualClock>,
    pub ca: Arc<BuiltinCa>,
    pub cache: Arc<SvidCache>,
}

impl Nodes {
    pub async fn new() -> Nodes {
        let clock = Arc::new(ManualClock::at_unix(1_800_000_000));
        let ca = Arc::new(BuiltinCa::new(BuiltinConfig::new(td()), clock.clone()).unwrap());
        let cache = SvidCache::new(ca.clone(), clock.clone(), CacheConfig::default());
        for n in ["n1", "n2"] {
            cache.prefetch(Subject::id(id(&format!("spiffe://zt.test/zt/node/{n}")))).await.unwrap();
        }
        Nodes { clock, ca, cache }
    }

    /// Node `n`'s channel setup (its SVID from the cache, peers of the trust domain).
    pub fn setup(&self, n: &str) -> ChannelSetup {
        ChannelSetup {
            credential: Arc::new(CachedCredential { cache: self.cache.clone(), id: id(&format!("spiffe://zt.test/zt/node/{n}")) }),
            bundles: self.cache.clone(),
            clock: self.clock.clone(),
            peer_domains: BTreeSet::from([td()]),
            handshake_timeout: Duration::from_secs(10),
        }
    }

    pub fn verifier(&self) -> SvidVerifier {
        SvidVerifier::new(self.cache.clone(), self.clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td()])))
    }

    /// n2 dials n1: (n1's end, n2's end).
    pub async fn channel(&self) -> (NodeChannel, NodeChannel) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let server = self.setup("n1");
        let accept = tokio::spawn(async move { server.accept(l.accept().await.unwrap().0).await });
        let n2 = self.setup("n2").connect(addr, &id("spiffe://zt.test/zt/node/n1")).await.unwrap();
        (accept.await.unwrap().unwrap(), n2)
    }
}
