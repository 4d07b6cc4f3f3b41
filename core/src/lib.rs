//! The core of Aperture: the data model, the frame format (the wire contract
//! between agent and aggregator), the lock-free rings between threads, the
//! shard aggregation state machine and the configuration types.
//!
//! This crate does no I/O and reads no clock: time and bytes are passed in,
//! work is polled out. That keeps every rule here testable deterministically.
//!
//! Entry points: [`model::Batch`], [`ids::AgentId`] / [`ids::BootId`],
//! [`frame::encode_batch`] / [`frame::decode`],
//! [`ring::ring`], [`shard::Shard`], [`config::AgentConfig`] and
//! [`config::AggregatorConfig`].

pub mod config;
pub mod frame;
pub mod ids;
pub mod ledger;
pub mod lockclass;
pub mod model;
pub mod ring;
pub mod shard;
pub mod synthetic;
