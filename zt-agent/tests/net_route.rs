//! The rtnetlink route lookup (`zt_agent::net::route`) against `ip route get` in a
//! private network namespace with the routes a node has: a pod's host route through its
//! veth, a gateway route, the default route, a local address, no route. Prints the cost
//! of both ways (the agent used to fork `ip` per local pod on every change). Needs root.
mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Instant;

use common::in_private_netns;
use zt_agent::net::route_interface;

fn ip(args: &str) {
    let st = Command::new("ip").args(args.split_whitespace()).status().unwrap();
    assert!(st.success(), "ip {args}");
}

/// `ip -j route get` reduced as the agent reads a route: the device of a direct unicast
/// route, not `lo`.
fn by_ip_command(addr: IpAddr) -> Option<String> {
    let out = Command::new("ip").args(["-j", "route", "get", &addr.to_string()]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v[0];
    let kind = r["type"].as_str();
    if r["gateway"].is_string() || !(kind.is_none() || kind == Some("unicast")) {
        return None;
    }
    r["dev"].as_str().filter(|d| *d != "lo").map(str::to_string)
}

#[test]
fn the_route_lookup_agrees_with_ip_route_get() {
    in_private_netns(|_, _| {
        ip("link set lo up");
        ip("link set zta up");
        ip("link set ztb up");
        ip("addr add 10.99.0.1/24 dev zta");
        ip("addr add fd00:99::1/64 dev zta nodad");
        // A pod behind ztb: a host route, as CNIs write them.
        ip("route add 10.88.0.5/32 dev ztb");
        ip("-6 route add fd00:88::5/128 dev ztb");
        // A remote pod range through a gateway, and a default route.
        ip("route add 10.77.0.0/16 via 10.99.0.254");
        ip("route add default via 10.99.0.254");
        let cases: Vec<(&str, Option<&str>)> = vec![
            ("10.88.0.5", Some("ztb")),
            ("fd00:88::5", Some("ztb")),
            ("10.99.0.7", Some("zta")),
            ("fd00:99::7", Some("zta")),
            ("10.77.1.1", None),
            ("192.0.2.1", None),
            ("10.99.0.1", None),
            ("127.0.0.1", None),
            ("fd00:77::1", None),
        ];
        for (a, want) in &cases {
            let addr: IpAddr = a.parse().unwrap();
            let got = route_interface(addr).unwrap();
            assert_eq!(got.as_deref(), *want, "{a}");
            assert_eq!(got, by_ip_command(addr), "{a}: rtnetlink and ip route get disagree");
        }
        // Cost, both ways, same addresses, same run.
        let n = 200;
        let t = Instant::now();
        for i in 0..n {
            let _ = route_interface(cases[i % cases.len()].0.parse().unwrap()).unwrap();
        }
        let nl = t.elapsed().as_secs_f64() / n as f64;
        let t = Instant::now();
        for i in 0..n {
            let _ = by_ip_command(cases[i % cases.len()].0.parse().unwrap());
        }
        let fork = t.elapsed().as_secs_f64() / n as f64;
        println!("route lookup: rtnetlink {:.1} us, fork of ip route get {:.1} us (ratio {:.0}x)", nl * 1e6, fork * 1e6, fork / nl);
    });
}
