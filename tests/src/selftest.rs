//! Self-checks of the test bed itself (root only; they need the `zt-testbed` binary,
//! which cargo builds for integration tests, or $ZT_TESTBED_BIN). Skipped otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::*;

fn lab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/basic")
}

fn serve_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ZT_TESTBED_BIN") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("zt-testbed");
    p.is_file().then_some(p)
}

fn opts() -> Option<TestbedOptions> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("selftest skipped: not root");
        return None;
    }
    match serve_bin() {
        Some(b) => Some(TestbedOptions::default().serve_bin(b)),
        None => {
            eprintln!(
                "selftest skipped: zt-testbed binary not built (cargo build -p zt-tests first)"
            );
            None
        }
    }
}

fn leftovers(run: &str) -> Vec<String> {
    let mut v: Vec<String> = sys::netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&format!("zt{run}-")))
        .collect();
    if let Ok(root) = sys::cgroup2_root() {
        let cg = root.join(format!("zt-test-{run}"));
        if cg.exists() {
            v.push(cg.display().to_string());
        }
    }
    for m in sys::mount_points() {
        if m.display()
            .to_string()
            .contains(&format!("zt-testbed-{run}"))
        {
            v.push(m.display().to_string());
        }
    }
    let tmp = std::env::temp_dir().join(format!("zt-testbed-{run}"));
    if tmp.exists() {
        v.push(tmp.display().to_string());
    }
    v
}

#[test]
fn full_matrix_all_allowed_without_agent() {
    let Some(o) = opts() else { return };
    for round in 0..2 {
        let tb = Testbed::up(&lab(), o.clone()).unwrap();
        let run = tb.run_id().to_string();
        assert_eq!(tb.pods().len(), 3);
        let checks = [
            (Proto::Tcp, 80),
            (Proto::Udp, 53),
            (Proto::Sctp, 9000),
            (Proto::Icmp, 0),
            (Proto::Tcp, 7000),
        ];
        let mut specs = tb.all_pod_pairs(&checks, &[Family::V4, Family::V6]);
        // Host (node) to every pod, too.
        for p in tb.pods() {
            for fam in [Family::V4, Family::V6] {
                for &(proto, port) in &checks {
                    specs.push(ProbeSpec::new(
                        Endpoint::node("node1"),
                        Target::pod("default", &p.pod.name, fam),
                        proto,
                        port,
                    ));
                }
            }
        }
        let m = tb.probe_matrix(&specs, Duration::from_millis(1000));
        println!("round {round}:\n{m}");
        assert!(m.all_ok(), "failures: {:?}", m.failures());
        assert_eq!(specs.len(), 3 * 2 * 2 * 5 + 3 * 2 * 5);
        let r = m.get(
            &Endpoint::pod("default", "a"),
            &Target::pod("default", "b", Family::V6),
            Proto::Tcp,
            80,
        );
        assert_eq!(r, Some(&ProbeResult::Ok("default/b".into())));
        let r = m.get(
            &Endpoint::pod("default", "c"),
            &Target::pod("default", "a", Family::V4),
            Proto::Sctp,
            9000,
        );
        assert_eq!(r, Some(&ProbeResult::Ok("default/a".into())));
        // Closed ports are refused, not timed out.
        let (a, b4) = (
            Endpoint::pod("default", "a"),
            Target::pod("default", "b", Family::V4),
        );
        let t = Duration::from_millis(1000);
        assert_eq!(tb.probe(&a, &b4, Proto::Tcp, 81, t), ProbeResult::Refused);
        assert_eq!(tb.probe(&a, &b4, Proto::Udp, 54, t), ProbeResult::Refused);
        assert_eq!(
            tb.probe(&a, &b4, Proto::Sctp, 9001, t),
            ProbeResult::Refused
        );
        // No route to it in the node: an error (ICMP net unreachable), fast.
        let ghost = Target::Ip("10.200.0.99".parse().unwrap());
        assert!(matches!(
            tb.probe(&a, &ghost, Proto::Tcp, 80, Duration::from_millis(200)),
            ProbeResult::Error(_)
        ));
        // Servers run in the pod cgroups.
        for p in tb.pods() {
            let procs = std::fs::read_to_string(p.cgroup.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == p.server_pid.to_string()),
                "{procs}"
            );
        }
        drop(tb);
        assert_eq!(leftovers(&run), Vec::<String>::new());
    }
}

#[test]
fn flows_churn_exec() {
    let Some(o) = opts() else { return };
    let tb = Testbed::up(&lab(), o).unwrap();
    let t = Duration::from_millis(1000);
    let a = Endpoint::pod("default", "a");
    let mut flow = tb
        .open_tcp(&a, &Target::pod("default", "b", Family::V6), 7000, t)
        .unwrap();
    for _ in 0..3 {
        assert!(flow.roundtrip(t));
    }
    // Add a pod at runtime, reach it, remove it.
    let d = Pod::new(
        "other",
        "d",
        "node1",
        &[
            "10.200.0.4".parse().unwrap(),
            "fd00:200::4".parse().unwrap(),
        ],
        &[(Proto::Tcp, 80)],
    );
    let info = tb.add_pod(d).unwrap();
    assert!(info.host_veth.len() <= 15);
    let d4 = Target::pod("other", "d", Family::V4);
    assert_eq!(
        tb.probe(&a, &d4, Proto::Tcp, 80, t),
        ProbeResult::Ok("other/d".into())
    );
    let out = tb
        .exec_in(
            &Endpoint::pod("other", "d"),
            &["ip", "-o", "addr", "show", "dev", "eth0"],
        )
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.200.0.4/32"));
    let out = tb
        .exec_in(
            &Endpoint::node("node1"),
            &["ip", "route", "get", "10.200.0.4"],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&info.host_veth),
        "{out:?}"
    );
    tb.remove_pod("other", "d").unwrap();
    assert!(!sys::netns_path(&info.netns).exists());
    assert!(!info.cgroup.exists());
    assert!(!tb
        .probe(&a, &d4, Proto::Tcp, 80, Duration::from_millis(200))
        .is_ok());
    // The old flow still works.
    assert!(flow.roundtrip(t));
}

#[test]
fn agent_handle_with_dummy_agent() {
    let Some(o) = opts() else { return };
    let tb = Testbed::up(&lab(), o).unwrap();
    let run = tb.run_id().to_string();
    let script = tb.tmp_dir().join("fake-agent.sh");
    let has_python = std::process::Command::new("python3")
        .arg("-c")
        .arg("1")
        .status()
        .is_ok_and(|s| s.success());
    let metrics = if has_python {
        r#"exec python3 -c '
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = b"zt_up 1\n"
        self.send_response(200); self.send_header("Content-Length", str(len(b))); self.end_headers(); self.wfile.write(b)
http.server.HTTPServer(("127.0.0.1", 9962), H).serve_forever()'"#
    } else {
        "exec sleep 1000"
    };
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho fake agent \"$@\"\nwhile [ $# -gt 0 ]; do case $1 in --state-dir) S=$2;; --bpffs-root) B=$2;; esac; shift; done\n\
             mkdir -p $B && touch $S/ready && echo ready\n{metrics}\n"
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&script).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ag = tb
        .start_agent("node1", &script, &lab(), &["--extra", "x"])
        .unwrap();
    ag.wait_ready(Duration::from_secs(5)).unwrap();
    assert!(ag.bpffs_root.ends_with("bpffs/zt"));
    assert!(ag.bpffs_root.is_dir());
    let log = ag.log();
    assert!(
        log.contains("--node-name node1") && log.contains("--extra x"),
        "{log}"
    );
    // It runs in the node netns.
    let ns = std::fs::read_link(format!("/proc/{}/ns/net", ag.pid().unwrap())).unwrap();
    let node_ns = tb
        .exec_in(&Endpoint::node("node1"), &["readlink", "/proc/self/ns/net"])
        .unwrap();
    assert_eq!(
        ns.display().to_string(),
        String::from_utf8_lossy(&node_ns.stdout).trim()
    );
    if has_python {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match ag.metrics() {
                Ok(m) => {
                    assert_eq!(m, "zt_up 1\n");
                    break;
                }
                Err(e) if std::time::Instant::now() > deadline => panic!("{e:#}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    ag.kill();
    assert!(!ag.is_running());
    assert!(ag.wait_ready(Duration::from_millis(100)).is_err());
    ag.start().unwrap();
    ag.wait_ready(Duration::from_secs(5)).unwrap();
    ag.restart().unwrap();
    ag.wait_ready(Duration::from_secs(5)).unwrap();
    // A failing agent reports its log.
    let bad = tb.tmp_dir().join("bad-agent.sh");
    std::fs::write(&bad, "#!/bin/sh\necho boom >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&bad, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let b = tb.start_agent("node1", &bad, &lab(), &[]).unwrap();
    let e = b
        .wait_ready(Duration::from_secs(5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("boom"), "{e}");
    drop(tb);
    assert_eq!(leftovers(&run), Vec::<String>::new());
    assert!(!ag.is_running());
}

#[test]
fn sweep_removes_crashed_run() {
    let Some(o) = opts() else { return };
    let bin = o.serve_bin.clone().unwrap();
    let mut child = std::process::Command::new(&bin)
        .arg("up")
        .arg(lab())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut run = String::new();
    loop {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "up exited"
        );
        if let Some(r) = line.strip_prefix("run ") {
            run = r.trim().to_string();
        }
        if line.starts_with("up;") {
            break;
        }
    }
    assert!(!leftovers(&run).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    // (A concurrent test's `up` may sweep it first; either way it must be gone.)
    sweep_stale().unwrap();
    assert_eq!(leftovers(&run), Vec::<String>::new());
    assert!(!Path::new(testbed::RUN_ROOT).join(&run).exists());
}

#[test]
fn two_nodes_fabric() {
    let Some(o) = opts() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("labs/two-nodes");
    let tb = Testbed::up(&dir, o).unwrap();
    let run = tb.run_id().to_string();
    assert_eq!(tb.nodes().len(), 2);
    assert_eq!(
        tb.node_ip("node2", Family::V4),
        Some("10.255.0.2".parse().unwrap())
    );
    let mut specs = tb.all_pod_pairs(
        &[(Proto::Tcp, 80), (Proto::Udp, 53), (Proto::Icmp, 0)],
        &[Family::V4, Family::V6],
    );
    for fam in [Family::V4, Family::V6] {
        specs.push(ProbeSpec::new(
            Endpoint::node("node1"),
            Target::pod("other", "c", fam),
            Proto::Tcp,
            80,
        ));
        specs.push(ProbeSpec::new(
            Endpoint::pod("other", "c"),
            Target::node("node1", fam),
            Proto::Icmp,
            0,
        ));
    }
    let m = tb.probe_matrix(&specs, Duration::from_millis(1000));
    println!("{m}");
    assert!(m.all_ok(), "{:?}", m.failures());
    // A pod added later on node1 is reachable from node2's pods; removal withdraws routes.
    let e = Pod::new(
        "default",
        "e",
        "node1",
        &["10.200.1.5".parse().unwrap()],
        &[(Proto::Tcp, 80)],
    );
    tb.add_pod(e).unwrap();
    let c = Endpoint::pod("other", "c");
    let e4 = Target::pod("default", "e", Family::V4);
    assert!(tb
        .probe(&c, &e4, Proto::Tcp, 80, Duration::from_secs(1))
        .is_ok());
    tb.remove_pod("default", "e").unwrap();
    let out = tb
        .exec_in(
            &Endpoint::node("node2"),
            &["ip", "route", "show", "10.200.1.5"],
        )
        .unwrap();
    assert!(out.stdout.is_empty(), "{out:?}");
    drop(tb);
    assert_eq!(leftovers(&run), Vec::<String>::new());
}
