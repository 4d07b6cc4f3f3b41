//! The client's configuration, identity and start-up errors.

use aperture_core::frame::HEADER_LEN;
use aperture_core::ids::{AgentId, BootId};
use serde::Deserialize;

use crate::tls::{ClientTlsConfig, TlsError};

/// Which carriers the client may use: the agent's `transport.carrier`
/// setting, used as it is.
pub use aperture_core::config::CarrierChoice;

/// Client configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Aggregator `host:port`; both carriers use the same port unless overridden.
    pub aggregator: String,
    /// Bearer token (`APERTURE_AUTH_TOKEN`).
    pub token: Option<String>,
    /// How to trust the server's certificate.
    pub tls: ClientTlsConfig,
    /// Which carriers to use.
    pub carrier: CarrierChoice,
    /// UDP port for QUIC, when not the aggregator's port.
    pub quic_port: Option<u16>,
    /// TCP port for gRPC, when not the aggregator's port.
    pub grpc_port: Option<u16>,
    /// Bound of the unacknowledged-frame buffer, bytes; the oldest frames are
    /// dropped (and counted) beyond it.
    pub buffer_bytes: usize,
    /// Largest frame accepted from the producer, bytes.
    pub max_frame_bytes: usize,
    /// Connect and handshake timeout, ms.
    pub connect_timeout_ms: u64,
    /// Failed QUIC connects in a row before switching to gRPC (`auto`).
    pub quic_attempts_before_fallback: u32,
    /// While on gRPC, how often to try QUIC again, ms.
    pub quic_retry_interval_ms: u64,
    /// First reconnect delay, ms; doubles per failure (with jitter).
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, ms.
    pub reconnect_max_ms: u64,
    /// QUIC idle timeout, ms.
    pub idle_timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            aggregator: format!("aperture-aggregator.aperture.svc.cluster.local:{}", crate::server::DEFAULT_PORT),
            token: None,
            tls: ClientTlsConfig::default(),
            carrier: CarrierChoice::Auto,
            quic_port: None,
            grpc_port: None,
            buffer_bytes: 64 << 20,
            max_frame_bytes: aperture_core::frame::DEFAULT_MAX_PAYLOAD + HEADER_LEN,
            connect_timeout_ms: 5_000,
            quic_attempts_before_fallback: 3,
            quic_retry_interval_ms: 60_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            idle_timeout_ms: 30_000,
        }
    }
}

/// Who the client sends for; stamped in the hello (frames carry the ids too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Stable agent id.
    pub agent_id: AgentId,
    /// This run's id.
    pub boot_id: BootId,
    /// Node name.
    pub node: String,
    /// Agent version.
    pub agent_version: String,
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS trust settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `aggregator` is not `host:port`.
    #[error("aggregator address {value:?} is not host:port")]
    BadAddress {
        /// The configured value.
        value: String,
    },
    /// The token cannot travel in an HTTP header or is too long.
    #[error("auth token is not usable: {reason}")]
    BadToken {
        /// Why.
        reason: String,
    },
    /// The runtime thread could not start.
    #[error("starting the transport runtime: {0}")]
    Runtime(#[source] std::io::Error),
}
