//! The QUIC carrier, client side: connect, open the session stream, read
//! the server's control messages on a task, write what the session sends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::frame::DecodeLimits;
use quinn::{ConnectionError, Endpoint};
use tokio::sync::mpsc;

use super::connect::{ConnectError, LinkEvent};
use crate::control::{Control, MAX_CONTROL_BODY, Reject, RejectReason};
use crate::session::Transmit;
use crate::wire::quic::{ReadError, ReadRules, WireMsg, read_message};

/// What a QUIC client needs to connect.
#[derive(Clone)]
pub(crate) struct QuicConnector {
    pub crypto: Arc<quinn::crypto::rustls::QuicClientConfig>,
    pub transport: Arc<quinn::TransportConfig>,
    pub server_name: String,
    pub timeout: Duration,
    pub insecure: bool,
}

impl QuicConnector {
    /// Connects and opens the session stream.
    pub(crate) async fn connect(
        &self,
        endpoint: &Endpoint,
        addr: SocketAddr,
    ) -> Result<(QuicTx, mpsc::Receiver<LinkEvent>), ConnectError> {
        if self.insecure {
            tracing::warn!(%addr, "connecting over QUIC WITHOUT verifying the server certificate (insecure_skip_verify)");
        }
        let mut cfg = quinn::ClientConfig::new(self.crypto.clone());
        cfg.transport_config(Arc::clone(&self.transport));
        let connecting = endpoint
            .connect_with(cfg, addr, &self.server_name)
            .map_err(|e| ConnectError::Unreachable(format!("QUIC connect to {addr}: {e}")))?;
        let conn = match tokio::time::timeout(self.timeout, connecting).await {
            Err(_) => {
                return Err(ConnectError::Unreachable(format!(
                    "QUIC handshake with {addr} timed out after {:?} (is UDP blocked?)",
                    self.timeout
                )));
            }
            Ok(Err(e)) => return Err(ConnectError::Unreachable(format!("QUIC handshake with {addr}: {e}"))),
            Ok(Ok(c)) => c,
        };
        let (send, mut recv) =
            conn.open_bi().await.map_err(|e| ConnectError::Unreachable(format!("opening a QUIC stream: {e}")))?;
        let (tx, rx) = mpsc::channel(16);
        let watched = conn.clone();
        tokio::spawn(async move {
            // The server sends only control messages: small limits.
            let rules =
                ReadRules { limits: DecodeLimits { max_payload: 0 }, frames: false, max_control: MAX_CONTROL_BODY };
            loop {
                let ev = match read_message(&mut recv, &rules, None).await {
                    Ok(WireMsg::Control(c)) => LinkEvent::Control(c),
                    Ok(WireMsg::Frame(..)) => LinkEvent::Lost("server sent a frame".into()),
                    Err(ReadError::Malformed { detail, .. }) => {
                        LinkEvent::Lost(format!("malformed server message: {detail}"))
                    }
                    Err(ReadError::End | ReadError::Lost(_)) => {
                        let closed = watched.closed().await;
                        // A server that rejects the protocol offered closes
                        // with that code after its `Reject`; should the
                        // `Reject` be lost with the connection, the code
                        // still lets the session fall back (a second
                        // `Reject` is ignored).
                        if let Some(reject) = protocol_rejection(&closed) {
                            let _ = tx.send(LinkEvent::Control(Control::Reject(reject))).await;
                        }
                        LinkEvent::Lost(describe_close(&closed))
                    }
                };
                let last = matches!(ev, LinkEvent::Lost(_));
                if tx.send(ev).await.is_err() || last {
                    return;
                }
            }
        });
        Ok((QuicTx { send, conn, buf: Vec::with_capacity(256) }, rx))
    }
}

/// The `Reject` a connection closed as "unsupported protocol" stands for.
fn protocol_rejection(e: &ConnectionError) -> Option<Reject> {
    let ConnectionError::ApplicationClosed(c) = e else { return None };
    let unsupported = u64::from(RejectReason::UnsupportedProtocol as u16);
    (c.error_code.into_inner() == unsupported).then(|| Reject {
        reason: RejectReason::UnsupportedProtocol,
        message: String::from_utf8_lossy(&c.reason).into_owned(),
    })
}

/// Says why a connection closed, naming Aperture's application codes.
fn describe_close(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let code = u16::try_from(c.error_code.into_inner()).ok();
            let name = code
                .and_then(RejectReason::from_u16)
                .map(|r| r.as_str())
                .or_else(|| code.and_then(crate::control::CloseReason::from_u16).map(|r| r.as_str()))
                .unwrap_or("unknown");
            format!("server closed the connection: {name} ({})", String::from_utf8_lossy(&c.reason))
        }
        other => format!("QUIC connection lost: {other}"),
    }
}

/// The sending half of a QUIC link: the session stream.
pub(crate) struct QuicTx {
    send: quinn::SendStream,
    conn: quinn::Connection,
    buf: Vec<u8>,
}

impl QuicTx {
    /// Writes one control message or frame to the stream.
    pub(crate) async fn send(&mut self, t: Transmit) -> Result<(), String> {
        match t {
            Transmit::Control(c) => {
                self.buf.clear();
                c.encode(&mut self.buf).map_err(|e| e.to_string())?;
                self.send.write_all(&self.buf).await.map_err(|e| e.to_string())
            }
            Transmit::Frame { bytes, .. } => self.send.write_all(&bytes).await.map_err(|e| e.to_string()),
        }
    }

    /// Finishes the stream, lets it drain briefly, closes the connection.
    pub(crate) async fn close(mut self) {
        let _ = self.send.finish();
        // Give the stream a moment to drain; the server closes when done.
        let _ = tokio::time::timeout(Duration::from_millis(500), self.send.stopped()).await;
        self.conn.close(quinn::VarInt::from_u32(0), b"");
    }
}
