//! Prometheus text exposition on `/metrics`. Verdict counters are read from the pinned
//! per-CPU map at scrape time; everything else is kept by the agent's loop.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use zt_common::*;

use crate::{events::direction_name, fqdn::FqdnMaps, model::ObjectKind, pins::PinnedMaps};

#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    pub ready: bool,
    pub identities: usize,
    pub endpoints_local: usize,
    pub endpoints_remote: usize,
    /// (name, entries, capacity) per user-space-managed map.
    pub maps: Vec<(&'static str, usize, u32)>,
    /// Capacity of the fragment map (the kernel fills it; entries counted at scrape time).
    pub frags_capacity: u32,
    /// The conntrack GC's last pass (entries by map and state, deletions): a scrape reads
    /// these instead of walking the conntrack maps.
    pub ct: Option<crate::conntrack_gc::CtCounts>,
    pub compile_seconds_sum: f64,
    pub compile_count: u64,
    pub apply_seconds_sum: f64,
    pub apply_count: u64,
    pub applied_entries_total: u64,
    pub policy_errors_total: u64,
    /// Objects that failed closed (`Kind ns/name`, or `map ZT_...` for what did not fit)
    /// and how many local identities each isolates.
    pub policy_failures: Vec<(String, usize)>,
    pub policy_last_load_ok: bool,
    pub map_errors_total: u64,
    pub policy_epoch: u32,
    /// Entries of ZT_AUTH_PROOFS this node's agent wrote for its own pods (issue 10).
    pub auth_proofs_self: usize,
    /// The node channels (auth/links.rs); None when `--auth-listen off`.
    pub auth: Option<crate::auth::status::AuthCounts>,
    pub events_forwarded_total: u64,
    /// The policy source reaches its input (always true for the directory source).
    pub source_up: bool,
    /// The policy source delivered a complete state at least once.
    pub source_synced: bool,
    /// Kubernetes source: events by (kind, type), relists and watch errors by kind.
    pub source_events: BTreeMap<(ObjectKind, &'static str), u64>,
    pub source_relists: BTreeMap<ObjectKind, u64>,
    pub source_errors: BTreeMap<ObjectKind, u64>,
    /// Last turn of the agent's loop (liveness).
    pub heartbeat: Option<Instant>,
    /// CNI plugin requests by (command, outcome).
    pub cni_requests: BTreeMap<(String, String), u64>,
    /// ADDs that waited for the peers to install the pod's proof: how many, for how long
    /// in all, and how many gave up at `--auth-cni-wait-ms`.
    pub auth_cni_waits: u64,
    pub auth_cni_wait_seconds_sum: f64,
    pub auth_cni_wait_timeouts: u64,
    /// FQDN runtime: DNS events read from the ring, those that did not decode, names in
    /// the cache, learned entries removed by GC.
    pub fqdn_events_read: u64,
    pub fqdn_events_undecodable: u64,
    pub fqdn_cache_names: usize,
    pub fqdn_gc_removed: u64,
    /// Learned entries past expiry that the last GC pass kept for live flows.
    pub fqdn_gc_kept_for_flows: u64,
    /// `ZT_FQDN_LEARNED` entries at the last GC pass (counted there, not per scrape).
    pub fqdn_learned_entries: usize,
    /// Service frontends and backends in the translation maps.
    pub svc_frontends: usize,
    pub svc_backends: usize,
    /// Pod sockets destroyed because their backend left the Service, by protocol (6, 17).
    pub svc_sockets_destroyed: BTreeMap<u8, u64>,
    /// Failures while destroying them (a namespace not entered, a refused destroy).
    pub svc_socket_destroy_errors: u64,
    /// The flow map's fill and what its cap kept out (graph/metrics.rs).
    pub graph: Option<crate::graph::metrics::GraphCounts>,
    /// Opt-in per identity pair event counters (`--metrics-identity-pairs`).
    pub pairs: crate::pair_metrics::PairCounts,
}

impl AgentMetrics {
    /// Ready for traffic: the datapath holds a full state, the source is synced and up, and
    /// the SVID source (when the node channels run) answers.
    pub fn serving(&self) -> bool {
        self.ready && self.source_synced && self.source_up && self.svid_source_down().is_none()
    }

    /// Why the SVID source is down (SPIRE's streams), if the node channels run and it is.
    /// Enforcement goes on with the SVIDs and proofs held; readiness says so.
    pub fn svid_source_down(&self) -> Option<&str> {
        self.auth.as_ref()?.source.down_reason.as_deref()
    }

    /// Alive: the loop turned recently (it turns at least every poll interval).
    pub fn alive(&self) -> bool {
        self.heartbeat.is_none_or(|t| t.elapsed() < LIVENESS_WINDOW)
    }
}

/// A loop that has not turned for this long is stuck.
const LIVENESS_WINDOW: Duration = Duration::from_secs(60);

pub type Shared = Arc<Mutex<AgentMetrics>>;

/// A series' HELP and TYPE lines.
pub(crate) fn line(out: &mut String, help: &str, kind: &str, name: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

pub fn render(m: &AgentMetrics, maps: Option<&PinnedMaps>) -> String {
    render_with(m, maps, None)
}

/// [`render`] plus the FQDN maps (DNS capture counters, learned entries) when they exist.
pub fn render_with(m: &AgentMetrics, maps: Option<&PinnedMaps>, fqdn: Option<&FqdnMaps>) -> String {
    let mut o = String::new();
    line(&mut o, "Packets judged by the datapath, by direction, verdict and reason.", "counter", "zt_verdicts_total");
    if let Some(c) = maps.and_then(|m| m.counters().ok()) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for r in Reason::ALL {
                let v = c[counter_index(dir, r as u8) as usize];
                let verdict = if r.is_drop() { "drop" } else { "allow" };
                let _ = writeln!(o, "zt_verdicts_total{{direction=\"{}\",verdict=\"{verdict}\",reason=\"{}\"}} {v}", direction_name(dir), r.name());
            }
        }
    }
    line(&mut o, "Datapath events by outcome (sent to the agent, rate-limited, ring buffer full).", "counter", "zt_datapath_events_total");
    if let Some(s) = maps.and_then(|m| m.event_stats().ok()) {
        for (i, name) in [(EVSTAT_SENT, "sent"), (EVSTAT_RATE_LIMITED, "rate_limited"), (EVSTAT_RING_FULL, "ring_full")] {
            let _ = writeln!(o, "zt_datapath_events_total{{outcome=\"{name}\"}} {}", s[i as usize]);
        }
    }
    let mut all = m.maps.clone();
    // Counted by the periodic GC passes: a scrape walks no map.
    if let Some(c) = &m.ct {
        all.push((MAP_CT, c.new_entries, c.new_capacity));
        all.push((MAP_CT_EST, c.est_entries, c.est_capacity));
        all.push((MAP_FRAGS, c.frags_entries, m.frags_capacity));
    }
    if let Some(f) = fqdn {
        all.push((MAP_FQDN_LEARNED, m.fqdn_learned_entries, f.learned_capacity));
    }
    line(&mut o, "Entries in each map.", "gauge", "zt_map_entries");
    for (name, n, _) in &all {
        let _ = writeln!(o, "zt_map_entries{{map=\"{name}\"}} {n}");
    }
    line(&mut o, "Capacity (max_entries) of each map.", "gauge", "zt_map_capacity");
    for (name, _, cap) in &all {
        let _ = writeln!(o, "zt_map_capacity{{map=\"{name}\"}} {cap}");
    }
    line(&mut o, "Time spent compiling policy into map entries.", "summary", "zt_policy_compile_seconds");
    let _ = writeln!(o, "zt_policy_compile_seconds_sum {}\nzt_policy_compile_seconds_count {}", m.compile_seconds_sum, m.compile_count);
    line(&mut o, "Time spent applying map diffs.", "summary", "zt_policy_apply_seconds");
    let _ = writeln!(o, "zt_policy_apply_seconds_sum {}\nzt_policy_apply_seconds_count {}", m.apply_seconds_sum, m.apply_count);
    line(&mut o, "Map entries written or removed by the agent.", "counter", "zt_map_updates_total");
    let _ = writeln!(o, "zt_map_updates_total {}", m.applied_entries_total);
    line(&mut o, "Policy inputs rejected (the last good state stays enforced).", "counter", "zt_policy_errors_total");
    let _ = writeln!(o, "zt_policy_errors_total {}", m.policy_errors_total);
    line(&mut o, "Objects that failed to compile or did not fit a map, by object: the local identities they fail closed (isolated, no allows).", "gauge", "zt_policy_failed_identities");
    for (object, n) in &m.policy_failures {
        // `Kind ns/name` or `map NAME`; names are Kubernetes names (no quotes to escape).
        let (kind, rest) = object.split_once(' ').unwrap_or(("", object));
        let (ns, name) = rest.split_once('/').unwrap_or(("", rest));
        let _ = writeln!(o, "zt_policy_failed_identities{{kind=\"{kind}\",namespace=\"{ns}\",name=\"{name}\"}} {n}");
    }
    line(&mut o, "1 if the last policy load succeeded.", "gauge", "zt_policy_last_load_ok");
    let _ = writeln!(o, "zt_policy_last_load_ok {}", m.policy_last_load_ok as u8);
    line(&mut o, "Failed map applies (an endpoint, CIDR or DNS server map full, or a write the kernel refused); what was written stays and the epoch is bumped.", "counter", "zt_map_errors_total");
    let _ = writeln!(o, "zt_map_errors_total {}", m.map_errors_total);
    line(&mut o, "Numeric security identities known.", "gauge", "zt_identities");
    let _ = writeln!(o, "zt_identities {}", m.identities);
    line(&mut o, "Endpoints (pod IPs) known, by scope.", "gauge", "zt_endpoints");
    let _ = writeln!(o, "zt_endpoints{{scope=\"local\"}} {}\nzt_endpoints{{scope=\"remote\"}} {}", m.endpoints_local, m.endpoints_remote);
    line(&mut o, "Policy epoch (bumped when an allow is withdrawn; tracked flows re-verify).", "gauge", "zt_policy_epoch");
    let _ = writeln!(o, "zt_policy_epoch {}", m.policy_epoch);
    line(&mut o, "Identity proofs in the datapath (ZT_AUTH_PROOFS), by who proved them.", "gauge", "zt_auth_proofs");
    let _ = writeln!(o, "zt_auth_proofs{{by=\"self\"}} {}", m.auth_proofs_self);
    if let Some(a) = &m.auth {
        let _ = writeln!(o, "zt_auth_proofs{{by=\"peers\"}} {}", a.proofs_by_peers);
        crate::auth::status::render(&mut o, a);
    }
    line(&mut o, "Datapath events the agent forwarded to admin-socket subscribers.", "counter", "zt_agent_events_forwarded_total");
    let _ = writeln!(o, "zt_agent_events_forwarded_total {}", m.events_forwarded_total);
    line(&mut o, "Requests of the zt-cni plugin, by command and outcome.", "counter", "zt_cni_requests_total");
    for ((cmd, outcome), n) in &m.cni_requests {
        let _ = writeln!(o, "zt_cni_requests_total{{command=\"{cmd}\",outcome=\"{outcome}\"}} {n}");
    }
    line(&mut o, "Time CNI ADDs waited for the peers to install the new pod's identity proof (--auth-cni-wait-ms).", "summary", "zt_auth_cni_wait_seconds");
    let _ = writeln!(o, "zt_auth_cni_wait_seconds_sum {}\nzt_auth_cni_wait_seconds_count {}", m.auth_cni_wait_seconds_sum, m.auth_cni_waits);
    line(&mut o, "CNI ADDs answered at --auth-cni-wait-ms before every peer with an up channel installed the pod's proof.", "counter", "zt_auth_cni_wait_timeouts_total");
    let _ = writeln!(o, "zt_auth_cni_wait_timeouts_total {}", m.auth_cni_wait_timeouts);
    line(&mut o, "1 once the datapath holds the first full state.", "gauge", "zt_agent_ready");
    let _ = writeln!(o, "zt_agent_ready {}", m.ready as u8);
    line(&mut o, "1 while the policy source reaches its input (0: Kubernetes API unreachable; the last state stays enforced).", "gauge", "zt_source_up");
    let _ = writeln!(o, "zt_source_up {}", m.source_up as u8);
    line(&mut o, "1 once the policy source delivered a complete state (every kind listed).", "gauge", "zt_source_synced");
    let _ = writeln!(o, "zt_source_synced {}", m.source_synced as u8);
    line(&mut o, "Kubernetes watch events by kind and type (list, apply, delete).", "counter", "zt_source_events_total");
    for ((kind, ty), n) in &m.source_events {
        let _ = writeln!(o, "zt_source_events_total{{kind=\"{kind}\",type=\"{ty}\"}} {n}");
    }
    line(&mut o, "Completed relists by kind (after 410 Gone or a restarted watch).", "counter", "zt_source_relists_total");
    for (kind, n) in &m.source_relists {
        let _ = writeln!(o, "zt_source_relists_total{{kind=\"{kind}\"}} {n}");
    }
    line(&mut o, "Failed Kubernetes list/watch calls by kind.", "counter", "zt_source_errors_total");
    for (kind, n) in &m.source_errors {
        let _ = writeln!(o, "zt_source_errors_total{{kind=\"{kind}\"}} {n}");
    }
    line(&mut o, "Service frontends (address, port, protocol) the pods' sockets are translated from.", "gauge", "zt_service_frontends");
    let _ = writeln!(o, "zt_service_frontends {}", m.svc_frontends);
    line(&mut o, "Service backends in the translation maps (summed over frontends).", "gauge", "zt_service_backends");
    let _ = writeln!(o, "zt_service_backends {}", m.svc_backends);
    line(&mut o, "Pod sockets destroyed because their backend left the Service, by protocol.", "counter", "zt_service_sockets_destroyed_total");
    for (proto, name) in [(6u8, "tcp"), (17, "udp")] {
        let n = m.svc_sockets_destroyed.get(&proto).copied().unwrap_or(0);
        let _ = writeln!(o, "zt_service_sockets_destroyed_total{{proto=\"{name}\"}} {n}");
    }
    line(&mut o, "Failures while destroying the sockets of removed backends (see the log).", "counter", "zt_service_socket_destroy_errors_total");
    let _ = writeln!(o, "zt_service_socket_destroy_errors_total {}", m.svc_socket_destroy_errors);
    line(&mut o, "Socket translations by outcome (translated, no-backend, backend-missing, reversed, affinity).", "counter", "zt_service_translations_total");
    if let Some(s) = maps.and_then(|m| m.svc_stats().ok()) {
        for st in SvcStat::ALL {
            let _ = writeln!(o, "zt_service_translations_total{{outcome=\"{}\"}} {}", st.name(), s[st as usize]);
        }
    }
    let ct_stats = maps.and_then(|m| m.ct_stats().ok());
    crate::conntrack_gc::render_metrics(&mut o, m.ct.as_ref(), ct_stats.as_deref());
    crate::fqdn::render_metrics(&mut o, m, fqdn);
    crate::graph::metrics::render_metrics(&mut o, m.graph.as_ref());
    m.pairs.render(&mut o);
    line(&mut o, "Version of the running agent (always 1).", "gauge", "zt_agent_build_info");
    let _ = writeln!(o, "zt_agent_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
    crate::l7::events::STATS.render(&mut o);
    o
}

/// Serves `/metrics` until the task is dropped. The pinned maps are opened once.
pub async fn serve(addr: String, shared: Shared, bpffs_root: PathBuf) -> Result<()> {
    let maps = std::sync::Arc::new(PinnedMaps::open(&bpffs_root)?);
    // PinnedMaps already requires the FQDN maps, so they exist now: open them once too.
    let fqdn = std::sync::Arc::new(FqdnMaps::open(&bpffs_root)?);
    let listener = TcpListener::bind(&addr).await?;
    log::info!("metrics on http://{addr}/metrics");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let shared = shared.clone();
        let maps = maps.clone();
        let fqdn = fqdn.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                let snapshot = shared.lock().unwrap().clone();
                // Map reads are syscalls: off the runtime.
                let body = tokio::task::spawn_blocking(move || render_with(&snapshot, Some(&maps), Some(&fqdn)))
                .await
                .unwrap_or_default();
                ("200 OK", body)
            } else if req.starts_with("GET /healthz") {
                // Liveness: the loop turns (also while the API server is unreachable).
                let alive = shared.lock().unwrap().alive();
                if alive { ("200 OK", "ok\n".to_string()) } else { ("503 Service Unavailable", "agent loop stuck\n".to_string()) }
            } else if req.starts_with("GET /readyz") {
                let m = shared.lock().unwrap().clone();
                if m.serving() {
                    ("200 OK", "ready\n".to_string())
                } else {
                    let why = if !m.source_synced {
                        "policy source not synced"
                    } else if !m.source_up {
                        "policy source unreachable"
                    } else if !m.ready {
                        "datapath not ready"
                    } else {
                        m.svid_source_down().unwrap_or("SVID source down")
                    };
                    ("503 Service Unavailable", format!("not ready: {why}\n"))
                }
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
