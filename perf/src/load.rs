//! Push load over the transport, for the `ingest` scenario: K synthetic agents push copies of one
//! encoded frame to an in-process server over loopback, on one carrier, for
//! a bounded time and frame count, and the run reports throughput, the
//! server's CPU time, ack latencies and bytes.
//!
//! The server side (its tokio runtime and the acking thread) runs on threads
//! named `agg-*`; their CPU time is read from `/proc/self/task/*/stat`, so
//! the agents' cost is not counted. The sink only queues frame ids and acks
//! them every millisecond: what is measured is the transport, not storage.
//! Loopback bytes count everything the `lo` interface carried during the
//! run (both directions, every process on the machine): an upper bound.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader, FrameId, HEADER_LEN};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};

use aperture_transport::Carrier;
use aperture_transport::auth::AuthConfig;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, ServerConfig, serve};
use aperture_transport::tls::{ClientTlsConfig, ServerTlsConfig};

const TOKEN: &str = "bench-token";

/// What one load run does.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Carrier every agent uses.
    pub carrier: Carrier,
    /// Number of agents (one client and one producer thread each).
    pub agents: usize,
    /// How long the agents push.
    pub duration: Duration,
    /// Upper bound on frames per agent, whatever the duration.
    pub max_frames_per_agent: u64,
    /// Frames an agent keeps unacknowledged before waiting.
    pub in_flight: u64,
    /// gRPC with TLS (same certificate as QUIC) instead of plaintext.
    pub grpc_tls: bool,
}

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Seconds the agents pushed.
    pub elapsed_s: f64,
    /// Frames the server admitted.
    pub frames: u64,
    /// Frame bytes the server admitted.
    pub frame_bytes: u64,
    /// CPU seconds of the server's threads (`agg-*`).
    pub server_cpu_s: f64,
    /// Bytes the loopback interface carried, both directions.
    pub loopback_bytes: u64,
    /// Time from send to acknowledgement of every acknowledged frame.
    pub ack_latencies: Vec<Duration>,
    /// Frames the clients dropped.
    pub dropped: u64,
    /// Per agent, in agent order: frames whose acknowledgement it saw
    /// within the run (the spread of these is the carrier's fairness).
    pub acked_per_agent: Vec<u64>,
    /// Per agent, in agent order: its 99th percentile ack latency within
    /// the run (`None`: no ack seen).
    pub ack_p99_per_agent: Vec<Option<Duration>>,
}

/// A batch shaped like one second of a busy 8-CPU node at 99 Hz: `samples`
/// samples (as records of count 2) over `stacks` stacks of 16 frames.
pub fn synthetic_batch(samples: usize, stacks: usize) -> Batch {
    let stacks: Vec<Stack> = (0..stacks.max(1) as u64)
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
                stack: (i % stacks.len()) as u32,
                count: 2,
                period_ns: 10_101_010,
            })
            .collect(),
        stacks,
        ..Default::default()
    }
}

/// A copy of `template` with a new frame id and send time in its header.
pub fn restamp(template: &FrameBuf, id: FrameId, sent_unix_ns: u64) -> anyhow::Result<FrameBuf> {
    let mut f = template.clone();
    let mut h = FrameHeader::parse(&f, &DecodeLimits::default()).context("template frame header")?;
    h.id = id;
    h.sent_unix_ns = sent_unix_ns;
    let mut head = [0u8; HEADER_LEN];
    h.write(&mut head);
    f[..HEADER_LEN].copy_from_slice(&head);
    Ok(f)
}

/// utime + stime, in clock ticks, from the text of a `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` file (fields 14 and 15, counted after the
/// parenthesised command name, which may itself contain spaces and `)`).
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds used so far by this process's threads whose name starts with `prefix`.
pub fn thread_cpu_seconds(prefix: &str) -> f64 {
    const TICKS_PER_SEC: f64 = 100.0; // USER_HZ on Linux
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let mut total = 0u64;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with(prefix) {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            total += stat_cpu_ticks(&stat).unwrap_or(0);
        }
    }
    total as f64 / TICKS_PER_SEC
}

/// Bytes received plus sent on the loopback interface since boot.
pub fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .map(|rest| {
            let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
            f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0)
        })
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct BenchSink {
    pending: Mutex<Vec<FrameId>>,
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl IngressSink for BenchSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        self.frames.fetch_add(1, Relaxed);
        self.bytes.fetch_add(frame.bytes.len() as u64, Relaxed);
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).push(frame.header.id);
        Admission::Queued
    }
}

/// Runs one load: starts a server on loopback (its certificate in
/// `data_dir`), connects `cfg.agents` clients, lets them push copies of
/// `template` as fast as acknowledged until the duration or the frame bound
/// is reached, and stops everything.
pub fn run_load(cfg: &LoadConfig, template: &FrameBuf, data_dir: &Path) -> anyhow::Result<LoadReport> {
    run_load_paced(cfg, None, template, data_dir)
}

/// [`run_load`], with every agent sending one frame per `interval` (the
/// cadence of a real agent's batches) when `interval` is set, still within
/// `cfg.in_flight` unacknowledged frames. The agents start spread over one
/// interval, as real agents are.
pub fn run_load_paced(
    cfg: &LoadConfig,
    interval: Option<Duration>,
    template: &FrameBuf,
    data_dir: &Path,
) -> anyhow::Result<LoadReport> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agg-rt")
        .enable_all()
        .build()
        .context("server runtime")?;
    let sink = Arc::new(BenchSink::default());
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server_cfg = ServerConfig {
        quic_listen: Some(loopback),
        grpc_listen: Some(loopback),
        auth: AuthConfig { token: Some(TOKEN.into()), disabled: false },
        data_dir: data_dir.to_owned(),
        tls: ServerTlsConfig { insecure_plaintext: !cfg.grpc_tls, ..Default::default() },
        ..ServerConfig::default()
    };
    let server = server_rt.block_on(serve(server_cfg, sink.clone())).context("starting the bench server")?;
    // Producers stop first; the acker keeps acknowledging until the clients
    // are shut down, so their in-flight frames do not hold up the shutdown.
    let stop = Arc::new(AtomicBool::new(false));
    let ack_stop = Arc::new(AtomicBool::new(false));
    let acker = server.acker();
    let (ack_sink, acker_stop) = (Arc::clone(&sink), Arc::clone(&ack_stop));
    let ack_thread = std::thread::Builder::new()
        .name("agg-acker".into())
        .spawn(move || {
            while !acker_stop.load(Relaxed) {
                let ids = std::mem::take(&mut *ack_sink.pending.lock().unwrap_or_else(PoisonError::into_inner));
                if !ids.is_empty() {
                    acker.ack(&ids);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .context("acker thread")?;
    let addr = server.grpc_addr().context("server has no gRPC address")?;
    let carrier = if cfg.carrier == Carrier::Quic { CarrierChoice::Quic } else { CarrierChoice::Grpc };
    let clients = connect_agents(
        cfg.agents,
        addr,
        server.quic_addr(),
        carrier,
        !cfg.grpc_tls,
        TOKEN,
        &server.fingerprint(),
        0xb0,
    )?;
    let latencies = Arc::new(Mutex::new(vec![Vec::<Duration>::new(); cfg.agents]));
    let cpu0 = thread_cpu_seconds("agg-");
    let lo0 = loopback_bytes();
    let (frames0, bytes0) = (sink.frames.load(Relaxed), sink.bytes.load(Relaxed));
    let started = Instant::now();
    let producers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let (client, template) = (Arc::clone(client), template.clone());
            let (stop, latencies) = (Arc::clone(&stop), Arc::clone(&latencies));
            let (in_flight, max_frames) = (cfg.in_flight.max(1), cfg.max_frames_per_agent);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut sent: VecDeque<Instant> = VecDeque::new();
                let mut acked_seen = client.stats().session.frames_acked;
                let mut lat = Vec::new();
                let mut seq = 0u64;
                let agents = latencies.lock().unwrap_or_else(PoisonError::into_inner).len().max(1);
                // Spread the agents' first frames over one interval.
                let mut next_at = interval.map(|d| Instant::now() + d.mul_f64(i as f64 / agents as f64));
                while !stop.load(Relaxed) {
                    let acked = client.stats().session.frames_acked;
                    let now = Instant::now();
                    for _ in acked_seen..acked {
                        if let Some(t) = sent.pop_front() {
                            lat.push(now - t);
                        }
                    }
                    acked_seen = acked;
                    let due = next_at.is_none_or(|t| now >= t);
                    if due && (sent.len() as u64) < in_flight && seq < max_frames {
                        if let (Some(t), Some(d)) = (next_at.as_mut(), interval) {
                            *t += d;
                        }
                        seq += 1;
                        let id = FrameId { agent_id: agent_id(i), boot_id: BootId([0xb0; 16]), sequence: seq };
                        client.send(restamp(&template, id, seq)?).context("queueing a frame")?;
                        sent.push_back(Instant::now());
                    } else {
                        // Paced agents are idle most of the time: poll less.
                        std::thread::sleep(Duration::from_micros(if interval.is_some() { 1000 } else { 100 }));
                    }
                }
                latencies.lock().unwrap_or_else(PoisonError::into_inner)[i] = lat;
                Ok(())
            })
        })
        .collect();
    let total_bound = cfg.max_frames_per_agent.saturating_mul(cfg.agents as u64);
    while started.elapsed() < cfg.duration && sink.frames.load(Relaxed) - frames0 < total_bound {
        std::thread::sleep(Duration::from_millis(10));
    }
    let report = LoadReport {
        elapsed_s: started.elapsed().as_secs_f64(),
        frames: sink.frames.load(Relaxed) - frames0,
        frame_bytes: sink.bytes.load(Relaxed) - bytes0,
        server_cpu_s: thread_cpu_seconds("agg-") - cpu0,
        loopback_bytes: loopback_bytes() - lo0,
        ack_latencies: Vec::new(),
        dropped: 0,
        acked_per_agent: Vec::new(),
        ack_p99_per_agent: Vec::new(),
    };
    stop.store(true, Relaxed);
    let mut first_error = None;
    for p in producers {
        match p.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_error = first_error.or(Some(e)),
            Err(_) => first_error = first_error.or(Some(anyhow::anyhow!("a producer thread panicked"))),
        }
    }
    let dropped = clients.iter().map(|c| c.stats().session.frames_dropped).sum();
    let closing: Vec<_> = clients
        .into_iter()
        .filter_map(|c| Arc::try_unwrap(c).ok())
        .map(|c| std::thread::spawn(move || c.shutdown(Duration::from_secs(2))))
        .collect();
    for c in closing {
        let _ = c.join();
    }
    ack_stop.store(true, Relaxed);
    let _ = ack_thread.join();
    server_rt.block_on(server.shutdown(Duration::from_secs(2)));
    if let Some(e) = first_error {
        return Err(e);
    }
    let per_agent = std::mem::take(&mut *latencies.lock().unwrap_or_else(PoisonError::into_inner));
    let mut acked_per_agent = Vec::with_capacity(per_agent.len());
    let mut ack_p99_per_agent = Vec::with_capacity(per_agent.len());
    let mut ack_latencies = Vec::new();
    for mut lat in per_agent {
        lat.sort();
        acked_per_agent.push(lat.len() as u64);
        // Nearest rank: the smallest latency at or above 99% of the agent's acks.
        let rank = (lat.len() * 99).div_ceil(100).max(1);
        ack_p99_per_agent.push(lat.get(rank - 1).copied());
        ack_latencies.extend(lat);
    }
    ack_latencies.sort();
    Ok(LoadReport { ack_latencies, dropped, acked_per_agent, ack_p99_per_agent, ..report })
}

pub(crate) fn agent_id(i: usize) -> AgentId {
    let mut id = AgentId([0xa5; 16]);
    id.0[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    id
}

/// Starts `n` simulated agents (ids `agent_id(i)`, boot id `boot` repeated,
/// nodes `bench-<i>`) pushing to `addr` over `carrier` (QUIC on `quic`'s
/// port), and waits (at most 20 s) until every one has a session.
#[allow(clippy::too_many_arguments, reason = "the connection's parts, each needed")]
pub(crate) fn connect_agents(
    n: usize,
    addr: SocketAddr,
    quic: Option<SocketAddr>,
    carrier: CarrierChoice,
    plaintext: bool,
    token: &str,
    fingerprint: &str,
    boot: u8,
) -> anyhow::Result<Vec<Arc<Client>>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = ClientConfig {
            aggregator: addr.to_string(),
            token: Some(token.into()),
            tls: ClientTlsConfig {
                fingerprint: Some(fingerprint.into()),
                insecure_plaintext: plaintext,
                ..Default::default()
            },
            carrier,
            quic_port: quic.map(|a| a.port()),
            ..ClientConfig::default()
        };
        let identity = AgentIdentity {
            agent_id: agent_id(i),
            boot_id: BootId([boot; 16]),
            node: format!("bench-{i}"),
            agent_version: "bench".into(),
        };
        clients.push(Arc::new(Client::start(cfg, identity).context("starting a simulated agent")?));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while clients.iter().any(|c| !c.stats().established) {
        anyhow::ensure!(Instant::now() < deadline, "simulated agents did not connect within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(clients)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_reads_utime_and_stime_after_the_name() {
        let stat = "4242 (agg rt) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(42));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }
}
