//! Observed edges: what the datapath did, aggregated per (source identity, destination
//! identity, protocol, port) in time buckets. Allowed flows come from conntrack scans
//! and allow events, denied attempts from drop events. Buckets keep history after the
//! event ring has wrapped; a hard cap on (bucket, edge) entries bounds memory, and what
//! the cap kept out is counted, never silently lost.
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;

/// One edge as aggregated: who opened towards whom, on which protocol and port (ICMP:
/// the type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeKey {
    pub src: u32,
    pub dst: u32,
    pub proto: u8,
    pub port: u16,
}

/// What one bucket knows of one edge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeStats {
    /// (allowed, reason name) -> flows (allowed) or attempts (denied: drop events).
    pub counts: BTreeMap<(bool, &'static str), u64>,
    /// Wall-clock seconds (Unix) of the first and last observation in this bucket.
    pub first_s: u64,
    pub last_s: u64,
    /// Rules that allowed or denied it (rule ids; at most `MAX_RULES_PER_EDGE`).
    pub rules: BTreeSet<u32>,
}

pub const MAX_RULES_PER_EDGE: usize = 8;

/// One observation to add.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub key: EdgeKey,
    pub allowed: bool,
    pub reason: &'static str,
    pub rule: u32,
    /// 0: only a sign of life (a long-lived flow still active): updates last seen.
    pub count: u64,
    pub at_s: u64,
}

struct Bucket {
    start_s: u64,
    edges: HashMap<EdgeKey, EdgeStats>,
}

/// Settings of the aggregation (flags `--graph-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub bucket_s: u64,
    pub buckets: usize,
    /// Hard cap on (bucket, edge) entries across all buckets.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { bucket_s: 60, buckets: 60, max_entries: 100_000 }
    }
}

/// What the cap cost, since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Dropped {
    /// Observations of an edge new to the current bucket while the current bucket alone
    /// held the cap: not in the view.
    pub observations: u64,
    /// (bucket, edge) entries removed early (oldest buckets first) to make room.
    pub evicted_entries: u64,
}

pub struct Observed {
    limits: Limits,
    buckets: VecDeque<Bucket>,
    entries: usize,
    pub dropped: Dropped,
}

/// An edge merged over a window, as the API returns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EdgeSummary {
    pub allowed: u64,
    pub denied: u64,
    pub counts: BTreeMap<String, u64>,
    pub first_seen: u64,
    pub last_seen: u64,
    pub rules: BTreeSet<u32>,
}

impl Observed {
    pub fn new(limits: Limits) -> Observed {
        let limits = Limits { bucket_s: limits.bucket_s.max(1), buckets: limits.buckets.max(1), max_entries: limits.max_entries.max(1) };
        Observed { limits, buckets: VecDeque::new(), entries: 0, dropped: Dropped::default() }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Oldest time the buckets still cover (Unix seconds), if any.
    pub fn oldest_s(&self) -> Option<u64> {
        self.buckets.front().map(|b| b.start_s)
    }

    /// The bucket `at_s` falls in, created (and old ones expired) as time moves on. An
    /// observation older than the newest bucket goes into the newest one (late events).
    fn current(&mut self, at_s: u64) -> usize {
        let start = at_s - at_s % self.limits.bucket_s;
        if self.buckets.back().is_none_or(|b| b.start_s < start) {
            self.buckets.push_back(Bucket { start_s: start, edges: HashMap::new() });
        }
        let horizon = self.buckets.back().unwrap().start_s.saturating_sub(self.limits.bucket_s * (self.limits.buckets as u64 - 1));
        while self.buckets.front().is_some_and(|b| b.start_s < horizon) {
            let b = self.buckets.pop_front().unwrap();
            self.entries -= b.edges.len();
        }
        self.buckets.len() - 1
    }

    pub fn add(&mut self, o: Observation) {
        let mut i = self.current(o.at_s);
        if !self.buckets[i].edges.contains_key(&o.key) {
            // Make room: the oldest buckets go first; the current one is never evicted.
            while self.entries >= self.limits.max_entries && i > 0 {
                let b = self.buckets.pop_front().unwrap();
                self.entries -= b.edges.len();
                self.dropped.evicted_entries += b.edges.len() as u64;
                i -= 1;
            }
            if self.entries >= self.limits.max_entries {
                self.dropped.observations += 1;
                return;
            }
            self.entries += 1;
        }
        let e = self.buckets[i].edges.entry(o.key).or_insert_with(|| EdgeStats { first_s: o.at_s, last_s: o.at_s, ..Default::default() });
        if o.count > 0 {
            *e.counts.entry((o.allowed, o.reason)).or_default() += o.count;
        }
        e.first_s = e.first_s.min(o.at_s);
        e.last_s = e.last_s.max(o.at_s);
        if o.rule != 0 && (e.rules.len() < MAX_RULES_PER_EDGE || e.rules.contains(&o.rule)) {
            e.rules.insert(o.rule);
        }
    }

    /// Every edge seen in buckets that overlap `[now - window, now]`, merged.
    pub fn window(&self, now_s: u64, window_s: u64) -> BTreeMap<EdgeKey, EdgeSummary> {
        let from = now_s.saturating_sub(window_s);
        let mut out: BTreeMap<EdgeKey, EdgeSummary> = BTreeMap::new();
        for b in self.buckets.iter().filter(|b| b.start_s + self.limits.bucket_s > from) {
            for (k, e) in &b.edges {
                let s = out.entry(*k).or_insert_with(|| EdgeSummary { first_seen: e.first_s, last_seen: e.last_s, ..Default::default() });
                for ((allowed, reason), n) in &e.counts {
                    if *allowed {
                        s.allowed += n;
                    } else {
                        s.denied += n;
                    }
                    *s.counts.entry(format!("{}/{reason}", if *allowed { "allow" } else { "drop" })).or_default() += n;
                }
                s.first_seen = s.first_seen.min(e.first_s);
                s.last_seen = s.last_seen.max(e.last_s);
                s.rules.extend(e.rules.iter().copied());
            }
        }
        out
    }

    /// Denied attempts per source identity in each bucket of the window, oldest first
    /// (for spike detection).
    pub fn denied_per_bucket(&self, now_s: u64, window_s: u64) -> BTreeMap<u32, Vec<u64>> {
        let from = now_s.saturating_sub(window_s);
        let in_window: Vec<&Bucket> = self.buckets.iter().filter(|b| b.start_s + self.limits.bucket_s > from).collect();
        let mut out: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for (i, b) in in_window.iter().enumerate() {
            for (k, e) in &b.edges {
                let n: u64 = e.counts.iter().filter(|((a, _), _)| !*a).map(|(_, n)| *n).sum();
                if n > 0 {
                    out.entry(k.src).or_insert_with(|| vec![0; in_window.len()])[i] += n;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(src: u32, dst: u32, port: u16, allowed: bool, at_s: u64) -> Observation {
        Observation {
            key: EdgeKey { src, dst, proto: 6, port },
            allowed,
            reason: if allowed { "policy" } else { "policy-default-deny" },
            rule: if allowed { 7 } else { 0 },
            count: 1,
            at_s,
        }
    }

    #[test]
    fn aggregates_per_edge_with_counts_first_and_last_seen() {
        let mut o = Observed::new(Limits { bucket_s: 60, buckets: 10, max_entries: 100 });
        o.add(obs(1, 2, 80, true, 1000));
        o.add(obs(1, 2, 80, true, 1010));
        o.add(obs(1, 2, 80, false, 1020));
        o.add(obs(3, 2, 80, false, 1030));
        let w = o.window(1030, 300);
        assert_eq!(w.len(), 2);
        let e = &w[&EdgeKey { src: 1, dst: 2, proto: 6, port: 80 }];
        assert_eq!((e.allowed, e.denied, e.first_seen, e.last_seen), (2, 1, 1000, 1020));
        assert_eq!(e.counts["allow/policy"], 2);
        assert_eq!(e.counts["drop/policy-default-deny"], 1);
        assert_eq!(e.rules, BTreeSet::from([7]));
        // A sign of life moves last seen without counting a flow.
        o.add(Observation { count: 0, ..obs(1, 2, 80, true, 1050) });
        let e = &o.window(1050, 300)[&EdgeKey { src: 1, dst: 2, proto: 6, port: 80 }];
        assert_eq!((e.allowed, e.last_seen), (2, 1050));
    }

    #[test]
    fn history_survives_in_buckets_and_windows_select_them() {
        let mut o = Observed::new(Limits { bucket_s: 60, buckets: 10, max_entries: 100 });
        o.add(obs(1, 2, 80, true, 0));
        o.add(obs(1, 2, 80, true, 300));
        o.add(obs(4, 2, 80, false, 590));
        // The whole history.
        assert_eq!(o.window(590, 600)[&EdgeKey { src: 1, dst: 2, proto: 6, port: 80 }].allowed, 2);
        // The last two minutes: only the denied attempt.
        let w = o.window(590, 120);
        assert_eq!(w.keys().map(|k| k.src).collect::<Vec<_>>(), [4]);
        // Ten buckets: the one at 0 expires when 600 starts.
        o.add(obs(4, 2, 80, false, 600));
        assert_eq!(o.window(600, 10_000)[&EdgeKey { src: 1, dst: 2, proto: 6, port: 80 }].allowed, 1);
        assert_eq!(o.oldest_s(), Some(300));
        assert_eq!(o.entries(), 3);
    }

    #[test]
    fn the_cap_evicts_oldest_buckets_then_drops_and_counts() {
        let mut o = Observed::new(Limits { bucket_s: 60, buckets: 100, max_entries: 3 });
        o.add(obs(1, 2, 80, true, 0));
        o.add(obs(1, 3, 80, true, 0));
        o.add(obs(1, 4, 80, true, 60));
        // A fourth entry in a new bucket: the bucket at 0 (two entries) goes.
        o.add(obs(1, 5, 80, true, 120));
        assert_eq!(o.entries(), 2);
        assert_eq!(o.dropped, Dropped { observations: 0, evicted_entries: 2 });
        // Known edges keep counting at the cap.
        o.add(obs(1, 6, 80, true, 120));
        assert_eq!(o.entries(), 3);
        o.add(obs(1, 6, 80, true, 121));
        // Now the bucket at 60 goes, then the current bucket is full on its own.
        o.add(obs(1, 7, 80, true, 122));
        assert_eq!(o.dropped.evicted_entries, 3);
        assert_eq!(o.entries(), 3);
        o.add(obs(1, 8, 80, true, 123));
        assert_eq!(o.dropped.observations, 1);
        assert_eq!(o.entries(), 3);
        let w = o.window(123, 1000);
        assert!(!w.contains_key(&EdgeKey { src: 1, dst: 8, proto: 6, port: 80 }));
        assert_eq!(w[&EdgeKey { src: 1, dst: 6, proto: 6, port: 80 }].allowed, 2);
    }

    #[test]
    fn denied_per_bucket_for_spikes() {
        let mut o = Observed::new(Limits { bucket_s: 60, buckets: 10, max_entries: 100 });
        o.add(obs(9, 2, 80, false, 0));
        for p in 0..5 {
            o.add(obs(9, 2, 1000 + p, false, 130));
        }
        o.add(obs(1, 2, 80, true, 130));
        let d = o.denied_per_bucket(130, 600);
        assert_eq!(d[&9], vec![1, 5]);
        assert!(!d.contains_key(&1));
    }
}
