//! HTTP steering in the kernel (issue 11, zt-ebpf/src/l7.rs) through BPF_PROG_TEST_RUN:
//! a port whose ingress entry carries POLICY_FLAG_HTTP admits new flows only from the
//! proxy (its mark) and tracks them with CT_L7; a client's flow there is steered, and
//! with no proxy listener registered it drops (fail closed); a client on another node is
//! steered at the uplink (`zt_from_uplink`) exactly where the pod's hook would refuse it.
//! The socket assignment itself needs a real TC ingress and is tested end to end in
//! tests/tests/e2e_l7.rs.
mod common;

use aya::TestRun;
use common::*;
use zt_common::*;

const SERVER: &str = "10.0.0.10";
const CLIENT: &str = "10.0.0.11";
const REMOTE: &str = "10.0.0.20";
const ID_SERVER: u32 = 300;
const ID_CLIENT: u32 = 301;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
const PROXY_MARK: u32 = 0x0a70_0000;

fn http_policy(dp: &mut Dp, flags: u8) {
    for peer in [ID_CLIENT, IDENTITY_ANY] {
        let k = aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, pk(ID_SERVER, peer, DIR_INGRESS, TCP, 8080));
        dp.maps.policy.insert(&k, PolicyValue { verdict: VERDICT_ALLOW, flags, _pad: [0; 2], rule_id: 7 }, 0).unwrap();
    }
}

fn l7_config(dp: &Dp, c: L7Config) {
    zt_agent::l7::listener::write_config(&dp._fs.root(), c).unwrap();
}

/// `run_from` with the skb's mark set (struct __sk_buff: mark at offset 8).
fn run_marked(dp: &Dp, hook: &str, pkt: &[u8], ifindex: u32, ingress_ifindex: u32, mark: u32) -> u32 {
    let mut ctx = [0u8; 192];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; pkt.len() + 256];
    let opts = aya::TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() };
    let ebpf = dp.ebpf(&[hook]);
    let p: &aya::programs::SchedClassifier = ebpf.program(hook).unwrap().try_into().unwrap();
    p.test_run(opts).expect("BPF_PROG_TEST_RUN with mark").return_value
}

fn ct_states(dp: &Dp) -> Vec<u8> {
    dp.maps.ct.iter().filter_map(|r| r.ok()).map(|(_, v)| v.state).collect()
}

#[test]
fn an_http_port_admits_only_the_proxy_and_tracks_it() {
    let mut dp = Dp::new("l7-to");
    in_private_netns(|if_client, if_server| {
        dp.endpoint(SERVER, ID_SERVER, EP_LOCAL | EP_ENFORCE_INGRESS, if_server);
        dp.endpoint(CLIENT, ID_CLIENT, EP_LOCAL, if_client);
        dp.endpoint(REMOTE, ID_CLIENT, 0, 0);
        http_policy(&mut dp, POLICY_FLAG_HTTP);
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: PROXY_MARK + 1 });
        // A client on another node (through the uplink): it cannot have come through this
        // node's proxy.
        assert_eq!(dp.run_from(TO, &ipv4(REMOTE, SERVER, TCP, 40000, 8080), if_server, 99), TC_DROP);
        // The local client straight from its interface (not steered): the same.
        assert_eq!(dp.run_from(TO, &ipv4(CLIENT, SERVER, TCP, 40001, 8080), if_server, if_client), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpUnsteered), 2);
        let ev = dp.events();
        assert!(ev.iter().all(|e| e.reason == Reason::DropHttpUnsteered as u8 && e.rule_id == 7), "{ev:?}");
        // Sent by the node's stack with the client's address and no mark: a forgery.
        assert_eq!(dp.run_from(TO, &ipv4(CLIENT, SERVER, TCP, 40002, 8080), if_server, 0), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 1);
        // The proxy (its mark, from the node's stack): judged as the client, tracked CT_L7
        // so that the server's replies go back to the proxy's socket.
        assert_eq!(run_marked(&dp, TO, &ipv4(CLIENT, SERVER, TCP, 40003, 8080), if_server, 0, PROXY_MARK), TC_PASS);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 1);
        assert_eq!(ct_states(&dp), vec![CT_L7 | CT_TCP_SYN]);
        // Another mark is no proxy.
        assert_eq!(run_marked(&dp, TO, &ipv4(CLIENT, SERVER, TCP, 40004, 8080), if_server, 0, PROXY_MARK + 1), TC_DROP);
        // The server's reply to the proxy: steered (marked for the local route), and with
        // steering off (steer mark 0) dropped, never routed to the client.
        let mut reply = ipv4(SERVER, CLIENT, TCP, 8080, 40003);
        reply[14 + 20 + 13] = 0x12; // SYN|ACK
        assert_eq!(run_marked(&dp, FROM, &reply, if_server, if_server, 0), 0, "TC_ACT_OK: to the local stack");
        // The proxy's handshake ACK makes the flow established (ZT_CT_EST); the server's
        // data segments to the proxy are steered all the same, every one of them.
        let mut ack = ipv4(CLIENT, SERVER, TCP, 40003, 8080);
        ack[14 + 20 + 13] = 0x10; // ACK
        assert_eq!(run_marked(&dp, TO, &ack, if_server, 0, PROXY_MARK), TC_PASS);
        assert_eq!(ct_est_states(&dp).len(), 1, "established");
        let mut data = ipv4(SERVER, CLIENT, TCP, 8080, 40003);
        data[14 + 20 + 13] = 0x18; // PSH|ACK
        for _ in 0..2 {
            assert_eq!(run_marked(&dp, FROM, &data, if_server, if_server, 0), 0, "an established segment: to the local stack");
        }
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: 0 });
        assert_eq!(run_marked(&dp, FROM, &reply, if_server, if_server, 0), TC_DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropHttpProxyDown), 1);
        // Without the HTTP flag the port is plain L4: the client passes, nothing is tracked CT_L7.
        http_policy(&mut dp, 0);
        assert_eq!(dp.run_from(TO, &ipv4(CLIENT, SERVER, TCP, 40005, 8080), if_server, if_client), TC_PASS);
        assert_eq!(ct_states(&dp).iter().chain(&ct_est_states(&dp)).filter(|s| **s & CT_L7 != 0).count(), 1);
        // HTTP rules added to the port (a new policy epoch): the flow that runs outside the
        // proxy is cut at its next packet, not left to bypass them; the proxy's flow stays.
        http_policy(&mut dp, POLICY_FLAG_HTTP);
        dp.set_config(Config { policy_epoch: 2, ..config() });
        let before = dp.counter(DIR_INGRESS, Reason::DropHttpUnsteered);
        let mut ack = ipv4(CLIENT, SERVER, TCP, 40005, 8080);
        ack[14 + 20 + 13] = 0x10; // ACK
        assert_eq!(dp.run_from(TO, &ack, if_server, if_client), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpUnsteered), before + 1);
        let mut ack = ipv4(CLIENT, SERVER, TCP, 40003, 8080);
        ack[14 + 20 + 13] = 0x10;
        assert_eq!(run_marked(&dp, TO, &ack, if_server, 0, PROXY_MARK), TC_PASS);
    });
}

#[test]
fn a_client_flow_to_an_http_port_is_steered_and_fails_closed_without_a_listener() {
    let mut dp = Dp::new("l7-from");
    in_private_netns(|if_client, if_server| {
        dp.endpoint(SERVER, ID_SERVER, EP_LOCAL | EP_ENFORCE_INGRESS, if_server);
        dp.endpoint(CLIENT, ID_CLIENT, EP_LOCAL, if_client);
        http_policy(&mut dp, POLICY_FLAG_HTTP);
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: PROXY_MARK + 1 });
        // No listener in ZT_L7_LISTENER (no agent): the SYN drops, counted.
        let syn = ipv4(CLIENT, SERVER, TCP, 40000, 8080);
        assert_eq!(dp.run_from(FROM, &syn, if_client, if_client), TC_DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropHttpProxyDown), 1);
        // The flow is tracked as steered: its retransmitted SYN is steered again (and
        // drops again), never passed to the server.
        assert_eq!(ct_states(&dp), vec![CT_L7 | CT_TCP_SYN]);
        assert_eq!(dp.run_from(FROM, &syn, if_client, if_client), TC_DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropHttpProxyDown), 2);
        // An L4-only port of the same server stays in the kernel.
        assert_eq!(dp.run_from(FROM, &ipv4(CLIENT, SERVER, TCP, 40001, 8081), if_client, if_client), TC_PASS);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropHttpProxyDown), 2);
    });
}

const UPLINK: &str = "zt_from_uplink";

fn ct_est_states(dp: &Dp) -> Vec<u8> {
    dp.maps.ct_est.iter().filter_map(|r| r.ok()).map(|(_, v)| v.state).collect()
}

fn with_flags(mut p: Vec<u8>, l4_at: usize, flags: u8) -> Vec<u8> {
    p[l4_at + 13] = flags;
    p
}

/// The uplink (here `zta`; the server pod's interface is `ztb`): what the pod's hook would
/// refuse as `http-unsteered` is steered, tracked one way (`CT_SEEN_REPLY`, so that the
/// client's ACK makes it established), and every later packet is marked for the proxy's
/// socket; everything else passes untouched, to be judged at the pod.
#[test]
fn the_uplink_steers_what_the_pod_hook_would_refuse_and_passes_the_rest() {
    let mut dp = Dp::new("l7-uplink");
    in_private_netns(|uplink, if_server| {
        const OTHER: &str = "10.0.0.21";
        const ELSEWHERE: &str = "10.0.0.30";
        dp.endpoint(SERVER, ID_SERVER, EP_LOCAL | EP_ENFORCE_INGRESS, if_server);
        dp.endpoint(CLIENT, ID_CLIENT, EP_LOCAL, 999);
        dp.endpoint(REMOTE, ID_CLIENT, 0, 0);
        dp.endpoint(OTHER, 302, 0, 0);
        dp.endpoint(ELSEWHERE, ID_SERVER, 0, 0);
        dp.endpoint("fd00::10", ID_SERVER, EP_LOCAL | EP_ENFORCE_INGRESS, if_server);
        dp.endpoint("fd00::20", ID_CLIENT, 0, 0);
        http_policy(&mut dp, POLICY_FLAG_HTTP);
        let l4_only = aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, pk(ID_SERVER, ID_CLIENT, DIR_INGRESS, TCP, 8081));
        dp.maps.policy.insert(&l4_only, PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: 8 }, 0).unwrap();
        // OTHER is denied on the HTTP port (a deny wins over the any-peer allow).
        let deny = aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, pk(ID_SERVER, 302, DIR_INGRESS, TCP, 8080));
        dp.maps.policy.insert(&deny, PolicyValue { verdict: VERDICT_DENY, flags: 0, _pad: [0; 2], rule_id: 9 }, 0).unwrap();
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: PROXY_MARK + 1 });
        let run = |dp: &Dp, p: &[u8]| dp.run_from(UPLINK, p, uplink, uplink);

        // Passes untouched, nothing tracked: an L4-only port, a peer the policy does not
        // allow, a destination that is no local pod, not TCP, a local pod's address
        // arriving from outside (spoofed: the pod's hook drops it), and a segment of a flow
        // this uplink did not steer (the pod's hook refuses it on an HTTP port).
        assert_eq!(run(&dp, &ipv4(REMOTE, SERVER, TCP, 40000, 8081)), TC_PASS);
        assert_eq!(run(&dp, &ipv4(OTHER, SERVER, TCP, 40000, 8080)), TC_PASS);
        assert_eq!(run(&dp, &ipv4(REMOTE, ELSEWHERE, TCP, 40000, 8080)), TC_PASS);
        assert_eq!(run(&dp, &ipv4(REMOTE, SERVER, UDP, 40000, 8080)), TC_PASS);
        assert_eq!(run(&dp, &ipv4(CLIENT, SERVER, TCP, 40000, 8080)), TC_PASS);
        assert_eq!(run(&dp, &with_flags(ipv4(REMOTE, SERVER, TCP, 40001, 8080), 34, 0x10)), TC_PASS);
        assert!(ct_states(&dp).is_empty() && ct_est_states(&dp).is_empty(), "{:?}", ct_states(&dp));
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHttpSteered), 0);

        // A client on another node, SYN to the HTTP port: steered; no listener is
        // registered (no agent), so it drops, counted, never passed to the pod.
        let syn = ipv4(REMOTE, SERVER, TCP, 40002, 8080);
        assert_eq!(run(&dp, &syn), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHttpSteered), 1);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpProxyDown), 1);
        assert_eq!(ct_states(&dp), vec![CT_L7 | CT_SEEN_REPLY | CT_TCP_SYN]);
        // Its retransmission is the tracked flow's: steered again (and drops again).
        assert_eq!(run(&dp, &syn), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHttpSteered), 1);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpProxyDown), 2);
        // The handshake's ACK: marked for the local route (TC_ACT_OK, to the stack), and
        // the entry is established (CT_EST, the long timeout) though the uplink never saw
        // the SYN-ACK.
        assert_eq!(run(&dp, &with_flags(syn.clone(), 34, 0x10)), 0);
        assert_eq!(ct_est_states(&dp), vec![CT_L7 | CT_SEEN_REPLY | CT_TCP_ESTABLISHED]);
        assert_eq!(run(&dp, &with_flags(syn.clone(), 34, 0x18)), 0, "data");
        // Steering off (steer mark 0): a tracked packet drops rather than reach the pod.
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: 0 });
        assert_eq!(run(&dp, &with_flags(syn.clone(), 34, 0x10)), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpProxyDown), 3);
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: PROXY_MARK + 1 });
        // The client's RST closes it (back to the LRU, seconds to live).
        assert_eq!(run(&dp, &with_flags(syn.clone(), 34, 0x04)), 0);
        assert!(ct_est_states(&dp).is_empty());
        assert_eq!(ct_states(&dp), vec![CT_L7 | CT_SEEN_REPLY | CT_TCP_CLOSED]);

        // IPv6 the same.
        assert_eq!(run(&dp, &ipv6("fd00::20", "fd00::10", TCP, 40003, 8080)), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHttpSteered), 2);
        // No agent state yet (not ready): nothing is steered, the pod's hook fails closed.
        dp.set_config(Config { flags: 0, ..config() });
        assert_eq!(run(&dp, &ipv4(REMOTE, SERVER, TCP, 40004, 8080)), TC_PASS);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHttpSteered), 2);
        // Every steered flow is one the pod's hook refuses when it arrives unsteered.
        dp.set_config(config());
        assert_eq!(dp.run_from(TO, &ipv4(REMOTE, SERVER, TCP, 40005, 8080), if_server, uplink), TC_DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropHttpUnsteered), 1);
    });
}

/// A socket of this netns from `CLIENT` (transparent, like the proxy's upstream) to
/// `REMOTE:8080`, connecting (SYN_SENT: in the lookup table with its tuple).
fn upstream_socket(mark: u32) -> (socket2::Socket, u16) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).unwrap();
    s.set_ip_transparent_v4(true).unwrap();
    s.set_mark(mark).unwrap();
    s.bind(&std::net::SocketAddr::new(CLIENT.parse().unwrap(), 0).into()).unwrap();
    s.set_nonblocking(true).unwrap();
    let _ = s.connect(&std::net::SocketAddr::new(REMOTE.parse().unwrap(), 8080).into());
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    (s, port)
}

/// A local client's egress HTTP rules sent it through this node's proxy to a server on
/// another node: the server's answers to the proxy's upstream connection (from the
/// client's address) arrive on the uplink and are handed to the proxy's socket (marked,
/// TC_ACT_OK), not routed to the client. Only for a socket of the node with the proxy's
/// mark that is not listening, and only where the client's egress entry has the flag.
#[test]
fn the_uplink_hands_answers_to_the_proxys_upstream_to_the_proxy() {
    let mut dp = Dp::new("l7-uplink-up");
    in_private_netns(|uplink, if_client| {
        for args in [&["addr", "add", "10.0.0.1/24", "dev", "zta"][..], &["link", "set", "zta", "up"], &["link", "set", "ztb", "up"]] {
            assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        }
        dp.endpoint(CLIENT, ID_CLIENT, EP_LOCAL | EP_ENFORCE_EGRESS, if_client);
        dp.endpoint(REMOTE, ID_SERVER, 0, 0);
        let k = aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, pk(ID_CLIENT, ID_SERVER, DIR_EGRESS, TCP, 8080));
        let entry = |flags| PolicyValue { verdict: VERDICT_ALLOW, flags, _pad: [0; 2], rule_id: 5 };
        dp.maps.policy.insert(&k, entry(POLICY_FLAG_HTTP), 0).unwrap();
        l7_config(&dp, L7Config { proxy_mark: PROXY_MARK, steer_mark: PROXY_MARK + 1 });
        let answer = |port: u16| with_flags(ipv4(REMOTE, CLIENT, TCP, 8080, port), 34, 0x12);
        let (_proxy, port) = upstream_socket(PROXY_MARK);
        assert_eq!(dp.run_from(UPLINK, &answer(port), uplink, uplink), 0, "to the proxy's socket");
        // No socket for the tuple: the client's own flow, to its hook.
        assert_eq!(dp.run_from(UPLINK, &answer(port.wrapping_add(1)), uplink, uplink), TC_PASS);
        // A socket of the node without the proxy's mark is not the proxy's.
        let (_other, other_port) = upstream_socket(0);
        assert_eq!(dp.run_from(UPLINK, &answer(other_port), uplink, uplink), TC_PASS);
        // A listener of the node on the client's port (any address), even with the
        // proxy's mark: never (only a connection's socket is the proxy's upstream).
        let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP)).unwrap();
        l.set_mark(PROXY_MARK).unwrap();
        l.bind(&"0.0.0.0:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        l.listen(8).unwrap();
        let lport = l.local_addr().unwrap().as_socket().unwrap().port();
        assert_eq!(dp.run_from(UPLINK, &answer(lport), uplink, uplink), TC_PASS);
        // Without the flag on the client's egress entry, nothing is looked up.
        dp.maps.policy.insert(&k, entry(0), 0).unwrap();
        assert_eq!(dp.run_from(UPLINK, &answer(port), uplink, uplink), TC_PASS);
        assert!(ct_states(&dp).is_empty() && ct_est_states(&dp).is_empty());
    });
}
