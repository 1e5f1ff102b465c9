//! The logic of zt's cargo-fuzz targets, one function per target (the files in
//! `fuzz_targets/` only hand libFuzzer's input to these). Each calls the project's real
//! entry points and asserts what must hold for any input: no panic, and a few
//! properties whose failure would be a bug (noted at each assert).
use std::collections::BTreeMap;
use std::net::IpAddr;

use zt_agent::compile::{compile_with_slots, CompileConfig, EnforcementMode, FqdnSlots};
use zt_agent::identity::IdentityAllocator;
use zt_agent::model::source_dir::parse_manifests;
use zt_agent::model::ztp::SpiffePattern;
use zt_agent::model::{ClusterObject, ClusterState};
use zt_agent::sync::Contents;

pub mod policy;

/// zt-cni is a binary crate: its input parser is compiled in here from its own source.
#[allow(dead_code)]
#[path = "../../zt-cni/src/input.rs"]
pub mod cni;

// ---------------------------------------------------------------------------
// manifest: one file of the manifest-directory source
// ---------------------------------------------------------------------------

/// Bytes as one `*.yaml` file of the directory source: what `ClusterState::load_dir`
/// does with a file (UTF-8 text, every document parsed, normalized and validated,
/// duplicates rejected), then the compiler on what loaded.
pub fn manifest(data: &[u8]) {
    // load_dir reads files with read_to_string: not UTF-8 is an I/O error there.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut ignored = Vec::new();
    let Ok(objects) = parse_manifests("fuzz.yaml", text, &mut ignored) else { return };
    let Some(state) = load(objects) else { return };
    // For the node of the first pod (the labs' pods run on node1, node2): local pods are
    // what the compiler writes entries for.
    let node = state.pods.values().find_map(|p| p.spec.as_ref()?.node_name.clone()).unwrap_or_else(|| NODE.into());
    // Both enforcement modes, by the input's length.
    let mode = if data.len() % 2 == 1 { EnforcementMode::Always } else { EnforcementMode::Default };
    compile_twice(&state, &CompileConfig { node_name: node, ..config(mode, "cluster.local") });
}

/// `load_dir`'s loop over the objects of a file: duplicates reject the load. Every
/// object it keeps was validated, and validating it again must change nothing.
fn load(objects: Vec<(String, ClusterObject)>) -> Option<ClusterState> {
    let mut state = ClusterState::new();
    let mut seen = std::collections::BTreeSet::new();
    for (location, obj) in objects {
        let mut again = obj.clone();
        // A validated object is valid: normalize_and_validate is idempotent.
        again.normalize_and_validate().unwrap_or_else(|e| panic!("{location}: validated object fails validation again: {e}"));
        assert_eq!(again, obj, "{location}: normalizing a normalized object changed it");
        let (ns, name) = obj.key();
        assert!(!name.is_empty(), "{location}: validated object without a name");
        assert_eq!(obj.kind().namespaced(), !ns.is_empty(), "{location}: namespace after normalizing: {ns:?}");
        if !seen.insert((obj.kind(), ns, name)) {
            return None; // duplicate object: load_dir fails the load
        }
        state.upsert(obj);
    }
    Some(state)
}

/// The node the compiles run for (pods with this `spec.nodeName` are local).
pub const NODE: &str = "node-a";

pub fn config(mode: EnforcementMode, trust_domain: &str) -> CompileConfig {
    CompileConfig {
        node_name: NODE.into(),
        trust_domain: trust_domain.into(),
        enforcement_mode: mode,
        host_ips: vec!["192.168.0.10".parse().unwrap(), "fd00:ffff::10".parse().unwrap()],
        fqdn_hash_key: [0x0123_4567_89ab_cdef, 0x0f1e_2d3c_4b5a_6978],
        dns_servers: vec![SpiffePattern::parse("spiffe://cluster.local/ns/kube-system/sa/coredns").unwrap()],
        dns_addresses: vec!["10.96.0.10".parse().unwrap()],
        host_access: zt_agent::compile::HostAccess::Probes,
        dns_backends: vec![],
    }
}

/// Compiles `state` into map contents, twice: the compiler is deterministic and a
/// second compile with the allocator and slots of the first yields the same maps (a
/// restarted agent writes nothing when nothing changed). A failed compile leaves the
/// allocator and the slots as they were.
pub fn compile_twice(state: &ClusterState, cfg: &CompileConfig) {
    let mut ids = IdentityAllocator::new();
    let mut slots = FqdnSlots::new();
    let first = match compile_with_slots(state, cfg, &mut ids, &mut slots) {
        Ok(d) => d,
        Err(_) => {
            assert_eq!(ids, IdentityAllocator::new(), "a failed compile changed the identity allocator");
            assert_eq!(slots, FqdnSlots::new(), "a failed compile changed the FQDN slots");
            return;
        }
    };
    let ifindex: BTreeMap<IpAddr, u32> = BTreeMap::new();
    let maps = Contents::from_desired(&first, &ifindex);
    // Every local endpoint's identity is described; every policy entry names identities.
    for (ip, ep) in &first.endpoints {
        assert!(first.identities.contains_key(&ep.identity), "endpoint {ip} has identity {} with no description", ep.identity);
    }
    for (k, v) in &first.policy {
        assert!(v.rule_id == 0 || first.rules.contains_key(&v.rule_id), "policy entry {k:?} names unknown rule {}", v.rule_id);
    }
    let (ids1, slots1) = (ids.clone(), slots.clone());
    let second = compile_with_slots(state, cfg, &mut ids, &mut slots).expect("the same state compiled once compiles again");
    assert_eq!(ids, ids1, "recompiling the same state changed the identity allocator");
    assert_eq!(slots, slots1, "recompiling the same state changed the FQDN slots");
    assert!(Contents::from_desired(&second, &ifindex) == maps, "recompiling the same state changed the map contents");
    assert_eq!(first.rules, second.rules, "recompiling the same state changed the rule descriptions");
}

// ---------------------------------------------------------------------------
// cni_input: what the container runtime hands zt-cni
// ---------------------------------------------------------------------------

/// `CNI_*` variables as `KEY=VALUE` lines, a NUL byte, then the network configuration
/// (stdin). Runs zt-cni's `run` up to the agent call: command, variables, configuration,
/// prevResult, and the error object it would print.
pub fn cni_input(data: &[u8]) {
    use cni::*;
    let (env_part, stdin) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let vars: BTreeMap<String, String> =
        String::from_utf8_lossy(env_part).lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let get = |k: &str| vars.get(k).cloned();
    let version = version_of(stdin).filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str())).unwrap_or_else(|| "1.0.0".into());
    let result = (|| -> Result<(), CniError> {
        let cmd = command(&get)?;
        if cmd == Command::Version {
            let _ = version_of(stdin);
            return Ok(());
        }
        let env = env(cmd, &get)?;
        assert!(!env.container_id.is_empty() && env.container_id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        assert!(!env.ifname.is_empty() && env.ifname.len() <= 15 && !env.ifname.contains('/'));
        assert!(cmd == Command::Del || env.netns.is_some(), "{} without CNI_NETNS", cmd.name());
        let conf = netconf(cmd, stdin)?;
        assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()));
        assert!(conf.agent_socket.is_absolute());
        assert!(conf.timeout.as_millis() >= 1 && conf.timeout.as_millis() <= MAX_TIMEOUT_MS as u128);
        assert!(matches!(cmd, Command::Del) || conf.prev_result.is_some(), "{} without prevResult", cmd.name());
        if let Some(p) = conf.prev_result.as_ref().map(prev_result).transpose()? {
            assert!(!p.ips.is_empty(), "prevResult accepted without addresses");
        }
        Ok(())
    })();
    if let Err(e) = result {
        // What main prints on stdout.
        let obj = serde_json::json!({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details});
        let _ = obj.to_string();
    }
}

// ---------------------------------------------------------------------------
// dns_event: a captured DNS answer from the kernel's ring
// ---------------------------------------------------------------------------

/// The bytes twice: as a whole DNS message through `parse_message`, and as a
/// `DnsEvent` as the ring delivers it (zero-padded to its size) through `observe`.
pub fn dns_event(data: &[u8]) {
    use zt_agent::fqdn::reader::{observe, parse_message};
    use zt_common::{DnsEvent, DNS_EVENT_DATA};
    if let Some(p) = parse_message(data) {
        assert_eq!(p.qname, p.qname.to_ascii_lowercase(), "qname not lowercased");
        assert!(!p.qname.ends_with('.') || p.qname == ".", "qname keeps its trailing dot: {:?}", p.qname);
    }
    let size = std::mem::size_of::<DnsEvent>();
    let mut raw = vec![0u8; size];
    let n = data.len().min(size);
    raw[..n].copy_from_slice(&data[..n]);
    // SAFETY: DnsEvent is repr(C) of integers and byte arrays: any bytes are a value.
    let ev: DnsEvent = unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const DnsEvent) };
    let whole = parse_message(&ev.data[..(ev.copy_len as usize).min(DNS_EVENT_DATA)]);
    match observe(&ev, 1_700_000_000) {
        Some(o) => {
            let whole = whole.expect("observe decoded what parse_message did not");
            assert_eq!(o.name, whole.qname);
            assert!(o.ips.len() <= whole.ips.len());
            if o.learned {
                assert!(o.ips.len() <= ev.ips_learned as usize, "more addresses named than the kernel learned");
            }
            // The cache takes any observation.
            let mut cache = zt_agent::fqdn::FqdnCache::default();
            cache.record(o);
            assert_eq!(cache.len(), 1);
        }
        None => assert!(whole.is_none(), "parse_message decoded what observe did not"),
    }
}
