//! A Service frontend reached untranslated (translation off, raw sockets, SCTP): the TC
//! and cgroup skb programs judge the flow as egress to the Service's identity on the
//! frontend port, which only the agent's all-backends entry allows (issue 9). Run
//! through the real programs (BPF_PROG_TEST_RUN). Needs root.
mod common;

use common::*;
use zt_agent::pins::open_map;
use zt_common::*;

const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
const CG_EGRESS: &str = "zt_cgroup_egress";

const POD: &str = "10.0.0.10";
const POD6: &str = "fd00::10";
const OPEN_POD: &str = "10.0.0.11";
const UNHOOKED: &str = "10.0.0.12";
const BACKEND: &str = "10.0.1.10";
const HOST: &str = "10.255.0.1";
const CLUSTER_IP: &str = "10.96.0.80";
const CLUSTER_IP6: &str = "fd00:96::80";
const ID_POD: u32 = 300;
const ID_OPEN: u32 = 301;
const ID_BACKEND: u32 = 400;
const SVC: u32 = IDENTITY_SERVICE_FLAG | 1;
const NODEPORT_SVC: u32 = IDENTITY_SERVICE_FLAG | 2;

type Frontends = aya::maps::HashMap<aya::maps::MapData, SvcFrontendKey, SvcFrontendValue>;

fn frontend(fe: &mut Frontends, ip: &str, port: u16, proto: u8, identity: u32) {
    let key = SvcFrontendKey { addr: addr(ip), port, proto, _pad: 0 };
    fe.insert(key, SvcFrontendValue { svc_id: 1, backends: 1, affinity_s: 0, identity }, 0).unwrap();
}

fn addr(ip: &str) -> [u8; 16] {
    zt_agent::net::to_key(ip.parse().unwrap())
}

fn svc_stat(dp: &Dp, s: SvcStat) -> u64 {
    let stats: aya::maps::PerCpuArray<aya::maps::MapData, u64> = aya::maps::PerCpuArray::try_from(open_map(&dp._fs.root(), MAP_SVC_STATS).unwrap()).unwrap();
    stats.get(&(s as u32), 0).unwrap().iter().sum()
}

/// A pod isolated for egress, one that is not, the backend (remote), the node; the
/// httpbin frontend (ClusterIP 8000/TCP, both families) and a NodePort on the node.
fn node(tag: &str) -> (Dp, Frontends) {
    let mut dp = Dp::new(tag);
    dp.local_pod(POD, ID_POD);
    dp.local_pod(POD6, ID_POD);
    dp.endpoint(OPEN_POD, ID_OPEN, EP_LOCAL, TEST_IFINDEX);
    dp.endpoint(BACKEND, ID_BACKEND, 0, 0);
    dp.endpoint(HOST, IDENTITY_HOST, 0, 0);
    let mut fe: Frontends = aya::maps::HashMap::try_from(open_map(&dp._fs.root(), MAP_SVC_FRONTENDS).unwrap()).unwrap();
    frontend(&mut fe, CLUSTER_IP, 8000, TCP, SVC);
    frontend(&mut fe, CLUSTER_IP6, 8000, TCP, SVC);
    frontend(&mut fe, HOST, 30080, TCP, NODEPORT_SVC);
    (dp, fe)
}

#[test]
fn an_untranslated_frontend_needs_the_all_backends_entry() {
    let (mut dp, _fe) = node("svc-untr");
    // Rules that would allow the frontend if it were judged by its address or port:
    // any peer on 8000, the frontend's address range as world.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, IDENTITY_ANY, DIR_EGRESS, TCP, 8000), VERDICT_ALLOW, 5);
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, IDENTITY_WORLD, DIR_EGRESS, 0, 0), VERDICT_ALLOW, 6);
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40000, 8000)), TC_DROP);
    assert_eq!(dp.run(FROM, &ipv6(POD6, CLUSTER_IP6, TCP, 40000, 8000)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 2);
    assert_eq!(svc_stat(&dp, SvcStat::UntranslatedDenied), 2);
    let ev = dp.events();
    assert_eq!((ev[0].reason, ev[0].local_id, ev[0].peer_id), (Reason::DropService as u8, ID_POD, SVC), "{ev:?}");
    // The same address on a port that is no frontend: judged by address (world) as before.
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40001, 9000)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowPolicy), 1);

    // The agent's entry: every backend allowed on its target port.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, SVC, DIR_EGRESS, TCP, 8000), VERDICT_ALLOW, 7);
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40002, 8000)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv6(POD6, CLUSTER_IP6, TCP, 40002, 8000)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowService), 2);
    assert_eq!(svc_stat(&dp, SvcStat::UntranslatedAllowed), 2);
    // The reply comes back from the frontend (kube-proxy un-DNATs it): conntrack.
    assert_eq!(dp.run(TO, &ipv4(CLUSTER_IP, POD, TCP, 8000, 40002)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowReply), 1);
    // Only the frontend's own protocol: UDP to the same port is no frontend (world).
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, UDP, 40003, 8000)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 2);

    // A deny at the Service identity (the agent never writes one, but deny must win).
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, SVC, DIR_EGRESS, TCP, 8000), VERDICT_DENY, 8);
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40004, 8000)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 3);
}

#[test]
fn a_pod_no_policy_isolates_reaches_a_frontend_counted() {
    let (dp, _fe) = node("svc-untr-open");
    assert_eq!(dp.run_on(FROM, &ipv4(OPEN_POD, CLUSTER_IP, TCP, 40000, 8000), TEST_IFINDEX), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowNoPolicy), 1);
    assert_eq!(svc_stat(&dp, SvcStat::UntranslatedAllowed), 1);
}

#[test]
fn a_node_port_on_the_node_is_the_service_not_host() {
    let (mut dp, _fe) = node("svc-untr-np");
    // The pod may reach the node on any port: a NodePort DNATs elsewhere, so that says nothing.
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, IDENTITY_HOST, DIR_EGRESS, 0, 0), VERDICT_ALLOW, 3);
    assert_eq!(dp.run(FROM, &ipv4(POD, HOST, TCP, 40000, 30080)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 1);
    assert_eq!(dp.run(FROM, &ipv4(POD, HOST, TCP, 40001, 22)), TC_PASS, "another port of the node stays host");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, NODEPORT_SVC, DIR_EGRESS, TCP, 30080), VERDICT_ALLOW, 4);
    assert_eq!(dp.run(FROM, &ipv4(POD, HOST, TCP, 40002, 30080)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowService), 1);
}

#[test]
fn the_cgroup_programs_judge_it_the_same_way() {
    in_private_netns(|dev, _| {
        let (mut dp, _fe) = node("svc-untr-cg");
        // Known to the agent, not hooked yet: the cgroup programs judge its traffic.
        dp.endpoint(UNHOOKED, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, 0);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, IDENTITY_ANY, DIR_EGRESS, TCP, 8000), VERDICT_ALLOW, 5);
        assert_eq!(dp.run_cgroup(CG_EGRESS, &ipv4(UNHOOKED, CLUSTER_IP, TCP, 40000, 8000), Some(dev)), 0);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 1);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, SVC, DIR_EGRESS, TCP, 8000), VERDICT_ALLOW, 7);
        assert_eq!(dp.run_cgroup(CG_EGRESS, &ipv4(UNHOOKED, CLUSTER_IP, TCP, 40001, 8000), Some(dev)), 1);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowService), 1);
    });
}

#[test]
fn a_withdrawn_entry_revokes_the_tracked_flow() {
    let (mut dp, _fe) = node("svc-untr-revoke");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, SVC, DIR_EGRESS, TCP, 8000), VERDICT_ALLOW, 7);
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40000, 8000)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40000, 8000)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowEstablished), 1);
    // A backend joined that the pod may not reach: the agent withdraws the entry and
    // bumps the epoch; the tracked flow is judged again and cut.
    dp.unpolicy(POLICY_PREFIX_FULL, pk(ID_POD, SVC, DIR_EGRESS, TCP, 8000));
    dp.set_config(Config { policy_epoch: config().policy_epoch + 1, ..config() });
    assert_eq!(dp.run(FROM, &ipv4(POD, CLUSTER_IP, TCP, 40000, 8000)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropRevoked), 1);
}

/// kube-proxy's hairpin: a pod's connection to its own Service comes back to it
/// masqueraded to a node address (or with its own address). It entered the node through
/// the pod's own interface, so it is the pod's own traffic: allowed (`self`) however the
/// pod is isolated. The same packet from any other interface is judged as usual.
#[test]
fn a_hairpin_back_into_the_same_pod_is_its_own_traffic() {
    in_private_netns(|if_pod, if_other| {
        let mut dp = Dp::new("svc-hairpin");
        dp.endpoint(POD, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_pod);
        dp.endpoint(POD6, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_pod);
        dp.endpoint(HOST, IDENTITY_HOST, 0, 0);
        for (src, dst) in [(HOST, POD), (POD, POD), ("fd00:255::1", POD6)] {
            let p = if dst.contains(':') { ipv6(src, dst, TCP, 41000, 80) } else { ipv4(src, dst, TCP, 41000, 80) };
            assert_eq!(dp.run_from(TO, &p, if_pod, if_other), TC_DROP, "{src} -> {dst} from another interface");
            let p2 = if dst.contains(':') { ipv6(src, dst, TCP, 41001, 80) } else { ipv4(src, dst, TCP, 41001, 80) };
            assert_eq!(dp.run_from(TO, &p2, if_pod, if_pod), TC_PASS, "{src} -> {dst} back through its own interface");
        }
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowSelf), 3);
    });
}

/// Untranslated, a pod's connection to a Service whose only backend is the pod itself
/// (upstream's per-pod Services): its own traffic, allowed (`self`) even when its egress
/// policy does not allow its own identity; a Service with another backend is not.
#[test]
fn a_pods_own_service_is_its_own_traffic() {
    let (dp, mut fe) = node("svc-untr-self");
    let mut be: aya::maps::HashMap<aya::maps::MapData, SvcBackendKey, SvcBackendValue> =
        aya::maps::HashMap::try_from(open_map(&dp._fs.root(), MAP_SVC_BACKENDS).unwrap()).unwrap();
    for (cluster_ip, set, backend) in [("10.96.0.90", 7u32, POD), ("10.96.0.91", 8, BACKEND)] {
        be.insert(SvcBackendKey { svc_id: set, slot: 0 }, SvcBackendValue { addr: addr(backend), port: 80, _pad: [0; 2] }, 0).unwrap();
        let key = SvcFrontendKey { addr: addr(cluster_ip), port: 80, proto: TCP, _pad: 0 };
        fe.insert(key, SvcFrontendValue { svc_id: set, backends: 1, affinity_s: 0, identity: IDENTITY_SERVICE_FLAG | set }, 0).unwrap();
    }
    assert_eq!(dp.run(FROM, &ipv4(POD, "10.96.0.90", TCP, 40000, 80)), TC_PASS, "its own Service");
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowSelf), 1);
    assert_eq!(dp.run(FROM, &ipv4(POD, "10.96.0.91", TCP, 40001, 80)), TC_DROP, "another pod's Service");
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropService), 1);
}
