//! The node's route to an address, asked of the kernel over rtnetlink (`RTM_GETROUTE`,
//! what `ip route get` sends) instead of forking `ip` per local pod on every change: a
//! few microseconds per lookup, and the image needs no iproute2. One request, one reply
//! (or an error), on a socket of the calling thread's network namespace.
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTN_UNICAST: u8 = 1;
const NLMSG_HDRLEN: usize = 16;
const RTMSG_LEN: usize = 12;

/// What the kernel's route to an address says, as far as zt needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `rtm_type` (1 unicast, 2 local, 7 unreachable, ...).
    pub kind: u8,
    pub oif: Option<u32>,
    pub gateway: bool,
}

/// An rtnetlink socket of the calling thread's network namespace whose receives give up
/// after 2 s (a kernel that never answers must not hang the agent).
pub(crate) fn socket() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    unsafe {
        libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of::<libc::timeval>() as u32)
    };
    Ok(fd)
}

/// The route the kernel would use to send to `ip`; `Ok(None)` when there is none
/// (unreachable, no route: the kernel answers with an error).
pub fn get(ip: IpAddr) -> io::Result<Option<Route>> {
    let fd = socket()?;
    let req = request(ip, 1);
    // The kernel is pid 0; zeroed padding and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

/// `RTM_GETROUTE` for one destination (a host route: dst_len = the family's width).
fn request(ip: IpAddr, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match ip {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    };
    let rta_len = 4 + addr.len();
    let len = NLMSG_HDRLEN + RTMSG_LEN + align(rta_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
    m.extend_from_slice(&[family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(rta_len as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m.resize(len, 0);
    m
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The reply: `RTM_NEWROUTE` with its attributes, or `NLMSG_ERROR` (no route).
fn parse(b: &[u8]) -> io::Result<Option<Route>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink reply: {what}"));
    if b.len() < NLMSG_HDRLEN {
        return Err(bad("shorter than a header"));
    }
    let len = (u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize).min(b.len());
    let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
    match ty {
        NLMSG_ERROR => {
            let code = b.get(16..20).map(|e| i32::from_ne_bytes(e.try_into().unwrap())).ok_or_else(|| bad("truncated error"))?;
            match -code {
                0 => Err(bad("an acknowledgement instead of a route")),
                libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EINVAL => Ok(None),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        RTM_NEWROUTE => {
            if len < NLMSG_HDRLEN + RTMSG_LEN {
                return Err(bad("truncated rtmsg"));
            }
            let rt = &b[NLMSG_HDRLEN..NLMSG_HDRLEN + RTMSG_LEN];
            let mut route = Route { kind: rt[7], oif: None, gateway: false };
            let mut at = NLMSG_HDRLEN + RTMSG_LEN;
            while at + 4 <= len {
                let alen = u16::from_ne_bytes(b[at..at + 2].try_into().unwrap()) as usize;
                let aty = u16::from_ne_bytes(b[at + 2..at + 4].try_into().unwrap()) & 0x3fff;
                if alen < 4 || at + alen > len {
                    return Err(bad("attribute out of bounds"));
                }
                let data = &b[at + 4..at + alen];
                match aty {
                    RTA_OIF if data.len() == 4 => route.oif = Some(u32::from_ne_bytes(data.try_into().unwrap())),
                    RTA_GATEWAY => route.gateway = true,
                    _ => {}
                }
                at += align(alen);
            }
            Ok(Some(route))
        }
        other => Err(bad(&format!("message type {other}"))),
    }
}

impl Route {
    /// A direct (no gateway) unicast route out of an interface.
    pub fn direct_unicast(&self) -> Option<u32> {
        match (self.kind, self.gateway, self.oif) {
            (RTN_UNICAST, false, Some(oif)) => Some(oif),
            _ => None,
        }
    }
}

/// The interface name of `ifindex`.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr() as *mut libc::c_char) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&c| c == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let r = request("10.1.2.3".parse().unwrap(), 7);
        assert_eq!(r.len(), 16 + 12 + 8);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), RTM_GETROUTE);
        assert_eq!((r[16], r[17]), (libc::AF_INET as u8, 32));
        assert_eq!(&r[28..36], &[8, 0, 1, 0, 10, 1, 2, 3]);
        let r6 = request("fd00::1".parse().unwrap(), 7);
        assert_eq!((r6.len(), r6[17]), (16 + 12 + 20, 128));
    }

    #[test]
    fn malformed_replies_are_errors_not_routes() {
        assert!(parse(&[0u8; 4]).is_err());
        let mut m = vec![0u8; 40];
        m[0..4].copy_from_slice(&40u32.to_ne_bytes());
        m[4..6].copy_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        // An attribute claiming more than the message holds.
        m[28..30].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse(&m).is_err());
        let mut e = vec![0u8; 36];
        e[0..4].copy_from_slice(&36u32.to_ne_bytes());
        e[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        e[16..20].copy_from_slice(&(-libc::ENETUNREACH).to_ne_bytes());
        assert_eq!(parse(&e).unwrap(), None);
    }
}
