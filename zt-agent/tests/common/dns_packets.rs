//! DNS messages and the frames that carry them, built byte by byte for the kernel DNS
//! tests and the benchmark: well-formed ones, and the malformed ones (each helper takes
//! raw parts so that a test can break exactly one thing).
#![allow(dead_code)]
use super::common::{eth, ipv4_frag, ipv6_ext, TCP, UDP};

pub const T_A: u16 = 1;
pub const T_CNAME: u16 = 5;
pub const T_TXT: u16 = 16;
pub const T_AAAA: u16 = 28;
pub const T_OPT: u16 = 41;
pub const C_IN: u16 = 1;
/// QR = 1, RD = 1, RA = 1, NOERROR.
pub const RESPONSE: u16 = 0x8180;
/// Owner name of an answer: a compression pointer to the question name at offset 12.
pub const PTR_QNAME: [u8; 2] = [0xc0, 12];

/// A name in wire format (labels, then the zero byte); "" and "." are the root.
pub fn name(n: &str) -> Vec<u8> {
    let mut v = vec![];
    for l in n.trim_end_matches('.').split('.').filter(|l| !l.is_empty()) {
        v.push(l.len() as u8);
        v.extend_from_slice(l.as_bytes());
    }
    v.push(0);
    v
}

/// The question section entry: name, type, class IN.
pub fn question(qname: &str, qtype: u16) -> Vec<u8> {
    let mut v = name(qname);
    v.extend_from_slice(&qtype.to_be_bytes());
    v.extend_from_slice(&C_IN.to_be_bytes());
    v
}

/// One resource record.
pub fn rr(owner: &[u8], ty: u16, class: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut v = owner.to_vec();
    v.extend_from_slice(&ty.to_be_bytes());
    v.extend_from_slice(&class.to_be_bytes());
    v.extend_from_slice(&ttl.to_be_bytes());
    v.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    v.extend_from_slice(rdata);
    v
}

pub fn a(ttl: u32, ip: &str) -> Vec<u8> {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    rr(&PTR_QNAME, T_A, C_IN, ttl, &ip.octets())
}

pub fn aaaa(ttl: u32, ip: &str) -> Vec<u8> {
    let ip: std::net::Ipv6Addr = ip.parse().unwrap();
    rr(&PTR_QNAME, T_AAAA, C_IN, ttl, &ip.octets())
}

/// The EDNS0 OPT pseudo-record (additional section), 4096-byte UDP payload.
pub fn opt() -> Vec<u8> {
    let mut v = vec![0u8]; // root owner
    v.extend_from_slice(&T_OPT.to_be_bytes());
    v.extend_from_slice(&4096u16.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v
}

/// A message: header fields, then the raw sections.
pub fn msg(flags: u16, qd: u16, an: u16, ar: u16, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x12, 0x34];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&qd.to_be_bytes());
    v.extend_from_slice(&an.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    v.extend_from_slice(&ar.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A NOERROR response to (qname, qtype) with these answer records.
pub fn answer(qname: &str, qtype: u16, records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = question(qname, qtype);
    for r in records {
        body.extend_from_slice(r);
    }
    msg(RESPONSE, 1, records.len() as u16, 0, &body)
}

pub fn udp_hdr(sport: u16, dport: u16, payload_len: usize) -> Vec<u8> {
    let mut h = vec![];
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h
}

fn tcp_hdr(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x18; // PSH, ACK
    h
}

fn is_v6(addr: &str) -> bool {
    addr.contains(':')
}

/// An IPv4 or IPv6 frame (by the address family) carrying `l4`.
pub fn ip_frame(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    if is_v6(src) {
        ipv6_ext(src, dst, proto, l4, &[], 64)
    } else {
        ipv4_frag(src, dst, proto, l4, 7, 0)
    }
}

/// A UDP datagram carrying `payload`.
pub fn udp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = udp_hdr(sport, dport, payload.len());
    l4.extend_from_slice(payload);
    ip_frame(src, dst, UDP, &l4)
}

/// A TCP segment carrying `payload` as is (a DNS message needs its length prefix:
/// see `tcp_dns`).
pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut l4 = tcp_hdr(sport, dport);
    l4.extend_from_slice(payload);
    ip_frame(src, dst, TCP, &l4)
}

/// A TCP segment with one whole DNS message (2-byte length prefix).
pub fn tcp_dns(src: &str, dst: &str, sport: u16, dport: u16, m: &[u8]) -> Vec<u8> {
    let mut p = (m.len() as u16).to_be_bytes().to_vec();
    p.extend_from_slice(m);
    tcp(src, dst, sport, dport, &p)
}

/// The first fragment of an IPv4 UDP datagram: the UDP header claims all of `payload`,
/// the fragment carries only its first `keep` bytes.
pub fn udp4_first_fragment(src: &str, dst: &str, sport: u16, dport: u16, payload: &[u8], keep: usize) -> Vec<u8> {
    let mut l4 = udp_hdr(sport, dport, payload.len());
    l4.extend_from_slice(&payload[..keep]);
    ipv4_frag(src, dst, UDP, &l4, 9, 0x2000)
}

/// Ethernet frame helper re-export for tests that build raw frames.
pub fn raw_eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    eth(ethertype, payload)
}

/// The question section of message `m` (the bytes an answer echoes), if well formed.
pub fn question_of(m: &[u8]) -> Option<&[u8]> {
    let n = zt_common::question_len(|i| m.get(12 + i as usize).map(|b| *b as u32))?;
    m.get(12..12 + n as usize)
}
