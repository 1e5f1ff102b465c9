//! Bytes as a DNS message (parse_message) and as a DnsEvent from the ring (observe).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| zt_fuzz::dns_event(data));
