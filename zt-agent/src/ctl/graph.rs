//! `ztctl graph`: the map's JSON (identities, observed and permitted edges, risk, blast
//! radius), asked of the running agent over the admin socket (it lives in the agent's
//! memory, so unlike the map views it needs the agent).
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One `graph` or `posture` request; the agent's `{"error": ...}` becomes an error.
pub fn request(socket: &Path, what: &str, window: &str) -> Result<serde_json::Value> {
    crate::graph::parse_window(window).map_err(anyhow::Error::msg)?;
    let mut s = UnixStream::connect(socket).with_context(|| format!("connecting to the agent at {} (the map lives in the agent)", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{what} window={window}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).with_context(|| format!("reading the agent's answer to {what}"))?;
    let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("the agent's answer to {what} is not JSON: {line:?}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("the agent: {e}");
    }
    Ok(v)
}
