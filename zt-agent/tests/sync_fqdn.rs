//! The FQDN maps against real pinned maps: names, ports and trusted DNS servers are
//! diffed like policy (refused before any write when full), ZT_FQDN_CONFIG keeps its
//! hash key across restarts, and freed slots are cleared from ZT_FQDN_LEARNED before
//! they can be reused.
mod common;

use std::collections::BTreeMap;

use aya::maps::lpm_trie::Key;
use common::*;
use zt_agent::{
    compile::{compile_with_slots, CompileConfig, FqdnSlots},
    identity::IdentityAllocator,
    loader::{ensure_fqdn_config, FqdnSettings, MapSizes},
    model::{source_dir::parse_manifests, ClusterState},
    net::to_key,
    sync::{apply, clear_learned, withdraws, Capacities, Contents},
};
use zt_common::*;

fn caps(s: &MapSizes) -> Capacities {
    Capacities {
        endpoints: s.endpoints,
        cidrs: s.cidrs,
        policy: s.policy,
        fqdn_names: s.fqdn_names,
        fqdn_ports: s.fqdn_ports,
        dns_servers: DNS_SERVERS_MAX,
    }
}

fn ports_value(slots: u32, rule: u32) -> FqdnPortsValue {
    let mut v = FqdnPortsValue { slots, ..Default::default() };
    for s in 0..32 {
        if slots & (1 << s) != 0 {
            v.rule_ids[s] = rule;
        }
    }
    v
}

/// `n` names and one port entry for identity 300, plus the trusted servers.
fn want(n: u64) -> Contents {
    let mut c = Contents::default();
    for i in 0..n {
        c.fqdn_names.insert(FqdnNameKey::new(300, NAME_EXACT, 0x1000 + i), FqdnNameValue { slots: 1, _pad: 0 });
    }
    c.fqdn_ports.insert((POLICY_PREFIX_FULL, PolicyKey::new(300, 0, DIR_EGRESS, 6, 443)), ports_value(1, 7));
    c.fqdn_ports.insert((POLICY_PREFIX_ANY_PROTO, PolicyKey::new(300, 0, DIR_EGRESS, 0, 0)), ports_value(2, 8));
    c.dns_servers.insert(IDENTITY_DNS, 1);
    c.dns_servers.insert(400, 1);
    c
}

#[test]
fn fqdn_maps_diff_noop_and_withdraw() {
    let s = MapSizes::default();
    let mut dp = Dp::with_sizes("fqdn-sync-diff", &s);
    let mut have = Contents::default();
    let st = apply(&mut dp.maps, &mut have, &want(3), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (7, 0, false), "additions only");
    assert_eq!(Contents::read(&dp.maps).unwrap(), want(3), "maps hold exactly the desired state");
    // The kernel's view: an exact lookup and an LPM lookup of the port trie.
    let v = dp.maps.fqdn_names.get(&FqdnNameKey::new(300, NAME_EXACT, 0x1001), 0).unwrap();
    assert_eq!(v.slots, 1);
    let p = dp.maps.fqdn_ports.get(&Key::new(96, PolicyKey::new(300, 0, DIR_EGRESS, 17, 53)), 0).unwrap();
    assert_eq!((p.slots, p.rule_ids[1]), (2, 8), "longest match is the any-protocol entry");
    // A restarted writer reads the maps back and writes nothing.
    let mut reread = Contents::read(&dp.maps).unwrap();
    let st = apply(&mut dp.maps, &mut reread, &want(3), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed), (0, 0));
    // A name or port entry that only gains a slot takes nothing away.
    let mut more = want(3);
    more.fqdn_names.values_mut().next().unwrap().slots = 0b11;
    more.fqdn_ports.values_mut().next().unwrap().slots |= 0b100;
    more.fqdn_ports.values_mut().next().unwrap().rule_ids[2] = 9;
    assert!(!withdraws(&have, &more));
    let mut lost = more.clone();
    lost.fqdn_names.values_mut().next().unwrap().slots = 0b10;
    assert!(withdraws(&have, &lost), "a name lost slot 0");
    let mut renamed = more.clone();
    renamed.fqdn_ports.values_mut().next().unwrap().rule_ids[1] ^= 1; // the any-protocol entry: slot 1
    assert!(withdraws(&have, &renamed), "another rule behind a slot");
    // A removed name withdraws; so does a changed port value and a removed server.
    let st = apply(&mut dp.maps, &mut have, &want(2), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (0, 1, true));
    let mut w = want(2);
    w.fqdn_ports.values_mut().next().unwrap().slots = 0b11;
    w.dns_servers.remove(&400);
    let st = apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (1, 1, true));
    assert_eq!(Contents::read(&dp.maps).unwrap(), w);
    // Everything gone.
    let st = apply(&mut dp.maps, &mut have, &Contents::default(), &caps(&s)).unwrap();
    assert_eq!((st.written, st.removed, st.withdrew), (0, 5, true));
    assert_eq!(Contents::read(&dp.maps).unwrap(), Contents::default());
}

#[test]
fn full_fqdn_maps_are_refused_before_any_write() {
    let s = MapSizes { fqdn_names: 4, fqdn_ports: 4, ..MapSizes::default() };
    let mut dp = Dp::with_sizes("fqdn-sync-full", &s);
    let mut have = Contents::default();
    apply(&mut dp.maps, &mut have, &want(4), &caps(&s)).unwrap();
    let before = Contents::read(&dp.maps).unwrap();
    let mut w = want(5);
    // Other maps' changes of the same apply are not written either.
    w.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(300, 301, DIR_EGRESS, 6, 80)), PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: 1 });
    let err = apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap_err().to_string();
    assert!(err.contains("ZT_FQDN_NAMES full") && err.contains('5') && err.contains('4'), "{err}");
    assert_eq!(Contents::read(&dp.maps).unwrap(), before, "nothing half-applied");
    assert_eq!(have, before);
    let mut w = want(1);
    for p in 0..4u16 {
        w.fqdn_ports.insert((POLICY_PREFIX_FULL, PolicyKey::new(300, 0, DIR_EGRESS, 17, p)), ports_value(1, 7));
    }
    let err = apply(&mut dp.maps, &mut have, &w, &caps(&s)).unwrap_err().to_string();
    assert!(err.contains("ZT_FQDN_PORTS full"), "{err}");
    assert_eq!(Contents::read(&dp.maps).unwrap(), before);
}

fn learned(dp: &mut Dp, ip: &str, local: u32, slots: u32, expires_ns: u64) -> FqdnLearnedKey {
    let k = FqdnLearnedKey { addr: to_key(ip.parse().unwrap()), local_id: local };
    dp.maps.fqdn_learned.insert(k, FqdnLearnedValue { expires_ns, slots, _pad: 0 }, 0).unwrap();
    k
}

fn learned_all(dp: &Dp) -> BTreeMap<FqdnLearnedKey, (u64, u32)> {
    dp.maps.fqdn_learned.iter().map(|r| r.unwrap()).map(|(k, v)| (k, (v.expires_ns, v.slots))).collect()
}

#[test]
fn clearing_keeps_only_active_slots() {
    let mut dp = Dp::new("fqdn-clear");
    let a = learned(&mut dp, "203.0.113.1", 300, 0b11, 111);
    let b = learned(&mut dp, "203.0.113.2", 300, 0b10, 222);
    let c = learned(&mut dp, "2001:db8::1", 301, 0b1, 333);
    let _gone = learned(&mut dp, "203.0.113.1", 999, 0b1, 444);
    let active = BTreeMap::from([(300, 0b01), (301, 0b01)]);
    let r = clear_learned(&mut dp.maps, &active).unwrap();
    assert_eq!((r.rewritten, r.deleted), (1, 2));
    assert_eq!(learned_all(&dp), BTreeMap::from([(a, (111, 0b01)), (c, (333, 0b1))]), "expiry kept, b and identity 999 gone");
    assert!(!learned_all(&dp).contains_key(&b));
    // Nothing left to clear: a second pass changes nothing.
    assert_eq!(clear_learned(&mut dp.maps, &active).unwrap(), Default::default());
}

#[test]
fn fqdn_config_keeps_its_hash_key() {
    let mut dp = Dp::new("fqdn-config");
    let s = FqdnSettings { min_ttl_s: 5, max_ttl_s: 600, grace_s: 10, events_per_sec: 50 };
    let c1 = ensure_fqdn_config(&mut dp.maps.fqdn_config, &s).unwrap();
    assert_ne!(c1.hash_key, [0, 0], "a new map gets a random key");
    assert_eq!((c1.min_ttl_s, c1.max_ttl_s, c1.grace_s, c1.events_per_sec), (5, 600, 10, 50));
    assert_eq!(dp.maps.read_fqdn_config().unwrap(), c1);
    // A restart with other flags: same key, new settings.
    let c2 = ensure_fqdn_config(&mut dp.maps.fqdn_config, &FqdnSettings::default()).unwrap();
    assert_eq!(c2.hash_key, c1.hash_key);
    assert_eq!((c2.min_ttl_s, c2.max_ttl_s, c2.grace_s, c2.events_per_sec), (30, 86400, 60, 1000));
    assert_eq!(dp.maps.read_fqdn_config().unwrap(), c2);
    let bad = FqdnSettings { min_ttl_s: 10, max_ttl_s: 5, ..Default::default() };
    assert!(ensure_fqdn_config(&mut dp.maps.fqdn_config, &bad).unwrap_err().to_string().contains("--fqdn-min-ttl"));
    assert_eq!(dp.maps.read_fqdn_config().unwrap(), c2, "a refused setting writes nothing");
    // Another datapath (another node) gets another key.
    let mut other = Dp::new("fqdn-config-2");
    assert_ne!(ensure_fqdn_config(&mut other.maps.fqdn_config, &s).unwrap().hash_key, c1.hash_key);
}

const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default, labels: {app: web}}\n\
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c}]}\n\
status: {phase: Running, podIP: 10.0.0.1}\n";

fn policy(names: &[&str]) -> String {
    let mut s = String::from(
        "---\napiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: out, namespace: default}\nspec:\n  egress:\n",
    );
    for n in names {
        s += &format!("    - to: [{{fqdn: {{matchName: {n}}}}}]\n      ports: [{{protocol: TCP, port: 443}}]\n");
    }
    s + "    - to: [{entity: dns}]\n      ports: [{protocol: UDP, port: 53}]\n"
}

fn cluster(yaml: &str) -> ClusterState {
    let mut s = ClusterState::new();
    for (_, o) in parse_manifests("t.yaml", yaml, &mut Vec::new()).unwrap() {
        s.upsert(o);
    }
    s
}

/// The agent's order: compile, apply, clear freed slots, release them; a slot is
/// reused only after its bit left ZT_FQDN_LEARNED.
#[test]
fn freed_slot_is_cleared_before_reuse() {
    let s = MapSizes::default();
    let mut dp = Dp::new("fqdn-slot-reuse");
    let key = ensure_fqdn_config(&mut dp.maps.fqdn_config, &FqdnSettings::default()).unwrap().hash_key;
    let cfg = CompileConfig { node_name: "node-a".into(), trust_domain: "cluster.local".into(), fqdn_hash_key: key, ..Default::default() };
    let (mut ids, mut slots, mut have) = (IdentityAllocator::new(), FqdnSlots::new(), Contents::default());
    let mut round = |dp: &mut Dp, names: &[&str], slots: &mut FqdnSlots| {
        let d = compile_with_slots(&cluster(&(BASE.to_string() + &policy(names))), &cfg, &mut ids, slots).unwrap();
        apply(&mut dp.maps, &mut have, &Contents::from_desired(&d, &Default::default()), &caps(&s)).unwrap();
        let web = d.endpoints[&"10.0.0.1".parse().unwrap()].identity;
        let name_slot = |n: &str| d.fqdn_names[&FqdnNameKey::new(web, NAME_EXACT, name_hashes(key, n).0)];
        let named: Vec<u32> = names.iter().map(|n| name_slot(n)).collect();
        (web, named)
    };
    let (web, s1) = round(&mut dp, &["a.example.com", "b.example.com"], &mut slots);
    assert_eq!(s1, vec![0b01, 0b10]);
    assert_eq!(dp.maps.fqdn_names.get(&FqdnNameKey::new(web, NAME_EXACT, name_hashes(key, "b.example.com").0), 0).unwrap().slots, 0b10);
    // What the kernel learned: one address under each name.
    let ka = learned(&mut dp, "203.0.113.1", web, 0b01, 1);
    let kb = learned(&mut dp, "203.0.113.2", web, 0b10, 2);

    // b goes away: its name entry is removed, its slot pending until the bits are cleared.
    let (_, s2) = round(&mut dp, &["a.example.com"], &mut slots);
    assert_eq!(s2, vec![0b01]);
    assert_eq!(slots.pending(), &BTreeMap::from([(web, 0b10)]));
    let (_, s3) = round(&mut dp, &["a.example.com", "c.example.com"], &mut slots);
    assert_eq!(s3, vec![0b01, 0b100], "the pending slot is not reused");
    let r = clear_learned(&mut dp.maps, &slots.active_masks()).unwrap();
    assert_eq!((r.rewritten, r.deleted), (0, 1));
    slots.release_cleared();
    assert_eq!(learned_all(&dp), BTreeMap::from([(ka, (1, 0b01))]));
    assert!(!learned_all(&dp).contains_key(&kb));
    // Now slot 1 is free again, and no learned entry carries it.
    let (_, s4) = round(&mut dp, &["a.example.com", "c.example.com", "d.example.com"], &mut slots);
    assert_eq!(s4, vec![0b01, 0b100, 0b10]);
}
