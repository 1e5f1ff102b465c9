//! Bytes decoded into a small cluster, written out as YAML documents, compiled into map contents.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| zt_fuzz::policy::policy_compile(data));
