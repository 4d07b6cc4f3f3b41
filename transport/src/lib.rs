//! Aperture transport: how frames get from agents to the aggregator.
//!
//! One session protocol — hello with identity and token, frames with
//! sequence numbers, selective acknowledgements, credit for backpressure,
//! close with a reason — runs over two carriers: QUIC (quinn, UDP 50051,
//! the primary) and gRPC (tonic, TCP 50051, for networks without UDP). The
//! rules live in sans-IO state machines ([`session`]); the carriers are thin
//! drivers around them.
//!
//! What it is for: delivering already-encoded frames (see
//! [`aperture_core::frame`]) with at-least-once semantics and bounded memory
//! on both ends. What it is not for: building, aggregating or storing
//! batches — the agent and the aggregator do that — and it never re-encodes
//! a frame.
//!
//! Entry types:
//! - aggregator side: [`server::serve`] with a [`server::ServerConfig`] and an
//!   [`server::IngressSink`], returning a [`server::ServerHandle`];
//! - agent side: [`client::Client::start`] with a [`client::ClientConfig`]
//!   (a load generator starts many on one [`client::SharedRuntime`] with
//!   [`client::Client::start_on`]);
//! - the protocol itself: [`session::ServerSession`], [`session::ClientSession`]
//!   and the [`control`] message encoding;
//! - the wire formats: [`wire`] (the QUIC stream framing, and the gRPC
//!   contract `proto/aperture/v1/ingest.proto`, generated at build time by a
//!   pure-Rust protobuf compiler: no `protoc` needed).
//!
//! Layout, by role: `session/` is the protocol without I/O; `wire/` the
//! formats both ends share; `client/` and `server/` each hold one file per
//! carrier (`quic.rs`, `grpc.rs`) plus what is common to that end
//! (`server/session.rs` drives a session whatever the carrier). Nothing in a
//! carrier file imports from its parent module.
//!
//! Fuzz targets: `fuzz/` (standalone, nightly). The load generator lives in
//! the perf harness (`perf/src/load.rs`), not in the shipped crate.

pub mod auth;
pub mod client;
pub mod control;
#[doc(hidden)]
pub mod fuzzing;
pub mod server;
pub mod session;
pub mod tls;
pub mod wire;

/// Which carrier a session runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carrier {
    /// QUIC over UDP.
    Quic,
    /// gRPC over TCP (HTTP/2).
    Grpc,
}

impl Carrier {
    /// Stable label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Carrier::Quic => "quic",
            Carrier::Grpc => "grpc",
        }
    }
}

impl std::fmt::Display for Carrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
