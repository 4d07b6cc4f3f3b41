//! Load generator for the transport: K synthetic agents push realistic
//! batches to one in-process aggregator ingress over loopback, on QUIC and
//! on gRPC side by side, and the run reports throughput, the aggregator's
//! CPU cost, ack latency and bytes per sample.
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
//! The aggregator side (server runtime threads and the acking thread) runs
//! on threads named `agg-*`; its CPU time is read from
//! `/proc/self/task/*/stat`, so the agents' cost is not counted. The sink
//! only queues frame ids and acks them every millisecond: what is measured
//! is the transport, not storage. `wire B/sample` counts the bytes the
//! loopback interface carried during the run (both directions, every
//! process on the machine), so it is an upper bound.

#![allow(clippy::unwrap_used, clippy::print_stdout, reason = "benchmark tool")]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader, FrameId, HEADER_LEN, encode_batch};
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};
use aperture_transport::Carrier;
use aperture_transport::auth::AuthConfig;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, ServerConfig, serve};
use aperture_transport::tls::ClientTlsConfig;

const TOKEN: &str = "bench-token";

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

/// A batch shaped like one second of a busy 8-CPU node at 99 Hz.
fn batch(samples: usize, stacks: usize) -> Batch {
    let stacks: Vec<Stack> = (0..stacks as u64)
        .map(|i| {
            Stack::new(
                (0..16)
                    .map(|d| StackFrame {
                        address: 0x55_0000_0000 + i * 0x1000 + d * 0x10,
                        module_offset: i * 0x1000 + d * 0x10,
                        symbol: format!("crate::module_{}::function_{d}", i % 17),
                        module: if d > 12 { "libc.so.6".into() } else { "service".into() },
                        ..Default::default()
                    })
                    .collect(),
            )
        })
        .collect();
    let records = samples / 2;
    Batch {
        node: "bench-node".into(),
        targets: (0..8)
            .map(|p| Target { pid: 1000 + p, process: format!("worker-{p}"), ..Default::default() })
            .collect(),
        cpu: (0..records)
            .map(|i| CpuSample {
                time_ns: 1_700_000_000_000_000_000 + i as u64,
                target: (i % 8) as u32,
                stack: (i % stacks.len().max(1)) as u32,
                count: 2,
                period_ns: 10_101_010,
            })
            .collect(),
        stacks,
        ..Default::default()
    }
}

#[derive(Default)]
struct BenchSink {
    pending: Mutex<Vec<FrameId>>,
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl IngressSink for BenchSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        self.frames.fetch_add(1, Relaxed);
        self.bytes.fetch_add(frame.bytes.len() as u64, Relaxed);
        self.pending.lock().unwrap().push(frame.header.id);
        Admission::Queued
    }
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`.
fn thread_cpu_seconds(prefix: &str) -> f64 {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        total += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total as f64 / ticks_per_sec
}

fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .map(|rest| {
            let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0)
        })
        .unwrap_or(0)
}

fn restamp(template: &FrameBuf, id: FrameId, sent: u64) -> FrameBuf {
    let mut f = template.clone();
    let mut h = FrameHeader::parse(&f, &DecodeLimits::default()).unwrap();
    h.id = id;
    h.sent_unix_ns = sent;
    let mut head = [0u8; HEADER_LEN];
    h.write(&mut head);
    f[..HEADER_LEN].copy_from_slice(&head);
    f
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn run(o: &Opts, carrier: Carrier, k: usize, template: &FrameBuf, samples_per_frame: u64) {
    let dir = tempfile::tempdir().unwrap();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agg-rt")
        .enable_all()
        .build()
        .unwrap();
    let sink = Arc::new(BenchSink::default());
    let cfg = ServerConfig {
        quic_listen: Some("127.0.0.1:0".parse().unwrap()),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: AuthConfig { token: Some(TOKEN.into()), disabled: false },
        data_dir: dir.path().to_owned(),
        tls: aperture_transport::tls::ServerTlsConfig { grpc: o.grpc_tls, ..Default::default() },
        ..ServerConfig::default()
    };
    let server = server_rt.block_on(serve(cfg, sink.clone())).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let acker = server.acker();
    let ack_sink = Arc::clone(&sink);
    let ack_stop = Arc::clone(&stop);
    let ack_thread = std::thread::Builder::new()
        .name("agg-acker".into())
        .spawn(move || {
            while !ack_stop.load(Relaxed) {
                let ids = std::mem::take(&mut *ack_sink.pending.lock().unwrap());
                if !ids.is_empty() {
                    acker.ack(&ids);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .unwrap();
    let addr = server.grpc_addr().unwrap();
    let clients: Vec<Arc<Client>> = (0..k)
        .map(|i| {
            let cfg = ClientConfig {
                aggregator: addr.to_string(),
                token: Some(TOKEN.into()),
                tls: ClientTlsConfig {
                    fingerprint: Some(server.fingerprint()),
                    grpc: o.grpc_tls,
                    ..Default::default()
                },
                carrier: if carrier == Carrier::Quic { CarrierChoice::Quic } else { CarrierChoice::Grpc },
                quic_port: server.quic_addr().map(|a| a.port()),
                ..ClientConfig::default()
            };
            let id = AgentIdentity {
                agent_id: [i as u8 + 1; 16],
                boot_id: [0xb0; 16],
                node: format!("bench-{i}"),
                agent_version: "bench".into(),
            };
            Arc::new(Client::start(cfg, id).unwrap())
        })
        .collect();
    // Let every client connect before measuring.
    while clients.iter().any(|c| !c.stats().established) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let cpu0 = thread_cpu_seconds("agg-");
    let lo0 = loopback_bytes();
    let (frames0, bytes0) = (sink.frames.load(Relaxed), sink.bytes.load(Relaxed));
    let started = Instant::now();
    let producers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let client = Arc::clone(client);
            let template = template.clone();
            let stop = Arc::clone(&stop);
            let latencies = Arc::clone(&latencies);
            let in_flight = o.in_flight;
            std::thread::spawn(move || {
                let mut sent: VecDeque<Instant> = VecDeque::new();
                let mut acked_seen = client.stats().frames_acked;
                let mut lat = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Relaxed) {
                    let acked = client.stats().frames_acked;
                    let now = Instant::now();
                    for _ in acked_seen..acked {
                        if let Some(t) = sent.pop_front() {
                            lat.push(now - t);
                        }
                    }
                    acked_seen = acked;
                    if (sent.len() as u64) < in_flight {
                        seq += 1;
                        let id = FrameId { agent_id: [i as u8 + 1; 16], boot_id: [0xb0; 16], sequence: seq };
                        client.send(restamp(&template, id, seq)).unwrap();
                        sent.push_back(Instant::now());
                    } else {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                latencies.lock().unwrap().extend(lat);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(o.seconds));
    let elapsed = started.elapsed().as_secs_f64();
    let frames = sink.frames.load(Relaxed) - frames0;
    let bytes = sink.bytes.load(Relaxed) - bytes0;
    let cpu = thread_cpu_seconds("agg-") - cpu0;
    let lo = loopback_bytes() - lo0;
    stop.store(true, Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    let _ = ack_thread.join();
    let dropped: u64 = clients.iter().map(|c| c.stats().frames_dropped).sum();
    for c in clients {
        if let Ok(c) = Arc::try_unwrap(c) {
            c.shutdown(Duration::from_secs(2));
        }
    }
    server_rt.block_on(server.shutdown(Duration::from_secs(2)));
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort();
    let samples = frames * samples_per_frame;
    println!(
        "{:<9} K={:<3} {:>10.0} samples/s {:>7.0} frames/s {:>7.1} MB/s  aggregator {:>5.2} CPU-s = {:>10.0} samples/CPU-s  ack p50 {:>7.2} ms p99 {:>7.2} ms  frame {:>5.1} B/sample  wire ≤{:>5.1} B/sample  dropped {}",
        if carrier == Carrier::Grpc && o.grpc_tls { "grpc+tls" } else { carrier.as_str() },
        k,
        samples as f64 / elapsed,
        frames as f64 / elapsed,
        bytes as f64 / elapsed / 1e6,
        cpu,
        if cpu > 0.0 { samples as f64 / cpu } else { f64::NAN },
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        bytes as f64 / samples.max(1) as f64,
        lo as f64 / samples.max(1) as f64,
        dropped,
    );
}

fn main() {
    let o = opts();
    let b = batch(o.samples, o.stacks);
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
