//! Load generator for the transport: K synthetic agents push realistic
//! batches to one in-process aggregator ingress over loopback, on QUIC and
//! on gRPC side by side, and the run reports throughput, the aggregator's
//! CPU cost, ack latency and bytes per sample. The load itself is
//! [`aperture_transport::bench`], shared with the perf harness (`aperture-perf run ingest`).
//!
//! ```text
//! cargo run --release -p aperture-transport --example push_load -- --clients 1,8 --seconds 5
//! ```
//!
//! Options: `--carrier quic|grpc|both` (both), `--clients 1,8,64` (1,8),
//! `--seconds N` (5), `--samples N` per batch (800), `--stacks N` per batch (100),
//! `--in-flight N` frames per agent (64), `--grpc-tls true|false` (false:
//! gRPC in plaintext as inside a cluster; true: with the same certificate as QUIC).
//!
//! What is counted is described in [`aperture_transport::bench`]: the
//! server's threads only, an acking sink (no storage), and loopback bytes
//! as an upper bound of the wire bytes.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "benchmark tool")]

use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, encode_batch};
use aperture_transport::Carrier;
use aperture_transport::bench::{LoadConfig, run_load, synthetic_batch};

struct Opts {
    carriers: Vec<Carrier>,
    clients: Vec<usize>,
    seconds: u64,
    samples: usize,
    stacks: usize,
    in_flight: u64,
    grpc_tls: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        carriers: vec![Carrier::Quic, Carrier::Grpc],
        clients: vec![1, 8],
        seconds: 5,
        samples: 800,
        stacks: 100,
        in_flight: 64,
        grpc_tls: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let (k, v) = (pair[0].as_str(), pair.get(1).map(String::as_str).unwrap_or(""));
        match k {
            "--carrier" => {
                o.carriers = match v {
                    "quic" => vec![Carrier::Quic],
                    "grpc" => vec![Carrier::Grpc],
                    _ => vec![Carrier::Quic, Carrier::Grpc],
                }
            }
            "--clients" => o.clients = v.split(',').map(|n| n.parse().unwrap()).collect(),
            "--seconds" => o.seconds = v.parse().unwrap(),
            "--samples" => o.samples = v.parse().unwrap(),
            "--stacks" => o.stacks = v.parse().unwrap(),
            "--in-flight" => o.in_flight = v.parse().unwrap(),
            "--grpc-tls" => o.grpc_tls = v == "true",
            other => panic!("unknown option {other}"),
        }
    }
    o
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn run(o: &Opts, carrier: Carrier, k: usize, template: &FrameBuf, samples_per_frame: u64) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoadConfig {
        carrier,
        agents: k,
        duration: Duration::from_secs(o.seconds),
        max_frames_per_agent: u64::MAX,
        in_flight: o.in_flight,
        grpc_tls: o.grpc_tls,
    };
    let r = run_load(&cfg, template, dir.path()).unwrap();
    let samples = r.frames * samples_per_frame;
    let cpu = r.server_cpu_s;
    println!(
        "{:<9} K={:<3} {:>10.0} samples/s {:>7.0} frames/s {:>7.1} MB/s  aggregator {:>5.2} CPU-s = {:>10.0} samples/CPU-s  ack p50 {:>7.2} ms p99 {:>7.2} ms  frame {:>5.1} B/sample  wire ≤{:>5.1} B/sample  dropped {}",
        if carrier == Carrier::Grpc && o.grpc_tls { "grpc+tls" } else { carrier.as_str() },
        k,
        samples as f64 / r.elapsed_s,
        r.frames as f64 / r.elapsed_s,
        r.frame_bytes as f64 / r.elapsed_s / 1e6,
        cpu,
        if cpu > 0.0 { samples as f64 / cpu } else { f64::NAN },
        percentile(&r.ack_latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&r.ack_latencies, 0.99).as_secs_f64() * 1e3,
        r.frame_bytes as f64 / samples.max(1) as f64,
        r.loopback_bytes as f64 / samples.max(1) as f64,
        r.dropped,
    );
}

fn main() {
    let o = opts();
    let b = synthetic_batch(o.samples, o.stacks);
    let samples_per_frame = b.sample_count();
    let template =
        encode_batch(&b, FrameId { agent_id: [1; 16], boot_id: [0xb0; 16], sequence: 1 }, 0, &DecodeLimits::default())
            .unwrap();
    println!(
        "batch: {samples_per_frame} samples, {} stacks, frame {} bytes; {} s per run",
        o.stacks,
        template.len(),
        o.seconds
    );
    for &k in &o.clients {
        for &carrier in &o.carriers {
            run(&o, carrier, k, &template, samples_per_frame);
        }
    }
}
