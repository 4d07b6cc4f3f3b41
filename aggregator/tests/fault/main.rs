//! The fault suite: the real `aperture` binary as child processes, agents
//! pushing synthetic frames over the real transport, and faults injected
//! from outside (SIGKILL, SIGSTOP, hostile clients). A conservation oracle
//! compares what the agents sent with what the store holds; each scenario
//! prints `fault: <scenario> sent=N stored=N lost=N duplicated=N`.
//!
//! - [`kills`]: the aggregator SIGKILLed and restarted (both stores),
//!   ClickHouse frozen under load, an agent SIGKILLed;
//! - [`replicas`]: two aggregator replicas on one ClickHouse behind a
//!   Service-like relay, one SIGKILLed mid-stream;
//! - [`overload`]: many agents with the store frozen, more frames in
//!   flight than the aggregator may hold;
//! - [`hostile`]: stalled unauthenticated connections, HTTP slowloris,
//!   80k-frame stacks with maximal counts, frames one byte over the limit,
//!   each with a memory bound derived from the configured limits.
//!
//! The binary is `$APERTURE_BIN`, or `aperture` next to this test's
//! directory in the target dir (built by `cargo build -p aperture`, and by
//! any workspace test run); without it the scenarios are reported skipped.

#[path = "../common/mod.rs"]
mod common;
mod hostile;
mod kills;
mod oracle;
mod overload;
mod process;
mod replicas;
