//! Addresses in the datapath's 16-byte form, and what the node's network namespace
//! says about interfaces: the CNI-agnostic way to find a pod's host interface is the
//! host route to its IP.
use std::net::{IpAddr, Ipv6Addr};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use zt_common::v4_mapped;

/// IPv4 as IPv4-mapped IPv6, IPv6 as is.
pub fn to_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

pub fn from_key(k: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(k);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Prefix length in the 128-bit key space (IPv4 /n is 96 + n).
pub fn key_prefix(ip: IpAddr, prefix: u8) -> u32 {
    match ip {
        IpAddr::V4(_) => 96 + prefix as u32,
        IpAddr::V6(_) => prefix as u32,
    }
}

#[derive(Deserialize)]
struct RouteGet {
    dev: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    gateway: Option<String>,
}

/// The interface the node routes `ip` through (the pod's host-side interface), if the
/// route is a direct (no gateway) unicast route through a device other than loopback:
/// a pod IP that only matches the default route is not on this node yet.
pub fn route_interface(ip: IpAddr) -> Result<Option<String>> {
    let out = Command::new("ip").args(["-j", "route", "get", &ip.to_string()]).output().context("running ip route get")?;
    if !out.status.success() {
        return Ok(None);
    }
    let routes: Vec<RouteGet> = serde_json::from_slice(&out.stdout).context("parsing ip -j route get")?;
    Ok(routes.into_iter().next().and_then(|r| match (r.dev, r.kind.as_deref(), r.gateway) {
        (Some(dev), None | Some("unicast"), None) if dev != "lo" => Some(dev),
        _ => None,
    }))
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name}");
    }
    Ok(idx)
}

#[derive(Deserialize)]
struct AddrInfo {
    local: String,
}

#[derive(Deserialize)]
struct Link {
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

/// Every address of the node's network namespace except the loopback ranges (127/8,
/// ::1): traffic from these is the `host` identity. Addresses on `lo` itself count (nodes
/// that keep their /32 on the loopback, as routing-on-the-host setups do).
pub fn host_addresses() -> Result<Vec<IpAddr>> {
    let out = Command::new("ip").args(["-j", "addr", "show"]).output().context("running ip addr show")?;
    if !out.status.success() {
        bail!("ip addr show: {}", String::from_utf8_lossy(&out.stderr));
    }
    let links: Vec<Link> = serde_json::from_slice(&out.stdout).context("parsing ip -j addr show")?;
    let mut ips: Vec<IpAddr> = links
        .into_iter()
        .flat_map(|l| l.addr_info.into_iter())
        .filter_map(|a| a.local.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}
