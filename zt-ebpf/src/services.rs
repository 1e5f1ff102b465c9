//! Services at the socket: the cgroup sock_addr programs, attached with the cgroup skb
//! programs at the root of the pods' cgroup hierarchy, replace a Service frontend in a
//! pod's `connect` (TCP, connected UDP) and `sendmsg` (unconnected UDP) with one of its
//! backends, and put the frontend back where the application reads the peer
//! (`getpeername`, `recvmsg`). The socket then talks to the backend pod directly: the TC
//! and cgroup skb hooks, conntrack and policy see the backend's address, identity and
//! target port, and nothing is rewritten per packet. (Modelled on Cilium's bpf_sock.c.)
use aya_ebpf::{
    bindings::bpf_sock_addr,
    cty::c_void,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
};
use zt_common::*;

use crate::maps::{SVC_AFFINITY, SVC_BACKENDS, SVC_FRONTENDS, SVC_REVNAT, SVC_STATS};

pub const SOCK_ALLOW: i32 = 1;
pub const SOCK_DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn stat(s: SvcStat) {
    if let Some(p) = SVC_STATS.get_ptr_mut(s as u32) {
        unsafe { *p += 1 };
    }
}

// Context fields are read and written one volatile access each, straight at their
// offset: the verifier refuses a context pointer that LLVM has moved (`ctx + 4`) before
// dereferencing it, which a plain copy of the address array would produce.
macro_rules! rd {
    ($sa:expr, $($f:tt)+) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$sa).$($f)+)) }
    };
}
macro_rules! wr {
    ($sa:expr, $v:expr, $($f:tt)+) => {
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$sa).$($f)+), $v) }
    };
}

/// The address the application named, IPv4 mapped.
#[inline(always)]
fn user_addr<const V6: bool>(sa: *mut bpf_sock_addr) -> [u8; 16] {
    if V6 {
        let (w0, w1, w2, w3) = (rd!(sa, user_ip6[0]), rd!(sa, user_ip6[1]), rd!(sa, user_ip6[2]), rd!(sa, user_ip6[3]));
        let mut a = [0u8; 16];
        a[0..4].copy_from_slice(&w0.to_ne_bytes());
        a[4..8].copy_from_slice(&w1.to_ne_bytes());
        a[8..12].copy_from_slice(&w2.to_ne_bytes());
        a[12..16].copy_from_slice(&w3.to_ne_bytes());
        a
    } else {
        v4_mapped(rd!(sa, user_ip4).to_ne_bytes())
    }
}

#[inline(always)]
fn user_port(sa: *mut bpf_sock_addr) -> u16 {
    u16::from_be(rd!(sa, user_port) as u16)
}

#[inline(always)]
fn set_user_addr<const V6: bool>(sa: *mut bpf_sock_addr, a: &[u8; 16], port: u16) {
    if V6 {
        wr!(sa, u32::from_ne_bytes([a[0], a[1], a[2], a[3]]), user_ip6[0]);
        wr!(sa, u32::from_ne_bytes([a[4], a[5], a[6], a[7]]), user_ip6[1]);
        wr!(sa, u32::from_ne_bytes([a[8], a[9], a[10], a[11]]), user_ip6[2]);
        wr!(sa, u32::from_ne_bytes([a[12], a[13], a[14], a[15]]), user_ip6[3]);
    } else {
        wr!(sa, u32::from_ne_bytes([a[12], a[13], a[14], a[15]]), user_ip4);
    }
    wr!(sa, port.to_be() as u32, user_port);
}

#[inline(always)]
fn l4_proto(sa: *mut bpf_sock_addr) -> Option<u8> {
    match rd!(sa, protocol) {
        IPPROTO_TCP => Some(6),
        IPPROTO_UDP => Some(17),
        _ => None,
    }
}

/// `connect` / `sendmsg`: a frontend becomes one of its backends. One instance per
/// family (a runtime flag would let LLVM share a moved context pointer between the two
/// layouts, which the verifier refuses).
#[inline(always)]
pub fn translate<const V6: bool>(sa: *mut bpf_sock_addr) -> i32 {
    let Some(proto) = l4_proto(sa) else { return SOCK_ALLOW };
    let fkey = SvcFrontendKey { addr: user_addr::<V6>(sa), port: user_port(sa), proto, _pad: 0 };
    let Some(fe) = (unsafe { SVC_FRONTENDS.get(&fkey) }) else { return SOCK_ALLOW };
    let (svc_id, n, affinity_s) = (fe.svc_id, fe.backends, fe.affinity_s);
    if n == 0 {
        stat(SvcStat::NoBackend);
        return refuse();
    }
    let slot = pick(sa, &fkey, svc_id, n, affinity_s);
    let Some(be) = (unsafe { SVC_BACKENDS.get(&SvcBackendKey { svc_id, slot }) }) else {
        stat(SvcStat::BackendMissing);
        return refuse();
    };
    let (baddr, bport) = (be.addr, be.port);
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    let rkey = SvcRevKey { cookie, addr: baddr, port: bport, proto, _pad: [0; 5] };
    let _ = SVC_REVNAT.insert(&rkey, &SvcRevValue { addr: fkey.addr, port: fkey.port, _pad: [0; 6] }, 0);
    set_user_addr::<V6>(sa, &baddr, bport);
    stat(SvcStat::Translated);
    SOCK_ALLOW
}

/// The backend slot: the client's by sessionAffinity while it holds, else random.
#[inline(always)]
fn pick(sa: *mut bpf_sock_addr, fkey: &SvcFrontendKey, svc_id: u32, n: u32, affinity_s: u32) -> u32 {
    let random = unsafe { bpf_get_prandom_u32() } % n;
    if affinity_s == 0 {
        return random;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let akey = SvcAffinityKey { netns_cookie: unsafe { bpf_get_netns_cookie(sa as *mut c_void) }, frontend: *fkey, _pad: 0 };
    if let Some(a) = SVC_AFFINITY.get_ptr_mut(&akey) {
        unsafe {
            if (*a).svc_id == svc_id && (*a).slot < n && now.saturating_sub((*a).last_ns) < affinity_s as u64 * 1_000_000_000 {
                (*a).last_ns = now;
                stat(SvcStat::Affinity);
                return (*a).slot;
            }
        }
    }
    let _ = SVC_AFFINITY.insert(&akey, &SvcAffinityValue { last_ns: now, svc_id, slot: random }, 0);
    random
}

#[inline(always)]
fn refuse() -> i32 {
    // connect/sendmsg fail with ECONNREFUSED instead of the default EPERM.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    SOCK_DENY
}

/// `getpeername` / `recvmsg`: a translated socket's backend is reported as the frontend
/// the application asked for.
#[inline(always)]
pub fn reverse<const V6: bool>(sa: *mut bpf_sock_addr) -> i32 {
    let Some(proto) = l4_proto(sa) else { return SOCK_ALLOW };
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut c_void) };
    let rkey = SvcRevKey { cookie, addr: user_addr::<V6>(sa), port: user_port(sa), proto, _pad: [0; 5] };
    if let Some(v) = unsafe { SVC_REVNAT.get(&rkey) } {
        let (addr, port) = (v.addr, v.port);
        set_user_addr::<V6>(sa, &addr, port);
        stat(SvcStat::Reversed);
    }
    SOCK_ALLOW
}
