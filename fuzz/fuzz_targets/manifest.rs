//! Bytes as one manifest file of the directory source: parse, validate, load, compile.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| zt_fuzz::manifest(data));
