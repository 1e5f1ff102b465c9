//! Sockets left on a vanished backend. A pod's socket that `connect` translated talks to
//! the backend's address directly, so when a sync takes that backend out of a frontend's
//! set (a CoreDNS pod replaced under a long-running resolver) nothing would move the
//! socket: it stays on the old address. After the maps are written (so a reconnect can no
//! longer pick it), this destroys the pod sockets that were translated from that frontend
//! to that backend. A destroyed socket reports `ECONNABORTED` to its next call; a TCP one
//! also sends its peer a reset; a connected UDP one is disconnected, so the application
//! reconnects (or re-resolves) and is translated afresh. This is what Cilium's socket-LB
//! termination does.
//!
//! Which sockets: those whose peer is the removed backend (address, port, protocol) and
//! that zt translated from the frontend that lost it, i.e. whose cookie `ZT_SVC_REVNAT`
//! holds with that backend and that frontend. A socket a pod connected to the backend's
//! address itself (not through the Service), or through another frontend that keeps
//! the backend, is left alone: the pod may well still be there (not ready, terminating),
//! and that socket never asked for the Service. A translation whose `ZT_SVC_REVNAT`
//! entry the LRU evicted is not found either.
//!
//! Scope (`--service-destroy-stale-sockets`): `udp` by default, `all` adds TCP, `off`.
//! TCP is not in the default because a backend also leaves the set when it starts
//! terminating while others are ready: its TCP peers are then still served and get a
//! FIN when it shuts down (kube-proxy, and Cilium, leave TCP alone for that reason),
//! whereas a connected UDP socket would keep sending into the void.
//!
//! How: the kernel's sock_diag `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`), issued inside
//! each pod network namespace, which is found from the processes in the pods' cgroups
//! (`--cgroup-root`, where the translating programs sit: exactly the sockets zt can have
//! translated; containerd and CRI-O alike), through `/proc/<pid>/ns/net`. In a DaemonSet
//! that takes `hostPID` and the capabilities `SYS_ADMIN` (setns) and `SYS_PTRACE`
//! (another user's `/proc/<pid>/ns`). Not the `bpf_sock_destroy` kfunc from a socket
//! iterator (kernel >= 6.5): a socket iterator also walks only the network namespace it
//! is created in, so it needs the same namespace walk and would add a kernel program to
//! what the netlink call already does; and the toolchain lacks the pieces (aya 0.14 loads
//! `iter/` programs, but aya-ebpf-macros 0.2 has no iter attribute and aya-obj 0.3 does
//! not resolve a kfunc, a `.ksyms` extern, at load).
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use zt_common::*;

use crate::net::from_key;
use crate::pins::open_map;

pub type RevNatMap = HashMap<MapData, SvcRevKey, SvcRevValue>;

/// Opens `ZT_SVC_REVNAT`, which tells a translated socket (by cookie) and its frontend.
pub fn open_revnat(bpffs_root: &Path) -> Result<RevNatMap> {
    Ok(open_map(bpffs_root, MAP_SVC_REVNAT)?.try_into()?)
}

/// Which sockets of a removed backend are destroyed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Off,
    Udp,
    All,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, String> {
        match s {
            "off" => Ok(Scope::Off),
            "udp" => Ok(Scope::Udp),
            "all" => Ok(Scope::All),
            _ => Err(format!("--service-destroy-stale-sockets: {s:?} is not off, udp or all")),
        }
    }

    fn covers(self, proto: u8) -> bool {
        match self {
            Scope::Off => false,
            Scope::Udp => proto == IPPROTO_UDP,
            Scope::All => proto == IPPROTO_UDP || proto == IPPROTO_TCP,
        }
    }
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// A backend (address IPv4 mapped, port) one frontend no longer translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Removed {
    pub frontend: SvcFrontendKey,
    pub addr: [u8; 16],
    pub port: u16,
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Sockets destroyed, by protocol (6, 17).
    pub destroyed: BTreeMap<u8, u64>,
    /// Network namespaces looked into.
    pub netns: usize,
    /// What failed (a namespace that could not be entered, a kernel without
    /// `CONFIG_INET_DIAG_DESTROY`), one line each; the rest of the pass went on.
    pub errors: Vec<String>,
}

/// A socket seen in a dump: its `inet_diag_sockid` as the kernel wrote it (echoed back
/// to destroy it) and what it says.
struct Seen {
    family: u8,
    id: [u8; ID_LEN],
}

impl Seen {
    fn src(&self) -> SocketAddr {
        SocketAddr::new(addr_of(self.family, &self.id[4..20]), u16::from_be_bytes([self.id[0], self.id[1]]))
    }
    fn dst_key(&self) -> [u8; 16] {
        key_of(self.family, &self.id[20..36])
    }
    fn dport(&self) -> u16 {
        u16::from_be_bytes([self.id[2], self.id[3]])
    }
    fn cookie(&self) -> u64 {
        let lo = u32::from_ne_bytes(self.id[40..44].try_into().unwrap()) as u64;
        let hi = u32::from_ne_bytes(self.id[44..48].try_into().unwrap()) as u64;
        lo | hi << 32
    }
}

fn key_of(family: u8, a: &[u8]) -> [u8; 16] {
    if family == libc::AF_INET as u8 {
        v4_mapped([a[0], a[1], a[2], a[3]])
    } else {
        a[..16].try_into().unwrap()
    }
}

fn addr_of(family: u8, a: &[u8]) -> IpAddr {
    from_key(key_of(family, a))
}

/// (backend address, port, protocol) -> the frontends (address, port) that lost it.
type Index = BTreeMap<([u8; 16], u16, u8), BTreeSet<([u8; 16], u16)>>;

/// Destroys, in every pod network namespace under `cgroup_root`, the sockets `scope`
/// covers that zt translated to a backend in `removed` from the frontend that lost it.
pub fn destroy_stale(removed: &[Removed], scope: Scope, cgroup_root: &Path, revnat: &RevNatMap) -> Outcome {
    let mut out = Outcome::default();
    let mut index = Index::new();
    for r in removed.iter().filter(|r| scope.covers(r.frontend.proto)) {
        index.entry((r.addr, r.port, r.frontend.proto)).or_default().insert((r.frontend.addr, r.frontend.port));
    }
    if index.is_empty() {
        return out;
    }
    let protos: BTreeSet<u8> = index.keys().map(|k| k.2).collect();
    let namespaces = pod_netns(cgroup_root, &mut out.errors);
    out.netns = namespaces.len();
    // setns moves only the calling thread: a thread of its own, gone after the pass.
    std::thread::scope(|s| {
        s.spawn(|| {
            for (ns, pid) in &namespaces {
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    out.errors.push(format!("entering the network namespace of pid {pid}: {}", io::Error::last_os_error()));
                    continue;
                }
                for &proto in &protos {
                    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                        if let Err(e) = in_netns(family, proto, &index, revnat, *pid, &mut out) {
                            out.errors.push(format!("{} sockets in the network namespace of pid {pid}: {e}", proto_label(proto)));
                        }
                    }
                }
            }
        });
    });
    out
}

/// One dump in the current network namespace, and the destroys it calls for.
fn in_netns(family: u8, proto: u8, index: &Index, revnat: &RevNatMap, pid: u32, out: &mut Outcome) -> io::Result<()> {
    let diag = DiagSocket::open()?;
    // Connected sockets only: a connected UDP socket is ESTABLISHED; TCP in any state
    // that has a peer (not LISTEN, CLOSE or TIME_WAIT).
    let states = if proto == IPPROTO_UDP { 1 << TCP_ESTABLISHED } else { TCP_WITH_PEER };
    for s in diag.dump(family, proto, states)? {
        let (addr, port) = (s.dst_key(), s.dport());
        let Some(frontends) = index.get(&(addr, port, proto)) else { continue };
        let key = SvcRevKey { cookie: s.cookie(), addr, port, proto, _pad: [0; 5] };
        let Ok(rev) = revnat.get(&key, 0) else { continue }; // not translated by zt
        if !frontends.contains(&(rev.addr, rev.port)) {
            continue; // translated from a frontend that keeps this backend
        }
        let backend = SocketAddr::new(from_key(addr), port);
        let frontend = SocketAddr::new(from_key(rev.addr), rev.port);
        match diag.destroy(family, proto, &s.id) {
            Ok(()) => {
                *out.destroyed.entry(proto).or_default() += 1;
                log::info!(
                    "services: destroyed {} socket {} -> {backend} (translated from {frontend}, a backend it no longer has) in the network namespace of pid {pid}",
                    proto_label(proto),
                    s.src()
                );
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {} // closed meanwhile
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(io::Error::other("SOCK_DESTROY is not supported (a kernel without CONFIG_INET_DIAG_DESTROY)"));
            }
            Err(e) => out.errors.push(format!("destroying {} socket {} -> {backend}: {e}", proto_label(proto), s.src())),
        }
    }
    Ok(())
}

fn proto_label(proto: u8) -> &'static str {
    if proto == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

/// The network namespaces of the processes in the cgroups under `root` (one open
/// `/proc/<pid>/ns/net` each, with that pid), deduplicated by namespace inode.
fn pod_netns(root: &Path, errors: &mut Vec<String>) -> Vec<(File, u32)> {
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter(|p| *p != 0) {
                let path = format!("/proc/{pid}/ns/net");
                // The process may be gone by now: skip it quietly.
                let Ok(f) = File::open(&path) else { continue };
                let Ok(md) = f.metadata() else { continue };
                if seen.insert((md.dev(), md.ino())) {
                    out.push((f, pid));
                }
            }
        }
        match std::fs::read_dir(&dir) {
            Ok(rd) => dirs.extend(rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path())),
            Err(e) if dir == root => errors.push(format!("reading the cgroup root {}: {e}", root.display())),
            Err(_) => {} // removed meanwhile
        }
    }
    out
}

// sock_diag (linux/sock_diag.h, linux/inet_diag.h).
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`: sport, dport (big endian), src[4], dst[4], if, cookie[2].
const ID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, id.
const REQ_LEN: usize = 8 + ID_LEN;
/// `struct inet_diag_msg` up to and with the id (what is read of it).
const MSG_MIN: usize = 4 + ID_LEN;
const TCP_ESTABLISHED: u32 = 1;
/// ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING.
const TCP_WITH_PEER: u32 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

/// A NETLINK_SOCK_DIAG socket in the current network namespace.
struct DiagSocket(OwnedFd);

impl DiagSocket {
    fn open() -> io::Result<DiagSocket> {
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let s = DiagSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        // A stuck kernel answer must not hold the agent's loop.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, std::mem::size_of_val(&tv) as u32) };
        Ok(s)
    }

    fn send(&self, ty: u16, flags: u16, family: u8, proto: u8, states: u32, id: &[u8; ID_LEN]) -> io::Result<()> {
        let mut m = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
        m.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // seq
        m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        m.extend_from_slice(&[family, proto, 0, 0]);
        m.extend_from_slice(&states.to_ne_bytes());
        m.extend_from_slice(id);
        let n = unsafe { libc::send(self.0.as_raw_fd(), m.as_ptr() as *const libc::c_void, m.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads replies until `done` says so; `each(type, payload)`.
    fn recv_until(&self, mut each: impl FnMut(u16, &[u8]) -> io::Result<bool>) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
                let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
                if len < NLMSG_HDRLEN || len > b.len() {
                    return Err(io::Error::other("malformed netlink message"));
                }
                if ty == NLMSG_ERROR {
                    let err = i32::from_ne_bytes(b[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().unwrap_or([0; 4]));
                    return if err == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-err)) };
                }
                if ty == NLMSG_DONE || !each(ty, &b[NLMSG_HDRLEN..len])? {
                    return Ok(());
                }
                b = &b[((len + 3) & !3).min(b.len())..];
            }
        }
    }

    /// The sockets of `family`/`proto` in `states` (a bit per TCP state number).
    fn dump(&self, family: u8, proto: u8, states: u32) -> io::Result<Vec<Seen>> {
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, proto, states, &[0; ID_LEN])?;
        let mut out = vec![];
        self.recv_until(|ty, p| {
            if ty == SOCK_DIAG_BY_FAMILY && p.len() >= MSG_MIN {
                out.push(Seen { family: p[0], id: p[4..4 + ID_LEN].try_into().unwrap() });
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// `SOCK_DESTROY` of the socket with this id (the kernel checks the cookie too).
    fn destroy(&self, family: u8, proto: u8, id: &[u8; ID_LEN]) -> io::Result<()> {
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, proto, 0, id)?;
        self.recv_until(|_, _| Ok(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_parse_and_cover() {
        assert_eq!(Scope::parse("udp"), Ok(Scope::Udp));
        assert!(Scope::parse("tcp").unwrap_err().contains("\"tcp\" is not off, udp or all"));
        assert!(Scope::Udp.covers(17) && !Scope::Udp.covers(6));
        assert!(Scope::All.covers(6) && Scope::All.covers(17) && !Scope::All.covers(132));
        assert!(!Scope::Off.covers(17));
    }

    #[test]
    fn sockid_fields() {
        let mut id = [0u8; ID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&53u16.to_be_bytes());
        id[4..8].copy_from_slice(&[10, 0, 0, 1]);
        id[20..24].copy_from_slice(&[10, 0, 0, 2]);
        id[40..44].copy_from_slice(&0x89abcdefu32.to_ne_bytes());
        id[44..48].copy_from_slice(&0x01234567u32.to_ne_bytes());
        let s = Seen { family: libc::AF_INET as u8, id };
        assert_eq!(s.src(), "10.0.0.1:40000".parse().unwrap());
        assert_eq!(s.dst_key(), v4_mapped([10, 0, 0, 2]));
        assert_eq!((s.dport(), s.cookie()), (53, 0x0123_4567_89ab_cdef));
    }
}
