//! `ingest`: K synthetic agents push realistic batches over loopback to one
//! ingress, QUIC and gRPC side by side. The load is
//! [`crate::load`]: the transport's own server with a sink that
//! only acknowledges (no shards, no store), so the aggregator CPU measured —
//! the server's `agg-*` threads — is the cost of the carriers alone, which is
//! what the QUIC-vs-gRPC target is about. Both carriers are encrypted, as
//! in production: QUIC always, gRPC over TLS with the same certificate
//! (`grpc_tls: false` measures plaintext gRPC). Sides are `<carrier>-k<K>`.

use std::time::Duration;

use anyhow::{Context, bail};
use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_transport::Carrier;
use serde::Deserialize;

use crate::harness::{Metric, Scenario};
use crate::load::{LoadConfig, run_load, synthetic_batch};
use crate::stats::percentile;

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Agent counts K; each runs on both carriers.
    pub agents: Vec<usize>,
    /// Seconds each side pushes.
    pub seconds: u64,
    /// Upper bound on frames per agent per side.
    pub max_frames_per_agent: u64,
    /// Samples per batch.
    pub samples: usize,
    /// Stacks per batch.
    pub stacks: usize,
    /// Frames an agent keeps unacknowledged.
    pub in_flight: u64,
    /// gRPC over TLS (the aggregator's certificate, pinned by fingerprint,
    /// as QUIC always is); `false` runs it in plaintext.
    #[serde(default = "default_grpc_tls")]
    pub grpc_tls: bool,
}

fn default_grpc_tls() -> bool {
    true
}

/// The scenario.
#[derive(Debug)]
pub struct Ingest {
    params: Params,
}

impl Ingest {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> Ingest {
        Ingest { params }
    }
}

/// Parses a side name `quic-k8` into (carrier, K).
pub fn parse_side(side: &str) -> Option<(Carrier, usize)> {
    let (carrier, k) = side.split_once("-k")?;
    let carrier = match carrier {
        "quic" => Carrier::Quic,
        "grpc" => Carrier::Grpc,
        _ => return None,
    };
    Some((carrier, k.parse().ok()?))
}

impl Scenario for Ingest {
    fn sides(&self) -> Vec<String> {
        self.params.agents.iter().flat_map(|k| [format!("quic-k{k}"), format!("grpc-k{k}")]).collect()
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let Some((carrier, agents)) = parse_side(side) else { bail!("bad side name {side}") };
        let p = &self.params;
        let batch = synthetic_batch(p.samples, p.stacks);
        let samples_per_frame = batch.sample_count() as f64;
        let id = FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([0xb0; 16]), sequence: 1 };
        let template = encode_batch(&batch, id, 0, &DecodeLimits::default())?;
        let dir = tempfile::Builder::new().prefix("aperture-perf-ingest").tempdir()?;
        let cfg = LoadConfig {
            carrier,
            agents,
            duration: Duration::from_secs(p.seconds),
            max_frames_per_agent: p.max_frames_per_agent,
            in_flight: p.in_flight,
            grpc_tls: p.grpc_tls,
        };
        let r = run_load(&cfg, &template, dir.path()).with_context(|| format!("{agents} agents over {carrier}"))?;
        anyhow::ensure!(r.frames > 0, "no frame arrived");
        let samples = r.frames as f64 * samples_per_frame;
        let mut lat: Vec<f64> = r.ack_latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let cpu = r.server_cpu_s.max(0.01); // one clock tick: never divide by zero
        let acked_pct = lat.len() as f64 / r.frames as f64 * 100.0;
        let mut out = vec![Metric::new("acked_during_run_pct", "%", acked_pct)];
        // Without any acknowledgement seen in the run there is no latency to report.
        if !lat.is_empty() {
            out.push(Metric::new("ack_p50_ms", "ms", percentile(&mut lat, 50.0)));
            out.push(Metric::new("ack_p99_ms", "ms", percentile(&mut lat, 99.0)));
        }
        out.extend([
            Metric::new("samples_per_s", "samples/s", samples / r.elapsed_s),
            Metric::new("samples_per_aggregator_cpu_s", "samples/CPU-s", samples / cpu),
            Metric::new("aggregator_cpu_s_per_million_samples", "CPU-s", cpu / samples * 1e6),
            Metric::new("frame_bytes_per_sample", "B", r.frame_bytes as f64 / samples),
            // Loopback counts every byte once as sent and once as received.
            Metric::new("wire_bytes_per_sample", "B", r.loopback_bytes as f64 / 2.0 / samples),
            Metric::new("frames_dropped", "frames", r.dropped as f64),
        ]);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_names_round_trip() {
        let s = Ingest::new(Params {
            agents: vec![1, 64],
            seconds: 1,
            max_frames_per_agent: 1,
            samples: 10,
            stacks: 1,
            in_flight: 1,
            grpc_tls: true,
        });
        assert_eq!(s.sides(), ["quic-k1", "grpc-k1", "quic-k64", "grpc-k64"]);
        assert_eq!(parse_side("grpc-k64"), Some((Carrier::Grpc, 64)));
        assert_eq!(parse_side("tcp-k1"), None);
        assert_eq!(parse_side("quic-kx"), None);
    }
}
