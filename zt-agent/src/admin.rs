//! The node-local admin socket ztctl talks to. One request line per connection:
//! `events` streams live datapath events as JSON lines; `status` answers once;
//! `cni <json>` is a request of the CNI plugin, answered by the agent's loop;
//! `graph window=15m` and `posture window=15m` answer the map's JSON once (`ztctl graph`,
//! `ztctl posture`).
use std::path::PathBuf;

use anyhow::Result;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};

use crate::{agent::cni::CniCall, events::EventRecord, graph::SharedGraph, metrics::Shared};

pub async fn serve(path: PathBuf, events: broadcast::Sender<EventRecord>, metrics: Shared, cni: mpsc::Sender<CniCall>, graph: SharedGraph) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(&path)?;
    // Flow events name every workload's peers: root only.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    loop {
        let (sock, _) = listener.accept().await?;
        let mut rx = events.subscribe();
        let metrics = metrics.clone();
        let cni = cni.clone();
        let graph = graph.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            match line.trim() {
                "events" => loop {
                    match rx.recv().await {
                        Ok(ev) => {
                            let mut s = serde_json::to_string(&ev).unwrap_or_default();
                            s.push('\n');
                            if w.write_all(s.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let s = format!("{{\"lagged\":{n}}}\n");
                            if w.write_all(s.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                },
                "status" => {
                    let m = metrics.lock().unwrap().clone();
                    let s = format!(
                        "{{\"ready\":{},\"identities\":{},\"local_endpoints\":{},\"policy_errors\":{},\"policy_epoch\":{}}}\n",
                        m.ready, m.identities, m.endpoints_local, m.policy_errors_total, m.policy_epoch
                    );
                    let _ = w.write_all(s.as_bytes()).await;
                }
                cmd if cmd == "graph" || cmd.starts_with("graph ") || cmd == "posture" || cmd.starts_with("posture ") => {
                    let (what, query) = cmd.split_once(' ').unwrap_or((cmd, ""));
                    let (what, query) = (what.to_string(), query.to_string());
                    let reply = tokio::task::spawn_blocking(move || crate::graph::answer(&graph, &what, &query)).await.unwrap_or_default();
                    let _ = w.write_all(reply.as_bytes()).await;
                }
                cmd if cmd.starts_with("cni ") => {
                    let reply = crate::agent::cni::forward(&cmd[4..], &cni, &metrics).await;
                    let _ = w.write_all(reply.as_bytes()).await;
                }
                other => {
                    let _ = w.write_all(format!("{{\"error\":\"unknown request {other:?}\"}}\n").as_bytes()).await;
                }
            }
        });
    }
}
