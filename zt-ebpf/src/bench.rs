//! Baselines for `cargo xtask bench` (zt-agent/tests/bench.rs), never attached: what one
//! hash lookup costs in the same BPF_PROG_TEST_RUN harness as the datapath.
use aya_ebpf::programs::TcContext;
use zt_common::{v4_mapped, EndpointKey};

use crate::{
    datapath::{TC_DROP, TC_PASS},
    maps::ENDPOINTS,
};

/// The packet's IPv4 destination (one load) looked up in the endpoint map: passes if
/// found, so that the bench can check that every run did the lookup and hit.
#[inline(always)]
pub fn one_lookup(ctx: &TcContext) -> i32 {
    let Ok(daddr) = ctx.load::<[u8; 4]>(14 + 16) else { return TC_DROP };
    match unsafe { ENDPOINTS.get(&EndpointKey { addr: v4_mapped(daddr) }) } {
        Some(_) => TC_PASS,
        None => TC_DROP,
    }
}
