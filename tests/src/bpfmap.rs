//! Writes to a pinned BPF map behind the agent's back (the bpf(2) syscall, no library):
//! the tests fill a map to make the agent's next write fail midway, the way another
//! writer or a kernel that counts differently would. Lookups: the benches watch for the
//! agent's writes (and walk its keys).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context, Result};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr`, as zeroed bytes with the fields a command uses set at their offsets.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32_at(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// A pinned map opened by path.
pub struct PinnedMap {
    fd: OwnedFd,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl PinnedMap {
    pub fn open(path: &Path) -> Result<PinnedMap> {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let fd = bpf(BPF_OBJ_GET, Attr::new().u64_at(0, c.as_ptr() as u64)).with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, ...
        let mut info = [0u8; 64];
        let mut attr = Attr::new();
        attr.u32_at(0, fd.as_raw_fd() as u32).u32_at(4, info.len() as u32).u64_at(8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD")?;
        let word = |i: usize| u32::from_ne_bytes(info[i * 4..i * 4 + 4].try_into().unwrap());
        Ok(PinnedMap { fd, key_size: word(2), value_size: word(3), max_entries: word(4) })
    }

    /// Inserts a new entry; the error of the syscall if it fails (ENOSPC / E2BIG: full).
    pub fn insert(&self, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        assert_eq!((key.len(), value.len()), (self.key_size as usize, self.value_size as usize), "key/value size");
        let mut attr = Attr::new();
        attr.u32_at(0, self.fd.as_raw_fd() as u32).u64_at(8, key.as_ptr() as u64).u64_at(16, value.as_ptr() as u64).u64_at(24, BPF_NOEXIST);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
    }

    /// The value under `key`, None if there is none.
    pub fn lookup(&self, key: &[u8]) -> Option<Vec<u8>> {
        assert_eq!(key.len(), self.key_size as usize, "key size");
        let mut value = vec![0u8; self.value_size as usize];
        let mut attr = Attr::new();
        attr.u32_at(0, self.fd.as_raw_fd() as u32).u64_at(8, key.as_ptr() as u64).u64_at(16, value.as_mut_ptr() as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).ok().map(|_| value)
    }

    /// Every key of a hash map (BPF_MAP_GET_NEXT_KEY from none; a concurrent writer can
    /// make a walk restart or skip, as with any walk of a live hash map).
    pub fn keys(&self) -> Vec<Vec<u8>> {
        let mut out = vec![];
        let mut next = vec![0u8; self.key_size as usize];
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let mut attr = Attr::new();
            attr.u32_at(0, self.fd.as_raw_fd() as u32).u64_at(8, prev.as_ref().map_or(0, |k| k.as_ptr() as u64)).u64_at(16, next.as_mut_ptr() as u64);
            if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr).is_err() || out.len() > self.max_entries as usize {
                return out;
            }
            out.push(next.clone());
            prev = Some(next.clone());
        }
    }

    pub fn remove(&self, key: &[u8]) -> std::io::Result<()> {
        let mut attr = Attr::new();
        attr.u32_at(0, self.fd.as_raw_fd() as u32).u64_at(8, key.as_ptr() as u64);
        bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
    }

    /// The `n`th key `fill_lpm` writes.
    fn filler_key(&self, n: usize) -> Vec<u8> {
        let mut key = vec![0xeeu8; self.key_size as usize];
        key[..4].copy_from_slice(&(((self.key_size - 4) * 8) as u32).to_ne_bytes());
        key[4..8].copy_from_slice(&(n as u32).to_be_bytes());
        key
    }

    /// Removes the `n` entries `fill_lpm` wrote.
    pub fn unfill_lpm(&self, n: usize) -> Result<()> {
        for i in 0..n {
            self.remove(&self.filler_key(i)).with_context(|| format!("removing filler entry {i}"))?;
        }
        Ok(())
    }

    /// Fills an LPM trie with full-length entries no lookup can hit (key bytes 0xee plus
    /// a counter, value zero) until it refuses one; returns how many went in.
    pub fn fill_lpm(&self) -> Result<usize> {
        let value = vec![0u8; self.value_size as usize];
        for n in 0..=self.max_entries as usize {
            if let Err(e) = self.insert(&self.filler_key(n), &value) {
                if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::E2BIG)) {
                    return Ok(n);
                }
                bail!("filling the map: {e}");
            }
        }
        bail!("the map took more than its max_entries ({})", self.max_entries)
    }
}
