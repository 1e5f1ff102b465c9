//! `zt_testbed`: a reusable test bed that builds a simulated Kubernetes node (or
//! several) from YAML manifests with Linux network namespaces, for testing zt-agent.
//!
//! Layout of a run `<run>` (6 hex chars, unique per test bed):
//! - node `k` (1-based): netns `zt<run>-<node>`, dummy `zthost` (or `lo`) holding 10.255.0.k/32 and
//!   fd00:255::k/128 (or the Node object's InternalIPs), IPv4/IPv6 forwarding on;
//! - pod: netns `zt<run>-p<idx>`, `eth0` (pod IPs /32 /128) paired with host veth
//!   `zth<run><idx>` in the node netns; pod routes via the node IP / fe80::1, host routes
//!   `<podIP> dev <hostveth>`; so pod-to-pod traffic is routed through the node netns;
//! - cgroup `<cgroup2 root>/zt-test-<run>/node-<node>/kubepods/pod<uid>` holding the pod's server
//!   process (`zt-testbed serve`, see [`serve`]);
//! - temp dir `<tmp>/zt-testbed-<run>` (logs, agent bpffs and state dirs) and run dir
//!   `/run/zt-testbed/<run>` (owner pid, topology.json).
//!
//! ```no_run
//! use zt_testbed::*;
//! # fn main() -> anyhow::Result<()> {
//! let tb = Testbed::up("labs/basic".as_ref(), TestbedOptions::default())?;
//! let r = tb.probe(&Endpoint::pod("default", "a"), &Target::pod("default", "b", Family::V6),
//!                  Proto::Tcp, 80, DEFAULT_TIMEOUT);
//! assert_eq!(r, ProbeResult::Ok("default/b".into()));
//! let m = tb.probe_matrix(&tb.all_pod_pairs(&[(Proto::Tcp, 80), (Proto::Icmp, 0)],
//!                         &[Family::V4, Family::V6]), DEFAULT_TIMEOUT);
//! println!("{m}");
//! # Ok(()) }
//! ```

pub mod agent;
pub mod apiserver;
pub mod attack;
pub mod bins;
pub mod bpfmap;
pub mod connrate;
pub mod dns;
pub mod httpserver;
pub mod kubeproxy;
pub mod manifest;
pub mod podprobe;
pub mod probe;
pub mod sctp;
pub mod serve;
pub mod sockprobe;
pub mod spire;
pub mod spray;
pub mod sys;
pub mod testbed;
pub mod topology;

#[cfg(test)]
mod selftest;

pub use agent::AgentHandle;
pub use httpserver::HttpServer;
pub use apiserver::{ApiServer, Listener as ApiListener, Verb};
pub use manifest::{Manifests, NodeObj, Pod, Port, Proto};
pub use podprobe::PodProbers;
pub use probe::{probe_here, Matrix, ProbeResult, ProbeSpec, DEFAULT_TIMEOUT};
pub use testbed::{pod_pairs, probe_in, run_matrix, sweep_stale, TcpFlow, Testbed, TestbedOptions};
pub use topology::{Endpoint, Family, NodeInfo, PodInfo, Target, Topology};
