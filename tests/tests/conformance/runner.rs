//! Runs the cases: one test bed for the whole suite, the agent(s) started through
//! [`AgentInput`], each step's cluster state written to the agent's input, then the
//! matrix probed until it matches the oracle or a short deadline passes.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use zt_testbed::kubeproxy::{self, Choice, Objects};
use zt_testbed::{bins, AgentHandle, ApiServer, Endpoint, Family, Matrix, PodProbers, ProbeResult, ProbeSpec, Proto, Target, Testbed, TestbedOptions};

use super::cases::{self, Act, Case};
use super::common::{lab, tail};
use super::model::{Cluster, ModelPod};
use super::oracle;

pub const LAB: &str = "netpol-matrix";
/// Probe timeout: a denied probe costs this much, every round of a step with one. An
/// allowed probe on the bed's veths answers within milliseconds; one that misses it only
/// costs another round (see [`check_step`]).
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long the agent may take to pick up a change (it polls every 100 ms here).
const APPLY_DEADLINE: Duration = Duration::from_secs(5);
/// After a compile that changes no map entry: how long to let the same pass finish.
const APPLY_GRACE: Duration = Duration::from_millis(300);
/// How long a step may take to converge after the agent applied it.
const MATCH_DEADLINE: Duration = Duration::from_secs(3);
const FAMILIES: [Family; 2] = [Family::V4, Family::V6];
/// The case families run through Services by default (see [`run_suite`]).
pub const SERVICE_FAMILIES: [&str; 3] = ["upstream-tcp", "upstream-udp", "gen-peers"];

/// How the agents get the cluster state. Every variant reads what [`Input::write`]
/// puts into the bed's manifests dir.
#[derive(Clone, Copy, Debug)]
pub enum AgentInput {
    /// `zt-agent --manifests <dir>` (the directory source).
    ManifestsDir,
    /// `zt-agent --kubeconfig <file>` (the Kubernetes source) against the API stand-in
    /// ([`ApiServer`]), which serves the objects of the manifests dir.
    ApiServer,
}

impl std::fmt::Display for AgentInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentInput::ManifestsDir => "manifests-dir",
            AgentInput::ApiServer => "api-server",
        })
    }
}

/// Where the probes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The destination pod's IP, from a test thread in the source pod's netns.
    PodIp,
    /// As upstream's suite probes: the destination pod's own Service `s-<ns>-<pod>`
    /// (its ClusterIP, port = targetPort), from a process inside the source pod's netns
    /// and cgroup; kube-proxy's nftables rules (the test bed's renderer, random backend
    /// choice) run in every node. `translation`: zt-agent translates the frontend at the
    /// socket (`--service-translation=true`), or not (`false`: kube-proxy DNATs, zt judges
    /// the untranslated frontend).
    Service { translation: bool },
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Via::PodIp => "pod-ip",
            Via::Service { translation: true } => "service-translated",
            Via::Service { translation: false } => "service-kube-proxy",
        })
    }
}

/// The running agents and where the cluster state goes.
pub struct Input<'a> {
    tb: &'a Testbed,
    /// Service mode: every pod's Service gets these (protocol, port)s.
    service_ports: Option<Vec<(Proto, u16)>>,
    pub dir: PathBuf,
    pub agents: Vec<AgentHandle>,
    /// The API stand-in the agents watch ([`AgentInput::ApiServer`]), fed from `dir`.
    api: Option<ApiServer>,
}

impl AgentInput {
    /// Start one agent per node of the bed, fed from `dir`; returns once all are ready.
    pub fn start<'a>(self, tb: &'a Testbed, dir: &Path, via: Via, service_ports: Option<Vec<(Proto, u16)>>) -> Input<'a> {
        let bin = bins::find("zt-agent").expect("zt-agent binary (cargo build -p zt-agent)");
        // The agent loop's poll (the directory source's re-read; host addresses).
        let translation = format!("--service-translation={}", !matches!(via, Via::Service { translation: false }));
        let args = ["--poll-ms", "100", translation.as_str()];
        let (agents, api) = match self {
            AgentInput::ManifestsDir => (tb.nodes().iter().map(|n| tb.start_agent(&n.name, &bin, dir, &args).unwrap()).collect::<Vec<_>>(), None),
            AgentInput::ApiServer => {
                let api = ApiServer::start(dir).unwrap_or_else(|e| panic!("API stand-in on {}: {e:#}", dir.display()));
                let agents = tb.nodes().iter().map(|n| tb.start_agent_kube(&n.name, &bin, &api, &args).unwrap()).collect::<Vec<_>>();
                (agents, Some(api))
            }
        };
        for a in &agents {
            if let Err(e) = a.wait_ready(Duration::from_secs(30)) {
                panic!("agent not ready: {e:#}\n{}", tail(&a.log(), 30));
            }
        }
        Input { tb, service_ports, dir: dir.to_path_buf(), agents, api }
    }
}

/// What a write handed to the agents.
enum Delivered {
    /// The directory source re-reads the whole dir: one compile per agent follows.
    Dir,
    /// The API stand-in turned the write into this many watch events (one each, to every
    /// agent: they watch every object of the six kinds). 0: no object changed, so the
    /// agents have nothing to do.
    Events(u64),
}

impl Input<'_> {
    /// `cluster.yaml` in the manifests dir, written beside the dir and renamed into
    /// place so that an agent (or the stand-in) never reads half of it. The stand-in
    /// polls the dir too; `sync_now` turns the change into events at once.
    fn put(&self, c: &Cluster) -> Result<Delivered, String> {
        let rv = self.api.as_ref().map(|api| api.resource_version());
        let tmp = self.dir.with_file_name(".cluster.yaml.tmp");
        let mut text = c.to_yaml();
        if let Some(ports) = &self.service_ports {
            // Each pod's own Service, as upstream's suite makes them; kube-proxy's rules
            // follow the same objects (pods added or removed by the step).
            let svcs = service_docs(c, ports);
            let objs = Objects::parse(&svcs, "per-pod Services").unwrap();
            self.tb.kube_proxy_sync(&objs, Choice::Random).map_err(|e| format!("kube-proxy rules: {e:#}"))?;
            text = format!("{text}---\n{svcs}");
        }
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.join("cluster.yaml")).unwrap();
        let (Some(api), Some(rv)) = (&self.api, rv) else { return Ok(Delivered::Dir) };
        api.sync_now().map_err(|e| format!("the API stand-in did not load the state: {e:#}"))?;
        // One resourceVersion per event (also those its own poll made since `rv`).
        Ok(Delivered::Events(api.resource_version() - rv))
    }

    fn scrape(&self, name: &str) -> Vec<Option<f64>> {
        self.agents.iter().map(|a| a.metrics().ok().and_then(|m| metric(&m, name))).collect()
    }

    /// Watch events every agent's Kubernetes source has taken in (all kinds and types).
    fn source_events(&self) -> Vec<Option<f64>> {
        self.agents.iter().map(|a| a.metrics().ok().map(|m| metric_sum(&m, "zt_source_events_total"))).collect()
    }

    /// Wait until every agent took in `n` more watch events than `before`.
    fn wait_events(&self, before: &[Option<f64>], n: u64) -> Result<(), String> {
        let start = Instant::now();
        loop {
            let now = self.source_events();
            if now.iter().zip(before).all(|(n2, b)| matches!((n2, b), (Some(x), Some(b)) if *x >= b + n as f64)) {
                return Ok(());
            }
            if start.elapsed() > APPLY_DEADLINE {
                return Err(format!("an agent did not receive the {n} watch events within {APPLY_DEADLINE:?} (before {before:?}, now {now:?})"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Replace the cluster state and wait until every agent compiled it and wrote the
    /// maps: its compile count grew, then its map update count grew (or, for a state
    /// that changes no map entry, a grace of [`APPLY_GRACE`]: the write follows the
    /// compile within the same reconcile pass). Under the API source the agents first
    /// take in every event the write made (a state that changes no object makes none:
    /// nothing to wait for); their compile follows in the same loop pass.
    pub fn write(&self, c: &Cluster) -> Result<(), String> {
        let compiles = self.scrape("zt_policy_compile_seconds_count");
        let updates = self.scrape("zt_map_updates_total");
        let events = self.source_events();
        match self.put(c)? {
            Delivered::Dir => {}
            Delivered::Events(0) => return Ok(()),
            Delivered::Events(n) => self.wait_events(&events, n)?,
        }
        let grew = |before: &[Option<f64>], now: &[Option<f64>]| now.iter().zip(before).all(|(n, b)| matches!((n, b), (Some(n), Some(b)) if n > b));
        let start = Instant::now();
        while !grew(&compiles, &self.scrape("zt_policy_compile_seconds_count")) {
            if start.elapsed() > APPLY_DEADLINE {
                return Err(format!("an agent did not compile the new state within {APPLY_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.scrape("zt_policy_last_load_ok").iter().any(|v| *v != Some(1.0)) {
            return Err(format!("an agent rejected the state:\n{}", self.agents.iter().map(|a| tail(&a.log(), 5)).collect::<Vec<_>>().join("\n")));
        }
        let compiled = Instant::now();
        while !grew(&updates, &self.scrape("zt_map_updates_total")) && compiled.elapsed() < APPLY_GRACE {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.scrape("zt_map_errors_total").iter().any(|v| *v != Some(0.0)) {
            return Err("an agent failed to write its maps (zt_map_errors_total > 0)".into());
        }
        Ok(())
    }
}

impl Input<'_> {
    /// Write an invalid cluster state and wait until every agent rejected it
    /// (`zt_policy_errors_total` grew, `zt_policy_last_load_ok` is 0). The directory
    /// source rejects the whole load and keeps the previous state; the Kubernetes source
    /// rejects the invalid object and keeps its previous version (the rest of a change
    /// would apply). A rejected step changes only the invalid object, so both keep
    /// exactly the previous state, which the step's probes check.
    pub fn write_rejected(&self, c: &Cluster) -> Result<(), String> {
        let errors = self.scrape("zt_policy_errors_total");
        if let Delivered::Events(0) = self.put(c)? {
            return Err("the invalid state changed no object of the API stand-in".into());
        }
        let start = Instant::now();
        loop {
            let now = self.scrape("zt_policy_errors_total");
            if now.iter().zip(&errors).all(|(n, b)| matches!((n, b), (Some(n), Some(b)) if n > b)) {
                break;
            }
            if start.elapsed() > APPLY_DEADLINE {
                return Err(format!("an agent did not reject the invalid state within {APPLY_DEADLINE:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // A scrape that failed (None: the agent busy past the read timeout) is asked again;
        // a value other than 0 fails at once.
        let ok = loop {
            let v = self.scrape("zt_policy_last_load_ok");
            if v.iter().all(Option::is_some) || start.elapsed() > APPLY_DEADLINE {
                break v;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if ok.iter().any(|v| *v != Some(0.0)) {
            return Err(format!("zt_policy_last_load_ok is not 0 after a rejected state (per agent: {ok:?})"));
        }
        Ok(())
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sum over every label set of `name` (0 if it has none yet).
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// Every pod's own Service `s-<ns>-<pod>` and its EndpointSlices (see
/// [`kubeproxy::pod_service_yaml`]).
fn service_docs(c: &Cluster, ports: &[(Proto, u16)]) -> String {
    let mut docs = vec![];
    for (p, mp) in c.pods.iter().zip(c.model_pods()) {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| "node1".into());
        docs.push(kubeproxy::pod_service_yaml(&mp.namespace, &mp.name, &node, &mp.ips, ports));
    }
    docs.join("---\n")
}

/// Fill `{ip:ns/pod}` (the pod's IPv4 /32) and `{big:ns/pod}` (the /4 around it).
pub fn substitute(text: &str, pods: &[ModelPod]) -> String {
    let mut out = text.to_string();
    for p in pods {
        let IpAddr::V4(v4) = p.ip(true).unwrap() else { unreachable!() };
        let big = std::net::Ipv4Addr::from(u32::from(v4) & 0xf000_0000);
        out = out.replace(&format!("{{ip:{}}}", p.key()), &format!("{v4}/32"));
        out = out.replace(&format!("{{big:{}}}", p.key()), &format!("{big}/4"));
    }
    assert!(!out.contains("{ip:") && !out.contains("{big:"), "unknown placeholder in {text}");
    out
}

/// Apply a step's changes to the model (`base`: the lab's state).
pub fn apply(c: &mut Cluster, acts: &[Act], base: &Cluster) {
    let pods = base.model_pods();
    let pods = &pods[..];
    for a in acts {
        match a {
            Act::Put(y) => {
                let np: NetworkPolicy = serde_yaml::from_str(&substitute(y, pods)).unwrap_or_else(|e| panic!("bad policy YAML ({e}):\n{y}"));
                c.put_policy(np);
            }
            Act::Delete(ns, name) => {
                assert!(c.policies.remove(&(ns.to_string(), name.to_string())).is_some(), "no policy {ns}/{name} to delete");
            }
            Act::DeleteAll => c.policies.clear(),
            Act::PodLabel(p, k, v) => c.label_pod(p, k, *v),
            Act::NsLabel(ns, k, v) => c.label_namespace(ns, k, *v),
            Act::AddPod(key, node) => c.add_pod(key, node, base),
            Act::RemovePod(key) => c.remove_pod(key),
        }
    }
}

/// What a probe must find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Allowed and served: the server's reply.
    Reached,
    /// Allowed, nothing serves the port: RST / ICMP port unreachable / ABORT.
    Refused,
    /// Denied: a silent drop (a timeout; a policy never answers with an error).
    Dropped,
}

impl Want {
    fn cell(self) -> &'static str {
        match self {
            Want::Reached => ".",
            Want::Refused => "R",
            Want::Dropped => "X",
        }
    }
}

/// One probe of a step: what it must find, and which pod must answer (`ns/name`).
pub struct Probe {
    pub spec: ProbeSpec,
    pub want: Want,
    pub server: String,
}

/// The probes of a step (9x9 incl. each pod to itself, both families) and what each
/// must find. Through a Service the target is the destination pod's ClusterIP and the
/// oracle judges the backend (the pod) on the targetPort (= port).
pub fn expected(c: &Cluster, probes: &[(Proto, u16)], via: Via) -> Vec<Probe> {
    let pods = c.model_pods();
    let mut out = vec![];
    for &(proto, port) in probes {
        for fam in FAMILIES {
            for from in &pods {
                for to in &pods {
                    let target = match via {
                        Via::PodIp => Target::pod(&to.namespace, &to.name, fam),
                        Via::Service { .. } => Target::Ip(kubeproxy::pod_cluster_ip(to.ip(fam == Family::V4).unwrap())),
                    };
                    let spec = ProbeSpec::new(Endpoint::pod(&from.namespace, &from.name), target, proto, port);
                    let want = if !oracle::allowed(c, from, to, proto.as_str(), port as i32, fam == Family::V4) {
                        Want::Dropped
                    } else if to.serves(proto.as_str(), port as i32) {
                        Want::Reached
                    } else {
                        Want::Refused
                    };
                    out.push(Probe { spec, want, server: to.key() });
                }
            }
        }
    }
    out
}

/// Did the probe find what was wanted? (Reached also checks who answered.)
fn found(p: &Probe, want: Want, r: &ProbeResult) -> bool {
    match (want, r) {
        (Want::Reached, ProbeResult::Ok(text)) => *text == p.server,
        (Want::Refused, ProbeResult::Refused) => true,
        (Want::Dropped, ProbeResult::Timeout) => true,
        _ => false,
    }
}

/// Upstream-style tables for every (protocol, port, family) with a difference:
/// expected, observed, and the comparison ("." agree, "X" differ). Cells: "." reached,
/// "X" dropped (timeout), "R" refused, "E" error.
pub fn diff_tables(want: &[Probe], got: &Matrix) -> String {
    type Cells<'a> = Vec<(&'a Probe, Want, &'a ProbeResult)>;
    let mut groups: BTreeMap<(Proto, u16, Family), Cells<'_>> = BTreeMap::new();
    for (p, (_, r)) in want.iter().zip(&got.results) {
        groups.entry((p.spec.proto, p.spec.port, p.spec.to.family())).or_default().push((p, p.want, r));
    }
    let mut s = String::new();
    for ((proto, port, fam), cells) in groups {
        if cells.iter().all(|(sp, w, r)| found(sp, *w, r)) {
            continue;
        }
        let mut cols: Vec<String> = cells.iter().map(|(p, _, _)| p.server.clone()).collect();
        cols.sort();
        cols.dedup();
        let mut rows: Vec<String> = cells.iter().map(|(p, _, _)| p.spec.from.to_string()).collect();
        rows.sort();
        rows.dedup();
        let cell = |row: &str, col: &str, f: &dyn Fn(Want, &Probe, &ProbeResult) -> String| -> String {
            cells.iter().find(|(p, _, _)| p.spec.from.to_string() == row && p.server == col).map(|(sp, w, r)| f(*w, sp, r)).unwrap_or_else(|| "-".into())
        };
        let table = |title: &str, f: &dyn Fn(Want, &Probe, &ProbeResult) -> String| -> String {
            let mut t = format!("{title} ({proto}/{port} {fam}):\n-\t{}\n", cols.join("\t"));
            for r in &rows {
                let line: Vec<String> = cols.iter().map(|c| cell(r, c, f)).collect();
                t.push_str(&format!("{r}\t{}\n", line.join("\t")));
            }
            t
        };
        s.push_str(&table("Expected", &|w, _, _| w.cell().into()));
        s.push_str(&table("Observed", &|_, sp, r| {
            let wrong_server = matches!(r, ProbeResult::Ok(_)) && !found(sp, Want::Reached, r);
            if wrong_server {
                "?".into()
            } else {
                r.cell().into()
            }
        }));
        s.push_str(&table("Comparison", &|w, sp, r| if found(sp, w, r) { ".".into() } else { "X".into() }));
    }
    s
}

/// Probe until the matrix matches or [`MATCH_DEADLINE`] passes; returns the mismatch
/// report (None = pass) and the number of probe rounds.
fn check_step(tb: &Testbed, probers: Option<&PodProbers>, want: &[Probe]) -> (Option<String>, usize) {
    let specs: Vec<ProbeSpec> = want.iter().map(|p| p.spec.clone()).collect();
    let start = Instant::now();
    let mut rounds = 0;
    loop {
        rounds += 1;
        let m = match probers {
            Some(p) => p.run(&specs, PROBE_TIMEOUT),
            None => tb.probe_matrix(&specs, PROBE_TIMEOUT),
        };
        let bad = want.iter().zip(&m.results).filter(|(p, (_, r))| !found(p, p.want, r)).count();
        if bad == 0 {
            return (None, rounds);
        }
        if rounds == 1 && std::env::var_os("ZT_CONFORMANCE_VERBOSE").is_some() {
            let first: Vec<String> = want
                .iter()
                .zip(&m.results)
                .filter(|(p, (_, r))| !found(p, p.want, r))
                .take(6)
                .map(|(p, (_, r))| format!("{} ({}): want {:?}, got {r}", p.spec, p.server, p.want))
                .collect();
            println!("  first round: {bad} differ, e.g. {}", first.join("; "));
        }
        if start.elapsed() >= MATCH_DEADLINE {
            return (Some(format!("{bad} of {} probes differ from the oracle:\n{}", want.len(), diff_tables(want, &m))), rounds);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Outcome {
    family: &'static str,
    name: String,
    failure: Option<String>,
    /// Probe rounds over all steps (more than one per step: the state converged late).
    rounds: usize,
}

/// Pods as the test bed has them: `ns/name@node` (a pod moved to another node is
/// another pod).
fn pod_keys(c: &Cluster) -> Vec<String> {
    c.pods
        .iter()
        .map(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            format!("{}/{}@{node}", p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or(""))
        })
        .collect()
}

fn key_of(k: &str) -> &str {
    k.split_once('@').map_or(k, |(key, _)| key)
}

/// Make the test bed's pods those of `want` (before the agents see a state with new
/// pods: start them first; removed pods go after the agents saw them leave).
fn add_bed_pods(tb: &Testbed, have: &Cluster, want: &Cluster) -> Result<(), String> {
    let have = pod_keys(have);
    for k in pod_keys(want).into_iter().filter(|k| !have.contains(k)) {
        tb.add_pod(want.bed_pod(key_of(&k))).map_err(|e| format!("adding pod {k} to the test bed: {e:#}"))?;
    }
    Ok(())
}

fn remove_bed_pods(tb: &Testbed, have: &Cluster, want: &Cluster) -> Result<(), String> {
    let want = pod_keys(want);
    for k in pod_keys(have).into_iter().filter(|k| !want.contains(k)) {
        let (ns, name) = key_of(&k).split_once('/').unwrap();
        tb.remove_pod(ns, name).map_err(|e| format!("removing pod {k} from the test bed: {e:#}"))?;
    }
    Ok(())
}

/// Bring the bed from `from` to `to`'s pods and write `to` to the agents.
fn transition(tb: &Testbed, input: &Input, from: &Cluster, to: &Cluster) -> Result<(), String> {
    add_bed_pods(tb, from, to)?;
    input.write(to)?;
    remove_bed_pods(tb, from, to)
}

fn run_case(tb: &Testbed, input: &Input, probers: Option<&PodProbers>, via: Via, base: &Cluster, case: &Case) -> Outcome {
    let mut c = base.clone();
    let mut failure = None;
    let mut total_rounds = 0;
    for (i, st) in case.steps.iter().enumerate() {
        let before = c.clone();
        apply(&mut c, &st.acts, base);
        let written = if st.rejected {
            // The invalid state goes to the agents; the model keeps the previous one.
            let invalid = std::mem::replace(&mut c, before);
            input.write_rejected(&invalid)
        } else {
            transition(tb, input, &before, &c)
        };
        if let Err(e) = written {
            failure = Some(format!("step {}: {e}", i + 1));
            break;
        }
        let want = expected(&c, &st.probes, via);
        let (bad, rounds) = check_step(tb, probers, &want);
        total_rounds += rounds;
        if let Some(report) = bad {
            let probes: Vec<String> = st.probes.iter().map(|(p, n)| format!("{p}/{n}")).collect();
            failure = Some(format!("step {} ({}) after {rounds} probe rounds: {report}", i + 1, probes.join(", ")));
            break;
        }
    }
    // Back to the lab's pods (policies and labels are reset by the next case's write).
    let (mut now, mut lab) = (pod_keys(&c), pod_keys(base));
    now.sort();
    lab.sort();
    if now != lab {
        let mut back = base.clone();
        back.policies = c.policies.clone();
        // Removals first: a moved pod keeps its name and addresses.
        let restored = remove_bed_pods(tb, &c, &back).and_then(|_| add_bed_pods(tb, &c, &back)).and_then(|_| input.write(&back));
        if let Err(e) = restored {
            panic!("restoring the lab's pods after [{}] {}: {e}", case.family, case.name);
        }
    }
    Outcome { family: case.family, name: case.name.clone(), failure, rounds: total_rounds }
}

/// Bring up the lab once, start the agents through `how`, run every case, print
/// `<family>: N passed, M failed` and the total, and fail if any case failed.
pub fn run_suite(input_kind: AgentInput, via: Via) {
    let t0 = Instant::now();
    let filter = std::env::var("ZT_CONFORMANCE_FILTER").ok();
    // Through Services: the families of SERVICE_FAMILIES unless ZT_CONFORMANCE_SERVICE_FAMILIES
    // says otherwise ("all" or a comma-separated list), to keep the suite's time in check.
    let service_families = std::env::var("ZT_CONFORMANCE_SERVICE_FAMILIES").unwrap_or_else(|_| SERVICE_FAMILIES.join(","));
    let all: Vec<Case> = cases::all()
        .into_iter()
        .filter(|c| filter.as_deref().is_none_or(|f| c.family.contains(f) || c.name.contains(f)))
        .filter(|c| via == Via::PodIp || service_families == "all" || service_families.split(',').any(|f| f == c.family))
        .collect();
    let how = match via {
        Via::PodIp => input_kind.to_string(),
        _ => format!("{input_kind}, {via}"),
    };
    assert_eq!(unsafe { libc::geteuid() }, 0, "the conformance matrix needs root");
    let opts = TestbedOptions::default().serve_bin(env!("CARGO_BIN_EXE_zt-testbed"));
    let tb = Testbed::up(&lab(LAB), opts).unwrap_or_else(|e| panic!("test bed {LAB}: {e:#}"));
    let base = Cluster::load(&lab(LAB));
    let dir = tb.tmp_dir().join("agent-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    // Nodes stay in their own file (the test bed's input; the agent may use them too).
    for e in std::fs::read_dir(lab(LAB)).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            let nodes: Vec<&str> = text.split("\n---\n").filter(|d| d.contains("kind: Node\n")).collect();
            std::fs::write(dir.join("00-nodes.yaml"), nodes.join("\n---\n")).unwrap();
        }
    }
    std::fs::write(dir.join("cluster.yaml"), base.to_yaml()).unwrap();
    let service_ports = (via != Via::PodIp).then(|| {
        let mut ports: Vec<(Proto, u16)> = all.iter().flat_map(|c| c.steps.iter().flat_map(|s| s.probes.clone())).collect();
        ports.sort();
        ports.dedup();
        ports
    });
    let input = input_kind.start(&tb, &dir, via, service_ports);
    let probers = (via != Via::PodIp).then(|| PodProbers::new(&tb, env!("CARGO_BIN_EXE_zt-testbed")));
    if via != Via::PodIp {
        input.write(&base).unwrap_or_else(|e| panic!("writing the per-pod Services: {e}"));
    }
    println!("conformance ({how}): {} cases on {} nodes, bed up in {:.1?}", all.len(), tb.nodes().len(), t0.elapsed());

    let mut outcomes = vec![];
    for case in &all {
        let t = Instant::now();
        let o = run_case(&tb, &input, probers.as_ref(), via, &base, case);
        match &o.failure {
            None => println!("PASS ({how}) [{}] {} ({} steps, {} probe rounds, {:.1?})", o.family, o.name, case.steps.len(), o.rounds, t.elapsed()),
            Some(f) => println!("FAIL ({how}) [{}] {} ({:.1?}): {f}", o.family, o.name, t.elapsed()),
        }
        outcomes.push(o);
    }
    // The probes went where the mode says: translated at the socket, or not at all.
    let translated: f64 = input
        .agents
        .iter()
        .filter_map(|a| a.metrics().ok())
        .map(|m| m.lines().filter_map(|l| l.strip_prefix("zt_service_translations_total{outcome=\"translated\"} ")?.trim().parse::<f64>().ok()).sum::<f64>())
        .sum();
    // Leave the agents with the base state (no policies) before the bed goes down.
    let _ = input.write(&base);

    let mut families: Vec<&str> = outcomes.iter().map(|o| o.family).collect();
    families.dedup();
    // One print: the suites of both sources may run at the same time.
    let mut summary = format!("\nconformance summary ({how}):\n");
    for f in &families {
        let (p, m) = outcomes.iter().filter(|o| o.family == *f).fold((0, 0), |(p, m), o| if o.failure.is_none() { (p + 1, m) } else { (p, m + 1) });
        summary.push_str(&format!("{f}: {p} passed, {m} failed\n"));
    }
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    summary.push_str(&format!("total: {} passed, {} failed\nelapsed: {:.1?}", outcomes.len() - failed.len(), failed.len(), t0.elapsed()));
    if let Via::Service { translation } = via {
        summary.push_str(&format!("\nsocket translations: {translated}"));
        let ok = if translation { translated > 0.0 } else { translated == 0.0 };
        assert!(ok, "({how}) zt_service_translations_total{{outcome=translated}} is {translated}: the probes did not take the path of this mode");
    }
    println!("{summary}");
    if !failed.is_empty() {
        for a in &input.agents {
            println!("agent log tail ({how}):\n{}", tail(&a.log(), 20));
        }
    }
    assert!(failed.is_empty(), "failed cases ({how}):\n{}", failed.iter().map(|o| format!("  [{}] {}", o.family, o.name)).collect::<Vec<_>>().join("\n"));
}
