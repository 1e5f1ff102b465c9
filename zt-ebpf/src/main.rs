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
mod cgroup;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod policy;
#[cfg(target_arch = "bpf")]
mod verdict;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        macros::{cgroup_skb, classifier},
        programs::{SkBuffContext, TcContext},
    };
    use zt_common::{DIR_EGRESS, DIR_INGRESS};

    /// Packets leaving the pod (TC ingress on the host-side interface).
    #[classifier]
    pub fn zt_from_pod(ctx: TcContext) -> i32 {
        crate::datapath::handle(&ctx, DIR_EGRESS)
    }

    /// Packets entering the pod (TC egress on the host-side interface).
    #[classifier]
    pub fn zt_to_pod(ctx: TcContext) -> i32 {
        crate::datapath::handle(&ctx, DIR_INGRESS)
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

    /// Does nothing: the baseline of `cargo xtask bench`.
    #[classifier]
    pub fn zt_noop(_ctx: TcContext) -> i32 {
        crate::datapath::TC_PASS
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
