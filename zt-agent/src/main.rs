//! zt-agent: the node agent. Flags default to a production node; tests point them at
//! their own bpffs, state directory and network namespace.
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use zt_agent::{
    agent::{run, AgentOptions},
    compile::EnforcementMode,
    loader::MapSizes,
    source::PolicySource,
};

#[derive(Parser, Debug)]
#[command(name = "zt-agent", about = "zt node agent: identity-keyed default-deny in the kernel")]
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
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// `default`: Kubernetes semantics (an endpoint no policy selects is open);
    /// `always`: every local endpoint is default-deny both ways.
    #[arg(long, default_value = "default", value_parser = ["default", "always"])]
    enforcement_mode: String,
    /// Allow the node (kubelet probes) to reach local pods.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allow_host_probes: bool,
    /// Also send events for newly allowed flows (drops are always sent).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    events_allowed: bool,
    /// Datapath event budget per second, per CPU (so the node's budget is this times the
    /// number of CPUs); the burst is twice that.
    #[arg(long, default_value_t = 1000)]
    events_per_sec: u32,
    #[arg(long, default_value_t = zt_common::DEFAULT_ENDPOINTS_MAX)]
    endpoints_max: u32,
    #[arg(long, default_value_t = zt_common::DEFAULT_CIDRS_MAX)]
    cidrs_max: u32,
    #[arg(long, default_value_t = zt_common::DEFAULT_POLICY_MAX)]
    policy_max: u32,
    /// Connection-tracking entries (LRU).
    #[arg(long, default_value_t = zt_common::DEFAULT_CT_MAX)]
    ct_max: u32,
    #[arg(long, default_value_t = zt_common::DEFAULT_FRAGS_MAX)]
    frags_max: u32,
    /// Idle lifetime of a tracked TCP flow, seconds.
    #[arg(long, default_value_t = 3600)]
    ct_tcp_timeout: u32,
    /// Idle lifetime of a tracked UDP/ICMP/other flow, seconds.
    #[arg(long, default_value_t = 60)]
    ct_other_timeout: u32,
    #[arg(long, default_value_t = 5)]
    frag_timeout: u32,
    /// How often the manifests and interfaces are re-read, milliseconds.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Root of the pods' cgroup hierarchy (cgroup v2), where the cgroup programs enforce
    /// a pod's own traffic from its first packet; `none`: no cgroup programs.
    #[arg(long, default_value = zt_agent::cgroup_link::DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
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
    let Some(node_name) = f.node_name.filter(|n| !n.is_empty()) else {
        anyhow::bail!("--node-name (or $NODE_NAME) is required");
    };
    // TLS to the API server: rustls with ring, nothing else.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let source = match f.manifests {
        Some(dir) => PolicySource::Dir(dir),
        None => PolicySource::Kube(Box::new(zt_agent::source::kube::load_config(f.kubeconfig.as_deref()).await?)),
    };
    let opts = AgentOptions {
        node_name,
        source,
        bpffs_root: f.bpffs_root,
        state_dir: f.state_dir,
        admin_socket: f.admin_socket,
        metrics_addr: f.metrics_addr,
        trust_domain: f.trust_domain,
        enforcement_mode: if f.enforcement_mode == "always" { EnforcementMode::Always } else { EnforcementMode::Default },
        allow_host: f.allow_host_probes,
        events_allowed: f.events_allowed,
        events_per_sec: f.events_per_sec,
        events_burst: f.events_per_sec.saturating_mul(2),
        sizes: MapSizes { endpoints: f.endpoints_max, cidrs: f.cidrs_max, policy: f.policy_max, ct: f.ct_max, frags: f.frags_max },
        ct_tcp_timeout_s: f.ct_tcp_timeout,
        ct_other_timeout_s: f.ct_other_timeout,
        frag_timeout_s: f.frag_timeout,
        poll_interval: Duration::from_millis(f.poll_ms),
        cgroup_root: if f.cgroup_root.as_os_str() == "none" { None } else { Some(f.cgroup_root) },
    };
    run(opts).await
}
