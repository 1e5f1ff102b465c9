//! `cargo xtask image`: the OCI image of zt-agent, ztctl and zt-cni, built without a
//! container engine by umoci (Debian's `umoci`, installed by setup).
//!
//! The image holds the three binaries in /usr/local/bin and the shared libraries they are
//! linked against (from `ldd`: glibc, libgcc_s, the dynamic loader), nothing else: no
//! shell, no iproute2 (the agent drives links, routes and BPF through syscalls and
//! rtnetlink), no base image to pull. The result is an OCI image layout directory;
//! `skopeo copy oci:<dir>:<tag> docker://<registry>/<name>:<tag>` pushes it.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The name deploy/daemonset.yaml references and README tells users to push to.
pub const IMAGE_NAME: &str = "ghcr.io/zt-dev/zt-agent";
/// Binaries in the image, all in /usr/local/bin.
pub const BINARIES: [&str; 3] = ["zt-agent", "ztctl", "zt-cni"];
const BIN_DIR: &str = "usr/local/bin";

pub struct ImageOptions {
    /// Directory holding the built binaries (target/release after the build).
    pub bin_dir: PathBuf,
    /// OCI image layout directory (replaced).
    pub out: PathBuf,
    pub tag: String,
}

pub fn build_image(o: &ImageOptions) -> Result<()> {
    if Command::new("umoci").arg("--version").output().is_err() {
        bail!("umoci not found: `cargo xtask setup` installs Debian's umoci");
    }
    let bins: Vec<PathBuf> = BINARIES.iter().map(|b| o.bin_dir.join(b)).collect();
    for b in &bins {
        if !b.is_file() {
            bail!("{} missing: build it first (`cargo build --release -p zt-agent -p zt-cni --bins`)", b.display());
        }
    }
    let parent = o.out.parent().context("--out has no parent directory")?;
    std::fs::create_dir_all(parent)?;
    let bundle = parent.join(format!(".{}-bundle-{}", o.out.file_name().unwrap().to_string_lossy(), std::process::id()));
    let result = assemble(o, &bins, &bundle);
    let _ = std::fs::remove_dir_all(&bundle);
    result
}

fn assemble(o: &ImageOptions, bins: &[PathBuf], bundle: &Path) -> Result<()> {
    let image = format!("{}:{}", o.out.display(), o.tag);
    if o.out.exists() {
        std::fs::remove_dir_all(&o.out).with_context(|| format!("removing the old layout {}", o.out.display()))?;
    }
    let _ = std::fs::remove_dir_all(bundle);
    // Not root: umoci maps ownership itself (--rootless).
    let rootless: &[&str] = if is_root() { &[] } else { &["--rootless"] };
    umoci(&["init", "--layout", &o.out.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    umoci(&[&["unpack"], rootless, &["--image", &image, &bundle.display().to_string()]].concat())?;
    let rootfs = bundle.join("rootfs");

    // Binaries (debug info stripped: it is most of a debug build's size).
    std::fs::create_dir_all(rootfs.join(BIN_DIR))?;
    let mut libs = std::collections::BTreeSet::new();
    for b in bins {
        let dest = rootfs.join(BIN_DIR).join(b.file_name().unwrap());
        std::fs::copy(b, &dest).with_context(|| format!("copying {}", b.display()))?;
        run(Command::new("strip").arg("--strip-debug").arg(&dest))?;
        libs.extend(shared_libraries(b)?);
    }
    // Their shared libraries at the paths the loader looks at (the link's target's bytes
    // under the link's name).
    for lib in &libs {
        let dest = rootfs.join(lib.strip_prefix("/").unwrap_or(lib));
        std::fs::create_dir_all(dest.parent().unwrap())?;
        std::fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
    }
    // Scratch space for anything that wants a temp dir.
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::set_permissions(rootfs.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;

    umoci(&[&["repack"], rootless, &["--image", &image, &bundle.display().to_string()]].concat())?;
    umoci(&[
        "config",
        "--image",
        &image,
        "--os",
        "linux",
        "--architecture",
        "amd64",
        "--config.entrypoint",
        "/usr/local/bin/zt-agent",
        "--config.env",
        "PATH=/usr/local/bin:/usr/bin:/bin",
        "--config.workingdir",
        "/",
        "--config.label",
        &format!("org.opencontainers.image.title={}", IMAGE_NAME.rsplit('/').next().unwrap()),
        "--config.label",
        &format!("org.opencontainers.image.version={}", o.tag),
        "--config.label",
        "org.opencontainers.image.description=zt-agent, ztctl and zt-cni",
    ])?;
    umoci(&["gc", "--layout", &o.out.display().to_string()])?;
    eprintln!(
        "xtask: image {image} ({} binaries, {} libraries); push it with\n  skopeo copy oci:{image} docker://{IMAGE_NAME}:{}",
        bins.len(),
        libs.len(),
        o.tag
    );
    Ok(())
}

/// The shared libraries `ldd` resolves for `bin` (none for a static binary).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable") {
            return Ok(vec![]);
        }
        bail!("ldd {}: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", bin.display()))
}

/// Paths from ldd's output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the loader's
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut v = vec![];
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = match l.split_once("=>") {
            Some((_, rhs)) => rhs.trim().split_whitespace().next().unwrap_or(""),
            None => l.split_whitespace().next().unwrap_or(""),
        };
        if l.contains("not found") {
            bail!("a library is missing: {l}");
        }
        if path.starts_with('/') {
            v.push(PathBuf::from(path));
        } else if !l.starts_with("linux-vdso") && !l.starts_with("linux-gate") {
            bail!("unexpected ldd line {l:?}");
        }
    }
    Ok(v)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn umoci(args: &[&str]) -> Result<()> {
    run(Command::new("umoci").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn ldd_lines() {
        let t = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let v = super::parse_ldd(t).unwrap();
        assert_eq!(v, vec![std::path::PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), "/lib64/ld-linux-x86-64.so.2".into()]);
        assert!(super::parse_ldd("\tlibfoo.so => not found\n").is_err());
    }
}
