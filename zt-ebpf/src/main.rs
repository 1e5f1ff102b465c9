//! zt kernel programs: identity-keyed, stateful default-deny on the host side of
//! each local pod's interface.
//!
//! `zt_from_pod` runs at TC ingress of the host-side interface (the pod's egress),
//! `zt_to_pod` at TC egress (the pod's ingress). See ARCHITECTURE.md for the maps and
//! the lookup order. `zt_cgroup_egress` / `zt_cgroup_ingress` run at the root of the
//! pods' cgroup hierarchy and close the gap before a pod's interface is hooked.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod auth;
#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod cgroup;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod dns;
#[cfg(target_arch = "bpf")]
mod established;
#[cfg(target_arch = "bpf")]
mod fqdn;
#[cfg(target_arch = "bpf")]
mod l7;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod services;
#[cfg(target_arch = "bpf")]
mod uplink;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_skb, cgroup_sock_addr, classifier},
        programs::{SkBuffContext, SockAddrContext, TcContext},
    };
    use zt_common::{DIR_EGRESS, DIR_INGRESS};

    /// Packets leaving the pod (TC ingress on the host-side interface).
    #[classifier]
    pub fn zt_from_pod(ctx: TcContext) -> i32 {
        crate::datapath::handle::<true>(&ctx, DIR_EGRESS)
    }

    /// Packets entering the pod (TC egress on the host-side interface).
    #[classifier]
    pub fn zt_to_pod(ctx: TcContext) -> i32 {
        crate::datapath::handle::<true>(&ctx, DIR_INGRESS)
    }

    /// Packets arriving from other nodes (TC ingress on the node's uplinks): flows that
    /// need the HTTP proxy are steered to it (uplink.rs); nothing else is touched.
    #[classifier]
    pub fn zt_from_uplink(ctx: TcContext) -> i32 {
        crate::uplink::handle(&ctx)
    }

    /// A pod's own sockets sending (attached at the pods' cgroup root).
    #[cgroup_skb(egress)]
    pub fn zt_cgroup_egress(ctx: SkBuffContext) -> i32 {
        crate::cgroup::handle(&ctx, DIR_EGRESS)
    }

    /// A pod's own sockets receiving (attached at the pods' cgroup root).
    #[cgroup_skb(ingress)]
    pub fn zt_cgroup_ingress(ctx: SkBuffContext) -> i32 {
        crate::cgroup::handle(&ctx, DIR_INGRESS)
    }

    /// A pod's socket connecting: a Service frontend becomes a backend (services.rs).
    #[cgroup_sock_addr(connect4)]
    pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
        crate::services::translate::<false>(ctx.sock_addr)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
        crate::services::translate::<true>(ctx.sock_addr)
    }

    /// Unconnected UDP: each datagram to a frontend goes to a backend.
    #[cgroup_sock_addr(sendmsg4)]
    pub fn zt_sendmsg4(ctx: SockAddrContext) -> i32 {
        crate::services::translate::<false>(ctx.sock_addr)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn zt_sendmsg6(ctx: SockAddrContext) -> i32 {
        crate::services::translate::<true>(ctx.sock_addr)
    }

    /// Unconnected UDP: a reply from the backend reads as from the frontend.
    #[cgroup_sock_addr(recvmsg4)]
    pub fn zt_recvmsg4(ctx: SockAddrContext) -> i32 {
        crate::services::reverse::<false>(ctx.sock_addr)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn zt_recvmsg6(ctx: SockAddrContext) -> i32 {
        crate::services::reverse::<true>(ctx.sock_addr)
    }

    /// A translated socket's peer reads as the frontend.
    #[cgroup_sock_addr(getpeername4)]
    pub fn zt_getpeername4(ctx: SockAddrContext) -> i32 {
        crate::services::reverse::<false>(ctx.sock_addr)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn zt_getpeername6(ctx: SockAddrContext) -> i32 {
        crate::services::reverse::<true>(ctx.sock_addr)
    }

    /// Does nothing: the baseline of `cargo xtask bench`.
    #[classifier]
    pub fn zt_noop(_ctx: TcContext) -> i32 {
        crate::datapath::TC_PASS
    }

    /// `zt_to_pod` without the established segment's short way (datapath.rs): the
    /// general path's cost for the same packet in `cargo xtask bench`; never loaded by
    /// the agent.
    #[classifier]
    pub fn zt_bench_general(ctx: TcContext) -> i32 {
        crate::datapath::handle::<false>(&ctx, DIR_INGRESS)
    }

    /// Passes everything, at a cgroup skb hook: with `zt_noop` at the TC hooks, what the
    /// hooks themselves cost in `cargo xtask bench` (bench_veth.rs); never loaded by the
    /// agent. No attach type: one program for both directions.
    #[cgroup_skb]
    pub fn zt_cgroup_noop(_ctx: SkBuffContext) -> i32 {
        crate::cgroup::CG_PASS
    }

    /// One hash lookup (bench.rs): the other baseline of `cargo xtask bench`; never loaded
    /// by the agent.
    #[classifier]
    pub fn zt_bench_lookup(ctx: TcContext) -> i32 {
        crate::bench::one_lookup(&ctx)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
