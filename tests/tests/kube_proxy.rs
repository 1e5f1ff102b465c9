//! The test bed's kube-proxy (zt_testbed::kubeproxy) on its own, without zt-agent: the
//! rendered nftables rules load into both node netns of the netpol-matrix lab and do what
//! kube-proxy's do: a pod's packets to a ClusterIP pass its node's prerouting hook and are
//! DNATed to the endpoint (across nodes too), a pod reaches itself through its own Service
//! (hairpin, masqueraded), another port of a ClusterIP is rejected, an unallocated
//! ClusterIP dropped, a Service without endpoints rejected; the backend choice is random
//! or, for tests, a given endpoint; a re-sync follows endpoint changes.
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use zt_testbed::kubeproxy::{self, Choice, Objects};
use zt_testbed::{Family, PodProbers, ProbeResult, ProbeSpec, Proto, Target};

const T: Duration = Duration::from_millis(500);

fn services(tb: &zt_testbed::Testbed, skip: &[&str]) -> String {
    let mut docs = vec![];
    for p in tb.pods() {
        if skip.contains(&format!("{}/{}", p.pod.namespace, p.pod.name).as_str()) {
            continue;
        }
        let ips: Vec<IpAddr> = [Family::V4, Family::V6].iter().filter_map(|f| p.ip(*f)).collect();
        docs.push(kubeproxy::pod_service_yaml(&p.pod.namespace, &p.pod.name, &p.pod.node, &ips, &[(Proto::Tcp, 80), (Proto::Udp, 80)]));
    }
    docs.join("---\n")
}

fn cip(tb: &zt_testbed::Testbed, ns: &str, pod: &str, f: Family) -> IpAddr {
    kubeproxy::pod_cluster_ip(tb.pod_ip(ns, pod, f).unwrap())
}

#[test]
fn kube_proxy_rules_dnat_pod_traffic() {
    let tb = testbed("netpol-matrix");
    let probers = PodProbers::new(&tb, env!("CARGO_BIN_EXE_zt-testbed"));
    let objs = Objects::parse(&services(&tb, &[]), "per-pod services").unwrap();
    tb.kube_proxy_sync(&objs, Choice::Random).unwrap();
    let rules = tb.kube_proxy_rules("node1").unwrap();
    assert!(rules.contains("table ip kube-proxy") && rules.contains("table ip6 kube-proxy") && rules.contains("numgen random mod 1"), "{rules}");

    // Every pod to every pod's ClusterIP (itself included: hairpin), both families,
    // TCP and UDP, from inside the pods' cgroups.
    let mut specs = vec![];
    for from in tb.pods() {
        for to in tb.pods() {
            for f in FAMILIES {
                for proto in [Proto::Tcp, Proto::Udp] {
                    let to_ip = cip(&tb, &to.pod.namespace, &to.pod.name, f);
                    specs.push((
                        ProbeSpec::new(pod(&from.pod.namespace, &from.pod.name), Target::Ip(to_ip), proto, 80),
                        format!("{}/{}", to.pod.namespace, to.pod.name),
                    ));
                }
            }
        }
    }
    let m = probers.run(&specs.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(), T);
    let wrong: Vec<String> =
        m.results.iter().zip(&specs).filter(|((_, r), (_, want))| *r != ok(want)).map(|((s, r), (_, w))| format!("{s}: {r} (want {w})")).collect();
    assert!(wrong.is_empty(), "{} of {} Service probes wrong:\n{}", wrong.len(), specs.len(), wrong.join("\n"));

    let (a, b) = (pod("x", "a"), Target::Ip(cip(&tb, "x", "b", Family::V4)));
    let one = |to: &Target, proto: Proto, port: u16| probers.run(&[ProbeSpec::new(a.clone(), to.clone(), proto, port)], T).results[0].1.clone();
    // Hairpin: x/a sees its own Service's connection come from its node (masquerade).
    assert_eq!(one(&Target::Ip(cip(&tb, "x", "a", Family::V4)), Proto::Tcp, 80), ok("x/a"));
    // Another port of a ClusterIP: rejected (cluster-ips-check); unallocated: dropped.
    // (The reject is an ICMP error, which the kernel rate-limits per peer: a few tries.)
    let refused = |to: &Target, port: u16| {
        (0..8).any(|_| {
            one(to, Proto::Tcp, port) == ProbeResult::Refused || {
                std::thread::sleep(Duration::from_millis(300));
                false
            }
        })
    };
    assert!(refused(&b, 81), "another port of a ClusterIP: {}", one(&b, Proto::Tcp, 81));
    assert_eq!(one(&Target::Ip("10.96.250.250".parse().unwrap()), Proto::Tcp, 80), ProbeResult::Timeout);
    assert_eq!(one(&Target::Ip("fd00:96::fa:fa".parse().unwrap()), Proto::Tcp, 80), ProbeResult::Timeout);

    // One Service with three backends (x/b, y/b, z/b): the deterministic choice, then random.
    let multi = "apiVersion: v1\nkind: Service\nmetadata: {name: many, namespace: x}\nspec: {clusterIP: 10.96.200.1, ports: [{name: web, port: 8080, targetPort: 80}]}\n---\n\
        apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: many-1, namespace: x, labels: {kubernetes.io/service-name: many}}\naddressType: IPv4\n\
        ports: [{name: web, port: 80, protocol: TCP}]\nendpoints:\n";
    let mut multi = multi.to_string();
    let backends = ["x/b", "y/b", "z/b"];
    let mut order: Vec<(String, &str)> = backends.iter().map(|k| (tb.pod_ip(&k[..1], "b", Family::V4).unwrap().to_string(), *k)).collect();
    for (ip, _) in &order {
        multi.push_str(&format!("- {{addresses: ['{ip}'], conditions: {{ready: true}}}}\n"));
    }
    order.sort_by(|x, y| format!("{}:80", x.0).cmp(&format!("{}:80", y.0)));
    let svc = Target::Ip("10.96.200.1".parse().unwrap());
    for (k, (_, who)) in order.iter().enumerate() {
        let objs = Objects::parse(&multi, "many").unwrap();
        tb.kube_proxy_sync(&objs, Choice::Endpoint(k)).unwrap();
        for _ in 0..3 {
            assert_eq!(one(&svc, Proto::Tcp, 8080), ok(who), "Choice::Endpoint({k})");
        }
    }
    let objs = Objects::parse(&multi, "many").unwrap();
    tb.kube_proxy_sync(&objs, Choice::Random).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        if let ProbeResult::Ok(who) = one(&svc, Proto::Tcp, 8080) {
            seen.insert(who);
        }
    }
    assert!(seen.len() >= 2, "random choice over 30 connects reached only {seen:?}");

    // Re-sync without x/b's endpoints: its Service rejects (no endpoints), others still work.
    let mut objs = Objects::parse(&services(&tb, &[]), "per-pod services").unwrap();
    objs.slices.retain(|s| s.service != "s-x-b");
    tb.kube_proxy_sync(&objs, Choice::Random).unwrap();
    assert!(refused(&b, 80), "no endpoints: reject-chain; got {}", one(&b, Proto::Tcp, 80));
    assert_eq!(one(&Target::Ip(cip(&tb, "y", "b", Family::V4)), Proto::Tcp, 80), ok("y/b"));
}
