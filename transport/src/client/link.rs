//! A client's connection on either carrier, as the driver sees it: send
//! what the session emits, receive the server's control messages.

use tokio::sync::mpsc;

use super::grpc::GrpcTx;
use super::quic::QuicTx;
use crate::Carrier;
use crate::control::{Control, RejectReason};
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

/// The sending half, one variant per carrier.
pub(crate) enum LinkTx {
    Quic(QuicTx),
    Grpc(GrpcTx),
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
            LinkTx::Quic(q) => q.send(t).await,
            LinkTx::Grpc(g) => g.send(t).await,
        }
    }

    /// Ends the connection after what was sent (best effort).
    pub(crate) async fn close(self) {
        match self {
            LinkTx::Quic(q) => q.close().await,
            LinkTx::Grpc(g) => g.close(),
        }
    }
}
