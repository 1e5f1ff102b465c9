//! ztctl: the node-local CLI. Reads the pinned maps directly (works while the agent is
//! down); live drops come from the agent's admin socket.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use zt_agent::{
    ctl::{self, explain::explain, DropFilter},
    pins::PinnedMaps,
};

#[derive(Parser)]
#[command(name = "ztctl", version, about = "Inspect zt on this node: identities, endpoints, policy, connections, drops, Services")]
struct Cli {
    #[arg(long, global = true, default_value = "/sys/fs/bpf/zt")]
    bpffs_root: PathBuf,
    #[arg(long, global = true, default_value = "/var/run/zt")]
    state_dir: PathBuf,
    #[arg(long, global = true, default_value = "/var/run/zt/admin.sock")]
    admin_socket: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Numeric identities and the SPIFFE IDs and labels they stand for.
    Identities,
    /// Every IP the datapath knows, with its identity and pod.
    Endpoints,
    /// Policy entries per local identity, with SPIFFE IDs and the rule behind each.
    Policy {
        /// Only entries of this local identity (number or part of a SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
    },
    /// Tracked connections: state (tcp-syn/established/closing/closed, udp, icmp, other),
    /// age, idle time and the seconds left before the entry expires.
    Ct,
    /// Drop counters by reason; with --follow, live drops with both identities and the reason.
    Drops {
        #[arg(short, long)]
        follow: bool,
        /// Only events involving this identity (number or SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        /// Pod as name or namespace/name.
        #[arg(long)]
        pod: Option<String>,
        /// Reason name, e.g. policy-default-deny.
        #[arg(long)]
        reason: Option<String>,
        /// Also show allowed-flow events (when the agent sends them).
        #[arg(long)]
        all: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Verdict counters (all reasons).
    Counters,
    /// Why is a flow allowed or denied? SRC and DST: IP, namespace/pod or SPIFFE ID;
    /// PROTO/PORT: tcp/80, udp/53, sctp/9000, icmp/8.
    /// DST may be a Service port (`default/httpbin:8000`, PROTO alone or PROTO/PORT) or a
    /// frontend address: the translation, then the verdict per backend.
    Explain { src: String, dst: String, proto_port: String },
    /// Addresses learned from DNS answers for FQDN rules: identity, name, IP, time to
    /// expiry, rules. Works with the agent down (names learned meanwhile show `-`).
    Fqdn {
        #[command(subcommand)]
        what: Option<FqdnWhat>,
        /// Only this local identity (number or part of a SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        /// Only names matching this glob (`*.example.com`).
        #[arg(long)]
        name: Option<String>,
        /// Capture counters by outcome instead (why an answer learned nothing).
        #[arg(long)]
        stats: bool,
    },
    /// Objects that failed closed (a policy that did not compile, FQDN rules over an
    /// identity's slots, what a full map could not hold): the error, and the local
    /// identities and pods isolated with no allows because of it.
    Failures,
    /// The flow and risk map as JSON (what the agent's page draws): identities by
    /// namespace, observed edges (allowed and denied, counts by reason, first/last seen,
    /// rules), permitted edges (the compiled policy), risk, blast radius. Needs the agent.
    Graph {
        /// How far back: 300, 90s, 15m, 2h.
        #[arg(long, default_value = "15m")]
        window: String,
    },
    /// What the policy leaves open: namespaces without default-deny, pods no policy
    /// isolates, identities reachable from world, the largest blast radii, allow rules
    /// that allowed nothing in the window. Needs the agent.
    Posture {
        #[arg(long, default_value = "15m")]
        window: String,
    },
    /// Authentication: this node's SVIDs (ID, not-before, not-after, next refresh), peers
    /// (channel state, clock offset), proofs in the datapath (identity, node, expiry), and
    /// what is wrong in words (clock skew, expired SVIDs).
    Auth,
    /// Service frontends (ClusterIP, external, load-balancer and node addresses) with the
    /// backends each translates to, their identities and pods.
    Services {
        /// Only this Service: namespace/name, or a name in any namespace.
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Subcommand)]
enum FqdnWhat {
    /// The compiled FQDN rules per local identity: slot, rule, names and patterns.
    Names {
        /// Only this local identity (number or part of a SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ztctl: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let json = cli.output == Format::Json;
    let maps = || PinnedMaps::open(&cli.bpffs_root);
    let snap = || ctl::load_snapshot(&cli.state_dir);
    match cli.cmd {
        Cmd::Identities => {
            let rows = ctl::identities(&snap()?);
            ctl::print(json, &rows, |r| format!("{:<10} {:<60} {}", r.id, r.spiffe_id, fmt_labels(&r.labels)), &format!("{:<10} {:<60} LABELS", "ID", "SPIFFE ID"))
        }
        Cmd::Endpoints => {
            let rows = ctl::endpoints(&maps()?, &snap()?)?;
            ctl::print(
                json,
                &rows,
                |r| {
                    let enf = match (r.ingress_enforced, r.egress_enforced) {
                        (true, true) => "in+out",
                        (true, false) => "in",
                        (false, true) => "out",
                        _ => "-",
                    };
                    format!("{:<26} {:<8} {:<50} {:<28} {:<6} {:<7} {}", r.ip, r.identity, r.spiffe_id, r.pod.as_deref().unwrap_or("-"), if r.local { "local" } else { "remote" }, enf, r.ifindex)
                },
                &format!("{:<26} {:<8} {:<50} {:<28} {:<6} {:<7} IFINDEX", "IP", "ID", "SPIFFE ID", "POD", "SCOPE", "ENFORCE"),
            )
        }
        Cmd::Policy { identity } => {
            let rows = ctl::policy(&maps()?, &snap()?, identity.as_deref())?;
            ctl::print(
                json,
                &rows,
                |r| format!("{:<48} {:<7} {:<48} {:<6} {:<11} {:<5} {}", r.local, r.direction, r.peer, r.proto, r.ports, r.verdict, r.rule.as_deref().unwrap_or("-")),
                &format!("{:<48} {:<7} {:<48} {:<6} {:<11} {:<5} RULE", "LOCAL", "DIR", "PEER", "PROTO", "PORTS", "VERDICT"),
            )
        }
        Cmd::Ct => {
            let rows = ctl::ct(&maps()?, &snap()?)?;
            ctl::print(
                json,
                &rows,
                |r| {
                    format!(
                        "{:<7} {:<6} {:<44} {:<44} {:<15} {:<6} {:<6} {:<10} {:<5} {} <-> {}",
                        r.direction, r.proto, r.src, r.dst, r.state, r.age_s, r.idle_s, r.expires_in_s, r.epoch, r.local, r.peer
                    )
                },
                &format!(
                    "{:<7} {:<6} {:<44} {:<44} {:<15} {:<6} {:<6} {:<10} {:<5} IDENTITIES",
                    "DIR", "PROTO", "SRC", "DST", "STATE", "AGE", "IDLE", "EXPIRES-IN", "EPOCH"
                ),
            )
        }
        Cmd::Counters => {
            let rows = ctl::counters(&maps()?, false)?;
            ctl::print(json, &rows, |r| format!("{:<8} {:<6} {:<22} {}", r.direction, r.verdict, r.reason, r.packets), &format!("{:<8} {:<6} {:<22} PACKETS", "DIR", "VERDICT", "REASON"))
        }
        Cmd::Drops { follow, identity, namespace, pod, reason, all, count, timeout } => {
            if !follow {
                let rows = ctl::counters(&maps()?, true)?;
                return ctl::print(json, &rows, |r| format!("{:<8} {:<22} {}", r.direction, r.reason, r.packets), &format!("{:<8} {:<22} PACKETS", "DIR", "REASON"));
            }
            let filter = DropFilter { identity, namespace, pod, reason, all_verdicts: all };
            let timeout = timeout.map(Duration::from_secs_f64);
            ctl::follow(&cli.admin_socket, &filter, json, count, timeout, &mut std::io::stdout().lock())?;
            Ok(())
        }
        Cmd::Fqdn { what: Some(FqdnWhat::Names { identity }), identity: outer, .. } => {
            let rows = ctl::fqdn::names(&snap()?, identity.or(outer).as_deref());
            ctl::print(json, &rows, |r| format!("{:<50} {:<5} {:<56} {}", r.spiffe_id, r.slot, r.rule, r.names.join(", ")), &format!("{:<50} {:<5} {:<56} NAMES", "IDENTITY", "SLOT", "RULE"))
        }
        Cmd::Fqdn { what: None, identity, name, stats } => {
            let fq = zt_agent::fqdn::FqdnMaps::open(&cli.bpffs_root)?;
            if stats {
                let s = fq.stats()?;
                let rows: Vec<ctl::fqdn::StatRow> = zt_common::DnsStat::ALL.iter().map(|st| ctl::fqdn::StatRow { outcome: st.name().to_string(), answers: s[*st as usize] }).collect();
                return ctl::print(json, &rows, |r| format!("{:<22} {}", r.outcome, r.answers), &format!("{:<22} ANSWERS", "OUTCOME"));
            }
            let rows = ctl::fqdn::rows(&maps()?, &fq, &snap()?, &cli.state_dir, identity.as_deref(), name.as_deref())?;
            ctl::print(json, &rows, ctl::fqdn::table_row, &ctl::fqdn::table_header())
        }
        Cmd::Auth => {
            let (maps, snap) = (maps()?, snap()?);
            let st = ctl::auth::AuthState::load(&cli.state_dir).unwrap_or_else(|e| {
                eprintln!("ztctl: {e:#}: showing the datapath's proofs only");
                ctl::auth::AuthState::default()
            });
            let proofs = ctl::auth::proofs(&maps, &snap, &st)?;
            let problems = ctl::auth::diagnose(&st, std::time::SystemTime::now());
            if json {
                let v = serde_json::json!({"node": st.node, "source": st.source, "svids": st.svids, "peers": st.peers, "proofs": proofs, "problems": problems});
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            if let Some(src) = &st.source {
                let roots: Vec<String> = src.roots.iter().map(|(td, n)| format!("{td}: {n}")).collect();
                println!("SVID source {} ({}), roots {}", src.source, if src.up { "up" } else { "DOWN" }, if roots.is_empty() { "none".into() } else { roots.join(", ") });
                if !src.streams.is_empty() {
                    println!("{:<60} {:<6} {:>8}  LAST ERROR", "STREAM", "STATE", "FAILURES");
                    for s in &src.streams {
                        println!("{:<60} {:<6} {:>8}  {}", s.stream, if s.up { "up" } else { "down" }, s.failures, s.last_error.as_deref().unwrap_or("-"));
                    }
                }
                for e in &src.refresh_errors {
                    println!("refresh of {} failing ({} in a row): {}", e.spiffe_id, e.failures, e.error);
                }
                println!();
            }
            println!("{:<60} {:>12} {:>12} {:>12}", "SVID", "NOT BEFORE", "NOT AFTER", "REFRESH");
            for s in &st.svids {
                println!("{:<60} {:>12} {:>12} {:>12}", s.spiffe_id, s.not_before, s.not_after, s.next_refresh);
            }
            println!("\n{:<24} {:<12} {:>14} {:>12} {:>12} {:>12} {:>9}", "PEER", "CHANNEL", "CLOCK OFFSET", "SVID UNTIL", "PEER UNTIL", "RENEWS AT", "RENEWALS");
            for p in &st.peers {
                let off = p.clock_offset_s.map(|o| format!("{o:+.1}s")).unwrap_or("-".into());
                let c = p.channel.as_ref();
                let t = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
                let renewals: u64 = c.map_or(0, |c| c.renewals.values().sum());
                println!(
                    "{:<24} {:<12} {:>14} {:>12} {:>12} {:>12} {:>9}",
                    p.node,
                    p.state,
                    off,
                    t(c.and_then(|c| c.svid_not_after)),
                    t(c.map(|c| c.peer_svid_not_after)),
                    c.map_or("-".to_string(), |c| c.renews_at.map_or("by peer".to_string(), |v| v.to_string())),
                    renewals
                );
            }
            println!("\n{:<10} {:<60} {:<24} {:>10}", "IDENTITY", "SPIFFE ID", "PROVEN BY", "EXPIRES IN");
            for r in &proofs {
                let exp = if r.expires_in_s == i64::MAX { "never".to_string() } else { format!("{}s", r.expires_in_s) };
                println!("{:<10} {:<60} {:<24} {:>10}", r.identity, r.spiffe_id, r.node, exp);
            }
            if !problems.is_empty() {
                println!();
                for p in &problems {
                    println!("problem: {p}");
                }
            }
            Ok(())
        }
        Cmd::Failures => {
            let (maps, snap) = (maps()?, snap()?);
            let rows = ctl::failures::rows(&snap, |ip| ctl::services::identity_from_maps(&maps, ip));
            ctl::print(json, &rows, ctl::failures::table_row, &ctl::failures::table_header())
        }
        Cmd::Services { service } => {
            let (maps, snap) = (maps()?, snap()?);
            let rows = ctl::services::rows(&snap, |ip| ctl::services::identity_from_maps(&maps, ip), service.as_deref());
            ctl::print(json, &rows, ctl::services::table_row, &ctl::services::table_header())
        }
        Cmd::Graph { window } => {
            let v = ctl::graph::request(&cli.admin_socket, "graph", &window)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Posture { window } => {
            let v = ctl::graph::request(&cli.admin_socket, "posture", &window)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", ctl::posture::text(&v));
            }
            Ok(())
        }
        Cmd::Explain { src, dst, proto_port } => {
            let (m, sn) = (maps()?, snap()?);
            if let Some(se) = ctl::explain::explain_service(&m, &cli.bpffs_root, &sn, &src, &dst, &proto_port)? {
                if json {
                    println!("{}", serde_json::to_string_pretty(&se)?);
                    return Ok(());
                }
                let how = if se.translated { "translated at the socket to one of its backends" } else { "not translated by zt (--service-translation false): kube-proxy's DNAT picks a backend" };
                println!("{} -> Service {} via {}: {}, {}", se.src, se.service, se.frontend, how, se.verdict.to_uppercase());
                if se.backends.is_empty() {
                    println!("  no backend: the connect is refused (ECONNREFUSED)");
                }
                if let Some(c) = &se.untranslated {
                    println!("  untranslated (what reaches the packet hooks as the frontend):");
                    println!("    {}: {} ({}){}", c.hook, c.verdict, c.reason, c.rule.as_ref().map(|r| format!(" by {r}")).unwrap_or_default());
                }
                for e in &se.backends {
                    println!("  backend {} {}/{}: {}", e.dst, e.proto, e.port, e.verdict.to_uppercase());
                    for c in &e.checks {
                        println!("    {}: {} ({}){}", c.hook, c.verdict, c.reason, c.rule.as_ref().map(|r| format!(" by {r}")).unwrap_or_default());
                    }
                }
                return Ok(());
            }
            let e = explain(&m, &sn, &src, &dst, &proto_port)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&e)?);
                return Ok(());
            }
            println!("{} -> {} {}/{}: {}", e.src, e.dst, e.proto, e.port, e.verdict.to_uppercase());
            for c in &e.checks {
                println!("  {}: {} ({}){}", c.hook, c.verdict, c.reason, c.rule.as_ref().map(|r| format!(" by {r}")).unwrap_or_default());
                println!("    peer {}", c.peer);
                for t in &c.trace {
                    println!("    - {t}");
                }
            }
            if e.checks.is_empty() {
                println!("  neither side is a local endpoint of this node: nothing here judges this flow");
            }
            Ok(())
        }
    }
}

fn fmt_labels(l: &std::collections::BTreeMap<String, String>) -> String {
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}
