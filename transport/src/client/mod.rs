//! The agent's sender: a [`Client`] owns a tokio runtime on its own thread,
//! keeps frames until the aggregator acknowledges them, reconnects with
//! jittered exponential backoff, and falls back from QUIC to gRPC by itself.
//!
//! [`Client::send`] is non-blocking and callable from any thread: the agent's
//! hot path is plain threads.
//!
//! A load generator simulating many agents starts them with
//! [`Client::start_on`] on one [`SharedRuntime`] instead (optionally sharing
//! QUIC endpoints too); each still has its own connection and session.

mod config;
mod connect;
mod driver;
mod grpc;
mod handle;
mod link;
mod quic;
mod runtime;
mod shared;

pub use config::{AgentIdentity, CarrierChoice, ClientConfig, StartError};
pub use handle::{Client, ClientStats, SendError, ShutdownReport};
pub use runtime::SharedRuntime;
