//! Services end to end: the seed lab's `sleep` calls httpbin through its Service
//! (ClusterIP port 8000 -> targetPort 80, dual stack), from processes inside the pods'
//! cgroups, so that zt-agent's socket programs translate the frontend to the backend
//! and every hook after them judges httpbin's identity and port 80. No kube-proxy runs
//! in this bed: an untranslated ClusterIP has no route and fails.
mod common;

use common::*;
use zt_testbed::Endpoint;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: default}
spec:
  selector: {app: httpbin}
  clusterIP: 10.96.0.80
  clusterIPs: [10.96.0.80, 'fd00:96::80']
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, port: 8000, targetPort: http, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: httpbin-v4
  namespace: default
  labels: {kubernetes.io/service-name: httpbin}
addressType: IPv4
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: [10.201.0.10]
  conditions: {ready: true}
  nodeName: node1
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: httpbin-v6
  namespace: default
  labels: {kubernetes.io/service-name: httpbin}
addressType: IPv6
ports: [{name: http, port: 80, protocol: TCP}]
endpoints:
- addresses: ['fd00:201::10']
  conditions: {ready: true}
  nodeName: node1
";

/// (greeting or error, peer address) of a TCP connect from inside `from`'s cgroup.
fn connect_from(bed: &Bed, from: &Endpoint, host: &str, port: u16) -> (String, String) {
    let c = bed.connect_in(from, host, port, std::time::Duration::from_millis(1500)).unwrap();
    (c.outcome, c.peer)
}

fn demo_policy(name: &str) -> String {
    std::fs::read_to_string(lab("demo").join(name)).unwrap()
}

#[test]
fn sleep_calls_httpbin_through_its_service() {
    let bed = bed("e2e-demo", &[("05-service.yaml", SERVICE)], &[]);
    let (sleep, notsleep) = (pod("default", "sleep"), pod("default", "notsleep"));
    bed.wait_until("the agent to hold the Service", || {
        bed.metrics().val("zt_service_frontends", &[]) == 2.0 && bed.metrics().val("zt_service_backends", &[]) == 2.0
    });
    // No policy: both reach httpbin through the frontend, and see the frontend as peer.
    for (host, v6) in [("10.96.0.80", false), ("fd00:96::80", true)] {
        let (got, peer) = connect_from(&bed, &sleep, host, 8000);
        assert_eq!(got, "default/httpbin", "sleep -> {host}:8000");
        assert_eq!(peer, host, "getpeername reports the frontend (v6 {v6})");
    }
    assert_eq!(connect_from(&bed, &notsleep, "10.96.0.80", 8000).0, "default/httpbin");
    // A port the Service does not have is no frontend: nothing translates it, and with no
    // route to the ClusterIP range here it fails.
    assert_ne!(connect_from(&bed, &sleep, "10.96.0.80", 8001).0, "default/httpbin");

    // The lab: default deny, then only sleep -> httpbin on TCP 80 (the backend's port).
    bed.write("10-deny-all.yaml", &demo_policy("10-deny-all.yaml"));
    bed.wait_until("deny-all to apply", || connect_from(&bed, &sleep, "10.96.0.80", 8000).0 == "timeout");
    bed.write("20-allow-sleep.yaml", &demo_policy("20-allow-sleep.yaml"));
    bed.wait_until("sleep's allow to apply", || connect_from(&bed, &sleep, "10.96.0.80", 8000).0 == "default/httpbin");
    assert_eq!(connect_from(&bed, &sleep, "fd00:96::80", 8000).0, "default/httpbin");
    assert_eq!(connect_from(&bed, &notsleep, "10.96.0.80", 8000).0, "timeout", "notsleep stays denied");

    let m = bed.metrics();
    assert!(m.get("zt_service_translations_total", &[("outcome", "translated")]).unwrap_or(0.0) >= 6.0);
    // ztctl services names the frontend, its backend and the backend's identity.
    let s = bed.ztctl(&["services"]);
    assert!(s.contains("10.96.0.80:8000") && s.contains("10.201.0.10:80") && s.contains("httpbin"), "{s}");
    // explain of the backend flow: what the socket actually opens.
    let e = bed.ztctl_json(&["explain", "default/sleep", "default/httpbin", "tcp/80"]);
    assert_eq!(e["verdict"], "allow", "{e}");
    // explain of the Service itself agrees with what the connects above got: the
    // translation, then the verdict per backend.
    let e = bed.ztctl_json(&["explain", "default/sleep", "default/httpbin:8000", "tcp"]);
    assert_eq!((e["verdict"].as_str(), e["translated"].as_bool()), (Some("allow"), Some(true)), "{e}");
    assert_eq!(e["frontend"], "10.96.0.80:8000/TCP", "{e}");
    assert!(e["backends"][0]["dst"].as_str().unwrap().contains("10.201.0.10") && e["backends"][0]["port"] == 80, "{e}");
    // Untranslated (a raw socket, or translation off), the packet hooks judge the Service
    // identity: sleep may reach every backend, notsleep none.
    assert_eq!((e["untranslated"]["verdict"].as_str(), e["untranslated"]["reason"].as_str()), (Some("allow"), Some("service")), "{e}");
    assert!(e["untranslated"]["peer"].as_str().unwrap().contains("service:default/httpbin"), "{e}");
    let e = bed.ztctl_json(&["explain", "default/notsleep", "10.96.0.80", "tcp/8000"]);
    assert_eq!(e["verdict"], "drop", "{e}");
    assert_eq!((e["untranslated"]["verdict"].as_str(), e["untranslated"]["reason"].as_str()), (Some("drop"), Some("service-backends-denied")), "{e}");
    let text = bed.ztctl(&["explain", "default/sleep", "default/httpbin:8000", "tcp"]);
    assert!(text.contains("translated at the socket") && text.contains("backend 10.201.0.10"), "{text}");
}

/// A Service whose EndpointSlice has no ready endpoint: connects are refused at once
/// (ECONNREFUSED), counted, instead of hanging on an address nothing answers.
#[test]
fn a_service_without_endpoints_refuses() {
    let empty = SERVICE.replace("- addresses: [10.201.0.10]\n  conditions: {ready: true}", "- addresses: [10.201.0.10]\n  conditions: {ready: false}");
    let bed = bed("e2e-demo", &[("05-service.yaml", &empty)], &[]);
    bed.wait_until("the agent to hold the Service", || bed.metrics().val("zt_service_frontends", &[]) == 2.0);
    assert_eq!(connect_from(&bed, &pod("default", "sleep"), "10.96.0.80", 8000).0, "ECONNREFUSED");
    assert!(bed.metrics().get("zt_service_translations_total", &[("outcome", "no-backend")]).unwrap_or(0.0) >= 1.0);
}
