//! The ingress's configuration and start-up errors.

use std::net::SocketAddr;
use std::path::PathBuf;

use aperture_core::frame::HEADER_LEN;
use serde::Deserialize;

use crate::Carrier;
use crate::auth::{AuthConfig, AuthConfigError};
use crate::control::{Capabilities, PROTOCOL_VERSION};
use crate::tls::{ServerTlsConfig, TlsError};

/// Default port of both carriers.
pub const DEFAULT_PORT: u16 = 50051;

/// Limits of the ingress. Every one of them bounds memory or work a client can cause.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Largest frame accepted, header + payload, bytes.
    pub max_frame_bytes: u32,
    /// Most concurrent connections per carrier; more are refused.
    pub max_connections: usize,
    /// Most connections, both carriers together, that are still
    /// authenticating (TLS handshake, hello); more are refused at once.
    pub max_unauthenticated: usize,
    /// Most concurrent streams per connection (QUIC bidirectional streams,
    /// HTTP/2 streams). A session uses one.
    pub max_streams_per_connection: u32,
    /// QUIC per-stream receive window, bytes.
    pub stream_receive_window: u32,
    /// QUIC per-connection receive window, bytes.
    pub connection_receive_window: u32,
    /// A connection without traffic for this long is closed, ms.
    pub idle_timeout_ms: u64,
    /// Time a client has, from its first packet, to complete the TLS
    /// handshake and be authenticated (QUIC: its hello; gRPC: a `Push` call
    /// with a valid token), ms.
    pub hello_timeout_ms: u64,
    /// Credit window per session, frames.
    pub credit_frames: u32,
    /// Credit window per session, bytes.
    pub credit_bytes: u64,
    /// Delay before a frame the sink refused as busy is offered again, ms.
    pub busy_retry_ms: u64,
    /// Most bytes of frames held, all sessions together, because the sink
    /// refused them as busy. A session whose busy frame does not fit is
    /// closed; its client keeps the frame and sends it again after
    /// reconnecting. At least `max_frame_bytes`.
    pub parked_bytes: u64,
    /// Newest session protocol served ([`PROTOCOL_VERSION`]). Not a
    /// setting: lowered, with `capabilities`, only to behave like an older
    /// aggregator (tests of mixed fleets).
    #[serde(skip)]
    pub max_protocol: u16,
    /// Capabilities announced in the welcome ([`Capabilities::SUPPORTED`]).
    /// Not a setting, like `max_protocol`.
    #[serde(skip)]
    pub capabilities: Capabilities,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_frame_bytes: (aperture_core::frame::DEFAULT_MAX_PAYLOAD + HEADER_LEN) as u32,
            max_connections: 10_000,
            max_unauthenticated: 1_024,
            max_streams_per_connection: 1,
            stream_receive_window: 8 << 20,
            connection_receive_window: 16 << 20,
            idle_timeout_ms: 30_000,
            hello_timeout_ms: 10_000,
            credit_frames: 64,
            credit_bytes: 32 << 20,
            busy_retry_ms: 200,
            parked_bytes: 64 << 20,
            max_protocol: PROTOCOL_VERSION,
            capabilities: Capabilities::SUPPORTED,
        }
    }
}

/// Server configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// QUIC listen address; `None` disables the carrier.
    pub quic_listen: Option<SocketAddr>,
    /// gRPC listen address; `None` disables the carrier. When both use port
    /// 0 on the same IP, QUIC takes the port gRPC got (tests get one address).
    pub grpc_listen: Option<SocketAddr>,
    /// Token check.
    pub auth: AuthConfig,
    /// Certificate (QUIC always uses TLS; gRPC unless `tls.insecure_plaintext`).
    pub tls: ServerTlsConfig,
    /// Where a self-signed certificate is created and kept.
    pub data_dir: PathBuf,
    /// Limits.
    pub limits: ServerLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT));
        ServerConfig {
            quic_listen: Some(any),
            grpc_listen: Some(any),
            auth: AuthConfig::default(),
            tls: ServerTlsConfig::default(),
            data_dir: PathBuf::from("/var/lib/aperture"),
            limits: ServerLimits::default(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The auth settings are unusable (no token, and auth not disabled...).
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// The certificate could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listen address could not be bound.
    #[error("binding {carrier} on {addr}: {source}; is another aggregator running, or is the port privileged?")]
    Bind {
        /// Which carrier.
        carrier: Carrier,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A limit is out of the range the carrier accepts.
    #[error("invalid limit {name} = {value}: {reason}")]
    Limit {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: u64,
        /// Why it does not work.
        reason: String,
    },
    /// Both carriers are disabled.
    #[error("both quic_listen and grpc_listen are disabled; enable at least one")]
    NothingToServe,
}
