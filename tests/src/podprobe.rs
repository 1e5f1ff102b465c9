//! Probes made by a process inside the source pod's cgroup and netns, as the pod's own
//! application would make them. The test bed's ordinary probes run in test threads that
//! only join the pod's netns, so zt-agent's cgroup programs (Service translation at
//! `connect`/`sendmsg`, cgroup skb) never see them; a probe to a ClusterIP must come from
//! the pod's cgroup to be translated.
//!
//! `zt-testbed prober` (one per source pod, started with [`Testbed::command_in`]) reads
//! requests `<id> <proto> <ip> <port> <timeout_ms>` on stdin, runs each in its own thread
//! with [`probe_here`], and answers `<id> ok <text>` / `<id> refused` / `<id> timeout` /
//! `<id> error <text>` on stdout.
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::manifest::Proto;
use crate::probe::{probe_here, Matrix, ProbeResult, ProbeSpec};
use crate::topology::Endpoint;
use crate::Testbed;

fn parse_proto(s: &str) -> Result<Proto> {
    Ok(match s {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        "sctp" => Proto::Sctp,
        "icmp" => Proto::Icmp,
        _ => bail!("unknown protocol {s:?}"),
    })
}

fn encode(r: &ProbeResult) -> String {
    let clean = |s: &str| s.replace(['\n', '\r'], " ");
    match r {
        ProbeResult::Ok(t) => format!("ok {}", clean(t)),
        ProbeResult::Refused => "refused".into(),
        ProbeResult::Timeout => "timeout".into(),
        ProbeResult::Error(e) => format!("error {}", clean(e)),
    }
}

fn decode(s: &str) -> ProbeResult {
    let (kind, text) = s.split_once(' ').unwrap_or((s, ""));
    match kind {
        "ok" => ProbeResult::Ok(text.to_string()),
        "refused" => ProbeResult::Refused,
        "timeout" => ProbeResult::Timeout,
        _ => ProbeResult::Error(text.to_string()),
    }
}

/// The `zt-testbed prober` loop (until stdin closes).
pub fn serve_probes() -> Result<()> {
    let out = Arc::new(Mutex::new(std::io::stdout()));
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let [id, proto, ip, port, ms] = f[..] else { bail!("bad request {line:?} (want: id proto ip port timeout_ms)") };
        let (id, proto, ip, port, ms): (String, Proto, IpAddr, u16, u64) =
            (id.into(), parse_proto(proto)?, ip.parse().context("ip")?, port.parse().context("port")?, ms.parse().context("timeout_ms")?);
        let out = out.clone();
        std::thread::spawn(move || {
            let r = probe_here(ip, proto, port, Duration::from_millis(ms));
            let mut o = out.lock().unwrap();
            let _ = writeln!(o, "{id} {}", encode(&r));
            let _ = o.flush();
        });
    }
    // Let the last probes answer before the process ends.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

type Shared = Arc<Mutex<Prober>>;
/// A source pod's answers: (index into the batch, result).
type Answers = Result<Vec<(usize, ProbeResult)>>;

struct Prober {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One prober process per source pod, started on first use and restarted when the pod
/// was replaced (new netns) or the process died. Dropping it stops them.
pub struct PodProbers<'a> {
    tb: &'a Testbed,
    bin: PathBuf,
    /// (pod, its test-bed index) -> prober.
    procs: Mutex<HashMap<(Endpoint, u32), Shared>>,
}

impl<'a> PodProbers<'a> {
    /// `bin` is the `zt-testbed` binary.
    pub fn new(tb: &'a Testbed, bin: impl Into<PathBuf>) -> PodProbers<'a> {
        PodProbers { tb, bin: bin.into(), procs: Mutex::new(HashMap::new()) }
    }

    fn prober(&self, from: &Endpoint) -> Result<Shared> {
        let Endpoint::Pod { namespace, name } = from else { bail!("{from}: pod probers run in pods only") };
        let idx = self.tb.pod(namespace, name).ok_or_else(|| anyhow!("no pod {from}"))?.idx;
        let mut g = self.procs.lock().unwrap();
        g.retain(|(ep, i), _| ep != from || *i == idx);
        if let Some(p) = g.get(&(from.clone(), idx)) {
            return Ok(p.clone());
        }
        let bin = self.bin.to_string_lossy().into_owned();
        let mut c = self.tb.command_in(from, &[&bin, "prober"])?;
        let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting zt-testbed prober")?;
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        let p = Arc::new(Mutex::new(Prober { child, stdin, stdout }));
        g.insert((from.clone(), idx), p.clone());
        Ok(p)
    }

    fn forget(&self, from: &Endpoint) {
        self.procs.lock().unwrap().retain(|(ep, _), _| ep != from);
    }

    /// One source pod's probes: (index into the batch, result).
    fn batch(&self, from: &Endpoint, jobs: &[(usize, IpAddr, Proto, u16)], timeout: Duration) -> Answers {
        let p = self.prober(from)?;
        let mut p = p.lock().unwrap();
        let mut req = String::new();
        for (i, ip, proto, port) in jobs {
            req.push_str(&format!("{i} {proto} {ip} {port} {}\n", timeout.as_millis()));
        }
        p.stdin.write_all(req.as_bytes())?;
        p.stdin.flush()?;
        let mut out = vec![];
        for _ in jobs {
            let mut line = String::new();
            if p.stdout.read_line(&mut line)? == 0 {
                bail!("the prober in {from} exited");
            }
            let (i, r) = line.trim_end().split_once(' ').ok_or_else(|| anyhow!("bad prober answer {line:?}"))?;
            out.push((i.parse()?, decode(r)));
        }
        Ok(out)
    }

    /// Run the probes (every `from` a pod; targets resolved by the bed), each source
    /// pod's in parallel inside its prober.
    pub fn run(&self, specs: &[ProbeSpec], timeout: Duration) -> Matrix {
        let mut results: Vec<ProbeResult> = vec![ProbeResult::Error("not run".into()); specs.len()];
        let mut by_src: HashMap<Endpoint, Vec<(usize, IpAddr, Proto, u16)>> = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            match self.tb.resolve(&s.to) {
                Ok(ip) => by_src.entry(s.from.clone()).or_default().push((i, ip, s.proto, s.port)),
                Err(e) => results[i] = ProbeResult::Error(format!("{e:#}")),
            }
        }
        let done: Vec<(Endpoint, Answers)> = std::thread::scope(|sc| {
            let hs: Vec<_> = by_src
                .iter()
                .map(|(from, jobs)| {
                    sc.spawn(move || {
                        // A prober of a pod that was removed and re-added is gone: one retry.
                        let r = self.batch(from, jobs, timeout).or_else(|_| {
                            self.forget(from);
                            self.batch(from, jobs, timeout)
                        });
                        (from.clone(), r)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (from, r) in done {
            match r {
                Ok(v) => v.into_iter().for_each(|(i, res)| results[i] = res),
                Err(e) => {
                    self.forget(&from);
                    for (i, ..) in &by_src[&from] {
                        results[*i] = ProbeResult::Error(format!("prober in {from}: {e:#}"));
                    }
                }
            }
        }
        Matrix { results: specs.iter().cloned().zip(results).collect() }
    }
}
