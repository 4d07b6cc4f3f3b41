//! From perf-buffer records to frames: [`Pipeline`] holds the per-record
//! work (attribute, select, symbolize, batch, encode).

mod records;

pub use records::{FrameSink, Pipeline, PipelineStats, period_ns};
