//! The session protocol as sans-IO state machines, one per end.
//!
//! Neither end owns a socket or reads a clock: a driver feeds what arrived
//! with `handle_*(now, ..)`, then drains what to send with `poll_transmit`,
//! what happened with `poll_event` and when to wake with `poll_timeout`.
//! The QUIC and gRPC adapters are such drivers; the unit tests here are
//! another, with virtual time.
//!
//! A session, client's view:
//!
//! ```text
//! connected ─► Hello ─► (Welcome + credit | Reject) ─► frames (within credit) ◄─► Ack / Credit ─► Close
//! ```
//!
//! Rules both ends agree on:
//! - **Identity.** Every frame of a session carries the (agent id, boot id)
//!   of its `Hello`; sequences increase strictly within a session but may
//!   have gaps (frames acknowledged or dropped before a reconnect are not resent).
//! - **Credit.** The server grants frames and bytes (`Welcome`, then
//!   `Credit` increments). The client sends while it has at least one frame
//!   and one byte of credit; a frame may overshoot the byte credit, the debt
//!   is carried. The server grants again as the sink takes frames, and
//!   withholds while the sink is above its high-water mark or busy.
//! - **Acknowledgement.** Acks are selective (sequence ranges) because the
//!   aggregator commits frames out of order. An acked frame is forgotten by
//!   the client; every other frame is resent, in order, on the next session.
//! - **Versions.** The client offers the newest protocol; a server serves
//!   every protocol from the oldest to its own and answers in the one
//!   offered. A client refused as `UnsupportedProtocol` offers the oldest on
//!   its next connection only. The welcome of protocol 2 announces
//!   capabilities, and the client sends a server only values it announced it
//!   reads (see `client.rs` and [`crate::control`]).

mod buffer;
mod client;
mod server;

pub use buffer::{PushError, PushReport, UnackedBuffer};
pub use client::{ClientEvent, ClientSession, ClientSessionConfig, ClientSessionStats, Transmit};
pub use server::{FrameOutcome, PeerIdentity, ServerEvent, ServerSession, ServerSessionConfig};

#[cfg(test)]
mod tests;
