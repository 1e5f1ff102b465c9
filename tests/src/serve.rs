//! The pod server (`zt-testbed serve`), one process per pod, inside the pod's netns
//! and cgroup:
//! - TCP ports: listener on `[::]` (dual stack); writes `"<ns>/<pod>\n"` and closes.
//! - TCP echo ports (container port named "echo*", or `--echo`): echoes each line back
//!   until the client closes (for long-lived flows, see [`crate::TcpFlow`]).
//! - UDP ports: on `[::]`, answers every datagram with `"<ns>/<pod>\n"`.
//! - SCTP: raw sockets (IPv4 + IPv6, protocol 132) answering an INIT to a served port
//!   with an INIT-ACK whose State Cookie is `"<ns>/<pod>\n"`, and an INIT to any other
//!   port with an ABORT (what the kernel would do); other packets are ignored.
//!
//! It prints "READY" on stdout once every socket is bound.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::probe::{recv_from, send_to, socket};
use crate::{sctp, sys};

/// What one server process serves.
#[derive(Clone, Debug, Default)]
pub struct ServeConfig {
    /// Enter this netns first.
    pub netns: Option<PathBuf>,
    /// Move into this cgroup first (before any socket is created).
    pub cgroup: Option<PathBuf>,
    /// The reply text (without newline), `"<ns>/<pod>"`.
    pub ident: String,
    pub tcp: Vec<u16>,
    pub udp: Vec<u16>,
    pub sctp: Vec<u16>,
    /// TCP ports in line-echo mode.
    pub echo: Vec<u16>,
}

/// Run the server (never returns on success).
pub fn serve(cfg: ServeConfig) -> Result<()> {
    if let Some(cg) = &cfg.cgroup {
        sys::cgroup_add(cg, std::process::id())?;
    }
    if let Some(ns) = &cfg.netns {
        // Still single-threaded here, so this moves the whole process.
        sys::setns_net(ns)?;
    }
    let reply = format!("{}\n", cfg.ident).into_bytes();
    let any = |p: u16| SocketAddr::from((Ipv6Addr::UNSPECIFIED, p));
    let mut threads = vec![];

    for &p in &cfg.tcp {
        let l = TcpListener::bind(any(p)).with_context(|| format!("bind tcp/{p}"))?;
        let reply = reply.clone();
        threads.push(std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(&reply);
                let _ = c.shutdown(std::net::Shutdown::Write);
                // Drain until the client closes, so an unread request can't turn the
                // close into a RST that discards the reply.
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut sink = [0u8; 256];
                    while let Ok(n) = std::io::Read::read(&mut c, &mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        }));
    }
    for &p in &cfg.echo {
        let l = TcpListener::bind(any(p)).with_context(|| format!("bind tcp/{p} (echo)"))?;
        threads.push(std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = match c.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    for line in BufReader::new(c).lines() {
                        let Ok(line) = line else { break };
                        if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
        }));
    }
    for &p in &cfg.udp {
        let s = UdpSocket::bind(any(p)).with_context(|| format!("bind udp/{p}"))?;
        let reply = reply.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(&reply, from);
            }
        }));
    }
    for (domain, v4) in [(libc::AF_INET, true), (libc::AF_INET6, false)] {
        let fd = match socket(domain, libc::SOCK_RAW, sctp::IPPROTO_SCTP) {
            Ok(fd) => fd,
            Err(e) if cfg.sctp.is_empty() => {
                eprintln!("serve: no raw SCTP socket ({e}); SCTP not served");
                continue;
            }
            Err(e) => return Err(e).context("raw SCTP socket"),
        };
        let ports = cfg.sctp.clone();
        let cookie = reply.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let (n, from) = match recv_from(&fd, &mut buf, None) {
                    Ok((n, Some(from))) => (n, from),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("serve: sctp recv: {e}");
                        return;
                    }
                };
                let data = if v4 {
                    sctp::strip_ipv4(&buf[..n]).unwrap_or(&[])
                } else {
                    &buf[..n]
                };
                let Some(p) = sctp::parse(data) else { continue };
                if p.chunk != sctp::CHUNK_INIT || !p.checksum_ok || p.vtag != 0 {
                    continue;
                }
                let Some(peer_tag) = p.init_tag else { continue };
                let answer = if ports.contains(&p.dst_port) {
                    sctp::init_ack(
                        p.dst_port,
                        p.src_port,
                        peer_tag,
                        crate::probe::rand32() | 1,
                        &cookie,
                    )
                } else {
                    sctp::abort(p.dst_port, p.src_port, peer_tag)
                };
                if let Err(e) = send_to(&fd, &answer, from) {
                    eprintln!("serve: sctp send to {from}: {e}");
                }
            }
        }));
    }
    println!("READY");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    // No sockets at all (no ports, no SCTP): stay alive as the pod's process.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
