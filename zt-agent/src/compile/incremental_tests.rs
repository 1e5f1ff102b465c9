//! The incremental compile equals the full compile: random pod churn (adds, removals,
//! relabels, moves between nodes, address conflicts, finished pods, a node's address) over a
//! cluster with every kind of peer the compiler knows, and now and then a policy,
//! namespace or node change (the full compile's path), compared after every event with a
//! full compile of the same state, identity allocator included.

use super::incremental::{Compiler, Mode};
use super::*;
use crate::model::source_dir::parse_manifests;

const NODE: &str = "node-a";

/// A small deterministic generator (xorshift64*), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len() as u64) as usize]
    }
}

const NAMESPACES: &[&str] = &["default", "prod", "dev", "mon"];

fn namespaces() -> String {
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
     apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: payments}}\n---\n\
     apiVersion: v1\nkind: Namespace\nmetadata: {name: dev, labels: {team: web}}\n---\n\
     apiVersion: v1\nkind: Namespace\nmetadata: {name: mon, labels: {role: monitoring}}\n---\n\
     apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.10}]}\n---\n\
     apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\nstatus: {addresses: [{type: InternalIP, address: 192.168.0.11}]}\n"
        .to_string()
}

/// Policies of every shape: same-namespace selectors, a namespaceSelector, an ipBlock
/// over pod addresses, named ports both ways, ZeroTrustPolicy denies, SPIFFE and entity
/// peers, rule-level authentication, HTTP rules, and one that fails (excluded label).
fn policies(variant: u64) -> String {
    let np = |ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
    };
    let ztp = |ns: &str, name: &str, spec: &str| {
        format!("---\napiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
    };
    let mut s = String::new();
    s += &np(
        "default",
        "web",
        "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: http}]\n",
    );
    s += &np(
        "prod",
        "from-mon",
        "  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {role: monitoring}}}]\n    ports: [{protocol: TCP, port: 9100}]\n",
    );
    s += &np("dev", "egress-blocks", "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.1.0/24, except: [10.0.1.128/25]}}]\n  - to: [{podSelector: {}}]\n    ports: [{port: http}]\n");
    s += &np(
        "mon",
        "scrape",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {app: web}}, namespaceSelector: {}}]\n",
    );
    s += &np("dev", "bad", "  podSelector: {matchLabels: {pod-template-hash: abc}}\n  ingress: [{}]\n");
    s += &ztp("prod", "deny-dev", "  subjects: [{podSelector: {matchLabels: {app: api}}}]\n  ingress:\n  - action: deny\n    from: [{namespaceSelector: {matchLabels: {team: web}}}]\n  - from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}]\n    ports: [{port: 8443}]\n    authentication: required\n");
    s += &ztp("default", "entities", "  subjects: [{podSelector: {matchLabels: {app: db}}}]\n  ingress:\n  - from: [{entity: cluster}]\n    ports: [{port: 5432}]\n  egress:\n  - to: [{entity: world}, {ipBlock: {cidr: 203.0.113.0/24}}]\n  - to: [{entity: host}]\n    icmp: [{family: IPv4, type: 8}]\n");
    s += &ztp("dev", "http", "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}]\n    http: [{method: GET, path: /headers}]\n");
    if variant % 2 == 1 {
        s += &np("mon", "extra", "  podSelector: {matchLabels: {app: client}}\n  ingress:\n  - from: [{podSelector: {}}]\n");
    }
    s
}

fn pod_yaml(r: &mut Rng, ns: &str, name: &str) -> String {
    let app = r.pick(&["web", "client", "db", "api", "worker"]);
    let version = r.pick(&["v1", "v2"]);
    let node = r.pick(&[NODE, NODE, "node-b", "node-c"]);
    let sa = r.pick(&["default", "client", "web"]);
    // A small address pool: conflicts happen; now and then a v6 address or a node's.
    let ip = match r.below(20) {
        0 => "192.168.0.11".to_string(),
        1 => format!("fd00::{}", r.below(4) + 1),
        _ => format!("10.0.{}.{}", r.below(2), r.below(12) * 20 + 1),
    };
    let phase = if r.below(15) == 0 { "Succeeded" } else { "Running" };
    let probe = if r.below(2) == 0 { "\n    readinessProbe: {tcpSocket: {port: 8080}}" } else { "" };
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}, version: {version}, pod-template-hash: h{}}}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}, {{name: metrics, containerPort: 9100}}]{probe}\n\
         status: {{phase: {phase}, podIP: \"{ip}\"}}\n",
        r.below(3)
    )
}

fn upsert(state: &mut ClusterState, yaml: &str) {
    let mut ignored = Vec::new();
    for (_, o) in parse_manifests("churn.yaml", yaml, &mut ignored).unwrap() {
        state.upsert(o);
    }
    assert!(ignored.is_empty());
}

fn cfg(mode: EnforcementMode, host_access: HostAccess) -> CompileConfig {
    CompileConfig {
        node_name: NODE.into(),
        trust_domain: "cluster.local".into(),
        enforcement_mode: mode,
        host_access,
        host_ips: vec!["192.168.0.10".parse().unwrap()],
        dns_addresses: vec!["10.0.0.241".parse().unwrap()],
        ..Default::default()
    }
}

fn assert_same(inc: &Desired, full: &Desired, what: &str) {
    assert_eq!(inc.endpoints, full.endpoints, "endpoints after {what}");
    assert_eq!(inc.policy, full.policy, "policy after {what}");
    assert_eq!(inc.rules, full.rules, "rules after {what}");
    assert_eq!(inc.identities, full.identities, "identities after {what}");
    assert_eq!(inc.cidrs, full.cidrs, "cidrs after {what}");
    assert_eq!(inc.http, full.http, "http after {what}");
    assert_eq!(inc.failures, full.failures, "failures after {what}");
    assert_eq!(inc.endpoint_nodes, full.endpoint_nodes, "endpoint nodes after {what}");
    assert_eq!(inc.dns_servers, full.dns_servers, "dns servers after {what}");
    assert_eq!(inc.warnings, full.warnings, "warnings after {what}");
    assert_eq!((&inc.fqdn_names, &inc.fqdn_ports, &inc.fqdn_slots), (&full.fqdn_names, &full.fqdn_ports, &full.fqdn_slots), "fqdn after {what}");
}

fn churn(seed: u64, steps: usize, cfg: &CompileConfig) -> (usize, usize) {
    let mut r = Rng(seed);
    let mut state = ClusterState::new();
    upsert(&mut state, &namespaces());
    upsert(&mut state, &policies(0));
    for i in 0..24 {
        let ns = r.pick(NAMESPACES);
        let y = pod_yaml(&mut r, ns, &format!("p{i}"));
        upsert(&mut state, &y);
    }
    let mut compiler = Compiler::new();
    let (mut ids_inc, mut ids_full) = (IdentityAllocator::new(), IdentityAllocator::new());
    let (mut slots_inc, mut slots_full) = (FqdnSlots::new(), FqdnSlots::new());
    let (mut incremental, mut full_runs) = (0, 0);
    for step in 0..steps {
        let what = match r.below(20) {
            0 => {
                upsert(&mut state, &policies(r.below(2)));
                "a policy change".to_string()
            }
            1 => {
                let ns = r.pick(&["dev", "mon"]);
                let labels = r.pick(&["{team: web}", "{role: monitoring}", "{team: payments}"]);
                upsert(&mut state, &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {labels}}}\n"));
                "a namespace relabel".to_string()
            }
            2..=5 => {
                let keys: Vec<_> = state.pods.keys().cloned().collect();
                if keys.is_empty() {
                    continue;
                }
                let k = &keys[r.below(keys.len() as u64) as usize];
                state.pods.remove(k);
                format!("removing pod {k:?}")
            }
            7 => {
                // A change the compiler does not read (an annotation): nothing to do.
                let Some((k, p)) = state.pods.iter_mut().next() else { continue };
                p.metadata.annotations.get_or_insert_with(Default::default).insert("step".into(), step.to_string());
                format!("annotating pod {k:?}")
            }
            _ => {
                // A new pod or a changed one (same key), sometimes two namespaces at once.
                let mut w = String::new();
                for _ in 0..1 + r.below(2) {
                    let ns = r.pick(NAMESPACES);
                    let name = format!("p{}", r.below(40));
                    w += &format!("{ns}/{name} ");
                    let y = pod_yaml(&mut r, ns, &name);
                    upsert(&mut state, &y);
                }
                format!("pod(s) {w}")
            }
        };
        let what = format!("step {step} (seed {seed}): {what}");
        match compiler.compile(&state, cfg, &mut ids_inc, &mut slots_inc).expect("incremental compile") {
            Mode::Incremental { .. } => incremental += 1,
            Mode::Full => full_runs += 1,
            Mode::Unchanged => {}
        }
        let inc = compiler.desired().unwrap();
        let full = compile_with_slots(&state, cfg, &mut ids_full, &mut slots_full).expect("full compile");
        assert_same(inc, &full, &what);
        assert_eq!(ids_inc, ids_full, "identity allocator after {what}");
    }
    (incremental, full_runs)
}

#[test]
fn incremental_equals_full_under_random_pod_churn() {
    let mut total = (0, 0);
    for seed in 1..=6u64 {
        for (mode, host) in [(EnforcementMode::Default, HostAccess::Probes), (EnforcementMode::Always, HostAccess::None)] {
            let (i, f) = churn(seed * 0x9e37_79b9, 150, &cfg(mode, host));
            total = (total.0 + i, total.1 + f);
        }
    }
    // The test means something only if most events took the incremental path.
    assert!(total.0 > total.1 * 2, "incremental {} full {}", total.0, total.1);
}

#[test]
fn incremental_falls_back_to_full_for_policy_namespace_and_fqdn_changes() {
    let cfg = cfg(EnforcementMode::Default, HostAccess::Probes);
    let mut state = ClusterState::new();
    upsert(&mut state, &namespaces());
    upsert(&mut state, &policies(0));
    let mut r = Rng(7);
    upsert(&mut state, &pod_yaml(&mut r, "default", "a"));
    let mut c = Compiler::new();
    let (mut ids, mut slots) = (IdentityAllocator::new(), FqdnSlots::new());
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    assert_eq!(c.last, Some(Mode::Full));
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    assert_eq!(c.last, Some(Mode::Unchanged));
    upsert(&mut state, &pod_yaml(&mut r, "default", "b"));
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    assert!(matches!(c.last, Some(Mode::Incremental { changed: 1, .. })), "{:?}", c.last);
    upsert(&mut state, &policies(1));
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    assert_eq!(c.last, Some(Mode::Full), "a policy change");
    // FQDN rules anywhere: every compile is a full one (slots are node-wide).
    let fq = "---\napiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: fq, namespace: mon}\nspec:\n  egress:\n  - to: [{fqdn: {matchName: example.com}}]\n";
    upsert(&mut state, fq);
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    upsert(&mut state, &pod_yaml(&mut r, "default", "c"));
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    assert_eq!(c.last, Some(Mode::Full), "FQDN rules in the cluster");
}

#[test]
fn only_the_namespaces_a_change_can_reach_are_recompiled() {
    let cfg = cfg(EnforcementMode::Default, HostAccess::Probes);
    let mut state = ClusterState::new();
    upsert(&mut state, &namespaces());
    // default: same-namespace peers only; prod: peers in namespaces labelled role=monitoring (mon).
    upsert(&mut state, "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n");
    upsert(&mut state, "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: from-mon, namespace: prod}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {role: monitoring}}}]\n");
    let mut r = Rng(11);
    for (i, ns) in NAMESPACES.iter().enumerate() {
        let y = pod_yaml(&mut r, ns, &format!("first{i}"));
        upsert(&mut state, &y);
    }
    let mut c = Compiler::new();
    let (mut ids, mut slots) = (IdentityAllocator::new(), FqdnSlots::new());
    let mut ids_full = ids.clone();
    c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
    compile(&state, &cfg, &mut ids_full).unwrap();
    for (ns, want) in [("default", 1), ("dev", 1), ("mon", 2), ("prod", 1)] {
        let y = pod_yaml(&mut r, ns, "x");
        upsert(&mut state, &y);
        let mode = c.compile(&state, &cfg, &mut ids, &mut slots).unwrap();
        assert_eq!(mode, Mode::Incremental { changed: 1, recompiled: want }, "a pod of {ns}");
        assert_same(c.desired().unwrap(), &compile(&state, &cfg, &mut ids_full).unwrap(), ns);
    }
}
