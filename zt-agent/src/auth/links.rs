//! The agent's node-to-node channels (issue 10): one TLS 1.3 channel (`channel/`) per pair
//! of nodes, over which each agent proves the identities of its local pods and learns what
//! the peer proves; the proofs go into `ZT_AUTH_PROOFS` as (peer node, identity) -> expiry.
//!
//! - Peers are the cluster's Node objects (their InternalIPs), at the same port as this
//!   agent listens on. The node with the lower name dials; the other accepts (and refuses a
//!   channel from a node that should have been dialled instead). A dialler retries with
//!   doubling backoff capped at `DIAL_BACKOFF_MAX`.
//! - Each node's SVID is `spiffe://<trust domain>/zt/node/<node name>`; a peer proves a
//!   channel to node N only with N's SVID (the number of its proofs is `auth_node_id(N)`,
//!   the number the compiled endpoints give N's pods).
//! - Local identities: the SPIFFE IDs of this node's pods, their SVIDs kept by the cache;
//!   a session proves each when it starts and when one appears or renews, and withdraws it
//!   when the last pod of it leaves.
//! - Renewal, make-before-break (`channel::renewal` says when): the dialler opens a new
//!   channel and starts its session while the old one runs; at the new session's first clock
//!   round trip (the peer proves what it holds before it answers) the new one becomes the
//!   peer's current channel and the old one is closed. Proofs are per peer node: a swap
//!   neither removes nor shortens those re-proven on the new channel, and the old session's
//!   end is not a lost channel. The accepting end does the same with the new channel.
//!   A channel whose peer SVID expired (or stopped verifying) is closed by either end.
//! - A lost channel keeps the peer's proofs for `grace` (an agent restart), then they go;
//!   at this agent's own start the proofs an earlier agent wrote are kept as long, so that
//!   its restart cuts no flow. Every removal bumps the policy epoch (the caller).
//!
//! SVIDs and bundles come from `svid::provider` (`--svid-source`): the builtin CA
//! (`--svid-ca-dir` shares one CA between agents: local mode and demos only, see
//! `BuiltinCa::open_shared`) or SPIRE's Delegated Identity API. This file only uses them.
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use zt_common::{AuthProofKey, AUTH_NODE_SELF, EP_LOCAL, IDENTITY_FIRST_WORKLOAD};

use super::book::{ProofBook, Proven};
use super::{boottime_ns, expiry_boot_ns, ProofSync};
use crate::channel::renewal::{self, ChannelCerts, PeerWatch};
use crate::channel::session::{run_installs, InstalledAck, Liveness, LocalSvids, SentCounts, SessionEvent};
use crate::channel::verifier::{PeerPolicy, SvidVerifier};
use crate::channel::{CachedCredential, ChannelError, ChannelSetup, NodeChannel};
use crate::ctl::auth::PeerError;
use crate::model::ClusterState;
use crate::pins::AuthProofsMap;
use crate::state::{Desired, IdentityInfo};
use crate::svid::clock::{Clock, SystemClock};
use crate::svid::provider::{ProviderOptions, SvidProvider};
use crate::svid::source::BundleProvider;
use crate::svid::spiffe_id::{SpiffeId, TrustDomain};

/// Longest wait between two dials of a peer.
pub const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(10);
const DIAL_BACKOFF_MIN: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 64;
/// How often a channel's SVIDs are looked at (renewal, expiry).
const RENEWAL_TICK: Duration = Duration::from_secs(1);
/// The acceptor's renewal reason: the peer opened a new channel while one was up.
pub const BY_PEER: &str = "by-peer";

/// `--auth-*` and `--svid-*` flags.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub listen: SocketAddr,
    /// The port peers listen on (every agent of the cluster gets the same flags).
    pub peer_port: u16,
    /// Where the SVIDs come from (`--svid-source` and its backend's flags).
    pub svid: ProviderOptions,
    pub grace: Duration,
}

/// The SPIFFE ID of node `name`'s agent.
pub fn node_id(td: &TrustDomain, name: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(td, &format!("/zt/node/{name}"))
}

/// The node name in a node SPIFFE ID of `td`.
pub fn node_name_of<'a>(td: &TrustDomain, id: &'a SpiffeId) -> Option<&'a str> {
    (id.trust_domain() == td).then(|| id.path().strip_prefix("/zt/node/")).flatten().filter(|n| !n.is_empty() && !n.contains('/'))
}

/// One peer as `ztctl auth` and the metrics see it.
#[derive(Debug, Default)]
pub struct PeerStatus {
    /// `connecting`, `up`, `down`.
    pub state: &'static str,
    pub clock_offset_ms: Option<i64>,
    pub last_error: Option<PeerError>,
    /// Channels this end refused (the peer's SVID broke a rule) / that failed otherwise.
    pub refused: u64,
    pub failed: u64,
    pub received: u64,
    pub withdrawals_received: u64,
    /// Refused proofs by reason.
    pub rejected: BTreeMap<String, u64>,
    pub sent: Arc<SentCounts>,
    /// Channels renewed (swapped in while the old one ran), by reason (`channel::renewal`,
    /// or `by-peer` on the accepting end).
    pub renewals: BTreeMap<&'static str, u64>,
    /// Channels this end closed because the peer's SVID expired or stopped verifying, by reason.
    pub closed: BTreeMap<&'static str, u64>,
    /// The node SVIDs the current channel was authenticated with.
    pub channel: Option<ChannelCerts>,
    /// Which task owns the peer's channel now (a replaced session must not mark it down).
    generation: u64,
    /// The peer acknowledges installed proofs (`Installed`) on the current channel.
    installs: bool,
    /// This node's SPIFFE IDs the peer installed on the current channel (-> SVID
    /// not-after, unix seconds): what a CNI ADD waits for (`awaiting`).
    installed: BTreeMap<String, i64>,
    /// The peer's proofs this node acknowledged on the current channel (-> not-after).
    acked: BTreeMap<String, std::time::SystemTime>,
    /// The current session's queue of acknowledgements.
    acks_tx: Option<mpsc::UnboundedSender<InstalledAck>>,
    /// New channels waiting to take over: the current one ending meanwhile is no loss yet.
    pending: u32,
}

/// A new channel taking over from a running one: it becomes current at its first round trip,
/// then closes `task`'s.
struct Takeover {
    /// The running channel's generation and task.
    generation: u64,
    task: tokio::task::AbortHandle,
    up: Option<oneshot::Sender<()>>,
    reason: &'static str,
}

/// A spawned session, aborted with its owner (a dialler's loop).
struct Owned(tokio::task::JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The end of a session, also when its task is aborted (a renewal that timed out, a newer
/// channel superseding one still waiting to take over, the peer leaving): a session that
/// waited to take over is no longer counted as pending, and if the peer's channel is lost
/// with it, the peer is down and its proofs count the grace (none for a peer this end
/// closed as untrusted).
struct SessionEnd {
    links: Arc<Links>,
    peer: String,
    generation: u64,
    /// Still waiting to take over from (generation, task, reason).
    pending: Option<(u64, tokio::task::AbortHandle, &'static str)>,
    untrusted: bool,
    /// How it ended (None: aborted).
    how: Option<String>,
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let (l, peer) = (&self.links, self.peer.as_str());
        let pending = self.pending.take();
        if let Some((_, _, reason)) = &pending {
            log::warn!("node channels: a new channel to {peer} ended before it took over ({reason})");
        }
        let lost = {
            // A peer that left the cluster is forgotten: nothing to mark.
            let mut peers = l.peers.lock().unwrap();
            let Some(s) = peers.get_mut(peer) else { return };
            let lost = match &pending {
                // The old channel stays the peer's if it still runs.
                Some((old_generation, old_task, _)) => {
                    s.pending = s.pending.saturating_sub(1);
                    old_task.is_finished() && s.generation == *old_generation && s.pending == 0
                }
                // A new channel waiting to take over decides when it ends.
                None => s.generation == self.generation && s.pending == 0,
            };
            if lost {
                s.state = "down";
                Acks::clear(s);
            }
            lost
        };
        l.report.notify_one();
        let grace = if self.untrusted { Duration::ZERO } else { l.opts.grace };
        if lost {
            let until = boottime_ns().saturating_add(u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX));
            l.book.lock().unwrap().limit_peer(peer, until);
            l.changed.notify_one();
        }
        match (&self.how, lost) {
            (Some(how), true) => log::warn!("node channels: channel to {peer} {how}; its proofs count {grace:?} more"),
            (Some(how), false) => log::info!("node channels: channel to {peer} {how}; another channel of the peer carries its proofs"),
            (None, true) => log::warn!("node channels: channel to {peer} stopped; its proofs count {grace:?} more"),
            (None, false) => {}
        }
    }
}

/// One channel's acknowledgement state (`Installed`, what CNI ADDs wait on), held by a
/// channel until it is the peer's current one.
struct Acks {
    tx: mpsc::UnboundedSender<InstalledAck>,
    installs: bool,
    installed: BTreeMap<String, i64>,
}

impl Acks {
    /// Keeps an acknowledgement event; any other event is handed back.
    fn absorb(&mut self, ev: SessionEvent) -> Option<SessionEvent> {
        match ev {
            SessionEvent::PeerInstalls => self.installs = true,
            SessionEvent::Installed { spiffe_id, not_after_unix_s } => {
                self.installed.insert(spiffe_id, not_after_unix_s);
            }
            SessionEvent::WithdrawSent(id) => {
                self.installed.remove(&id);
            }
            ev => return Some(ev),
        }
        None
    }

    /// Makes this the peer's acknowledgement state: nothing acknowledged to it yet.
    fn install(self, s: &mut PeerStatus) {
        (s.installs, s.installed, s.acked, s.acks_tx) = (self.installs, self.installed, BTreeMap::new(), Some(self.tx));
    }

    fn clear(s: &mut PeerStatus) {
        (s.installs, s.installed, s.acked, s.acks_tx) = (false, BTreeMap::new(), BTreeMap::new(), None);
    }
}

pub struct Links {
    pub node: String,
    td: TrustDomain,
    opts: LinkOptions,
    pub(crate) svids: Arc<SvidProvider>,
    clock: Arc<dyn Clock>,
    setup: ChannelSetup,
    book: Mutex<ProofBook>,
    pub(crate) peers: Mutex<BTreeMap<String, PeerStatus>>,
    /// Channels refused before the peer was known (the acceptor's side).
    pub(crate) refused_unknown: AtomicU64,
    /// Peer proofs in the map after the last sync.
    pub(crate) proofs_in_map: AtomicU64,
    /// The last failure logged per dialling address (the same failure is logged once).
    accept_errors: Mutex<BTreeMap<IpAddr, String>>,
    /// What the last successful sync wrote: the map is left alone while nothing changes.
    last_written: Mutex<Option<BTreeMap<AuthProofKey, zt_common::AuthProofValue>>>,
    tasks: Mutex<BTreeMap<String, tokio::task::AbortHandle>>,
    /// An accepted channel still waiting to take over from the peer's current one (whose
    /// task is in `tasks`); a newer accepted channel supersedes it.
    pending_tasks: Mutex<BTreeMap<String, tokio::task::AbortHandle>>,
    next_generation: AtomicU64,
    changed: Notify,
    /// Wakes the reporter (auth.json, metrics) when a peer's status changes.
    pub(crate) report: Notify,
    local_tx: watch::Sender<LocalSvids>,
    /// Local identities and the UIDs of their live local pods (how SPIRE is asked).
    ids_tx: watch::Sender<BTreeMap<SpiffeId, BTreeSet<String>>>,
    nodes_tx: watch::Sender<BTreeMap<String, Vec<IpAddr>>>,
    /// CLOCK_BOOTTIME at start: proofs an earlier agent wrote are kept `grace` from here.
    started_ns: u64,
}

impl Links {
    /// Gets the node SVID, listens, and starts the tasks. Peers and local identities come
    /// with `update`.
    pub async fn start(node: &str, trust_domain: &str, opts: LinkOptions) -> Result<Arc<Links>> {
        let td = TrustDomain::parse(trust_domain).map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let me = node_id(&td, node).map_err(|e| anyhow::anyhow!("node name {node:?} makes no SPIFFE ID: {e}"))?;
        let svids = SvidProvider::start(&opts.svid, node, me.clone(), &td, clock.clone()).await?;
        let cache = svids.cache().clone();
        let listener = match TcpListener::bind(opts.listen).await {
            Ok(l) => Ok(l),
            // A host without IPv6: the IPv4 wildcard.
            Err(_) if opts.listen.ip() == IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED) => {
                TcpListener::bind(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), opts.listen.port())).await
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("--auth-listen {}", opts.listen))?;
        let setup = ChannelSetup {
            credential: Arc::new(CachedCredential { cache: cache.clone(), id: me }),
            bundles: cache.clone(),
            clock: clock.clone(),
            peer_domains: BTreeSet::from([td.clone()]),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        };
        let links = Arc::new(Links {
            node: node.to_string(),
            td,
            opts,
            svids,
            clock,
            setup,
            book: Mutex::default(),
            peers: Mutex::default(),
            refused_unknown: AtomicU64::new(0),
            proofs_in_map: AtomicU64::new(0),
            last_written: Mutex::default(),
            accept_errors: Mutex::default(),
            tasks: Mutex::default(),
            pending_tasks: Mutex::default(),
            next_generation: AtomicU64::new(1),
            changed: Notify::new(),
            report: Notify::new(),
            local_tx: watch::channel(LocalSvids::new()).0,
            ids_tx: watch::channel(BTreeMap::new()).0,
            nodes_tx: watch::channel(BTreeMap::new()).0,
            started_ns: boottime_ns(),
        });
        log::info!("node channels: listening on {} as {}", listener.local_addr()?, node_id(&links.td, node).unwrap_or_else(|_| unreachable!()));
        tokio::spawn(links.clone().accept_loop(listener));
        tokio::spawn(links.clone().peers_loop(links.nodes_tx.subscribe()));
        tokio::spawn(links.clone().local_loop(links.ids_tx.subscribe()));
        Ok(links)
    }

    /// Peers from the Node objects, local identities from the compiled endpoints.
    pub fn update(&self, cluster: &ClusterState, desired: &Desired) {
        let nodes: BTreeMap<String, Vec<IpAddr>> = cluster
            .nodes
            .iter()
            .filter(|(name, _)| **name != self.node)
            .map(|(name, n)| {
                let mut ips: Vec<IpAddr> = n
                    .status
                    .as_ref()
                    .and_then(|s| s.addresses.as_ref())
                    .into_iter()
                    .flatten()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse().ok())
                    .collect();
                ips.sort_by_key(|ip| ip.is_ipv6());
                (name.clone(), ips)
            })
            .collect();
        self.nodes_tx.send_if_modified(|cur| std::mem::replace(cur, nodes.clone()) != nodes);
        let mut ids: BTreeMap<SpiffeId, BTreeSet<String>> = BTreeMap::new();
        for e in desired.endpoints.values().filter(|e| e.flags & EP_LOCAL != 0 && e.identity >= IDENTITY_FIRST_WORKLOAD) {
            let (Some(pod), Some(id)) = (&e.pod, desired.identities.get(&e.identity).and_then(|i| SpiffeId::parse(&i.spiffe_id).ok())) else { continue };
            let uid = cluster.pods.get(&(pod.namespace.clone(), pod.name.clone())).and_then(|p| p.metadata.uid.clone()).filter(|u| !u.is_empty());
            ids.entry(id).or_default().extend(uid);
        }
        self.ids_tx.send_if_modified(|cur| std::mem::replace(cur, ids.clone()) != ids);
    }

    /// Makes the peers' entries of the proofs map what the peers proved, in this node's
    /// identity numbering. `withdrew`: the caller bumps the policy epoch.
    pub fn sync_proofs(&self, map: &mut AuthProofsMap, identities: &BTreeMap<u32, IdentityInfo>) -> Result<ProofSync> {
        let now = boottime_ns();
        let mut want = {
            let mut b = self.book.lock().unwrap();
            b.prune(now);
            b.want(identities, now)
        };
        let in_start_grace = now < self.started_ns.saturating_add(self.opts.grace.as_nanos() as u64);
        if !in_start_grace && self.last_written.lock().unwrap().as_ref() == Some(&want) {
            // Unchanged, but a peer that announced `installs` since may be owed acknowledgements.
            self.acknowledge(&want, identities);
            return Ok(ProofSync::default());
        }
        if in_start_grace {
            // What an earlier agent wrote, until the peers have had `grace` to prove again.
            for (k, v) in super::read(map)? {
                if k.node != AUTH_NODE_SELF && v.expires_ns > now {
                    want.entry(k).or_insert(v);
                }
            }
        }
        let s = super::sync_peers(map, &want)?;
        self.proofs_in_map.store(want.keys().filter(|k: &&AuthProofKey| k.node != AUTH_NODE_SELF).count() as u64, Relaxed);
        self.acknowledge(&want, identities);
        *self.last_written.lock().unwrap() = (!in_start_grace).then_some(want);
        Ok(s)
    }

    /// Tells each peer (that understands `Installed`) which of its proofs the map holds now:
    /// a proven SPIFFE ID with at least one identity number of this node in `written`.
    fn acknowledge(&self, written: &BTreeMap<AuthProofKey, zt_common::AuthProofValue>, identities: &BTreeMap<u32, IdentityInfo>) {
        let book = self.book.lock().unwrap();
        let mut peers = self.peers.lock().unwrap();
        for (name, st) in peers.iter_mut() {
            let Some(tx) = st.acks_tx.clone().filter(|_| st.installs) else { continue };
            let node = zt_common::auth_node_id(name.as_bytes());
            let in_map: BTreeSet<&str> =
                written.keys().filter(|k| k.node == node).filter_map(|k| identities.get(&k.identity)).map(|i| i.spiffe_id.as_str()).collect();
            for (sid, p) in book.peers.get(name).into_iter().flatten() {
                if !in_map.contains(sid.as_str()) || st.acked.get(sid) == Some(&p.not_after) {
                    continue;
                }
                if tx.send((sid.clone(), crate::svid::clock::unix_secs(p.not_after))).is_ok() {
                    st.acked.insert(sid.clone(), p.not_after);
                }
            }
        }
    }

    /// The peers whose channel is up and acknowledges installs but that have not yet
    /// acknowledged this node's proof of `spiffe_id` (a CNI ADD waits for none to be left).
    /// A peer whose channel is down, or of a version without `Installed`, is not waited for.
    pub fn awaiting(&self, spiffe_id: &str) -> Vec<String> {
        let peers = self.peers.lock().unwrap();
        // An acknowledgement of an SVID that has since expired does not count.
        let now = crate::svid::clock::unix_secs(self.clock.now());
        peers
            .iter()
            .filter(|(_, s)| s.state == "up" && s.installs && !s.installed.get(spiffe_id).is_some_and(|&not_after| not_after > now))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether any peer's channel is up and acknowledges installs (else nothing to wait for).
    pub fn any_acking_peer(&self) -> bool {
        self.peers.lock().unwrap().values().any(|s| s.state == "up" && s.installs)
    }

    /// Resolves when a peer proved, withdrew or was lost since the last call.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    fn status<R>(&self, peer: &str, f: impl FnOnce(&mut PeerStatus) -> R) -> R {
        let r = {
            let mut g = self.peers.lock().unwrap();
            f(g.entry(peer.to_string()).or_insert_with(|| PeerStatus { state: "connecting", ..Default::default() }))
        };
        self.report.notify_one();
        r
    }

    /// Starts and stops a dialler per peer this node dials; forgets nodes that left.
    async fn peers_loop(self: Arc<Self>, mut nodes: watch::Receiver<BTreeMap<String, Vec<IpAddr>>>) {
        loop {
            let current = nodes.borrow_and_update().clone();
            let gone: Vec<String> = self.peers.lock().unwrap().keys().filter(|p| !current.contains_key(*p)).cloned().collect();
            for p in gone {
                if let Some(t) = self.tasks.lock().unwrap().remove(&p) {
                    t.abort();
                }
                if let Some(t) = self.pending_tasks.lock().unwrap().remove(&p) {
                    t.abort();
                }
                self.peers.lock().unwrap().remove(&p);
                self.book.lock().unwrap().forget_peer(&p);
                log::info!("node channels: node {p} left the cluster; its proofs are forgotten");
                self.changed.notify_one();
            }
            for p in current.keys() {
                self.status(p, |_| ());
                if self.node.as_str() < p.as_str() && !self.tasks.lock().unwrap().contains_key(p) {
                    let generation = self.next_generation.fetch_add(1, Relaxed);
                    let h = tokio::spawn(self.clone().dial_loop(p.clone(), generation, nodes.clone()));
                    self.tasks.lock().unwrap().insert(p.clone(), h.abort_handle());
                }
            }
            if nodes.changed().await.is_err() {
                return;
            }
        }
    }

    async fn dial_loop(self: Arc<Self>, peer: String, generation: u64, nodes: watch::Receiver<BTreeMap<String, Vec<IpAddr>>>) {
        self.status(&peer, |s| s.generation = generation);
        let expected = match node_id(&self.td, &peer) {
            Ok(id) => id,
            Err(e) => {
                log::error!("node channels: node {peer:?} makes no SPIFFE ID ({e}): never dialled");
                return;
            }
        };
        let mut backoff = DIAL_BACKOFF_MIN;
        loop {
            let addrs = nodes.borrow().get(&peer).cloned().unwrap_or_default();
            let mut last: Option<ChannelError> = None;
            let mut ch = None;
            for ip in &addrs {
                match self.setup.connect(SocketAddr::new(*ip, self.opts.peer_port), &expected).await {
                    Ok(c) => {
                        ch = Some(c);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            match (ch, last) {
                (Some(ch), _) => {
                    let t = Instant::now();
                    self.clone().run_dialled(&peer, &expected, ch, &nodes).await;
                    if t.elapsed() > DIAL_BACKOFF_MAX {
                        backoff = DIAL_BACKOFF_MIN;
                    }
                }
                (None, Some(e)) => self.channel_failed(&peer, &expected, e),
                (None, None) => self.status(&peer, |s| {
                    s.state = "down";
                    s.last_error = Some(PeerError {
                        reason: "no-address".into(),
                        spiffe_id: expected.to_string(),
                        now: None,
                        bound: None,
                        message: "the Node object has no InternalIP".into(),
                    });
                }),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
        }
    }

    fn verifier(&self) -> SvidVerifier {
        SvidVerifier::new(self.svids.cache().clone(), self.clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([self.td.clone()])))
    }

    /// Runs a dialled channel, renewing it (make-before-break) when `channel::renewal` says,
    /// until the current one ends.
    async fn run_dialled(self: Arc<Self>, peer: &str, expected: &SpiffeId, ch: NodeChannel, nodes: &watch::Receiver<BTreeMap<String, Vec<IpAddr>>>) {
        let generation = self.next_generation.fetch_add(1, Relaxed);
        self.status(peer, |s| s.generation = generation);
        let mut certs = ch.certs().clone();
        let mut cur_generation = generation;
        let mut cur = Owned(tokio::spawn(self.clone().session(peer.to_string(), ch, generation, None)));
        let verifier = self.verifier();
        let mut watch = PeerWatch::default();
        let mut hold_until = None;
        let mut retry_at = Instant::now();
        let mut backoff = DIAL_BACKOFF_MIN;
        let mut tick = tokio::time::interval(RENEWAL_TICK);
        loop {
            tokio::select! {
                _ = &mut cur.0 => return,
                _ = tick.tick() => {}
            }
            let now = self.clock.now();
            let peer_ok = watch.check(&certs, &verifier, self.svids.cache().bundles(), now);
            let own = self.svids.svid(self.svids.node_id());
            let Some(reason) = renewal::due(&certs, own.as_deref(), &peer_ok, now, hold_until) else { continue };
            if Instant::now() < retry_at {
                continue;
            }
            let addrs = nodes.borrow().get(peer).cloned().unwrap_or_default();
            let mut last = None;
            let mut new = None;
            for ip in &addrs {
                match self.setup.connect(SocketAddr::new(*ip, self.opts.peer_port), expected).await {
                    Ok(c) => {
                        new = Some(c);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let up = match new {
                Some(new_ch) => {
                    let new_certs = new_ch.certs().clone();
                    let g = self.next_generation.fetch_add(1, Relaxed);
                    let (tx, rx) = oneshot::channel();
                    let takeover = Takeover { generation: cur_generation, task: cur.0.abort_handle(), up: Some(tx), reason: reason.as_str() };
                    let mut next = Owned(tokio::spawn(self.clone().session(peer.to_string(), new_ch, g, Some(takeover))));
                    let up = tokio::select! {
                        // A new session that took over and ended at once still took over.
                        biased;
                        r = rx => r.is_ok(),
                        _ = &mut next.0 => false,
                        _ = tokio::time::sleep(HANDSHAKE_TIMEOUT) => false,
                    };
                    if up {
                        // The old session was closed by the new one when it took over.
                        let same_peer_svid = new_certs.peer_chain.first() == certs.peer_chain.first();
                        hold_until = (same_peer_svid && now >= new_certs.peer_renewal_at()).then(|| renewal::hold_after_same(&new_certs, now));
                        cur = next;
                        cur_generation = g;
                        certs = new_certs;
                        watch = PeerWatch::default();
                        backoff = DIAL_BACKOFF_MIN;
                        Ok(())
                    } else {
                        Err("the new channel's session did not come up".to_string())
                    }
                }
                None => Err(last.map_or_else(|| "no address".to_string(), |e| e.to_string())),
            };
            if let Err(e) = up {
                log::warn!("node channels: renewing the channel to {peer} ({}) failed: {e}; the current one stays, retrying in {backoff:?}", reason.as_str());
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(DIAL_BACKOFF_MAX);
            }
        }
    }

    fn channel_failed(&self, peer: &str, expected: &SpiffeId, e: ChannelError) {
        let (refused, err) = match &e {
            ChannelError::Rejected(svid) => (true, PeerError::of(&expected.to_string(), svid)),
            other => (false, PeerError { reason: "channel".into(), spiffe_id: expected.to_string(), now: None, bound: None, message: other.to_string() }),
        };
        let first = self.status(peer, |s| {
            let first = s.last_error.as_ref().map(|x| &x.message) != Some(&err.message);
            s.state = "down";
            if refused {
                s.refused += 1;
            } else {
                s.failed += 1;
            }
            s.last_error = Some(err);
            first
        });
        if first {
            log::warn!("node channels: no channel to {peer}: {e}");
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        // Handshakes in progress are bounded: a flood of connections that never finish their
        // handshake is closed at once instead of holding tasks for the handshake timeout.
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            match listener.accept().await {
                Ok((tcp, from)) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        log::debug!("node channels: {MAX_HANDSHAKES} handshakes in progress, closing {from}");
                        continue;
                    };
                    let me = self.clone();
                    tokio::spawn(async move { me.accepted(tcp, from, permit).await });
                }
                Err(e) => {
                    log::warn!("node channels: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn accepted(self: Arc<Self>, tcp: tokio::net::TcpStream, from: SocketAddr, permit: tokio::sync::OwnedSemaphorePermit) {
        let ch = self.setup.accept(tcp).await;
        drop(permit);
        let ch = match ch {
            Ok(ch) => ch,
            Err(e) => {
                if matches!(e, ChannelError::Rejected(_)) {
                    self.refused_unknown.fetch_add(1, Relaxed);
                }
                let msg = e.to_string();
                let mut seen = self.accept_errors.lock().unwrap();
                if seen.len() >= 1024 {
                    // Bounded: many dialling addresses only cost a repeated log line.
                    seen.clear();
                }
                let repeated = seen.insert(from.ip(), msg.clone()).as_ref() == Some(&msg);
                drop(seen);
                if !repeated {
                    log::warn!("node channels: a channel from {from} failed: {msg}");
                }
                return;
            }
        };
        let Some(peer) = node_name_of(&self.td, ch.peer()).map(str::to_string) else {
            self.refused_unknown.fetch_add(1, Relaxed);
            log::warn!("node channels: {from} presented {}, which is no node SVID of {}", ch.peer(), self.td);
            return;
        };
        if !self.nodes_tx.borrow().contains_key(&peer) || peer.as_str() >= self.node.as_str() {
            log::warn!("node channels: refusing a channel from {peer} ({from}): it is no known Node, or this node dials it");
            return;
        }
        self.accept_errors.lock().unwrap().remove(&from.ip());
        // The newest channel of a peer replaces the one before (a renewal, or the peer
        // restarted): a running one is closed once the new one is up.
        let generation = self.next_generation.fetch_add(1, Relaxed);
        let mut tasks = self.tasks.lock().unwrap();
        let mut pending = self.pending_tasks.lock().unwrap();
        // A channel still waiting to take over is superseded by this one (its end, in
        // `SessionEnd`, un-counts it).
        if let Some(p) = pending.remove(&peer) {
            p.abort();
        }
        let old = tasks.get(&peer).filter(|t| !t.is_finished()).cloned();
        let current = self.status(&peer, |s| {
            if old.is_none() {
                s.generation = generation;
            }
            s.generation
        });
        let takes_over = old.is_some();
        let takeover = old.map(|task| Takeover { generation: current, task, up: None, reason: BY_PEER });
        let h = tokio::spawn(self.clone().session(peer.clone(), ch, generation, takeover));
        if takes_over {
            pending.insert(peer, h.abort_handle());
        } else {
            tasks.insert(peer, h.abort_handle());
        }
    }

    /// Runs one channel's proof session until it ends (or a newer channel takes over).
    /// At its first clock round trip the peer has proven on it what it holds (a session
    /// proves before it answers): then a `takeover` becomes the peer's current channel and
    /// closes the old one, and the peer's proofs not proven again count `grace` more.
    async fn session(self: Arc<Self>, peer: String, ch: NodeChannel, generation: u64, mut takeover: Option<Takeover>) {
        let peer = peer.as_str();
        let certs = ch.certs().clone();
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        // A channel taking over keeps its acknowledgement state to itself until it does:
        // the running channel's stays what CNI ADDs wait on.
        let mut pending_acks = Some(Acks { tx: acks_tx, installs: false, installed: BTreeMap::new() });
        let sent = self.status(peer, |s| {
            s.state = "up";
            s.last_error = None;
            match takeover {
                None => {
                    s.channel = Some(certs.clone());
                    pending_acks.take().unwrap().install(s);
                }
                Some(_) => s.pending += 1,
            }
            s.sent.clone()
        });
        let mut end = SessionEnd {
            links: self.clone(),
            peer: peer.to_string(),
            generation,
            pending: takeover.as_ref().map(|t| (t.generation, t.task.clone(), t.reason)),
            untrusted: false,
            how: None,
        };
        if takeover.is_none() {
            log::info!("node channels: channel to {peer} up");
        }
        let verifier = self.verifier();
        let (tx, mut rx) = mpsc::channel(64);
        let fut = run_installs(ch, verifier.clone(), self.clock.clone(), self.local_tx.subscribe(), tx, &sent, Liveness::default(), acks_rx);
        tokio::pin!(fut);
        let mut proven: BTreeMap<String, Proven> = BTreeMap::new();
        let mut round_trip = false;
        let mut watch = PeerWatch::default();
        let mut tick = tokio::time::interval(RENEWAL_TICK);
        let r = loop {
            tokio::select! {
                r = &mut fut => break r,
                Some(ev) = rx.recv() => {
                    let first = !round_trip && matches!(ev, SessionEvent::ClockOffsetMs(_));
                    let ev = match pending_acks.as_mut() {
                        Some(a) => a.absorb(ev),
                        None => Some(ev),
                    };
                    match ev.and_then(|ev| self.on_event(peer, ev)) {
                        Some((id, Some(p))) => {
                            proven.insert(id, p);
                        }
                        // Withdrawn on this channel: not proven again at the takeover.
                        Some((id, None)) => {
                            proven.remove(&id);
                        }
                        None => {}
                    }
                    if first {
                        round_trip = true;
                        self.took_over(peer, generation, &certs, &proven, takeover.take(), pending_acks.take());
                        end.pending = None;
                    }
                }
                _ = tick.tick() => {
                    let now = self.clock.now();
                    let _ = watch.check(&certs, &verifier, self.svids.cache().bundles(), now);
                    if let Some(e) = watch.close_reason(now) {
                        self.status(peer, |s| *s.closed.entry(e.reason()).or_default() += 1);
                        end.untrusted = true;
                        break Err(anyhow::anyhow!("closed by this end: the peer's node SVID {} no longer verifies ({}): {e}", certs.peer.spiffe_id, e.reason()));
                    }
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            // A channel that never took over: its acknowledgements concern no one.
            let ev = match pending_acks.as_mut() {
                Some(a) => a.absorb(ev),
                None => Some(ev),
            };
            if let Some(ev) = ev {
                self.on_event(peer, ev);
            }
        }
        end.how = Some(match r {
            Ok(()) => "closed".to_string(),
            Err(e) => format!("failed ({e:#})"),
        });
    }

    /// A session's first round trip: what the peer proved on it so far is all it holds.
    fn took_over(&self, peer: &str, generation: u64, certs: &ChannelCerts, proven: &BTreeMap<String, Proven>, takeover: Option<Takeover>, acks: Option<Acks>) {
        {
            let mut b = self.book.lock().unwrap();
            // Proofs of this channel at full length again, should the old channel's end have
            // limited them meanwhile; the peer's others count the grace.
            for (id, p) in proven {
                // A later SVID's proof (from the old channel meanwhile) is not shortened.
                let later = b.peers.get(peer).and_then(|m| m.get(id)).is_some_and(|q| q.not_after > p.not_after);
                if !later {
                    b.proven_by(peer, id, p.clone());
                }
            }
            let until = boottime_ns().saturating_add(self.opts.grace.as_nanos() as u64);
            b.limit_peer_except(peer, until, &proven.keys().cloned().collect());
        }
        self.changed.notify_one();
        let Some(t) = takeover else { return };
        if t.reason == BY_PEER {
            // The accepted channel is the peer's current one now.
            let mut tasks = self.tasks.lock().unwrap();
            if let Some(h) = self.pending_tasks.lock().unwrap().remove(peer) {
                tasks.insert(peer.to_string(), h);
            }
        }
        self.status(peer, |s| {
            s.generation = generation;
            s.pending = s.pending.saturating_sub(1);
            s.state = "up";
            s.channel = Some(certs.clone());
            *s.renewals.entry(t.reason).or_default() += 1;
            // This channel's acknowledgements from now on; what the peer installed is
            // acknowledged again on it at the next sync.
            if let Some(a) = acks {
                a.install(s);
            }
        });
        t.task.abort();
        if let Some(up) = t.up {
            let _ = up.send(());
        }
        log::info!(
            "node channels: channel to {peer} renewed ({}): node SVIDs valid until {} (this node) and {} (the peer)",
            t.reason,
            certs.local.as_ref().map_or_else(|| "?".to_string(), |l| crate::svid::clock::unix_secs(l.not_after).to_string()),
            crate::svid::clock::unix_secs(certs.peer.not_after)
        );
    }

    /// Books what the peer sent; a proof (Some) or a withdrawal (None) is returned too.
    fn on_event(&self, peer: &str, ev: SessionEvent) -> Option<(String, Option<Proven>)> {
        match ev {
            SessionEvent::Proven(p) => {
                let expires_ns = expiry_boot_ns(p.not_after, self.clock.now(), boottime_ns());
                log::debug!("node channels: {peer} proved {}", p.spiffe_id);
                let proven = Proven { not_after: p.not_after, expires_ns };
                let id = p.spiffe_id.to_string();
                let changed = {
                    let mut b = self.book.lock().unwrap();
                    // The same SVID at full length (its boot-clock expiry is computed anew
                    // each time: a second of slack) is no change; one limited to a grace is.
                    let changed = b.peers.get(peer).and_then(|m| m.get(&id)).is_none_or(|q| {
                        q.not_after != proven.not_after || q.expires_ns.saturating_add(1_000_000_000) < proven.expires_ns
                    });
                    b.proven_by(peer, &id, proven.clone());
                    changed
                };
                // A proof repeated as it stands changes no map: no reconcile for it, unless
                // the peer waits for its acknowledgement (a new channel).
                let unacked = self.status(peer, |s| {
                    s.received += 1;
                    s.installs && !s.acked.contains_key(&id)
                });
                if changed || unacked {
                    self.changed.notify_one();
                }
                return Some((id, Some(proven)));
            }
            SessionEvent::Withdrawn(id) => {
                self.book.lock().unwrap().withdrawn_by(peer, &id);
                self.status(peer, |s| {
                    s.withdrawals_received += 1;
                    s.acked.remove(&id);
                });
                self.changed.notify_one();
                return Some((id, None));
            }
            SessionEvent::Refused { reason } => {
                let (key, err) = match &reason {
                    crate::channel::proofs::ProofError::Svid(e) => (e.reason().to_string(), PeerError::of("an identity proof", e)),
                    crate::channel::proofs::ProofError::BadSignature => (
                        "bad-signature".to_string(),
                        PeerError { reason: "bad-signature".into(), spiffe_id: String::new(), now: None, bound: None, message: reason.to_string() },
                    ),
                    crate::channel::proofs::ProofError::Malformed(_) => (
                        "malformed".to_string(),
                        PeerError { reason: "malformed".into(), spiffe_id: String::new(), now: None, bound: None, message: reason.to_string() },
                    ),
                };
                // Logged once per peer and reason in a row: a peer repeating a bad proof
                // costs a counter, not a log line each time.
                let repeated = self.status(peer, |s| {
                    *s.rejected.entry(key).or_default() += 1;
                    let repeated = s.last_error.as_ref().is_some_and(|e| e.reason == err.reason);
                    s.last_error = Some(err);
                    repeated
                });
                if !repeated {
                    log::warn!("node channels: refused a proof from {peer}: {reason}");
                }
            }
            SessionEvent::ClockOffsetMs(o) => self.status(peer, |s| s.clock_offset_ms = Some(o)),
            SessionEvent::PeerInstalls => {
                self.status(peer, |s| s.installs = true);
                // Proofs the peer sent before are acknowledged at the next sync.
                self.changed.notify_one();
            }
            SessionEvent::Installed { spiffe_id, not_after_unix_s } => {
                log::debug!("node channels: {peer} installed {spiffe_id}");
                self.status(peer, |s| s.installed.insert(spiffe_id, not_after_unix_s));
                // A CNI ADD may be waiting for it.
                self.changed.notify_one();
            }
            SessionEvent::WithdrawSent(id) => {
                self.status(peer, |s| s.installed.remove(&id));
            }
        }
        None
    }

    /// Keeps an SVID for every local identity and publishes them to the sessions.
    async fn local_loop(self: Arc<Self>, mut ids: watch::Receiver<BTreeMap<SpiffeId, BTreeSet<String>>>) {
        loop {
            let want = ids.borrow_and_update().clone();
            self.svids.track(&want).await;
            let svids: LocalSvids = want.keys().filter_map(|id| self.svids.svid(id).map(|s| (id.clone(), s))).collect();
            self.local_tx.send_if_modified(|cur| {
                let same = cur.len() == svids.len() && cur.iter().zip(&svids).all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
                if !same {
                    *cur = svids;
                }
                !same
            });
            tokio::select! {
                r = ids.changed() => if r.is_err() { return },
                // Renewed SVIDs are picked up within a second.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::svid::builtin::{BuiltinCa, BuiltinConfig};

    #[test]
    fn node_ids_round_trip() {
        let td = TrustDomain::parse("zt.test").unwrap();
        let id = node_id(&td, "node-1.example").unwrap();
        assert_eq!(id.to_string(), "spiffe://zt.test/zt/node/node-1.example");
        assert_eq!(node_name_of(&td, &id), Some("node-1.example"));
        assert_eq!(node_name_of(&TrustDomain::parse("other.test").unwrap(), &id), None, "another trust domain");
        assert_eq!(node_name_of(&td, &SpiffeId::parse("spiffe://zt.test/ns/default/sa/x").unwrap()), None, "a workload");
        assert_eq!(node_name_of(&td, &SpiffeId::parse("spiffe://zt.test/zt/node/a/b").unwrap()), None);
    }

    /// Two agents' links on loopback (127.0.0.1 and 127.0.0.2, one port), one shared CA with
    /// SVIDs so short-lived (8 s, backdated 10 s: at or past their refresh point when issued)
    /// that every node and pod SVID rotates about every second. (At 4 s, one run of the
    /// whole suite closed a channel whose peer SVID no longer verified before its renewal.) n1 dials n2 and renews the channel
    /// on each rotation of its node SVID; n2 proves a pod identity throughout. Sampled every
    /// 5 ms for 8 s, n1's proof of it from n2 is never missing nor expired on the kernel's
    /// clock (the grace is 0: a swap taken for a lost channel would expire it); renewals are counted on both ends, nothing
    /// is closed, the channel stays up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_renewed_on_every_rotation_never_leaves_a_gap_in_proofs() {
        use crate::model::{Node, Pod};
        use crate::state::{EndpointEntry, PodRef};
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("zt-links-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _cleanup = Dir(dir.clone());
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let opts = |ip: &str| LinkOptions {
            listen: SocketAddr::new(ip.parse().unwrap(), port),
            peer_port: port,
            svid: ProviderOptions {
                source: crate::svid::spec::SvidSourceSpec::Builtin,
                ca_dir: Some(dir.clone()),
                svid_ttl: Duration::from_secs(8),
                node_selectors: String::new(),
            },
            // No grace: a swap mistaken for a lost channel would expire the proof at once.
            grace: Duration::ZERO,
        };
        let l1 = Links::start("n1", "zt.test", opts("127.0.0.1")).await.unwrap();
        let l2 = Links::start("n2", "zt.test", opts("127.0.0.2")).await.unwrap();
        let mut cluster = ClusterState::new();
        for (n, ip) in [("n1", "127.0.0.1"), ("n2", "127.0.0.2")] {
            let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": n}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})).unwrap();
            cluster.nodes.insert(n.to_string(), node);
        }
        let pod: Pod = serde_json::from_value(serde_json::json!({"metadata": {"name": "api", "namespace": "shop", "uid": "u-1"}})).unwrap();
        cluster.pods.insert(("shop".into(), "api".into()), pod);
        let api = "spiffe://zt.test/ns/shop/sa/api";
        let mut with_pod = Desired::default();
        with_pod.identities.insert(300, IdentityInfo { id: 300, spiffe_id: api.into(), labels: Default::default() });
        with_pod.endpoints.insert(
            "10.1.0.5".parse().unwrap(),
            EndpointEntry { identity: 300, flags: EP_LOCAL, pod: Some(PodRef { namespace: "shop".into(), name: "api".into() }) },
        );
        l1.update(&cluster, &Desired::default());
        l2.update(&cluster, &with_pod);
        let held = |l: &Links| l.book.lock().unwrap().peers.get("n2").and_then(|m| m.get(api)).map(|p| p.expires_ns);
        let start = Instant::now();
        while held(&l1).is_none() {
            assert!(start.elapsed() < Duration::from_secs(20), "n2's proof never reached n1");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let renewals = |l: &Links, peer: &str| l.peers.lock().unwrap().get(peer).map_or(0, |s| s.renewals.values().sum::<u64>());
        let before = renewals(&l1, "n2");
        let watch = Instant::now();
        let mut samples = 0;
        while watch.elapsed() < Duration::from_secs(8) {
            let now = boottime_ns();
            let e = held(&l1).expect("n1 lost n2's proof of api");
            assert!(e > now, "n2's proof of api expired on n1 ({} ms ago)", (now - e) / 1_000_000);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (r1, r2) = (renewals(&l1, "n2") - before, renewals(&l2, "n1"));
        let st = |l: &Links, p: &str| {
            let g = l.peers.lock().unwrap();
            let s = g.get(p).unwrap();
            (s.state, s.closed.clone(), s.renewals.clone())
        };
        assert!(r1 >= 3, "n1 renewed its channel on its rotations: {:?}", st(&l1, "n2"));
        assert!(r2 >= 3, "n2 counted the swaps: {:?}", st(&l2, "n1"));
        assert_eq!(st(&l1, "n2").0, "up");
        let (s1, s2) = (st(&l1, "n2"), st(&l2, "n1"));
        assert!(s1.1.is_empty() && s2.1.is_empty(), "nothing closed: n1 {s1:?}, n2 {s2:?}");
        assert!(samples > 500, "{samples} samples");
    }

    /// A session's end is booked by its guard also when the task is aborted: a renewal
    /// that never took over is un-counted and, if the old channel died meanwhile, the peer
    /// is down with its proofs limited to the grace; a live old channel keeps the peer up
    /// and its proofs; a channel closed as untrusted gets no grace; a peer that left is not
    /// brought back. A takeover does not shorten a later proof.
    #[tokio::test]
    async fn a_session_end_is_booked_when_its_task_is_aborted() {
        let dir = std::env::temp_dir().join(format!("zt-links-end-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = LinkOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            peer_port: 1,
            svid: ProviderOptions { source: crate::svid::spec::SvidSourceSpec::Builtin, ca_dir: Some(dir.clone()), svid_ttl: Duration::from_secs(3600), node_selectors: String::new() },
            grace: Duration::from_secs(30),
        };
        let l = Links::start("n1", "zt.test", opts).await.unwrap();
        let id = "spiffe://zt.test/ns/shop/sa/api";
        let far = boottime_ns() + 3_600_000_000_000;
        let reset = |pending: u32| {
            l.status("n2", |s| {
                (s.generation, s.state, s.pending, s.installs) = (5, "up", pending, true);
            });
            let p = Proven { not_after: std::time::SystemTime::now() + Duration::from_secs(3600), expires_ns: far };
            l.book.lock().unwrap().proven_by("n2", id, p);
        };
        let end = |generation: u64, pending: Option<(u64, tokio::task::AbortHandle)>, untrusted: bool| SessionEnd {
            links: l.clone(),
            peer: "n2".into(),
            generation,
            pending: pending.map(|(g, t)| (g, t, "test")),
            untrusted,
            how: None,
        };
        let expires = || l.book.lock().unwrap().peers["n2"][id].expires_ns;
        let state = || l.peers.lock().unwrap().get("n2").map(|s| (s.state, s.pending, s.installs));
        let dead = tokio::spawn(async {});
        let dead_handle = dead.abort_handle();
        dead.await.unwrap();
        let alive = tokio::spawn(std::future::pending::<()>());

        // A renewal aborted before its takeover while the old channel still runs.
        reset(1);
        drop(end(6, Some((5, alive.abort_handle())), false));
        assert_eq!(state(), Some(("up", 0, true)), "the old channel stays the peer's");
        assert_eq!(expires(), far, "proofs untouched");

        // The same after the old channel died: the peer is lost, its proofs get the grace.
        reset(1);
        drop(end(6, Some((5, dead_handle.clone())), false));
        assert_eq!(state(), Some(("down", 0, false)), "lost, acknowledgements cleared");
        let e = expires();
        assert!(e < far && e <= boottime_ns() + 30_000_000_000, "limited to the grace");

        // The current session ended while a renewal waits: the renewal decides.
        reset(1);
        drop(end(5, None, false));
        assert_eq!(state(), Some(("up", 1, true)));
        assert_eq!(expires(), far);

        // Closed as untrusted: no grace.
        reset(0);
        drop(end(5, None, true));
        assert_eq!(state().unwrap().0, "down");
        assert!(expires() <= boottime_ns(), "an untrusted peer's proofs end now");

        // A peer that left the cluster is not brought back by a late end.
        l.peers.lock().unwrap().remove("n2");
        drop(end(5, None, false));
        assert_eq!(state(), None);

        // A takeover re-proves what its channel carried, but never shortens a later proof.
        reset(0);
        let older = Proven { not_after: std::time::SystemTime::now() + Duration::from_secs(60), expires_ns: far - 1 };
        let proven = BTreeMap::from([(id.to_string(), older)]);
        let certs = ChannelCerts {
            dialled: true,
            local_leaf: None,
            local: None,
            peer_chain: vec![],
            peer: crate::svid::x509::LeafFacts { spiffe_id: node_id(&l.td, "n2").unwrap(), not_before: std::time::SystemTime::now(), not_after: std::time::SystemTime::now() },
        };
        l.took_over("n2", 5, &certs, &proven, None, None);
        assert_eq!(expires(), far, "the later proof is kept");
        alive.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two agents that open one `--svid-ca-dir` trust each other: the second loads the
    /// root the first created (same root, SVIDs that verify against either's bundle); an
    /// agent with another directory has another root, and its node SVID is refused
    /// (its chain does not verify).
    #[tokio::test]
    async fn a_shared_ca_dir_gives_one_root_and_another_dir_another() {
        let dir = std::env::temp_dir().join(format!("zt-links-ca-{}", std::process::id()));
        let other = dir.join("other");
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::parse("zt.test").unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let open = |d: &std::path::Path| BuiltinCa::open_shared(BuiltinConfig::new(td.clone()), clock.clone(), d).unwrap();
        let (a, b, c) = (open(&dir), open(&dir), open(&other));
        assert_eq!(a.roots(), b.roots(), "the second agent loads the first one's root");
        assert_ne!(a.roots(), c.roots());
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("ca.pem")).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "the CA key is readable by its owner only");
        let mut bundles = crate::svid::source::TrustBundles::default();
        bundles.set(td.clone(), a.roots()).unwrap();
        let v = SvidVerifier::new(crate::svid::source::StaticBundles::new(bundles), clock.clone(), PeerPolicy::TrustDomains(BTreeSet::from([td.clone()])));
        let n2 = node_id(&td, "node2").unwrap();
        let from_b = b.issue(&n2).unwrap();
        assert_eq!(v.verify(from_b.leaf(), &[], crate::channel::verifier::Usage::Client).unwrap(), n2, "b's SVID verifies against a's root");
        let from_c = c.issue(&n2).unwrap();
        let e = v.verify(from_c.leaf(), &[], crate::channel::verifier::Usage::Client).unwrap_err();
        // Both roots carry one subject name: webpki finds c's issuer by name, and its
        // signature does not verify with a's key.
        assert!(matches!(e.reason(), "bad-signature" | "unknown-issuer"), "{e}");
        std::fs::write(other.join("ca.pem"), "garbage").unwrap();
        let e = BuiltinCa::open_shared(BuiltinConfig::new(td.clone()), clock.clone(), &other).err().unwrap().to_string();
        assert!(e.contains("ca.pem"), "a bad file is named: {e}");
        let e = BuiltinCa::open_shared(BuiltinConfig::new(TrustDomain::parse("else.test").unwrap()), clock.clone(), &dir).err().unwrap().to_string();
        assert!(e.contains("trust domain else.test"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
