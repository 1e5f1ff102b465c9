//! The map page, served by the agent on its own port: one HTML page, its script and
//! the vendored cytoscape (MIT, `cytoscape.LICENSE`), all embedded in the binary, and
//! the JSON it draws: `GET /api/graph?window=15m`, `GET /api/posture?window=15m`. The only
//! write is `POST /api/compromised` (mark or unmark an identity; it changes the view's
//! risk, never the datapath).
//!
//! Bound to loopback by default. Any other address needs a bearer token
//! (`--ui-token-file`): every API request must then carry `Authorization: Bearer
//! <token>` (the page passes on a `?token=` of its own URL; the page and its scripts
//! hold no data and are served without it). Requests whose Host is not an
//! address or `localhost` are refused (DNS rebinding), and a write needs the
//! `X-ZT-Request` header, which a cross-site form cannot send.
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::graph::{now_s, window_of_query, SharedGraph};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("page.js");
const CYTOSCAPE: &str = include_str!("vendor/cytoscape.min.js");
const CYTOSCAPE_LICENSE: &str = include_str!("vendor/cytoscape.LICENSE");

/// Largest request read (headers and body).
const MAX_REQUEST: usize = 16 * 1024;

#[derive(Clone, Debug)]
pub struct UiOptions {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl UiOptions {
    /// `--ui-addr` (`none`: no page) and `--ui-token-file`; a non-loopback address
    /// without a token is refused.
    pub fn parse(addr: &str, token_file: Option<&std::path::Path>) -> Result<Option<UiOptions>> {
        if addr == "none" {
            return Ok(None);
        }
        let addr: SocketAddr = addr.parse().with_context(|| format!("--ui-addr {addr:?}: expected IP:PORT or none"))?;
        let token = match token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).with_context(|| format!("--ui-token-file {}", p.display()))?.trim().to_string();
                if t.len() < 16 {
                    bail!("--ui-token-file {}: the token must be at least 16 characters", p.display());
                }
                Some(t)
            }
            None => None,
        };
        if !addr.ip().is_loopback() && token.is_none() {
            bail!("--ui-addr {addr}: the page is exposed beyond loopback; give --ui-token-file (a bearer token every request must carry)");
        }
        Ok(Some(UiOptions { addr, token }))
    }
}

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn parse(raw: &[u8]) -> Option<(Request, usize)> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&raw[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let method = first.next()?.to_string();
        let target = first.next()?;
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
        let len = headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok()).unwrap_or(0usize);
        let req = Request { method, path: path.to_string(), query: query.to_string(), headers, body: vec![] };
        Some((req, end + 4 + len))
    }
}

pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

fn resp(status: &'static str, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
    Response { status, content_type, body: body.into() }
}

fn json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => resp("200 OK", "application/json", b),
        Err(e) => resp("500 Internal Server Error", "text/plain", e.to_string()),
    }
}

fn error(status: &'static str, msg: &str) -> Response {
    resp(status, "application/json", serde_json::json!({ "error": msg }).to_string())
}

fn token_ok(req: &Request, want: &str) -> bool {
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string)
        .or_else(|| req.query.split('&').find_map(|kv| kv.strip_prefix("token=")).map(str::to_string));
    // Constant time in the token's length.
    given.is_some_and(|g| g.len() == want.len() && g.bytes().zip(want.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0)
}

fn host_ok(req: &Request) -> bool {
    let Some(h) = req.header("host") else { return false };
    let host = if let Some(rest) = h.strip_prefix('[') { rest.split(']').next().unwrap_or("") } else { h.rsplit_once(':').map(|(a, _)| a).unwrap_or(h) };
    host == "localhost" || host.parse::<IpAddr>().is_ok()
}

/// One request against the graph.
pub fn handle(req: &Request, graph: &SharedGraph, token: Option<&str>) -> Response {
    if !host_ok(req) {
        return error("403 Forbidden", "Host must be an IP address or localhost");
    }
    // The page and its scripts hold no data: only the API needs the token.
    if let Some(t) = token.filter(|_| req.path.starts_with("/api/")) {
        if !token_ok(req, t) {
            return error("401 Unauthorized", "a bearer token is required");
        }
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/") | ("GET", "/index.html") => resp("200 OK", "text/html; charset=utf-8", PAGE),
        ("GET", "/favicon.ico") => resp("204 No Content", "image/x-icon", Vec::new()),
        ("GET", "/page.js") => resp("200 OK", "text/javascript; charset=utf-8", SCRIPT),
        ("GET", "/vendor/cytoscape.min.js") => resp("200 OK", "text/javascript; charset=utf-8", CYTOSCAPE),
        ("GET", "/vendor/cytoscape.LICENSE") => resp("200 OK", "text/plain; charset=utf-8", CYTOSCAPE_LICENSE),
        ("GET", "/api/graph") => match window_of_query(&req.query) {
            Ok(w) => {
                let now = now_s();
                let frozen = graph.lock().unwrap().freeze(now, w);
                json(&frozen.render(now, w))
            }
            Err(e) => error("400 Bad Request", &e),
        },
        ("GET", "/api/posture") => match window_of_query(&req.query) {
            Ok(w) => match {
                let now = now_s();
                let f = graph.lock().unwrap().freeze(now, w);
                f.posture(now, w)
            } {
                Ok(p) => json(&p),
                Err(e) => error("503 Service Unavailable", &e),
            },
            Err(e) => error("400 Bad Request", &e),
        },
        ("POST", "/api/compromised") => {
            if req.header("x-zt-request").is_none() {
                return error("403 Forbidden", "missing X-ZT-Request header");
            }
            #[derive(serde::Deserialize)]
            struct Mark {
                identity: u32,
                compromised: bool,
            }
            match serde_json::from_slice::<Mark>(&req.body) {
                Ok(m) => match graph.lock().unwrap().mark_compromised(m.identity, m.compromised, now_s()) {
                    Ok(()) => resp("200 OK", "application/json", serde_json::json!({ "identity": m.identity, "compromised": m.compromised }).to_string()),
                    Err(e) => error("404 Not Found", &e),
                },
                Err(e) => error("400 Bad Request", &format!("body: expected {{\"identity\": N, \"compromised\": true|false}}: {e}")),
            }
        }
        (_, "/api/compromised") => error("405 Method Not Allowed", "POST only"),
        _ => error("404 Not Found", "no such page"),
    }
}

pub async fn serve(opts: UiOptions, graph: SharedGraph) -> Result<()> {
    let listener = TcpListener::bind(opts.addr).await.with_context(|| format!("--ui-addr {}", opts.addr))?;
    log::info!("map page on http://{}/{}", opts.addr, if opts.token.is_some() { " (bearer token required)" } else { "" });
    loop {
        let (mut sock, _) = listener.accept().await?;
        let graph = graph.clone();
        let token = opts.token.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(2048);
            let mut chunk = [0u8; 4096];
            let parsed = loop {
                match tokio::time::timeout(std::time::Duration::from_secs(10), sock.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
                if buf.len() > MAX_REQUEST {
                    break None;
                }
                if let Some((req, total)) = Request::parse(&buf) {
                    if total > MAX_REQUEST {
                        break None;
                    }
                    if buf.len() >= total {
                        let head_end = total - req.header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
                        let body = buf[head_end..total].to_vec();
                        break Some(Request { body, ..req });
                    }
                }
            };
            let r = match parsed {
                Some(req) => tokio::task::spawn_blocking(move || handle(&req, &graph, token.as_deref()))
                    .await
                    .unwrap_or_else(|_| error("500 Internal Server Error", "handler failed")),
                None => error("413 Payload Too Large", "request too large"),
            };
            let head = format!(
                "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\nConnection: close\r\n\r\n",
                r.status,
                r.content_type,
                r.body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(&r.body).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{observed::Limits, permitted::tests::lab, Graph};

    fn req(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> Request {
        let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:9963\r\n");
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        let (r, total) = Request::parse(raw.as_bytes()).unwrap();
        assert_eq!(total, raw.len());
        Request { body: body.as_bytes().to_vec(), ..r }
    }

    fn graph() -> SharedGraph {
        let mut g = Graph::new("node1", Limits::default(), 100);
        g.set_view(lab(), now_s());
        g.shared()
    }

    #[test]
    fn serves_the_page_assets_and_the_api() {
        let g = graph();
        let r = handle(&req("GET", "/", &[], ""), &g, None);
        assert!(r.status.starts_with("200") && String::from_utf8_lossy(&r.body).contains("cytoscape.min.js"));
        assert!(handle(&req("GET", "/vendor/cytoscape.min.js", &[], ""), &g, None).body.len() > 100_000);
        assert!(String::from_utf8_lossy(&handle(&req("GET", "/vendor/cytoscape.LICENSE", &[], ""), &g, None).body).contains("MIT"));
        let r = handle(&req("GET", "/api/graph", &[], ""), &g, None);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["window_s"], 900);
        assert_eq!(v["permitted"].as_array().unwrap().len(), 1);
        let r = handle(&req("GET", "/api/graph?window=bad", &[], ""), &g, None);
        assert!(r.status.starts_with("400"), "{}", r.status);
        let r = handle(&req("GET", "/api/posture?window=5m", &[], ""), &g, None);
        assert!(r.status.starts_with("200"));
        assert!(handle(&req("GET", "/etc/passwd", &[], ""), &g, None).status.starts_with("404"));
    }

    #[test]
    fn marking_compromised_needs_the_header_and_a_known_identity() {
        let g = graph();
        let body = r#"{"identity":256,"compromised":true}"#;
        assert!(handle(&req("POST", "/api/compromised", &[], body), &g, None).status.starts_with("403"));
        assert!(handle(&req("GET", "/api/compromised", &[], ""), &g, None).status.starts_with("405"));
        assert!(handle(&req("POST", "/api/compromised", &[("X-ZT-Request", "1")], "{"), &g, None).status.starts_with("400"));
        assert!(handle(&req("POST", "/api/compromised", &[("X-ZT-Request", "1")], r#"{"identity":9999,"compromised":true}"#), &g, None)
            .status
            .starts_with("404"));
        let r = handle(&req("POST", "/api/compromised", &[("X-ZT-Request", "1")], body), &g, None);
        assert!(r.status.starts_with("200"), "{}", String::from_utf8_lossy(&r.body));
        let v: serde_json::Value = serde_json::from_slice(&handle(&req("GET", "/api/graph", &[], ""), &g, None).body).unwrap();
        assert_eq!(v["top_risk"][0], 256);
    }

    #[test]
    fn token_and_host_checks() {
        let g = graph();
        let t = "0123456789abcdef0123";
        assert!(handle(&req("GET", "/api/graph", &[], ""), &g, Some(t)).status.starts_with("401"));
        assert!(handle(&req("GET", "/api/graph", &[("Authorization", "Bearer wrong")], ""), &g, Some(t)).status.starts_with("401"));
        assert!(handle(&req("GET", "/api/graph", &[("Authorization", &format!("Bearer {t}"))], ""), &g, Some(t)).status.starts_with("200"));
        assert!(handle(&req("GET", &format!("/api/posture?token={t}"), &[], ""), &g, Some(t)).status.starts_with("200"));
        assert!(handle(&req("GET", "/", &[], ""), &g, Some(t)).status.starts_with("200"), "the page itself holds no data");
        let mut r = req("GET", "/api/graph", &[], "");
        r.headers.retain(|(k, _)| k != "Host");
        r.headers.push(("Host".into(), "evil.example:9963".into()));
        assert!(handle(&r, &g, None).status.starts_with("403"));
        // Exposure needs a token.
        let e = UiOptions::parse("0.0.0.0:9963", None).unwrap_err().to_string();
        assert!(e.contains("--ui-token-file"), "{e}");
        assert!(UiOptions::parse("127.0.0.1:9963", None).unwrap().unwrap().token.is_none());
        assert!(UiOptions::parse("none", None).unwrap().is_none());
        assert!(UiOptions::parse("nonsense", None).is_err());
    }
}
