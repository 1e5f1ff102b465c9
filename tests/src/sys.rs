//! Low-level helpers: `ip` commands, running code inside a network namespace
//! (setns in a dedicated thread), sysctls, cgroups, mounts, processes.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Directory where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// Path of the named network namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Run `ip <args>`; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Run `ip -n <ns> <args>`.
pub fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    ip(&a)
}

/// Enter the network namespace at `path` in the *current thread*.
pub fn setns_net(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
    // SAFETY: plain syscall on a valid fd.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        bail!(
            "setns({}): {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Run `f` in a fresh thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("zt-netns".into())
        .spawn(move || -> Result<T> {
            setns_net(&path)?;
            Ok(f())
        })?
        .join()
        .map_err(|_| anyhow!("netns thread panicked"))?
}

/// Write a sysctl of the current thread's network namespace (`key` like "net.ipv4.ip_forward").
pub fn sysctl_here(key: &str, value: &str) -> Result<()> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&p, value).with_context(|| format!("sysctl {key}={value}"))
}

/// Write sysctls inside the netns at `path`.
pub fn sysctls_in(path: &Path, kv: &[(&str, &str)]) -> Result<()> {
    let kv: Vec<(String, String)> = kv
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_netns(path, move || -> Result<()> {
        for (k, v) in &kv {
            sysctl_here(k, v)?;
        }
        Ok(())
    })?
}

/// Mount point of the cgroup2 hierarchy (from /proc/self/mounts).
pub fn cgroup2_root() -> Result<PathBuf> {
    let m = std::fs::read_to_string("/proc/self/mounts")?;
    for line in m.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "cgroup2" {
            return Ok(PathBuf::from(unescape_mount(f[1])));
        }
    }
    bail!("no cgroup2 mount found in /proc/self/mounts")
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// All mount points (decoded) from /proc/self/mounts.
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(1)
                .map(|m| PathBuf::from(unescape_mount(m)))
        })
        .collect()
}

/// Mount a fresh bpffs instance at `dir` (created if needed).
pub fn mount_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .output()?;
    if !out.status.success() {
        bail!(
            "mount -t bpf bpf {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Unmount everything mounted at or below `dir` (deepest first, lazily if busy).
pub fn umount_below(dir: &Path) {
    let mut mps: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    mps.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mps {
        let c = std::ffi::CString::new(m.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid C string.
        unsafe {
            if libc::umount2(c.as_ptr(), 0) != 0 {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Write `pid` into `<cgroup>/cgroup.procs`.
pub fn cgroup_add(cgroup: &Path, pid: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?;
    f.write_all(pid.to_string().as_bytes())
        .with_context(|| format!("moving {pid} into {}", cgroup.display()))
}

/// PIDs in a cgroup and all its descendants.
pub fn cgroup_pids(cgroup: &Path) -> Vec<u32> {
    let mut out = vec![];
    if let Ok(s) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(cgroup) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(cgroup_pids(&e.path()));
            }
        }
    }
    out
}

/// SIGKILL every process in a cgroup subtree (uses cgroup.kill when available).
pub fn cgroup_kill_all(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    for pid in cgroup_pids(cgroup) {
        kill(pid, libc::SIGKILL);
    }
}

/// Remove a cgroup subtree bottom-up, retrying while processes are still exiting.
pub fn cgroup_remove_tree(cgroup: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match rmdir_tree(cgroup) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn rmdir_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            rmdir_tree(&e.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!("rmdir {}: {e}", dir.display())),
    }
}

/// Send a signal to a process (errors ignored).
pub fn kill(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Start time (clock ticks since boot) of a process, to tell a live owner from a reused pid.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    // fields after ")" start at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Names of all named network namespaces.
pub fn netns_list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Delete a named netns (ignores "does not exist").
pub fn netns_del(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Last `n` lines of a text file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
