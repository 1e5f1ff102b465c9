//! The bypasses of issue 8, each run through the real programs (BPF_PROG_TEST_RUN):
//! tagged and foreign frames, spoofed local sources, forwarded "host" traffic, tunnels,
//! ICMP errors from third parties or about stale flows, ICMP types, IPv6 fragments with
//! headers after the Fragment header. Every case failed on the code before the fix.
mod common;

use common::*;
use zt_common::*;

const POD: &str = "10.0.0.10";
const PEER: &str = "10.0.0.20";
const THIRD: &str = "10.0.0.30";
const HOST: &str = "10.255.0.1";
const REMOTE_NODE: &str = "10.255.0.2";
const ROUTER: &str = "192.0.2.1";
const POD6: &str = "fd00::10";
const PEER6: &str = "fd00::20";
const THIRD6: &str = "fd00::30";
const ID_POD: u32 = 300;
const ID_PEER: u32 = 301;
const ID_THIRD: u32 = 302;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";

fn dp_with_pods(tag: &str) -> Dp {
    let mut dp = Dp::new(tag);
    dp.local_pod(POD, ID_POD);
    dp.local_pod(POD6, ID_POD);
    for (ip, id) in [(PEER, ID_PEER), (PEER6, ID_PEER), (THIRD, ID_THIRD), (THIRD6, ID_THIRD)] {
        dp.endpoint(ip, id, 0, 0);
    }
    dp.endpoint(HOST, IDENTITY_HOST, 0, 0);
    dp.endpoint(REMOTE_NODE, IDENTITY_REMOTE_NODE, 0, 0);
    dp
}

/// `inner` (an Ethernet frame) with VLAN tags of `tpids` pushed after its MAC addresses.
fn tagged(inner: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut p = inner[..12].to_vec();
    for (i, tpid) in tpids.iter().enumerate() {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    p.extend_from_slice(&inner[12..]);
    p
}

#[test]
fn vlan_tagged_and_foreign_frames_never_pass_ready_or_not() {
    let mut dp = dp_with_pods("vlan");
    // A pod may talk to its peer: the inner packets would be allowed if judged.
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, ID_PEER, DIR_EGRESS, 0, 0), VERDICT_ALLOW, 1);
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, ID_PEER, DIR_INGRESS, 0, 0), VERDICT_ALLOW, 1);
    let inner4 = ipv4(POD, PEER, UDP, 1000, 53);
    let inner6 = ipv6(POD6, PEER6, UDP, 1000, 53);
    assert_eq!(dp.run(FROM, &inner4), TC_PASS);
    let mut frames = 0;
    for inner in [&inner4, &inner6] {
        for tpids in [&[0x8100u16][..], &[0x8100, 0x8100], &[0x88a8, 0x8100], &[0x9100]] {
            for hook in [FROM, TO] {
                assert_eq!(dp.run(hook, &tagged(inner, tpids)), TC_DROP, "{hook} tags {tpids:x?}");
                frames += 1;
            }
        }
    }
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropVlan) + dp.counter(DIR_INGRESS, Reason::DropVlan), frames);
    let ev = dp.events();
    assert!(ev.iter().filter(|e| e.reason == Reason::DropVlan as u8).count() as u64 == frames, "{ev:?}");
    // Any other ethertype than IP and ARP.
    for et in [0x88b5u16, 0x88cc, 0x8863, 0x0842] {
        assert_eq!(dp.run(FROM, &eth(et, &[0u8; 46])), TC_DROP, "ethertype {et:#x}");
    }
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropEthertype), 4);
    assert_eq!(dp.run(FROM, &eth(0x0806, &[0u8; 28])), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowNonIp), 1);

    // Before the agent has written a full state: the same, with their own reasons.
    dp.set_config(Config { flags: 0, ..config() });
    assert_eq!(dp.run(FROM, &tagged(&inner4, &[0x8100, 0x8100])), TC_DROP);
    assert_eq!(dp.run(FROM, &eth(0x88b5, &[0u8; 46])), TC_DROP);
    assert_eq!(dp.run(FROM, &eth(0x0806, &[0u8; 28])), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropVlan), frames / 2 + 1);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropEthertype), 5);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropNotReady), 0);
}

#[test]
fn a_local_pods_source_passes_only_from_its_own_interface() {
    let mut dp = Dp::new("spoofsrc");
    in_private_netns(|if_a, if_b| {
        const A: &str = "10.0.0.11";
        // B is open (no policy): only the source check can stop anything.
        dp.endpoint(POD, ID_POD, EP_LOCAL, if_b);
        dp.endpoint(A, ID_PEER, EP_LOCAL, if_a);
        dp.endpoint("fd00::11", ID_PEER, EP_LOCAL, if_a);
        dp.endpoint(POD6, ID_POD, EP_LOCAL, if_b);
        dp.endpoint(PEER, ID_THIRD, 0, 0);
        const VXLAN_DEV: u32 = 999;
        for (a, b) in [(A, POD), ("fd00::11", POD6)] {
            let p = if a.contains(':') { ipv6(a, b, UDP, 4000, 53) } else { ipv4(a, b, UDP, 4000, 53) };
            // From A's own interface: A.
            assert_eq!(dp.run_from(TO, &p, if_b, if_a), TC_PASS);
            // The same tuple (now tracked) decapsulated from a tunnel, or sent by the node.
            assert_eq!(dp.run_from(TO, &p, if_b, VXLAN_DEV), TC_DROP);
            assert_eq!(dp.run_from(TO, &p, if_b, 0), TC_DROP);
        }
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 4);
        let ev = dp.events();
        assert!(ev.iter().all(|e| e.reason == Reason::DropSpoofedSource as u8 && e.ifindex == if_b), "{ev:?}");
        // A remote pod's traffic arrives through the uplink or a tunnel: judged as usual.
        assert_eq!(dp.run_from(TO, &ipv4(PEER, POD, UDP, 4000, 53), if_b, VXLAN_DEV), TC_PASS);
        // A pod not hooked yet (cgroup programs only) cannot be checked by interface.
        dp.endpoint("10.0.0.12", ID_PEER, EP_LOCAL, CGROUP_HOOK_IFINDEX);
        assert_eq!(dp.run_from(TO, &ipv4("10.0.0.12", POD, UDP, 4000, 53), if_b, VXLAN_DEV), TC_PASS);
    });
}

#[test]
fn forwarded_traffic_with_a_node_source_is_not_host() {
    let mut dp = dp_with_pods("hostfwd");
    in_private_netns(|if_a, _| {
        // The node's own socket (a kubelet probe): host.
        assert_eq!(dp.run_from(TO, &ipv4(HOST, POD, TCP, 1000, 8080), 0, 0), TC_PASS);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHost), 1);
        // Masqueraded to the node's address by the node (came in on another interface):
        // world, denied by the pod's default deny.
        assert_eq!(dp.run_from(TO, &ipv4(HOST, POD, TCP, 1001, 8080), 0, if_a), TC_DROP);
        let ev = dp.events();
        let last = ev.last().unwrap();
        assert_eq!((last.reason, last.peer_id), (Reason::DropPolicyDefault as u8, IDENTITY_WORLD));
        // A CIDR rule naming the node's range is how such traffic is allowed.
        dp.cidr("10.255.0.0", 16, IDENTITY_CIDR_FLAG | 7);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, IDENTITY_CIDR_FLAG | 7, DIR_INGRESS, TCP, 8080), VERDICT_ALLOW, 3);
        assert_eq!(dp.run_from(TO, &ipv4(HOST, POD, TCP, 1002, 8080), 0, if_a), TC_PASS);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 1);
    });
}

#[test]
fn pods_reach_node_tunnel_endpoints_only_by_explicit_allow() {
    let mut dp = Dp::new("tunnel");
    // An open pod: everything else it sends passes.
    dp.endpoint(POD, ID_POD, EP_LOCAL, TEST_IFINDEX);
    dp.endpoint(HOST, IDENTITY_HOST, 0, 0);
    dp.endpoint(REMOTE_NODE, IDENTITY_REMOTE_NODE, 0, 0);
    let defaults = zt_agent::tunnels::parse(zt_agent::tunnels::DEFAULT_TUNNELS).unwrap();
    zt_agent::tunnels::sync(&mut dp.maps.tunnels, &defaults).unwrap();
    for (dst, proto, port) in [(HOST, UDP, 4789), (REMOTE_NODE, UDP, 8472), (HOST, UDP, 6081), (REMOTE_NODE, 4, 0), (HOST, 47, 0), (HOST, 41, 0)] {
        let p = ipv4(POD, dst, proto, 30000, port);
        assert_eq!(dp.run(FROM, &p), TC_DROP, "{dst} proto {proto} port {port}");
    }
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropTunnel), 6);
    // Other ports to the node, and the same port to an address that is no node.
    assert_eq!(dp.run(FROM, &ipv4(POD, HOST, UDP, 30000, 4790)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv4(POD, "192.0.2.7", UDP, 30000, 4789)), TC_PASS);
    // An explicit allow (which isolates the pod's egress, as any allow does).
    dp.endpoint(POD, ID_POD, EP_LOCAL | EP_ENFORCE_EGRESS, TEST_IFINDEX);
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, IDENTITY_HOST, DIR_EGRESS, UDP, 4789), VERDICT_ALLOW, 9);
    assert_eq!(dp.run(FROM, &ipv4(POD, HOST, UDP, 30001, 4789)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv4(POD, REMOTE_NODE, UDP, 30001, 4789)), TC_DROP);
    // An emptied list stops the check.
    zt_agent::tunnels::sync(&mut dp.maps.tunnels, &[]).unwrap();
    dp.endpoint(POD, ID_POD, EP_LOCAL, TEST_IFINDEX);
    assert_eq!(dp.run(FROM, &ipv4(POD, REMOTE_NODE, UDP, 30002, 4789)), TC_PASS);
}

#[test]
fn icmp_errors_only_from_the_flows_path() {
    let mut dp = dp_with_pods("related-src");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, UDP, 53), VERDICT_ALLOW, 1);
    let out4 = ipv4(POD, PEER, UDP, 5000, 53);
    let out6 = ipv6(POD6, PEER6, UDP, 5000, 53);
    assert_eq!(dp.run(FROM, &out4), TC_PASS);
    assert_eq!(dp.run(FROM, &out6), TC_PASS);
    // A third pod quotes the live flow: not related, and judged (denied) as plain ICMP.
    assert_eq!(dp.run(TO, &icmp4_error(THIRD, POD, 3, &out4)), TC_DROP);
    assert_eq!(dp.run(TO, &icmp6_error(THIRD6, POD6, 1, &out6)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowRelated), 0);
    // The flow's peer, a router on the path, the node: related.
    for src in [PEER, ROUTER, HOST] {
        assert_eq!(dp.run(TO, &icmp4_error(src, POD, 3, &out4)), TC_PASS, "from {src}");
    }
    assert_eq!(dp.run(TO, &icmp6_error(PEER6, POD6, 1, &out6)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowRelated), 4);
    // Leaving the pod, an error must be the pod's own (a pod is no router).
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 2);
    let in4 = ipv4(PEER, POD, UDP, 6000, 53);
    assert_eq!(dp.run(TO, &in4), TC_PASS);
    assert_eq!(dp.run(FROM, &icmp4_error(ROUTER, PEER, 3, &in4)), TC_DROP);
    assert_eq!(dp.run(FROM, &icmp4_error(POD, PEER, 3, &in4)), TC_PASS);
}

#[test]
fn icmp_errors_need_a_live_entry_of_the_current_epoch() {
    let mut dp = dp_with_pods("related-epoch");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, UDP, 53), VERDICT_ALLOW, 1);
    let out = ipv4(POD, PEER, UDP, 5000, 53);
    assert_eq!(dp.run(FROM, &out), TC_PASS);
    assert_eq!(dp.run(TO, &icmp4_error(PEER, POD, 3, &out)), TC_PASS);
    // The allow is withdrawn: until the flow's next packet is judged again, its entry
    // is of an older epoch and carries no error.
    dp.unpolicy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, UDP, 53));
    dp.set_config(Config { policy_epoch: 2, ..config() });
    assert_eq!(dp.run(TO, &icmp4_error(PEER, POD, 3, &out)), TC_DROP);
    // Re-allowed and re-verified by the flow's next packet: related again.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, UDP, 53), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(FROM, &out), TC_PASS);
    assert_eq!(dp.run(TO, &icmp4_error(PEER, POD, 3, &out)), TC_PASS);
    // An entry past its idle timeout relates nothing.
    dp.set_config(Config { policy_epoch: 2, ct_udp_timeout_s: 0, ..config() });
    assert_eq!(dp.run(TO, &icmp4_error(PEER, POD, 3, &out)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowRelated), 2);
}

#[test]
fn an_allowed_icmp_type_allows_only_itself() {
    let mut dp = dp_with_pods("icmp-types");
    // Timestamp requests (13) from the pod to its peer.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, ICMP, 13), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, ICMP, 0, 13)), TC_PASS);
    // Its reply (14) comes back.
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 0, 14)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowReply), 1);
    // No other type rides the flow: a redirect or a request of the same type coming in,
    // an address mask request going out.
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 0, 5)), TC_DROP);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 0, 13)), TC_DROP);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, ICMP, 0, 17)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault) + dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 3);
    // A one-way type (router solicitation, 10) allowed out: the same type going out again
    // is established; the same type coming in is not a reply.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, ICMP, 10), VERDICT_ALLOW, 2);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, ICMP, 0, 10)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, ICMP, 0, 10)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowEstablished), 1);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 0, 10)), TC_DROP);
}

#[test]
fn ipv6_fragments_with_headers_after_the_fragment_header() {
    let mut dp = dp_with_pods("frag6-dstopts");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 1);
    // First fragment: Fragment header (M=1, offset 0), Destination Options, UDP.
    let mut first = ipv6_ext(PEER6, POD6, UDP, &l4(UDP, 999, 53), &[44, 60], 64);
    first[56..58].copy_from_slice(&1u16.to_be_bytes());
    first[58..62].copy_from_slice(&77u32.to_be_bytes());
    // Later fragment: Fragment header (next header: Destination Options, offset 8 bytes).
    let mut later = ipv6_ext(PEER6, POD6, 60, &[0u8; 16], &[44], 64);
    later[56..58].copy_from_slice(&(1u16 << 3).to_be_bytes());
    later[58..62].copy_from_slice(&77u32.to_be_bytes());
    assert_eq!(dp.run(TO, &first), TC_PASS);
    assert_eq!(dp.run(TO, &later), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowFragment), 1);
    // Another datagram's later fragment still needs its own first.
    later[58..62].copy_from_slice(&78u32.to_be_bytes());
    assert_eq!(dp.run(TO, &later), TC_DROP);
}
