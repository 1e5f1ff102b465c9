//! The protocol/port part of a policy key as LPM blocks.
//!
//! The key ends with `proto` (8 bits) and the big-endian port (16 bits), after 72
//! bits of local/peer/direction. Prefix 72 = any protocol, 80 = one protocol with any
//! port, 80 + k = the 2^(16-k) ports sharing the first k port bits, 96 = one port.

use zt_common::{POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_FULL};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// What a rule says about protocol and port, before named ports are resolved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PortMatch {
    AnyProto,
    /// Every port of one protocol.
    Proto(u8),
    /// `lo..=hi` of one protocol (a single port is lo == hi).
    Range {
        proto: u8,
        lo: u16,
        hi: u16,
    },
    /// A container port name, resolved against pods (see compile/policy.rs).
    Named {
        proto: u8,
        name: String,
    },
    /// One ICMP/ICMPv6 type (the datapath puts the type where the port is).
    Icmp {
        proto: u8,
        icmp_type: u8,
    },
}

/// One LPM block of the (proto, port) tail; bits past the prefix are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub prefix: u32,
    pub proto: u8,
    pub port: u16,
}

impl Block {
    pub const ANY: Block = Block {
        prefix: POLICY_PREFIX_ANY_PROTO,
        proto: 0,
        port: 0,
    };

    pub fn proto(proto: u8) -> Block {
        Block {
            prefix: POLICY_PREFIX_ANY_PORT,
            proto,
            port: 0,
        }
    }

    pub fn port(proto: u8, port: u16) -> Block {
        Block {
            prefix: POLICY_PREFIX_FULL,
            proto,
            port,
        }
    }

    /// Does `self` cover every key `other` covers?
    pub fn covers(&self, other: &Block) -> bool {
        if self.prefix > other.prefix {
            return false;
        }
        if self.prefix <= POLICY_PREFIX_ANY_PROTO {
            return true;
        }
        if self.proto != other.proto {
            return false;
        }
        let port_bits = self.prefix - POLICY_PREFIX_ANY_PORT; // 0..=16 leading port bits
        let shift = 16 - port_bits;
        u32::from(self.port) >> shift == u32::from(other.port) >> shift
    }
}

/// Blocks for a numeric match (not Named).
pub fn blocks(m: &PortMatch) -> Vec<Block> {
    match m {
        PortMatch::AnyProto => vec![Block::ANY],
        PortMatch::Proto(p) => vec![Block::proto(*p)],
        PortMatch::Range { proto, lo, hi } => range_blocks(*lo, *hi)
            .into_iter()
            .map(|(prefix, port)| Block {
                prefix,
                proto: *proto,
                port,
            })
            .collect(),
        PortMatch::Icmp { proto, icmp_type } => vec![Block::port(*proto, u16::from(*icmp_type))],
        PortMatch::Named { .. } => Vec::new(),
    }
}

/// Minimal list of aligned (prefix, first port) blocks covering exactly `lo..=hi`.
pub fn range_blocks(lo: u16, hi: u16) -> Vec<(u32, u16)> {
    let mut out = Vec::new();
    let (mut start, end) = (u32::from(lo), u32::from(hi));
    while start <= end {
        // Largest aligned block starting at `start` that does not pass `end`.
        let mut k = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1 << k) - 1 > end {
            k -= 1;
        }
        out.push((POLICY_PREFIX_FULL - k, start as u16));
        start += 1 << k;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decompose_80_to_90() {
        // 80-87 (/93), 88-89 (/95), 90 (/96).
        assert_eq!(range_blocks(80, 90), vec![(93, 80), (95, 88), (96, 90)]);
    }

    #[test]
    fn decompose_edges() {
        assert_eq!(range_blocks(443, 443), vec![(96, 443)]);
        assert_eq!(range_blocks(0, 65535), vec![(80, 0)]);
        assert_eq!(range_blocks(1, 65535).len(), 16);
        assert_eq!(range_blocks(32768, 65535), vec![(81, 32768)]);
        assert_eq!(range_blocks(1024, 2047), vec![(86, 1024)]);
        assert_eq!(range_blocks(65535, 65535), vec![(96, 65535)]);
    }

    #[test]
    fn decomposition_is_exact() {
        for (lo, hi) in [
            (1u16, 1u16),
            (3, 17),
            (80, 90),
            (1000, 2000),
            (1, 65535),
            (30000, 32767),
        ] {
            let bl = range_blocks(lo, hi);
            let mut covered = Vec::new();
            for (prefix, start) in &bl {
                assert!(*prefix >= 80 && *prefix <= 96);
                let size = 1u32 << (96 - prefix);
                assert_eq!(u32::from(*start) % size, 0, "aligned");
                covered.extend(u32::from(*start)..u32::from(*start) + size);
            }
            assert_eq!(covered, (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>());
        }
    }

    #[test]
    fn coverage() {
        let tcp80 = Block::port(6, 80);
        assert!(Block::ANY.covers(&tcp80));
        assert!(Block::proto(6).covers(&tcp80));
        assert!(!Block::proto(17).covers(&tcp80));
        assert!(tcp80.covers(&tcp80));
        assert!(!tcp80.covers(&Block::proto(6)));
        let b80_87 = Block {
            prefix: 93,
            proto: 6,
            port: 80,
        };
        assert!(b80_87.covers(&Block::port(6, 87)));
        assert!(!b80_87.covers(&Block::port(6, 88)));
        assert!(!b80_87.covers(&Block::port(17, 81)));
        assert!(Block {
            prefix: 92,
            proto: 6,
            port: 80
        }
        .covers(&b80_87));
        assert!(!Block::proto(6).covers(&Block::ANY));
    }
}
