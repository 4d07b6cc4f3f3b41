//! Aperture agent: the node daemon.
//!
//! It loads the probes, reads their perf buffers, attributes every record
//! to a node, process, container and pod, symbolizes stacks, batches
//! records into frames and hands them to the transport — within an
//! overhead budget it enforces on itself.
//!
//! What it is not: it does not aggregate across nodes, store anything or
//! serve queries (the aggregator does), and it does not touch the kernel
//! directly (the `aperture-probes` crate does).
//!
//! Map of the crate:
//! - [`attribution`]: pid → [`aperture_core::model::Target`] from `/proc`
//!   and the Kubernetes pod index ([`kube`]);
//! - [`selection`]: the `filter` configuration (namespaces, label selector,
//!   process names, pids, cgroups);
//! - [`budget`]: the overhead control loop, a sans-IO state machine;
//! - [`batcher`]: records → [`aperture_core::model::Batch`], flushed by size and age;
//! - [`metrics`]: the agent's own `/metrics` and `/healthz`.

pub mod alloc;
pub mod attribution;
pub mod batcher;
pub mod budget;
pub mod clock;
mod daemon;
pub mod identity;
pub mod kube;
pub mod metrics;
pub mod pipeline;
pub mod selection;
mod shutdown;

pub use daemon::{ExitReport, LocalAggregator, ProbeStartError, kernel_filter, run_agent, run_agent_local};
pub use shutdown::{Shutdown, stop_signals};
