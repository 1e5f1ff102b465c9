//! A small, faithful Kubernetes API stand-in for testing zt-agent's Kubernetes
//! source: an HTTPS server (TLS with a throwaway CA, bearer token) that serves the
//! kinds the agent watches from the test bed's YAML with the real list/watch
//! protocol (chunked lists, resourceVersions, watch streams, bookmarks, 410 Expired).
//!
//! Tests change the cluster by writing files in the manifest directory; the server
//! polls it (every 50 ms, or [`ApiServer::sync_now`]) and turns each change into
//! ADDED / MODIFIED / DELETED events with resourceVersions from one global counter.
//! Listeners can be opened inside network namespaces (an agent in a node's netns
//! cannot reach the test process's loopback); all share one store.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let api = zt_testbed::ApiServer::start("labs/two-nodes".as_ref())?;
//! let l = api.listen_in(None)?;
//! let kubeconfig = api.kubeconfig(&l)?;
//! # Ok(()) }
//! ```

mod http;
mod protocol;
mod store;
mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::sys;
use store::Store;
use tls::Credentials;

pub use protocol::parse_selector;
pub use store::KINDS;

/// How often the manifest directory is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Events retained for watch resumption (older resourceVersions get 410 Expired).
const HISTORY: usize = 10_000;
/// Default interval between BOOKMARK events on watches that allow them.
const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// Kind of request, for [`ApiServer::requests`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verb {
    List,
    Watch,
    Get,
}

/// State shared by the listeners, the poller and the [`ApiServer`] handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Bumped (to the store's rv) after every change, to wake watches.
    changed: tokio::sync::watch::Sender<u64>,
    available: AtomicBool,
    /// Bumped when the server goes down: listeners close, open connections are cut.
    outage: tokio::sync::watch::Sender<u64>,
    /// Bumped to end every open watch stream cleanly.
    end_watches: tokio::sync::watch::Sender<u64>,
    accept_loops: AtomicUsize,
    connections: AtomicUsize,
    listeners: Mutex<Vec<Listener>>,
    bookmark_interval: Mutex<Duration>,
    counters: Mutex<BTreeMap<(String, Verb), u64>>,
    log: Mutex<Vec<String>>,
    creds: Credentials,
    dir: PathBuf,
    stop: AtomicBool,
}

impl Shared {
    fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, resource: &str, verb: Verb) {
        *self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((resource.to_string(), verb))
            .or_default() += 1;
    }

    fn log_request(&self, line: &str) {
        let mut l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if l.len() < 100_000 {
            l.push(line.to_string());
        }
    }

    /// Load the directory and apply the differences. On a bad load the store keeps
    /// its state (nothing half-applied) and the error is kept for `last_load_error`.
    fn sync(&self) -> Result<usize> {
        let loaded = store::load_dir(&self.dir);
        let mut store = self.lock_store();
        match loaded {
            Ok(objs) => {
                store.last_error = None;
                let n = store.apply(objs, SystemTime::now());
                if n > 0 {
                    self.changed.send_replace(store.rv());
                }
                Ok(n)
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if store.last_error.as_deref() != Some(&msg) {
                    eprintln!("zt-testbed apiserver: keeping the last good state: {msg}");
                }
                store.last_error = Some(msg);
                Err(e)
            }
        }
    }
}

/// An address the stand-in listens on, and the netns it is reachable in.
#[derive(Clone, Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    pub netns: Option<PathBuf>,
}

/// The Kubernetes API stand-in. Dropping it stops every listener and open watch.
pub struct ApiServer {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    poller: Option<JoinHandle<()>>,
    tmp: PathBuf,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl ApiServer {
    /// Load `manifests_dir` (must be valid) and start polling it. No listener yet.
    pub fn start(manifests_dir: &Path) -> Result<ApiServer> {
        let creds = Credentials::generate().context("making the stand-in's certificates")?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(HISTORY)),
            changed: tokio::sync::watch::channel(0).0,
            available: AtomicBool::new(true),
            outage: tokio::sync::watch::channel(0).0,
            end_watches: tokio::sync::watch::channel(0).0,
            accept_loops: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            listeners: Mutex::new(vec![]),
            bookmark_interval: Mutex::new(DEFAULT_BOOKMARK_INTERVAL),
            counters: Mutex::new(BTreeMap::new()),
            log: Mutex::new(vec![]),
            creds,
            dir: manifests_dir.to_path_buf(),
            stop: AtomicBool::new(false),
        });
        shared
            .sync()
            .with_context(|| format!("loading {}", manifests_dir.display()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("zt-apiserver")
            .enable_all()
            .build()?;
        let s = shared.clone();
        let poller = std::thread::Builder::new()
            .name("zt-apiserver-poll".into())
            .spawn(move || {
                while !s.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(POLL_INTERVAL);
                    let _ = s.sync();
                }
            })?;
        let tmp = std::env::temp_dir().join(format!(
            "zt-apiserver-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&tmp)?;
        Ok(ApiServer {
            shared,
            rt: Some(rt),
            poller: Some(poller),
            tmp,
        })
    }

    /// Load the manifest directory now; returns the number of events it made.
    pub fn sync_now(&self) -> Result<usize> {
        self.shared.sync()
    }

    /// Listen on 127.0.0.1:<random port> in the netns at `netns_path` (None: the
    /// test process's own netns). The listener serves until the server is dropped.
    pub fn listen_in(&self, netns_path: Option<&Path>) -> Result<Listener> {
        let l = Listener {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            netns: netns_path.map(Path::to_path_buf),
        };
        let addr = self.open(&l)?;
        let l = Listener { addr, ..l };
        self.shared
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l.clone());
        Ok(l)
    }

    /// Bind `l` (in its netns) and serve it; returns the bound address.
    fn open(&self, l: &Listener) -> Result<SocketAddr> {
        let addr = l.addr;
        let bind = move || -> Result<std::net::TcpListener> {
            // std sets SO_REUSEADDR, so the same port binds again after an outage.
            let s = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        // A socket stays in the netns it was created in.
        let std_listener = match &l.netns {
            Some(p) => sys::in_netns(p, bind)??,
            None => bind()?,
        };
        let bound = std_listener.local_addr()?;
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        rt.spawn(http::serve(listener, self.shared.clone()));
        Ok(bound)
    }

    /// Write a kubeconfig for `listener` (server https://127.0.0.1:<port>, the CA,
    /// the bearer token); the file lives until the server is dropped.
    pub fn kubeconfig(&self, listener: &Listener) -> Result<PathBuf> {
        let p = self
            .tmp
            .join(format!("kubeconfig-{}", listener.addr.port()));
        self.shared.creds.write_kubeconfig(&p, listener.addr)?;
        Ok(p)
    }

    /// The bearer token clients must send.
    pub fn token(&self) -> &str {
        &self.shared.creds.token
    }

    /// The CA certificate (PEM) that signed the server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.shared.creds.ca_pem
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().rv()
    }

    /// Drop the event history: a watch resuming from any resourceVersion handed out
    /// so far (except by a bookmark sent later) gets an in-stream 410 Expired, and
    /// open `continue` tokens expire. Open, caught-up watches stay open.
    pub fn compact(&self) {
        let rv = {
            let mut s = self.shared.lock_store();
            s.compact();
            s.rv()
        };
        self.shared.changed.send_replace(rv);
    }

    /// false: the API becomes unreachable: every listening socket closes (new
    /// connections are refused) and every open connection is cut (watches end
    /// abruptly). true: listen again on the same addresses.
    pub fn set_available(&self, up: bool) -> Result<()> {
        let was = self.shared.available.swap(up, Ordering::SeqCst);
        if was && !up {
            self.shared.outage.send_modify(|n| *n += 1);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            // Nothing reaches a client after this returns.
            while self.shared.accept_loops.load(Ordering::SeqCst) > 0
                || self.shared.connections.load(Ordering::SeqCst) > 0
                || self.open_watches() > 0
            {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "listeners, connections or watches did not close"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !was && up {
            let ls = self
                .shared
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for l in &ls {
                self.open(l)?;
            }
        }
        Ok(())
    }

    /// End every open watch stream cleanly, as their timeouts would: clients resume
    /// from the last resourceVersion they saw (after [`ApiServer::compact`]: into a 410).
    pub fn end_watches(&self) {
        self.shared.end_watches.send_modify(|n| *n += 1);
    }

    /// Interval between BOOKMARK events, for watches started after the call.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self
            .shared
            .bookmark_interval
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = every;
    }

    /// Requests served (authorized, while available) for `resource` (plural, e.g.
    /// "pods") and `verb`.
    pub fn requests(&self, resource: &str, verb: Verb) -> u64 {
        self.request_counts()
            .get(&(resource.to_string(), verb))
            .copied()
            .unwrap_or(0)
    }

    /// All counters: (resource, verb) -> requests served.
    pub fn request_counts(&self) -> BTreeMap<(String, Verb), u64> {
        self.shared
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every request received, as `GET /path?query` (also unauthorized/refused ones).
    pub fn request_log(&self) -> Vec<String> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Number of watch streams open now.
    pub fn open_watches(&self) -> usize {
        self.shared.lock_store().open_watches()
    }

    /// The error of the last manifest load, if it failed (the old state is kept).
    pub fn last_load_error(&self) -> Option<String> {
        self.shared.lock_store().last_error.clone()
    }
}

#[cfg(test)]
#[test]
fn api_server_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ApiServer>();
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.rt.take() {
            // Also allowed inside another runtime (async tests).
            rt.shutdown_background();
        }
        if let Some(p) = self.poller.take() {
            let _ = p.join();
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}
