//! The node's uplinks (issue 11): `zt_from_uplink` (zt-ebpf/src/uplink.rs) at TC ingress
//! of the interfaces traffic from other nodes arrives on, so that a client on another node
//! reaches a local pod's HTTP-rule port through this node's proxy instead of being
//! refused (`http-unsteered`). `--uplink-interfaces`:
//! - `auto` (default): the interfaces this node routes other nodes' pods through (asked of
//!   the kernel, `net/route.rs`; one address per /24 or /64, at most `AUTO_PROBES`), so an
//!   overlay's device (flannel.1, vxlan, tunl0) is found as well as eth0 with direct
//!   routing. Re-evaluated on every apply.
//! - a comma-separated list of interface names;
//! - `none`: no uplink hook (remote clients of HTTP-rule ports are refused).
//! Links are pinned (`<map dir>/uplinks/<ifindex>-<name>`) like the pods' hooks: they
//! keep running while the agent restarts (a steered SYN then drops as `http-proxy-down`),
//! and a restarted agent swaps its program in. An interface that leaves the set is
//! unhooked (its clients of HTTP-rule ports are then refused at the pod: fail closed).
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf,
};

use crate::pins::map_dir;

pub const PROG_FROM_UPLINK: &str = "zt_from_uplink";
/// Route lookups per apply in `auto` mode.
pub const AUTO_PROBES: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    Auto,
    None,
    Names(Vec<String>),
}

impl Selection {
    pub fn parse(s: &str) -> Result<Selection> {
        match s.trim() {
            "auto" => Ok(Selection::Auto),
            "none" | "" => Ok(Selection::None),
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                for n in &names {
                    if n.is_empty() || n.len() > 15 || n.contains('/') || n.contains(char::is_whitespace) {
                        bail!("--uplink-interfaces: {n:?} is no interface name (auto, none, or names separated by commas)");
                    }
                }
                Ok(Selection::Names(names))
            }
        }
    }
}

/// `<map dir>/uplinks`: one pinned TCX link per hooked uplink.
pub fn pin_dir(bpffs_root: &Path) -> PathBuf {
    map_dir(bpffs_root).join("uplinks")
}

/// The hooked uplinks as (ifindex, name), from the pins (what `ztctl explain` reads).
pub fn hooked(bpffs_root: &Path) -> Vec<(u32, String)> {
    let Ok(dir) = std::fs::read_dir(pin_dir(bpffs_root)) else { return vec![] };
    let mut v: Vec<(u32, String)> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let (i, name) = n.split_once('-')?;
            Some((i.parse().ok()?, name.to_string()))
        })
        .collect();
    v.sort();
    v
}

/// Whether the interface's frames start with an Ethernet header (`ARPHRD_ETHER`, what a
/// NIC, veth, bond, bridge or VXLAN device carries); unknown counts as yes.
fn ethernet(name: &str) -> bool {
    match std::fs::read_to_string(format!("/sys/class/net/{name}/type")) {
        Ok(t) => t.trim() == "1",
        Err(_) => true,
    }
}

/// One address per /24 (IPv4) or /64 (IPv6): pods of one node share a prefix.
fn probes(remote: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    for ip in remote {
        let prefix = match ip {
            IpAddr::V4(a) => u128::from(u32::from(a) >> 8),
            IpAddr::V6(a) => (u128::from(a) >> 64) | (1 << 127),
        };
        if seen.insert(prefix) {
            out.push(ip);
            if out.len() >= AUTO_PROBES {
                break;
            }
        }
    }
    out
}

/// The interfaces to hook: `auto` asks the kernel's routes to `remote` (other nodes' pod
/// addresses), leaving out loopback and `local_ifs` (pod interfaces).
pub fn resolve(sel: &Selection, remote: impl Iterator<Item = IpAddr>, local_ifs: &BTreeSet<u32>) -> Result<BTreeSet<(u32, String)>> {
    let mut out = BTreeSet::new();
    match sel {
        Selection::None => {}
        Selection::Names(names) => {
            for n in names {
                let idx = crate::net::ifindex(n).with_context(|| format!("--uplink-interfaces: interface {n}"))?;
                if !ethernet(n) {
                    bail!("--uplink-interfaces: {n} carries no Ethernet header (an IPIP or WireGuard device?): zt_from_uplink parses Ethernet frames");
                }
                out.insert((idx, n.clone()));
            }
        }
        Selection::Auto => {
            for ip in probes(remote) {
                let Ok(Some(r)) = crate::net::route::get(ip) else { continue };
                let Some(oif) = r.oif else { continue };
                if oif == 1 || local_ifs.contains(&oif) || r.kind != 1 {
                    continue;
                }
                match crate::net::route::ifname(oif) {
                    Some(name) if ethernet(&name) => {
                        out.insert((oif, name));
                    }
                    Some(name) => log::debug!("uplink {name}: no Ethernet header, not hooked (its clients of HTTP-rule ports are refused)"),
                    None => {}
                }
            }
        }
    }
    Ok(out)
}

/// Makes `zt_from_uplink` run at TC ingress of exactly `want`: new links first in the TCX
/// chain (before a CNI's program could redirect the packet past the stack) and pinned;
/// pinned links of an earlier agent get this process's program swapped in; pins of
/// interfaces not in `want` go (the link with them).
pub fn ensure(ebpf: &mut Ebpf, bpffs_root: &Path, want: &BTreeSet<(u32, String)>) -> Result<()> {
    let dir = pin_dir(bpffs_root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (idx, name) in hooked(bpffs_root) {
        if !want.contains(&(idx, name.clone())) {
            let pin = dir.join(format!("{idx}-{name}"));
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            log::info!("uplink {name} unhooked");
        }
    }
    let prog: &mut SchedClassifier = ebpf.program_mut(PROG_FROM_UPLINK).with_context(|| format!("program {PROG_FROM_UPLINK} missing"))?.try_into()?;
    for (idx, name) in want {
        let pin = dir.join(format!("{idx}-{name}"));
        if let Ok(old) = PinnedLink::from_pin(&pin) {
            let link: SchedClassifierLink = FdLink::from(old).try_into()?;
            let id = prog.attach_to_link(link).with_context(|| format!("replacing the program in {}", pin.display()))?;
            // The pin keeps the link; our handle can go.
            let _fd: FdLink = prog.take_link(id)?.try_into()?;
            continue;
        }
        let id = prog
            .attach_with_options(name, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::first()))
            .with_context(|| format!("attaching {PROG_FROM_UPLINK} to {name}"))?;
        let fd: FdLink = prog.take_link(id)?.try_into()?;
        fd.pin(&pin).with_context(|| format!("pinning {}", pin.display()))?;
        log::info!("uplink {name} hooked ({PROG_FROM_UPLINK}: flows from other nodes to HTTP-rule ports go to this node's proxy)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections_parse_and_bad_names_are_named() {
        assert_eq!(Selection::parse("auto").unwrap(), Selection::Auto);
        assert_eq!(Selection::parse("none").unwrap(), Selection::None);
        assert_eq!(Selection::parse("eth0, ens5").unwrap(), Selection::Names(vec!["eth0".into(), "ens5".into()]));
        let e = Selection::parse("eth0,,x").unwrap_err().to_string();
        assert!(e.contains("\"\""), "{e}");
        let e = Selection::parse("a-very-long-interface-name").unwrap_err().to_string();
        assert!(e.contains("a-very-long-interface-name"), "{e}");
    }

    #[test]
    fn an_interface_without_ethernet_is_rejected_by_name() {
        // lo is ARPHRD_LOOPBACK (772) in every network namespace.
        assert!(!ethernet("lo"));
        let e = resolve(&Selection::Names(vec!["lo".into()]), std::iter::empty(), &BTreeSet::new()).unwrap_err().to_string();
        assert!(e.contains("lo carries no Ethernet header"), "{e}");
        let e = resolve(&Selection::Names(vec!["zt-no-such-if".into()]), std::iter::empty(), &BTreeSet::new()).unwrap_err();
        assert!(format!("{e:#}").contains("zt-no-such-if"), "{e:#}");
    }

    #[test]
    fn one_probe_per_prefix() {
        let ips: Vec<IpAddr> = ["10.0.1.1", "10.0.1.2", "10.0.2.1", "fd00::1", "fd00::2", "fd00:0:0:1::1"].iter().map(|s| s.parse().unwrap()).collect();
        let p = probes(ips.into_iter());
        assert_eq!(p.len(), 4, "{p:?}");
    }
}
