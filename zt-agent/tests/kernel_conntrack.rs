//! Conntrack with TCP state (issue 13): the real programs through BPF_PROG_TEST_RUN on
//! crafted TCP packets with real flags, and the agent's GC on the same pinned maps.
//! - one pod's connection churn cannot evict another pod's established flow (small maps,
//!   200 000 churned connections, the server speaks first after the churn);
//! - FIN both ways and RST shorten an entry's timeout, a SYN-only flow has the short SYN
//!   timeout, an established one the long one;
//! - the GC deletes expired entries by state and leaves live ones;
//! - what the established segment's short way (zt-ebpf/src/established.rs) must leave to
//!   the general path: the last-seen refresh, expiry, a length the frame does not hold,
//!   and segments that carry an established tuple without being the flow (a header cut
//!   short, a later fragment, IPv4 options, the agent not ready), and the same for a
//!   UDP flow, which it finds in ZT_CT (with a policy epoch bump).
//! Needs root (bpffs mount, BPF syscalls).
mod common;

use std::time::Duration;

use common::*;
use zt_agent::{
    clock::monotonic_ns,
    conntrack_gc::{CtGc, CtMaps},
    loader::MapSizes,
    net::to_key,
    pins::CtMap,
};
use zt_common::*;

const POD: &str = "10.0.0.10";
const CHURNER: &str = "10.0.0.11";
const SERVER: &str = "10.0.0.20";
const ID_POD: u32 = 300;
const ID_SERVER: u32 = 301;
const ID_CHURNER: u32 = 302;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
const ACK: u8 = TCP_ACK;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
const PSH_ACK: u8 = 0x08 | TCP_ACK;

/// An IPv4 TCP segment with these flags.
fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = l4(TCP, sport, dport);
    h[13] = flags;
    ipv4_frag(src, dst, TCP, &h, 1, 0)
}

/// POD (isolated) may open TCP 80 to SERVER and nothing else; nothing may open to POD.
fn dp_with(tag: &str, sizes: &MapSizes) -> Dp {
    let mut dp = Dp::with_sizes(tag, sizes);
    // Verified now, not between a SYN and its answer: a load takes about a second, as
    // long as the 1 s SYN timeouts some tests set.
    drop(dp.ebpf(&[FROM, TO]));
    dp.local_pod(POD, ID_POD);
    dp.endpoint(SERVER, ID_SERVER, 0, 0);
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, TCP, 80), VERDICT_ALLOW, 1);
    dp
}

/// The pod's connection to the server, through the three-way handshake.
fn handshake(dp: &Dp, sport: u16) {
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, sport, 80, TCP_SYN)), TC_PASS, "SYN");
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, sport, SYN_ACK)), TC_PASS, "SYN-ACK");
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, sport, 80, ACK)), TC_PASS, "ACK");
}

fn key(sport: u16) -> CtKey {
    CtKey {
        saddr: to_key(POD.parse().unwrap()),
        daddr: to_key(SERVER.parse().unwrap()),
        sport,
        dport: 80,
        proto: TCP,
        dir: DIR_EGRESS,
        icmp_tag: 0,
        _pad: 0,
        ifindex: TEST_IFINDEX,
    }
}

/// (in ZT_CT_EST, in ZT_CT, state) of the pod's flow from `sport`.
fn where_is(dp: &Dp, sport: u16) -> (bool, bool, Option<u8>) {
    let est = dp.maps.ct_est.get(&key(sport), 0).ok();
    let new = dp.maps.ct.get(&key(sport), 0).ok();
    (est.is_some(), new.is_some(), est.or(new).map(|v| v.state & CT_STATE_MASK))
}

fn kernel_stat(dp: &Dp, s: CtStat) -> u64 {
    dp.maps.ct_stats().unwrap()[s as usize]
}

#[test]
fn churn_of_one_pod_cannot_evict_another_pods_established_flow() {
    // Small maps, so that the churn overflows the LRU many times over.
    let sizes = MapSizes { ct: 1024, ct_est: 1024, ..MapSizes::default() };
    let mut dp = dp_with("ct-churn", &sizes);
    // The churning pod is not isolated: every connection it makes is allowed and tracked.
    dp.endpoint(CHURNER, ID_CHURNER, EP_LOCAL, TEST_IFINDEX);
    handshake(&dp, 40000);
    assert_eq!(where_is(&dp, 40000), (true, false, Some(CT_TCP_ESTABLISHED)), "the handshake promotes the flow to ZT_CT_EST");

    // 200 000 connections from the other pod, each to its own address: half of them
    // complete (SYN, SYN-ACK, ACK, FIN, FIN-ACK), half are SYNs left half-open.
    const CHURN: u32 = 200_000;
    let t = std::time::Instant::now();
    for i in 0..CHURN {
        let dst = std::net::Ipv4Addr::from(0x0a80_0000 + i).to_string(); // 10.128.0.0 + i
        let sport = 1024 + (i % 60000) as u16;
        assert_eq!(dp.run(FROM, &tcp(CHURNER, &dst, sport, 443, TCP_SYN)), TC_PASS);
        if i % 2 == 0 {
            assert_eq!(dp.run(TO, &tcp(&dst, CHURNER, 443, sport, SYN_ACK)), TC_PASS);
            assert_eq!(dp.run(FROM, &tcp(CHURNER, &dst, sport, 443, ACK)), TC_PASS);
            assert_eq!(dp.run(FROM, &tcp(CHURNER, &dst, sport, 443, FIN_ACK)), TC_PASS);
            assert_eq!(dp.run(TO, &tcp(&dst, CHURNER, 443, sport, FIN_ACK)), TC_PASS);
        }
    }
    let created = dp.counter(DIR_EGRESS, Reason::AllowNoPolicy);
    let tracked = dp.ct_len() as u64 + dp.maps.ct_est.keys().count() as u64 - 1;
    println!(
        "conntrack churn: {CHURN} connections ({} complete, {} half-open) in {:.1?}; ZT_CT {} entries (capacity {}), ZT_CT_EST {} (capacity {}); churn flows evicted: {} of {created}; kernel: promoted {}, demoted {}, established-full {}",
        CHURN / 2,
        CHURN / 2,
        t.elapsed(),
        dp.ct_len(),
        sizes.ct,
        dp.maps.ct_est.keys().count(),
        sizes.ct_est,
        created - tracked,
        kernel_stat(&dp, CtStat::Promoted),
        kernel_stat(&dp, CtStat::Demoted),
        kernel_stat(&dp, CtStat::EstablishedFull),
    );
    assert_eq!(created, CHURN as u64, "every churn connection was a new allowed flow");
    assert!(created - tracked > 100_000, "the churn overflowed the LRU (evicted {})", created - tracked);
    assert_eq!(kernel_stat(&dp, CtStat::Promoted), 1 + (CHURN / 2) as u64);
    assert_eq!(kernel_stat(&dp, CtStat::Demoted), (CHURN / 2) as u64, "closed connections leave ZT_CT_EST");

    // After the silence the server speaks first: its segment is the pod's flow's reply.
    assert_eq!(where_is(&dp, 40000), (true, false, Some(CT_TCP_ESTABLISHED)), "the pod's flow is still tracked");
    let replies = dp.counter(DIR_INGRESS, Reason::AllowReply);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 40000, PSH_ACK)), TC_PASS, "server push after the churn");
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowReply), replies + 1);
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 40000, 80, ACK)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 0);
}

#[test]
fn fin_both_ways_and_rst_shorten_the_timeout() {
    let mut dp = dp_with("ct-fin", &MapSizes::default());
    // Short close and SYN timeouts; established keeps the default (hours).
    let cfg = Config { ct_tcp_close_timeout_s: 1, ct_tcp_syn_timeout_s: 1, ..config() };
    dp.set_config(cfg);
    assert!(cfg.ct_tcp_timeout_s >= 3600 && cfg.ct_tcp_fin_timeout_s >= 10);

    // A: closed by FIN both ways.
    handshake(&dp, 41000);
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 41000, 80, FIN_ACK)), TC_PASS);
    assert_eq!(where_is(&dp, 41000), (true, false, Some(CT_TCP_CLOSING)), "half-closed stays in ZT_CT_EST");
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41000, FIN_ACK)), TC_PASS);
    assert_eq!(where_is(&dp, 41000), (false, true, Some(CT_TCP_CLOSED)), "closed both ways: back to ZT_CT");
    // B: reset by the server.
    handshake(&dp, 41001);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41001, TCP_RST | TCP_ACK)), TC_PASS);
    assert_eq!(where_is(&dp, 41001), (false, true, Some(CT_TCP_CLOSED)));
    // C: a SYN the server never answered.
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 41002, 80, TCP_SYN)), TC_PASS);
    assert_eq!(where_is(&dp, 41002), (false, true, Some(CT_TCP_SYN)));
    // D: established and idle as long as the others.
    handshake(&dp, 41003);
    assert_eq!(where_is(&dp, 41003), (true, false, Some(CT_TCP_ESTABLISHED)));

    // While fresh, the closed flows' late segments still pass.
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41000, ACK)), TC_PASS, "last ACK of A");
    std::thread::sleep(Duration::from_millis(2100));
    let drops = dp.counter(DIR_INGRESS, Reason::DropPolicyDefault);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41000, ACK)), TC_DROP, "A (FIN both ways) expired after the close timeout");
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41001, ACK)), TC_DROP, "B (RST) expired after the close timeout");
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41002, SYN_ACK)), TC_DROP, "C (SYN only) expired after the SYN timeout");
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), drops + 3);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 41003, PSH_ACK)), TC_PASS, "D (established) lives on");

    // A new SYN on a closed tuple (port reuse) starts a new connection from scratch.
    handshake(&dp, 41004);
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 41004, 80, TCP_RST)), TC_PASS);
    assert_eq!(where_is(&dp, 41004), (false, true, Some(CT_TCP_CLOSED)));
    handshake(&dp, 41004);
    assert_eq!(where_is(&dp, 41004), (true, false, Some(CT_TCP_ESTABLISHED)), "reopened");
}

#[test]
fn established_flows_keep_revocation_related_errors_and_spoof_checks() {
    let mut dp = dp_with("ct-est-sem", &MapSizes::default());
    handshake(&dp, 42000);
    assert_eq!(where_is(&dp, 42000).0, true);
    // An ICMP error about the established flow, from its peer: related.
    let seg = tcp(POD, SERVER, 42000, 80, PSH_ACK);
    assert_eq!(dp.run(TO, &icmp4_error(SERVER, POD, 3, &seg)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowRelated), 1);
    // Epoch bump with the allow still there: re-verified, stays established.
    dp.set_config(Config { policy_epoch: 2, ..config() });
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 42000, PSH_ACK)), TC_PASS);
    assert_eq!(dp.maps.ct_est.get(&key(42000), 0).unwrap().epoch, 2);
    // The allow goes: the next packet is revoked and the entry leaves ZT_CT_EST.
    dp.unpolicy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, TCP, 80));
    dp.set_config(Config { policy_epoch: 3, ..config() });
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 42000, PSH_ACK)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropRevoked), 1);
    assert_eq!(where_is(&dp, 42000), (false, false, None));
}

#[test]
fn established_flow_keeps_the_peer_interface_check() {
    let mut dp = Dp::new("ct-est-spoof");
    in_private_netns(|if_a, if_b| {
        // Two hooked local pods; A opens to B (both isolated, allowed both ends).
        dp.endpoint(POD, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_a);
        dp.endpoint(SERVER, ID_SERVER, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, if_b);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, TCP, 80), VERDICT_ALLOW, 1);
        // At A's hook: SYN out, SYN-ACK in (from B's interface), ACK out.
        assert_eq!(dp.run_from(FROM, &tcp(POD, SERVER, 43000, 80, TCP_SYN), if_a, if_a), TC_PASS);
        assert_eq!(dp.run_from(TO, &tcp(SERVER, POD, 80, 43000, SYN_ACK), if_a, if_b), TC_PASS);
        assert_eq!(dp.run_from(FROM, &tcp(POD, SERVER, 43000, 80, ACK), if_a, if_a), TC_PASS);
        let k = CtKey { ifindex: if_a, ..key(43000) };
        assert_eq!(dp.maps.ct_est.get(&k, 0).map(|v| v.state & CT_STATE_MASK).ok(), Some(CT_TCP_ESTABLISHED));
        // B's address arriving through another interface: spoofed, established or not.
        assert_eq!(dp.run_from(TO, &tcp(SERVER, POD, 80, 43000, PSH_ACK), if_a, if_a), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 1);
        assert_eq!(dp.run_from(TO, &tcp(SERVER, POD, 80, 43000, PSH_ACK), if_a, if_b), TC_PASS);
        // After a policy-epoch bump, B's address arriving through a third interface (the
        // netns's loopback stands for it) is the first packet to be re-judged: dropped as
        // spoofed, the flow left alone. (It used to remove the entry as revoked: any pod
        // knowing a tuple could cut the flow at every bump.)
        dp.set_config(Config { policy_epoch: 2, ..config() });
        assert_eq!(dp.run_from(TO, &tcp(SERVER, POD, 80, 43000, PSH_ACK), if_a, 1), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 2);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropRevoked), 0);
        assert_eq!(dp.maps.ct_est.get(&k, 0).map(|v| v.epoch).ok(), Some(1), "the entry stays, not re-verified");
        assert_eq!(dp.run_from(TO, &tcp(SERVER, POD, 80, 43000, PSH_ACK), if_a, if_b), TC_PASS);
        assert_eq!(dp.maps.ct_est.get(&k, 0).map(|v| v.epoch).ok(), Some(2), "re-verified by the genuine packet");
        // A tracked UDP flow likewise (the short way finds it in ZT_CT).
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, UDP, 5000), VERDICT_ALLOW, 2);
        assert_eq!(dp.run_from(FROM, &udp(POD, SERVER, 43001, 5000), if_a, if_a), TC_PASS);
        assert_eq!(dp.run_from(TO, &udp(SERVER, POD, 5000, 43001), if_a, if_b), TC_PASS);
        assert_eq!(dp.run_from(TO, &udp(SERVER, POD, 5000, 43001), if_a, if_a), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 3);
        assert_eq!(dp.run_from(TO, &udp(SERVER, POD, 5000, 43001), if_a, if_b), TC_PASS);
    });
}

#[test]
fn gc_deletes_expired_entries_by_state() {
    let mut dp = dp_with("ct-gc", &MapSizes::default());
    dp.set_config(Config { ct_tcp_close_timeout_s: 1, ct_tcp_syn_timeout_s: 1, ct_udp_timeout_s: 1, ..config() });
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, UDP, 53), VERDICT_ALLOW, 2);
    handshake(&dp, 44000); // established
    handshake(&dp, 44001);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 44001, TCP_RST)), TC_PASS); // closed
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 44002, 80, TCP_SYN)), TC_PASS); // SYN only
    assert_eq!(dp.run(FROM, &ipv4(POD, SERVER, UDP, 44003, 53)), TC_PASS); // UDP
    assert_eq!((dp.ct_len(), dp.maps.ct_est.keys().count()), (3, 1));

    let mut gc = CtGc::new(CtMaps::open(&dp._fs.root()).unwrap());
    let c = gc.collect(monotonic_ns()).unwrap();
    assert!(c.deleted.is_empty(), "nothing expired yet: {:?}", c.deleted);
    assert_eq!((c.new_entries, c.est_entries), (3, 1));
    assert_eq!(c.entries.get(&(MAP_CT_EST, "tcp-established")), Some(&1));
    std::thread::sleep(Duration::from_millis(2100));
    let c = gc.collect(monotonic_ns()).unwrap();
    println!("gc: deleted {:?}, left {:?}", c.deleted, c.entries);
    assert_eq!(c.deleted.get("tcp-closed"), Some(&1));
    assert_eq!(c.deleted.get("tcp-syn"), Some(&1));
    assert_eq!(c.deleted.get("udp"), Some(&1));
    assert_eq!((c.new_entries, c.est_entries), (0, 1));
    assert_eq!((dp.ct_len(), dp.maps.ct_est.keys().count()), (0, 1), "the maps hold only the established flow");
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 44000, PSH_ACK)), TC_PASS, "the established flow lives on");
    // Totals carry over passes; the metrics render what the pass counted.
    let c = gc.collect(monotonic_ns()).unwrap();
    assert_eq!(c.deleted.values().sum::<u64>(), 3);
    let mut o = String::new();
    zt_agent::conntrack_gc::render_metrics(&mut o, Some(&c), Some(&gc.maps.kernel_stats().unwrap()));
    assert!(o.contains("zt_ct_entries{map=\"ZT_CT_EST\",state=\"tcp-established\"} 1"), "{o}");
    assert!(o.contains("zt_ct_gc_deleted_total{state=\"tcp-closed\"} 1"), "{o}");
    assert!(o.contains("zt_ct_kernel_total{event=\"promoted\"} 2"), "{o}");
}

/// Sets the entry of `k` in `map` (ZT_CT_EST or ZT_CT) as last seen `ago_s` seconds ago.
fn seen_ago(map: &mut CtMap, k: CtKey, ago_s: u64) {
    let mut v = map.get(&k, 0).expect("tracked");
    v.last_seen_ns = monotonic_ns().saturating_sub(ago_s * 1_000_000_000);
    map.insert(k, v, 0).unwrap();
}

fn seen_ms_ago(map: &CtMap, k: CtKey) -> u64 {
    (monotonic_ns() - map.get(&k, 0).expect("tracked").last_seen_ns) / 1_000_000
}

#[test]
fn established_segments_refresh_last_seen_and_an_expired_entry_is_judged_anew() {
    let mut dp = dp_with("ct-est-refresh", &MapSizes::default());
    handshake(&dp, 44000);
    // Idle 5 s: the next segment, either way, refreshes last-seen (a flow that carries
    // traffic never reaches its idle timeout).
    seen_ago(&mut dp.maps.ct_est, key(44000), 5);
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 44000, 80, PSH_ACK)), TC_PASS);
    assert!(seen_ms_ago(&dp.maps.ct_est, key(44000)) < 1_000, "refreshed by the forward segment: {} ms ago", seen_ms_ago(&dp.maps.ct_est, key(44000)));
    seen_ago(&mut dp.maps.ct_est, key(44000), 5);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 44000, ACK)), TC_PASS);
    assert!(seen_ms_ago(&dp.maps.ct_est, key(44000)) < 1_000, "refreshed by the reply: {} ms ago", seen_ms_ago(&dp.maps.ct_est, key(44000)));
    // Idle past the established timeout (30 s here): the entry goes at its next packet,
    // which is judged as a new flow (the server may not open to the pod).
    dp.set_config(Config { ct_tcp_timeout_s: 30, ..config() });
    seen_ago(&mut dp.maps.ct_est, key(44000), 40);
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 44000, ACK)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 1);
    assert_eq!(where_is(&dp, 44000), (false, false, None));
    // A timeout of 0 (--ct-tcp-timeout 0): no established entry is ever fresh, even one
    // seen just now.
    dp.set_config(config());
    handshake(&dp, 44001);
    dp.set_config(Config { ct_tcp_timeout_s: 0, ..config() });
    assert_eq!(dp.run(TO, &tcp(SERVER, POD, 80, 44001, ACK)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 2);
}

#[test]
fn a_segment_of_an_established_flow_longer_than_its_frame_is_malformed() {
    let dp = dp_with("ct-est-malformed", &MapSizes::default());
    handshake(&dp, 45000);
    let mut seg = tcp(POD, SERVER, 45000, 80, PSH_ACK);
    // The IPv4 total length claims 100 bytes more than the frame holds.
    let claimed = u16::from_be_bytes([seg[16], seg[17]]) + 100;
    seg[16..18].copy_from_slice(&claimed.to_be_bytes());
    assert_eq!(dp.run(FROM, &seg), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropMalformed), 1);
    assert_eq!(dp.run(FROM, &tcp(POD, SERVER, 45000, 80, PSH_ACK)), TC_PASS, "the flow itself goes on");
}

/// Segments that carry an established flow's tuple but that the general path does not
/// pass as that flow: the established segment's short way (zt-ebpf/src/established.rs)
/// must leave each of them to it.
#[test]
fn segments_with_an_established_tuple_that_are_not_the_flow_are_judged_in_full() {
    let mut dp = dp_with("ct-est-not-the-flow", &MapSizes::default());
    handshake(&dp, 46000);
    let seg = tcp(POD, SERVER, 46000, 80, ACK);
    assert_eq!(dp.run(FROM, &seg), TC_PASS);
    // Cut inside the TCP header, the IPv4 total length 0 (BIG TCP's marker): malformed.
    let mut cut = seg[..48].to_vec();
    cut[16..18].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(dp.run(FROM, &cut), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropMalformed), 1);
    // A later fragment whose payload reads as the flow's TCP header: a fragment with no
    // allowed first fragment.
    let mut h = l4(TCP, 46000, 80);
    h[13] = ACK;
    assert_eq!(dp.run(FROM, &ipv4_frag(POD, SERVER, TCP, &h, 7, 1)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropFragment), 1);
    // IPv4 options that read as the flow's ports where a header without options would
    // have them, before a segment to a port the pod may not open: judged on its real
    // header, a new flow, denied.
    let mut opts = tcp(POD, SERVER, 46000, 9, ACK);
    opts.splice(34..34, [0xb3, 0xb0, 0x00, 0x50]); // 46000, 80
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    // Where the flags would be without options (a byte of the real acknowledgement
    // number): ACK.
    opts[14 + 20 + 13] = ACK;
    assert_eq!(dp.run(FROM, &opts), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 1);
    // The agent not ready: nothing passes, tracked or not.
    dp.set_config(Config { flags: config().flags & !CONFIG_READY, ..config() });
    assert_eq!(dp.run(FROM, &seg), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropNotReady), 1);
    dp.set_config(config());
    assert_eq!(dp.run(FROM, &seg), TC_PASS, "the flow itself goes on");
}

/// An IPv4 UDP datagram with 16 bytes of payload (the size the general path parses in
/// one pass over the linear data).
fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Vec<u8> {
    ipv4_udp(src, dst, sport, dport, 16)
}

/// The pod's UDP flow from `sport` to the server's port 5000, as stored in ZT_CT.
fn udp_key(sport: u16) -> CtKey {
    CtKey { proto: UDP, dport: 5000, ..key(sport) }
}

/// What the short way (zt-ebpf/src/established.rs) must leave to the general path for a
/// UDP flow, which it finds in ZT_CT: the last-seen refresh, expiry, a 0 s timeout, a
/// policy epoch bump (re-verified, or revoked), and datagrams that carry the flow's tuple
/// without being the flow (a length the frame does not hold, a header cut short, a later
/// fragment, IPv4 options, the agent not ready).
#[test]
fn tracked_udp_datagrams_leave_to_the_general_path_what_changes_or_is_not_their_flow() {
    let mut dp = dp_with("ct-udp-short", &MapSizes::default());
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, UDP, 5000), VERDICT_ALLOW, 2);
    let out = |sport| udp(POD, SERVER, sport, 5000);
    let back = |sport| udp(SERVER, POD, 5000, sport);
    assert_eq!(dp.run(FROM, &out(47000)), TC_PASS);
    assert_eq!(dp.run(TO, &back(47000)), TC_PASS);
    assert_eq!(dp.run(FROM, &out(47000)), TC_PASS);
    assert_eq!((dp.counter(DIR_EGRESS, Reason::AllowPolicy), dp.counter(DIR_INGRESS, Reason::AllowReply), dp.counter(DIR_EGRESS, Reason::AllowEstablished)), (1, 1, 1));
    // Idle 5 s: the next datagram, either way, refreshes last-seen.
    seen_ago(&mut dp.maps.ct, udp_key(47000), 5);
    assert_eq!(dp.run(FROM, &out(47000)), TC_PASS);
    assert!(seen_ms_ago(&dp.maps.ct, udp_key(47000)) < 1_000, "refreshed by the forward datagram: {} ms ago", seen_ms_ago(&dp.maps.ct, udp_key(47000)));
    seen_ago(&mut dp.maps.ct, udp_key(47000), 5);
    assert_eq!(dp.run(TO, &back(47000)), TC_PASS);
    assert!(seen_ms_ago(&dp.maps.ct, udp_key(47000)) < 1_000, "refreshed by the reply: {} ms ago", seen_ms_ago(&dp.maps.ct, udp_key(47000)));

    // Carrying the flow's tuple without being the flow.
    let mut long = back(47000);
    let claimed = u16::from_be_bytes([long[16], long[17]]) + 100;
    long[16..18].copy_from_slice(&claimed.to_be_bytes());
    assert_eq!(dp.run(TO, &long), TC_DROP, "a length the frame does not hold");
    let mut cut = back(47000)[..38].to_vec();
    cut[16..18].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(dp.run(TO, &cut), TC_DROP, "a UDP header cut short, total length 0");
    // Whole, with no payload (the general path's slower parse) and a total length of 0:
    // the flow.
    let mut bare = ipv4(SERVER, POD, UDP, 5000, 47000);
    assert_eq!(dp.run(TO, &bare), TC_PASS);
    bare[16..18].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(dp.run(TO, &bare), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropMalformed), 2);
    assert_eq!(dp.run(TO, &ipv4_frag(SERVER, POD, UDP, &l4(UDP, 5000, 47000), 7, 1)), TC_DROP, "a later fragment");
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropFragment), 1);
    // IPv4 options that read as the flow's ports ahead of a datagram to a port the pod
    // may not open: judged on its real header, a new flow, denied.
    let mut opts = udp(POD, SERVER, 47000, 9);
    opts.splice(34..34, [0xb7, 0x98, 0x13, 0x88]); // 47000, 5000
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    assert_eq!(dp.run(FROM, &opts), TC_DROP, "IPv4 options");
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 1);
    dp.set_config(Config { flags: config().flags & !CONFIG_READY, ..config() });
    assert_eq!(dp.run(FROM, &out(47000)), TC_DROP, "the agent not ready");
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropNotReady), 1);

    // A new epoch with the allow still there: re-verified. Without it: revoked.
    dp.set_config(Config { policy_epoch: 2, ..config() });
    assert_eq!(dp.run(TO, &back(47000)), TC_PASS);
    assert_eq!(dp.maps.ct.get(&udp_key(47000), 0).unwrap().epoch, 2);
    dp.unpolicy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, UDP, 5000));
    dp.set_config(Config { policy_epoch: 3, ..config() });
    assert_eq!(dp.run(TO, &back(47000)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropRevoked), 1);
    assert!(dp.maps.ct.get(&udp_key(47000), 0).is_err(), "the revoked flow's entry is gone");

    // Idle past the UDP timeout (30 s here): the entry goes at its next datagram, judged
    // as a new flow (nothing may open to the pod).
    dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_SERVER, DIR_EGRESS, UDP, 5000), VERDICT_ALLOW, 2);
    dp.set_config(Config { policy_epoch: 4, ct_udp_timeout_s: 30, ..config() });
    assert_eq!(dp.run(FROM, &out(47001)), TC_PASS);
    seen_ago(&mut dp.maps.ct, udp_key(47001), 40);
    assert_eq!(dp.run(TO, &back(47001)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 1);
    // A timeout of 0: no entry is ever fresh, even one seen just now.
    assert_eq!(dp.run(FROM, &out(47002)), TC_PASS);
    dp.set_config(Config { policy_epoch: 4, ct_udp_timeout_s: 0, ..config() });
    assert_eq!(dp.run(TO, &back(47002)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 2);
}
