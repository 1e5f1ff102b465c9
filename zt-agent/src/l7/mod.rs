//! L7: HTTP method and path rules (issue 11). The kernel steers the flows of ports with
//! HTTP rules to this node's proxy (zt-ebpf/src/l7.rs, `bpf_sk_assign`); the proxy judges
//! each request on its normalised path and either forwards it transparently (from the
//! client's own address, marked so that the server's hook knows it) or answers 403.
//! - `normalise.rs`: request paths as judged
//! - `rules.rs`: the rule table the compiler builds
pub mod normalise;
pub mod rules;
