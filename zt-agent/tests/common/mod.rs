//! Shared by the kernel tests and the benchmark: a private bpffs instance, the loaded
//! object with its maps, and a packet builder for BPF_PROG_TEST_RUN.
#![allow(dead_code)]
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use aya::{
    maps::{lpm_trie::Key, MapData, RingBuf},
    programs::{CgroupSkb, SchedClassifier},
    Ebpf, TestRun, TestRunOptions,
};
use zt_agent::{
    loader::{load_programs, open_object, MapSizes},
    net::{key_prefix, to_key},
    pins::PinnedMaps,
};
use zt_common::*;

pub const TC_PASS: u32 = u32::MAX; // -1
pub const TC_DROP: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs on the loopback device.
pub const TEST_IFINDEX: u32 = 1;

/// A fresh bpffs instance mounted in a temp dir (each mount is its own instance, so
/// pins never collide with other tests or a real agent); unmounted on drop.
pub struct Bpffs {
    pub dir: PathBuf,
}

impl Bpffs {
    pub fn new(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("zt-{tag}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status().unwrap();
        assert!(st.success(), "mount bpffs at {}", dir.display());
        Bpffs { dir }
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("zt")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The loaded datapath of one test: programs, typed maps, the events ring. Each program
/// is verified when the test first uses it (all of them take the verifier seconds).
pub struct Dp {
    ebpf: Mutex<Ebpf>,
    pub maps: PinnedMaps,
    pub events: RingBuf<MapData>,
    pub _fs: Bpffs,
}

/// The agent's defaults (conntrack timeouts from `CtSettings`), events unthrottled.
pub fn config() -> Config {
    let mut c = Config {
        flags: CONFIG_READY | CONFIG_ALLOW_HOST,
        policy_epoch: 1,
        events_per_sec: 1_000_000,
        events_burst: 1_000_000,
        frag_timeout_s: 5,
        ..Default::default()
    };
    zt_agent::conntrack_gc::CtSettings::default().write_into(&mut c);
    c
}

impl Dp {
    pub fn new(tag: &str) -> Dp {
        Self::with_sizes(tag, &MapSizes::default())
    }
    pub fn with_sizes(tag: &str, sizes: &MapSizes) -> Dp {
        let fs = Bpffs::new(tag);
        let mut ebpf = open_object(&fs.root(), sizes).expect("open object");
        let events = RingBuf::try_from(ebpf.take_map(MAP_EVENTS).unwrap()).unwrap();
        let mut maps = PinnedMaps::open(&fs.root()).unwrap();
        maps.config.set(0, config(), 0).unwrap();
        Dp { ebpf: Mutex::new(ebpf), maps, events, _fs: fs }
    }
    /// The object with the programs `names` loaded (those not loaded yet are verified now).
    /// Drop the guard before running a program through `Dp`: it takes the same lock.
    pub fn ebpf(&self, names: &[&str]) -> MutexGuard<'_, Ebpf> {
        let mut ebpf = self.ebpf.lock().unwrap();
        load_programs(&mut ebpf, names).unwrap_or_else(|e| panic!("loading {names:?}: {e:#}"));
        ebpf
    }
    pub fn set_config(&mut self, c: Config) {
        self.maps.config.set(0, c, 0).unwrap();
    }
    pub fn endpoint(&mut self, ip: &str, identity: u32, flags: u32, ifindex: u32) {
        let ip: IpAddr = ip.parse().unwrap();
        self.maps.endpoints.insert(EndpointKey { addr: to_key(ip) }, EndpointValue { identity, flags, ifindex, cgroup: 0 }, 0).unwrap();
    }
    /// A local pod on the test device, isolated both ways.
    pub fn local_pod(&mut self, ip: &str, identity: u32) {
        self.endpoint(ip, identity, EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, TEST_IFINDEX);
    }
    pub fn cidr(&mut self, ip: &str, prefix: u8, identity: u32) {
        let ip: IpAddr = ip.parse().unwrap();
        self.maps.cidrs.insert(&Key::new(key_prefix(ip, prefix), CidrKey { addr: to_key(ip) }), CidrValue { identity }, 0).unwrap();
    }
    pub fn policy(&mut self, prefix: u32, k: PolicyKey, verdict: u8, rule_id: u32) {
        self.maps.policy.insert(&Key::new(prefix, k), PolicyValue { verdict, flags: 0, _pad: [0; 2], rule_id }, 0).unwrap();
    }
    pub fn unpolicy(&mut self, prefix: u32, k: PolicyKey) {
        self.maps.policy.remove(&Key::new(prefix, k)).unwrap();
    }
    fn test_run(&self, hook: &str, opts: TestRunOptions) -> aya::TestRunResult {
        let ebpf = self.ebpf(&[hook]);
        let prog: &SchedClassifier = ebpf.program(hook).unwrap().try_into().unwrap();
        prog.test_run(opts).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {hook}: {e}"))
    }
    /// Runs the program of `hook` ("zt_from_pod" / "zt_to_pod" / "zt_noop") once.
    pub fn run(&self, hook: &str, pkt: &[u8]) -> u32 {
        self.run_n(hook, pkt, 1).0
    }
    /// Runs the program once as if the packet crossed interface `ifindex` (which must
    /// exist in the calling thread's network namespace: see `in_private_netns`).
    pub fn run_on(&self, hook: &str, pkt: &[u8], ifindex: u32) -> u32 {
        // struct __sk_buff: 192 bytes, ifindex at offset 40; everything else zero.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() };
        self.test_run(hook, opts).return_value
    }
    /// Runs the program once on hook interface `ifindex` (0: the loopback device; else it
    /// must exist in the calling thread's netns) for a packet that entered the node
    /// through `ingress_ifindex` (0: sent by the node's own sockets).
    pub fn run_from(&self, hook: &str, pkt: &[u8], ifindex: u32, ingress_ifindex: u32) -> u32 {
        // struct __sk_buff: ingress_ifindex at offset 36, ifindex at 40.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat: 1, ..Default::default() };
        self.test_run(hook, opts).return_value
    }
    /// Runs it `repeat` times in the kernel; returns (verdict, mean ns per run).
    pub fn run_n(&self, hook: &str, pkt: &[u8], repeat: u32) -> (u32, f64) {
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), repeat, ..Default::default() };
        let r = self.test_run(hook, opts);
        (r.return_value, r.duration.as_nanos() as f64)
    }
    /// Runs a cgroup skb program ("zt_cgroup_egress" / "zt_cgroup_ingress") once on `pkt`
    /// (an Ethernet frame: the kernel strips the header, the program sees the IP header
    /// first). `ifindex` None: the loopback device; else it must exist in the calling
    /// thread's network namespace (see `in_private_netns`). Returns 1 pass, 0 drop.
    pub fn run_cgroup(&self, prog: &str, pkt: &[u8], ifindex: Option<u32>) -> u32 {
        self.run_cgroup_n(prog, pkt, ifindex, 1).0
    }
    /// ... `repeat` times in the kernel; returns (verdict, mean ns per run).
    pub fn run_cgroup_n(&self, prog: &str, pkt: &[u8], ifindex: Option<u32>, repeat: u32) -> (u32, f64) {
        let mut ctx = [0u8; 192];
        if let Some(i) = ifindex {
            ctx[40..44].copy_from_slice(&i.to_ne_bytes());
        }
        let mut out = vec![0u8; pkt.len() + 256];
        let opts = TestRunOptions { data_in: Some(pkt), data_out: Some(&mut out), ctx_in: ifindex.map(|_| &ctx[..]), repeat, ..Default::default() };
        let ebpf = self.ebpf(&[prog]);
        let p: &CgroupSkb = ebpf.program(prog).unwrap().try_into().unwrap();
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN (cgroup skb)");
        (r.return_value, r.duration.as_nanos() as f64)
    }
    /// Every verdict counter summed (both directions, all reasons).
    pub fn counted(&self) -> u64 {
        self.maps.counters().unwrap().iter().sum()
    }
    pub fn counter(&self, dir: u8, reason: Reason) -> u64 {
        self.maps.counters().unwrap()[counter_index(dir, reason as u8) as usize]
    }
    pub fn events(&mut self) -> Vec<Event> {
        let mut v = vec![];
        while let Some(item) = self.events.next() {
            v.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) });
        }
        v
    }
    pub fn ct_len(&self) -> usize {
        self.maps.ct.keys().count()
    }
}

/// The cgroup v2 id of this process's cgroup (the inode number of its directory): the
/// cgroup of the socket BPF_PROG_TEST_RUN gives a cgroup skb program.
pub fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts.lines().map(|l| l.split(' ').collect::<Vec<_>>()).find(|f| f[2] == "cgroup2").map(|f| f[1].to_string()).expect("a cgroup2 mount");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = own.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 membership").trim().to_string();
    std::fs::metadata(format!("{root}{path}")).unwrap().ino()
}

/// Runs `f` on a thread inside a fresh network namespace holding a veth pair; `f` gets
/// the two interface indexes. The namespace goes away with the thread.
pub fn in_private_netns<R: Send>(f: impl FnOnce(u32, u32) -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
            // Children inherit this thread's network namespace.
            let st = Command::new("ip").args(["link", "add", "zta", "type", "veth", "peer", "name", "ztb"]).status().unwrap();
            assert!(st.success());
            let idx = |n: &str| {
                let c = std::ffi::CString::new(n).unwrap();
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            };
            f(idx("zta"), idx("ztb"))
        })
        .join()
        .unwrap()
    })
}

// ---------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// An L4 header with the given ports (TCP 20 bytes, UDP 8, SCTP 12), or an ICMP
/// header of `type` with echo id `sport`.
pub fn l4(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = match proto {
        TCP => vec![0u8; 20],
        UDP => vec![0u8; 8],
        SCTP => vec![0u8; 12],
        _ => vec![0u8; 8],
    };
    match proto {
        ICMP | ICMPV6 => {
            h[0] = dport as u8; // type
            h[4..6].copy_from_slice(&sport.to_be_bytes()); // echo id
        }
        _ => {
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            if proto == TCP {
                h[12] = 5 << 4;
                h[13] = 0x02; // SYN
            }
        }
    }
    h
}

pub fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// IPv4 packet; `frag` is the raw flags+offset field.
pub fn ipv4_frag(src: &str, dst: &str, proto: u8, payload: &[u8], id: u16, frag: u16) -> Vec<u8> {
    let s: std::net::Ipv4Addr = src.parse().unwrap();
    let d: std::net::Ipv4Addr = dst.parse().unwrap();
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(payload);
    eth(0x0800, &h)
}

pub fn ipv4(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    ipv4_frag(src, dst, proto, &l4(proto, sport, dport), 1, 0)
}

/// An IPv4 UDP datagram with `payload` zero bytes after its header (`ipv4` has none).
pub fn ipv4_udp(src: &str, dst: &str, sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut d = l4(UDP, sport, dport);
    d.resize(8 + payload, 0);
    let len = d.len() as u16;
    d[4..6].copy_from_slice(&len.to_be_bytes());
    ipv4_frag(src, dst, UDP, &d, 1, 0)
}

/// IPv6 packet with a chain of extension headers (next-header values) before `proto`.
pub fn ipv6_ext(src: &str, dst: &str, proto: u8, payload: &[u8], ext: &[u8], hop_limit: u8) -> Vec<u8> {
    let s: std::net::Ipv6Addr = src.parse().unwrap();
    let d: std::net::Ipv6Addr = dst.parse().unwrap();
    let mut body = vec![];
    for (i, _) in ext.iter().enumerate() {
        let next = if i + 1 < ext.len() { ext[i + 1] } else { proto };
        body.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 0]);
    }
    body.extend_from_slice(payload);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.push(if ext.is_empty() { proto } else { ext[0] });
    h.push(hop_limit);
    h.extend_from_slice(&s.octets());
    h.extend_from_slice(&d.octets());
    h.extend_from_slice(&body);
    eth(0x86DD, &h)
}

pub fn ipv6(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    ipv6_ext(src, dst, proto, &l4(proto, sport, dport), &[], 64)
}

/// An ICMP error of `ty` from `src` to `dst` quoting the IP header and first 8 L4
/// bytes of `quoted` (an Ethernet frame).
pub fn icmp4_error(src: &str, dst: &str, ty: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 28]);
    ipv4_frag(src, dst, ICMP, &icmp, 9, 0)
}

/// The ICMPv6 error of `ty` likewise (IPv6 header and 8 L4 bytes quoted).
pub fn icmp6_error(src: &str, dst: &str, ty: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![ty, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted[14..14 + 48]);
    ipv6_ext(src, dst, ICMPV6, &icmp, &[], 64)
}

pub fn pk(local: u32, peer: u32, dir: u8, proto: u8, port: u16) -> PolicyKey {
    PolicyKey::new(local, peer, dir, proto, port)
}
