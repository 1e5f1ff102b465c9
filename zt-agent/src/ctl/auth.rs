//! `ztctl auth` and the authentication step of `ztctl explain` (issue 10): what the
//! proofs map holds for a peer, read the way the kernel reads it (zt-ebpf `auth.rs`).
use std::net::IpAddr;

use zt_common::*;

use crate::{auth::boottime_ns, net::to_key, pins::PinnedMaps};

/// The kernel's proof lookup for a new flow whose allow requires authentication: the
/// peer address must be a workload endpoint of `peer_id`, on a known node, with an
/// unexpired proof of that identity from that node. Returns whether it is proven.
pub fn explain_step(maps: &PinnedMaps, peer: IpAddr, peer_id: u32, trace: &mut Vec<String>) -> bool {
    let ep = match maps.endpoints.get(&EndpointKey { addr: to_key(peer) }, 0) {
        Ok(ep) if ep.identity == peer_id && peer_id >= IDENTITY_FIRST_WORKLOAD => ep,
        _ => {
            trace.push(format!("authentication required: {peer} is no workload endpoint of identity {peer_id}: never proven"));
            return false;
        }
    };
    let node = ep.auth_node();
    let whose = if node == AUTH_NODE_SELF { "this node".to_string() } else { format!("node {node:#x}") };
    if node == AUTH_NODE_UNKNOWN {
        trace.push(format!("authentication required: the node of {peer} is not known (or shares its number with another): never proven"));
        return false;
    }
    let now = boottime_ns();
    match maps.auth_proofs.get(&AuthProofKey { node, identity: peer_id }, 0) {
        Ok(p) if now < p.expires_ns => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> proven for {}s more", (p.expires_ns - now) / 1_000_000_000));
            true
        }
        Ok(p) => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> expired {}s ago", (now - p.expires_ns) / 1_000_000_000));
            false
        }
        Err(_) => {
            trace.push(format!("ZT_AUTH_PROOFS[{whose}, identity {peer_id}] -> none: not proven"));
            false
        }
    }
}
