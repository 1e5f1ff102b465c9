//! Conformance cases: what a step changes and which port/protocols it probes. The
//! expected reachability is never written here; the oracle derives it.
//!
//! Policies are YAML text. Placeholders, filled from the model's pod addresses (IPv4,
//! like upstream's `pod.Status.PodIP`): `{ip:x/b}` = the pod's /32, `{big:x/b}` = the /4
//! around it (upstream's makeLargeCIDRForIP).

use zt_testbed::Proto;

/// One change of the cluster.
#[derive(Clone, Debug)]
pub enum Act {
    /// Create or replace a NetworkPolicy (full YAML object).
    Put(String),
    /// Delete one policy (namespace, name).
    Delete(&'static str, &'static str),
    /// Delete every policy (upstream's cleanNetworkPolicies).
    DeleteAll,
    /// Set (Some) or remove (None) a label of a pod (`ns/name`).
    PodLabel(&'static str, &'static str, Option<&'static str>),
    /// Set (Some) or remove (None) a label of a namespace.
    NsLabel(&'static str, &'static str, Option<&'static str>),
    /// Create pod `ns/name` on a node (the lab's pod of that name, or a copy of
    /// `<ns>/a` labelled `pod: <name>` with new addresses); the test bed starts it first.
    AddPod(&'static str, &'static str),
    /// Delete pod `ns/name` (the test bed removes it after the agents saw the change).
    RemovePod(&'static str),
}

/// Changes, then the full matrix probed on each (protocol, port).
#[derive(Clone, Debug)]
pub struct Step {
    pub acts: Vec<Act>,
    pub probes: Vec<(Proto, u16)>,
    /// The changes are invalid: every agent must reject them and keep enforcing the
    /// previous state (which the probes then check).
    pub rejected: bool,
}

#[derive(Clone, Debug)]
pub struct Case {
    /// `upstream-tcp`, `gen-peers`, ...
    pub family: &'static str,
    pub name: String,
    /// The upstream `It(...)` text this case ports.
    pub upstream: Option<&'static str>,
    pub steps: Vec<Step>,
}

pub const TCP80: (Proto, u16) = (Proto::Tcp, 80);
pub const TCP81: (Proto, u16) = (Proto::Tcp, 81);
pub const UDP80: (Proto, u16) = (Proto::Udp, 80);
pub const UDP81: (Proto, u16) = (Proto::Udp, 81);
pub const SCTP80: (Proto, u16) = (Proto::Sctp, 80);
pub const SCTP81: (Proto, u16) = (Proto::Sctp, 81);

/// A NetworkPolicy object; `spec` is the YAML of the spec, indented by two spaces.
pub fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

pub fn put(ns: &str, name: &str, spec: &str) -> Act {
    Act::Put(np(ns, name, spec))
}

pub fn step(acts: Vec<Act>, probes: &[(Proto, u16)]) -> Step {
    Step { acts, probes: probes.to_vec(), rejected: false }
}

/// A step whose changes the agents must reject (the previous state stays).
pub fn rejected(acts: Vec<Act>, probes: &[(Proto, u16)]) -> Step {
    Step { acts, probes: probes.to_vec(), rejected: true }
}

fn up(family: &'static str, it: &'static str, steps: Vec<Step>) -> Case {
    Case { family, name: it.to_string(), upstream: Some(it), steps }
}

const DENY_INGRESS: &str = "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n";

/// Every `It(...)` of upstream's network_policy.go (TCP context, then UDP and SCTP
/// contexts), in file order.
pub fn upstream() -> Vec<Case> {
    let t = "upstream-tcp";
    let pod_a = "  podSelector: {matchLabels: {pod: a}}\n";
    let ing = |from: &str| format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - from: {from}\n");
    let ns_y = "[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}}]";
    let ns_y_pod_a = "[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}, podSelector: {matchLabels: {pod: a}}}]";
    let not_x = "{matchExpressions: [{key: kubernetes.io/metadata.name, operator: NotIn, values: [x]}]}";
    let port81 = |proto: &str| format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - from: {ns_y}\n    ports: [{{port: 81, protocol: {proto}}}]\n");
    let allow_ya_to_xa = |proto: (Proto, u16)| vec![step(vec![put("x", "allow-ns-y-pod-a-via-namespace-pod-selector", &ing(ns_y_pod_a))], &[proto])];
    vec![
        up(t, "should support a 'default-deny-ingress' policy", vec![step(vec![put("x", "deny-ingress", DENY_INGRESS)], &[TCP80])]),
        up(t, "should support a 'default-deny-all' policy", vec![step(
            vec![put("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n")],
            &[TCP80],
        )]),
        up(t, "should enforce policy to allow traffic from pods within server namespace based on PodSelector", vec![step(
            vec![put("x", "x-a-allows-x-b", &ing("[{podSelector: {matchLabels: {pod: b}}}]"))],
            &[TCP80],
        )]),
        up(t, "should enforce policy to allow ingress traffic for a target", vec![step(
            vec![
                put("x", "deny-all", DENY_INGRESS),
                put("x", "allow-all-to-a", &ing("[{podSelector: {}, namespaceSelector: {}}]")),
            ],
            &[TCP80],
        )]),
        up(t, "should enforce policy to allow ingress traffic from pods in all namespaces", vec![step(
            vec![put("x", "allow-from-another-ns", &ing("[{namespaceSelector: {matchLabels: {}}}]"))],
            &[TCP80],
        )]),
        up(t, "should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", vec![step(
            vec![put("x", "allow-client-a-via-ns-selector", &ing(ns_y))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on PodSelector with MatchExpressions", vec![step(
            vec![put("x", "x-a-allows-x-b", &ing("[{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]"))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on NamespaceSelector with MatchExpressions", vec![step(
            vec![put("x", "allow-ns-y-match-selector", &ing("[{namespaceSelector: {matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [y]}]}}]"))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on PodSelector or NamespaceSelector", vec![step(
            vec![put("x", "allow-ns-y-match-selector", &ing(&format!("[{{namespaceSelector: {not_x}}}, {{podSelector: {{matchLabels: {{pod: b}}}}}}]")))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on PodSelector and NamespaceSelector", vec![step(
            vec![put("x", "allow-ns-y-podselector-and-nsselector", &ing(&format!("[{{namespaceSelector: {not_x}, podSelector: {{matchLabels: {{pod: b}}}}}}]")))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on Multiple PodSelectors and NamespaceSelectors", vec![step(
            vec![put("x", "allow-ns-y-z-pod-b-c", &ing(&format!("[{{namespaceSelector: {not_x}, podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]}}}}]")))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on any PodSelectors", vec![step(
            vec![put("x", "allow-ns-x-pod-b-c", &ing("[{podSelector: {matchLabels: {pod: b}}}, {podSelector: {matchLabels: {pod: c}}}]"))],
            &[TCP80],
        )]),
        up(t, "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", allow_ya_to_xa(TCP80)),
        up(t, "should enforce policy based on Ports", vec![step(vec![put("x", "allow-client-a-via-ns-selector", &port81("TCP"))], &[TCP81])]),
        up(t, "should enforce multiple, stacked policies with overlapping podSelectors", vec![
            step(vec![put("x", "allow-client-a-via-ns-selector", &port81("TCP"))], &[TCP81, TCP80]),
            step(
                vec![put("x", "allow-client-a-via-ns-selector-80", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - from: {ns_y}\n    ports: [{{port: 80, protocol: TCP}}]\n"))],
                &[TCP80],
            ),
        ]),
        up(t, "should support allow-all policy", vec![step(
            vec![put("x", "allow-all", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n")],
            &[TCP80, TCP81],
        )]),
        up(t, "should allow ingress access on one named port", vec![step(
            vec![put("x", "allow-all", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: serve-81-tcp}]\n")],
            &[TCP81, TCP80],
        )]),
        up(t, "should allow ingress access from namespace on one named port", vec![step(
            vec![put("x", "allow-client-a-via-ns-selector-80", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - from: {ns_y}\n    ports: [{{port: serve-80-tcp, protocol: TCP}}]\n"))],
            &[TCP80, TCP81],
        )]),
        up(t, "should allow egress access on one named port", vec![step(
            vec![put("x", "allow-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: serve-80-tcp}]\n")],
            &[TCP80, TCP81],
        )]),
        up(t, "should enforce updated policy", vec![
            step(vec![put("x", "allow-all-mutate-to-deny-all", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n")], &[TCP81]),
            step(vec![put("x", "allow-all-mutate-to-deny-all", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: []\n")], &[TCP81]),
        ]),
        up(t, "should allow ingress access from updated namespace", vec![
            step(vec![put("x", "allow-client-a-via-ns-selector", &ing("[{namespaceSelector: {matchLabels: {ns2: updated}}}]"))], &[TCP80]),
            step(vec![Act::NsLabel("y", "ns2", Some("updated"))], &[TCP80]),
        ]),
        up(t, "should allow ingress access from updated pod", vec![
            step(vec![put("x", "allow-client-a-via-pod-selector", &ing("[{podSelector: {matchLabels: {pod: b, pod2: updated}}}]"))], &[TCP80]),
            step(vec![Act::PodLabel("x/b", "pod2", Some("updated"))], &[TCP80]),
        ]),
        up(t, "should deny ingress from pods on other namespaces", vec![step(
            vec![put("x", "deny-empty-policy", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {}}}]\n")],
            &[TCP80],
        )]),
        up(t, "should deny ingress access to updated pod", vec![
            step(vec![put("x", "deny-ingress-via-label-selector", "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]\n  ingress: []\n")], &[TCP80]),
            step(vec![Act::PodLabel("x/a", "target", Some("isolated"))], &[TCP80]),
        ]),
        up(t, "should deny egress from pods based on PodSelector", vec![step(
            vec![put("x", "deny-egress-pod-a", &format!("{pod_a}  policyTypes: [Egress]\n  egress: []\n"))],
            &[TCP80],
        )]),
        up(t, "should deny egress from all pods in a namespace", vec![step(
            vec![put("x", "deny-egress-ns-x", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: []\n")],
            &[TCP80],
        )]),
        up(t, "should work with Ingress, Egress specified together", vec![step(
            vec![put(
                "x",
                "allow-client-a-via-pod-selector",
                &format!("{pod_a}  policyTypes: [Egress, Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n  egress:\n  - ports: [{{port: 80}}]\n"),
            )],
            &[TCP80, TCP81],
        )]),
        up(t, "should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", vec![step(
            vec![
                put("x", "allow-to-ns-y-pod-a", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: {ns_y_pod_a}\n")),
                put("y", "allow-from-xa-on-ya-match-selector", &ing("[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {pod: a}}}]")),
                put(
                    "y",
                    "allow-from-xa-on-yb-match-selector",
                    "  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {pod: a}}}]\n",
                ),
            ],
            &[TCP80],
        )]),
        up(t, "should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector", vec![step(
            vec![put("x", "allow-to-ns-y-pod-a", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: {ns_y_pod_a}\n"))],
            &[TCP80],
        )]),
        up(t, "should enforce ingress policy allowing any port traffic to a server on a specific protocol", vec![step(
            vec![put("x", "allow-ingress-by-proto", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - ports: [{{protocol: TCP}}]\n"))],
            &[TCP80, UDP80],
        )]),
        up(t, "should enforce multiple ingress policies with ingress allow-all policy taking precedence", vec![
            step(vec![put("x", "allow-ingress-port-80", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - ports: [{port: 80}]\n")], &[TCP81]),
            step(vec![put("x", "allow-ingress", "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{}]\n")], &[TCP81]),
        ]),
        up(t, "should enforce multiple egress policies with egress allow-all policy taking precedence", vec![
            step(vec![put("x", "allow-egress-port-80", "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: 80}]\n")], &[TCP81]),
            step(vec![put("x", "allow-egress", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]\n")], &[TCP81]),
        ]),
        up(t, "should stop enforcing policies after they are deleted", vec![
            step(vec![put("x", "deny-all", "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: []\n  egress: []\n")], &[TCP80]),
            step(vec![Act::DeleteAll], &[TCP80]),
        ]),
        up(t, "should allow egress access to server in CIDR block", vec![step(
            vec![put("x", "allow-client-a-via-cidr-egress-rule", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: '{{ip:y/b}}'}}}}]\n"))],
            &[TCP80],
        )]),
        up(t, "should enforce except clause while egress access to server in CIDR block", vec![step(
            vec![put("x", "allow-client-a-via-cidr-egress-rule", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: '{{big:x/b}}', except: ['{{ip:x/b}}']}}}}]\n"))],
            &[TCP80],
        )]),
        up(t, "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", vec![
            step(
                vec![put("x", "allow-client-a-via-cidr-egress-rule", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: '{{big:x/b}}', except: ['{{ip:x/b}}']}}}}]\n"))],
                &[TCP80],
            ),
            step(
                vec![put("x", "allow-client-a-via-cidr-egress-rule", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: [{{ipBlock: {{cidr: '{{ip:x/b}}'}}}}]\n"))],
                &[TCP80],
            ),
        ]),
        up(t, "should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", vec![
            step(vec![put("x", "allow-egress-for-target", &format!("{pod_a}  policyTypes: [Egress]\n  egress: [{{}}]\n"))], &[TCP80]),
            step(vec![put("x", "deny-ingress-via-label-selector", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress: []\n"))], &[TCP80]),
        ]),
        up(t, "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", vec![step(
            vec![
                put("x", "deny-ingress", DENY_INGRESS),
                put("x", "allow-only-sctp-ingress-on-port-81", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - ports: [{{port: 81, protocol: SCTP}}]\n")),
            ],
            &[TCP81],
        )]),
        up(t, "should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", vec![step(
            vec![put("x", "allow-only-sctp-ingress-on-port-80", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - ports: [{{port: 80, protocol: SCTP}}]\n"))],
            &[TCP81],
        )]),
        up(t, "should not allow access by TCP when a policy specifies only UDP", vec![step(
            vec![put("x", "allow-only-udp-ingress-on-port-81", &format!("{pod_a}  policyTypes: [Ingress]\n  ingress:\n  - ports: [{{port: 81, protocol: UDP}}]\n"))],
            &[TCP81],
        )]),
        up(t, "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", vec![step(
            vec![put("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", &ing(ns_y))],
            &[TCP80],
        )]),
        up(t, "should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", vec![step(
            vec![put(
                "x",
                "allow-ns-y-match-selector-for-immutable-ns-label",
                &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - to: [{{namespaceSelector: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}}]}}}}]\n"),
            )],
            &[TCP80],
        )]),
        // network_policy_api.go: the API server's endPort validation, which the agent
        // does itself for its inputs (a rejected change keeps the last good state).
        up("upstream-api", "should support creating NetworkPolicy API with endport field", {
            let egress = |ports: &str| put("x", "e2e-example-netpol-endport-validate", &format!("{pod_a}  policyTypes: [Egress]\n  egress:\n  - ports: {ports}\n"));
            vec![
                step(vec![egress("[{port: 80, endPort: 80}]")], &[TCP80, TCP81]),
                rejected(vec![egress("[{endPort: 20000}]")], &[TCP80, TCP81]),
                rejected(vec![egress("[{port: serve-80-tcp, endPort: 20000}]")], &[TCP80, TCP81]),
                rejected(vec![egress("[{port: 30000, endPort: 20000}]")], &[TCP80, TCP81]),
                step(vec![egress("[{port: 80, endPort: 81}]")], &[TCP80, TCP81, UDP80]),
            ]
        }),
        // "NetworkPolicy between server and client using UDP"
        up("upstream-udp", "should support a 'default-deny-ingress' policy", vec![step(vec![put("x", "deny-all", DENY_INGRESS)], &[UDP80])]),
        up("upstream-udp", "should enforce policy based on Ports", vec![step(vec![put("x", "allow-ingress-on-port-81-ns-x", &port81("UDP"))], &[UDP81])]),
        up("upstream-udp", "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", allow_ya_to_xa(UDP80)),
        // "NetworkPolicy between server and client using SCTP"
        up("upstream-sctp", "should support a 'default-deny-ingress' policy", vec![step(vec![put("x", "deny-all", DENY_INGRESS)], &[SCTP80])]),
        up("upstream-sctp", "should enforce policy based on Ports", vec![step(vec![put("x", "allow-ingress-on-port-81-ns-x", &port81("SCTP"))], &[SCTP81])]),
        up("upstream-sctp", "should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector", allow_ya_to_xa(SCTP80)),
    ]
}

/// Every case: upstream's, then the generated families.
pub fn all() -> Vec<Case> {
    let mut v = upstream();
    v.extend(super::generated::all());
    v
}
