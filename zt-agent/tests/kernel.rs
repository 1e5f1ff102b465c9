//! Kernel program tests: the real zt programs run through BPF_PROG_TEST_RUN on
//! crafted IPv4/IPv6 packets, with maps set up from zt-common types; each test checks
//! the verdict, the counters, and the events and CT entries it leaves. One case per
//! drop reason at least. Needs root (bpffs mount, BPF syscalls).
mod common;

use common::*;
use zt_common::*;

const POD: &str = "10.0.0.10";
const PEER: &str = "10.0.0.20";
const POD6: &str = "fd00::10";
const PEER6: &str = "fd00::20";
const ID_POD: u32 = 300;
const ID_PEER: u32 = 301;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";

fn dp_with_pods(tag: &str) -> Dp {
    let mut dp = Dp::new(tag);
    dp.local_pod(POD, ID_POD);
    dp.local_pod(POD6, ID_POD);
    dp.endpoint(PEER, ID_PEER, 0, 0);
    dp.endpoint(PEER6, ID_PEER, 0, 0);
    dp
}

#[test]
fn not_ready_drops_everything_ip_but_passes_arp() {
    let mut dp = dp_with_pods("notready");
    dp.set_config(Config { flags: 0, ..config() });
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 1000, 80)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropNotReady), 1);
    assert_eq!(dp.run(TO, &eth(0x0806, &[0u8; 28])), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowNonIp), 1);
}

#[test]
fn malformed_headers_are_counted_drops() {
    let mut dp = dp_with_pods("malformed");
    // IHL 4 (< 20 bytes).
    let mut p = ipv4(PEER, POD, TCP, 1000, 80);
    p[14] = 0x44;
    assert_eq!(dp.run(TO, &p), TC_DROP);
    // Truncated TCP header (only 8 of 20 bytes).
    let p = ipv4_frag(PEER, POD, TCP, &l4(TCP, 1000, 80)[..8], 1, 0);
    assert_eq!(dp.run(TO, &p), TC_DROP);
    // Total length beyond the packet.
    let mut p = ipv4(PEER, POD, UDP, 1000, 53);
    p[16] = 0x40;
    assert_eq!(dp.run(TO, &p), TC_DROP);
    // IPv6 with a bad version nibble.
    let mut p = ipv6(PEER6, POD6, TCP, 1000, 80);
    p[14] = 0x40;
    assert_eq!(dp.run(TO, &p), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropMalformed), 4);
    let ev = dp.events();
    assert_eq!(ev.len(), 4);
    assert!(ev.iter().all(|e| e.reason == Reason::DropMalformed as u8 && e.verdict == VERDICT_DENY));
}

#[test]
fn unknown_or_spoofed_local_endpoint_fails_closed() {
    let mut dp = dp_with_pods("unknown");
    // Not an endpoint at all.
    assert_eq!(dp.run(FROM, &ipv4("10.0.0.99", PEER, TCP, 1000, 80)), TC_DROP);
    // A real pod's address, but on another interface: spoofing, not that pod.
    dp.endpoint("10.0.0.11", 302, EP_LOCAL, 999);
    assert_eq!(dp.run(FROM, &ipv4("10.0.0.11", PEER, TCP, 1000, 80)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropUnknownEndpoint), 2);
    let ev = dp.events();
    assert_eq!(ev[0].local_id, IDENTITY_INIT);
    assert_eq!(ev[0].peer_id, ID_PEER);
}

#[test]
fn endpoint_without_policy_is_open_and_tracked() {
    let mut dp = Dp::new("nopolicy");
    dp.endpoint(POD, ID_POD, EP_LOCAL, TEST_IFINDEX);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 1000, 80)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowNoPolicy), 1);
    assert_eq!(dp.ct_len(), 1);
}

#[test]
fn allow_rule_then_established_then_reply_v4_and_v6() {
    for (pod, peer, tag) in [(POD, PEER, "allow4"), (POD6, PEER6, "allow6")] {
        let mut dp = dp_with_pods(tag);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80), VERDICT_ALLOW, 7);
        let syn = if pod.contains(':') { ipv6(peer, pod, TCP, 40000, 80) } else { ipv4(peer, pod, TCP, 40000, 80) };
        let reply = if pod.contains(':') { ipv6(pod, peer, TCP, 80, 40000) } else { ipv4(pod, peer, TCP, 80, 40000) };
        assert_eq!(dp.run(TO, &syn), TC_PASS, "{tag}");
        assert_eq!(dp.run(TO, &syn), TC_PASS, "{tag}");
        assert_eq!(dp.run(FROM, &reply), TC_PASS, "{tag}");
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 1);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowEstablished), 1);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowReply), 1);
        // The same reply without the tracked flow is a new egress flow: denied.
        let other = if pod.contains(':') { ipv6(pod, peer, TCP, 80, 40001) } else { ipv4(pod, peer, TCP, 80, 40001) };
        assert_eq!(dp.run(FROM, &other), TC_DROP, "{tag}");
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 1);
    }
}

/// The same IPv4 packet with 4 bytes of options: read by the full parse, not the direct one.
fn with_ip_options(p: &[u8]) -> Vec<u8> {
    let mut q = p[..14].to_vec();
    q.push(0x46);
    q.push(p[15]);
    q.extend_from_slice(&(u16::from_be_bytes([p[16], p[17]]) + 4).to_be_bytes());
    q.extend_from_slice(&p[18..34]);
    q.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
    q.extend_from_slice(&p[34..]);
    q
}

/// The common IPv4 TCP/UDP packet is read straight from the linear data, anything else
/// (IP options, a UDP datagram too short for the direct read's bounds) through
/// bpf_skb_load_bytes: both must see the same flow, or an established flow would be
/// judged anew (or another flow's entry matched) depending on how its packets look.
#[test]
fn direct_and_full_ipv4_parse_see_the_same_flow() {
    let mut dp = dp_with_pods("parsepaths");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80), VERDICT_ALLOW, 7);
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 8);
    // SYN with options (full parse) creates the entry; the plain ACK (direct) finds it.
    let syn = with_ip_options(&ipv4(PEER, POD, TCP, 40000, 80));
    assert_eq!(syn[14], 0x46);
    assert_eq!(dp.run(TO, &syn), TC_PASS);
    let mut ack = ipv4(PEER, POD, TCP, 40000, 80);
    ack[14 + 20 + 13] = 0x10;
    assert_eq!(dp.run(TO, &ack), TC_PASS);
    // The reply with options (full parse) is the same flow's reply.
    let mut reply = with_ip_options(&ipv4(POD, PEER, TCP, 80, 40000));
    reply[14 + 24 + 13] = 0x12;
    assert_eq!(dp.run(FROM, &reply), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 1);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowEstablished), 1);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowReply), 1);
    // A 28-byte UDP datagram (shorter than the direct read's 40) and a long one: one flow.
    let short = ipv4(PEER, POD, UDP, 5353, 53);
    assert_eq!(short.len(), 14 + 28);
    assert_eq!(dp.run(TO, &short), TC_PASS);
    let long = ipv4_frag(PEER, POD, UDP, &[l4(UDP, 5353, 53), vec![0u8; 64]].concat(), 1, 0);
    assert_eq!(dp.run(TO, &long), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 2);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowEstablished), 2);
    // The denied port stays denied on both paths.
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 40001, 81)), TC_DROP);
    assert_eq!(dp.run(TO, &with_ip_options(&ipv4(PEER, POD, TCP, 40002, 81))), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 2);
}

#[test]
fn default_deny_event_carries_identities_and_tuple() {
    let mut dp = dp_with_pods("default");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80), VERDICT_ALLOW, 7);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 40000, 81)), TC_DROP);
    let ev = dp.events();
    assert_eq!(ev.len(), 1);
    let e = ev[0];
    assert_eq!((e.dir, e.reason, e.local_id, e.peer_id, e.proto), (DIR_INGRESS, Reason::DropPolicyDefault as u8, ID_POD, ID_PEER, TCP));
    assert_eq!((e.sport, e.dport), (40000, 81));
    assert_eq!(e.ifindex, TEST_IFINDEX);
    assert_eq!(dp.ct_len(), 0, "a denied flow leaves no state");
}

#[test]
fn deny_beats_allow_across_exact_and_any_peer() {
    let mut dp = dp_with_pods("deny");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, TCP, 443), VERDICT_ALLOW, 1);
    dp.policy(POLICY_PREFIX_ANY_PORT, pk(ID_POD, IDENTITY_ANY, DIR_EGRESS, TCP, 0), VERDICT_DENY, 2);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, TCP, 1000, 443)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDeny), 1);
    assert_eq!(dp.events()[0].rule_id, 2);
}

#[test]
fn protocols_are_distinct_sctp_is_not_tcp() {
    let mut dp = dp_with_pods("proto");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, SCTP, 1000, 80)), TC_DROP);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 1000, 80)), TC_DROP);
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, SCTP, 80), VERDICT_ALLOW, 2);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, SCTP, 1000, 80)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 1001, 80)), TC_DROP);
    // Any-protocol rule (prefix 72) covers them all.
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, ID_PEER, DIR_INGRESS, 0, 0), VERDICT_ALLOW, 3);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 1002, 9999)), TC_PASS);
}

#[test]
fn port_ranges_are_prefixes() {
    let mut dp = dp_with_pods("range");
    // 8000..=8007 is one /93 block.
    dp.policy(93, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 8000), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 1, 8000)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 2, 8007)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 3, 8008)), TC_DROP);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, UDP, 4, 7999)), TC_DROP);
}

#[test]
fn host_probes_follow_the_flag() {
    let mut dp = dp_with_pods("host");
    dp.endpoint("10.255.0.1", IDENTITY_HOST, 0, 0);
    assert_eq!(dp.run(TO, &ipv4("10.255.0.1", POD, TCP, 1000, 8080)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHost), 1);
    dp.set_config(Config { flags: CONFIG_READY, ..config() });
    assert_eq!(dp.run(TO, &ipv4("10.255.0.1", POD, TCP, 1001, 8080)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 1);
}

#[test]
fn cidr_peers_and_world() {
    let mut dp = dp_with_pods("cidr");
    let cidr_id = IDENTITY_CIDR_FLAG | 1;
    dp.cidr("192.0.2.0", 24, cidr_id);
    dp.policy(POLICY_PREFIX_ANY_PORT, pk(ID_POD, cidr_id, DIR_EGRESS, TCP, 0), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(FROM, &ipv4(POD, "192.0.2.7", TCP, 1000, 443)), TC_PASS);
    assert_eq!(dp.run(FROM, &ipv4(POD, "198.51.100.7", TCP, 1000, 443)), TC_DROP);
    let ev = dp.events();
    assert_eq!(ev[0].peer_id, IDENTITY_WORLD);
}

#[test]
fn ndp_passes_only_on_link() {
    let dp = dp_with_pods("ndp");
    let ns = ipv6_ext("fe80::1", "ff02::1:ff00:10", ICMPV6, &l4(ICMPV6, 0, 135), &[], 255);
    assert_eq!(dp.run(TO, &ns), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowNdp), 1);
    // Same type with a routed hop limit is just ICMPv6 to policy.
    let routed = ipv6_ext(PEER6, POD6, ICMPV6, &l4(ICMPV6, 0, 135), &[], 63);
    assert_eq!(dp.run(TO, &routed), TC_DROP);
}

#[test]
fn icmp_echo_reply_only_for_tracked_request() {
    let mut dp = dp_with_pods("icmp");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, ICMP, 8), VERDICT_ALLOW, 1);
    // Unsolicited echo reply to the pod: denied.
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 77, 0)), TC_DROP);
    // Request out, its reply back in.
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, ICMP, 77, 8)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 77, 0)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowReply), 1);
    // A request the other way with the same identifier is not that reply.
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, ICMP, 77, 8)), TC_DROP);
    // ICMPv6 echo likewise, with its own type numbers.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, ICMPV6, 128), VERDICT_ALLOW, 2);
    assert_eq!(dp.run(FROM, &ipv6(POD6, PEER6, ICMPV6, 5, 128)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv6(PEER6, POD6, ICMPV6, 5, 129)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv6(PEER6, POD6, ICMPV6, 6, 129)), TC_DROP);
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut dp = dp_with_pods("frag");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 1);
    // A later fragment with no first fragment on record.
    assert_eq!(dp.run(TO, &ipv4_frag(PEER, POD, UDP, &[0u8; 16], 42, 10)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropFragment), 1);
    // First fragment (MF, offset 0) allowed, then its later fragment passes.
    assert_eq!(dp.run(TO, &ipv4_frag(PEER, POD, UDP, &l4(UDP, 999, 53), 43, 0x2000)), TC_PASS);
    assert_eq!(dp.run(TO, &ipv4_frag(PEER, POD, UDP, &[0u8; 16], 43, 10)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowFragment), 1);
    // A denied first fragment records nothing.
    assert_eq!(dp.run(TO, &ipv4_frag(PEER, POD, UDP, &l4(UDP, 999, 54), 44, 0x2000)), TC_DROP);
    assert_eq!(dp.run(TO, &ipv4_frag(PEER, POD, UDP, &[0u8; 16], 44, 10)), TC_DROP);
    // IPv6 fragment header: later fragment without a first.
    let mut frag = vec![0u8; 8];
    frag[0] = UDP;
    frag[2..4].copy_from_slice(&((10u16 << 3).to_be_bytes()));
    let mut p = ipv6_ext(PEER6, POD6, 44, &frag, &[], 64);
    p.extend_from_slice(&[0u8; 8]);
    let len = (p.len() - 54) as u16;
    p[18..20].copy_from_slice(&len.to_be_bytes());
    assert_eq!(dp.run(TO, &p), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropFragment), 3);
}

#[test]
fn too_many_ipv6_extension_headers() {
    let mut dp = dp_with_pods("ext");
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, ID_PEER, DIR_INGRESS, 0, 0), VERDICT_ALLOW, 1);
    let ok = ipv6_ext(PEER6, POD6, TCP, &l4(TCP, 1, 80), &[0, 60], 64);
    assert_eq!(dp.run(TO, &ok), TC_PASS);
    let many = ipv6_ext(PEER6, POD6, TCP, &l4(TCP, 1, 80), &[60, 60, 60, 60, 60, 60, 60], 64);
    assert_eq!(dp.run(TO, &many), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropIpv6ExtHeaders), 1);
}

#[test]
fn revocation_cuts_tracked_flows_on_new_epoch() {
    let mut dp = dp_with_pods("revoke");
    let k = pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80);
    dp.policy(POLICY_PREFIX_FULL, k, VERDICT_ALLOW, 1);
    let fwd = ipv4(PEER, POD, TCP, 40000, 80);
    let rev = ipv4(POD, PEER, TCP, 80, 40000);
    assert_eq!(dp.run(TO, &fwd), TC_PASS);
    assert_eq!(dp.run(FROM, &rev), TC_PASS);
    // Policy epoch bumps while the allow stays: the flow is re-verified and lives.
    dp.set_config(Config { policy_epoch: 2, ..config() });
    assert_eq!(dp.run(FROM, &rev), TC_PASS);
    assert_eq!(dp.run(TO, &fwd), TC_PASS);
    // The allow goes, the epoch bumps: the next packet either way is cut.
    dp.unpolicy(POLICY_PREFIX_FULL, k);
    dp.set_config(Config { policy_epoch: 3, ..config() });
    assert_eq!(dp.run(FROM, &rev), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropRevoked), 1);
    assert_eq!(dp.run(TO, &fwd), TC_DROP);
    assert_eq!(dp.ct_len(), 0);
}

#[test]
fn events_are_rate_limited() {
    let mut dp = dp_with_pods("ratelimit");
    dp.set_config(Config { events_per_sec: 1, events_burst: 2, ..config() });
    for i in 0..5 {
        assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 1000 + i, 81)), TC_DROP);
    }
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 5, "every drop is counted");
    let ev = dp.events();
    assert!(ev.len() <= 2, "at most the burst is sent, got {}", ev.len());
    let stats = dp.maps.event_stats().unwrap();
    assert_eq!(stats[EVSTAT_SENT as usize] as usize, ev.len());
    assert_eq!(stats[EVSTAT_RATE_LIMITED as usize] as usize, 5 - ev.len());
}

#[test]
fn allowed_flow_events_behind_flag() {
    let mut dp = dp_with_pods("allowev");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, TCP, 80), VERDICT_ALLOW, 1);
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 1, 80)), TC_PASS);
    assert!(dp.events().is_empty());
    dp.set_config(Config { flags: CONFIG_READY | CONFIG_EVENTS_ALLOWED, ..config() });
    assert_eq!(dp.run(TO, &ipv4(PEER, POD, TCP, 2, 80)), TC_PASS);
    let ev = dp.events();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].verdict, ev[0].reason), (VERDICT_ALLOW, Reason::AllowPolicy as u8));
}

#[test]
fn icmp_errors_pass_only_for_tracked_flows() {
    let mut dp = dp_with_pods("related");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 1);
    let req = ipv4(PEER, POD, UDP, 5000, 53);
    // Port unreachable from the pod about a flow nobody allowed: denied like any ICMP.
    assert_eq!(dp.run(FROM, &icmp4_error(POD, PEER, 3, &req)), TC_DROP);
    // The flow is admitted at the pod's ingress; its port unreachable goes back out.
    assert_eq!(dp.run(TO, &req), TC_PASS);
    assert_eq!(dp.run(FROM, &icmp4_error(POD, PEER, 3, &req)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowRelated), 1);
    // An error about the reply direction (quoting pod -> peer) relates too.
    let reply = ipv4(POD, PEER, UDP, 53, 5000);
    assert_eq!(dp.run(TO, &icmp4_error(PEER, POD, 3, &reply)), TC_PASS);
    // An error quoting another flow does not.
    let other = ipv4(PEER, POD, UDP, 5001, 53);
    assert_eq!(dp.run(FROM, &icmp4_error(POD, PEER, 3, &other)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 2);
    // IPv6 packet too big about a tracked flow.
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, TCP, 443), VERDICT_ALLOW, 2);
    let out = ipv6(POD6, PEER6, TCP, 6000, 443);
    assert_eq!(dp.run(FROM, &out), TC_PASS);
    let mut ptb = vec![2u8, 0, 0, 0, 0, 0, 5, 0];
    ptb.extend_from_slice(&out[14..14 + 48]);
    assert_eq!(dp.run(TO, &ipv6_ext(PEER6, POD6, ICMPV6, &ptb, &[], 64)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowRelated), 2);
}

#[test]
fn another_pod_cannot_join_a_tracked_flow_by_forging_its_tuple() {
    let mut dp = Dp::new("spoofct");
    in_private_netns(|if_a, if_c| {
        // Pod A behind one interface, pod C behind another, both isolated.
        dp.endpoint(POD, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_a);
        dp.endpoint("10.0.0.11", 302, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_c);
        dp.endpoint(PEER, ID_PEER, 0, 0);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, UDP, 53), VERDICT_ALLOW, 1);
        let out = ipv4(POD, PEER, UDP, 5353, 53);
        assert_eq!(dp.run_on(FROM, &out, if_a), TC_PASS);
        assert_eq!(dp.run_on(FROM, &out, if_a), TC_PASS);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowEstablished), 1);
        // C sends the very same bytes (A's source, A's tracked tuple): a new flow at C's
        // hook, whose source is not C's address.
        assert_eq!(dp.run_on(FROM, &out, if_c), TC_DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropUnknownEndpoint), 1);
        // Nor can C inject a "reply" into A's flow towards the peer... at A's ingress the
        // reply is A's to receive; C's hook sees it as C's ingress for an address not C's.
        let reply = ipv4(PEER, POD, UDP, 53, 5353);
        assert_eq!(dp.run_on(TO, &reply, if_c), TC_DROP);
        assert_eq!(dp.run_on(TO, &reply, if_a), TC_PASS);
    });
}

#[test]
fn icmp_errors_must_go_back_to_the_quoted_sender() {
    let mut dp = dp_with_pods("related-dst");
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_INGRESS, UDP, 53), VERDICT_ALLOW, 1);
    let req = ipv4(PEER, POD, UDP, 5000, 53);
    assert_eq!(dp.run(TO, &req), TC_PASS);
    // The pod quotes the tracked flow but sends the "error" elsewhere: not related.
    assert_eq!(dp.run(FROM, &icmp4_error(POD, "203.0.113.9", 3, &req)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowRelated), 0);
    // The same for IPv6 (parse compares the quoted 16-byte source with the destination).
    let req6 = ipv6(PEER6, POD6, UDP, 5000, 53);
    assert_eq!(dp.run(TO, &req6), TC_PASS);
    assert_eq!(dp.run(FROM, &icmp6_error(POD6, "2001:db8::9", 1, &req6)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowRelated), 0);
    // Sent back to the quoted sender, it relates: the drop above was the destination's.
    assert_eq!(dp.run(FROM, &icmp6_error(POD6, PEER6, 1, &req6)), TC_PASS);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowRelated), 1);
}

#[test]
fn explicit_deny_beats_host_probes() {
    let mut dp = dp_with_pods("hostdeny");
    dp.endpoint("10.255.0.1", IDENTITY_HOST, 0, 0);
    assert_eq!(dp.run(TO, &ipv4("10.255.0.1", POD, TCP, 1000, 8080)), TC_PASS);
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, IDENTITY_HOST, DIR_INGRESS, 0, 0), VERDICT_DENY, 5);
    assert_eq!(dp.run(TO, &ipv4("10.255.0.1", POD, TCP, 1001, 8080)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDeny), 1);
}

#[test]
fn init_identity_fails_closed_even_unisolated() {
    let mut dp = Dp::new("init");
    dp.endpoint(POD, IDENTITY_INIT, EP_LOCAL, TEST_IFINDEX);
    assert_eq!(dp.run(FROM, &ipv4(POD, PEER, TCP, 1000, 80)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropUnknownEndpoint), 1);
}

#[test]
fn ndp_from_a_routable_source_is_policy() {
    let dp = dp_with_pods("ndp-global");
    // Hop limit 255 but global source and destination: could be forwarded, so judged.
    let p = ipv6_ext(POD6, "2001:db8::1", ICMPV6, &l4(ICMPV6, 0, 135), &[], 255);
    assert_eq!(dp.run(FROM, &p), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowNdp), 0);
    // Link-local source to the pod's global address (neighbour unreachability detection).
    let nud = ipv6_ext("fe80::1", POD6, ICMPV6, &l4(ICMPV6, 0, 135), &[], 255);
    assert_eq!(dp.run(TO, &nud), TC_PASS);
}

#[test]
fn six_extension_headers_are_walked() {
    let mut dp = dp_with_pods("ext6");
    dp.policy(POLICY_PREFIX_ANY_PROTO, pk(ID_POD, ID_PEER, DIR_INGRESS, 0, 0), VERDICT_ALLOW, 1);
    let six = ipv6_ext(PEER6, POD6, TCP, &l4(TCP, 1, 80), &[60, 60, 60, 60, 60, 60], 64);
    assert_eq!(dp.run(TO, &six), TC_PASS);
}

/// The loader names a program the object lacks and loads nothing then; a program already
/// loaded is left as it is (aya refuses a second load).
#[test]
fn load_programs_names_a_missing_program_and_skips_loaded_ones() {
    use zt_agent::loader::{load_programs, open_object, MapSizes};
    let fs = Bpffs::new("load-programs");
    let mut ebpf = open_object(&fs.root(), &MapSizes::default()).unwrap();
    let e = load_programs(&mut ebpf, &["zt_noop", "zt_no_such_program"]).unwrap_err();
    assert!(format!("{e:#}").contains("zt_no_such_program"), "{e:#}");
    assert!(ebpf.program("zt_noop").unwrap().fd().is_err(), "nothing is loaded when a name is missing");
    load_programs(&mut ebpf, &["zt_noop", "zt_from_uplink"]).unwrap();
    assert!(ebpf.program("zt_from_uplink").unwrap().fd().is_ok());
    load_programs(&mut ebpf, &["zt_noop", "zt_from_uplink", "zt_bench_lookup"]).unwrap();
    assert!(ebpf.program("zt_bench_lookup").unwrap().fd().is_ok());
}
