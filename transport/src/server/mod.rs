//! The aggregator's ingress: both carriers on one tokio runtime, feeding an
//! [`IngressSink`], with acknowledgements routed back through an [`Acker`].
//!
//! ```text
//! QUIC udp/50051 ─┐                        ┌─► IngressSink::admit(frame) ─► Queued | AlreadyCommitted | Busy
//!                 ├─► ServerSession (each) ┤
//! gRPC tcp/50051 ─┘                        └─◄ Acker::ack(ids)  (after the store committed)
//! ```
//!
//! OTLP profiles senders have a listener of their own ([`otlp`]), feeding an
//! [`otlp::OtlpSink`].

mod config;
mod grpc;
mod handle;
pub mod otlp;
pub mod otlp_export;
mod quic;
mod session;
mod sink;
mod stats;

pub use config::{DEFAULT_PORT, ServeError, ServerConfig, ServerLimits};
pub(crate) use grpc::inbound_from_pb;
pub use handle::{Acker, ServerHandle, StatsReader, serve};
pub(crate) use session::Inbound;
pub use sink::{Admission, IngressSink, PeerInfo, ReceivedFrame};
pub use stats::ServerStats;
