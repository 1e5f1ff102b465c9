//! `zt-testbed spray`: a pod's own traffic for the pod-start race test. Run inside a
//! pod's netns and cgroup (`Testbed::command_in`), it binds UDP `--listen` on `[::]`
//! (dual stack) and records the source of every datagram it receives, while a second
//! socket sends one datagram to every `--to` address each `--interval-us` for `--ms`.
//! It keeps receiving `--linger-ms` longer, then prints one line per source:
//! `RECV <ip> <count>`, and `SENT <ok> <failed>` (a send a cgroup program drops fails
//! with EPERM).
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

#[derive(Clone, Debug)]
pub struct SprayConfig {
    pub listen: u16,
    pub to: Vec<IpAddr>,
    pub ms: u64,
    pub interval_us: u64,
    pub linger_ms: u64,
}

pub fn spray(cfg: SprayConfig) -> Result<()> {
    let rx = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.listen))).with_context(|| format!("bind udp/{}", cfg.listen))?;
    rx.set_read_timeout(Some(Duration::from_millis(20)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen: BTreeMap<IpAddr, u64> = BTreeMap::new();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = rx.recv_from(&mut buf) {
                    *seen.entry(from.ip().to_canonical()).or_default() += 1;
                }
            }
            seen
        })
    };
    let tx = UdpSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))).context("bind sender")?;
    let targets: Vec<SocketAddr> = cfg
        .to
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(a) => SocketAddr::from((a.to_ipv6_mapped(), cfg.listen)),
            IpAddr::V6(a) => SocketAddr::from((*a, cfg.listen)),
        })
        .collect();
    let (mut ok, mut failed) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(cfg.ms) {
        for t in &targets {
            match tx.send_to(b"spray", t) {
                Ok(_) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        std::thread::sleep(Duration::from_micros(cfg.interval_us));
    }
    std::thread::sleep(Duration::from_millis(cfg.linger_ms));
    stop.store(true, Ordering::Relaxed);
    let seen = receiver.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))?;
    let mut out = std::io::stdout().lock();
    for (ip, n) in seen {
        writeln!(out, "RECV {ip} {n}")?;
    }
    writeln!(out, "SENT {ok} {failed}")?;
    out.flush()?;
    Ok(())
}

/// What one spray process reported.
#[derive(Clone, Debug, Default)]
pub struct SprayReport {
    pub received: BTreeMap<IpAddr, u64>,
    pub sent: u64,
    pub failed: u64,
}

impl SprayReport {
    pub fn parse(stdout: &str) -> Result<SprayReport> {
        let mut r = SprayReport::default();
        for l in stdout.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                ["RECV", ip, n] => {
                    r.received.insert(ip.parse().with_context(|| format!("bad line {l:?}"))?, n.parse()?);
                }
                ["SENT", ok, failed] => {
                    r.sent = ok.parse()?;
                    r.failed = failed.parse()?;
                }
                _ => anyhow::bail!("unexpected spray output line {l:?}"),
            }
        }
        Ok(r)
    }
}
