//! Opt-in per identity pair counters of datapath events (`--metrics-identity-pairs N`).
//!
//! SPIFFE IDs as label values multiply series by pairs of workloads, so they are off by
//! default and capped: at most N label sets are kept; an event of a new pair once the cap
//! is reached is counted in `zt_identity_pair_events_folded_total` instead. The source is
//! the event ring (drops always; allows with `--events-allowed`), which the kernel rate
//! limits (`--events-per-sec`): these counters sample, `zt_verdicts_total` counts.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::events::EventRecord;

/// (direction, verdict, reason, source SPIFFE ID, destination SPIFFE ID).
type PairKey = (String, String, String, String, String);

#[derive(Clone, Debug, Default)]
pub struct PairCounts {
    /// Most label sets kept; 0 = off.
    pub cap: usize,
    counts: BTreeMap<PairKey, u64>,
    /// Events of pairs that did not get their own series (cap reached).
    folded: u64,
}

impl PairCounts {
    pub fn new(cap: usize) -> Self {
        PairCounts { cap, ..Default::default() }
    }

    pub fn count(&mut self, r: &EventRecord) {
        if self.cap == 0 {
            return;
        }
        let key = (r.direction.clone(), r.verdict.clone(), r.reason.clone(), r.src.spiffe_id.clone(), r.dst.spiffe_id.clone());
        if let Some(n) = self.counts.get_mut(&key) {
            *n += 1;
        } else if self.counts.len() < self.cap {
            self.counts.insert(key, 1);
        } else {
            self.folded += 1;
        }
    }

    pub fn render(&self, o: &mut String) {
        if self.cap == 0 {
            return;
        }
        let _ = writeln!(
            o,
            "# HELP zt_identity_pair_events_total Datapath events (rate-limited samples of drops, and of new allowed flows with --events-allowed) by direction, verdict, reason and identity pair; at most --metrics-identity-pairs series.\n# TYPE zt_identity_pair_events_total counter"
        );
        for ((dir, verdict, reason, src, dst), n) in &self.counts {
            let _ = writeln!(
                o,
                "zt_identity_pair_events_total{{direction=\"{}\",verdict=\"{}\",reason=\"{}\",src_identity=\"{}\",dst_identity=\"{}\"}} {n}",
                esc(dir),
                esc(verdict),
                esc(reason),
                esc(src),
                esc(dst)
            );
        }
        let _ = writeln!(
            o,
            "# HELP zt_identity_pair_events_folded_total Datapath events of identity pairs left out of zt_identity_pair_events_total because --metrics-identity-pairs series existed already.\n# TYPE zt_identity_pair_events_folded_total counter\nzt_identity_pair_events_folded_total {}",
            self.folded
        );
        let _ = writeln!(
            o,
            "# HELP zt_identity_pair_series Identity-pair series kept, out of --metrics-identity-pairs.\n# TYPE zt_identity_pair_series gauge\nzt_identity_pair_series {}",
            self.counts.len()
        );
    }
}

/// Prometheus label value escaping (backslash, double quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Side;

    fn rec(src: &str, dst: &str) -> EventRecord {
        let side = |id: &str| Side { ip: "10.0.0.1".parse().unwrap(), port: 80, identity: 1, spiffe_id: id.into(), pod: None };
        EventRecord {
            time_ns: 0,
            direction: "ingress".into(),
            verdict: "drop".into(),
            reason: "policy-default-deny".into(),
            proto: "TCP".into(),
            src: side(src),
            dst: side(dst),
            rule: None,
            ifindex: 1,
            http: None,
        }
    }

    #[test]
    fn off_by_default_renders_nothing() {
        let mut p = PairCounts::default();
        p.count(&rec("a", "b"));
        let mut o = String::new();
        p.render(&mut o);
        assert_eq!(o, "");
    }

    #[test]
    fn cap_folds_new_pairs_and_keeps_counting_known_ones() {
        let mut p = PairCounts::new(2);
        for (s, d) in [("a", "b"), ("a", "c"), ("x", "y"), ("a", "b"), ("x", "z")] {
            p.count(&rec(s, d));
        }
        let mut o = String::new();
        p.render(&mut o);
        assert!(o.contains("src_identity=\"a\",dst_identity=\"b\"} 2"), "{o}");
        assert!(o.contains("src_identity=\"a\",dst_identity=\"c\"} 1"), "{o}");
        assert!(!o.contains("\"x\""), "{o}");
        assert!(o.contains("zt_identity_pair_events_folded_total 2"), "{o}");
        assert!(o.contains("zt_identity_pair_series 2"), "{o}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
