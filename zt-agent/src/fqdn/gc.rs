//! Garbage collection of `ZT_FQDN_LEARNED`. The map is an LRU, so it never fills up;
//! GC only removes entries no flow can still need: past `expires + grace` no new flow is
//! allowed, and a tracked flow re-judged after an epoch bump needs its entry as long as
//! conntrack would keep the flow, so entries go after `expires + grace + ct_tcp_timeout`,
//! and never while conntrack still holds a live egress flow of that identity to that
//! address: a connection allowed by an FQDN rule lasts as long as the rule exists,
//! however long it outlives the answer (the kernel's re-judge needs only the entry).
//! The cache then forgets addresses the kernel no longer holds.
use std::sync::{Arc, Mutex};

use zt_common::*;

use super::{FqdnCache, FqdnMaps};
use crate::clock::monotonic_ns;
use crate::conntrack_gc::CtMaps;
use crate::metrics::Shared;

pub struct Gc {
    pub maps: FqdnMaps,
    pub ct_tcp_timeout_s: u32,
    /// The conntrack maps (None: an older datapath without them; then expiry alone).
    pub ct: Option<CtMaps>,
    pub cache: Arc<Mutex<FqdnCache>>,
    pub metrics: Shared,
}

/// Keys of entries past `expires + keep_s` at `now_ns`.
pub fn stale(entries: &[(FqdnLearnedKey, FqdnLearnedValue)], now_ns: u64, keep_s: u64) -> Vec<FqdnLearnedKey> {
    entries
        .iter()
        .filter(|(_, v)| now_ns > v.expires_ns.saturating_add(keep_s * 1_000_000_000))
        .map(|(k, _)| *k)
        .collect()
}

impl Gc {
    pub fn collect(&mut self) {
        let grace = self.maps.config().map(|c| c.grace_s).unwrap_or(0) as u64;
        let entries: Vec<(FqdnLearnedKey, FqdnLearnedValue)> = self.maps.learned.iter().filter_map(|r| r.ok()).collect();
        let now = monotonic_ns();
        let mut gone = stale(&entries, now, grace + self.ct_tcp_timeout_s as u64);
        let mut kept = 0u64;
        // Conntrack is walked only when something is due, not every period.
        if let (false, Some(ct)) = (gone.is_empty(), &self.ct) {
            match ct.live_egress_peers(now) {
                Ok(live) => {
                    let before = gone.len();
                    gone.retain(|k| !live.contains(&(k.local_id, k.addr)));
                    kept = (before - gone.len()) as u64;
                }
                // Unknown which entries flows still need: remove nothing this round.
                Err(e) => {
                    log::warn!("fqdn gc: reading conntrack: {e:#}; nothing removed");
                    return;
                }
            }
        }
        let mut removed = 0u64;
        for k in &gone {
            // Gone already (LRU eviction, a concurrent GC) is fine.
            if self.maps.learned.remove(k).is_ok() {
                removed += 1;
            }
        }
        let left: std::collections::BTreeSet<(u32, std::net::IpAddr)> = self.maps.learned_entries().into_iter().map(|(id, ip, _)| (id, ip)).collect();
        let names = {
            let mut c = self.cache.lock().unwrap();
            c.retain_learned(&left);
            c.len()
        };
        let mut m = self.metrics.lock().unwrap();
        m.fqdn_gc_removed += removed;
        m.fqdn_gc_kept_for_flows = kept;
        m.fqdn_learned_entries = entries.len().saturating_sub(removed as usize);
        m.fqdn_cache_names = names;
        if removed > 0 {
            log::info!("fqdn gc: removed {removed} learned entries past expiry + grace + ct timeout");
        }
    }

    pub fn persist(&self) {
        if let Err(e) = self.cache.lock().unwrap().save_if_dirty() {
            log::warn!("fqdn cache: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_only_past_expiry_plus_keep() {
        let k = |b: u8| FqdnLearnedKey { addr: [b; 16], local_id: 1 };
        let v = |e: u64| FqdnLearnedValue { expires_ns: e, slots: 1, _pad: 0 };
        let s = 1_000_000_000u64;
        let entries = [(k(1), v(10 * s)), (k(2), v(100 * s)), (k(3), v(0))];
        let gone = stale(&entries, 80 * s, 60);
        assert_eq!(gone, vec![k(1), k(3)]);
        assert!(stale(&entries, 70 * s, 60).len() == 1, "10 s + 60 s is not past at 70 s");
    }
}
