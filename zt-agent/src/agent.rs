//! The agent's reconcile loop: policy source -> cluster state -> compile -> diff into
//! the pinned maps -> attach to local pod interfaces. A bad input keeps the last good
//! state enforced; a restart starts from what the maps already hold. The directory
//! source is polled here; the Kubernetes source's watchers send events over a channel
//! that the loop drains in batches (`apply_source`).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc};
use zt_common::*;

// Requests of the CNI plugin (a child module: it handles them on the agent's state).
#[path = "cni.rs"]
pub mod cni;

use crate::{
    compile::{incremental::Compiler, CompileConfig, EnforcementMode, FqdnSlots, HostAccess},
    events::{EventRecord, Snapshot},
    identity::{IdentityAllocator, LabelFilter},
    loader::{ensure_fqdn_config, Datapath, FqdnSettings, MapSizes},
    metrics::{self, Shared},
    model::ClusterState,
    net,
    pins::{capacity, PinnedMaps},
    source::{PolicySource, SourceEvent, WatchCache},
    state::{Desired, Failure},
    sync::{apply, clear_learned, fit, withdraws, Capacities, Contents},
};

/// FQDN policy settings of the node (flags `--fqdn-*`).
#[derive(Clone, Debug, Default)]
pub struct FqdnOptions {
    pub settings: FqdnSettings,
    /// Trusted resolvers by SPIFFE ID pattern.
    pub dns_servers: Vec<crate::model::ztp::SpiffePattern>,
    /// Resolver addresses that are no pod (identity `dns`).
    pub dns_addresses: Vec<IpAddr>,
    /// The cluster's resolver Service (`--fqdn-dns-service`, namespace and name): the
    /// pods behind it are trusted resolvers and `entity: dns`.
    pub dns_service: Option<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node_name: String,
    pub source: PolicySource,
    pub bpffs_root: PathBuf,
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub metrics_addr: String,
    /// `--metrics-identity-pairs`: series cap of the per identity pair counters (0 = off).
    pub metrics_identity_pairs: usize,
    pub trust_domain: String,
    pub enforcement_mode: EnforcementMode,
    /// `--host-access`: `All` sets CONFIG_ALLOW_HOST; `Probes` compiles probe ports.
    pub host_access: HostAccess,
    pub events_allowed: bool,
    pub events_per_sec: u32,
    pub events_burst: u32,
    pub sizes: MapSizes,
    /// Which cluster-sized maps a flag gave the size of (first_sizes.rs).
    pub sizes_explicit: crate::first_sizes::Explicit,
    /// Conntrack timeouts and GC period (`--ct-*`).
    pub ct: crate::conntrack_gc::CtSettings,
    pub frag_timeout_s: u32,
    pub poll_interval: Duration,
    /// Root of the pods' cgroup hierarchy for the cgroup programs; None: no cgroup programs.
    pub cgroup_root: Option<PathBuf>,
    pub fqdn: FqdnOptions,
    /// ZT_TUNNELS keys (`tunnels::parse`).
    pub tunnels: Vec<u32>,
    /// Translate Service frontends at the pods' sockets (`--service-translation`).
    pub service_translation: bool,
    /// The cluster's Service address ranges (`--service-cidr`).
    pub service_cidrs: Vec<crate::state::Cidr>,
    /// Node addresses that carry NodePorts (`--nodeport-addresses`; empty: all).
    pub nodeport_addresses: Vec<crate::state::Cidr>,
    /// Which pod sockets on a removed backend are destroyed (`--service-destroy-stale-sockets`).
    pub service_destroy: crate::services::destroy::Scope,
    /// Pod label keys left out of identities (`--identity-exclude-labels`).
    pub identity_labels: LabelFilter,
    /// The flow and risk map and its page (`--graph-*`, `--ui-*`).
    pub graph: GraphOptions,
    /// The HTTP proxy (`--http-proxy-*`); None: not started (HTTP-rule flows drop).
    pub http_proxy: Option<crate::l7::Options>,
    /// Node-to-node channels (`--auth-*`); None: no peer's pods are ever proven.
    pub auth_links: Option<crate::auth::links::LinkOptions>,
    /// How long a CNI ADD waits for the peers to install the pod's proof
    /// (`--auth-cni-wait-ms`; zero: not at all).
    pub auth_cni_wait: Duration,
    /// Where traffic from other nodes is steered to the proxy (`--uplink-interfaces`).
    pub uplinks: crate::uplink::Selection,
}

/// The flow and risk map (graph/) and its page (ui/).
#[derive(Clone, Debug)]
pub struct GraphOptions {
    pub limits: crate::graph::observed::Limits,
    pub max_permitted: usize,
    /// How often conntrack is scanned for allowed flows.
    pub ct_interval: Duration,
    /// The page's address and token; None: no page.
    pub ui: Option<crate::ui::UiOptions>,
}

impl Default for GraphOptions {
    fn default() -> Self {
        GraphOptions {
            limits: Default::default(),
            max_permitted: crate::graph::DEFAULT_MAX_PERMITTED,
            ct_interval: Duration::from_secs(5),
            ui: None,
        }
    }
}

struct Agent {
    opts: AgentOptions,
    datapath: Datapath,
    maps: PinnedMaps,
    have: Contents,
    caps: Capacities,
    ids: IdentityAllocator,
    /// FQDN slots (persisted beside the identities).
    slots: FqdnSlots,
    /// Compiles again only the namespaces a pod change can reach (compile/incremental.rs).
    compiler: Compiler,
    /// Key of the FQDN name hashes (ZT_FQDN_CONFIG).
    fqdn_hash_key: [u64; 2],
    /// The last compile's warnings (written to last-error once).
    warnings: Vec<String>,
    /// What the last compile failed closed, and what did not fit the maps (reported
    /// when they change).
    failures: Vec<Failure>,
    map_failures: Vec<Failure>,
    /// ZT_FQDN_LEARNED was checked against the slots since the start.
    learned_checked: bool,
    cluster: Option<ClusterState>,
    /// The Kubernetes source's objects (None with the directory source).
    watch: Option<WatchCache>,
    /// `cluster` was replaced by the Kubernetes source since the last compile.
    source_changed: bool,
    desired: Option<Desired>,
    manifests_fingerprint: Option<Vec<(PathBuf, u64, SystemTime)>>,
    host_ips: Vec<IpAddr>,
    ifindex: BTreeMap<IpAddr, u32>,
    ifnames: BTreeMap<IpAddr, String>,
    last_resolve: Option<Instant>,
    last_apply_error: Option<String>,
    last_uplink_error: Option<String>,
    /// The uplinks this process hooked (None: not yet, pins of an earlier agent pending).
    uplinks: Option<BTreeSet<(u32, String)>>,
    /// The desired state or interfaces changed since the last successful apply.
    dirty: bool,
    /// Something was withdrawn and the epoch is not bumped yet.
    pending_bump: bool,
    /// What ZT_CONFIG holds (read once at start).
    config: Config,
    shared_warned: BTreeSet<u32>,
    /// Local pods' cgroups by UID, and what the endpoints name (IP -> cgroup scope).
    pod_cgroups: crate::pod_cgroup::PodCgroups,
    cgroup_of: BTreeMap<IpAddr, u32>,
    metrics: Shared,
    snapshot: std::sync::Arc<std::sync::RwLock<Snapshot>>,
    /// Pod interfaces the CNI plugin asked to enforce.
    cni: cni::Attachments,
    /// The Service table of the last good compile.
    pub(crate) services: crate::services::ServiceTable,
    /// The Service frontend and backend maps.
    svc_maps: crate::services::maps::ServiceMaps,
    /// Each Service's identity (the untranslated judgement).
    svc_ids: crate::services::identities::ServiceIdentities,
    /// The Service table changed since it was last written to the maps.
    svc_dirty: bool,
    /// The last Service map write failed with this (logged once).
    last_svc_error: Option<String>,
    /// An older map layout's links are still pinned (upgrade.rs).
    upgrade_pending: bool,
    /// ... and its cgroup links are among them: ours are attached after the first apply.
    cgroup_deferred: bool,
    /// ZT_SVC_REVNAT, to find the sockets translated to a removed backend.
    svc_revnat: crate::services::destroy::RevNatMap,
    /// The maps moved aside by a resize: conntrack and the rest are copied again just
    /// before the links are taken over.
    resize_from: Option<std::path::PathBuf>,
    /// The flow and risk map: fed the compiled policy at each compile.
    graph: crate::graph::SharedGraph,
    /// The HTTP proxy, once started (l7/).
    l7: Option<crate::l7::Handle>,
    /// The node channels, once started (auth/links.rs).
    links: Option<std::sync::Arc<crate::auth::links::Links>>,
    /// ADDs answered once the peers installed the pod's proof (cni.rs `answer_waiting_adds`).
    waiting_adds: Vec<cni::WaitingAdd>,
}

/// Before the first full state: the node's addresses as `host` endpoints, where nothing
/// holds them yet (a fresh node). The first apply takes them over as they are.
fn seed_host_endpoints(maps: &mut PinnedMaps) -> Result<()> {
    for ip in net::host_addresses()? {
        let key = EndpointKey { addr: net::to_key(ip) };
        if maps.endpoints.get(&key, 0).is_err() {
            let v = EndpointValue { identity: IDENTITY_HOST, flags: 0, ifindex: 0, cgroup: 0 };
            maps.endpoints.insert(key, v, 0).with_context(|| format!("writing host address {ip} to ZT_ENDPOINTS"))?;
        }
    }
    Ok(())
}

pub async fn run(mut opts: AgentOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.state_dir).with_context(|| format!("creating {}", opts.state_dir.display()))?;
    let _ = std::fs::remove_file(opts.state_dir.join("ready"));
    if let Some(root) = &opts.cgroup_root {
        crate::cgroup_link::open_cgroup2_dir(root)?;
    }
    // Kubernetes source events; the sender stays here with the directory source. Started
    // first: a node's first start sizes its maps from the first list.
    let (source_tx, mut source_rx) = mpsc::channel::<SourceEvent>(8192);
    let mut watch = match &opts.source {
        PolicySource::Kube(config) => {
            crate::source::kube::spawn((**config).clone(), source_tx.clone())?;
            Some(WatchCache::new().with_trust_domain(&opts.trust_domain))
        }
        PolicySource::Dir(_) => None,
    };
    // Map sizes no flag gives: the pinned maps', or at a node's first start what the
    // cluster's first list needs (first_sizes.rs). Meanwhile the programs are in place at
    // the default sizes and judge every pod not-ready; a larger size then goes through
    // the resize path below, as a changed flag would.
    let mut first_list_rejected = Vec::new();
    let mut first_dp = None;
    if first_start(&opts) && !opts.sizes_explicit.all() {
        let mut dp = Datapath::load(&opts.bpffs_root, &opts.sizes)?;
        if opts.cgroup_root.is_some() {
            seed_host_endpoints(&mut PinnedMaps::open(&opts.bpffs_root)?)?;
            dp.ensure_cgroup(opts.cgroup_root.as_deref(), opts.service_translation).context("cgroup programs")?;
        }
        first_list_rejected = size_from_first_list(&mut opts, watch.as_mut(), &mut source_rx).await;
        // Loading is the slow part of a start (the verifier): kept unless the sizes changed.
        if crate::resize::differences(&opts.bpffs_root, &opts.sizes).is_empty() {
            first_dp = Some(dp);
        }
    } else {
        pinned_sizes(&mut opts);
    }
    // A size flag that differs from the pinned maps: fresh maps, the old links taken over
    // in place as in a layout upgrade (resize.rs).
    let (mut datapath, resize_from) = match first_dp {
        Some(dp) => (dp, None),
        None => {
            let from = crate::resize::stage(&opts.bpffs_root, &opts.sizes)?;
            (Datapath::load(&opts.bpffs_root, &opts.sizes)?, from)
        }
    };
    let mut maps = PinnedMaps::open(&opts.bpffs_root)?;
    if let Some(from) = &resize_from {
        let copied = crate::resize::carry_over(from, &opts.bpffs_root, true).context("map resize: carrying state over")?;
        log::info!("map resize: carried over {copied:?}");
    }
    // The cgroup programs are in place from the first start, before any full state: a
    // pod that starts now is judged (not-ready, fail closed) instead of running
    // unenforced. The node's own addresses go in first, so that host-network pods (this
    // agent among them, talking to the API) pass them as `host`.
    if opts.cgroup_root.is_some() {
        seed_host_endpoints(&mut maps)?;
    }
    // An older layout's cgroup links keep enforcing until this agent's first full state
    // is in its maps, then are taken over in place (upgrade.rs).
    let upgrade_pending = !crate::upgrade::older_layouts(&opts.bpffs_root).is_empty();
    let cgroup_deferred = opts.cgroup_root.is_some() && crate::upgrade::older_link_exists(&opts.bpffs_root, "cgroup-");
    if !cgroup_deferred {
        datapath.ensure_cgroup(opts.cgroup_root.as_deref(), opts.service_translation).context("cgroup programs")?;
    }
    // Written whatever --service-translation says: the FQDN step also reads them.
    let svc_maps = crate::services::maps::ServiceMaps::open(&opts.bpffs_root).context("Service maps")?;
    crate::services::maps::sync_service_cidrs(&opts.bpffs_root, &opts.service_cidrs)?;
    let svc_revnat = crate::services::destroy::open_revnat(&opts.bpffs_root).context("Service maps")?;
    let have = Contents::read(&maps).context("reading the pinned maps")?;
    let config = maps.read_config().context("reading ZT_CONFIG")?;
    log::info!("datapath loaded; pinned maps hold {} endpoints, {} cidrs, {} policy entries", have.endpoints.len(), have.cidrs.len(), have.policy.len());
    let caps = Capacities {
        endpoints: capacity(&opts.bpffs_root, MAP_ENDPOINTS)?,
        cidrs: capacity(&opts.bpffs_root, MAP_CIDRS)?,
        policy: capacity(&opts.bpffs_root, MAP_POLICY)?,
        fqdn_names: capacity(&opts.bpffs_root, MAP_FQDN_NAMES)?,
        fqdn_ports: capacity(&opts.bpffs_root, MAP_FQDN_PORTS)?,
        dns_servers: capacity(&opts.bpffs_root, MAP_DNS_SERVERS)?,
    };
    let fqdn_config = ensure_fqdn_config(&mut maps.fqdn_config, &opts.fqdn.settings)?;
    crate::tunnels::sync(&mut maps.tunnels, &opts.tunnels)?;
    // After a resize every size matches its flag; what still differs was kept because an
    // unfinished resize held `<layout>-resized/` (resize::stage logged why).
    for (name, pinned, flag) in crate::resize::differences(&opts.bpffs_root, &opts.sizes) {
        log::warn!("{name} is pinned with {pinned} entries but the flag asks for {flag}: keeping {pinned}");
    }
    let ids = IdentityAllocator::load(opts.state_dir.join("identities.json")).context("loading identities")?;
    let slots = FqdnSlots::load(opts.state_dir.join("fqdn-slots.json")).map_err(anyhow::Error::msg).context("loading FQDN slots")?;
    let metrics: Shared = Default::default();
    {
        let mut m = metrics.lock().unwrap();
        m.frags_capacity = capacity(&opts.bpffs_root, MAP_FRAGS)?;
        m.pairs = crate::pair_metrics::PairCounts::new(opts.metrics_identity_pairs);
    }
    let snapshot: std::sync::Arc<std::sync::RwLock<Snapshot>> = Default::default();
    let (events_tx, _) = broadcast::channel::<EventRecord>(4096);

    let ring = datapath.take_events()?;
    // The map subscribes before the first event is forwarded.
    let graph = crate::graph::Graph::new(&opts.node_name, opts.graph.limits, opts.graph.max_permitted).shared();
    tokio::spawn(crate::graph::collect::events(graph.clone(), events_tx.subscribe()));
    tokio::spawn(forward_events(ring, events_tx.clone(), snapshot.clone(), metrics.clone()));
    crate::graph::collect::spawn_ct_scanner(&opts.bpffs_root, opts.graph.ct_interval, graph.clone(), metrics.clone()).context("the map's conntrack scanner")?;
    if let Some(ui) = opts.graph.ui.clone() {
        tokio::spawn(log_err("map page", crate::ui::serve(ui, graph.clone())));
    }
    tokio::spawn(log_err("metrics", metrics::serve(opts.metrics_addr.clone(), metrics.clone(), opts.bpffs_root.clone())));
    // FQDN rules: name the addresses the kernel learns from DNS answers (cache, GC).
    // Conntrack: expired entries deleted, entries counted for the metrics (off the scrape).
    crate::conntrack_gc::spawn(&opts.bpffs_root, opts.ct.gc_interval, metrics.clone())?;
    let fqdn = match crate::fqdn::Runtime::start(&opts.bpffs_root, &opts.state_dir, opts.ct.tcp_established_s, metrics.clone()) {
        Ok(rt) => Some(rt),
        Err(e) => {
            log::warn!("fqdn runtime not started: {e:#}");
            None
        }
    };
    let cni_attachments = cni::Attachments::load(opts.state_dir.join("cni-attachments.json"))?;
    let (cni_tx, mut cni_rx) = tokio::sync::mpsc::channel::<cni::CniCall>(256);
    // HTTP rules: the proxy judges by the last applied state (empty until the first apply:
    // every request on a port with HTTP rules is denied until then).
    let l7 = match &opts.http_proxy {
        Some(o) => match crate::l7::start(&opts.bpffs_root, o, events_tx.clone()) {
            Ok(h) => Some(h),
            Err(e) => {
                log::error!("HTTP proxy not started ({e:#}): flows to ports with HTTP rules drop (http-proxy-down)");
                None
            }
        },
        None => None,
    };
    let links = match &opts.auth_links {
        Some(o) => match crate::auth::links::Links::start(&opts.node_name, &opts.trust_domain, o.clone()).await {
            Ok(l) => {
                tokio::spawn(crate::auth::status::report(l.clone(), opts.state_dir.clone(), metrics.clone()));
                Some(l)
            }
            Err(e) => {
                log::error!("node channels not started ({e:#}): no pod of another node is proven");
                None
            }
        },
        None => None,
    };
    tokio::spawn(log_err("admin socket", crate::admin::serve(opts.admin_socket.clone(), events_tx.clone(), metrics.clone(), cni_tx, graph.clone())));

    metrics.lock().unwrap().source_up = true;

    let mut agent = Agent {
        opts,
        datapath,
        maps,
        have,
        caps,
        ids,
        slots,
        compiler: Compiler::new(),
        fqdn_hash_key: fqdn_config.hash_key,
        warnings: Vec::new(),
        failures: Vec::new(),
        map_failures: Vec::new(),
        learned_checked: false,
        cluster: None,
        watch,
        source_changed: false,
        desired: None,
        manifests_fingerprint: None,
        host_ips: vec![],
        ifindex: BTreeMap::new(),
        ifnames: BTreeMap::new(),
        last_resolve: None,
        last_apply_error: None,
        last_uplink_error: None,
        uplinks: None,
        dirty: true,
        pending_bump: false,
        config,
        shared_warned: BTreeSet::new(),
        pod_cgroups: Default::default(),
        cgroup_of: BTreeMap::new(),
        metrics,
        snapshot,
        cni: cni_attachments,
        services: Default::default(),
        svc_ids: crate::services::identities::ServiceIdentities::from_held(svc_maps.held_identities()),
        svc_maps,
        svc_dirty: true,
        upgrade_pending,
        cgroup_deferred,
        resize_from,
        last_svc_error: None,
        svc_revnat,
        graph,
        l7,
        links,
        waiting_adds: Vec::new(),
    };
    // The first list, if size_from_first_list read it, is the first batch.
    if agent.watch.as_ref().is_some_and(|w| w.synced()) || !first_list_rejected.is_empty() {
        agent.source_batch(crate::source::cache::Batch { events: 0, changed: true, rejected: first_list_rejected });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        if let Err(e) = agent.reconcile() {
            log::error!("reconcile: {e:#}");
        }
        agent.answer_waiting_adds();
        agent.metrics.lock().unwrap().heartbeat = Some(Instant::now());
        let links = agent.links.clone();
        let add_deadline = agent.waiting_adds.iter().map(|w| w.deadline).min();
        tokio::select! {
            _ = async { match &links { Some(l) => l.changed().await, None => std::future::pending().await } } => {}
            _ = async { match add_deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => {}
            _ = tokio::time::sleep(agent.opts.poll_interval) => {}
            Some(ev) = source_rx.recv() => agent.apply_source(ev, &mut source_rx),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            Some(call) = cni_rx.recv() => agent.handle_cni(call),
        }
    }
    // Links and maps stay pinned: enforcement continues while the agent is away.
    log::info!("stopping; the datapath keeps enforcing the last state");
    if let Some(rt) = &fqdn {
        rt.save();
    }
    let _ = std::fs::remove_file(agent.opts.state_dir.join("ready"));
    drop(source_tx);
    Ok(())
}

/// How long a node's first start waits for the first full list to size its maps (the
/// wait ends at the source's first error).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(20);

/// No pins of any layout: this node's first start.
fn first_start(opts: &AgentOptions) -> bool {
    let root = &opts.bpffs_root;
    !crate::pins::map_dir(root).exists() && !crate::resize::resized_dir(root).exists() && crate::upgrade::older_layouts(root).is_empty()
}

/// A cluster-sized map no flag gives the size of keeps its pinned size.
fn pinned_sizes(opts: &mut AgentOptions) {
    let (ex, root, s) = (opts.sizes_explicit, &opts.bpffs_root, &mut opts.sizes);
    for (given, size, name) in [
        (ex.endpoints, &mut s.endpoints, MAP_ENDPOINTS),
        (ex.cidrs, &mut s.cidrs, MAP_CIDRS),
        (ex.policy, &mut s.policy, MAP_POLICY),
        (ex.fqdn_names, &mut s.fqdn_names, MAP_FQDN_NAMES),
        (ex.fqdn_ports, &mut s.fqdn_ports, MAP_FQDN_PORTS),
    ] {
        if let (false, Ok(pinned)) = (given, capacity(root, name)) {
            *size = pinned;
        }
    }
}

/// At a node's first start: the sizes the first full list of the cluster needs, for the
/// maps no flag sizes. Returns the messages of objects the first list rejected (reported
/// once the agent runs).
async fn size_from_first_list(opts: &mut AgentOptions, watch: Option<&mut WatchCache>, rx: &mut mpsc::Receiver<SourceEvent>) -> Vec<String> {
    let ex = opts.sizes_explicit;
    let mut rejected = Vec::new();
    let cluster = match (&opts.source, watch) {
        (PolicySource::Dir(dir), _) => ClusterState::load_dir(dir).ok().map(|l| l.state),
        (PolicySource::Kube(_), Some(watch)) => {
            let deadline = tokio::time::sleep(FIRST_LIST_WAIT);
            tokio::pin!(deadline);
            while !watch.synced() {
                tokio::select! {
                    Some(ev) = rx.recv() => rejected.extend(watch.apply_pending(ev, rx).rejected),
                    _ = &mut deadline => break,
                }
                // A source that failed once (API unreachable, a list refused) is not waited for.
                if !watch.up() || watch.errors.values().any(|n| *n > 0) {
                    break;
                }
            }
            watch.synced().then(|| watch.state().clone())
        }
        _ => None,
    };
    let Some(cluster) = cluster else {
        log::warn!("first start: no full list of the cluster within {FIRST_LIST_WAIT:?}: maps keep their flag or default sizes");
        return rejected;
    };
    let cfg = CompileConfig {
        node_name: opts.node_name.clone(),
        trust_domain: opts.trust_domain.clone(),
        enforcement_mode: opts.enforcement_mode,
        host_access: opts.host_access,
        dns_servers: opts.fqdn.dns_servers.clone(),
        dns_addresses: opts.fqdn.dns_addresses.clone(),
        identity_labels: opts.identity_labels.clone(),
        ..Default::default()
    };
    match crate::compile::compile(&cluster, &cfg, &mut IdentityAllocator::new()) {
        Ok(d) => {
            let need = crate::first_sizes::needed(&d);
            let s = crate::first_sizes::choose(&opts.sizes, ex, need);
            log::info!(
                "first start: the cluster needs {need:?} (endpoints, cidrs, policy, fqdn names, fqdn ports); map sizes {} {} {} {} {}",
                s.endpoints, s.cidrs, s.policy, s.fqdn_names, s.fqdn_ports
            );
            opts.sizes = s;
        }
        Err(e) => log::warn!("first start: the first list does not compile ({e}): maps keep their flag or default sizes"),
    }
    rejected
}

async fn log_err(what: &'static str, f: impl std::future::Future<Output = Result<()>>) {
    if let Err(e) = f.await {
        log::error!("{what}: {e:#}");
    }
}

async fn forward_events(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    tx: broadcast::Sender<EventRecord>,
    snapshot: std::sync::Arc<std::sync::RwLock<Snapshot>>,
    metrics: Shared,
) {
    // The ring buffer owns its fd and lives inside the AsyncFd: the registration
    // cannot outlive the descriptor.
    #[allow(deprecated)]
    let fd = AsyncFd::new(ring);
    let mut fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            log::error!("events ring: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                log::error!("events ring: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
            let rec = snapshot.read().unwrap().record(&ev);
            log::debug!("{rec}");
            let mut m = metrics.lock().unwrap();
            m.events_forwarded_total += 1;
            m.pairs.count(&rec);
            drop(m);
            let _ = tx.send(rec);
        }
        guard.clear_ready();
    }
}

/// Names, sizes and mtimes of the manifest files: a cheap change detector.
fn fingerprint(dir: &Path) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
    let mut v = vec![];
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let md = entry.metadata()?;
        v.push((entry.path(), md.len(), md.modified()?));
    }
    v.sort();
    Ok(v)
}

impl Agent {
    /// Applies the Kubernetes source's pending events in one batch; the next reconcile
    /// compiles once if the state changed and every kind has been listed.
    fn apply_source(&mut self, first: SourceEvent, rx: &mut mpsc::Receiver<SourceEvent>) {
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        let batch = watch.apply_pending(first, rx);
        self.source_batch(batch);
    }

    /// What a batch of source events changed: the cluster to compile, metrics, rejections.
    fn source_batch(&mut self, batch: crate::source::cache::Batch) {
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        let was_synced = self.metrics.lock().unwrap().source_synced;
        if watch.synced() && (batch.changed || !was_synced) {
            if !was_synced {
                let s = watch.state();
                log::info!(
                    "initial list complete: {} namespaces, {} pods, {} nodes, {} service accounts, {} network policies, {} zero-trust policies",
                    s.namespaces.len(),
                    s.pods.len(),
                    s.nodes.len(),
                    s.service_accounts.len(),
                    s.network_policies.len(),
                    s.zero_trust_policies.len()
                );
            }
            self.cluster = Some(watch.state().clone());
            self.source_changed = true;
        }
        let mut m = self.metrics.lock().unwrap();
        m.source_synced = watch.synced();
        m.source_up = watch.up();
        m.source_events = watch.events.clone();
        m.source_relists = watch.relists.clone();
        m.source_errors = watch.errors.clone();
        // Every kind from the start at 0, so rate()/increase() see the first relist or error.
        for k in crate::model::ObjectKind::ALL {
            m.source_relists.entry(k).or_insert(0);
            m.source_errors.entry(k).or_insert(0);
        }
        m.policy_last_load_ok = watch.rejected().is_empty();
        drop(m);
        for msg in batch.rejected {
            self.reject(&msg);
        }
    }

    fn reconcile(&mut self) -> Result<()> {
        let mut changed = std::mem::take(&mut self.source_changed);
        if let PolicySource::Dir(dir) = &self.opts.source {
            let dir = dir.clone();
            let fp = fingerprint(&dir)?;
            if self.manifests_fingerprint.as_ref() != Some(&fp) {
                self.manifests_fingerprint = Some(fp);
                match ClusterState::load_dir(&dir) {
                    Ok(loaded) => {
                        for o in &loaded.ignored {
                            log::warn!("{}: ignoring {} {} (not a kind zt reads)", o.location, o.api_version, o.kind);
                        }
                        self.cluster = Some(loaded.state);
                        let mut m = self.metrics.lock().unwrap();
                        m.policy_last_load_ok = true;
                        m.source_synced = true;
                        changed = true;
                    }
                    Err(e) => self.reject(&format!("{e}")),
                }
            }
        }
        let host_ips = net::host_addresses()?;
        if host_ips != self.host_ips {
            self.host_ips = host_ips;
            changed = true;
        }
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        if changed {
            let nodeport_ips = crate::services::nodeport_ips(&self.host_ips, &self.opts.nodeport_addresses);
            let (services, svc_warnings) = crate::services::build(cluster, &self.opts.node_name, &nodeport_ips);
            let cfg = CompileConfig {
                node_name: self.opts.node_name.clone(),
                trust_domain: self.opts.trust_domain.clone(),
                enforcement_mode: self.opts.enforcement_mode,
                host_ips: self.host_ips.clone(),
                fqdn_hash_key: self.fqdn_hash_key,
                dns_servers: self.opts.fqdn.dns_servers.clone(),
                dns_addresses: self.opts.fqdn.dns_addresses.clone(),
                host_access: self.opts.host_access,
                dns_backends: crate::services::backend_addresses(&services, self.opts.fqdn.dns_service.as_ref()),
                identity_labels: self.opts.identity_labels.clone(),
            };
            let t = Instant::now();
            // The compiler keeps its own result to patch next time; services are added to a copy.
            let compiled = self.compiler.compile(cluster, &cfg, &mut self.ids, &mut self.slots).map(|_| self.compiler.desired().cloned().expect("compiled"));
            match compiled {
                Ok(mut d) => {
                    if services != self.services {
                        self.services = services;
                        self.svc_dirty = true;
                    }
                    // A frontend reached untranslated is judged against all its backends.
                    self.svc_ids.assign(&self.services);
                    crate::services::judge::add_to(&mut d, &self.services, &self.svc_ids);
                    d.warnings.extend(svc_warnings);
                    let namespaces = crate::graph::posture::namespace_default_deny(cluster, self.opts.enforcement_mode);
                    self.graph.lock().unwrap().set_view(crate::graph::permitted::PolicyView::from_desired(&d, namespaces), crate::graph::now_s());
                    let mut m = self.metrics.lock().unwrap();
                    m.compile_seconds_sum += t.elapsed().as_secs_f64();
                    m.compile_count += 1;
                    drop(m);
                    self.ids.save(self.opts.state_dir.join("identities.json"))?;
                    self.slots.save(self.opts.state_dir.join("fqdn-slots.json")).map_err(anyhow::Error::msg)?;
                    if d.failures != self.failures || d.warnings != self.warnings {
                        self.failures = d.failures.clone();
                        self.report_failures(&d.warnings);
                    }
                    if d.warnings != self.warnings {
                        for w in &d.warnings {
                            log::warn!("policy: {w}");
                        }
                        let path = self.opts.state_dir.join("last-error");
                        if !self.failures.is_empty() || !self.map_failures.is_empty() {
                            // report_failures wrote it, warnings included.
                        } else if !d.warnings.is_empty() {
                            let text: String = d.warnings.iter().map(|w| format!("warning: {w}\n")).collect();
                            let _ = std::fs::write(&path, text);
                        } else if std::fs::read_to_string(&path).is_ok_and(|t| t.starts_with("warning: ")) {
                            // Only our own warnings go; a rejection stays until replaced.
                            let _ = std::fs::remove_file(&path);
                        }
                        self.warnings = d.warnings.clone();
                    }
                    self.desired = Some(d);
                    self.last_resolve = None;
                    self.dirty = true;
                }
                Err(e) => self.reject(&format!("{e}")),
            }
        }
        let Some(desired) = self.desired.take() else {
            return Ok(());
        };
        let r = self.enforce(&desired);
        self.sync_peer_proofs(&desired);
        self.desired = Some(desired);
        r
    }

    /// The peers' proofs into ZT_AUTH_PROOFS; a removed or shortened one re-judges tracked
    /// flows (new epoch), as a policy change does.
    fn sync_peer_proofs(&mut self, desired: &Desired) {
        let Some(links) = self.links.clone() else { return };
        if let Some(cluster) = &self.cluster {
            links.update(cluster, desired);
        }
        match links.sync_proofs(&mut self.maps.auth_proofs, &desired.identities) {
            Ok(s) if s.withdrew && self.config.flags & CONFIG_READY != 0 => {
                self.pending_bump = true;
                match self.write_config() {
                    Ok(()) => self.metrics.lock().unwrap().policy_epoch = self.config.policy_epoch,
                    Err(e) => log::error!("bumping the policy epoch after a peer's proof went: {e:#}"),
                }
            }
            Ok(s) => self.pending_bump |= s.withdrew,
            Err(e) => log::error!("writing the peers' proofs: {e:#}"),
        }
    }

    /// Makes the datapath enforce `desired`: map diff, config, attachments.
    fn enforce(&mut self, desired: &Desired) -> Result<()> {
        if self.resolve_interfaces(desired)? {
            self.dirty = true;
        }
        if self.resolve_cgroups(desired) {
            self.dirty = true;
        }
        let t = Instant::now();
        let mut stats = crate::sync::ApplyStats::default();
        if self.cni.prune_gone()? {
            self.dirty = true;
        }
        // An endpoint's interface is written only once both its hooks are attached: the
        // cgroup programs leave a local endpoint with an interface to its TC hook, so
        // there must be no moment where that hook is missing. A new pod goes in with
        // interface 0 (judged by the cgroup programs), its hook is attached, then a second
        // round writes its interface.
        for _round in 0..2 {
            if self.dirty {
                let mut want = Contents::from_desired(desired, &self.ifindex);
                want.set_cgroups(&self.cgroup_of);
                self.cni.overlay(&mut want, Some(desired));
                self.only_hooked(&mut want);
                // Identities a full map cannot hold fail closed; the rest goes in.
                let overflow = fit(&self.have, &mut want, &self.caps);
                self.set_map_failures(overflow);
                // Remembered until the epoch is written, even if this apply fails halfway.
                self.pending_bump |= withdraws(&self.have, &want);
                match apply(&mut self.maps, &mut self.have, &want, &self.caps) {
                    Ok(s) => {
                        self.last_apply_error = None;
                        stats.written += s.written;
                        stats.removed += s.removed;
                    }
                    Err(e) => {
                        // Once per distinct failure: the loop retries every poll.
                        let msg = format!("{e:#}");
                        if self.last_apply_error.as_deref() != Some(&msg) {
                            self.metrics.lock().unwrap().map_errors_total += 1;
                            log::error!("applying the policy to the maps failed (what was written before the error stays; tracked flows are re-judged against it): {msg}");
                            self.last_apply_error = Some(msg);
                        }
                        // The maps may hold a mix of old and new entries: every tracked
                        // flow is judged again against them (new epoch). Before the first
                        // full state the datapath stays not-ready instead.
                        if self.config.flags & CONFIG_READY != 0 {
                            self.pending_bump = true;
                            self.write_config()?;
                            self.metrics.lock().unwrap().policy_epoch = self.config.policy_epoch;
                        }
                        return Ok(());
                    }
                };
                self.dirty = false;
                // This node's pods are proven by the agent itself (issue 10).
                let own = crate::auth::self_proofs(&want.endpoints);
                match crate::auth::sync_node(&mut self.maps.auth_proofs, AUTH_NODE_SELF, &own) {
                    Ok(s) => {
                        self.pending_bump |= s.withdrew;
                        self.metrics.lock().unwrap().auth_proofs_self = own.len();
                    }
                    Err(e) => log::error!("writing this node's proofs: {e:#}"),
                }
                self.clear_freed_slots()?;
                self.release_quarantined()?;
            }
            self.write_config()?;
            if let Some(from) = self.resize_from.take() {
                match crate::resize::carry_over(&from, &self.opts.bpffs_root, false) {
                    Ok(copied) => log::info!("map resize: carried over again before the takeover {copied:?}"),
                    Err(e) => log::warn!("map resize: second copy failed (flows opened since the first are judged again as new): {e:#}"),
                }
            }
            if self.cgroup_deferred {
                self.datapath.ensure_cgroup(self.opts.cgroup_root.as_deref(), self.opts.service_translation).context("cgroup programs")?;
                self.cgroup_deferred = false;
            }
            let hooked_before = self.datapath.hooked_ifindexes();
            let mut keep = BTreeSet::new();
            for (ip, idx) in &self.ifindex {
                if let Some(name) = self.ifnames.get(ip) {
                    self.datapath.ensure_attached(*idx, name)?;
                    keep.insert((*idx, name.clone()));
                }
            }
            self.attach_cni()?;
            let newly_hooked = !self.datapath.hooked_ifindexes().is_subset(&hooked_before);
            self.datapath.detach_gone(&keep)?;
            if !newly_hooked {
                break;
            }
            self.dirty = true;
        }
        if stats.written + stats.removed > 0 {
            log::info!("applied {} writes, {} removals (epoch {})", stats.written, stats.removed, self.config.policy_epoch);
        }
        if self.upgrade_pending {
            self.finish_upgrade()?;
        }
        self.sync_uplinks(desired);
        // After the policy: a new backend is translated to only once its endpoint and
        // policy entries are in place.
        self.sync_services();
        let apply_time = t.elapsed();
        self.publish(desired, &stats, apply_time)?;
        Ok(())
    }

    /// The uplink hook (uplink.rs) on the interfaces other nodes' pods are reached through.
    /// A failure is logged, not fatal: remote clients of HTTP-rule ports are then refused.
    fn sync_uplinks(&mut self, desired: &Desired) {
        let remote = desired.endpoints.iter().filter(|(_, e)| e.flags & EP_LOCAL == 0 && e.pod.is_some()).map(|(ip, _)| *ip);
        let local: BTreeSet<u32> = self.ifindex.values().copied().collect();
        let r = crate::uplink::resolve(&self.opts.uplinks, remote, &local).and_then(|want| {
            if self.uplinks.as_ref() != Some(&want) {
                crate::uplink::ensure(&mut self.datapath.ebpf, &self.opts.bpffs_root, &want)?;
                self.uplinks = Some(want);
            }
            Ok(())
        });
        if let Err(e) = r {
            let msg = format!("{e:#}");
            if self.last_uplink_error.as_deref() != Some(&msg) {
                log::error!("uplink hook: {msg} (clients on other nodes of ports with HTTP rules are refused)");
                self.last_uplink_error = Some(msg);
            }
        } else {
            self.last_uplink_error = None;
        }
    }

    /// Once this agent's state is in its maps and its hooks attached: takes over the older
    /// layout's remaining TC links (interfaces this agent does not hook yet keep a hook:
    /// fail closed) and removes the older layouts.
    fn finish_upgrade(&mut self) -> Result<()> {
        for (idx, name) in crate::upgrade::older_tc_links(&self.opts.bpffs_root) {
            if net::ifindex(&name).is_ok_and(|i| i == idx) {
                self.datapath.ensure_attached(idx, &name)?;
            }
        }
        if !self.cgroup_deferred {
            crate::upgrade::drop_older_cgroup_links(&self.opts.bpffs_root)?;
        }
        let removed = crate::upgrade::retire(&self.opts.bpffs_root)?;
        self.upgrade_pending = !crate::upgrade::older_layouts(&self.opts.bpffs_root).is_empty();
        if !removed.is_empty() {
            log::info!("layout upgrade done: {} older layout(s) removed", removed.len());
        }
        Ok(())
    }

    /// Writes a changed Service table to the translation maps. A failure (a full map)
    /// leaves the frontends not yet written as they were; retried on the next loop.
    fn sync_services(&mut self) {
        if !self.svc_dirty {
            return;
        }
        let sm = &mut self.svc_maps;
        match sm.sync(&crate::services::maps::want_of(&self.services, &self.svc_ids)) {
            Ok(st) => {
                self.svc_dirty = false;
                self.last_svc_error = None;
                if st.frontends_written + st.frontends_removed > 0 {
                    log::info!("services: {} frontends written ({} backends), {} removed", st.frontends_written, st.backends_written, st.frontends_removed);
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if self.last_svc_error.as_deref() != Some(&msg) {
                    self.metrics.lock().unwrap().map_errors_total += 1;
                    log::error!("writing the Service maps failed: {msg}");
                    self.last_svc_error = Some(msg);
                }
            }
        }
        let (f, b) = sm.counts();
        {
            let mut m = self.metrics.lock().unwrap();
            (m.svc_frontends, m.svc_backends) = (f, b);
        }
        self.destroy_stale_sockets();
    }

    /// Pod sockets still on a backend the maps no longer hold (`services::destroy`).
    fn destroy_stale_sockets(&mut self) {
        let removed = self.svc_maps.take_removed();
        // A backend left a frontend: flows judged untranslated against the old set (a
        // pod's own Service as `self`, every backend allowed) are judged again.
        if !removed.is_empty() {
            self.pending_bump = true;
            if let Err(e) = self.write_config() {
                log::error!("bumping the policy epoch after a backend left a Service: {e:#}");
            }
        }
        let Some(root) = self.opts.cgroup_root.as_deref().filter(|_| self.opts.service_translation && !removed.is_empty()) else { return };
        let out = crate::services::destroy::destroy_stale(&removed, self.opts.service_destroy, root, &self.svc_revnat);
        for e in &out.errors {
            log::warn!("services: destroying the sockets of removed backends: {e}");
        }
        let mut m = self.metrics.lock().unwrap();
        for (proto, n) in out.destroyed {
            *m.svc_sockets_destroyed.entry(proto).or_default() += n;
        }
        m.svc_socket_destroy_errors += out.errors.len() as u64;
    }

    /// Once the maps hold the new FQDN rules: clears the bits of freed slots (and of
    /// identities without FQDN rules) from ZT_FQDN_LEARNED, then lets the slots be
    /// reused. Also runs once after a start, for what an earlier agent left.
    fn clear_freed_slots(&mut self) -> Result<()> {
        if self.slots.pending().is_empty() && self.learned_checked {
            return Ok(());
        }
        let freed = self.slots.pending().clone();
        let c = clear_learned(&mut self.maps, &self.slots.active_masks())?;
        self.learned_checked = true;
        if !freed.is_empty() || c.rewritten + c.deleted > 0 {
            // Tracked flows allowed through a cleared slot are re-judged.
            self.pending_bump = true;
            log::info!("FQDN slots freed {freed:?}: {} learned entries rewritten, {} deleted", c.rewritten, c.deleted);
        }
        if !freed.is_empty() {
            self.slots.release_cleared();
            self.slots.save(self.opts.state_dir.join("fqdn-slots.json")).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// Released identity numbers go back to the free pool once no entry of the maps
    /// names them (until then a new identity could inherit a stale entry).
    fn release_quarantined(&mut self) -> Result<()> {
        if self.ids.quarantined().is_empty() {
            return Ok(());
        }
        let named = self.have.named_identities();
        let freed = self.ids.release_unnamed(|n| named.contains(&n));
        if !freed.is_empty() {
            log::debug!("identity numbers {freed:?} no longer named by any map entry: free for reuse");
            self.ids.save(self.opts.state_dir.join("identities.json"))?;
        }
        Ok(())
    }

    /// What `fit` left out, as failures; logged and reported when it changes.
    fn set_map_failures(&mut self, overflow: Vec<crate::sync::Overflow>) {
        let failures: Vec<Failure> = overflow
            .into_iter()
            .map(|o| Failure {
                object: format!("map {}", o.map),
                error: format!(
                    "map {} full: the policy needs {} entries, capacity is {}; identities {:?} left out and isolated (raise the map size flag)",
                    o.map, o.needed, o.capacity, o.identities
                ),
                identities: o.identities,
            })
            .collect();
        if failures != self.map_failures {
            self.map_failures = failures;
            let warnings = self.warnings.clone();
            self.report_failures(&warnings);
        }
    }

    /// Logs every failure, writes them (and `warnings`) to last-error, and counts them.
    fn report_failures(&mut self, warnings: &[String]) {
        let all: Vec<&Failure> = self.failures.iter().chain(&self.map_failures).collect();
        for f in &all {
            log::error!("failed closed for identities {:?}: {}", f.identities, f.error);
        }
        let path = self.opts.state_dir.join("last-error");
        if !all.is_empty() {
            let mut text: String = all.iter().map(|f| format!("error: {} (identities {:?} fail closed)\n", f.error, f.identities)).collect();
            text.extend(warnings.iter().map(|w| format!("warning: {w}\n")));
            let _ = std::fs::write(&path, text);
        } else if std::fs::read_to_string(&path).is_ok_and(|t| t.starts_with("error: ")) {
            // Ours are gone; a rejection (no prefix) stays until replaced.
            let text: String = warnings.iter().map(|w| format!("warning: {w}\n")).collect();
            let _ = if text.is_empty() { std::fs::remove_file(&path) } else { std::fs::write(&path, text) };
        }
        let mut m = self.metrics.lock().unwrap();
        m.policy_failures = all.iter().map(|f| (f.object.clone(), f.identities.len())).collect();
    }

    /// An endpoint names its interface only once that interface carries both hooks;
    /// until then it has 0 and the cgroup programs judge the pod's own traffic.
    fn only_hooked(&self, want: &mut Contents) {
        let hooked = self.datapath.hooked_ifindexes();
        for v in want.endpoints.values_mut() {
            if v.ifindex != 0 && !hooked.contains(&v.ifindex) {
                v.ifindex = 0;
            }
        }
    }

    /// Writes ZT_CONFIG when it changes; the epoch lives here after the first read so that
    /// a failed read can never move it backwards.
    fn write_config(&mut self) -> Result<()> {
        let before = self.config;
        let mut cfg = before;
        cfg.flags = CONFIG_READY | if self.opts.host_access == HostAccess::All { CONFIG_ALLOW_HOST } else { 0 } | if self.opts.events_allowed { CONFIG_EVENTS_ALLOWED } else { 0 };
        // A changed flag (host probes turned off) withdraws allows too.
        if before.flags & CONFIG_READY != 0 && before.flags != cfg.flags {
            self.pending_bump = true;
        }
        if self.pending_bump {
            cfg.policy_epoch = cfg.policy_epoch.wrapping_add(1);
        }
        self.opts.ct.write_into(&mut cfg);
        cfg.events_per_sec = self.opts.events_per_sec;
        cfg.events_burst = self.opts.events_burst;
        cfg.frag_timeout_s = self.opts.frag_timeout_s;
        if cfg != before {
            self.maps.config.set(0, cfg, 0).context("writing ZT_CONFIG")?;
            self.config = cfg;
        }
        self.pending_bump = false;
        Ok(())
    }

    fn reject(&mut self, err: &str) {
        log::error!("policy input rejected, the last good state stays enforced: {err}");
        let mut m = self.metrics.lock().unwrap();
        m.policy_errors_total += 1;
        m.policy_last_load_ok = false;
        drop(m);
        let _ = std::fs::write(self.opts.state_dir.join("last-error"), format!("{err}\n"));
    }

    /// Host interface of every local pod, by route. Re-resolved when the desired state
    /// changes, for pods still without an interface or whose interface is gone, and every
    /// 10 s. A host interface
    /// that more than one pod resolves to (a bridge, the uplink) is not a pod's own and is
    /// never hooked. Returns whether the result changed.
    fn resolve_interfaces(&mut self, desired: &Desired) -> Result<bool> {
        let stale = self.last_resolve.is_none_or(|t| t.elapsed() > Duration::from_secs(10));
        let mut ifindex = BTreeMap::new();
        let mut ifnames = BTreeMap::new();
        for (ip, ep) in &desired.endpoints {
            if ep.flags & EP_LOCAL == 0 {
                continue;
            }
            if !stale {
                // Cached, unless the interface went away (a recreated pod sandbox, an
                // address reused by a new pod): an endpoint must never keep pointing the
                // cgroup programs at a hook that no longer exists.
                if let (Some(i), Some(n)) = (self.ifindex.get(ip), self.ifnames.get(ip)) {
                    if net::ifindex(n).is_ok_and(|now| now == *i) {
                        ifindex.insert(*ip, *i);
                        ifnames.insert(*ip, n.clone());
                        continue;
                    }
                }
            }
            if let Some(name) = net::route_interface(*ip)? {
                if let Ok(idx) = net::ifindex(&name) {
                    ifindex.insert(*ip, idx);
                    ifnames.insert(*ip, name);
                }
            }
        }
        if stale {
            self.last_resolve = Some(Instant::now());
        }
        let mut pods_per_if: BTreeMap<u32, BTreeSet<&crate::state::PodRef>> = BTreeMap::new();
        for (ip, idx) in &ifindex {
            if let Some(pod) = desired.endpoints.get(ip).and_then(|e| e.pod.as_ref()) {
                pods_per_if.entry(*idx).or_default().insert(pod);
            }
        }
        for (idx, pods) in pods_per_if.iter().filter(|(_, p)| p.len() > 1) {
            let name = ifindex.iter().find(|(_, i)| *i == idx).and_then(|(ip, _)| ifnames.get(ip)).cloned().unwrap_or_default();
            if self.shared_warned.insert(*idx) {
                log::error!(
                    "interface {name} carries {} pods: not a pod's own interface, not hooking it (only the cgroup programs enforce these pods)",
                    pods.len()
                );
            }
            ifindex.retain(|_, i| i != idx);
        }
        ifnames.retain(|ip, _| ifindex.contains_key(ip));
        let changed = ifindex != self.ifindex;
        self.ifindex = ifindex;
        self.ifnames = ifnames;
        Ok(changed)
    }

    /// The pod cgroup of every local endpoint (by the pod's UID under --cgroup-root);
    /// true if that changed.
    fn resolve_cgroups(&mut self, desired: &Desired) -> bool {
        let (Some(root), Some(cluster)) = (&self.opts.cgroup_root, &self.cluster) else { return false };
        let mut cgroup_of = BTreeMap::new();
        let mut live = BTreeSet::new();
        for (ip, ep) in &desired.endpoints {
            let Some(pod) = ep.pod.as_ref().filter(|_| ep.flags & EP_LOCAL != 0) else { continue };
            let Some(uid) = cluster.pods.get(&(pod.namespace.clone(), pod.name.clone())).and_then(|p| p.metadata.uid.clone()) else { continue };
            let scope = self.pod_cgroups.get(root, &uid);
            live.insert(uid);
            if scope != 0 {
                cgroup_of.insert(*ip, scope);
            }
        }
        self.pod_cgroups.retain(|u| live.contains(u));
        let changed = cgroup_of != self.cgroup_of;
        self.cgroup_of = cgroup_of;
        changed
    }

    fn publish(&mut self, desired: &Desired, stats: &crate::sync::ApplyStats, apply_time: Duration) -> Result<()> {
        let epoch = self.config.policy_epoch;
        if let Some(l7) = &self.l7 {
            l7.update(desired);
        }
        let snap = Snapshot {
            node_name: self.opts.node_name.clone(),
            identities: desired.identities.clone(),
            pods: desired.endpoints.iter().filter_map(|(ip, e)| e.pod.clone().map(|p| (*ip, p))).collect(),
            rules: desired.rules.clone(),
            fqdn_slots: desired.fqdn_slots.clone(),
            services: self.services.clone(),
            failures: self.failures.iter().chain(&self.map_failures).cloned().collect(),
        };
        let changed = {
            let cur = self.snapshot.read().unwrap();
            cur.identities != snap.identities || cur.pods != snap.pods || cur.rules != snap.rules || cur.fqdn_slots != snap.fqdn_slots || cur.services != snap.services || cur.failures != snap.failures
        };
        if changed {
            let path = self.opts.state_dir.join("state.json");
            let tmp = path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&snap)?)?;
            std::fs::rename(&tmp, &path)?;
            *self.snapshot.write().unwrap() = snap;
        }
        let local = desired.endpoints.values().filter(|e| e.flags & EP_LOCAL != 0 && e.pod.is_some()).count();
        let mut m = self.metrics.lock().unwrap();
        if stats.written + stats.removed > 0 || !m.ready {
            m.apply_seconds_sum += apply_time.as_secs_f64();
            m.apply_count += 1;
        }
        m.applied_entries_total += (stats.written + stats.removed) as u64;
        m.identities = desired.identities.len();
        m.endpoints_local = local;
        m.endpoints_remote = desired.endpoints.values().filter(|e| e.pod.is_some()).count() - local;
        m.maps = vec![
            (MAP_ENDPOINTS, self.have.endpoints.len(), self.caps.endpoints),
            (MAP_CIDRS, self.have.cidrs.len(), self.caps.cidrs),
            (MAP_POLICY, self.have.policy.len(), self.caps.policy),
            (MAP_FQDN_NAMES, self.have.fqdn_names.len(), self.caps.fqdn_names),
            (MAP_FQDN_PORTS, self.have.fqdn_ports.len(), self.caps.fqdn_ports),
        ];
        m.policy_epoch = epoch;
        if !m.ready {
            m.ready = true;
            std::fs::write(self.opts.state_dir.join("ready"), b"ready\n")?;
            log::info!("ready: {} identities, {} local endpoints", m.identities, local);
        }
        Ok(())
    }
}
