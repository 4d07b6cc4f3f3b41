//! The writer's batching and retry policy, without I/O: time is passed in,
//! flushes and write results are handed to it, and it says which batch to
//! write and when ([`WriterPolicy::poll_batch`], [`WriterPolicy::poll_timeout`]).
//! The writer thread ([`super::writer`]) drives it with a real clock and a
//! real store; the tests here drive it with virtual time.
//!
//! Rules:
//! - Flushes are gathered, in arrival order, into batches of at most
//!   [`WriterConfig::batch_rows`] rows (a single larger flush goes alone);
//!   a batch is written once it is full or its oldest flush has waited
//!   [`WriterConfig::max_delay`], and at once while closing.
//! - One batch is written at a time. A batch that fails in a way that may
//!   pass ([`WriteError::Unavailable`]) is kept as it is (the very same
//!   [`WriteBatch`], so a store that committed part of it skips that part)
//!   and retried after a jittered exponential backoff, from
//!   [`WriterConfig::min_backoff`] doubling up to [`WriterConfig::max_backoff`];
//!   no later batch is written before it.
//! - A batch the store refuses as invalid ([`WriteError::Rejected`]) and
//!   that holds several flushes is split: each flush is retried alone, so the
//!   valid ones are stored. A single flush that is refused is given up: its
//!   rows are counted as rejected, its frames acknowledged (resending them
//!   cannot succeed) and its stacks forgotten by their shard.
//! - Frames are reported committed ([`Outcome::Committed`]) only after the
//!   store said so. Once closing, the policy gives up after
//!   [`WriterConfig::shutdown_grace`] and reports what stayed unwritten, which
//!   is never acknowledged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use aperture_core::frame::FrameId;
use aperture_core::model::StackHash;
use aperture_core::shard::Flush;

use super::shard::FlushMsg;
use crate::store::{WriteBatch, WriteError};

/// Batching and retry settings of the writer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriterConfig {
    pub batch_rows: usize,
    pub max_delay: Duration,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub shutdown_grace: Duration,
}

/// What a write result means for the rest of the pipeline.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The batch is committed: mark its frames committed, acknowledge them,
    /// release the bytes.
    Committed { frames: Vec<FrameId>, charged: usize, rows: usize, stacks: usize },
    /// The write may pass later; the same batch is retried at `retry_at`.
    Retrying { retry_at: Instant, attempt: u32 },
    /// The store refused a batch of several flushes; each is retried alone.
    Split { parts: usize },
    /// The store refused a single flush: given up. Its frames are
    /// acknowledged (they can never be stored), its bytes released and the
    /// stacks it carried forgotten by their shard (`(shard, hashes)`).
    Rejected { frames: Vec<FrameId>, charged: usize, rows: usize, stacks: Vec<(usize, Vec<StackHash>)> },
}

/// What stayed unwritten when the policy gave up at shutdown.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Unwritten {
    pub frames: Vec<FrameId>,
    pub charged: usize,
}

/// The batch being written or waiting for its retry.
struct Current {
    batch: WriteBatch,
    /// Shard of each flush in `batch.flushes`, and the bytes charged for it.
    origin: Vec<(usize, usize)>,
    attempt: u32,
    backoff: Duration,
    /// `None` while a write is in flight.
    retry_at: Option<Instant>,
}

/// The writer's policy. See the module documentation.
pub(crate) struct WriterPolicy {
    config: WriterConfig,
    pending: VecDeque<FlushMsg>,
    pending_rows: usize,
    oldest: Option<Instant>,
    /// Flushes of a refused batch, written one at a time before `pending`.
    split: VecDeque<FlushMsg>,
    current: Option<Current>,
    closing_since: Option<Instant>,
    done: bool,
    rng: u64,
}

impl WriterPolicy {
    /// A policy with nothing buffered. `seed` drives the backoff jitter.
    pub fn new(config: WriterConfig, seed: u64) -> WriterPolicy {
        WriterPolicy {
            config,
            pending: VecDeque::new(),
            pending_rows: 0,
            oldest: None,
            split: VecDeque::new(),
            current: None,
            closing_since: None,
            done: false,
            rng: seed | 1,
        }
    }

    /// A shard handed over a flush.
    pub fn handle_flush(&mut self, now: Instant, msg: FlushMsg) {
        self.pending_rows += msg.flush.rows.len();
        self.oldest.get_or_insert(now);
        self.pending.push_back(msg);
    }

    /// No more flushes will come: write what is held, give up after the grace period.
    pub fn handle_close(&mut self, now: Instant) {
        self.closing_since.get_or_insert(now);
    }

    /// Rows waiting to be batched.
    pub fn pending_rows(&self) -> usize {
        self.pending_rows
    }

    /// Whether nothing is held.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.split.is_empty() && self.current.is_none()
    }

    /// The batch to write now, if one is due. `prepare` completes a newly
    /// formed batch (the ledger state of the runs it touches, its commit
    /// time); a retried batch is returned as it was. After a batch is
    /// returned, [`WriterPolicy::handle_result`] must follow before the next
    /// call.
    pub fn poll_batch(&mut self, now: Instant, prepare: impl FnOnce(&mut WriteBatch)) -> Option<&WriteBatch> {
        if self.done {
            return None;
        }
        if let Some(current) = &self.current {
            if current.retry_at.is_some_and(|t| now >= t) {
                let current = self.current.as_mut()?;
                current.retry_at = None;
                current.attempt += 1;
                return Some(&current.batch);
            }
            return None;
        }
        let msgs = if let Some(msg) = self.split.pop_front() {
            vec![msg]
        } else if self.due(now) {
            self.take_pending(now)
        } else {
            return None;
        };
        let mut origin = Vec::with_capacity(msgs.len());
        let mut flushes = Vec::with_capacity(msgs.len());
        for msg in msgs {
            origin.push((msg.shard, msg.charged));
            flushes.push(msg.flush);
        }
        let mut batch = WriteBatch { flushes, ..WriteBatch::default() };
        prepare(&mut batch);
        self.current = Some(Current { batch, origin, attempt: 1, backoff: Duration::ZERO, retry_at: None });
        self.current.as_ref().map(|c| &c.batch)
    }

    fn due(&self, now: Instant) -> bool {
        !self.pending.is_empty()
            && (self.closing_since.is_some()
                || self.pending_rows >= self.config.batch_rows
                || self.oldest.is_some_and(|t| now >= t + self.config.max_delay))
    }

    fn take_pending(&mut self, now: Instant) -> Vec<FlushMsg> {
        let mut out = Vec::new();
        let mut rows = 0;
        while let Some(msg) = self.pending.front() {
            if !out.is_empty() && rows + msg.flush.rows.len() > self.config.batch_rows {
                break;
            }
            let Some(msg) = self.pending.pop_front() else { break };
            rows += msg.flush.rows.len();
            out.push(msg);
        }
        self.pending_rows -= rows;
        // What is left waited since at most now; it is written by size or
        // after another full delay.
        self.oldest = if self.pending.is_empty() { None } else { Some(now) };
        out
    }

    /// The result of writing the batch last returned by [`WriterPolicy::poll_batch`].
    pub fn handle_result(&mut self, now: Instant, result: Result<(), WriteError>) -> Option<Outcome> {
        let mut current = self.current.take()?;
        match result {
            Ok(()) => {
                let batch = &current.batch;
                Some(Outcome::Committed {
                    frames: frames_of(&batch.flushes),
                    charged: current.origin.iter().map(|o| o.1).sum(),
                    rows: batch.row_count(),
                    stacks: batch.stack_count(),
                })
            }
            Err(WriteError::Unavailable { .. }) => {
                current.backoff = if current.backoff.is_zero() {
                    self.config.min_backoff
                } else {
                    (current.backoff * 2).min(self.config.max_backoff)
                };
                let retry_at = now + self.jitter(current.backoff);
                current.retry_at = Some(retry_at);
                let attempt = current.attempt;
                self.current = Some(current);
                Some(Outcome::Retrying { retry_at, attempt })
            }
            Err(WriteError::Rejected { .. }) if current.batch.flushes.len() > 1 => {
                let parts = current.batch.flushes.len();
                // Ahead of anything pending or split earlier, in order.
                for (flush, (shard, charged)) in
                    std::mem::take(&mut current.batch.flushes).into_iter().zip(current.origin).rev()
                {
                    self.split.push_front(FlushMsg { shard, flush, charged });
                }
                Some(Outcome::Split { parts })
            }
            Err(WriteError::Rejected { .. }) => {
                let batch = &current.batch;
                let stacks = batch
                    .flushes
                    .iter()
                    .zip(&current.origin)
                    .map(|(f, (shard, _))| (*shard, f.stacks.iter().map(|s| s.hash).collect()))
                    .collect();
                Some(Outcome::Rejected {
                    frames: frames_of(&batch.flushes),
                    charged: current.origin.iter().map(|o| o.1).sum(),
                    rows: batch.row_count(),
                    stacks,
                })
            }
        }
    }

    /// When the policy next needs [`WriterPolicy::poll_batch`] or
    /// [`WriterPolicy::poll_done`] called, if it holds anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let grace = self.closing_since.map(|t| t + self.config.shutdown_grace);
        let work = match &self.current {
            Some(c) => c.retry_at,
            None if !self.split.is_empty() => self.closing_since.or(self.oldest),
            None if self.closing_since.is_some() && !self.pending.is_empty() => self.closing_since,
            None => self.oldest.map(|t| t + self.config.max_delay),
        };
        match (work, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Once closing: `Some` when everything is written or the grace period
    /// has passed, with what stays unwritten (never acknowledged). The
    /// policy takes nothing more afterwards.
    pub fn poll_done(&mut self, now: Instant) -> Option<Unwritten> {
        let since = self.closing_since?;
        if self.done || !(self.is_idle() || now >= since + self.config.shutdown_grace) {
            return None;
        }
        self.done = true;
        let mut left = Unwritten::default();
        if let Some(c) = self.current.take() {
            left.frames.extend(frames_of(&c.batch.flushes));
            left.charged += c.origin.iter().map(|o| o.1).sum::<usize>();
        }
        for msg in self.split.drain(..).chain(self.pending.drain(..)) {
            left.frames.extend_from_slice(&msg.flush.frames);
            left.charged += msg.charged;
        }
        self.pending_rows = 0;
        Some(left)
    }

    /// `d` scaled by a factor in [0.5, 1).
    fn jitter(&mut self, d: Duration) -> Duration {
        // xorshift64: deterministic for a seed, good enough to spread retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + unit / 2.0)
    }
}

fn frames_of(flushes: &[Flush]) -> Vec<FrameId> {
    flushes.iter().flat_map(|f| f.frames.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::ids::{AgentId, BootId};
    use aperture_core::model::Stack;
    use aperture_core::shard::{RowKey, RowKind, RowValue};

    const MS: Duration = Duration::from_millis(1);

    fn config() -> WriterConfig {
        WriterConfig {
            batch_rows: 10,
            max_delay: 100 * MS,
            min_backoff: 100 * MS,
            max_backoff: 1000 * MS,
            shutdown_grace: 5000 * MS,
        }
    }

    fn fid(seq: u64) -> FrameId {
        FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]), sequence: seq }
    }

    /// A flush of `rows` rows from frame `seq`, charged `seq` bytes.
    fn flush(seq: u64, rows: usize) -> FlushMsg {
        let rows = (0..rows)
            .map(|i| {
                let key = RowKey {
                    window_start_s: i as u64,
                    kind: RowKind::Cpu,
                    labels: 0,
                    stack: StackHash(seq),
                    detail: 0,
                };
                (key, RowValue { count: 1, ..RowValue::default() })
            })
            .collect();
        let stack = Stack { hash: StackHash(seq), frames: Vec::new() };
        FlushMsg {
            shard: seq as usize % 2,
            flush: Flush { rows, stacks: vec![stack], frames: vec![fid(seq)], ..Flush::default() },
            charged: seq as usize,
        }
    }

    fn down() -> Result<(), WriteError> {
        Err(WriteError::Unavailable { store: "test", reason: "down".into() })
    }

    fn refused() -> Result<(), WriteError> {
        Err(WriteError::Rejected { store: "test", reason: "bad row".into() })
    }

    fn poll(p: &mut WriterPolicy, now: Instant) -> Option<Vec<u64>> {
        p.poll_batch(now, |_| {}).map(|b| frames_of(&b.flushes).iter().map(|f| f.sequence).collect())
    }

    #[test]
    fn batches_by_size_or_delay_in_arrival_order() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 1);
        p.handle_flush(t0, flush(1, 4));
        p.handle_flush(t0, flush(2, 4));
        assert_eq!(poll(&mut p, t0), None, "8 rows: neither full nor old");
        assert_eq!(p.poll_timeout(), Some(t0 + 100 * MS));
        p.handle_flush(t0 + MS, flush(3, 4));
        // 12 rows: the first two flushes fill a batch, the third waits.
        assert_eq!(poll(&mut p, t0 + MS), Some(vec![1, 2]));
        assert!(matches!(p.handle_result(t0 + MS, Ok(())), Some(Outcome::Committed { .. })));
        assert_eq!(poll(&mut p, t0 + 50 * MS), None);
        assert_eq!(poll(&mut p, t0 + 101 * MS), Some(vec![3]));
    }

    #[test]
    fn without_a_delay_a_flush_is_written_at_once_and_what_arrives_meanwhile_goes_next() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(WriterConfig { max_delay: Duration::ZERO, ..config() }, 1);
        p.handle_flush(t0, flush(1, 2));
        assert_eq!(poll(&mut p, t0), Some(vec![1]), "no wait of the writer's own");
        // While that write is in flight, two more flushes arrive: nothing
        // more is started before the result.
        p.handle_flush(t0 + MS, flush(2, 2));
        p.handle_flush(t0 + 2 * MS, flush(3, 2));
        assert_eq!(poll(&mut p, t0 + 2 * MS), None, "one write at a time");
        assert!(matches!(p.handle_result(t0 + 3 * MS, Ok(())), Some(Outcome::Committed { .. })));
        assert_eq!(poll(&mut p, t0 + 3 * MS), Some(vec![2, 3]), "gathered into one write");
        assert!(matches!(p.handle_result(t0 + 4 * MS, Ok(())), Some(Outcome::Committed { .. })));
        assert_eq!(p.poll_timeout(), None, "nothing held");
    }

    #[test]
    fn frames_are_committed_only_after_the_store_said_so() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 1);
        p.handle_flush(t0, flush(7, 20));
        assert_eq!(poll(&mut p, t0), Some(vec![7]));
        assert!(matches!(p.handle_result(t0, down()), Some(Outcome::Retrying { .. })));
        assert!(!p.is_idle());
        let retry = p.poll_timeout().expect("a retry is scheduled");
        assert_eq!(poll(&mut p, retry), Some(vec![7]));
        assert_eq!(
            p.handle_result(retry, Ok(())),
            Some(Outcome::Committed { frames: vec![fid(7)], charged: 7, rows: 20, stacks: 1 })
        );
        assert!(p.is_idle());
        // A result with nothing written is ignored.
        assert_eq!(p.handle_result(retry, Ok(())), None);
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_the_cap() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 42);
        p.handle_flush(t0, flush(1, 20));
        let mut now = t0;
        let mut delays = Vec::new();
        for attempt in 1..=8 {
            assert_eq!(poll(&mut p, now), Some(vec![1]), "attempt {attempt}");
            let Some(Outcome::Retrying { retry_at, attempt: a }) = p.handle_result(now, down()) else {
                panic!("expected a retry")
            };
            assert_eq!(a, attempt);
            assert_eq!(p.poll_timeout(), Some(retry_at));
            // Nothing is written before the retry time.
            assert_eq!(poll(&mut p, retry_at - MS), None);
            delays.push(retry_at - now);
            now = retry_at;
        }
        let nominal = [100, 200, 400, 800, 1000, 1000, 1000, 1000];
        for (d, n) in delays.iter().zip(nominal) {
            let n = n * MS;
            assert!(*d >= n / 2 && *d < n, "delay {d:?} outside [{:?}, {n:?})", n / 2);
        }
    }

    #[test]
    fn a_failed_batch_blocks_later_ones_until_it_is_written() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 3);
        p.handle_flush(t0, flush(1, 10));
        assert_eq!(poll(&mut p, t0), Some(vec![1]));
        p.handle_result(t0, down());
        p.handle_flush(t0, flush(2, 10));
        p.handle_flush(t0, flush(3, 10));
        assert_eq!(poll(&mut p, t0 + 10 * MS), None, "a newer batch must not overtake the failed one");
        let retry = p.poll_timeout().expect("retry scheduled");
        assert_eq!(poll(&mut p, retry), Some(vec![1]));
        p.handle_result(retry, Ok(()));
        assert_eq!(poll(&mut p, retry), Some(vec![2]));
        p.handle_result(retry, Ok(()));
        assert_eq!(poll(&mut p, retry), Some(vec![3]));
    }

    #[test]
    fn a_refused_batch_is_split_and_only_the_bad_flush_is_given_up() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 3);
        for seq in 1..=3 {
            p.handle_flush(t0, flush(seq, 3));
        }
        p.handle_flush(t0, flush(4, 3));
        assert_eq!(poll(&mut p, t0), Some(vec![1, 2, 3]));
        assert_eq!(p.handle_result(t0, refused()), Some(Outcome::Split { parts: 3 }));
        assert_eq!(poll(&mut p, t0), Some(vec![1]));
        assert!(matches!(p.handle_result(t0, Ok(())), Some(Outcome::Committed { .. })));
        assert_eq!(poll(&mut p, t0), Some(vec![2]));
        assert_eq!(
            p.handle_result(t0, refused()),
            Some(Outcome::Rejected {
                frames: vec![fid(2)],
                charged: 2,
                rows: 3,
                stacks: vec![(0, vec![StackHash(2)])]
            })
        );
        assert_eq!(poll(&mut p, t0), Some(vec![3]));
        assert!(matches!(p.handle_result(t0, Ok(())), Some(Outcome::Committed { .. })));
        // Then the flush that was pending all along.
        assert_eq!(poll(&mut p, t0 + 100 * MS), Some(vec![4]));
    }

    #[test]
    fn at_shutdown_it_drains_then_gives_up_after_the_grace_period() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 5);
        p.handle_flush(t0, flush(1, 1));
        p.handle_flush(t0, flush(2, 1));
        p.handle_close(t0);
        assert_eq!(p.poll_done(t0), None);
        // Closing: written at once, not after the delay.
        assert_eq!(poll(&mut p, t0), Some(vec![1, 2]));
        p.handle_result(t0, down());
        p.handle_flush(t0, flush(3, 1));
        let mut now = t0;
        while p.poll_done(now).is_none() {
            now = p.poll_timeout().expect("closing policy always has a deadline");
            if poll(&mut p, now).is_some() {
                p.handle_result(now, down());
            }
        }
        assert!(now >= t0 + 5000 * MS);
        assert!(p.poll_done(now).is_none(), "reported once");
        // Given up: nothing was reported committed; what stayed is listed.
        let mut q = WriterPolicy::new(config(), 5);
        q.handle_flush(t0, flush(1, 1));
        q.handle_close(t0);
        assert_eq!(poll(&mut q, t0), Some(vec![1]));
        q.handle_result(t0, down());
        assert_eq!(q.poll_done(t0 + 5000 * MS), Some(Unwritten { frames: vec![fid(1)], charged: 1 }));
        assert_eq!(poll(&mut q, t0 + 6000 * MS), None);
    }

    #[test]
    fn an_idle_closing_policy_is_done_at_once() {
        let t0 = Instant::now();
        let mut p = WriterPolicy::new(config(), 5);
        p.handle_close(t0);
        assert_eq!(p.poll_done(t0), Some(Unwritten::default()));
    }
}
