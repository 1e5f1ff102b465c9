//! The Kubernetes source's event -> state rules, driven with typed objects (no network).

use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus, PodSpec, PodStatus};

use super::*;
use crate::model::k8s::{Namespace, NetworkPolicy, Node, ObjectMeta, Pod};
use crate::model::ztp::{IngressRule, PortRule, ZeroTrustPolicySpec};
use crate::model::k8s::IntOrString;

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: (!ns.is_empty()).then(|| ns.to_string()),
        resource_version: Some("42".into()),
        ..Default::default()
    }
}

fn pod(ns: &str, name: &str, ip: &str) -> ClusterObject {
    ClusterObject::Pod(Pod {
        metadata: meta(ns, name),
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.into()),
            ..Default::default()
        }),
    })
}

fn node(name: &str, ip: &str) -> ClusterObject {
    ClusterObject::Node(Node {
        metadata: meta("", name),
        spec: None,
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..Default::default()
        }),
    })
}

/// A ZeroTrustPolicy allowing ingress on `port` (0 is invalid).
fn ztp(ns: &str, name: &str, port: i32) -> ClusterObject {
    let mut p = ZeroTrustPolicy::new(
        name,
        ZeroTrustPolicySpec {
            ingress: Some(vec![IngressRule {
                ports: Some(vec![PortRule {
                    port: Some(IntOrString::Int(port)),
                    ..Default::default()
                }]),
                ..Default::default()
            }]),
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(ns.into());
    ClusterObject::ZeroTrustPolicy(p)
}

use crate::model::ZeroTrustPolicy;

fn port_of(c: &WatchCache, ns: &str, name: &str) -> Option<i32> {
    let p = c.state().zero_trust_policies.get(&(ns.to_string(), name.to_string()))?;
    match p.spec.ingress.as_ref()?[0].ports.as_ref()?[0].port {
        Some(IntOrString::Int(n)) => Some(n),
        _ => None,
    }
}

/// A complete first list of every kind, with `objects` in it.
fn listed(objects: Vec<ClusterObject>) -> WatchCache {
    let mut c = WatchCache::new();
    for k in ObjectKind::ALL {
        c.apply(SourceEvent::Init(k));
    }
    for o in objects {
        assert_eq!(c.apply(SourceEvent::InitApply(o)).rejected, None);
    }
    for k in ObjectKind::ALL {
        c.apply(SourceEvent::InitDone(k));
    }
    assert!(c.synced());
    c
}

fn has_pod(c: &WatchCache, ns: &str, name: &str) -> bool {
    c.state().contains(ObjectKind::Pod, ns, name)
}

#[test]
fn synced_only_after_every_kind_listed_once() {
    let mut c = WatchCache::new();
    for (i, k) in ObjectKind::ALL.into_iter().enumerate() {
        assert!(!c.synced(), "synced before {k} was listed");
        c.apply(SourceEvent::Init(k));
        if k == ObjectKind::Pod {
            c.apply(SourceEvent::InitApply(pod("default", "a", "10.0.0.1")));
            // Listed objects are not visible before the list completes.
            assert!(!has_pod(&c, "default", "a"));
        }
        let a = c.apply(SourceEvent::InitDone(k));
        assert_eq!(a.changed, k == ObjectKind::Pod, "{i}: {k}");
    }
    assert!(c.synced());
    assert!(has_pod(&c, "default", "a"));
    assert!(c.relists.is_empty(), "the first list is not a relist");
    // A list that never completes (Init, no InitDone) does not make a kind synced.
    let mut c = WatchCache::new();
    for k in ObjectKind::ALL {
        c.apply(SourceEvent::Init(k));
        if k != ObjectKind::Node {
            c.apply(SourceEvent::InitDone(k));
        }
    }
    assert!(!c.synced());
}

#[test]
fn relist_replaces_a_kind_at_init_done() {
    let mut c = listed(vec![
        pod("default", "a", "10.0.0.1"),
        pod("default", "b", "10.0.0.2"),
        node("node-b", "172.16.0.2"),
    ]);
    assert!(c.apply(SourceEvent::Apply(pod("default", "c", "10.0.0.3"))).changed);
    // Relist (after 410 Gone): a changed, b and c deleted while disconnected.
    c.apply(SourceEvent::Init(ObjectKind::Pod));
    c.apply(SourceEvent::InitApply(pod("default", "a", "10.0.0.9")));
    // Nothing changes until InitDone: b and c are still there, a is still the old one.
    assert!(has_pod(&c, "default", "b") && has_pod(&c, "default", "c"));
    assert_eq!(
        c.state().pods[&("default".into(), "a".into())].status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.0.0.1")
    );
    assert!(c.apply(SourceEvent::InitDone(ObjectKind::Pod)).changed);
    assert!(has_pod(&c, "default", "a"));
    assert!(!has_pod(&c, "default", "b") && !has_pod(&c, "default", "c"));
    assert_eq!(
        c.state().pods[&("default".into(), "a".into())].status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.0.0.9")
    );
    // Other kinds are untouched; the relist is counted.
    assert!(c.state().nodes.contains_key("node-b"));
    assert_eq!(c.relists.get(&ObjectKind::Pod), Some(&1));
    // An identical relist changes nothing (no recompile).
    c.apply(SourceEvent::Init(ObjectKind::Pod));
    c.apply(SourceEvent::InitApply(pod("default", "a", "10.0.0.9")));
    assert!(!c.apply(SourceEvent::InitDone(ObjectKind::Pod)).changed);
    // A relist interrupted by a new Init starts over: only the second list counts.
    c.apply(SourceEvent::Init(ObjectKind::Pod));
    c.apply(SourceEvent::InitApply(pod("default", "x", "10.0.0.7")));
    c.apply(SourceEvent::Init(ObjectKind::Pod));
    c.apply(SourceEvent::InitApply(pod("default", "y", "10.0.0.8")));
    c.apply(SourceEvent::InitDone(ObjectKind::Pod));
    let pods: Vec<_> = c.state().pods.keys().map(|(_, n)| n.as_str()).collect();
    assert_eq!(pods, ["y"]);
}

#[test]
fn rejected_object_keeps_its_previous_good_version() {
    let mut c = listed(vec![ztp("prod", "web", 80), pod("prod", "p", "10.0.0.1")]);
    // A bad update: rejected with kind, ns/name, field; version 80 stays.
    let a = c.apply(SourceEvent::Apply(ztp("prod", "web", 0)));
    assert!(!a.changed);
    let msg = a.rejected.unwrap();
    assert_eq!(
        msg,
        "ZeroTrustPolicy prod/web: spec.ingress[0].ports[0].port: port 0 out of range 1-65535 (its previous version stays in force)"
    );
    assert_eq!(port_of(&c, "prod", "web"), Some(80));
    assert_eq!(c.rejected().len(), 1);
    // The rest proceeds.
    assert!(c.apply(SourceEvent::Apply(pod("prod", "q", "10.0.0.2"))).changed);
    // A bad new object is not admitted at all.
    let a = c.apply(SourceEvent::Apply(ztp("prod", "new", 70000)));
    assert!(a.rejected.unwrap().ends_with("(it is ignored)"));
    assert!(!c.state().contains(ObjectKind::ZeroTrustPolicy, "prod", "new"));
    // A relist still listing the bad version keeps the good one too.
    c.apply(SourceEvent::Init(ObjectKind::ZeroTrustPolicy));
    assert!(c.apply(SourceEvent::InitApply(ztp("prod", "web", 0))).rejected.is_some());
    assert!(c.apply(SourceEvent::InitApply(ztp("prod", "new", 70000))).rejected.is_some());
    c.apply(SourceEvent::InitDone(ObjectKind::ZeroTrustPolicy));
    assert_eq!(port_of(&c, "prod", "web"), Some(80));
    assert_eq!(c.rejected().len(), 2);
    // Fixed: the new version applies and is no longer counted as rejected.
    let a = c.apply(SourceEvent::Apply(ztp("prod", "web", 8080)));
    assert_eq!(a, Applied { changed: true, rejected: None });
    assert_eq!(port_of(&c, "prod", "web"), Some(8080));
    // Deleted while rejected: gone from both.
    c.apply(SourceEvent::Delete(ztp("prod", "new", 70000)));
    assert!(c.rejected().is_empty());
    // Invalid Node address: named by field.
    let a = c.apply(SourceEvent::Apply(node("node-c", "10.0.0.300")));
    assert!(
        a.rejected.as_deref().unwrap().starts_with("Node node-c: status.addresses[0].address: invalid IP address"),
        "{a:?}"
    );
}

#[test]
fn rejected_objects_vanish_with_a_relist_that_no_longer_lists_them() {
    let mut c = listed(vec![]);
    c.apply(SourceEvent::Apply(ztp("prod", "bad", 0)));
    assert_eq!(c.rejected().len(), 1);
    c.apply(SourceEvent::Init(ObjectKind::ZeroTrustPolicy));
    c.apply(SourceEvent::InitDone(ObjectKind::ZeroTrustPolicy));
    assert!(c.rejected().is_empty());
}

#[test]
fn deletes_and_unchanged_updates() {
    let mut c = listed(vec![pod("default", "a", "10.0.0.1")]);
    // The same object again (a resync, or only resourceVersion/managedFields moved).
    let mut again = pod("default", "a", "10.0.0.1");
    if let ClusterObject::Pod(p) = &mut again {
        p.metadata.resource_version = Some("43".into());
    }
    assert!(!c.apply(SourceEvent::Apply(again)).changed);
    assert!(c.apply(SourceEvent::Delete(pod("default", "a", "10.0.0.1"))).changed);
    assert!(!has_pod(&c, "default", "a"));
    assert!(!c.apply(SourceEvent::Delete(pod("default", "a", "10.0.0.1"))).changed);
    // Namespaces and NetworkPolicies go through the same path.
    let ns = ClusterObject::Namespace(Namespace { metadata: meta("", "prod"), ..Default::default() });
    assert!(c.apply(SourceEvent::Apply(ns)).changed);
    let np = ClusterObject::NetworkPolicy(NetworkPolicy { metadata: meta("prod", "deny"), ..Default::default() });
    assert!(c.apply(SourceEvent::Apply(np)).changed);
    assert!(c.state().namespaces.contains_key("prod"));
    assert!(c.state().network_policies.contains_key(&("prod".into(), "deny".into())));
    assert_eq!(c.events.get(&(ObjectKind::Pod, "delete")), Some(&2));
}

#[test]
fn api_failures_never_flush() {
    let mut c = listed(vec![pod("default", "a", "10.0.0.1"), node("node-b", "172.16.0.2")]);
    let a = c.apply(SourceEvent::Health(ObjectKind::Pod, Some("connection refused".into())));
    assert_eq!(a, Applied::default());
    assert!(!c.up());
    assert!(c.synced());
    assert!(has_pod(&c, "default", "a"));
    assert_eq!(c.errors.get(&ObjectKind::Pod), Some(&1));
    c.apply(SourceEvent::Health(ObjectKind::Node, Some("connection refused".into())));
    c.apply(SourceEvent::Health(ObjectKind::Pod, None));
    assert!(!c.up(), "Node is still down");
    c.apply(SourceEvent::Health(ObjectKind::Node, None));
    assert!(c.up());
    assert!(has_pod(&c, "default", "a") && c.state().nodes.contains_key("node-b"));
}

#[tokio::test]
async fn a_burst_is_applied_as_one_batch() {
    let (tx, mut rx) = mpsc::channel(2000);
    let mut c = listed(vec![]);
    for i in 0..1000 {
        tx.send(SourceEvent::Apply(pod("default", &format!("p{i}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1))))
            .await
            .unwrap();
    }
    tx.send(SourceEvent::Apply(ztp("default", "bad", 0))).await.unwrap();
    let first = rx.recv().await.unwrap();
    let b = c.apply_pending(first, &mut rx);
    assert_eq!(b.events, 1001);
    assert!(b.changed);
    assert_eq!(b.rejected.len(), 1);
    assert_eq!(c.state().pods.len(), 1000);
    assert!(rx.try_recv().is_err(), "everything queued was drained");
    // Nothing queued: a batch of one.
    tx.send(SourceEvent::Delete(pod("default", "p0", "10.1.0.1"))).await.unwrap();
    let first = rx.recv().await.unwrap();
    assert_eq!(c.apply_pending(first, &mut rx).events, 1);
}

#[test]
fn foreign_trust_domain_is_rejected_per_object() {
    use crate::model::ztp::Subject;
    let mut c = listed(vec![]).with_trust_domain("cluster.local");
    let mut p = ztp("prod", "web", 80);
    if let ClusterObject::ZeroTrustPolicy(z) = &mut p {
        z.spec.subjects = vec![Subject {
            spiffe_id: Some("spiffe://other.domain/ns/prod/sa/web".into()),
            pod_selector: None,
        }];
    }
    let a = c.apply(SourceEvent::Apply(p));
    assert_eq!(
        a.rejected.as_deref(),
        Some("ZeroTrustPolicy prod/web: spec.subjects[0].spiffeId: SPIFFE ID \"spiffe://other.domain/ns/prod/sa/web\" is not of trust domain \"cluster.local\" (it is ignored)")
    );
    assert!(c.apply(SourceEvent::Apply(ztp("prod", "ok", 80))).changed);
    // Peers too, with their path.
    let mut p = ztp("prod", "peer", 80);
    if let ClusterObject::ZeroTrustPolicy(z) = &mut p {
        let rules = z.spec.ingress.get_or_insert_with(Vec::new);
        rules.push(IngressRule {
            from: Some(vec![crate::model::ztp::Peer {
                spiffe_id: Some("spiffe://x.y/ns/a/*".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
    }
    let msg = c.apply(SourceEvent::Apply(p)).rejected.unwrap();
    assert!(msg.starts_with("ZeroTrustPolicy prod/peer: spec.ingress[1].from[0].spiffeId: SPIFFE ID"), "{msg}");
}

fn service(ns: &str, name: &str, cluster_ip: &str, port: i32) -> ClusterObject {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    ClusterObject::Service(crate::model::Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(vec![ServicePort { name: Some("http".into()), port, ..Default::default() }]),
            ..Default::default()
        }),
        status: None,
    })
}

fn endpoint_slice(ns: &str, name: &str, service: &str, address: &str) -> ClusterObject {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    let mut m = meta(ns, name);
    m.labels = Some([("kubernetes.io/service-name".to_string(), service.to_string())].into());
    ClusterObject::EndpointSlice(crate::model::EndpointSlice {
        metadata: m,
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint { addresses: vec![address.into()], ..Default::default() }],
        ports: Some(vec![EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() }]),
    })
}

fn service_port(c: &WatchCache, ns: &str, name: &str) -> Option<i32> {
    let s = c.state().services.get(&(ns.to_string(), name.to_string()))?;
    Some(s.spec.as_ref()?.ports.as_ref()?[0].port)
}

fn slice_address(c: &WatchCache, ns: &str, name: &str) -> Option<String> {
    let s = c.state().endpoint_slices.get(&(ns.to_string(), name.to_string()))?;
    Some(s.endpoints[0].addresses[0].clone())
}

#[test]
fn services_and_endpoint_slices_follow_the_same_rules() {
    let mut c = listed(vec![
        service("prod", "web", "10.96.0.5", 80),
        endpoint_slice("prod", "web-1", "web", "10.0.0.1"),
        pod("prod", "p", "10.0.0.1"),
    ]);
    assert_eq!(service_port(&c, "prod", "web"), Some(80));
    assert_eq!(slice_address(&c, "prod", "web-1").as_deref(), Some("10.0.0.1"));
    // A bad Service update: rejected naming kind, ns/name and field; version 80 stays.
    let a = c.apply(SourceEvent::Apply(service("prod", "web", "10.96.0.5", 0)));
    assert!(!a.changed);
    assert_eq!(
        a.rejected.as_deref(),
        Some("Service prod/web: spec.ports[0].port: port 0 out of range 1-65535 (its previous version stays in force)")
    );
    assert_eq!(service_port(&c, "prod", "web"), Some(80));
    let a = c.apply(SourceEvent::Apply(service("prod", "web", "10.96.0.300", 80)));
    assert!(a.rejected.unwrap().starts_with("Service prod/web: spec.clusterIP: invalid IP address \"10.96.0.300\""));
    // A bad EndpointSlice: an address of the wrong family; the previous one stays.
    let a = c.apply(SourceEvent::Apply(endpoint_slice("prod", "web-1", "web", "fd00::1")));
    assert_eq!(
        a.rejected.as_deref(),
        Some("EndpointSlice prod/web-1: endpoints[0].addresses[0]: fd00::1 is not an IPv4 address (addressType IPv4) (its previous version stays in force)")
    );
    assert_eq!(slice_address(&c, "prod", "web-1").as_deref(), Some("10.0.0.1"));
    // A bad new slice is not admitted; the rest proceeds.
    let a = c.apply(SourceEvent::Apply(endpoint_slice("prod", "web-2", "Web", "10.0.0.2")));
    assert!(a.rejected.as_deref().unwrap().starts_with("EndpointSlice prod/web-2: metadata.labels[\"kubernetes.io/service-name\"]: "), "{a:?}");
    assert!(a.rejected.unwrap().ends_with("(it is ignored)"));
    assert!(!c.state().contains(ObjectKind::EndpointSlice, "prod", "web-2"));
    assert!(c.apply(SourceEvent::Apply(endpoint_slice("prod", "web-3", "web", "10.0.0.3"))).changed);
    assert!(c.apply(SourceEvent::Apply(pod("prod", "q", "10.0.0.2"))).changed);
    // A relist still listing the bad versions keeps the good ones; one no longer listed goes.
    c.apply(SourceEvent::Init(ObjectKind::Service));
    assert!(c.apply(SourceEvent::InitApply(service("prod", "web", "10.96.0.5", 0))).rejected.is_some());
    c.apply(SourceEvent::InitApply(service("prod", "api", "10.96.0.6", 443)));
    assert!(c.apply(SourceEvent::InitDone(ObjectKind::Service)).changed);
    assert_eq!(service_port(&c, "prod", "web"), Some(80));
    assert_eq!(service_port(&c, "prod", "api"), Some(443));
    c.apply(SourceEvent::Init(ObjectKind::EndpointSlice));
    c.apply(SourceEvent::InitApply(endpoint_slice("prod", "web-1", "web", "10.0.0.9")));
    assert!(c.apply(SourceEvent::InitDone(ObjectKind::EndpointSlice)).changed);
    assert_eq!(slice_address(&c, "prod", "web-1").as_deref(), Some("10.0.0.9"));
    assert!(!c.state().contains(ObjectKind::EndpointSlice, "prod", "web-3"));
    assert_eq!(c.relists.get(&ObjectKind::EndpointSlice), Some(&1));
    // Fixed, then deleted.
    let a = c.apply(SourceEvent::Apply(service("prod", "web", "10.96.0.5", 8080)));
    assert_eq!(a, Applied { changed: true, rejected: None });
    assert!(c.rejected().is_empty(), "{:?}", c.rejected());
    assert!(c.apply(SourceEvent::Delete(service("prod", "web", "10.96.0.5", 8080))).changed);
    assert!(c.apply(SourceEvent::Delete(endpoint_slice("prod", "web-1", "web", "10.0.0.9"))).changed);
    assert!(!c.state().contains(ObjectKind::Service, "prod", "web"));
    assert!(c.state().endpoint_slices.is_empty());
    assert_eq!(c.events.get(&(ObjectKind::Service, "delete")), Some(&1));
    assert_eq!(c.events.get(&(ObjectKind::EndpointSlice, "list")), Some(&2));
}
