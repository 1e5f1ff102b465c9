//! A real HTTP/1.1 server in a pod (Python's http.server from Debian's python3), for the
//! L7 tests, the demo and the bench: GET answers `GET <path as received>`, POST `POST
//! <path> <body bytes>`; keep-alive, one thread per connection, both families.
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};

use crate::{Endpoint, Testbed};

pub const PYTHON: &str = "/usr/bin/python3";

/// GET answers `GET <path as received>`, POST `POST <path> <body bytes>`; keep-alive.
pub const SERVER: &str = r#"
import sys, socket, threading, http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without this Nagle and delayed ACKs add 40 ms.
    disable_nagle_algorithm = True
    def log_message(self, *a): pass
    def reply(self, body):
        b = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def do_GET(self):
        self.reply("GET %s\n" % self.path)
    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < n:
            d = self.rfile.read(min(65536, n - got))
            if not d: break
            got += len(d)
        self.reply("POST %s %d\n" % (self.path, got))
class S(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
for p in sys.argv[1:]:
    s = S(("::", int(p)), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// The server process; killed on drop (and with the pod's cgroup by the bed).
pub struct HttpServer(Child);

impl HttpServer {
    pub fn start(tb: &Testbed, ep: &Endpoint, ports: &[u16]) -> Result<HttpServer> {
        if !std::path::Path::new(PYTHON).exists() {
            bail!("{PYTHON} is missing: `cargo xtask setup` installs python3");
        }
        let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
        let mut args = vec![PYTHON, "-c", SERVER];
        args.extend(ports.iter().map(|s| s.as_str()));
        let mut c = tb.command_in(ep, &args)?;
        c.stdout(Stdio::piped()).stdin(Stdio::null());
        let mut child = c.spawn().context("starting the HTTP server")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let server = HttpServer(child);
        if line.trim() != "ready" {
            bail!("the HTTP server in {ep} did not start ({line:?})");
        }
        Ok(server)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
