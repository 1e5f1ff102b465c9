//! Addresses in the datapath's 16-byte form, and what the node's network namespace
//! says about interfaces: the CNI-agnostic way to find a pod's host interface is the
//! host route to its IP.
use std::net::{IpAddr, Ipv6Addr};

use anyhow::{bail, Result};
use zt_common::v4_mapped;

pub mod policy_route;
pub mod route;

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

/// The interface the node routes `ip` through (the pod's host-side interface), if the
/// route is a direct (no gateway) unicast route through a device other than loopback:
/// a pod IP that only matches the default route is not on this node yet.
pub fn route_interface(ip: IpAddr) -> Result<Option<String>> {
    // Any answer but a route (unreachable, prohibit, throw, a timeout) is no pod interface
    // for this address, as a failing `ip route get` was; it never holds back the others.
    let r = match route::get(ip) {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(None),
        Err(e) => {
            log::debug!("route to {ip} (rtnetlink): {e}");
            return Ok(None);
        }
    };
    Ok(r.direct_unicast().and_then(route::ifname).filter(|dev| dev != "lo"))
}

pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        bail!("no interface {name}");
    }
    Ok(idx)
}

/// Every address of the node's network namespace except the loopback ranges (127/8,
/// ::1): traffic from these is the `host` identity. Addresses on `lo` itself count (nodes
/// that keep their /32 on the loopback, as routing-on-the-host setups do).
pub fn host_addresses() -> Result<Vec<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        bail!("getifaddrs: {}", std::io::Error::last_os_error());
    }
    let mut ips = vec![];
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: getifaddrs returned a valid list; each ifa_addr is a sockaddr of its family.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            match unsafe { (*ifa.ifa_addr).sa_family } as i32 {
                libc::AF_INET => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    ips.push(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    ips.push(IpAddr::from(sa.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    unsafe { libc::freeifaddrs(ifap) };
    ips.retain(|ip| !ip.is_loopback());
    ips.sort();
    ips.dedup();
    Ok(ips)
}
