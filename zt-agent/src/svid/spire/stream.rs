//! The two subscription loops: open the stream, record every message as the latest, and on
//! failure or end record the error and reopen after capped doubling backoff (reset by a
//! message). A loop only writes to the stream of its own generation: one that was replaced
//! or released writes nothing.

use std::sync::Arc;

use anyhow::Context;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::delegated_identity_client::DelegatedIdentityClient;
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{SubscribeToX509BundlesRequest, SubscribeToX509sviDsRequest, X509svidWithKey};
use tonic::transport::{Channel, Endpoint};

use super::super::spiffe_id::SpiffeId;
use super::{decode, Selector, Shared, Stream};

async fn connect(shared: &Shared) -> anyhow::Result<DelegatedIdentityClient<Channel>> {
    let socket = &shared.cfg.socket;
    let ch = Endpoint::from_shared(format!("unix:{}", socket.display()))
        .with_context(|| format!("SPIRE admin socket {}", socket.display()))?
        .connect_timeout(shared.cfg.first_message_timeout)
        // A SPIRE agent that hangs without closing the socket is noticed too.
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .with_context(|| format!("connecting to SPIRE at {}", socket.display()))?;
    Ok(DelegatedIdentityClient::new(ch))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("SPIRE answered {:?}: {}", s.code(), s.message())
}

/// Records a failure on `stream` if it is still of `generation`.
fn failed<T>(stream: Option<&mut Stream<T>>, generation: u64, err: &anyhow::Error) -> bool {
    match stream {
        Some(s) if s.generation == generation => {
            s.status.up = false;
            s.status.failures += 1;
            s.status.last_error = Some(format!("{err:#}"));
            s.settled = true;
            true
        }
        _ => false,
    }
}

fn received<T>(stream: Option<&mut Stream<T>>, generation: u64, latest: T, problems: Option<String>) -> bool {
    match stream {
        Some(s) if s.generation == generation => {
            s.latest = Some(latest);
            s.status.up = true;
            s.status.messages += 1;
            s.status.last_error = problems;
            s.settled = true;
            true
        }
        _ => false,
    }
}

pub(super) async fn svids(shared: Arc<Shared>, id: SpiffeId, selectors: Vec<Selector>, generation: u64) {
    let mut failures = 0u32;
    loop {
        let r: anyhow::Result<()> = async {
            let mut c = connect(&shared).await?;
            let req = SubscribeToX509sviDsRequest { selectors: selectors.iter().map(|s| s.to_proto()).collect(), pid: 0 };
            let mut s = c.subscribe_to_x509svi_ds(req).await.map_err(status_err)?.into_inner();
            while let Some(m) = s.message().await.map_err(status_err)? {
                failures = 0;
                let latest: Vec<X509svidWithKey> = m.x509_svids;
                let ok = received(shared.state.lock().unwrap().svids.get_mut(&id).map(|s| &mut s.stream), generation, latest, None);
                if !ok {
                    return Ok(());
                }
                shared.bump();
            }
            anyhow::bail!("SPIRE ended the stream")
        }
        .await;
        let Err(e) = r else { return };
        failures += 1;
        if !failed(shared.state.lock().unwrap().svids.get_mut(&id).map(|s| &mut s.stream), generation, &e) {
            return;
        }
        log::warn!("SPIRE X509-SVID stream for {id} failed ({failures} in a row): {e:#}");
        shared.bump();
        tokio::time::sleep(shared.backoff(failures)).await;
    }
}

pub(super) async fn bundles(shared: Arc<Shared>, generation: u64) {
    let mut failures = 0u32;
    loop {
        let r: anyhow::Result<()> = async {
            let mut c = connect(&shared).await?;
            let mut s = c.subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {}).await.map_err(status_err)?.into_inner();
            while let Some(m) = s.message().await.map_err(status_err)? {
                failures = 0;
                let (b, errors) = decode::bundles(&m);
                if !errors.is_empty() {
                    log::warn!("SPIRE bundle update: left out {}", errors.join("; "));
                }
                let problems = (!errors.is_empty()).then(|| format!("left out: {}", errors.join("; ")));
                if !received(shared.state.lock().unwrap().bundles.as_mut(), generation, (b, errors), problems) {
                    return Ok(());
                }
                shared.bump();
            }
            anyhow::bail!("SPIRE ended the stream")
        }
        .await;
        let Err(e) = r else { return };
        failures += 1;
        if !failed(shared.state.lock().unwrap().bundles.as_mut(), generation, &e) {
            return;
        }
        log::warn!("SPIRE X509 bundle stream failed ({failures} in a row): {e:#}");
        shared.bump();
        tokio::time::sleep(shared.backoff(failures)).await;
    }
}
