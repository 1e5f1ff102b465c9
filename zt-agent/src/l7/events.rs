//! What the proxy decided, counted (`zt_http_requests_total{verdict,method}`,
//! `zt_http_connections_refused_total{reason}`; no path label: paths are unbounded) and
//! sent as events to `ztctl drops -f`.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{LazyLock, Mutex};

/// The process's proxy counters (rendered by metrics.rs).
pub static STATS: LazyLock<Stats> = LazyLock::new(Stats::default);

#[derive(Default)]
pub struct Stats {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
}

/// Request verdicts.
pub const ALLOWED: &str = "allowed";
pub const DENIED: &str = "denied";
/// Ambiguous or unsupported request target (400).
pub const BAD_REQUEST: &str = "bad-request";
/// Allowed, but the server could not be reached or failed (502).
pub const UPSTREAM_ERROR: &str = "upstream-error";

/// Connections refused before any request: a TLS ClientHello, the HTTP/2 preface, a
/// request hyper could not parse, no identity for either side.
pub const REFUSED_TLS: &str = "tls";
pub const REFUSED_HTTP2: &str = "http2";
pub const REFUSED_MALFORMED: &str = "malformed";
pub const REFUSED_UNKNOWN_PEER: &str = "unknown-endpoint";

/// A bounded method label: the registered methods, else `other`.
pub fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

impl Stats {
    pub fn request(&self, verdict: &'static str, method: &str) {
        *self.requests.lock().unwrap().entry((verdict, method_label(method))).or_default() += 1;
    }

    pub fn refused(&self, reason: &'static str) {
        *self.refused.lock().unwrap().entry(reason).or_default() += 1;
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP zt_http_requests_total HTTP requests judged by the L7 proxy, by verdict and method.");
        let _ = writeln!(out, "# TYPE zt_http_requests_total counter");
        for ((v, m), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(out, "zt_http_requests_total{{verdict=\"{v}\",method=\"{m}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP zt_http_connections_refused_total Connections the L7 proxy reset before any request, by reason.");
        let _ = writeln!(out, "# TYPE zt_http_connections_refused_total counter");
        for r in [REFUSED_TLS, REFUSED_HTTP2, REFUSED_MALFORMED, REFUSED_UNKNOWN_PEER] {
            let n = self.refused.lock().unwrap().get(r).copied().unwrap_or(0);
            let _ = writeln!(out, "zt_http_connections_refused_total{{reason=\"{r}\"}} {n}");
        }
    }
}
