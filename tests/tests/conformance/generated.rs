//! Generated cases in the style of cyclonus (mattfenwick/cyclonus): one target (x/a or
//! all of x) and one varied dimension per case, each for ingress and egress where both
//! make sense. Families: peers, ports (and protocols), conflicts between policies,
//! actions (create, update, delete, relabel).

use super::cases::*;
use zt_testbed::Proto;

const ALL6: [(Proto, u16); 6] = [TCP80, TCP81, UDP80, UDP81, SCTP80, SCTP81];

/// A policy on x/a for one direction with one rule `{peers}` / `{ports}` (None = key
/// absent).
fn rule_policy(name: &str, ingress: bool, peers: Option<&str>, ports: Option<&str>) -> Act {
    let (ty, key, pk) = if ingress { ("Ingress", "ingress", "from") } else { ("Egress", "egress", "to") };
    let mut rule = String::new();
    if let Some(p) = peers {
        rule.push_str(&format!("    {pk}: {p}\n"));
    }
    if let Some(p) = ports {
        rule.push_str(&format!("    ports: {p}\n"));
    }
    let rules = if rule.is_empty() { "  - {}\n".to_string() } else { format!("  -{}", &rule[3..]) };
    put("x", name, &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [{ty}]\n  {key}:\n{rules}"))
}

fn dirs() -> [(bool, &'static str); 2] {
    [(true, "ingress"), (false, "egress")]
}

fn case(family: &'static str, name: String, steps: Vec<Step>) -> Case {
    Case { family, name, upstream: None, steps }
}

/// Peers: podSelector, namespaceSelector, both, ipBlock with except (v4 and v6),
/// empty and absent peer lists, match expressions.
fn peers() -> Vec<Case> {
    let peers: [(&str, Option<&str>); 14] = [
        ("absent from/to (any peer)", None),
        ("empty from/to list (any peer)", Some("[]")),
        ("empty podSelector (own namespace)", Some("[{podSelector: {}}]")),
        ("empty namespaceSelector (every namespace)", Some("[{namespaceSelector: {}}]")),
        ("podSelector pod=b (own namespace only)", Some("[{podSelector: {matchLabels: {pod: b}}}]")),
        ("namespaceSelector ns=y", Some("[{namespaceSelector: {matchLabels: {ns: y}}}]")),
        ("namespaceSelector ns=y AND podSelector pod=b", Some("[{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]")),
        ("namespaceSelector ns=y OR podSelector pod=b", Some("[{namespaceSelector: {matchLabels: {ns: y}}}, {podSelector: {matchLabels: {pod: b}}}]")),
        ("podSelector pod NotIn [a, b] in namespaces Exists ns", Some("[{namespaceSelector: {matchExpressions: [{key: ns, operator: Exists}]}, podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a, b]}]}}]")),
        ("namespaceSelector DoesNotExist ns (matches none)", Some("[{namespaceSelector: {matchExpressions: [{key: ns, operator: DoesNotExist}]}}]")),
        ("ipBlock 10.210.0.0/16 except 10.210.2.0/24 (IPv4 only, not y)", Some("[{ipBlock: {cidr: 10.210.0.0/16, except: [10.210.2.0/24]}}]")),
        ("ipBlock fd00:210::/32 except fd00:210:3::/48 (IPv6 only, not z)", Some("[{ipBlock: {cidr: 'fd00:210::/32', except: ['fd00:210:3::/48']}}]")),
        ("ipBlock of one pod (x/c /32) plus namespaceSelector ns=z", Some("[{ipBlock: {cidr: '{ip:x/c}'}}, {namespaceSelector: {matchLabels: {ns: z}}}]")),
        ("ipBlock 0.0.0.0/0 and ::/0 except the /4s around the pods", Some("[{ipBlock: {cidr: 0.0.0.0/0, except: ['{big:x/b}']}}, {ipBlock: {cidr: '::/0', except: ['f000::/4']}}]")),
    ];
    let mut out = vec![];
    for (desc, p) in peers {
        for (ingress, d) in dirs() {
            out.push(case("gen-peers", format!("{d}: {desc}"), vec![step(vec![rule_policy("peers", ingress, p, None)], &[TCP80])]));
        }
    }
    out
}

/// Ports and protocols: numbered, named, ranges, protocol only, mismatches.
fn ports() -> Vec<Case> {
    let ports: [(&str, &str); 11] = [
        ("port 81 (protocol defaults to TCP)", "[{port: 81}]"),
        ("UDP port 80", "[{protocol: UDP, port: 80}]"),
        ("SCTP port 81", "[{protocol: SCTP, port: 81}]"),
        ("named port serve-81-tcp", "[{port: serve-81-tcp}]"),
        ("named port serve-80-udp with protocol UDP", "[{protocol: UDP, port: serve-80-udp}]"),
        ("named port serve-80-udp with the default protocol TCP (resolves to nothing)", "[{port: serve-80-udp}]"),
        ("named port serve-81-sctp with protocol SCTP", "[{protocol: SCTP, port: serve-81-sctp}]"),
        ("TCP range 80-81 (endPort)", "[{protocol: TCP, port: 80, endPort: 81}]"),
        ("UDP range 81-90 (endPort)", "[{protocol: UDP, port: 81, endPort: 90}]"),
        ("protocol only: SCTP", "[{protocol: SCTP}]"),
        ("several: TCP 80, UDP 81, named serve-80-sctp", "[{port: 80}, {protocol: UDP, port: 81}, {protocol: SCTP, port: serve-80-sctp}]"),
    ];
    let mut out = vec![];
    for (ingress, d) in dirs() {
        // "alt" is TCP 82 on pods a, 83 on pods b, absent on pods c: it must resolve on
        // the destination (x/a itself for ingress, each peer for egress).
        out.push(case(
            "gen-ports",
            format!("{d}: named port alt, different per pod (a 82, b 83, c none)"),
            vec![step(vec![rule_policy("ports", ingress, None, Some("[{port: alt}]"))], &[(Proto::Tcp, 82), (Proto::Tcp, 83)])],
        ));
    }
    for (desc, p) in ports {
        for (ingress, d) in dirs() {
            out.push(case("gen-ports", format!("{d}: {desc}"), vec![step(vec![rule_policy("ports", ingress, None, Some(p))], &ALL6)]));
        }
    }
    out
}

/// Several policies at once: deny-all vs allow-all, ingress vs egress, overlapping
/// selectors adding up.
fn conflicts() -> Vec<Case> {
    let deny_in_x = put("x", "deny-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n");
    let deny_out_x = put("x", "deny-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: []\n");
    let allow_in_x = put("x", "allow-all-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n");
    let allow_out_x = put("x", "allow-all-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]\n");
    let c = |name: &str, acts: Vec<Act>, probes: &[(Proto, u16)]| case("gen-conflicts", name.to_string(), vec![step(acts, probes)]);
    vec![
        c("deny-all ingress + allow-all ingress in x: allow wins", vec![deny_in_x.clone(), allow_in_x.clone()], &[TCP80]),
        c("deny-all egress + allow-all egress in x: allow wins", vec![deny_out_x.clone(), allow_out_x.clone()], &[TCP80]),
        c("deny-all ingress + allow-all egress in x: egress allow does not open ingress", vec![deny_in_x.clone(), allow_out_x.clone()], &[TCP80]),
        c("deny-all egress in y, allow-all ingress in x: y still cannot reach x", vec![
            put("y", "deny-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: []\n"),
            allow_in_x.clone(),
        ], &[TCP80]),
        c("ingress policy without policyTypes but with egress rules isolates both", vec![
            put("x", "implicit-types", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {}}]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n"),
        ], &[TCP80]),
        c("policyTypes absent, empty egress list: only ingress isolated", vec![
            put("x", "implicit-ingress", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n  egress: []\n"),
        ], &[TCP80]),
        c("overlapping selectors add up: pod=a from pod=b, all of x from ns=y on 81", vec![
            put("x", "a-from-b", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n"),
            put("x", "x-from-y-81", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{port: 81}]\n"),
        ], &[TCP80, TCP81]),
        c("egress in x and ingress in z must both allow: x -> z on 80 only", vec![
            put("x", "x-to-z", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: z}}}]\n"),
            put("z", "z-from-x-80", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: x}}}]\n    ports: [{port: 80}]\n"),
        ], &[TCP80, TCP81]),
        c("one policy per protocol on x/a: TCP 80 and UDP 81 from different peers", vec![
            put("x", "tcp-from-y", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{port: 80}]\n"),
            put("x", "udp-from-z", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]\n    ports: [{protocol: UDP, port: 81}]\n"),
        ], &[TCP80, UDP81, UDP80]),
        c("policies in every namespace: deny-all both ways everywhere", vec![
            put("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
            put("y", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
            put("z", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n"),
        ], &[TCP80, UDP80, SCTP80]),
    ]
}

/// Changes between probes: create, update, delete, relabel pods and namespaces.
fn actions() -> Vec<Case> {
    let a_from_b = "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n";
    let a_from_c = "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n";
    let from_team = "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]\n";
    let c = |name: &str, steps: Vec<Step>| case("gen-actions", name.to_string(), steps);
    vec![
        c("create, update the peer, update the port, delete", vec![
            step(vec![put("x", "p", a_from_b)], &[TCP80]),
            step(vec![put("x", "p", a_from_c)], &[TCP80]),
            step(vec![put("x", "p", &format!("{a_from_c}    ports: [{{port: 81}}]\n"))], &[TCP80, TCP81]),
            step(vec![Act::Delete("x", "p")], &[TCP80, TCP81]),
        ]),
        c("update the target selector from pod=a to pod=b", vec![
            step(vec![put("x", "p", a_from_c)], &[TCP80]),
            step(vec![put("x", "p", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n")], &[TCP80]),
        ]),
        c("update policyTypes from Ingress to Egress", vec![
            step(vec![put("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n")], &[TCP80]),
            step(vec![put("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n")], &[TCP80]),
            step(vec![put("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress, Egress]\n")], &[TCP80]),
        ]),
        c("delete one of two overlapping policies", vec![
            step(vec![put("x", "p1", a_from_b), put("x", "p2", a_from_c)], &[TCP80]),
            step(vec![Act::Delete("x", "p1")], &[TCP80]),
            step(vec![Act::Delete("x", "p2")], &[TCP80]),
        ]),
        c("relabel a pod out of and back into the target selector", vec![
            step(vec![put("x", "p", a_from_b)], &[TCP80]),
            step(vec![Act::PodLabel("x/a", "pod", Some("a2"))], &[TCP80]),
            step(vec![Act::PodLabel("x/a", "pod", Some("a"))], &[TCP80]),
        ]),
        c("relabel a peer pod into and out of the peer selector (other namespace)", vec![
            step(vec![put("x", "p", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]\n")], &[TCP80]),
            step(vec![Act::PodLabel("z/c", "role", Some("client"))], &[TCP80]),
            step(vec![Act::PodLabel("z/c", "role", None), Act::PodLabel("y/b", "role", Some("client"))], &[TCP80]),
        ]),
        c("relabel namespaces into and out of a namespaceSelector", vec![
            step(vec![put("x", "p", from_team)], &[TCP80]),
            step(vec![Act::NsLabel("y", "team", Some("blue"))], &[TCP80]),
            step(vec![Act::NsLabel("y", "team", None), Act::NsLabel("z", "team", Some("blue"))], &[TCP80]),
        ]),
        c("relabel a namespace out of an egress namespaceSelector", vec![
            step(vec![
                Act::NsLabel("z", "team", Some("blue")),
                put("x", "p", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {team: blue}}}]\n"),
            ], &[TCP80, UDP80]),
            step(vec![Act::NsLabel("z", "team", None)], &[TCP80, UDP80]),
        ]),
        c("policy in a namespace whose label a peer selector uses, then delete all", vec![
            step(vec![Act::NsLabel("x", "team", Some("blue")), put("y", "p", from_team)], &[TCP80]),
            step(vec![Act::DeleteAll], &[TCP80]),
        ]),
        c("isolate by a new pod label, then remove the label", vec![
            step(vec![put("z", "p", "  podSelector: {matchLabels: {quarantine: 'true'}}\n  policyTypes: [Ingress, Egress]\n")], &[TCP80, SCTP81]),
            step(vec![Act::PodLabel("z/b", "quarantine", Some("true"))], &[TCP80, SCTP81]),
            step(vec![Act::PodLabel("z/b", "quarantine", None)], &[TCP80, SCTP81]),
        ]),
    ]
}

/// Pods created and deleted while policies are in place (the matrix grows and
/// shrinks with them).
fn pods() -> Vec<Case> {
    let a_from_d = "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: d}}}]\n";
    let c = |name: &str, steps: Vec<Step>| case("gen-pods", name.to_string(), steps);
    vec![
        c("create a pod that a peer selector waits for, then delete it", vec![
            step(vec![put("x", "a-from-d", a_from_d)], &[TCP80]),
            step(vec![Act::AddPod("x/d", "node2")], &[TCP80, UDP81]),
            step(vec![Act::RemovePod("x/d")], &[TCP80]),
        ]),
        c("create a pod in a namespace isolated both ways (on the other node)", vec![
            step(vec![put("z", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n")], &[TCP80]),
            step(vec![Act::AddPod("z/d", "node1")], &[TCP80, SCTP80]),
        ]),
        c("delete an isolated pod and create it again with the same address", vec![
            step(vec![put("y", "b-from-c", "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: c}}}]\n")], &[TCP80]),
            step(vec![Act::RemovePod("y/b")], &[TCP80]),
            step(vec![Act::AddPod("y/b", "node2")], &[TCP80, UDP80]),
        ]),
        c("move a pod to the other node (delete, create on node1)", vec![
            step(vec![put("x", "egress-to-y-b", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]\n")], &[TCP80]),
            step(vec![Act::RemovePod("y/b")], &[TCP80]),
            step(vec![Act::AddPod("y/b", "node1")], &[TCP80, TCP81]),
        ]),
        c("a new pod inside an ipBlock gets the block's verdict", vec![
            step(vec![put("x", "a-from-block", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.210.3.0/24, except: [10.210.3.1/32]}}]\n")], &[TCP80]),
            step(vec![Act::AddPod("z/d", "node2")], &[TCP80]),
        ]),
    ]
}

pub fn all() -> Vec<Case> {
    let mut v = peers();
    v.extend(ports());
    v.extend(conflicts());
    v.extend(actions());
    v.extend(pods());
    v
}
