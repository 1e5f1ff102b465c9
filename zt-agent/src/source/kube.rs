//! The Kubernetes API source: one kube-runtime watcher per kind (Pods of every
//! namespace, Namespaces, ServiceAccounts, Nodes, NetworkPolicies, ZeroTrustPolicies,
//! Services, EndpointSlices),
//! each forwarding its events to the agent loop over one channel. The watcher lists
//! in pages (`limit`/`continue`), then watches from the list's resourceVersion with
//! bookmarks, resumes a dropped watch from the last resourceVersion it saw, and
//! relists after 410 Gone. This module adds the backoff, the health reports and a
//! fresh relist when a watch cannot even start because its resourceVersion is gone.

use std::fmt::Debug;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, watcher, Event};
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::SourceEvent;
use crate::model::{ClusterObject, ObjectKind, ZeroTrustPolicy};

/// Client configuration from `--kubeconfig`, or else the in-cluster service account or
/// `$KUBECONFIG` / `~/.kube/config`.
pub async fn load_config(kubeconfig: Option<&Path>) -> Result<Config> {
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}: unusable", path.display()))
        }
        None => Config::infer().await.context(
            "no Kubernetes API configuration: not in a cluster (no service account token / \
             KUBERNETES_SERVICE_HOST) and no usable $KUBECONFIG or ~/.kube/config; \
             pass --kubeconfig PATH, or --manifests DIR for the directory source",
        ),
    }
}

/// Starts one watcher task per kind; they run until `tx` is closed.
pub fn spawn(config: Config, tx: mpsc::Sender<SourceEvent>) -> Result<()> {
    let url = config.cluster_url.clone();
    let client = Client::try_from(config).context("building the Kubernetes API client")?;
    log::info!("watching the Kubernetes API at {url}");
    spawn_kind(Api::<Namespace>::all(client.clone()), ObjectKind::Namespace, ClusterObject::Namespace, &tx);
    spawn_kind(Api::<ServiceAccount>::all(client.clone()), ObjectKind::ServiceAccount, ClusterObject::ServiceAccount, &tx);
    spawn_kind(Api::<Pod>::all(client.clone()), ObjectKind::Pod, ClusterObject::Pod, &tx);
    spawn_kind(Api::<Node>::all(client.clone()), ObjectKind::Node, ClusterObject::Node, &tx);
    spawn_kind(Api::<NetworkPolicy>::all(client.clone()), ObjectKind::NetworkPolicy, ClusterObject::NetworkPolicy, &tx);
    spawn_kind(Api::<ZeroTrustPolicy>::all(client.clone()), ObjectKind::ZeroTrustPolicy, ClusterObject::ZeroTrustPolicy, &tx);
    spawn_kind(Api::<Service>::all(client.clone()), ObjectKind::Service, ClusterObject::Service, &tx);
    spawn_kind(Api::<EndpointSlice>::all(client), ObjectKind::EndpointSlice, ClusterObject::EndpointSlice, &tx);
    Ok(())
}

fn spawn_kind<K>(api: Api<K>, kind: ObjectKind, wrap: fn(K) -> ClusterObject, tx: &mpsc::Sender<SourceEvent>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    tokio::spawn(watch_kind(api, kind, wrap, tx.clone()));
}

/// The watcher's defaults, spelled out: paged lists then a watch with bookmarks.
pub fn watcher_config() -> watcher::Config {
    let c = watcher::Config::default();
    debug_assert!(c.bookmarks);
    c.page_size(500)
}

/// Retry delays after a failure: 250 ms doubling to 8 s, reset by any success.
struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    const MAX: Duration = Duration::from_secs(8);

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Self::MAX);
        d
    }

    fn reset(&mut self) {
        self.0 = Self::FIRST;
    }
}

/// What to check when the API server refuses a list or watch.
fn hint(e: &watcher::Error) -> &'static str {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code,
        _ => 0,
    };
    match status {
        401 => " (the credentials are not accepted)",
        403 => " (not allowed: the ClusterRole of deploy/rbac.yaml grants get/list/watch)",
        404 => " (unknown resource: for ZeroTrustPolicy, apply deploy/crd-zerotrustpolicy.yaml)",
        _ => "",
    }
}

/// A 410 (the resourceVersion the watch would resume from is gone) returned as the
/// HTTP status of the watch request itself: kube-runtime would retry the same stale
/// version forever, so the stream is replaced by a fresh one (a relist).
fn start_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 410)
}

/// A 410 inside the watch stream: kube-runtime relists by itself; not a failure.
fn stream_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchError(s) if s.code == 410)
}

async fn watch_kind<K>(api: Api<K>, kind: ObjectKind, wrap: fn(K) -> ClusterObject, tx: mpsc::Sender<SourceEvent>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut backoff = Backoff(Backoff::FIRST);
    // Relists after 410 slow down while no watch event arrives in between, so an API
    // server that keeps expiring what it just listed is not hammered.
    let mut gone_backoff = Backoff(Backoff::FIRST);
    // Whether the last report for this kind was a failure.
    let mut down = false;
    'fresh: loop {
        let mut stream = std::pin::pin!(watcher(api.clone(), watcher_config()));
        loop {
            // While down, a re-established watch yields nothing until an object changes:
            // a one-object list tells whether the API server answers again.
            let item = if down {
                tokio::select! {
                    item = stream.next() => item,
                    _ = tokio::time::sleep(backoff.next()) => {
                        if api.list(&ListParams::default().limit(1)).await.is_ok() {
                            down = false;
                            backoff.reset();
                            log::info!("{kind}: the API server answers again");
                            if tx.send(SourceEvent::Health(kind, None)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                }
            } else {
                stream.next().await
            };
            let ev = match item {
                // The watcher stream does not end; if it did, start over.
                None => continue 'fresh,
                Some(Ok(ev)) => ev,
                Some(Err(e)) if stream_gone(&e) => {
                    log::info!("{kind}: watch expired (410 Gone), relisting");
                    tokio::time::sleep(gone_backoff.next()).await;
                    continue;
                }
                Some(Err(e)) => {
                    // Once per outage at warn level; the retries below at debug.
                    if down {
                        log::debug!("{kind}: {e}");
                    } else {
                        log::warn!("{kind}: {e}{}; the last known state stays enforced, retrying", hint(&e));
                    }
                    down = true;
                    if tx.send(SourceEvent::Health(kind, Some(e.to_string()))).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff.next()).await;
                    if start_gone(&e) {
                        continue 'fresh;
                    }
                    continue;
                }
            };
            if down {
                down = false;
                log::info!("{kind}: the API server answers again");
                if tx.send(SourceEvent::Health(kind, None)).await.is_err() {
                    return;
                }
            }
            backoff.reset();
            let ev = match ev {
                Event::Init => SourceEvent::Init(kind),
                Event::InitApply(o) => SourceEvent::InitApply(wrap(o)),
                Event::InitDone => SourceEvent::InitDone(kind),
                Event::Apply(o) => {
                    gone_backoff.reset();
                    SourceEvent::Apply(wrap(o))
                }
                Event::Delete(o) => {
                    gone_backoff.reset();
                    SourceEvent::Delete(wrap(o))
                }
            };
            if tx.send(ev).await.is_err() {
                return; // the agent is stopping
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    #[test]
    fn watcher_lists_in_pages_then_watches_with_bookmarks() {
        let c = watcher_config();
        assert!(c.bookmarks);
        assert_eq!(c.page_size, Some(500));
        assert_eq!(c.initial_list_strategy, watcher::InitialListStrategy::ListWatch);
        assert!(c.label_selector.is_none() && c.field_selector.is_none());
    }

    #[test]
    fn gone_is_told_apart_from_failures() {
        let status = |code| Box::new(Status { code, ..Default::default() });
        assert!(stream_gone(&watcher::Error::WatchError(status(410))));
        assert!(!stream_gone(&watcher::Error::WatchError(status(500))));
        assert!(start_gone(&watcher::Error::WatchStartFailed(kube::Error::Api(status(410)))));
        assert!(!start_gone(&watcher::Error::WatchStartFailed(kube::Error::Api(status(403)))));
        assert!(!start_gone(&watcher::Error::InitialListFailed(kube::Error::Api(status(410)))));
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff(Backoff::FIRST);
        let seq: Vec<u128> = (0..7).map(|_| b.next().as_millis()).collect();
        assert_eq!(seq, [250, 500, 1000, 2000, 4000, 8000, 8000]);
        b.reset();
        assert_eq!(b.next(), Backoff::FIRST);
    }

    #[tokio::test]
    async fn kubeconfig_with_ca_data_and_token() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubeconfig-stub.yaml");
        let c = load_config(Some(&path)).await.unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://127.0.0.1:18443/");
        assert_eq!(c.root_cert.as_ref().map(Vec::len), Some(1));
        assert!(c.auth_info.token.is_some());
        let e = load_config(Some(Path::new("/nonexistent/kubeconfig"))).await.unwrap_err();
        assert!(format!("{e:#}").starts_with("--kubeconfig /nonexistent/kubeconfig: "), "{e:#}");
    }
}
