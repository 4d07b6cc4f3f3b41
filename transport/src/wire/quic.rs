//! The QUIC carrier (quinn): one long-lived bidirectional stream per
//! connection, opened by the client. Client to server: control messages and
//! raw frames, interleaved (told apart by their first four bytes, see
//! [`crate::control`]). Server to client: control messages only.
//!
//! ALPN is [`crate::tls::QUIC_ALPN`] (`aperture/1`). When a session ends,
//! the server finishes the stream after its last message and closes the
//! connection with a QUIC application error code equal to the reason code:
//!
//! | code            | meaning                                                     |
//! |-----------------|-------------------------------------------------------------|
//! | `0x0`           | normal end ([`CloseReason::Normal`](crate::control::CloseReason)) |
//! | `0x1`..=`0x6`   | [`CloseReason`](crate::control::CloseReason): shutting down, protocol violation, malformed, credit exceeded, handshake timeout, superseded |
//! | `0x101`..=`0x107` | [`RejectReason`](crate::control::RejectReason): missing token, wrong token, oversized token, unsupported protocol, too many connections, shutting down, bad hello |
//!
//! This module holds what both ends share: the endpoint and transport
//! parameters, and reading messages off a receive stream (a frame is read
//! header first, checked and bounded before its payload is allocated,
//! straight into an aligned buffer, and validated once).

use crate::control::{self, CONTROL_HEADER_LEN, CONTROL_MAGIC, Control};
use aperture_core::frame::{self, DecodeLimits, FrameBuf, FrameHeader, HEADER_LEN, MAGIC};
use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use quinn::{ReadExactError, RecvStream};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Largest UDP payload either end sends or accepts: a 9000-byte (jumbo
/// frame) MTU less the IPv6 and UDP headers. Path MTU discovery starts from
/// QUIC's 1200 bytes and searches up to this, so on an ordinary 1500-byte
/// path it settles at 1452 (a few lost probes, nothing else), while jumbo-frame
/// networks and loopback carry about six times fewer packets — each packet
/// costs a system call share, a decryption and a pass through quinn.
pub(crate) const MAX_UDP_PAYLOAD: u16 = 8952;

/// Endpoint parameters shared by both ends: accept datagrams up to
/// [`MAX_UDP_PAYLOAD`] (quinn sizes its receive buffers from this).
pub(crate) fn endpoint_config() -> EndpointConfig {
    let mut e = EndpointConfig::default();
    // Within quinn's accepted range (1200..=65527), so this cannot fail.
    if e.max_udp_payload_size(MAX_UDP_PAYLOAD).is_err() {
        tracing::warn!(MAX_UDP_PAYLOAD, "quinn refused the UDP payload size; using its default");
    }
    e
}

/// UDP socket buffer the server asks for, each direction. The kernel's
/// default (`net.core.rmem_default`, 208 KiB) holds a few dozen 9 KB
/// datagrams: many agents sending at once overflow it, every datagram
/// dropped there is a QUIC loss (a retransmission, a congestion-window cut,
/// a late ack). The kernel caps the request at `net.core.rmem_max` /
/// `wmem_max`; [`tune_socket`] logs what it got.
pub(crate) const SERVER_SOCKET_BUFFER: usize = 16 << 20;

/// UDP socket buffer a client asks for: it receives little (acks, credit,
/// QUIC acknowledgements) but sends bursts of a frame's datagrams.
pub(crate) const CLIENT_SOCKET_BUFFER: usize = 2 << 20;

/// Raises the socket's receive and send buffers to `bytes` (as far as the
/// kernel allows). Failing to is not fatal: the socket works, with more loss
/// under load, which the log says.
pub(crate) fn tune_socket(socket: &std::net::UdpSocket, bytes: usize) {
    let state = match quinn::udp::UdpSocketState::new(socket.into()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot inspect the QUIC UDP socket; its buffers keep the kernel defaults");
            return;
        }
    };
    if let Err(e) = state.set_recv_buffer_size(socket.into(), bytes) {
        tracing::warn!(error = %e, bytes, "cannot raise the QUIC UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size(socket.into(), bytes) {
        tracing::warn!(error = %e, bytes, "cannot raise the QUIC UDP send buffer");
    }
    // Linux reports twice the usable size (the bookkeeping overhead it adds).
    let got = state.recv_buffer_size(socket.into()).unwrap_or(0) / 2;
    if got < bytes / 2 {
        tracing::info!(
            requested = bytes,
            got,
            "QUIC UDP receive buffer capped by the kernel; raise net.core.rmem_max (sysctl) for many agents per aggregator"
        );
    }
}

/// A client endpoint bound to `bind`, with [`endpoint_config`].
pub(crate) fn client_endpoint(bind: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    tune_socket(&socket, CLIENT_SOCKET_BUFFER);
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(endpoint_config(), None, socket, runtime)
}

/// Transport parameters shared by both ends (wrap them in an `Arc` for quinn).
pub(crate) fn transport_config(
    stream_window: u32,
    conn_window: u32,
    idle: Duration,
    bidi_streams: u32,
    keep_alive: Option<Duration>,
) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(stream_window));
    t.receive_window(VarInt::from_u32(conn_window));
    t.send_window(u64::from(conn_window));
    t.max_concurrent_bidi_streams(VarInt::from_u32(bidi_streams));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // An idle timeout above 2^62 ms is not representable: fall back to the
    // default rather than disabling it.
    if let Ok(idle) = IdleTimeout::try_from(idle) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(keep_alive);
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// One message from the stream.
#[derive(Debug)]
pub(crate) enum WireMsg {
    Control(Control),
    Frame(FrameHeader, FrameBuf),
}

/// Why no message was read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer finished the stream between two messages.
    End,
    /// The connection or stream failed.
    Lost(String),
    /// The bytes are not a valid message.
    Malformed { reason: &'static str, detail: String },
}

fn read_err(e: ReadExactError, at_start: bool) -> ReadError {
    match e {
        ReadExactError::FinishedEarly(0) if at_start => ReadError::End,
        ReadExactError::FinishedEarly(n) => ReadError::Malformed {
            reason: "truncated",
            detail: format!("stream ended inside a message after {n} bytes"),
        },
        ReadExactError::ReadError(e) => ReadError::Lost(e.to_string()),
    }
}

/// What a reader accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadRules {
    /// Bounds of a frame.
    pub limits: DecodeLimits,
    /// Whether frames may arrive here: only client to server, and only once
    /// the session is authenticated.
    pub frames: bool,
    /// Largest control body, at most [`control::MAX_CONTROL_BODY`].
    pub max_control: usize,
}

/// Reads one message. Frame buffers are counted in `gauge` while being filled.
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    rules: &ReadRules,
    gauge: Option<&BytesGauge>,
) -> Result<WireMsg, ReadError> {
    let limits = &rules.limits;
    // Eight bytes is both the control header and a prefix of a frame header.
    let mut head = [0u8; CONTROL_HEADER_LEN];
    recv.read_exact(&mut head).await.map_err(|e| read_err(e, true))?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic == CONTROL_MAGIC {
        let (kind, len) = control::parse_header(&head)
            .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
        if len > rules.max_control {
            return Err(ReadError::Malformed {
                reason: "oversized",
                detail: format!("control body of {len} bytes exceeds the limit of {} bytes here", rules.max_control),
            });
        }
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(|e| read_err(e, false))?;
        let msg = control::decode_body(kind, &body)
            .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
        return Ok(WireMsg::Control(msg));
    }
    if magic == MAGIC && !rules.frames {
        return Err(ReadError::Malformed {
            reason: "unexpected_frame",
            detail: "a frame where none may be sent (before the session is authenticated, or from the server)".into(),
        });
    }
    if magic != MAGIC {
        return Err(ReadError::Malformed {
            reason: "garbage",
            detail: format!("stream bytes {magic:02x?} start neither a frame nor a control message"),
        });
    }
    let mut buf = FrameBuf::with_capacity(HEADER_LEN);
    buf.extend_from_slice(&head);
    buf.resize(HEADER_LEN, 0);
    recv.read_exact(&mut buf[CONTROL_HEADER_LEN..]).await.map_err(|e| read_err(e, false))?;
    let header = FrameHeader::parse(&buf, limits)
        .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
    // `parse` bounded payload_len by the limit: this allocation is safe.
    let _held = gauge.map(|g| g.hold(header.frame_len() as u64));
    buf.reserve_exact(header.payload_len as usize);
    buf.resize(header.frame_len(), 0);
    recv.read_exact(&mut buf[HEADER_LEN..]).await.map_err(|e| read_err(e, false))?;
    frame::decode(&buf, limits).map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
    Ok(WireMsg::Frame(header, buf))
}

/// Bytes held now and at most, for buffers a reader allocates.
#[derive(Debug, Default)]
pub(crate) struct BytesGauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl BytesGauge {
    /// Counts `n` bytes as held until the returned guard is dropped.
    pub(crate) fn hold(&self, n: u64) -> Held<'_> {
        let now = self.now.fetch_add(n, Relaxed) + n;
        self.peak.fetch_max(now, Relaxed);
        Held { gauge: self, n }
    }

    /// Counts `n` more bytes if the total stays within `limit`; the caller
    /// gives them back with [`release`](Self::release).
    pub(crate) fn try_add(&self, n: u64, limit: u64) -> bool {
        match self.now.fetch_update(Relaxed, Relaxed, |now| now.checked_add(n).filter(|t| *t <= limit)) {
            Ok(before) => {
                self.peak.fetch_max(before + n, Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back bytes counted by [`try_add`](Self::try_add).
    pub(crate) fn release(&self, n: u64) {
        self.now.fetch_sub(n, Relaxed);
    }

    /// Bytes held now.
    pub(crate) fn now(&self) -> u64 {
        self.now.load(Relaxed)
    }

    /// The most bytes held at once.
    pub(crate) fn peak(&self) -> u64 {
        self.peak.load(Relaxed)
    }
}

/// Bytes counted in a [`BytesGauge`] while alive.
#[derive(Debug)]
pub(crate) struct Held<'a> {
    gauge: &'a BytesGauge,
    n: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.now.fetch_sub(self.n, Relaxed);
    }
}
