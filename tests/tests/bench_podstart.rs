//! A new pod enforced after its Pod object arrives (`cargo xtask bench`; alone:
//! `cargo test -p zt-tests --test bench_podstart -- --nocapture`): zt-agent on node1
//! watches the Kubernetes API stand-in; 100 times, a new Pod of node1 is written to the
//! stand-in's directory and loaded (`sync_now`), and the test polls the agent's pinned
//! endpoint map until the pod's address is there with a workload identity: from then on
//! the datapath judges the pod by policy (its cgroup programs until its interface is
//! hooked). Prints median and p99; asserts only that every pod got its entry.
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{bins, bpfmap::PinnedMap, ApiServer};

const PODS: u32 = 100;
/// zt_common::IDENTITY_FIRST_WORKLOAD.
const FIRST_WORKLOAD: u32 = 256;

fn pod_yaml(k: u32, ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: new{k}, namespace: default, uid: 00000000-0000-4000-9000-{k:012}, labels: {{app: new{k}}}}}\n\
         spec: {{nodeName: node1, containers: [{{name: main, image: testbed}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}\n"
    )
}

#[test]
fn bench_new_pod_enforced_after_its_pod_object() {
    let tb = testbed("basic");
    let dir = tb.tmp_dir().join("cluster");
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(lab("basic")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let api = ApiServer::start(&dir).unwrap();
    let agent = tb.start_agent_kube("node1", &bins::find("zt-agent").unwrap(), &api, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let layout =
        std::fs::read_dir(&agent.bpffs_root).unwrap().map(|e| e.unwrap().path()).find(|p| p.join("ZT_ENDPOINTS").exists()).expect("the agent's map directory");
    let endpoints = PinnedMap::open(&layout.join("ZT_ENDPOINTS")).unwrap();

    let mut lat = vec![];
    for k in 0..PODS {
        let ip = Ipv4Addr::new(10, 200, 9, 10 + k as u8);
        let key: Vec<u8> = ip.to_ipv6_mapped().octets().to_vec();
        let tmp = dir.join(format!(".new{k}.tmp"));
        std::fs::write(&tmp, pod_yaml(k, ip)).unwrap();
        // From just before the object reaches the stand-in (the rename makes it visible
        // to its poller too; sync_now loads it at once).
        let t = Instant::now();
        std::fs::rename(&tmp, dir.join(format!("new{k}.yaml"))).unwrap();
        api.sync_now().unwrap();
        let identity = loop {
            if let Some(v) = endpoints.lookup(&key) {
                let id = u32::from_ne_bytes(v[0..4].try_into().unwrap());
                if id >= FIRST_WORKLOAD {
                    break id;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(10), "pod new{k} ({ip}) has no workload entry after 10 s\n{}", tail(&agent.log(), 20));
            std::thread::sleep(Duration::from_micros(200));
        };
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(identity >= FIRST_WORKLOAD);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "\nnew pod enforced after its Pod object reached the API stand-in ({PODS} pods of node1, one at a time): median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
