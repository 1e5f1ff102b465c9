//! IP prefixes of ipBlock peers and how an ipBlock becomes a set of CIDR identities.
//!
//! The datapath resolves a peer address by exact endpoint (pods, host) first, then by
//! longest-prefix match in the CIDR map, then falls back to WORLD. So CIDR identities
//! only ever stand for cluster-external peers: a pod's address resolves to the pod's
//! identity even if an ipBlock covers it. NetworkPolicy ipBlocks reach pod addresses
//! through the workload identities instead (see workloads.rs); ZeroTrustPolicy
//! ipBlocks stay cluster-external.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::state::Cidr;

/// Parse `addr/prefix`; host bits are cleared.
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("invalid CIDR {s:?} (expected address/prefix)"))?;
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("invalid CIDR {s:?}: bad address"))?;
    let max = width(&addr);
    let prefix = p
        .parse::<u8>()
        .ok()
        .filter(|n| u32::from(*n) <= max && p.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| format!("invalid CIDR {s:?}: prefix must be 0-{max}"))?;
    Ok(normalize(Cidr { addr, prefix }))
}

fn width(addr: &IpAddr) -> u32 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn bits(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// The first `prefix` bits of the address, the rest zero.
fn masked(addr: &IpAddr, prefix: u8) -> u128 {
    let host = width(addr) - u32::from(prefix);
    if u32::from(prefix) == 0 {
        0
    } else {
        (bits(addr) >> host) << host
    }
}

/// Clear host bits so that equal prefixes compare equal.
pub fn normalize(c: Cidr) -> Cidr {
    let m = masked(&c.addr, c.prefix);
    let addr = match c.addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(m as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(m)),
    };
    Cidr {
        addr,
        prefix: c.prefix,
    }
}

/// Is `inner` inside `outer` (same family, at least as long, same leading bits)?
pub fn contains(outer: &Cidr, inner: &Cidr) -> bool {
    outer.addr.is_ipv4() == inner.addr.is_ipv4()
        && outer.prefix <= inner.prefix
        && masked(&inner.addr, outer.prefix) == masked(&outer.addr, outer.prefix)
}

pub fn to_string(c: &Cidr) -> String {
    format!("{}/{}", c.addr, c.prefix)
}

/// The CIDR identities an ipBlock `cidr except [excepts]` allows: every known prefix
/// inside `cidr` and inside none of the excepts. An address inside an except resolves
/// (longest prefix) to the except's own identity or a longer one, which is left out.
///
/// WORLD (no prefix matched) is never needed: every ipBlock cidr is itself in the
/// CIDR map, so an address of that family always matches at least that prefix, and
/// `0.0.0.0/0` must not let IPv6 peers in through WORLD.
pub fn block_peers(known: &BTreeMap<Cidr, u32>, cidr: &Cidr, excepts: &[Cidr]) -> BTreeSet<u32> {
    known
        .iter()
        .filter(|(c, _)| contains(cidr, c) && !excepts.iter().any(|e| contains(e, c)))
        .map(|(_, id)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        parse_cidr(s).unwrap()
    }

    #[test]
    fn parse_and_normalize() {
        assert_eq!(to_string(&c("10.1.2.3/8")), "10.0.0.0/8");
        assert_eq!(to_string(&c("10.1.2.3/32")), "10.1.2.3/32");
        assert_eq!(to_string(&c("0.0.0.0/0")), "0.0.0.0/0");
        assert_eq!(to_string(&c("fd00::1/64")), "fd00::/64");
        assert_eq!(to_string(&c("::/0")), "::/0");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "x/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn containment() {
        assert!(contains(&c("10.0.0.0/8"), &c("10.1.0.0/16")));
        assert!(contains(&c("10.0.0.0/8"), &c("10.0.0.0/8")));
        assert!(!contains(&c("10.1.0.0/16"), &c("10.0.0.0/8")));
        assert!(!contains(&c("10.0.0.0/8"), &c("11.0.0.0/16")));
        assert!(contains(&c("0.0.0.0/0"), &c("192.168.1.0/24")));
        assert!(!contains(&c("0.0.0.0/0"), &c("fd00::/8")));
        assert!(contains(&c("::/0"), &c("fd00::/8")));
    }

    #[test]
    fn ip_block_with_except() {
        // Prefixes known from all policies.
        let known: BTreeMap<Cidr, u32> = [
            ("0.0.0.0/0", 1),
            ("10.0.0.0/8", 2),
            ("10.1.0.0/16", 3),
            ("10.1.2.0/24", 4),
            ("10.2.0.0/16", 5),
            ("192.168.0.0/16", 6),
            ("fd00::/8", 7),
        ]
        .into_iter()
        .map(|(s, id)| (c(s), id))
        .collect();
        let ids = |cidr: &str, ex: &[&str]| {
            let ex: Vec<Cidr> = ex.iter().map(|e| c(e)).collect();
            block_peers(&known, &c(cidr), &ex)
                .into_iter()
                .collect::<Vec<_>>()
        };
        // 10/8 except 10.1/16: 10/8 itself and 10.2/16; not 10.1/16 nor 10.1.2/24 inside it.
        assert_eq!(ids("10.0.0.0/8", &["10.1.0.0/16"]), [2, 5]);
        assert_eq!(ids("10.0.0.0/8", &[]), [2, 3, 4, 5]);
        // Everything IPv4 except private ranges: the /0 identity stands for the rest.
        assert_eq!(ids("0.0.0.0/0", &["10.0.0.0/8", "192.168.0.0/16"]), [1]);
        assert_eq!(ids("::/0", &[]), [7]);
        assert_eq!(ids("10.1.0.0/16", &["10.1.2.0/24"]), [3]);
    }
}
