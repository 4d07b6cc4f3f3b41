//! OTLP profiles ingest over gRPC:
//! `opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export`
//! on a listener of its own (OTLP's port, 4317, by default).
//!
//! The message definitions are those of the `opentelemetry-proto` crate
//! (OTLP proto v1.10.0), re-exported in [`proto`]. This carrier checks the
//! token (`authorization: Bearer <token>` metadata) before it reads the
//! body, bounds the message size, accepts gzip, and hands the request's
//! bytes to an [`OtlpSink`]: decoding, mapping and storing are the
//! aggregator's. The call is answered once the sink's future completes, so
//! a success means what the sink promises (committed, for the aggregator).
//!
//! The request is passed on undecoded so that a malformed message is
//! refused as `INVALID_ARGUMENT` by whoever decodes it (tonic's own decoder
//! would answer `INTERNAL`), and so that the gRPC and HTTP paths share one
//! decoder.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService, UnaryService};

use super::config::ServeError;
use crate::Carrier;
use crate::auth::{AuthConfig, Authenticator, bearer_token};
use crate::tls::ServerTlsConfig;

/// The OTLP messages (proto v1.10.0) as the `opentelemetry-proto` crate
/// generates them.
pub mod proto {
    pub use opentelemetry_proto::tonic::collector::profiles::v1development as collector;
    pub use opentelemetry_proto::tonic::common::v1 as common;
    pub use opentelemetry_proto::tonic::profiles::v1development as profiles;
    pub use opentelemetry_proto::tonic::resource::v1 as resource;
}

/// The OTLP proto release the messages come from.
pub const OTLP_PROTO_VERSION: &str = "1.10.0";

/// OTLP's gRPC port.
pub const DEFAULT_OTLP_GRPC_PORT: u16 = 4317;

/// The gRPC service name.
pub const SERVICE: &str = "opentelemetry.proto.collector.profiles.v1development.ProfilesService";

/// The path of the one method.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// Why a request was not taken, in terms both OTLP transports can answer:
/// a gRPC status code, an HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpCode {
    /// Malformed, or over a limit that a retry will not change (labels): not retryable.
    InvalidArgument,
    /// No or a wrong token.
    Unauthenticated,
    /// The message is over the size limit.
    TooLarge,
    /// The aggregator is busy or its store is down: retry later.
    Unavailable,
}

impl OtlpCode {
    /// The gRPC status code.
    pub fn grpc(self) -> tonic::Code {
        match self {
            OtlpCode::InvalidArgument => tonic::Code::InvalidArgument,
            OtlpCode::Unauthenticated => tonic::Code::Unauthenticated,
            OtlpCode::TooLarge => tonic::Code::ResourceExhausted,
            OtlpCode::Unavailable => tonic::Code::Unavailable,
        }
    }
}

/// A refused request: the code and what the sender should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpRefusal {
    /// What kind of refusal.
    pub code: OtlpCode,
    /// A message naming what was wrong.
    pub message: String,
}

/// What [`OtlpSink::export`] returns.
pub type ExportFuture = Pin<Box<dyn Future<Output = Result<(), OtlpRefusal>> + Send + 'static>>;

/// Where the OTLP carrier hands requests.
pub trait OtlpSink: Send + Sync + 'static {
    /// Takes one encoded `ExportProfilesServiceRequest` (decompressed,
    /// within the size limit, from an authenticated sender). The call is
    /// answered with the future's outcome.
    fn export(&self, request: Bytes) -> ExportFuture;

    /// A request refused before it reached [`OtlpSink::export`] (token,
    /// size), for the sink's counters.
    fn refused(&self, code: OtlpCode);
}

/// How the OTLP gRPC listener runs.
#[derive(Clone, Debug)]
pub struct OtlpServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// The ingest token (as agents present it).
    pub auth: AuthConfig,
    /// Certificate: the aggregator's own (TLS unless `insecure_plaintext`).
    pub tls: ServerTlsConfig,
    /// Where a self-signed certificate is created and kept.
    pub data_dir: PathBuf,
    /// Largest request, bytes, after decompression.
    pub max_message_bytes: usize,
    /// Most concurrent calls per connection.
    pub max_concurrent_streams: u32,
    /// Most connections at once; more are closed at once (and counted as busy).
    pub max_connections: usize,
    /// A connection without traffic for this long is closed.
    pub idle_timeout: std::time::Duration,
}

/// A running OTLP gRPC listener.
#[derive(Debug)]
pub struct OtlpServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl OtlpServer {
    /// The bound address (the real port when configured with 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening, lets calls in flight finish for up to a second,
    /// then closes every connection.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if tokio::time::timeout(std::time::Duration::from_secs(1), &mut self.task).await.is_err() {
            self.task.abort();
            let _ = (&mut self.task).await;
        }
    }
}

/// Binds the listener and serves `ProfilesService/Export` into `sink`.
pub async fn serve_otlp(config: OtlpServerConfig, sink: Arc<dyn OtlpSink>) -> Result<OtlpServer, ServeError> {
    let auth = Authenticator::new(&config.auth)?;
    let addr = config.listen;
    let bind_error = |source| ServeError::Bind { carrier: Carrier::Grpc, addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let idle = config.idle_timeout.max(std::time::Duration::from_secs(1));
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(config.max_concurrent_streams.max(1)))
        .http2_max_header_list_size(16 * 1024)
        .http2_keepalive_interval(Some(idle / 2))
        .http2_keepalive_timeout(Some(idle / 2));
    let plaintext = config.tls.insecure_plaintext;
    if plaintext {
        tracing::warn!(addr = %bound, "OTLP gRPC ingress WITHOUT TLS (tls.insecure_plaintext)");
    } else {
        let id = crate::tls::load_or_create_identity(&config.tls, &config.data_dir)?;
        let identity = tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity)).map_err(|e| {
            ServeError::Limit { name: "tls", value: 0, reason: format!("the certificate does not suit gRPC: {e}") }
        })?;
    }
    let service = ExportService { sink: Arc::clone(&sink), auth, max_message: config.max_message_bytes.max(1) };
    let router = builder.add_service(service);
    let (stop, mut stopped) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel::<Result<Limited, std::io::Error>>(64);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let accept = tokio::spawn(accept_loop(listener, slots, sink, conn_tx, stopped.clone()));
    let task = tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), stop).await {
            tracing::error!(error = %e, "OTLP gRPC ingress stopped");
        }
        accept.abort();
    });
    tracing::info!(addr = %bound, tls = !plaintext, "OTLP gRPC ingress listening");
    Ok(OtlpServer { addr: bound, stop, task })
}

/// Accepts connections while fewer than `max_connections` are open.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
    sink: Arc<dyn OtlpSink>,
    conns: mpsc::Sender<Result<Limited, std::io::Error>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.wait_for(|s| *s) => return,
        };
        let (tcp, addr) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!(error = %e, "accepting an OTLP gRPC connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            sink.refused(OtlpCode::Unavailable);
            tracing::debug!(%addr, "OTLP gRPC connection refused: too many open (limits.max_connections)");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        if conns.send(Ok(Limited { tcp, _permit: permit })).await.is_err() {
            return;
        }
    }
}

/// A connection holding one of the `max_connections` slots until it closes.
struct Limited {
    tcp: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// The service: the token is checked from the headers before the body is
/// read; the rest is tonic's unary handling with [`RawCodec`].
#[derive(Clone)]
struct ExportService {
    sink: Arc<dyn OtlpSink>,
    auth: Authenticator,
    max_message: usize,
}

impl NamedService for ExportService {
    const NAME: &'static str = SERVICE;
}

type BoxResponse = Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for ExportService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxResponse;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> BoxResponse {
        if req.uri().path() != EXPORT_PATH {
            let status = Status::unimplemented(format!("{} is not served here; only {EXPORT_PATH}", req.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let presented = req.headers().get(http::header::AUTHORIZATION).and_then(|v| bearer_token(v.as_bytes()));
        if self.auth.verify(presented).is_err() {
            self.sink.refused(OtlpCode::Unauthenticated);
            let status = Status::unauthenticated(
                "missing or wrong token: send `authorization: Bearer <token>` metadata with the ingest token \
                 (APERTURE_INGEST_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
            );
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let sink = Arc::clone(&self.sink);
        let max = self.max_message;
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec)
                .accept_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(max)
                .max_encoding_message_size(64 * 1024);
            let response = grpc.unary(ExportCall { sink: Arc::clone(&sink) }, req).await;
            // tonic refuses an oversized message itself (OUT_OF_RANGE, or
            // RESOURCE_EXHAUSTED once decompressed); `ExportCall` never
            // answers with either.
            let code = response.headers().get("grpc-status").and_then(|v| v.to_str().ok());
            if matches!(code, Some("8" | "11")) {
                sink.refused(OtlpCode::TooLarge);
            }
            Ok(response)
        })
    }
}

/// One `Export` call, after decoding: the sink decides.
struct ExportCall {
    sink: Arc<dyn OtlpSink>,
}

impl UnaryService<Bytes> for ExportCall {
    type Response = Bytes;
    type Future = Pin<Box<dyn Future<Output = Result<tonic::Response<Bytes>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let fut = self.sink.export(request.into_inner());
        Box::pin(async move {
            match fut.await {
                // An empty ExportProfilesServiceResponse: no partial success.
                Ok(()) => Ok(tonic::Response::new(Bytes::new())),
                Err(r) => Err(Status::new(r.code.grpc(), r.message)),
            }
        })
    }
}

/// Messages as bytes, both ways.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::AsyncReadExt;

    #[derive(Default)]
    struct Counting(Mutex<Vec<OtlpCode>>);

    impl OtlpSink for Counting {
        fn export(&self, _request: Bytes) -> ExportFuture {
            Box::pin(async { Ok(()) })
        }

        fn refused(&self, code: OtlpCode) {
            self.0.lock().expect("lock").push(code);
        }
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sink = Arc::new(Counting::default());
        let config = OtlpServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            auth: AuthConfig { token: Some("t".into()), disabled: false },
            tls: ServerTlsConfig { insecure_plaintext: true, ..ServerTlsConfig::default() },
            data_dir: dir.path().to_owned(),
            max_message_bytes: 1024,
            max_concurrent_streams: 1,
            max_connections: 1,
            idle_timeout: std::time::Duration::from_secs(30),
        };
        let server = serve_otlp(config, Arc::clone(&sink) as Arc<dyn OtlpSink>).await.expect("serve");
        let _held = TcpStream::connect(server.addr()).await.expect("first connection");
        let mut second = TcpStream::connect(server.addr()).await.expect("second connection");
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), second.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the second connection is closed unanswered");
        assert_eq!(*sink.0.lock().expect("lock"), [OtlpCode::Unavailable]);
        server.shutdown().await;
    }
}
