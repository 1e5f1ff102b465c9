//! zt-agent: the node agent. Flags default to a production node; tests point them at
//! their own bpffs, state directory and network namespace.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use zt_agent::{
    agent::{run, AgentOptions, FqdnOptions},
    compile::EnforcementMode,
    loader::{FqdnSettings, MapSizes},
    model::ztp::SpiffePattern,
    source::PolicySource,
};

#[derive(Parser, Debug)]
#[command(name = "zt-agent", version, about = "zt node agent: identity-keyed default-deny in the kernel")]
struct Flags {
    #[command(subcommand)]
    command: Option<Command>,
    /// This node's name (pods with this spec.nodeName are local). Required to run the agent.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Directory of Kubernetes YAML (Namespaces, ServiceAccounts, Pods, Nodes,
    /// NetworkPolicies, ZeroTrustPolicies), watched for changes. Without it the agent
    /// watches the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the Kubernetes API source (default: in-cluster service account,
    /// else $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// bpffs directory for zt's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/zt")]
    bpffs_root: PathBuf,
    /// Agent state (identity numbers, names for ztctl).
    #[arg(long, default_value = "/var/run/zt")]
    state_dir: PathBuf,
    /// Local admin socket for ztctl.
    #[arg(long, default_value = "/var/run/zt/admin.sock")]
    admin_socket: PathBuf,
    /// Address of the Prometheus endpoint.
    #[arg(long, default_value = "0.0.0.0:9962")]
    metrics_addr: String,
    /// Count datapath events per identity pair in /metrics (`zt_identity_pair_events_total`,
    /// SPIFFE IDs as labels), keeping at most this many series; 0 (default) = off.
    #[arg(long, default_value_t = 0)]
    metrics_identity_pairs: usize,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// `default`: Kubernetes semantics (an endpoint no policy selects is open);
    /// `always`: every local endpoint is default-deny both ways.
    #[arg(long, default_value = "default", value_parser = ["default", "always"])]
    enforcement_mode: String,
    /// What the node's own sockets may reach on an isolated local pod: `probes`, the TCP
    /// ports its readiness, liveness and startup probes name; `all`, every port; `none`,
    /// only what policy allows. Traffic the node forwards with a node source address
    /// (masquerade, SNAT) is never `host`.
    #[arg(long, default_value = "probes", value_parser = ["probes", "all", "none"])]
    host_access: String,
    /// Pod label keys left out of identities, comma-separated: a key, or a prefix ending
    /// in `*`; `default` stands for the built-in list (pod-template-hash,
    /// pod-template-generation, controller-revision-hash, statefulset.kubernetes.io/pod-name,
    /// apps.kubernetes.io/pod-index, controller-uid, job-name, batch.kubernetes.io/*), so
    /// `default,example.com/build-*` extends it; empty: every label counts. A policy whose
    /// pod selector names an excluded key fails closed for its subjects.
    #[arg(long, default_value = "default")]
    identity_exclude_labels: String,
    /// Tunnel endpoints a pod may not send to on a node address unless a policy explicitly
    /// allows it: comma-separated `udp/PORT`, `tcp/PORT`, `ipip`, `ipv6`, `gre`, `proto/N`
    /// (empty: none).
    #[arg(long, default_value = zt_agent::tunnels::DEFAULT_TUNNELS)]
    tunnels: String,
    /// Translate Service frontends (ClusterIP, external and load-balancer IPs, NodePorts on
    /// this node) to a backend at the pods' sockets (connect/sendmsg/recvmsg/getpeername
    /// at --cgroup-root). `false` for a CNI that already does (Cilium, Calico eBPF).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    service_translation: bool,
    /// The cluster's Service address range (kube-apiserver's --service-cluster-ip-range),
    /// repeatable (one per family): an FQDN rule never allows an address inside it.
    #[arg(long = "service-cidr", value_name = "CIDR")]
    service_cidr: Vec<String>,
    /// The node addresses that carry NodePorts (kube-proxy's --nodeport-addresses), CIDRs,
    /// repeatable or comma-separated. Unset: every address of the node (kube-proxy's
    /// nftables mode defaults to the node's primary addresses: name them here to match).
    #[arg(long = "nodeport-addresses", value_name = "CIDR", value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// When a backend leaves a Service, destroy the pod sockets zt had translated to it
    /// (the application gets ECONNABORTED and reconnects through the Service): `udp`
    /// (connected UDP, e.g. a resolver's), `all` (TCP too: also resets connections to a
    /// backend that is only terminating), `off`.
    #[arg(long, default_value = "udp", value_parser = ["off", "udp", "all"])]
    service_destroy_stale_sockets: String,
    /// Also send events for newly allowed flows (drops are always sent).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    events_allowed: bool,
    /// Datapath event budget per second, per CPU (so the node's budget is this times the
    /// number of CPUs); the burst is twice that.
    #[arg(long, default_value_t = 1000)]
    events_per_sec: u32,
    /// Entries of the endpoint map (default 65536; at a node's first start, unless given,
    /// sized from the cluster's first list: first_sizes.rs). The same for the CIDR
    /// (16384), policy (262144), FQDN name (65536) and FQDN port (16384) maps.
    #[arg(long)]
    endpoints_max: Option<u32>,
    #[arg(long)]
    cidrs_max: Option<u32>,
    #[arg(long)]
    policy_max: Option<u32>,
    /// Connection-tracking entries for flows that are not established TCP (LRU: new flows
    /// evict the least recently used of these when full).
    #[arg(long, default_value_t = zt_common::DEFAULT_CT_MAX)]
    ct_max: u32,
    /// Connection-tracking entries for established TCP flows (never evicted; when full, a
    /// newly established flow stays in the LRU and is counted).
    #[arg(long, default_value_t = zt_common::DEFAULT_CT_EST_MAX)]
    ct_established_max: u32,
    #[arg(long, default_value_t = zt_common::DEFAULT_FRAGS_MAX)]
    frags_max: u32,
    /// Idle lifetime of an established TCP flow, seconds (above Linux's 7200 s keepalive).
    #[arg(long, default_value_t = 21600, value_parser = at_least_one_second())]
    ct_tcp_timeout: u32,
    /// Idle lifetime of a TCP flow whose handshake has not completed, seconds.
    #[arg(long, default_value_t = 60, value_parser = at_least_one_second())]
    ct_tcp_syn_timeout: u32,
    /// Idle lifetime of a half-closed TCP flow (FIN seen one way), seconds.
    #[arg(long, default_value_t = 60, value_parser = at_least_one_second())]
    ct_tcp_fin_timeout: u32,
    /// Idle lifetime of a closed TCP flow (FIN both ways, or RST), seconds.
    #[arg(long, default_value_t = 10, value_parser = at_least_one_second())]
    ct_tcp_close_timeout: u32,
    /// Idle lifetime of a UDP flow, seconds.
    #[arg(long, default_value_t = 60, value_parser = at_least_one_second())]
    ct_udp_timeout: u32,
    /// Idle lifetime of an ICMP/ICMPv6 flow (echo, queries), seconds.
    #[arg(long, default_value_t = 30, value_parser = at_least_one_second())]
    ct_icmp_timeout: u32,
    /// Idle lifetime of a flow of any other protocol (SCTP, ...), seconds.
    #[arg(long, default_value_t = 60, value_parser = at_least_one_second())]
    ct_other_timeout: u32,
    /// How often the agent deletes expired conntrack entries and counts the rest, seconds.
    #[arg(long, default_value_t = 30)]
    ct_gc_interval: u64,
    #[arg(long, default_value_t = 5, value_parser = at_least_one_second())]
    frag_timeout: u32,
    /// How often the manifests and interfaces are re-read, milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Root of the pods' cgroup hierarchy (cgroup v2), where the cgroup programs enforce
    /// a pod's own traffic from its first packet; `none`: no cgroup programs.
    #[arg(long, default_value = zt_agent::cgroup_link::DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// Trusted DNS resolver by SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>` or
    /// `.../ns/<ns>/*`), repeatable; only their answers teach FQDN rules addresses.
    /// Default: the kube-system service accounts coredns and node-local-dns.
    #[arg(long = "fqdn-dns-server", value_name = "SPIFFE_ID")]
    fqdn_dns_server: Vec<String>,
    /// Resolver address that is no pod (the kube-dns ClusterIP, 169.254.20.10 with
    /// node-local-dns), repeatable: identity `dns`, trusted like --fqdn-dns-server.
    #[arg(long = "fqdn-dns-address", value_name = "IP")]
    fqdn_dns_address: Vec<std::net::IpAddr>,
    /// The cluster's resolver Service, `<namespace>/<name>` (`none`: no such Service):
    /// the pods behind it are trusted resolvers and `entity: dns`, and so is the Service
    /// itself when a query reaches its ClusterIP untranslated.
    #[arg(long = "fqdn-dns-service", value_name = "NS/NAME", default_value = "kube-system/kube-dns")]
    fqdn_dns_service: String,
    /// A learned FQDN address stays valid at least this long after its answer, seconds.
    #[arg(long, default_value_t = 30)]
    fqdn_min_ttl: u32,
    /// ... and at most this long, seconds.
    #[arg(long, default_value_t = 86400)]
    fqdn_max_ttl: u32,
    /// New flows to an expired learned address are still allowed this long, seconds.
    #[arg(long, default_value_t = 60)]
    fqdn_grace: u32,
    /// DNS answer events to the agent per second, per CPU.
    #[arg(long, default_value_t = 1000)]
    fqdn_events_per_sec: u32,
    #[arg(long)]
    fqdn_names_max: Option<u32>,
    #[arg(long)]
    fqdn_ports_max: Option<u32>,
    /// Learned (identity, address) entries (LRU, shared by all pods of the node).
    #[arg(long, default_value_t = zt_common::DEFAULT_FQDN_LEARNED_MAX)]
    fqdn_learned_max: u32,
    /// Address of the flow and risk map page (and its /api/graph, /api/posture);
    /// `none`: no page. Any address but loopback needs --ui-token-file.
    #[arg(long, default_value = "127.0.0.1:9963")]
    ui_addr: String,
    /// File holding the bearer token every request to the page must carry (at least 16
    /// characters); required when --ui-addr is not a loopback address.
    #[arg(long)]
    ui_token_file: Option<PathBuf>,
    /// The map's history: buckets of this many seconds ...
    #[arg(long, default_value_t = 60)]
    graph_bucket_seconds: u64,
    /// ... this many of them (the oldest goes when a new one starts).
    #[arg(long, default_value_t = 60)]
    graph_buckets: usize,
    /// Hard cap on the map's (bucket, edge) entries; what it keeps out is counted.
    #[arg(long, default_value_t = 100_000)]
    graph_max_entries: usize,
    /// Hard cap on permitted edges drawn; the rest is counted.
    #[arg(long, default_value_t = zt_agent::graph::DEFAULT_MAX_PERMITTED)]
    graph_max_permitted: usize,
    /// How often the map scans conntrack for allowed flows, seconds (keep it below
    /// --ct-tcp-close-timeout so that short connections are seen).
    #[arg(long, default_value_t = 5)]
    graph_ct_interval: u64,
    /// Run the HTTP proxy for ports with HTTP rules (false: their flows drop, fail closed).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    http_proxy: bool,
    /// The proxy's listener port on 127.0.0.1 and ::1.
    #[arg(long, default_value_t = 15001)]
    http_proxy_port: u16,
    /// SO_MARK of the proxy's sockets (how a pod's hook knows the proxy's packets).
    #[arg(long, default_value = "0x0a700000", value_parser = parse_u32)]
    http_proxy_mark: u32,
    /// Mark the kernel sets on packets steered to the proxy.
    #[arg(long, default_value = "0x0a710000", value_parser = parse_u32)]
    http_steer_mark: u32,
    /// Routing table the steer mark is routed by (`local default dev lo`).
    #[arg(long, default_value_t = 2007)]
    http_steer_table: u32,
    /// Address of the node channel (TLS 1.3, node SVIDs both ways) over which agents
    /// prove their pods' identities to each other; peers are dialled at their Node
    /// InternalIPs on the same port. `off`: no channels (no pod of another node is ever
    /// proven: `authentication: required` drops all cross-node traffic).
    #[arg(long, default_value = "[::]:9964")]
    auth_listen: String,
    /// Where the node's and the local pods' SVIDs and the trust bundles come from:
    /// `builtin` (an rcgen CA in the agent: --svid-ca-dir, --svid-ttl),
    /// `spire:<path>`, the SPIRE agent's admin socket (`admin_socket_path`; this agent's
    /// SPIFFE ID must be in its `authorized_delegates`), read with the Delegated Identity API,
    /// or `files:<dir>`: files another tool (spiffe-helper) keeps up to date, one directory
    /// per SPIFFE ID at `<dir>/<trust domain><path>/` (`svid.pem`, `svid_key.pem`,
    /// `svid_bundle.pem`), the node's at `<dir>/<trust domain>/zt/node/<node>/`.
    #[arg(long, default_value = "builtin", value_parser = parse_svid_source)]
    svid_source: zt_agent::svid::spec::SvidSourceSpec,
    /// With `--svid-source spire:`: the selectors of the node's own SVID
    /// (`spiffe://<trust domain>/zt/node/<node>`), `type:value` separated by commas;
    /// `k8s:node-name:<node>` is added. Register one entry per node with them (and the node name).
    #[arg(long, default_value = zt_agent::svid::spec::DEFAULT_NODE_SELECTORS)]
    spire_node_selectors: String,
    /// Local mode and demos only: a directory holding the builtin CA (`ca.pem`, root and
    /// key; created if absent) that agents share so that they trust each other. Anyone who
    /// can read it can issue any identity. Unset: each agent has a CA of its own (its
    /// peers refuse its channel).
    #[arg(long)]
    svid_ca_dir: Option<PathBuf>,
    /// Lifetime of the SVIDs the builtin CA issues, seconds.
    #[arg(long, default_value_t = 3600)]
    svid_ttl: u64,
    /// How long a peer's proofs still count after its channel is lost (and, at start, the
    /// proofs an earlier agent wrote), seconds: an agent restart within it cuts no flow.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    auth_peer_grace: u64,
    /// How long a CNI ADD waits, milliseconds, until every peer whose node channel is up
    /// has installed the new pod's identity proof (so that its first packet to another
    /// node is admitted under `authentication: required`); 0: ADD does not wait. On
    /// timeout ADD still succeeds (counted in `zt_auth_cni_wait_timeouts_total`). Keep it
    /// below zt-cni's `timeoutMs` (5000 by default).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=30_000))]
    auth_cni_wait_ms: u64,
    /// Interfaces traffic from other nodes arrives on, where flows to ports with HTTP rules
    /// are steered to this node's proxy: `auto` (the interfaces other nodes' pods are
    /// routed through), `none`, or names separated by commas.
    #[arg(long, default_value = "auto")]
    uplink_interfaces: String,
}

/// `--auth-listen`: an address and port, or `off`.
fn auth_links(f: &Flags) -> anyhow::Result<Option<zt_agent::auth::links::LinkOptions>> {
    if f.auth_listen == "off" {
        if f.svid_source != zt_agent::svid::spec::SvidSourceSpec::Builtin {
            anyhow::bail!("--svid-source {} needs the node channels, but --auth-listen is off", f.svid_source);
        }
        return Ok(None);
    }
    let listen: std::net::SocketAddr = f.auth_listen.parse().map_err(|e| anyhow::anyhow!("--auth-listen {:?}: {e} (an address:port, or off)", f.auth_listen))?;
    if listen.port() == 0 {
        anyhow::bail!("--auth-listen needs a port (peers dial the same one)");
    }
    if f.svid_ttl < 60 && f.svid_source == zt_agent::svid::spec::SvidSourceSpec::Builtin {
        anyhow::bail!("--svid-ttl must be at least 60 s");
    }
    if f.svid_ca_dir.is_some() && f.svid_source != zt_agent::svid::spec::SvidSourceSpec::Builtin {
        anyhow::bail!("--svid-ca-dir is the builtin CA's: it does not go with --svid-source {}", f.svid_source);
    }
    if let zt_agent::svid::spec::SvidSourceSpec::Spire { .. } = f.svid_source {
        // Checked here so that a bad list fails at start, named.
        f.svid_source.spire_config(f.node_name.as_deref().unwrap_or("node"), &f.spire_node_selectors).map_err(|e| anyhow::anyhow!("--spire-node-selectors {:?}: {e}", f.spire_node_selectors))?;
    }
    Ok(Some(zt_agent::auth::links::LinkOptions {
        listen,
        peer_port: listen.port(),
        svid: zt_agent::svid::provider::ProviderOptions {
            source: f.svid_source.clone(),
            ca_dir: f.svid_ca_dir.clone(),
            svid_ttl: Duration::from_secs(f.svid_ttl),
            node_selectors: f.spire_node_selectors.clone(),
        },
        grace: Duration::from_secs(f.auth_peer_grace),
    }))
}

/// `--svid-source`: `builtin`, `spire:<absolute path>` or `files:<absolute path>` (clap names the flag in its error).
fn parse_svid_source(s: &str) -> Result<zt_agent::svid::spec::SvidSourceSpec, String> {
    s.parse()
}

/// A number, decimal or 0x-prefixed hexadecimal.
fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

/// The trusted resolver patterns: the flags, or the defaults of the trust domain.
/// `--fqdn-dns-service`: `<namespace>/<name>`, or `none`.
fn dns_service(s: &str) -> anyhow::Result<Option<(String, String)>> {
    if s == "none" {
        return Ok(None);
    }
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => Ok(Some((ns.to_string(), name.to_string()))),
        _ => anyhow::bail!("--fqdn-dns-service {s:?}: expected <namespace>/<name> or none"),
    }
}

fn dns_servers(flags: &[String], trust_domain: &str) -> anyhow::Result<Vec<SpiffePattern>> {
    let list = if flags.is_empty() { zt_agent::compile::default_dns_servers(trust_domain) } else { flags.to_vec() };
    list.iter()
        .map(|s| {
            let p = SpiffePattern::parse(s).map_err(|e| anyhow::anyhow!("--fqdn-dns-server: {e}"))?;
            if p.trust_domain != trust_domain {
                anyhow::bail!("--fqdn-dns-server {s:?}: not of trust domain {trust_domain:?} (--trust-domain)");
            }
            Ok(p)
        })
        .collect()
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the ZeroTrustPolicy CustomResourceDefinition (deploy/crd-zerotrustpolicy.yaml).
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let f = Flags::parse();
    if let Some(Command::Crd) = f.command {
        print!("{}", zt_agent::model::ztp::crd_yaml());
        return Ok(());
    }
    let auth_links = auth_links(&f)?;
    let Some(node_name) = f.node_name.filter(|n| !n.is_empty()) else {
        anyhow::bail!("--node-name (or $NODE_NAME) is required");
    };
    let fqdn = FqdnOptions {
        settings: FqdnSettings { min_ttl_s: f.fqdn_min_ttl, max_ttl_s: f.fqdn_max_ttl, grace_s: f.fqdn_grace, events_per_sec: f.fqdn_events_per_sec },
        dns_servers: dns_servers(&f.fqdn_dns_server, &f.trust_domain)?,
        dns_addresses: f.fqdn_dns_address.iter().map(|a| a.to_canonical()).collect(),
        dns_service: dns_service(&f.fqdn_dns_service)?,
    };
    if f.fqdn_min_ttl > f.fqdn_max_ttl {
        anyhow::bail!("--fqdn-min-ttl ({}) is above --fqdn-max-ttl ({})", f.fqdn_min_ttl, f.fqdn_max_ttl);
    }
    // TLS to the API server: rustls with ring, nothing else.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let source = match f.manifests {
        Some(dir) => PolicySource::Dir(dir),
        None => PolicySource::Kube(Box::new(zt_agent::source::kube::load_config(f.kubeconfig.as_deref()).await?)),
    };
    let graph = zt_agent::agent::GraphOptions {
        limits: zt_agent::graph::observed::Limits { bucket_s: f.graph_bucket_seconds, buckets: f.graph_buckets, max_entries: f.graph_max_entries },
        max_permitted: f.graph_max_permitted,
        ct_interval: Duration::from_secs(f.graph_ct_interval.max(1)),
        ui: zt_agent::ui::UiOptions::parse(&f.ui_addr, f.ui_token_file.as_deref())?,
    };
    let opts = AgentOptions {
        auth_links,
        auth_cni_wait: Duration::from_millis(f.auth_cni_wait_ms),
        node_name,
        source,
        bpffs_root: f.bpffs_root,
        state_dir: f.state_dir,
        admin_socket: f.admin_socket,
        metrics_addr: f.metrics_addr,
        metrics_identity_pairs: f.metrics_identity_pairs,
        trust_domain: f.trust_domain,
        enforcement_mode: if f.enforcement_mode == "always" { EnforcementMode::Always } else { EnforcementMode::Default },
        host_access: zt_agent::compile::HostAccess::parse(&f.host_access).map_err(anyhow::Error::msg)?,
        events_allowed: f.events_allowed,
        events_per_sec: f.events_per_sec,
        events_burst: f.events_per_sec.saturating_mul(2),
        sizes_explicit: zt_agent::first_sizes::Explicit {
            endpoints: f.endpoints_max.is_some(),
            cidrs: f.cidrs_max.is_some(),
            policy: f.policy_max.is_some(),
            fqdn_names: f.fqdn_names_max.is_some(),
            fqdn_ports: f.fqdn_ports_max.is_some(),
        },
        sizes: MapSizes {
            endpoints: f.endpoints_max.unwrap_or(zt_common::DEFAULT_ENDPOINTS_MAX),
            cidrs: f.cidrs_max.unwrap_or(zt_common::DEFAULT_CIDRS_MAX),
            policy: f.policy_max.unwrap_or(zt_common::DEFAULT_POLICY_MAX),
            ct: f.ct_max,
            ct_est: f.ct_established_max,
            frags: f.frags_max,
            fqdn_names: f.fqdn_names_max.unwrap_or(zt_common::DEFAULT_FQDN_NAMES_MAX),
            fqdn_ports: f.fqdn_ports_max.unwrap_or(zt_common::DEFAULT_FQDN_PORTS_MAX),
            fqdn_learned: f.fqdn_learned_max,
        },
        ct: zt_agent::conntrack_gc::CtSettings {
            tcp_established_s: f.ct_tcp_timeout,
            tcp_syn_s: f.ct_tcp_syn_timeout,
            tcp_fin_s: f.ct_tcp_fin_timeout,
            tcp_close_s: f.ct_tcp_close_timeout,
            udp_s: f.ct_udp_timeout,
            icmp_s: f.ct_icmp_timeout,
            other_s: f.ct_other_timeout,
            gc_interval: Duration::from_secs(f.ct_gc_interval.max(1)),
        },
        frag_timeout_s: f.frag_timeout,
        poll_interval: Duration::from_millis(f.poll_ms),
        cgroup_root: if f.cgroup_root.as_os_str() == "none" { None } else { Some(f.cgroup_root) },
        fqdn,
        tunnels: zt_agent::tunnels::parse(&f.tunnels)?,
        service_translation: f.service_translation,
        identity_labels: zt_agent::identity::LabelFilter::parse(&f.identity_exclude_labels).map_err(anyhow::Error::msg)?,
        nodeport_addresses: f
            .nodeport_addresses
            .iter()
            .map(|c| zt_agent::compile::cidr::parse_cidr(c).map_err(|e| anyhow::anyhow!("--nodeport-addresses: {e}")))
            .collect::<anyhow::Result<_>>()?,
        service_cidrs: f
            .service_cidr
            .iter()
            .map(|c| zt_agent::compile::cidr::parse_cidr(c).map_err(|e| anyhow::anyhow!("--service-cidr: {e}")))
            .collect::<anyhow::Result<_>>()?,
        service_destroy: zt_agent::services::destroy::Scope::parse(&f.service_destroy_stale_sockets).map_err(anyhow::Error::msg)?,
        graph,
        http_proxy: f.http_proxy.then(|| zt_agent::l7::Options {
            port: f.http_proxy_port,
            proxy_mark: f.http_proxy_mark,
            steer_mark: f.http_steer_mark,
            table: f.http_steer_table,
        }),
        uplinks: zt_agent::uplink::Selection::parse(&f.uplink_interfaces)?,
    };
    if f.http_proxy && (f.http_proxy_mark == 0 || f.http_steer_mark == 0 || f.http_proxy_mark == f.http_steer_mark) {
        anyhow::bail!("--http-proxy-mark and --http-steer-mark must be two different non-zero marks");
    }
    run(opts).await
}

/// Conntrack and fragment lifetimes: 0 s would make every entry stale the moment it is
/// written (every reply judged as a new flow), so it is refused at the flag.
fn at_least_one_second() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_of_zero_seconds_are_refused_by_name() {
        for flag in ["--ct-tcp-timeout", "--ct-tcp-syn-timeout", "--ct-tcp-fin-timeout", "--ct-tcp-close-timeout", "--ct-udp-timeout", "--ct-icmp-timeout", "--ct-other-timeout", "--frag-timeout"] {
            let e = Flags::try_parse_from(["zt-agent", flag, "0"]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains("0 is not in 1.."), "{flag}: {e}");
            assert!(Flags::try_parse_from(["zt-agent", flag, "1"]).is_ok(), "{flag} 1");
        }
        let f = Flags::try_parse_from(["zt-agent"]).unwrap();
        assert_eq!((f.ct_tcp_timeout, f.ct_udp_timeout, f.frag_timeout), (21600, 60, 5), "the defaults");
    }

    #[test]
    fn auth_flags() {
        let o = auth_links(&Flags::try_parse_from(["zt-agent"]).unwrap()).unwrap().expect("on by default");
        assert_eq!((o.listen.to_string().as_str(), o.peer_port, o.grace.as_secs(), o.svid.svid_ttl.as_secs()), ("[::]:9964", 9964, 30, 3600));
        assert!(o.svid.ca_dir.is_none());
        assert_eq!(o.svid.source, zt_agent::svid::spec::SvidSourceSpec::Builtin, "builtin by default");
        assert!(auth_links(&Flags::try_parse_from(["zt-agent", "--auth-listen", "off"]).unwrap()).unwrap().is_none());
        for bad in ["9964", "0.0.0.0:0", "node1:9964"] {
            let e = auth_links(&Flags::try_parse_from(["zt-agent", "--auth-listen", bad]).unwrap()).unwrap_err().to_string();
            assert!(e.contains("--auth-listen"), "{bad}: {e}");
        }
        let e = auth_links(&Flags::try_parse_from(["zt-agent", "--svid-ttl", "5"]).unwrap()).unwrap_err().to_string();
        assert!(e.contains("--svid-ttl"), "{e}");
    }

    #[test]
    fn svid_source_flags() {
        use zt_agent::svid::spec::SvidSourceSpec;
        let f = Flags::try_parse_from(["zt-agent", "--svid-source", "spire:/run/spire/admin.sock", "--node-name", "n1"]).unwrap();
        let o = auth_links(&f).unwrap().unwrap();
        assert_eq!(o.svid.source, SvidSourceSpec::Spire { socket: "/run/spire/admin.sock".into() });
        assert_eq!(o.svid.node_selectors, "k8s:ns:zt-system,k8s:sa:zt-agent");
        // Bad values: clap's error names the flag and says what is expected.
        for (bad, want) in [("vault", "expected `builtin`, `spire:"), ("spire:admin.sock", "absolute path"), ("spire:", "absolute path"), ("files:svids", "absolute path")] {
            let e = Flags::try_parse_from(["zt-agent", "--svid-source", bad]).unwrap_err().to_string();
            assert!(e.contains("--svid-source") && e.contains(want), "{bad}: {e}");
        }
        for (args, want) in [
            (&["--spire-node-selectors", "k8s"][..], "--spire-node-selectors"),
            (&["--spire-node-selectors", " , "][..], "--spire-node-selectors"),
            (&["--svid-ca-dir", "/tmp/ca"][..], "--svid-ca-dir"),
            (&["--auth-listen", "off"][..], "--auth-listen is off"),
        ] {
            let mut v = vec!["zt-agent", "--svid-source", "spire:/s"];
            v.extend(args);
            let e = auth_links(&Flags::try_parse_from(v).unwrap()).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
        let o = auth_links(&Flags::try_parse_from(["zt-agent", "--svid-source", "files:/run/zt/svids"]).unwrap()).unwrap().unwrap();
        assert_eq!(o.svid.source, SvidSourceSpec::Files { dir: "/run/zt/svids".into() });
        for args in [&["--svid-ca-dir", "/tmp/ca"][..], &["--auth-listen", "off"][..]] {
            let mut v = vec!["zt-agent", "--svid-source", "files:/s"];
            v.extend(args);
            assert!(auth_links(&Flags::try_parse_from(v).unwrap()).is_err(), "{args:?}");
        }
        // The selectors are the builtin's business only with spire.
        assert!(auth_links(&Flags::try_parse_from(["zt-agent", "--spire-node-selectors", "k8s"]).unwrap()).is_ok());
    }

    #[test]
    fn stale_socket_flag() {
        assert_eq!(Flags::try_parse_from(["zt-agent"]).unwrap().service_destroy_stale_sockets, "udp");
        let f = Flags::try_parse_from(["zt-agent", "--service-destroy-stale-sockets=all"]).unwrap();
        assert_eq!(zt_agent::services::destroy::Scope::parse(&f.service_destroy_stale_sockets), Ok(zt_agent::services::destroy::Scope::All));
        assert!(Flags::try_parse_from(["zt-agent", "--service-destroy-stale-sockets=tcp"]).is_err());
    }

    #[test]
    fn fqdn_flags_and_trusted_dns_servers() {
        let f = Flags::try_parse_from(["zt-agent"]).unwrap();
        assert_eq!((f.fqdn_min_ttl, f.fqdn_max_ttl, f.fqdn_grace, f.fqdn_events_per_sec), (30, 86400, 60, 1000));
        assert_eq!(f.fqdn_learned_max, zt_common::DEFAULT_FQDN_LEARNED_MAX);
        // Conntrack defaults are CtSettings' (Cilium's and Linux's ranges).
        let d = zt_agent::conntrack_gc::CtSettings::default();
        assert_eq!(
            (
                f.ct_tcp_timeout,
                f.ct_tcp_syn_timeout,
                f.ct_tcp_fin_timeout,
                f.ct_tcp_close_timeout,
                f.ct_udp_timeout,
                f.ct_icmp_timeout,
                f.ct_other_timeout,
                f.ct_gc_interval
            ),
            (d.tcp_established_s, d.tcp_syn_s, d.tcp_fin_s, d.tcp_close_s, d.udp_s, d.icmp_s, d.other_s, d.gc_interval.as_secs())
        );
        let d = dns_servers(&f.fqdn_dns_server, "cluster.local").unwrap();
        assert_eq!(d.iter().map(|p| p.service_account.clone().unwrap()).collect::<Vec<_>>(), ["coredns", "node-local-dns"]);
        assert!(d.iter().all(|p| p.namespace == "kube-system"));

        let f = Flags::try_parse_from([
            "zt-agent",
            "--fqdn-dns-server",
            "spiffe://td/ns/dns/*",
            "--fqdn-dns-server=spiffe://td/ns/kube-system/sa/coredns",
            "--fqdn-dns-address",
            "10.96.0.10",
            "--fqdn-dns-address=fd00::a",
        ])
        .unwrap();
        assert_eq!(f.fqdn_dns_address.len(), 2);
        let d = dns_servers(&f.fqdn_dns_server, "td").unwrap();
        assert_eq!(d.len(), 2);
        assert!(d[0].service_account.is_none() && d[0].namespace == "dns");
        let e = dns_servers(&f.fqdn_dns_server, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("--fqdn-dns-server") && e.contains("trust domain"), "{e}");
        let e = dns_servers(&["spiffe://td/ns/x".to_string()], "td").unwrap_err().to_string();
        assert!(e.contains("--fqdn-dns-server") && e.contains("invalid SPIFFE ID"), "{e}");
        assert!(Flags::try_parse_from(["zt-agent", "--fqdn-dns-address", "kube-dns"]).is_err());
        assert_eq!(dns_service(&f.fqdn_dns_service).unwrap(), Some(("kube-system".into(), "kube-dns".into())), "the default");
        assert_eq!(dns_service("none").unwrap(), None);
        for bad in ["kube-dns", "/x", "a/", "a/b/c"] {
            let e = dns_service(bad).unwrap_err().to_string();
            assert!(e.contains("--fqdn-dns-service") && e.contains(bad), "{e}");
        }
    }
}
