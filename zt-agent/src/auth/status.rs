//! What the node channels report: `<state-dir>/auth.json` for `ztctl auth` (SVIDs, peers
//! with channel state, clock offset and last error) and the Prometheus series, refreshed
//! when a peer's status changes and every second from `Links`.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use super::links::Links;
use crate::ctl::auth::{AuthState, ChannelRow, PeerRow, RefreshError, SourceRow, StreamRow, SvidRow, AUTH_STATE_FILE};
use crate::metrics::Shared;
use crate::svid::clock::unix_secs;

/// One peer's series.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PeerCounts {
    pub peer: String,
    pub up: bool,
    pub clock_offset_s: Option<f64>,
    pub refused: u64,
    pub failed: u64,
    pub sent: u64,
    pub withdrawals_sent: u64,
    pub received: u64,
    pub withdrawals_received: u64,
    pub rejected: BTreeMap<String, u64>,
    /// Channels renewed by reason; channels closed for the peer's SVID by reason.
    pub renewals: BTreeMap<String, u64>,
    pub closed: BTreeMap<String, u64>,
}

/// The SVID source's series (`--svid-source`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceCounts {
    /// `builtin`, `spire` or `files`.
    pub kind: String,
    pub up: bool,
    pub streams_up: usize,
    pub streams_down: usize,
    /// SVIDs whose last refresh failed (the last valid one is kept).
    pub refresh_failing: usize,
    /// Failed fetches (SVIDs and bundles) since start.
    pub refresh_errors_total: u64,
    /// Why it is down (readiness names it).
    pub down_reason: Option<String>,
}

/// The node channels' metrics (None in `AgentMetrics` when they are off).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthCounts {
    pub source: SourceCounts,
    pub peers: Vec<PeerCounts>,
    /// Channels refused before the peer was known (accepting side).
    pub refused_unknown: u64,
    /// Peer proofs in ZT_AUTH_PROOFS.
    pub proofs_by_peers: u64,
}

fn snapshot(links: &Links) -> (AuthState, AuthCounts) {
    let src = links.svids.status();
    let source = SourceRow {
        source: src.source.clone(),
        up: src.up,
        streams: src.streams.iter().map(|s| StreamRow { stream: s.stream.clone(), up: s.up, failures: s.failures, last_error: s.last_error.clone() }).collect(),
        refresh_errors: src.failing.iter().map(|(id, n, e)| RefreshError { spiffe_id: id.clone(), failures: *n, error: e.clone() }).collect(),
        bundle_error: src.bundle_error.clone(),
        roots: src.roots.clone(),
    };
    let source_counts = SourceCounts {
        kind: src.source.split(':').next().unwrap_or_default().to_string(),
        up: src.up,
        streams_up: src.streams.iter().filter(|s| s.up).count(),
        streams_down: src.streams.iter().filter(|s| !s.up).count(),
        refresh_failing: src.failing.len() + src.bundle_error.is_some() as usize,
        refresh_errors_total: src.errors_total,
        down_reason: (!src.up).then(|| {
            let mut down: Vec<String> =
                src.streams.iter().filter(|s| !s.up).map(|s| format!("{}: {}", s.stream, s.last_error.as_deref().unwrap_or("no message yet"))).collect();
            if down.is_empty() {
                // A source without streams (files): what did not read.
                down.extend(src.failing.iter().map(|(id, _, e)| format!("{id}: {e}")));
                down.extend(src.bundle_error.iter().map(|e| format!("bundles: {e}")));
            }
            format!("SVID source {} down ({})", src.source, if down.is_empty() { "no stream open".to_string() } else { down.join("; ") })
        }),
    };
    let svids = links
        .svids
        .cache()
        .status()
        .into_iter()
        .filter_map(|s| {
            Some(SvidRow {
                spiffe_id: s.spiffe_id.to_string(),
                not_before: unix_secs(s.not_before?),
                not_after: unix_secs(s.not_after?),
                next_refresh: unix_secs(s.next_refresh),
            })
        })
        .collect();
    let g = links.peers.lock().unwrap();
    let peers = g
        .iter()
        .map(|(n, s)| PeerRow {
            node: n.clone(),
            state: s.state.to_string(),
            clock_offset_s: s.clock_offset_ms.map(|o| o as f64 / 1000.0),
            last_error: s.last_error.clone(),
            channel: s.channel.as_ref().map(|c| ChannelRow {
                svid_not_after: c.local.as_ref().map(|l| unix_secs(l.not_after)),
                peer_svid_not_after: unix_secs(c.peer.not_after),
                renews_at: c.dialled.then(|| unix_secs(c.peer_renewal_at())),
                renewals: s.renewals.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                closed: s.closed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            }),
        })
        .collect();
    let counts = AuthCounts {
        source: source_counts,
        peers: g
            .iter()
            .map(|(n, s)| PeerCounts {
                peer: n.clone(),
                up: s.state == "up",
                clock_offset_s: s.clock_offset_ms.map(|o| o as f64 / 1000.0),
                refused: s.refused,
                failed: s.failed,
                sent: s.sent.proofs.load(Relaxed),
                withdrawals_sent: s.sent.withdrawals.load(Relaxed),
                received: s.received,
                withdrawals_received: s.withdrawals_received,
                rejected: s.rejected.clone(),
                renewals: s.renewals.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                closed: s.closed.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
            .collect(),
        refused_unknown: links.refused_unknown.load(Relaxed),
        proofs_by_peers: links.proofs_in_map.load(Relaxed),
    };
    (AuthState { node: links.node.clone(), source: Some(source), svids, peers }, counts)
}

/// Writes auth.json (when it changes) and the metrics, every second.
pub async fn report(links: Arc<Links>, state_dir: PathBuf, metrics: Shared) {
    let path = state_dir.join(AUTH_STATE_FILE);
    let mut last: Option<AuthState> = None;
    loop {
        let (st, counts) = snapshot(&links);
        metrics.lock().unwrap().auth = Some(counts);
        if last.as_ref() != Some(&st) {
            let tmp = path.with_extension("json.tmp");
            let r =
                serde_json::to_vec_pretty(&st).map_err(std::io::Error::other).and_then(|b| std::fs::write(&tmp, b)).and_then(|_| std::fs::rename(&tmp, &path));
            match r {
                Ok(()) => last = Some(st),
                Err(e) => log::warn!("writing {}: {e}", path.display()),
            }
        }
        // At most one write per 100 ms however busy the peers are.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::select! {
            _ = links.report.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The node channels' series (peer names are Kubernetes node names: nothing to escape).
pub fn render(o: &mut String, c: &AuthCounts) {
    use crate::metrics::line as head;
    let s = &c.source;
    head(o, "1 while the SVID source (--svid-source) answers: builtin always; spire when every stream of the admin socket is up; files when the node's SVID and the bundles read cleanly.", "gauge", "zt_svid_source_up");
    let _ = writeln!(o, "zt_svid_source_up{{source=\"{}\"}} {}", s.kind, s.up as u8);
    head(o, "Streams of the SVID source by state (SPIRE: the bundle stream and one X509-SVID stream per identity).", "gauge", "zt_svid_source_streams");
    let _ = writeln!(o, "zt_svid_source_streams{{state=\"up\"}} {}\nzt_svid_source_streams{{state=\"down\"}} {}", s.streams_up, s.streams_down);
    head(o, "SVIDs (and the bundles) whose last refresh failed; the last valid ones are used until they expire.", "gauge", "zt_svid_refresh_failing");
    let _ = writeln!(o, "zt_svid_refresh_failing {}", s.refresh_failing);
    head(o, "Failed SVID and bundle refreshes since the agent started.", "counter", "zt_svid_refresh_errors_total");
    let _ = writeln!(o, "zt_svid_refresh_errors_total {}", s.refresh_errors_total);
    head(o, "1 while the node channel to the peer is up (proofs flow both ways).", "gauge", "zt_auth_channel_up");
    for p in &c.peers {
        let _ = writeln!(o, "zt_auth_channel_up{{peer=\"{}\"}} {}", p.peer, p.up as u8);
    }
    head(o, "The peer's clock minus this node's, measured over the node channel.", "gauge", "zt_peer_clock_offset_seconds");
    for p in &c.peers {
        if let Some(off) = p.clock_offset_s {
            let _ = writeln!(o, "zt_peer_clock_offset_seconds{{peer=\"{}\"}} {off}", p.peer);
        }
    }
    head(
        o,
        "Node channels this node refused because the peer's SVID broke a rule (peer \"unknown\": refused before the peer was known).",
        "counter",
        "zt_auth_channels_refused_total",
    );
    for p in &c.peers {
        let _ = writeln!(o, "zt_auth_channels_refused_total{{peer=\"{}\"}} {}", p.peer, p.refused);
    }
    let _ = writeln!(o, "zt_auth_channels_refused_total{{peer=\"unknown\"}} {}", c.refused_unknown);
    head(
        o,
        "Node channel attempts that failed otherwise (connection refused, timeout, the peer refused this node).",
        "counter",
        "zt_auth_channel_failures_total",
    );
    for p in &c.peers {
        let _ = writeln!(o, "zt_auth_channel_failures_total{{peer=\"{}\"}} {}", p.peer, p.failed);
    }
    head(
        o,
        "Node channels renewed make-before-break (a new channel swapped in before the old one closed), by reason: own-svid-rotated, peer-renewal-point, peer-svid-invalid (dialling end), by-peer (accepting end).",
        "counter",
        "zt_auth_channel_renewals_total",
    );
    for p in &c.peers {
        for (reason, n) in &p.renewals {
            let _ = writeln!(o, "zt_auth_channel_renewals_total{{peer=\"{}\",reason=\"{reason}\"}} {n}", p.peer);
        }
    }
    head(o, "Node channels this end closed because the peer's node SVID expired or stopped verifying, by reason.", "counter", "zt_auth_channels_closed_total");
    for p in &c.peers {
        for (reason, n) in &p.closed {
            let _ = writeln!(o, "zt_auth_channels_closed_total{{peer=\"{}\",reason=\"{reason}\"}} {n}", p.peer);
        }
    }
    head(o, "Identity proofs (and withdrawals) this node sent to the peer.", "counter", "zt_auth_proofs_sent_total");
    for p in &c.peers {
        let _ = writeln!(o, "zt_auth_proofs_sent_total{{peer=\"{}\",kind=\"proof\"}} {}", p.peer, p.sent);
        let _ = writeln!(o, "zt_auth_proofs_sent_total{{peer=\"{}\",kind=\"withdrawal\"}} {}", p.peer, p.withdrawals_sent);
    }
    head(o, "Identity proofs (and withdrawals) accepted from the peer.", "counter", "zt_auth_proofs_received_total");
    for p in &c.peers {
        let _ = writeln!(o, "zt_auth_proofs_received_total{{peer=\"{}\",kind=\"proof\"}} {}", p.peer, p.received);
        let _ = writeln!(o, "zt_auth_proofs_received_total{{peer=\"{}\",kind=\"withdrawal\"}} {}", p.peer, p.withdrawals_received);
    }
    head(o, "Identity proofs from the peer that failed a check, by reason.", "counter", "zt_auth_proofs_rejected_total");
    for p in &c.peers {
        for (reason, n) in &p.rejected {
            let _ = writeln!(o, "zt_auth_proofs_rejected_total{{peer=\"{}\",reason=\"{reason}\"}} {n}", p.peer);
        }
    }
}
