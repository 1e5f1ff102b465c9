//! The cgroup skb programs (attached at the root of the pods' cgroup hierarchy) run
//! through BPF_PROG_TEST_RUN: the kernel strips the Ethernet header of the test frame,
//! so they see the IP header first, as at a real cgroup. Each test checks the verdict
//! (1 pass, 0 drop), the counters and the events / CT entries left. Needs root.
mod common;

use common::*;
use zt_common::*;

const EGRESS: &str = "zt_cgroup_egress";
const INGRESS: &str = "zt_cgroup_ingress";
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";
const PASS: u32 = 1;
const DROP: u32 = 0;

const NEW_POD: &str = "10.0.0.50";
const NEW_POD6: &str = "fd00::50";
const HOOKED: &str = "10.0.0.10";
const HOOKED6: &str = "fd00::10";
const PEER: &str = "10.0.0.20";
const PEER6: &str = "fd00::20";
const HOST: &str = "10.255.0.1";
const HOST6: &str = "fd00:255::1";
const ID_POD: u32 = 300;
const ID_PEER: u32 = 301;

/// Maps of a node: a hooked local pod (its interface `hooked_if`), a remote peer and the
/// node's own addresses.
fn node(tag: &str, hooked_if: u32) -> Dp {
    let mut dp = Dp::new(tag);
    dp.endpoint(HOOKED, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, hooked_if);
    dp.endpoint(PEER, ID_PEER, 0, 0);
    dp.endpoint(PEER6, ID_PEER, 0, 0);
    dp.endpoint(HOST, IDENTITY_HOST, 0, 0);
    dp.endpoint(HOST6, IDENTITY_HOST, 0, 0);
    dp
}

#[test]
fn loopback_passes_uncounted() {
    let mut dp = node("cg-lo", 7);
    // Unknown addresses both ways: on any other device this would be `initialising`.
    assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 1000, 80), None), PASS);
    assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, NEW_POD, TCP, 1000, 80), None), PASS);
    assert_eq!(dp.counted(), 0);
    assert!(dp.events().is_empty());
}

#[test]
fn hooked_endpoint_and_host_pass_uncounted_and_unknown_fails_closed() {
    in_private_netns(|dev, _| {
        let mut dp = node("cg-defer", 7);
        // The hooked pod's TC programs judge its traffic: the cgroup programs stay out,
        // even for a flow its policy denies.
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), Some(dev)), PASS);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1000, 80), Some(dev)), PASS);
        // Host-network pods: the node's addresses, both ways and both families.
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOST, PEER, UDP, 1000, 53), Some(dev)), PASS);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOST, TCP, 1000, 22), Some(dev)), PASS);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv6(HOST6, PEER6, UDP, 1000, 53), Some(dev)), PASS);
        // Non-IP passes.
        assert_eq!(dp.run_cgroup(EGRESS, &eth(0x0806, &[0u8; 28]), Some(dev)), PASS);
        assert_eq!(dp.counted(), 0, "nothing judged here");
        assert!(dp.events().is_empty());
        // The same device, an address the agent does not know: initialising, dropped.
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 1000, 80), Some(dev)), DROP);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, NEW_POD, TCP, 1000, 80), Some(dev)), DROP);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv6(NEW_POD6, PEER6, UDP, 1000, 53), Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropInitialising), 2);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropInitialising), 1);
        let ev = dp.events();
        assert_eq!(ev.len(), 3);
        for e in &ev {
            assert_eq!((e.reason, e.verdict, e.local_id, e.peer_id), (Reason::DropInitialising as u8, VERDICT_DENY, IDENTITY_INIT, ID_PEER));
            assert_eq!(e.ifindex, CGROUP_HOOK_IFINDEX);
        }
        assert_eq!(dp.ct_len(), 0);
    });
}

#[test]
fn known_unhooked_pod_is_judged_by_its_policy() {
    in_private_netns(|dev, _| {
        let mut dp = node("cg-known", 7);
        // Known to the agent, interface not hooked yet: ifindex 0.
        dp.endpoint(NEW_POD, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, 0);
        dp.policy(POLICY_PREFIX_FULL, pk(ID_POD, ID_PEER, DIR_EGRESS, TCP, 443), VERDICT_ALLOW, 9);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 40000, 443), Some(dev)), PASS);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowPolicy), 1);
        // Its reply comes back through conntrack under hook 0.
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, NEW_POD, TCP, 443, 40000), Some(dev)), PASS);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowReply), 1);
        let ct: Vec<CtKey> = dp.maps.ct.keys().map(|k| k.unwrap()).collect();
        assert_eq!(ct.len(), 1);
        // Tracked per socket cgroup (BPF_PROG_TEST_RUN's socket is in this process's cgroup).
        assert_eq!((ct[0].ifindex, ct[0].dir), (cgroup_scope(own_cgroup_id()), DIR_EGRESS));
        // Another port: default deny (its policy, not `initialising`).
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 40001, 80), Some(dev)), DROP);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, NEW_POD, TCP, 40002, 80), Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropPolicyDefault), 1);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropPolicyDefault), 1);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropInitialising), 0);
        let ev = dp.events();
        assert_eq!((ev[0].local_id, ev[0].rule_id), (ID_POD, 0));
        // An `init` entry (an address the agent cannot attribute) is initialising here.
        dp.endpoint(NEW_POD, IDENTITY_INIT, EP_LOCAL, 0);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 40003, 443), Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropInitialising), 1);
        // A remote endpoint's address seen from a local socket is not that pod.
        dp.endpoint(NEW_POD, ID_PEER, 0, 0);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 40004, 443), Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropInitialising), 2);
    });
}

#[test]
fn host_probe_reaches_an_initialising_pod_and_its_reply_passes() {
    for (pod, host, peer, tag) in [(NEW_POD, HOST, PEER, "cg-probe4"), (NEW_POD6, HOST6, PEER6, "cg-probe6")] {
        in_private_netns(|dev, _| {
            let mut dp = node(tag, 7);
            let pkt = |s: &str, d: &str, sp: u16, dpt: u16| if pod.contains(':') { ipv6(s, d, TCP, sp, dpt) } else { ipv4(s, d, TCP, sp, dpt) };
            assert_eq!(dp.run_cgroup(INGRESS, &pkt(host, pod, 50000, 8080), Some(dev)), PASS, "{tag}");
            assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHost), 1, "{tag}");
            assert_eq!(dp.run_cgroup(EGRESS, &pkt(pod, host, 8080, 50000), Some(dev)), PASS, "{tag}");
            assert_eq!(dp.counter(DIR_EGRESS, Reason::AllowReply), 1, "{tag}");
            // The pod opening a flow to the host is not a reply: initialising.
            assert_eq!(dp.run_cgroup(EGRESS, &pkt(pod, host, 8081, 50001), Some(dev)), DROP, "{tag}");
            // Any other peer: initialising.
            assert_eq!(dp.run_cgroup(INGRESS, &pkt(peer, pod, 50002, 8080), Some(dev)), DROP, "{tag}");
            assert_eq!(dp.counter(DIR_EGRESS, Reason::DropInitialising), 1, "{tag}");
            assert_eq!(dp.counter(DIR_INGRESS, Reason::DropInitialising), 1, "{tag}");
            // Host probes turned off: the host is refused like anyone else.
            dp.set_config(Config { flags: CONFIG_READY, policy_epoch: 2, ..config() });
            assert_eq!(dp.run_cgroup(INGRESS, &pkt(host, pod, 50003, 8080), Some(dev)), DROP, "{tag}");
            // ... and the tracked probe is re-judged under the new epoch and revoked.
            assert_eq!(dp.run_cgroup(EGRESS, &pkt(pod, host, 8080, 50000), Some(dev)), DROP, "{tag}");
            assert_eq!(dp.counter(DIR_EGRESS, Reason::DropRevoked), 1, "{tag}");
            assert_eq!(dp.counter(DIR_INGRESS, Reason::DropInitialising), 2, "{tag}");
        });
    }
}

#[test]
fn tc_hooks_keep_failing_closed_without_host_exception() {
    let mut dp = node("cg-tc", 7);
    // Unknown local address at a TC hook, probed from the host: unknown-endpoint, dropped.
    assert_eq!(dp.run(TO, &ipv4(HOST, NEW_POD, TCP, 50000, 8080)), TC_DROP);
    assert_eq!(dp.run(FROM, &ipv4(NEW_POD, HOST, TCP, 8080, 50000)), TC_DROP);
    // A pod known but judged at hook 0 is no endpoint of a real interface.
    dp.endpoint(NEW_POD, ID_POD, EP_LOCAL, 0);
    assert_eq!(dp.run(FROM, &ipv4(NEW_POD, PEER, TCP, 1000, 80)), TC_DROP);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::DropUnknownEndpoint), 1);
    assert_eq!(dp.counter(DIR_EGRESS, Reason::DropUnknownEndpoint), 2);
    assert_eq!(dp.counter(DIR_INGRESS, Reason::AllowHost), 0);
}

#[test]
fn not_ready_drops_what_the_cgroup_programs_judge() {
    in_private_netns(|dev, _| {
        let mut dp = node("cg-notready", 7);
        dp.set_config(Config { flags: 0, ..config() });
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 1000, 80), Some(dev)), DROP);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(HOST, NEW_POD, TCP, 1000, 80), Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropNotReady), 1);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropNotReady), 1);
        // A hooked pod is its TC hook's business (which drops not-ready itself); loopback passes.
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), Some(dev)), PASS);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(NEW_POD, PEER, TCP, 1000, 80), None), PASS);
        assert_eq!(dp.counted(), 2);
    });
}

#[test]
fn malformed_ip_is_dropped_not_waved_through() {
    in_private_netns(|dev, _| {
        let mut dp = node("cg-malformed", 7);
        let mut p = ipv4(NEW_POD, PEER, TCP, 1000, 80);
        p[14] = 0x44; // IHL 4
        assert_eq!(dp.run_cgroup(EGRESS, &p, Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropMalformed), 1);
        // A hooked pod's address in a header that is not a well-formed one is no one's:
        // judged here (malformed), not left to the pod's hook on its word.
        let mut bad = vec![];
        for (at, byte) in [(14, 0x44), (14, 0x65)] {
            let mut p = ipv4(HOOKED, PEER, TCP, 1000, 80);
            p[at] = byte; // IHL 4; version 6
            bad.push(p);
        }
        let mut long = ipv4(HOOKED, PEER, TCP, 1000, 80);
        let claimed = u16::from_be_bytes([long[16], long[17]]) + 100;
        long[16..18].copy_from_slice(&claimed.to_be_bytes());
        bad.push(long);
        for p in &bad {
            assert_eq!(dp.run_cgroup(EGRESS, p, Some(dev)), DROP, "{:02x?}", &p[14..34]);
        }
        let mut long6 = ipv6(PEER6, HOST6, TCP, 1000, 80);
        long6[18] = 0x10; // payload length 4096 + ...
        dp.endpoint(PEER6, ID_POD, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, 7);
        assert_eq!(dp.run_cgroup(EGRESS, &long6, Some(dev)), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropMalformed), 5);
        // A whole IP header, whatever follows (here a TCP header cut short): the pod's
        // hook judges it.
        let mut cut = ipv4(HOOKED, PEER, TCP, 1000, 80)[..44].to_vec();
        cut[16..18].copy_from_slice(&0u16.to_be_bytes());
        assert_eq!(dp.run_cgroup(EGRESS, &cut, Some(dev)), PASS);
        // Well-formed, the same pod's packets are its hook's.
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), Some(dev)), PASS);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv6(PEER6, HOST6, TCP, 1000, 80), Some(dev)), PASS);
        assert_eq!(dp.counted(), 5);
    });
}

/// A hooked pod's endpoint names its pod cgroup: only sockets in that cgroup are left to
/// its TC hook. A socket elsewhere with its address (a raw socket forging it, a new pod
/// that got the address of a pod deleted while the agent was down) is dropped here.
#[test]
fn a_hooked_address_is_left_to_its_hook_only_for_its_own_pods_sockets() {
    let mut dp = node("cg-owner", 7);
    let own = cgroup_scope(own_cgroup_id());
    let set = |dp: &mut Dp, cgroup: u32| hooked_endpoint(dp, HOOKED, cgroup);
    in_private_netns(|dev, _| {
        let dev = Some(dev);
        // The pod's own cgroup (this test's): its TC hook judges it, nothing counted here.
        set(&mut dp, own);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), dev), PASS);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1000, 80), dev), PASS);
        assert_eq!(dp.counted(), 0);
        // Another pod's cgroup: this socket is not that pod's, dropped here as a socket
        // claiming another pod's address.
        set(&mut dp, own ^ 0x5a5a);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1001, 80), dev), DROP);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1001, 80), dev), DROP);
        assert_eq!(dp.counter(DIR_EGRESS, Reason::DropSpoofedSource) + dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 2);
        let ev = dp.events();
        assert!(ev.len() == 2 && ev.iter().all(|e| e.reason == Reason::DropSpoofedSource as u8 && e.ifindex == CGROUP_HOOK_IFINDEX), "{ev:?}");
        // Not known (an agent that could not find the pod's cgroup): left to the hook.
        set(&mut dp, 0);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1002, 80), dev), PASS);
        assert_eq!(dp.counted(), 2);
    });
}

/// A hooked pod's address in its `ZT_LOCAL_OWNERS` slot is decided from the slot, without
/// the endpoint map (which the agent keeps saying the same; here it says otherwise, to
/// show which one decided). The cgroup level found is recorded in the slot and tried
/// first; a wrong level falls back to the walk. An empty slot, or one holding another
/// address, leaves the packet to the endpoint map.
#[test]
fn a_hooked_pods_owner_slot_decides_before_the_endpoint_map() {
    let mut dp = node("cg-slot", 7);
    let own = cgroup_scope(own_cgroup_id());
    let addr = zt_agent::net::to_key(HOOKED.parse().unwrap());
    let slot = local_owner_slot(&addr);
    let endpoint = |dp: &mut Dp, cgroup: u32| hooked_endpoint(dp, HOOKED, cgroup);
    let set_slot = |dp: &mut Dp, v: LocalOwner| dp.maps.local_owners.map.set(slot, v, 0).unwrap();
    let hint = |dp: &Dp| dp.maps.local_owners.map.get(&slot, 0).unwrap().level_hint;
    in_private_netns(|dev, _| {
        let dev = Some(dev);
        // The endpoint map alone would drop this socket as another pod's; the slot says
        // the socket's cgroup is the pod's.
        endpoint(&mut dp, own ^ 0x5a5a);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), dev), DROP, "the endpoint map decides without a slot");
        set_slot(&mut dp, LocalOwner::of(addr, own));
        assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), dev), PASS);
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1000, 80), dev), PASS);
        // This test's socket is in the cgroup the test runs in: its level, plus one.
        let level = hint(&dp);
        assert_eq!(level, 1 + own_cgroup_level(), "the level found is recorded");
        // A wrong level (past the socket's cgroup), or one beyond the walk: the walk decides
        // and records the level again.
        for wrong in [level + 2, 100] {
            set_slot(&mut dp, LocalOwner { level_hint: wrong, ..LocalOwner::of(addr, own) });
            assert_eq!(dp.run_cgroup(EGRESS, &ipv4(HOOKED, PEER, TCP, 1000, 80), dev), PASS, "hint {wrong}");
            assert_eq!(hint(&dp), level);
        }
        assert_eq!(dp.counted(), 1, "only the first packet, judged by the endpoint map");
        // The slot names another cgroup: dropped as a socket claiming another pod's address,
        // whatever the endpoint map says; also with the level the socket's cgroup is at as
        // the hint (a slot rewritten for another pod keeps the kernel's last hint).
        endpoint(&mut dp, own);
        set_slot(&mut dp, LocalOwner::of(addr, own ^ 0x5a5a));
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1001, 80), dev), DROP);
        set_slot(&mut dp, LocalOwner { level_hint: level, ..LocalOwner::of(addr, own ^ 0x5a5a) });
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1001, 80), dev), DROP);
        assert_eq!(dp.counter(DIR_INGRESS, Reason::DropSpoofedSource), 2);
        // Another address on the same slot, and an empty slot: the endpoint map decides.
        let other = zt_agent::net::to_key("10.1.0.10".parse().unwrap());
        assert_eq!(local_owner_slot(&other), slot);
        set_slot(&mut dp, LocalOwner::of(other, own ^ 0x5a5a));
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1002, 80), dev), PASS);
        set_slot(&mut dp, LocalOwner { scope: 0, ..LocalOwner::of(addr, own ^ 0x5a5a) });
        assert_eq!(dp.run_cgroup(INGRESS, &ipv4(PEER, HOOKED, TCP, 1003, 80), dev), PASS);
        assert_eq!(dp.counted(), 3);
        // IPv6: the upper half of the slots.
        let addr6 = zt_agent::net::to_key(HOOKED6.parse().unwrap());
        hooked_endpoint(&mut dp, HOOKED6, own ^ 0x5a5a);
        assert!(local_owner_slot(&addr6) >= LOCAL_OWNER_SLOTS / 2);
        assert_eq!(dp.run_cgroup(EGRESS, &ipv6(HOOKED6, PEER6, TCP, 1000, 80), dev), DROP, "the endpoint map decides without a slot");
        dp.maps.local_owners.map.set(local_owner_slot(&addr6), LocalOwner::of(addr6, own), 0).unwrap();
        assert_eq!(dp.run_cgroup(EGRESS, &ipv6(HOOKED6, PEER6, TCP, 1000, 80), dev), PASS);
        assert_eq!(dp.counted(), 4);
    });
}

/// `ip` as the hooked pod's endpoint (interface 7), its pod cgroup `cgroup`.
fn hooked_endpoint(dp: &mut Dp, ip: &str, cgroup: u32) {
    let v = EndpointValue { identity: ID_POD, flags: EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, ifindex: 7, cgroup };
    dp.maps.endpoints.insert(EndpointKey { addr: zt_agent::net::to_key(ip.parse().unwrap()) }, v, 0).unwrap();
}

/// The level of this process's cgroup in the v2 hierarchy (its root is level 0).
fn own_cgroup_level() -> u32 {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 membership").trim().to_string();
    path.split('/').filter(|c| !c.is_empty()).count() as u32
}
