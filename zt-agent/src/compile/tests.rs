//! End-to-end compiler tests: YAML in, map entries out.

use std::collections::BTreeSet;
use std::net::IpAddr;

use zt_common::*;

use super::*;
use crate::model::source_dir::parse_manifests;

const NODE: &str = "node-a";

/// Namespaces and pods every test starts from.
/// web, client, worker are local (node-a); db, api are remote.
fn base() -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {team: payments}}\n",
    );
    s += &pod(
        "default",
        "web",
        "{app: web}",
        NODE,
        "10.0.0.1",
        "web",
        "[{name: http, containerPort: 8080}]",
    );
    s += &pod(
        "default",
        "client",
        "{app: client, tier: fe}",
        NODE,
        "10.0.0.2",
        "client",
        "[]",
    );
    s += &pod(
        "default",
        "db",
        "{app: db}",
        "node-b",
        "10.0.0.3",
        "db",
        "[{name: pg, containerPort: 5432}]",
    );
    s += &pod(
        "prod",
        "api",
        "{app: api}",
        "node-b",
        "10.0.1.1",
        "api",
        "[{name: http, containerPort: 9090}]",
    );
    s += &pod(
        "prod",
        "worker",
        "{app: worker, tier: be}",
        NODE,
        "10.0.1.2",
        "worker",
        "[]",
    );
    s
}

fn pod(ns: &str, name: &str, labels: &str, node: &str, ip: &str, sa: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  containers: [{{name: c, ports: {ports}}}]\n\
         status: {{phase: Running, podIP: {ip}}}\n"
    )
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

fn ztp(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

fn state(yaml: &str) -> ClusterState {
    let mut ignored = Vec::new();
    let mut s = ClusterState::new();
    for (_, o) in parse_manifests("test.yaml", yaml, &mut ignored).unwrap() {
        s.upsert(o);
    }
    s
}

fn cfg() -> CompileConfig {
    CompileConfig {
        node_name: NODE.into(),
        trust_domain: "cluster.local".into(),
        enforcement_mode: EnforcementMode::Default,
        host_ips: vec!["192.168.0.10".parse().unwrap()],
        ..Default::default()
    }
}

fn run(extra: &str) -> Desired {
    try_run(extra, &cfg()).unwrap()
}

fn try_run(extra: &str, cfg: &CompileConfig) -> Result<Desired, CompileError> {
    compile(
        &state(&(base() + extra)),
        cfg,
        &mut IdentityAllocator::new(),
    )
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Identity of a base pod by name.
fn id(d: &Desired, name: &str) -> u32 {
    d.endpoints
        .values()
        .find(|e| e.pod.as_ref().is_some_and(|p| p.name == name))
        .unwrap()
        .identity
}

fn flags(d: &Desired, name: &str) -> u32 {
    d.endpoints
        .values()
        .find(|e| e.pod.as_ref().is_some_and(|p| p.name == name))
        .unwrap()
        .flags
}

fn cidr_id(d: &Desired, s: &str) -> u32 {
    d.cidrs[&cidr::parse_cidr(s).unwrap()]
}

/// (prefix, local, peer, dir, proto, port) -> (verdict, rule id)
type Entry = ((u32, u32, u32, u8, u8, u16), (u8, u32));

fn entries(d: &Desired) -> Vec<Entry> {
    d.policy
        .iter()
        .map(|(k, v)| {
            let key = k.key;
            (
                (
                    k.prefix_len,
                    key.local_id(),
                    key.peer_id(),
                    key.dir,
                    key.proto,
                    key.port(),
                ),
                (v.verdict, v.rule_id),
            )
        })
        .collect()
}

fn entries_of(d: &Desired, local: u32) -> Vec<Entry> {
    entries(d).into_iter().filter(|e| e.0 .1 == local).collect()
}

fn get(
    d: &Desired,
    prefix: u32,
    local: u32,
    peer: u32,
    dir: u8,
    proto: u8,
    port: u16,
) -> Option<u8> {
    entries(d)
        .into_iter()
        .find(|e| e.0 == (prefix, local, peer, dir, proto, port))
        .map(|e| e.1 .0)
}

const A: u8 = VERDICT_ALLOW;
const D: u8 = VERDICT_DENY;
const I: u8 = DIR_INGRESS;
const E: u8 = DIR_EGRESS;

// ---------------------------------------------------------------------------

#[test]
fn endpoints_identities_and_flags() {
    let d = run("");
    // Every pod IP plus the host address.
    assert_eq!(d.endpoints.len(), 6);
    let host = &d.endpoints[&ip("192.168.0.10")];
    assert_eq!(
        (host.identity, host.flags, host.pod.clone()),
        (IDENTITY_HOST, 0, None)
    );
    assert_eq!(flags(&d, "web"), EP_LOCAL);
    assert_eq!(flags(&d, "db"), 0);
    // Identities: SPIFFE ID and labels, namespace labels prefixed.
    let web = &d.identities[&id(&d, "web")];
    assert_eq!(web.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(web.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(
        web.labels
            .get("namespace-label:kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("default")
    );
    let api = &d.identities[&id(&d, "api")];
    assert_eq!(
        api.labels.get("namespace-label:team").map(String::as_str),
        Some("payments")
    );
    assert!(id(&d, "web") >= IDENTITY_FIRST_WORKLOAD);
    for (rid, name) in [
        (IDENTITY_HOST, "host"),
        (IDENTITY_WORLD, "world"),
        (IDENTITY_INIT, "init"),
        (IDENTITY_REMOTE_NODE, "remote-node"),
    ] {
        assert_eq!(d.identities[&rid].spiffe_id, format!("reserved:{name}"));
    }
    // No policy: nothing isolated, no entries.
    assert!(d.policy.is_empty() && d.rules.is_empty());
}

#[test]
fn skipped_pods() {
    let extra = [
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: hn}\nspec: {nodeName: node-a, hostNetwork: true, containers: []}\nstatus: {phase: Running, podIP: 192.168.0.10}\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: done}\nspec: {nodeName: node-a, containers: []}\nstatus: {phase: Succeeded, podIP: 10.9.0.1}\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: failed}\nspec: {nodeName: node-a, containers: []}\nstatus: {phase: Failed, podIP: 10.9.0.2}\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending}\nspec: {nodeName: node-a, containers: []}\nstatus: {phase: Pending}\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata: {name: dual}\nspec: {nodeName: node-b, containers: []}\nstatus: {podIP: 10.9.0.3, podIPs: [{ip: 10.9.0.3}, {ip: \"fd00::3\"}]}\n",
    ]
    .concat();
    let d = run(&extra);
    assert_eq!(d.endpoints.len(), 8); // 6 + the dual-stack pod's two
    assert_eq!(d.endpoints[&ip("192.168.0.10")].identity, IDENTITY_HOST);
    assert_eq!(
        d.endpoints[&ip("fd00::3")].identity,
        d.endpoints[&ip("10.9.0.3")].identity
    );
    assert_eq!(
        d.identities[&d.endpoints[&ip("fd00::3")].identity].spiffe_id,
        "spiffe://cluster.local/ns/default/sa/default"
    );
}

#[test]
fn policy_types_defaulting() {
    // Ingress only (no policyTypes, no egress).
    let d = run(&np(
        "default",
        "p",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n",
    ));
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "client"), EP_LOCAL);
    // Egress rules present: both.
    let d = run(&np(
        "default",
        "p",
        "  podSelector: {matchLabels: {app: web}}\n  egress: [{}]\n",
    ));
    assert_eq!(
        flags(&d, "web"),
        EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS
    );
    // `egress: []` without policyTypes: the API server defaults to Ingress only.
    let d = run(&np("default", "p", "  podSelector: {}\n  egress: []\n"));
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_INGRESS);
    // Explicit Egress only: ingress rules are ignored.
    let d = run(&np(
        "default",
        "p",
        "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
    ));
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_EGRESS);
    assert!(d.policy.is_empty() && d.rules.is_empty());
    // Empty podSelector: every pod of the namespace, not other namespaces.
    let d = run(&np("default", "p", "  podSelector: {}\n"));
    assert_eq!(flags(&d, "client"), EP_LOCAL | EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "worker"), EP_LOCAL);
    // A spec-less policy is the same as an empty one (selects all, Ingress).
    let d = run("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: prod}\n");
    assert_eq!(flags(&d, "worker"), EP_LOCAL | EP_ENFORCE_INGRESS);
}

#[test]
fn empty_vs_absent_rules() {
    // `ingress: []`: isolated, nothing allowed.
    let d = run(&np(
        "default",
        "deny",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: []\n",
    ));
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_INGRESS);
    assert!(d.policy.is_empty());
    // A rule `{}` allows every peer, protocol and port.
    let d = run(&np(
        "default",
        "all",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{}]\n",
    ));
    let web = id(&d, "web");
    assert_eq!(
        entries(&d),
        vec![(
            (POLICY_PREFIX_ANY_PROTO, web, IDENTITY_ANY, I, 0, 0),
            (A, 1)
        )]
    );
    // `from: []` and `ports: []` are the same as absent.
    let d = run(&np(
        "default",
        "all",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [], ports: []}]\n",
    ));
    assert_eq!(
        entries(&d),
        vec![(
            (POLICY_PREFIX_ANY_PROTO, web, IDENTITY_ANY, I, 0, 0),
            (A, 1)
        )]
    );
    // Port without number: the whole protocol.
    let d = run(&np(
        "default",
        "udp",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{protocol: UDP}]}]\n",
    ));
    assert_eq!(
        entries(&d),
        vec![(
            (POLICY_PREFIX_ANY_PORT, web, IDENTITY_ANY, I, 17, 0),
            (A, 1)
        )]
    );
}

#[test]
fn only_local_subjects_get_entries() {
    // db is remote: isolating and allowing it produces nothing on this node.
    let d = run(&np(
        "default",
        "p",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{}]\n",
    ));
    assert!(d.policy.is_empty());
    assert_eq!(flags(&d, "db"), 0);
    assert_eq!(d.rules.len(), 1);
}

#[test]
fn peer_selectors() {
    let peers = |from: &str| -> BTreeSet<u32> {
        let d = run(&np(
            "default",
            "p",
            &format!(
                "  podSelector: {{matchLabels: {{app: web}}}}\n  ingress: [{{from: {from}}}]\n"
            ),
        ));
        let web = id(&d, "web");
        entries_of(&d, web).into_iter().map(|e| e.0 .2).collect()
    };
    let d = run("");
    let (client, db, api, worker) = (
        id(&d, "client"),
        id(&d, "db"),
        id(&d, "api"),
        id(&d, "worker"),
    );
    let web = id(&d, "web");
    // podSelector alone: same namespace only.
    assert_eq!(
        peers("[{podSelector: {matchLabels: {app: client}}}]"),
        BTreeSet::from([client])
    );
    assert_eq!(
        peers("[{podSelector: {}}]"),
        BTreeSet::from([web, client, db])
    );
    // namespaceSelector alone: every pod of matching namespaces.
    assert_eq!(
        peers("[{namespaceSelector: {matchLabels: {team: payments}}}]"),
        BTreeSet::from([api, worker])
    );
    assert_eq!(
        peers("[{namespaceSelector: {}}]"),
        BTreeSet::from([web, client, db, api, worker])
    );
    // The automatic namespace name label.
    assert_eq!(
        peers("[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: prod}}}]"),
        BTreeSet::from([api, worker])
    );
    // Both in one peer: AND.
    assert_eq!(
        peers("[{namespaceSelector: {matchLabels: {team: payments}}, podSelector: {matchLabels: {app: api}}}]"),
        BTreeSet::from([api])
    );
    // Two peers: OR.
    assert_eq!(
        peers("[{podSelector: {matchLabels: {app: db}}}, {namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}]"),
        BTreeSet::from([db, api])
    );
    // NotIn matches pods without the key; DoesNotExist too.
    assert_eq!(
        peers("[{namespaceSelector: {}, podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [fe]}]}}]"),
        BTreeSet::from([web, db, api, worker])
    );
    assert_eq!(
        peers("[{podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}}]"),
        BTreeSet::from([web, db])
    );
    // A selector that matches nothing allows nothing (but still isolates).
    assert!(peers("[{podSelector: {matchLabels: {app: nope}}}]").is_empty());
}

#[test]
fn ip_block_with_except() {
    let d = run(&np(
        "default",
        "egress",
        "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.1.2.0/24]}}]\n  \
         - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]\n    ports: [{port: 443}]\n  \
         - to: [{ipBlock: {cidr: 10.1.2.3/24}}]\n    ports: [{port: 53, protocol: UDP}]\n",
    ));
    // One CIDR identity per distinct normalized prefix (10.1.2.3/24 == 10.1.2.0/24).
    let got: Vec<String> = d.cidrs.keys().map(cidr::to_string).collect();
    assert_eq!(
        got,
        ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24"]
    );
    assert!(d.cidrs.values().all(|v| v & IDENTITY_CIDR_FLAG != 0));
    assert_eq!(
        d.identities[&cidr_id(&d, "10.1.0.0/16")].spiffe_id,
        "cidr:10.1.0.0/16"
    );
    let web = id(&d, "web");
    let (all, ten, ten1, ten12) = (
        cidr_id(&d, "0.0.0.0/0"),
        cidr_id(&d, "10.0.0.0/8"),
        cidr_id(&d, "10.1.0.0/16"),
        cidr_id(&d, "10.1.2.0/24"),
    );
    let peers_of = |proto: u8, port: u16| -> BTreeSet<u32> {
        entries_of(&d, web)
            .into_iter()
            .filter(|e| e.0 .4 == proto && e.0 .5 == port)
            .map(|e| e.0 .2)
            .collect()
    };
    // Rule 0: 10/8 minus 10.1/16 (and what is inside it), and every pod (all in
    // 10.0/16) by its workload identity.
    let pods: BTreeSet<u32> = ["web", "client", "db", "api", "worker"].iter().map(|n| id(&d, n)).collect();
    assert_eq!(peers_of(0, 0), &BTreeSet::from([ten]) | &pods);
    // Rule 1: everything IPv4 but 10/8: the /0 identity; no WORLD (it would let IPv6 in).
    assert_eq!(peers_of(6, 443), BTreeSet::from([all]));
    // Rule 2: 10.1.2/24 only.
    assert_eq!(peers_of(17, 53), BTreeSet::from([ten12]));
    assert!(!peers_of(0, 0).contains(&ten1));
    // Pod IPs keep workload identities inside an ipBlock (never a CIDR identity).
    assert_eq!(d.endpoints[&ip("10.0.0.3")].identity, id(&d, "db"));
    assert!(pods.iter().all(|p| p & IDENTITY_CIDR_FLAG == 0));
}

/// NetworkPolicy ipBlocks match pod IPs per address (upstream's e2e "should allow
/// egress access to server in CIDR block" and the except cases): a pod's IPv4 address
/// inside the block is allowed, its IPv6 address is not, and pod selectors still see
/// both addresses of the pod.
#[test]
fn ip_block_matches_pod_addresses() {
    let dual = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: dual, namespace: default, labels: {app: dual}}\n\
                spec:\n  nodeName: node-b\n  containers: [{name: c}]\n\
                status: {phase: Running, podIPs: [{ip: 10.9.0.1}, {ip: 'fd00::9'}]}\n";
    let d = run(&(dual.to_string()
        + &np(
            "default",
            "cidr",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  \
             - to: [{ipBlock: {cidr: 10.9.0.1/32}}]\n  \
             - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.3/32]}}]\n    ports: [{port: 81}]\n",
        )
        + &np("default", "sel", "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: dual}}}]\n")));
    let (v4, v6) = (d.endpoints[&ip("10.9.0.1")].identity, d.endpoints[&ip("fd00::9")].identity);
    assert_ne!(v4, v6, "the addresses differ in ipBlock membership");
    assert!(d.identities[&v4].labels.contains_key("ip-block:10.9.0.1/32"));
    assert!(!d.identities[&v6].labels.keys().any(|k| k.starts_with("ip-block:")));
    let web = id(&d, "web");
    let peers_of = |dir: u8, port: u16| -> BTreeSet<u32> {
        entries_of(&d, web)
            .into_iter()
            .filter(|e| e.0 .3 == dir && e.0 .5 == port)
            .map(|e| e.0 .2)
            .collect()
    };
    // Egress rule 0 (any port): the /32 and the v4 address of dual only.
    let any = peers_of(DIR_EGRESS, 0);
    assert!(any.contains(&v4) && !any.contains(&v6), "{any:?}");
    assert!(!any.contains(&id(&d, "db")));
    // Rule 1 (port 81): 10/8 except db's /32: every 10.x pod but db.
    let p81 = peers_of(DIR_EGRESS, 81);
    for n in ["web", "client", "api", "worker"] {
        assert!(p81.contains(&id(&d, n)), "{n} in 10/8: {p81:?}");
    }
    assert!(!p81.contains(&id(&d, "db")), "db is excepted");
    assert!(p81.contains(&v4) && !p81.contains(&v6));
    // A pod selector still selects both addresses of dual.
    let ing = peers_of(DIR_INGRESS, 0);
    assert!(ing.contains(&v4) && ing.contains(&v6), "{ing:?}");
}

#[test]
fn port_ranges() {
    let d = run(&np(
        "default",
        "range",
        "  podSelector: {matchLabels: {app: web}}\n  ingress: [{ports: [{port: 80, endPort: 90}, {port: 8443, protocol: SCTP}]}]\n",
    ));
    let web = id(&d, "web");
    let got: Vec<(u32, u8, u16)> = entries_of(&d, web)
        .into_iter()
        .map(|e| (e.0 .0, e.0 .4, e.0 .5))
        .collect();
    assert_eq!(
        got,
        vec![(93, 6, 80), (95, 6, 88), (96, 6, 90), (96, 132, 8443)]
    );
}

#[test]
fn deny_beats_allow() {
    let spec = "  subjects: [{spiffeId: spiffe://cluster.local/ns/default/sa/web}]\n  ingress:\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 8080}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 22}]}\n\
        \x20   - {action: deny, ports: [{port: 22}]}\n\
        \x20   - {action: deny, from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{protocol: UDP}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{protocol: UDP, port: 53}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 80, endPort: 90}]}\n\
        \x20   - {action: deny, from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 88}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 9000}]}\n\
        \x20   - {action: deny, from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 9000}]}\n";
    // Plus a NetworkPolicy allowing everything: the denies still win.
    let d = run(
        &(np("default", "all", "  podSelector: {}\n  ingress: [{}]\n")
            + &ztp("default", "z", spec)),
    );
    let (web, client) = (id(&d, "web"), id(&d, "client"));
    // Kept: allows no deny covers, every deny.
    assert_eq!(get(&d, 72, web, IDENTITY_ANY, I, 0, 0), Some(A));
    assert_eq!(get(&d, 96, web, client, I, 6, 8080), Some(A));
    assert_eq!(get(&d, 96, web, IDENTITY_ANY, I, 6, 22), Some(D));
    assert_eq!(get(&d, 80, web, client, I, 17, 0), Some(D));
    assert_eq!(get(&d, 93, web, client, I, 6, 80), Some(A));
    // 88-89 stays: the longer deny of 88 wins the trie lookup for 88 itself.
    assert_eq!(get(&d, 95, web, client, I, 6, 88), Some(A));
    assert_eq!(get(&d, 96, web, client, I, 6, 88), Some(D));
    // Dropped: client's 22 (covered by the deny for ANY peer), UDP 53 (inside the UDP deny).
    assert_eq!(get(&d, 96, web, client, I, 6, 22), None);
    assert_eq!(get(&d, 96, web, client, I, 17, 53), None);
    // Same key allowed and denied: deny, with the deny rule's id.
    let e = entries(&d)
        .into_iter()
        .find(|e| e.0 == (96, web, client, I, 6, 9000))
        .unwrap();
    assert_eq!(e.1 .0, D);
    assert_eq!(d.rules[&e.1 .1].path, "spec.ingress[8]");
    assert_eq!(d.rules[&e.1 .1].action, Action::Deny);
}

#[test]
fn deny_covering_everything_removes_allows() {
    let spec = "  ingress:\n    - {}\n    - {from: [{entity: world}], ports: [{port: 80}]}\n    - {action: deny}\n";
    let d = run(&ztp("default", "z", spec));
    let web = id(&d, "web");
    assert_eq!(
        entries_of(&d, web),
        vec![((72, web, IDENTITY_ANY, I, 0, 0), (D, 3))]
    );
}

#[test]
fn named_ports() {
    // Ingress: the local pods' port "http" (web: 8080). client has none: no entry.
    let d = run(&np(
        "default",
        "named",
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}], ports: [{port: http}, {port: http, protocol: UDP}, {port: nope}]}]\n",
    ));
    let (web, client, db) = (id(&d, "web"), id(&d, "client"), id(&d, "db"));
    let got: Vec<_> = entries(&d).into_iter().map(|e| e.0).collect();
    let mut want: Vec<_> = [web, client, db]
        .iter()
        .map(|p| (96, web, *p, I, 6, 8080))
        .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(entries_of(&d, client).is_empty());

    // Egress: the peer pods' port. To api (prod, 9090) and db ("pg" is not "http": none).
    let d = run(&np(
        "default",
        "eg",
        "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress:\n  \
         - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}, {podSelector: {matchLabels: {app: db}}}]\n    ports: [{port: http}]\n",
    ));
    let (client, api) = (id(&d, "client"), id(&d, "api"));
    assert_eq!(
        entries(&d).into_iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![(96, client, api, E, 6, 9090)]
    );

    // Egress to any peer: every workload with the named port, each with its number.
    let d = run(&np(
        "default",
        "eg",
        "  podSelector: {matchLabels: {app: client}}\n  egress: [{ports: [{port: http}]}]\n",
    ));
    let (client, web, api) = (id(&d, "client"), id(&d, "web"), id(&d, "api"));
    let mut want = vec![(96, client, web, E, 6, 8080), (96, client, api, E, 6, 9090)];
    want.sort();
    assert_eq!(
        entries(&d).into_iter().map(|e| e.0).collect::<Vec<_>>(),
        want
    );
}

#[test]
fn ztp_subjects_by_spiffe_id() {
    let extra = pod(
        "default",
        "web2",
        "{app: web2}",
        NODE,
        "10.0.0.9",
        "web",
        "[]",
    );
    // Exact: both pods of service account "web" (two identities, labels differ).
    let d = run(&(extra.clone()
        + &ztp(
            "default",
            "z",
            "  subjects: [{spiffeId: spiffe://cluster.local/ns/default/sa/web}]\n  ingress: [{}]\n",
        )));
    assert_ne!(id(&d, "web"), id(&d, "web2"));
    assert_eq!(flags(&d, "web") & EP_ENFORCE_INGRESS, EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "web2") & EP_ENFORCE_INGRESS, EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "client"), EP_LOCAL);
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_INGRESS); // no egress rules, mode default
                                                                 // Pattern: every service account of the namespace.
    let d = run(&ztp(
        "default",
        "z",
        "  subjects: [{spiffeId: \"spiffe://cluster.local/ns/default/*\"}]\n  egress: [{}]\n",
    ));
    assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_EGRESS);
    assert_eq!(flags(&d, "client"), EP_LOCAL | EP_ENFORCE_EGRESS);
    assert_eq!(flags(&d, "worker"), EP_LOCAL);
    // No subjects: the whole namespace; podSelector subjects.
    let d = run(&ztp("prod", "z", "  ingress: [{}]\n"));
    assert_eq!(flags(&d, "worker"), EP_LOCAL | EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "web"), EP_LOCAL);
    let d = run(&ztp(
        "default",
        "z",
        "  subjects: [{podSelector: {matchLabels: {tier: fe}}}]\n  ingress: [{}]\n",
    ));
    assert_eq!(flags(&d, "client"), EP_LOCAL | EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "web"), EP_LOCAL);
}

#[test]
fn ztp_peers_by_spiffe_id_and_entity() {
    let peers = |from: &str| -> BTreeSet<u32> {
        let spec = format!("  subjects: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n  ingress: [{{from: {from}, ports: [{{port: 80}}]}}]\n");
        let d = run(&(ztp("default", "z", &spec)
            + &np(
                "default",
                "c",
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.113.0/24}}]}]\n",
            )));
        let web = id(&d, "web");
        entries_of(&d, web)
            .into_iter()
            .filter(|e| e.0 .5 == 80)
            .map(|e| e.0 .2)
            .collect()
    };
    let d = run(&np(
        "default",
        "c",
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.113.0/24}}]}]\n",
    ));
    let (web, client, db, api, worker) = (
        id(&d, "web"),
        id(&d, "client"),
        id(&d, "db"),
        id(&d, "api"),
        id(&d, "worker"),
    );
    let net = cidr_id(&d, "203.0.113.0/24");
    assert_eq!(
        peers("[{spiffeId: spiffe://cluster.local/ns/prod/sa/api}]"),
        BTreeSet::from([api])
    );
    assert_eq!(
        peers("[{spiffeId: \"spiffe://cluster.local/ns/prod/*\"}]"),
        BTreeSet::from([api, worker])
    );
    assert_eq!(
        peers("[{spiffeId: spiffe://cluster.local/ns/prod/sa/nobody}]"),
        BTreeSet::new()
    );
    assert_eq!(
        peers("[{entity: host}, {entity: remote-node}]"),
        BTreeSet::from([IDENTITY_HOST, IDENTITY_REMOTE_NODE])
    );
    assert_eq!(
        peers("[{entity: world}]"),
        BTreeSet::from([IDENTITY_WORLD, net])
    );
    assert_eq!(
        peers("[{entity: cluster}]"),
        BTreeSet::from([
            web,
            client,
            db,
            api,
            worker,
            IDENTITY_HOST,
            IDENTITY_REMOTE_NODE
        ])
    );
    assert_eq!(
        peers("[{entity: all}, {entity: host}]"),
        BTreeSet::from([IDENTITY_ANY])
    );
    assert_eq!(
        peers("[{podSelector: {matchLabels: {app: db}}}]"),
        BTreeSet::from([db])
    );
    // 203.0.0.0/16 (first in prefix order: CIDR id 1) contains 203.0.113.0/24 (id 2).
    let (c1, c2) = (IDENTITY_CIDR_FLAG | 1, IDENTITY_CIDR_FLAG | 2);
    assert_eq!(
        peers("[{ipBlock: {cidr: 203.0.0.0/16}}]"),
        BTreeSet::from([c1, c2])
    );
    assert_eq!(
        peers("[{ipBlock: {cidr: 203.0.0.0/16, except: [203.0.113.0/24]}}]"),
        BTreeSet::from([c1])
    );
}

#[test]
fn ztp_icmp_and_modes() {
    let spec = "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  enforcementMode: always\n  egress:\n    - icmp: [{type: 8}, {family: IPv6, type: 128}]\n";
    let d = run(&ztp("default", "z", spec));
    let web = id(&d, "web");
    assert_eq!(
        flags(&d, "web"),
        EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS
    );
    let got: Vec<_> = entries_of(&d, web).into_iter().map(|e| e.0).collect();
    assert_eq!(
        got,
        vec![
            (96, web, IDENTITY_ANY, E, 1, 8),
            (96, web, IDENTITY_ANY, E, 58, 128)
        ]
    );
    // Ports and icmp in one rule: both, nothing else.
    let spec = "  egress: [{ports: [{port: 53, protocol: UDP}], icmp: [{type: 0}]}]\n";
    let d = run(&ztp("default", "z", spec));
    let web = id(&d, "web");
    let got: Vec<_> = entries_of(&d, web)
        .into_iter()
        .map(|e| (e.0 .0, e.0 .4, e.0 .5))
        .collect();
    assert_eq!(got, vec![(96, 1, 0), (96, 17, 53)]);
    // Mode always with no rules: isolated both ways, no entries.
    let d = run(&ztp(
        "default",
        "z",
        "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  enforcementMode: always\n",
    ));
    assert_eq!(
        flags(&d, "web"),
        EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS
    );
    assert!(d.policy.is_empty());
    // Global mode always: every local endpoint, not the remote ones.
    let mut c = cfg();
    c.enforcement_mode = EnforcementMode::Always;
    let d = try_run("", &c).unwrap();
    for p in ["web", "client", "worker"] {
        assert_eq!(
            flags(&d, p),
            EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS,
            "{p}"
        );
    }
    assert_eq!(flags(&d, "db"), 0);
}

#[test]
fn trust_domain_errors() {
    // A policy error fails that policy closed for its subjects (here the namespace's
    // local pods), not the compile.
    let d = run(&ztp(
        "default",
        "z",
        "  ingress: [{from: [{spiffeId: spiffe://other.td/ns/prod/sa/api}]}]\n",
    ));
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert_eq!(
        d.failures[0].error,
        "ZeroTrustPolicy default/z: spec.ingress[0].from[0].spiffeId: SPIFFE ID \"spiffe://other.td/ns/prod/sa/api\" is not of trust domain \"cluster.local\""
    );
    assert_eq!(d.failures[0].identities, BTreeSet::from([id(&d, "web"), id(&d, "client")]));
    let d = run(&ztp(
        "default",
        "z",
        "  subjects: [{spiffeId: spiffe://other.td/ns/default/sa/web}]\n",
    ));
    assert!(d.failures[0].error.contains("spec.subjects[0].spiffeId"), "{:?}", d.failures);
    let mut c = cfg();
    c.trust_domain = "Bad Domain".into();
    assert!(try_run("", &c)
        .unwrap_err()
        .message
        .contains("invalid trust domain"));
}

#[test]
fn rule_ids_are_deterministic() {
    let yaml = ztp("default", "a", "  ingress: [{}]\n  egress: [{}]\n")
        + &np("prod", "b", "  podSelector: {}\n  ingress: [{}, {}]\n")
        + &np("default", "z", "  podSelector: {}\n  egress: [{}]\n");
    let d = run(&yaml);
    let got: Vec<(u32, &str, &str)> = d
        .rules
        .values()
        .map(|r| (r.id, r.source.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, "NetworkPolicy default/z", "spec.egress[0]"),
            (2, "NetworkPolicy prod/b", "spec.ingress[0]"),
            (3, "NetworkPolicy prod/b", "spec.ingress[1]"),
            (4, "ZeroTrustPolicy default/a", "spec.ingress[0]"),
            (5, "ZeroTrustPolicy default/a", "spec.egress[0]"),
        ]
    );
    // Same input, same output.
    let d2 = run(&yaml);
    assert_eq!(d.policy, d2.policy);
    assert_eq!(d.endpoints, d2.endpoints);
    assert_eq!(d.identities, d2.identities);
}

#[test]
fn identities_stable_across_compiles_and_restarts() {
    let st = state(
        &(base()
            + &np(
                "default",
                "c",
                "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 203.0.113.0/24}}]}]\n",
            )),
    );
    let mut ids = IdentityAllocator::new();
    let d1 = compile(&st, &cfg(), &mut ids).unwrap();
    let path = std::env::temp_dir().join(format!("zt-compile-ids-{}.json", std::process::id()));
    ids.save(&path).unwrap();
    let mut reloaded = IdentityAllocator::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let d2 = compile(&st, &cfg(), &mut reloaded).unwrap();
    assert_eq!(d1.identities, d2.identities);
    assert_eq!(d1.endpoints, d2.endpoints);
    assert_eq!(d1.cidrs, d2.cidrs);

    // A pod that goes away releases its identity; the others keep theirs.
    let mut st2 = st.clone();
    let db = id(&d1, "db");
    st2.remove(crate::model::ObjectKind::Pod, "default", "db");
    let d3 = compile(&st2, &cfg(), &mut reloaded).unwrap();
    assert!(!d3.identities.contains_key(&db));
    assert_eq!(id(&d3, "web"), id(&d1, "web"));
    assert_eq!(id(&d3, "api"), id(&d1, "api"));
    assert_eq!(reloaded.len(), 4 + 1); // four workloads, one CIDR

    // A failing compile (a bad trust domain fails the node, not one object) leaves the
    // allocator untouched.
    let before = reloaded.clone();
    let bad_cfg = CompileConfig { trust_domain: "Bad Domain".into(), ..cfg() };
    assert!(compile(&st2, &bad_cfg, &mut reloaded).is_err());
    assert_eq!(reloaded, before);
}

#[test]
fn conflicting_pod_ips_fail_closed() {
    let extra = pod(
        "default",
        "dup",
        "{app: dup}",
        NODE,
        "10.0.0.1",
        "dup",
        "[]",
    );
    let d = run(&extra);
    assert_eq!(d.endpoints[&ip("10.0.0.1")].identity, IDENTITY_INIT);
}

#[test]
fn fixture_directory_compiles() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/basic");
    let loaded = ClusterState::load_dir(dir).unwrap();
    let mut c = cfg();
    c.host_ips = vec![ip("192.168.0.10"), ip("fd00::a")];
    let d = compile(&loaded.state, &c, &mut IdentityAllocator::new()).unwrap();
    let httpbin = d.endpoints[&ip("10.0.1.10")].clone();
    assert_eq!(d.endpoints[&ip("fd00::1:10")].identity, httpbin.identity);
    assert_eq!(
        httpbin.flags,
        EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS
    );
    assert_eq!(d.endpoints[&ip("10.0.1.11")].flags, EP_LOCAL);
    assert_eq!(d.endpoints[&ip("fd00::a")].identity, IDENTITY_HOST);
    let sleep = d.endpoints[&ip("10.0.1.11")].identity;
    let api = d.endpoints[&ip("10.0.2.20")].identity;
    let h = httpbin.identity;
    let all = cidr_id(&d, "0.0.0.0/0");
    assert_eq!(get(&d, 96, h, sleep, I, 6, 8080), Some(A)); // named port "http"
    assert_eq!(get(&d, 72, h, api, I, 0, 0), Some(D)); // spiffe://.../ns/prod/*
    assert_eq!(get(&d, 96, h, all, E, 6, 443), Some(A));
    assert_eq!(get(&d, 96, h, IDENTITY_ANY, E, 1, 8), Some(A));
    assert_eq!(d.policy.len(), 4);
    assert_eq!(d.rules[&1].source, "NetworkPolicy default/allow-sleep");
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

fn node(name: &str, addresses: &str) -> String {
    format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: {addresses}\n")
}

#[test]
fn node_addresses_are_host_and_remote_node() {
    let extra = node(
        NODE,
        "[{type: InternalIP, address: 172.16.0.1}, {type: ExternalIP, address: \"2001:db8::1\"}, {type: Hostname, address: node-a}]",
    ) + &node(
        "node-b",
        "[{type: InternalIP, address: 172.16.0.2}, {type: InternalDNS, address: node-b.internal}]",
    ) + &node("node-c.example", "[{type: ExternalIP, address: \"::ffff:198.51.100.3\"}]");
    let d = run(&extra);
    // 5 pods + interface address + node-a x2 + node-b + node-c.
    assert_eq!(d.endpoints.len(), 10);
    for (addr, want) in [
        ("192.168.0.10", IDENTITY_HOST),
        ("172.16.0.1", IDENTITY_HOST),
        ("2001:db8::1", IDENTITY_HOST),
        ("172.16.0.2", IDENTITY_REMOTE_NODE),
        // IPv4-mapped addresses are stored in their IPv4 form.
        ("198.51.100.3", IDENTITY_REMOTE_NODE),
    ] {
        let e = &d.endpoints[&ip(addr)];
        assert_eq!((e.identity, e.flags, e.pod.clone()), (want, 0, None), "{addr}");
    }
    // Pods keep their identities.
    assert!(id(&d, "db") >= IDENTITY_FIRST_WORKLOAD);
}

#[test]
fn node_address_beats_a_pod_claiming_it() {
    // db's IP (10.0.0.3) is also listed by node-b: the node wins, as for host addresses.
    let d = run(&node("node-b", "[{type: InternalIP, address: 10.0.0.3}]"));
    assert_eq!(d.endpoints[&ip("10.0.0.3")].identity, IDENTITY_REMOTE_NODE);
    // This node's Node object names the host even without interface addresses.
    let mut c = cfg();
    c.host_ips.clear();
    let d = try_run(&node(NODE, "[{type: InternalIP, address: 10.0.0.1}]"), &c).unwrap();
    assert_eq!(d.endpoints[&ip("10.0.0.1")].identity, IDENTITY_HOST);
}

#[test]
fn remote_node_entity_selects_other_nodes() {
    let extra = node("node-b", "[{type: InternalIP, address: 172.16.0.2}]")
        + &ztp(
            "default",
            "from-nodes",
            "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  ingress: [{from: [{entity: remote-node}], ports: [{port: 8080}]}]\n",
        );
    let d = run(&extra);
    assert_eq!(d.endpoints[&ip("172.16.0.2")].identity, IDENTITY_REMOTE_NODE);
    let web = id(&d, "web");
    assert_eq!(get(&d, 96, web, IDENTITY_REMOTE_NODE, I, 6, 8080), Some(A));
}

#[test]
fn node_validation_names_the_field() {
    let mut ignored = Vec::new();
    let e = parse_manifests(
        "n.yaml",
        &node("node-b", "[{type: Hostname, address: not-an-ip}, {type: InternalIP, address: 10.0.0.300}]"),
        &mut ignored,
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "n.yaml doc 1: Node node-b: status.addresses[1].address: invalid IP address \"10.0.0.300\""
    );
    let e = parse_manifests("n.yaml", &node("Node_B", "[]"), &mut ignored).unwrap_err();
    assert!(e.to_string().starts_with("n.yaml doc 1: Node Node_B: metadata.name: invalid name"), "{e}");
}

// ---------------------------------------------------------------------------
// FQDN rules (compile/fqdn.rs)
// ---------------------------------------------------------------------------

mod fqdn_rules {
    use super::*;
    use crate::model::ztp::SpiffePattern;
    use std::collections::BTreeMap;

    const KEY: [u64; 2] = [0x1111, 0x2222];

    fn fcfg() -> CompileConfig {
        CompileConfig {
            fqdn_hash_key: KEY,
            dns_servers: crate::compile::default_dns_servers("cluster.local")
                .iter()
                .map(|s| SpiffePattern::parse(s).unwrap())
                .collect(),
            dns_addresses: vec![ip("10.96.0.10"), ip("::ffff:169.254.20.10")],
            ..cfg()
        }
    }

    fn frun(extra: &str) -> Desired {
        fcompile(extra, &mut FqdnSlots::new()).unwrap()
    }

    fn fcompile(extra: &str, slots: &mut FqdnSlots) -> Result<Desired, CompileError> {
        compile_with_slots(&state(&(base() + extra)), &fcfg(), &mut IdentityAllocator::new(), slots)
    }

    fn h(name: &str) -> u64 {
        name_hashes(KEY, name).0
    }

    fn name_slots(d: &Desired, local: u32, kind: u8, name: &str) -> Option<u32> {
        d.fqdn_names.get(&FqdnNameKey::new(local, kind, h(name))).copied()
    }

    /// (prefix, proto, port) -> (slots, rule ids of the set slots)
    type PortsEntry = ((u32, u8, u16), (u32, Vec<u32>));

    fn ports_of(d: &Desired, local: u32) -> Vec<PortsEntry> {
        d.fqdn_ports
            .iter()
            .filter(|(k, _)| k.key.local_id() == local)
            .map(|(k, v)| {
                assert_eq!((k.key.peer_id(), k.key.dir), (IDENTITY_ANY, DIR_EGRESS));
                let ids = (0..32).filter(|s| v.slots & (1 << s) != 0).map(|s| v.rule_ids[s]).collect();
                ((k.prefix_len, k.key.proto, k.key.port()), (v.slots, ids))
            })
            .collect()
    }

    const DNS_ALLOW: &str = "    - to: [{entity: dns}]\n      ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]\n";

    fn web_policy(egress: &str) -> String {
        ztp("default", "web-out", &format!("  subjects: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n  egress:\n{egress}"))
    }

    #[test]
    fn names_suffixes_ports_and_flags() {
        let d = frun(&(web_policy(
            "    - to: [{fqdn: {matchName: API.Example.com.}}, {fqdn: {matchPattern: \"*.example.org\"}}]\n      ports: [{protocol: TCP, port: 443}]\n",
        ) + &web_policy_dns()));
        let web = id(&d, "web");
        assert_eq!(name_slots(&d, web, NAME_EXACT, "api.example.com"), Some(1));
        assert_eq!(name_slots(&d, web, NAME_SUFFIX, "example.org"), Some(1));
        assert_eq!(name_slots(&d, web, NAME_EXACT, "example.org"), None, "*.S does not match S itself");
        assert_eq!(d.fqdn_names.len(), 2);
        let rule = d.rules.values().find(|r| !r.fqdn.is_empty()).unwrap();
        assert_eq!(rule.fqdn, vec!["api.example.com".to_string(), "*.example.org".to_string()]);
        assert_eq!(rule.path, "spec.egress[0]");
        assert_eq!(ports_of(&d, web), vec![((96, 6, 443), (1, vec![rule.id]))]);
        assert_eq!(d.fqdn_slots[&web], BTreeMap::from([(0u8, rule.id)]));
        assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_EGRESS | EP_FQDN);
        assert_eq!(flags(&d, "client"), EP_LOCAL, "not a subject");
        // The fqdn peers add no identity-keyed policy entries: only the DNS allow.
        assert!(entries_of(&d, web).iter().all(|e| e.0 .4 == 17 || e.0 .4 == 6 && e.0 .5 == 53), "{:?}", entries_of(&d, web));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    fn web_policy_dns() -> String {
        ztp("default", "web-dns", &format!("  subjects: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n  egress:\n{DNS_ALLOW}"))
    }

    #[test]
    fn ports_fold_shorter_prefixes_in() {
        let d = frun(&(web_policy(
            "    - to: [{fqdn: {matchName: a.example.com}}]\n      ports: [{protocol: TCP, port: 443}]\n\
             \x20   - to: [{fqdn: {matchName: b.example.com}}]\n\
             \x20   - to: [{fqdn: {matchName: c.example.com}}]\n      ports: [{protocol: TCP, port: 440, endPort: 447}]\n\
             \x20   - to: [{fqdn: {matchName: d.example.com}}]\n      ports: [{protocol: UDP}]\n",
        ) + &web_policy_dns()));
        let web = id(&d, "web");
        let rid = |n: &str| d.rules.values().find(|r| r.fqdn == vec![n.to_string()]).unwrap().id;
        let (a, b, c, dd) = (rid("a.example.com"), rid("b.example.com"), rid("c.example.com"), rid("d.example.com"));
        assert_eq!(
            ports_of(&d, web),
            vec![
                ((72, 0, 0), (0b0010, vec![b])),
                ((80, 17, 0), (0b1010, vec![b, dd])),
                ((93, 6, 440), (0b0110, vec![b, c])),
                ((96, 6, 443), (0b0111, vec![a, b, c])),
            ]
        );
        // Each rule's names carry its own slot only.
        assert_eq!(name_slots(&d, web, NAME_EXACT, "a.example.com"), Some(0b0001));
        assert_eq!(name_slots(&d, web, NAME_EXACT, "d.example.com"), Some(0b1000));
    }

    #[test]
    fn same_name_in_two_rules_ors_slots_and_subjects_are_separate() {
        let d = frun(&(ztp("default", "all", "  egress:\n    - to: [{fqdn: {matchName: x.example.com}}]\n      ports: [{port: 80}]\n")
            + &ztp(
                "default",
                "all2",
                "  egress:\n    - to: [{fqdn: {matchName: x.example.com}}, {podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: 81}]\n",
            )
            + &ztp("default", "dns", &format!("  egress:\n{DNS_ALLOW}"))));
        let (web, client) = (id(&d, "web"), id(&d, "client"));
        for local in [web, client] {
            assert_eq!(name_slots(&d, local, NAME_EXACT, "x.example.com"), Some(0b11));
            assert_eq!(ports_of(&d, local).iter().map(|p| (p.0, p.1 .0)).collect::<Vec<_>>(), vec![((96, 6, 80), 0b01), ((96, 6, 81), 0b10)]);
        }
        // The mixed rule's pod peer compiles as usual.
        assert_eq!(get(&d, 96, web, id(&d, "db"), E, 6, 81), Some(A));
        assert_eq!(get(&d, 96, web, id(&d, "db"), E, 6, 80), None);
        // The same names twice in one policy: one slot, the ports add up.
        let d = frun(&ztp(
            "default",
            "all",
            "  egress:\n    - to: [{fqdn: {matchName: x.example.com}}]\n      ports: [{port: 80}]\n    - to: [{fqdn: {matchName: X.example.com}}]\n      ports: [{port: 81}]\n",
        ));
        let web = id(&d, "web");
        assert_eq!(name_slots(&d, web, NAME_EXACT, "x.example.com"), Some(0b1));
        let rule_ids: Vec<u32> = d.rules.values().map(|r| r.id).collect();
        assert_eq!(ports_of(&d, web), vec![((96, 6, 80), (1, vec![rule_ids[0]])), ((96, 6, 81), (1, vec![rule_ids[1]]))]);
    }

    #[test]
    fn visibility_pattern_grants_nothing() {
        let d = frun(&web_policy("    - to: [{fqdn: {matchPattern: \"*\"}}]\n"));
        let web = id(&d, "web");
        assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_EGRESS | EP_DNS_VISIBILITY, "egress isolated, nothing allowed");
        assert!(d.fqdn_names.is_empty() && d.fqdn_ports.is_empty() && d.fqdn_slots.is_empty());
        assert!(entries_of(&d, web).is_empty());
        let d = frun(&web_policy("    - to: [{fqdn: {matchPattern: \"*\"}}, {fqdn: {matchName: a.example.com}}]\n"));
        assert_eq!(flags(&d, "web"), EP_LOCAL | EP_ENFORCE_EGRESS | EP_DNS_VISIBILITY | EP_FQDN);
        assert_eq!(d.fqdn_names.len(), 1);
        assert_eq!(ports_of(&d, web).len(), 1);
    }

    /// NodeLocal DNSCache listens on a node address: named by --fqdn-dns-address it is
    /// the resolver (`dns`), not `host`; the node's other addresses stay `host`.
    #[test]
    fn a_node_address_named_as_resolver_is_dns() {
        let mut c = fcfg();
        c.host_ips = vec![ip("169.254.20.10"), ip("192.168.0.1")];
        let d = compile_with_slots(&state(&(base() + &web_policy_dns())), &c, &mut IdentityAllocator::new(), &mut FqdnSlots::new()).unwrap();
        assert_eq!(d.endpoints[&ip("169.254.20.10")].identity, IDENTITY_DNS);
        assert_eq!(d.endpoints[&ip("192.168.0.1")].identity, IDENTITY_HOST);
    }

    #[test]
    fn entity_dns_addresses_and_trusted_servers() {
        let coredns = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n".to_string()
            + &pod("kube-system", "coredns", "{k8s-app: kube-dns}", "node-b", "10.0.9.1", "coredns", "[]")
            + &pod("kube-system", "other", "{k8s-app: other}", "node-b", "10.0.9.2", "other", "[]");
        let d = frun(&(coredns + &web_policy_dns()));
        let (web, core, other) = (id(&d, "web"), id(&d, "coredns"), id(&d, "other"));
        assert_eq!(d.dns_servers, BTreeSet::from([IDENTITY_DNS, core]));
        assert!(!d.dns_servers.contains(&other));
        for a in ["10.96.0.10", "169.254.20.10"] {
            let e = &d.endpoints[&ip(a)];
            assert_eq!((e.identity, e.flags, e.pod.clone()), (IDENTITY_DNS, 0, None), "{a}");
        }
        assert_eq!(d.identities[&IDENTITY_DNS].spiffe_id, "reserved:dns");
        for peer in [IDENTITY_DNS, core] {
            assert_eq!(get(&d, 96, web, peer, E, 17, 53), Some(A));
            assert_eq!(get(&d, 96, web, peer, E, 6, 53), Some(A));
        }
        assert_eq!(get(&d, 96, web, other, E, 17, 53), None);
        // No trusted patterns: only the configured addresses.
        let c = CompileConfig { dns_servers: vec![], ..fcfg() };
        let d = compile(&state(&base()), &c, &mut IdentityAllocator::new()).unwrap();
        assert_eq!(d.dns_servers, BTreeSet::from([IDENTITY_DNS]));
    }

    /// The resolver Service's pods (`--fqdn-dns-service`, addresses from the Service
    /// table) are trusted whatever their service account; host addresses never are.
    #[test]
    fn the_resolver_services_pods_are_trusted() {
        let pods = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n".to_string()
            + &pod("kube-system", "dns-a", "{k8s-app: kube-dns}", "node-b", "10.0.9.1", "custom-dns", "[]")
            + &pod("kube-system", "other", "{k8s-app: other}", "node-b", "10.0.9.2", "other", "[]");
        let st = state(&(base() + &pods + &web_policy_dns()));
        let c = CompileConfig { dns_backends: vec![ip("10.0.9.1"), ip("10.96.0.10"), ip("192.0.2.1")], ..fcfg() };
        let mut slots = FqdnSlots::new();
        let d = compile_with_slots(&st, &c, &mut IdentityAllocator::new(), &mut slots).unwrap();
        let (web, dns_a, other) = (id(&d, "web"), id(&d, "dns-a"), id(&d, "other"));
        assert!(d.dns_servers.contains(&dns_a), "{:?}", d.dns_servers);
        assert!(!d.dns_servers.contains(&other));
        assert_eq!(d.dns_servers.len(), 2, "dns and dns-a only: {:?}", d.dns_servers);
        // ... and `entity: dns` reaches them.
        assert_eq!(get(&d, 96, web, dns_a, E, 17, 53), Some(A));
        let d = compile_with_slots(&st, &fcfg(), &mut IdentityAllocator::new(), &mut FqdnSlots::new()).unwrap();
        assert!(!d.dns_servers.contains(&id(&d, "dns-a")), "not without the Service");
    }

    #[test]
    fn warning_without_a_dns_allow() {
        let d = frun(&web_policy("    - to: [{fqdn: {matchName: a.example.com}}]\n"));
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].contains(&format!("identity {}", id(&d, "web"))) && d.warnings[0].contains("port 53"), "{:?}", d.warnings);
        // An allow to any peer on UDP 53 counts too.
        let d = frun(&web_policy("    - to: [{fqdn: {matchName: a.example.com}}]\n    - ports: [{protocol: UDP, port: 53}]\n"));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn slots_stable_across_restarts_and_freed_only_after_clearing() {
        let dir = std::env::temp_dir().join(format!("zt-fqdn-compile-{}", std::process::id()));
        let path = dir.join("fqdn-slots.json");
        let rules = |names: &[&str]| {
            let egress: String = names.iter().map(|n| format!("    - to: [{{fqdn: {{matchName: {n}}}}}]\n")).collect();
            web_policy(&egress)
        };
        let mut slots = FqdnSlots::new();
        let d1 = fcompile(&rules(&["a.x.com", "b.x.com", "c.x.com"]), &mut slots).unwrap();
        let web = id(&d1, "web");
        let slot_of = |d: &Desired, n: &str| name_slots(d, web, NAME_EXACT, n).unwrap().trailing_zeros();
        assert_eq!([slot_of(&d1, "a.x.com"), slot_of(&d1, "b.x.com"), slot_of(&d1, "c.x.com")], [0, 1, 2]);
        slots.save(&path).unwrap();

        // A restart, and a rule inserted first: the others keep their slots, b's is pending.
        let mut slots = FqdnSlots::load(&path).unwrap();
        let d2 = fcompile(&rules(&["new.x.com", "a.x.com", "c.x.com"]), &mut slots).unwrap();
        assert_eq!([slot_of(&d2, "a.x.com"), slot_of(&d2, "c.x.com")], [0, 2]);
        assert_eq!(slot_of(&d2, "new.x.com"), 3, "slot 1 is not reused before it is cleared");
        assert_eq!(slots.pending(), &BTreeMap::from([(web, 0b10)]));
        assert_eq!(slots.active_masks(), BTreeMap::from([(web, 0b1101)]));
        // Renaming a rule's name makes it another rule: a new slot.
        slots.release_cleared();
        let d3 = fcompile(&rules(&["new.x.com", "a.x.com", "c2.x.com"]), &mut slots).unwrap();
        assert_eq!(slot_of(&d3, "c2.x.com"), 1);
        assert_eq!(slots.pending(), &BTreeMap::from([(web, 0b100)]));
        // A failed compile leaves the slots untouched.
        let before = slots.clone();
        let bad_cfg = CompileConfig { trust_domain: "Bad Domain".into(), ..fcfg() };
        assert!(compile_with_slots(&state(&(base() + &rules(&["z.x.com"]))), &bad_cfg, &mut IdentityAllocator::new(), &mut slots).is_err());
        assert_eq!(slots, before);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thirty_third_fqdn_rule_fails_that_identity_closed_only() {
        let egress = |from: usize, n: usize| -> String {
            (from..from + n).map(|i| format!("    - to: [{{fqdn: {{matchName: n{i}.x.com}}}}]\n")).collect()
        };
        let d = frun(&web_policy(&egress(0, 32)));
        assert_eq!(d.fqdn_slots[&id(&d, "web")].len(), 32);
        assert!(d.failures.is_empty());
        // One policy over the limit is a validation error (see model::ztp); two policies
        // together exceed it at compile time: the identity fails closed, named with the
        // policy where it ran out; the other identities compile as usual.
        let second = ztp("default", "web-second", &format!("  subjects: [{{podSelector: {{matchLabels: {{app: web}}}}}}]\n  egress:\n{}", egress(20, 13)));
        let client = ztp("default", "client-out", &format!("  subjects: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n  egress:\n{DNS_ALLOW}    - to: [{{fqdn: {{matchName: c.x.com}}}}]\n    - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]\n"));
        let web_dns = web_policy(&format!("{DNS_ALLOW}{}", egress(0, 20)));
        let d = fcompile(&(web_dns + &second + &client), &mut FqdnSlots::new()).unwrap();
        let (web, cl) = (id(&d, "web"), id(&d, "client"));
        assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
        let f = &d.failures[0];
        assert_eq!(f.object, "ZeroTrustPolicy default/web-second");
        assert_eq!(f.identities, BTreeSet::from([web]));
        assert!(f.error.contains("spec.egress[12]") && f.error.contains("is subject to more than 32 FQDN rules") && f.error.contains("service account web"), "{f:?}");
        // web: isolated both ways, no allow of any kind (no policy entry, no FQDN entry).
        assert_eq!(flags(&d, "web") & (EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS | EP_FQDN), EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS);
        assert!(entries_of(&d, web).iter().all(|e| e.1 .0 != A), "{:?}", entries_of(&d, web));
        assert!(ports_of(&d, web).is_empty() && !d.fqdn_slots.contains_key(&web));
        assert!(d.fqdn_names.keys().all(|k| k.local_id != web));
        // client: its rules as compiled alone.
        let alone = fcompile(&client_only(), &mut FqdnSlots::new()).unwrap();
        let verdicts = |d: &Desired, l: u32| entries_of(d, l).into_iter().map(|e| (e.0, e.1 .0)).collect::<Vec<_>>();
        assert_eq!(verdicts(&d, cl), verdicts(&alone, id(&alone, "client")));
        assert!(!verdicts(&d, cl).is_empty());
        assert_eq!(ports_of(&d, cl).len(), ports_of(&alone, id(&alone, "client")).len());
        assert_eq!(name_slots(&d, cl, NAME_EXACT, "c.x.com"), Some(1));
        fn client_only() -> String {
            ztp("default", "client-out", &format!("  subjects: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n  egress:\n{DNS_ALLOW}    - to: [{{fqdn: {{matchName: c.x.com}}}}]\n    - to: [{{podSelector: {{matchLabels: {{app: db}}}}}}]\n"))
        }
        // Slots are per identity: 32 rules for each of two identities compile.
        let two = ztp("default", "all", &format!("  egress:\n{}", egress(0, 32)));
        let d = frun(&two);
        assert_eq!(d.fqdn_slots.len(), 2);
    }
}

#[test]
fn host_reaches_local_pods_on_their_probe_ports_only() {
    let probed = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: probed, namespace: default, labels: {app: probed}}\n\
                  spec:\n  nodeName: node-a\n  serviceAccountName: probed\n  containers:\n  - name: c\n    ports: [{name: http, containerPort: 8080}]\n\
                  \x20   readinessProbe: {httpGet: {port: http}}\n    livenessProbe: {tcpSocket: {port: 8081}}\n\
                  status: {phase: Running, podIP: 10.0.0.9}\n";
    let remote = probed.replace("name: probed,", "name: far,").replace("node-a", "node-b").replace("10.0.0.9", "10.0.0.19").replace("sa: probed", "sa: far").replace("serviceAccountName: probed", "serviceAccountName: far");
    let deny_all = np("default", "deny", "  podSelector: {}\n  policyTypes: [Ingress]\n");
    let d = run(&format!("{probed}{remote}{deny_all}"));
    let p = id(&d, "probed");
    let host: Vec<Entry> = entries_of(&d, p).into_iter().filter(|e| e.0 .2 == IDENTITY_HOST).collect();
    let ports: Vec<(u8, u8, u16, u8)> = host.iter().map(|e| (e.0 .3, e.0 .4, e.0 .5, e.1 .0)).collect();
    assert_eq!(ports, vec![(I, 6, 8080, A), (I, 6, 8081, A)]);
    assert!(d.rules[&host[0].1 .1].source.contains("kubelet probes"));
    // A remote pod's probes are its own node's business; pods without probes get nothing.
    let far = id(&d, "far");
    assert!(entries_of(&d, far).is_empty());
    assert!(entries_of(&d, id(&d, "web")).iter().all(|e| e.0 .2 != IDENTITY_HOST));
    // --host-access all / none: no probe entries (all is the kernel's flag).
    for mode in [HostAccess::All, HostAccess::None] {
        let d = try_run(&format!("{probed}{deny_all}"), &CompileConfig { host_access: mode, ..cfg() }).unwrap();
        assert!(entries_of(&d, id(&d, "probed")).iter().all(|e| e.0 .2 != IDENTITY_HOST), "{mode:?}");
    }
    // A deny naming the host still wins over the probe allow.
    let deny_host = ztp("default", "no-host", "  ingress:\n  - action: deny\n    from: [{entity: host}]\n");
    let d = run(&format!("{probed}{deny_all}{deny_host}"));
    let v = get(&d, POLICY_PREFIX_FULL, id(&d, "probed"), IDENTITY_HOST, I, 6, 8080);
    assert_ne!(v, Some(A), "{:?}", entries_of(&d, id(&d, "probed")));
}

/// A Deployment's pods: labels `app: shop` plus the controller's per-rollout hash.
fn shop_pods(hash: &str, ips: &[&str]) -> String {
    ips.iter()
        .enumerate()
        .map(|(i, ip)| pod("default", &format!("shop-{hash}-{i}"), &format!("{{app: shop, pod-template-hash: {hash}}}"), NODE, ip, "shop", "[]"))
        .collect()
}

#[test]
fn a_rollout_keeps_its_identity_and_entry_count() {
    let policy = np("default", "shop-in", "  podSelector: {matchLabels: {app: shop}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n  egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]\n");
    let mut ids = IdentityAllocator::new();
    let old = compile(&state(&(base() + &policy + &shop_pods("5d8f7", &["10.0.2.1", "10.0.2.2"]))), &cfg(), &mut ids).unwrap();
    // Mid-rollout: old and new ReplicaSet side by side; then only the new one.
    let mid = compile(&state(&(base() + &policy + &shop_pods("5d8f7", &["10.0.2.1"]) + &shop_pods("7c9b2", &["10.0.2.3"]))), &cfg(), &mut ids).unwrap();
    let new = compile(&state(&(base() + &policy + &shop_pods("7c9b2", &["10.0.2.3", "10.0.2.4"]))), &cfg(), &mut ids).unwrap();
    let shop = |d: &Desired| -> BTreeSet<u32> { d.endpoints.values().filter(|e| e.pod.as_ref().is_some_and(|p| p.name.starts_with("shop-"))).map(|e| e.identity).collect() };
    assert_eq!(shop(&old).len(), 1, "the pods of one ReplicaSet share an identity");
    assert_eq!(shop(&mid), shop(&old), "the new ReplicaSet's pods get the old identity");
    assert_eq!(shop(&new), shop(&old));
    for d in [&mid, &new] {
        assert_eq!(d.identities.len(), old.identities.len(), "identity count flat through the rollout");
        assert_eq!(d.policy.len(), old.policy.len(), "policy entry count flat through the rollout");
    }
    let info = &new.identities[shop(&new).iter().next().unwrap()];
    assert!(!info.labels.contains_key("pod-template-hash"), "{:?}", info.labels);
    // With the filter emptied, every ReplicaSet is an identity of its own (today's
    // behaviour without the default list).
    let all = CompileConfig { identity_labels: crate::identity::LabelFilter::parse("").unwrap(), ..cfg() };
    let d = compile(&state(&(base() + &policy + &shop_pods("5d8f7", &["10.0.2.1"]) + &shop_pods("7c9b2", &["10.0.2.3"]))), &all, &mut IdentityAllocator::new()).unwrap();
    assert_eq!(shop(&d).len(), 2);
}

#[test]
fn a_selector_on_an_excluded_label_fails_its_policy_closed() {
    let shop = shop_pods("5d8f7", &["10.0.2.1"]);
    // Subject selector: quarantines what the selector would select without the key.
    let by_hash = np("default", "by-hash", "  podSelector: {matchLabels: {app: shop, pod-template-hash: 5d8f7}}\n  ingress: [{}]\n");
    let d = run(&(shop.clone() + &by_hash));
    let s = id(&d, "shop-5d8f7-0");
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert_eq!(d.failures[0].object, "NetworkPolicy default/by-hash");
    assert!(d.failures[0].error.contains("\"pod-template-hash\"") && d.failures[0].error.contains("--identity-exclude-labels"), "{:?}", d.failures);
    assert_eq!(d.failures[0].identities, BTreeSet::from([s]));
    assert_eq!(flags(&d, "shop-5d8f7-0") & (EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS), EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS);
    assert!(entries_of(&d, s).is_empty(), "no allow at all: {:?}", entries_of(&d, s));
    assert!(d.rules.values().all(|r| r.source != "NetworkPolicy default/by-hash"));
    // web, in the same namespace, is not a subject: untouched.
    assert_eq!(flags(&d, "web") & (EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS), 0);
    // Peer selector (a ZeroTrustPolicy): its subjects fail closed.
    let peer = ztp("default", "peer", "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  ingress: [{from: [{podSelector: {matchLabels: {job-name: backup}}}]}]\n");
    let d = run(&(shop + &peer));
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert!(d.failures[0].error.contains("spec.ingress[0].from[0].podSelector") && d.failures[0].error.contains("job-name"), "{:?}", d.failures);
    assert_eq!(d.failures[0].identities, BTreeSet::from([id(&d, "web")]));
}

#[test]
fn a_bad_policy_fails_closed_for_its_subjects_and_holds_back_no_one_else() {
    // prod/worker is isolated by a good policy; default has a policy that fails.
    let good = np("prod", "worker-in", "  podSelector: {matchLabels: {app: worker}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]\n");
    let web_ok = np("default", "web-in", "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n");
    let bad = ztp("default", "bad", "  subjects: [{podSelector: {matchLabels: {app: client}}}]\n  egress: [{to: [{spiffeId: spiffe://other.td/ns/prod/sa/api}]}]\n");
    let new_pod = pod("prod", "new", "{app: worker, tier: be}", NODE, "10.0.1.9", "worker", "[]");
    let reference = run(&(good.clone() + &web_ok + &new_pod));
    let d = run(&(good + &web_ok + &bad + &new_pod));
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    let client = id(&d, "client");
    assert_eq!(d.failures[0].identities, BTreeSet::from([client]));
    // The subject: isolated both ways, no allow from any policy (web-in's allow from
    // client stays on web's side, it gives client nothing).
    assert_eq!(flags(&d, "client") & (EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS), EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS);
    assert!(entries_of(&d, client).is_empty(), "{:?}", entries_of(&d, client));
    // Everyone else, the new pod in prod included, exactly as without the bad policy.
    assert_eq!(id(&d, "new"), id(&d, "worker"));
    for p in ["web", "worker", "new"] {
        assert_eq!(flags(&d, p), flags(&reference, p), "{p}");
        let v = |d: &Desired| entries_of(d, id(d, p)).into_iter().map(|e| (e.0, e.1 .0)).collect::<Vec<_>>();
        assert_eq!(v(&d), v(&reference), "{p}");
    }
    assert!(!entries_of(&d, id(&d, "worker")).is_empty());
}

#[test]
fn a_pod_with_a_bad_address_is_left_out_alone() {
    let bad = pod("prod", "broken", "{app: broken}", NODE, "10.0.1.300", "broken", "[]");
    let mut st = state(&base());
    // (validation at load would reject it; a compile must not depend on that)
    for (_, o) in parse_manifests("t.yaml", &bad.replace("10.0.1.300", "10.0.1.30"), &mut Vec::new()).unwrap() {
        st.upsert(o);
    }
    if let Some(p) = st.pods.get_mut(&("prod".to_string(), "broken".to_string())) {
        p.status.as_mut().unwrap().pod_ip = Some("10.0.1.300".into());
    }
    let d = compile(&st, &cfg(), &mut IdentityAllocator::new()).unwrap();
    assert_eq!(d.failures.len(), 1, "{:?}", d.failures);
    assert_eq!(d.failures[0].object, "Pod prod/broken");
    assert!(d.endpoints.values().all(|e| e.pod.as_ref().is_none_or(|p| p.name != "broken")));
    assert_eq!(d.endpoints.values().filter(|e| e.pod.is_some()).count(), 5);
}

#[test]
fn a_quarantined_pod_keeps_only_its_host_probes() {
    let probed = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: probed, namespace: default, labels: {app: probed}}\n\
                  spec:\n  nodeName: node-a\n  serviceAccountName: probed\n  containers:\n  - name: c\n    ports: [{name: http, containerPort: 8080}]\n\
                  \x20   readinessProbe: {httpGet: {port: http}}\n\
                  status: {phase: Running, podIP: 10.0.0.9}\n";
    let allow = np("default", "probed-in", "  podSelector: {matchLabels: {app: probed}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n");
    let bad = ztp("default", "bad", "  subjects: [{podSelector: {matchLabels: {app: probed}}}]\n  egress: [{to: [{spiffeId: spiffe://other.td/ns/prod/sa/api}]}]\n");
    let d = run(&format!("{probed}{allow}{bad}"));
    let p = id(&d, "probed");
    assert_eq!(d.failures[0].identities, BTreeSet::from([p]));
    let entries = entries_of(&d, p);
    let allows: Vec<(u32, u8, u16)> = entries.iter().filter(|e| e.1 .0 == A).map(|e| (e.0 .2, e.0 .3, e.0 .5)).collect();
    assert_eq!(allows, vec![(IDENTITY_HOST, I, 8080)], "only the host's probe port: {entries:?}");
    // Under --host-access none, nothing at all.
    let d = try_run(&format!("{probed}{allow}{bad}"), &CompileConfig { host_access: HostAccess::None, ..cfg() }).unwrap();
    assert!(entries_of(&d, id(&d, "probed")).is_empty());
}

// ---------------------------------------------------------------------------
// Authentication (issue 10): rule-level `authentication: required` and STRICT
// ---------------------------------------------------------------------------

/// (prefix, local, peer, dir, proto, port) -> flags of the entry.
fn flags_of(d: &Desired, key: (u32, u32, u32, u8, u8, u16)) -> Option<u8> {
    d.policy.iter().find(|(k, _)| (k.prefix_len, k.key.local_id(), k.key.peer_id(), k.key.dir, k.key.proto, k.key.port()) == key).map(|(_, v)| v.flags)
}

#[test]
fn authentication_required_rules_flag_their_allows_and_plain_allows_win() {
    let spec = "  subjects: [{spiffeId: spiffe://cluster.local/ns/default/sa/web}]\n  ingress:\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/client}], ports: [{port: 8080}], authentication: required}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/db}], ports: [{port: 8080}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/db}], ports: [{port: 9000}], authentication: required}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/default/sa/db}], ports: [{port: 9000, endPort: 9001}]}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/prod/sa/api}], ports: [{port: 7000}], authentication: required}\n\
        \x20   - {from: [{spiffeId: spiffe://cluster.local/ns/prod/sa/api}], ports: [{port: 7000}]}\n\
        \x20 egress:\n\
        \x20   - {to: [{spiffeId: spiffe://cluster.local/ns/default/sa/db}], ports: [{port: 5432}], authentication: required}\n";
    let d = run(&ztp("default", "z", spec));
    let (web, client, db, api) = (id(&d, "web"), id(&d, "client"), id(&d, "db"), id(&d, "api"));
    let auth = Some(POLICY_FLAG_AUTH_REQUIRED);
    assert_eq!(flags_of(&d, (96, web, client, I, 6, 8080)), auth);
    assert_eq!(flags_of(&d, (96, web, db, I, 6, 8080)), Some(0), "a plain rule is unaffected");
    assert_eq!(flags_of(&d, (96, web, db, E, 6, 5432)), auth, "egress: the destination's identity");
    // A plain range covering the longer auth entry: the plain allow decides.
    assert_eq!(flags_of(&d, (96, web, db, I, 6, 9000)), Some(0));
    // Same key, one plain and one auth rule: plain, named by the plain rule.
    let (k, v) = d.policy.iter().find(|(k, _)| k.key.local_id() == web && k.key.peer_id() == api).unwrap();
    assert_eq!((k.key.port(), v.flags), (7000, 0));
    assert_eq!(d.rules[&v.rule_id].path, "spec.ingress[5]");
}

#[test]
fn strict_namespace_flags_every_ingress_allow_and_isolates_the_open() {
    // default: STRICT (no subjects: the whole namespace). web has a NetworkPolicy
    // allowing client on 8080 (isolated); client has none (opened to proven peers).
    let d = run(
        &(np("default", "web", "  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n")
            + &ztp("default", "strict", "  authentication: required\n")),
    );
    let (web, client, worker) = (id(&d, "web"), id(&d, "client"), id(&d, "worker"));
    let auth = Some(POLICY_FLAG_AUTH_REQUIRED);
    assert_eq!(flags_of(&d, (96, web, client, I, 6, 8080)), auth, "another policy's allow, flagged");
    assert_eq!(entries_of(&d, web).len(), 1, "STRICT opens nothing on an isolated pod");
    assert_eq!(flags(&d, "client") & EP_ENFORCE_INGRESS, EP_ENFORCE_INGRESS);
    assert_eq!(flags(&d, "client") & EP_ENFORCE_EGRESS, 0, "egress untouched");
    assert_eq!(flags_of(&d, (72, client, IDENTITY_ANY, I, 0, 0)), auth);
    let v = d.policy.iter().find(|(k, _)| k.key.local_id() == client).unwrap().1;
    assert_eq!(d.rules[&v.rule_id].path, "spec.authentication");
    assert!(d.rules[&v.rule_id].source.contains("default/strict"));
    // prod is not STRICT: worker has no entries, not isolated.
    assert!(entries_of(&d, worker).is_empty());
    assert_eq!(flags(&d, "worker") & EP_ENFORCE_INGRESS, 0);
}

#[test]
fn strict_leaves_host_probes_plain() {
    let mut c = cfg();
    c.host_access = HostAccess::Probes;
    let probe = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: probed, namespace: default, labels: {app: probed}}\n\
        spec:\n  nodeName: node-a\n  serviceAccountName: probed\n  containers: [{name: c, readinessProbe: {tcpSocket: {port: 8081}}}]\n\
        status: {phase: Running, podIP: 10.0.0.9}\n";
    let d = try_run(&(probe.to_string() + &ztp("default", "strict", "  authentication: required\n")), &c).unwrap();
    let probed = id(&d, "probed");
    assert_eq!(flags_of(&d, (96, probed, IDENTITY_HOST, I, 6, 8081)), Some(0));
}

#[test]
fn remote_pods_carry_their_nodes_proof_number() {
    let d = run("");
    let db = ip("10.0.0.3");
    assert_eq!(d.endpoint_nodes.get(&db), Some(&auth_node_id(b"node-b")));
    assert!(!d.endpoint_nodes.contains_key(&ip("10.0.0.1")), "local pods are this node's");
}

#[test]
fn http_rules_flag_their_entries_and_fill_the_proxy_table() {
    let d = run(&ztp(
        "default",
        "web-http",
        "  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: client}}}]\n      ports: [{port: 8080}]\n      http: [{method: GET, path: /headers}]\n    - from: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: 8080}]\n",
    ));
    let (web, client, db) = (id(&d, "web"), id(&d, "client"), id(&d, "db"));
    let flag = |peer: u32| {
        d.policy
            .iter()
            .find(|(k, _)| k.key.local_id() == web && k.key.peer_id() == peer && k.key.port() == 8080)
            .map(|(_, v)| v.flags)
    };
    assert_eq!(flag(client), Some(POLICY_FLAG_HTTP), "the client's entry goes through the proxy");
    assert_eq!(flag(db), Some(0), "an L4-only allow stays in the kernel");
    assert!(d.http.has_http());
    assert!(crate::l7::rules::verdict(&d.http, client, web, 8080, "GET", "/headers").allowed);
    assert!(!crate::l7::rules::verdict(&d.http, client, web, 8080, "POST", "/post").allowed);
    assert!(crate::l7::rules::verdict(&d.http, db, web, 8080, "POST", "/post").allowed);
}
