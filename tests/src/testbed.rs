//! The test bed: nodes and pods as network namespaces, pod servers, agents, cleanup.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::agent::{agent_paths, AgentHandle, AgentInner};
use crate::manifest::{Manifests, Pod, Proto};
use crate::probe::{probe_here, Matrix, ProbeResult, ProbeSpec};
use crate::sys;
use crate::topology::{Endpoint, Family, NodeInfo, PodInfo, Target, Topology};

/// Where run directories (owner pid, topology) live.
pub const RUN_ROOT: &str = "/run/zt-testbed";
/// Name of the dummy interface holding a node's IPs inside the node netns (`lo` is
/// used when the kernel has no dummy driver; see [`NodeInfo::host_if`]).
pub const NODE_IF: &str = "zthost";

/// Name of a node's interface to the multi-node fabric (only with 2+ nodes).
pub const FABRIC_IF: &str = "fabric0";

/// Fabric addresses of node k: 10.254.0.k and fd00:254::k.
pub fn fabric_ips(k: u32) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(10, 254, 0, k as u8),
        Ipv6Addr::new(0xfd00, 0x254, 0, 0, 0, 0, 0, k as u16),
    )
}

/// What [`Testbed::add_pod_with`] runs between a pod's network setup and its server.
type BeforeStart<'a> = Box<dyn FnOnce(&PodInfo) -> Result<()> + 'a>;

/// Options for [`Testbed::up`].
#[derive(Clone, Debug)]
pub struct TestbedOptions {
    /// cgroup v2 root under which `zt-test-<run>/node-<node>/kubepods/pod<uid>` is made
    /// (default: the cgroup2 mount point from /proc/self/mounts).
    pub cgroup_root: Option<PathBuf>,
    /// The `zt-testbed` binary used for `serve` (default: $ZT_TESTBED_BIN, the current
    /// executable if it is zt-testbed, or zt-testbed next to / one level above it).
    /// Integration tests of this crate: `Some(env!("CARGO_BIN_EXE_zt-testbed").into())`.
    pub serve_bin: Option<PathBuf>,
    /// Parent of the temp dir `zt-testbed-<run>` (default: std::env::temp_dir()).
    pub tmp_root: PathBuf,
    /// Keep the temp dir (logs) after drop (default: $ZT_TESTBED_KEEP is set).
    pub keep_tmp: bool,
    /// Port of `--metrics-addr 127.0.0.1:<port>` given to agents.
    pub metrics_port: u16,
    /// Run [`sweep_stale`] in `up`.
    pub sweep: bool,
    /// Start pod servers (off: pods get netns/cgroup only).
    pub start_servers: bool,
}

impl Default for TestbedOptions {
    fn default() -> Self {
        TestbedOptions {
            cgroup_root: None,
            serve_bin: None,
            tmp_root: std::env::temp_dir(),
            keep_tmp: std::env::var_os("ZT_TESTBED_KEEP").is_some(),
            metrics_port: 9962,
            sweep: true,
            start_servers: true,
        }
    }
}

impl TestbedOptions {
    /// Set the serve binary.
    pub fn serve_bin(mut self, p: impl Into<PathBuf>) -> Self {
        self.serve_bin = Some(p.into());
        self
    }
    /// Set the cgroup root.
    pub fn cgroup_root(mut self, p: impl Into<PathBuf>) -> Self {
        self.cgroup_root = Some(p.into());
        self
    }
}

struct State {
    topo: Topology,
    servers: HashMap<String, Child>,
    next_pod: u32,
    agents: Vec<Arc<Mutex<AgentInner>>>,
    agent_seq: u32,
}

/// A simulated Kubernetes node set. All methods take `&self` (internally locked), so a
/// test can hold agent handles and flows while adding/removing pods.
/// Dropping it (also during a panic) removes everything it made.
pub struct Testbed {
    run_id: String,
    run_dir: PathBuf,
    tmp_dir: PathBuf,
    cgroup_base: PathBuf,
    manifests_dir: PathBuf,
    serve_bin: Option<PathBuf>,
    opts: TestbedOptions,
    state: Mutex<State>,
}

fn new_run_id() -> Result<(String, PathBuf)> {
    std::fs::create_dir_all(RUN_ROOT)?;
    for _ in 0..100 {
        let id = format!("{:06x}", crate::probe::rand32() & 0xff_ffff);
        let dir = Path::new(RUN_ROOT).join(&id);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context("creating run dir"),
        }
    }
    bail!("no free run id")
}

fn find_serve_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZT_TESTBED_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    if exe.file_name().is_some_and(|n| n == "zt-testbed") {
        return Some(exe);
    }
    let dir = exe.parent()?;
    [dir.join("zt-testbed"), dir.parent()?.join("zt-testbed")]
        .into_iter()
        .find(|p| p.is_file())
}

impl Testbed {
    /// Build the test bed from a manifest directory (or file): one netns per node
    /// (`spec.nodeName`, default "node1") and per pod with an IP, veths, routes,
    /// cgroups and servers. Returns when every server listens.
    pub fn up(manifests_dir: &Path, opts: TestbedOptions) -> Result<Testbed> {
        let m = Manifests::load(manifests_dir)?;
        if opts.sweep {
            if let Err(e) = sweep_stale() {
                eprintln!("zt-testbed: sweep_stale: {e:#}");
            }
        }
        let (run_id, run_dir) = new_run_id()?;
        let tmp_dir = opts.tmp_root.join(format!("zt-testbed-{run_id}"));
        let cg_root = match &opts.cgroup_root {
            Some(p) => p.clone(),
            None => sys::cgroup2_root()?,
        };
        let cgroup_base = cg_root.join(format!("zt-test-{run_id}"));
        // Owner record first: from now on a crash leaves something sweep_stale can clean.
        let start = sys::proc_start_time(std::process::id()).unwrap_or(0);
        std::fs::write(
            run_dir.join("owner"),
            format!(
                "pid={}\nstart={start}\ntmp={}\ncgroup={}\n",
                std::process::id(),
                tmp_dir.display(),
                cgroup_base.display()
            ),
        )?;
        let serve_bin = opts.serve_bin.clone().or_else(find_serve_bin);
        let tb = Testbed {
            run_id: run_id.clone(),
            run_dir,
            tmp_dir,
            cgroup_base,
            manifests_dir: manifests_dir.to_path_buf(),
            serve_bin,
            opts,
            state: Mutex::new(State {
                topo: Topology {
                    run_id,
                    nodes: vec![],
                    pods: vec![],
                },
                servers: HashMap::new(),
                next_pod: 0,
                agents: vec![],
                agent_seq: 0,
            }),
        };
        // From here on, Drop cleans up on error.
        std::fs::create_dir_all(&tb.tmp_dir)?;
        std::fs::create_dir_all(&tb.cgroup_base)
            .with_context(|| format!("creating cgroup {}", tb.cgroup_base.display()))?;
        if tb.opts.start_servers && tb.serve_bin.as_ref().is_none_or(|b| !b.is_file()) {
            bail!("zt-testbed binary for pod servers not found (set TestbedOptions::serve_bin or ZT_TESTBED_BIN; got {:?})", tb.serve_bin);
        }
        for n in &m.nodes {
            tb.add_node_inner(&n.name, n.ipv4, n.ipv6)?;
        }
        for p in &m.pods {
            if !p.ips().is_empty() {
                tb.add_pod(p.clone())?;
            }
        }
        if tb.lock().topo.nodes.is_empty() {
            tb.add_node_inner(crate::manifest::DEFAULT_NODE, None, None)?;
        }
        tb.save_topology()?;
        Ok(tb)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save_topology(&self) -> Result<()> {
        let t = self.lock().topo.clone();
        t.save(&self.run_dir.join("topology.json"))
    }

    /// Each node has its own pods' cgroup root, as on real nodes: an agent's cgroup
    /// programs must never see another node's pods (they would be unknown there).
    pub fn kubepods_dir(&self, node: &str) -> PathBuf {
        self.cgroup_base.join(format!("node-{}", sanitize(node))).join("kubepods")
    }

    /// The unique run id (6 hex chars) used in every name.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }
    /// Temp dir of this run (logs, agent bpffs/state dirs).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }
    /// The manifests directory the bed was built from.
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests_dir
    }
    /// A node's pods' cgroup root ([`Self::kubepods_dir`]) as its agent must name it: agents
    /// run under `ip netns exec`, whose fresh /sys hides the cgroup2 mount, so the path
    /// goes through this process's root, `/proc/<pid>/root/...` (our mount namespace).
    pub fn agent_cgroup_root(&self, node: &str) -> PathBuf {
        let inner = self.kubepods_dir(node);
        let rel = inner.strip_prefix("/").unwrap_or(&inner);
        PathBuf::from(format!("/proc/{}/root", std::process::id())).join(rel)
    }

    /// `<cgroup root>/zt-test-<run>`; pods live in `<this>/node-<node>/kubepods/pod<uid>`.
    pub fn cgroup_base(&self) -> &Path {
        &self.cgroup_base
    }
    /// Snapshot of nodes and pods.
    pub fn topology(&self) -> Topology {
        self.lock().topo.clone()
    }
    /// All nodes.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.lock().topo.nodes.clone()
    }
    /// A node by name.
    pub fn node(&self, name: &str) -> Option<NodeInfo> {
        self.lock().topo.node(name).cloned()
    }
    /// A node's IP of a family.
    pub fn node_ip(&self, node: &str, f: Family) -> Option<IpAddr> {
        self.node(node).map(|n| n.ip(f))
    }
    /// All pods (with IPs) currently set up.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.lock().topo.pods.clone()
    }
    /// A pod by namespace/name.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.lock().topo.pod(namespace, name).cloned()
    }
    /// A pod's IP of a family.
    pub fn pod_ip(&self, namespace: &str, name: &str, f: Family) -> Option<IpAddr> {
        self.pod(namespace, name).and_then(|p| p.ip(f))
    }
    /// Host-side veth (in the node netns) of a pod.
    pub fn host_veth(&self, namespace: &str, name: &str) -> Option<String> {
        self.pod(namespace, name).map(|p| p.host_veth)
    }
    /// The netns name of a pod or node.
    pub fn netns_name(&self, ep: &Endpoint) -> Result<String> {
        self.lock().topo.netns_of(ep)
    }
    /// `/run/netns/<name>` of a pod or node.
    pub fn netns_path(&self, ep: &Endpoint) -> Result<PathBuf> {
        Ok(sys::netns_path(&self.netns_name(ep)?))
    }
    /// The address a target resolves to.
    pub fn resolve(&self, t: &Target) -> Result<IpAddr> {
        self.lock().topo.ip_of(t)
    }

    fn add_node_inner(
        &self,
        name: &str,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<NodeInfo> {
        if let Some(n) = self.node(name) {
            return Ok(n);
        }
        let index = self.lock().topo.nodes.len() as u32 + 1;
        if index > 250 {
            bail!("too many nodes");
        }
        let node = NodeInfo {
            name: name.to_string(),
            index,
            netns: format!("zt{}-{}", self.run_id, sanitize(name)),
            ipv4: ipv4.unwrap_or(Ipv4Addr::new(10, 255, 0, index as u8)),
            ipv6: ipv6.unwrap_or(Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, index as u16)),
            host_if: NODE_IF.into(),
        };
        let ns = node.netns.as_str();
        sys::ip(&["netns", "add", ns])?;
        self.lock().topo.nodes.push(node.clone());
        sys::sysctls_in(
            &node.netns_path(),
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.ping_group_range", "0 2147483647"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        sys::ipn(ns, &["link", "set", "lo", "up"])?;
        // The node IPs live on a dummy interface; kernels without the dummy driver get
        // them on lo instead (same routing behaviour).
        let dev = match sys::ipn(ns, &["link", "add", NODE_IF, "type", "dummy"]) {
            Ok(()) => NODE_IF,
            Err(_) => "lo",
        };
        sys::ipn(
            ns,
            &["addr", "add", &format!("{}/32", node.ipv4), "dev", dev],
        )?;
        sys::ipn(
            ns,
            &[
                "addr",
                "add",
                &format!("{}/128", node.ipv6),
                "dev",
                dev,
                "nodad",
            ],
        )?;
        sys::ipn(ns, &["link", "set", dev, "up"])?;
        if let Some(n) = self
            .lock()
            .topo
            .nodes
            .iter_mut()
            .find(|n| n.name == node.name)
        {
            n.host_if = dev.to_string();
        }
        let nodes = self.nodes();
        if nodes.len() == 2 {
            // Second node: make the fabric and connect both.
            for n in &nodes {
                self.join_fabric(n)?;
            }
        } else if nodes.len() > 2 {
            self.join_fabric(&node)?;
        }
        Ok(self.node(name).unwrap_or(node))
    }

    fn fabric_ns(&self) -> String {
        format!("zt{}-_fabric", self.run_id)
    }

    /// Multi-node fabric: netns `zt<run>-_fabric` with bridge `br0`; node k gets
    /// `fabric0` = 10.254.0.k/24, fd00:254::k/64, and routes to the other nodes' IPs and
    /// pod IPs via their fabric addresses.
    fn join_fabric(&self, node: &NodeInfo) -> Result<()> {
        let fns = self.fabric_ns();
        if !sys::netns_path(&fns).exists() {
            sys::ip(&["netns", "add", &fns])?;
            sys::ipn(&fns, &["link", "add", "br0", "type", "bridge"])?;
            sys::ipn(&fns, &["link", "set", "br0", "up"])?;
        }
        let port = format!("ztf{}{}", self.run_id, node.index);
        sys::ipn(
            &fns,
            &[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                FABRIC_IF,
                "netns",
                &node.netns,
            ],
        )?;
        sys::ipn(&fns, &["link", "set", &port, "master", "br0", "up"])?;
        let (f4, f6) = fabric_ips(node.index);
        sys::ipn(
            &node.netns,
            &["addr", "add", &format!("{f4}/24"), "dev", FABRIC_IF],
        )?;
        sys::ipn(
            &node.netns,
            &[
                "addr",
                "add",
                &format!("{f6}/64"),
                "dev",
                FABRIC_IF,
                "nodad",
            ],
        )?;
        sys::ipn(&node.netns, &["link", "set", FABRIC_IF, "up"])?;
        let topo = self.topology();
        for other in topo.nodes.iter().filter(|o| o.name != node.name) {
            // Only nodes already on the fabric (the first one joins before the second).
            let on_fabric = sys::ipn(&other.netns, &["link", "show", FABRIC_IF]).is_ok();
            if !on_fabric {
                continue;
            }
            self.fabric_routes(node, other, &topo, true);
            self.fabric_routes(other, node, &topo, true);
        }
        Ok(())
    }

    /// Add (or delete) in `at` the routes to `to`'s node IPs and pods via the fabric.
    fn fabric_routes(&self, at: &NodeInfo, to: &NodeInfo, topo: &Topology, add: bool) {
        let (g4, g6) = fabric_ips(to.index);
        let mut dst: Vec<IpAddr> = vec![IpAddr::V4(to.ipv4), IpAddr::V6(to.ipv6)];
        for p in topo.pods.iter().filter(|p| p.pod.node == to.name) {
            dst.extend(p.pod.ips());
        }
        for d in dst {
            self.fabric_route(at, d, g4, g6, add);
        }
    }

    fn fabric_route(&self, at: &NodeInfo, dst: IpAddr, g4: Ipv4Addr, g6: Ipv6Addr, add: bool) {
        let op = if add { "replace" } else { "del" };
        let r = match dst {
            IpAddr::V4(d) => sys::ipn(
                &at.netns,
                &["route", op, &format!("{d}/32"), "via", &g4.to_string()],
            ),
            IpAddr::V6(d) => sys::ipn(
                &at.netns,
                &[
                    "-6",
                    "route",
                    op,
                    &format!("{d}/128"),
                    "via",
                    &g6.to_string(),
                ],
            ),
        };
        if let Err(e) = r {
            eprintln!("zt-testbed fabric: {e:#}");
        }
    }

    /// Routes in every other fabric node to a pod's IPs (add or delete).
    fn fabric_pod_routes(&self, pod: &Pod, add: bool) {
        let topo = self.topology();
        let Some(home) = topo.node(&pod.node) else {
            return;
        };
        if topo.nodes.len() < 2 {
            return;
        }
        let (g4, g6) = fabric_ips(home.index);
        for other in topo.nodes.iter().filter(|o| o.name != home.name) {
            for ip in pod.ips() {
                self.fabric_route(other, ip, g4, g6, add);
            }
        }
    }

    /// Add a pod at runtime (netns, veth, routes, cgroup, server). Its node netns is
    /// created if new. The pod must have at least one IP.
    pub fn add_pod(&self, pod: Pod) -> Result<PodInfo> {
        self.add_pod_with(pod, |_| Ok(()))
    }

    /// [`Testbed::add_pod`] that runs `before_start` once the pod's network is set up
    /// and before its server starts (where a container runtime runs the CNI plugins).
    /// An error from it fails (and removes) the pod.
    pub fn add_pod_with(
        &self,
        pod: Pod,
        before_start: impl FnOnce(&PodInfo) -> Result<()>,
    ) -> Result<PodInfo> {
        if pod.ips().is_empty() {
            bail!("pod {} has no IP", pod.key());
        }
        {
            let g = self.lock();
            if g.topo.pod(&pod.namespace, &pod.name).is_some() {
                bail!("pod {} already exists", pod.key());
            }
            for other in &g.topo.pods {
                for ip in pod.ips() {
                    if other.pod.ips().contains(&ip) {
                        bail!(
                            "pod {}: IP {ip} already used by {}",
                            pod.key(),
                            other.pod.key()
                        );
                    }
                }
            }
        }
        let node = self.add_node_inner(&pod.node, None, None)?;
        let idx = {
            let mut g = self.lock();
            g.next_pod += 1;
            g.next_pod - 1
        };
        let info = PodInfo {
            idx,
            netns: format!("zt{}-p{idx}", self.run_id),
            host_veth: format!("zth{}{idx}", self.run_id),
            cgroup: self.kubepods_dir(&node.name).join(format!("pod{}", pod.uid)),
            server_pid: 0,
            pod,
        };
        if info.host_veth.len() > 15 {
            bail!("interface name {} too long", info.host_veth);
        }
        // Register before creating anything so a failure is cleaned up by remove/drop.
        self.lock().topo.pods.push(info.clone());
        match self.setup_pod(&info, &node, Box::new(before_start)) {
            Ok(pid) => {
                let mut g = self.lock();
                let mut out = info.clone();
                if let Some(p) = g.topo.pods.iter_mut().find(|p| p.idx == idx) {
                    p.server_pid = pid;
                    out = p.clone();
                }
                drop(g);
                self.save_topology()?;
                Ok(out)
            }
            Err(e) => {
                let _ = self.remove_pod(&info.pod.namespace, &info.pod.name);
                Err(e.context(format!("setting up pod {}", info.pod.key())))
            }
        }
    }

    fn setup_pod(
        &self,
        info: &PodInfo,
        node: &NodeInfo,
        before_start: BeforeStart<'_>,
    ) -> Result<u32> {
        let (pns, nns, hv) = (
            info.netns.as_str(),
            node.netns.as_str(),
            info.host_veth.as_str(),
        );
        sys::ip(&["netns", "add", pns])?;
        sys::sysctls_in(
            &info.netns_path(),
            &[
                ("net.ipv4.ping_group_range", "0 2147483647"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ],
        )?;
        sys::ipn(pns, &["link", "set", "lo", "up"])?;
        sys::ipn(
            nns,
            &[
                "link", "add", hv, "type", "veth", "peer", "name", "eth0", "netns", pns,
            ],
        )?;
        let _ = sys::sysctls_in(
            &node.netns_path(),
            &[(&format!("net.ipv6.conf.{hv}.accept_dad"), "0")],
        );
        sys::ipn(nns, &["addr", "add", "fe80::1/64", "dev", hv, "nodad"])?;
        sys::ipn(nns, &["link", "set", hv, "up"])?;
        let nv4 = node.ipv4.to_string();
        if let Some(v4) = info.pod.ipv4 {
            sys::ipn(pns, &["addr", "add", &format!("{v4}/32"), "dev", "eth0"])?;
        }
        if let Some(v6) = info.pod.ipv6 {
            sys::ipn(
                pns,
                &["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"],
            )?;
        }
        sys::ipn(pns, &["link", "set", "eth0", "up"])?;
        if let Some(v4) = info.pod.ipv4 {
            sys::ipn(pns, &["route", "add", &nv4, "dev", "eth0", "scope", "link"])?;
            sys::ipn(
                pns,
                &["route", "add", "default", "via", &nv4, "dev", "eth0"],
            )?;
            sys::ipn(
                nns,
                &["route", "add", &format!("{v4}/32"), "dev", hv, "src", &nv4],
            )?;
        }
        if let Some(v6) = info.pod.ipv6 {
            sys::ipn(
                pns,
                &[
                    "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
                ],
            )?;
            sys::ipn(
                nns,
                &["-6", "route", "add", &format!("{v6}/128"), "dev", hv],
            )?;
        }
        std::fs::create_dir_all(&info.cgroup)
            .with_context(|| format!("creating cgroup {}", info.cgroup.display()))?;
        // The other nodes' routes to the pod are in place before the runtime's last
        // plugin runs (the cluster's network set them up), so that the pod can talk
        // across nodes the moment ADD returns.
        self.fabric_pod_routes(&info.pod, true);
        before_start(info)?;
        if !self.opts.start_servers {
            return Ok(0);
        }
        self.start_server(info)
    }

    fn start_server(&self, info: &PodInfo) -> Result<u32> {
        let bin = self
            .serve_bin
            .as_ref()
            .ok_or_else(|| anyhow!("no serve binary"))?;
        let log = self.tmp_dir.join(format!("serve-p{}.log", info.idx));
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--netns")
            .arg(info.netns_path())
            .arg("--cgroup")
            .arg(&info.cgroup)
            .arg("--ident")
            .arg(info.pod.key());
        for p in &info.pod.ports {
            let flag = match p.proto {
                _ if p.is_echo() => "--echo",
                Proto::Tcp => "--tcp",
                Proto::Udp => "--udp",
                Proto::Sctp => "--sctp",
                Proto::Icmp => continue,
            };
            cmd.arg(flag).arg(p.port.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child.id();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        self.lock().servers.insert(info.pod.key(), child);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!(
                "server for {} failed: {}",
                info.pod.key(),
                sys::tail(&log, 20)
            );
        }
        Ok(pid)
    }

    /// Remove a pod at runtime: stop its server, delete its veth and netns, remove its cgroup.
    pub fn remove_pod(&self, namespace: &str, name: &str) -> Result<()> {
        let key = format!("{namespace}/{name}");
        let (info, child, node) = {
            let mut g = self.lock();
            let i = g
                .topo
                .pods
                .iter()
                .position(|p| p.pod.namespace == namespace && p.pod.name == name);
            let Some(i) = i else { bail!("no pod {key}") };
            let info = g.topo.pods.remove(i);
            let node = g.topo.node(&info.pod.node).cloned();
            (info, g.servers.remove(&key), node)
        };
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        sys::cgroup_kill_all(&info.cgroup);
        if let Some(node) = node {
            if sys::netns_path(&node.netns).exists() {
                let _ = sys::ipn(&node.netns, &["link", "del", &info.host_veth]);
            }
        }
        self.fabric_pod_routes(&info.pod, false);
        let r1 = sys::netns_del(&info.netns);
        let r2 = sys::cgroup_remove_tree(&info.cgroup, Duration::from_secs(5));
        self.save_topology()?;
        r1?;
        r2
    }

    /// Run a command in a pod's netns (and cgroup) or a node's netns; waits for it.
    pub fn exec_in(&self, ep: &Endpoint, cmd: &[&str]) -> Result<Output> {
        let mut c = self.command_in(ep, cmd)?;
        c.stdin(Stdio::null());
        Ok(c.output()?)
    }

    /// Like [`Testbed::exec_in`] but with `sh -c script`.
    pub fn sh_in(&self, ep: &Endpoint, script: &str) -> Result<Output> {
        self.exec_in(ep, &["sh", "-c", script])
    }

    /// A `Command` (`ip netns exec <ns> cmd...`) that joins the pod's cgroup (pods) or
    /// `zt-test-<run>/exec` (nodes), so drop can always kill it. Spawn it yourself.
    pub fn command_in(&self, ep: &Endpoint, cmd: &[&str]) -> Result<Command> {
        if cmd.is_empty() {
            bail!("empty command");
        }
        let ns = self.netns_name(ep)?;
        let cg = match ep {
            Endpoint::Pod { namespace, name } => {
                self.pod(namespace, name).map(|p| p.cgroup).unwrap()
            }
            Endpoint::Node(_) => {
                let d = self.cgroup_base.join("exec");
                std::fs::create_dir_all(&d)?;
                d
            }
        };
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(cg.join("cgroup.procs"))?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns]).args(cmd);
        let procs = Arc::new(procs);
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                libc::write(procs.as_raw_fd(), b"0".as_ptr() as *const _, 1);
                Ok(())
            });
        }
        Ok(c)
    }

    /// Probe `to:port` over `proto` from a pod or node (setns thread; no process spawned).
    pub fn probe(
        &self,
        from: &Endpoint,
        to: &Target,
        proto: Proto,
        port: u16,
        timeout: Duration,
    ) -> ProbeResult {
        let (ns, ip) = {
            let g = self.lock();
            match (g.topo.netns_of(from), g.topo.ip_of(to)) {
                (Ok(ns), Ok(ip)) => (ns, ip),
                (Err(e), _) | (_, Err(e)) => return ProbeResult::Error(e.to_string()),
            }
        };
        probe_in(&sys::netns_path(&ns), ip, proto, port, timeout)
    }

    /// Run many probes in parallel (at most 32 at once) and collect a [`Matrix`].
    pub fn probe_matrix(&self, specs: &[ProbeSpec], timeout: Duration) -> Matrix {
        let topo = self.topology();
        run_matrix(&topo, specs, timeout)
    }

    /// Probe specs for every ordered pair of distinct pods, for each `(proto, port)`
    /// and each family both pods have. ICMP: use `(Proto::Icmp, 0)`.
    pub fn all_pod_pairs(&self, checks: &[(Proto, u16)], families: &[Family]) -> Vec<ProbeSpec> {
        pod_pairs(&self.topology(), checks, families)
    }

    /// Open a long-lived TCP connection from `from` to `to:port` (an echo port).
    pub fn open_tcp(
        &self,
        from: &Endpoint,
        to: &Target,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpFlow> {
        let ns = self.netns_path(from)?;
        let ip = self.resolve(to)?;
        let addr = SocketAddr::new(ip, port);
        let s = sys::in_netns(&ns, move || TcpStream::connect_timeout(&addr, timeout))??;
        s.set_nodelay(true)?;
        Ok(TcpFlow {
            reader: BufReader::new(s.try_clone()?),
            stream: s,
            seq: 0,
            peer: addr,
        })
    }

    /// Start `zt-agent` in `node`'s netns with a private bpffs instance (mounted at
    /// `<tmp>/node-<node>/bpffs`, reused across agents of the same node) and the args
    /// `--bpffs-root <bpffs>/zt --state-dir <tmp>/node-<node>/state --admin-socket
    /// <state>/admin.sock --metrics-addr 127.0.0.1:<port> --node-name <node>
    /// --manifests <dir> --cgroup-root <agent_cgroup_root>` (unless `extra_args` names
    /// one) followed by `extra_args`. Output goes to `<tmp>/agent-<n>.log`.
    pub fn start_agent(
        &self,
        node: &str,
        agent_bin: &Path,
        manifests_dir: &Path,
        extra_args: &[&str],
    ) -> Result<AgentHandle> {
        let source = ["--manifests".into(), manifests_dir.display().to_string()];
        self.spawn_agent(node, agent_bin, source, extra_args)
    }

    /// Like [`Testbed::start_agent`], but the agent watches the Kubernetes API
    /// stand-in `api`: a listener is opened in `node`'s netns and the agent gets
    /// `--kubeconfig <file>` instead of `--manifests <dir>`.
    pub fn start_agent_kube(
        &self,
        node: &str,
        agent_bin: &Path,
        api: &crate::ApiServer,
        extra_args: &[&str],
    ) -> Result<AgentHandle> {
        let ni = self.node(node).ok_or_else(|| anyhow!("no node {node}"))?;
        let listener = api.listen_in(Some(&ni.netns_path()))?;
        let kubeconfig = api.kubeconfig(&listener)?;
        let source = ["--kubeconfig".into(), kubeconfig.display().to_string()];
        self.spawn_agent(node, agent_bin, source, extra_args)
    }

    fn spawn_agent(
        &self,
        node: &str,
        agent_bin: &Path,
        source: [String; 2],
        extra_args: &[&str],
    ) -> Result<AgentHandle> {
        let ni = self.node(node).ok_or_else(|| anyhow!("no node {node}"))?;
        let (bpffs, state_dir, admin) = agent_paths(&self.tmp_dir, node);
        if !sys::mount_points().contains(&bpffs) {
            sys::mount_bpffs(&bpffs)?;
        }
        std::fs::create_dir_all(&state_dir)?;
        let cg = self.cgroup_base.join(format!("agent-{}", sanitize(node)));
        std::fs::create_dir_all(&cg)?;
        let n = {
            let mut g = self.lock();
            g.agent_seq += 1;
            g.agent_seq
        };
        let log = self.tmp_dir.join(format!("agent-{n}.log"));
        let bpffs_root = bpffs.join("zt");
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], self.opts.metrics_port));
        let mut args: Vec<String> = vec![
            "--bpffs-root".into(),
            bpffs_root.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--admin-socket".into(),
            admin.display().to_string(),
            "--metrics-addr".into(),
            metrics_addr.to_string(),
            "--node-name".into(),
            node.to_string(),
        ];
        args.extend(source);
        // The bed's pod cgroup root for the agent's cgroup programs, unless named.
        if !extra_args.contains(&"--cgroup-root") {
            args.push("--cgroup-root".into());
            let root = self.kubepods_dir(node);
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating cgroup {}", root.display()))?;
            args.push(self.agent_cgroup_root(node).display().to_string());
        }
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let bin = std::fs::canonicalize(agent_bin)
            .with_context(|| format!("agent binary {}", agent_bin.display()))?;
        let mut inner = AgentInner {
            node: node.into(),
            netns: ni.netns.clone(),
            bin,
            args,
            log: log.clone(),
            state_dir: state_dir.clone(),
            bpffs_root: bpffs_root.clone(),
            admin_socket: admin.clone(),
            metrics_addr,
            cgroup: cg,
            child: None,
        };
        inner.spawn()?;
        let inner = Arc::new(Mutex::new(inner));
        self.lock().agents.push(inner.clone());
        Ok(AgentHandle {
            inner,
            bpffs_root,
            state_dir,
            admin_socket: admin,
            log_path: log,
            node: node.into(),
        })
    }

    /// Copy the manifests directory into `<tmp>/manifests` (once) and return it, for
    /// tests that change the manifests an agent reads.
    pub fn manifests_copy(&self) -> Result<PathBuf> {
        let dst = self.tmp_dir.join("manifests");
        if !dst.exists() {
            copy_dir(&self.manifests_dir, &dst)?;
        }
        Ok(dst)
    }

    fn cleanup(&mut self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for a in g.agents.drain(..) {
            let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
            a.stop(Duration::from_secs(3));
        }
        for (_, mut c) in g.servers.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        sys::cgroup_kill_all(&self.cgroup_base);
        for p in &g.topo.pods {
            if let Err(e) = sys::netns_del(&p.netns) {
                eprintln!("zt-testbed cleanup: {e:#}");
            }
        }
        for n in &g.topo.nodes {
            if let Err(e) = sys::netns_del(&n.netns) {
                eprintln!("zt-testbed cleanup: {e:#}");
            }
        }
        // Anything else with our prefix (e.g. half-made pods).
        let prefix = format!("zt{}-", self.run_id);
        for ns in sys::netns_list() {
            if ns.starts_with(&prefix) {
                let _ = sys::netns_del(&ns);
            }
        }
        g.topo.pods.clear();
        g.topo.nodes.clear();
        drop(g);
        if let Err(e) = sys::cgroup_remove_tree(&self.cgroup_base, Duration::from_secs(5)) {
            eprintln!("zt-testbed cleanup: {e:#}");
        }
        sys::umount_below(&self.tmp_dir);
        if self.opts.keep_tmp {
            eprintln!("zt-testbed: keeping {}", self.tmp_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn copy_dir(src: &Path, dst: &Path) -> Result<()> {
    if src.is_file() {
        std::fs::create_dir_all(dst)?;
        std::fs::copy(src, dst.join(src.file_name().unwrap()))?;
        return Ok(());
    }
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else {
            std::fs::copy(e.path(), to)?;
        }
    }
    Ok(())
}

/// Probe from inside the netns at `netns` (a setns thread).
pub fn probe_in(
    netns: &Path,
    ip: IpAddr,
    proto: Proto,
    port: u16,
    timeout: Duration,
) -> ProbeResult {
    match sys::in_netns(netns, move || probe_here(ip, proto, port, timeout)) {
        Ok(r) => r,
        Err(e) => ProbeResult::Error(format!("{e:#}")),
    }
}

/// Run probes in parallel against a topology (used by [`Testbed::probe_matrix`] and the CLI).
pub fn run_matrix(topo: &Topology, specs: &[ProbeSpec], timeout: Duration) -> Matrix {
    let jobs: Vec<Result<(PathBuf, IpAddr)>> = specs
        .iter()
        .map(|s| {
            Ok((
                sys::netns_path(&topo.netns_of(&s.from)?),
                topo.ip_of(&s.to)?,
            ))
        })
        .collect();
    let results: Vec<Mutex<Option<ProbeResult>>> = specs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let workers = specs.len().clamp(1, 32);
    std::thread::scope(|sc| {
        for _ in 0..workers {
            sc.spawn(|| {
                let mut cur: Option<PathBuf> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= specs.len() {
                        break;
                    }
                    let r = match &jobs[i] {
                        Err(e) => ProbeResult::Error(e.to_string()),
                        Ok((ns, ip)) => {
                            let entered = if cur.as_ref() == Some(ns) {
                                Ok(())
                            } else {
                                sys::setns_net(ns).map(|_| cur = Some(ns.clone()))
                            };
                            match entered {
                                Ok(()) => probe_here(*ip, specs[i].proto, specs[i].port, timeout),
                                Err(e) => ProbeResult::Error(format!("{e:#}")),
                            }
                        }
                    };
                    *results[i].lock().unwrap() = Some(r);
                }
            });
        }
    });
    Matrix {
        results: specs
            .iter()
            .cloned()
            .zip(results.into_iter().map(|m| {
                m.into_inner()
                    .unwrap()
                    .unwrap_or(ProbeResult::Error("not run".into()))
            }))
            .collect(),
    }
}

/// See [`Testbed::all_pod_pairs`].
pub fn pod_pairs(topo: &Topology, checks: &[(Proto, u16)], families: &[Family]) -> Vec<ProbeSpec> {
    let mut out = vec![];
    for &(proto, port) in checks {
        for &fam in families {
            for a in &topo.pods {
                for b in &topo.pods {
                    if a.idx == b.idx || a.ip(fam).is_none() || b.ip(fam).is_none() {
                        continue;
                    }
                    out.push(ProbeSpec::new(
                        Endpoint::pod(&a.pod.namespace, &a.pod.name),
                        Target::pod(&b.pod.namespace, &b.pod.name, fam),
                        proto,
                        port,
                    ));
                }
            }
        }
    }
    out
}

/// A long-lived TCP connection to an echo server port (container port named "echo*").
pub struct TcpFlow {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    seq: u64,
    /// The server address.
    pub peer: SocketAddr,
}

impl TcpFlow {
    /// Send a numbered line and wait for its echo; false on timeout, error or EOF.
    /// Late echoes of earlier (timed-out) lines are skipped.
    pub fn roundtrip(&mut self, timeout: Duration) -> bool {
        self.seq += 1;
        let want = format!("zt-flow {}", self.seq);
        if self
            .stream
            .write_all(format!("{want}\n").as_bytes())
            .is_err()
        {
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.reader.get_ref().set_read_timeout(Some(left));
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return false,
                Ok(_) if line.trim_end() == want => return true,
                Ok(_) => continue,
                // A timed-out partial line stays in `line` and is dropped; fine for a probe.
                Err(_) => return false,
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Close the connection.
    pub fn close(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Remove leftovers of earlier test beds whose owner process is dead: their processes
/// (cgroup), netns `zt<run>-*`, bpffs mounts, temp dirs, cgroups and run dirs.
/// Returns a description of what was removed.
pub fn sweep_stale() -> Result<Vec<String>> {
    let mut removed = vec![];
    let mut live: Vec<String> = vec![];
    let mut stale: Vec<(String, Option<PathBuf>, Option<PathBuf>)> = vec![];
    if let Ok(rd) = std::fs::read_dir(RUN_ROOT) {
        for e in rd.flatten() {
            let run = e.file_name().to_string_lossy().to_string();
            let owner = std::fs::read_to_string(e.path().join("owner")).unwrap_or_default();
            let field = |k: &str| {
                owner
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
            };
            let pid: Option<u32> = field("pid").and_then(|p| p.parse().ok());
            let start: Option<u64> = field("start").and_then(|p| p.parse().ok());
            let alive = match (pid, start) {
                (Some(pid), Some(start)) => {
                    sys::proc_start_time(pid).is_some_and(|s| start == 0 || s == start)
                }
                _ => {
                    // Owner file not written yet? Give a starting run a minute.
                    let age = e
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    age.is_none_or(|a| a < Duration::from_secs(60))
                }
            };
            if alive {
                live.push(run);
            } else {
                stale.push((
                    run,
                    field("tmp").map(PathBuf::from),
                    field("cgroup").map(PathBuf::from),
                ));
            }
        }
    }
    let is_run_ns = |ns: &str| {
        ns.len() > 9
            && ns.starts_with("zt")
            && ns.as_bytes()[8] == b'-'
            && ns[2..8].chars().all(|c| c.is_ascii_hexdigit())
    };
    // Netns of runs without a live owner (also those whose run dir is gone).
    let cg_root = sys::cgroup2_root().ok();
    // Kill their processes first (servers, agents, exec'd commands all live in the run's cgroup).
    for (run, _, cg) in &stale {
        if let Some(cg) = cg
            .clone()
            .or_else(|| cg_root.as_ref().map(|r| r.join(format!("zt-test-{run}"))))
        {
            sys::cgroup_kill_all(&cg);
        }
    }
    // A run that started after the scan above has a run dir (made before anything
    // else, removed last): only runs known stale, or without a run dir, are orphans.
    // Without this re-check a sweep in one test could delete another test's new bed.
    let stale_ids: Vec<&str> = stale.iter().map(|s| s.0.as_str()).collect();
    let orphan = |run: &str| {
        !live.iter().any(|r| r == run)
            && (stale_ids.contains(&run) || !Path::new(RUN_ROOT).join(run).exists())
    };
    for ns in sys::netns_list() {
        if is_run_ns(&ns) && orphan(&ns[2..8]) {
            match sys::netns_del(&ns) {
                Ok(()) => removed.push(format!("netns {ns}")),
                Err(e) => eprintln!("sweep: {e:#}"),
            }
        }
    }
    // Temp dirs (unmount bpffs first).
    let tmp_root = std::env::temp_dir();
    let mut tmps: Vec<PathBuf> = stale.iter().filter_map(|s| s.1.clone()).collect();
    if let Ok(rd) = std::fs::read_dir(&tmp_root) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if let Some(run) = n.strip_prefix("zt-testbed-") {
                if run.len() == 6 && orphan(run) && !tmps.contains(&e.path()) {
                    tmps.push(e.path());
                }
            }
        }
    }
    for t in tmps {
        sys::umount_below(&t);
        if t.exists() && std::fs::remove_dir_all(&t).is_ok() {
            removed.push(format!("dir {}", t.display()));
        }
    }
    // Mounts left anywhere with a stale run's temp dir name.
    for m in sys::mount_points() {
        let s = m.display().to_string();
        if let Some(pos) = s.find("zt-testbed-") {
            let run = &s[pos + 11..(pos + 17).min(s.len())];
            if orphan(run) {
                sys::umount_below(&m);
                removed.push(format!("mount {s}"));
            }
        }
    }
    // cgroups.
    let mut cgs: Vec<PathBuf> = stale.iter().filter_map(|s| s.2.clone()).collect();
    if let Some(root) = &cg_root {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if let Some(run) = n.strip_prefix("zt-test-") {
                    if orphan(run) && !cgs.contains(&e.path()) {
                        cgs.push(e.path());
                    }
                }
            }
        }
    }
    for cg in cgs {
        if cg.exists() {
            sys::cgroup_kill_all(&cg);
            match sys::cgroup_remove_tree(&cg, Duration::from_secs(3)) {
                Ok(()) => removed.push(format!("cgroup {}", cg.display())),
                Err(e) => eprintln!("sweep: {e:#}"),
            }
        }
    }
    for (run, _, _) in &stale {
        let _ = std::fs::remove_dir_all(Path::new(RUN_ROOT).join(run));
        removed.push(format!("run {run}"));
    }
    Ok(removed)
}
