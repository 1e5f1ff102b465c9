//! Sockets of a backend that leaves its Service (zt-agent `services/destroy.rs`): sleep
//! holds long-lived sockets (connected UDP to the `dns` Service, v4 and v6; a TCP echo
//! connection through it), then the Service's EndpointSlices move from httpbin to
//! notsleep. The sockets zt had translated to httpbin through `dns` are destroyed (the
//! next call fails) and a new connect reaches notsleep; the same backend reached through
//! another Service that keeps it (`stay`), or by its own address, is left alone.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use common::*;

/// Two selector-less Services on httpbin's UDP 53 and TCP echo 7000: `dns` (its slices
/// are rewritten by the test) and `stay` (keeps httpbin).
fn services(dns_v4: &str, dns_v6: &str) -> String {
    let svc = |name: &str, v4: &str, v6: &str| {
        format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {v4}
  clusterIPs: ['{v4}', '{v6}']
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: dns, port: 5353, targetPort: 53, protocol: UDP}}
  - {{name: echo, port: 7700, targetPort: 7000, protocol: TCP}}
---
"
        )
    };
    let slice = |name: &str, family: &str, addr: &str| {
        let service = name.split('-').next().unwrap();
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: {family}
ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: echo, port: 7000, protocol: TCP}}]
endpoints:
- addresses: ['{addr}']
  conditions: {{ready: true}}
---
"
        )
    };
    [
        svc("dns", "10.96.0.90", "fd00:96::90"),
        svc("stay", "10.96.0.91", "fd00:96::91"),
        slice("dns-v4", "IPv4", dns_v4),
        slice("dns-v6", "IPv6", dns_v6),
        slice("stay-v4", "IPv4", "10.201.0.10"),
        slice("stay-v6", "IPv6", "fd00:201::10"),
    ]
    .concat()
}

/// A python3 process inside sleep (its netns and cgroup, so its connects are translated)
/// holding named sockets, driven one line per command:
/// `udp|tcp NAME HOST PORT` (connect), `call NAME` (UDP: send, read the answer; TCP: send
/// a line, read the echo), `reconnect NAME HOST PORT` (UDP connect again). Each prints
/// one line: the answer, `ok <peer>`, or the errno's name.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const CLIENT: &str = r#"
import socket, sys, errno
socks = {}
def fam(host): return socket.AF_INET6 if ':' in host else socket.AF_INET
for line in sys.stdin:
    w = line.split()
    try:
        if w[0] in ('udp', 'tcp', 'reconnect'):
            if w[0] != 'reconnect':
                kind = socket.SOCK_DGRAM if w[0] == 'udp' else socket.SOCK_STREAM
                socks[w[1]] = socket.socket(fam(w[2]), kind)
            s = socks[w[1]]
            s.settimeout(2)
            s.connect((w[2], int(w[3])))
            out = 'ok ' + s.getpeername()[0]
        elif w[0] == 'call':
            s = socks[w[1]]
            if s.type == socket.SOCK_DGRAM:
                s.send(b'q')
                out = s.recv(64).decode().strip()
            else:
                s.sendall(b'ping\n')
                out = s.recv(64).decode().strip() or 'closed'
    except socket.timeout:
        out = 'timeout'
    except OSError as e:
        out = errno.errorcode.get(e.errno, str(e.errno))
    print(out, flush=True)
"#;

impl Client {
    fn start(bed: &Bed, from: &zt_testbed::Endpoint) -> Client {
        let mut c = bed.command_in(from, &["/usr/bin/python3", "-u", "-c", CLIENT]).unwrap();
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = c.spawn().expect("python3 in sleep");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Client { child, stdin, stdout }
    }

    fn run(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the client in sleep exited at {cmd:?}");
        line.trim().to_string()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn destroyed(bed: &Bed, proto: &str) -> f64 {
    bed.metrics().val("zt_service_sockets_destroyed_total", &[("proto", proto)])
}

/// Opens every socket of the scenario through `dns`, `stay` and httpbin's own address,
/// checks each reaches httpbin, then moves `dns` to notsleep.
fn open_and_move(bed: &Bed, c: &mut Client) {
    bed.wait_until("the agent to hold both Services", || bed.metrics().val("zt_service_frontends", &[]) == 8.0);
    let open = [
        ("udp dns4 10.96.0.90 5353", "10.96.0.90"),
        ("udp dns6 fd00:96::90 5353", "fd00:96::90"),
        ("tcp echo 10.96.0.90 7700", "10.96.0.90"),
        ("udp stay4 10.96.0.91 5353", "10.96.0.91"),
        ("tcp stayecho 10.96.0.91 7700", "10.96.0.91"),
        ("udp direct4 10.201.0.10 53", "10.201.0.10"),
        ("tcp directecho 10.201.0.10 7000", "10.201.0.10"),
    ];
    for (cmd, peer) in open {
        assert_eq!(c.run(cmd), format!("ok {peer}"), "{cmd} (getpeername reports what was asked for)");
    }
    for name in ["dns4", "dns6", "stay4", "direct4"] {
        assert_eq!(c.run(&format!("call {name}")), "default/httpbin", "{name} before the move");
    }
    for name in ["echo", "stayecho", "directecho"] {
        assert_eq!(c.run(&format!("call {name}")), "ping", "{name} before the move");
    }
    assert_eq!((destroyed(bed, "udp"), destroyed(bed, "tcp")), (0.0, 0.0));
    bed.write("05-service.yaml", &services("10.201.0.30", "fd00:201::30"));
}

/// What stays: the backend through `stay` and by its own address, untouched.
fn untouched(c: &mut Client) {
    for name in ["stay4", "direct4"] {
        assert_eq!(c.run(&format!("call {name}")), "default/httpbin", "{name} after the move");
    }
    for name in ["stayecho", "directecho"] {
        assert_eq!(c.run(&format!("call {name}")), "ping", "{name} after the move");
    }
}

/// `--service-destroy-stale-sockets=all`: the connected UDP sockets and the TCP
/// connection translated to httpbin through `dns` are destroyed; reconnecting reaches
/// notsleep.
#[test]
fn sockets_on_a_removed_backend_are_destroyed() {
    let bed = bed("e2e-demo", &[("05-service.yaml", &services("10.201.0.10", "fd00:201::10"))], &["--service-destroy-stale-sockets=all"]);
    let mut c = Client::start(&bed, &pod("default", "sleep"));
    open_and_move(&bed, &mut c);
    bed.wait_until("the sockets on httpbin via dns to be destroyed", || destroyed(&bed, "udp") >= 2.0 && destroyed(&bed, "tcp") >= 1.0);
    // Exactly those three: not the ones through `stay`, not the direct ones.
    assert_eq!((destroyed(&bed, "udp"), destroyed(&bed, "tcp")), (2.0, 1.0));
    assert_eq!(bed.metrics().val("zt_service_socket_destroy_errors_total", &[]), 0.0);
    // Each one logged, with its backend and the frontend it came through.
    let log = bed.agent.log();
    for what in [
        "udp socket 10.201.0.20:",
        "-> 10.201.0.10:53 (translated from 10.96.0.90:5353",
        "-> [fd00:201::10]:53 (translated from [fd00:96::90]:5353",
        "destroyed tcp socket",
    ] {
        assert!(log.contains(what), "the agent's log names {what:?}:\n{log}");
    }
    // A destroyed UDP socket is disconnected: its next send fails (EDESTADDRREQ)
    // instead of going to httpbin; the socket's pending error (ECONNABORTED) is reported
    // by its next receive, once.
    for (name, frontend) in [("dns4", "10.96.0.90"), ("dns6", "fd00:96::90")] {
        assert_eq!(c.run(&format!("call {name}")), "EDESTADDRREQ", "{name} after its backend left");
        assert_eq!(c.run(&format!("reconnect {name} {frontend} 5353")), format!("ok {frontend}"));
        assert_eq!(c.run(&format!("call {name}")), "ECONNABORTED", "{name}: the pending error");
        assert_eq!(c.run(&format!("call {name}")), "default/notsleep", "{name} reconnected: translated afresh");
        // A new socket reaches the new backend at once.
        assert_eq!(c.run(&format!("udp {name}b {frontend} 5353")), format!("ok {frontend}"));
        assert_eq!(c.run(&format!("call {name}b")), "default/notsleep");
    }
    // The TCP connection was aborted (and httpbin sent a reset).
    assert_eq!(c.run("call echo"), "ECONNABORTED", "TCP via dns after its backend left");
    assert_eq!(c.run("tcp echo2 10.96.0.90 7700"), "ok 10.96.0.90");
    assert_eq!(c.run("call echo2"), "ping");
    untouched(&mut c);
}

/// The default (`udp`): the connected UDP sockets go, the TCP connection stays (a backend
/// that only terminates still serves it, and closes it itself).
#[test]
fn by_default_only_udp_sockets_are_destroyed() {
    let bed = bed("e2e-demo", &[("05-service.yaml", &services("10.201.0.10", "fd00:201::10"))], &[]);
    let mut c = Client::start(&bed, &pod("default", "sleep"));
    open_and_move(&bed, &mut c);
    bed.wait_until("the UDP sockets on httpbin via dns to be destroyed", || destroyed(&bed, "udp") >= 2.0);
    assert_eq!((destroyed(&bed, "udp"), destroyed(&bed, "tcp")), (2.0, 0.0));
    assert_eq!(c.run("call dns4"), "EDESTADDRREQ", "dns4 after its backend left");
    assert_eq!(c.run("call echo"), "ping", "the TCP connection to httpbin via dns stays");
    assert_eq!(c.run("udp dns4b 10.96.0.90 5353"), "ok 10.96.0.90");
    assert_eq!(c.run("call dns4b"), "default/notsleep");
    untouched(&mut c);
}
