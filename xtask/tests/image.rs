//! `cargo xtask image` end to end: build the image from the debug binaries, unpack it
//! with umoci, and run the binaries from the unpacked root filesystem with chroot (root
//! only). Needs `cargo build -p zt-agent -p zt-cni --bins` first.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Removes the test's directory even when an assertion fails.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn files_under(dir: &Path, base: &Path, out: &mut Vec<(String, u64)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        if md.is_dir() {
            files_under(&e.path(), base, out);
        } else {
            out.push((e.path().strip_prefix(base).unwrap().display().to_string(), md.len()));
        }
    }
}

/// The blob a descriptor points at, as JSON.
fn blob(layout: &Path, desc: &serde_json::Value) -> serde_json::Value {
    let digest = desc["digest"].as_str().unwrap();
    let (alg, hex) = digest.split_once(':').unwrap();
    serde_json::from_slice(&std::fs::read(layout.join("blobs").join(alg).join(hex)).unwrap()).unwrap()
}

#[test]
fn image_builds_unpacks_and_runs_from_its_rootfs() {
    let id = ok(Command::new("id").arg("-u"));
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "0", "this test needs root (umoci unpack keeps ownership, chroot)");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join("target"));
    let bins = target.join("debug");
    for b in ["zt-agent", "ztctl", "zt-cni"] {
        assert!(bins.join(b).is_file(), "{} missing: run `cargo build -p zt-agent -p zt-cni --bins` first", bins.join(b).display());
    }
    let tmp = TempDir(std::env::temp_dir().join(format!("zt-image-test-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir_all(&tmp.0).unwrap();
    let layout = tmp.0.join("layout");
    let tag = "test";

    ok(Command::new(env!("CARGO_BIN_EXE_xtask")).arg("image").arg("--bin-dir").arg(&bins).arg("--out").arg(&layout).args(["--tag", tag]));

    // The layout: one manifest under the tag, one layer, the agent as entrypoint.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index:#}");
    assert_eq!(manifests[0]["annotations"]["org.opencontainers.image.ref.name"], tag, "{index:#}");
    let manifest = blob(&layout, &manifests[0]);
    let config = blob(&layout, &manifest["config"]);
    assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/usr/local/bin/zt-agent"]), "{config:#}");
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1, "{manifest:#}");

    // Unpacked by umoci (which checks every digest) as a runtime would.
    let bundle = tmp.0.join("bundle");
    ok(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{tag}", layout.display())).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let mut files = vec![];
    files_under(&rootfs, &rootfs, &mut files);
    files.sort();
    for (f, size) in &files {
        println!("image: /{f} {size} bytes");
    }
    // Nothing but the binaries and their libraries: no shell, no iproute2.
    for absent in ["bin/sh", "usr/bin/sh", "sbin/ip", "usr/sbin/ip", "usr/bin/env"] {
        assert!(!rootfs.join(absent).exists(), "/{absent} is in the image");
    }
    assert!(files.iter().all(|(f, _)| f.starts_with("usr/local/bin/") || f.contains("lib")), "unexpected files: {files:?}");

    // Run from the unpacked root filesystem, with an empty environment.
    let chroot_bin = ["/usr/sbin/chroot", "/usr/bin/chroot", "/sbin/chroot"].into_iter().find(|p| Path::new(p).exists()).expect("chroot (coreutils) not found");
    let chroot = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(chroot_bin);
        c.arg(&rootfs).args(args).env_clear().envs(env.iter().copied());
        ok(&mut c)
    };
    let v = chroot(&["/usr/local/bin/zt-agent", "--version"], &[]);
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), format!("zt-agent {}", env!("CARGO_PKG_VERSION")));
    let h = chroot(&["/usr/local/bin/ztctl", "--help"], &[]);
    assert!(String::from_utf8_lossy(&h.stdout).contains("Inspect zt on this node"), "{}", String::from_utf8_lossy(&h.stdout));
    let c = chroot(&["/usr/local/bin/zt-cni"], &[("CNI_COMMAND", "VERSION")]);
    assert!(String::from_utf8_lossy(&c.stdout).contains("supportedVersions"), "{}", String::from_utf8_lossy(&c.stdout));
}

/// deploy/ references the image under the name and tag README tells users to push.
#[test]
fn deploy_references_the_pushed_image_name() {
    let want = format!("image: ghcr.io/zt-dev/zt-agent:{}", env!("CARGO_PKG_VERSION"));
    let ds = std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
    let images: Vec<&str> = ds.lines().map(str::trim).filter(|l| l.starts_with("image:")).collect();
    assert!(!images.is_empty() && images.iter().all(|l| *l == want), "deploy/daemonset.yaml images {images:?}, want {want}");
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("docker://ghcr.io/zt-dev/zt-agent:"), "README does not say how to push the image");
}
