//! Service translation at the socket: the real sock_addr programs attached (as the agent
//! attaches them) to a private cgroup, the maps written by the agent's `ServiceMaps`, and
//! a real client process in that cgroup, in a private network namespace where only the
//! loopback exists (an untranslated frontend address is unreachable there, so nothing
//! can leave the machine). Needs root.
mod common;

use std::io::Write;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::*;
use zt_agent::services::maps::{ServiceMaps, WantFrontend};
use zt_common::*;

/// A cgroup of its own under the cgroup2 mount, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(tag: &str) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let root = mounts.lines().map(|l| l.split(' ').collect::<Vec<_>>()).find(|f| f[2] == "cgroup2").map(|f| f[1].to_string()).expect("a cgroup2 mount");
        let dir = PathBuf::from(root).join(format!("zt-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap();
        Cgroup(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn fkey(ip: &str, port: u16, proto: u8) -> SvcFrontendKey {
    SvcFrontendKey { addr: zt_agent::net::to_key(ip.parse().unwrap()), port, proto, _pad: 0 }
}

fn backend(ip: &str, port: u16) -> SvcBackendValue {
    SvcBackendValue { addr: zt_agent::net::to_key(ip.parse().unwrap()), port, _pad: [0; 2] }
}

/// Runs `script` with /usr/bin/python3 in cgroup `cg` (and this thread's netns); stdout.
fn python_in(cg: &Cgroup, script: &str) -> String {
    let procs = std::fs::OpenOptions::new().write(true).open(cg.0.join("cgroup.procs")).unwrap();
    let fd = procs.as_raw_fd();
    let mut c = Command::new("/usr/bin/python3");
    c.arg("-c").arg(script);
    // SAFETY: only write(2) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            libc::write(fd, b"0".as_ptr() as *const _, 1);
            Ok(())
        });
    }
    let out = c.output().expect("python3");
    drop(procs);
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A TCP server on `addr` counting accepted connections; answers "hello".
fn tcp_server(addr: &str) -> (u16, Arc<AtomicU32>) {
    let l = TcpListener::bind(addr).unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicU32::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            n2.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"hello");
        }
    });
    (port, n)
}

/// A UDP echo server on `addr`.
fn udp_echo(addr: &str) -> u16 {
    let s = UdpSocket::bind(addr).unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut b = [0u8; 512];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            let _ = s.send_to(&b[..n], from);
        }
    });
    port
}

/// The servers' threads count after `accept` returns: give them a moment.
fn settle(total: impl Fn() -> u32, want: u32) {
    for _ in 0..200 {
        if total() >= want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn lo_up() {
    assert!(Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap().success());
}

#[test]
fn connect_sendmsg_recvmsg_getpeername_through_a_frontend() {
    let dp = Dp::new("svc");
    let cg = Cgroup::new("svc");
    let root = dp._fs.root();
    std::fs::create_dir_all(zt_agent::pins::link_dir(&root)).unwrap();
    zt_agent::cgroup_link::ensure_attached(&mut dp.ebpf(&zt_agent::loader::agent_programs()), &root, &cg.0, true).unwrap();
    let mut maps = ServiceMaps::open(&root).unwrap();
    let out = in_private_netns(|_, _| {
        lo_up();
        let (tport, accepted) = tcp_server("127.0.0.1:0");
        let (tport6, accepted6) = tcp_server("[::1]:0");
        let uport = udp_echo("127.0.0.1:0");
        let mut want = std::collections::BTreeMap::new();
        want.insert(fkey("10.96.0.10", 8000, 6), WantFrontend { backends: vec![backend("127.0.0.1", tport)], affinity_s: 0, identity: 0 });
        want.insert(fkey("10.96.0.10", 53, 17), WantFrontend { backends: vec![backend("127.0.0.1", uport)], affinity_s: 0, identity: 0 });
        want.insert(fkey("fd00:96::10", 8000, 6), WantFrontend { backends: vec![backend("::1", tport6)], affinity_s: 0, identity: 0 });
        want.insert(fkey("10.96.0.11", 80, 6), WantFrontend { backends: vec![], affinity_s: 0, identity: 0 });
        let st = maps.sync(&want).unwrap();
        assert_eq!((st.frontends_written, st.backends_written), (4, 3));
        let out = python_in(
            &cg,
            r#"
import socket, errno, json
r = {}
s = socket.create_connection(("10.96.0.10", 8000), timeout=2)
r["tcp_peer"] = list(s.getpeername()); r["tcp_data"] = s.recv(5).decode(); s.close()
s6 = socket.create_connection(("fd00:96::10", 8000), timeout=2)
r["tcp6_peer"] = list(s6.getpeername()[:2]); s6.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
u.sendto(b"ping", ("10.96.0.10", 53))
data, src = u.recvfrom(512); r["udp_data"] = data.decode(); r["udp_src"] = list(src)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(2)
c.connect(("10.96.0.10", 53)); c.send(b"pong"); r["udp_conn_data"] = c.recv(512).decode(); r["udp_conn_peer"] = list(c.getpeername())
try:
    socket.create_connection(("10.96.0.11", 80), timeout=2); r["empty"] = "connected"
except OSError as e:
    r["empty"] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(r))
"#,
        );
        settle(|| accepted.load(Ordering::SeqCst) + accepted6.load(Ordering::SeqCst), 2);
        assert_eq!((accepted.load(Ordering::SeqCst), accepted6.load(Ordering::SeqCst)), (1, 1));
        out
    });
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["tcp_peer"], serde_json::json!(["10.96.0.10", 8000]), "{r}");
    assert_eq!(r["tcp_data"], "hello");
    assert_eq!(r["tcp6_peer"], serde_json::json!(["fd00:96::10", 8000]), "{r}");
    assert_eq!((r["udp_data"].as_str(), &r["udp_src"]), (Some("ping"), &serde_json::json!(["10.96.0.10", 53])), "{r}");
    assert_eq!((r["udp_conn_data"].as_str(), &r["udp_conn_peer"]), (Some("pong"), &serde_json::json!(["10.96.0.10", 53])), "{r}");
    assert_eq!(r["empty"], "ECONNREFUSED", "a frontend without backends refuses: {r}");
    let st = maps.stats().unwrap();
    assert!(st[SvcStat::Translated as usize] >= 4, "{st:?}");
    assert!(st[SvcStat::NoBackend as usize] >= 1, "{st:?}");
    assert!(st[SvcStat::Reversed as usize] >= 3, "{st:?}");
}

#[test]
fn session_affinity_keeps_a_clients_backend_and_random_spreads() {
    let dp = Dp::new("svc-aff");
    let cg = Cgroup::new("svc-aff");
    let root = dp._fs.root();
    std::fs::create_dir_all(zt_agent::pins::link_dir(&root)).unwrap();
    zt_agent::cgroup_link::ensure_attached(&mut dp.ebpf(&zt_agent::loader::agent_programs()), &root, &cg.0, true).unwrap();
    let mut maps = ServiceMaps::open(&root).unwrap();
    in_private_netns(|_, _| {
        lo_up();
        let (p1, n1) = tcp_server("127.0.0.1:0");
        let (p2, n2) = tcp_server("127.0.0.1:0");
        let script = |port: u16| {
            format!("import socket\nfor i in range(20):\n    s = socket.create_connection(('10.96.0.20', {port}), timeout=2); s.recv(5); s.close()\n")
        };
        let mut want = std::collections::BTreeMap::new();
        let set = vec![backend("127.0.0.1", p1), backend("127.0.0.1", p2)];
        want.insert(fkey("10.96.0.20", 80, 6), WantFrontend { backends: set.clone(), affinity_s: 0, identity: 0 });
        want.insert(fkey("10.96.0.20", 81, 6), WantFrontend { backends: set.clone(), affinity_s: 600, identity: 0 });
        maps.sync(&want).unwrap();
        assert!(maps.take_removed().is_empty(), "nothing was taken out yet");
        python_in(&cg, &script(80));
        settle(|| n1.load(Ordering::SeqCst) + n2.load(Ordering::SeqCst), 20);
        let (a, b) = (n1.load(Ordering::SeqCst), n2.load(Ordering::SeqCst));
        assert!(a > 0 && b > 0 && a + b == 20, "random choice uses both backends: {a} / {b}");
        python_in(&cg, &script(81));
        settle(|| n1.load(Ordering::SeqCst) + n2.load(Ordering::SeqCst), a + b + 20);
        let (a2, b2) = (n1.load(Ordering::SeqCst) - a, n2.load(Ordering::SeqCst) - b);
        assert!(a2 == 20 || b2 == 20, "sessionAffinity keeps one backend: {a2} / {b2}");
        // A changed backend set is swapped in whole, and the old set is gone.
        want.insert(fkey("10.96.0.20", 81, 6), WantFrontend { backends: vec![backend("127.0.0.1", p2)], affinity_s: 600, identity: 0 });
        want.remove(&fkey("10.96.0.20", 80, 6));
        let st = maps.sync(&want).unwrap();
        assert_eq!((st.frontends_written, st.frontends_removed, st.backends_written), (1, 1, 1));
        assert_eq!(maps.counts(), (1, 1));
        // What the sync took out, for services::destroy: both of :80's, p1 of :81.
        let mut removed: Vec<(u16, u16)> = maps.take_removed().iter().map(|r| (r.frontend.port, r.port)).collect();
        removed.sort();
        let mut want_removed = vec![(80, p1), (80, p2), (81, p1)];
        want_removed.sort();
        assert_eq!(removed, want_removed);
        assert!(maps.take_removed().is_empty());
        let before = n2.load(Ordering::SeqCst);
        python_in(&cg, &script(81));
        settle(|| n2.load(Ordering::SeqCst), before + 20);
        assert_eq!(n2.load(Ordering::SeqCst) - before, 20, "after the change only the new set is used");
    });
    // A restarted agent reads the maps back as they are.
    let again = ServiceMaps::open(&root).unwrap();
    assert_eq!(again.counts(), (1, 1));
    assert_eq!(dp.maps.endpoints.keys().count(), 0);
}
