//! `zt-testbed`: bring up a simulated node from manifests, probe it, sweep leftovers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use zt_testbed::*;

#[derive(Parser)]
#[command(
    name = "zt-testbed",
    about = "Network-namespace test bed for zt (a simulated Kubernetes node)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer probe requests on stdin (`<id> <proto> <ip> <port> <timeout_ms>`), run in
    /// a pod's netns and cgroup by `PodProbers`, so the probes are the pod's own traffic.
    Prober,
    /// TCP connects to --to one after another for --ms ms; prints `CONNS <n> <us> <failed>`.
    Connrate {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 1000)]
        ms: u64,
    },
    /// Bring a test bed up from a manifests dir and keep it until Ctrl-C / SIGTERM.
    Up {
        dir: PathBuf,
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Also start this zt-agent binary on every node.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Extra argument for the agent (repeatable).
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
        /// Keep the temp dir (logs) after teardown.
        #[arg(long)]
        keep: bool,
    },
    /// Probe a running bed (--run) or a temporary one (--dir). With FROM TO PROTO[/PORT]
    /// one probe, otherwise the matrix of all pod pairs.
    Probe {
        /// Run id of a bed started with `up`.
        #[arg(long, conflicts_with = "dir")]
        run: Option<String>,
        /// Bring up a temporary bed from this manifests dir.
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// Probe timeout in ms.
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
        /// Matrix checks like tcp/80, udp/53, sctp/9000, icmp (default: all declared ports + icmp).
        #[arg(long = "check")]
        checks: Vec<String>,
        /// Families for the matrix.
        #[arg(long, value_delimiter = ',', default_value = "v4,v6")]
        family: Vec<String>,
        /// Exit 1 unless every probe succeeds.
        #[arg(long)]
        expect_all_ok: bool,
        /// Source: ns/pod, pod (default ns) or node:NAME.
        from: Option<String>,
        /// Target: ns/pod[@v4|@v6], node:NAME[@fam] or an IP.
        to: Option<String>,
        /// tcp/80, udp/53, sctp/9000, icmp.
        proto: Option<String>,
    },
    /// Remove leftovers of crashed test beds.
    Sweep,
    /// Sends to and receives from peers, reporting every source (pod-start race test).
    #[command(hide = true)]
    Spray {
        #[arg(long)]
        listen: u16,
        #[arg(long)]
        to: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 1000)]
        ms: u64,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        #[arg(long, default_value_t = 300)]
        linger_ms: u64,
    },
    /// Pod server (used by the test bed).
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long, default_value = "")]
        ident: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        #[arg(long)]
        sctp: Vec<u16>,
        #[arg(long)]
        echo: Vec<u16>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn parse_check(s: &str) -> Result<(Proto, u16)> {
    let (p, port) = match s.split_once(['/', ':']) {
        Some((p, port)) => (
            p,
            port.parse().with_context(|| format!("bad port in {s:?}"))?,
        ),
        None => (s, 0),
    };
    let proto: Proto = p.parse()?;
    if proto != Proto::Icmp && port == 0 {
        bail!("{s:?}: port required (e.g. tcp/80)");
    }
    Ok((proto, port))
}

fn default_checks(topo: &Topology) -> Vec<(Proto, u16)> {
    let mut set = BTreeSet::new();
    for p in &topo.pods {
        for port in &p.pod.ports {
            set.insert((port.proto, port.port));
        }
    }
    let mut v: Vec<_> = set.into_iter().collect();
    v.push((Proto::Icmp, 0));
    v
}

fn print_topology(t: &Topology) {
    println!("run {}", t.run_id);
    for n in &t.nodes {
        println!(
            "  node {:<10} netns {:<20} {} {}",
            n.name, n.netns, n.ipv4, n.ipv6
        );
    }
    for p in &t.pods {
        let ips: Vec<String> = p.pod.ips().iter().map(|i| i.to_string()).collect();
        let ports: Vec<String> = p
            .pod
            .ports
            .iter()
            .map(|x| format!("{}/{}", x.proto, x.port))
            .collect();
        println!(
            "  pod  {:<20} node {:<8} netns {:<16} veth {:<15} {}  [{}]",
            p.pod.key(),
            p.pod.node,
            p.netns,
            p.host_veth,
            ips.join(" "),
            ports.join(" ")
        );
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve {
            netns,
            cgroup,
            ident,
            tcp,
            udp,
            sctp,
            echo,
        } => serve::serve(serve::ServeConfig {
            netns,
            cgroup,
            ident,
            tcp,
            udp,
            sctp,
            echo,
        }),
        Cmd::Spray { listen, to, ms, interval_us, linger_ms } => {
            zt_testbed::spray::spray(zt_testbed::spray::SprayConfig { listen, to, ms, interval_us, linger_ms })
        }
        Cmd::Prober => zt_testbed::podprobe::serve_probes(),
        Cmd::Connrate { to, ms } => zt_testbed::connrate::connrate(to, ms),
        Cmd::Sweep => {
            for r in sweep_stale()? {
                println!("removed {r}");
            }
            Ok(())
        }
        Cmd::Up {
            dir,
            cgroup_root,
            agent,
            agent_args,
            keep,
        } => {
            // SAFETY: the handler only stores to an atomic.
            unsafe {
                libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
                libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
            }
            let mut opts = TestbedOptions {
                keep_tmp: keep,
                ..Default::default()
            };
            opts.cgroup_root = cgroup_root;
            let tb = Testbed::up(&dir, opts)?;
            print_topology(&tb.topology());
            let mut agents = vec![];
            if let Some(bin) = agent {
                let args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
                for n in tb.nodes() {
                    let a = tb.start_agent(&n.name, &bin, &dir, &args)?;
                    println!(
                        "  agent on {} pid {:?} log {}",
                        n.name,
                        a.pid(),
                        a.log_path.display()
                    );
                    agents.push(a);
                }
            }
            println!("temp dir {}", tb.tmp_dir().display());
            println!(
                "up; probe with `zt-testbed probe --run {}`; Ctrl-C to tear down",
                tb.run_id()
            );
            while !STOP.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            println!("tearing down {}", tb.run_id());
            drop(tb);
            Ok(())
        }
        Cmd::Probe {
            run,
            dir,
            cgroup_root,
            timeout_ms,
            checks,
            family,
            expect_all_ok,
            from,
            to,
            proto,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            let mut bed = None;
            let topo = match (run, dir) {
                (Some(run), _) => Topology::load(
                    &PathBuf::from(testbed::RUN_ROOT)
                        .join(run)
                        .join("topology.json"),
                )?,
                (None, Some(dir)) => {
                    let opts = TestbedOptions {
                        cgroup_root,
                        ..Default::default()
                    };
                    let tb = Testbed::up(&dir, opts)?;
                    let t = tb.topology();
                    bed = Some(tb);
                    t
                }
                (None, None) => bail!("give --run RUN or --dir DIR"),
            };
            let ok = if let (Some(from), Some(to)) = (from, to) {
                let (proto, port) = parse_check(proto.as_deref().unwrap_or("tcp/80"))?;
                let from: Endpoint = from.parse()?;
                let to: Target = to.parse()?;
                let r = probe_in(
                    &sys::netns_path(&topo.netns_of(&from)?),
                    topo.ip_of(&to)?,
                    proto,
                    port,
                    timeout,
                );
                println!("{} -> {} {}/{}: {r}", from, to, proto, port);
                r.is_ok()
            } else {
                let checks: Vec<(Proto, u16)> = if checks.is_empty() {
                    default_checks(&topo)
                } else {
                    checks
                        .iter()
                        .map(|c| parse_check(c))
                        .collect::<Result<_>>()?
                };
                let fams: Vec<Family> = family.iter().map(|f| f.parse()).collect::<Result<_>>()?;
                let specs = pod_pairs(&topo, &checks, &fams);
                let t0 = std::time::Instant::now();
                let m = run_matrix(&topo, &specs, timeout);
                print!("{m}");
                println!(
                    "{} probes in {:?}, {} ok",
                    specs.len(),
                    t0.elapsed(),
                    m.successes().len()
                );
                for (s, r) in m.failures() {
                    println!("  {s}: {r}");
                }
                m.all_ok()
            };
            drop(bed);
            if expect_all_ok && !ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
