//! Loads the kernel programs with their maps pinned under the versioned bpffs
//! directory (reusing maps a previous agent pinned), and attaches them to pod
//! interfaces through pinned TCX links. A restarted agent swaps its programs into the
//! existing links atomically (BPF_LINK_UPDATE): there is no moment without enforcement.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        CgroupSockAddrAttachType, LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use zt_common::*;

use crate::pins::{link_dir, map_dir};

/// The compiled kernel object (built by build.rs).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/zt"));

pub const PROG_FROM_POD: &str = "zt_from_pod";
pub const PROG_TO_POD: &str = "zt_to_pod";
pub const PROG_NOOP: &str = "zt_noop";
/// cgroup skb programs for the root of the pods' cgroup hierarchy (see cgroup_link.rs).
pub const PROG_CGROUP_EGRESS: &str = "zt_cgroup_egress";
pub const PROG_CGROUP_INGRESS: &str = "zt_cgroup_ingress";
/// cgroup sock_addr programs for the same root: Service translation (services/).
pub const PROGS_SOCK_ADDR: [(&str, CgroupSockAddrAttachType); 8] = [
    ("zt_connect4", CgroupSockAddrAttachType::Connect4),
    ("zt_connect6", CgroupSockAddrAttachType::Connect6),
    ("zt_sendmsg4", CgroupSockAddrAttachType::UDPSendMsg4),
    ("zt_sendmsg6", CgroupSockAddrAttachType::UDPSendMsg6),
    ("zt_recvmsg4", CgroupSockAddrAttachType::UDPRecvMsg4),
    ("zt_recvmsg6", CgroupSockAddrAttachType::UDPRecvMsg6),
    ("zt_getpeername4", CgroupSockAddrAttachType::GetPeerName4),
    ("zt_getpeername6", CgroupSockAddrAttachType::GetPeerName6),
];

#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub endpoints: u32,
    pub cidrs: u32,
    pub policy: u32,
    /// `ZT_CT` (LRU) and `ZT_CT_EST` (established TCP).
    pub ct: u32,
    pub ct_est: u32,
    pub frags: u32,
    pub fqdn_names: u32,
    pub fqdn_ports: u32,
    pub fqdn_learned: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            endpoints: DEFAULT_ENDPOINTS_MAX,
            cidrs: DEFAULT_CIDRS_MAX,
            policy: DEFAULT_POLICY_MAX,
            ct: DEFAULT_CT_MAX,
            ct_est: DEFAULT_CT_EST_MAX,
            frags: DEFAULT_FRAGS_MAX,
            fqdn_names: DEFAULT_FQDN_NAMES_MAX,
            fqdn_ports: DEFAULT_FQDN_PORTS_MAX,
            fqdn_learned: DEFAULT_FQDN_LEARNED_MAX,
        }
    }
}

/// The FQDN settings of ZT_FQDN_CONFIG that come from flags (the hash key does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FqdnSettings {
    pub min_ttl_s: u32,
    pub max_ttl_s: u32,
    pub grace_s: u32,
    pub events_per_sec: u32,
}

impl Default for FqdnSettings {
    fn default() -> Self {
        FqdnSettings { min_ttl_s: 30, max_ttl_s: 86400, grace_s: 60, events_per_sec: 1000 }
    }
}

/// Writes ZT_FQDN_CONFIG from the flags, keeping the hash key the pinned map holds:
/// the name entries and learned state were made with it. A new map (all zero) gets 16
/// random bytes. Returns what the map holds now.
pub fn ensure_fqdn_config(map: &mut crate::pins::FqdnConfigMap, s: &FqdnSettings) -> Result<FqdnConfig> {
    if s.min_ttl_s > s.max_ttl_s {
        bail!("--fqdn-min-ttl ({}) is above --fqdn-max-ttl ({})", s.min_ttl_s, s.max_ttl_s);
    }
    let before = map.get(&0, 0).context("reading ZT_FQDN_CONFIG")?;
    let mut cfg = before;
    if cfg.hash_key == [0, 0] {
        cfg.hash_key = random_key()?;
    }
    cfg.min_ttl_s = s.min_ttl_s;
    cfg.max_ttl_s = s.max_ttl_s;
    cfg.grace_s = s.grace_s;
    cfg.events_per_sec = s.events_per_sec;
    if cfg != before {
        map.set(0, cfg, 0).context("writing ZT_FQDN_CONFIG")?;
    }
    Ok(cfg)
}

fn random_key() -> Result<[u64; 2]> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).context("reading /dev/urandom")?;
    let k = [u64::from_le_bytes(b[..8].try_into()?), u64::from_le_bytes(b[8..].try_into()?)];
    // All zero means "no key yet": never keep it (a 2^-128 chance).
    Ok(if k == [0, 0] { [1, 0] } else { k })
}

pub struct Datapath {
    pub ebpf: Ebpf,
    bpffs_root: PathBuf,
    /// Interfaces this process has attached to, as (ifindex, name).
    attached: BTreeSet<(u32, String)>,
}

/// The programs an agent loads, largest first (the order [`load_programs`] hands them
/// out in); the object's others are for the benchmark.
pub fn agent_programs() -> Vec<&'static str> {
    let mut v = vec![PROG_TO_POD, PROG_FROM_POD, PROG_CGROUP_INGRESS, PROG_CGROUP_EGRESS, crate::uplink::PROG_FROM_UPLINK, PROG_NOOP];
    v.extend(PROGS_SOCK_ADDR.iter().map(|(name, _)| *name));
    v
}

/// Loads the object with maps pinned under `bpffs_root` (created or reused) and the
/// agent's programs verified.
pub fn load_object(bpffs_root: &Path, sizes: &MapSizes) -> Result<Ebpf> {
    let mut ebpf = open_object(bpffs_root, sizes)?;
    load_programs(&mut ebpf, &agent_programs())?;
    Ok(ebpf)
}

/// The object with its maps created or reused under `bpffs_root`; no program is
/// loaded yet (see [`load_programs`]).
pub fn open_object(bpffs_root: &Path, sizes: &MapSizes) -> Result<Ebpf> {
    if OBJECT.is_empty() {
        bail!("this binary was built with ZT_SKIP_EBPF: it carries no kernel programs");
    }
    let dir = map_dir(bpffs_root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {} (is bpffs mounted there?)", dir.display()))?;
    let mut loader = EbpfLoader::new();
    loader
        .default_map_pin_directory(&dir)
        .map_max_entries(MAP_ENDPOINTS, sizes.endpoints)
        .map_max_entries(MAP_CIDRS, sizes.cidrs)
        .map_max_entries(MAP_POLICY, sizes.policy)
        .map_max_entries(MAP_CT, sizes.ct)
        .map_max_entries(MAP_CT_EST, sizes.ct_est)
        .map_max_entries(MAP_FRAGS, sizes.frags)
        .map_max_entries(MAP_FQDN_NAMES, sizes.fqdn_names)
        .map_max_entries(MAP_FQDN_PORTS, sizes.fqdn_ports)
        .map_max_entries(MAP_FQDN_LEARNED, sizes.fqdn_learned);
    loader.load(OBJECT).context("loading the zt kernel object")
}

/// Verifies and loads the programs `names` not loaded yet, in that order, on as many
/// threads as there are CPUs: the verifier walks one program on one CPU and the largest
/// take it about a second, so an agent's start waits for about the sum over the CPUs
/// (at least the largest) rather than for the sum. One thread per CPU at most also
/// bounds the verifier's memory to that many programs at once. Every program is tried;
/// the error names each that failed, in the order of `names`.
pub fn load_programs(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    if let Some(missing) = names.iter().find(|n| ebpf.program(n).is_none()) {
        bail!("program {missing} missing from the object");
    }
    let rank = |n: &str| names.iter().position(|m| *m == n);
    let mut todo: Vec<(&str, &mut Program)> = ebpf.programs_mut().filter(|(n, p)| rank(n).is_some() && p.fd().is_err()).collect();
    todo.sort_by_key(|(n, _)| rank(n));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(todo.len());
    let queue = std::sync::Mutex::new(todo.into_iter());
    let work = || {
        let mut done = vec![];
        loop {
            // Its own statement, so that the lock is released before the load.
            let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((name, prog)) = next else { break };
            done.push((name, load_program(prog)));
        }
        done
    };
    let mut done = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).filter_map(|i| std::thread::Builder::new().name(format!("zt-verify-{i}")).spawn_scoped(s, work).ok()).collect();
        // No thread could be made (a pids limit): this one does the work.
        let mut done = if workers.is_empty() { work() } else { vec![] };
        for w in workers {
            match w.join() {
                Ok(d) => done.extend(d),
                Err(_) => done.push(("a verifier thread", Err(anyhow::anyhow!("panicked")))),
            }
        }
        done
    });
    done.sort_by_key(|(n, _)| rank(n));
    let failed: Vec<String> = done.into_iter().filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e:#}"))).collect();
    if !failed.is_empty() {
        bail!("{} of the kernel programs did not load: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn load_program(prog: &mut Program) -> Result<()> {
    let loaded = match prog {
        Program::SchedClassifier(p) => load_retrying(|| p.load()),
        Program::CgroupSkb(p) => load_retrying(|| p.load()),
        Program::CgroupSockAddr(p) => load_retrying(|| p.load()),
        other => bail!("its type {:?} is none zt loads", other.prog_type()),
    };
    loaded.context("the verifier rejected it")
}

/// The verifier gives up with EAGAIN when a signal arrives while it runs (it checks
/// `signal_pending` as it goes; our largest programs take it a few hundred thousand
/// steps). That says nothing about the program: try again, as libbpf does.
fn load_retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut attempts = 5;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. }) if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 => {
                attempts -= 1;
                log::debug!("BPF_PROG_LOAD interrupted (EAGAIN), retrying");
            }
            r => return r,
        }
    }
}

impl Datapath {
    pub fn load(bpffs_root: &Path, sizes: &MapSizes) -> Result<Self> {
        let ebpf = load_object(bpffs_root, sizes)?;
        std::fs::create_dir_all(link_dir(bpffs_root))?;
        // Before any program of this process is attached or swapped in.
        let mut maps = crate::pins::PinnedMaps::open(bpffs_root)?;
        let n = maps.local_owners.rebuild(&maps.endpoints).context("rebuilding the cgroup programs' owner slots")?;
        if n > 0 {
            log::info!("{MAP_LOCAL_OWNERS}: {n} slots rewritten from {MAP_ENDPOINTS}");
        }
        Ok(Datapath { ebpf, bpffs_root: bpffs_root.to_owned(), attached: BTreeSet::new() })
    }

    /// The ring buffer of drop events (one consumer: this agent).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(MAP_EVENTS).context("events map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    fn link_pin(&self, ifindex: u32, ifname: &str, prog: &str) -> PathBuf {
        let side = if prog == PROG_FROM_POD { "from" } else { "to" };
        link_dir(&self.bpffs_root).join(format!("{ifindex}-{ifname}-{side}"))
    }

    /// Makes sure both programs of this process run on the interface: new links are
    /// attached first in the TCX chain and pinned; pinned links of an earlier agent get
    /// this process's programs swapped in atomically.
    pub fn ensure_attached(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        if self.attached.contains(&(ifindex, ifname.to_owned())) {
            return Ok(());
        }
        for (prog_name, attach_type) in [(PROG_FROM_POD, TcAttachType::Ingress), (PROG_TO_POD, TcAttachType::Egress)] {
            let pin = self.link_pin(ifindex, ifname, prog_name);
            // An older layout's link on this interface: taken over in place (upgrade.rs).
            if let Some(name) = pin.file_name().and_then(|n| n.to_str()) {
                crate::upgrade::adopt_link(&self.bpffs_root, name)?;
            }
            let prog: &mut SchedClassifier = self.ebpf.program_mut(prog_name).context("program missing")?.try_into()?;
            let id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    let link: SchedClassifierLink = FdLink::from(old).try_into()?;
                    prog.attach_to_link(link).with_context(|| format!("replacing program in link {}", pin.display()))?
                }
                Err(_) => {
                    let id = prog
                        .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(LinkOrder::first()))
                        .with_context(|| format!("attaching {prog_name} to {ifname}"))?;
                    let link = prog.take_link(id)?;
                    let fd: FdLink = link.try_into()?;
                    fd.pin(&pin).with_context(|| format!("pinning link {}", pin.display()))?;
                    continue;
                }
            };
            // The pin keeps the replaced link alive; our handle can go.
            let link = prog.take_link(id)?;
            let _fd: FdLink = link.try_into()?;
        }
        self.attached.insert((ifindex, ifname.to_owned()));
        Ok(())
    }

    /// Interfaces that carry both zt hooks: attached by this process, or pinned by an
    /// earlier agent (whose links keep running until this process swaps its programs in).
    pub fn hooked_ifindexes(&self) -> BTreeSet<u32> {
        let mut set: BTreeSet<u32> = self.attached.iter().map(|(i, _)| *i).collect();
        // An older layout's links (upgrade.rs): this agent takes them over in place, so
        // the interface never goes without a hook.
        set.extend(crate::upgrade::older_tc_links(&self.bpffs_root).into_iter().map(|(i, _)| i));
        let Ok(dir) = std::fs::read_dir(link_dir(&self.bpffs_root)) else { return set };
        let names: BTreeSet<String> = dir.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        for name in &names {
            let Some(base) = name.strip_suffix("-from") else { continue };
            if names.contains(&format!("{base}-to")) {
                if let Some(idx) = base.split_once('-').and_then(|(i, _)| i.parse().ok()) {
                    set.insert(idx);
                }
            }
        }
        set
    }

    /// Attaches the cgroup programs at the root of the pods' cgroup hierarchy (with
    /// `translate`, the Service socket programs too), or with `None` removes any an
    /// earlier agent pinned.
    pub fn ensure_cgroup(&mut self, root: Option<&Path>, translate: bool) -> Result<()> {
        match root {
            Some(root) => crate::cgroup_link::ensure_attached(&mut self.ebpf, &self.bpffs_root, root, translate),
            None => crate::cgroup_link::detach_all(&self.bpffs_root),
        }
    }

    /// Unpins links of interfaces that are gone (the link goes with its last reference).
    /// An interface that still exists keeps its hook even when no known pod uses it any
    /// more: its traffic then fails closed as an unknown endpoint, never open.
    pub fn detach_gone(&mut self, keep: &BTreeSet<(u32, String)>) -> Result<()> {
        let dir = link_dir(&self.bpffs_root);
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((idx, rest)) = name.split_once('-') else { continue };
            let Some((ifname, _side)) = rest.rsplit_once('-') else { continue };
            let Ok(idx) = idx.parse::<u32>() else { continue };
            let exists = crate::net::ifindex(ifname).is_ok_and(|i| i == idx);
            if !keep.contains(&(idx, ifname.to_owned())) && !exists {
                std::fs::remove_file(entry.path())?;
                self.attached.remove(&(idx, ifname.to_owned()));
            }
        }
        Ok(())
    }
}
