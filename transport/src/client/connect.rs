//! What a carrier's connect gives the driver besides its sending half: the
//! server's messages as events, and why a connection attempt failed.

use crate::control::{Control, RejectReason};

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
