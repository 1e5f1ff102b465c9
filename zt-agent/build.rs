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
    let ebpf = aya_build::Package {
        name: "zt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zt-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)
}
