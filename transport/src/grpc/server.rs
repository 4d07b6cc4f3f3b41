//! gRPC server adapter: `Push` calls, one session per call. The token is
//! checked from the `authorization` metadata before the call is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::pb::{self, ingest_server::Ingest, ingest_server::IngestServer};
use crate::Carrier;
use crate::auth::bearer_token;
use crate::control::{CloseReason, Control, RejectReason};
use crate::server::{Inbound, Outbound, ServeError, SessionEnd, Shared, run_session};
use crate::tls::ServerIdentity;

/// Room for the protobuf envelope around the largest frame.
const ENVELOPE: usize = 1024;

/// Starts the gRPC server on `listener`.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<&ServerIdentity>,
) -> Result<JoinHandle<()>, ServeError> {
    let l = &shared.limits;
    let max_message = l.max_frame_bytes as usize + ENVELOPE;
    let svc = IngestServer::new(IngestService { shared: Arc::clone(&shared) })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(crate::control::MAX_CONTROL_BODY + ENVELOPE);
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(l.max_streams_per_connection))
        .initial_stream_window_size(Some(l.stream_receive_window))
        .initial_connection_window_size(Some(l.connection_receive_window))
        .http2_keepalive_interval(Some(Duration::from_millis(l.idle_timeout_ms / 2)))
        .http2_keepalive_timeout(Some(Duration::from_millis(l.idle_timeout_ms / 2)))
        .tcp_nodelay(true);
    if let Some(id) = tls {
        let identity = tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)).map_err(|e| {
            ServeError::Limit { name: "tls.grpc", value: 1, reason: format!("gRPC TLS configuration: {e}") }
        })?;
    }
    let mut shutdown = shared.shutdown.subscribe();
    let router = builder.add_service(svc);
    Ok(tokio::spawn(async move {
        let incoming = TcpListenerStream::new(listener);
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC ingress stopped");
        }
    }))
}

struct IngestService {
    shared: Arc<Shared>,
}

struct GrpcOut {
    tx: mpsc::Sender<Result<pb::PushResponse, Status>>,
}

impl Outbound for GrpcOut {
    async fn send(&mut self, msg: Control) -> Result<(), ()> {
        match convert::response_to_pb(&msg) {
            Some(resp) => self.tx.send(Ok(resp)).await.map_err(|_| ()),
            // Rejections become the call's status at the end.
            None => Ok(()),
        }
    }
}

/// Status that ends a call whose session ended this way.
fn end_status(end: &SessionEnd) -> Option<Status> {
    match end {
        SessionEnd::Rejected(r) => Some(reject_status(*r, &format!("session refused: {r}"))),
        SessionEnd::Closed(
            CloseReason::Malformed | CloseReason::ProtocolViolation | CloseReason::CreditExceeded,
            m,
        ) => Some(Status::invalid_argument(m.clone())),
        SessionEnd::Closed(CloseReason::HandshakeTimeout, m) => Some(Status::deadline_exceeded(m.clone())),
        SessionEnd::Closed(..) | SessionEnd::Peer => None,
    }
}

fn reject_status(r: RejectReason, msg: &str) -> Status {
    match r {
        RejectReason::MissingToken | RejectReason::WrongToken | RejectReason::OversizedToken => {
            Status::unauthenticated(msg)
        }
        RejectReason::UnsupportedProtocol => Status::failed_precondition(msg),
        RejectReason::TooManyConnections => Status::resource_exhausted(msg),
        RejectReason::ShuttingDown => Status::unavailable(msg),
        RejectReason::BadHello => Status::invalid_argument(msg),
    }
}

struct LiveGuard(Arc<Shared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live_grpc.fetch_sub(1, Relaxed);
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type PushStream = ReceiverStream<Result<pb::PushResponse, Status>>;

    async fn push(&self, req: Request<Streaming<pb::PushRequest>>) -> Result<Response<Self::PushStream>, Status> {
        let shared = &self.shared;
        let addr = req.remote_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let verdict = match req.metadata().get("authorization") {
            None => shared.auth.verify(None),
            Some(v) => match bearer_token(v.as_bytes()) {
                // An empty bearer counts as none, as on QUIC.
                Some([]) => shared.auth.verify(None),
                Some(token) => shared.auth.verify(Some(token)),
                None if shared.auth.is_enabled() => Err(RejectReason::WrongToken),
                None => Ok(()),
            },
        };
        if let Err(r) = verdict {
            shared.counters.rejection(r.as_str());
            tracing::warn!(carrier = "grpc", %addr, reason = r.as_str(), "agent session rejected");
            return Err(reject_status(r, &format!("authentication failed: {r}")));
        }
        if *shared.shutdown.borrow() {
            shared.counters.rejection(RejectReason::ShuttingDown.as_str());
            return Err(reject_status(RejectReason::ShuttingDown, "server shutting down"));
        }
        if shared.live_grpc.fetch_add(1, Relaxed) >= shared.limits.max_connections {
            shared.live_grpc.fetch_sub(1, Relaxed);
            shared.counters.rejection(RejectReason::TooManyConnections.as_str());
            return Err(reject_status(RejectReason::TooManyConnections, "too many concurrent sessions"));
        }
        let guard = LiveGuard(Arc::clone(shared));
        let stream = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(run_call(Arc::clone(shared), addr, stream, tx, guard));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn run_call(
    shared: Arc<Shared>,
    addr: SocketAddr,
    mut stream: Streaming<pb::PushRequest>,
    tx: mpsc::Sender<Result<pb::PushResponse, Status>>,
    _guard: LiveGuard,
) {
    let hello_timeout = Duration::from_millis(shared.limits.hello_timeout_ms);
    let first = tokio::time::timeout(hello_timeout, stream.message()).await;
    let hello = match first {
        Ok(Ok(Some(pb::PushRequest { body: Some(pb::push_request::Body::Hello(h)) }))) => {
            match convert::hello_from_pb(h) {
                Ok(h) => h,
                Err(msg) => {
                    shared.counters.rejection(RejectReason::BadHello.as_str());
                    let _ = tx.send(Err(Status::invalid_argument(msg))).await;
                    return;
                }
            }
        }
        Ok(Ok(Some(_))) => {
            shared.counters.decode_error("hello_expected");
            let _ = tx.send(Err(Status::invalid_argument("the first PushRequest must be a hello"))).await;
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(status)) => {
            count_status(&shared, &status);
            return;
        }
        Err(_) => {
            shared.counters.closed(CloseReason::HandshakeTimeout.as_str(), false);
            let _ = tx.send(Err(Status::deadline_exceeded("no hello received in time"))).await;
            return;
        }
    };
    let (in_tx, in_rx) = mpsc::channel(8);
    let limits = shared.decode_limits;
    let reader_shared = Arc::clone(&shared);
    let reader = tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(req)) => convert::inbound_from_pb(req, &limits),
                Ok(None) => return,
                Err(status) => {
                    if status.code() == tonic::Code::OutOfRange {
                        Inbound::Malformed { reason: "oversized", detail: status.message().to_owned() }
                    } else {
                        count_status(&reader_shared, &status);
                        return;
                    }
                }
            };
            let stop = matches!(item, Inbound::Malformed { .. });
            if in_tx.send(item).await.is_err() || stop {
                return;
            }
        }
    });
    let mut out = GrpcOut { tx: tx.clone() };
    let end = run_session(shared, Carrier::Grpc, addr, in_rx, &mut out, Some(hello)).await;
    reader.abort();
    if let Some(status) = end_status(&end) {
        let _ = tx.send(Err(status)).await;
    }
}

fn count_status(shared: &Shared, status: &Status) {
    // Transport-level failures (reset streams, broken connections) are not
    // decode errors of ours; protobuf decoding failures are.
    if status.code() == tonic::Code::Internal && status.message().contains("decode") {
        shared.counters.decode_error("protobuf");
    } else {
        tracing::debug!(code = ?status.code(), message = status.message(), "gRPC stream ended with an error");
    }
}
