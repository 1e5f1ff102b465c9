//! `zt-testbed connrate --to IP:PORT --ms N`: TCP connections one after another for N ms
//! (connect, read the server's greeting to EOF, close), run inside a pod (netns and
//! cgroup) so that zt's socket programs see them; prints `CONNS <count> <elapsed_us>
//! <failed>`. The Service benchmark (tests/tests/bench_services.rs) runs it.
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

pub fn connrate(to: SocketAddr, ms: u64) -> Result<()> {
    let start = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut buf = [0u8; 128];
    while start.elapsed() < Duration::from_millis(ms) {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                ok += 1;
            }
            Err(_) => failed += 1,
        }
        if failed > 10 && ok == 0 {
            bail!("connrate: no connection to {to} succeeds");
        }
    }
    println!("CONNS {ok} {} {failed}", start.elapsed().as_micros());
    Ok(())
}

/// Parses `CONNS <count> <elapsed_us> <failed>`: connections per second, connections,
/// failures.
pub fn parse(out: &str) -> Result<(f64, u64, u64)> {
    let Some(l) = out.lines().find(|l| l.starts_with("CONNS ")) else { bail!("no CONNS line in {out:?}") };
    let f: Vec<u64> = l.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    if f.len() != 3 || f[1] == 0 {
        bail!("bad CONNS line {l:?}");
    }
    Ok((f[0] as f64 * 1e6 / f[1] as f64, f[0], f[2]))
}
