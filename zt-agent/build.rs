//! Builds the kernel programs (zt-ebpf) for bpfel-unknown-none with the nightly
//! toolchain and bpf-linker that `cargo xtask setup` installs; the object lands in
//! OUT_DIR/zt and is embedded by `loader.rs`.
//! `ZT_SKIP_EBPF=1` embeds an empty object instead (user-space unit tests only).
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=ZT_SKIP_EBPF");
    if std::env::var_os("ZT_SKIP_EBPF").is_some() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("zt"), [])?;
        return Ok(());
    }
    // aya-build builds under OUT_DIR, which is another directory for each profile and
    // feature set of zt-agent (`cargo build`, `cargo test`, `--release`): each would build
    // the object from scratch, `core` included (45 s on two cores). One directory beside
    // cargo's profile directories (OUT_DIR is <target>/<profile>/build/zt-agent-<hash>/out)
    // keeps one build, which its nested cargo reuses while zt-ebpf is unchanged. A lock
    // keeps two builds of zt-agent at once from copying over each other's object.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let ebpf = aya_build::Package {
        name: "zt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zt-ebpf"),
        ..Default::default()
    };
    let build_dir = out.parent().and_then(|p| p.parent()).filter(|b| b.file_name() == Some("build".as_ref()));
    let Some(shared) = build_dir.and_then(|b| b.parent()?.parent()).map(|target| target.join("zt-ebpf-build")) else {
        println!("cargo:warning=OUT_DIR {} is not <target>/<profile>/build/<pkg>/out: building the kernel object there", out.display());
        return aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly);
    };
    std::fs::create_dir_all(&shared)?;
    let lock = std::fs::File::create(shared.join(".lock"))?;
    lock.lock()?;
    // Nothing else runs in this process (a build script) to read the environment.
    std::env::set_var("OUT_DIR", &shared);
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)?;
    std::fs::copy(shared.join("zt"), out.join("zt"))?;
    Ok(())
}
