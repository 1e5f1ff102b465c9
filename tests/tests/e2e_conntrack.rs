//! Conntrack under churn (issue 13), end to end with real sockets: pod c opens thousands
//! of short TCP connections while pod a, isolated both ways, holds an idle connection
//! to b on which the server speaks first after the churn. The agent runs with small
//! conntrack maps so that the churn overflows the LRU many times over.
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use zt_testbed::{sys, Family};


/// Conntrack map sizes given to the agent (`ZT_CT_MAX`, default 256 so that the churn
/// overflows them many times; 0: the agent's defaults, 262 144 each).
fn ct_max() -> usize {
    std::env::var("ZT_CT_MAX").map(|v| v.parse().expect("ZT_CT_MAX: a number")).unwrap_or(256)
}

/// The agent's default size of each conntrack map (zt_common::DEFAULT_CT_MAX).
const AGENT_CT_MAX: usize = 262_144;

/// Short connections of the churning pod (`ZT_CT_CHURN`, default 20 000; `cargo xtask
/// bench` runs 200 000 against the agent's default map sizes).
fn churn() -> usize {
    std::env::var("ZT_CT_CHURN").map(|v| v.parse().expect("ZT_CT_CHURN: a number")).unwrap_or(20_000)
}

#[test]
fn churn_of_one_pod_leaves_another_pods_idle_flow_alive() {
    let (ct_max, churn) = (ct_max(), churn());
    // The GC runs once at the start only: every churn entry missing later was evicted.
    let max = ct_max.to_string();
    let mut args = vec!["--ct-gc-interval", "3600"];
    if ct_max != 0 {
        args.extend(["--ct-max", &max, "--ct-established-max", &max]);
    }
    let bed = bed("basic", &[("10-isolate-a.yaml", ISOLATE_A)], &args);
    let b_ip = ip(&bed, "default", "b", Family::V4);
    // The server is the test's own socket in b's network namespace, so that it can speak
    // first whenever the test says.
    let b_ns = bed.netns_path(&pod("default", "b")).unwrap();
    let listener = sys::in_netns(&b_ns, move || TcpListener::bind((b_ip, 7100))).unwrap().expect("listen in b");
    let a_ns = bed.netns_path(&pod("default", "a")).unwrap();
    let server_addr = SocketAddr::new(b_ip, 7100);
    let client = sys::in_netns(&a_ns, move || TcpStream::connect_timeout(&server_addr, ALLOWED)).unwrap().expect("a -> b:7100 is allowed");
    let (mut server, client_addr) = listener.accept().unwrap();
    let mut client_r = BufReader::new(client.try_clone().unwrap());
    client.set_read_timeout(Some(ALLOWED)).unwrap();
    (&client).write_all(b"hello\n").unwrap();
    let mut line = String::new();
    BufReader::new(server.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    let a_flow = |ct: &serde_json::Value| -> Vec<(String, String)> {
        ct.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["src"] == client_addr.to_string() && r["dst"] == server_addr.to_string() && r["direction"] == "egress")
            .map(|r| (r["state"].as_str().unwrap().to_string(), r["map"].as_str().unwrap().to_string()))
            .collect()
    };
    let ct0 = bed.ztctl_json(&["ct"]);
    assert_eq!(
        a_flow(&ct0),
        [("tcp-established".to_string(), "ZT_CT_EST".to_string())],
        "a's flow at a's hook: {ct0:#}\n{}",
        bed.metrics().0.lines().filter(|l| l.starts_with("zt_ct") || l.contains("reply") || l.contains("established")).collect::<Vec<_>>().join("\n")
    );

    // c churns: short connections to b's HTTP port (b writes its name and closes).
    let c_ns = bed.netns_path(&pod("default", "c")).unwrap();
    let t = Instant::now();
    let (ok, failed) = sys::in_netns(&c_ns, move || {
        let (mut ok, mut failed) = (0usize, 0usize);
        for _ in 0..churn {
            match TcpStream::connect_timeout(&SocketAddr::new(b_ip, 80), ALLOWED) {
                Ok(mut s) => {
                    let _ = s.set_read_timeout(Some(ALLOWED));
                    let mut buf = String::new();
                    if s.read_to_string(&mut buf).is_ok() && buf.starts_with("default/b") {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    })
    .unwrap();
    let ct = bed.ztctl_json(&["ct"]);
    let in_lru = ct.as_array().unwrap().iter().filter(|r| r["map"] == "ZT_CT").count();
    let m = bed.metrics();
    let kernel = |e: &str| m.val("zt_ct_kernel_total", &[("event", e)]);
    // Each churn connection made two entries (c's egress hook, b's ingress hook).
    let evicted = (2 * ok).saturating_sub(in_lru);
    let capacity = if ct_max == 0 { AGENT_CT_MAX } else { ct_max };
    println!(
        "conntrack churn e2e: {ok} connections of c ({failed} failed) in {:.1?}; ZT_CT {in_lru} entries (capacity {capacity}); churn entries evicted: {evicted} of {}; kernel: promoted {}, demoted {}, established-full {}",
        t.elapsed(),
        2 * ok,
        kernel("promoted"),
        kernel("demoted"),
        kernel("established-full")
    );
    assert_eq!(failed, 0, "c is not isolated: every churn connection succeeds");
    // The churn must overflow the LRU, or the test proves nothing about eviction.
    assert!(2 * ok > capacity * 3 / 2, "{ok} connections cannot overflow a ZT_CT of {capacity}: raise ZT_CT_CHURN");
    assert!(evicted > capacity / 2, "the churn overflowed ZT_CT (evicted {evicted})");

    // After a silence the server speaks first: the segment enters isolated a as the reply
    // of its tracked flow.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(a_flow(&bed.ztctl_json(&["ct"])), [("tcp-established".to_string(), "ZT_CT_EST".to_string())], "a's flow survived the churn");
    let drops = bed.metrics().verdicts("ingress", "drop", "policy-default-deny");
    server.write_all(b"push\n").unwrap();
    let mut got = String::new();
    let r = client_r.read_line(&mut got);
    assert!(
        r.is_ok() && got == "push\n",
        "the server's push after the churn reached a: {r:?} {got:?}; ingress default-deny drops {} -> {}",
        drops,
        bed.metrics().verdicts("ingress", "drop", "policy-default-deny")
    );
    assert_eq!(bed.metrics().verdicts("ingress", "drop", "policy-default-deny"), drops);
}
