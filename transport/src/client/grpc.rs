//! The gRPC carrier, client side: one `Push` call per session, the token in
//! metadata; what the session sends becomes request messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;

use super::connect::{ConnectError, LinkEvent};
use crate::control::{Control, Reject, RejectReason};
use crate::session::Transmit;
use crate::wire::grpc::pb::{self, ingest_client::IngestClient};
use crate::wire::grpc::{request_to_pb, response_from_pb};

/// What a gRPC client needs to connect.
#[derive(Clone)]
pub(crate) struct GrpcConnector {
    /// `Bearer <token>`, when a token is configured.
    pub authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// TLS settings, when gRPC uses TLS.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    pub insecure: bool,
    pub timeout: Duration,
    pub max_message: usize,
}

impl GrpcConnector {
    /// Connects and starts the `Push` call.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<(GrpcTx, mpsc::Receiver<LinkEvent>), ConnectError> {
        let unreachable = |what: &str, e: &dyn std::error::Error| {
            ConnectError::Unreachable(format!("gRPC {what} {addr}: {}", error_chain(e)))
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| unreachable("address", &e))?
            .connect_timeout(self.timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match &self.tls {
            None => endpoint.connect().await.map_err(|e| unreachable("connect to", &e))?,
            Some((tls, name)) => {
                if self.insecure {
                    tracing::warn!(%addr, "connecting over gRPC/TLS WITHOUT verifying the server certificate (insecure_skip_verify)");
                }
                let (tls, name) = (Arc::clone(tls), name.clone());
                let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
                    let (tls, name) = (Arc::clone(&tls), name.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect(addr).await?;
                        tcp.set_nodelay(true)?;
                        let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await.map_err(|e| unreachable("TLS connect to", &e))?
            }
        };
        let mut client = IngestClient::new(channel)
            .max_decoding_message_size(crate::control::MAX_CONTROL_BODY + 1024)
            .max_encoding_message_size(self.max_message);
        let (req_tx, req_rx) = mpsc::channel::<pb::PushRequest>(16);
        let mut request = tonic::Request::new(ReceiverStream::new(req_rx));
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        let response = match tokio::time::timeout(self.timeout, client.push(request)).await {
            Err(_) => return Err(ConnectError::Unreachable(format!("gRPC Push to {addr} timed out"))),
            Ok(Err(status)) => return Err(status_error(&status)),
            Ok(Ok(r)) => r,
        };
        let mut inbound = response.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let ev = match inbound.message().await {
                    Ok(Some(resp)) => match response_from_pb(resp) {
                        Ok(c) => LinkEvent::Control(c),
                        Err(e) => LinkEvent::Lost(format!("malformed server message: {e}")),
                    },
                    Ok(None) => LinkEvent::Lost("server ended the call".into()),
                    // How a server rejects the protocol offered in the hello
                    // (the status of the call, on gRPC): the session decides
                    // whether to offer an older one.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        LinkEvent::Control(Control::Reject(Reject {
                            reason: RejectReason::UnsupportedProtocol,
                            message: status.message().to_owned(),
                        }))
                    }
                    Err(status) => LinkEvent::Lost(status_error(&status).to_string()),
                };
                let last = matches!(ev, LinkEvent::Lost(_));
                if tx.send(ev).await.is_err() || last {
                    return;
                }
            }
        });
        Ok((GrpcTx { tx: req_tx }, rx))
    }
}

/// An error and its sources, `: `-separated (tonic's transport errors say
/// only "transport error" at the top).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

fn status_error(status: &tonic::Status) -> ConnectError {
    let msg = format!("gRPC {:?}: {}", status.code(), status.message());
    match status.code() {
        tonic::Code::Unauthenticated => {
            let reason = if status.message().contains("missing") {
                RejectReason::MissingToken
            } else if status.message().contains("oversized") {
                RejectReason::OversizedToken
            } else {
                RejectReason::WrongToken
            };
            ConnectError::Rejected(reason, msg)
        }
        tonic::Code::ResourceExhausted => ConnectError::Rejected(RejectReason::TooManyConnections, msg),
        tonic::Code::FailedPrecondition => ConnectError::Rejected(RejectReason::UnsupportedProtocol, msg),
        _ => ConnectError::Unreachable(msg),
    }
}

/// The sending half of a gRPC link: the request stream of the `Push` call.
pub(crate) struct GrpcTx {
    tx: mpsc::Sender<pb::PushRequest>,
}

impl GrpcTx {
    /// Queues one control message or frame on the request stream.
    pub(crate) async fn send(&mut self, t: Transmit) -> Result<(), String> {
        let req = match t {
            Transmit::Control(c) => match request_to_pb(&c) {
                Some(r) => r,
                None => return Ok(()),
            },
            Transmit::Frame { bytes, .. } => pb::PushRequest {
                // Shares the buffer: no copy on the way to the encoder.
                body: Some(pb::push_request::Body::Frame(Bytes::from_owner(ArcFrame(bytes)))),
            },
        };
        self.tx.send(req).await.map_err(|_| "gRPC request stream closed".to_owned())
    }

    /// Ends the request stream (the call ends after what was sent).
    pub(crate) fn close(self) {
        drop(self.tx);
    }
}

/// Lets a shared frame buffer back a `Bytes` without copying.
struct ArcFrame(Arc<aperture_core::frame::FrameBuf>);

impl AsRef<[u8]> for ArcFrame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
