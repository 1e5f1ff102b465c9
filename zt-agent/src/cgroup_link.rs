//! The cgroup programs at the root of the pods' cgroup hierarchy (kubelet's layout,
//! cgroup v2): attached once through pinned links `<bpffs>/<MAP_VERSION_DIR>/links/cgroup-<ino>-{egress,ingress}`
//! (`<ino>`: the cgroup directory's inode, so that another root gets its own links).
//! A restarted agent swaps its programs into the pinned links (BPF_LINK_UPDATE), so the
//! pods' traffic is never without a program. cgroup links always have multi-attach
//! semantics: other programs on that cgroup (the CNI's, systemd's) keep running.
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr},
    Ebpf,
};

use crate::loader::{PROGS_SOCK_ADDR, PROG_CGROUP_EGRESS, PROG_CGROUP_INGRESS};
use crate::pins::link_dir;

/// kubelet on cgroup v2 with the systemd cgroup driver.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/kubepods.slice";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const PIN_PREFIX: &str = "cgroup-";

/// Attaches (or swaps into the pinned links) the cgroup programs at `root`: the two skb
/// programs, and with `translate` the Service socket programs (`cgroup-<ino>-<prog>`);
/// then removes the links this agent pinned for another root or no longer wants.
pub fn ensure_attached(ebpf: &mut Ebpf, bpffs_root: &Path, root: &Path, translate: bool) -> Result<()> {
    let dir = open_cgroup2_dir(root)?;
    let ino = dir.metadata()?.ino();
    let mut keep = vec![];
    for (prog_name, attach_type, side) in
        [(PROG_CGROUP_EGRESS, CgroupSkbAttachType::Egress, "egress"), (PROG_CGROUP_INGRESS, CgroupSkbAttachType::Ingress, "ingress")]
    {
        let pin = link_dir(bpffs_root).join(format!("{PIN_PREFIX}{ino}-{side}"));
        crate::upgrade::adopt_link(bpffs_root, &format!("{PIN_PREFIX}{ino}-{side}"))?;
        let prog: &mut CgroupSkb = ebpf.program_mut(prog_name).with_context(|| format!("program {prog_name} missing"))?.try_into()?;
        if !swap_into_pin(&pin, prog.fd()?.as_fd()) {
            // A link (kernel >= 5.7) always coexists with other programs on the cgroup
            // (multi-attach semantics); BPF_LINK_CREATE takes no ALLOW_MULTI flag
            // (EINVAL), so the mode must be the flag-less one.
            let id = prog.attach(&dir, attach_type, CgroupAttachMode::Single).with_context(|| format!("attaching {prog_name} to cgroup {}", root.display()))?;
            pin_new(prog.take_link(id)?.try_into()?, &pin)?;
        }
        keep.push(pin);
    }
    if translate {
        for (prog_name, attach_type) in PROGS_SOCK_ADDR {
            let pin = link_dir(bpffs_root).join(format!("{PIN_PREFIX}{ino}-{prog_name}"));
            crate::upgrade::adopt_link(bpffs_root, &format!("{PIN_PREFIX}{ino}-{prog_name}"))?;
            let prog: &mut CgroupSockAddr = ebpf.program_mut(prog_name).with_context(|| format!("program {prog_name} missing"))?.try_into()?;
            if !swap_into_pin(&pin, prog.fd()?.as_fd()) {
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {prog_name} ({attach_type:?}) to cgroup {}", root.display()))?;
                pin_new(prog.take_link(id)?.try_into()?, &pin)?;
            }
            keep.push(pin);
        }
    }
    remove_other_pins(bpffs_root, &keep)?;
    log::info!("cgroup programs attached at {} (Service translation {})", root.display(), if translate { "on" } else { "off" });
    Ok(())
}

/// Swaps `prog` into the pinned link at `pin`; false if there is none to update.
fn swap_into_pin(pin: &Path, prog: BorrowedFd<'_>) -> bool {
    match obj_get(pin) {
        Ok(link) => match link_update(link.as_fd(), prog) {
            Ok(()) => true,
            Err(e) => {
                // A defunct link (its cgroup went away): attach anew, then replace the pin.
                log::warn!("cannot update the pinned link {}: {e}; attaching a new one", pin.display());
                false
            }
        },
        Err(_) => false,
    }
}

/// The new link runs before the old pin goes: never a moment without a program.
fn pin_new(link: FdLink, pin: &Path) -> Result<()> {
    let _ = std::fs::remove_file(pin);
    link.pin(pin).with_context(|| format!("pinning link {}", pin.display()))?;
    Ok(())
}

/// Whether the Service socket programs are attached (their pinned links exist).
pub fn translation_attached(bpffs_root: &Path) -> bool {
    let suffix = format!("-{}", PROGS_SOCK_ADDR[0].0);
    std::fs::read_dir(link_dir(bpffs_root)).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with(PIN_PREFIX) && e.file_name().to_string_lossy().ends_with(&suffix)))
    })
}

/// `--cgroup-root none`: no cgroup programs; links an earlier agent pinned go.
pub fn detach_all(bpffs_root: &Path) -> Result<()> {
    remove_other_pins(bpffs_root, &[])
}

fn remove_other_pins(bpffs_root: &Path, keep: &[PathBuf]) -> Result<()> {
    let dir = link_dir(bpffs_root);
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let is_cgroup = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(PIN_PREFIX));
        if is_cgroup && !keep.contains(&path) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            log::info!("removed cgroup link {}", path.display());
        }
    }
    Ok(())
}

/// Opens the cgroup root, checking that it exists and is cgroup v2 (clear errors).
pub fn open_cgroup2_dir(root: &Path) -> Result<File> {
    let md = std::fs::metadata(root).with_context(|| {
        format!(
            "cgroup root {} does not exist: it must be the cgroup v2 directory that holds the pods' cgroups \
             (kubelet with the systemd driver: {DEFAULT_CGROUP_ROOT}); set --cgroup-root, or --cgroup-root none to run without cgroup programs",
            root.display()
        )
    })?;
    if !md.is_dir() {
        bail!("cgroup root {} is not a directory", root.display());
    }
    let f = File::open(root).with_context(|| format!("opening cgroup root {}", root.display()))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", root.display()));
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        bail!("cgroup root {} is not on a cgroup v2 file system (zt needs the unified hierarchy)", root.display());
    }
    Ok(f)
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 4]) -> std::io::Result<i64> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens a pinned object (BPF_OBJ_GET: pathname u64, bpf_fd u32, file_flags u32).
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 4];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces a link's program atomically (BPF_LINK_UPDATE: link_fd u32, new_prog_fd u32,
/// flags u32, old_prog_fd u32).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [0u64; 4];
    attr[0] = (link.as_raw_fd() as u32 as u64) | ((prog.as_raw_fd() as u32 as u64) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}
