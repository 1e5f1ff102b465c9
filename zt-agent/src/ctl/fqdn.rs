//! `ztctl fqdn`: the addresses each local identity learned from DNS answers, with the
//! names behind them, time to expiry and the FQDN rules they serve. Reads the pinned
//! `ZT_FQDN_LEARNED`/`ZT_FQDN_PORTS`/`ZT_FQDN_CONFIG` maps, `state.json` and
//! `fqdn-cache.json`, so it works while the agent is down (names learned meanwhile show `-`).
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use zt_common::*;

use crate::events::Snapshot;
use crate::net::{from_key, to_key};
use crate::pins::PinnedMaps;
use crate::clock::monotonic_ns;
use crate::fqdn::{cache_path, FqdnCache, FqdnMaps};

#[derive(Serialize, Debug, Clone)]
pub struct FqdnRow {
    pub identity: u32,
    /// SPIFFE ID of the identity, and its pods on this node.
    pub spiffe_id: String,
    pub pods: Vec<String>,
    /// Names under which the address was learned; empty when unknown (learned while the
    /// agent was down; known again after the next resolution).
    pub names: Vec<String>,
    pub ip: IpAddr,
    /// Seconds until new flows stop being allowed (negative: expired; allowed for
    /// `grace_s` more).
    pub expires_in_s: i64,
    pub grace_s: u32,
    pub slots: u32,
    pub rules: Vec<String>,
}

/// A `*`-only glob: `*.example.com`, `api.*`, `*`.
pub fn glob_match(pat: &str, s: &str) -> bool {
    let parts: Vec<&str> = pat.split('*').collect();
    if parts.len() == 1 {
        return pat.eq_ignore_ascii_case(s);
    }
    let s = s.to_ascii_lowercase();
    let mut pos = 0;
    for (i, p) in parts.iter().enumerate() {
        let p = p.to_ascii_lowercase();
        if i == 0 {
            if !s.starts_with(&p) {
                return false;
            }
            pos = p.len();
        } else if i == parts.len() - 1 {
            return s.len() >= pos + p.len() && s[pos..].ends_with(&p);
        } else if let Some(at) = s[pos..].find(&p) {
            pos += at + p.len();
        } else {
            return false;
        }
    }
    true
}

pub fn rows(pinned: &PinnedMaps, maps: &FqdnMaps, snap: &Snapshot, state_dir: &Path, identity: Option<&str>, name: Option<&str>) -> Result<Vec<FqdnRow>> {
    let cache = FqdnCache::read(&cache_path(state_dir))?;
    let cfg = maps.config()?;
    let now = monotonic_ns() as i128;
    let mut rule_cache: BTreeMap<u32, [u32; 32]> = Default::default();
    let pods = local_pods(pinned, snap);
    let mut out = vec![];
    for (id, ip, v) in maps.learned_entries() {
        let spiffe_id = snap.identity_name(id);
        if let Some(f) = identity {
            if !(spiffe_id.contains(f) || id.to_string() == f) {
                continue;
            }
        }
        let names: Vec<String> = cache.names_for(id, ip).iter().map(|e| e.name.clone()).collect();
        if let Some(g) = name {
            if !names.iter().any(|n| glob_match(g, n)) {
                continue;
            }
        }
        let slot_rules = *rule_cache.entry(id).or_insert_with(|| maps.slot_rules(id));
        let rules = (0..32)
            .filter(|s| v.slots & (1 << s) != 0)
            .map(|s| match slot_rules[s] {
                0 => format!("slot {s}"),
                r => snap.rule_name(r).unwrap_or_else(|| format!("rule {r}")),
            })
            .collect();
        out.push(FqdnRow {
            identity: id,
            spiffe_id,
            pods: pods.get(&id).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
            names,
            ip,
            expires_in_s: ((v.expires_ns as i128 - now) / 1_000_000_000) as i64,
            grace_s: cfg.grace_s,
            slots: v.slots,
            rules,
        });
    }
    Ok(out)
}

/// Local pods by identity: state.json names the pods, `ZT_ENDPOINTS` their identities.
fn local_pods(pinned: &PinnedMaps, snap: &Snapshot) -> BTreeMap<u32, BTreeSet<String>> {
    let mut out: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (k, v) in pinned.endpoints.iter().filter_map(|r| r.ok()) {
        if v.flags & EP_LOCAL == 0 {
            continue;
        }
        if let Some(p) = snap.pods.get(&from_key(k.addr)) {
            out.entry(v.identity).or_default().insert(format!("{}/{}", p.namespace, p.name));
        }
    }
    out
}

/// `ztctl explain`'s FQDN step, as the kernel's `fqdn::allowed` for a new flow: the
/// learned entry of (peer address, local identity), not past expiry + grace, and a slot
/// shared with the port entry. Returns the rule of the lowest shared slot.
pub fn explain_step(maps: &PinnedMaps, snap: &Snapshot, local: u32, peer: IpAddr, (proto, port): (u8, u16), trace: &mut Vec<String>) -> Option<u32> {
    let Ok(v) = maps.fqdn_learned.get(&FqdnLearnedKey { addr: to_key(peer), local_id: local }, 0) else {
        trace.push(format!("ZT_FQDN_LEARNED[{peer}, {local}] -> none: no DNS answer taught this address"));
        return None;
    };
    let grace = maps.read_fqdn_config().map(|c| c.grace_s).unwrap_or(0) as i128;
    let left = (v.expires_ns as i128 - monotonic_ns() as i128) / 1_000_000_000;
    trace.push(format!("ZT_FQDN_LEARNED[{peer}, {local}] -> slots {:#x}, expires in {left}s (+{grace}s grace)", v.slots));
    if left + grace <= 0 {
        trace.push("expired (new flows; tracked flows keep it)".into());
        return None;
    }
    let k = aya::maps::lpm_trie::Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local, 0, DIR_EGRESS, proto, port));
    let Ok(p) = maps.fqdn_ports.get(&k, 0) else {
        trace.push(format!("ZT_FQDN_PORTS[{local}, proto {proto}, port {port}] -> none"));
        return None;
    };
    let shared = v.slots & p.slots;
    trace.push(format!("ZT_FQDN_PORTS[{local}, proto {proto}, port {port}] -> slots {:#x}; shared {shared:#x}", p.slots));
    if shared == 0 {
        return None;
    }
    let rule = p.rule_ids[shared.trailing_zeros() as usize & 31];
    if let Some(r) = snap.rules.get(&rule) {
        trace.push(format!("fqdn rule for {}", r.fqdn.join(", ")));
    }
    Some(rule)
}

/// `ztctl fqdn --stats`: one `ZT_DNS_STATS` counter (summed over CPUs).
#[derive(Serialize, Debug, Clone)]
pub struct StatRow {
    pub outcome: String,
    pub answers: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct NamesRow {
    pub identity: u32,
    pub spiffe_id: String,
    pub slot: u8,
    pub rule: String,
    pub names: Vec<String>,
}

/// `ztctl fqdn names`: what each slot of each local identity stands for (state.json).
pub fn names(snap: &Snapshot, identity: Option<&str>) -> Vec<NamesRow> {
    let mut out = vec![];
    for (id, slots) in &snap.fqdn_slots {
        let spiffe_id = snap.identity_name(*id);
        if identity.is_some_and(|f| !(spiffe_id.contains(f) || id.to_string() == f)) {
            continue;
        }
        for (slot, rule) in slots {
            out.push(NamesRow {
                identity: *id,
                spiffe_id: spiffe_id.clone(),
                slot: *slot,
                rule: snap.rule_name(*rule).unwrap_or_else(|| format!("rule {rule}")),
                names: snap.rules.get(rule).map(|r| r.fqdn.clone()).unwrap_or_default(),
            });
        }
    }
    out
}

pub fn table_header() -> String {
    format!("{:<40} {:<28} {:<40} {:<12} RULES", "POD/IDENTITY", "NAME", "IP", "EXPIRES-IN")
}

pub fn table_row(r: &FqdnRow) -> String {
    let who = if r.pods.is_empty() { r.spiffe_id.clone() } else { r.pods.join(",") };
    let name = if r.names.is_empty() { "-".to_string() } else { r.names.join(",") };
    let exp = if r.expires_in_s >= 0 {
        format!("{}s", r.expires_in_s)
    } else if -r.expires_in_s <= r.grace_s as i64 {
        format!("grace {}s", r.grace_s as i64 + r.expires_in_s)
    } else {
        "expired".to_string()
    };
    format!("{who:<40} {name:<28} {:<40} {exp:<12} {}", r.ip.to_string(), r.rules.join("; "))
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("*.example.com", "api.example.com"));
        assert!(!glob_match("*.example.com", "example.com"));
        assert!(glob_match("api.*", "API.example.com"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("api.example.com", "api.example.org"));
    }
}
