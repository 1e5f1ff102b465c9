//! Serving the API over HTTPS (hyper 1, HTTP/1.1): bearer-token check, GET of
//! single objects, chunked lists, and watch streams (newline-delimited JSON events,
//! bookmarks, 410 Expired, timeoutSeconds).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::protocol::{
    self, bookmark, decode_continue, encode_continue, list_item, object_key, parse_query, ApiError,
    Params, Route,
};
use super::store::{EventType, KindInfo};
use super::{Shared, Verb};

/// Watches without timeoutSeconds end after this (the real server picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A response body: one buffer, or the chunks of a watch stream.
pub enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Body::Full(None))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(Some(b)) => hyper::body::SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => hyper::body::SizeHint::with_exact(0),
            Body::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::Full(Some(Bytes::from(v.to_string()))))
        .expect("valid response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

/// Accept TLS connections on `listener` until the server is made unavailable: then
/// the listening socket closes (connections are refused, as from an unreachable API
/// server) and every open connection is cut (open watches end abruptly).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let _running = Counted::new(&shared, |s| &s.accept_loops);
    let acceptor = TlsAcceptor::from(shared.creds.server_config.clone());
    let mut outage = shared.outage.subscribe();
    loop {
        if !shared.available.load(Ordering::SeqCst) {
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = outage.changed() => return,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _open = Counted::new(&shared, |s| &s.connections);
            let mut outage = shared.outage.subscribe();
            // Going down clears `available` before bumping `outage`: one of the two
            // is seen, so no connection outlives an outage.
            if !shared.available.load(Ordering::SeqCst) {
                return;
            }
            let svc_shared = shared.clone();
            let serve = async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req| {
                    let s = svc_shared.clone();
                    async move { Ok::<_, Infallible>(handle(&s, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            };
            tokio::select! {
                _ = serve => {}
                _ = outage.changed() => {}
            }
        });
    }
}

/// Counts running accept loops / open connections while alive, so that going down
/// can wait until every socket is closed.
struct Counted(Arc<Shared>, fn(&Shared) -> &AtomicUsize);

impl Counted {
    fn new(shared: &Arc<Shared>, which: fn(&Shared) -> &AtomicUsize) -> Counted {
        which(shared).fetch_add(1, Ordering::SeqCst);
        Counted(shared.clone(), which)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        (self.1)(&self.0).fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    shared.log_request(&format!("{} {path}?{query}", req.method()));

    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {}", shared.creds.token)) {
        return error_response(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    if req.method() != Method::GET {
        return error_response(&ApiError::new(
            405,
            "MethodNotAllowed",
            "the stand-in serves GET only",
        ));
    }
    if !shared.available.load(Ordering::SeqCst) {
        return error_response(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the API server is unavailable (test fault)",
        ));
    }
    match serve_route(shared, &path, &query) {
        Ok(r) => r,
        Err(e) => error_response(&e),
    }
}

fn serve_route(shared: &Arc<Shared>, path: &str, query: &str) -> Result<Response<Body>, ApiError> {
    match protocol::route(path)? {
        Route::Version => Ok(json_response(
            200,
            &json!({
                "major": "1", "minor": "35", "gitVersion": "v1.35.0-zt-standin", "platform": "linux/amd64"
            }),
        )),
        Route::Discovery(d) => Ok(json_response(200, &d)),
        Route::Object {
            kind,
            namespace,
            name,
        } => {
            shared.count(kind.plural, Verb::Get);
            let store = shared.lock_store();
            match store.get(kind.plural, namespace.as_deref().unwrap_or(""), &name) {
                Some(o) => Ok(json_response(200, &o)),
                None => Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", kind.plural),
                )),
            }
        }
        Route::Collection { kind, namespace } => {
            let params = Params::parse(&parse_query(query), kind)?;
            if params.watch {
                shared.count(kind.plural, Verb::Watch);
                watch(shared, kind, namespace, params)
            } else {
                shared.count(kind.plural, Verb::List);
                list(shared, kind, namespace.as_deref(), &params).map(|v| json_response(200, &v))
            }
        }
    }
}

fn in_namespace(obj: &Value, ns: Option<&str>) -> bool {
    ns.is_none_or(|ns| obj.pointer("/metadata/namespace").and_then(Value::as_str) == Some(ns))
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("resourceVersion: invalid value {s:?}")))
}

fn list(
    shared: &Shared,
    kind: &'static KindInfo,
    ns: Option<&str>,
    p: &Params,
) -> Result<Value, ApiError> {
    let mut store = shared.lock_store();
    let current = store.rv();
    let (objects, rv, start) = if let Some(tok) = &p.continue_token {
        let (rv, start) = decode_continue(tok)?;
        let snap = store.snapshot_at(kind.plural, rv).ok_or_else(|| {
            ApiError::expired("The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.")
        })?;
        (snap, rv, Some(start))
    } else {
        match (
            p.resource_version.as_deref(),
            p.resource_version_match.as_deref(),
        ) {
            (None, _) | (Some("0"), _) => {}
            (Some(r), Some("Exact")) => {
                let r = parse_rv(r)?;
                if r != current {
                    return Err(ApiError::expired(format!(
                        "too old resource version: {r} ({current})"
                    )));
                }
            }
            (Some(r), _) => {
                let r = parse_rv(r)?;
                if r > current {
                    return Err(ApiError::new(
                        504,
                        "Timeout",
                        format!("Too large resource version: {r}, current: {current}"),
                    ));
                }
            }
        }
        let objs = if p.limit.is_some() {
            store.snapshot(kind.plural)
        } else {
            Arc::new(store.list(kind.plural))
        };
        (objs, current, None)
    };
    drop(store);
    let start_key = start.as_deref().map(|s| {
        let (a, b) = s.split_once('/').unwrap_or(("", s));
        (a.to_string(), b.to_string())
    });
    let matching: Vec<&Arc<Value>> = objects
        .iter()
        .filter(|o| in_namespace(o, ns) && p.matches(o))
        .filter(|o| {
            let k = object_key(o);
            let (a, b) = k.split_once('/').unwrap_or(("", &k));
            start_key
                .as_ref()
                .is_none_or(|(sa, sb)| (a, b) > (sa.as_str(), sb.as_str()))
        })
        .collect();
    let n = p.limit.unwrap_or(usize::MAX).min(matching.len());
    let items: Vec<Value> = matching[..n].iter().map(|o| list_item(kind, o)).collect();
    let remaining = matching.len() - n;
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if remaining > 0 && n > 0 {
        let k = object_key(matching[n - 1]);
        let (a, b) = k.split_once('/').unwrap_or(("", &k));
        meta["continue"] = json!(encode_continue(rv, a, b));
        meta["remainingItemCount"] = json!(remaining);
    }
    Ok(json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": kind.api_version,
        "metadata": meta,
        "items": items,
    }))
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(
    shared: &Arc<Shared>,
    kind: &'static KindInfo,
    ns: Option<String>,
    p: Params,
) -> Result<Response<Body>, ApiError> {
    if p.send_initial_events && !p.allow_bookmarks {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true",
        ));
    }
    let mut initial = vec![];
    let mut expired = None;
    let id;
    {
        let mut store = shared.lock_store();
        let start = match p.resource_version.as_deref() {
            // Unset, "0" and streaming lists start with the current state as ADDED.
            None | Some("0") => None,
            Some(_) if p.send_initial_events => None,
            Some(r) => Some(parse_rv(r)?),
        };
        let from = match start {
            None => {
                for o in store.list(kind.plural) {
                    if in_namespace(&o, ns.as_deref()) && p.matches(&o) {
                        initial.push(line(&json!({"type": "ADDED", "object": *o})));
                    }
                }
                store.rv()
            }
            Some(r) => {
                if r < store.compacted_rv() {
                    expired = Some(ApiError::expired(format!(
                        "too old resource version: {r} ({})",
                        store.compacted_rv()
                    )));
                }
                r
            }
        };
        id = store.add_watch(from);
        if p.send_initial_events {
            initial.push(line(&bookmark(kind, from, true)));
        }
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let shared = shared.clone();
    tokio::spawn(async move {
        let _guard = WatchGuard {
            shared: shared.clone(),
            id,
        };
        if let Some(e) = expired {
            let _ = tx
                .send(line(&json!({"type": "ERROR", "object": e.status()})))
                .await;
            return;
        }
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let timeout = p
            .timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_WATCH_TIMEOUT);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let every = *shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut bookmarks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut changed = shared.changed.subscribe();
        let mut end = shared.end_watches.subscribe();
        loop {
            let (lines, rv) = match drain(&shared, id, kind, ns.as_deref(), &p) {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx
                        .send(line(&json!({"type": "ERROR", "object": e.status()})))
                        .await;
                    return;
                }
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = &mut deadline => return,
                _ = end.changed() => return,
                _ = tx.closed() => return,
                _ = bookmarks.tick(), if p.allow_bookmarks => {
                    // Events up to `rv` were sent (or filtered out) by the drain above;
                    // anything newer is drained first on the next round.
                    if tx.send(line(&bookmark(kind, rv, false))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::Stream(rx))
        .expect("valid response"))
}

/// The watch's events since its position, filtered and retyped for its namespace
/// and selectors (an object that starts matching is ADDED, one that stops matching
/// is DELETED). Moves the position to the store's rv, which it returns.
fn drain(
    shared: &Shared,
    id: u64,
    kind: &KindInfo,
    ns: Option<&str>,
    p: &Params,
) -> Result<(Vec<Bytes>, u64), ApiError> {
    let mut store = shared.lock_store();
    let from = store.watch_position(id);
    let events = store
        .events_after(from)
        .map_err(|c| ApiError::expired(format!("too old resource version: {from} ({c})")))?;
    let rv = store.rv();
    store.set_watch_position(id, rv);
    drop(store);
    let visible = |o: &Value| in_namespace(o, ns) && p.matches(o);
    let mut out = vec![];
    for e in events.iter().filter(|e| e.plural == kind.plural) {
        let now = visible(&e.object);
        let before = e.old.as_deref().is_some_and(visible);
        let typ = match (e.typ, before, now) {
            (EventType::Deleted, _, true) => "DELETED",
            (EventType::Deleted, _, false) => continue,
            (_, true, true) => "MODIFIED",
            (_, false, true) => "ADDED",
            (_, true, false) => "DELETED",
            (_, false, false) => continue,
        };
        out.push(line(&json!({"type": typ, "object": *e.object})));
    }
    Ok((out, rv))
}

struct WatchGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.shared.lock_store().remove_watch(self.id);
    }
}
