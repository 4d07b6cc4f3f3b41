//! The writer thread: one per store, fed by every shard.
//!
//! It gathers flushes into batches of [`WriterConfig::batch_rows`] rows or
//! [`WriterConfig::max_delay`] of waiting, whichever comes first, and commits
//! each batch with the ledger state of the agent runs it touches. Only then
//! are the batch's frames marked committed in the ledger and acknowledged.
//!
//! A failed batch that may succeed later is kept as it is (the very same
//! batch, so a store that committed part of it can skip that part) and
//! retried after a jittered exponential backoff; meanwhile new flushes keep
//! accumulating, bounded by the buffer capacity, which the ingress enforces.
//! A batch the store rejects as invalid is counted and its frames
//! acknowledged: resending them could not succeed either.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aperture_core::ledger::{RunKey, RunState};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use rand::Rng;
use tokio::runtime::Handle;

use crate::ingress::Shared;
use crate::shards::FlushMsg;
use crate::store::{Store, WriteBatch, WriteError};

/// Batching and retry policy of the writer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriterConfig {
    pub batch_rows: usize,
    pub max_delay: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub shutdown_grace: Duration,
}

/// Starts the writer thread. It stops once every shard has stopped (the
/// channel closes) and what they handed over is written, or the shutdown
/// grace period has passed.
pub(crate) fn spawn_writer(
    config: WriterConfig,
    input: Receiver<FlushMsg>,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    runtime: Handle,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("aperture-writer-{}", store.kind().as_str())).spawn(move || {
        Writer { config, store, shared, runtime, pending: VecDeque::new(), pending_rows: 0, oldest: None, failed: None }
            .run(input)
    })
}

/// A batch that failed and is being retried as is.
struct Failed {
    batch: WriteBatch,
    charged: usize,
    retry_at: Instant,
    backoff: Duration,
}

struct Writer {
    config: WriterConfig,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    runtime: Handle,
    pending: VecDeque<FlushMsg>,
    pending_rows: usize,
    oldest: Option<Instant>,
    failed: Option<Failed>,
}

fn unix_now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Writer {
    fn run(mut self, input: Receiver<FlushMsg>) {
        let mut closed_at: Option<Instant> = None;
        loop {
            if self.shared.is_halted() {
                return;
            }
            if let Some(t) = closed_at
                && (self.is_idle() || t.elapsed() >= self.config.shutdown_grace)
            {
                break;
            }
            let now = Instant::now();
            if let Some(failed) = &self.failed {
                if now >= failed.retry_at {
                    self.retry();
                    continue;
                }
            } else if self.due(now, closed_at.is_some()) {
                self.write_next();
                continue;
            }
            let wake = self.next_wake(now);
            if closed_at.is_some() {
                std::thread::sleep(wake.unwrap_or(Duration::from_millis(50)).min(Duration::from_millis(50)));
                continue;
            }
            let received = match wake {
                Some(d) => input.recv_timeout(d),
                None => input.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match received {
                Ok(msg) => self.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => closed_at = Some(Instant::now()),
            }
            // Take whatever else is already waiting without blocking.
            while let Ok(msg) = input.try_recv() {
                self.push(msg);
            }
        }
        if !self.is_idle() {
            let frames: usize = self.pending.iter().map(|m| m.flush.frames.len()).sum::<usize>()
                + self.failed.as_ref().map_or(0, |f| f.batch.flushes.iter().map(|x| x.frames.len()).sum());
            tracing::warn!(
                frames,
                "writer stopped with uncommitted data after the shutdown grace period; \
                 those frames were not acknowledged and their agents will resend them"
            );
        }
    }

    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.failed.is_none()
    }

    fn push(&mut self, msg: FlushMsg) {
        self.pending_rows += msg.flush.rows.len();
        self.oldest.get_or_insert_with(Instant::now);
        self.pending.push_back(msg);
        self.shared.metrics.writer_pending_rows.set(self.pending_rows as i64);
    }

    fn due(&self, now: Instant, closing: bool) -> bool {
        !self.pending.is_empty()
            && (closing
                || self.pending_rows >= self.config.batch_rows
                || self.oldest.is_some_and(|t| now >= t + self.config.max_delay))
    }

    fn next_wake(&self, now: Instant) -> Option<Duration> {
        match (&self.failed, self.oldest) {
            (Some(f), _) => Some(f.retry_at.saturating_duration_since(now)),
            (None, Some(t)) => Some((t + self.config.max_delay).saturating_duration_since(now)),
            (None, None) => None,
        }
    }

    /// Builds the next batch from the oldest pending flushes and writes it.
    fn write_next(&mut self) {
        let mut flushes = Vec::new();
        let mut rows = 0;
        let mut charged = 0;
        while let Some(msg) = self.pending.front() {
            if !flushes.is_empty() && rows + msg.flush.rows.len() > self.config.batch_rows {
                break;
            }
            let Some(msg) = self.pending.pop_front() else { break };
            rows += msg.flush.rows.len();
            charged += msg.charged;
            flushes.push(msg.flush);
        }
        self.pending_rows -= rows;
        self.oldest = if self.pending.is_empty() { None } else { Some(Instant::now()) };
        self.shared.metrics.writer_pending_rows.set(self.pending_rows as i64);
        let runs = self.runs_after(&flushes);
        let batch = WriteBatch { flushes, runs, now_s: unix_now_s(), ..WriteBatch::default() };
        self.attempt(batch, charged, self.config.min_backoff);
    }

    fn retry(&mut self) {
        if let Some(failed) = self.failed.take() {
            let next = (failed.backoff * 2).min(self.config.max_backoff);
            self.attempt(failed.batch, failed.charged, next);
        }
    }

    fn attempt(&mut self, batch: WriteBatch, charged: usize, backoff: Duration) {
        let store_name = self.store.kind().as_str();
        let m = &self.shared.metrics;
        let started = Instant::now();
        if self.shared.is_halted() {
            return;
        }
        let result = self.runtime.block_on(self.store.write(&batch));
        m.writer_duration.observe(started.elapsed().as_secs_f64());
        let frames: Vec<_> = batch.flushes.iter().flat_map(|f| f.frames.iter().copied()).collect();
        match result {
            Ok(()) => {
                m.writer_batches.with_label_values(&[store_name, "ok"]).inc();
                m.writer_rows.with_label_values(&[store_name]).inc_by(batch.row_count() as u64);
                m.writer_stacks.with_label_values(&[store_name]).inc_by(batch.stack_count() as u64);
                m.writer_last_success.set(i64::try_from(unix_now_s()).unwrap_or(i64::MAX));
                self.shared.set_store_error(None);
                self.finish(&frames, charged);
            }
            Err(WriteError::Rejected { reason, .. }) => {
                tracing::error!(rows = batch.row_count(), %reason, "store rejected a batch; rows dropped");
                m.writer_batches.with_label_values(&[store_name, "rejected"]).inc();
                m.writer_rows_rejected.with_label_values(&[store_name]).inc_by(batch.row_count() as u64);
                self.shared.set_store_error(None);
                self.finish(&frames, charged);
            }
            Err(e @ WriteError::Unavailable { .. }) => {
                m.writer_batches.with_label_values(&[store_name, "error"]).inc();
                self.shared.set_store_error(Some(e.to_string()));
                let jittered = backoff.mul_f64(rand::rng().random_range(0.5..1.0));
                tracing::warn!(error = %e, retry_in_ms = jittered.as_millis() as u64, "write failed");
                self.failed = Some(Failed { batch, charged, retry_at: Instant::now() + jittered, backoff });
            }
        }
    }

    fn finish(&self, frames: &[aperture_core::frame::FrameId], charged: usize) {
        self.shared.buffer.release(charged);
        self.shared.commit(frames);
        self.shared.ack(frames);
    }

    /// The committed state each run touched by `flushes` will have once they
    /// are committed: the ledger's state plus these frames.
    fn runs_after(&self, flushes: &[aperture_core::shard::Flush]) -> Vec<(RunKey, RunState)> {
        let frames: Vec<_> = flushes.iter().flat_map(|f| f.frames.iter().copied()).collect();
        let mut out = Vec::new();
        for (lane, ids) in self.shared.group_by_lane(&frames) {
            let keys: HashSet<RunKey> = ids.iter().map(|id| (id.agent_id, id.boot_id)).collect();
            let mut states = self.shared.lane(lane).ledger.committed_runs(keys.iter());
            for (key, state) in &mut states {
                for id in ids.iter().filter(|id| (id.agent_id, id.boot_id) == *key) {
                    state.commit(id.sequence);
                }
            }
            out.extend(states);
        }
        out.sort_by_key(|a| a.0);
        out
    }
}
