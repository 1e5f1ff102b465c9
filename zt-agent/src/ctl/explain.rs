//! `ztctl explain`: the policy trace of one flow, read from the pinned maps in the
//! kernel's own lookup order (see ARCHITECTURE.md), so that it tells what the datapath
//! would do now, and names the rule behind the verdict.
use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use aya::maps::lpm_trie::Key;
use serde::Serialize;
use zt_common::*;

use crate::{
    events::{direction_name, Snapshot},
    net::to_key,
    pins::PinnedMaps,
};

#[derive(Debug, Serialize)]
pub struct Check {
    /// Whose policy: the source's egress or the destination's ingress.
    pub hook: String,
    pub local: String,
    pub peer: String,
    pub verdict: String,
    pub reason: String,
    pub rule: Option<String>,
    /// The lookups made, in order, with what each found.
    pub trace: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub port: u16,
    pub verdict: String,
    pub checks: Vec<Check>,
}

/// Parses `tcp/80`, `udp/53`, `sctp/9000`, `icmp/8`, `icmpv6/128`.
pub fn parse_proto_port(s: &str) -> Result<(u8, u16)> {
    let (p, port) = s.split_once('/').with_context(|| format!("{s:?}: expected PROTO/PORT, e.g. tcp/80 or icmp/8"))?;
    let proto = match p.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        "icmp" => 1,
        "icmpv6" => 58,
        other => bail!("{s:?}: unknown protocol {other:?} (tcp, udp, sctp, icmp, icmpv6)"),
    };
    let port: u16 = port.parse().with_context(|| format!("{s:?}: port {port:?} is not a number 0-65535"))?;
    Ok((proto, port))
}

/// An IP, a pod as `namespace/name`, or a SPIFFE ID (the first pod carrying it).
pub fn resolve(maps: &PinnedMaps, snap: &Snapshot, who: &str) -> Result<IpAddr> {
    if let Ok(ip) = who.parse::<IpAddr>() {
        return Ok(ip);
    }
    if who.starts_with("spiffe://") {
        for (ip, _) in snap.pods.iter() {
            if let Ok(ep) = maps.endpoints.get(&EndpointKey { addr: to_key(*ip) }, 0) {
                if snap.identities.get(&ep.identity).is_some_and(|i| i.spiffe_id == who) {
                    return Ok(*ip);
                }
            }
        }
        bail!("{who:?}: no pod with this SPIFFE ID");
    }
    let (ns, name) = who.split_once('/').with_context(|| format!("{who:?}: expected an IP, namespace/pod or a SPIFFE ID"))?;
    snap.pods.iter().find(|(_, p)| p.namespace == ns && p.name == name).map(|(ip, _)| *ip).with_context(|| format!("{who:?}: no such pod with an IP"))
}

fn peer_identity(maps: &PinnedMaps, ip: IpAddr, trace: &mut Vec<String>) -> u32 {
    if let Ok(ep) = maps.endpoints.get(&EndpointKey { addr: to_key(ip) }, 0) {
        trace.push(format!("ZT_ENDPOINTS[{ip}] -> identity {}", ep.identity));
        return ep.identity;
    }
    match maps.cidrs.get(&Key::new(128, CidrKey { addr: to_key(ip) }), 0) {
        Ok(c) => {
            trace.push(format!("ZT_ENDPOINTS[{ip}] -> none; ZT_CIDRS[{ip}] -> identity {}", c.identity));
            c.identity
        }
        Err(_) => {
            trace.push(format!("ZT_ENDPOINTS[{ip}] -> none; ZT_CIDRS[{ip}] -> none: world"));
            IDENTITY_WORLD
        }
    }
}

/// The flow as one hook sees it.
struct Flow {
    local: IpAddr,
    peer: IpAddr,
    dir: u8,
    proto: u8,
    port: u16,
}

fn check(maps: &PinnedMaps, cfg: &Config, snap: &Snapshot, f: Flow) -> Option<Check> {
    let Flow { local, peer, dir, proto, port } = f;
    let ep = maps.endpoints.get(&EndpointKey { addr: to_key(local) }, 0).ok()?;
    if ep.flags & EP_LOCAL == 0 {
        return None;
    }
    let mut trace = vec![format!("ZT_ENDPOINTS[{local}] -> identity {} flags {:#x} ifindex {}", ep.identity, ep.flags, ep.ifindex)];
    let peer_id = peer_identity(maps, peer, &mut trace);
    let fail_closed = |reason: Reason, why: &str, mut trace: Vec<String>| {
        trace.push(why.to_string());
        Some(Check {
            hook: format!("{} of {local}", direction_name(dir)),
            local: snap.identity_name(IDENTITY_INIT),
            peer: snap.identity_name(peer_id),
            verdict: "drop".into(),
            reason: reason.name().into(),
            rule: None,
            trace,
        })
    };
    if cfg.flags & CONFIG_READY == 0 {
        return fail_closed(Reason::DropNotReady, "the datapath is not ready (the agent has not written a full state)", trace);
    }
    if ep.ifindex == 0 {
        if ep.identity == IDENTITY_INIT {
            return fail_closed(Reason::DropInitialising, "not hooked and not attributable (init): the cgroup programs drop it as initialising", trace);
        }
        // The cgroup programs (when attached) judge a known, not yet hooked pod's own
        // traffic by its policy, as below.
        trace.push("the pod's host interface is not hooked yet: its own traffic is judged by the cgroup programs".to_string());
    }
    if ep.identity == IDENTITY_INIT {
        return fail_closed(Reason::DropUnknownEndpoint, "the address cannot be attributed to one pod (init): fail closed", trace);
    }
    let mk = |verdict: &str, reason: Reason, rule: u32, trace: Vec<String>| Check {
        hook: format!("{} of {}", direction_name(dir), snap.identity_name(ep.identity)),
        local: snap.identity_name(ep.identity),
        peer: snap.identity_name(peer_id),
        verdict: verdict.into(),
        reason: reason.name().into(),
        rule: snap.rule_name(rule),
        trace,
    };
    let host_probe = dir == DIR_INGRESS && peer_id == IDENTITY_HOST && cfg.flags & CONFIG_ALLOW_HOST != 0;
    if dir == DIR_INGRESS && peer_id == IDENTITY_HOST {
        trace.push("host only for the node's own sockets: if the node forwarded this (masquerade, SNAT), the peer is judged by CIDR rules instead".into());
    }
    if dir == DIR_EGRESS && (peer_id == IDENTITY_HOST || peer_id == IDENTITY_REMOTE_NODE) && is_tunnel(maps, proto, port) {
        trace.push(format!("ZT_TUNNELS[proto {proto}, port {port}] -> a tunnel endpoint of a node: only an explicit allow passes"));
        let mut allowed = None;
        for pid in [peer_id, IDENTITY_ANY] {
            if let Ok(v) = maps.policy.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(ep.identity, pid, dir, proto, port)), 0) {
                trace.push(format!("ZT_POLICY[{} <- {pid}, egress, proto {proto}, port {port}] -> verdict {}", ep.identity, v.verdict));
                if v.verdict == VERDICT_DENY {
                    return Some(mk("drop", Reason::DropPolicyDeny, v.rule_id, trace));
                }
                if v.verdict == VERDICT_ALLOW {
                    allowed = allowed.or(Some(v.rule_id));
                }
            }
        }
        if let Some(rule) = allowed {
            return Some(mk("allow", Reason::AllowPolicy, rule, trace));
        }
        trace.push("no rule names it".into());
        return Some(mk("drop", Reason::DropTunnel, 0, trace));
    }
    if ep.flags & enforce_flag(dir) == 0 {
        trace.push(format!("no policy selects this endpoint for {}: not isolated", direction_name(dir)));
        let reason = if host_probe { Reason::AllowHost } else { Reason::AllowNoPolicy };
        return Some(mk("allow", reason, 0, trace));
    }
    let mut found = [(0u8, 0u32, 0u8); 2];
    for (i, pid) in [peer_id, IDENTITY_ANY].into_iter().enumerate() {
        let k = Key::new(POLICY_PREFIX_FULL, PolicyKey::new(ep.identity, pid, dir, proto, port));
        let who = if pid == IDENTITY_ANY { "any".to_string() } else { pid.to_string() };
        match maps.policy.get(&k, 0) {
            Ok(v) => {
                trace.push(format!(
                    "ZT_POLICY[{} <- {who}, {}, proto {proto}, port {port}] -> {} (rule {})",
                    ep.identity,
                    direction_name(dir),
                    if v.verdict == VERDICT_DENY { "deny" } else { "allow" },
                    snap.rule_name(v.rule_id).unwrap_or_default()
                ));
                found[i] = (v.verdict, v.rule_id, v.flags);
            }
            Err(_) => trace.push(format!("ZT_POLICY[{} <- {who}, {}, proto {proto}, port {port}] -> none", ep.identity, direction_name(dir))),
        }
    }
    if let Some((_, r, _)) = found.iter().find(|(v, _, _)| *v == VERDICT_DENY) {
        return Some(mk("drop", Reason::DropPolicyDeny, *r, trace));
    }
    if host_probe {
        trace.push("peer is the host and it may reach every port (--host-access all), no deny names it".into());
        return Some(mk("allow", Reason::AllowHost, 0, trace));
    }
    if let Some((_, r, _)) = found.iter().find(|(v, _, _)| *v == VERDICT_ALLOW) {
        // Authentication only if every allowing entry requires it (as the kernel ANDs).
        let auth = found.iter().all(|(v, _, f)| *v != VERDICT_ALLOW || f & POLICY_FLAG_AUTH_REQUIRED != 0);
        if auth {
            if crate::ctl::auth::explain_step(maps, peer, peer_id, &mut trace) {
                return Some(mk("allow", Reason::AllowAuthenticated, *r, trace));
            }
            return Some(mk("drop", Reason::DropAuthRequired, *r, trace));
        }
        return Some(mk("allow", Reason::AllowPolicy, *r, trace));
    }
    if dir == DIR_EGRESS && ep.flags & EP_FQDN != 0 && (peer_id == IDENTITY_WORLD || peer_id & IDENTITY_CIDR_FLAG != 0) {
        if let Some(rule) = crate::ctl::fqdn::explain_step(maps, snap, ep.identity, peer, (proto, port), &mut trace) {
            return Some(mk("allow", Reason::AllowFqdn, rule, trace));
        }
    }
    trace.push("no rule allows it: default deny".into());
    Some(mk("drop", Reason::DropPolicyDefault, 0, trace))
}

fn is_tunnel(maps: &PinnedMaps, proto: u8, port: u16) -> bool {
    maps.tunnels.get(&tunnel_key(proto, port), 0).is_ok() || maps.tunnels.get(&tunnel_key(proto, 0), 0).is_ok()
}

pub fn explain(maps: &PinnedMaps, snap: &Snapshot, src: &str, dst: &str, proto_port: &str) -> Result<Explanation> {
    let (proto, port) = parse_proto_port(proto_port)?;
    let s = resolve(maps, snap, src)?;
    let d = resolve(maps, snap, dst)?;
    if s.is_ipv4() != d.is_ipv4() {
        bail!("{src} ({s}) and {dst} ({d}) are of different address families");
    }
    let cfg = maps.read_config()?;
    let mut checks = vec![];
    checks.extend(check(maps, &cfg, snap, Flow { local: s, peer: d, dir: DIR_EGRESS, proto, port }));
    checks.extend(check(maps, &cfg, snap, Flow { local: d, peer: s, dir: DIR_INGRESS, proto, port }));
    // Ports with HTTP rules: the proxy's step (crate::ctl::l7), after both sides allowed.
    if proto == 6 && !checks.is_empty() && checks.iter().all(|c| c.verdict == "allow") {
        checks.extend(crate::ctl::l7::http_step(maps, snap, s, d, port, &checks));
    }
    let verdict = if checks.is_empty() {
        "not judged on this node"
    } else if checks.iter().any(|c| c.verdict == "drop") {
        "drop"
    } else if checks.iter().any(|c| c.verdict == "http") {
        "http-rules"
    } else {
        "allow"
    };
    Ok(Explanation { src: format!("{src} ({s})"), dst: format!("{dst} ({d})"), proto: crate::events::proto_name(proto), port, verdict: verdict.into(), checks })
}

/// A flow to a Service frontend, as the socket programs translate it: one explanation per
/// backend the connect may land on.
#[derive(Debug, Serialize)]
pub struct ServiceExplanation {
    pub src: String,
    pub service: String,
    pub frontend: String,
    /// Whether the pods' sockets are translated (the socket programs at the cgroup root);
    /// without them the flow reaches kube-proxy untranslated.
    pub translated: bool,
    /// allow: every backend allows it; drop: none does, or there is no backend (the
    /// connect is refused); partial: it depends on the backend the connect picks.
    pub verdict: String,
    pub backends: Vec<Explanation>,
    /// The packet hooks' judgement of the flow when no socket hook translated it
    /// (translation off, a raw socket): against every backend, as the Service's identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub untranslated: Option<Check>,
}

/// `ns/name:port` of a Service, or None if `dst` is not written that way.
fn service_ref(dst: &str) -> Option<(&str, &str, u16)> {
    let (ns, rest) = dst.split_once('/')?;
    let (name, port) = rest.rsplit_once(':')?;
    Some((ns, name, port.parse().ok()?))
}

/// `ztctl explain SRC DST PROTO[/PORT]` where DST is a Service port (`default/httpbin:8000`)
/// or a frontend address with its port: the translation step, then the verdict per
/// backend. None when DST is neither (the caller explains a plain flow).
pub fn explain_service(
    maps: &PinnedMaps,
    bpffs_root: &std::path::Path,
    snap: &Snapshot,
    src: &str,
    dst: &str,
    proto_port: &str,
) -> Result<Option<ServiceExplanation>> {
    // The protocol is checked first, as `explain` does.
    let (proto, port) = match proto_port.split_once('/') {
        Some(_) => {
            let (p, n) = parse_proto_port(proto_port)?;
            (p, Some(n))
        }
        None => (parse_proto_port(&format!("{proto_port}/0"))?.0, None),
    };
    let s = resolve(maps, snap, src)?;
    let table = &snap.services;
    let same_family = |a: &IpAddr| a.is_ipv4() == s.is_ipv4();
    let found = match (service_ref(dst), dst.parse::<IpAddr>()) {
        (Some((ns, name, sport)), _) => {
            if port.is_some_and(|p| p != sport) {
                bail!("{dst}: the Service port is {sport}, but {proto_port} names port {}", port.unwrap_or(0));
            }
            let f = table.frontends.iter().find(|(f, e)| {
                e.service == (ns.to_string(), name.to_string())
                    && f.port == sport
                    && f.proto == proto
                    && same_family(&f.addr)
                    && e.kind == crate::services::FrontendKind::ClusterIp
            });
            match f {
                Some(f) => f,
                None => bail!("{dst} {}: no such Service port on this node (ztctl services lists them)", crate::services::proto_name(proto)),
            }
        }
        (None, Ok(ip)) => {
            let Some(p) = port else { bail!("{proto_port}: a frontend address needs PROTO/PORT") };
            let key = crate::services::Frontend { addr: ip.to_canonical(), port: p, proto };
            match table.frontends.get_key_value(&key) {
                Some(f) => f,
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    let (frontend, entry) = found;
    let pp = |port: u16| format!("{}/{port}", crate::events::proto_name(proto).to_ascii_lowercase());
    let mut backends = vec![];
    for b in &entry.backends {
        backends.push(explain(maps, snap, src, &b.addr.to_string(), &pp(b.port))?);
    }
    let allowed = backends.iter().filter(|e| e.verdict == "allow").count();
    let verdict = if backends.is_empty() || allowed == 0 {
        "drop"
    } else if allowed == backends.len() {
        "allow"
    } else {
        "partial"
    };
    let translated = crate::cgroup_link::translation_attached(bpffs_root);
    let untranslated = untranslated_check(maps, bpffs_root, snap, s, frontend)?;
    // Untranslated, the source's hooks judge the Service first; the backends' own hooks
    // judge what kube-proxy's DNAT then delivers.
    let verdict = if !translated && untranslated.as_ref().is_some_and(|c| c.verdict == "drop") { "drop" } else { verdict };
    Ok(Some(ServiceExplanation {
        src: format!("{src} ({s})"),
        service: format!(
            "{}/{} port {} ({})",
            entry.service.0,
            entry.service.1,
            frontend.port,
            if entry.port_name.is_empty() { "unnamed" } else { &entry.port_name }
        ),
        frontend: frontend.to_string(),
        translated,
        verdict: verdict.into(),
        backends,
        untranslated,
    }))
}

/// As zt-ebpf policy.rs judges an egress flow to a frontend that reached a packet hook
/// untranslated: the Service identity the frontend carries, then one exact entry the
/// agent wrote only if every backend is allowed. None if `src` is no local endpoint.
fn untranslated_check(maps: &PinnedMaps, bpffs_root: &std::path::Path, snap: &Snapshot, src: IpAddr, fe: &crate::services::Frontend) -> Result<Option<Check>> {
    let Ok(ep) = maps.endpoints.get(&EndpointKey { addr: to_key(src) }, 0) else { return Ok(None) };
    if ep.flags & EP_LOCAL == 0 {
        return Ok(None);
    }
    let frontends: aya::maps::HashMap<aya::maps::MapData, SvcFrontendKey, SvcFrontendValue> =
        crate::pins::open_map(bpffs_root, MAP_SVC_FRONTENDS)?.try_into().context("ZT_SVC_FRONTENDS")?;
    let fkey = SvcFrontendKey { addr: to_key(fe.addr), port: fe.port, proto: fe.proto, _pad: 0 };
    let Ok(fv) = frontends.get(&fkey, 0) else { return Ok(None) };
    let svc_id = fv.identity;
    let mut trace =
        vec![format!("ZT_ENDPOINTS[{src}] -> identity {} flags {:#x}", ep.identity, ep.flags), format!("ZT_SVC_FRONTENDS[{fe}] -> Service identity {svc_id}")];
    let mk = |verdict: &str, reason: Reason, rule: u32, trace: Vec<String>| Check {
        hook: format!("egress of {} (untranslated)", snap.identity_name(ep.identity)),
        local: snap.identity_name(ep.identity),
        peer: snap.identity_name(svc_id),
        verdict: verdict.into(),
        reason: reason.name().into(),
        rule: snap.rule_name(rule),
        trace,
    };
    if ep.flags & EP_ENFORCE_EGRESS == 0 {
        trace.push("egress not isolated: allowed".into());
        return Ok(Some(mk("allow", Reason::AllowNoPolicy, 0, trace)));
    }
    let key = Key::new(POLICY_PREFIX_FULL, PolicyKey::new(ep.identity, svc_id, DIR_EGRESS, fe.proto, fe.port));
    match maps.policy.get(&key, 0) {
        Ok(v) if v.verdict == VERDICT_ALLOW => {
            trace.push(format!("ZT_POLICY[{} <- {svc_id}, egress, proto {}, port {}] -> allow: every backend is allowed", ep.identity, fe.proto, fe.port));
            Ok(Some(mk("allow", Reason::AllowService, v.rule_id, trace)))
        }
        _ => {
            trace.push(format!("ZT_POLICY[{} <- {svc_id}, egress, proto {}, port {}] -> none: not every backend is allowed", ep.identity, fe.proto, fe.port));
            Ok(Some(mk("drop", Reason::DropService, 0, trace)))
        }
    }
}
