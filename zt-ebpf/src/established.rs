//! The packet of an established flow without the general datapath: most packets of a
//! pod's traffic are TCP segments of a flow in `CT_EST`, or UDP datagrams of a flow in
//! `CT`, that change nothing, and the general path (the full parse, the `Flow`, the
//! lookups in the order conntrack.rs keeps, the state update) costs them more than this
//! one (BENCHMARKS.md, "Verdict cost": 0.04-0.24 hash lookups for the TCP ACK, 0.2 for
//! the UDP datagram). This path takes only a packet that the general path would pass
//! unchanged; anything else returns false, and the general path then judges the packet
//! from the start, as if this path did not exist. Such a packet pays this path's lookups
//! twice: a TCP segment that is no plain ACK never gets that far, but a UDP datagram of
//! no tracked flow (the first of every flow, a denied one) pays two `CT` misses more.
//! (Telling the general path of a miss, as a flag down to `conntrack::lookup`, made the
//! verifier walk the general path once per value, past its 1M-instruction limit.)
//!
//! Taken here: IPv4 without options, not a fragment, the whole TCP or UDP header in the
//! skb's linear data, an IPv4 total length (unless 0) that the skb holds and that holds
//! both headers, not DNS (port 53), and either
//! - TCP with ACK and none of SYN/FIN/RST, whose flow is in `CT_EST`, in a state the
//!   segment does not move, or
//! - UDP whose flow is in `CT` (where the general path looks for it: UDP is never in
//!   `CT_EST`);
//! found forward or as its reply at this hook's scope, not idle longer than its timeout,
//! verified under the current policy epoch, entering from the interface recorded for its
//! peer, not steered to the HTTP proxy, and seen within the last second (no last-seen
//! write due).
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use zt_common::*;

use crate::{
    conntrack::{within_timeout, REFRESH_NS},
    maps::{CONFIG, CT, CT_EST},
    parse::{be16, direct, four, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP},
    policy::{self, Hook},
    verdict,
};

/// Ethernet header, IPv4 header without options, the whole TCP header: what the general
/// parser wants in the skb before it reads a TCP segment (less is malformed there, also
/// when the IPv4 total length is 0, BIG TCP's marker, which bounds nothing).
const ETH_IP_TCP: usize = 14 + 20 + 20;
/// ... the whole UDP header (this path also wants it inside the IPv4 total length, which
/// the general parser does not: such a datagram is left to it).
const ETH_IP_UDP: usize = 14 + 20 + 8;

/// The entry of `$key`'s flow in `$map`, forward or (the key turned around in place) as
/// its reply, and which; else `pass` returns false.
macro_rules! forward_or_reply {
    ($map:expr, $key:expr) => {
        match $map.get(&$key) {
            Some(v) => (v, false),
            None => {
                // Whole words from the key, not the packet's bytes kept in registers.
                core::mem::swap(&mut $key.saddr, &mut $key.daddr);
                core::mem::swap(&mut $key.sport, &mut $key.dport);
                $key.dir ^= 1;
                match $map.get(&$key) {
                    Some(v) => (v, true),
                    None => return false,
                }
            }
        }
    };
}

/// Passes `skb` (counted as established or reply) if it is such a packet; false
/// decides nothing.
#[inline(never)]
pub fn pass(skb: *mut aya_ebpf::bindings::__sk_buff, hook: &Hook) -> bool {
    unsafe {
        if (*skb).vlan_present != 0 || (*skb).protocol != ETH_P_IP.to_be() as u32 {
            return false;
        }
        let Some(d) = direct(skb, ETH_IP_UDP) else { return false };
        if be16(d, 12) != ETH_P_IP {
            return false;
        }
        let ip = d.add(14);
        let proto = *ip.add(9);
        if *ip != 0x45 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) || be16(ip, 6) & 0x3fff != 0 {
            return false;
        }
        let tcp = proto == IPPROTO_TCP;
        let tot_len = be16(ip, 2) as usize;
        let ip_and_l4 = if tcp { ETH_IP_TCP - 14 } else { ETH_IP_UDP - 14 };
        if tot_len != 0 && (tot_len < ip_and_l4 || 14 + tot_len > (*skb).len as usize) {
            return false;
        }
        // TCP's flags, through a pointer checked for the whole TCP header.
        let flags = if tcp {
            let Some(t) = direct(skb, ETH_IP_TCP) else { return false };
            *t.add(14 + 20 + 13)
        } else {
            0
        };
        if tcp && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_ACK) != TCP_ACK {
            return false;
        }
        let l4 = ip.add(20);
        let (sport, dport) = (be16(l4, 0), be16(l4, 2));
        if sport == 53 || dport == 53 {
            return false;
        }
        let cfg = match CONFIG.get(0) {
            Some(c) if c.flags & CONFIG_READY != 0 => c,
            _ => return false,
        };
        let mut key = CtKey {
            saddr: v4_mapped(four(ip, 12)),
            daddr: v4_mapped(four(ip, 16)),
            sport,
            dport,
            proto,
            dir: hook.dir,
            icmp_tag: 0,
            _pad: 0,
            ifindex: hook.scope,
        };
        // Where the general path finds the flow: TCP only in `CT_EST` here (a flow in
        // `CT` is in its handshake or closing), UDP in `CT`.
        let (v, reply) = if tcp { forward_or_reply!(CT_EST, key) } else { forward_or_reply!(CT, key) };
        if v.epoch != cfg.policy_epoch
            || v.state & CT_L7 != 0
            || (tcp && ct_tcp_next(v.state, flags, reply) != v.state)
            || policy::spoofed_from(hook, v.peer_if)
        {
            return false;
        }
        let idle = bpf_ktime_get_coarse_ns().saturating_sub(v.last_seen_ns);
        if idle > REFRESH_NS || !within_timeout(cfg, proto, v.state, idle) {
            return false;
        }
        verdict::count(hook.dir, if reply { Reason::AllowReply } else { Reason::AllowEstablished });
        true
    }
}
