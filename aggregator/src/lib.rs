//! The Aperture aggregator: receives frames from agents, aggregates them in
//! sharded buffers, writes them to ClickHouse or an embedded SQLite store,
//! and serves the query API, health and metrics over HTTP.
//!
//! ```text
//! transport ──admit──► ShardedIngress ──bounded queues──► shard threads (core Shard)
//!    ▲                   (ledger per lane)                       │ flushes
//!    └──────────── acks ◄── writer thread ◄──────────────────────┘
//!                              │ WriteBatch (rows + stacks + ledger state)
//!                              ▼
//!                     Store: SqliteStore | ClickHouseStore ◄── HTTP API (axum)
//! ```
//!
//! What it is not: the transport (QUIC/gRPC sessions live in
//! `aperture-transport`, which calls [`IngressSink::admit`] and sends the
//! acknowledgements given to [`Acknowledge::ack`]), nor the configuration
//! parser (core's `AggregatorConfig` is mapped onto [`Settings`] and the
//! transport's server configuration in [`daemon`]).
//!
//! Entry points: [`run_aggregator`] / [`Daemon`] for the `aperture aggregator` and
//! `aperture up` commands (store, HTTP and both carriers);
//! [`Aggregator::start`] → [`AggregatorHandle`] (ingress, HTTP address,
//! shutdown) for embedding and tests.
//!
//! Invariant: a frame is acknowledged only after the rows built from it
//! and the ledger state recording it are committed to the store.

mod app;
mod background;
mod clock;
pub mod daemon;
pub mod http;
pub mod metrics;
mod otlp;
pub mod pipeline;
pub mod pyroscope;
pub mod query;
mod settings;
pub mod store;

pub use app::{Aggregator, AggregatorHandle};
pub use daemon::{Daemon, run_aggregator};
pub use pipeline::ingress::{Admission, Carrier, IngressSink, PeerInfo, ReceivedFrame, ShardedIngress};
pub use pipeline::state::Acknowledge;
pub use settings::{ClickHouseSettings, HttpLimits, OtlpExportSettings, Settings};
