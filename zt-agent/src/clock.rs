//! The kernel's monotonic clocks, as the datapath reads them: user space compares its
//! own reading with the times the programs stamp into maps and events.

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns` (FQDN expiries, DNS queries,
/// proofs, the events' times).
pub fn monotonic_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock of `bpf_ktime_get_coarse_ns`, which stamps
/// conntrack entries (it can lag CLOCK_MONOTONIC by a tick).
pub fn monotonic_coarse_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC_COARSE)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
