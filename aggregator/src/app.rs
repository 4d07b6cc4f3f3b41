//! Wiring: opens the store, restores the ledger, starts the shard threads,
//! the writer thread, the background tasks and the HTTP server, and stops
//! them in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use aperture_core::shard::ShardConfig;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::background::{health_checker, retention};
use crate::clock::unix_now_s;
use crate::http::router;
use crate::http::state::{AppState, token_digest};
use crate::metrics::Metrics;
use crate::pipeline::ingress::{ShardedIngress, check_runs};
use crate::pipeline::shard::spawn_shard;
use crate::pipeline::state::{Acknowledge, Buffer, Shared};
use crate::pipeline::writer::{WriterConfig, spawn_writer};
use crate::settings::Settings;
use crate::store::Store;
use crate::store::clickhouse::ClickHouseStore;
use crate::store::sqlite::SqliteStore;

/// Constructor of running aggregators.
#[derive(Debug)]
pub struct Aggregator;

/// A running aggregator.
#[derive(Debug)]
pub struct AggregatorHandle {
    ingress: Arc<ShardedIngress>,
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    http_addr: SocketAddr,
    pyroscope_addr: Option<SocketAddr>,
    /// What the handlers share (the OTLP gRPC sink commits through it too).
    state: AppState,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    shard_threads: Vec<JoinHandle<()>>,
    writer_thread: Option<JoinHandle<()>>,
}

impl Aggregator {
    /// Opens the store (creating and migrating it), restores the frame
    /// ledger from it, starts the pipeline and binds the HTTP listener.
    /// Must be called inside a multi-threaded tokio runtime.
    pub async fn start(settings: Settings) -> anyhow::Result<AggregatorHandle> {
        let store: Arc<dyn Store> = match &settings.clickhouse {
            Some(ch) => Arc::new(
                ClickHouseStore::open(ch)
                    .await
                    .with_context(|| format!("opening ClickHouse at {} (database {})", ch.endpoint, ch.database))?,
            ),
            None => {
                let dir = settings.data_dir.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
                    .await
                    .context("opening the embedded store")??;
                Arc::new(store)
            }
        };
        Aggregator::start_with_store(settings, store).await
    }

    /// Like [`Aggregator::start`] with an already opened store.
    pub async fn start_with_store(settings: Settings, store: Arc<dyn Store>) -> anyhow::Result<AggregatorHandle> {
        let metrics = Metrics::new()?;
        let buffer = Buffer::new(settings.buffer_capacity_bytes, settings.high_water_bytes());
        metrics.buffer_capacity.set(i64::try_from(buffer.capacity()).unwrap_or(i64::MAX));
        metrics.buffer_high_water.set(i64::try_from(buffer.high_water()).unwrap_or(i64::MAX));
        metrics.store_up.set(1);
        let lanes = settings.shard_count();
        let shared = Arc::new(Shared::new(lanes, settings.ledger_max_runs, buffer, metrics, settings.agent_idle));

        let since = unix_now_s().saturating_sub(settings.retention.as_secs());
        let runs = store.load_ledger(since).await.context("loading the frame ledger from the store")?;
        let restored = runs.len();
        for (key, state) in runs {
            shared.lane(shared.lane_of(&key.0)).ledger.restore(key, state);
        }
        tracing::info!(runs = restored, "frame ledger restored");

        let (flush_tx, flush_rx) = crossbeam_channel::unbounded();
        let shard_config = ShardConfig {
            window_ns: u64::try_from(settings.window.as_nanos()).unwrap_or(u64::MAX).max(1),
            max_rows: settings.flush_max_rows.max(1),
            max_age_ns: u64::try_from(settings.flush_max_age.as_nanos()).unwrap_or(u64::MAX),
            max_stack_frames: settings.max_stack_frames,
        };
        let mut queues = Vec::with_capacity(lanes);
        let mut shard_threads = Vec::with_capacity(lanes);
        for i in 0..lanes {
            let (tx, rx) = crossbeam_channel::bounded(settings.shard_queue_frames.max(1));
            queues.push(tx);
            let t = spawn_shard(i, shard_config, settings.decode_limits(), rx, flush_tx.clone(), Arc::clone(&shared))
                .context("starting a shard thread")?;
            shard_threads.push(t);
        }
        drop(flush_tx);
        let writer_config = WriterConfig {
            batch_rows: settings.writer_batch_rows.max(1),
            max_delay: settings.writer_max_delay,
            min_backoff: Duration::from_millis(100).min(settings.writer_max_backoff),
            max_backoff: settings.writer_max_backoff,
            shutdown_grace: settings.shutdown_grace,
        };
        let writer_thread = spawn_writer(
            writer_config,
            flush_rx,
            Arc::clone(&store),
            Arc::clone(&shared),
            tokio::runtime::Handle::current(),
        )
        .context("starting the writer thread")?;
        let (checks, runs_to_check) = tokio::sync::mpsc::unbounded_channel();
        let ingress = Arc::new(ShardedIngress::new(Arc::clone(&shared), queues, Some(checks)));

        let state = AppState {
            store: Arc::clone(&store),
            shared: Arc::clone(&shared),
            token_digest: settings.auth_token.as_deref().map(token_digest),
            ingest_digest: settings.ingest_token.as_deref().map(token_digest),
            ingress: Arc::clone(&ingress),
            limits: settings.http_limits,
            started: Instant::now(),
        };
        let listener = tokio::net::TcpListener::bind(settings.http_listen)
            .await
            .with_context(|| format!("binding the HTTP listener on {}", settings.http_listen))?;
        let http_addr = listener.local_addr().context("reading the HTTP listener address")?;
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        // Pyroscope's own port: its routes alone, with the same auth and limits.
        let pyroscope_addr = match settings.pyroscope_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the Pyroscope listener on {addr} (pyroscope.listen)"))?;
                let bound = listener.local_addr().context("reading the Pyroscope listener address")?;
                let app = crate::http::protocol_router(state.clone(), crate::pyroscope::routes());
                let mut stop = stopped.clone();
                let limits = settings.http_limits;
                tasks.spawn(crate::http::serve(listener, app, limits, shared.metrics.clone(), async move {
                    let _ = stop.wait_for(|s| *s).await;
                }));
                Some(bound)
            }
            None => None,
        };
        if let Some(export) = &settings.otlp_export {
            let (tap, task) =
                crate::otlp::export::start(export, Arc::clone(&store), &shared.metrics.registry, stopped.clone())
                    .context("starting the OTLP export (otlp.export)")?;
            *shared.commit_tap.lock().unwrap_or_else(|p| p.into_inner()) = Some(tap);
            tasks.spawn(task);
        }
        let app = router(state.clone(), crate::pyroscope::routes().merge(crate::otlp::routes()));
        let mut http_stop = stopped.clone();
        tasks.spawn(crate::http::serve(listener, app, settings.http_limits, shared.metrics.clone(), async move {
            let _ = http_stop.wait_for(|s| *s).await;
        }));
        tasks.spawn(check_runs(Arc::clone(&store), Arc::clone(&shared), runs_to_check, stopped.clone()));
        tasks.spawn(health_checker(Arc::clone(&store), Arc::clone(&shared), stopped.clone()));
        tasks.spawn(retention(Arc::clone(&store), Arc::clone(&shared), settings.clone(), stopped));
        Ok(AggregatorHandle {
            ingress,
            shared,
            store,
            http_addr,
            pyroscope_addr,
            state,
            stop,
            tasks,
            shard_threads,
            writer_thread: Some(writer_thread),
        })
    }
}

impl AggregatorHandle {
    /// The ingress to hand to the transport (`transport::server::serve`).
    pub fn ingress(&self) -> Arc<ShardedIngress> {
        Arc::clone(&self.ingress)
    }

    /// Where acknowledgements go (the transport's acker); frames committed
    /// before one is set are not acknowledged to anyone.
    pub fn set_acker(&self, acker: Arc<dyn Acknowledge>) {
        *self.shared.acker.lock().unwrap_or_else(|p| p.into_inner()) = Some(acker);
    }

    /// Where the OTLP gRPC listener hands requests: they are committed
    /// like pushes on the HTTP port.
    pub fn otlp_sink(&self) -> Arc<dyn aperture_transport::server::otlp::OtlpSink> {
        crate::otlp::OtlpIngest::sink(self.state.clone())
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound address of Pyroscope's own port, when one is configured.
    pub fn pyroscope_addr(&self) -> Option<SocketAddr> {
        self.pyroscope_addr
    }

    /// The aggregator's metrics (what `/metrics` renders).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The store in use.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Bytes buffered between ingress and store.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.buffer.used()
    }

    /// Stops taking frames, flushes the shards, lets the writer commit what
    /// it holds (within the shutdown grace period), then stops HTTP and the
    /// background tasks.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        let ingress = Arc::clone(&self.ingress);
        let shards = std::mem::take(&mut self.shard_threads);
        let writer = self.writer_thread.take();
        tokio::task::spawn_blocking(move || {
            ingress.close();
            for t in shards {
                let _ = t.join();
            }
            if let Some(w) = writer {
                let _ = w.join();
            }
        })
        .await
        .context("joining the pipeline threads")?;
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        Ok(())
    }

    /// Stops without flushing or committing anything buffered, as a crash
    /// would (tests of restart behaviour). Threads are detached.
    pub fn abort(mut self) {
        self.shared.halted.store(true, std::sync::atomic::Ordering::SeqCst);
        self.tasks.abort_all();
        let _ = self.stop.send(true);
        self.shared.acker.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.ingress.close();
        self.shard_threads.clear();
        self.writer_thread.take();
    }
}
