//! The gRPC carrier, server side: `Push` calls, one session per call. The
//! token is checked from the `authorization` metadata before the call is
//! accepted. Requests become session input here (see [`inbound_from_pb`]).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aperture_core::frame::{self, DecodeLimits, FrameBuf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::config::ServeError;
use super::session::{Inbound, Outbound, PreAuth, SessionEnd, Shared, run_session};
use crate::Carrier;
use crate::auth::bearer_token;
use crate::control::{CloseReason, Control, RejectReason};
use crate::tls::ServerIdentity;
use crate::wire::grpc::pb::{self, ingest_server::Ingest, ingest_server::IngestServer};
use crate::wire::grpc::{close_from_pb, hello_from_pb, response_to_pb};

/// Room for the protobuf envelope around the largest frame.
const ENVELOPE: usize = 1024;

/// Largest header block a client may send (the token travels in it).
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Starts the gRPC server on `listener`; TLS with `tls`, plaintext without.
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
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(Duration::from_millis(l.idle_timeout_ms / 2)))
        .http2_keepalive_timeout(Some(Duration::from_millis(l.idle_timeout_ms / 2)));
    let acceptor = match tls {
        None => None,
        Some(id) => {
            let cfg = crate::tls::server_config(id, b"h2")?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
    };
    let mut shutdown = shared.shutdown.subscribe();
    let router = builder.add_service(svc);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<ConnIo, std::io::Error>>(64);
    let accept = tokio::spawn(accept_loop(Arc::clone(&shared), listener, acceptor, conn_tx));
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), stop).await {
            tracing::error!(error = %e, "gRPC ingress stopped");
        }
        accept.abort();
    }))
}

/// Accepts TCP connections, bounds those still authenticating, runs their
/// TLS handshakes (each within the hello timeout) and hands them to tonic.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    conns: mpsc::Sender<Result<ConnIo, std::io::Error>>,
) {
    let hello_timeout = Duration::from_millis(shared.limits.hello_timeout_ms);
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let (tcp, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accepting a gRPC connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(preauth) = PreAuth::admit(&shared) else { continue };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "setting TCP_NODELAY");
        }
        let deadline = tokio::time::Instant::now() + hello_timeout;
        let state = Arc::new(ConnState { addr, preauth: Mutex::new(Some(preauth)) });
        let acceptor = acceptor.clone();
        let conns = conns.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let stream = match acceptor {
                None => Stream::Plain(tcp),
                Some(a) => match tokio::time::timeout_at(deadline, a.accept(tcp)).await {
                    Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        shared.counters.rejection("handshake_failed");
                        tracing::debug!(%addr, error = %e, "gRPC TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        shared.counters.closed(CloseReason::HandshakeTimeout.as_str(), false);
                        tracing::debug!(%addr, "gRPC TLS handshake timed out");
                        return;
                    }
                },
            };
            let io = ConnIo { stream, state, deadline: Box::pin(tokio::time::sleep_until(deadline)) };
            let _ = conns.send(Ok(io)).await;
        });
    }
}

/// One accepted connection's state, shared with its calls.
#[derive(Debug)]
struct ConnState {
    addr: SocketAddr,
    /// Until a call on this connection authenticates.
    preauth: Mutex<Option<PreAuth>>,
}

impl ConnState {
    fn take_preauth(&self) -> Option<PreAuth> {
        // A poisoned lock still holds a valid option.
        self.preauth.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn is_authenticating(&self) -> bool {
        self.preauth.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// What a call sees of its connection (tonic puts it in the request's extensions).
#[derive(Debug, Clone)]
struct ConnInfo(Arc<ConnState>);

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection as tonic reads it: it fails once its hello is due while no
/// call on it has authenticated, which closes it.
struct ConnIo {
    stream: Stream,
    state: Arc<ConnState>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        // Counted as closed before authenticating, if it never did.
        drop(self.state.take_preauth());
    }
}

impl tonic::transport::server::Connected for ConnIo {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(Arc::clone(&self.state))
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.state.is_authenticating() && self.deadline.as_mut().poll(cx).is_ready() {
            drop(self.state.take_preauth());
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no authenticated call within the hello timeout",
            )));
        }
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

struct IngestService {
    shared: Arc<Shared>,
}

struct GrpcOut {
    tx: mpsc::Sender<Result<pb::PushResponse, Status>>,
}

impl Outbound for GrpcOut {
    async fn send(&mut self, msg: Control) -> Result<(), ()> {
        match response_to_pb(&msg) {
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
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let addr = conn.as_ref().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0.addr);
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
        if let Some(p) = conn.as_ref().and_then(|c| c.0.take_preauth()) {
            p.authenticated();
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
        Ok(Ok(Some(pb::PushRequest { body: Some(pb::push_request::Body::Hello(h)) }))) => match hello_from_pb(h) {
            Ok(h) => h,
            Err(msg) => {
                shared.counters.rejection(RejectReason::BadHello.as_str());
                let _ = tx.send(Err(Status::invalid_argument(msg))).await;
                return;
            }
        },
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
                Ok(Some(req)) => inbound_from_pb(req, &limits),
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

/// A request from a client, as the session driver wants it. Frames are
/// copied once into an aligned buffer and validated.
pub(crate) fn inbound_from_pb(req: pb::PushRequest, limits: &DecodeLimits) -> Inbound {
    use pb::push_request::Body;
    match req.body {
        Some(Body::Frame(bytes)) => {
            let header = match frame::FrameHeader::parse(&bytes, limits) {
                Ok(h) => h,
                Err(e) => return Inbound::Malformed { reason: e.reason(), detail: e.to_string() },
            };
            let mut buf = FrameBuf::with_capacity(bytes.len());
            buf.extend_from_slice(&bytes);
            match frame::decode(&buf, limits) {
                Ok(_) => Inbound::Frame(header, buf),
                Err(e) => Inbound::Malformed { reason: e.reason(), detail: e.to_string() },
            }
        }
        Some(Body::Close(c)) => Inbound::Control(Control::Close(close_from_pb(c))),
        Some(Body::Hello(_)) => {
            Inbound::Malformed { reason: "second_hello", detail: "a second hello in one call".into() }
        }
        None => Inbound::Malformed { reason: "empty_message", detail: "a PushRequest without a body".into() },
    }
}
