//! HTTP steering (issue 11): the kernel hands the flows of ports with HTTP rules to the
//! agent's transparent proxy (zt-ebpf `l7.rs`); map layouts shared with the agent
//! (`zt-agent/src/l7/`).

/// Sockmap `u32 -> socket`: slot 0 the proxy's IPv4 listener, slot 1 its IPv6 listener.
/// A closed socket leaves the map by itself, so a dead agent steers into nothing (drop).
pub const MAP_L7_LISTENER: &str = "ZT_L7_LISTENER";
/// Array[1] of `L7Config`, written by the agent.
pub const MAP_L7_CONFIG: &str = "ZT_L7_CONFIG";
pub const L7_LISTENER_V4: u32 = 0;
pub const L7_LISTENER_V6: u32 = 1;

/// Marks shared by the kernel, the proxy and the node's policy routing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct L7Config {
    /// `SO_MARK` of the proxy's sockets: a packet entering a pod with it comes from the
    /// proxy (pods cannot set it: a mark does not cross into the host's namespace).
    pub proxy_mark: u32,
    /// Set on steered packets; the node routes this mark to a local table
    /// (`ip rule add fwmark <steer_mark> lookup <table>`, `local default dev lo`).
    /// 0: steering is off (flows that need it drop as `http-proxy-down`).
    pub steer_mark: u32,
}
const _: () = assert!(core::mem::size_of::<L7Config>() == 8);

#[cfg(feature = "user")]
unsafe impl aya::Pod for L7Config {}
