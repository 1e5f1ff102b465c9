//! Running `zt-agent` inside a node's netns with its own bpffs instance and state dir.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::sys;

pub(crate) struct AgentInner {
    pub node: String,
    pub netns: String,
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    #[allow(dead_code)]
    pub bpffs_root: PathBuf,
    #[allow(dead_code)]
    pub admin_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub cgroup: PathBuf,
    pub child: Option<Child>,
}

impl AgentInner {
    pub(crate) fn spawn(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait()?.is_none() {
                bail!("agent on {} is already running (pid {})", self.node, c.id());
            }
        }
        // A stale ready file from an earlier run would make wait_ready lie.
        let _ = std::fs::remove_file(self.state_dir.join("ready"));
        std::fs::create_dir_all(&self.state_dir)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(
            log,
            "==== zt-testbed: starting {} {} (netns {})",
            self.bin.display(),
            self.args.join(" "),
            self.netns
        )?;
        let procs = OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))?;
        let procs_fd = procs.as_raw_fd();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .arg(&self.bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only async-signal-safe calls (write) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::write(procs_fd, b"0".as_ptr() as *const _, 1);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        drop(procs);
        self.child = Some(child);
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub(crate) fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        sys::kill(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    pub(crate) fn kill(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }
}

/// A `zt-agent` process started by [`crate::Testbed::start_agent`]. Cloning shares the
/// process. The test bed kills it on drop; dropping the handle does not.
#[derive(Clone)]
pub struct AgentHandle {
    pub(crate) inner: Arc<Mutex<AgentInner>>,
    /// `--bpffs-root` (inside this node's private bpffs mount).
    #[allow(dead_code)]
    pub bpffs_root: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// `--admin-socket`.
    #[allow(dead_code)]
    pub admin_socket: PathBuf,
    /// The agent's stdout+stderr (appended across restarts).
    pub log_path: PathBuf,
    /// Node the agent runs on.
    pub node: String,
}

impl AgentHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, AgentInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// PID of the running agent process.
    pub fn pid(&self) -> Option<u32> {
        self.lock().child.as_ref().map(|c| c.id())
    }

    /// True if the process is running.
    pub fn is_running(&self) -> bool {
        let mut g = self.lock();
        match g.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Wait until `<state-dir>/ready` exists while the process is alive; on failure the
    /// error carries the log tail.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let ready = self.state_dir.join("ready");
        loop {
            {
                let mut g = self.lock();
                let Some(c) = g.child.as_mut() else {
                    bail!("agent on {} is not running", self.node)
                };
                if let Some(st) = c.try_wait()? {
                    g.child = None;
                    bail!(
                        "agent on {} exited ({st}) before ready; log tail:\n{}",
                        self.node,
                        sys::tail(&self.log_path, 40)
                    );
                }
            }
            if ready.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent on {} not ready after {timeout:?}; log tail:\n{}",
                    self.node,
                    sys::tail(&self.log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait (SIGKILL after 10 s). Returns the exit status (None if not running).
    pub fn stop(&self) -> Option<ExitStatus> {
        self.lock().stop(Duration::from_secs(10))
    }

    /// SIGKILL and wait (simulates a crash: pins and TC programs stay).
    pub fn kill(&self) -> Option<ExitStatus> {
        self.lock().kill()
    }

    /// Start again with the same arguments, bpffs and state dir (after stop/kill).
    pub fn start(&self) -> Result<()> {
        self.lock().spawn()
    }

    /// Replace the value of flag `--name` for the next start (appended if absent).
    pub fn set_flag(&self, name: &str, value: &str) {
        let mut g = self.lock();
        match g.args.iter().position(|a| a == name) {
            Some(i) if i + 1 < g.args.len() => g.args[i + 1] = value.to_string(),
            _ => g.args.extend([name.to_string(), value.to_string()]),
        }
    }

    /// stop() then start(). Call [`AgentHandle::wait_ready`] afterwards.
    pub fn restart(&self) -> Result<()> {
        let mut g = self.lock();
        g.stop(Duration::from_secs(10));
        g.spawn()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The full command-line arguments passed to the agent binary.
    pub fn args(&self) -> Vec<String> {
        self.lock().args.clone()
    }

    /// HTTP GET `/metrics` from the agent's metrics address, inside the node netns.
    pub fn metrics(&self) -> Result<String> {
        self.http_get("/metrics")
    }

    /// HTTP GET any path from the agent's metrics server; returns the body (status 200 only).
    pub fn http_get(&self, path: &str) -> Result<String> {
        let (ns, addr) = {
            let g = self.lock();
            (sys::netns_path(&g.netns), g.metrics_addr)
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let raw = sys::in_netns(&ns, move || -> Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(req.as_bytes())?;
            let mut buf = vec![];
            s.read_to_end(&mut buf)?;
            Ok(buf)
        })??;
        parse_http(&raw)
    }
}

fn parse_http(raw: &[u8]) -> Result<String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP response: {text:?}"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("HTTP {status}: {body}");
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok(if chunked { dechunk(body) } else { body.to_string() })
}

/// The body of an HTTP/1.1 `Transfer-Encoding: chunked` response, its chunks joined.
pub fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((len, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(len.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Paths of a node's agent files under the test bed's temp dir.
pub(crate) fn agent_paths(tmp: &Path, node: &str) -> (PathBuf, PathBuf, PathBuf) {
    let base = tmp.join(format!("node-{node}"));
    let bpffs = base.join("bpffs");
    let state = base.join("state");
    let admin = state.join("admin.sock");
    (bpffs, state, admin)
}

#[cfg(test)]
mod tests {
    #[test]
    fn http() {
        assert_eq!(
            super::parse_http(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nx 1\n").unwrap(),
            "x 1\n"
        );
        assert_eq!(
            super::parse_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(super::parse_http(b"HTTP/1.1 404 NF\r\n\r\nno").is_err());
    }
}
