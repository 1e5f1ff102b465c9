//! L7: HTTP method and path rules (issue 11). The kernel steers the flows of ports with
//! HTTP rules to this node's proxy (zt-ebpf/src/l7.rs, `bpf_sk_assign`); the proxy judges
//! each request on its normalised path and either forwards it transparently (from the
//! client's own address, marked so that the server's hook knows it) or answers 403.
//! - `normalise.rs`: request paths as judged
//! - `rules.rs`: the rule table the compiler builds
//! - `listener.rs`: listeners, their registration with the kernel, policy routing
//! - `proxy.rs`: one task per connection (sniffing, hyper, judgement, upstream)
//! - `events.rs`: counters and events
pub mod events;
pub mod listener;
pub mod normalise;
pub mod proxy;
pub mod rules;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context as _, Result};
use tokio::sync::broadcast;

use crate::events::EventRecord;
use crate::state::{Desired, IdentityInfo, PodRef, RuleInfo};

/// `--http-proxy-*` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Listener port on 127.0.0.1 and ::1 (never reachable by address from a pod).
    pub port: u16,
    /// `SO_MARK` of the proxy's sockets; the server's hook knows the proxy by it.
    pub proxy_mark: u32,
    /// Set by the kernel on steered packets, routed to `table`.
    pub steer_mark: u32,
    /// Routing table with `local default dev lo` for steered packets.
    pub table: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { port: 15001, proxy_mark: 0x0a70_0000, steer_mark: 0x0a71_0000, table: 2007 }
    }
}

/// What the proxy judges by: the last applied state.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub endpoints: HashMap<IpAddr, u32>,
    pub table: rules::HttpTable,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub pods: HashMap<IpAddr, PodRef>,
    pub rules: BTreeMap<u32, RuleInfo>,
}

impl Snapshot {
    pub fn from_desired(d: &Desired) -> Snapshot {
        Snapshot {
            endpoints: d.endpoints.iter().map(|(ip, e)| (*ip, e.identity)).collect(),
            table: d.http.clone(),
            identities: d.identities.clone(),
            pods: d.endpoints.iter().filter_map(|(ip, e)| e.pod.clone().map(|p| (*ip, p))).collect(),
            rules: d.rules.clone(),
        }
    }

    /// The identity of an address as the datapath knows it (endpoint map only: a steered
    /// connection's client is a pod, of this node or, steered at the uplink, of another;
    /// an address no endpoint has is refused).
    pub fn identity(&self, ip: IpAddr) -> Option<u32> {
        self.endpoints.get(&ip.to_canonical()).copied()
    }

    pub fn identity_name(&self, id: u32) -> String {
        match self.identities.get(&id) {
            Some(i) => i.spiffe_id.clone(),
            None => format!("identity {id}"),
        }
    }

    pub fn pod(&self, ip: IpAddr) -> Option<String> {
        self.pods.get(&ip.to_canonical()).map(|p| format!("{}/{}", p.namespace, p.name))
    }

    pub fn rule_name(&self, id: u32) -> String {
        match self.rules.get(&id) {
            Some(r) => format!("{} {}", r.source, r.path),
            None => format!("rule {id}"),
        }
    }
}

pub struct Context {
    pub opts: Options,
    snapshot: RwLock<Arc<Snapshot>>,
    pub events: broadcast::Sender<EventRecord>,
}

impl Context {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap().clone()
    }
}

/// The running proxy, as the agent's loop holds it.
#[derive(Clone)]
pub struct Handle {
    ctx: Arc<Context>,
}

impl Handle {
    /// After each apply: the proxy judges by what the maps now hold.
    pub fn update(&self, d: &Desired) {
        *self.ctx.snapshot.write().unwrap() = Arc::new(Snapshot::from_desired(d));
    }
}

/// Binds the listeners, routes the steer mark locally, registers the listeners and marks
/// with the kernel, and serves. Until this succeeds (or while the agent is down) steered
/// flows drop: the kernel finds no listener.
pub fn start(bpffs_root: &Path, opts: &Options, events: broadcast::Sender<EventRecord>) -> Result<Handle> {
    listener::route_steered(opts).context("policy routing for the HTTP proxy")?;
    let v4 = listener::bind(opts.port, opts.proxy_mark, false)?;
    let v6 = match listener::bind(opts.port, opts.proxy_mark, true) {
        Ok(l) => Some(l),
        Err(e) => {
            log::warn!("HTTP proxy: no IPv6 listener ({e:#}): IPv6 flows to ports with HTTP rules drop");
            None
        }
    };
    listener::register(bpffs_root, opts, &v4, v6.as_ref())?;
    let ctx = Arc::new(Context { opts: opts.clone(), snapshot: RwLock::new(Arc::new(Snapshot::default())), events });
    for l in std::iter::once(v4).chain(v6) {
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(proxy::serve(l, ctx.clone()));
    }
    log::info!("HTTP proxy listening on port {} (proxy mark {:#x}, steer mark {:#x} -> table {})", opts.port, opts.proxy_mark, opts.steer_mark, opts.table);
    Ok(Handle { ctx })
}
