//! Policy routing over rtnetlink (what `ip rule` and `ip route` send), so that the agent
//! and its image need no iproute2: the HTTP proxy's `fwmark <mark> lookup <table>` rule
//! and the `local default dev lo` route of that table (l7/listener.rs).
use std::io;
use std::os::fd::AsRawFd;

const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RTPROT_BOOT: u8 = 3;
/// The loopback device's index in every network namespace.
const LO_IFINDEX: u32 = 1;

/// One request with NLM_F_ACK; Ok once the kernel acknowledged it, else its errno.
fn request(kind: u16, flags: u16, header: &[u8], attrs: &[(u16, u32)]) -> io::Result<()> {
    let mut body = header.to_vec();
    for (ty, v) in attrs {
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&ty.to_ne_bytes());
        body.extend_from_slice(&v.to_ne_bytes());
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    let fd = super::route::socket()?;
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr() as *const libc::c_void, msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 4096];
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < 20 || u16::from_ne_bytes([buf[4], buf[5]]) != NLMSG_ERROR {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "rtnetlink: no acknowledgement"));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// `struct fib_rule_hdr` for a rule that looks a table up (the table goes in FRA_TABLE).
fn rule_header(v6: bool) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0] = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    h[7] = FR_ACT_TO_TBL;
    h
}

/// Deletes every `fwmark <mark> lookup <table>` rule of the family (earlier runs' copies);
/// returns how many.
pub fn delete_fwmark_rules(v6: bool, mark: u32, table: u32) -> io::Result<usize> {
    let mut n = 0;
    loop {
        match request(RTM_DELRULE, 0, &rule_header(v6), &[(FRA_FWMARK, mark), (FRA_TABLE, table)]) {
            Ok(()) => n += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(n),
            Err(e) => return Err(e),
        }
        if n > 64 {
            return Ok(n);
        }
    }
}

/// `ip rule add fwmark <mark> lookup <table> pref <pref>`.
pub fn add_fwmark_rule(v6: bool, mark: u32, table: u32, pref: u32) -> io::Result<()> {
    request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule_header(v6), &[(FRA_FWMARK, mark), (FRA_TABLE, table), (FRA_PRIORITY, pref)])
}

/// `ip route replace local default dev lo table <table>` (IPv4 0.0.0.0/0 or IPv6 ::/0).
pub fn replace_local_default(v6: bool, table: u32) -> io::Result<()> {
    let mut h = [0u8; 12];
    h[0] = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    h[5] = RTPROT_BOOT;
    h[6] = RT_SCOPE_HOST;
    h[7] = RTN_LOCAL;
    request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &h, &[(RTA_TABLE, table), (RTA_OIF, LO_IFINDEX)])
}
