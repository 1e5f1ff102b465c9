//! ztctl's views. Tables for people, `-o json` for scripts. Map contents come from the
//! pinned maps; names (SPIFFE IDs, pods, rules) from the agent's state file.
pub mod auth;
pub mod explain;
pub mod l7;
pub mod failures;
pub mod fqdn;
pub mod graph;
pub mod posture;
pub mod services;

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use zt_common::*;

use crate::{
    events::{direction_name, proto_name, EventRecord, Snapshot},
    net::from_key,
    pins::PinnedMaps,
};

pub fn load_snapshot(state_dir: &Path) -> Result<Snapshot> {
    let path = state_dir.join("state.json");
    let data = std::fs::read(&path).with_context(|| format!("reading {} (has zt-agent run on this node? is --state-dir right?)", path.display()))?;
    serde_json::from_slice(&data).with_context(|| format!("parsing {}", path.display()))
}

pub fn print<T: Serialize>(json: bool, rows: &[T], table: impl Fn(&T) -> String, header: &str) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        println!("{header}");
        for r in rows {
            println!("{}", table(r));
        }
    }
    Ok(())
}

#[derive(Serialize)]
pub struct IdentityRow {
    pub id: u32,
    pub spiffe_id: String,
    pub labels: std::collections::BTreeMap<String, String>,
}

pub fn identities(snap: &Snapshot) -> Vec<IdentityRow> {
    snap.identities.values().map(|i| IdentityRow { id: i.id, spiffe_id: i.spiffe_id.clone(), labels: i.labels.clone() }).collect()
}

#[derive(Serialize)]
pub struct EndpointRow {
    pub ip: IpAddr,
    pub identity: u32,
    pub spiffe_id: String,
    pub pod: Option<String>,
    pub local: bool,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub ifindex: u32,
}

pub fn endpoints(maps: &PinnedMaps, snap: &Snapshot) -> Result<Vec<EndpointRow>> {
    let mut rows = vec![];
    for item in maps.endpoints.iter() {
        let (k, v) = item?;
        let ip = from_key(k.addr);
        rows.push(EndpointRow {
            ip,
            identity: v.identity,
            spiffe_id: snap.identity_name(v.identity),
            pod: snap.pods.get(&ip).map(|p| format!("{}/{}", p.namespace, p.name)),
            local: v.flags & EP_LOCAL != 0,
            ingress_enforced: v.flags & EP_ENFORCE_INGRESS != 0,
            egress_enforced: v.flags & EP_ENFORCE_EGRESS != 0,
            ifindex: v.ifindex,
        });
    }
    rows.sort_by_key(|r| r.ip);
    Ok(rows)
}

#[derive(Serialize)]
pub struct PolicyRow {
    pub local: String,
    pub local_id: u32,
    pub direction: String,
    pub peer: String,
    pub peer_id: u32,
    pub proto: String,
    /// "any", one port, or "first-last" for a prefix block.
    pub ports: String,
    pub verdict: String,
    pub rule: Option<String>,
}

pub fn policy(maps: &PinnedMaps, snap: &Snapshot, filter: Option<&str>) -> Result<Vec<PolicyRow>> {
    let mut rows = vec![];
    for item in maps.policy.iter() {
        let (k, v) = item?;
        let (plen, d) = (k.prefix_len(), k.data());
        let local = snap.identity_name(d.local_id());
        let peer = if d.peer_id() == IDENTITY_ANY { "any".to_string() } else { snap.identity_name(d.peer_id()) };
        if let Some(f) = filter {
            if !(local.contains(f) || d.local_id().to_string() == f) {
                continue;
            }
        }
        let (proto, ports) = if plen <= POLICY_PREFIX_ANY_PROTO {
            ("any".to_string(), "any".to_string())
        } else if plen <= POLICY_PREFIX_ANY_PORT {
            (proto_name(d.proto), "any".to_string())
        } else {
            let host_bits = POLICY_PREFIX_FULL - plen;
            let first = d.port();
            let last = first as u32 + (1u32 << host_bits) - 1;
            (proto_name(d.proto), if host_bits == 0 { first.to_string() } else { format!("{first}-{last}") })
        };
        rows.push(PolicyRow {
            local,
            local_id: d.local_id(),
            direction: direction_name(d.dir).into(),
            peer,
            peer_id: d.peer_id(),
            proto,
            ports,
            verdict: if v.verdict == VERDICT_DENY { "deny".into() } else { "allow".into() },
            rule: snap.rule_name(v.rule_id),
        });
    }
    rows.sort_by(|a, b| (a.local_id, &a.direction, a.peer_id, &a.proto, &a.ports).cmp(&(b.local_id, &b.direction, b.peer_id, &b.proto, &b.ports)));
    Ok(rows)
}

#[derive(Serialize)]
pub struct CtRow {
    pub direction: String,
    pub proto: String,
    pub src: String,
    pub dst: String,
    pub local: String,
    pub peer: String,
    /// `tcp-syn`, `tcp-established`, `tcp-closing`, `tcp-closed`, `udp`, `icmp`, `other`.
    pub state: String,
    /// The map holding it: `ZT_CT_EST` (established TCP, never evicted) or `ZT_CT` (LRU).
    pub map: String,
    pub age_s: u64,
    pub idle_s: u64,
    /// Seconds left before it expires unless a packet refreshes it (the state's timeout
    /// in ZT_CONFIG minus idle time).
    pub expires_in_s: u64,
    pub epoch: u32,
    pub reason: String,
}

/// Every tracked flow of both conntrack maps, established ones first.
pub fn ct(maps: &PinnedMaps, snap: &Snapshot) -> Result<Vec<CtRow>> {
    let now = crate::clock::monotonic_ns();
    let cfg = maps.read_config()?;
    let mut rows = vec![];
    for (map, name) in [(&maps.ct_est, MAP_CT_EST), (&maps.ct, MAP_CT)] {
        for item in map.iter() {
            let (k, v) = item?;
            let (s, d) = (from_key(k.saddr), from_key(k.daddr));
            let fmt = |ip: IpAddr, port: u16| if ip.is_ipv6() { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") };
            rows.push(CtRow {
                direction: direction_name(k.dir).into(),
                proto: proto_name(k.proto),
                src: fmt(s, k.sport),
                dst: fmt(d, k.dport),
                local: snap.identity_name(v.local_id),
                peer: snap.identity_name(v.peer_id),
                state: ct_state_name(k.proto, v.state).into(),
                map: name.into(),
                age_s: now.saturating_sub(v.created_ns) / 1_000_000_000,
                idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                expires_in_s: crate::conntrack_gc::ct_remaining_s(&cfg, k.proto, &v, now),
                epoch: v.epoch,
                reason: Reason::from_u8(v.reason).map(|r| r.name()).unwrap_or("?").into(),
            });
        }
    }
    Ok(rows)
}

#[derive(Serialize)]
pub struct CounterRow {
    pub direction: String,
    pub verdict: String,
    pub reason: String,
    pub packets: u64,
}

pub fn counters(maps: &PinnedMaps, drops_only: bool) -> Result<Vec<CounterRow>> {
    let c = maps.counters()?;
    let mut rows = vec![];
    for dir in [DIR_INGRESS, DIR_EGRESS] {
        for r in Reason::ALL {
            if drops_only && !r.is_drop() {
                continue;
            }
            rows.push(CounterRow {
                direction: direction_name(dir).into(),
                verdict: if r.is_drop() { "drop".into() } else { "allow".into() },
                reason: r.name().into(),
                packets: c[counter_index(dir, r as u8) as usize],
            });
        }
    }
    Ok(rows)
}

#[derive(Default)]
pub struct DropFilter {
    pub identity: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub reason: Option<String>,
    pub all_verdicts: bool,
}

impl DropFilter {
    pub fn matches(&self, e: &EventRecord) -> bool {
        if !self.all_verdicts && e.verdict != "drop" {
            return false;
        }
        let sides = [&e.src, &e.dst];
        if let Some(id) = &self.identity {
            if !sides.iter().any(|s| &s.spiffe_id == id || s.identity.to_string() == *id) {
                return false;
            }
        }
        if let Some(ns) = &self.namespace {
            if !sides.iter().any(|s| s.pod.as_deref().is_some_and(|p| p.split('/').next() == Some(ns.as_str()))) {
                return false;
            }
        }
        if let Some(pod) = &self.pod {
            if !sides.iter().any(|s| s.pod.as_deref().is_some_and(|p| p == pod || p.split('/').nth(1) == Some(pod.as_str()))) {
                return false;
            }
        }
        if let Some(r) = &self.reason {
            if &e.reason != r {
                return false;
            }
        }
        true
    }
}

/// Streams live events from the agent; stops after `count` matches or `timeout`.
pub fn follow(socket: &Path, filter: &DropFilter, json: bool, count: Option<usize>, timeout: Option<Duration>, out: &mut impl Write) -> Result<usize> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to the agent at {} (live drops need the agent)", socket.display()))?;
    s.write_all(b"events\n")?;
    let start = Instant::now();
    if let Some(t) = timeout {
        s.set_read_timeout(Some(t))?;
    }
    let mut n = 0;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    loop {
        if let Some(t) = timeout {
            let left = t.checked_sub(start.elapsed()).unwrap_or_default();
            if left.is_zero() {
                break;
            }
            reader.get_ref().set_read_timeout(Some(left))?;
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e.into()),
        }
        let Ok(ev) = serde_json::from_str::<EventRecord>(&line) else { continue };
        if !filter.matches(&ev) {
            continue;
        }
        if json {
            writeln!(out, "{}", line.trim_end())?;
        } else {
            writeln!(out, "{ev}")?;
        }
        out.flush()?;
        n += 1;
        if count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(n)
}
