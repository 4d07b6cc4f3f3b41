//! The write path: ingress → shards → writer, around the state they share.
//!
//! - [`ingress`]: admits frames from the transport against the ledger and
//!   the buffer budget, and queues them to their shard;
//! - [`shard`]: shard threads folding frames into rows (core's `Shard`);
//! - [`writer`]: the thread committing flushes to the store, driving
//!   [`policy`]'s sans-IO batching and retry rules;
//! - [`state`]: lanes, ledger, buffer budget, acknowledgements, store health;
//! - [`pushed`]: pushed profiles' frame ids and the requests waiting for their commit.

pub mod ingress;
pub(crate) mod policy;
pub(crate) mod pushed;
pub(crate) mod shard;
pub mod state;
pub(crate) mod writer;
