//! One request to the node's zt-agent over its admin socket, within a deadline.
//! Wire format (see zt-agent/src/cni.rs): the line `cni <request JSON>`, answered by one
//! JSON line `{"ok":true,"attached":..}` or `{"ok":false,"code":..,"error":".."}`.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Request {
    pub command: String,
    pub container_id: String,
    pub netns: Option<String>,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub ips: Vec<std::net::IpAddr>,
    pub host_interfaces: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub attached: bool,
    #[serde(default)]
    pub code: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug)]
pub enum Failure {
    /// No socket or nobody listening: the agent is not running.
    Absent(std::io::Error),
    /// The agent did not answer within the deadline.
    Timeout(Duration),
    /// Broken connection or an answer that is not the protocol.
    Broken(String),
}

pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, Failure> {
    let start = Instant::now();
    let left = || timeout.checked_sub(start.elapsed()).filter(|d| !d.is_zero());
    // connect(2) on a unix socket does not block unless the backlog is full; the read
    // below is where a hung agent shows.
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Failure::Absent(e),
        _ => Failure::Broken(format!("connecting to {}: {e}", socket.display())),
    })?;
    let mut line = b"cni ".to_vec();
    line.extend(serde_json::to_vec(req).map_err(|e| Failure::Broken(e.to_string()))?);
    line.push(b'\n');
    let t = left().ok_or(Failure::Timeout(start.elapsed()))?;
    s.set_write_timeout(Some(t)).map_err(|e| Failure::Broken(e.to_string()))?;
    s.write_all(&line).map_err(|e| io_failure(e, start))?;
    let mut r = BufReader::new(s);
    let mut answer = String::new();
    loop {
        let t = left().ok_or(Failure::Timeout(start.elapsed()))?;
        r.get_ref().set_read_timeout(Some(t)).map_err(|e| Failure::Broken(e.to_string()))?;
        match r.read_line(&mut answer) {
            Ok(0) => return Err(Failure::Broken("the agent closed the connection without an answer".into())),
            Ok(_) if answer.ends_with('\n') => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_failure(e, start)),
        }
    }
    serde_json::from_str(answer.trim()).map_err(|e| Failure::Broken(format!("unexpected answer {:?}: {e}", answer.trim())))
}

fn io_failure(e: std::io::Error, start: Instant) -> Failure {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Failure::Timeout(start.elapsed()),
        _ => Failure::Broken(e.to_string()),
    }
}
