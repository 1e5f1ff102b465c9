//! Packet parsing: Ethernet (TC) or bare IP (cgroup skb), IPv4 / IPv6 (with a bounded walk of extension headers),
//! and the L4 fields policy needs. The common IPv4 TCP/UDP packet is read directly from the
//! skb's linear data after one bounds check against data_end; everything else goes through
//! bpf_skb_load_bytes, so a short packet is a failed load (counted as malformed), never an
//! out-of-bounds access.
use aya_ebpf::programs::TcContext;
use zt_common::{icmp_ct_ports, v4_mapped};

/// Offset of the IP header: after Ethernet at TC, 0 in cgroup skb programs.
pub const L3_AFTER_ETH: usize = 14;
pub const L3_AT_START: usize = 0;
pub(crate) const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// VLAN tag protocols: 802.1Q, 802.1ad (QinQ) and the pre-standard 0x9100.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ1: u16 = 0x9100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// Upper bound on IPv6 extension headers walked before giving up (verifier bound).
const MAX_IPV6_EXT: usize = 6;

pub enum Frag {
    /// Not fragmented.
    None,
    /// First fragment: carries the L4 header and is judged like a whole packet.
    First,
    /// Later fragment: no L4 header; passes only if its first fragment was allowed.
    Later,
}

pub struct Flow {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host byte order. ICMP echo request: (id, 0), reply: (0, id); other ICMP: 0.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// ICMP: see `zt_common::icmp_ct_ports` (0 otherwise).
    pub icmp_tag: u8,
    /// What policy matches as the port: dport, or the ICMP type.
    pub policy_port: u16,
    /// TCP header flags (FIN, SYN, RST, ACK, ...), 0 for other protocols.
    pub tcp_flags: u8,
    pub frag: Frag,
    pub frag_id: u32,
    /// The protocol fragment records are keyed on, the same for every fragment of a
    /// datagram: IPv4's protocol field, IPv6's Fragment header's next header (whatever
    /// headers follow it in the first fragment).
    pub frag_proto: u8,
    /// ICMP errors: `quoted` holds the flow the error is about, as quoted in its payload.
    pub related: bool,
    pub quoted: Quoted,
    /// Absolute offset of the L4 header in the skb (whichever L3 start the hook uses).
    pub l4_off: u16,
    /// Absolute end of the IP datagram in the skb (excludes link-layer padding).
    pub ip_end: u32,
}

/// The header an ICMP error quotes: the offending packet, in its own direction. Its
/// source is the error's destination (an error goes back to the sender of what it
/// quotes; `related` is set only then), so only the destination is kept.
#[derive(Clone, Copy)]
pub struct Quoted {
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub icmp_tag: u8,
}

impl Quoted {
    pub const fn zeroed() -> Quoted {
        Quoted { daddr: [0; 16], sport: 0, dport: 0, proto: 0, icmp_tag: 0 }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// ARP at a TC hook; anything not IP at the cgroup programs.
    NonIp,
    /// A TC frame with a VLAN tag, in the skb (the kernel strips the outer tag before TC
    /// ingress) or in the header (a second tag).
    Vlan,
    /// A TC frame of another ethertype than IPv4, IPv6, ARP.
    BadEthertype,
    /// IPv6 neighbour discovery (hop limit 255) or MLD (hop limit 1): on-link control.
    Ndp,
    Malformed,
    /// Addresses are filled, the rest is not.
    TooManyExtHeaders,
    Flow,
}

impl Flow {
    pub const fn zeroed() -> Flow {
        Flow {
            saddr: [0; 16],
            daddr: [0; 16],
            sport: 0,
            dport: 0,
            proto: 0,
            icmp_tag: 0,
            policy_port: 0,
            tcp_flags: 0,
            frag: Frag::None,
            frag_id: 0,
            frag_proto: 0,
            related: false,
            quoted: Quoted::zeroed(),
            l4_off: 0,
            ip_end: 0,
        }
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, ()> {
    ctx.load::<T>(off).map_err(|_| ())
}

/// Fills `flow` and says what the packet is. Not inlined: its own BPF function keeps
/// the caller's stack frame small.
#[inline(always)]
pub fn parse(skb: *mut aya_ebpf::bindings::__sk_buff, flow: &mut Flow, l3: usize) -> Parsed {
    // A constant offset per hook lets the fast path's bounds check be one compare
    // against data_end; each program holds only the copy its constant selects.
    if l3 == L3_AFTER_ETH {
        parse_at::<L3_AFTER_ETH>(skb, flow)
    } else {
        parse_at::<L3_AT_START>(skb, flow)
    }
}

#[inline(never)]
fn parse_at<const L3: usize>(skb: *mut aya_ebpf::bindings::__sk_buff, flow: &mut Flow) -> Parsed {
    let l3 = L3;
    let ctx = &TcContext::new(skb);
    // The kernel's view of the protocol decides; a frame that disagrees (a device
    // without an Ethernet header) is malformed here, never waved through as non-IP.
    let proto = u16::from_be(unsafe { (*skb).protocol } as u16);
    if l3 == L3_AFTER_ETH {
        // A pod's interface carries IP and ARP, untagged. Anything else could reach the
        // stack as a packet zt never judged (the stack strips a second VLAN tag and
        // routes what is inside), so it is named here and dropped by the caller.
        if unsafe { (*skb).vlan_present } != 0 || is_vlan(proto) {
            return Parsed::Vlan;
        }
        let hdr = match direct(skb, 14) {
            Some(eth) => unsafe { be16(eth, 12) },
            None => match load::<u16>(ctx, 12) {
                Ok(p) => u16::from_be(p),
                Err(_) => return Parsed::Malformed,
            },
        };
        if is_vlan(hdr) {
            return Parsed::Vlan;
        }
        if proto != ETH_P_IP && proto != ETH_P_IPV6 && proto != ETH_P_ARP {
            return Parsed::BadEthertype;
        }
        if hdr != proto {
            return Parsed::Malformed;
        }
        if proto == ETH_P_ARP {
            return Parsed::NonIp;
        }
    } else if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return Parsed::NonIp;
    }
    if proto == ETH_P_IP && parse_v4_direct::<L3>(skb, flow) {
        return Parsed::Flow;
    }
    let r = match proto {
        ETH_P_IP => parse_v4(ctx, flow, l3),
        ETH_P_IPV6 => parse_v6(ctx, flow, l3),
        _ => return Parsed::NonIp,
    };
    r.unwrap_or(Parsed::Malformed)
}

#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD || ethertype == ETH_P_QINQ1
}

/// The skb's linear data from its start, if it holds at least `n` bytes (a constant at
/// every call site). Reading
/// through this pointer costs no helper call and no stack copy (each
/// bpf_skb_load_bytes is a call of 15-20 ns, and the cgroup programs have no stack to
/// spare for a header-sized buffer).
#[inline(always)]
pub(crate) fn direct(skb: *mut aya_ebpf::bindings::__sk_buff, n: usize) -> Option<*const u8> {
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if data + n > end {
        return None;
    }
    Some(data as *const u8)
}

#[inline(always)]
pub(crate) unsafe fn be16(p: *const u8, off: usize) -> u16 {
    u16::from_be_bytes([*p.add(off), *p.add(off + 1)])
}

#[inline(always)]
pub(crate) unsafe fn four(p: *const u8, off: usize) -> [u8; 4] {
    [*p.add(off), *p.add(off + 1), *p.add(off + 2), *p.add(off + 3)]
}

/// The common packet in one pass over the linear data: IPv4 without options, not a
/// fragment, carrying TCP or UDP whose header is in the linear data too. Fills `flow`
/// exactly as `parse_v4` would and returns true; returns false (nothing decided) for
/// anything else, which `parse_v4` then reads, judges malformed or not, as before.
#[inline(always)]
fn parse_v4_direct<const L3: usize>(skb: *mut aya_ebpf::bindings::__sk_buff, flow: &mut Flow) -> bool {
    // IPv4 header (20) plus the largest L4 header read here (TCP's first 14 bytes; the
    // check below wants all 20 of it in the skb, as parse_v4 does).
    let Some(d) = direct(skb, L3 + 40) else { return false };
    let len = unsafe { (*skb).len } as usize;
    unsafe {
        let ip = d.add(L3);
        if *ip != 0x45 {
            return false;
        }
        let proto = *ip.add(9);
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return false;
        }
        // Any fragment bit (more fragments or an offset) takes the full path.
        if be16(ip, 6) & 0x3fff != 0 {
            return false;
        }
        let tot_len = be16(ip, 2) as usize;
        if tot_len != 0 && (tot_len < 20 || L3 + tot_len > len) {
            return false;
        }
        flow.ip_end = if tot_len == 0 { len as u32 } else { (L3 + tot_len) as u32 };
        flow.saddr = v4_mapped(four(ip, 12));
        flow.daddr = v4_mapped(four(ip, 16));
        flow.proto = proto;
        flow.frag = Frag::None;
        flow.frag_id = be16(ip, 4) as u32;
        flow.frag_proto = proto;
        let l4 = ip.add(20);
        flow.l4_off = (L3 + 20) as u16;
        flow.sport = be16(l4, 0);
        flow.dport = be16(l4, 2);
        flow.policy_port = flow.dport;
        if proto == IPPROTO_TCP {
            flow.tcp_flags = *l4.add(13);
        }
    }
    true
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, flow: &mut Flow, l3: usize) -> Result<Parsed, ()> {
    let ver_ihl: u8 = load(ctx, l3)?;
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(());
    }
    let tot_len = u16::from_be(load::<u16>(ctx, l3 + 2)?) as usize;
    // 0 is how BIG TCP marks a GSO packet over 64 KiB: its length is the skb's.
    if tot_len != 0 && (tot_len < ihl || l3 + tot_len > ctx.len() as usize) {
        return Err(());
    }
    flow.ip_end = if tot_len == 0 { ctx.len() } else { (l3 + tot_len) as u32 };
    let id = u16::from_be(load::<u16>(ctx, l3 + 4)?) as u32;
    let frag_off = u16::from_be(load::<u16>(ctx, l3 + 6)?);
    let proto: u8 = load(ctx, l3 + 9)?;
    let saddr = v4_mapped(load::<[u8; 4]>(ctx, l3 + 12)?);
    let daddr = v4_mapped(load::<[u8; 4]>(ctx, l3 + 16)?);
    let frag = if frag_off & 0x1fff != 0 {
        Frag::Later
    } else if frag_off & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    flow.saddr = saddr;
    flow.daddr = daddr;
    flow.proto = proto;
    flow.frag = frag;
    flow.frag_id = id;
    flow.frag_proto = proto;
    if let Frag::Later = flow.frag {
        return Ok(Parsed::Flow);
    }
    l4(ctx, l3 + ihl, flow, false)?;
    Ok(Parsed::Flow)
}

#[inline(always)]
fn parse_v6(ctx: &TcContext, flow: &mut Flow, l3: usize) -> Result<Parsed, ()> {
    let ver: u8 = load(ctx, l3)?;
    if ver >> 4 != 6 {
        return Err(());
    }
    let payload_len = u16::from_be(load::<u16>(ctx, l3 + 4)?) as usize;
    if l3 + 40 + payload_len > ctx.len() as usize {
        return Err(());
    }
    // 0 is a jumbogram (hop-by-hop length): the datagram is the rest of the skb.
    flow.ip_end = if payload_len == 0 { ctx.len() } else { (l3 + 40 + payload_len) as u32 };
    let mut next: u8 = load(ctx, l3 + 6)?;
    let link_scoped_src: bool;
    let hop_limit: u8 = load(ctx, l3 + 7)?;
    flow.saddr = load(ctx, l3 + 8)?;
    flow.daddr = load(ctx, l3 + 24)?;
    flow.proto = next;
    // Link-local or unspecified source, or a link-scope multicast destination: the
    // packet cannot leave the pod's link (the node does not forward it).
    link_scoped_src = (flow.saddr[0] == 0xfe && flow.saddr[1] & 0xc0 == 0x80) || flow.saddr == [0u8; 16];
    let link_scoped = link_scoped_src || (flow.daddr[0] == 0xff && flow.daddr[1] & 0x0f == 0x02) || (flow.daddr[0] == 0xfe && flow.daddr[1] & 0xc0 == 0x80);
    let mut off = l3 + 40;
    let mut done = false;
    // One more round than headers allowed: the last one reads the upper protocol.
    for _ in 0..MAX_IPV6_EXT + 1 {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, first excluded.
            0 | 43 | 60 => {
                let nh: u8 = load(ctx, off)?;
                let len: u8 = load(ctx, off + 1)?;
                next = nh;
                off += (len as usize + 1) * 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let nh: u8 = load(ctx, off)?;
                let len: u8 = load(ctx, off + 1)?;
                next = nh;
                off += (len as usize + 2) * 4;
            }
            // Fragment header.
            44 => {
                let nh: u8 = load(ctx, off)?;
                let offm = u16::from_be(load::<u16>(ctx, off + 2)?);
                flow.frag_id = u32::from_be(load::<u32>(ctx, off + 4)?);
                flow.frag_proto = nh;
                next = nh;
                off += 8;
                if offm >> 3 != 0 {
                    // What follows is payload, not headers.
                    flow.frag = Frag::Later;
                    done = true;
                    break;
                } else if offm & 1 != 0 {
                    flow.frag = Frag::First;
                }
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    flow.proto = next;
    if !done {
        return Ok(Parsed::TooManyExtHeaders);
    }
    if let Frag::Later = flow.frag {
        return Ok(Parsed::Flow);
    }
    if next == IPPROTO_ICMPV6 {
        let ty: u8 = load(ctx, off)?;
        // On-link only, by hop limit: a routed packet cannot arrive with these values
        // (RFC 4861 requires 255 for NDP; MLD is sent with 1 and is never forwarded).
        let ndp = (133..=137).contains(&ty) && hop_limit == 255;
        let mld = matches!(ty, 130 | 131 | 132 | 143) && hop_limit == 1;
        if (ndp || mld) && link_scoped {
            return Ok(Parsed::Ndp);
        }
    }
    l4(ctx, off, flow, true)?;
    Ok(Parsed::Flow)
}

/// Fills ports (or ICMP type / echo id). Unknown protocols keep ports at 0 and are
/// matched by protocol-wide rules only.
#[inline(always)]
fn l4(ctx: &TcContext, off: usize, flow: &mut Flow, v6: bool) -> Result<(), ()> {
    let len = ctx.len() as usize;
    flow.l4_off = off as u16;
    match flow.proto {
        IPPROTO_TCP => {
            if off + 20 > len {
                return Err(());
            }
            // Ports, sequence and acknowledgement numbers, offset and flags: one load.
            let h: [u8; 14] = load(ctx, off)?;
            flow.sport = u16::from_be_bytes([h[0], h[1]]);
            flow.dport = u16::from_be_bytes([h[2], h[3]]);
            flow.tcp_flags = h[13];
            flow.policy_port = flow.dport;
        }
        IPPROTO_UDP | IPPROTO_SCTP => {
            let min = if flow.proto == IPPROTO_UDP { 8 } else { 12 };
            if off + min > len {
                return Err(());
            }
            // Both ports in one load (each bpf_skb_load_bytes is a helper call).
            let p: [u8; 4] = load(ctx, off)?;
            flow.sport = u16::from_be_bytes([p[0], p[1]]);
            flow.dport = u16::from_be_bytes([p[2], p[3]]);
            flow.policy_port = flow.dport;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            if off + 8 > len || (flow.proto == IPPROTO_ICMPV6) != v6 {
                return Err(());
            }
            let ty: u8 = load(ctx, off)?;
            flow.policy_port = ty as u16;
            let (sport, dport, tag) = icmp_ct_ports(ty, v6, u16::from_be(load::<u16>(ctx, off + 4)?));
            flow.sport = sport;
            flow.dport = dport;
            flow.icmp_tag = tag;
            // Errors: v4 unreachable / time exceeded / parameter problem; v6 unreachable,
            // packet too big, time exceeded, parameter problem. A quote we cannot read, or
            // whose source is not the error's destination, is just not related to
            // anything (judged by policy like any ICMP).
            let error = if v6 { (1..=4).contains(&ty) } else { ty == 3 || ty == 11 || ty == 12 };
            if error {
                flow.related = quoted(ctx.skb.skb, off + 8, v6, &flow.daddr, &mut flow.quoted);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Reads the IP header and first L4 bytes quoted by an ICMP error at `off`; false if
/// they cannot be read or the quoted source is not `to`, the error's destination.
/// Inlined: as its own BPF function its frame came third under the program's and
/// `parse_at`'s, and the three passed the 512-byte stack limit.
#[inline(always)]
fn quoted(skb: *mut aya_ebpf::bindings::__sk_buff, off: usize, v6: bool, to: &[u8; 16], q: &mut Quoted) -> bool {
    quoted_inner(&TcContext::new(skb), off, v6, to, q).is_ok()
}

#[inline(always)]
fn quoted_inner(ctx: &TcContext, off: usize, v6: bool, to: &[u8; 16], q: &mut Quoted) -> Result<(), ()> {
    let l4off = if v6 {
        q.proto = load(ctx, off + 6)?;
        if load::<[u8; 16]>(ctx, off + 8)? != *to {
            return Err(());
        }
        q.daddr = load(ctx, off + 24)?;
        off + 40
    } else {
        let ver_ihl: u8 = load(ctx, off)?;
        let ihl = (ver_ihl & 0x0f) as usize * 4;
        if ver_ihl >> 4 != 4 || ihl < 20 {
            return Err(());
        }
        q.proto = load(ctx, off + 9)?;
        if v4_mapped(load::<[u8; 4]>(ctx, off + 12)?) != *to {
            return Err(());
        }
        q.daddr = v4_mapped(load::<[u8; 4]>(ctx, off + 16)?);
        off + ihl
    };
    match q.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            q.sport = u16::from_be(load::<u16>(ctx, l4off)?);
            q.dport = u16::from_be(load::<u16>(ctx, l4off + 2)?);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let ty: u8 = load(ctx, l4off)?;
            let (sport, dport, tag) = icmp_ct_ports(ty, q.proto == IPPROTO_ICMPV6, u16::from_be(load::<u16>(ctx, l4off + 4)?));
            q.sport = sport;
            q.dport = dport;
            q.icmp_tag = tag;
        }
        _ => return Err(()),
    }
    Ok(())
}
