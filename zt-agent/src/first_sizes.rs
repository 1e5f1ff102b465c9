//! Map sizes chosen from the cluster at a node's first start. A pinned map keeps the size
//! it was created with, so the first start decides: when no pins exist yet, the maps the
//! cluster fills (endpoints, CIDRs, policy, FQDN names and ports) are sized from what the
//! first full list of the cluster compiles to, with headroom, unless a flag gave the size.
//! Later growth goes through the resize path (resize.rs: a changed size flag, the old
//! links taken over in place). Conntrack, fragment and learned-address maps depend on
//! traffic, not on the cluster: their flags (or defaults) stand.
use crate::loader::MapSizes;
use crate::state::Desired;

/// Room for growth over what the first list needs.
pub const HEADROOM: u32 = 2;
/// Never more than this many times the default size (memory: an LPM trie entry costs
/// about 100 bytes of kernel memory).
pub const MAX_FACTOR: u32 = 16;

/// Which of the cluster-sized maps a flag gave the size of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    pub endpoints: bool,
    pub cidrs: bool,
    pub policy: bool,
    pub fqdn_names: bool,
    pub fqdn_ports: bool,
}

impl Explicit {
    pub fn all(&self) -> bool {
        self.endpoints && self.cidrs && self.policy && self.fqdn_names && self.fqdn_ports
    }
}

/// The entries the compiled first list needs in each cluster-sized map: (endpoints,
/// cidrs, policy, fqdn names, fqdn ports). The CIDR map also holds the IPv4 block the
/// map form pins (sync.rs); Service entries are added later and fit the headroom.
pub fn needed(d: &Desired) -> [u32; 5] {
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    [n(d.endpoints.len()), n(d.cidrs.len() + 1), n(d.policy.len()), n(d.fqdn_names.len()), n(d.fqdn_ports.len())]
}

/// `sizes` with each map not given by a flag raised to what `needed` asks with headroom
/// (a power of two), never below the default and never above MAX_FACTOR times it.
pub fn choose(sizes: &MapSizes, explicit: Explicit, needed: [u32; 5]) -> MapSizes {
    let pick = |flag: u32, given: bool, need: u32, default: u32| -> u32 {
        if given {
            return flag;
        }
        let want = need.saturating_mul(HEADROOM).checked_next_power_of_two().unwrap_or(u32::MAX);
        want.clamp(default, default.saturating_mul(MAX_FACTOR))
    };
    let d = MapSizes::default();
    MapSizes {
        endpoints: pick(sizes.endpoints, explicit.endpoints, needed[0], d.endpoints),
        cidrs: pick(sizes.cidrs, explicit.cidrs, needed[1], d.cidrs),
        policy: pick(sizes.policy, explicit.policy, needed[2], d.policy),
        fqdn_names: pick(sizes.fqdn_names, explicit.fqdn_names, needed[3], d.fqdn_names),
        fqdn_ports: pick(sizes.fqdn_ports, explicit.fqdn_ports, needed[4], d.fqdn_ports),
        ..*sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_stand_for_a_small_cluster_and_flags_always_win() {
        let d = MapSizes::default();
        let s = choose(&d, Explicit::default(), [10, 2, 100, 0, 0]);
        assert_eq!((s.endpoints, s.cidrs, s.policy, s.fqdn_names, s.fqdn_ports), (d.endpoints, d.cidrs, d.policy, d.fqdn_names, d.fqdn_ports));
        let flags = MapSizes { policy: 1024, ..d };
        let s = choose(&flags, Explicit { policy: true, ..Default::default() }, [10, 2, 5_000_000, 0, 0]);
        assert_eq!(s.policy, 1024, "an explicit flag wins even when too small (fit() then fails closed)");
    }

    #[test]
    fn a_large_cluster_gets_headroom_up_to_the_limit() {
        let d = MapSizes::default();
        let s = choose(&d, Explicit::default(), [100_000, 20_000, 400_000, 0, 0]);
        assert_eq!(s.endpoints, 262_144, "100k endpoints x2 -> next power of two");
        assert_eq!(s.cidrs, 65_536);
        assert_eq!(s.policy, 1_048_576);
        assert_eq!((s.ct, s.ct_est, s.frags, s.fqdn_learned), (d.ct, d.ct_est, d.frags, d.fqdn_learned), "traffic maps keep their flags");
        let s = choose(&d, Explicit::default(), [u32::MAX, 0, 0, 0, 0]);
        assert_eq!(s.endpoints, d.endpoints * MAX_FACTOR);
    }
}
