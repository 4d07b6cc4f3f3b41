//! Shard threads: each drives one core [`Shard`] with a real monotonic
//! clock, folding the frames of its lane and handing due flushes to the
//! writer.
//!
//! Buffer accounting follows the data: a frame's bytes are charged by the
//! ingress and released here once folded; the shard's aggregated state is
//! charged as it grows and travels with each flush to the writer, which
//! releases it once the flush is committed.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, decode};
use aperture_core::model::ProfileBatch;
use aperture_core::shard::{Flush, Shard, ShardConfig};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::state::Shared;
use crate::metrics::frame_result;

/// A frame queued to a shard thread.
#[derive(Debug)]
pub(crate) enum ShardInput {
    /// A frame to fold in; `charged` bytes were accounted for it.
    Frame { id: FrameId, bytes: FrameBuf, charged: usize },
    /// A pushed profile batch (see [`super::pushed`]), under its own frame id.
    Profiles { id: FrameId, batch: Box<ProfileBatch>, charged: usize },
    /// Flush everything and stop.
    Stop,
}

/// A flush on its way to the writer.
#[derive(Debug)]
pub(crate) struct FlushMsg {
    /// The shard (and lane) it comes from.
    pub shard: usize,
    /// The rows and the frames they came from.
    pub flush: Flush,
    /// Buffer bytes charged for it, released once committed.
    pub charged: usize,
}

/// Starts one shard thread.
pub(crate) fn spawn_shard(
    index: usize,
    config: ShardConfig,
    limits: DecodeLimits,
    input: Receiver<ShardInput>,
    output: Sender<FlushMsg>,
    shared: Arc<Shared>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("aperture-shard-{index}"))
        .spawn(move || ShardThread::new(index, config, limits, shared, output).run(input))
}

struct ShardThread {
    index: usize,
    label: String,
    shard: Shard,
    limits: DecodeLimits,
    shared: Arc<Shared>,
    output: Sender<FlushMsg>,
    epoch: Instant,
    /// Bytes charged for the shard's current state.
    charged: usize,
    /// [`Shard::truncations`] already counted in the metrics.
    truncations: (u64, u64),
}

impl ShardThread {
    fn new(
        index: usize,
        config: ShardConfig,
        limits: DecodeLimits,
        shared: Arc<Shared>,
        output: Sender<FlushMsg>,
    ) -> ShardThread {
        ShardThread {
            index,
            label: index.to_string(),
            shard: Shard::new(config),
            limits,
            shared,
            output,
            epoch: Instant::now(),
            charged: 0,
            truncations: (0, 0),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn run(mut self, input: Receiver<ShardInput>) {
        loop {
            if self.shared.is_halted() {
                return;
            }
            let wait = match self.shard.poll_timeout() {
                Some(due) => Duration::from_nanos(due.saturating_sub(self.now_ns())),
                // Nothing buffered: wake up now and then anyway to keep the
                // queue gauge fresh.
                None => Duration::from_secs(1),
            };
            match input.recv_timeout(wait) {
                Ok(ShardInput::Frame { id, bytes, charged }) => {
                    self.fold(id, &bytes);
                    self.shared.buffer.release(charged);
                }
                Ok(ShardInput::Profiles { id, batch, charged }) => {
                    self.fold_profiles(id, &batch);
                    self.shared.buffer.release(charged);
                }
                Ok(ShardInput::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.shared.metrics.shard_queue.with_label_values(&[&self.label]).set(input.len() as i64);
            let forgotten = self.shared.take_forgotten_stacks(self.index);
            if !forgotten.is_empty() {
                self.shard.forget_stacks(&forgotten);
            }
            while let Some(flush) = self.shard.poll_flush(self.now_ns()) {
                self.hand_over(flush);
            }
        }
        if let Some(flush) = self.shard.take() {
            self.hand_over(flush);
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    fn fold(&mut self, id: FrameId, bytes: &[u8]) {
        let now = self.now_ns();
        let rejected = match decode(bytes, &self.limits) {
            Ok(view) => match self.shard.ingest(now, id, view.batch) {
                Ok(()) => {
                    let samples = view.batch.sample_count();
                    self.shared.metrics.ingress_samples.inc_by(samples);
                    self.shared.metrics.shard_frames.with_label_values(&[&self.label]).inc();
                    None
                }
                Err(e) => Some(e.to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        self.after_fold(id, rejected);
    }

    fn fold_profiles(&mut self, id: FrameId, batch: &ProfileBatch) {
        let now = self.now_ns();
        let rejected = match self.shard.ingest_profiles(now, id, batch) {
            Ok(()) => {
                self.shared.metrics.ingress_samples.inc_by(batch.sample_count());
                self.shared.metrics.shard_frames.with_label_values(&[&self.label]).inc();
                None
            }
            Err(e) => {
                // The pusher learns it: its request fails instead of succeeding.
                self.shared.pushed.reject(id, &e.to_string());
                Some(e.to_string())
            }
        };
        self.after_fold(id, rejected);
    }

    fn after_fold(&mut self, id: FrameId, rejected: Option<String>) {
        if let Some(reason) = rejected {
            // The frame can never be stored: count it, and acknowledge it so
            // the agent does not resend it forever.
            tracing::warn!(shard = self.index, sequence = id.sequence, %reason, "frame rejected");
            self.shared.metrics.ingress_frames.with_label_values(&[frame_result::REJECTED]).inc();
            self.shared.commit(&[id]);
            self.shared.ack(&[id]);
        }
        let (stacks, frames) = self.shard.truncations();
        let m = &self.shared.metrics;
        m.ingress_stacks_truncated.inc_by(stacks.saturating_sub(self.truncations.0));
        m.ingress_stack_frames_cut.inc_by(frames.saturating_sub(self.truncations.1));
        self.truncations = (stacks, frames);
        let now_bytes = self.shard.approx_bytes();
        if now_bytes > self.charged {
            self.shared.buffer.charge(now_bytes - self.charged);
        } else {
            self.shared.buffer.release(self.charged - now_bytes);
        }
        self.charged = now_bytes;
        self.shared.metrics.shard_bytes.with_label_values(&[&self.label]).set(now_bytes as i64);
    }

    fn hand_over(&mut self, flush: Flush) {
        let charged = std::mem::take(&mut self.charged);
        self.shared.metrics.shard_flushes.with_label_values(&[&self.label]).inc();
        self.shared.metrics.shard_rows.with_label_values(&[&self.label]).inc_by(flush.rows.len() as u64);
        self.shared.metrics.shard_bytes.with_label_values(&[&self.label]).set(0);
        if let Err(returned) = self.output.send(FlushMsg { shard: self.index, flush, charged }) {
            // The writer is gone (shutdown after its grace period): these
            // frames stay unacknowledged and their agents resend them.
            let msg = returned.into_inner();
            tracing::warn!(shard = self.index, frames = msg.flush.frames.len(), "writer stopped; flush not written");
            self.shared.buffer.release(msg.charged);
            self.shared.abandon(&msg.flush.frames);
        }
    }
}
