//! Reachability probes (run in the current thread's netns) and the reachability matrix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::manifest::Proto;
use crate::sctp;
use crate::topology::{Endpoint, Family, Target};

/// Default probe timeout: short, so that denied probes are cheap.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(300);

/// Outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// Reached a server; its reply text (trailing newline removed; "" for ICMP).
    Ok(String),
    /// Reached the host but the port is closed (TCP RST, ICMP port unreachable, SCTP ABORT).
    Refused,
    /// No answer in time (what a policy drop looks like).
    Timeout,
    /// Anything else (no route, host unreachable, setup error...).
    Error(String),
}

impl ProbeResult {
    /// True for [`ProbeResult::Ok`].
    pub fn is_ok(&self) -> bool {
        matches!(self, ProbeResult::Ok(_))
    }
    /// One-character matrix cell: "." ok, "X" timeout (denied), "R" refused, "E" error.
    pub fn cell(&self) -> &'static str {
        match self {
            ProbeResult::Ok(_) => ".",
            ProbeResult::Timeout => "X",
            ProbeResult::Refused => "R",
            ProbeResult::Error(_) => "E",
        }
    }
}

impl fmt::Display for ProbeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeResult::Ok(s) => write!(f, "ok {s:?}"),
            ProbeResult::Refused => f.write_str("refused"),
            ProbeResult::Timeout => f.write_str("timeout"),
            ProbeResult::Error(e) => write!(f, "error: {e}"),
        }
    }
}

fn io_result(e: std::io::Error) -> ProbeResult {
    match e.kind() {
        ErrorKind::ConnectionRefused => ProbeResult::Refused,
        ErrorKind::TimedOut | ErrorKind::WouldBlock => ProbeResult::Timeout,
        _ => ProbeResult::Error(e.to_string()),
    }
}

fn left(deadline: Instant) -> Option<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    (d > Duration::from_millis(1)).then_some(d)
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A pseudo-random u32 (time, pid, counter mixed); good enough for tags and ports.
pub(crate) fn rand32() -> u32 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mut x = n
        ^ ((std::process::id() as u64) << 32)
        ^ (SEQ.fetch_add(1, Ordering::Relaxed) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x as u32
}

/// Probe `ip:port` over `proto` from the calling thread's network namespace.
pub fn probe_here(ip: IpAddr, proto: Proto, port: u16, timeout: Duration) -> ProbeResult {
    let deadline = Instant::now() + timeout;
    match proto {
        Proto::Tcp => probe_tcp(ip, port, deadline),
        Proto::Udp => probe_udp(ip, port, deadline),
        Proto::Sctp => probe_sctp(ip, port, deadline),
        Proto::Icmp => probe_icmp(ip, deadline),
    }
}

fn probe_tcp(ip: IpAddr, port: u16, deadline: Instant) -> ProbeResult {
    let Some(t) = left(deadline) else {
        return ProbeResult::Timeout;
    };
    let mut s = match TcpStream::connect_timeout(&SocketAddr::new(ip, port), t) {
        Ok(s) => s,
        Err(e) => return io_result(e),
    };
    // Identity servers ignore it; echo servers answer with it.
    let _ = std::io::Write::write_all(&mut s, b"zt-probe\n");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let Some(t) = left(deadline) else {
            return ProbeResult::Timeout;
        };
        let _ = s.set_read_timeout(Some(t));
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.ends_with(b"\n") {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return io_result(e),
        }
    }
    ProbeResult::Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
}

fn probe_udp(ip: IpAddr, port: u16, deadline: Instant) -> ProbeResult {
    let bind: SocketAddr = match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let r = (|| -> std::io::Result<ProbeResult> {
        let s = UdpSocket::bind(bind)?;
        s.connect(SocketAddr::new(ip, port))?;
        s.send(b"probe\n")?;
        let mut buf = [0u8; 1500];
        loop {
            let Some(t) = left(deadline) else {
                return Ok(ProbeResult::Timeout);
            };
            s.set_read_timeout(Some(t))?;
            match s.recv(&mut buf) {
                Ok(n) => {
                    return Ok(ProbeResult::Ok(
                        String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
                    ))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })();
    r.unwrap_or_else(io_result)
}

// ---- raw socket helpers -------------------------------------------------------

/// A socket opened with libc::socket.
pub(crate) fn socket(domain: i32, ty: i32, proto: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the OwnedFd.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we write the matching struct into it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

pub(crate) fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: family says it is a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(crate) fn connect(fd: &OwnedFd, addr: SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: valid sockaddr of length len.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn send(fd: &OwnedFd, buf: &[u8]) -> std::io::Result<()> {
    // SAFETY: valid buffer.
    if unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr() as *const _, buf.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn send_to(fd: &OwnedFd, buf: &[u8], to: SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(to);
    // SAFETY: valid buffer and sockaddr.
    if unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr() as *const _,
            buf.len(),
            0,
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// recvfrom with an optional timeout (None = block).
pub(crate) fn recv_from(
    fd: &OwnedFd,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> std::io::Result<(usize, Option<SocketAddr>)> {
    let tv = match timeout {
        Some(t) => libc::timeval {
            tv_sec: t.as_secs() as _,
            tv_usec: t.subsec_micros().max(1) as _,
        },
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
    };
    // SAFETY: valid option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const _,
            std::mem::size_of::<libc::timeval>() as _,
        );
    }
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid buffers.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut _,
            buf.len(),
            0,
            &mut ss as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, from_sockaddr(&ss)))
}

fn probe_icmp(ip: IpAddr, deadline: Instant) -> ProbeResult {
    let (domain, proto, req, rep) = match ip {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8, 129u8),
    };
    let r = (|| -> std::io::Result<ProbeResult> {
        let fd = socket(domain, libc::SOCK_DGRAM, proto)?;
        connect(&fd, SocketAddr::new(ip, 0))?;
        let seq = (rand32() & 0xffff) as u16;
        let mut pkt = vec![req, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(b"zt-testbed-probe");
        // The kernel fills in the identifier and checksum for ping sockets.
        send(&fd, &pkt)?;
        let mut buf = [0u8; 1500];
        loop {
            let Some(t) = left(deadline) else {
                return Ok(ProbeResult::Timeout);
            };
            match recv_from(&fd, &mut buf, Some(t)) {
                Ok((n, _))
                    if n >= 8 && buf[0] == rep && u16::from_be_bytes([buf[6], buf[7]]) == seq =>
                {
                    return Ok(ProbeResult::Ok(String::new()))
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })();
    r.unwrap_or_else(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => ProbeResult::Error(format!(
            "{e} (net.ipv4.ping_group_range not set in the source netns?)"
        )),
        _ => io_result(e),
    })
}

fn probe_sctp(ip: IpAddr, port: u16, deadline: Instant) -> ProbeResult {
    let domain = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let r = (|| -> std::io::Result<ProbeResult> {
        let fd = socket(domain, libc::SOCK_RAW, sctp::IPPROTO_SCTP)?;
        connect(&fd, SocketAddr::new(ip, 0))?;
        let r = rand32();
        let sport = 32768 + (r % 28000) as u16;
        let tag = rand32() | 1;
        send(&fd, &sctp::init(sport, port, tag))?;
        let mut buf = [0u8; 2048];
        loop {
            let Some(t) = left(deadline) else {
                return Ok(ProbeResult::Timeout);
            };
            let (n, _) = match recv_from(&fd, &mut buf, Some(t)) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let data = if ip.is_ipv4() {
                sctp::strip_ipv4(&buf[..n]).unwrap_or(&[])
            } else {
                &buf[..n]
            };
            let Some(p) = sctp::parse(data) else { continue };
            if p.src_port != port || p.dst_port != sport || p.vtag != tag || !p.checksum_ok {
                continue;
            }
            match p.chunk {
                sctp::CHUNK_INIT_ACK => {
                    let text = String::from_utf8_lossy(p.cookie.as_deref().unwrap_or(&[]))
                        .trim_end()
                        .to_string();
                    return Ok(ProbeResult::Ok(text));
                }
                sctp::CHUNK_ABORT => return Ok(ProbeResult::Refused),
                _ => {}
            }
        }
    })();
    r.unwrap_or_else(io_result)
}

/// One probe of a matrix.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeSpec {
    pub from: Endpoint,
    pub to: Target,
    pub proto: Proto,
    /// Ignored for ICMP (use 0).
    pub port: u16,
}

impl ProbeSpec {
    /// Shorthand constructor.
    pub fn new(from: Endpoint, to: Target, proto: Proto, port: u16) -> ProbeSpec {
        ProbeSpec {
            from,
            to,
            proto,
            port: if proto == Proto::Icmp { 0 } else { port },
        }
    }
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.proto == Proto::Icmp {
            write!(f, "{} -> {} icmp", self.from, self.to)
        } else {
            write!(
                f,
                "{} -> {} {}/{}",
                self.from, self.to, self.proto, self.port
            )
        }
    }
}

/// Results of many probes; `Display` prints one table per (protocol, port, family):
/// rows = from, columns = to, "." allowed, "X" denied (timeout), "R" refused, "E" error.
#[derive(Clone, Debug, Default)]
pub struct Matrix {
    pub results: Vec<(ProbeSpec, ProbeResult)>,
}

impl Matrix {
    /// Result of one probe, if it was part of the matrix.
    pub fn get(
        &self,
        from: &Endpoint,
        to: &Target,
        proto: Proto,
        port: u16,
    ) -> Option<&ProbeResult> {
        let port = if proto == Proto::Icmp { 0 } else { port };
        self.results
            .iter()
            .find(|(s, _)| &s.from == from && &s.to == to && s.proto == proto && s.port == port)
            .map(|(_, r)| r)
    }
    /// True if every probe succeeded.
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|(_, r)| r.is_ok())
    }
    /// True if no probe succeeded.
    pub fn none_ok(&self) -> bool {
        !self.results.iter().any(|(_, r)| r.is_ok())
    }
    /// Probes that did not succeed.
    pub fn failures(&self) -> Vec<&(ProbeSpec, ProbeResult)> {
        self.results.iter().filter(|(_, r)| !r.is_ok()).collect()
    }
    /// Probes that succeeded.
    pub fn successes(&self) -> Vec<&(ProbeSpec, ProbeResult)> {
        self.results.iter().filter(|(_, r)| r.is_ok()).collect()
    }
}

impl fmt::Display for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        type Group = (Proto, u16, Family);
        let mut groups: BTreeMap<Group, Vec<&(ProbeSpec, ProbeResult)>> = BTreeMap::new();
        for r in &self.results {
            groups
                .entry((r.0.proto, r.0.port, r.0.to.family()))
                .or_default()
                .push(r);
        }
        for ((proto, port, fam), rs) in groups {
            let rows: BTreeSet<String> = rs.iter().map(|(s, _)| s.from.to_string()).collect();
            let cols: BTreeSet<String> = rs.iter().map(|(s, _)| s.to.short_label()).collect();
            let cell: BTreeMap<(String, String), &ProbeResult> = rs
                .iter()
                .map(|(s, r)| ((s.from.to_string(), s.to.short_label()), r))
                .collect();
            if proto == Proto::Icmp {
                writeln!(f, "icmp {fam}:")?;
            } else {
                writeln!(f, "{proto}/{port} {fam}:")?;
            }
            let w0 = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(9);
            write!(f, "  {:w0$}", "from \\ to")?;
            for c in &cols {
                write!(f, " {c}")?;
            }
            writeln!(f)?;
            for r in &rows {
                write!(f, "  {r:w0$}")?;
                for c in &cols {
                    let s = cell
                        .get(&(r.clone(), c.clone()))
                        .map(|x| x.cell())
                        .unwrap_or("-");
                    write!(f, " {s:^w$}", w = c.len())?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
