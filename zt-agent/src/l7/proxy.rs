//! The proxy: one task per steered connection. The accepted socket's local address is the
//! original destination (the listener is transparent); both identities come from the
//! endpoint map the datapath uses. The first bytes are sniffed (a TLS ClientHello or the
//! HTTP/2 preface is reset, counted), then hyper serves HTTP/1.1 (keep-alive, pipelined
//! requests in order). Each request is judged on its normalised path: denied -> 403 naming
//! the rule or default deny, `Connection: close`; allowed -> forwarded on one upstream
//! connection per client connection, opened from the client's own address (transparent)
//! with the proxy mark, so that the server's hook judges the client's identity and knows
//! the proxy. The upstream sees the normalised path.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

use super::events::{self, STATS};
use super::rules::{self, Judgement};
use super::{normalise, Context as L7Context, Snapshot};
use crate::events::{EventRecord, HttpEvent, Side};

type Body = BoxBody<Bytes, hyper::Error>;

pub async fn serve(listener: TcpListener, ctx: Arc<L7Context>) {
    loop {
        match listener.accept().await {
            Ok((sock, client)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(sock, client, ctx).await {
                        log::debug!("http proxy: connection from {client}: {e:#}");
                    }
                });
            }
            Err(e) => {
                log::warn!("http proxy: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http,
    Tls,
    Http2,
    Closed,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies the first bytes (`None`: need more).
pub fn classify(b: &[u8]) -> Option<Sniffed> {
    if b.is_empty() {
        return None;
    }
    if b[0] == 0x16 {
        return Some(Sniffed::Tls);
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() { Some(Sniffed::Http2) } else { None };
    }
    Some(Sniffed::Http)
}

async fn sniff(s: &TcpStream) -> std::io::Result<Sniffed> {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = tokio::time::timeout_at(deadline, s.peek(&mut buf)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Ok(Sniffed::Closed);
        }
        if let Some(c) = classify(&buf[..n]) {
            return Ok(c);
        }
        // A prefix of the HTTP/2 preface: wait for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resets the connection (RST, not FIN: the client must not take it for a response).
fn reset(sock: TcpStream, reason: &'static str) {
    STATS.refused(reason);
    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// One client connection as the proxy sees it.
struct Conn {
    ctx: Arc<L7Context>,
    client: SocketAddr,
    server: SocketAddr,
    client_id: u32,
    server_id: u32,
    upstream: Mutex<Option<hyper::client::conn::http1::SendRequest<Incoming>>>,
}

async fn connection(sock: TcpStream, client: SocketAddr, ctx: Arc<L7Context>) -> Result<()> {
    let server = sock.local_addr()?;
    sock.set_nodelay(true)?;
    let snap = ctx.snapshot();
    let (Some(client_id), Some(server_id)) = (snap.identity(client.ip()), snap.identity(server.ip())) else {
        reset(sock, events::REFUSED_UNKNOWN_PEER);
        return Ok(());
    };
    match sniff(&sock).await? {
        Sniffed::Http => {}
        Sniffed::Tls => {
            ctx.refused_event(&snap, client, server, client_id, server_id, "http-refused-tls");
            reset(sock, events::REFUSED_TLS);
            return Ok(());
        }
        Sniffed::Http2 => {
            ctx.refused_event(&snap, client, server, client_id, server_id, "http-refused-http2");
            reset(sock, events::REFUSED_HTTP2);
            return Ok(());
        }
        Sniffed::Closed => return Ok(()),
    }
    let conn = Arc::new(Conn { ctx: ctx.clone(), client, server, client_id, server_id, upstream: Mutex::new(None) });
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });
    let r = hyper::server::conn::http1::Builder::new().keep_alive(true).half_close(false).serve_connection(TokioIo::new(sock), svc).await;
    if let Err(e) = r {
        if e.is_parse() || e.is_parse_too_large() {
            STATS.refused(events::REFUSED_MALFORMED);
            ctx.refused_event(&ctx.snapshot(), client, server, client_id, server_id, "http-refused-malformed");
        }
        return Err(e.into());
    }
    Ok(())
}

fn reply(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Hop-by-hop headers (RFC 9110 7.6.1) and `Expect` (hyper answers 100-continue to the
/// client itself): not forwarded.
fn strip_hop_by_hop(h: &mut hyper::HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()).collect::<Vec<_>>())
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"] {
        h.remove(n);
    }
}

impl Conn {
    async fn request(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().as_str().to_string();
        let raw = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_default();
        let snap = self.ctx.snapshot();
        // Absolute-form (a forward proxy's request) or anything that is no origin-form path.
        let target =
            if req.uri().scheme().is_some() || req.uri().authority().is_some() { Err(normalise::Ambiguous::NotOriginForm) } else { normalise::target(&raw) };
        let target = match target {
            Ok(t) => t,
            Err(why) => {
                STATS.request(events::BAD_REQUEST, &method);
                self.event(&snap, &method, &raw, 400, "http-bad-request", None, None);
                return reply(StatusCode::BAD_REQUEST, format!("zt: 400 Bad Request: ambiguous request target ({})\n", why.name()));
            }
        };
        let v = rules::verdict(&snap.table, self.client_id, self.server_id, self.server.port(), &method, &target.path);
        if !v.allowed {
            STATS.request(events::DENIED, &method);
            let (rule_ids, side) = match (&v.ingress, &v.egress) {
                (Judgement::Denied { rule_ids }, _) => (rule_ids.clone(), "ingress"),
                (_, Judgement::Denied { rule_ids }) => (rule_ids.clone(), "egress"),
                _ => (vec![], ""),
            };
            let names: Vec<String> = rule_ids.iter().map(|id| snap.rule_name(*id)).collect();
            let rule = names.first().cloned();
            self.event(&snap, &method, &target.path, 403, "http-denied", rule, None);
            let why = if names.is_empty() {
                "no rule of the proxy's current policy covers this flow".to_string()
            } else {
                format!("{side} HTTP rules of {} allow other requests", names.join(", "))
            };
            return reply(
                StatusCode::FORBIDDEN,
                format!(
                    "zt: 403 Forbidden: {method} {} from {} to {} denied by default ({why})\n",
                    target.path,
                    snap.identity_name(self.client_id),
                    snap.identity_name(self.server_id),
                ),
            );
        }
        let (rule_id, matched) = match (&v.ingress, &v.egress) {
            (Judgement::Allowed { rule_id, rule, .. }, _) | (_, Judgement::Allowed { rule_id, rule, .. }) => (Some(*rule_id), Some(rule.clone())),
            (Judgement::L4(id), _) | (_, Judgement::L4(id)) => (Some(*id), None),
            _ => (None, None),
        };
        match self.forward(req, &target.upstream()).await {
            Ok(mut resp) => {
                STATS.request(events::ALLOWED, &method);
                let status = resp.status().as_u16();
                strip_hop_by_hop(resp.headers_mut());
                self.event(&snap, &method, &target.path, status, "http-allowed", rule_id.map(|id| snap.rule_name(id)), matched);
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                STATS.request(events::UPSTREAM_ERROR, &method);
                self.event(&snap, &method, &target.path, 502, "http-upstream-error", rule_id.map(|id| snap.rule_name(id)), matched);
                reply(StatusCode::BAD_GATEWAY, format!("zt: 502 Bad Gateway: {e:#}\n"))
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>, target: &str) -> Result<Response<Incoming>> {
        let mut up = self.upstream.lock().await;
        if up.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = connect_transparent(self.client, self.server, self.ctx.opts.proxy_mark).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            *up = Some(sender);
        }
        let sender = up.as_mut().expect("set above");
        sender.ready().await?;
        let (mut parts, body) = req.into_parts();
        parts.uri = target.parse().context("normalised target")?;
        parts.version = hyper::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        Ok(sender.send_request(Request::from_parts(parts, body)).await?)
    }

    #[allow(clippy::too_many_arguments)]
    fn event(&self, snap: &Snapshot, method: &str, path: &str, status: u16, reason: &str, rule: Option<String>, matched: Option<String>) {
        let verdict = if (200..400).contains(&status) || reason == "http-allowed" { "allow" } else { "drop" };
        let mut e = self.ctx.record(snap, self.client, self.server, self.client_id, self.server_id, verdict, reason);
        e.rule = rule;
        e.http = Some(HttpEvent { method: method.to_string(), path: path.to_string(), status, matched });
        let _ = self.ctx.events.send(e);
    }
}

/// A connection to `server` from `client`'s address (any port), marked as the proxy's.
async fn connect_transparent(client: SocketAddr, server: SocketAddr, mark: u32) -> Result<TcpStream> {
    let domain = if server.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if server.is_ipv4() {
        s.set_ip_transparent_v4(true)?;
    } else {
        s.set_ip_transparent_v6(true)?;
    }
    s.set_mark(mark)?;
    s.bind(&SocketAddr::new(client.ip(), 0).into()).with_context(|| format!("binding {} (transparent)", client.ip()))?;
    s.set_nonblocking(true)?;
    let sock = tokio::net::TcpSocket::from_std_stream(s.into());
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(server)).await.context("connecting upstream: timed out")??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl L7Context {
    pub(super) fn record(
        &self,
        snap: &Snapshot,
        client: SocketAddr,
        server: SocketAddr,
        client_id: u32,
        server_id: u32,
        verdict: &str,
        reason: &str,
    ) -> EventRecord {
        let side =
            |a: SocketAddr, id: u32| Side { ip: a.ip().to_canonical(), port: a.port(), identity: id, spiffe_id: snap.identity_name(id), pod: snap.pod(a.ip()) };
        EventRecord {
            time_ns: crate::clock::monotonic_ns(),
            direction: "ingress".into(),
            verdict: verdict.into(),
            reason: reason.into(),
            proto: "HTTP".into(),
            src: side(client, client_id),
            dst: side(server, server_id),
            rule: None,
            ifindex: 0,
            http: None,
        }
    }

    fn refused_event(&self, snap: &Snapshot, client: SocketAddr, server: SocketAddr, client_id: u32, server_id: u32, reason: &str) {
        let _ = self.events.send(self.record(snap, client, server, client_id, server_id, "drop", reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Sniffed::Tls));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Sniffed::Http2));
        assert_eq!(classify(b"PRI * HT"), None);
        assert_eq!(classify(b"PRIX"), Some(Sniffed::Http));
        assert_eq!(classify(b"POST /post HTTP/1.1"), Some(Sniffed::Http));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = hyper::HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        h.insert("host", HeaderValue::from_static("httpbin"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("host"));
    }
}
