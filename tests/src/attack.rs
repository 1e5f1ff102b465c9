//! Helpers of the adversarial suite (`tests/tests/adversarial.rs`): the scapy attack
//! script (`tests/attacks/attack.py`), packet captures and socket receivers inside a
//! netns, and the tally of attacks, frames, wrong allows and leaks.
//!
//! A capture is an `AF_PACKET` socket bound to one interface of a netns (a pod's `eth0`):
//! it sees what reached the pod, i.e. what every hook on the way let through. Receivers
//! are plain sockets (UDP, raw IP) bound in a netns, so that what arrives is recorded
//! and not answered (no ICMP port unreachable to confuse the attacker's capture).
use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::dns::SCAPY_PYTHON;
use crate::{sys, Endpoint, Testbed};

/// The attack script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("attacks/attack.py")
}

/// Fails (never skips) when scapy or the script cannot run here.
pub fn require_scapy() -> Result<()> {
    let out = std::process::Command::new(SCAPY_PYTHON)
        .args(["-c", "import scapy.all, scapy.contrib.geneve, scapy.layers.vxlan"])
        .output()
        .with_context(|| format!("running {SCAPY_PYTHON}"))?;
    if !out.status.success() {
        bail!(
            "the adversarial suite needs scapy under {SCAPY_PYTHON} (Debian python3-scapy; `cargo xtask setup` installs it): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !script().is_file() {
        bail!("attack script {} missing", script().display());
    }
    Ok(())
}

/// A random tag for this run's frames (`ZTADV:<nonce>:<label>;`).
pub fn nonce() -> String {
    format!("{:08x}", crate::probe::rand32())
}

/// What the script sent: (attack label, frames) in order.
#[derive(Clone, Debug, Default)]
pub struct Sent {
    pub attacks: Vec<(String, u64)>,
}

impl Sent {
    pub fn frames(&self) -> u64 {
        self.attacks.iter().map(|a| a.1).sum()
    }
    /// Frames of the attacks whose label satisfies `f`.
    pub fn frames_where(&self, f: impl Fn(&str) -> bool) -> u64 {
        self.attacks.iter().filter(|a| f(&a.0)).map(|a| a.1).sum()
    }
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.attacks.iter().map(|a| a.0.as_str())
    }
}

/// Run `attack.py <scenario> <params>` in `from`'s netns (a pod: also its cgroup).
pub fn run(tb: &Testbed, from: &Endpoint, scenario: &str, params: &serde_json::Value) -> Result<Sent> {
    let script = script().display().to_string();
    let out = tb.exec_in(from, &[SCAPY_PYTHON, &script, scenario, &params.to_string()])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("attack.py {scenario} in {from} failed ({}): {stdout}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let mut sent = Sent::default();
    for l in stdout.lines() {
        if let Some(rest) = l.strip_prefix("ATTACK ") {
            let (label, n) = rest.rsplit_once(' ').ok_or_else(|| anyhow!("bad line {l:?}"))?;
            sent.attacks.push((label.to_string(), n.parse()?));
        }
    }
    if scenario != "nft" && sent.attacks.is_empty() {
        bail!("attack.py {scenario} sent nothing: {stdout}");
    }
    Ok(sent)
}

/// The MAC address of `ifname` in a pod's or node's netns.
pub fn mac_of(tb: &Testbed, ep: &Endpoint, ifname: &str) -> Result<String> {
    let out = tb.exec_in(ep, &["ip", "-o", "link", "show", "dev", ifname])?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no MAC for {ifname} in {ep}: {s}{}", String::from_utf8_lossy(&out.stderr)))
}

/// Run a shell script in a pod's or node's netns; an error carries its stderr.
pub fn sh(tb: &Testbed, ep: &Endpoint, script: &str) -> Result<String> {
    let out = tb.sh_in(ep, script)?;
    if !out.status.success() {
        bail!("{script:?} in {ep} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

const PACKET_OUTGOING: u8 = 4;

/// One captured frame (Ethernet) or received datagram/packet.
#[derive(Clone, Debug)]
pub struct Frame {
    /// `sll_pkttype` for captures; 0 for receivers.
    pub pkttype: u8,
    /// The sender's address for receivers (socket source address).
    pub from: Option<IpAddr>,
    pub data: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Frame {
    pub fn incoming(&self) -> bool {
        self.pkttype != PACKET_OUTGOING
    }

    pub fn ethertype(&self) -> u16 {
        if self.data.len() < 14 {
            return 0;
        }
        u16::from_be_bytes([self.data[12], self.data[13]])
    }

    /// (source, destination, protocol / first next header, offset of what follows the
    /// fixed IP header) of an Ethernet frame carrying IPv4 or IPv6.
    pub fn ip(&self) -> Option<(IpAddr, IpAddr, u8, usize)> {
        let d = &self.data;
        match self.ethertype() {
            0x0800 if d.len() >= 34 => {
                let s = Ipv4Addr::new(d[26], d[27], d[28], d[29]);
                let t = Ipv4Addr::new(d[30], d[31], d[32], d[33]);
                Some((s.into(), t.into(), d[23], 14 + (d[14] & 0x0f) as usize * 4))
            }
            0x86dd if d.len() >= 54 => {
                let s: [u8; 16] = d[22..38].try_into().ok()?;
                let t: [u8; 16] = d[38..54].try_into().ok()?;
                Some((Ipv6Addr::from(s).into(), Ipv6Addr::from(t).into(), d[20], 54))
            }
            _ => None,
        }
    }

    /// ARP, IPv6 neighbour discovery / MLD / link-scope multicast: the link's own chatter.
    pub fn is_link_control(&self) -> bool {
        match self.ethertype() {
            0x0806 => true,
            0x86dd => match self.ip() {
                Some((_, IpAddr::V6(dst), nh, off)) => dst.segments()[0] == 0xff02 || (nh == 58 && self.data.get(off).is_some_and(|t| (130..=143).contains(t))),
                _ => false,
            },
            _ => false,
        }
    }

    /// An ICMP / ICMPv6 destination unreachable or time exceeded: what a target (or a
    /// router on its behalf) answers. Parameter problems and packet-too-big are the
    /// node's own verdict on the sender's header or size, and tell nothing of the target.
    pub fn is_icmp_unreachable(&self) -> bool {
        match self.ip() {
            Some((IpAddr::V4(_), _, 1, off)) => self.data.get(off).is_some_and(|t| matches!(t, 3 | 11)),
            Some((IpAddr::V6(_), _, 58, off)) => self.data.get(off).is_some_and(|t| matches!(t, 1 | 3)),
            _ => false,
        }
    }

    /// The label of this run's tag in the frame, if any.
    pub fn tag(&self, nonce: &str) -> Option<String> {
        let prefix = format!("ZTADV:{nonce}:");
        let at = find(&self.data, prefix.as_bytes())? + prefix.len();
        let rest = &self.data[at..];
        let end = rest.iter().position(|b| *b == b';').unwrap_or(rest.len().min(64));
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    /// One line for messages.
    pub fn describe(&self) -> String {
        let what = match self.ip() {
            Some((s, d, p, _)) => format!("{s} -> {d} proto {p}"),
            None => match self.from {
                Some(f) => format!("from {f}"),
                None => format!("ethertype {:#06x}", self.ethertype()),
            },
        };
        format!("{what}, {} bytes", self.data.len())
    }
}

// ---------------------------------------------------------------------------
// Captures and receivers
// ---------------------------------------------------------------------------

/// A socket read in a thread inside a netns until stopped.
pub struct Listener {
    what: String,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<Vec<Frame>>>>,
}

fn cvt(r: libc::c_int, what: &str) -> Result<libc::c_int> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(r)
}

fn sockaddr_ip(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into())
        }
        libc::AF_INET6 => {
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let v6 = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)))
        }
        _ => None,
    }
}

impl Listener {
    /// Start: `open` runs in the netns and returns the socket; returns once it is bound.
    fn start(netns: &Path, what: String, open: impl FnOnce() -> Result<OwnedFd> + Send + 'static) -> Result<Listener> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Result<()>>();
        let (path, st) = (netns.to_path_buf(), stop.clone());
        let handle = std::thread::Builder::new().name("zt-listen".into()).spawn(move || -> Result<Vec<Frame>> {
            let fd = match sys::setns_net(&path).and_then(|_| open()) {
                Ok(fd) => fd,
                Err(e) => {
                    let msg = format!("{e:#}");
                    let _ = tx.send(Err(e));
                    bail!(msg);
                }
            };
            let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
            unsafe {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const _, std::mem::size_of_val(&tv) as u32);
                let big: libc::c_int = 4 << 20;
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &big as *const _ as *const _, 4);
            }
            let _ = tx.send(Ok(()));
            let mut out = vec![];
            let mut buf = vec![0u8; 65536];
            // Drain what is queued after the stop flag too.
            loop {
                let stopping = st.load(Ordering::Relaxed);
                let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of_val(&ss) as libc::socklen_t;
                let n = unsafe { libc::recvfrom(fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0, &mut ss as *mut _ as *mut _, &mut len) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) {
                        if stopping {
                            break;
                        }
                        continue;
                    }
                    bail!("recvfrom: {e}");
                }
                let (pkttype, from) = if ss.ss_family as i32 == libc::AF_PACKET {
                    let ll = unsafe { &*(&ss as *const _ as *const libc::sockaddr_ll) };
                    (ll.sll_pkttype, None)
                } else {
                    (0, sockaddr_ip(&ss))
                };
                out.push(Frame { pkttype, from, data: buf[..n as usize].to_vec() });
            }
            Ok(out)
        })?;
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Listener { what, stop, handle: Some(handle) }),
            Ok(Err(e)) => Err(e.context(what)),
            Err(_) => bail!("{what}: listener did not start"),
        }
    }

    /// Every frame on `ifname` of the netns (both directions; see [`Frame::incoming`]).
    pub fn capture(netns: &Path, ifname: &str) -> Result<Listener> {
        let name = CString::new(ifname)?;
        Self::start(netns, format!("capture on {ifname} in {}", netns.display()), move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) }, "socket(AF_PACKET)")?;
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {name:?}");
            }
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            cvt(unsafe { libc::bind(fd.as_raw_fd(), &sll as *const _ as *const _, std::mem::size_of_val(&sll) as u32) }, "bind(AF_PACKET)")?;
            // Frames queued before the bind may come from other interfaces: drop them.
            let mut junk = [0u8; 1];
            while unsafe { libc::recv(fd.as_raw_fd(), junk.as_mut_ptr() as *mut _, 1, libc::MSG_DONTWAIT) } >= 0 {}
            Ok(fd)
        })
    }

    /// A dual-stack UDP socket on `[::]:port`.
    pub fn udp(netns: &Path, port: u16) -> Result<Listener> {
        Self::start(netns, format!("UDP receiver on {port} in {}", netns.display()), move || {
            let s = std::net::UdpSocket::bind(("::", port)).with_context(|| format!("binding [::]:{port}"))?;
            Ok(OwnedFd::from(s))
        })
    }

    /// A raw IP socket of `proto` (IPv4 delivers the IP header too, IPv6 the payload).
    pub fn raw(netns: &Path, v6: bool, proto: u8) -> Result<Listener> {
        let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        Self::start(netns, format!("raw {} protocol {proto} receiver in {}", if v6 { "IPv6" } else { "IPv4" }, netns.display()), move || {
            let fd = cvt(unsafe { libc::socket(fam, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) }, "socket(SOCK_RAW)")?;
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
    }

    /// Stop after `settle` (frames in flight arrive) and return what was read.
    pub fn stop(mut self, settle: Duration) -> Result<Vec<Frame>> {
        std::thread::sleep(settle);
        self.finish()
    }

    fn finish(&mut self) -> Result<Vec<Frame>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().map_err(|_| anyhow!("{}: thread panicked", self.what))?,
            None => Ok(vec![]),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Stop several listeners after one settle time.
pub fn stop_all<const N: usize>(ls: [Listener; N], settle: Duration) -> Result<[Vec<Frame>; N]> {
    std::thread::sleep(settle);
    let mut out: Vec<Vec<Frame>> = vec![];
    for mut l in ls {
        out.push(l.finish()?);
    }
    out.try_into().map_err(|_| anyhow!("listener count"))
}

/// Labels of this run's tagged frames among `frames` (incoming only), with counts.
pub fn tags(frames: &[Frame], nonce: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for f in frames.iter().filter(|f| f.incoming()) {
        if let Some(t) = f.tag(nonce) {
            *m.entry(t).or_insert(0) += 1;
        }
    }
    m
}

// ---------------------------------------------------------------------------
// Tally
// ---------------------------------------------------------------------------

/// The outcome of one adversarial test: attacks tried, frames sent, wrong allows (an
/// attack frame reached its target), leaks (something came back to the attacker that
/// should not), and other problems (a control that did not arrive, a counter that did
/// not move). Prints `adversarial: attacks=.. frames=.. wrong_allows=.. leaks=..` once,
/// also when the test panics.
pub struct Tally {
    name: String,
    attacks: u64,
    frames: u64,
    wrong: Vec<String>,
    leaks: Vec<String>,
    problems: Vec<String>,
    printed: bool,
}

impl Tally {
    pub fn new(name: &str) -> Tally {
        Tally { name: name.into(), attacks: 0, frames: 0, wrong: vec![], leaks: vec![], problems: vec![], printed: false }
    }

    /// Count what a script run sent.
    pub fn sent(&mut self, s: &Sent) {
        self.attacks += s.attacks.len() as u64;
        self.frames += s.frames();
    }

    /// Count attacks made with ordinary sockets.
    pub fn add(&mut self, attacks: u64, frames: u64) {
        self.attacks += attacks;
        self.frames += frames;
    }

    pub fn wrong_allow(&mut self, what: impl Into<String>) {
        self.wrong.push(what.into());
    }

    pub fn leak(&mut self, what: impl Into<String>) {
        self.leaks.push(what.into());
    }

    pub fn problem(&mut self, what: impl Into<String>) {
        self.problems.push(what.into());
    }

    pub fn summary(&self) -> String {
        format!("adversarial: attacks={} frames={} wrong_allows={} leaks={}", self.attacks, self.frames, self.wrong.len(), self.leaks.len())
    }

    fn print(&mut self) {
        if !self.printed {
            self.printed = true;
            println!("{} ({})", self.summary(), self.name);
        }
    }

    /// Print the summary; panic listing every wrong allow, leak and problem.
    pub fn finish(mut self) {
        self.print();
        let mut msg = String::new();
        for (title, v) in [("wrong allows (reached the target)", &self.wrong), ("leaks (came back to the attacker)", &self.leaks), ("problems", &self.problems)]
        {
            if !v.is_empty() {
                msg.push_str(&format!("{title}:\n"));
                for l in v {
                    msg.push_str(&format!("  - {l}\n"));
                }
            }
        }
        if !msg.is_empty() {
            panic!("{}: {}\n{msg}", self.name, self.summary());
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.print();
    }
}
