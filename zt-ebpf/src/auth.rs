//! Authentication (issue 10): a new flow whose allowing policy entry requires it
//! (`POLICY_FLAG_AUTH_REQUIRED`) passes only if the peer's identity is proven for the node
//! the peer's address is on: `ZT_AUTH_PROOFS[(node, identity)]` holds an expiry still
//! ahead on CLOCK_BOOTTIME. The agent writes the proofs (its own node's pods, and what
//! peers proved over their node channels) and bumps the policy epoch when one is
//! withdrawn, so that tracked flows are judged again (`policy::decide`). Only new and
//! re-verified flows come here: an established flow costs nothing more.
use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, macros::map, maps::HashMap};
use zt_common::*;

use crate::{maps::ENDPOINTS, parse::Flow, policy::Hook};

/// (node, identity) -> expiry: see zt-common `auth.rs`.
#[map(name = "ZT_AUTH_PROOFS")]
pub static PROOFS: HashMap<AuthProofKey, AuthProofValue> = HashMap::pinned(DEFAULT_AUTH_PROOFS_MAX, 0);

/// Whether the flow's peer (the hook says which address) is proven as `identity`.
/// Inlined into its one caller: a frame of its own would push the deepest call chain of
/// the cgroup programs past the verifier's 512-byte combined stack.
#[inline(always)]
pub fn proven(hook: &Hook, f: &Flow, identity: u32) -> bool {
    let peer = if hook.dir == DIR_INGRESS { &f.saddr } else { &f.daddr };
    proven_addr(peer, identity)
}

/// The address is a workload endpoint of `identity` and a proof of that identity from
/// its node has not expired.
#[inline(always)]
fn proven_addr(addr: &[u8; 16], identity: u32) -> bool {
    let ep = match unsafe { ENDPOINTS.get(&EndpointKey { addr: *addr }) } {
        Some(ep) if ep.identity == identity && identity >= IDENTITY_FIRST_WORKLOAD => *ep,
        _ => return false,
    };
    let node = ep.auth_node();
    if node == AUTH_NODE_UNKNOWN {
        return false;
    }
    match unsafe { PROOFS.get(&AuthProofKey { node, identity }) } {
        Some(p) => {
            let now = unsafe { bpf_ktime_get_boot_ns() };
            now < p.expires_ns
        }
        None => false,
    }
}
