//! The compiler's FQDN output drives the real kernel: a ZeroTrustPolicy is compiled,
//! written by the map writer, and then a DNS query and answer and the connections that
//! follow cross the programs through BPF_PROG_TEST_RUN. This ties the user-space name
//! hashes, slots and port folding to what the kernel looks up, without writing any
//! FQDN entry by hand. Needs root (bpffs mount, BPF syscalls).
mod common;
#[path = "common/dns_packets.rs"]
mod dns_packets;

use std::collections::BTreeMap;

use common::*;
use dns_packets::*;
use zt_agent::{
    compile::{compile_with_slots, default_dns_servers, CompileConfig, FqdnSlots},
    identity::IdentityAllocator,
    loader::{ensure_fqdn_config, FqdnSettings, MapSizes},
    model::{source_dir::parse_manifests, ztp::SpiffePattern, ClusterState},
    net::to_key,
    state::Desired,
    sync::{apply, clear_learned, Capacities, Contents},
};
use zt_common::*;

const WEB: &str = "10.0.0.10";
const COREDNS: &str = "10.0.0.53";
const EVIL: &str = "10.0.0.66";
const CLUSTER_IP: &str = "10.96.0.10";
const IP1: &str = "198.51.100.1";
const IP2: &str = "198.51.100.2";
const IP3: &str = "198.51.100.3";
const FROM: &str = "zt_from_pod";
const TO: &str = "zt_to_pod";

fn pod(ns: &str, name: &str, node: &str, ip: &str, sa: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c}}]}}\n\
         status: {{phase: Running, podIP: {ip}}}\n"
    )
}

fn cluster(egress: &str) -> ClusterState {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
                apiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system}\n"
        .to_string()
        + &pod("default", "web", "node-a", WEB, "web")
        + &pod("kube-system", "coredns", "node-b", COREDNS, "coredns")
        + &pod("default", "evil", "node-b", EVIL, "evil")
        + "---\napiVersion: zt.dev/v1alpha1\nkind: ZeroTrustPolicy\nmetadata: {name: web-out, namespace: default}\n\
           spec:\n  subjects: [{podSelector: {matchLabels: {app: web}}}]\n  egress:\n"
        + egress
        // DNS to the trusted resolvers, and (to show trust is not policy) to evil too.
        + "    - to: [{entity: dns}, {podSelector: {matchLabels: {app: evil}}}]\n      ports: [{protocol: UDP, port: 53}]\n";
    let mut s = ClusterState::new();
    for (_, o) in parse_manifests("t.yaml", &yaml, &mut Vec::new()).unwrap() {
        s.upsert(o);
    }
    s
}

struct Node {
    dp: Dp,
    cfg: CompileConfig,
    ids: IdentityAllocator,
    slots: FqdnSlots,
    have: Contents,
    caps: Capacities,
    sport: u16,
}

impl Node {
    fn new(tag: &str) -> Node {
        let sizes = MapSizes::default();
        let mut dp = Dp::with_sizes(tag, &sizes);
        let key = ensure_fqdn_config(&mut dp.maps.fqdn_config, &FqdnSettings::default()).unwrap().hash_key;
        let cfg = CompileConfig {
            node_name: "node-a".into(),
            trust_domain: "cluster.local".into(),
            fqdn_hash_key: key,
            dns_servers: default_dns_servers("cluster.local").iter().map(|s| SpiffePattern::parse(s).unwrap()).collect(),
            dns_addresses: vec![CLUSTER_IP.parse().unwrap()],
            ..Default::default()
        };
        let caps = Capacities {
            endpoints: sizes.endpoints,
            cidrs: sizes.cidrs,
            policy: sizes.policy,
            fqdn_names: sizes.fqdn_names,
            fqdn_ports: sizes.fqdn_ports,
            dns_servers: DNS_SERVERS_MAX,
        };
        Node { dp, cfg, ids: IdentityAllocator::new(), slots: FqdnSlots::new(), have: Contents::default(), caps, sport: 40000 }
    }

    /// Compile, write the maps, clear freed slots (the agent's order).
    fn enforce(&mut self, egress: &str) -> Desired {
        let d = compile_with_slots(&cluster(egress), &self.cfg, &mut self.ids, &mut self.slots).unwrap();
        let ifindex = BTreeMap::from([(WEB.parse().unwrap(), TEST_IFINDEX)]);
        apply(&mut self.dp.maps, &mut self.have, &Contents::from_desired(&d, &ifindex), &self.caps).unwrap();
        clear_learned(&mut self.dp.maps, &self.slots.active_masks()).unwrap();
        self.slots.release_cleared();
        d
    }

    /// The pod asks `server` for `qname`; the answer carries `ips`. Returns the answer's verdict.
    fn resolve(&mut self, server: &str, qname: &str, ips: &[&str]) -> u32 {
        self.sport += 1;
        let q = msg(0x0100, 1, 0, 0, &question(qname, T_A));
        assert_eq!(self.dp.run(FROM, &udp(WEB, server, self.sport, 53, &q)), TC_PASS, "query to {server}");
        let records: Vec<Vec<u8>> = ips.iter().map(|ip| a(300, ip)).collect();
        self.dp.run(TO, &udp(server, WEB, 53, self.sport, &answer(qname, T_A, &records)))
    }

    /// A new TCP connection from the pod.
    fn connect(&mut self, ip: &str, port: u16) -> u32 {
        self.sport += 1;
        self.dp.run(FROM, &ipv4(WEB, ip, TCP, self.sport, port))
    }

    fn learned(&self, local: u32, ip: &str) -> Option<u32> {
        let k = FqdnLearnedKey { addr: to_key(ip.parse().unwrap()), local_id: local };
        self.dp.maps.fqdn_learned.get(&k, 0).ok().map(|v| v.slots)
    }

    fn stat(&self, s: DnsStat) -> u64 {
        self.dp.maps.dns_stats().unwrap()[s as usize]
    }
}

const RULES: &str = "    - to: [{fqdn: {matchName: api.example.com}}]\n      ports: [{protocol: TCP, port: 443}]\n\
                     \x20   - to: [{fqdn: {matchPattern: \"*.example.org\"}}]\n";

#[test]
fn compiled_fqdn_rules_learn_and_allow_in_the_kernel() {
    let mut n = Node::new("fqdn-compiled");
    let d = n.enforce(RULES);
    let web = d.endpoints[&WEB.parse().unwrap()].identity;
    let (api_rule, org_rule) = {
        let r = |p: &str| d.rules.values().find(|r| r.fqdn == vec![p.to_string()]).unwrap().id;
        (r("api.example.com"), r("*.example.org"))
    };

    // Nothing resolved yet: default deny.
    assert_eq!(n.connect(IP1, 443), TC_DROP);
    // The exact name, through the trusted CoreDNS pod.
    assert_eq!(n.resolve(COREDNS, "API.example.com", &[IP1]), TC_PASS);
    assert_eq!(n.learned(web, IP1), Some(0b01));
    assert_eq!(n.connect(IP1, 443), TC_PASS, "learned name on its rule's port");
    assert_eq!(n.connect(IP1, 80), TC_DROP, "another port is not that rule's");
    // The wildcard (no ports: every port), through the configured resolver address.
    assert_eq!(n.resolve(CLUSTER_IP, "a.b.example.org", &[IP2]), TC_PASS);
    assert_eq!(n.learned(web, IP2), Some(0b10));
    assert_eq!(n.connect(IP2, 22), TC_PASS);
    assert_eq!(n.connect(IP2, 443), TC_PASS);
    // The suffix itself does not match `*.example.org`; an unresolved address is denied.
    assert_eq!(n.resolve(COREDNS, "example.org", &[IP3]), TC_PASS);
    assert_eq!(n.learned(web, IP3), None);
    assert_eq!(n.stat(DnsStat::NoMatch), 1);
    assert_eq!(n.connect(IP3, 443), TC_DROP);
    // An answer from a pod the policy lets the client query, but that is no trusted resolver.
    assert_eq!(n.resolve(EVIL, "api.example.com", &[IP3]), TC_PASS);
    assert_eq!(n.learned(web, IP3), None);
    assert_eq!(n.stat(DnsStat::NotTrusted), 1);
    assert_eq!(n.connect(IP3, 443), TC_DROP);
    // The verdicts name the FQDN rules.
    let allowed = n.dp.maps.counters().unwrap()[counter_index(DIR_EGRESS, Reason::AllowFqdn as u8) as usize];
    assert_eq!(allowed, 3);
    assert!(api_rule != org_rule);

    // The api rule goes away: its slot is cleared from the learned entry before it can be
    // reused, and a new connection is denied; the wildcard rule keeps working.
    n.enforce("    - to: [{fqdn: {matchPattern: \"*.example.org\"}}]\n");
    assert_eq!(n.learned(web, IP1), None, "its only slot was cleared: entry deleted");
    assert_eq!(n.learned(web, IP2), Some(0b10));
    assert_eq!(n.connect(IP1, 443), TC_DROP);
    assert_eq!(n.connect(IP2, 443), TC_PASS);
    // A new rule gets the freed slot, and the old address does not come back with it.
    let d = n.enforce(&format!("{RULES}    - to: [{{fqdn: {{matchName: other.example.com}}}}]\n"));
    assert_eq!(d.fqdn_slots[&web].len(), 3);
    assert_eq!(n.connect(IP1, 443), TC_DROP);
}
