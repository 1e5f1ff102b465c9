use std::collections::BTreeMap;
use std::net::IpAddr;

use zt_common::*;

use super::*;
use crate::services::identities::ServiceIdentities;
use crate::services::{Backend, Frontend, FrontendEntry, FrontendKind, ServiceTable};
use crate::state::{Cidr, Desired, EndpointEntry, PolicyEntryKey};

const CLIENT: u32 = 300;
const OPEN: u32 = 301;
const WEB_A: u32 = 400;
const WEB_B: u32 = 401;
const EXT: u32 = IDENTITY_CIDR_FLAG | 5;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ep(identity: u32, flags: u32) -> EndpointEntry {
    EndpointEntry { identity, flags, pod: None }
}

fn put(d: &mut Desired, prefix_len: u32, local: u32, peer: u32, proto: u8, port: u16, verdict: u8, rule: u32) {
    d.policy
        .insert(PolicyEntryKey { prefix_len, key: PolicyKey::new(local, peer, DIR_EGRESS, proto, port) }, PolicyValue { verdict, flags: 0, _pad: [0; 2], rule_id: rule });
}

/// client (isolated egress) and open (not isolated) on this node; two web backends, an
/// external backend in a CIDR identity.
fn desired() -> Desired {
    let mut d = Desired::default();
    d.endpoints.insert(ip("10.0.0.1"), ep(CLIENT, EP_LOCAL | EP_ENFORCE_EGRESS));
    d.endpoints.insert(ip("10.0.0.2"), ep(OPEN, EP_LOCAL));
    d.endpoints.insert(ip("10.0.1.1"), ep(WEB_A, 0));
    d.endpoints.insert(ip("10.0.1.2"), ep(WEB_B, EP_LOCAL | EP_ENFORCE_INGRESS));
    d.cidrs.insert(Cidr { addr: ip("192.0.2.0"), prefix: 24 }, EXT);
    d
}

fn service(ns: &str, name: &str, port: u16, backends: &[(&str, u16)]) -> (Frontend, FrontendEntry) {
    let f = Frontend { addr: ip(&format!("10.96.0.{}", port % 200 + 1)), port, proto: 6 };
    let e = FrontendEntry {
        service: (ns.into(), name.into()),
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: backends.iter().map(|(a, p)| Backend { addr: ip(a), port: *p }).collect(),
        affinity_timeout_s: 0,
        terminating: false,
    };
    (f, e)
}

fn judge(d: &Desired, svcs: &[(Frontend, FrontendEntry)]) -> (BTreeMap<PolicyEntryKey, PolicyValue>, ServiceIdentities) {
    let table = ServiceTable { frontends: svcs.iter().cloned().collect() };
    let mut ids = ServiceIdentities::from_held(BTreeMap::new());
    ids.assign(&table);
    (entries(d, &table, &ids), ids)
}

fn allowed(out: &BTreeMap<PolicyEntryKey, PolicyValue>, ids: &ServiceIdentities, local: u32, svc: &str, port: u16) -> Option<u32> {
    let id = ids.get(&("default".into(), svc.into()), false).unwrap();
    out.get(&PolicyEntryKey { prefix_len: POLICY_PREFIX_FULL, key: PolicyKey::new(local, id, DIR_EGRESS, 6, port) })
        .filter(|v| v.verdict == VERDICT_ALLOW)
        .map(|v| v.rule_id)
}

#[test]
fn allowed_only_when_every_backend_is_on_its_target_port() {
    let mut d = desired();
    put(&mut d, POLICY_PREFIX_FULL, CLIENT, WEB_A, 6, 8080, VERDICT_ALLOW, 7);
    // web-b by a port range 8064..8127 (prefix 90).
    put(&mut d, 90, CLIENT, WEB_B, 6, 8064, VERDICT_ALLOW, 8);
    let svcs = [
        // port != targetPort: the entry is on the frontend port.
        service("default", "both", 80, &[("10.0.1.1", 8080), ("10.0.1.2", 8080)]),
        service("default", "partly", 81, &[("10.0.1.1", 8080), ("10.0.1.2", 9090)]),
        service("default", "wrong-port", 82, &[("10.0.1.1", 80)]),
        service("default", "none", 83, &[]),
    ];
    let (out, ids) = judge(&d, &svcs);
    assert_eq!(allowed(&out, &ids, CLIENT, "both", 80), Some(7));
    assert_eq!(allowed(&out, &ids, CLIENT, "both", 8080), None, "keyed on the frontend port, not the target port");
    assert_eq!(allowed(&out, &ids, CLIENT, "partly", 81), None);
    assert_eq!(allowed(&out, &ids, CLIENT, "wrong-port", 82), None);
    assert_eq!(allowed(&out, &ids, CLIENT, "none", 83), None, "no backend: nothing to allow");
    // Nothing for an identity that is not isolated (the kernel allows it before looking).
    assert!(out.keys().all(|k| k.key.local_id() == CLIENT), "{out:?}");
    assert_eq!(out.len(), 1, "{out:?}");
}

#[test]
fn a_deny_at_a_backend_port_wins_over_allows() {
    let mut d = desired();
    put(&mut d, POLICY_PREFIX_ANY_PROTO, CLIENT, IDENTITY_ANY, 0, 0, VERDICT_ALLOW, 1);
    put(&mut d, POLICY_PREFIX_FULL, CLIENT, WEB_B, 6, 8080, VERDICT_DENY, 2);
    let svcs = [service("default", "web", 80, &[("10.0.1.1", 8080), ("10.0.1.2", 8080)]), service("default", "web-a", 84, &[("10.0.1.1", 8080)])];
    let (out, ids) = judge(&d, &svcs);
    assert_eq!(allowed(&out, &ids, CLIENT, "web", 80), None);
    assert_eq!(allowed(&out, &ids, CLIENT, "web-a", 84), Some(1), "any-peer allow reaches web-a");
    // A deny for any peer at the target port.
    put(&mut d, POLICY_PREFIX_FULL, CLIENT, IDENTITY_ANY, 6, 8080, VERDICT_DENY, 3);
    let (out, ids) = judge(&d, &svcs);
    assert_eq!(allowed(&out, &ids, CLIENT, "web-a", 84), None);
}

#[test]
fn backends_outside_the_cluster_are_judged_by_their_cidr_identity() {
    let mut d = desired();
    put(&mut d, POLICY_PREFIX_ANY_PORT, CLIENT, EXT, 6, 0, VERDICT_ALLOW, 9);
    let svcs = [service("default", "ext", 443, &[("192.0.2.7", 443)]), service("default", "world", 444, &[("198.51.100.1", 443)])];
    let (out, ids) = judge(&d, &svcs);
    assert_eq!(allowed(&out, &ids, CLIENT, "ext", 443), Some(9));
    assert_eq!(allowed(&out, &ids, CLIENT, "world", 444), None, "world is not the CIDR identity");
}

#[test]
fn service_identities_are_named_in_the_desired_state() {
    let mut d = desired();
    let svcs = [service("default", "web", 80, &[("10.0.1.1", 8080)])];
    let table = ServiceTable { frontends: svcs.iter().cloned().collect() };
    let mut ids = ServiceIdentities::from_held(BTreeMap::new());
    ids.assign(&table);
    add_to(&mut d, &table, &ids);
    let id = ids.get(&("default".into(), "web".into()), false).unwrap();
    assert_eq!(d.identities[&id].spiffe_id, "service:default/web (IPv4)");
}

#[test]
fn a_service_of_trusted_resolvers_is_a_trusted_resolver() {
    let mut d = desired();
    d.dns_servers.insert(WEB_A);
    let svcs = [service("kube-system", "kube-dns", 53, &[("10.0.1.1", 53)]), service("default", "mixed", 54, &[("10.0.1.1", 53), ("10.0.1.2", 53)])];
    let table = ServiceTable { frontends: svcs.iter().cloned().collect() };
    let mut ids = ServiceIdentities::from_held(BTreeMap::new());
    ids.assign(&table);
    add_to(&mut d, &table, &ids);
    assert!(d.dns_servers.contains(&ids.get(&("kube-system".into(), "kube-dns".into()), false).unwrap()));
    assert!(!d.dns_servers.contains(&ids.get(&("default".into(), "mixed".into()), false).unwrap()), "one backend is no resolver");
}

/// A dual-stack Service: each family's frontends are judged on that family's backends
/// under their own identity (an IPv4-only rule allows the IPv4 half only).
#[test]
fn each_family_is_judged_on_its_own_backends() {
    let mut d = desired();
    d.endpoints.insert(ip("fd00:1::1"), ep(WEB_B, 0));
    put(&mut d, POLICY_PREFIX_FULL, CLIENT, WEB_A, 6, 8080, VERDICT_ALLOW, 7);
    let (f4, e4) = service("default", "web", 80, &[("10.0.1.1", 8080)]);
    let (_, mut e6) = service("default", "web", 80, &[("fd00:1::1", 8080)]);
    e6.backends = vec![Backend { addr: ip("fd00:1::1"), port: 8080 }];
    let f6 = Frontend { addr: ip("fd00:96::80"), port: 80, proto: 6 };
    let (out, ids) = judge(&d, &[(f4, e4), (f6, e6)]);
    let (id4, id6) = (ids.get(&("default".into(), "web".into()), false).unwrap(), ids.get(&("default".into(), "web".into()), true).unwrap());
    assert_ne!(id4, id6);
    let has = |id| out.contains_key(&PolicyEntryKey { prefix_len: POLICY_PREFIX_FULL, key: PolicyKey::new(CLIENT, id, DIR_EGRESS, 6, 80) });
    assert!(has(id4) && !has(id6), "{out:?}");
}

/// Two frontends of one Service on the same port (a ClusterIP and an external IP) with
/// different backend sets: the shared entry needs both allowed.
#[test]
fn frontends_sharing_a_port_must_all_be_allowed() {
    let mut d = desired();
    put(&mut d, POLICY_PREFIX_FULL, CLIENT, WEB_A, 6, 8080, VERDICT_ALLOW, 7);
    let (f1, e1) = service("default", "web", 80, &[("10.0.1.1", 8080)]);
    let (_, e2) = service("default", "web", 80, &[("10.0.1.1", 8080), ("10.0.1.2", 8080)]);
    let f2 = Frontend { addr: ip("192.0.2.80"), port: 80, proto: 6 };
    let (out, ids) = judge(&d, &[(f1, e1.clone())]);
    assert_eq!(allowed(&out, &ids, CLIENT, "web", 80), Some(7));
    let (out, ids) = judge(&d, &[(f1, e1), (f2, e2)]);
    assert_eq!(allowed(&out, &ids, CLIENT, "web", 80), None);
}
