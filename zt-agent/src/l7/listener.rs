//! The proxy's transparent listeners and the node's side of steering: the listener
//! sockets go into `ZT_L7_LISTENER` (the kernel assigns steered SYNs to them), the marks
//! into `ZT_L7_CONFIG`, and the steer mark is routed to a local table (`ip rule`), as the
//! kernel's sk_assign selftest does, so that steered packets are delivered to this node's
//! sockets whatever their destination address.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::Path;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use zt_common::*;

use super::Options;

/// A listener bound to loopback (pods cannot reach it by address; only steering brings
/// connections to it), transparent so that accepted sockets keep the original
/// destination as their local address, marked so that its packets to pods are known.
pub fn bind(port: u16, mark: u32, v6: bool) -> Result<std::net::TcpListener> {
    let (domain, addr) = if v6 {
        (Domain::IPV6, SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port))
    } else {
        (Domain::IPV4, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if v6 {
        s.set_only_v6(true)?;
        s.set_ip_transparent_v6(true)?;
    } else {
        s.set_ip_transparent_v4(true)?;
    }
    s.set_mark(mark)?;
    s.bind(&addr.into()).with_context(|| format!("binding the HTTP proxy listener {addr}"))?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Registers the listeners with the kernel (a previous agent's closed sockets left the
/// map when they closed) and writes the marks.
pub fn register(bpffs_root: &Path, opts: &Options, v4: &impl AsRawFd, v6: Option<&impl AsRawFd>) -> Result<()> {
    let mut map: aya::maps::SockMap<aya::maps::MapData> = crate::pins::open_map(bpffs_root, MAP_L7_LISTENER)?.try_into()?;
    map.set(L7_LISTENER_V4, v4, 0).context("registering the IPv4 proxy listener in ZT_L7_LISTENER")?;
    if let Some(v6) = v6 {
        map.set(L7_LISTENER_V6, v6, 0).context("registering the IPv6 proxy listener in ZT_L7_LISTENER")?;
    }
    write_config(bpffs_root, L7Config { proxy_mark: opts.proxy_mark, steer_mark: opts.steer_mark })
}

pub fn write_config(bpffs_root: &Path, c: L7Config) -> Result<()> {
    let mut cfg: aya::maps::Array<aya::maps::MapData, L7Config> = crate::pins::open_map(bpffs_root, MAP_L7_CONFIG)?.try_into()?;
    cfg.set(0, c, 0).context("writing ZT_L7_CONFIG")
}

/// `ip rule fwmark <steer> lookup <table>` and `local default dev lo` in that table, both
/// families, replacing what an earlier run left; over rtnetlink (net/policy_route.rs), so
/// the agent needs no iproute2.
pub fn route_steered(opts: &Options) -> Result<()> {
    use crate::net::policy_route as pr;
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        // Earlier copies of the rule (one per start would pile up).
        pr::delete_fwmark_rules(v6, opts.steer_mark, opts.table).with_context(|| format!("removing earlier {fam} fwmark rules"))?;
        pr::add_fwmark_rule(v6, opts.steer_mark, opts.table, 90)
            .with_context(|| format!("{fam} rule fwmark {:#x} lookup {}", opts.steer_mark, opts.table))?;
        pr::replace_local_default(v6, opts.table).with_context(|| format!("{fam} route local default dev lo table {}", opts.table))?;
    }
    Ok(())
}
