//! The gRPC side of the stand-in: tonic's HTTP/2 server on a Unix socket, routing the two
//! streaming methods of `spire.api.agent.delegatedidentity.v1.DelegatedIdentity` by path
//! (what tonic-build's server code does; spire-api ships only the client) and answering
//! UNIMPLEMENTED for the others (FetchJWTSVIDs, SubscribeToJWTBundles).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use spire_api::pb::spire::api::agent::delegatedidentity::v1::{
    SubscribeToX509BundlesRequest, SubscribeToX509BundlesResponse, SubscribeToX509sviDsRequest, SubscribeToX509sviDsResponse, X509svidWithKey,
};
use spire_api::pb::spire::api::types::{Spiffeid, X509svid};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::codegen::{http, Body, BoxFuture, Context, Poll, Service, StdError};
use tonic::{Request, Response, Status};

use super::{Inner, IssuedSvid};

const SERVICE: &str = "spire.api.agent.delegatedidentity.v1.DelegatedIdentity";

pub(super) struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Graceful (streams end with UNAVAILABLE, connections close); forced after 5 s.
    pub(super) async fn stop(mut self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }

    pub(super) fn abort(self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

pub(super) fn serve(inner: Arc<Inner>, socket: &Path) -> Result<Running> {
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).with_context(|| format!("binding the SPIRE stand-in to {}", socket.display()))?;
    let (stop, stop_rx) = watch::channel(false);
    let svc = Svc { inner, stop: stop_rx.clone() };
    let mut signal = stop_rx;
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = signal.wait_for(|s| *s).await;
        };
        if let Err(e) = tonic::transport::Server::builder().serve_with_incoming_shutdown(svc, UnixListenerStream::new(listener), shutdown).await {
            eprintln!("SPIRE stand-in: server error: {e}");
        }
    });
    Ok(Running { stop, task })
}

#[derive(Clone)]
struct Svc {
    inner: Arc<Inner>,
    stop: watch::Receiver<bool>,
}

impl tonic::server::NamedService for Svc {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for Svc
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (inner, stop) = (self.inner.clone(), self.stop.clone());
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let resp = match path.strip_prefix(&format!("/{SERVICE}/")) {
                Some("SubscribeToX509SVIDs") => tonic::server::Grpc::new(tonic_prost::ProstCodec::default()).server_streaming(Svids { inner, stop }, req).await,
                Some("SubscribeToX509Bundles") => {
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::default()).server_streaming(Bundles { inner, stop }, req).await
                }
                _ => Status::unimplemented(format!("the SPIRE stand-in does not serve {path}")).into_http(),
            };
            Ok(resp)
        })
    }
}

fn to_proto(s: &IssuedSvid) -> X509svidWithKey {
    X509svidWithKey {
        x509_svid: Some(X509svid {
            cert_chain: s.chain.iter().map(|c| c.clone().into()).collect(),
            id: Some(Spiffeid { trust_domain: s.trust_domain.clone(), path: s.path.clone() }),
            expires_at: s.expires_at,
            hint: String::new(),
        }),
        x509_svid_key: s.key_pkcs8.clone().into(),
    }
}

/// Runs one stream: `make` builds the current message; it is sent first and then whenever it
/// differs from the last one sent. Ends with UNAVAILABLE when the stand-in stops.
fn stream<T, F>(inner: Arc<Inner>, mut stop: watch::Receiver<bool>, make: F) -> ReceiverStream<Result<T, Status>>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(&Inner) -> Result<T, Status> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    let mut changes = inner.changes.subscribe();
    inner.state.lock().unwrap().open_streams += 1;
    tokio::spawn(async move {
        let mut last: Option<T> = None;
        loop {
            match make(&inner) {
                Ok(m) if last.as_ref() == Some(&m) => {}
                Ok(m) => {
                    if tx.send(Ok(m.clone())).await.is_err() {
                        break;
                    }
                    last = Some(m);
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    let _ = tx.send(Err(Status::unavailable("the SPIRE stand-in stopped"))).await;
                    break;
                }
                _ = tx.closed() => break,
            }
        }
        inner.state.lock().unwrap().open_streams -= 1;
    });
    ReceiverStream::new(rx)
}

/// SPIRE's answer to a caller that is not an authorized delegate.
fn deny(inner: &Inner) -> Result<(), Status> {
    match inner.state.lock().unwrap().deny_callers {
        true => Err(Status::permission_denied("caller not configured as an authorized delegate")),
        false => Ok(()),
    }
}

struct Svids {
    inner: Arc<Inner>,
    stop: watch::Receiver<bool>,
}

impl tonic::server::ServerStreamingService<SubscribeToX509sviDsRequest> for Svids {
    type Response = SubscribeToX509sviDsResponse;
    type ResponseStream = ReceiverStream<Result<SubscribeToX509sviDsResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<SubscribeToX509sviDsRequest>) -> Self::Future {
        let (inner, stop) = (self.inner.clone(), self.stop.clone());
        Box::pin(async move {
            deny(&inner)?;
            let req = req.into_inner();
            if req.pid != 0 || req.selectors.is_empty() {
                return Err(Status::invalid_argument("the SPIRE stand-in subscribes by selectors only"));
            }
            let selectors: BTreeSet<String> = req.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect();
            inner.state.lock().unwrap().subscriptions.push(selectors.iter().cloned().collect());
            Ok(Response::new(stream(inner, stop, move |i| {
                let svids = i.svids_for(&selectors).map_err(|e| Status::internal(format!("{e:#}")))?;
                Ok(SubscribeToX509sviDsResponse { x509_svids: svids.iter().map(to_proto).collect(), federates_with: Vec::new() })
            })))
        })
    }
}

struct Bundles {
    inner: Arc<Inner>,
    stop: watch::Receiver<bool>,
}

impl tonic::server::ServerStreamingService<SubscribeToX509BundlesRequest> for Bundles {
    type Response = SubscribeToX509BundlesResponse;
    type ResponseStream = ReceiverStream<Result<SubscribeToX509BundlesResponse, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, _req: Request<SubscribeToX509BundlesRequest>) -> Self::Future {
        let (inner, stop) = (self.inner.clone(), self.stop.clone());
        Box::pin(async move {
            deny(&inner)?;
            Ok(Response::new(stream(inner, stop, |i| {
                let (k, v) = i.bundle();
                Ok(SubscribeToX509BundlesResponse { ca_certificates: [(k, v.into())].into_iter().collect() })
            })))
        })
    }
}
