//! The pipeline thread: pops reader batches from the ring, runs the
//! [`Pipeline`], drains aggregates, runs the budget loop, mirrors counters
//! into the metrics, and flushes batches to the transport.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aperture_core::model::Mode;
use aperture_core::ring::{Pop, RingConsumer, RingDrop};
use aperture_probes::{INITIAL_BATCH_EVENTS, ReaderStats, RecordBatch};
use aperture_transport::Carrier;
use aperture_transport::client::Client;
use crossbeam_channel::Sender;

use super::Shutdown;
use super::probeset::ProbeSet;
use crate::batcher::FlushReason;
use crate::budget::{BudgetController, CostSource, ThreadCost, own_rss_bytes};
use crate::clock::monotonic_ns;
use crate::kube::KubeStats;
use crate::metrics::{AgentMetrics, Mirror, UnwindMirrors};
use crate::pipeline::{FrameSink, Pipeline, PipelineStats};

/// How often counters are mirrored into the metrics and housekeeping runs.
const TICK: Duration = Duration::from_secs(1);
/// Longest wait for a reader batch, so the shutdown flag is seen quickly.
const MAX_WAIT: Duration = Duration::from_millis(200);

/// Everything the pipeline thread owns.
pub(super) struct Driver {
    pub pipeline: Pipeline,
    pub probes: ProbeSet,
    pub consumer: RingConsumer<RecordBatch>,
    pub recycle: Sender<RecordBatch>,
    pub sink: Box<dyn FrameSink>,
    pub client: Arc<Client>,
    pub budget: BudgetController,
    pub budget_interval: Duration,
    pub drain_interval: Duration,
    pub metrics: AgentMetrics,
    pub kube_stats: Option<Arc<KubeStats>>,
    pub heartbeat: Arc<AtomicU64>,
    pub mirrors: Mirrors,
    /// CPU time of the agent's own threads and of its BPF programs.
    pub cost: ThreadCost,
}

/// Last values of the counters mirrored into the metrics.
#[derive(Default)]
pub(super) struct Mirrors {
    reader: Option<Arc<ReaderStats>>,
    wakeups: Mirror,
    bytes: Mirror,
    kernel_drops: HashMap<(Mode, &'static str), Mirror>,
    last_pipeline: PipelineStats,
    ring_full: Mirror,
    ring_disconnected: Mirror,
    proc: [Mirror; 4],
    kube: [Mirror; 5],
    stacks: [Mirror; 2],
    cpu_ns: u64,
    transport: [Mirror; 8],
    unwind: UnwindMirrors,
}

impl Driver {
    /// Runs until `shutdown` is triggered, then drains and flushes; returns
    /// the number of frames built.
    pub fn run(mut self, shutdown: &Shutdown) -> u64 {
        let start = monotonic_ns();
        let totals = self.cost.totals();
        self.budget.observe(start, totals);
        self.publish_effective();
        let mut next_tick = start;
        let mut next_drain = start + nanos(self.drain_interval);
        let mut next_budget = start + nanos(self.budget_interval);
        while !shutdown.is_triggered() {
            let now = monotonic_ns();
            let mut wake = next_tick.min(next_drain).min(next_budget);
            if let Some(d) = self.pipeline.batcher().deadline() {
                wake = wake.min(d);
            }
            let wait = Duration::from_nanos(wake.saturating_sub(now)).min(MAX_WAIT);
            match self.consumer.pop_timeout(wait) {
                Pop::Batch(batch) => self.take(batch),
                Pop::Empty => {}
                Pop::Closed => break,
            }
            let now = monotonic_ns();
            if now >= next_drain {
                self.drain(now);
                next_drain = now + nanos(self.drain_interval);
            }
            if now >= next_budget {
                self.run_budget(now);
                next_budget = now + nanos(self.budget_interval);
            }
            if let Some(reason) = self.pipeline.due(now) {
                self.pipeline.flush(reason, self.sink.as_mut());
            }
            if now >= next_tick {
                self.pipeline.tick(now);
                self.sync_metrics();
                self.heartbeat.store(now, Ordering::Relaxed);
                next_tick = now + nanos(TICK);
            }
        }
        self.finish();
        self.pipeline.sequence()
    }

    fn take(&mut self, mut batch: RecordBatch) {
        self.pipeline.handle_records(&batch, monotonic_ns());
        // The reader reuses it (smaller again if a burst made it grow);
        // when the return queue is full it is freed.
        if batch.events.capacity() > 4 * INITIAL_BATCH_EVENTS {
            batch.clear_and_shrink(INITIAL_BATCH_EVENTS);
        }
        let _ = self.recycle.try_send(batch);
    }

    fn drain(&mut self, now: u64) {
        if self.probes.has(Mode::Syscall) {
            let stats = self.probes.drain_syscalls();
            self.pipeline.handle_syscall_stats(&stats, now);
        }
        if self.probes.has(Mode::Lock) {
            let stats = self.probes.drain_locks();
            self.pipeline.handle_lock_stats(&stats, now);
        }
    }

    fn run_budget(&mut self, now: u64) {
        let totals = self.cost.totals();
        let adjustment = self.budget.observe(now, totals);
        if let Some(m) = self.budget.measured() {
            self.metrics.budget_cost.with_label_values(&["agent"]).set(m.agent_percent);
            self.metrics.budget_cost.with_label_values(&["kernel"]).set(m.kernel_percent);
        }
        let Some(adjustment) = adjustment else { return };
        let direction = if adjustment.is_lowering() { "lower" } else { "restore" };
        tracing::warn!("overhead budget: {adjustment}");
        self.metrics.budget_adjustments.with_label_values(&[direction]).inc();
        if self.probes.apply_live(adjustment.to) {
            self.pipeline.set_frequency(adjustment.to.frequency_hz);
        } else {
            // Keep what the old programs aggregated before they are replaced.
            self.drain(now);
            self.sync_metrics();
            match self.probes.reload(adjustment.to) {
                Ok(()) => self.pipeline.set_frequency(adjustment.to.frequency_hz),
                Err(e) => tracing::error!("the probes could not be re-attached after a budget change: {e}"),
            }
            // New programs and reader: their counters start from zero.
            self.mirrors.reader = None;
            self.mirrors.kernel_drops.clear();
            self.mirrors.unwind = UnwindMirrors::default();
        }
        self.publish_effective();
    }

    fn publish_effective(&self) {
        let e = self.budget.effective();
        self.metrics.frequency.set(f64::from(e.frequency_hz));
        self.metrics.lock_threshold.set(e.lock_threshold_ns as f64 / 1e9);
        self.metrics.syscall_threshold.set(e.syscall_threshold_ns as f64 / 1e9);
        self.metrics.budget_level.set(i64::from(e.level));
    }

    /// Stops the probes, delivers what is left and flushes the last batch.
    fn finish(&mut self) {
        let now = monotonic_ns();
        self.drain(now);
        self.probes.stop();
        while let Some(batch) = self.consumer.try_pop() {
            self.take(batch);
        }
        self.pipeline.flush(FlushReason::Shutdown, self.sink.as_mut());
        self.sync_metrics();
    }

    fn sync_metrics(&mut self) {
        let m = &self.metrics;
        let mir = &mut self.mirrors;
        if mir.reader.is_none() {
            mir.reader = self.probes.reader_stats();
            mir.wakeups = Mirror::default();
            mir.bytes = Mirror::default();
        }
        if let Some(r) = &mir.reader {
            mir.wakeups.sync(&m.reader_wakeups, r.wakeups.load(Ordering::Relaxed));
            mir.bytes.sync(&m.reader_bytes, r.bytes.load(Ordering::Relaxed));
        }
        for d in self.probes.drop_counts() {
            let counter = m.kernel_drops.with_label_values(&[d.mode.as_str(), d.reason.as_str()]);
            mir.kernel_drops.entry((d.mode, d.reason.as_str())).or_default().sync(&counter, d.count);
        }
        let s = self.pipeline.stats();
        let last = &mir.last_pipeline;
        for mode in Mode::ALL {
            let i = mode as usize;
            m.events_captured.with_label_values(&[mode.as_str()]).inc_by(s.captured[i] - last.captured[i]);
        }
        m.events_dropped.with_label_values(&["perf_lost"]).inc_by(s.perf_lost - last.perf_lost);
        m.events_dropped.with_label_values(&["malformed"]).inc_by(s.malformed - last.malformed);
        m.events_filtered.inc_by(s.filtered - last.filtered);
        m.events_ignored.with_label_values(&["lock_event"]).inc_by(s.lock_events_ignored - last.lock_events_ignored);
        for (i, table) in ["cpu", "lock", "syscall", "slow_call"].into_iter().enumerate() {
            m.records.with_label_values(&[table]).inc_by(s.rows[i] - last.rows[i]);
        }
        for (i, reason) in [FlushReason::Size, FlushReason::Age, FlushReason::Shutdown].into_iter().enumerate() {
            m.batches.with_label_values(&[reason.as_str()]).inc_by(s.batches[i] - last.batches[i]);
        }
        m.frames_built.inc_by(s.frames - last.frames);
        m.frame_bytes.inc_by(s.frame_bytes - last.frame_bytes);
        m.encode_errors.inc_by(s.encode_errors - last.encode_errors);
        m.frames_refused.inc_by(s.sink_errors - last.sink_errors);
        mir.last_pipeline = s;

        let ring = self.consumer.stats();
        // Events, not batches: a dropped reader batch loses all its events.
        mir.ring_full.sync(&m.events_dropped.with_label_values(&["ring_full"]), ring.dropped_items_for(RingDrop::Full));
        mir.ring_disconnected.sync(
            &m.events_dropped.with_label_values(&["ring_disconnected"]),
            ring.dropped_items_for(RingDrop::Disconnected),
        );

        let a = self.pipeline.attributor().stats();
        let ok = a.proc_reads - a.proc_gone - a.proc_errors;
        for (i, (outcome, v)) in
            [("ok", ok), ("gone", a.proc_gone), ("error", a.proc_errors), ("malformed_line", a.malformed_lines)]
                .into_iter()
                .enumerate()
        {
            mir.proc[i].sync(&m.proc_reads.with_label_values(&[outcome]), v);
        }
        m.processes.set(self.pipeline.attributor().cached() as i64);

        if let Some(k) = &self.kube_stats {
            let values = [
                ("list", k.lists.load(Ordering::Relaxed)),
                ("event", k.events.load(Ordering::Relaxed)),
                ("expired", k.expired.load(Ordering::Relaxed)),
                ("error", k.errors.load(Ordering::Relaxed)),
                ("malformed", k.malformed.load(Ordering::Relaxed)),
            ];
            for (i, (kind, v)) in values.into_iter().enumerate() {
                mir.kube[i].sync(&m.kube_events.with_label_values(&[kind]), v);
            }
            m.kube_pods.set(k.pods.load(Ordering::Relaxed) as i64);
        }

        if let Some(u) = self.probes.unwind_stats() {
            m.sync_unwind(&mut mir.unwind, &u);
        }

        let c = self.pipeline.stack_cache().stats();
        mir.stacks[0].sync(&m.symbolizer_hits, c.hits);
        mir.stacks[1].sync(&m.symbolizer_misses, c.misses);
        let total = c.hits + c.misses;
        if total > 0 {
            m.symbolizer_hit_ratio.set(c.hits as f64 / total as f64);
        }

        let t = self.client.stats();
        let values = [
            (&m.frames_sent, t.session.frames_sent),
            (&m.frames_acked, t.session.frames_acked),
            (&m.frames_resent, t.session.frames_resent),
            (&m.frames_dropped, t.session.frames_dropped),
            (&m.bytes_sent, t.session.bytes_sent),
            (&m.reconnects, t.reconnects),
            (&m.frames_downgraded, t.session.frames_downgraded),
            (&m.protocol_fallbacks, t.session.protocol_fallbacks),
        ];
        for (i, (counter, v)) in values.into_iter().enumerate() {
            mir.transport[i].sync(counter, v);
        }
        m.unacked_frames.set(i64::try_from(t.session.unacked_frames).unwrap_or(i64::MAX));
        for carrier in [Carrier::Quic, Carrier::Grpc] {
            m.carrier.with_label_values(&[carrier.as_str()]).set(i64::from(t.carrier == Some(carrier)));
        }

        let cpu = self.cost.agent_cpu_ns();
        m.cpu_seconds.inc_by(cpu.saturating_sub(mir.cpu_ns) as f64 / 1e9);
        mir.cpu_ns = mir.cpu_ns.max(cpu);
        m.rss.set(i64::try_from(own_rss_bytes()).unwrap_or(i64::MAX));
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
