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
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig, SharedRuntime};
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, ServerConfig, serve};
use aperture_transport::tls::{ClientTlsConfig, ServerTlsConfig};

const TOKEN: &str = "bench-token";

/// What one load run does.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Carrier every agent uses.
    pub carrier: Carrier,
    /// Number of agents (one client each).
    pub agents: usize,
    /// How long the agents push.
    pub duration: Duration,
    /// Upper bound on frames per agent, whatever the duration.
    pub max_frames_per_agent: u64,
    /// Frames an agent keeps unacknowledged before waiting.
    pub in_flight: u64,
    /// gRPC with TLS (same certificate as QUIC) instead of plaintext.
    pub grpc_tls: bool,
    /// Run the agents on a shared runtime, as many agents as one thread
    /// cannot each have (see [`SharedLoad`]); `None`: each agent is a
    /// client on its own thread, runtime and UDP socket, as a real agent
    /// is, with a producer thread of its own.
    pub shared: Option<SharedLoad>,
}

/// How a load of many agents shares the load generator's resources. Each
/// agent keeps its own connection and session; what is shared is the
/// clients' tokio runtime, the QUIC sockets and the producer threads.
#[derive(Clone, Copy, Debug)]
pub struct SharedLoad {
    /// Worker threads of the clients' runtime (named `loadgen-rt`, so not
    /// counted as the aggregator's `agg-*`).
    pub runtime_threads: usize,
    /// QUIC endpoints (UDP sockets) the agents share, assigned in turn.
    pub quic_sockets: usize,
    /// Threads producing frames, each for every P-th agent.
    pub producer_threads: usize,
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
    let client_rt = match cfg.shared {
        None => None,
        Some(s) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(s.runtime_threads.max(1))
                .thread_name("loadgen-rt")
                .enable_all()
                .build()
                .context("the clients' runtime")?,
        ),
    };
    let shared = client_rt
        .as_ref()
        .zip(cfg.shared)
        .map(|(rt, s)| SharedRuntime::new(rt.handle().clone()).with_quic_endpoints(s.quic_sockets.max(1)));
    let clients = connect_agents(
        cfg.agents,
        addr,
        server.quic_addr(),
        carrier,
        !cfg.grpc_tls,
        TOKEN,
        &server.fingerprint(),
        0xb0,
        shared.as_ref(),
    )?;
    let latencies = Arc::new(Mutex::new(vec![Vec::<Duration>::new(); cfg.agents]));
    let cpu0 = thread_cpu_seconds("agg-");
    let lo0 = loopback_bytes();
    let (frames0, bytes0) = (sink.frames.load(Relaxed), sink.bytes.load(Relaxed));
    let started = Instant::now();
    // One producer thread per agent, or every P-th agent per thread.
    let threads = cfg.shared.map_or(cfg.agents, |s| s.producer_threads.clamp(1, cfg.agents.max(1)));
    let producers: Vec<_> = (0..threads)
        .map(|t| {
            let mine: Vec<(usize, Arc<Client>)> =
                clients.iter().enumerate().skip(t).step_by(threads).map(|(i, c)| (i, Arc::clone(c))).collect();
            let template = template.clone();
            let (stop, latencies) = (Arc::clone(&stop), Arc::clone(&latencies));
            let (in_flight, max_frames, agents) = (cfg.in_flight.max(1), cfg.max_frames_per_agent, cfg.agents.max(1));
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut state: Vec<Producing> = mine
                    .iter()
                    .map(|(i, client)| Producing {
                        sent: VecDeque::new(),
                        acked_seen: client.stats().session.frames_acked,
                        lat: Vec::new(),
                        seq: 0,
                        // Spread the agents' first frames over one interval.
                        next_at: interval.map(|d| Instant::now() + d.mul_f64(*i as f64 / agents as f64)),
                    })
                    .collect();
                while !stop.load(Relaxed) {
                    let mut sent_any = false;
                    for ((i, client), st) in mine.iter().zip(&mut state) {
                        let acked = client.stats().session.frames_acked;
                        let now = Instant::now();
                        for _ in st.acked_seen..acked {
                            if let Some(t) = st.sent.pop_front() {
                                st.lat.push(now - t);
                            }
                        }
                        st.acked_seen = acked;
                        let due = st.next_at.is_none_or(|t| now >= t);
                        if due && (st.sent.len() as u64) < in_flight && st.seq < max_frames {
                            if let (Some(t), Some(d)) = (st.next_at.as_mut(), interval) {
                                *t += d;
                            }
                            st.seq += 1;
                            let id = FrameId { agent_id: agent_id(*i), boot_id: BootId([0xb0; 16]), sequence: st.seq };
                            client.send(restamp(&template, id, st.seq)?).context("queueing a frame")?;
                            st.sent.push_back(Instant::now());
                            sent_any = true;
                        }
                    }
                    if !sent_any {
                        // Paced agents are idle most of the time: poll less.
                        std::thread::sleep(Duration::from_micros(if interval.is_some() { 1000 } else { 100 }));
                    }
                }
                let mut all = latencies.lock().unwrap_or_else(PoisonError::into_inner);
                for ((i, _), st) in mine.iter().zip(state) {
                    all[*i] = st.lat;
                }
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
    // Let the frames in flight be acknowledged, then close every client
    // (in parallel: a QUIC close waits briefly for its stream).
    let drain_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < drain_until && clients.iter().any(|c| c.stats().session.unacked_frames > 0) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut chunks: Vec<Vec<Client>> = (0..clients.len().min(64)).map(|_| Vec::new()).collect();
    let lanes = chunks.len().max(1);
    for (i, c) in clients.into_iter().filter_map(|c| Arc::try_unwrap(c).ok()).enumerate() {
        chunks[i % lanes].push(c);
    }
    let closing: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            std::thread::spawn(move || {
                for c in chunk {
                    c.shutdown(Duration::ZERO);
                }
            })
        })
        .collect();
    for c in closing {
        let _ = c.join();
    }
    drop(shared);
    if let Some(rt) = client_rt {
        rt.shutdown_timeout(Duration::from_secs(2));
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

/// One agent's side of a producer thread.
struct Producing {
    /// Send times of the frames not yet seen acknowledged, oldest first.
    sent: VecDeque<Instant>,
    acked_seen: u64,
    lat: Vec<Duration>,
    seq: u64,
    next_at: Option<Instant>,
}

pub(crate) fn agent_id(i: usize) -> AgentId {
    let mut id = AgentId([0xa5; 16]);
    id.0[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    id
}

/// Starts `n` simulated agents (ids `agent_id(i)`, boot id `boot` repeated,
/// nodes `bench-<i>`) pushing to `addr` over `carrier` (QUIC on `quic`'s
/// port), each on its own thread or as tasks of `on`, and waits (at most
/// 20 s, plus 30 ms per agent) until every one has a session.
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
    on: Option<&SharedRuntime>,
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
        let client = match on {
            None => Client::start(cfg, identity),
            Some(rt) => Client::start_on(cfg, identity, rt),
        };
        clients.push(Arc::new(client.context("starting a simulated agent")?));
    }
    let wait = Duration::from_secs(20) + Duration::from_millis(30 * n as u64);
    let deadline = Instant::now() + wait;
    while clients.iter().any(|c| !c.stats().established) {
        let connected = clients.iter().filter(|c| c.stats().established).count();
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {connected} of {n} simulated agents connected within {wait:?}"
        );
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
