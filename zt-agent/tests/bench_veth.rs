//! `cargo xtask bench` (alone: `cargo test --release -p zt-agent --test bench_veth`): the
//! datapath side by side on a real veth between two network namespaces, in one run: no
//! filter, zt (its TC programs on the server pod's host-side veth and its cgroup programs
//! above the server's cgroup, the way the agent attaches them), iptables-nft rules and an
//! nft set, each at 10 / 1k / 10k / 100k rules (zt: policy entries and identities), and
//! empty programs at zt's hooks (what the hooks cost before any program work).
//! Measures TCP throughput (iperf3), 64-byte UDP packets/s delivered (iperf3 -u -l 64) and
//! sequential TCP connections/s (a client and server in this file), and prints each as a
//! ratio to the same measurement taken just before it on a twin bed that nothing filters
//! (on this shared machine the speed drifts by up to a quarter between rounds minutes
//! apart, which a baseline per round put into the ratios). The "no filter" row pairs the
//! two beds with nothing on either: how far apart identical beds read, the noise floor of
//! every other row. No
//! timed assertions: it fails only when traffic that every configuration allows does not
//! get through.
//!
//! Topology, per bed: netns `A` (client, "the node" side) holds `a0`, the host-side end
//! of the server pod's veth; netns `B` (the pod) holds `b0`. zt's `zt_from_pod` runs at `a0`
//! ingress and `zt_to_pod` at `a0` egress; iptables and nft filter in B's INPUT hook.
//! The iptables chain lists the client's three ACCEPT rules last and has no ESTABLISHED
//! shortcut (each packet walks the chain, as a rule list per peer does for its last peer);
//! the nft set holds (saddr, protocol, port) elements, the client's among them.
//!
//! Flags by environment: ZT_BENCH_SECS (per measurement, default 2), ZT_BENCH_ROUNDS (the
//! whole sequence repeated, default 3: medians and ranges of the ratios are printed),
//! ZT_BENCH_SCALES (default "10,1000,10000,100000").
mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{config, Bpffs};
use zt_agent::{
    loader::{Datapath, MapSizes},
    net::to_key,
    pins::PinnedMaps,
    sync::{apply, Capacities, Contents},
};
use zt_common::*;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const IPERF_PORT: u16 = 5201;
const CONN_PORT: u16 = 5202;
const ID_SERVER: u32 = 300;

fn filler_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + i) // 10.64.0.0 + i
}

/// The flows the client needs: TCP and UDP to iperf3, TCP to the connection server.
const CLIENT_FLOWS: [(u8, u16); 3] = [(6, IPERF_PORT), (17, IPERF_PORT), (6, CONN_PORT)];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--conn-server") => return conn_server(args[2].parse().unwrap()),
        Some("--conn-client") => return conn_client(args[2].parse().unwrap(), args[3].parse().unwrap()),
        _ => {}
    }
    for tool in ["iperf3", "iptables-nft-restore", "nft", "ip"] {
        let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).stdout(Stdio::null()).status().unwrap().success();
        assert!(ok, "{tool} is missing: `cargo xtask setup` installs it (APT_PACKAGES)");
    }
    let secs: u64 = std::env::var("ZT_BENCH_SECS").ok().map(|s| s.parse().expect("ZT_BENCH_SECS: seconds")).unwrap_or(2);
    let scales: Vec<u32> = std::env::var("ZT_BENCH_SCALES")
        .unwrap_or_else(|_| "10,1000,10000,100000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("ZT_BENCH_SCALES: comma-separated numbers"))
        .collect();
    assert!(scales.iter().all(|n| *n >= CLIENT_FLOWS.len() as u32), "every scale holds at least the client's {} rules", CLIENT_FLOWS.len());
    let rounds: usize = std::env::var("ZT_BENCH_ROUNDS").ok().map(|s| s.parse().expect("ZT_BENCH_ROUNDS: a count")).unwrap_or(3);
    let max = *scales.iter().max().unwrap();
    // The baseline: an identical bed that nothing filters, measured just before each
    // measurement on the filtered bed (the host's speed drifts between rounds).
    let twin = Veth::new(0);
    let bed = Veth::new(1);
    let t0 = Instant::now();
    println!(
        "datapath side by side on veth: {rounds} rounds, {secs} s per measurement; each measurement paired with the same one on an identical unfiltered bed (the twin) just before it; ratios of the pairs, median [min-max] over rounds"
    );
    // Per configuration: its figures and ratios of every round.
    let mut cells: Vec<(String, Vec<Figures>, Vec<Figures>)> = vec![];
    for round in 0..rounds {
        let mut rows: Vec<(String, Figures, Figures)> = vec![];
        let pair = |rows: &mut Vec<(String, Figures, Figures)>, name: String| {
            let (base, f) = paired(&twin, &bed, secs);
            rows.push((name, base, f));
        };
        // Both beds unfiltered: how far apart identical beds read (the noise floor).
        pair(&mut rows, "no filter".into());
        {
            // Loaded per round: nothing of zt stays attached during the other configurations.
            let mut zt = Zt::attach(&bed, max);
            for &n in &scales {
                zt.scale(n);
                let judged = zt.counted(false);
                pair(&mut rows, format!("zt {n}"));
                let drops = zt.counted(true);
                assert_eq!(drops, 0, "zt dropped {drops} packets of allowed flows at {n}");
                assert!(zt.counted(false) > judged + 1000, "zt judged the traffic at {n}");
            }
        }
        {
            let _empty = EmptyHooks::attach(&bed);
            pair(&mut rows, "empty programs".into());
        }
        for &n in &scales {
            bed.iptables(n);
            pair(&mut rows, format!("iptables-nft {n}"));
            bed.ns_cmd(&bed.b, &["iptables-nft", "-P", "INPUT", "ACCEPT"]);
            bed.ns_cmd(&bed.b, &["iptables-nft", "-F", "INPUT"]);
        }
        for &n in &scales {
            bed.nft_set(n);
            pair(&mut rows, format!("nft set {n}"));
            bed.ns_cmd(&bed.b, &["nft", "delete", "table", "inet", "ztbench"]);
        }
        let base = rows[0].1;
        eprintln!("round {}: unfiltered twin {:.2} Gb/s, {:.1} kpps, {:.0} conn/s ({:.0?})", round + 1, base.tcp_gbps, base.udp_kpps, base.conn_s, t0.elapsed());
        for (i, (name, base, f)) in rows.into_iter().enumerate() {
            let ratio = Figures { tcp_gbps: f.tcp_gbps / base.tcp_gbps, udp_kpps: f.udp_kpps / base.udp_kpps, conn_s: f.conn_s / base.conn_s };
            if round == 0 {
                cells.push((name, vec![], vec![]));
            }
            cells[i].1.push(f);
            cells[i].2.push(ratio);
        }
    }
    println!("{:<20} | {:>9} {:>17} | {:>9} {:>17} | {:>8} {:>17}", "", "TCP Gb/s", "ratio", "UDP kpps", "ratio", "conn/s", "ratio");
    for (name, figs, ratios) in &cells {
        let col = |get: fn(&Figures) -> f64| {
            let (v, mut r) = (median(figs.iter().map(get).collect()), ratios.iter().map(get).collect::<Vec<f64>>());
            r.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (v, median(r.clone()), r[0], r[r.len() - 1])
        };
        let (t, u, c) = (col(|f| f.tcp_gbps), col(|f| f.udp_kpps), col(|f| f.conn_s));
        println!(
            "{:<20} | {:>9.2} {:>5.2} [{:.2}-{:.2}] | {:>9.1} {:>5.2} [{:.2}-{:.2}] | {:>8.0} {:>5.2} [{:.2}-{:.2}]",
            name, t.0, t.1, t.2, t.3, u.0, u.1, u.2, u.3, c.0, c.1, c.2, c.3
        );
    }
    println!("(no filter: the filtered bed with nothing on it against its twin, the noise floor of every ratio; UDP: 64-byte payloads, packets delivered to the server per second; conn/s: sequential connect, read 1 byte, close; total {:.0?})", t0.elapsed());
}

/// Each measurement on the twin, then on the bed: (twin, bed).
fn paired(twin: &Veth, bed: &Veth, secs: u64) -> (Figures, Figures) {
    let (t_tcp, b_tcp) = (twin.tcp(secs), bed.tcp(secs));
    let (t_udp, b_udp) = (twin.udp(secs), bed.udp(secs));
    let (t_conn, b_conn) = (twin.conn(secs), bed.conn(secs));
    (Figures { tcp_gbps: t_tcp, udp_kpps: t_udp, conn_s: t_conn }, Figures { tcp_gbps: b_tcp, udp_kpps: b_udp, conn_s: b_conn })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Clone, Copy)]
struct Figures {
    tcp_gbps: f64,
    udp_kpps: f64,
    conn_s: f64,
}

/// Two network namespaces joined by a veth, an iperf3 server and a connection server in
/// B, both in their own cgroup (where zt's cgroup programs see them); removed on drop.
struct Veth {
    a: String,
    b: String,
    a_if: String,
    cgroup_root: PathBuf,
    servers: Vec<Child>,
}

impl Veth {
    /// Bed `n` of this run (its own namespaces, interfaces and cgroup).
    fn new(n: u32) -> Veth {
        let id = format!("{}{n}", std::process::id());
        let (a, b) = (format!("ztbv{id}a"), format!("ztbv{id}b"));
        let cgroup_root = cgroup2_root().join(format!("ztbv{id}"));
        let mut bed = Veth { a: a.clone(), b: b.clone(), a_if: format!("bv{id}a"), cgroup_root, servers: vec![] };
        for ns in [&a, &b] {
            run(Command::new("ip").args(["netns", "add", ns]));
        }
        let b_if = format!("bv{id}b");
        run(Command::new("ip").args(["-n", &a, "link", "add", &bed.a_if, "type", "veth", "peer", "name", &b_if, "netns", &b]));
        run(Command::new("ip").args(["-n", &a, "addr", "add", &format!("{CLIENT}/8"), "dev", &bed.a_if]));
        run(Command::new("ip").args(["-n", &b, "addr", "add", &format!("{SERVER}/8"), "dev", &b_if]));
        for (ns, dev) in [(&a, &bed.a_if), (&b, &b_if)] {
            run(Command::new("ip").args(["-n", ns, "link", "set", dev, "up"]));
            run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        }
        // Sequential connects reuse source ports quickly: the widest range.
        bed.ns_cmd(&a, &["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"]);
        std::fs::create_dir_all(bed.cgroup_root.join("pod")).expect("a cgroup under the cgroup2 root");
        let procs = bed.cgroup_root.join("pod/cgroup.procs");
        let exe = std::env::current_exe().unwrap();
        for cmd in [format!("iperf3 -s -p {IPERF_PORT} -B {SERVER}"), format!("{} --conn-server {SERVER}:{CONN_PORT}", exe.display())] {
            let child = Command::new("sh")
                .args(["-c", &format!("echo $$ > {} && exec ip netns exec {b} {cmd}", procs.display())])
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            bed.servers.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        // Both listening (a connection would cost iperf3 a test and an error line).
        let listening = |port: u16| bed.ns_output(&b, &["ss", "-Hltn", &format!("sport = :{port}")]).contains(&SERVER.to_string());
        while !(listening(IPERF_PORT) && listening(CONN_PORT)) {
            assert!(Instant::now() < deadline, "the servers in {b} did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        bed
    }

    fn pod_cgroup(&self) -> PathBuf {
        self.cgroup_root.join("pod")
    }

    fn ns_cmd(&self, ns: &str, cmd: &[&str]) {
        run(Command::new("ip").args(["netns", "exec", ns]).args(cmd));
    }

    fn ns_output(&self, ns: &str, cmd: &[&str]) -> String {
        let out = Command::new("ip").args(["netns", "exec", ns]).args(cmd).output().unwrap();
        assert!(out.status.success(), "{cmd:?} in {ns}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// TCP throughput, Gb/s.
    fn tcp(&self, secs: u64) -> f64 {
        let (t, server) = (secs.to_string(), SERVER.to_string());
        let tcp: serde_json::Value = serde_json::from_str(&self.ns_output(&self.a, &["iperf3", "-c", &server, "-p", "5201", "-t", &t, "-J"])).unwrap();
        let bps = tcp["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or_else(|| panic!("iperf3 TCP: {tcp:#}"));
        assert!(bps > 0.0, "TCP got through on {}", self.b);
        bps / 1e9
    }

    /// 64-byte UDP packets delivered, thousands per second.
    fn udp(&self, secs: u64) -> f64 {
        let (t, server) = (secs.to_string(), SERVER.to_string());
        let udp: serde_json::Value =
            serde_json::from_str(&self.ns_output(&self.a, &["iperf3", "-c", &server, "-p", "5201", "-u", "-l", "64", "-b", "0", "-t", &t, "-J"])).unwrap();
        let sum = &udp["end"]["sum"];
        let (packets, lost, seconds) = (sum["packets"].as_f64(), sum["lost_packets"].as_f64(), sum["seconds"].as_f64());
        let (Some(packets), Some(lost), Some(seconds)) = (packets, lost, seconds) else { panic!("iperf3 UDP: {udp:#}") };
        assert!(packets > lost, "UDP got through on {}: {packets} packets, {lost} lost", self.b);
        (packets - lost) / seconds / 1e3
    }

    /// Sequential TCP connections per second.
    fn conn(&self, secs: u64) -> f64 {
        let exe = std::env::current_exe().unwrap();
        let conn = self.ns_output(&self.a, &[exe.to_str().unwrap(), "--conn-client", &format!("{SERVER}:{CONN_PORT}"), &secs.to_string()]);
        let conn_s: f64 = conn.trim().parse().unwrap_or_else(|_| panic!("conn client printed {conn:?}"));
        assert!(conn_s > 0.0, "connections got through on {}", self.b);
        conn_s
    }

    /// `n` rules in B's INPUT chain: fillers for other peers first, the client's last.
    fn iptables(&self, n: u32) {
        let mut rules = String::from("*filter\n:INPUT DROP [0:0]\n");
        for i in 0..n - CLIENT_FLOWS.len() as u32 {
            rules += &format!("-A INPUT -s {}/32 -p tcp -m tcp --dport {} -j ACCEPT\n", filler_ip(i), 1000 + i % 1000);
        }
        for (proto, port) in CLIENT_FLOWS {
            let p = if proto == 6 { "tcp" } else { "udp" };
            rules += &format!("-A INPUT -s {CLIENT}/32 -p {p} -m {p} --dport {port} -j ACCEPT\n");
        }
        rules += "COMMIT\n";
        self.feed(&["iptables-nft-restore"], &rules);
    }

    /// An nft set of `n` (saddr, protocol, port) elements, the client's among them.
    fn nft_set(&self, n: u32) {
        let mut elems: Vec<String> = (0..n - CLIENT_FLOWS.len() as u32).map(|i| format!("{} . tcp . {}", filler_ip(i), 1000 + i % 1000)).collect();
        for (proto, port) in CLIENT_FLOWS {
            elems.push(format!("{CLIENT} . {} . {port}", if proto == 6 { "tcp" } else { "udp" }));
        }
        let rules = format!(
            "table inet ztbench {{\n set allow {{ type ipv4_addr . inet_proto . inet_service; size {}; elements = {{ {} }} }}\n chain input {{\n  type filter hook input priority 0; policy drop;\n  ip saddr . meta l4proto . th dport @allow accept\n }}\n}}\n",
            n + 16,
            elems.join(", ")
        );
        self.feed(&["nft", "-f", "-"], &rules);
    }

    fn feed(&self, cmd: &[&str], input: &str) {
        let mut child = Command::new("ip").args(["netns", "exec", &self.b]).args(cmd).stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "{cmd:?} in {}", self.b);
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The servers were exec'd by the shells above (same pids); wait for the cgroup to empty.
        for _ in 0..50 {
            if std::fs::read_to_string(self.pod_cgroup().join("cgroup.procs")).map(|s| s.trim().is_empty()).unwrap_or(true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::remove_dir(self.pod_cgroup());
        let _ = std::fs::remove_dir(&self.cgroup_root);
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// zt's programs on the bed, maps filled by the agent's own `sync::apply`.
struct Zt {
    dp: Datapath,
    maps: PinnedMaps,
    have: Contents,
    caps: Capacities,
    a_ifindex: u32,
    scope: u32,
    _fs: Bpffs,
}

impl Zt {
    fn attach(bed: &Veth, max: u32) -> Zt {
        let fs = Bpffs::new("bench-veth");
        let sizes = MapSizes { endpoints: max + 16, policy: max + 16, ..MapSizes::default() };
        let mut dp = Datapath::load(&fs.root(), &sizes).expect("load the zt object");
        let mut maps = PinnedMaps::open(&fs.root()).unwrap();
        let mut c = config();
        c.events_per_sec = 1000;
        c.events_burst = 1000;
        maps.config.set(0, c, 0).unwrap();
        // TC programs on a0, attached from inside A (the name resolves in the caller's netns).
        let a_ifindex = in_netns(&bed.a, || {
            let idx = zt_agent::net::ifindex(&bed.a_if).expect("a0's ifindex");
            dp.ensure_attached(idx, &bed.a_if).expect("attach TC");
            idx
        });
        dp.ensure_cgroup(Some(&bed.cgroup_root), false).expect("attach cgroup programs");
        let scope = cgroup_scope(std::fs::metadata(bed.pod_cgroup()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap());
        let caps = Capacities {
            endpoints: sizes.endpoints,
            cidrs: sizes.cidrs,
            policy: sizes.policy,
            fqdn_names: sizes.fqdn_names,
            fqdn_ports: sizes.fqdn_ports,
            dns_servers: DNS_SERVERS_MAX,
        };
        Zt { dp, maps, have: Contents::default(), caps, a_ifindex, scope, _fs: fs }
    }

    /// `n` identities (the client's and n-1 others, one endpoint each) and `n` policy
    /// entries for the server pod (the client's 3 and fillers for the others).
    fn scale(&mut self, n: u32) {
        let mut c = Contents::default();
        c.endpoints.insert(
            to_key(SERVER.into()),
            EndpointValue { identity: ID_SERVER, flags: EP_LOCAL | EP_ENFORCE_INGRESS | EP_ENFORCE_EGRESS, ifindex: self.a_ifindex, cgroup: self.scope },
        );
        let client_id = 1000 + n - 1;
        c.endpoints.insert(to_key(CLIENT.into()), EndpointValue { identity: client_id, flags: 0, ifindex: 0, cgroup: 0 });
        for i in 0..n - 1 {
            c.endpoints.insert(to_key(filler_ip(i).into()), EndpointValue { identity: 1000 + i, flags: 0, ifindex: 0, cgroup: 0 });
        }
        let allow = PolicyValue { verdict: VERDICT_ALLOW, flags: 0, _pad: [0; 2], rule_id: 1 };
        for (proto, port) in CLIENT_FLOWS {
            c.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(ID_SERVER, client_id, DIR_INGRESS, proto, port)), allow);
        }
        for j in 0..n - CLIENT_FLOWS.len() as u32 {
            let peer = 1000 + j % (n - 1);
            c.policy.insert((POLICY_PREFIX_FULL, PolicyKey::new(ID_SERVER, peer, DIR_INGRESS, 6, 1000 + (j / (n - 1)) as u16)), allow);
        }
        apply(&mut self.maps, &mut self.have, &c, &self.caps).expect("apply");
        // A new epoch: flows tracked at the previous scale are judged again.
        let mut cfg = self.maps.config.get(&0, 0).unwrap();
        cfg.policy_epoch += 1;
        self.maps.config.set(0, cfg, 0).unwrap();
    }

    /// Verdicts so far (both directions, TC and cgroup hooks): drops, or passes.
    fn counted(&self, drops: bool) -> u64 {
        let counters = self.maps.counters().unwrap();
        let _ = &self.dp; // the programs stay attached while this lives
        let mut n = 0;
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            for r in Reason::ALL.iter().filter(|r| r.is_drop() == drops) {
                n += counters[counter_index(dir, *r as u8) as usize];
            }
        }
        n
    }
}

/// Programs that pass everything at zt's hooks: `zt_noop` at a0's TC ingress and egress
/// and `zt_cgroup_noop` at the cgroup root in both directions, attached as the agent
/// attaches its own (TCX first, cgroup links). What the hooks cost before zt's programs
/// do any work; detached when dropped.
struct EmptyHooks {
    _ebpf: aya::Ebpf,
    _fs: Bpffs,
}

impl EmptyHooks {
    fn attach(bed: &Veth) -> EmptyHooks {
        use aya::programs::{tc::TcAttachOptions, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, LinkOrder, SchedClassifier, TcAttachType};
        let fs = Bpffs::new("bench-veth-empty");
        // Only the two empty programs are loaded (the object's maps are created, pinned
        // under this test's own bpffs).
        let dir = zt_agent::pins::map_dir(&fs.root());
        std::fs::create_dir_all(&dir).unwrap();
        let mut ebpf = aya::EbpfLoader::new().default_map_pin_directory(&dir).load(zt_agent::loader::OBJECT).expect("the zt object");
        let tc: &mut SchedClassifier = ebpf.program_mut("zt_noop").unwrap().try_into().unwrap();
        tc.load().expect("load zt_noop");
        in_netns(&bed.a, || {
            for side in [TcAttachType::Ingress, TcAttachType::Egress] {
                tc.attach_with_options(&bed.a_if, side, TcAttachOptions::TcxOrder(LinkOrder::first())).expect("attach zt_noop");
            }
        });
        let cg: &mut CgroupSkb = ebpf.program_mut("zt_cgroup_noop").unwrap().try_into().unwrap();
        cg.load().expect("load zt_cgroup_noop");
        let root = std::fs::File::open(&bed.cgroup_root).unwrap();
        for side in [CgroupSkbAttachType::Ingress, CgroupSkbAttachType::Egress] {
            cg.attach(&root, side, CgroupAttachMode::Single).expect("attach zt_cgroup_noop");
        }
        EmptyHooks { _ebpf: ebpf, _fs: fs }
    }
}

/// Runs `f` on a thread that entered network namespace `ns` (/run/netns/`ns`).
fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(Path::new("/run/netns").join(ns)).unwrap();
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns into {ns}");
            f()
        })
        .join()
        .unwrap()
    })
}

/// Mount point of the cgroup2 hierarchy (from /proc/self/mounts).
fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let f = mounts.lines().map(|l| l.split(' ').collect::<Vec<_>>()).find(|f| f.len() >= 3 && f[2] == "cgroup2").expect("a cgroup2 mount");
    PathBuf::from(f[1])
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Accepts connections forever; writes one byte to each and closes it.
fn conn_server(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    for s in l.incoming() {
        if let Ok(mut s) = s {
            let _ = s.write_all(b"x");
        }
    }
}

/// Sequential connections for `secs`: connect, read the byte, close; prints conn/s.
fn conn_client(addr: SocketAddr, secs: f64) {
    let t = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    while t.elapsed().as_secs_f64() < secs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                let mut b = [0u8; 8];
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                if matches!(s.read(&mut b), Ok(1)) {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            Err(_) => failed += 1,
        }
    }
    if failed * 100 > ok {
        eprintln!("{failed} of {} connections failed", ok + failed);
        std::process::exit(1);
    }
    println!("{}", ok as f64 / t.elapsed().as_secs_f64());
}
