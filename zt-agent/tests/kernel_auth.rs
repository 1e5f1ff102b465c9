//! Authentication in the datapath (issue 10), through the real programs
//! (BPF_PROG_TEST_RUN): a new flow on an entry with POLICY_FLAG_AUTH_REQUIRED passes only
//! if ZT_AUTH_PROOFS proves the peer's identity for the node its address is on.
//! - allowed with a proof, dropped (auth-required, counted, reported) without, dropped
//!   after the proof's expiry, dropped with a proof from another node;
//! - a plain rule is unaffected; a plain any-peer allow next to a flagged exact one wins;
//! - a local peer is proven by this node's own proof (AUTH_NODE_SELF);
//! - an allowed proven flow is counted `authenticated` and conntrack remembers the proof
//!   (CT_PROVEN, set when the flow is admitted); a withdrawn proof plus an epoch bump
//!   revokes the live flow, an established flow needs no lookup;
//! - the verifier's processed instructions (printed).
//! Needs root (bpffs mount, BPF syscalls).
mod common;

use common::*;
use zt_agent::{auth::boottime_ns, net::to_key};
use zt_common::*;

const POD: &str = "10.0.0.10";
const LOCAL_PEER: &str = "10.0.0.11";
const REMOTE: &str = "10.0.1.20";
const ID_POD: u32 = 300;
const ID_LOCAL_PEER: u32 = 301;
const ID_REMOTE: u32 = 302;
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
/// Ports: 80 requires authentication, 81 does not, 82 requires it on the exact entry
/// while an any-peer entry allows it plainly.
const AUTH_PORT: u16 = 80;
const PLAIN_PORT: u16 = 81;
const MIXED_PORT: u16 = 82;

fn node2() -> u32 {
    auth_node_id(b"node2")
}

fn flagged(dp: &mut Dp, k: PolicyKey, flags: u8, rule: u32) {
    use aya::maps::lpm_trie::Key;
    dp.maps.policy.insert(&Key::new(POLICY_PREFIX_FULL, k), PolicyValue { verdict: VERDICT_ALLOW, flags, _pad: [0; 2], rule_id: rule }, 0).unwrap();
}

/// POD (isolated) accepts TCP from REMOTE (a pod of node2) and LOCAL_PEER (this node).
fn dp(tag: &str) -> Dp {
    let mut dp = Dp::new(tag);
    dp.local_pod(POD, ID_POD);
    // A local peer on another interface (ifindex 7): packets judged here with no
    // ingress interface recorded (from_ifindex 0) are not spoofing checks' business.
    dp.endpoint(LOCAL_PEER, ID_LOCAL_PEER, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, 0);
    let ip: std::net::IpAddr = REMOTE.parse().unwrap();
    dp.maps.endpoints.insert(EndpointKey { addr: to_key(ip) }, EndpointValue { identity: ID_REMOTE, flags: 0, ifindex: 0, cgroup: node2() }, 0).unwrap();
    for peer in [ID_REMOTE, ID_LOCAL_PEER] {
        flagged(&mut dp, pk(ID_POD, peer, DIR_INGRESS, TCP, AUTH_PORT), POLICY_FLAG_AUTH_REQUIRED, 1);
        flagged(&mut dp, pk(ID_POD, peer, DIR_INGRESS, TCP, PLAIN_PORT), 0, 2);
        flagged(&mut dp, pk(ID_POD, peer, DIR_INGRESS, TCP, MIXED_PORT), POLICY_FLAG_AUTH_REQUIRED, 3);
    }
    flagged(&mut dp, pk(ID_POD, IDENTITY_ANY, DIR_INGRESS, TCP, MIXED_PORT), 0, 4);
    dp
}

fn prove(dp: &mut Dp, node: u32, identity: u32, for_ns: i64) {
    let expires_ns = (boottime_ns() as i64 + for_ns) as u64;
    dp.maps.auth_proofs.insert(AuthProofKey { node, identity }, AuthProofValue { expires_ns }, 0).unwrap();
}

fn syn(src: &str, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = l4(TCP, sport, dport);
    h[13] = TCP_SYN;
    ipv4_frag(src, POD, TCP, &h, 1, 0)
}

fn ct_state(dp: &Dp, src: &str, sport: u16, dport: u16) -> Option<u8> {
    let k = CtKey {
        saddr: to_key(src.parse().unwrap()),
        daddr: to_key(POD.parse().unwrap()),
        sport,
        dport,
        proto: TCP,
        dir: DIR_INGRESS,
        icmp_tag: 0,
        _pad: 0,
        ifindex: TEST_IFINDEX,
    };
    dp.maps.ct.get(&k, 0).ok().map(|v| v.state)
}

#[test]
fn allowed_with_a_proof_dropped_without_after_expiry_and_from_another_node() {
    let mut dp = dp("auth-basic");
    // No proof: dropped with its own reason, counted, reported.
    assert_eq!(dp.run(TO, &syn(REMOTE, 1000, AUTH_PORT)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropAuthRequired), 1);
    let ev = dp.events();
    assert_eq!((ev.len(), ev[0].reason, ev[0].rule_id, ev[0].peer_id), (1, Reason::DropAuthRequired as u8, 1, ID_REMOTE));
    // The plain rule of the same peer is unaffected.
    assert_eq!(dp.run(TO, &syn(REMOTE, 1001, PLAIN_PORT)), TC_PASS);
    assert_eq!(ct_state(&dp, REMOTE, 1001, PLAIN_PORT).map(|s| s & CT_PROVEN), Some(0));
    // A plain any-peer allow beside the flagged exact entry: plain wins.
    assert_eq!(dp.run(TO, &syn(REMOTE, 1002, MIXED_PORT)), TC_PASS);
    // A proof of the identity from another node proves nothing for node2's address.
    prove(&mut dp, auth_node_id(b"node3"), ID_REMOTE, 60_000_000_000);
    prove(&mut dp, AUTH_NODE_SELF, ID_REMOTE, 60_000_000_000);
    assert_eq!(dp.run(TO, &syn(REMOTE, 1003, AUTH_PORT)), TC_DROP);
    // node2's proof of another identity neither.
    prove(&mut dp, node2(), ID_LOCAL_PEER, 60_000_000_000);
    assert_eq!(dp.run(TO, &syn(REMOTE, 1004, AUTH_PORT)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropAuthRequired), 3);
    // node2 proves the identity: allowed, and conntrack remembers the proof.
    prove(&mut dp, node2(), ID_REMOTE, 60_000_000_000);
    assert_eq!(dp.run(TO, &syn(REMOTE, 1005, AUTH_PORT)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowPolicy), 2, "the plain and the mixed-port flows");
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowAuthenticated), 1);
    assert_eq!(ct_state(&dp, REMOTE, 1005, AUTH_PORT).map(|s| s & CT_PROVEN), Some(CT_PROVEN));
    // Expired (one nanosecond in the past): dropped again.
    prove(&mut dp, node2(), ID_REMOTE, -1);
    assert_eq!(dp.run(TO, &syn(REMOTE, 1006, AUTH_PORT)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropAuthRequired), 4);
    // A short proof lapses by itself.
    prove(&mut dp, node2(), ID_REMOTE, 200_000_000);
    assert_eq!(dp.run(TO, &syn(REMOTE, 1007, AUTH_PORT)), TC_PASS);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(dp.run(TO, &syn(REMOTE, 1008, AUTH_PORT)), TC_DROP);
}

#[test]
fn an_unknown_node_is_never_proven_and_local_peers_are_proven_by_this_node() {
    let mut dp = dp("auth-local");
    // The remote endpoint's node unknown (0): not even a proof under node 0 counts.
    let ip: std::net::IpAddr = REMOTE.parse().unwrap();
    dp.maps
        .endpoints
        .insert(EndpointKey { addr: to_key(ip) }, EndpointValue { identity: ID_REMOTE, flags: 0, ifindex: 0, cgroup: AUTH_NODE_UNKNOWN }, 0)
        .unwrap();
    prove(&mut dp, AUTH_NODE_UNKNOWN, ID_REMOTE, 60_000_000_000);
    assert_eq!(dp.run(TO, &syn(REMOTE, 2000, AUTH_PORT)), TC_DROP);
    // A local peer: the node's own proof of its identity.
    assert_eq!(dp.run(TO, &syn(LOCAL_PEER, 2001, AUTH_PORT)), TC_DROP);
    prove(&mut dp, AUTH_NODE_SELF, ID_LOCAL_PEER, 60_000_000_000);
    assert_eq!(dp.run(TO, &syn(LOCAL_PEER, 2002, AUTH_PORT)), TC_PASS);
    // Egress: the destination must be proven.
    flagged(&mut dp, pk(ID_POD, ID_LOCAL_PEER, DIR_EGRESS, TCP, AUTH_PORT), POLICY_FLAG_AUTH_REQUIRED, 5);
    let mut h = l4(TCP, 2003, AUTH_PORT);
    h[13] = TCP_SYN;
    assert_eq!(dp.run(FROM, &ipv4_frag(POD, LOCAL_PEER, TCP, &h, 1, 0)), TC_PASS);
    dp.maps.auth_proofs.remove(&AuthProofKey { node: AUTH_NODE_SELF, identity: ID_LOCAL_PEER }).unwrap();
    h[0..2].copy_from_slice(&2004u16.to_be_bytes());
    assert_eq!(dp.run(FROM, &ipv4_frag(POD, LOCAL_PEER, TCP, &h, 1, 0)), TC_DROP);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropAuthRequired), 1);
}

#[test]
fn a_withdrawn_proof_revokes_live_flows_on_the_epoch_bump_and_established_flows_need_no_lookup() {
    let mut dp = dp("auth-revoke");
    prove(&mut dp, node2(), ID_REMOTE, 60_000_000_000);
    let seg = |sport: u16, flags: u8, reply: bool| {
        let mut h = l4(TCP, if reply { AUTH_PORT } else { sport }, if reply { sport } else { AUTH_PORT });
        h[13] = flags;
        if reply {
            ipv4_frag(POD, REMOTE, TCP, &h, 1, 0)
        } else {
            ipv4_frag(REMOTE, POD, TCP, &h, 1, 0)
        }
    };
    assert_eq!(dp.run(TO, &seg(3000, TCP_SYN, false)), TC_PASS);
    assert_eq!(dp.run(FROM, &seg(3000, TCP_SYN | TCP_ACK, true)), TC_PASS);
    assert_eq!(dp.run(TO, &seg(3000, TCP_ACK, false)), TC_PASS);
    // Withdrawn without an epoch bump: the tracked flow goes on (no per-packet lookup).
    dp.maps.auth_proofs.remove(&AuthProofKey { node: node2(), identity: ID_REMOTE }).unwrap();
    assert_eq!(dp.run(TO, &seg(3000, TCP_ACK, false)), TC_PASS);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowEstablished), 2);
    // The agent bumps the epoch: judged again, revoked.
    let mut c = config();
    c.policy_epoch += 1;
    dp.set_config(c);
    assert_eq!(dp.run(TO, &seg(3000, TCP_ACK, false)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropRevoked), 1);
    // A flow re-verified with its proof in place keeps going, still marked proven.
    prove(&mut dp, node2(), ID_REMOTE, 60_000_000_000);
    assert_eq!(dp.run(TO, &seg(3001, TCP_SYN, false)), TC_PASS);
    c.policy_epoch += 1;
    dp.set_config(c);
    assert_eq!(dp.run(TO, &seg(3001, TCP_ACK, false)), TC_PASS);
    assert_eq!(ct_state(&dp, REMOTE, 3001, AUTH_PORT).map(|s| s & CT_PROVEN), Some(CT_PROVEN));
}

/// `cargo test -p zt-agent --test kernel_auth verifier -- --nocapture`
#[test]
fn verifier_processed_instructions() {
    let dp = dp("auth-verifier");
    for name in ["zt_from_pod", "zt_to_pod", "zt_cgroup_egress", "zt_cgroup_ingress"] {
        let info = dp.ebpf(&[name]).program(name).unwrap().info().unwrap();
        println!("verifier: {name}: processed {} insns", info.verified_instruction_count().unwrap_or(0));
    }
}

/// `ztctl explain` re-derives the kernel's decision: the same verdict and reason as the
/// programs for each case (no proof, proof, expired, another node's proof, plain rule,
/// a plain any-peer allow beside a flagged one).
#[test]
fn explain_agrees_with_the_kernel() {
    let mut dp = dp("auth-explain");
    let snap = zt_agent::events::Snapshot::default();
    let mut sport = 4000;
    let mut case = |dp: &mut Dp, port: u16, setup: &dyn Fn(&mut Dp), want: (u32, &str)| {
        setup(dp);
        sport += 1;
        let before: Vec<u64> = dp.maps.counters().unwrap();
        let verdict = dp.run(TO, &syn(REMOTE, sport, port));
        let after: Vec<u64> = dp.maps.counters().unwrap();
        let reason = Reason::ALL
            .into_iter()
            .find(|r| after[counter_index(DIR_INGRESS, *r as u8) as usize] > before[counter_index(DIR_INGRESS, *r as u8) as usize])
            .unwrap();
        let e = zt_agent::ctl::explain::explain(&dp.maps, &snap, REMOTE, POD, &format!("tcp/{port}")).unwrap();
        assert_eq!(e.checks.len(), 1, "{e:?}");
        let c = &e.checks[0];
        assert_eq!((verdict, reason.name()), want, "kernel, port {port}");
        assert_eq!(c.reason, reason.name(), "explain vs kernel, port {port}: {:?}", c.trace);
        assert_eq!(c.verdict == "allow", verdict == TC_PASS, "{c:?}");
    };
    let none = |_: &mut Dp| {};
    case(&mut dp, AUTH_PORT, &none, (TC_DROP, "auth-required"));
    case(&mut dp, PLAIN_PORT, &none, (TC_PASS, "policy"));
    case(&mut dp, MIXED_PORT, &none, (TC_PASS, "policy"));
    case(&mut dp, AUTH_PORT, &|dp| prove(dp, auth_node_id(b"node3"), ID_REMOTE, 60_000_000_000), (TC_DROP, "auth-required"));
    case(&mut dp, AUTH_PORT, &|dp| prove(dp, node2(), ID_REMOTE, 60_000_000_000), (TC_PASS, "authenticated"));
    case(&mut dp, AUTH_PORT, &|dp| prove(dp, node2(), ID_REMOTE, -1_000_000_000), (TC_DROP, "auth-required"));
}
