//! No enforcement gap at pod start: pods are created and start sending and receiving in
//! the same instant as their Pod manifest appears, many times over, while existing pods
//! spray their addresses. Every delivery is recorded at the receiving process (inside
//! the receiving pod's cgroup); a policy that isolates the new pods exists from the
//! start, so any delivery of a denied pair is an enforcement gap. The cgroup programs at
//! the pods' cgroup root must make that zero; a control run without them
//! (`--cgroup-root none`) shows that the test does see the gap.
mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::spray::SprayReport;
use zt_testbed::{Endpoint, Family, Pod};

const PORT: u16 = 5000;
/// New pods per round.
const RACERS: usize = 4;

/// New pods (label role=racer) are isolated both ways from the start; the one allowed
/// pair each way: a -> racer and racer -> b, UDP 5000.
const ISOLATE_RACERS: &str = "apiVersion: zt.dev/v1alpha1
kind: ZeroTrustPolicy
metadata: {name: racers, namespace: default}
spec:
  subjects: [{podSelector: {matchLabels: {role: racer}}}]
  enforcementMode: always
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
    ports: [{protocol: UDP, port: 5000}]
  egress:
  - to: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{protocol: UDP, port: 5000}]
";

/// Rounds of the race (`ZT_RACE_ROUNDS`, default 10); each round's pods get fresh
/// addresses in 10.200.1.0/24.
fn rounds() -> usize {
    let n = std::env::var("ZT_RACE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    assert!((1..=254 / RACERS).contains(&n), "ZT_RACE_ROUNDS must be 1..={}", 254 / RACERS);
    n
}

#[derive(Default, Debug)]
struct Tally {
    denied: u64,
    allowed: u64,
    /// Racers that got nothing from a, or b got nothing from (per round).
    allowed_missing: Vec<String>,
    denied_pairs: BTreeMap<(String, String), u64>,
    sends_failed: u64,
}

fn spray_cmd(bed: &Bed, from: &Endpoint, to: &[IpAddr], ms: u64) -> Command {
    let bin = env!("CARGO_BIN_EXE_zt-testbed");
    let mut args = vec![bin.to_string(), "spray".into(), "--listen".into(), PORT.to_string(), "--ms".into(), ms.to_string()];
    args.extend_from_slice(&["--interval-us".into(), "1000".into(), "--linger-ms".into(), "300".into()]);
    for ip in to {
        args.push("--to".into());
        args.push(ip.to_string());
    }
    let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut c = bed.command_in(from, &argv).unwrap();
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

fn report(child: Child, who: &str) -> SprayReport {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "spray in {who} failed: {}", out.status);
    SprayReport::parse(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// One bed, `rounds` rounds of RACERS new pods each; returns the tally.
fn race(bed: &Bed, rounds: usize, tag: &str) -> Tally {
    let mut t = Tally::default();
    let ips = |p: &Pod| p.ips();
    let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (n, f) in [("a", Family::V4), ("a", Family::V6), ("b", Family::V4), ("b", Family::V6), ("c", Family::V4), ("c", Family::V6)] {
        owner.insert(ip(bed, "default", n, f), n.to_string());
    }
    for round in 0..rounds {
        let racers: Vec<Pod> = (0..RACERS)
            .map(|i| {
                let k = round * RACERS + i + 1;
                let v4: IpAddr = format!("10.200.1.{k}").parse().unwrap();
                let v6: IpAddr = format!("fd00:200::1:{k:x}").parse().unwrap();
                let mut p = Pod::new("default", &format!("r{tag}{round}x{i}"), "node1", &[v4, v6], &[]);
                p.labels.insert("role".into(), "racer".into());
                p
            })
            .collect();
        for p in &racers {
            for a in ips(p) {
                owner.insert(a, p.name.clone());
            }
        }
        let racer_ips: Vec<IpAddr> = racers.iter().flat_map(ips).collect();
        // Existing pods spray the new pods' addresses before those even exist.
        let mut old: Vec<(String, Child)> =
            ["a", "b", "c"].iter().map(|n| (n.to_string(), spray_cmd(bed, &pod("default", n), &racer_ips, 2300).spawn().unwrap())).collect();
        // The new pods' sandboxes (netns, veth, cgroup, an idle pod process), as a CNI
        // would make them; nothing of theirs sends or listens yet.
        for p in &racers {
            bed.add_pod(p.clone()).unwrap();
        }
        // Then, in the same instant for all of them: the manifest appears and the pod's
        // own process starts sending and receiving.
        let to_old: Vec<IpAddr> = ["a", "b", "c"].iter().flat_map(|n| [ip(bed, "default", n, Family::V4), ip(bed, "default", n, Family::V6)]).collect();
        let go = std::sync::Barrier::new(racers.len());
        let news: Vec<(String, Child)> = std::thread::scope(|s| {
            let hs: Vec<_> = racers
                .iter()
                .map(|p| {
                    let (racer_ips, to_old, go) = (&racer_ips, &to_old, &go);
                    s.spawn(move || {
                        let mut to = to_old.clone();
                        to.extend(racer_ips.iter().filter(|a| !p.ips().contains(a)));
                        let mut cmd = spray_cmd(bed, &pod("default", &p.name), &to, 1500);
                        go.wait();
                        bed.write(&format!("50-{}.yaml", p.name), &p.to_yaml());
                        let child = cmd.spawn().unwrap();
                        (p.name.clone(), child)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        old.extend(news);
        for (who, child) in old {
            let r = report(child, &who);
            t.sends_failed += r.failed;
            let racer_dst = who.starts_with('r');
            let mut from_allowed = 0;
            for (src, n) in &r.received {
                let src_name = owner.get(src).cloned().unwrap_or_else(|| format!("?{src}"));
                let racer_src = src_name.starts_with('r');
                // Every delivery involves a racer; the allowed ones: a -> racer, racer -> b.
                let allowed = (racer_dst && src_name == "a") || (racer_src && who == "b");
                if allowed {
                    t.allowed += n;
                    from_allowed += 1;
                } else {
                    t.denied += n;
                    *t.denied_pairs.entry((src_name, who.clone())).or_default() += n;
                }
            }
            if racer_dst && from_allowed == 0 {
                t.allowed_missing.push(format!("a -> {who}"));
            }
            if who == "b" {
                for p in &racers {
                    if !p.ips().iter().any(|a| r.received.contains_key(a)) {
                        t.allowed_missing.push(format!("{} -> b", p.name));
                    }
                }
            }
        }
        for p in &racers {
            bed.remove(&format!("50-{}.yaml", p.name));
            bed.remove_pod("default", &p.name).unwrap();
        }
        // Let the agent see the pods go before the next round (no stale interfaces).
        std::thread::sleep(Duration::from_millis(250));
    }
    t
}

fn print(label: &str, rounds: usize, t: &Tally, took: Duration) {
    println!(
        "{label}: {rounds} rounds x {RACERS} new pods in {:.1}s: {} denied deliveries, {} allowed deliveries, {} sends refused by the kernel",
        took.as_secs_f64(),
        t.denied,
        t.allowed,
        t.sends_failed
    );
    for ((s, d), n) in &t.denied_pairs {
        println!("  denied {s} -> {d}: {n}");
    }
}

#[test]
fn pod_start_race_has_no_denied_delivery() {
    let bed = bed("basic", &[("10-racers.yaml", ISOLATE_RACERS)], &[]);
    let n = rounds();
    let t0 = Instant::now();
    let t = race(&bed, n, "c");
    print("with cgroup programs", n, &t, t0.elapsed());
    let init = bed.metrics().verdicts("egress", "drop", "initialising") + bed.metrics().verdicts("ingress", "drop", "initialising");
    println!("  initialising drops (metric): {init}");
    assert_eq!(t.denied, 0, "denied pairs delivered: {:?}", t.denied_pairs);
    assert!(t.allowed_missing.is_empty(), "allowed pairs that never got through (dead network?): {:?}", t.allowed_missing);
    assert!(t.allowed > 0);
    assert!(init > 0.0, "the race never hit a pod the agent did not know yet");
    assert!(bed.agent.log().contains("cgroup programs attached"), "agent log:\n{}", tail(&bed.agent.log(), 20));
}

#[test]
fn pod_start_race_control_without_cgroup_programs_sees_the_gap() {
    let bed = bed("basic", &[("10-racers.yaml", ISOLATE_RACERS)], &["--cgroup-root", "none"]);
    let n = 3;
    let t0 = Instant::now();
    let t = race(&bed, n, "n");
    print("control, --cgroup-root none", n, &t, t0.elapsed());
    assert!(t.denied > 0, "without the cgroup programs the race must show denied deliveries (else the test cannot fail)");
    assert!(t.allowed > 0);
}

/// (program ids, link ids) attached to the cgroup `dir` for `attach_type`
/// (BPF_CGROUP_INET_INGRESS 0, EGRESS 1), by BPF_PROG_QUERY.
fn cgroup_progs(dir: &std::path::Path, attach_type: u32) -> (Vec<u32>, Vec<u32>) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dir).unwrap();
    let mut progs = [0u32; 16];
    let mut links = [0u32; 16];
    let mut attr = [0u64; 8];
    attr[0] = f.as_raw_fd() as u32 as u64 | ((attach_type as u64) << 32);
    attr[2] = progs.as_mut_ptr() as u64;
    attr[3] = progs.len() as u64; // prog_cnt (in: capacity, out: count)
    attr[5] = links.as_mut_ptr() as u64;
    const BPF_PROG_QUERY: libc::c_long = 16;
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_QUERY, attr.as_mut_ptr(), std::mem::size_of_val(&attr)) };
    assert!(r == 0, "BPF_PROG_QUERY on {}: {}", dir.display(), std::io::Error::last_os_error());
    let n = (attr[3] & 0xffff_ffff) as usize;
    (progs[..n].to_vec(), links[..n].to_vec())
}

/// The cgroup programs are one link per direction; a restarted agent swaps its programs
/// into the same links, and while no agent runs a new pod still fails closed.
#[test]
fn cgroup_links_survive_restart_and_enforce_while_agent_is_down() {
    let bed = bed("basic", &[("10-racers.yaml", ISOLATE_RACERS)], &[]);
    let root = bed.kubepods_dir("node1");
    let before: Vec<_> = [0, 1].iter().map(|t| cgroup_progs(&root, *t)).collect();
    for (progs, links) in &before {
        assert_eq!((progs.len(), links.len()), (1, 1), "one zt link per direction: {before:?}");
    }
    let pins: Vec<String> = std::fs::read_dir(layout_dir(&bed.agent).join("links"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cgroup-"))
        .collect();
    // The two skb programs and the eight Service socket programs (--service-translation).
    assert_eq!(pins.len(), 10, "pinned cgroup links: {pins:?}");
    assert!(pins.iter().any(|p| p.ends_with("-egress")) && pins.iter().any(|p| p.ends_with("-zt_connect4")), "{pins:?}");

    // Agent down: a pod starts, its manifest appears, it sends and listens.
    assert!(bed.agent.stop().unwrap().success());
    let p = {
        let mut p = Pod::new("default", "late", "node1", &["10.200.2.1".parse().unwrap(), "fd00:200::2:1".parse().unwrap()], &[]);
        p.labels.insert("role".into(), "racer".into());
        p
    };
    bed.add_pod(p.clone()).unwrap();
    bed.write("50-late.yaml", &p.to_yaml());
    let to: Vec<IpAddr> = ["a", "b", "c"].iter().flat_map(|n| [ip(&bed, "default", n, Family::V4), ip(&bed, "default", n, Family::V6)]).collect();
    let late = spray_cmd(&bed, &pod("default", "late"), &to, 600).spawn().unwrap();
    let a = spray_cmd(&bed, &pod("default", "a"), &p.ips(), 600).spawn().unwrap();
    let (late_r, a_r) = (report(late, "late"), report(a, "a"));
    println!("agent down: late sent {} (refused {}), received {:?}; a received {:?}", late_r.sent, late_r.failed, late_r.received, a_r.received);
    assert!(late_r.received.is_empty(), "nothing reaches a pod no agent knows: {:?}", late_r.received);
    assert!(a_r.received.is_empty(), "nothing leaves a pod no agent knows: {:?}", a_r.received);
    assert!(late_r.failed > 0, "its sends are refused at the cgroup");

    // Agent back: same links, new programs; the pod is known and its allowed pairs work.
    bed.agent.start().unwrap();
    bed.agent.wait_ready(Duration::from_secs(20)).unwrap();
    let after: Vec<_> = [0, 1].iter().map(|t| cgroup_progs(&root, *t)).collect();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.1, b.1, "the same link");
        assert_eq!(a.0.len(), 1);
        assert_ne!(a.0, b.0, "the restarted agent's program swapped in");
    }
    let late = spray_cmd(&bed, &pod("default", "late"), &to, 1500).spawn().unwrap();
    let b = spray_cmd(&bed, &pod("default", "b"), &[], 1500).spawn().unwrap();
    let (late_r, b_r) = (report(late, "late"), report(b, "b"));
    assert!(p.ips().iter().any(|ip| b_r.received.contains_key(ip)), "late -> b is allowed: b got {:?}", b_r.received);
    assert!(late_r.received.is_empty());
}

/// A wrong `--cgroup-root` stops the agent at start with an error naming the problem.
#[test]
fn bad_cgroup_root_is_a_clear_error() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!("zt-cgroot-{}", std::process::id())));
    let tmp = &dir.0;
    std::fs::create_dir_all(tmp.join("manifests")).unwrap();
    let agent = zt_testbed::bins::find("zt-agent").unwrap();
    for (root, want) in [
        ("/nonexistent/kubepods.slice", "does not exist"),
        (tmp.to_str().unwrap(), "not on a cgroup v2 file system"),
    ] {
        let out = Command::new(&agent)
            .args(["--node-name", "n", "--manifests"])
            .arg(tmp.join("manifests"))
            .arg("--state-dir")
            .arg(tmp.join("state"))
            .args(["--cgroup-root", root])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "agent must refuse --cgroup-root {root}");
        assert!(err.contains(want) && err.contains(root), "--cgroup-root {root}: {err}");
    }
}
