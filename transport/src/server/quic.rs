//! The QUIC carrier, server side: accept connections, one session per
//! connection, its messages read off the stream (see [`crate::wire::quic`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use quinn::{Endpoint, Incoming, SendStream, VarInt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::config::ServeError;
use super::session::{Inbound, Outbound, PREAUTH_MAX_CONTROL, PreAuth, SessionEnd, Shared, run_session};
use crate::Carrier;
use crate::control::{CloseReason, Control, RejectReason};
use crate::tls::{QUIC_ALPN, ServerIdentity};
use crate::wire::quic::{
    ReadError, ReadRules, SERVER_SOCKET_BUFFER, WireMsg, endpoint_config, read_message, transport_config, tune_socket,
};

/// How long a closing server waits for the client to read its last
/// messages before closing the connection under it.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Connection receive window until the session is authenticated: room for
/// a hello and little else, so an unauthenticated client cannot make the
/// server buffer more.
const PREAUTH_RECEIVE_WINDOW: u32 = 2 * PREAUTH_MAX_CONTROL as u32;

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
    let mut transport = transport_config(
        l.stream_receive_window,
        l.connection_receive_window,
        Duration::from_millis(l.idle_timeout_ms),
        l.max_streams_per_connection,
        None,
    );
    // Raised to `connection_receive_window` once the hello is accepted.
    transport.receive_window(VarInt::from_u32(PREAUTH_RECEIVE_WINDOW.min(l.connection_receive_window)));
    cfg.transport_config(Arc::new(transport));
    let bind = |source| ServeError::Bind { carrier: Carrier::Quic, addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    tune_socket(&socket, SERVER_SOCKET_BUFFER);
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no async runtime found; call serve() inside tokio")))?;
    Endpoint::new(endpoint_config(), Some(cfg), socket, runtime).map_err(bind)
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
            let Some(preauth) = PreAuth::admit(&shared) else {
                incoming.refuse();
                continue;
            };
            shared.live_quic.fetch_add(1, Relaxed);
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                handle(&shared, incoming, preauth).await;
                shared.live_quic.fetch_sub(1, Relaxed);
            });
        }
    })
}

struct QuicOut {
    send: SendStream,
    conn: quinn::Connection,
    buf: Vec<u8>,
    receive_window: u32,
    /// Until authenticated: the pre-auth count, and the reader waiting to read frames.
    pending: Option<(PreAuth, oneshot::Sender<()>)>,
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

    fn authenticated(&mut self) {
        self.conn.set_receive_window(VarInt::from_u32(self.receive_window));
        if let Some((preauth, reader)) = self.pending.take() {
            preauth.authenticated();
            let _ = reader.send(());
        }
    }
}

async fn handle(shared: &Arc<Shared>, incoming: Incoming, preauth: PreAuth) {
    let addr = incoming.remote_address();
    // From its first packet, a client has `hello_timeout` to finish the
    // handshake, open its stream and send a hello (read below, bounded by the
    // session's own hello deadline).
    let hello_timeout = Duration::from_millis(shared.limits.hello_timeout_ms);
    let deadline = tokio::time::Instant::now() + hello_timeout;
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.counters.rejection("handshake_failed");
            tracing::debug!(%addr, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            shared.counters.closed(CloseReason::HandshakeTimeout.as_str(), false);
            tracing::debug!(%addr, "QUIC handshake timed out");
            return;
        }
    };
    let (send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "QUIC connection ended before opening a stream");
            return;
        }
        Err(_) => {
            shared.counters.closed(CloseReason::HandshakeTimeout.as_str(), false);
            conn.close(VarInt::from_u32(CloseReason::HandshakeTimeout as u32), b"no stream opened");
            return;
        }
    };
    let (tx, rx) = mpsc::channel(8);
    let (authed_tx, authed_rx) = oneshot::channel::<()>();
    let frames =
        ReadRules { limits: shared.decode_limits, frames: true, max_control: crate::control::MAX_CONTROL_BODY };
    let hello_only = ReadRules { frames: false, max_control: PREAUTH_MAX_CONTROL, ..frames };
    let reader_shared = Arc::clone(shared);
    let reader = tokio::spawn(async move {
        // The hello alone, small, before anything else is read.
        let mut rules = hello_only;
        let mut authed = Some(authed_rx);
        loop {
            let item = match read_message(&mut recv, &rules, Some(&reader_shared.counters.frame_reads)).await {
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
            if let Some(wait) = authed.take() {
                // Nothing more is read until the session accepts the hello;
                // a refused session ends this task.
                if wait.await.is_err() {
                    return;
                }
                rules = frames;
            }
        }
    });
    let mut out = QuicOut {
        send,
        conn: conn.clone(),
        buf: Vec::with_capacity(256),
        receive_window: shared.limits.connection_receive_window,
        pending: Some((preauth, authed_tx)),
    };
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
