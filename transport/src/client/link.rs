//! A client's connection on either carrier, as the driver sees it: send
//! what the session emits, receive the server's control messages.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::Carrier;
use crate::control::{Control, RejectReason};
use crate::grpc::pb;
use crate::session::Transmit;

/// Something the server said, or the end of the connection.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// A control message.
    Control(Control),
    /// The connection is gone; why, for the log.
    Lost(String),
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The server could not be reached or the handshake failed.
    #[error("{0}")]
    Unreachable(String),
    /// The server refused the session before it started (gRPC: call status).
    #[error("refused: {1}")]
    Rejected(RejectReason, String),
}

/// The sending half.
pub(crate) enum LinkTx {
    Quic { send: quinn::SendStream, conn: quinn::Connection, buf: Vec<u8> },
    Grpc { tx: mpsc::Sender<pb::PushRequest> },
}

/// An open connection.
pub(crate) struct Link {
    pub carrier: Carrier,
    pub tx: LinkTx,
    pub rx: mpsc::Receiver<LinkEvent>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("carrier", &self.carrier).finish_non_exhaustive()
    }
}

impl LinkTx {
    /// Sends one item; `Err` describes why the connection is unusable.
    pub(crate) async fn send(&mut self, t: Transmit) -> Result<(), String> {
        match self {
            LinkTx::Quic { send, buf, .. } => match t {
                Transmit::Control(c) => {
                    buf.clear();
                    c.encode(buf).map_err(|e| e.to_string())?;
                    send.write_all(buf).await.map_err(|e| e.to_string())
                }
                Transmit::Frame { bytes, .. } => send.write_all(&bytes).await.map_err(|e| e.to_string()),
            },
            LinkTx::Grpc { tx } => {
                let req = match t {
                    Transmit::Control(c) => match crate::grpc::request_to_pb(&c) {
                        Some(r) => r,
                        None => return Ok(()),
                    },
                    Transmit::Frame { bytes, .. } => pb::PushRequest {
                        // Shares the buffer: no copy on the way to the encoder.
                        body: Some(pb::push_request::Body::Frame(Bytes::from_owner(ArcFrame(Arc::clone(&bytes))))),
                    },
                };
                tx.send(req).await.map_err(|_| "gRPC request stream closed".to_owned())
            }
        }
    }

    /// Ends the connection after what was sent (best effort).
    pub(crate) async fn close(self) {
        match self {
            LinkTx::Quic { mut send, conn, .. } => {
                let _ = send.finish();
                // Give the stream a moment to drain; the server closes when done.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(500), send.stopped()).await;
                conn.close(quinn::VarInt::from_u32(0), b"");
            }
            LinkTx::Grpc { tx } => drop(tx),
        }
    }
}

/// Lets a shared frame buffer back a `Bytes` without copying.
struct ArcFrame(Arc<aperture_core::frame::FrameBuf>);

impl AsRef<[u8]> for ArcFrame {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}
