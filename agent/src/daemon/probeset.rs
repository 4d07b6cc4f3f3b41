//! The probes as the driver sees them: loaded with the settings in effect,
//! a reader feeding the ring, updated live when the budget changes the
//! frequency or thresholds (reloaded only if that fails), drained on a
//! schedule.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::config::{AgentConfig, UnwindChoice};
use aperture_core::model::Mode;
use aperture_core::ring::RingProducer;
use aperture_probes::{
    BatchSink, DropCount, Filter, LockStats, Modes, PerfReader, ProbeConfig, Probes, ReaderConfig, ReaderStats,
    RecordBatch, SyscallStats, UnwindMode, UnwindSettings, UnwindStats,
};
use crossbeam_channel::Receiver;

use crate::budget::{AgentThreads, Effective};
use crate::selection::Selection;

/// Most cgroup ids pushed into the kernel filter (the map's size).
const MAX_KERNEL_CGROUPS: usize = 4096;

/// Why the probes could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ProbeStartError {
    /// Loading the BPF objects failed.
    #[error("loading the BPF programs failed: {0}")]
    Load(#[from] aperture_probes::LoadError),
    /// Opening the perf buffers or starting the reader failed.
    #[error("starting the perf-buffer reader failed: {0}")]
    Reader(#[from] aperture_probes::ReaderError),
    /// Attaching a program failed.
    #[error("attaching the BPF programs failed: {0}")]
    Attach(#[from] aperture_probes::AttachError),
}

/// Hands the reader's batches to the pipeline ring without blocking and
/// takes emptied batches back for reuse.
struct RingSink {
    producer: RingProducer<RecordBatch>,
    recycled: Receiver<RecordBatch>,
}

impl BatchSink for RingSink {
    fn deliver(&mut self, batch: RecordBatch) {
        // A full ring drops the batch; the ring counts it (ring_full).
        let _ = self.producer.push(batch);
    }

    fn recycle(&mut self) -> Option<RecordBatch> {
        self.recycled.try_recv().ok()
    }
}

/// Loaded, attached probes and their reader.
pub struct ProbeSet {
    probes: Option<Probes>,
    reader: Option<PerfReader>,
    config: ProbeConfig,
    reader_config: ReaderConfig,
    producer: RingProducer<RecordBatch>,
    recycled: Receiver<RecordBatch>,
    threads: AgentThreads,
}

impl std::fmt::Debug for ProbeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeSet").field("probes", &self.probes).finish_non_exhaustive()
    }
}

impl ProbeSet {
    /// Loads and attaches the probes of `config.mode` with the settings of
    /// `effective`, restricted in the kernel as far as `selection` allows.
    pub fn start(
        config: &AgentConfig,
        effective: Effective,
        selection: &Selection,
        producer: RingProducer<RecordBatch>,
        recycled: Receiver<RecordBatch>,
        threads: AgentThreads,
    ) -> Result<ProbeSet, ProbeStartError> {
        let modes: Modes = config.mode.modes().collect();
        let page = 4096usize;
        let pages = (config.perf_buffer.size_per_cpu.as_usize() / page).max(1).next_power_of_two();
        let reader_config = ReaderConfig {
            pages_per_cpu: pages,
            watermark_bytes: Some(u32::try_from(config.perf_buffer.wakeup_bytes.as_usize()).unwrap_or(u32::MAX)),
            flush_interval: config.perf_buffer.poll_interval.0,
            ..ReaderConfig::default()
        };
        let probe_config = ProbeConfig {
            modes,
            frequency_hz: u64::from(effective.frequency_hz),
            lock_threshold: Duration::from_nanos(effective.lock_threshold_ns),
            slow_syscall_threshold: Duration::from_nanos(effective.syscall_threshold_ns),
            filter: kernel_filter(selection),
            ignore_self: true,
            unwind: UnwindSettings {
                mode: match config.unwind {
                    UnwindChoice::Tables => UnwindMode::Tables,
                    UnwindChoice::FramePointers => UnwindMode::FramePointers,
                },
                cache_dir: Some(config.data_dir.join("unwind")),
                cache_max_bytes: config.unwind_cache_max.0,
                ..UnwindSettings::default()
            },
        };
        let mut set =
            ProbeSet { probes: None, reader: None, config: probe_config, reader_config, producer, recycled, threads };
        set.attach()?;
        Ok(set)
    }

    fn attach(&mut self) -> Result<(), ProbeStartError> {
        let mut probes = Probes::load(&self.config)?;
        let sink = RingSink { producer: self.producer.clone(), recycled: self.recycled.clone() };
        // The reader starts first so no early event is lost.
        let reader = probes.start_reader(&self.reader_config, sink)?;
        self.threads.register(reader.thread_id());
        // Its thread reads mappings and builds and loads unwind tables:
        // the agent's work, within its budget.
        if let Some(tid) = probes.unwind_thread_id() {
            self.threads.register(tid);
        }
        probes.attach()?;
        for a in probes.attachments() {
            tracing::info!(mode = %a.mode, program = a.program, point = a.point, flavour = ?a.flavour, "attached");
        }
        self.probes = Some(probes);
        self.reader = Some(reader);
        Ok(())
    }

    /// The reader's counters (new ones after every reload).
    pub fn reader_stats(&self) -> Option<Arc<ReaderStats>> {
        self.reader.as_ref().map(|r| Arc::clone(r.stats()))
    }

    /// Whether `mode` is loaded.
    pub fn has(&self, mode: Mode) -> bool {
        self.config.modes.contains(mode)
    }

    /// Drains the in-kernel syscall statistics (empty when not loaded or on error).
    pub fn drain_syscalls(&mut self) -> Vec<SyscallStats> {
        match self.probes.as_mut().filter(|_| self.config.modes.contains(Mode::Syscall)) {
            Some(p) => p.drain_syscall_stats().unwrap_or_else(|e| {
                tracing::warn!("draining syscall statistics failed: {e}");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    /// Drains the in-kernel lock statistics.
    pub fn drain_locks(&mut self) -> Vec<LockStats> {
        match self.probes.as_mut().filter(|_| self.config.modes.contains(Mode::Lock)) {
            Some(p) => p.drain_lock_stats().unwrap_or_else(|e| {
                tracing::warn!("draining lock statistics failed: {e}");
                Vec::new()
            }),
            None => Vec::new(),
        }
    }

    /// The unwinder's state and the table walker's counters (cumulative
    /// since the last load); `None` when the probes are not loaded.
    pub fn unwind_stats(&self) -> Option<UnwindStats> {
        self.probes.as_ref().map(Probes::unwind_stats)
    }

    /// The programs' drop counters (cumulative since the last load).
    pub fn drop_counts(&mut self) -> Vec<DropCount> {
        self.probes.as_mut().and_then(|p| p.drop_counts().ok()).unwrap_or_default()
    }

    /// Detaches everything and stops the reader after it delivered what was
    /// left in the rings.
    pub fn stop(&mut self) {
        // Dropping the probes detaches the programs and frees their maps.
        self.probes = None;
        if let Some(reader) = self.reader.take()
            && let Err(e) = reader.stop()
        {
            tracing::warn!("the perf-buffer reader stopped with an error: {e}");
        }
    }

    /// Applies new settings in place — the cpu-clock frequency through the
    /// perf events, the thresholds through the programs' settings map — so
    /// nothing is detached and no event is missed. Returns false when that
    /// is not possible (then [`ProbeSet::reload`]).
    pub fn apply_live(&mut self, effective: Effective) -> bool {
        let Some(probes) = self.probes.as_mut() else { return false };
        let hz = u64::from(effective.frequency_hz);
        let lock = Duration::from_nanos(effective.lock_threshold_ns);
        let slow = Duration::from_nanos(effective.syscall_threshold_ns);
        match probes.set_frequency(hz).and_then(|()| probes.set_thresholds(lock, slow)) {
            Ok(()) => {
                self.config.frequency_hz = hz;
                self.config.lock_threshold = lock;
                self.config.slow_syscall_threshold = slow;
                true
            }
            Err(e) => {
                tracing::warn!("changing the probes' settings in place failed: {e}; re-attaching");
                false
            }
        }
    }

    /// Re-attaches with new settings. The old probes are detached first, so
    /// samples are never taken twice; the gap is a few milliseconds. When
    /// the new settings cannot be loaded the old ones are restored.
    pub fn reload(&mut self, effective: Effective) -> Result<(), ProbeStartError> {
        let previous = self.config.clone();
        self.stop();
        self.config.frequency_hz = u64::from(effective.frequency_hz);
        self.config.lock_threshold = Duration::from_nanos(effective.lock_threshold_ns);
        self.config.slow_syscall_threshold = Duration::from_nanos(effective.syscall_threshold_ns);
        match self.attach() {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!("re-attaching with {effective} failed: {e}; restoring the previous settings");
                self.stop();
                self.config = previous;
                self.attach()
            }
        }
    }
}

impl Drop for ProbeSet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The part of the selection the kernel can enforce (a superset of the
/// selection; user space re-checks every record).
///
/// - pids, when the filter names pids (every other criterion only narrows);
/// - otherwise the cgroup ids of the configured cgroup directories and of
///   every directory below them at start-up (the kernel matches a task's own
///   cgroup only). Cgroups created later are not seen until a restart, so
///   with more than [`MAX_KERNEL_CGROUPS`] or when a directory cannot be
///   walked, nothing is pushed down.
pub fn kernel_filter(selection: &Selection) -> Option<Filter> {
    if let Some(pids) = selection.kernel_pids() {
        return Some(Filter { pids, cgroups: Vec::new() });
    }
    let roots = selection.kernel_cgroups();
    if roots.is_empty() {
        return None;
    }
    let mut ids = Vec::new();
    for root in &roots {
        if !collect_cgroup_ids(root, &mut ids) || ids.len() > MAX_KERNEL_CGROUPS {
            tracing::info!("cgroup filter enforced in user space only ({} cannot be pushed down)", root.display());
            return None;
        }
    }
    Some(Filter { pids: Vec::new(), cgroups: ids })
}

fn collect_cgroup_ids(dir: &Path, out: &mut Vec<u64>) -> bool {
    let Ok(meta) = std::fs::metadata(dir) else { return false };
    out.push(meta.ino());
    if out.len() > MAX_KERNEL_CGROUPS {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) && !collect_cgroup_ids(&entry.path(), out) {
            return false;
        }
    }
    true
}
