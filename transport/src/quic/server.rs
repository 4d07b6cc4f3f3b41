//! QUIC server adapter: accept connections, one session per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use quinn::{Endpoint, Incoming, SendStream, VarInt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::{ReadError, WireMsg, read_message};
use crate::Carrier;
use crate::control::{Control, RejectReason};
use crate::server::{Inbound, Outbound, ServeError, SessionEnd, Shared, run_session};
use crate::tls::{QUIC_ALPN, ServerIdentity};

/// How long a closing server waits for the client to read its last
/// messages before closing the connection under it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Binds the endpoint.
pub(crate) fn endpoint(shared: &Shared, id: &ServerIdentity, addr: SocketAddr) -> Result<Endpoint, ServeError> {
    let l = &shared.limits;
    let crypto = crate::tls::server_config(id, QUIC_ALPN)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).map_err(|e| ServeError::Limit {
        name: "tls",
        value: 0,
        reason: format!("the TLS configuration cannot carry QUIC: {e}"),
    })?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(super::transport_config(
        l.stream_receive_window,
        l.connection_receive_window,
        Duration::from_millis(l.idle_timeout_ms),
        l.max_streams_per_connection,
        None,
    ));
    let bind = |source| ServeError::Bind { carrier: Carrier::Quic, addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no async runtime found; call serve() inside tokio")))?;
    Endpoint::new(super::endpoint_config(), Some(cfg), socket, runtime).map_err(bind)
}

/// Runs the accept loop.
pub(crate) fn spawn(shared: Arc<Shared>, endpoint: Endpoint) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            if *shared.shutdown.borrow() {
                incoming.refuse();
                continue;
            }
            if shared.live_quic.load(Relaxed) >= shared.limits.max_connections {
                shared.counters.rejection(RejectReason::TooManyConnections.as_str());
                incoming.refuse();
                continue;
            }
            shared.live_quic.fetch_add(1, Relaxed);
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                handle(&shared, incoming).await;
                shared.live_quic.fetch_sub(1, Relaxed);
            });
        }
    })
}

struct QuicOut {
    send: SendStream,
    buf: Vec<u8>,
}

impl Outbound for QuicOut {
    async fn send(&mut self, msg: Control) -> Result<(), ()> {
        self.buf.clear();
        if let Err(e) = msg.encode(&mut self.buf) {
            // Only oversized fields fail, which the session never builds.
            tracing::error!(error = %e, "encoding a control message");
            return Err(());
        }
        self.send.write_all(&self.buf).await.map_err(|_| ())
    }
}

async fn handle(shared: &Arc<Shared>, incoming: Incoming) {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            shared.counters.rejection("handshake_failed");
            tracing::debug!(%addr, error = %e, "QUIC handshake failed");
            return;
        }
    };
    let hello_timeout = Duration::from_millis(shared.limits.hello_timeout_ms);
    let (send, mut recv) = match tokio::time::timeout(hello_timeout, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "QUIC connection ended before opening a stream");
            return;
        }
        Err(_) => {
            shared.counters.closed("handshake_timeout", false);
            conn.close(VarInt::from_u32(crate::control::CloseReason::HandshakeTimeout as u32), b"no stream opened");
            return;
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let limits = shared.decode_limits;
    let reader = tokio::spawn(async move {
        loop {
            let item = match read_message(&mut recv, &limits, true).await {
                Ok(WireMsg::Control(c)) => Inbound::Control(c),
                Ok(WireMsg::Frame(h, f)) => Inbound::Frame(h, f),
                Err(ReadError::End) => return,
                Err(ReadError::Lost(e)) => {
                    tracing::debug!(%addr, error = %e, "QUIC stream lost");
                    return;
                }
                Err(ReadError::Malformed { reason, detail }) => {
                    let _ = tx.send(Inbound::Malformed { reason, detail }).await;
                    return;
                }
            };
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    let mut out = QuicOut { send, buf: Vec::with_capacity(256) };
    let end = run_session(Arc::clone(shared), Carrier::Quic, addr, rx, &mut out, None).await;
    reader.abort();
    let (code, reason) = match &end {
        SessionEnd::Rejected(r) => (*r as u32, r.as_str().as_bytes().to_vec()),
        SessionEnd::Closed(r, m) => (*r as u32, m.as_bytes().to_vec()),
        SessionEnd::Peer => (0, Vec::new()),
    };
    if end != SessionEnd::Peer {
        // Let the client read the Reject/Close before the connection goes.
        let _ = out.send.finish();
        let _ = tokio::time::timeout(CLOSE_LINGER, conn.closed()).await;
    }
    conn.close(VarInt::from_u32(code), &reason);
}
