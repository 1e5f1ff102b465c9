//! DNS pieces of the test bed, for the FQDN tests (`tests/e2e_fqdn.rs`, the latency
//! benchmark):
//! - [`ExternalHost`]: a netns that is not a pod (identity `world`) owning every address of
//!   10.78.0.0/16 and fd78::/32 (local routes on `lo`), serving TCP on [`EXT_TCP`] and a
//!   line echo on [`EXT_ECHO`]; the node routes both prefixes to it.
//! - [`Dnsmasq`]: a real resolver in a pod's netns and cgroup, its zone given as flags
//!   ([`Zone`]); no config file, no upstream.
//! - [`Responder`]: the tests' own resolver (hickory-proto), answering each query with
//!   whatever a closure returns (unique IPs per name, TTL overrides, silence).
//! - [`query_here`] / [`resolve_in`]: a stub resolver over UDP (EDNS0 4096) with a TCP
//!   retry on TC=1.
//! - [`scapy_send`]: answers crafted with scapy (malformed, spoofed, oversized), sent from a
//!   pod's netns with a raw socket.
//!
//! Everything lives in netns and cgroups of the test bed's run, so the bed's cleanup
//! removes it even if a test panics; the handles here also stop their processes on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata, Name, RData, Record, RecordType};

use crate::sys;
use crate::topology::Endpoint;
use crate::Testbed;

/// The external host's prefixes: every address in them is the external host's own.
pub const EXT_V4: &str = "10.78.0.0/16";
pub const EXT_V6: &str = "fd78::/32";
/// TCP port of the external host's server (answers "ext\n" and closes).
pub const EXT_TCP: u16 = 8443;
/// TCP line-echo port of the external host (long-lived flows).
pub const EXT_ECHO: u16 = 8444;
/// The external host's own link addresses (next hops of the node's routes).
const EXT_LINK_V4: &str = "169.254.78.2";
const EXT_LINK_V6: &str = "fe80::78:2";

/// A netns outside the cluster (identity `world`) reached through the node.
pub struct ExternalHost {
    pub netns: String,
    child: Mutex<Option<Child>>,
}

impl ExternalHost {
    /// Create it behind `node` and start its server (`zt-testbed serve`, in the run's
    /// cgroup `ext`, outside the pods' cgroup root).
    pub fn add(tb: &Testbed, node: &str, serve_bin: &Path) -> Result<ExternalHost> {
        let ni = tb.node(node).ok_or_else(|| anyhow!("no node {node}"))?;
        let ns = format!("zt{}-ext", tb.run_id());
        let hv = format!("zte{}", tb.run_id());
        let nns = ni.netns.as_str();
        // Named with the run's prefix: the bed's cleanup deletes it whatever happens here.
        sys::ip(&["netns", "add", &ns])?;
        let ext = ExternalHost { netns: ns.clone(), child: Mutex::new(None) };
        sys::sysctls_in(
            &sys::netns_path(&ns),
            &[("net.ipv6.conf.all.accept_dad", "0"), ("net.ipv6.conf.default.accept_dad", "0")],
        )?;
        sys::ipn(&ns, &["link", "set", "lo", "up"])?;
        sys::ipn(nns, &["link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        let _ = sys::sysctls_in(&ni.netns_path(), &[(&format!("net.ipv6.conf.{hv}.accept_dad"), "0")]);
        sys::ipn(nns, &["addr", "add", "fe80::1/64", "dev", &hv, "nodad"])?;
        sys::ipn(nns, &["link", "set", &hv, "up"])?;
        sys::ipn(&ns, &["addr", "add", &format!("{EXT_LINK_V4}/32"), "dev", "eth0"])?;
        sys::ipn(&ns, &["addr", "add", &format!("{EXT_LINK_V6}/64"), "dev", "eth0", "nodad"])?;
        sys::ipn(&ns, &["link", "set", "eth0", "up"])?;
        let nv4 = ni.ipv4.to_string();
        sys::ipn(&ns, &["route", "add", &nv4, "dev", "eth0", "scope", "link"])?;
        sys::ipn(&ns, &["route", "add", "default", "via", &nv4, "dev", "eth0"])?;
        sys::ipn(&ns, &["-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0"])?;
        // AnyIP: the whole prefixes are local, without adding 65536 addresses.
        sys::ipn(&ns, &["route", "add", "local", EXT_V4, "dev", "lo"])?;
        sys::ipn(&ns, &["-6", "route", "add", "local", EXT_V6, "dev", "lo"])?;
        // Via the link addresses: neighbour discovery does not answer for AnyIP addresses.
        sys::ipn(nns, &["route", "add", EXT_V4, "via", EXT_LINK_V4, "dev", &hv, "onlink", "src", &nv4])?;
        sys::ipn(nns, &["-6", "route", "add", EXT_V6, "via", EXT_LINK_V6, "dev", &hv])?;

        let cg = tb.cgroup_base().join("ext");
        std::fs::create_dir_all(&cg)?;
        let log = tb.tmp_dir().join("serve-ext.log");
        let mut child = Command::new(serve_bin)
            .arg("serve")
            .arg("--netns")
            .arg(sys::netns_path(&ns))
            .arg("--cgroup")
            .arg(&cg)
            .arg("--ident")
            .arg("ext")
            .args(["--tcp", &EXT_TCP.to_string(), "--echo", &EXT_ECHO.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("spawning {}", serve_bin.display()))?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        *ext.child.lock().unwrap() = Some(child);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "READY" {
            bail!("external host server failed: {}", sys::tail(&log, 20));
        }
        Ok(ext)
    }

    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }
}

impl Drop for ExternalHost {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A v4 address of the external host: 10.78.`a`.`b`.
pub fn ext_v4(a: u8, b: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 78, a, b))
}

/// A v6 address of the external host: fd78::`a`:`b`.
pub fn ext_v6(a: u16, b: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, a, b))
}

/// A dnsmasq zone, as flags.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    /// `--host-record=name,addr...,ttl`: one name, its addresses, an optional own TTL.
    pub hosts: Vec<(String, Vec<IpAddr>, Option<u32>)>,
    /// `--address=/domain/addr`: the domain and every name below it.
    pub wildcards: Vec<(String, Vec<IpAddr>)>,
    /// `--cname=alias,target` (targets must be known names; chains work on 2.90).
    pub cnames: Vec<(String, String)>,
    /// Names with many addresses, written to a hosts file (`--addn-hosts`).
    pub many: Vec<(String, Vec<IpAddr>)>,
    /// `--local-ttl` (TTL of everything without its own).
    pub local_ttl: u32,
}

impl Zone {
    /// The lab's zone (checked with `dig` against dnsmasq 2.90):
    /// - `api.example.test` 10.78.1.1 + fd78::1:1, TTL 5;
    /// - `*.wild.example.test` and `wild.example.test` 10.78.2.1 + fd78::2:1;
    /// - `c1.example.test` CNAME `c2.example.test` CNAME `api.example.test`;
    /// - `many.example.test`: 120 A records 10.78.3.1..120 (about 2 KB: EDNS0 over UDP is
    ///   IP-fragmented on a 1500 MTU link);
    /// - `r<n>.example.test` (n < 50): n+1 A records 10.78.(100+n).1.. (the benchmark's
    ///   1/8/50-record names are r0, r7, r49).
    pub fn lab() -> Zone {
        let mut z = Zone { local_ttl: 5, ..Default::default() };
        z.hosts.push(("api.example.test".into(), vec![ext_v4(1, 1), ext_v6(1, 1)], Some(5)));
        z.wildcards.push(("wild.example.test".into(), vec![ext_v4(2, 1), ext_v6(2, 1)]));
        z.cnames.push(("c1.example.test".into(), "c2.example.test".into()));
        z.cnames.push(("c2.example.test".into(), "api.example.test".into()));
        z.many.push(("many.example.test".into(), (1..=120).map(|i| ext_v4(3, i)).collect()));
        for n in 0..50u8 {
            z.many.push((format!("r{n}.example.test"), (1..=n + 1).map(|i| ext_v4(100 + n, i)).collect()));
        }
        z
    }

    fn args(&self, hosts_file: &Path) -> Result<Vec<String>> {
        let mut a = vec![format!("--local-ttl={}", self.local_ttl)];
        for (name, ips, ttl) in &self.hosts {
            let mut s = format!("--host-record={name}");
            for ip in ips {
                s.push_str(&format!(",{ip}"));
            }
            if let Some(t) = ttl {
                s.push_str(&format!(",{t}"));
            }
            a.push(s);
        }
        for (d, ips) in &self.wildcards {
            for ip in ips {
                a.push(format!("--address=/{d}/{ip}"));
            }
        }
        for (alias, target) in &self.cnames {
            a.push(format!("--cname={alias},{target}"));
        }
        let mut text = String::new();
        for (name, ips) in &self.many {
            for ip in ips {
                text.push_str(&format!("{ip} {name}\n"));
            }
        }
        std::fs::write(hosts_file, text)?;
        a.push(format!("--addn-hosts={}", hosts_file.display()));
        Ok(a)
    }
}

/// dnsmasq running in a pod (its netns and cgroup), listening on the pod's addresses.
pub struct Dnsmasq {
    pub addrs: Vec<IpAddr>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Start dnsmasq in `pod` with `zone`; returns once it answers.
    pub fn start(tb: &Testbed, pod: &Endpoint, zone: &Zone) -> Result<Dnsmasq> {
        let Endpoint::Pod { namespace, name } = pod else { bail!("dnsmasq runs in a pod") };
        let info = tb.pod(namespace, name).ok_or_else(|| anyhow!("no pod {pod}"))?;
        let addrs: Vec<IpAddr> = info.pod.ips();
        let dir = tb.tmp_dir().join(format!("dnsmasq-{namespace}-{name}"));
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("dnsmasq.log");
        let mut args: Vec<String> = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--pid-file=",
            "--user=root",
            "--bind-interfaces",
            "--port=53",
            "--log-facility=-",
            "--log-queries",
            "--edns-packet-max=4096",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for ip in &addrs {
            args.push(format!("--listen-address={ip}"));
        }
        args.extend(zone.args(&dir.join("zone.hosts"))?);
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut cmd = tb.command_in(pod, &argv)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("dnsmasq.stderr"))?)
            .spawn()
            .context("spawning dnsmasq (Debian package dnsmasq-base; cargo xtask setup installs it)")?;
        let d = Dnsmasq { addrs: addrs.clone(), log: dir.join("dnsmasq.stderr"), child: Some(child) };
        // Ready when it answers a query of its own zone, asked from inside the pod.
        let (server, probe) = (addrs[0], zone.hosts.first().map(|h| h.0.clone()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = match &probe {
                Some(n) => resolve_in(&info.netns_path(), server, n, RecordType::A, Duration::from_millis(200)).map(|_| ()),
                None => Ok(()),
            };
            match r {
                Ok(()) => return Ok(d),
                Err(e) if Instant::now() > deadline => {
                    bail!("dnsmasq did not answer: {e:#}; log: {}", sys::tail(&d.log, 20))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// NodeLocal DNSCache's link-local listen address.
pub const NODE_LOCAL_DNS: &str = "169.254.20.10";

impl Dnsmasq {
    /// dnsmasq as NodeLocal DNSCache runs: a host-network pod of `node` (the node's netns,
    /// a cgroup of its own under the node's pods' cgroup root), listening on
    /// [`NODE_LOCAL_DNS`] (added to the node's `lo`: the real one uses a dummy interface,
    /// not built into this kernel) and forwarding everything to `upstream` (the kube-dns
    /// ClusterIP). Returns once it started; callers test the path through it.
    pub fn start_node_local(tb: &Testbed, node: &str, upstream: IpAddr) -> Result<Dnsmasq> {
        let ni = tb.node(node).ok_or_else(|| anyhow!("no node {node}"))?;
        let listen: IpAddr = NODE_LOCAL_DNS.parse().unwrap();
        sys::ipn(&ni.netns, &["addr", "add", &format!("{listen}/32"), "dev", "lo"])?;
        let cg = tb.kubepods_dir(node).join("pod-node-local-dns");
        std::fs::create_dir_all(&cg)?;
        let dir = tb.tmp_dir().join(format!("dnsmasq-node-local-{node}"));
        std::fs::create_dir_all(&dir)?;
        let procs = std::fs::OpenOptions::new().write(true).open(cg.join("cgroup.procs"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ni.netns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll", "--pid-file=", "--user=root"])
            .args(["--bind-interfaces", "--port=53", "--log-facility=-", "--log-queries", "--cache-size=0"])
            .arg(format!("--listen-address={listen}"))
            .arg(format!("--server={upstream}"));
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                libc::write(procs.as_raw_fd(), b"0".as_ptr() as *const _, 1);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("dnsmasq.log"))?)
            .stderr(std::fs::File::create(dir.join("dnsmasq.stderr"))?)
            .spawn()
            .context("spawning dnsmasq (Debian package dnsmasq-base; cargo xtask setup installs it)")?;
        let d = Dnsmasq { addrs: vec![listen], log: dir.join("dnsmasq.stderr"), child: Some(child) };
        std::thread::sleep(Duration::from_millis(300));
        Ok(d)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What a stub resolver got back.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub rcode: u16,
    /// A/AAAA records of the answer section (any owner), with their TTLs.
    pub ips: Vec<(IpAddr, u32)>,
    /// CNAME targets of the answer section, in order.
    pub cnames: Vec<String>,
    /// The UDP answer had TC=1 and the query was retried over TCP.
    pub via_tcp: bool,
    /// Wire size of the (final) answer.
    pub size: usize,
}

impl Answer {
    pub fn addrs(&self) -> Vec<IpAddr> {
        self.ips.iter().map(|(ip, _)| *ip).collect()
    }
}

/// A query message for `name`/`qtype` with EDNS0 (4096 bytes), random id.
pub fn query_message(name: &str, qtype: RecordType) -> Result<Message> {
    let mut m = Message::new(crate::probe::rand32() as u16, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).with_context(|| format!("name {name}"))?, qtype));
    let mut e = Edns::new();
    e.set_max_payload(4096);
    m.set_edns(e);
    Ok(m)
}

fn decode(buf: &[u8], id: u16, via_tcp: bool) -> Result<Answer> {
    let m = Message::from_vec(buf).map_err(|e| anyhow!("undecodable answer: {e}"))?;
    if m.metadata.id != id {
        bail!("answer id {} for query {id}", m.metadata.id);
    }
    let mut a = Answer { rcode: u16::from(m.metadata.response_code), via_tcp, size: buf.len(), ..Default::default() };
    for r in &m.answers {
        match &r.data {
            RData::A(x) => a.ips.push((IpAddr::V4(x.0), r.ttl)),
            RData::AAAA(x) => a.ips.push((IpAddr::V6(x.0), r.ttl)),
            RData::CNAME(c) => a.cnames.push(c.0.to_ascii()),
            _ => {}
        }
    }
    Ok(a)
}

/// Ask `server` (UDP, retried over TCP on TC=1) from the current thread's netns.
pub fn query_here(server: IpAddr, name: &str, qtype: RecordType, timeout: Duration) -> Result<Answer> {
    let q = query_message(name, qtype)?;
    let id = q.metadata.id;
    let wire = q.to_vec()?;
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(timeout))?;
    s.connect((server, 53))?;
    s.send(&wire)?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf).with_context(|| format!("no UDP answer from {server} for {name}"))?;
    let truncated = n >= 3 && buf[2] & 0x02 != 0;
    if !truncated {
        return decode(&buf[..n], id, false);
    }
    let mut t = TcpStream::connect_timeout(&SocketAddr::new(server, 53), timeout)?;
    t.set_read_timeout(Some(timeout))?;
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    t.write_all(&framed)?;
    let mut len = [0u8; 2];
    t.read_exact(&mut len)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    t.read_exact(&mut msg)?;
    decode(&msg, id, true)
}

/// Ask `server` over TCP only (DNS over TCP, RFC 7766 framing), from this thread's netns.
pub fn query_tcp_here(server: IpAddr, name: &str, qtype: RecordType, timeout: Duration) -> Result<Answer> {
    let q = query_message(name, qtype)?;
    let (id, wire) = (q.metadata.id, q.to_vec()?);
    let mut t = TcpStream::connect_timeout(&SocketAddr::new(server, 53), timeout)?;
    t.set_read_timeout(Some(timeout))?;
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    t.write_all(&framed)?;
    let mut len = [0u8; 2];
    t.read_exact(&mut len)?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    t.read_exact(&mut msg)?;
    decode(&msg, id, true)
}

/// [`query_here`] from the netns at `netns` (a setns thread).
pub fn resolve_in(netns: &Path, server: IpAddr, name: &str, qtype: RecordType, timeout: Duration) -> Result<Answer> {
    let name = name.to_string();
    sys::in_netns(netns, move || query_here(server, &name, qtype, timeout))?
}

/// How the [`Responder`] answers one query: the reply's wire bytes, or None for silence.
pub type Handler = Arc<dyn Fn(&Message) -> Option<Vec<u8>> + Send + Sync>;

/// The tests' own DNS server: UDP and TCP on port 53 of the given addresses, in a netns.
pub struct Responder {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Queries answered so far.
    pub answered: Arc<AtomicU64>,
}

impl Responder {
    pub fn start(netns: &Path, addrs: &[IpAddr], handler: Handler) -> Result<Responder> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let mut threads = vec![];
        for &ip in addrs {
            let addr = SocketAddr::new(ip, 53);
            let (u, t) = sys::in_netns(netns, move || -> std::io::Result<(UdpSocket, TcpListener)> {
                Ok((UdpSocket::bind(addr)?, TcpListener::bind(addr)?))
            })?
            .with_context(|| format!("binding {addr} for the responder"))?;
            u.set_read_timeout(Some(Duration::from_millis(100)))?;
            t.set_nonblocking(true)?;
            let (h, st, n) = (handler.clone(), stop.clone(), answered.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    let Ok((len, from)) = u.recv_from(&mut buf) else { continue };
                    let Ok(q) = Message::from_vec(&buf[..len]) else { continue };
                    if let Some(reply) = h(&q) {
                        let _ = u.send_to(&reply, from);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
            let (h, st, n) = (handler.clone(), stop.clone(), answered.clone());
            threads.push(std::thread::spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match t.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut len = [0u8; 2];
                            if c.read_exact(&mut len).is_err() {
                                continue;
                            }
                            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                            if c.read_exact(&mut msg).is_err() {
                                continue;
                            }
                            let Ok(q) = Message::from_vec(&msg) else { continue };
                            if let Some(reply) = h(&q) {
                                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                                framed.extend_from_slice(&reply);
                                let _ = c.write_all(&framed);
                                n.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(Responder { stop, threads, answered })
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A response to `query` with the given addresses (A/AAAA by address family, owner = the
/// question name) and TTL.
pub fn answer(query: &Message, ips: &[IpAddr], ttl: u32) -> Vec<u8> {
    let mut m = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.metadata.response_code = ResponseCode::NoError;
    let Some(q) = query.queries.first() else { return m.to_vec().unwrap_or_default() };
    m.add_query(q.clone());
    for ip in ips {
        let data = match ip {
            IpAddr::V4(a) => RData::A(rdata::A(*a)),
            IpAddr::V6(a) => RData::AAAA(rdata::AAAA(*a)),
        };
        m.add_answer(Record::from_rdata(q.name().clone(), ttl, data));
    }
    m.to_vec().unwrap_or_default()
}

/// The question name of a query, lowercased, without the trailing dot.
pub fn qname(query: &Message) -> Option<String> {
    let q = query.queries.first()?;
    Some(q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase())
}

/// A UDP socket in a netns that sent a query and waits for answers: crafted answers are
/// sent to its port ([`scapy_send`]).
pub struct PendingQuery {
    pub sock: UdpSocket,
    pub port: u16,
    pub id: u16,
    pub wire: Vec<u8>,
}

/// Send a query for `name` to `server`:53 from a fresh socket in `netns` (the conntrack
/// entry that a crafted answer must match) and keep the socket.
pub fn open_query(netns: &Path, server: IpAddr, name: &str, qtype: RecordType) -> Result<PendingQuery> {
    let q = query_message(name, qtype)?;
    let (id, wire) = (q.metadata.id, q.to_vec()?);
    let w = wire.clone();
    let sock = sys::in_netns(netns, move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
        s.send_to(&w, (server, 53))?;
        Ok(s)
    })??;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let port = sock.local_addr()?.port();
    Ok(PendingQuery { sock, port, id, wire })
}

/// The scapy script: crafts DNS answers with scapy's DNS layer (or raw bytes for what the
/// layer cannot express) and sends them with a raw L3 socket (kernel routing, any source).
const SCAPY_SCRIPT: &str = r#"
import json, random, struct, sys
from scapy.all import IP, IPv6, UDP, DNS, DNSQR, DNSRR, Raw, conf, fragment
from scapy.supersocket import L3RawSocket
from scapy.layers.inet6 import IPv6ExtHdrFragment, fragment6
conf.verb = 0

def rrs(name, ips, ttl):
    out = None
    for ip in ips:
        r = DNSRR(rrname=name, type="AAAA" if ":" in ip else "A", ttl=ttl, rdata=ip)
        out = r if out is None else out / r
    return out

def header(qid, flags, qd, an, ns=0, ar=0):
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)

def qname_wire(name):
    return b"".join(bytes([len(l)]) + l.encode() for l in name.strip(".").split(".")) + b"\x00"

def craft(s):
    k, qid, q = s["kind"], s["id"], s.get("qname", "x.example.test")
    ips, ttl, qtype = s.get("ips", []), s.get("ttl", 60), s.get("qtype", "A")
    if k == "valid":   # a well-formed answer, built by scapy's DNS layer
        return bytes(DNS(id=qid, qr=1, aa=1, rd=1, ra=1, qd=DNSQR(qname=q, qtype=qtype), an=rrs(q, ips, ttl)))
    if k == "truncated":   # TC=1: the RRset is partial
        return bytes(DNS(id=qid, qr=1, tc=1, rd=1, ra=1, qd=DNSQR(qname=q), an=rrs(q, ips, ttl)))
    if k == "nxdomain":
        return bytes(DNS(id=qid, qr=1, rcode=3, rd=1, ra=1, qd=DNSQR(qname=q), an=rrs(q, ips, ttl)))
    if k == "not-response":   # QR=0 with answers
        return bytes(DNS(id=qid, qr=0, rd=1, qd=DNSQR(qname=q), an=rrs(q, ips, ttl)))
    if k == "qdcount2":
        return bytes(DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=q) / DNSQR(qname=q), an=rrs(q, ips, ttl)))
    if k == "qname-pointer":   # the question name is a compression pointer to itself
        body = b"\xc0\x0c" + struct.pack(">HH", 1, 1)
        for ip in ips:
            body += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 4) + bytes(map(int, ip.split(".")))
        return header(qid, 0x8180, 1, len(ips)) + body
    if k == "owner-loop":   # answer owner names that point at each other, then good records
        body = qname_wire(q) + struct.pack(">HH", 1, 1)
        first = 12 + len(body)
        body += struct.pack(">H", 0xc000 | (first + 2)) + struct.pack(">H", 0xc000 | first)
        body += struct.pack(">HHIH", 1, 1, ttl, 4) + bytes(map(int, ips[0].split(".")))
        return header(qid, 0x8180, 1, 1) + body
    if k == "rdlength":   # an A record whose rdlength is 5
        body = qname_wire(q) + struct.pack(">HH", 1, 1)
        body += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 5) + bytes(map(int, ips[0].split("."))) + b"\x00"
        return header(qid, 0x8180, 1, 1) + body
    if k == "overrun":   # ANCOUNT promises more records than the message holds
        body = qname_wire(q) + struct.pack(">HH", 1, 1)
        body += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 4) + bytes(map(int, ips[0].split(".")))
        body += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, ttl, 200) + b"\x0a\x4e"
        return header(qid, 0x8180, 1, 5) + body
    if k == "label64":   # a question label of 64 bytes (type bits 01: reserved)
        body = b"\x40" + b"a" * 64 + qname_wire(q) + struct.pack(">HH", 1, 1)
        return header(qid, 0x8180, 1, 0) + body
    if k == "labels33":   # the query's own name, 33 labels or more: echoed as asked
        return bytes(DNS(id=qid, qr=1, rd=1, ra=1, qd=DNSQR(qname=q), an=rrs(q, ips, ttl)))
    if k == "garbage":
        rnd = random.Random(s.get("seed", 1))
        return bytes(rnd.getrandbits(8) for _ in range(s.get("len", 64)))
    if k == "short":
        return b"\x12\x34\x81"
    raise SystemExit("unknown kind " + k)

spec = json.loads(sys.argv[1])
for p in spec["packets"]:
    payload = craft(p)
    v6 = ":" in p["dst"]
    l3 = (IPv6(src=p["src"], dst=p["dst"]) if v6 else IP(src=p["src"], dst=p["dst"]))
    pkt = l3 / UDP(sport=p.get("sport", 53), dport=p["dport"]) / Raw(payload)
    if v6:
        from scapy.layers.inet6 import L3RawSocket6
        big = len(pkt) > 1280
        frags = fragment6(l3 / IPv6ExtHdrFragment() / UDP(sport=p.get("sport", 53), dport=p["dport"]) / Raw(payload), 1280) if big else [pkt]
        s = L3RawSocket6()
    else:
        frags = fragment(pkt, fragsize=1400) if len(pkt) > 1420 else [pkt]
        s = L3RawSocket()
    for f in frags:
        s.send(f)
    s.close()
    print("sent", p["kind"], len(payload), "bytes in", len(frags), "packet(s)")
"#;

/// Run the scapy crafter in `from`'s netns (and cgroup): `packets` is a JSON array of
/// `{kind, id, qname, ips, ttl, qtype, src, dst, sport, dport, seed, len}` (see the script's
/// `craft` for the kinds). Messages over one MTU are sent as IP fragments.
pub fn scapy_send(tb: &Testbed, from: &Endpoint, packets: serde_json::Value) -> Result<String> {
    let script = tb.tmp_dir().join("craft_dns.py");
    if !script.exists() {
        std::fs::write(&script, SCAPY_SCRIPT)?;
    }
    let spec = serde_json::json!({ "packets": packets }).to_string();
    let script_s = script.display().to_string();
    let out = tb.exec_in(from, &[SCAPY_PYTHON, &script_s, &spec])?;
    if !out.status.success() {
        bail!(
            "scapy ({SCAPY_PYTHON}, Debian python3-scapy) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interpreter with Debian's python3-scapy (not a pyenv shim without it).
pub const SCAPY_PYTHON: &str = "/usr/bin/python3";
