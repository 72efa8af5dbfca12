//! The delta ADS service (`DeltaAggregatedResources`) for `istio.workload.Address`
//! and `istio.security.Authorization`.
//!
//! Each stream gets a task that owns its session (subscriptions, what was sent) and sends
//! a response only when the client can take one (a one-slot channel), building
//! it from the store at that moment: a slow client delays nobody, and what
//! changed while it was slow is sent once, at its latest version. Responses are
//! split at [`AdsService::max_response_bytes`]-ish boundaries.

mod codec;
mod session;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body::Body;
use mesh_api::discovery::DeltaDiscoveryRequest;
use mesh_net::PeerInfo;
use mesh_net::auth::{Authenticators, Caller};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Status, Streaming};

pub use codec::EncodedResponse;
pub use session::{FellBehind, Outcome, Session};

use crate::store::Store;
use codec::{RequestDecoder, ResponseBody};

/// The gRPC path of the delta stream.
pub const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Largest request accepted (requests are subscriptions and ACKs: small, but an
/// on-demand reconnect lists what the client holds).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Default split point of responses: about 3,500 workloads each.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The ADS service, ready to mount on a tonic server (it is a `tower` service
/// and a [`NamedService`]).
#[derive(Clone, Debug)]
pub struct AdsService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    auth: Authenticators,
    max_response_bytes: usize,
    shutdown: CancellationToken,
    streams: AtomicUsize,
}

impl AdsService {
    pub(crate) fn new(
        store: Store,
        auth: Authenticators,
        max_response_bytes: usize,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                auth: auth.for_service("xDS"),
                max_response_bytes,
                shutdown,
                streams: AtomicUsize::new(0),
            }),
        }
    }

    /// The split point of large responses.
    pub fn max_response_bytes(&self) -> usize {
        self.inner.max_response_bytes
    }

    /// Ends every stream (clients reconnect, to another server or to this one
    /// once it serves again) and refuses new ones: for graceful shutdown, since
    /// streams otherwise never end.
    pub fn close_streams(&self) {
        self.inner.shutdown.cancel();
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.inner.streams.load(Ordering::Relaxed)
    }

    async fn open(
        &self,
        metadata: &MetadataMap,
        peer: Option<PeerInfo>,
        requests: Streaming<DeltaDiscoveryRequest>,
    ) -> Result<mpsc::Receiver<Result<EncodedResponse, Status>>, Status> {
        let caller = Caller::new(metadata, peer.as_ref());
        if self.inner.shutdown.is_cancelled() {
            return Err(Status::unavailable("the server is shutting down"));
        }
        let authenticated = self.inner.auth.authenticate(&caller).await?;
        let client = Client {
            remote: peer
                .and_then(|p| p.remote_addr)
                .map_or_else(|| "?".to_owned(), |addr| addr.to_string()),
            identity: authenticated.map(|a| a.identity.to_string()),
            node: None,
        };
        let (responses, stream) = mpsc::channel(1);
        let inner = self.inner.clone();
        tokio::spawn(run_stream(inner, client, requests, responses));
        Ok(stream)
    }
}

/// Who is on the other end, for logs.
#[derive(Debug)]
struct Client {
    remote: String,
    identity: Option<String>,
    node: Option<String>,
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.node.as_deref().unwrap_or("<no node id>"))?;
        if let Some(identity) = &self.identity {
            write!(f, " ({identity})")?;
        }
        write!(f, " from {}", self.remote)
    }
}

struct StreamGuard<'a>(&'a AtomicUsize);

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run_stream(
    inner: Arc<Inner>,
    mut client: Client,
    mut requests: Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::Sender<Result<EncodedResponse, Status>>,
) {
    inner.streams.fetch_add(1, Ordering::Relaxed);
    let _guard = StreamGuard(&inner.streams);
    let mut revisions = inner.store.watch();
    let mut session = Session::new();
    let mut dirty = false;
    tracing::debug!(%client, "xDS stream opened");
    let ending = loop {
        tokio::select! {
            biased;
            () = inner.shutdown.cancelled() => break None,
            () = responses.closed() => break None,
            request = requests.message() => {
                let request = match request {
                    Ok(Some(request)) => request,
                    Ok(None) => break None,
                    Err(status) => break Some(status),
                };
                if client.node.is_none()
                    && let Some(node) = &request.node
                {
                    client.node = Some(node.id.clone());
                    tracing::info!(%client, "xDS client connected");
                }
                let outcome = session.handle(&request, &inner.store.read());
                match outcome {
                    Ok(Outcome::Nack { kind, nonce, error }) => {
                        tracing::warn!(%client, %kind, %nonce, %error, "client rejected a response (NACK)");
                    }
                    Ok(Outcome::Ack { kind, revision }) => {
                        tracing::trace!(%client, %kind, revision, "ACK");
                    }
                    Ok(Outcome::Subscribed | Outcome::Stale) => dirty = true,
                    Err(status) => break Some(status),
                }
            }
            changed = revisions.changed(), if !dirty => {
                if changed.is_err() {
                    break None;
                }
                dirty = true;
            }
            permit = responses.reserve(), if dirty => {
                let Ok(permit) = permit else { break None };
                revisions.borrow_and_update();
                let next = session.next_response(&inner.store.read(), inner.max_response_bytes);
                match next {
                    Ok(Some(response)) => permit.send(Ok(response)),
                    Ok(None) => dirty = false,
                    Err(behind) => break Some(Status::unavailable(behind.to_string())),
                }
            }
        }
    };
    match ending {
        Some(status) => {
            tracing::info!(%client, code = ?status.code(), error = status.message(), "xDS stream ended with an error");
            let _ = responses.send(Err(status)).await;
        }
        None => tracing::debug!(%client, "xDS stream closed"),
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl<B> tower::Service<http::Request<B>> for AdsService
where
    B: Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            if request.uri().path() != DELTA_PATH {
                return Ok(Status::unimplemented(format!(
                    "{} is not served: this server speaks delta ADS only ({DELTA_PATH})",
                    request.uri().path()
                ))
                .into_http());
            }
            let (parts, body) = request.into_parts();
            if let Some(encoding) = parts.headers.get("grpc-encoding")
                && encoding != "identity"
            {
                return Ok(Status::unimplemented(format!(
                    "compressed requests ({encoding:?}) are not supported"
                ))
                .into_http());
            }
            let peer = parts.extensions.get::<PeerInfo>().cloned();
            let metadata = MetadataMap::from_headers(parts.headers);
            let requests =
                Streaming::new_request(RequestDecoder, body, None, Some(MAX_REQUEST_BYTES));
            Ok(match service.open(&metadata, peer, requests).await {
                Ok(responses) => {
                    let mut response =
                        http::Response::new(tonic::body::Body::new(ResponseBody::new(responses)));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        tonic::metadata::GRPC_CONTENT_TYPE,
                    );
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}
