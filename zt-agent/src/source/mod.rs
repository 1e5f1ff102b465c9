//! Where the agent's `ClusterState` comes from: a manifest directory (`--manifests`,
//! polled by the agent loop, parsed by `model::source_dir`) or the Kubernetes API
//! (`kube`: watchers feeding `cache::WatchCache` through a channel).

pub mod cache;
pub mod kube;

use std::path::PathBuf;

pub use cache::{SourceEvent, WatchCache};

/// The policy source the agent runs with.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// Every `*.yaml` of a directory, re-read when it changes.
    Dir(PathBuf),
    /// List/watch the API server (in-cluster config, `$KUBECONFIG` or `--kubeconfig`).
    Kube(Box<::kube::Config>),
}
