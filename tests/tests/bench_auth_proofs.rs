//! A new pod's identity proven at every peer node after its Pod object arrives (issue 10;
//! `cargo xtask bench`; alone: `cargo test -p zt-tests --test bench_auth_proofs --
//! --nocapture`). Lab `three-nodes`: three agents (node1..node3), each watching the
//! Kubernetes API stand-in from its node's netns, all on one shared builtin CA
//! (`--svid-ca-dir`, local mode), with their node channels up. 100 times, one at a time, a
//! new Pod with a ServiceAccount of its own (so a SPIFFE ID nobody has proven yet) is
//! written to the stand-in's directory and loaded (`sync_now`); pod k goes to node
//! (k mod 3) + 1. The test walks the three agents' pinned ZT_AUTH_PROOFS maps until the
//! pod's node holds its own proof (AUTH_NODE_SELF) and both other nodes hold one from that
//! node (key node = the node's number): the proof was sent over the channel, checked, and
//! written in the receiver's identity numbering (which needs the receiver to know the pod
//! from its own watch too). The pods get no network namespace: what is timed is the
//! agents' path from the Pod object to the map entries, not a CNI. Prints median, p99
//! and max of the time to the pod's own node's proof (the baseline, same run) and to the
//! proofs at every peer. Then 100 more pods at once (one load): the arrival time of each
//! proof (own node's, and each peer's) and the time until the last. Asserts only that
//! every pod got them, and at the end that every peer's `ztctl auth` names each pod's
//! SPIFFE ID with the node that proved it.
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{bins, bpfmap::PinnedMap, AgentHandle, ApiServer};

const PODS: u32 = 100;
const NODES: [&str; 3] = ["node1", "node2", "node3"];
/// zt_common::AUTH_NODE_SELF.
const AUTH_NODE_SELF: u32 = 1;
/// Channels: a peer's dial backoff is at most 10 s, plus three handshakes.
const CHANNELS_DEADLINE: Duration = Duration::from_secs(60);
const PROOF_DEADLINE: Duration = Duration::from_secs(30);

/// zt_common::auth_node_id (FNV-1a of the node name, clear of the reserved numbers).
fn auth_node_id(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    if h <= AUTH_NODE_SELF {
        h + 2
    } else {
        h
    }
}

fn pod_yaml(k: u32, node: &str, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{k}, namespace: default, uid: 00000000-0000-4000-a000-{k:012}, labels: {{app: p{k}}}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: sa{k}, containers: [{{name: main, image: testbed}}]}}\n\
         status: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

fn spiffe_id(k: u32) -> String {
    format!("spiffe://cluster.local/ns/default/sa/sa{k}")
}

/// Keys of `map` whose node is `node`.
fn count(map: &PinnedMap, node: u32) -> usize {
    map.keys().iter().filter(|k| u32::from_ne_bytes(k[0..4].try_into().unwrap()) == node).count()
}

fn logs(agents: &[AgentHandle]) -> String {
    agents.iter().map(|a| format!("{} agent log tail:\n{}\n", a.node, tail(&a.log(), 20))).collect()
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn bench_pod_proven_at_every_peer() {
    let ca = CaDir(std::env::temp_dir().join(format!("zt-bench-auth-ca-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&ca.0);
    let tb = testbed("three-nodes");
    let dir = tb.tmp_dir().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(lab("three-nodes").join("nodes.yaml"), dir.join("nodes.yaml")).unwrap();
    let api = ApiServer::start(&dir).unwrap();
    let bin = bins::find("zt-agent").unwrap();
    let ca_arg = ca.0.display().to_string();
    let agents: Vec<AgentHandle> = NODES.iter().map(|n| tb.start_agent_kube(n, &bin, &api, &["--svid-ca-dir", &ca_arg]).unwrap()).collect();
    for a in &agents {
        a.wait_ready(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{}: {e:#}\n{}", a.node, logs(&agents)));
    }
    let maps: Vec<PinnedMap> = agents
        .iter()
        .map(|a| {
            let layout = std::fs::read_dir(&a.bpffs_root)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.join("ZT_AUTH_PROOFS").exists())
                .expect("the agent's map directory");
            PinnedMap::open(&layout.join("ZT_AUTH_PROOFS")).unwrap()
        })
        .collect();
    // Every agent's channels to both peers up.
    let start = Instant::now();
    loop {
        let up = agents.iter().all(|a| {
            let st = auth_with(&bins::find("ztctl").unwrap(), a);
            st["peers"].as_array().is_some_and(|ps| ps.iter().filter(|p| p["state"] == "up").count() == 2)
        });
        if up {
            break;
        }
        assert!(start.elapsed() < CHANNELS_DEADLINE, "node channels not all up after {CHANNELS_DEADLINE:?}\n{}", logs(&agents));
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nthree agents, node channels up after {:.1} s", start.elapsed().as_secs_f64());

    let (mut own, mut first_peer, mut every_peer) = (vec![], vec![], vec![]);
    for k in 0..PODS {
        let origin = (k % 3) as usize;
        let want: Vec<u32> = (0..3).map(|i| if i == origin { AUTH_NODE_SELF } else { auth_node_id(NODES[origin]) }).collect();
        let before: Vec<usize> = (0..3).map(|i| count(&maps[i], want[i])).collect();
        let ip = Ipv4Addr::new(10, 210, origin as u8 + 1, 10 + k as u8);
        let tmp = dir.join(format!(".p{k}.tmp"));
        std::fs::write(&tmp, pod_yaml(k, NODES[origin], ip)).unwrap();
        // From just before the object reaches the stand-in (sync_now loads it at once and
        // sends the watch events to the three agents).
        let t = Instant::now();
        std::fs::rename(&tmp, dir.join(format!("p{k}.yaml"))).unwrap();
        api.sync_now().unwrap();
        let mut done: [Option<f64>; 3] = [None; 3];
        while done.iter().any(Option::is_none) {
            for i in 0..3 {
                if done[i].is_none() && count(&maps[i], want[i]) > before[i] {
                    done[i] = Some(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            assert!(t.elapsed() < PROOF_DEADLINE, "pod p{k} of {}: proofs after {PROOF_DEADLINE:?}: {done:?} (node1..3)\n{}", NODES[origin], logs(&agents));
            std::thread::sleep(Duration::from_millis(1));
        }
        let peers: Vec<f64> = (0..3).filter(|i| *i != origin).map(|i| done[i].unwrap()).collect();
        own.push(done[origin].unwrap());
        first_peer.push(peers[0].min(peers[1]));
        every_peer.push(peers[0].max(peers[1]));
    }
    let burst = burst(&agents, &maps, &api, &dir);
    // Every peer names every pod's SPIFFE ID with the node that proved it.
    for (i, a) in agents.iter().enumerate() {
        let st = auth_with(&bins::find("ztctl").unwrap(), a);
        let proofs = st["proofs"].as_array().unwrap();
        for k in (0..2 * PODS).filter(|k| (k % 3) as usize != i) {
            let (id, node) = (spiffe_id(k), NODES[(k % 3) as usize]);
            assert!(proofs.iter().any(|p| p["spiffe_id"] == id.as_str() && p["node"] == node), "{}: no proof of {id} by {node}", a.node);
        }
    }
    println!("pod's identity proven after its Pod object reached the API stand-in ({PODS} pods, one at a time, spread over 3 nodes, each with a ServiceAccount of its own):");
    println!("  {:<48} {:>10} {:>10} {:>10} {:>12}", "", "median ms", "p99 ms", "max ms", "median ratio");
    let m0 = pct(&own, 0.5);
    for (what, v) in [
        ("own node's proof (the agent's own pod: baseline)", &own),
        ("proof at the first peer", &first_peer),
        ("proofs at every peer (both other nodes)", &every_peer),
    ] {
        println!("  {:<48} {:>10.1} {:>10.1} {:>10.1} {:>12.2}", what, pct(v, 0.5), pct(v, 0.99), pct(v, 1.0), pct(v, 0.5) / m0);
    }
    let (own, peer, total) = burst;
    println!("the same with {PODS} more pods at once (one load of the stand-in; times of each proof's arrival, per node and pod):");
    println!("  {:<48} {:>10} {:>10} {:>10} {:>12}", "", "median ms", "p99 ms", "max ms", "median ratio");
    let m0 = pct(&own, 0.5);
    for (what, v) in [("own node's proofs (baseline)", &own), ("proofs at the peers (2 per pod)", &peer)] {
        println!("  {:<48} {:>10.1} {:>10.1} {:>10.1} {:>12.2}", what, pct(v, 0.5), pct(v, 0.99), pct(v, 1.0), pct(v, 0.5) / m0);
    }
    println!("  all {PODS} pods proven at every peer after {total:.1} ms");
    for a in &agents {
        a.stop();
    }
}

/// PODS more pods (p100.. of the same spread) written at once and loaded by one
/// `sync_now`. Returns the arrival times (ms from the load) of the pods' own-node proofs,
/// of their proofs at the peers (two per pod), and the time until the last.
fn burst(agents: &[AgentHandle], maps: &[PinnedMap], api: &ApiServer, dir: &std::path::Path) -> (Vec<f64>, Vec<f64>, f64) {
    // want[i][x]: what node i's map calls node x's proofs.
    let want = |i: usize, x: usize| if i == x { AUTH_NODE_SELF } else { auth_node_id(NODES[x]) };
    let before: Vec<Vec<usize>> = (0..3).map(|i| (0..3).map(|x| count(&maps[i], want(i, x))).collect()).collect();
    let mut expected = [0usize; 3];
    for k in PODS..2 * PODS {
        let origin = (k % 3) as usize;
        expected[origin] += 1;
        let ip = Ipv4Addr::new(10, 210, origin as u8 + 1, 10 + k as u8);
        let tmp = dir.join(format!(".p{k}.tmp"));
        std::fs::write(&tmp, pod_yaml(k, NODES[origin], ip)).unwrap();
        std::fs::rename(&tmp, dir.join(format!("p{k}.yaml"))).unwrap();
    }
    let t = Instant::now();
    api.sync_now().unwrap();
    let mut seen = [[0usize; 3]; 3];
    let (mut own, mut peer) = (vec![], vec![]);
    loop {
        let mut complete = true;
        for i in 0..3 {
            let keys = maps[i].keys();
            for x in 0..3 {
                let c = keys.iter().filter(|k| u32::from_ne_bytes(k[0..4].try_into().unwrap()) == want(i, x)).count() - before[i][x];
                let ms = t.elapsed().as_secs_f64() * 1e3;
                while seen[i][x] < c.min(expected[x]) {
                    seen[i][x] += 1;
                    if i == x {
                        own.push(ms)
                    } else {
                        peer.push(ms)
                    }
                }
                complete &= seen[i][x] == expected[x];
            }
        }
        if complete {
            return (own, peer, t.elapsed().as_secs_f64() * 1e3);
        }
        assert!(
            t.elapsed() < 2 * PROOF_DEADLINE,
            "burst: proofs seen after {:?}: {seen:?} of {expected:?} (node i, from node x)\n{}",
            2 * PROOF_DEADLINE,
            logs(agents)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
