//! The Service table's rules: YAML in (through the directory source's parser, so every
//! object is validated as the agent sees it), table out.

use super::*;
use crate::model::source_dir::parse_manifests;

const NODE: &str = "node-a";

fn node_ips() -> Vec<IpAddr> {
    ["172.16.0.1", "fd00:16::1"].iter().map(|s| s.parse().unwrap()).collect()
}

fn state(yaml: &str) -> ClusterState {
    let mut ignored = vec![];
    let objs = parse_manifests("t.yaml", yaml, &mut ignored).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert!(ignored.is_empty(), "{ignored:?}");
    let mut st = ClusterState::new();
    for (_, o) in objs {
        st.upsert(o);
    }
    st
}

fn table_with(yaml: &str, node: &str, ips: &[IpAddr]) -> (ServiceTable, Vec<String>) {
    build(&state(yaml), node, ips)
}

/// The table as lines: `frontend kind ns/name:port-name [affinity N] -> backends`.
fn lines(t: &ServiceTable) -> Vec<String> {
    t.frontends
        .iter()
        .map(|(fe, e)| {
            let backends: Vec<String> = e.backends.iter().map(|b| b.to_string()).collect();
            let affinity = if e.affinity_timeout_s > 0 { format!(" affinity {}", e.affinity_timeout_s) } else { String::new() };
            format!(
                "{fe} {} {}/{}:{}{affinity} -> {}",
                e.kind,
                e.service.0,
                e.service.1,
                e.port_name,
                if backends.is_empty() { "none".to_string() } else { backends.join(" ") }
            )
        })
        .collect()
}

/// Lines of the table of `yaml` on node-a; panics on warnings.
fn table(yaml: &str) -> Vec<String> {
    let (t, w) = table_with(yaml, NODE, &node_ips());
    assert!(w.is_empty(), "unexpected warnings: {w:?}");
    lines(&t)
}

fn svc(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

/// An EndpointSlice of `service`; `ports` and `endpoints` are YAML flow lists.
fn slice(ns: &str, name: &str, service: &str, address_type: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

/// A ready endpoint on `node`.
fn ep(addr: &str, node: &str) -> String {
    format!("{{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}")
}

/// The seed lab's httpbin: port 8000 -> named targetPort http (80 on the pod).
fn httpbin() -> String {
    svc("default", "httpbin", "  clusterIP: 10.96.0.80\n  selector: {app: httpbin}\n  ports: [{name: http, port: 8000, targetPort: http}]\n")
        + &slice("default", "httpbin-abc", "httpbin", "IPv4", "[{name: http, port: 80, protocol: TCP}]", &format!("[{}]", ep("10.0.0.10", NODE)))
}

#[test]
fn cluster_ip_to_its_endpoints() {
    let (t, w) = table_with(&httpbin(), NODE, &node_ips());
    assert!(w.is_empty(), "{w:?}");
    let fe = Frontend { addr: "10.96.0.80".parse().unwrap(), port: 8000, proto: 6 };
    let want = ServiceTable {
        frontends: BTreeMap::from([(
            fe,
            FrontendEntry {
                service: ("default".into(), "httpbin".into()),
                port_name: "http".into(),
                kind: FrontendKind::ClusterIp,
                backends: vec![Backend { addr: "10.0.0.10".parse().unwrap(), port: 80 }],
                affinity_timeout_s: 0,
                terminating: false,
            },
        )]),
    };
    assert_eq!(t, want);
}

#[test]
fn every_port_with_its_protocol_and_its_slice_port() {
    let y = svc(
        "kube-system",
        "kube-dns",
        "  clusterIP: 10.96.0.10\n  ports:\n  - {name: dns, port: 53, protocol: UDP, targetPort: 53}\n  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}\n  - {name: metrics, port: 9153, protocol: TCP}\n",
    ) + &slice(
        "kube-system",
        "kube-dns-1",
        "kube-dns",
        "IPv4",
        "[{name: dns, port: 1053, protocol: UDP}, {name: dns-tcp, port: 2053, protocol: TCP}, {name: metrics, port: 9153}]",
        &format!("[{}, {}]", ep("10.0.0.2", "node-b"), ep("10.0.0.1", NODE)),
    );
    assert_eq!(
        table(&y),
        [
            "10.96.0.10:53/TCP ClusterIP kube-system/kube-dns:dns-tcp -> 10.0.0.1:2053 10.0.0.2:2053",
            "10.96.0.10:53/UDP ClusterIP kube-system/kube-dns:dns -> 10.0.0.1:1053 10.0.0.2:1053",
            "10.96.0.10:9153/TCP ClusterIP kube-system/kube-dns:metrics -> 10.0.0.1:9153 10.0.0.2:9153",
        ]
    );
}

#[test]
fn the_slice_port_must_match_name_and_protocol() {
    // An unnamed Service port matches the unnamed slice port; a UDP port of the same
    // name does not serve a TCP Service port; SCTP is a protocol like the others.
    let y = svc("default", "a", "  clusterIP: 10.96.0.1\n  ports: [{port: 80, targetPort: 8080}]\n")
        + &slice("default", "a-1", "a", "IPv4", "[{port: 8080}]", &format!("[{}]", ep("10.0.0.1", NODE)))
        + &svc("default", "b", "  clusterIP: 10.96.0.2\n  ports: [{name: web, port: 80}]\n")
        + &slice("default", "b-1", "b", "IPv4", "[{name: web, port: 80, protocol: UDP}]", &format!("[{}]", ep("10.0.0.2", NODE)))
        + &svc("default", "c", "  clusterIP: 10.96.0.3\n  ports: [{name: assoc, port: 9000, protocol: SCTP}]\n")
        + &slice("default", "c-1", "c", "IPv4", "[{name: assoc, port: 9001, protocol: SCTP}]", &format!("[{}]", ep("10.0.0.3", NODE)));
    assert_eq!(
        table(&y),
        [
            "10.96.0.1:80/TCP ClusterIP default/a: -> 10.0.0.1:8080",
            "10.96.0.2:80/TCP ClusterIP default/b:web -> none",
            "10.96.0.3:9000/SCTP ClusterIP default/c:assoc -> 10.0.0.3:9001",
        ]
    );
}

#[test]
fn named_target_port_resolves_per_endpoint() {
    // The EndpointSlice controller groups endpoints by the number their pod gives the
    // named port: two slices, two numbers, one frontend.
    let y = svc("default", "web", "  clusterIP: 10.96.0.5\n  ports: [{name: http, port: 80, targetPort: http}]\n")
        + &slice("default", "web-a", "web", "IPv4", "[{name: http, port: 8080}]", &format!("[{}, {}]", ep("10.0.0.1", NODE), ep("10.0.0.2", NODE)))
        + &slice("default", "web-b", "web", "IPv4", "[{name: http, port: 9090}]", &format!("[{}]", ep("10.0.0.3", "node-b")));
    assert_eq!(table(&y), ["10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:9090"]);
}

#[test]
fn dual_stack_each_family_its_own_backends() {
    let y = svc(
        "default",
        "web",
        "  clusterIP: 10.96.0.5\n  clusterIPs: [10.96.0.5, \"fd00:96::5\"]\n  ipFamilies: [IPv4, IPv6]\n  ports: [{name: http, port: 80}]\n",
    ) + &slice("default", "web-v4", "web", "IPv4", "[{name: http, port: 8080}]", &format!("[{}]", ep("10.0.0.1", NODE)))
        + &slice("default", "web-v6", "web", "IPv6", "[{name: http, port: 8080}]", &format!("[{}]", ep("fd00::1", NODE)))
        // Single-stack IPv4: an IPv6 slice gives it nothing.
        + &svc("default", "v4only", "  clusterIP: 10.96.0.6\n  ports: [{name: http, port: 80}]\n")
        + &slice("default", "v4only-v6", "v4only", "IPv6", "[{name: http, port: 8080}]", &format!("[{}]", ep("fd00::2", NODE)));
    assert_eq!(
        table(&y),
        [
            "10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080",
            "10.96.0.6:80/TCP ClusterIP default/v4only:http -> none",
            "[fd00:96::5]:80/TCP ClusterIP default/web:http -> [fd00::1]:8080",
        ]
    );
    // clusterIP alone (no clusterIPs) is the same as a one-entry clusterIPs.
    let y = svc("default", "one", "  clusterIPs: [\"fd00:96::7\"]\n  ports: [{port: 80}]\n");
    assert_eq!(table(&y), ["[fd00:96::7]:80/TCP ClusterIP default/one: -> none"]);
}

#[test]
fn ready_endpoints_else_serving_terminating_ones() {
    let spec = "  clusterIP: 10.96.0.9\n  ports: [{name: p, port: 80}]\n";
    let case = |endpoints: &str| {
        let y = svc("default", "s", spec) + &slice("default", "s-1", "s", "IPv4", "[{name: p, port: 8080}]", endpoints);
        table(&y).remove(0).split(" -> ").nth(1).unwrap().to_string()
    };
    // ready unset counts as ready; ready: false does not; a terminating endpoint that is
    // still ready (kube-proxy reads ready) counts.
    assert_eq!(
        case("[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2], conditions: {ready: false, serving: true}}, {addresses: [10.0.0.3], conditions: {}}]"),
        "10.0.0.1:8080 10.0.0.3:8080"
    );
    // Ready ones exist: serving-and-terminating ones are not used.
    assert_eq!(
        case("[{addresses: [10.0.0.1], conditions: {ready: true}}, {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}]"),
        "10.0.0.1:8080"
    );
    // None ready: the serving-and-terminating ones; neither serving-only nor
    // terminating-only ones.
    assert_eq!(
        case("[{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: false}}, {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}, {addresses: [10.0.0.4], conditions: {ready: false, terminating: true}}]"),
        "10.0.0.2:8080 10.0.0.4:8080"
    );
    // ... and the entry says so (`ztctl services` shows the condition).
    let terminating = "[{addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}]";
    let (t, _) = table_with(&(svc("default", "s", spec) + &slice("default", "s-1", "s", "IPv4", "[{name: p, port: 8080}]", terminating)), NODE, &node_ips());
    assert!(t.frontends.values().all(|e| e.terminating && e.backends.len() == 1), "{t:?}");
    let (t, _) = table_with(&(svc("default", "s", spec) + &slice("default", "s-1", "s", "IPv4", "[{name: p, port: 8080}]", "[{addresses: [10.0.0.1]}]")), NODE, &node_ips());
    assert!(t.frontends.values().all(|e| !e.terminating), "{t:?}");
    // Nothing usable: the frontend stays, without backends.
    assert_eq!(case("[{addresses: [10.0.0.1], conditions: {ready: false, serving: false}}]"), "none");
    assert_eq!(case("[]"), "none");
}

#[test]
fn endpoints_first_address_and_duplicates_across_slices() {
    // kube-proxy uses an endpoint's first address; an endpoint in two slices (the
    // controller moving it) is one backend.
    let y = svc("default", "s", "  clusterIP: 10.96.0.9\n  ports: [{name: p, port: 80}]\n")
        + &slice("default", "s-1", "s", "IPv4", "[{name: p, port: 8080}]", "[{addresses: [10.0.0.5, 10.0.0.6]}, {addresses: [10.0.0.1]}]")
        + &slice("default", "s-2", "s", "IPv4", "[{name: p, port: 8080}]", "[{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]");
    assert_eq!(table(&y), ["10.96.0.9:80/TCP ClusterIP default/s:p -> 10.0.0.1:8080 10.0.0.2:8080 10.0.0.5:8080"]);
}

#[test]
fn slices_of_other_services_or_namespaces_and_fqdn_slices_do_not_count() {
    let y = svc("default", "s", "  clusterIP: 10.96.0.9\n  ports: [{name: p, port: 80}]\n")
        + &slice("other", "s-1", "s", "IPv4", "[{name: p, port: 8080}]", "[{addresses: [10.0.0.1]}]")
        + &slice("default", "t-1", "t", "IPv4", "[{name: p, port: 8080}]", "[{addresses: [10.0.0.2]}]")
        + &slice("default", "s-fqdn", "s", "FQDN", "[{name: p, port: 8080}]", "[{addresses: [db.example.com]}]")
        // A slice port without a number means "all ports": kube-proxy skips it.
        + &slice("default", "s-any", "s", "IPv4", "[{name: p}]", "[{addresses: [10.0.0.3]}]")
        // No kubernetes.io/service-name label: belongs to no Service.
        + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: loose, namespace: default}\naddressType: IPv4\nports: [{name: p, port: 8080}]\nendpoints: [{addresses: [10.0.0.4]}]\n";
    assert_eq!(table(&y), ["10.96.0.9:80/TCP ClusterIP default/s:p -> none"]);
}

#[test]
fn selectorless_service_to_an_address_outside_the_cluster() {
    let y = svc("default", "db", "  clusterIP: 10.96.0.40\n  ports: [{name: pg, port: 5432}]\n")
        + &slice("default", "db-1", "db", "IPv4", "[{name: pg, port: 15432}]", "[{addresses: [192.0.2.10]}]");
    assert_eq!(table(&y), ["10.96.0.40:5432/TCP ClusterIP default/db:pg -> 192.0.2.10:15432"]);
}

#[test]
fn headless_and_external_name_services_have_no_frontend() {
    let y = svc("default", "headless", "  clusterIP: None\n  externalIPs: [192.0.2.1]\n  ports: [{name: p, port: 80}]\n")
        + &slice("default", "headless-1", "headless", "IPv4", "[{name: p, port: 80}]", "[{addresses: [10.0.0.1]}]")
        + &svc("default", "headless2", "  clusterIPs: [None]\n  ports: [{name: p, port: 80}]\n")
        + &svc("default", "ext", "  type: ExternalName\n  externalName: db.example.com\n  ports: [{name: p, port: 80}]\n")
        // No spec at all: nothing to translate.
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: bare}\n";
    assert_eq!(table(&y), Vec::<String>::new());
}

#[test]
fn external_and_load_balancer_addresses() {
    let y = svc(
        "default",
        "web",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.1]\n  allocateLoadBalancerNodePorts: false\n  ports: [{name: http, port: 80}]\n",
    ) + "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.7}, {hostname: lb.example.com}, {ip: 198.51.100.8, ipMode: Proxy}, {ip: 198.51.100.9, ipMode: VIP}]\n"
        + &slice("default", "web-1", "web", "IPv4", "[{name: http, port: 8080}]", &format!("[{}]", ep("10.0.0.1", NODE)));
    // ipMode Proxy: kube-proxy leaves the address to the load balancer (which may do
    // more than DNAT, e.g. PROXY protocol or TLS): no frontend.
    assert_eq!(
        table(&y),
        [
            "10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080",
            "192.0.2.1:80/TCP ExternalIP default/web:http -> 10.0.0.1:8080",
            "198.51.100.7:80/TCP LoadBalancer default/web:http -> 10.0.0.1:8080",
            "198.51.100.9:80/TCP LoadBalancer default/web:http -> 10.0.0.1:8080",
        ]
    );
}

#[test]
fn node_ports_on_each_node_address_of_the_services_families() {
    let y = svc("default", "web", "  type: NodePort\n  clusterIP: 10.96.0.5\n  ports: [{name: http, port: 80, nodePort: 30080}]\n")
        + &slice("default", "web-1", "web", "IPv4", "[{name: http, port: 8080}]", &format!("[{}]", ep("10.0.0.1", "node-b")))
        + &svc(
            "default",
            "lb",
            "  type: LoadBalancer\n  clusterIPs: [10.96.0.6, \"fd00:96::6\"]\n  ports: [{name: http, port: 80, nodePort: 30081, protocol: UDP}]\n",
        );
    // Loopback, unspecified and IPv6 link-local node addresses carry no NodePort.
    let ips: Vec<IpAddr> =
        ["172.16.0.1", "10.255.0.1", "fd00:16::1", "127.0.0.1", "::1", "0.0.0.0", "fe80::1", "172.16.0.1"].iter().map(|s| s.parse().unwrap()).collect();
    let (t, w) = table_with(&y, NODE, &ips);
    assert!(w.is_empty(), "{w:?}");
    assert_eq!(
        lines(&t),
        [
            "10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080",
            "10.96.0.6:80/UDP ClusterIP default/lb:http -> none",
            "10.255.0.1:30080/TCP NodePort default/web:http -> 10.0.0.1:8080",
            "10.255.0.1:30081/UDP NodePort default/lb:http -> none",
            "172.16.0.1:30080/TCP NodePort default/web:http -> 10.0.0.1:8080",
            "172.16.0.1:30081/UDP NodePort default/lb:http -> none",
            "[fd00:16::1]:30081/UDP NodePort default/lb:http -> none",
            "[fd00:96::6]:80/UDP ClusterIP default/lb:http -> none",
        ]
    );
    // No node addresses: no NodePort frontends.
    let (t, _) = table_with(&y, NODE, &[]);
    assert_eq!(t.frontends.values().filter(|e| e.kind == FrontendKind::NodePort).count(), 0);
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints_for_cluster_ips() {
    let y = svc(
        "default",
        "web",
        "  type: NodePort\n  clusterIP: 10.96.0.5\n  externalIPs: [192.0.2.1]\n  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]\n",
    ) + &slice(
        "default",
        "web-1",
        "web",
        "IPv4",
        "[{name: http, port: 8080}]",
        &format!("[{}, {}, {}]", ep("10.0.0.1", NODE), ep("10.0.0.2", "node-b"), "{addresses: [10.0.0.3]}"),
    );
    assert_eq!(
        table(&y),
        [
            "10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080",
            // Pod traffic to external and node addresses: every endpoint (kube-proxy).
            "172.16.0.1:30080/TCP NodePort default/web:http -> 10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080",
            "192.0.2.1:80/TCP ExternalIP default/web:http -> 10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080",
        ]
    );
    // On another node without endpoints: no backend, even though others have some.
    let (t, _) = table_with(&y, "node-c", &[]);
    assert_eq!(lines(&t)[0], "10.96.0.5:80/TCP ClusterIP default/web:http -> none");
    // The local fallback: no local ready endpoint, a local serving-and-terminating one
    // is used (a ready remote one is not).
    let y = svc("default", "web", "  clusterIP: 10.96.0.5\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]\n")
        + &slice(
            "default",
            "web-1",
            "web",
            "IPv4",
            "[{name: http, port: 8080}]",
            &format!(
                "[{}, {{addresses: [10.0.0.1], nodeName: {NODE}, conditions: {{ready: false, serving: true, terminating: true}}}}]",
                ep("10.0.0.2", "node-b")
            ),
        );
    assert_eq!(table(&y), ["10.96.0.5:80/TCP ClusterIP default/web:http -> 10.0.0.1:8080"]);
}

#[test]
fn session_affinity_timeout() {
    let y = svc("default", "a", "  clusterIP: 10.96.0.1\n  sessionAffinity: ClientIP\n  ports: [{port: 80}]\n")
        + &svc(
            "default",
            "b",
            "  clusterIP: 10.96.0.2\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports: [{port: 80}]\n",
        )
        // A timeout without ClientIP affinity is no affinity.
        + &svc(
            "default",
            "c",
            "  clusterIP: 10.96.0.3\n  sessionAffinity: None\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports: [{port: 80}]\n",
        );
    assert_eq!(
        table(&y),
        [
            "10.96.0.1:80/TCP ClusterIP default/a: affinity 10800 -> none",
            "10.96.0.2:80/TCP ClusterIP default/b: affinity 60 -> none",
            "10.96.0.3:80/TCP ClusterIP default/c: -> none",
        ]
    );
}

#[test]
fn warnings_name_the_service_and_field() {
    let y = svc("default", "a", "  clusterIP: 10.96.0.1\n  externalIPs: [192.0.2.1]\n  ports: [{name: p, port: 80}]\n")
        // The same external address and port: stays with default/a.
        + &svc("default", "b", "  clusterIP: 10.96.0.2\n  externalIPs: [192.0.2.1, \"fd00::1\"]\n  ports: [{name: q, port: 80}]\n")
        + "status:\n  loadBalancer:\n    ingress: [{ip: \"fd00::2\"}]\n"
        // A manifest without a clusterIP (the API server would allocate one).
        + &svc("default", "c", "  ports: [{name: p, port: 80}]\n")
        + &svc("default", "d", "  type: NodePort\n  clusterIP: 10.96.0.4\n  ports: [{name: p, port: 80}]\n");
    let (t, w) = table_with(&y, NODE, &node_ips());
    assert_eq!(
        w,
        [
            "Service default/b: spec.externalIPs[1] fd00::1: no clusterIP of its family, no frontend",
            "Service default/b: status.loadBalancer.ingress[0].ip fd00::2: no clusterIP of its family, no frontend",
            "Service default/b: frontend 192.0.2.1:80/TCP (ExternalIP) is already Service default/a's (ExternalIP); it stays theirs",
            "Service default/c: spec.clusterIP is not set, so the Service has no frontend (the API server allocates one; a manifest must name it)",
            "Service default/d: spec.ports[0].nodePort is not set, so it has no NodePort frontend (the API server allocates one; a manifest must name it)",
        ]
    );
    assert_eq!(
        lines(&t),
        [
            "10.96.0.1:80/TCP ClusterIP default/a:p -> none",
            "10.96.0.2:80/TCP ClusterIP default/b:q -> none",
            "10.96.0.4:80/TCP ClusterIP default/d:p -> none",
            "192.0.2.1:80/TCP ExternalIP default/a:p -> none",
        ]
    );
}

#[test]
fn same_service_same_frontend_twice_is_no_conflict() {
    // An external address that is also the load balancer's: one frontend, no warning.
    let y = svc("default", "a", "  type: LoadBalancer\n  clusterIP: 10.96.0.1\n  externalIPs: [192.0.2.1]\n  ports: [{name: p, port: 80}]\n")
        + "status:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.1}]\n";
    assert_eq!(table(&y), ["10.96.0.1:80/TCP ClusterIP default/a:p -> none", "192.0.2.1:80/TCP ExternalIP default/a:p -> none"]);
}

#[test]
fn empty_cluster_empty_table() {
    let (t, w) = build(&ClusterState::new(), NODE, &node_ips());
    assert!(t.is_empty() && w.is_empty());
}

#[test]
fn the_labs_httpbin_service() {
    // tests/labs/demo and e2e-demo: the seed lab's `httpbin:8000`, both families.
    for lab in ["demo", "e2e-demo"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/labs").join(lab);
        let st = ClusterState::load_dir(&dir).unwrap_or_else(|e| panic!("{lab}: {e}")).state;
        let (t, w) = build(&st, "node1", &[]);
        assert!(w.is_empty(), "{lab}: {w:?}");
        assert_eq!(
            lines(&t),
            [
                "10.96.0.80:8000/TCP ClusterIP default/httpbin:http -> 10.201.0.10:80",
                "[fd00:96::80]:8000/TCP ClusterIP default/httpbin:http -> [fd00:201::10]:80",
            ],
            "{lab}"
        );
    }
}

/// CVE-2020-8554: a Service that names another's ClusterIP as its external IP never takes
/// the frontend, whichever comes first; a Service served by another proxy has none.
#[test]
fn a_cluster_ip_always_wins_and_other_proxies_services_are_left_out() {
    let victim = svc("zzz", "victim", "  clusterIP: 10.96.0.9\n  ports: [{port: 80}]\n");
    let thief = svc("aaa", "thief", "  clusterIP: 10.96.0.10\n  externalIPs: [10.96.0.9]\n  ports: [{port: 80}]\n");
    let (t, w) = table_with(&(thief.clone() + &victim), NODE, &node_ips());
    let fe = Frontend { addr: "10.96.0.9".parse().unwrap(), port: 80, proto: 6 };
    assert_eq!(t.frontends[&fe].service, ("zzz".to_string(), "victim".to_string()), "{t:?}");
    assert!(w.iter().any(|w| w.contains("zzz/victim") && w.contains("aaa/thief")), "{w:?}");
    let other = "---\napiVersion: v1\nkind: Service\nmetadata: {name: o, namespace: x, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec:\n  clusterIP: 10.96.0.11\n  ports: [{port: 80}]\n";
    assert!(table(other).is_empty());
}

#[test]
fn nodeport_addresses_keep_the_node_addresses_inside() {
    let c = |s: &str| crate::compile::cidr::parse_cidr(s).unwrap();
    let ips: Vec<IpAddr> = ["192.168.1.10", "10.0.0.5", "fd00::5"].iter().map(|s| s.parse().unwrap()).collect();
    assert_eq!(nodeport_ips(&ips, &[]), ips, "unset: every address");
    assert_eq!(nodeport_ips(&ips, &[c("192.168.1.0/24")]), vec![ips[0]]);
    assert_eq!(nodeport_ips(&ips, &[c("10.0.0.5/32"), c("fd00::/64")]), vec![ips[1], ips[2]]);
}
