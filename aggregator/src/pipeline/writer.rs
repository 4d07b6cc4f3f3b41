//! The writer thread: one per store, fed by every shard. It drives a
//! [`WriterPolicy`] (batching, retries, splitting refused batches) with the
//! real clock and the real store, and applies what the policy decides:
//! committed frames are marked in the ledger and acknowledged, refused ones
//! counted, and store failures reported as the store being down.
//!
//! Each batch carries the ledger state of the agent runs it touches, so the
//! store commits rows and "these frames are stored" together (SQLite in one
//! transaction; ClickHouse in three idempotent steps, the ledger state with
//! the state before the batch ahead of the rows, see `docs/storage.md`).

use std::collections::HashSet;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aperture_core::ledger::{RunKey, RunState};
use aperture_core::shard::Flush;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::runtime::Handle;

pub(crate) use super::policy::WriterConfig;
use super::policy::{Outcome, WriterPolicy};
use super::shard::FlushMsg;
use super::state::Shared;
use crate::clock::unix_now_s;
use crate::store::{Store, WriteError};

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
    let seed = crate::clock::unix_now_ns().max(1);
    std::thread::Builder::new()
        .name(format!("aperture-writer-{}", store.kind().as_str()))
        .spawn(move || Writer { policy: WriterPolicy::new(config, seed), store, shared, runtime }.run(input))
}

struct Writer {
    policy: WriterPolicy,
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    runtime: Handle,
}

impl Writer {
    fn run(mut self, input: Receiver<FlushMsg>) {
        let mut closed = false;
        loop {
            if self.shared.is_halted() {
                return;
            }
            let now = Instant::now();
            if let Some(left) = self.policy.poll_done(now) {
                if !left.frames.is_empty() {
                    tracing::warn!(
                        frames = left.frames.len(),
                        "writer stopped with uncommitted data after the shutdown grace period; \
                         those frames were not acknowledged and their agents will resend them"
                    );
                }
                self.shared.buffer.release(left.charged);
                self.shared.abandon(&left.frames);
                return;
            }
            if self.write_due(now) {
                continue;
            }
            let wait = self.policy.poll_timeout().map(|t| t.saturating_duration_since(now));
            if closed {
                std::thread::sleep(wait.unwrap_or(Duration::from_millis(50)).min(Duration::from_millis(50)));
                continue;
            }
            let received = match wait {
                Some(d) => input.recv_timeout(d),
                None => input.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            let now = Instant::now();
            match received {
                Ok(msg) => self.policy.handle_flush(now, msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    self.policy.handle_close(now);
                }
            }
            // Take whatever else is already waiting without blocking.
            while let Ok(msg) = input.try_recv() {
                self.policy.handle_flush(now, msg);
            }
            self.shared.metrics.writer_pending_rows.set(self.policy.pending_rows() as i64);
        }
    }

    /// Writes the batch the policy says is due, if any.
    fn write_due(&mut self, now: Instant) -> bool {
        let shared = Arc::clone(&self.shared);
        let store_name = self.store.kind().as_str();
        let Some(batch) = self.policy.poll_batch(now, |batch| {
            let invalid = batch.remove_invalid_rows();
            if invalid > 0 {
                tracing::error!(rows = invalid, "rows referring to missing label sets dropped and counted");
                shared.metrics.writer_rows_rejected.with_label_values(&[store_name]).inc_by(invalid as u64);
            }
            (batch.runs_before, batch.runs) = runs_before_and_after(&shared, &batch.flushes);
            batch.now_s = unix_now_s();
            batch.batch_id = rand::random::<u64>() | 1;
        }) else {
            return false;
        };
        let m = &self.shared.metrics;
        let started = Instant::now();
        let result = self.runtime.block_on(self.store.write(batch));
        if self.shared.is_halted() {
            return true;
        }
        m.writer_duration.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                m.writer_batches.with_label_values(&[store_name, "ok"]).inc();
                m.writer_last_success.set(i64::try_from(unix_now_s()).unwrap_or(i64::MAX));
                self.shared.set_write_error(None);
                let tap = self.shared.commit_tap.lock().unwrap_or_else(|p| p.into_inner()).clone();
                if let Some(tap) = tap {
                    tap.committed(batch);
                }
            }
            Err(WriteError::Rejected { reason, .. }) => {
                tracing::error!(flushes = batch.flushes.len(), rows = batch.row_count(), %reason, "store refused a batch");
                m.writer_batches.with_label_values(&[store_name, "rejected"]).inc();
                // The store answered: it is up.
                self.shared.set_write_error(None);
            }
            Err(e @ WriteError::Unavailable { .. }) => {
                m.writer_batches.with_label_values(&[store_name, "error"]).inc();
                self.shared.set_write_error(Some(e.to_string()));
            }
        }
        let error = result.as_ref().err().map(ToString::to_string);
        match self.policy.handle_result(Instant::now(), result) {
            Some(Outcome::Committed { frames, charged, rows, stacks }) => {
                m.writer_rows.with_label_values(&[store_name]).inc_by(rows as u64);
                m.writer_stacks.with_label_values(&[store_name]).inc_by(stacks as u64);
                self.finish(&frames, charged);
            }
            Some(Outcome::Retrying { retry_at, attempt }) => {
                let retry_in = retry_at.saturating_duration_since(Instant::now());
                tracing::warn!(
                    error = error.as_deref().unwrap_or(""),
                    attempt,
                    retry_in_ms = retry_in.as_millis() as u64,
                    "write failed; the batch is kept and retried"
                );
            }
            Some(Outcome::Split { parts }) => {
                tracing::warn!(parts, "retrying the flushes of the refused batch one by one");
            }
            Some(Outcome::Rejected { frames, charged, rows, stacks }) => {
                tracing::error!(
                    rows,
                    frames = frames.len(),
                    "store refused the rows of a flush; rows dropped and counted"
                );
                m.writer_rows_rejected.with_label_values(&[store_name]).inc_by(rows as u64);
                for (shard, hashes) in stacks {
                    self.shared.forget_stacks(shard, hashes);
                }
                self.finish(&frames, charged);
            }
            None => {}
        }
        true
    }

    fn finish(&self, frames: &[aperture_core::frame::FrameId], charged: usize) {
        self.shared.buffer.release(charged);
        self.shared.commit(frames);
        self.shared.ack(frames);
    }
}

/// Committed states of agent runs, sorted by run.
type Runs = Vec<(RunKey, RunState)>;

/// The committed state of each run touched by `flushes` now (the ledger's
/// state) and once they are committed (plus these frames).
fn runs_before_and_after(shared: &Shared, flushes: &[Flush]) -> (Runs, Runs) {
    let frames: Vec<_> = flushes.iter().flat_map(|f| f.frames.iter().copied()).collect();
    let mut before = Vec::new();
    let mut after = Vec::new();
    for (lane, ids) in shared.group_by_lane(&frames) {
        let keys: HashSet<RunKey> = ids.iter().map(|id| (id.agent_id, id.boot_id)).collect();
        let states = shared.lane(lane).ledger.committed_runs(keys.iter());
        for (key, state) in &states {
            let mut next = state.clone();
            for id in ids.iter().filter(|id| (id.agent_id, id.boot_id) == *key) {
                next.commit(id.sequence);
            }
            after.push((*key, next));
        }
        before.extend(states);
    }
    before.sort_by_key(|a| a.0);
    after.sort_by_key(|a| a.0);
    (before, after)
}
