//! The agent as a daemon: [`run_agent`] for `aperture agent`,
//! [`run_agent_local`] for `aperture up`.
//!
//! Start-up order, so that a mistake fails before anything attaches:
//! selection and identity, the transport client (it connects in the
//! background), the metrics endpoint, the Kubernetes pod watcher, then the
//! probes (reader before attach). Shutdown, once the [`Shutdown`] flag is
//! triggered: drain the in-kernel aggregates, detach the probes, deliver
//! what the reader had left, flush the last batch, wait up to
//! `transport.shutdown_timeout` for acknowledgements, and report what was
//! never acknowledged in the [`ExitReport`].

mod driver;
mod probeset;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use aperture_core::config::AgentConfig;
use aperture_core::frame::{FrameBuf, FrameId};
use aperture_transport::client::{AgentIdentity, Client, ClientConfig};
use aperture_transport::tls::ClientTlsConfig;

use crate::attribution::{Attributor, node_name};
use crate::batcher::Batcher;
use crate::budget::{AgentThreads, BudgetController, BudgetSettings, ThreadCost, threads_named};
use crate::identity::Identity;
use crate::kube::{KubeClient, KubeStats, PodDirectory, run_pod_watcher};
use crate::metrics::AgentMetrics;
use crate::pipeline::{FrameSink, Pipeline};
use crate::selection::Selection;
use crate::shutdown::Shutdown;
pub use probeset::{ProbeStartError, kernel_filter};

/// Reader batches the ring between the reader and the pipeline holds: at
/// one batch per reader flush (200 ms by default) or per watermark wakeup,
/// several seconds of a stalled pipeline before anything is dropped.
const RING_BATCHES: usize = 64;
/// Emptied batches kept for the reader to reuse; more are freed.
const RECYCLED_BATCHES: usize = 8;
/// Budget intervals measured but not acted on at start (see
/// [`crate::budget::BudgetSettings::warmup_intervals`]).
const BUDGET_WARMUP_INTERVALS: u32 = 1;
/// Name of the transport client's thread (cut to 15 bytes by the kernel).
const TRANSPORT_THREAD: &str = "aperture-transp";

/// What a run delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExitReport {
    /// Frames built (sequence numbers 1..=frames).
    pub frames: u64,
    /// Frames the aggregator acknowledged.
    pub acked: u64,
    /// Frames never acknowledged (sent or not), by id.
    pub unacked: Vec<FrameId>,
    /// Frames the transport dropped because its buffer was full.
    pub dropped: u64,
}

impl std::fmt::Display for ExitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} frames built, {} acknowledged", self.frames, self.acked)?;
        if !self.unacked.is_empty() {
            let seqs: Vec<String> = self.unacked.iter().map(|id| id.sequence.to_string()).collect();
            write!(f, ", {} never acknowledged (sequences {})", self.unacked.len(), seqs.join(","))?;
        }
        if self.dropped > 0 {
            write!(f, ", {} dropped while the aggregator was unreachable", self.dropped)?;
        }
        Ok(())
    }
}

/// The aggregator `aperture up` started in the same process.
#[derive(Clone, Debug)]
pub struct LocalAggregator {
    /// Its ingress `host:port` (QUIC and gRPC share the port).
    pub address: String,
    /// The token it expects.
    pub token: String,
    /// Fingerprint of its certificate (`ServerHandle::fingerprint`), pinned by the agent.
    pub fingerprint: String,
}

/// Runs the agent against an aggregator in the same process (`aperture up`):
/// the address, token and certificate fingerprint come from `aggregator`;
/// the metrics endpoint listens on loopback unless configured otherwise.
/// Mode, frequency and everything else come from `config`. Blocks like [`run_agent`].
pub fn run_agent_local(
    mut config: AgentConfig,
    aggregator: &LocalAggregator,
    shutdown: Shutdown,
) -> anyhow::Result<ExitReport> {
    config.aggregator = aggregator
        .address
        .parse()
        .map_err(|e: String| anyhow::anyhow!("local aggregator address `{}`: {e}", aggregator.address))?;
    config.auth_token = aperture_core::config::Secret(aggregator.token.clone());
    config.transport.fingerprint_sha256 = Some(aggregator.fingerprint.clone());
    config.transport.ca_file = None;
    config.transport.insecure_skip_verify = false;
    config.transport.server_name = Some("localhost".into());
    if config.metrics.listen == aperture_core::config::MetricsSettings::default().listen {
        config.metrics.listen = "127.0.0.1:9091".into();
    }
    run_agent(config, shutdown)
}

/// Runs the agent until `shutdown` is triggered. Blocks the calling thread
/// (call it from a plain thread, not from inside an async task); it starts
/// its own small tokio runtime for the metrics endpoint and the Kubernetes
/// watcher. Returns an error when start-up fails (nothing stays attached).
pub fn run_agent(config: AgentConfig, shutdown: Shutdown) -> anyhow::Result<ExitReport> {
    let selection = Selection::new(&config.filter).context("invalid filter configuration")?;
    let node = node_name(&config.node_name);
    let identity = Identity::load_or_create(&config.data_dir)?;
    tracing::info!(
        node = %node,
        agent_id = %identity.agent_id,
        boot_id = %identity.boot_id,
        aggregator = %config.aggregator,
        mode = %config.mode,
        frequency_hz = config.frequency_hz.0,
        "starting the agent"
    );
    // Every thread doing the agent's work is registered, so the budget
    // counts the agent alone (under `aperture up` the aggregator shares
    // the process): this one (start-up, then it waits), the I/O runtime's,
    // the transport client's, the pipeline and the perf-buffer reader.
    let threads = AgentThreads::new();
    threads.register_current();
    crate::alloc::use_agent_arena();
    // The probes' own threads (perf reader, unwind tables) too.
    aperture_probes::set_thread_start(crate::alloc::use_agent_arena);
    let (on_start, on_stop) = (threads.clone(), threads.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("aperture-agent-io")
        .on_thread_start(move || {
            on_start.register_current();
            crate::alloc::use_agent_arena();
        })
        .on_thread_stop(move || on_stop.unregister_current())
        .enable_all()
        .build()
        .context("starting the agent's I/O runtime")?;

    let proc_self = std::path::Path::new("/proc/self");
    let transport_before = threads_named(proc_self, TRANSPORT_THREAD);
    let client = Arc::new(
        Client::start(
            client_config(&config),
            AgentIdentity {
                agent_id: identity.agent_id,
                boot_id: identity.boot_id,
                node: node.clone(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        )
        .context("starting the transport client")?,
    );
    // The client's thread is the one of that name that did not exist before.
    for tid in threads_named(proc_self, TRANSPORT_THREAD) {
        if !transport_before.contains(&tid) {
            threads.register(tid);
        }
    }

    let metrics = AgentMetrics::new();
    metrics.budget_limit.set(config.budget.cpu_percent.0);
    let heartbeat = Arc::new(AtomicU64::new(0));
    let _metrics_server = if config.metrics.listen.is_empty() {
        None
    } else {
        let addr: SocketAddr = config
            .metrics
            .listen
            .parse()
            .with_context(|| format!("metrics.listen `{}` is not ip:port", config.metrics.listen))?;
        Some(runtime.block_on(crate::metrics::serve(addr, metrics.clone(), Arc::clone(&heartbeat)))?)
    };

    let (pods, kube_stats, watcher) = match KubeClient::in_cluster(&node) {
        Ok(Some(kube)) => {
            let directory = Arc::new(PodDirectory::default());
            let stats = Arc::new(KubeStats::default());
            let task = runtime.spawn(run_pod_watcher(kube, Arc::clone(&directory), Arc::clone(&stats)));
            (Some(directory.view()), Some(stats), Some(task))
        }
        Ok(None) => {
            if selection.needs_pods() {
                tracing::warn!(
                    "filter.namespaces / filter.pod_selector are set but the agent is not running in Kubernetes: \
                     no process will be selected"
                );
            }
            (None, None, None)
        }
        Err(e) => {
            tracing::warn!("Kubernetes pod metadata unavailable: {e}; namespace, pod and container names stay empty");
            (None, None, None)
        }
    };

    let budget = BudgetController::new(BudgetSettings {
        enabled: config.budget.enabled,
        cpu_percent: config.budget.cpu_percent.0,
        frequency_hz: config.frequency_hz.0,
        lock_threshold_ns: config.lock.threshold.as_nanos_u64(),
        syscall_threshold_ns: config.syscall.threshold.as_nanos_u64(),
        warmup_intervals: BUDGET_WARMUP_INTERVALS,
    });
    let (producer, consumer) = aperture_core::ring::ring(RING_BATCHES);
    let (recycle_tx, recycle_rx) = crossbeam_channel::bounded(RECYCLED_BATCHES);
    let probes =
        probeset::ProbeSet::start(&config, budget.effective(), &selection, producer, recycle_rx, threads.clone())
            .context("starting the probes")?;

    let node_for_thread = node;
    let batch = config.batch.clone();
    let frequency_hz = config.frequency_hz.0;
    let sink = Box::new(ClientSink(Arc::clone(&client)));
    let thread_client = Arc::clone(&client);
    let (budget_interval, drain_interval) = (config.budget.interval.0, config.syscall.drain_interval.0);
    let thread_shutdown = shutdown.clone();
    let pipeline_threads = threads.clone();
    let pipeline_thread = std::thread::Builder::new()
        .name("aperture-pipeline".into())
        .spawn(move || {
            pipeline_threads.register_current();
            crate::alloc::use_agent_arena();
            // blazesym's symbolizer is not Send: it is created on this thread.
            let pipeline = Pipeline::new(
                Attributor::new("/proc", pods, selection),
                Box::new(aperture_probes::Symbolizer::new()),
                Batcher::new(node_for_thread, batch.max_records, batch.max_age.as_nanos_u64()),
                identity,
                frequency_hz,
            );
            let driver = driver::Driver {
                pipeline,
                probes,
                consumer,
                recycle: recycle_tx,
                sink,
                client: thread_client,
                budget,
                budget_interval,
                drain_interval,
                metrics,
                kube_stats,
                heartbeat,
                mirrors: driver::Mirrors::default(),
                cost: ThreadCost::new(pipeline_threads),
            };
            driver.run(&thread_shutdown)
        })
        .context("starting the pipeline thread")?;
    let frames = pipeline_thread.join().map_err(|_| anyhow::anyhow!("the pipeline thread panicked"))?;
    if let Some(task) = watcher {
        task.abort();
    }

    let deadline = config.transport.shutdown_timeout.0;
    let client = Arc::try_unwrap(client).map_err(|_| anyhow::anyhow!("the transport client is still shared"))?;
    let dropped = client.stats().session.frames_dropped;
    let report = client.shutdown(deadline);
    let exit = ExitReport { frames, acked: report.acked, unacked: report.unacked, dropped };
    if exit.unacked.is_empty() {
        tracing::info!("agent stopped: {exit}");
    } else {
        tracing::warn!("agent stopped after waiting {deadline:?} for acknowledgements: {exit}");
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(exit)
}

/// The transport client as the pipeline's frame sink.
struct ClientSink(Arc<Client>);

impl FrameSink for ClientSink {
    fn send(&mut self, frame: FrameBuf) -> Result<(), String> {
        self.0.send(frame).map_err(|e| e.to_string())
    }
}

/// The transport settings of the agent configuration.
fn client_config(config: &AgentConfig) -> ClientConfig {
    let t = &config.transport;
    ClientConfig {
        aggregator: config.aggregator.to_string(),
        token: (!config.auth_token.is_empty()).then(|| config.auth_token.expose().to_owned()),
        tls: ClientTlsConfig {
            ca_file: t.ca_file.clone(),
            fingerprint: t.fingerprint_sha256.clone(),
            insecure_skip_verify: t.insecure_skip_verify,
            server_name: t.server_name.clone(),
            insecure_plaintext: t.insecure_plaintext,
        },
        carrier: t.carrier,
        buffer_bytes: t.buffer_capacity.as_usize(),
        ..ClientConfig::default()
    }
}
