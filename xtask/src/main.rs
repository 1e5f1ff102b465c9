//! Project tasks. Every task first runs `setup`, which installs what zt needs on a
//! fresh machine and is idempotent and cached:
//! - Debian packages (iproute2, prometheus and promtool, umoci, ...) when missing;
//! - the nightly toolchain's rust-src (to build `core` for the BPF target);
//! - bpf-linker built against the nightly toolchain's own libLLVM (version derived from
//!   the toolchain, cached under ~/.cache/zt, rebuilt only when that LLVM changes).
//!
//! `cargo xtask fuzz` also installs cargo-fuzz (once) for the fuzz/ crate.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod image;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install toolchains and packages zt needs (idempotent).
    Setup,
    /// Build the agent (with its kernel programs), ztctl and the test bed.
    Build,
    /// Run every test: kernel programs through BPF_PROG_TEST_RUN, agent unit tests,
    /// end-to-end tests in network namespaces, and a bounded fuzzing pass (the fuzz
    /// targets' corpora replayed and mutated, the kernel DNS parser fuzzed).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a simulated node and replay the zero-trust lab.
    Demo,
    /// Datapath ns/verdict against an empty program, the datapath side by side with
    /// iptables-nft and nft sets on a veth (ZT_BENCH_SECS per measurement, ZT_BENCH_SCALES),
    /// agent map-apply throughput, and DNS latency with the FQDN answer capture on and off.
    Bench,
    /// Long fuzzing: the cargo-fuzz targets of fuzz/ (libFuzzer, nightly, AddressSanitizer)
    /// for `--seconds` each, then the kernel DNS parser through BPF_PROG_TEST_RUN.
    /// (`cargo xtask test` replays the corpora and fuzzes briefly without cargo-fuzz.)
    Fuzz {
        /// One target: a cargo-fuzz target (manifest, policy_compile, cni_input, dns_event)
        /// or `kernel_dns`. Default: all of them.
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
    },
    /// Build the OCI image (zt-agent, ztctl, zt-cni and their shared libraries) with umoci,
    /// no container engine: an OCI layout directory to push with skopeo.
    Image {
        /// Take the binaries from this directory instead of building them (release).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// OCI image layout directory to write (replaced). Default: target/image/zt-agent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Image tag. Default: the workspace version (deploy/ references it).
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
}

/// iproute2: the agent and test bed drive interfaces and routes; prometheus: promtool checks /metrics.
// dnsmasq-base: the FQDN tests' resolver; python3-scapy: their crafted DNS answers
// (run with /usr/bin/python3, Debian's interpreter).
// umoci: `cargo xtask image` builds the OCI image with it (no container engine);
// chromium: the map page's browser test; python3 and curl: the HTTP server and client
// of the L7 tests; iperf3, iptables: the side-by-side datapath bench
// (zt-agent/tests/bench_veth.rs) against iptables-nft and nft sets.
const APT_PACKAGES: &[&str] =
    &["iproute2", "prometheus", "mount", "dnsmasq-base", "python3-scapy", "nftables", "chromium", "umoci", "python3", "curl", "iperf3", "iptables"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    std::env::set_current_dir(&root)?;
    setup()?;
    match cli.cmd {
        Cmd::Setup => Ok(()),
        Cmd::Build => build(),
        Cmd::Test { args } => {
            // The binaries the suite runs and every test target in one build: a `cargo build`
            // of the binaries alone resolves features without the dev-dependencies, so the
            // test build after it compiled much of the tree a second time.
            run(Command::new("cargo").args(["build", "--workspace", "--bins", "--tests"]))?;
            validate_deploy()?;
            let mut cmd = Command::new("cargo");
            cmd.args(["test", "--workspace", "--no-fail-fast", "--"]);
            // The veth bench runs as a test here: one short round at the two ends of the rule
            // counts (`cargo xtask bench` measures).
            cmd.env("ZT_BENCH_ROUNDS", "1").env("ZT_BENCH_SECS", "1").env("ZT_BENCH_SCALES", "10,100000");
            cmd.args(&args);
            run_env(&mut cmd)
        }
        Cmd::Demo => {
            build()?;
            run_env(Command::new("cargo").args(["run", "-q", "-p", "zt-tests", "--bin", "zt-demo"]))
        }
        Cmd::Fuzz { target, seconds } => fuzz(target.as_deref(), seconds),
        Cmd::Image { bin_dir, out, tag } => {
            let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => {
                    run(Command::new("cargo").args(["build", "--release", "-p", "zt-agent", "-p", "zt-cni", "--bins"]))?;
                    target.join("release")
                }
            };
            image::build_image(&image::ImageOptions { bin_dir, out: out.unwrap_or_else(|| target.join("image/zt-agent")), tag })
        }
        Cmd::Bench => {
            run_env(Command::new("cargo").args(["test", "--release", "-p", "zt-agent", "--test", "bench", "--", "--nocapture"]))?;
            // authentication: required: the proof lookup on a new flow, established flows (issue 10).
            run_env(Command::new("cargo").args(["test", "--release", "-p", "zt-agent", "--test", "bench_auth", "--", "--nocapture"]))?;
            // On a real veth: no filter, zt, iptables-nft, nft sets (ZT_BENCH_SECS, ZT_BENCH_SCALES).
            run_env(Command::new("cargo").args(["test", "--release", "-p", "zt-agent", "--test", "bench_veth"]))?;
            // DNS latency with the FQDN capture on and off, in the netns test bed.
            build()?;
            run_env(Command::new("cargo").args(["test", "-p", "zt-tests", "--test", "bench_dns", "--", "--nocapture"]))?;
            // The agent's pipeline under churn: compile at 1k/10k pods, 10k identity changes, a new pod, RSS.
            run_env(Command::new("cargo").args(["test", "--release", "-p", "zt-agent", "--test", "bench_churn"]))?;
            // TCP conn/s to a Service: zt's translation, kube-proxy's DNAT, the pod IP.
            run_env(Command::new("cargo").args(["test", "-p", "zt-tests", "--test", "bench_services", "--", "--nocapture"]))?;
            // HTTP requests through the node's proxy against an L4-only port.
            run_env(Command::new("cargo").args(["test", "-p", "zt-tests", "--test", "bench_l7", "--", "--nocapture"]))?;
            // A new pod's endpoint entry after its Pod object reaches the API stand-in (100 pods).
            run_env(Command::new("cargo").args(["test", "-p", "zt-tests", "--test", "bench_podstart", "--", "--nocapture"]))?;
            // A new pod's identity proven at every peer (three agents, node channels, 100 + 100 pods).
            run_env(Command::new("cargo").args(["test", "-p", "zt-tests", "--test", "bench_auth_proofs", "--", "--nocapture"]))?;
            // Conntrack under churn: 200k short connections of one pod against the agent's
            // default map sizes while another pod's idle flow survives; prints the evictions.
            run_env(
                Command::new("cargo")
                    .args(["test", "-p", "zt-tests", "--test", "e2e_conntrack", "--", "--nocapture"])
                    .env("ZT_CT_CHURN", "200000")
                    .env("ZT_CT_MAX", "0"),
            )
        }
    }
}

/// The kernel DNS parser fuzz test (zt-agent/tests/kernel_dns_fuzz.rs) as a fuzz target.
const KERNEL_DNS: &str = "kernel_dns";

/// cargo-fuzz targets for `seconds` each (a corpus of their own under fuzz/work/, seeded
/// from fuzz/corpus/, which stays as committed; crashes land in fuzz/artifacts/<target>/),
/// then the kernel DNS fuzz test for as long. Every target runs; the task fails at the end
/// if one found something.
fn fuzz(only: Option<&str>, seconds: u64) -> Result<()> {
    cargo_fuzz()?;
    let listed = output(Command::new("cargo").args(["+nightly", "fuzz", "list"]))?;
    let mut targets: Vec<&str> = listed.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    targets.push(KERNEL_DNS);
    if let Some(t) = only {
        if !targets.contains(&t) {
            bail!("unknown fuzz target {t:?} (targets: {})", targets.join(", "));
        }
        targets.retain(|x| *x == t);
    }
    let mut failed = vec![];
    for t in targets {
        eprintln!("xtask: fuzzing {t} for {seconds} s");
        let r = if t == KERNEL_DNS {
            build().and_then(|_| {
                run_env(
                    Command::new("cargo")
                        .args(["test", "-p", "zt-agent", "--test", "kernel_dns_fuzz", "kernel_dns_parser_fuzz", "--", "--nocapture"])
                        .env("ZT_FUZZ_ITERS", u64::MAX.to_string())
                        .env("ZT_FUZZ_SECONDS", seconds.to_string()),
                )
            })
        } else {
            let work = Path::new("fuzz/work/corpus").join(t);
            std::fs::create_dir_all(&work)?;
            run(Command::new("cargo")
                .args(["+nightly", "fuzz", "run", t])
                .arg(&work)
                .arg(Path::new("fuzz/corpus").join(t))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .args(["-timeout=10", "-rss_limit_mb=4096", "-print_final_stats=1"])
                // zt-agent's build script would build the kernel object: none of these targets loads it.
                .env("ZT_SKIP_EBPF", "1"))
        };
        if let Err(e) = r {
            eprintln!("xtask: fuzz target {t}: {e:#}");
            failed.push(t);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets that failed: {} (crashing inputs are in fuzz/artifacts/<target>/; `cargo +nightly fuzz tmin <target> <file>` minimises one)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// cargo-fuzz, installed once (in ~/.cargo/bin).
fn cargo_fuzz() -> Result<()> {
    if Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// The Kubernetes manifests in deploy/ must be valid for the API (strict: no unknown fields).
fn validate_deploy() -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("deploy")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    run(Command::new("python3").args(["-m", "kubernetes_validate", "--strict", "--quiet"]).args(&files))
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn build() -> Result<()> {
    run(Command::new("cargo").args(["build", "-p", "zt-agent", "-p", "zt-cni", "-p", "zt-tests", "--bins"]))
}

/// Tests and the demo find the binaries through these.
fn run_env(cmd: &mut Command) -> Result<()> {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| project_root().join("target"));
    cmd.env("ZT_AGENT_BIN", target.join("debug/zt-agent"));
    cmd.env("ZTCTL_BIN", target.join("debug/ztctl"));
    cmd.env("ZT_CNI_BIN", target.join("debug/zt-cni"));
    run(cmd)
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn setup() -> Result<()> {
    if unsafe { libc_geteuid() } != 0 {
        bail!("zt's tests and demo need root (BPF, network namespaces, cgroups)");
    }
    apt_packages()?;
    python_tools()?;
    browser_test_tools()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !Command::new("dpkg").args(["-s", p]).output().map(|o| o.status.success()).unwrap_or(false))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

/// kubernetes-validate (PyPI) checks deploy/ against the Kubernetes OpenAPI schemas.
fn python_tools() -> Result<()> {
    if Command::new("python3").args(["-m", "kubernetes_validate", "--version"]).output().map(|o| o.status.success()).unwrap_or(false) {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate from PyPI");
    run(Command::new("python3").args(["-m", "pip", "install", "-q", "kubernetes-validate"]))
}

/// The map page's browser test (tests/tests/e2e_ui.rs): Node.js and npm (the machine's,
/// else Debian's), then playwright-core and cytoscape pinned by tests/ui/package-lock.json.
/// Never a downloaded browser: the test drives Debian's chromium (APT_PACKAGES).
fn browser_test_tools() -> Result<()> {
    let have = |c: &str| Command::new(c).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !have("node") || !have("npm") {
        eprintln!("xtask: installing Debian packages nodejs, npm");
        run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends", "nodejs", "npm"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let ui = Path::new("tests/ui");
    let installed = ui.join("node_modules/.package-lock.json");
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if fresh(&installed).is_some() && fresh(&installed) >= fresh(&ui.join("package-lock.json")) {
        return Ok(());
    }
    eprintln!("xtask: npm ci in tests/ui (playwright-core, cytoscape)");
    run(Command::new("npm").args(["ci", "--no-audit", "--no-fund"]).current_dir(ui).env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1"))
}

fn nightly_rust_src() -> Result<()> {
    if output(Command::new("rustup").args(["toolchain", "list"]))?.lines().all(|l| !l.starts_with("nightly")) {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode.
fn bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    // libLLVM.so.22.1-rust-1.97.0-nightly -> 22
    let major = llvm.trim_start_matches("libLLVM.so.").split(['.', '-']).next().unwrap_or_default().to_string();
    let cache = home().join(".cache/zt");
    let stamp = cache.join("bpf-linker.stamp");
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    let linker_ok = Command::new("bpf-linker").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if linker_ok && have.trim() == llvm {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker against {llvm} (LLVM {major})");
    let prefix = cache.join("llvm-prefix");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    std::fs::copy(lib.join(&llvm), plib.join(&llvm))?;
    let link = plib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    run(Command::new("cargo")
        .args(["install", "--force", "bpf-linker", "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, &llvm)?;
    Ok(())
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}
