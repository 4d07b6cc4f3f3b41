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
use crate::load::{LoadConfig, SharedLoad, run_load, run_load_paced, synthetic_batch};
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
    /// Agent counts K run paced as well (sides `<carrier>-k<K>-paced`):
    /// every agent sends one frame per `paced_interval_ms`, the cadence of
    /// a real agent, so the aggregator is below saturation.
    #[serde(default)]
    pub paced_agents: Vec<usize>,
    /// Interval between two frames of a paced agent, ms.
    #[serde(default = "default_paced_interval_ms")]
    pub paced_interval_ms: u64,
    /// Carriers (`quic`, `grpc`); default both.
    #[serde(default = "default_carriers")]
    pub carriers: Vec<String>,
    /// Frames unacknowledged over all agents at most: each agent keeps
    /// `min(in_flight, in_flight_total / K)` (at least one), so K = 1,000
    /// does not queue gigabytes in the load generator. With the defaults
    /// (64 and 4,096) K <= 64 keeps 64 each, as before.
    #[serde(default = "default_in_flight_total")]
    pub in_flight_total: u64,
    /// From this many agents on, the agents run as tasks on one shared
    /// runtime with shared QUIC sockets and `producer_threads` producer
    /// threads; below it each agent is a client on its own thread, runtime
    /// and socket with a producer thread of its own, as before.
    #[serde(default = "default_shared_from")]
    pub shared_from: usize,
    /// Worker threads of the shared runtime.
    #[serde(default = "default_two")]
    pub runtime_threads: usize,
    /// QUIC sockets the agents of a shared runtime use, in turn.
    #[serde(default = "default_quic_sockets")]
    pub quic_sockets: usize,
    /// Producer threads for agents on a shared runtime.
    #[serde(default = "default_producer_threads")]
    pub producer_threads: usize,
}

fn default_carriers() -> Vec<String> {
    vec!["quic".into(), "grpc".into()]
}

fn default_in_flight_total() -> u64 {
    4096
}

fn default_shared_from() -> usize {
    256
}

fn default_two() -> usize {
    2
}

fn default_quic_sockets() -> usize {
    16
}

fn default_producer_threads() -> usize {
    4
}

fn default_paced_interval_ms() -> u64 {
    1000
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

/// Parses a side name `quic-k8` into (carrier, K); `quic-k8-paced` as well
/// (see [`is_paced`]).
pub fn parse_side(side: &str) -> Option<(Carrier, usize)> {
    let side = side.strip_suffix("-paced").unwrap_or(side);
    let (carrier, k) = side.split_once("-k")?;
    let carrier = match carrier {
        "quic" => Carrier::Quic,
        "grpc" => Carrier::Grpc,
        _ => return None,
    };
    Some((carrier, k.parse().ok()?))
}

/// Whether a side's agents are paced.
pub fn is_paced(side: &str) -> bool {
    side.ends_with("-paced")
}

/// Spread of per-agent counts: (min, median, max, coefficient of variation in %).
pub fn spread(counts: &[u64]) -> Option<(f64, f64, f64, f64)> {
    if counts.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = counts.iter().map(|&c| c as f64).collect();
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let cv = if mean > 0.0 { var.sqrt() / mean * 100.0 } else { 0.0 };
    let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    Some((min, percentile(&mut v, 50.0), max, cv))
}

impl Scenario for Ingest {
    fn sides(&self) -> Vec<String> {
        let p = &self.params;
        let full = p.agents.iter().flat_map(|k| p.carriers.iter().map(move |c| format!("{c}-k{k}")));
        let paced = p.paced_agents.iter().flat_map(|k| p.carriers.iter().map(move |c| format!("{c}-k{k}-paced")));
        full.chain(paced).collect()
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
            in_flight: p.in_flight.min(p.in_flight_total / agents.max(1) as u64).max(1),
            grpc_tls: p.grpc_tls,
            shared: (agents >= p.shared_from).then_some(SharedLoad {
                runtime_threads: p.runtime_threads,
                quic_sockets: p.quic_sockets,
                producer_threads: p.producer_threads,
            }),
        };
        let interval = is_paced(side).then(|| Duration::from_millis(p.paced_interval_ms.max(1)));
        let r = match interval {
            None => run_load(&cfg, &template, dir.path()),
            Some(_) => run_load_paced(&cfg, interval, &template, dir.path()),
        }
        .with_context(|| format!("{agents} agents over {carrier}"))?;
        anyhow::ensure!(r.frames > 0, "no frame arrived");
        let samples = r.frames as f64 * samples_per_frame;
        let mut lat: Vec<f64> = r.ack_latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let cpu = r.server_cpu_s.max(0.01); // one clock tick: never divide by zero
        let acked_pct = lat.len() as f64 / r.frames as f64 * 100.0;
        let mut out = vec![
            Metric::new("acked_during_run_pct", "%", acked_pct),
            Metric::new("in_flight_per_agent", "frames", cfg.in_flight as f64),
        ];
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
        // Fairness: how evenly the agents got through (frames acknowledged
        // within the run, per agent), and the worst agent's ack tail.
        if let Some((min, median, max, cv)) = spread(&r.acked_per_agent) {
            out.extend([
                Metric::new("agent_acked_frames_min", "frames", min),
                Metric::new("agent_acked_frames_median", "frames", median),
                Metric::new("agent_acked_frames_max", "frames", max),
                Metric::new("agent_acked_frames_cv_pct", "%", cv),
                Metric::new(
                    "agents_without_ack",
                    "agents",
                    r.acked_per_agent.iter().filter(|&&n| n == 0).count() as f64,
                ),
            ]);
        }
        if let Some(worst) = r.ack_p99_per_agent.iter().flatten().max() {
            out.push(Metric::new("worst_agent_ack_p99_ms", "ms", worst.as_secs_f64() * 1e3));
        }
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
            paced_agents: vec![64],
            paced_interval_ms: 1000,
            carriers: default_carriers(),
            in_flight_total: default_in_flight_total(),
            shared_from: default_shared_from(),
            runtime_threads: 2,
            quic_sockets: 16,
            producer_threads: 4,
        });
        assert_eq!(s.sides(), ["quic-k1", "grpc-k1", "quic-k64", "grpc-k64", "quic-k64-paced", "grpc-k64-paced"]);
        assert_eq!(parse_side("quic-k64-paced"), Some((Carrier::Quic, 64)));
        assert!(is_paced("quic-k64-paced") && !is_paced("quic-k64"));
        assert_eq!(parse_side("grpc-k64"), Some((Carrier::Grpc, 64)));
        assert_eq!(parse_side("tcp-k1"), None);
        assert_eq!(parse_side("quic-kx"), None);
    }

    #[test]
    fn spread_of_per_agent_counts() {
        assert_eq!(spread(&[]), None);
        let (min, median, max, cv) = spread(&[10, 10, 10, 10]).unwrap();
        assert_eq!((min, median, max, cv), (10.0, 10.0, 10.0, 0.0));
        let (min, _, max, cv) = spread(&[0, 20]).unwrap();
        assert_eq!((min, max), (0.0, 20.0));
        assert!((cv - 100.0).abs() < 1e-9, "{cv}");
    }
}
