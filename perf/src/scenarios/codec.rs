//! `codec`: frame decode + validate in place versus decoding into owned
//! values, and encode, on realistic 10k-record batches. Runs anywhere (no
//! root, no servers): it is the quick scenario CI runs.

use std::time::Instant;

use aperture_core::frame::{DecodeLimits, FrameId, decode, decode_unaligned, encode_batch};
use serde::Deserialize;

use crate::harness::{Metric, Scenario};
use crate::workload::realistic_batch;

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Records per batch.
    pub records: usize,
    /// Batches decoded per measurement.
    pub iterations: usize,
}

/// The scenario.
#[derive(Debug)]
pub struct Codec {
    params: Params,
}

impl Codec {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> Codec {
        Codec { params }
    }
}

impl Scenario for Codec {
    fn sides(&self) -> Vec<String> {
        vec!["rkyv-in-place".into(), "rkyv-owned-copy".into()]
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let batch = realistic_batch(self.params.records, 500, 40, 1);
        let samples = batch.sample_count() as f64;
        let limits = DecodeLimits::default();
        let id = FrameId::default();
        let start = Instant::now();
        let mut buf = encode_batch(&batch, id, 0, &limits)?;
        for _ in 1..self.params.iterations {
            buf = encode_batch(&batch, id, 0, &limits)?;
        }
        let encode_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut read = 0usize;
        for _ in 0..self.params.iterations {
            match side {
                "rkyv-in-place" => read += decode(&buf, &limits)?.batch.cpu.len(),
                _ => read += decode_unaligned(&buf, &limits)?.1.cpu.len(),
            }
        }
        let decode_s = start.elapsed().as_secs_f64();
        anyhow::ensure!(read == self.params.records * self.params.iterations, "decoded {read} records");
        let n = self.params.iterations as f64;
        Ok(vec![
            Metric::new("decode_samples_per_s", "samples/s", samples * n / decode_s),
            Metric::new("encode_samples_per_s", "samples/s", samples * n / encode_s),
            Metric::new("frame_bytes_per_sample", "B", buf.len() as f64 / samples),
        ])
    }
}
