//! Authentication (issue 10): proofs that a node holds a workload identity's SVID key.
//! The agent that receives a proof over its node channel writes (node, identity) ->
//! expiry into `ZT_AUTH_PROOFS`; the kernel (zt-ebpf `auth.rs`) looks it up on a new flow
//! whose allowing policy entry carries `POLICY_FLAG_AUTH_REQUIRED`.
//!
//! Which node a peer address is on: a local pod (`EP_LOCAL`) is on this node
//! (`AUTH_NODE_SELF`, proven by the agent itself); for a pod of another node the
//! endpoint entry's `cgroup` field, unused for remote pods, holds its node's number
//! (`EndpointValue::auth_node`). Node numbers are `auth_node_id(node name)`, the same on
//! every agent and across restarts.

/// Hash `AuthProofKey -> AuthProofValue`, written by the agent.
pub const MAP_AUTH_PROOFS: &str = "ZT_AUTH_PROOFS";
pub const DEFAULT_AUTH_PROOFS_MAX: u32 = 65536;

/// No node known for the address: never proven.
pub const AUTH_NODE_UNKNOWN: u32 = 0;
/// This node: its pods' identities are proven by the agent itself.
pub const AUTH_NODE_SELF: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthProofKey {
    /// `AUTH_NODE_SELF` or `auth_node_id(name)` of the node that proved it.
    pub node: u32,
    /// The workload identity number (this node's numbering) of the proven SPIFFE ID.
    pub identity: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthProofValue {
    /// CLOCK_BOOTTIME nanoseconds (`bpf_ktime_get_boot_ns`) after which the proof no
    /// longer counts: a clock that setting the wall clock does not move.
    pub expires_ns: u64,
}

const _: () = {
    assert!(core::mem::size_of::<AuthProofKey>() == 8);
    assert!(core::mem::size_of::<AuthProofValue>() == 8);
};

/// The number of a node named `name` in proof keys and remote endpoint entries: FNV-1a
/// (32 bits) of the name, moved off the reserved 0 and 1. Two names with one number are
/// the agent's to detect (it then leaves both unknown: fail closed).
pub const fn auth_node_id(name: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < name.len() {
        h ^= name[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    if h <= AUTH_NODE_SELF {
        h + 2
    } else {
        h
    }
}

impl crate::EndpointValue {
    /// The node a peer with this entry is on, for proof lookups.
    #[inline(always)]
    pub const fn auth_node(&self) -> u32 {
        if self.flags & crate::EP_LOCAL != 0 {
            AUTH_NODE_SELF
        } else {
            self.cgroup
        }
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: repr(C), Copy, no padding, no pointers.
    unsafe impl aya::Pod for AuthProofKey {}
    unsafe impl aya::Pod for AuthProofValue {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_stable_and_never_reserved() {
        // FNV-1a test vectors: "" -> 0x811c9dc5, "a" -> 0xe40c292c.
        assert_eq!(auth_node_id(b""), 0x811c_9dc5);
        assert_eq!(auth_node_id(b"a"), 0xe40c_292c);
        assert_ne!(auth_node_id(b"node1"), auth_node_id(b"node2"));
        for n in 0..100_000u32 {
            assert!(auth_node_id(&n.to_le_bytes()) > AUTH_NODE_SELF);
        }
    }
}
