//! End to end: FQDN egress rules learned from DNS answers in the kernel (lab
//! `labs/fqdn`: trusted resolvers `kube-system/dns` (dnsmasq) and `kube-system/dns2` (the
//! tests' Rust responder, and the source of scapy-crafted answers), clients
//! `default/client` and `default/other`, an untrusted resolver `default/fake`, and an
//! external host (identity world) owning 10.78.0.0/16 and fd78::/32).
mod common;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::rr::RecordType;
use zt_testbed::dns::{self, ExternalHost, Zone};
use zt_testbed::Family;

fn serve_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zt-testbed"))
}

fn connect_in(netns: &Path, ip: IpAddr, port: u16, timeout: Duration) -> bool {
    zt_testbed::sys::in_netns(netns, move || TcpStream::connect_timeout(&SocketAddr::new(ip, port), timeout).is_ok())
        .unwrap_or(false)
}

/// The test bed's DNS pieces without an agent: dnsmasq answers the lab zone (CNAME
/// chain, wildcard, 120 records over TCP after TC, AAAA), the external host owns its
/// prefixes, the Rust responder answers over UDP and TCP.
#[test]
fn testbed_dns_pieces() {
    let tb = testbed("fqdn");
    let ext = ExternalHost::add(&tb, "node1", serve_bin()).unwrap();
    let d = dns::Dnsmasq::start(&tb, &pod("kube-system", "dns"), &Zone::lab()).unwrap();
    let client = tb.pod("default", "client").unwrap().netns_path();
    let server = d.addrs[0];
    let t = Duration::from_secs(1);

    let a = dns::resolve_in(&client, server, "api.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips, vec![(dns::ext_v4(1, 1), 5)]);
    let a = dns::resolve_in(&client, d.addrs[1], "API.example.test", RecordType::AAAA, t).unwrap();
    assert_eq!(a.addrs(), vec![dns::ext_v6(1, 1)]);
    let a = dns::resolve_in(&client, server, "c1.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.cnames, vec!["c2.example.test.", "api.example.test."]);
    assert_eq!(a.addrs(), vec![dns::ext_v4(1, 1)]);
    let a = dns::resolve_in(&client, server, "x.y.wild.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.addrs(), vec![dns::ext_v4(2, 1)]);
    let a = dns::resolve_in(&client, server, "many.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips.len(), 120, "{a:?}");
    println!("many.example.test: {} bytes, via TCP: {}", a.size, a.via_tcp);
    let a = dns::resolve_in(&client, server, "r49.example.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips.len(), 50);
    let a = dns::resolve_in(&client, server, "nowhere.test", RecordType::A, t).unwrap();
    assert_ne!(a.rcode, 0, "a name outside the zone is refused");

    for ip in [dns::ext_v4(1, 1), dns::ext_v4(200, 7), dns::ext_v6(1, 1)] {
        assert!(connect_in(&client, ip, dns::EXT_TCP, ALLOWED), "client -> ext {ip}");
    }
    assert!(!connect_in(&client, dns::ext_v4(1, 1), 9, DENIED), "nothing listens on 9");

    let r = dns::Responder::start(
        &tb.pod("kube-system", "dns2").unwrap().netns_path(),
        &tb.pod("kube-system", "dns2").unwrap().pod.ips(),
        Arc::new(|q| Some(dns::answer(q, &[dns::ext_v4(9, 9)], 1))),
    )
    .unwrap();
    let dns2 = tb.pod_ip("kube-system", "dns2", Family::V4).unwrap();
    let a = dns::resolve_in(&client, dns2, "n1.race.test", RecordType::A, t).unwrap();
    assert_eq!(a.ips, vec![(dns::ext_v4(9, 9), 1)]);
    drop(r);

    // scapy: a crafted answer from dns2's address reaches a waiting client socket, also
    // one that needs IP fragments (150 records).
    for (kind, n) in [("valid", 1usize), ("valid", 150)] {
        let pq = dns::open_query(&client, dns2, "crafted.example.test", RecordType::A).unwrap();
        let ips: Vec<String> = (0..n).map(|i| dns::ext_v4(50 + (i / 250) as u8, (i % 250) as u8).to_string()).collect();
        let out = dns::scapy_send(
            &tb,
            &pod("kube-system", "dns2"),
            serde_json::json!([{"kind": kind, "id": pq.id, "qname": "crafted.example.test", "ips": ips,
                               "src": dns2.to_string(), "dst": tb.pod_ip("default", "client", Family::V4).unwrap().to_string(), "dport": pq.port}]),
        )
        .unwrap();
        let mut buf = vec![0u8; 65536];
        let got = pq.sock.recv(&mut buf).unwrap_or_else(|e| panic!("no crafted answer ({out}): {e}"));
        let m = hickory_proto::op::Message::from_vec(&buf[..got]).unwrap();
        assert_eq!(m.answers.len(), n, "{out}");
    }
    drop(ext);
}
