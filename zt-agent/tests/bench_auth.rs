//! `cargo xtask bench` (issue 10): what `authentication: required` costs in the datapath,
//! through BPF_PROG_TEST_RUN on the real programs.
//! - New flow: the same allowed SYN from a pod of node2 through the same policy entry,
//!   once plain and once with POLICY_FLAG_AUTH_REQUIRED and node2's proof of the peer in
//!   ZT_AUTH_PROOFS (the one extra lookup), and once flagged without a proof (dropped as
//!   `auth-required`). Single runs (one per BPF_PROG_TEST_RUN, source port bumped each
//!   run so that each is a new flow with its conntrack insert), rounds interleaved, the
//!   conntrack maps emptied before each round; ratio flagged / plain.
//! - Established: the ACK of a flow admitted as proven (CT_PROVEN in its entry) against
//!   the ACK of a flow admitted by a plain entry (repeat mode and single runs).
//!
//! Prints a table; no timed assertions (the verdicts and counters are asserted).
//! `cargo test --release -p zt-agent --test bench_auth -- --nocapture` (root).
mod common;

use common::*;
use zt_agent::{auth::boottime_ns, net::to_key};
use zt_common::*;

const POD: &str = "10.0.0.10";
const REMOTE: &str = "10.0.1.20";
const ID_POD: u32 = 300;
const ID_REMOTE: u32 = 302;
const TO: &str = "zt_to_pod";
const FROM: &str = "zt_from_pod";
/// The port of the entry the new-flow rounds flip between plain and flagged.
const PORT: u16 = 80;
/// Established flows: one on a flagged entry (proven), one on a plain entry.
const PROVEN_PORT: u16 = 81;
const PLAIN_PORT: u16 = 82;
/// New flows per round (distinct source ports; the conntrack maps are emptied between rounds).
const SINGLE: u32 = 10_000;
const ROUNDS: usize = 7;
const REPEAT: u32 = 200_000;

fn node2() -> u32 {
    auth_node_id(b"node2")
}

fn entry(dp: &mut Dp, port: u16, flags: u8, rule: u32) {
    use aya::maps::lpm_trie::Key;
    let k = pk(ID_POD, ID_REMOTE, DIR_INGRESS, TCP, port);
    dp.maps.policy.insert(&Key::new(POLICY_PREFIX_FULL, k), PolicyValue { verdict: VERDICT_ALLOW, flags, _pad: [0; 2], rule_id: rule }, 0).unwrap();
}

fn prove(dp: &mut Dp) {
    let expires_ns = boottime_ns() + 3_600_000_000_000;
    dp.maps.auth_proofs.insert(AuthProofKey { node: node2(), identity: ID_REMOTE }, AuthProofValue { expires_ns }, 0).unwrap();
}

fn unprove(dp: &mut Dp) {
    let _ = dp.maps.auth_proofs.remove(&AuthProofKey { node: node2(), identity: ID_REMOTE });
}

fn seg(sport: u16, dport: u16, flags: u8, reply: bool) -> Vec<u8> {
    let mut h = l4(TCP, if reply { dport } else { sport }, if reply { sport } else { dport });
    h[13] = flags;
    if reply {
        ipv4_frag(POD, REMOTE, TCP, &h, 1, 0)
    } else {
        ipv4_frag(REMOTE, POD, TCP, &h, 1, 0)
    }
}

fn clear_ct(dp: &mut Dp) {
    for m in [&mut dp.maps.ct, &mut dp.maps.ct_est] {
        let keys: Vec<CtKey> = m.keys().map(|k| k.unwrap()).collect();
        for k in keys {
            let _ = m.remove(&k);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Plain,
    Proven,
    Unproven,
}

/// One round: SINGLE new SYNs from REMOTE to POD:PORT, each a single run; mean ns.
fn round(dp: &mut Dp, v: Variant) -> f64 {
    match v {
        Variant::Plain => entry(dp, PORT, 0, 1),
        Variant::Proven | Variant::Unproven => entry(dp, PORT, POLICY_FLAG_AUTH_REQUIRED, 1),
    }
    if v == Variant::Unproven {
        unprove(dp);
    } else {
        prove(dp);
    }
    clear_ct(dp);
    let (reason, want) = match v {
        Variant::Plain => (Reason::AllowPolicy, TC_PASS),
        Variant::Proven => (Reason::AllowAuthenticated, TC_PASS),
        Variant::Unproven => (Reason::DropAuthRequired, TC_DROP),
    };
    let before = dp.counter(DIR_INGRESS, reason);
    let mut sum = 0.0;
    for i in 0..SINGLE {
        let (r, ns) = dp.run_n(TO, &seg(1024 + i as u16, PORT, TCP_SYN, false), 1);
        assert_eq!(r, want);
        sum += ns;
    }
    assert_eq!(dp.counter(DIR_INGRESS, reason) - before, SINGLE as u64, "every run was a new flow counted {reason:?}");
    sum / SINGLE as f64
}

fn noop_round(dp: &Dp) -> f64 {
    let pkt = seg(1024, PORT, TCP_SYN, false);
    (0..SINGLE).map(|_| dp.run_n("zt_noop", &pkt, 1).1).sum::<f64>() / SINGLE as f64
}

fn main() {
    let mut dp = Dp::new("bench-auth");
    dp.local_pod(POD, ID_POD);
    let ip: std::net::IpAddr = REMOTE.parse().unwrap();
    // A pod of node2: its endpoint carries node2's number.
    dp.maps.endpoints.insert(EndpointKey { addr: to_key(ip) }, EndpointValue { identity: ID_REMOTE, flags: 0, ifindex: 0, cgroup: node2() }, 0).unwrap();
    // Events off the measured path: rate limit to zero (counted, not sent).
    dp.set_config(Config { events_per_sec: 0, events_burst: 0, ..config() });

    println!("authentication: required, new flow (BPF_PROG_TEST_RUN single runs: {SINGLE} new SYNs per round, {ROUNDS} rounds interleaved, median of the round means, ns)");
    let (mut noop, mut plain, mut proven, mut unproven) = (vec![], vec![], vec![], vec![]);
    for r in 0..ROUNDS {
        // Alternate the order so that neither variant always runs first.
        let order = if r % 2 == 0 { [Variant::Plain, Variant::Proven, Variant::Unproven] } else { [Variant::Unproven, Variant::Proven, Variant::Plain] };
        noop.push(noop_round(&dp));
        for v in order {
            let ns = round(&mut dp, v);
            match v {
                Variant::Plain => plain.push(ns),
                Variant::Proven => proven.push(ns),
                Variant::Unproven => unproven.push(ns),
            }
        }
    }
    let (noop, plain, proven, unproven) = (median(noop), median(plain), median(proven), median(unproven));
    println!("  {:<68} {:>8}  {:>11}  {:>10}", "", "ns", "/ plain", "/ noop");
    println!("  {:<68} {:>8.1}  {:>11}  {:>10.2}", "empty program (zt_noop), same SYN", noop, "", 1.0);
    println!("  {:<68} {:>8.1}  {:>11.2}  {:>10.2}", "new SYN, plain entry: allowed (policy)", plain, 1.0, plain / noop);
    println!(
        "  {:<68} {:>8.1}  {:>11.2}  {:>10.2}",
        "new SYN, same entry flagged, node2's proof: allowed (authenticated)",
        proven,
        proven / plain,
        proven / noop
    );
    println!(
        "  {:<68} {:>8.1}  {:>11.2}  {:>10.2}",
        "new SYN, same entry flagged, no proof: dropped (auth-required)",
        unproven,
        unproven / plain,
        unproven / noop
    );
    println!("  proof lookup on a new flow: {:+.1} ns ({:.2}x the plain new flow)", proven - plain, proven / plain);

    // Established: two flows, one admitted as proven (flagged entry, proof in place), one
    // by a plain entry; both through the handshake into ZT_CT_EST.
    clear_ct(&mut dp);
    prove(&mut dp);
    entry(&mut dp, PROVEN_PORT, POLICY_FLAG_AUTH_REQUIRED, 2);
    entry(&mut dp, PLAIN_PORT, 0, 3);
    for port in [PROVEN_PORT, PLAIN_PORT] {
        assert_eq!(dp.run(TO, &seg(40000, port, TCP_SYN, false)), TC_PASS, "SYN to {port}");
        assert_eq!(dp.run(FROM, &seg(40000, port, TCP_SYN | TCP_ACK, true)), TC_PASS, "SYN-ACK from {port}");
        assert_eq!(dp.run(TO, &seg(40000, port, TCP_ACK, false)), TC_PASS, "ACK to {port}");
    }
    let est: Vec<(CtKey, CtValue)> = dp.maps.ct_est.iter().map(|e| e.unwrap()).collect();
    assert_eq!(est.len(), 2, "both flows established");
    for (k, v) in &est {
        let want = if k.dport == PROVEN_PORT || k.sport == PROVEN_PORT { CT_PROVEN } else { 0 };
        assert_eq!(v.state & CT_PROVEN, want, "CT_PROVEN only on the flow admitted as proven: {k:?}");
    }
    let ack = |port| seg(40000, port, TCP_ACK, false);
    let est_before = dp.counter(DIR_INGRESS, Reason::AllowEstablished);
    let (mut rn, mut rproven, mut rplain, mut sproven, mut splain) = (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..ROUNDS {
        let ports = if r % 2 == 0 { [PROVEN_PORT, PLAIN_PORT] } else { [PLAIN_PORT, PROVEN_PORT] };
        rn.push(dp.run_n("zt_noop", &ack(PLAIN_PORT), REPEAT).1);
        for port in ports {
            let (v, ns) = dp.run_n(TO, &ack(port), REPEAT);
            assert_eq!(v, TC_PASS);
            let single = (0..SINGLE).map(|_| dp.run_n(TO, &ack(port), 1)).map(|(v, ns)| {
                assert_eq!(v, TC_PASS);
                ns
            });
            let single = single.sum::<f64>() / SINGLE as f64;
            if port == PROVEN_PORT {
                rproven.push(ns);
                sproven.push(single);
            } else {
                rplain.push(ns);
                splain.push(single);
            }
        }
    }
    let runs = ROUNDS as u64 * 2 * (REPEAT + SINGLE) as u64;
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowEstablished) - est_before, runs, "every run took the established path");
    let (rn, rproven, rplain, sproven, splain) = (median(rn), median(rproven), median(rplain), median(sproven), median(splain));
    println!("\nestablished ACK ({ROUNDS} rounds interleaved, median; repeat: {REPEAT} runs in one BPF_PROG_TEST_RUN; single: {SINGLE} single runs, ns)");
    println!("  {:<48} {:>8} {:>8}  {:>8} {:>8}", "", "repeat", "/ plain", "single", "/ plain");
    println!("  {:<48} {:>8.1} {:>8}  {:>8} {:>8}", "empty program (zt_noop)", rn, "", "", "");
    println!("  {:<48} {:>8.1} {:>8.2}  {:>8.1} {:>8.2}", "plain established flow", rplain, 1.0, splain, 1.0);
    println!(
        "  {:<48} {:>8.1} {:>8.2}  {:>8.1} {:>8.2}",
        "established flow admitted as proven (CT_PROVEN)",
        rproven,
        rproven / rplain,
        sproven,
        sproven / splain
    );
}
