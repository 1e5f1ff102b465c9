//! A TCP connect made by a process inside a pod's cgroup (and netns), as the pod's own
//! application would make it: the cgroup programs at the pods' root see it, so Service
//! frontends are translated (a probe from a test thread that only joins the netns is
//! not in the pod's cgroup and is never translated).
use std::time::Duration;

use anyhow::{bail, Result};

use crate::{Endpoint, Testbed};

/// What a connect from inside a pod got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The server's greeting (`namespace/name` for the test bed's servers), or the
    /// error: `timeout`, `ECONNREFUSED`, `ENETUNREACH`, ...
    pub outcome: String,
    /// The peer address the socket reports (`getpeername`), "-" when not connected.
    pub peer: String,
}

impl Connect {
    pub fn connected(&self) -> bool {
        !self.outcome.is_empty() && self.peer != "-"
    }
}

impl Testbed {
    /// Connects from `from` (a pod: its netns and cgroup) to `host:port` over TCP with
    /// Debian's python3, reads the server's first line, reports the socket's peer.
    pub fn connect_in(&self, from: &Endpoint, host: &str, port: u16, timeout: Duration) -> Result<Connect> {
        let t = timeout.as_secs_f64();
        let script = format!(
            "import socket, errno\n\
             try:\n    s = socket.create_connection(('{host}', {port}), timeout={t})\n    peer = s.getpeername()[0]\n    s.settimeout({t})\n    print(s.recv(64).decode().strip() or 'empty', peer)\n\
             except socket.timeout:\n    print('timeout', '-')\n\
             except OSError as e:\n    print(errno.errorcode.get(e.errno, str(e.errno)), '-')\n"
        );
        let out = self.exec_in(from, &["/usr/bin/python3", "-c", &script])?;
        if !out.status.success() {
            bail!("python3 in {from}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let (outcome, peer) = text.split_once(' ').unwrap_or((&text, "-"));
        Ok(Connect { outcome: outcome.to_string(), peer: peer.to_string() })
    }
}
