//! `CNI_*` variables (KEY=VALUE lines), a NUL byte, then the network configuration.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| zt_fuzz::cni_input(data));
