//! A client's connection on either carrier, as the driver sees it: send
//! what the session emits, receive the server's control messages.

use tokio::sync::mpsc;

use super::connect::LinkEvent;
use super::grpc::GrpcTx;
use super::quic::QuicTx;
use crate::Carrier;
use crate::session::Transmit;

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

impl Link {
    /// A QUIC connection.
    pub(crate) fn quic((tx, rx): (QuicTx, mpsc::Receiver<LinkEvent>)) -> Link {
        Link { carrier: Carrier::Quic, tx: LinkTx::Quic(tx), rx }
    }

    /// A gRPC connection.
    pub(crate) fn grpc((tx, rx): (GrpcTx, mpsc::Receiver<LinkEvent>)) -> Link {
        Link { carrier: Carrier::Grpc, tx: LinkTx::Grpc(tx), rx }
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
