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

pub(crate) mod client;
pub(crate) mod server;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, TransportConfig, VarInt};

/// Transport parameters shared by both ends.
pub(crate) fn transport_config(
    stream_window: u32,
    conn_window: u32,
    idle: Duration,
    bidi_streams: u32,
    keep_alive: Option<Duration>,
) -> Arc<TransportConfig> {
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
    Arc::new(t)
}
