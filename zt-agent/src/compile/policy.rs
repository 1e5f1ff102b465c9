//! Rules -> LPM policy entries, with deny beating allow.
//!
//! The datapath looks up (local, peer) and (local, ANY), each returning its longest
//! match, and denies if either says deny. An allow can therefore only be shadowed
//! wrongly by being *longer* than a deny that covers it: such allows (same local and
//! direction, peer equal or the deny's peer ANY, key range inside the deny's) are
//! dropped. An equal key with both verdicts is a deny.
//!
//! `authentication: required` (POLICY_FLAG_AUTH_REQUIRED) follows allow semantics: an
//! allow is an allow, so a flow some rule allows without authentication needs none. An
//! equal key keeps the flag only if every allow there has it, and a longer entry loses it
//! when a plain allow of the same peer covers it (the kernel sees only the longest match;
//! across the exact and the any-peer entry it ANDs the flag itself).

use std::collections::{BTreeMap, BTreeSet};

use zt_common::{PolicyKey, PolicyValue, IDENTITY_ANY, POLICY_FLAG_AUTH_REQUIRED, POLICY_FLAG_HTTP, VERDICT_ALLOW, VERDICT_DENY};

const PROTO_TCP: u8 = 6;

use super::ports::{blocks, Block, PortMatch};
use super::{Ctx, Peers, Rule};
use crate::model::Pod;
use crate::state::{Action, PolicyEntryKey};

/// (local, dir, peer, block)
type Key = (u32, u8, u32, Block);

pub(crate) fn entries(ctx: &Ctx<'_>, rules: &[Rule]) -> BTreeMap<PolicyEntryKey, PolicyValue> {
    let mut map: BTreeMap<Key, (Action, u32, bool)> = BTreeMap::new();
    // Entries whose every allow carries HTTP rules (POLICY_FLAG_HTTP); an L4-only allow
    // of the same key lets every request through, so the flag needs all of them.
    let mut http: BTreeMap<Key, bool> = BTreeMap::new();
    let mut put = |key: Key, action: Action, rule_id: u32, auth: bool, with_http: bool| {
        let h = http.entry(key).or_insert(with_http);
        *h &= with_http;
        let v = map.entry(key).or_insert((action, rule_id, auth));
        // Deny wins; among equals the first rule (lowest id) names the entry, except
        // that a plain allow names it over one requiring authentication (it decides).
        if action == Action::Deny && v.0 == Action::Allow {
            *v = (action, rule_id, false);
        } else if action == Action::Allow && v.0 == Action::Allow && v.2 && !auth {
            *v = (action, rule_id, false);
        }
    };

    for r in rules {
        let peers: Vec<u32> = match &r.peers {
            Peers::Any => vec![IDENTITY_ANY],
            Peers::Ids(ids) => ids.iter().copied().collect(),
        };
        let ports = if r.ports.is_empty() {
            vec![PortMatch::AnyProto]
        } else {
            r.ports.clone()
        };
        for &local in &r.subjects {
            for m in &ports {
                if let PortMatch::Named { proto, name } = m {
                    for (peer, port) in named(ctx, r, local, &peers, *proto, name) {
                        put(
                            (local, r.dir, peer, Block::port(*proto, port)),
                            r.action,
                            r.id,
                            r.auth,
                            r.http.is_some(),
                        );
                    }
                    continue;
                }
                for b in blocks(m) {
                    for &peer in &peers {
                        put((local, r.dir, peer, b), r.action, r.id, r.auth, r.http.is_some() && b.proto == PROTO_TCP);
                    }
                }
            }
        }
    }

    prune(&mut map);
    plain_allows_win(&mut map);
    map.into_iter()
        .map(|(key, (action, rule_id, auth))| {
            let (local, dir, peer, b) = key;
            let http = action == Action::Allow && http.get(&key) == Some(&true);
            let verdict = if action == Action::Deny {
                VERDICT_DENY
            } else {
                VERDICT_ALLOW
            };
            (
                PolicyEntryKey {
                    prefix_len: b.prefix,
                    key: PolicyKey::new(local, peer, dir, b.proto, b.port),
                },
                PolicyValue {
                    verdict,
                    flags: if auth { POLICY_FLAG_AUTH_REQUIRED } else { 0 } | if http { POLICY_FLAG_HTTP } else { 0 },
                    _pad: [0; 2],
                    rule_id,
                },
            )
        })
        .collect()
}

/// An allow requiring authentication that a plain allow of the same local, direction and
/// peer covers needs none: the plain one allows the flow already.
fn plain_allows_win(map: &mut BTreeMap<Key, (Action, u32, bool)>) {
    let mut plain: BTreeMap<(u32, u8, u32), Vec<Block>> = BTreeMap::new();
    for ((local, dir, peer, b), (a, _, auth)) in map.iter() {
        if *a == Action::Allow && !*auth {
            plain.entry((*local, *dir, *peer)).or_default().push(*b);
        }
    }
    for ((local, dir, peer, b), (a, _, auth)) in map.iter_mut() {
        if *a == Action::Allow && *auth && plain.get(&(*local, *dir, *peer)).is_some_and(|bs| bs.iter().any(|pb| pb.covers(b))) {
            *auth = false;
        }
    }
}

/// Remove allows that a deny of the same local and direction covers.
fn prune(map: &mut BTreeMap<Key, (Action, u32, bool)>) {
    let mut denies: BTreeMap<(u32, u8), Vec<(u32, Block)>> = BTreeMap::new();
    for ((local, dir, peer, b), (a, _, _)) in map.iter() {
        if *a == Action::Deny {
            denies.entry((*local, *dir)).or_default().push((*peer, *b));
        }
    }
    map.retain(|(local, dir, peer, b), (a, _, _)| {
        *a == Action::Deny
            || !denies.get(&(*local, *dir)).is_some_and(|ds| {
                ds.iter()
                    .any(|(dp, db)| (*dp == *peer || *dp == IDENTITY_ANY) && db.covers(b))
            })
    });
}

/// Resolve a named port: on ingress it is a port of the local pods, on egress a port
/// of the peer pods (for "any peer": every workload having it). Returns (peer, port);
/// a name that resolves to nothing yields nothing.
fn named(
    ctx: &Ctx<'_>,
    r: &Rule,
    local: u32,
    peers: &[u32],
    proto: u8,
    name: &str,
) -> BTreeSet<(u32, u16)> {
    let ports_of = |id: u32| -> BTreeSet<u16> {
        ctx.workloads
            .get(&id)
            .map(|w| container_ports(ctx.pods_of(w), name, proto))
            .unwrap_or_default()
    };
    let mut out = BTreeSet::new();
    if r.dir == zt_common::DIR_INGRESS {
        let ports = ports_of(local);
        for &peer in peers {
            out.extend(ports.iter().map(|p| (peer, *p)));
        }
    } else if peers == [IDENTITY_ANY] {
        for id in ctx.workloads.keys() {
            out.extend(ports_of(*id).into_iter().map(|p| (*id, p)));
        }
    } else {
        for &peer in peers {
            out.extend(ports_of(peer).into_iter().map(|p| (peer, p)));
        }
    }
    out
}

/// Numbers of the container ports called `name` with protocol `proto` (init
/// containers included: sidecars are init containers).
pub(crate) fn container_ports<'p>(pods: impl Iterator<Item = &'p Pod>, name: &str, proto: u8) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for pod in pods {
        let Some(spec) = &pod.spec else { continue };
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            for p in c.ports.iter().flatten() {
                let same_proto =
                    crate::model::k8s::protocol_number(p.protocol.as_deref()) == Some(proto);
                if p.name.as_deref() == Some(name) && same_proto {
                    if let Ok(n) = u16::try_from(p.container_port) {
                        out.insert(n);
                    }
                }
            }
        }
    }
    out
}
