//! `ingest_formats`: what one profile costs the aggregator in each format it
//! ingests — Aperture's own frames (QUIC, gRPC), Pyroscope's gzipped pprof
//! (`POST /ingest`), OTLP profiles (HTTP, gRPC) — side by side in one run.
//!
//! A real aggregator ([`Daemon`]: ingress, shards, writer, embedded store;
//! default settings, a token) runs in this process, started fresh with an
//! empty store for every side. K clients push the same synthetic profile
//! ([`crate::formats`]) for a bounded time and count, each with a fixed
//! number of requests outstanding, then wait for every answer; an answer
//! means committed. Aggregator CPU is the utime+stime of the aggregator's
//! threads (its runtime `agg-rt`, `aperture-shard-*`, `aperture-writer-*`)
//! from `/proc/self/task`, from the first request to the last answer; the
//! clients run on other threads and are not counted.
//!
//! Sides: `aperture-quic`, `aperture-grpc`, `pyroscope-ingest`, `otlp-http`,
//! `otlp-grpc`. Plain TCP everywhere but QUIC (always TLS): gRPC runs with
//! `tls.insecure_plaintext` as inside a cluster, HTTP is the plain HTTP port.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aperture_aggregator::Daemon;
use aperture_core::config::{AggregatorConfig, Secret};
use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::Batch;
use bytes::Bytes;
use serde::Deserialize;

use crate::formats::{otlp_http_gzip, otlp_request, pprof_gzip, pyroscope_query};
use crate::harness::{Metric, Scenario};
use crate::load::{loopback_bytes, synthetic_batch, thread_cpu_seconds};
use crate::push::{HttpPost, Measure, PushLimits, PushOutcome};

const TOKEN: &str = "bench-ingest-token";

/// Every side, in the order `sides` lists them.
pub const SIDES: &[&str] = &["aperture-quic", "aperture-grpc", "pyroscope-ingest", "otlp-http", "otlp-grpc"];

/// Thread-name prefixes of the aggregator's threads (`comm` is cut at 15 bytes).
const AGGREGATOR_THREADS: &[&str] = &["agg-", "aperture-shard", "aperture-write"];

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Sides to run (default: all of [`SIDES`]).
    #[serde(default)]
    pub sides: Option<Vec<String>>,
    /// Clients pushing in parallel.
    pub clients: usize,
    /// Requests (frames) each client keeps outstanding.
    pub in_flight: usize,
    /// Seconds each side pushes.
    pub seconds: u64,
    /// Upper bound on requests per client per side.
    pub max_requests_per_client: u64,
    /// Samples per request.
    pub samples: usize,
    /// Stacks (of 16 frames) per request.
    pub stacks: usize,
    /// Longest wait for the last answers, seconds.
    pub drain_timeout_s: u64,
}

/// The scenario.
#[derive(Debug)]
pub struct IngestFormats {
    params: Params,
    /// The aggregator's runtime.
    agg_rt: Option<tokio::runtime::Runtime>,
    /// The HTTP and gRPC clients' runtime.
    load_rt: Option<tokio::runtime::Runtime>,
}

impl IngestFormats {
    /// A scenario with these parameters.
    pub fn new(params: Params) -> IngestFormats {
        IngestFormats { params, agg_rt: None, load_rt: None }
    }
}

/// The synthetic batch with its records one second back from now (a
/// profile ingested as it would be live), one record per nanosecond.
fn batch(samples: usize, stacks: usize) -> anyhow::Result<Batch> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let t0 = (now - 1) * 1_000_000_000;
    let mut b = synthetic_batch(samples, stacks);
    for (i, s) in b.cpu.iter_mut().enumerate() {
        s.time_ns = t0 + i as u64;
    }
    Ok(b)
}

fn config(dir: &std::path::Path) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::default();
    cfg.listen.http = "127.0.0.1:0".into();
    cfg.listen.grpc = "127.0.0.1:0".into();
    cfg.listen.quic = "127.0.0.1:0".into();
    cfg.otlp.grpc_listen = "127.0.0.1:0".into();
    cfg.auth.token = Secret(TOKEN.into());
    cfg.tls.insecure_plaintext = true;
    cfg.data_dir = dir.to_owned();
    cfg
}

/// CPU seconds of the aggregator's threads so far.
fn aggregator_cpu_s() -> f64 {
    AGGREGATOR_THREADS.iter().map(|p| thread_cpu_seconds(p)).sum()
}

/// What one measured push gave.
#[derive(Debug, Default)]
struct Measured {
    outcome: PushOutcome,
    elapsed_s: f64,
    cpu_s: f64,
    loopback_bytes: u64,
}

/// Pushes copies of `batch` as `side` into `daemon`, with the push proper
/// inside `measure`; returns the size of one request's body.
fn push(
    side: &str,
    daemon: &Daemon,
    batch: &Batch,
    limits: PushLimits,
    load_rt: &tokio::runtime::Runtime,
    measure: Measure,
) -> anyhow::Result<usize> {
    let http = daemon.http_addr();
    match side {
        "aperture-quic" | "aperture-grpc" => {
            let grpc = side == "aperture-grpc";
            let addr = if grpc { daemon.grpc_addr() } else { daemon.quic_addr() };
            let addr = addr.context("the aggregator has no agent ingress")?;
            let id = FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([0xb1; 16]), sequence: 1 };
            let template = encode_batch(batch, id, 0, &DecodeLimits::default())?;
            crate::push::frames(addr, grpc, TOKEN, &daemon.fingerprint(), &template, limits, measure)?;
            Ok(template.len())
        }
        "pyroscope-ingest" => {
            let body = Bytes::from(pprof_gzip(batch)?);
            let len = body.len();
            let req = HttpPost {
                path: format!("/ingest?{}", pyroscope_query(batch)),
                content_type: "application/octet-stream",
                content_encoding: None,
                body,
            };
            crate::push::http(load_rt, http, TOKEN, &req, limits, measure)?;
            Ok(len)
        }
        "otlp-http" => {
            let body = Bytes::from(otlp_http_gzip(&otlp_request(batch))?);
            let len = body.len();
            let req = HttpPost {
                path: "/v1development/profiles".into(),
                content_type: "application/x-protobuf",
                content_encoding: Some("gzip"),
                body,
            };
            crate::push::http(load_rt, http, TOKEN, &req, limits, measure)?;
            Ok(len)
        }
        "otlp-grpc" => {
            let gzipped = otlp_http_gzip(&otlp_request(batch))?;
            let addr = daemon.otlp_grpc_addr().context("the aggregator has no OTLP gRPC listener")?;
            crate::push::otlp_grpc(load_rt, addr, TOKEN, &crate::push::grpc_message(&gzipped)?, limits, measure)?;
            Ok(gzipped.len())
        }
        other => bail!("unknown side {other}; known: {}", SIDES.join(", ")),
    }
}

impl Scenario for IngestFormats {
    fn sides(&self) -> Vec<String> {
        match &self.params.sides {
            Some(s) => s.clone(),
            None => SIDES.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        for side in self.sides() {
            anyhow::ensure!(SIDES.contains(&side.as_str()), "unknown side {side}; known: {}", SIDES.join(", "));
        }
        let runtime = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(name)
                // Blocking threads (SQLite) live on between sides: none of
                // their time is lost when one exits between two readings.
                .thread_keep_alive(Duration::from_secs(3600))
                .enable_all()
                .build()
        };
        self.agg_rt = Some(runtime("agg-rt")?);
        self.load_rt = Some(runtime("load-rt")?);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let (Some(agg_rt), Some(load_rt)) = (&self.agg_rt, &self.load_rt) else { bail!("setup did not run") };
        let p = &self.params;
        let batch = batch(p.samples, p.stacks)?;
        let samples_per_request = batch.sample_count() as f64;
        let dir = tempfile::Builder::new().prefix("aperture-perf-formats").tempdir()?;
        let daemon = agg_rt.block_on(Daemon::start(&config(dir.path()))).context("starting the aggregator")?;
        let limits = PushLimits {
            clients: p.clients.max(1),
            in_flight: p.in_flight.max(1),
            duration: Duration::from_secs(p.seconds),
            max_per_client: p.max_requests_per_client,
            drain_timeout: Duration::from_secs(p.drain_timeout_s),
        };
        let mut measured = Measured::default();
        let mut measure = |push: &mut dyn FnMut() -> anyhow::Result<PushOutcome>| -> anyhow::Result<()> {
            let (cpu0, lo0, t0) = (aggregator_cpu_s(), loopback_bytes(), Instant::now());
            let outcome = push()?;
            measured = Measured {
                outcome,
                elapsed_s: t0.elapsed().as_secs_f64(),
                cpu_s: aggregator_cpu_s() - cpu0,
                loopback_bytes: loopback_bytes() - lo0,
            };
            Ok(())
        };
        let pushed = push(side, &daemon, &batch, limits, load_rt, &mut measure);
        let stopped = agg_rt.block_on(daemon.shutdown()).context("stopping the aggregator");
        let payload_bytes = pushed?;
        stopped?;
        let m = measured;
        if let Some(e) = &m.outcome.first_error {
            eprintln!("[ingest_formats] {side}: {} errors, the first: {e}", m.outcome.errors);
        }
        anyhow::ensure!(m.outcome.committed > 0, "{side}: nothing was committed");
        let samples = m.outcome.committed as f64 * samples_per_request;
        let cpu = m.cpu_s.max(0.01); // one clock tick: never divide by zero
        Ok(vec![
            Metric::new("samples_per_s", "samples/s", samples / m.elapsed_s),
            Metric::new("aggregator_cpu_s_per_million_samples", "CPU-s", cpu / samples * 1e6),
            Metric::new("payload_bytes_per_sample", "B", payload_bytes as f64 / samples_per_request),
            // Loopback counts every byte once as sent and once as received.
            Metric::new("loopback_bytes_per_sample", "B", m.loopback_bytes as f64 / 2.0 / samples),
            Metric::new("errors", "requests", m.outcome.errors as f64),
        ])
    }

    fn teardown(&mut self) {
        self.load_rt = None;
        self.agg_rt = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn every_format_of_the_batch_is_smaller_compressed_and_carries_its_samples() {
        let b = batch(800, 100).expect("batch");
        assert_eq!(b.sample_count(), 800);
        let otlp = otlp_http_gzip(&otlp_request(&b)).expect("gzip");
        assert!(otlp.len() < otlp_request(&b).encoded_len());
        assert!(pyroscope_query(&b).contains("format=pprof"));
    }

    /// Sums the counts of a folded profile (`frame;frame;... count` lines).
    fn folded_total(text: &str) -> (u64, usize) {
        let counts: Vec<u64> = text.lines().filter_map(|l| l.rsplit_once(' ')?.1.parse().ok()).collect();
        (counts.iter().sum(), counts.len())
    }

    #[test]
    fn every_side_commits_the_same_samples_and_stacks() {
        let agg_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let load_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let limits = PushLimits {
            clients: 1,
            in_flight: 1,
            duration: Duration::from_secs(30),
            max_per_client: 1,
            drain_timeout: Duration::from_secs(30),
        };
        let b = batch(800, 100).expect("batch");
        // Folded profiles name frames by symbol: stacks alike by name are one line.
        let names: std::collections::HashSet<Vec<&str>> =
            b.stacks.iter().map(|s| s.frames.iter().map(|f| f.symbol.as_str()).collect()).collect();
        for side in SIDES {
            let dir = tempfile::tempdir().expect("tempdir");
            let daemon = agg_rt.block_on(Daemon::start(&config(dir.path()))).expect("aggregator");
            let mut outcome = None;
            let mut measure = |push: &mut dyn FnMut() -> anyhow::Result<PushOutcome>| -> anyhow::Result<()> {
                outcome = Some(push()?);
                Ok(())
            };
            push(side, &daemon, &b, limits, &load_rt, &mut measure).expect("push");
            let outcome = outcome.expect("pushed");
            assert_eq!((outcome.committed, outcome.errors), (1, 0), "{side}: {:?}", outcome.first_error);
            let get = |path: &str| {
                let r = crate::sys::http(daemon.http_addr(), "GET", path, Some(TOKEN), b"", Duration::from_secs(10))
                    .expect("query");
                assert_eq!(r.status, 200, "{side} {path}: {}", r.text());
                r.text()
            };
            let types: serde_json::Value =
                serde_json::from_str(&get("/api/v1/labels/type/values?from=-10m")).expect("json");
            let types: Vec<String> = types["values"]
                .as_array()
                .expect("values")
                .iter()
                .filter_map(|t| Some(t.as_str()?.to_owned()))
                .collect();
            // Every side stores the 800 samples over the same stacks: agents' frames
            // as the cpu mode, pushes under their CPU sample-count type.
            let stored: Vec<(String, (u64, usize))> = std::iter::once("mode=cpu".to_owned())
                .chain(types.iter().map(|t| format!("type={t}")))
                .map(|q| {
                    let folded = get(&format!("/api/v1/profile?format=folded&from=-10m&{q}"));
                    (q, folded_total(&folded))
                })
                .collect();
            assert!(stored.iter().any(|(_, s)| *s == (800, names.len())), "{side}: {stored:?}");
            agg_rt.block_on(daemon.shutdown()).expect("shutdown");
        }
    }

    #[test]
    fn sides_default_to_all_and_unknown_ones_are_refused() {
        let params = |sides: Option<Vec<String>>| Params {
            sides,
            clients: 1,
            in_flight: 1,
            seconds: 1,
            max_requests_per_client: 1,
            samples: 10,
            stacks: 1,
            drain_timeout_s: 1,
        };
        assert_eq!(IngestFormats::new(params(None)).sides(), SIDES);
        let mut s = IngestFormats::new(params(Some(vec!["otlp-ftp".into()])));
        assert!(s.setup().is_err());
    }
}
