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

use quinn::{EndpointConfig, IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

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

/// A client endpoint bound to `bind`, with [`endpoint_config`].
pub(crate) fn client_endpoint(bind: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(bind)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(endpoint_config(), None, socket, runtime)
}

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
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}
