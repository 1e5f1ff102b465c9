//! The agent's map writer against real pinned maps: diffs, not refills; map-full is an
//! error before anything is written; what a restarted agent reads back is what was written.
mod common;

use common::*;
use zt_agent::{
    loader::MapSizes,
    net::to_key,
    sync::{apply, fit, withdraws, Capacities, Contents},
};
use zt_common::*;

fn want(n_policy: u16) -> Contents {
    let mut c = Contents::default();
    c.endpoints.insert(to_key("10.0.0.1".parse().unwrap()), EndpointValue { identity: 300, flags: EP_LOCAL, ifindex: 1, cgroup: 0 });
    c.endpoints.insert(to_key("fd00::2".parse().unwrap()), EndpointValue { identity: 301, flags: 0, ifindex: 0, cgroup: 0 });
    c.cidrs.insert((96 + 24, to_key("192.0.2.0".parse().unwrap())), CidrValue { identity: IDENTITY_CIDR_FLAG | 1 });
    for p in 0..n_policy {
        c.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(300, 301, DIR_INGRESS, 6, 1000 + p)), PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: 1 });
    }
    c
}

fn caps(s: &MapSizes) -> Capacities {
    Capacities { endpoints: s.endpoints, cidrs: s.cidrs, policy: s.policy, fqdn_names: s.fqdn_names, fqdn_ports: s.fqdn_ports, dns_servers: DNS_SERVERS_MAX }
}

#[test]
fn diff_apply_then_noop_then_withdraw() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("sync-diff", &s);
    let mut have = Contents::default();
    let st = apply(&mut dp.maps, &mut have, &want(10), &caps(&s)).unwrap();
    // New endpoints count as a withdrawal: an address may now resolve to another identity.
    assert_eq!((st.written, st.removed, st.withdrew), (13, 0, true));
    assert_eq!(Contents::read(&dp.maps).unwrap(), want(10), "maps hold exactly the desired state");
    let st = apply(&mut dp.maps, &mut have, &want(10), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed), (0, 0), "unchanged state writes nothing");
    // Additions only: no withdrawal, no epoch bump needed.
    let st = apply(&mut dp.maps, &mut have, &want(12), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (2, 0, false));
    // A removal is a withdrawal.
    let st = apply(&mut dp.maps, &mut have, &want(5), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (0, 7, true));
    // A changed value is a withdrawal too (allow -> deny).
    let mut w = want(5);
    w.policy.values_mut().next().unwrap().verdict = VERDICT_DENY;
    let st = apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (1, 0, true));
    assert_eq!(Contents::read(&dp.maps).unwrap(), w);
}

#[test]
fn map_full_is_refused_before_any_write() {
    let s = MapSizes { policy: 8, ..MapSizes::default() };
    let mut dp = Dp::with_sizes("sync-full", &s);
    let mut have = Contents::default();
    apply(&mut dp.maps, &mut have, &want(4), &caps(&s)).unwrap();
    let before = Contents::read(&dp.maps).unwrap();
    let err = apply(&mut dp.maps, &mut have, &want(9), &caps(&s)).unwrap_err().to_string();
    assert!(err.contains("ZT_POLICY full") && err.contains("9") && err.contains("8"), "{err}");
    assert_eq!(Contents::read(&dp.maps).unwrap(), before, "nothing half-applied");
    assert_eq!(have, before);
}

#[test]
fn a_restarted_writer_reads_back_the_state_and_writes_nothing() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("sync-restart", &s);
    let mut have = Contents::default();
    apply(&mut dp.maps, &mut have, &want(20), &caps(&s)).unwrap();
    // A new process would start from the pinned maps.
    let mut reread = Contents::read(&dp.maps).unwrap();
    let st = apply(&mut dp.maps, &mut reread, &want(20), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed), (0, 0));
}

#[test]
fn new_denies_endpoints_and_cidrs_withdraw() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("sync-withdraw", &s);
    let mut have = Contents::default();
    apply(&mut dp.maps, &mut have, &want(2), &caps(&s)).unwrap();
    let mut w = want(2);
    w.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(300, 301, DIR_INGRESS, 6, 22)), PolicyValue { verdict: VERDICT_DENY, flags: 0, _pad: [0; 2], rule_id: 2 });
    assert!(withdraws(&have, &w), "a new deny may cover what an allow admitted");
    let mut w = want(2);
    w.endpoints.insert(to_key("192.0.2.7".parse().unwrap()), EndpointValue { identity: 305, flags: 0, ifindex: 0, cgroup: 0 });
    assert!(withdraws(&have, &w), "an address that resolved to a CIDR now resolves to a pod");
    let mut w = want(2);
    w.cidrs.insert((96 + 28, to_key("192.0.2.0".parse().unwrap())), CidrValue { identity: IDENTITY_CIDR_FLAG | 2 });
    assert!(withdraws(&have, &w));
    assert!(!withdraws(&have, &want(3)), "a new allow takes nothing away");
}

#[test]
fn short_ipv6_prefixes_never_cover_ipv4() {
    use std::collections::BTreeMap;
    use zt_agent::state::{Cidr, Desired};
    let mut d = Desired::default();
    d.cidrs.insert(Cidr { addr: "::".parse().unwrap(), prefix: 0 }, IDENTITY_CIDR_FLAG | 1);
    let c = Contents::from_desired(&d, &BTreeMap::new());
    assert_eq!(c.cidrs.get(&(96, to_key("0.0.0.0".parse().unwrap()))), Some(&CidrValue { identity: IDENTITY_WORLD }));
    // With an IPv4 /0 rule, that rule owns the block.
    d.cidrs.insert(Cidr { addr: "0.0.0.0".parse().unwrap(), prefix: 0 }, IDENTITY_CIDR_FLAG | 2);
    let c = Contents::from_desired(&d, &BTreeMap::new());
    assert_eq!(c.cidrs.get(&(96, to_key("0.0.0.0".parse().unwrap()))), Some(&CidrValue { identity: IDENTITY_CIDR_FLAG | 2 }));
}

/// `n` allow entries of local identity `local` (from peer 301).
fn entries_of(c: &mut Contents, local: u32, n: u16) {
    for p in 0..n {
        c.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(local, 301, DIR_INGRESS, 6, 2000 + p)), PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: 1 });
    }
}

#[test]
fn a_full_policy_map_leaves_out_whole_identities_and_applies_the_rest() {
    let s = MapSizes { policy: 8, ..MapSizes::default() };
    let mut dp = Dp::with_sizes("sync-fit", &s);
    let mut have = Contents::default();
    // 300 is enforced with 4 entries.
    let mut w = want(4);
    apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
    // A new local identity 302 (its pod at 10.0.0.5) needs 6 more: 10 > 8.
    w.endpoints.insert(to_key("10.0.0.5".parse().unwrap()), EndpointValue { identity: 302, flags: EP_LOCAL, ifindex: 2, cgroup: 0 });
    entries_of(&mut w, 302, 6);
    let overflow = fit(&have, &mut w, &caps(&s));
    assert_eq!(overflow.len(), 1, "{overflow:?}");
    assert_eq!((overflow[0].map, overflow[0].needed, overflow[0].capacity), (MAP_POLICY, 10, 8));
    assert_eq!(overflow[0].identities, [302].into(), "the identity already enforced keeps its entries");
    let st = apply(&mut dp.maps, &mut have, &w, &caps(&s)).expect("the rest is applied");
    assert!(st.written > 0);
    let maps = Contents::read(&dp.maps).unwrap();
    assert_eq!(maps.policy.keys().filter(|(_, k)| k.local_id() == 300).count(), 4, "300 keeps working");
    assert!(maps.policy.keys().all(|(_, k)| k.local_id() != 302), "302 has no entry: default deny");
    let ep = maps.endpoints[&to_key("10.0.0.5".parse().unwrap())];
    assert_eq!((ep.identity, ep.flags), (302, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS), "302 is isolated both ways");
    // Room again (300 leaves): 302 goes in whole.
    let mut w2 = Contents::default();
    w2.endpoints.insert(to_key("10.0.0.5".parse().unwrap()), EndpointValue { identity: 302, flags: EP_LOCAL, ifindex: 2, cgroup: 0 });
    entries_of(&mut w2, 302, 6);
    assert!(fit(&have, &mut w2, &caps(&s)).is_empty());
    apply(&mut dp.maps, &mut have, &w2, &caps(&s)).unwrap();
    assert_eq!(Contents::read(&dp.maps).unwrap(), w2);
}

#[test]
fn an_apply_that_fails_midway_tracks_what_it_wrote_and_names_the_identities() {
    let s = MapSizes { policy: 16, ..MapSizes::default() };
    let mut dp = Dp::with_sizes("sync-midway", &s);
    let mut have = Contents::default();
    // The local pod with its cgroup: it has an owner slot.
    let pod = to_key("10.0.0.1".parse().unwrap());
    let slot = |dp: &Dp| dp.maps.local_owners.map.get(&local_owner_slot(&pod), 0).unwrap();
    let mut first = want(2);
    first.endpoints.get_mut(&pod).unwrap().cgroup = 42;
    apply(&mut dp.maps, &mut have, &first, &caps(&s)).unwrap();
    // Someone else filled the map behind the writer's back: room for 3 more entries.
    let filler = |p: u16| aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, PolicyKey::new(999, 998, DIR_EGRESS, 17, p + 1));
    for p in 0..11u16 {
        dp.maps.policy.insert(&filler(p), PolicyValue { verdict: VERDICT_DENY, flags: 0, _pad: [0; 2], rule_id: 9 }, 0).unwrap();
    }
    let mut w = first.clone();
    w.endpoints.get_mut(&pod).unwrap().identity = 303;
    w.endpoints.get_mut(&pod).unwrap().cgroup = 43;
    entries_of(&mut w, 303, 5);
    assert!(fit(&have, &mut w, &caps(&s)).is_empty(), "the writer's own count fits");
    let err = apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap_err();
    assert!(format!("{err:#}").contains("writing ZT_POLICY"), "{err:#}");
    // Midway: the endpoint moved to 303 and 3 of its 5 entries are in; `have` says so.
    assert_eq!(have.endpoints[&to_key("10.0.0.1".parse().unwrap())].identity, 303);
    assert_eq!(have.policy.keys().filter(|(_, k)| k.local_id() == 303).count(), 3);
    let maps = Contents::read(&dp.maps).unwrap();
    assert!(have.policy.iter().all(|(k, v)| maps.policy.get(k) == Some(v)));
    // Both the old and the new identity are still named: neither number may be reused.
    let named = have.named_identities();
    assert!(named.contains(&300) && named.contains(&303) && named.contains(&301));
    // The pod's slot was emptied before its endpoint changed, and not written: the apply
    // stopped first. The next apply writes it, though `have` already holds the endpoint.
    assert_eq!(slot(&dp), LocalOwner::default());
    for p in 0..11u16 {
        dp.maps.policy.remove(&filler(p)).unwrap();
    }
    apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
    assert_eq!(slot(&dp), LocalOwner::of(pod, 43));
}

/// The cgroup programs' owner slots follow the endpoints: a hooked local pod with a known
/// cgroup gets its slot, which is emptied when the pod is unhooked or goes, and the
/// start-time rebuild replaces what an agent that did not know the slots left behind.
#[test]
fn owner_slots_follow_the_hooked_local_pods() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("sync-owners", &s);
    let pod = to_key("10.0.0.1".parse().unwrap());
    let slot = local_owner_slot(&pod);
    let read = |dp: &Dp| dp.maps.local_owners.map.get(&slot, 0).unwrap();
    let mut have = Contents::default();
    let mut w = want(1);
    // (cgroup, interface) -> the slot: a known cgroup; hooked, cgroup not known (the
    // endpoint map leaves it to the hook); another cgroup; not hooked (interface 0);
    // hooked again.
    for (cgroup, ifindex, slot_scope) in [(42, 1, 42), (0, 1, 0), (43, 1, 43), (43, 0, 0), (43, 1, 43)] {
        let ep = w.endpoints.get_mut(&pod).unwrap();
        (ep.cgroup, ep.ifindex) = (cgroup, ifindex);
        apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
        let expected = if slot_scope == 0 { LocalOwner::default() } else { LocalOwner::of(pod, slot_scope) };
        assert_eq!(read(&dp), expected, "cgroup {cgroup}, interface {ifindex}");
    }
    // Gone.
    w.endpoints.remove(&pod);
    apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
    assert_eq!(read(&dp), LocalOwner::default());
    // Left by an agent that changed the endpoints without the slots: a stale slot, and a
    // hooked pod without one. The rebuild makes both what the endpoint map says.
    let stale = to_key("10.9.0.77".parse().unwrap());
    dp.maps.local_owners.map.set(local_owner_slot(&stale), LocalOwner::of(stale, 7), 0).unwrap();
    dp.maps.endpoints.insert(EndpointKey { addr: pod }, EndpointValue { identity: 300, flags: EP_LOCAL, ifindex: 1, cgroup: 44 }, 0).unwrap();
    assert_eq!(dp.maps.local_owners.rebuild(&dp.maps.endpoints).unwrap(), 2);
    assert_eq!(dp.maps.local_owners.map.get(&local_owner_slot(&stale), 0).unwrap(), LocalOwner::default());
    assert_eq!(read(&dp), LocalOwner::of(pod, 44));
    // The kernel's level hint is not a difference.
    dp.maps.local_owners.map.set(slot, LocalOwner { level_hint: 3, ..LocalOwner::of(pod, 44) }, 0).unwrap();
    assert_eq!(dp.maps.local_owners.rebuild(&dp.maps.endpoints).unwrap(), 0);
}

/// An agent's start rebuilds the slots before its programs run (`Datapath::load`).
#[test]
fn a_starting_agent_rebuilds_the_owner_slots() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("sync-owners-start", &s);
    let pod = to_key("10.0.0.1".parse().unwrap());
    dp.maps.endpoints.insert(EndpointKey { addr: pod }, EndpointValue { identity: 300, flags: EP_LOCAL, ifindex: 1, cgroup: 44 }, 0).unwrap();
    // What an older build of this layout could leave: the right address, a stale cgroup.
    dp.maps.local_owners.map.set(local_owner_slot(&pod), LocalOwner::of(pod, 7), 0).unwrap();
    let _agent = zt_agent::loader::Datapath::load(&dp._fs.root(), &s).expect("load");
    assert_eq!(dp.maps.local_owners.map.get(&local_owner_slot(&pod), 0).unwrap(), LocalOwner::of(pod, 44));
}
