//! `cargo xtask bench` (alone: `cargo test --release -p zt-agent --test bench_churn`): the
//! agent's pipeline under churn, in process: Pod and NetworkPolicy objects in, the
//! compiler (`compile::compile`), the map form (`Contents::from_desired`) and the map
//! writer (`sync::apply`) into real pinned maps out.
//! - compile time at 1k and 10k pods (a full compile, as the agent runs for an event
//!   that touches several namespaces);
//! - 10k identity changes: every pod of the 10k relabelled (each has an identity of its
//!   own), compiled and applied;
//! - one new pod in a 10k-pod cluster, 100 times: compile + apply until its endpoint is in
//!   the map (median, p99): the agent's part of "a new pod is enforced", without the API
//!   watch and the CNI;
//! - the same with the incremental compiler (compile::incremental), side by side, and
//!   its compile against a full compile of the same state;
//! - the memory the pipeline's state holds per pod (RSS growth of this process / pods).
//! Prints figures; asserts only that the state is what the objects say.
mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use common::*;
use zt_agent::{
    compile::{compile, incremental::{Compiler, Mode}, CompileConfig, EnforcementMode, FqdnSlots},
    identity::IdentityAllocator,
    loader::MapSizes,
    model::{source_dir::parse_manifests, ClusterState},
    net::to_key,
    sync::{apply, Capacities, Contents},
};
use zt_common::*;

const NODE: &str = "node1";
/// Pods per namespace; one in LOCAL_EVERY runs on this node.
const PER_NS: u32 = 100;
const LOCAL_EVERY: u32 = 20;

fn pod_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a01_0000 + i) // 10.1.0.0 + i
}

/// Pod `i` of generation `gen`: its own `app` label (an identity of its own), a role
/// (every 4th a server), and `version` (a relabel changes every identity).
fn pod_yaml(i: u32, gen: u32) -> String {
    let node = if i % LOCAL_EVERY == 0 { NODE.to_string() } else { format!("node{}", 2 + i % 16) };
    let role = if i % 4 == 0 { "server" } else { "client" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, uid: 00000000-0000-4000-8000-{i:012}, labels: {{app: w{i}, role: {role}, version: v{gen}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: main, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n---\n",
        ns = i / PER_NS,
        ip = pod_ip(i)
    )
}

/// Namespaces and one NetworkPolicy each: servers accept TCP 80 from their namespace's clients.
fn policy_yaml(namespaces: u32) -> String {
    let mut s = String::new();
    for n in 0..namespaces {
        s += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}}}\n---\n\
             apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: servers, namespace: ns{n}}}\n\
             spec:\n  podSelector: {{matchLabels: {{role: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{role: client}}}}}}]\n    ports: [{{protocol: TCP, port: 80}}]\n---\n"
        );
    }
    s
}

fn upsert_all(state: &mut ClusterState, yaml: &str) {
    let mut ignored = vec![];
    for (_, o) in parse_manifests("bench.yaml", yaml, &mut ignored).expect("bench manifests parse") {
        state.upsert(o);
    }
    assert!(ignored.is_empty(), "objects ignored: {}", ignored.len());
}

fn cluster(pods: u32, gen: u32) -> ClusterState {
    let mut state = ClusterState::new();
    upsert_all(&mut state, &policy_yaml(pods.div_ceil(PER_NS)));
    let mut yaml = String::new();
    for i in 0..pods {
        yaml += &pod_yaml(i, gen);
    }
    upsert_all(&mut state, &yaml);
    state
}

fn cfg() -> CompileConfig {
    CompileConfig { node_name: NODE.into(), trust_domain: "cluster.local".into(), enforcement_mode: EnforcementMode::Default, ..Default::default() }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap()
}

fn caps(s: &MapSizes) -> Capacities {
    Capacities { endpoints: s.endpoints, cidrs: s.cidrs, policy: s.policy, fqdn_names: s.fqdn_names, fqdn_ports: s.fqdn_ports, dns_servers: DNS_SERVERS_MAX }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let no_ifindex = BTreeMap::new();
    // Memory first, while the process holds nothing else: the pipeline's state for 10k pods.
    let rss0 = rss_kib();
    let state = cluster(10_000, 0);
    let mut ids = IdentityAllocator::new();
    let desired = compile(&state, &cfg(), &mut ids).expect("compile 10k");
    let contents = Contents::from_desired(&desired, &no_ifindex);
    let rss1 = rss_kib();
    println!(
        "agent pipeline state for 10 000 pods (cluster objects, identities, compiled state, map form): RSS +{} KiB = {:.2} KiB per pod ({} identities, {} endpoints, {} policy entries)",
        rss1 - rss0,
        (rss1 - rss0) as f64 / 10_000.0,
        desired.identities.len(),
        desired.endpoints.len(),
        desired.policy.len()
    );
    drop((state, desired, contents, ids));

    println!("\ncompile time (full compile, 3 runs, median; identities already allocated after the first)");
    for pods in [1_000u32, 10_000] {
        let state = cluster(pods, 0);
        let mut ids = IdentityAllocator::new();
        let mut t = vec![];
        let mut d = None;
        for _ in 0..3 {
            let s = Instant::now();
            d = Some(compile(&state, &cfg(), &mut ids).expect("compile"));
            t.push(s.elapsed().as_secs_f64());
        }
        let d = d.unwrap();
        assert!(d.failures.is_empty(), "{:?}", d.failures);
        println!(
            "{:>7} pods: {:>8.1} ms  ({} identities, {} endpoints, {} policy entries)",
            pods,
            percentile(&mut t, 0.5) * 1e3,
            d.identities.len(),
            d.endpoints.len(),
            d.policy.len()
        );
    }

    // 10k identity changes, applied into pinned maps.
    let sizes = MapSizes { endpoints: 20_000, ..MapSizes::default() };
    let mut dp = Dp::with_sizes("bench-churn", &sizes);
    let mut ids = IdentityAllocator::new();
    let mut have = Contents::default();
    let state0 = cluster(10_000, 0);
    let d0 = compile(&state0, &cfg(), &mut ids).expect("compile gen 0");
    apply(&mut dp.maps, &mut have, &Contents::from_desired(&d0, &no_ifindex), &caps(&sizes)).expect("apply gen 0");
    let mut state1 = cluster(10_000, 1);
    let t = Instant::now();
    let d1 = compile(&state1, &cfg(), &mut ids).expect("compile gen 1");
    let compiled = t.elapsed().as_secs_f64();
    let st = apply(&mut dp.maps, &mut have, &Contents::from_desired(&d1, &no_ifindex), &caps(&sizes)).expect("apply gen 1");
    let total = t.elapsed().as_secs_f64();
    let changed = d0.endpoints.iter().filter(|(ip, e)| d1.endpoints.get(*ip).is_some_and(|n| n.identity != e.identity)).count();
    assert_eq!(changed, 10_000, "every pod changed identity");
    println!(
        "\n10 000 identity changes (every pod relabelled): compile {:.1} ms + map form and apply {:.1} ms = {:.1} ms ({} entries written, {} removed)",
        compiled * 1e3,
        (total - compiled) * 1e3,
        total * 1e3,
        st.written,
        st.removed
    );

    // One new pod at a time in the 10k cluster: compile + apply until its endpoint is written.
    let mut lat = vec![];
    for k in 0..100u32 {
        let i = 10_000 + k;
        let t = Instant::now();
        upsert_all(&mut state1, &pod_yaml(i, 1));
        let d = compile(&state1, &cfg(), &mut ids).expect("compile with a new pod");
        apply(&mut dp.maps, &mut have, &Contents::from_desired(&d, &no_ifindex), &caps(&sizes)).expect("apply a new pod");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let ep = dp.maps.endpoints.get(&EndpointKey { addr: to_key(IpAddr::V4(pod_ip(i))) }, 0).expect("the new pod's endpoint is in the map");
        assert_eq!(ep.identity, d.endpoints[&IpAddr::V4(pod_ip(i))].identity);
    }
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    println!("one new pod in a 10 000-pod cluster (object parsed, full compile, apply; 100 pods): median {p50:.1} ms, p99 {p99:.1} ms");

    // The same with the incremental compiler (what the agent runs): only the new pod's
    // namespace is compiled again. Its result is checked against a full compile at the end.
    let mut compiler = Compiler::new();
    compiler.compile(&state1, &cfg(), &mut ids, &mut FqdnSlots::new()).expect("first compile");
    let (mut inc_lat, mut inc_compile, mut inc_clone, mut full_compile) = (vec![], vec![], vec![], vec![]);
    for k in 0..100u32 {
        let i = 10_100 + k;
        let t = Instant::now();
        upsert_all(&mut state1, &pod_yaml(i, 1));
        let c = Instant::now();
        let mode = compiler.compile(&state1, &cfg(), &mut ids, &mut FqdnSlots::new()).expect("incremental compile");
        inc_compile.push(c.elapsed().as_secs_f64() * 1e3);
        assert!(matches!(mode, Mode::Incremental { changed: 1, .. }), "{mode:?}");
        // The agent adds the Service entries to a copy of the compiler's result.
        let c = Instant::now();
        let d = compiler.desired().unwrap().clone();
        inc_clone.push(c.elapsed().as_secs_f64() * 1e3);
        apply(&mut dp.maps, &mut have, &Contents::from_desired(&d, &no_ifindex), &caps(&sizes)).expect("apply a new pod");
        inc_lat.push(t.elapsed().as_secs_f64() * 1e3);
        let ep = dp.maps.endpoints.get(&EndpointKey { addr: to_key(IpAddr::V4(pod_ip(i))) }, 0).expect("the new pod's endpoint is in the map");
        assert_eq!(ep.identity, d.endpoints[&IpAddr::V4(pod_ip(i))].identity);
        if k % 10 == 0 {
            let mut ids2 = ids.clone();
            let c = Instant::now();
            let full = compile(&state1, &cfg(), &mut ids2).expect("full compile");
            full_compile.push(c.elapsed().as_secs_f64() * 1e3);
            assert_eq!((&full.policy, &full.endpoints, &full.identities), (&d.policy, &d.endpoints, &d.identities), "incremental = full");
        }
    }
    let (i50, i99) = (percentile(&mut inc_lat, 0.5), percentile(&mut inc_lat, 0.99));
    let (c50, c99, f50) = (percentile(&mut inc_compile, 0.5), percentile(&mut inc_compile, 0.99), percentile(&mut full_compile, 0.5));
    println!(
        "one new pod, incremental compiler (object parsed, incremental compile, copy, apply; 100 pods): median {i50:.1} ms, p99 {i99:.1} ms ({:.2}x / {:.2}x of the full path above)",
        i50 / p50,
        i99 / p99
    );
    println!("  of which the compile: incremental median {c50:.1} ms, p99 {c99:.1} ms; a full compile of the same state median {f50:.1} ms ({:.3}x)", c50 / f50);
    println!("  and the copy of the compiled state the agent adds Services to: median {:.1} ms", percentile(&mut inc_clone, 0.5));
}
