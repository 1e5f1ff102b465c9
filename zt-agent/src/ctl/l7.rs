//! `ztctl explain`'s HTTP step, as zt-ebpf/src/l7.rs decides it for a new TCP flow that
//! both sides allow: steered to this node's proxy when the source's deciding egress
//! entry, or (the source being a pod hooked here) the destination's deciding ingress
//! entry, carries POLICY_FLAG_HTTP; for a source on another node (a remote pod), steered
//! at this node's uplink (zt-ebpf/src/uplink.rs) when an uplink is hooked; refused
//! (`http-unsteered`) when only the destination's ingress entry does and the source is
//! neither a pod hooked on this node nor a pod of another node with an uplink hooked here.
//! For a server elsewhere, the proxy's upstream answers come back through an uplink.
use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use zt_common::*;

use super::explain::Check;
use crate::{events::Snapshot, net::to_key, pins::PinnedMaps};

/// The deciding allow entry (exact peer first, then any peer) and whether it is flagged.
fn deciding(maps: &PinnedMaps, local: u32, peer: u32, dir: u8, port: u16) -> Option<(bool, u32)> {
    for pid in [peer, IDENTITY_ANY] {
        if let Ok(v) = maps.policy.get(&Key::new(POLICY_PREFIX_FULL, PolicyKey::new(local, pid, dir, 6, port)), 0) {
            if v.verdict == VERDICT_ALLOW {
                return Some((v.flags & POLICY_FLAG_HTTP != 0, v.rule_id));
            }
        }
    }
    None
}

/// The HTTP step for `src -> dst tcp/port` after `checks` (egress then ingress) allowed it;
/// None when the flow stays in the kernel.
pub fn http_step(maps: &PinnedMaps, snap: &Snapshot, src: IpAddr, dst: IpAddr, port: u16, checks: &[Check]) -> Option<Check> {
    let ep = |ip: IpAddr| maps.endpoints.get(&EndpointKey { addr: to_key(ip) }, 0).ok();
    let (s, d) = (ep(src), ep(dst));
    let s_id = s.map(|e| e.identity).unwrap_or(IDENTITY_WORLD);
    let d_id = d.map(|e| e.identity).unwrap_or(IDENTITY_WORLD);
    let src_hooked = s.is_some_and(|e| e.flags & EP_LOCAL != 0 && e.ifindex != 0);
    let dst_local = d.is_some_and(|e| e.flags & EP_LOCAL != 0 && e.ifindex != 0);
    let egress_policy = checks.iter().any(|c| c.hook.starts_with("egress") && c.reason == Reason::AllowPolicy.name());
    let mut rules = vec![];
    let mut trace = vec![];
    if src_hooked && egress_policy {
        if let Some((true, r)) = deciding(maps, s_id, d_id, DIR_EGRESS, port) {
            trace.push(format!("ZT_POLICY[{s_id} <- {d_id}, egress, tcp/{port}] carries the HTTP flag"));
            if !dst_local {
                // The proxy's upstream answers arrive from outside, addressed to the client.
                let uplinks = crate::uplink::hooked(&maps.root);
                if uplinks.is_empty() {
                    trace.push("no uplink of this node is hooked (--uplink-interfaces): the server's answers to the proxy's upstream go to the client, not the proxy (allowed requests fail)".into());
                } else {
                    let names: Vec<&str> = uplinks.iter().map(|(_, n)| n.as_str()).collect();
                    trace.push(format!("the server's answers to the proxy's upstream arriving on an uplink ({}) go to the proxy's socket (zt_from_uplink)", names.join(", ")));
                }
            }
            rules.push(r);
        }
    }
    let ingress_policy = checks.iter().any(|c| c.hook.starts_with("ingress") && c.reason == Reason::AllowPolicy.name());
    if dst_local && ingress_policy {
        if let Some((true, r)) = deciding(maps, d_id, s_id, DIR_INGRESS, port) {
            trace.push(format!("ZT_POLICY[{d_id} <- {s_id}, ingress, tcp/{port}] carries the HTTP flag"));
            let src_remote_pod = s.is_some_and(|e| e.flags & EP_LOCAL == 0 && e.identity >= IDENTITY_FIRST_WORKLOAD);
            let uplinks = crate::uplink::hooked(&maps.root);
            if !src_hooked && src_remote_pod && !uplinks.is_empty() {
                let names: Vec<&str> = uplinks.iter().map(|(_, n)| n.as_str()).collect();
                trace.push(format!(
                    "the source is a pod of another node: its SYN arriving on an uplink ({}) is steered there (zt_from_uplink, http-steered)",
                    names.join(", ")
                ));
            } else if !src_hooked {
                trace.push("the source is no pod hooked on this node: its flow cannot have come through this node's proxy".into());
                if src_remote_pod {
                    trace.push("no uplink of this node is hooked (--uplink-interfaces): a pod of another node is not steered".into());
                }
                return Some(Check {
                    hook: "HTTP proxy".into(),
                    local: snap.identity_name(d_id),
                    peer: snap.identity_name(s_id),
                    verdict: "drop".into(),
                    reason: Reason::DropHttpUnsteered.name().into(),
                    rule: snap.rule_name(r),
                    trace,
                });
            }
            rules.push(r);
        }
    }
    if rules.is_empty() {
        return None;
    }
    trace.push("steered to this node's proxy (bpf_sk_assign); each request is judged on its normalised path:".into());
    for r in &rules {
        let info = snap.rules.get(r);
        let list = info.map(|i| i.http.join(", ")).unwrap_or_default();
        trace.push(format!("{} allows {list}", snap.rule_name(*r).unwrap_or_default()));
    }
    trace.push("any other request: 403 Forbidden (default deny); TLS, HTTP/2 or a malformed request: reset".into());
    Some(Check {
        hook: "HTTP proxy".into(),
        local: snap.identity_name(d_id),
        peer: snap.identity_name(s_id),
        verdict: "http".into(),
        reason: "http-rules".into(),
        rule: snap.rule_name(rules[0]),
        trace,
    })
}
