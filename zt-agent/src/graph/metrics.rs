//! The map's own series on `/metrics`: how full it is and what its caps kept out (the
//! same numbers as `limits` in `/api/graph`), updated after each conntrack scan.
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    pub entries: usize,
    pub max_entries: usize,
    pub dropped_observations: u64,
    pub evicted_entries: u64,
    pub events_lagged: u64,
}

impl super::Graph {
    pub fn counts(&self) -> GraphCounts {
        GraphCounts {
            entries: self.observed.entries(),
            max_entries: self.observed.limits().max_entries,
            dropped_observations: self.observed.dropped.observations,
            evicted_entries: self.observed.dropped.evicted_entries,
            events_lagged: self.events_lagged,
        }
    }
}

pub fn render_metrics(o: &mut String, c: Option<&GraphCounts>) {
    let c = c.copied().unwrap_or_default();
    let _ = writeln!(o, "# HELP zt_graph_entries (bucket, edge) entries the flow map holds.\n# TYPE zt_graph_entries gauge\nzt_graph_entries {}", c.entries);
    let _ = writeln!(
        o,
        "# HELP zt_graph_entries_max The flow map's hard cap (--graph-max-entries).\n# TYPE zt_graph_entries_max gauge\nzt_graph_entries_max {}",
        c.max_entries
    );
    let _ = writeln!(
        o,
        "# HELP zt_graph_dropped_total What the flow map's cap kept out of the view: new edges dropped (observations), entries of old buckets removed early (evicted), events its subscriber missed (lagged).\n# TYPE zt_graph_dropped_total counter"
    );
    for (what, n) in [("observations", c.dropped_observations), ("evicted", c.evicted_entries), ("lagged", c.events_lagged)] {
        let _ = writeln!(o, "zt_graph_dropped_total{{what=\"{what}\"}} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_caps_counters() {
        let mut o = String::new();
        render_metrics(&mut o, Some(&GraphCounts { entries: 3, max_entries: 10, dropped_observations: 2, evicted_entries: 5, events_lagged: 1 }));
        assert!(o.contains("zt_graph_entries 3\n") && o.contains("zt_graph_entries_max 10\n"));
        assert!(o.contains("zt_graph_dropped_total{what=\"observations\"} 2\n") && o.contains("zt_graph_dropped_total{what=\"evicted\"} 5\n"));
        assert!(o.contains("zt_graph_dropped_total{what=\"lagged\"} 1\n"));
    }
}
