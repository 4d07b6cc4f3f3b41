//! `fleet`: how many agents one aggregator process serves. N simulated
//! agents, each sending what a busy 8-CPU node at 99 Hz produces, at the
//! agent's batch cadence, push over the real transport (QUIC, or gRPC over
//! TLS: both encrypted) to `aperture aggregator` running as its own process
//! (embedded store, default settings but `limits.max_connections`), so its
//! CPU and memory are read from `/proc/<pid>` apart from the load
//! generator's.
//!
//! Each side (`<carrier>-n<N>`) starts a fresh aggregator, connects the N
//! agents gradually, holds them connected and silent for `idle_s` (idle
//! RSS and CPU), then lets every agent send one frame per `batch_ms`, its
//! sending moments spread evenly over the cadence. After `warmup_s` the
//! measured window of `busy_s` begins: aggregator CPU, acknowledged
//! samples per agent (fairness), ack latency of the frames sent in it
//! (send to acknowledgement, seen by a watcher sweeping every client's
//! counters), RSS at its end, refusals and drops from the aggregator's
//! `/metrics` and the clients' counters. Freshness is sampled on a few
//! marker agents: now and then one of their frames carries a process seen
//! nowhere else, whose sample is the newest of the frame; the time from
//! that sample to the process being listed by the HTTP API is one
//! observation.
//!
//! Stack churn: each agent reports `processes` processes (namespace, pod,
//! container and process name: the label sets) and `stacks` stacks per
//! frame, drawn from a pool shared by the fleet (the same software runs
//! on many nodes); every frame, `churn_pct` percent of an agent's stacks
//! are replaced by stacks never seen before (a pool stack with a new leaf),
//! the rest repeat. Samples are merged per (process, stack) as the agent's
//! batcher does.

mod aggregator;
mod workload;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::BootId;
use aperture_core::model::Stack;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig, SharedRuntime};
use aperture_transport::tls::ClientTlsConfig;
use serde::Deserialize;

use crate::harness::{Metric, Scenario};
use crate::stats::percentile;
use crate::sys::{aperture_binary, http, proc_usage, snapshot_binary};
use aggregator::{Aggregator, mem_available_mib, open_fds, raise_nofile, self_cpu_s};
pub use workload::{NodeGen, stack_pool};
use workload::{agent_id, node_name, unix_ns};

const TOKEN: &str = "bench-fleet-token";
const BOOT: BootId = BootId([0xf1; 16]);

/// Parameters of the scenario.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Fleet sizes N; each runs on both carriers.
    pub agents: Vec<usize>,
    /// Carriers (`quic`, `grpc`); default both.
    #[serde(default = "default_carriers")]
    pub carriers: Vec<String>,
    /// Sampling frequency of the simulated nodes, Hz.
    pub hz: u32,
    /// CPUs of a simulated node, all busy.
    pub cpus: u32,
    /// The agent's batch age: one frame per agent this often, ms.
    pub batch_ms: u64,
    /// Processes per agent.
    pub processes: usize,
    /// Distinct stacks in one frame of one agent.
    pub stacks: usize,
    /// Stacks in the pool the fleet shares.
    pub pool: usize,
    /// Percent of an agent's stacks new in each frame.
    pub churn_pct: f64,
    /// Agents started per second while connecting.
    pub ramp_per_s: usize,
    /// Seconds all agents stay connected and silent before sending.
    pub idle_s: u64,
    /// Seconds of sending before the measured window.
    pub warmup_s: u64,
    /// Seconds of the measured window.
    pub busy_s: u64,
    /// Longest wait for the last acknowledgements after sending stops, seconds.
    pub drain_s: u64,
    /// Agents whose frames carry freshness markers.
    pub markers: usize,
    /// A marker agent sends a marker this often, ms.
    pub marker_every_ms: u64,
    /// Threads building and queueing the agents' frames.
    pub producer_threads: usize,
    /// The aggregator's `limits.max_connections` (per carrier).
    pub max_connections: usize,
    /// Each simulated agent's buffer of unacknowledged frames, MiB (the
    /// agent's default is 64; beyond it the oldest frames are dropped and
    /// counted). Small, so thousands of agents facing a saturated aggregator
    /// do not exhaust the load generator's memory.
    pub client_buffer_mib: usize,
    /// The aggregator's store: `embedded` (SQLite in its data directory) or
    /// `clickhouse` (a throwaway clickhouse-server on loopback, a new
    /// database per side).
    #[serde(default = "default_store")]
    pub store: String,
    /// Stop connecting more agents when the machine has less memory available, MiB.
    /// While sending, the same bound ends the measured window early.
    #[serde(default = "default_min_available")]
    pub min_available_mib: u64,
    /// End the measured window early when the aggregator's RSS passes this, MiB
    /// (an overloaded aggregator must not take the machine down).
    #[serde(default = "default_max_aggregator_rss")]
    pub max_aggregator_rss_mib: u64,
    /// Worker threads of the runtime the simulated agents share.
    #[serde(default = "default_runtime_threads")]
    pub runtime_threads: usize,
    /// QUIC sockets the simulated agents share, assigned in turn (each agent
    /// still has its own connection and session).
    #[serde(default = "default_quic_sockets")]
    pub quic_sockets: usize,
}

fn default_max_aggregator_rss() -> u64 {
    8192
}

fn default_runtime_threads() -> usize {
    2
}

fn default_quic_sockets() -> usize {
    16
}

fn default_carriers() -> Vec<String> {
    vec!["quic".into(), "grpc".into()]
}

fn default_store() -> String {
    "embedded".into()
}

fn default_min_available() -> u64 {
    2048
}

/// Splits `quic-n1000` into (carrier, N).
pub fn parse_side(side: &str) -> Option<(CarrierChoice, usize)> {
    let (carrier, n) = side.split_once("-n")?;
    let carrier = match carrier {
        "quic" => CarrierChoice::Quic,
        "grpc" => CarrierChoice::Grpc,
        _ => return None,
    };
    Some((carrier, n.parse().ok()?))
}

/// The scenario.
#[derive(Debug)]
pub struct FleetScenario {
    params: Params,
    root: PathBuf,
    bin: PathBuf,
    dir: Option<tempfile::TempDir>,
    pool: Arc<Vec<Stack>>,
    runs: u32,
    fd_limit: u64,
    clickhouse: Option<crate::clickhouse::ClickHouse>,
}

impl FleetScenario {
    /// A scenario with these parameters; `root` is the repository.
    pub fn new(params: Params, root: PathBuf) -> FleetScenario {
        FleetScenario {
            params,
            root,
            bin: PathBuf::new(),
            dir: None,
            pool: Arc::new(Vec::new()),
            runs: 0,
            fd_limit: u64::MAX,
            clickhouse: None,
        }
    }
}

/// One simulated agent: its client and what it has sent and seen acknowledged.
struct Sim {
    client: Client,
    state: Mutex<SimState>,
}

#[derive(Default)]
struct SimState {
    /// Frames sent and not yet seen acknowledged: when, samples, whether in the window.
    pending: VecDeque<(Instant, u64, bool)>,
    acked_seen: u64,
    /// Samples acknowledged while the window was open.
    acked_in_window: u64,
    /// Samples sent while the window was open.
    sent_in_window: u64,
}

/// Shared state of the measured window.
#[derive(Default)]
struct Window {
    open: AtomicBool,
}

/// Starts the clients gradually (`ramp_per_s`, at most 256 still handshaking),
/// and waits until each has a session. Stops early when memory runs low.
fn connect(
    p: &Params,
    n: usize,
    carrier: CarrierChoice,
    agg: &Aggregator,
    fd_limit: u64,
    on: &SharedRuntime,
) -> anyhow::Result<Vec<Arc<Sim>>> {
    let mut sims: Vec<Arc<Sim>> = Vec::with_capacity(n);
    let step = (p.ramp_per_s / 10).max(1);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60 + (n / p.ramp_per_s.max(1)) as u64 * 3);
    let mut connected = 0;
    while sims.len() < n {
        let tick = Instant::now();
        if mem_available_mib() < p.min_available_mib {
            eprintln!("[fleet] memory low: stopping at {} agents", sims.len());
            break;
        }
        if open_fds() + 1024 > fd_limit {
            eprintln!("[fleet] open-file limit {fd_limit} nearly reached: stopping at {} agents", sims.len());
            break;
        }
        if sims.len() - connected < 256 {
            for _ in 0..step.min(n - sims.len()) {
                let i = sims.len();
                let cfg = ClientConfig {
                    aggregator: agg.ingest.to_string(),
                    token: Some(TOKEN.into()),
                    tls: ClientTlsConfig { fingerprint: Some(agg.fingerprint.clone()), ..Default::default() },
                    carrier,
                    quic_port: Some(agg.ingest.port()),
                    grpc_port: Some(agg.ingest.port()),
                    buffer_bytes: p.client_buffer_mib.max(1) << 20,
                    ..ClientConfig::default()
                };
                let identity = AgentIdentity {
                    agent_id: agent_id(i),
                    boot_id: BOOT,
                    node: node_name(i),
                    agent_version: "fleet".into(),
                };
                let client = Client::start_on(cfg, identity, on).context("starting a simulated agent")?;
                sims.push(Arc::new(Sim { client, state: Mutex::new(SimState::default()) }));
            }
        }
        connected = sims.iter().filter(|s| s.client.stats().established).count();
        anyhow::ensure!(Instant::now() < deadline, "only {connected} of {} agents connected in time", sims.len());
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    while sims.iter().any(|s| !s.client.stats().established) {
        anyhow::ensure!(Instant::now() < deadline, "not every agent connected in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("[fleet] {} agents connected in {:.1} s", sims.len(), started.elapsed().as_secs_f64());
    Ok(sims)
}

/// Stops the clients, in parallel.
fn disconnect(sims: Vec<Arc<Sim>>) {
    let mut chunks: Vec<Vec<Arc<Sim>>> = (0..32).map(|_| Vec::new()).collect();
    for (i, s) in sims.into_iter().enumerate() {
        chunks[i % 32].push(s);
    }
    let threads: Vec<_> = chunks.into_iter().map(|c| std::thread::spawn(move || drop(c))).collect();
    for t in threads {
        let _ = t.join();
    }
}

/// What a side measured.
#[derive(Debug, Default)]
struct Outcome {
    connected: usize,
    rss0_kib: u64,
    rss_idle_kib: u64,
    rss_busy_kib: u64,
    idle_cpu_s: f64,
    idle_s: f64,
    busy_cpu_s: f64,
    busy_s: f64,
    loadgen_cpu_s: f64,
    latencies_ms: Vec<f64>,
    sent_samples: u64,
    acked_samples: u64,
    per_agent_acked: Vec<f64>,
    freshness_s: Vec<f64>,
    refusals: Vec<f64>,
    client_dropped: u64,
    unacked_after_drain: u64,
    producer_lag_ms: f64,
    loadgen_rss0_kib: u64,
    loadgen_rss_idle_kib: u64,
    loadgen_rss_busy_kib: u64,
    /// Why the window ended early, if it did.
    cut_short: Option<String>,
}

impl FleetScenario {
    fn run_side(&self, carrier: CarrierChoice, n: usize, dir: &Path) -> anyhow::Result<Outcome> {
        let p = &self.params;
        let store = self
            .clickhouse
            .as_ref()
            .map(|server| (server.endpoint(), format!("perf_fleet_{}_{}", std::process::id(), self.runs)));
        let agg = Aggregator::start(&self.bin, dir, p.max_connections, store)?;
        // The simulated agents run as tasks of one runtime (named apart
        // from the aggregator, which is another process anyway).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(p.runtime_threads.max(1))
            .thread_name("fleet-rt")
            .enable_all()
            .build()
            .context("the simulated agents' runtime")?;
        let shared = SharedRuntime::new(rt.handle().clone()).with_quic_endpoints(p.quic_sockets.max(1));
        let mut out = Outcome {
            rss0_kib: proc_usage(agg.proc.pid())?.rss_kib,
            loadgen_rss0_kib: proc_usage(std::process::id())?.rss_kib,
            ..Default::default()
        };
        let refusals0 = agg.refusals();
        let sims = connect(p, n, carrier, &agg, self.fd_limit, &shared)?;
        out.connected = sims.len();
        let result = self.measure(&agg, &sims, &mut out);
        let s = sims
            .iter()
            .map(|s| s.client.stats())
            .fold((0, 0), |(d, u), st| (d + st.session.frames_dropped, u + st.session.unacked_frames));
        (out.client_dropped, out.unacked_after_drain) = s;
        let m = agg.metrics();
        let shown = ["aperture_ingress_frames_total", "aperture_transport_rejections_total"];
        for line in m.lines().filter(|l| shown.iter().any(|r| l.starts_with(r))) {
            eprintln!("[fleet] {line}");
        }
        out.refusals = agg.refusals().iter().zip(&refusals0).map(|(a, b)| a - b).collect();
        disconnect(sims);
        drop(shared);
        rt.shutdown_timeout(Duration::from_secs(2));
        let mut agg = agg;
        agg.proc.check_alive().context("the aggregator died during the run")?;
        agg.proc.stop();
        result.map(|()| out)
    }

    fn measure(&self, agg: &Aggregator, sims: &[Arc<Sim>], out: &mut Outcome) -> anyhow::Result<()> {
        let p = &self.params;
        let pid = agg.proc.pid();
        // Idle: everyone connected, nothing sent.
        let u0 = proc_usage(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(p.idle_s));
        let u1 = proc_usage(pid)?;
        (out.idle_cpu_s, out.idle_s, out.rss_idle_kib) = (u1.cpu_s - u0.cpu_s, t0.elapsed().as_secs_f64(), u1.rss_kib);
        out.loadgen_rss_idle_kib = proc_usage(std::process::id())?.rss_kib;

        let stop = Arc::new(AtomicBool::new(false));
        let window = Arc::new(Window::default());
        let lag_us = Arc::new(AtomicU64::new(0));
        let markers = Arc::new(Mutex::new(Vec::<(usize, String, u64)>::new()));
        let n = sims.len();
        let marker_agents: Vec<usize> = (0..p.markers.min(n)).map(|m| m * n / p.markers.min(n).max(1)).collect();
        // Producers: agent i belongs to producer i % P; sends spread evenly over the cadence.
        let producers: Vec<_> = (0..p.producer_threads.max(1))
            .map(|t| {
                let threads = p.producer_threads.max(1);
                let mine: Vec<(usize, Arc<Sim>)> = sims
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % threads == t)
                    .map(|(i, s)| (i, Arc::clone(s)))
                    .collect();
                let (stop, window, lag_us, markers) =
                    (Arc::clone(&stop), Arc::clone(&window), Arc::clone(&lag_us), Arc::clone(&markers));
                let pool = Arc::clone(&self.pool);
                let params = (p.batch_ms, p.marker_every_ms, p.processes.max(1));
                let gens: Vec<NodeGen> = mine.iter().map(|(i, _)| NodeGen::new(*i, p, &pool)).collect();
                let is_marker: Vec<bool> = mine.iter().map(|(i, _)| marker_agents.contains(i)).collect();
                let run = self.runs;
                std::thread::Builder::new().name(format!("fleet-prod-{t}")).spawn(move || {
                    produce(mine, gens, is_marker, n, params, &pool, &stop, &window, &lag_us, &markers, run)
                })
            })
            .collect::<Result<_, _>>()?;
        // Watcher: sweeps every client's acknowledged count.
        let watcher = {
            let (sims, stop, window) = (sims.to_vec(), Arc::clone(&stop), Arc::clone(&window));
            std::thread::Builder::new().name("fleet-watch".into()).spawn(move || {
                let mut lat = Vec::new();
                while !stop.load(Relaxed) {
                    watch(&sims, &window, &mut lat);
                    std::thread::sleep(Duration::from_millis(20));
                }
                lat
            })?
        };
        // Freshness: polls the API for the markers sent.
        let fresh = {
            let (stop, markers, addr) = (Arc::clone(&stop), Arc::clone(&markers), agg.http);
            std::thread::Builder::new().name("fleet-fresh".into()).spawn(move || poll_markers(addr, &stop, &markers))?
        };

        out.cut_short = guarded_sleep(Duration::from_secs(p.warmup_s), pid, p);
        let (u0, c0, t0) = (proc_usage(pid)?, self_cpu_s(), Instant::now());
        lag_us.store(0, Relaxed);
        window.open.store(true, Relaxed);
        if out.cut_short.is_none() {
            out.cut_short = guarded_sleep(Duration::from_secs(p.busy_s), pid, p);
        }
        window.open.store(false, Relaxed);
        let (u1, c1) = (proc_usage(pid)?, self_cpu_s());
        out.busy_s = t0.elapsed().as_secs_f64().max(0.01);
        (out.busy_cpu_s, out.loadgen_cpu_s, out.rss_busy_kib) = (u1.cpu_s - u0.cpu_s, c1 - c0, u1.rss_kib);
        out.loadgen_rss_busy_kib = proc_usage(std::process::id())?.rss_kib;
        if let Some(why) = &out.cut_short {
            eprintln!("[fleet] window ended early after {:.1} s: {why}", out.busy_s);
        }
        out.producer_lag_ms = lag_us.load(Relaxed) as f64 / 1e3;
        // Stop sending; let the acknowledgements of the window's frames arrive.
        stop.store(true, Relaxed);
        for t in producers {
            t.join().map_err(|_| anyhow::anyhow!("a producer panicked"))??;
        }
        let mut lat = watcher.join().map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
        let drain_until = Instant::now() + Duration::from_secs(p.drain_s);
        while Instant::now() < drain_until
            && sims.iter().any(|s| s.state.lock().unwrap_or_else(PoisonError::into_inner).pending.iter().any(|f| f.2))
        {
            watch(sims, &window, &mut lat);
            std::thread::sleep(Duration::from_millis(20));
        }
        out.freshness_s = fresh.join().map_err(|_| anyhow::anyhow!("the freshness poller panicked"))?;
        out.latencies_ms = lat;
        for s in sims {
            let st = s.state.lock().unwrap_or_else(PoisonError::into_inner);
            out.sent_samples += st.sent_in_window;
            out.acked_samples += st.acked_in_window;
            out.per_agent_acked.push(st.acked_in_window as f64 / out.busy_s);
        }
        Ok(())
    }
}

/// Sleeps `d`, or less when the machine runs low on memory or the
/// aggregator grows past its bound; returns why it stopped early.
fn guarded_sleep(d: Duration, pid: u32, p: &Params) -> Option<String> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        let available = mem_available_mib();
        if available < p.min_available_mib {
            return Some(format!(
                "the machine has {available} MiB available (min_available_mib {})",
                p.min_available_mib
            ));
        }
        let rss_mib = proc_usage(pid).map(|u| u.rss_kib / 1024).unwrap_or(0);
        if rss_mib > p.max_aggregator_rss_mib {
            return Some(format!("aggregator RSS {rss_mib} MiB (max_aggregator_rss_mib {})", p.max_aggregator_rss_mib));
        }
        std::thread::sleep(Duration::from_millis(200).min(until.saturating_duration_since(Instant::now())));
    }
    None
}

/// One sweep: frames acknowledged since the last, oldest first.
fn watch(sims: &[Arc<Sim>], window: &Window, lat: &mut Vec<f64>) {
    let open = window.open.load(Relaxed);
    for s in sims {
        let acked = s.client.stats().session.frames_acked;
        let now = Instant::now();
        let mut st = s.state.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in st.acked_seen..acked {
            let Some((sent, samples, in_window)) = st.pending.pop_front() else { break };
            if in_window {
                lat.push((now - sent).as_secs_f64() * 1e3);
            }
            if open {
                st.acked_in_window += samples;
            }
        }
        st.acked_seen = acked;
    }
}

#[allow(clippy::too_many_arguments, reason = "the producer's shared state, each needed")]
fn produce(
    mine: Vec<(usize, Arc<Sim>)>,
    mut gens: Vec<NodeGen>,
    is_marker: Vec<bool>,
    n: usize,
    (batch_ms, marker_every_ms, procs): (u64, u64, usize),
    pool: &[Stack],
    stop: &AtomicBool,
    window: &Window,
    lag_us: &AtomicU64,
    markers: &Mutex<Vec<(usize, String, u64)>>,
    run: u32,
) -> anyhow::Result<()> {
    let cadence = Duration::from_millis(batch_ms.max(1));
    let start = Instant::now();
    let mut next_marker = vec![start; mine.len()];
    let mut seqs = vec![0u64; mine.len()];
    let limits = DecodeLimits::default();
    let mut marks = 0u64;
    for cycle in 0u32.. {
        for (k, (i, sim)) in mine.iter().enumerate() {
            if stop.load(Relaxed) {
                return Ok(());
            }
            // Agent i sends at i/n of the cadence, every cadence.
            let due = start + cadence * cycle + cadence.mul_f64(*i as f64 / n as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            } else {
                lag_us.fetch_max((now - due).as_micros() as u64, Relaxed);
            }
            let mark = (is_marker[k] && Instant::now() >= next_marker[k]).then(|| {
                marks += 1;
                next_marker[k] = Instant::now() + Duration::from_millis(marker_every_ms);
                format!("fm{}x{run}x{i}x{marks}", std::process::id() % 10_000)
            });
            let now_ns = unix_ns();
            let batch = gens[k].next(now_ns, batch_ms, pool, mark.as_deref());
            let samples = batch.sample_count();
            seqs[k] += 1;
            let id = FrameId { agent_id: agent_id(*i), boot_id: BOOT, sequence: seqs[k] };
            let frame = encode_batch(batch, id, now_ns, &limits)?;
            if let Some(name) = mark {
                gens[k].unmark(procs);
                markers.lock().unwrap_or_else(PoisonError::into_inner).push((*i, name, now_ns));
            }
            let in_window = window.open.load(Relaxed);
            {
                let mut st = sim.state.lock().unwrap_or_else(PoisonError::into_inner);
                st.pending.push_back((Instant::now(), samples, in_window));
                if in_window {
                    st.sent_in_window += samples;
                }
            }
            sim.client.send(frame).context("queueing a frame")?;
        }
    }
    Ok(())
}

/// Polls the API for each marker's process on its node until listed;
/// returns the times from the marker's sample to its being listed, seconds.
fn poll_markers(addr: SocketAddr, stop: &AtomicBool, markers: &Mutex<Vec<(usize, String, u64)>>) -> Vec<f64> {
    let mut seen = Vec::new();
    let mut pending: Vec<(usize, String, u64)> = Vec::new();
    let deadline_after_stop = Duration::from_secs(10);
    let mut stopped_at: Option<Instant> = None;
    loop {
        pending.append(&mut markers.lock().unwrap_or_else(PoisonError::into_inner));
        if stop.load(Relaxed) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if pending.is_empty() || at.elapsed() > deadline_after_stop {
                if !pending.is_empty() {
                    eprintln!("[fleet] {} markers never became queryable", pending.len());
                }
                return seen;
            }
        }
        let mut nodes: Vec<usize> = pending.iter().map(|m| m.0).collect();
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let path = format!("/api/v1/labels/process/values?mode=cpu&from=-5m&node={}", node_name(node));
            let Ok(r) = http(addr, "GET", &path, Some(TOKEN), b"", Duration::from_secs(10)) else { continue };
            if r.status != 200 {
                continue;
            }
            let text = r.text();
            let now = unix_ns();
            pending.retain(|(n, name, sample_ns)| {
                if *n == node && text.contains(&format!("\"{name}\"")) {
                    seen.push(now.saturating_sub(*sample_ns) as f64 / 1e9);
                    false
                } else {
                    true
                }
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Scenario for FleetScenario {
    fn sides(&self) -> Vec<String> {
        self.params.agents.iter().flat_map(|n| self.params.carriers.iter().map(move |c| format!("{c}-n{n}"))).collect()
    }

    fn setup(&mut self) -> anyhow::Result<()> {
        for side in self.sides() {
            anyhow::ensure!(parse_side(&side).is_some(), "bad side {side}: carriers are quic and grpc");
        }
        let most = self.params.agents.iter().copied().max().unwrap_or(0) as u64;
        let limit = raise_nofile(most * 8 + 4096);
        // Each client holds a socket and its runtime's descriptors; connect() stops short of the limit.
        if limit < most * 4 + 1024 {
            eprintln!("[fleet] open-file limit {limit}: probably too low for {most} agents (raise ulimit -Hn)");
        }
        self.fd_limit = limit;
        let dir = tempfile::Builder::new().prefix("aperture-perf-fleet").tempdir()?;
        self.bin = snapshot_binary(&aperture_binary(&self.root)?, dir.path())?;
        self.pool = Arc::new(stack_pool(self.params.pool));
        match self.params.store.as_str() {
            "embedded" => {}
            "clickhouse" => self.clickhouse = Some(crate::clickhouse::start()?),
            other => bail!("store {other:?}: embedded or clickhouse"),
        }
        self.dir = Some(dir);
        Ok(())
    }

    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
        let Some((carrier, n)) = parse_side(side) else { bail!("bad side name {side}") };
        let Some(dir) = &self.dir else { bail!("setup did not run") };
        self.runs += 1;
        let dir = dir.path().join(format!("run-{}-{side}", self.runs));
        std::fs::create_dir_all(&dir)?;
        let mut o = self.run_side(carrier, n, &dir).with_context(|| format!("logs in {}", dir.display()))?;
        let _ = std::fs::remove_dir_all(dir.join("data"));
        let agents = o.connected.max(1) as f64;
        let per_k = 1000.0 / agents;
        let mut m = vec![
            Metric::new("agents_connected", "agents", o.connected as f64),
            Metric::new("aggregator_cores", "cores", o.busy_cpu_s / o.busy_s),
            Metric::new("aggregator_cores_per_1000_agents", "cores", o.busy_cpu_s / o.busy_s * per_k),
            Metric::new("idle_cores_per_1000_agents", "cores", o.idle_cpu_s / o.idle_s * per_k),
            Metric::new("rss_idle_mib", "MiB", o.rss_idle_kib as f64 / 1024.0),
            Metric::new("rss_busy_mib", "MiB", o.rss_busy_kib as f64 / 1024.0),
            Metric::new("rss_per_agent_idle_kib", "KiB", o.rss_idle_kib.saturating_sub(o.rss0_kib) as f64 / agents),
            Metric::new("rss_per_agent_busy_kib", "KiB", o.rss_busy_kib.saturating_sub(o.rss0_kib) as f64 / agents),
            Metric::new("offered_samples_per_s", "samples/s", o.sent_samples as f64 / o.busy_s),
            Metric::new("acked_samples_per_s", "samples/s", o.acked_samples as f64 / o.busy_s),
            Metric::new(
                "acked_of_offered_pct",
                "%",
                if o.sent_samples > 0 { o.acked_samples as f64 / o.sent_samples as f64 * 100.0 } else { 0.0 },
            ),
            Metric::new("busy_answers", "frames", o.refusals.first().copied().unwrap_or(0.0)),
            Metric::new("sessions_rejected", "sessions", o.refusals.get(1).copied().unwrap_or(0.0)),
            Metric::new("preauth_refused", "connections", o.refusals.get(2).copied().unwrap_or(0.0)),
            Metric::new("decode_errors", "frames", o.refusals.get(3).copied().unwrap_or(0.0)),
            Metric::new("rows_rejected", "rows", o.refusals.get(4).copied().unwrap_or(0.0)),
            Metric::new("frames_rejected", "frames", o.refusals.get(5).copied().unwrap_or(0.0)),
            Metric::new("client_dropped_frames", "frames", o.client_dropped as f64),
            Metric::new("unacked_after_drain", "frames", o.unacked_after_drain as f64),
            Metric::new("loadgen_cores", "cores", o.loadgen_cpu_s / o.busy_s),
            Metric::new("producer_lag_max_ms", "ms", o.producer_lag_ms),
            Metric::new("window_s", "s", o.busy_s),
            Metric::new("window_cut_short", "sides", f64::from(u8::from(o.cut_short.is_some()))),
            Metric::new("loadgen_rss_idle_mib", "MiB", o.loadgen_rss_idle_kib as f64 / 1024.0),
            Metric::new("loadgen_rss_busy_mib", "MiB", o.loadgen_rss_busy_kib as f64 / 1024.0),
            Metric::new(
                "loadgen_rss_per_agent_idle_kib",
                "KiB",
                o.loadgen_rss_idle_kib.saturating_sub(o.loadgen_rss0_kib) as f64 / agents,
            ),
            Metric::new(
                "loadgen_rss_per_agent_busy_kib",
                "KiB",
                o.loadgen_rss_busy_kib.saturating_sub(o.loadgen_rss0_kib) as f64 / agents,
            ),
        ];
        if !o.latencies_ms.is_empty() {
            m.push(Metric::new("ack_p50_ms", "ms", percentile(&mut o.latencies_ms, 50.0)));
            m.push(Metric::new("ack_p99_ms", "ms", percentile(&mut o.latencies_ms, 99.0)));
        }
        if !o.freshness_s.is_empty() {
            m.push(Metric::new("freshness_p50_s", "s", percentile(&mut o.freshness_s, 50.0)));
            m.push(Metric::new("freshness_max_s", "s", o.freshness_s.iter().copied().fold(0.0, f64::max)));
        }
        if !o.per_agent_acked.is_empty() {
            let mut v = o.per_agent_acked;
            let median = percentile(&mut v, 50.0);
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            m.push(Metric::new("agent_acked_min_per_s", "samples/s", min));
            m.push(Metric::new("agent_acked_median_per_s", "samples/s", median));
            m.push(Metric::new("agent_acked_max_per_s", "samples/s", max));
        }
        eprintln!(
            "[fleet] {side}: {} agents, {:.2} aggregator cores, acked {:.1}% of offered, load average {}",
            o.connected,
            o.busy_cpu_s / o.busy_s,
            if o.sent_samples > 0 { o.acked_samples as f64 / o.sent_samples as f64 * 100.0 } else { 0.0 },
            crate::sys::load_average()
        );
        Ok(m)
    }

    fn teardown(&mut self) {
        self.clickhouse = None;
        self.dir = None;
    }
}

#[cfg(test)]
mod tests {
    use super::aggregator::metric_sum;
    use super::*;

    fn params() -> Params {
        Params {
            agents: vec![100, 1000],
            carriers: default_carriers(),
            hz: 99,
            cpus: 8,
            batch_ms: 500,
            processes: 20,
            stacks: 64,
            pool: 2000,
            churn_pct: 3.0,
            ramp_per_s: 500,
            idle_s: 1,
            warmup_s: 1,
            busy_s: 1,
            drain_s: 1,
            markers: 2,
            marker_every_ms: 1000,
            producer_threads: 1,
            max_connections: 10_000,
            client_buffer_mib: 1,
            store: default_store(),
            min_available_mib: 1,
            max_aggregator_rss_mib: default_max_aggregator_rss(),
            runtime_threads: 2,
            quic_sockets: 4,
        }
    }

    #[test]
    fn sides_name_carrier_and_size() {
        let s = FleetScenario::new(params(), PathBuf::new());
        assert_eq!(s.sides(), ["quic-n100", "grpc-n100", "quic-n1000", "grpc-n1000"]);
        assert_eq!(parse_side("grpc-n5000"), Some((CarrierChoice::Grpc, 5000)));
        assert_eq!(parse_side("tcp-n1"), None);
    }

    #[test]
    fn frames_carry_a_busy_node_with_a_few_new_stacks_each() {
        let p = params();
        let pool = stack_pool(p.pool);
        let mut g = NodeGen::new(7, &p, &pool);
        let first: Vec<_> = g.next(10_000_000_000, p.batch_ms, &pool, None).stacks.iter().map(|s| s.hash).collect();
        let b = g.next(10_500_000_000, p.batch_ms, &pool, None);
        // 99 Hz x 8 CPUs x 0.5 s, merged per (process, stack).
        assert_eq!(b.sample_count(), 396);
        assert!(b.cpu.len() < 396 && b.cpu.len() > 50, "{} rows", b.cpu.len());
        assert!(b.cpu.iter().all(|s| s.time_ns <= 10_500_000_000 && s.time_ns > 10_000_000_000));
        let second: Vec<_> = b.stacks.iter().map(|s| s.hash).collect();
        let new = second.iter().filter(|h| !first.contains(h)).count();
        // 3% of 64 stacks: about two new per frame, the rest repeat.
        assert!((1..=3).contains(&new), "{new} new stacks");
        assert_eq!(b.targets.len(), 20);
    }

    #[test]
    fn a_marker_is_the_newest_sample_of_its_frame_and_only_of_it() {
        let p = params();
        let pool = stack_pool(p.pool);
        let mut g = NodeGen::new(1, &p, &pool);
        let b = g.next(5_000_000_000, p.batch_ms, &pool, Some("fmx1"));
        let marker = b.targets.iter().position(|t| t.process == "fmx1").expect("marker target") as u32;
        let newest = b.cpu.iter().map(|s| s.time_ns).max();
        assert_eq!(b.cpu.iter().find(|s| s.target == marker).map(|s| s.time_ns), newest);
        g.unmark(p.processes);
        let b = g.next(5_500_000_000, p.batch_ms, &pool, None);
        assert!(b.targets.iter().all(|t| t.process != "fmx1"));
    }

    #[test]
    fn counters_are_summed_over_label_sets() {
        let text = "# TYPE a counter\na_total{carrier=\"quic\"} 3\na_total{carrier=\"grpc\"} 4\na_total_other 9\n";
        assert_eq!(metric_sum(text, "a_total"), 7.0);
        assert_eq!(metric_sum("b 2\n", "b"), 2.0);
    }
}
