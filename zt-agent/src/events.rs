//! Datapath events as user space shows them: the kernel's `Event` with both sides
//! resolved to SPIFFE IDs and pods, the rule named. The agent reads the ring buffer
//! and serves these over the admin socket to `ztctl drops`.
use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use zt_common::*;

use crate::{
    net::from_key,
    state::{IdentityInfo, PodRef, RuleInfo},
};

/// What user space knows about identities, pods and rules; the agent writes it to
/// `<state-dir>/state.json` so that ztctl can name things when the agent is down.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub node_name: String,
    pub identities: BTreeMap<u32, IdentityInfo>,
    pub pods: BTreeMap<IpAddr, PodRef>,
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Local identity -> FQDN slot -> rule id: which rules a learned entry's slots name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fqdn_slots: BTreeMap<u32, BTreeMap<u8, u32>>,
    /// Service frontends and their backends as this node sees them (`ztctl services`).
    #[serde(default, skip_serializing_if = "crate::services::ServiceTable::is_empty")]
    pub services: crate::services::ServiceTable,
    /// Objects that failed closed and the local identities they isolate (`ztctl failures`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<crate::state::Failure>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Side {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: u32,
    pub spiffe_id: String,
    pub pod: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EventRecord {
    pub time_ns: u64,
    pub direction: String,
    pub verdict: String,
    pub reason: String,
    pub proto: String,
    pub src: Side,
    pub dst: Side,
    pub rule: Option<String>,
    pub ifindex: u32,
    /// A request the L7 proxy judged (l7/): proto is `HTTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpEvent>,
}

/// What the proxy saw of one request and answered.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HttpEvent {
    pub method: String,
    /// The normalised path (as judged); the raw target when it could not be normalised.
    pub path: String,
    /// The status the proxy answered (403, 400) or the server's.
    pub status: u16,
    /// The HTTP rule that allowed it (`GET /headers`), if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

pub fn direction_name(dir: u8) -> &'static str {
    if dir == DIR_INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

pub fn proto_name(p: u8) -> String {
    match p {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        n => format!("proto-{n}"),
    }
}

impl Snapshot {
    pub fn identity_name(&self, id: u32) -> String {
        match self.identities.get(&id) {
            Some(i) => i.spiffe_id.clone(),
            None => reserved_name(id).map(|n| format!("reserved:{n}")).unwrap_or_else(|| format!("identity {id}")),
        }
    }

    pub fn rule_name(&self, id: u32) -> Option<String> {
        if id == 0 {
            return None;
        }
        Some(match self.rules.get(&id) {
            Some(r) => format!("{} {}", r.source, r.path),
            None => format!("rule {id}"),
        })
    }

    pub fn record(&self, e: &Event) -> EventRecord {
        let (src_id, dst_id) = if e.dir == DIR_INGRESS { (e.peer_id, e.local_id) } else { (e.local_id, e.peer_id) };
        let side = |addr: [u8; 16], port: u16, id: u32| {
            let ip = from_key(addr);
            Side {
                ip,
                port,
                identity: id,
                spiffe_id: self.identity_name(id),
                pod: self.pods.get(&ip).map(|p| format!("{}/{}", p.namespace, p.name)),
            }
        };
        EventRecord {
            time_ns: e.ts_ns,
            direction: direction_name(e.dir).into(),
            verdict: if e.verdict == VERDICT_DENY { "drop".into() } else { "allow".into() },
            reason: Reason::from_u8(e.reason).map(|r| r.name().to_string()).unwrap_or_else(|| format!("reason-{}", e.reason)),
            proto: proto_name(e.proto),
            src: side(e.saddr, e.sport, src_id),
            dst: side(e.daddr, e.dport, dst_id),
            rule: self.rule_name(e.rule_id),
            ifindex: e.ifindex,
            http: None,
        }
    }
}

pub fn reserved_name(id: u32) -> Option<&'static str> {
    Some(match id {
        IDENTITY_ANY => "any",
        IDENTITY_HOST => "host",
        IDENTITY_WORLD => "world",
        IDENTITY_INIT => "init",
        IDENTITY_REMOTE_NODE => "remote-node",
        _ => return None,
    })
}

impl std::fmt::Display for EventRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = |s: &Side| {
            let who = s.pod.clone().unwrap_or_else(|| s.ip.to_string());
            format!("{who} [{}]:{} ({})", s.ip, s.port, s.spiffe_id)
        };
        write!(
            f,
            "{} {} {} {} -> {} reason={}",
            self.verdict.to_uppercase(),
            self.direction,
            self.proto,
            side(&self.src),
            side(&self.dst),
            self.reason
        )?;
        if let Some(h) = &self.http {
            write!(f, " http=\"{} {}\" status={}", h.method, h.path, h.status)?;
            if let Some(m) = &h.matched {
                write!(f, " matched=\"{m}\"")?;
            }
        }
        if let Some(r) = &self.rule {
            write!(f, " rule=\"{r}\"")?;
        }
        Ok(())
    }
}
