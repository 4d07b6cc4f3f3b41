//! Shard aggregation: a sans-IO state machine that folds decoded batches into
//! rows keyed by (time window, kind, labels, stack hash, detail) and hands out
//! flushable batches of rows by size and by age.
//!
//! Time is passed in (`now_ns`, any monotonic clock the driver chooses) and
//! work is polled out ([`Shard::poll_flush`], [`Shard::poll_timeout`]), so the
//! flush policy is tested with virtual time. A flush carries every frame that
//! contributed to it ([`Flush::frames`]); the driver acknowledges those frames
//! once the store has committed the flush, never earlier.

use std::collections::{HashMap, HashSet};

use crate::frame::FrameId;
use crate::model::{ArchivedBatch, LATENCY_BUCKETS, Labels, Mode, Stack, StackHash, Target};

mod intake;
mod profiles;

pub use intake::truncated_marker;
use intake::{labels_cost, stack_cost};

/// What a row measures. Each kind but [`RowKind::Profile`] belongs to one [`Mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum RowKind {
    /// On-CPU samples: `count` samples standing for `total_ns` of CPU time.
    Cpu = 0,
    /// Lock waits: `count` waits, `total_ns` waited, `max_ns` longest; `detail` is the [`LockKind`].
    Lock = 1,
    /// Syscall statistics: `count` calls, `errors`, `total_ns`, `histogram`; `detail` is the syscall number.
    Syscall = 2,
    /// Individual slow calls: `count` calls above the threshold, `total_ns`, `max_ns`; `detail` is the syscall number.
    SlowCall = 3,
    /// Samples of a pushed profile (not from an agent): `count` is the sum
    /// of the sample values in the unit of the label set's
    /// [`crate::model::Labels::profile_type`].
    Profile = 4,
}

impl RowKind {
    /// Every kind, in a fixed order.
    pub const ALL: [RowKind; 5] = [RowKind::Cpu, RowKind::Lock, RowKind::Syscall, RowKind::SlowCall, RowKind::Profile];

    /// The agent mode a row of this kind belongs to; `None` for pushed profiles.
    pub fn mode(self) -> Option<Mode> {
        match self {
            RowKind::Cpu => Some(Mode::Cpu),
            RowKind::Lock => Some(Mode::Lock),
            RowKind::Syscall | RowKind::SlowCall => Some(Mode::Syscall),
            RowKind::Profile => None,
        }
    }

    /// Name used in storage and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Cpu => "cpu",
            RowKind::Lock => "lock",
            RowKind::Syscall => "syscall",
            RowKind::SlowCall => "slow_call",
            RowKind::Profile => "profile",
        }
    }

    /// Decodes the `repr(u8)` value used in storage.
    pub fn from_u8(v: u8) -> Option<RowKind> {
        RowKind::ALL.into_iter().find(|k| *k as u8 == v)
    }
}

/// Flush policy and windowing of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardConfig {
    /// Width of an aggregation window, ns. Records are folded into the
    /// window their timestamp falls in.
    pub window_ns: u64,
    /// Flush once this many distinct rows are buffered.
    pub max_rows: usize,
    /// Flush once the oldest unflushed contribution is this old, ns.
    pub max_age_ns: u64,
    /// Frames kept per stack: longer stacks keep their leaf-most frames and
    /// end in a marker frame (see [`truncated_marker`]).
    pub max_stack_frames: usize,
}

/// Default of [`ShardConfig::max_stack_frames`]: far above real call depths,
/// low enough that a hostile stack cannot make stored data unusable.
pub const DEFAULT_MAX_STACK_FRAMES: usize = 1024;

impl Default for ShardConfig {
    fn default() -> Self {
        ShardConfig {
            window_ns: 10_000_000_000,
            max_rows: 50_000,
            max_age_ns: 200_000_000,
            max_stack_frames: DEFAULT_MAX_STACK_FRAMES,
        }
    }
}

/// A batch that refers to targets or stacks it does not carry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    /// A record's target index is outside [`crate::model::Batch::targets`].
    #[error("{table} record {index} refers to target {target}, but the batch has {targets} targets")]
    BadTarget {
        /// Which record table.
        table: &'static str,
        /// Position of the record.
        index: usize,
        /// The bad index.
        target: u32,
        /// Number of targets.
        targets: usize,
    },
    /// A stack's hash is not the hash of its frames ([`Stack::compute_hash`]).
    #[error("stack {index} claims hash {claimed} but its frames hash to {computed}")]
    StackHash {
        /// Position of the stack.
        index: usize,
        /// The hash the batch carries.
        claimed: StackHash,
        /// The hash of its frames.
        computed: StackHash,
    },
    /// A stack could not be read out of the batch.
    #[error("stack {index} cannot be read")]
    BadStackData {
        /// Position of the stack.
        index: usize,
    },
    /// A record's stack index is outside [`crate::model::Batch::stacks`].
    #[error("{table} record {index} refers to stack {stack}, but the batch has {stacks} stacks")]
    BadStack {
        /// Which record table.
        table: &'static str,
        /// Position of the record.
        index: usize,
        /// The bad index.
        stack: u32,
        /// Number of stacks.
        stacks: usize,
    },
}

/// Index of a label set inside one [`Flush`].
pub type LabelsId = u32;

/// Aggregation key of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    /// Start of the window, Unix seconds.
    pub window_start_s: u64,
    /// What the row measures.
    pub kind: RowKind,
    /// Index into [`Flush::labels`].
    pub labels: LabelsId,
    /// The stack, or [`StackHash::NONE`] for syscall statistics.
    pub stack: StackHash,
    /// Syscall number or lock kind; 0 for CPU rows.
    pub detail: u32,
}

/// Aggregated values of a row.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RowValue {
    /// Samples, waits or calls.
    pub count: u64,
    /// CPU time, wait time or syscall time, ns.
    pub total_ns: u64,
    /// Calls that failed (syscall rows).
    pub errors: u64,
    /// Longest single observation, ns (lock and slow-call rows).
    pub max_ns: u64,
    /// Log2 latency histogram (syscall rows; empty otherwise).
    pub histogram: Vec<u64>,
    /// Syscall name or lock kind name; empty for CPU rows.
    pub name: String,
}

impl RowValue {
    fn merge(&mut self, count: u64, total_ns: u64, errors: u64, max_ns: u64, hist: Option<&[u64]>) {
        self.count = self.count.saturating_add(count);
        self.total_ns = self.total_ns.saturating_add(total_ns);
        self.errors = self.errors.saturating_add(errors);
        self.max_ns = self.max_ns.max(max_ns);
        if let Some(h) = hist {
            if self.histogram.is_empty() {
                self.histogram = vec![0; LATENCY_BUCKETS];
            }
            for (acc, v) in self.histogram.iter_mut().zip(h) {
                *acc = acc.saturating_add(*v);
            }
        }
    }
}

/// A batch of rows ready to be written, and the frames to acknowledge once it is.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flush {
    /// Label sets referenced by [`Flush::rows`].
    pub labels: Vec<Labels>,
    /// Rows, sorted by key.
    pub rows: Vec<(RowKey, RowValue)>,
    /// Stacks first seen by this shard since it last forgot what it had written.
    pub stacks: Vec<Stack>,
    /// Every frame that contributed to the rows.
    pub frames: Vec<FrameId>,
    /// Observations folded into the rows (see [`crate::model::Batch::sample_count`]).
    pub samples: u64,
}

/// The aggregation state of one shard.
#[derive(Debug)]
pub struct Shard {
    config: ShardConfig,
    labels: Vec<Labels>,
    label_ids: HashMap<Labels, LabelsId>,
    rows: HashMap<RowKey, RowValue>,
    new_stacks: Vec<Stack>,
    known_stacks: HashSet<StackHash>,
    frames: Vec<FrameId>,
    samples: u64,
    oldest_ns: Option<u64>,
    approx_bytes: usize,
    stacks_truncated: u64,
    stack_frames_cut: u64,
}

/// How many stack hashes a shard remembers as already handed to the writer
/// before it forgets them all (and hands them again, harmlessly: the stores
/// keep one copy per hash).
const KNOWN_STACKS_LIMIT: usize = 1 << 20;
/// Memory cost of a row besides its name and histogram, for buffer accounting.
const ROW_COST: usize = 160;
impl Shard {
    /// An empty shard.
    pub fn new(config: ShardConfig) -> Shard {
        Shard {
            config,
            labels: Vec::new(),
            label_ids: HashMap::new(),
            rows: HashMap::new(),
            new_stacks: Vec::new(),
            known_stacks: HashSet::new(),
            frames: Vec::new(),
            samples: 0,
            oldest_ns: None,
            approx_bytes: 0,
            stacks_truncated: 0,
            stack_frames_cut: 0,
        }
    }

    /// Checks that every index in `batch` is in range, before anything is folded.
    pub fn check(batch: &ArchivedBatch) -> Result<(), BatchError> {
        let targets = batch.targets.len();
        let stacks = batch.stacks.len();
        let target_ok = |table, index, t: u32| {
            if (t as usize) < targets {
                Ok(())
            } else {
                Err(BatchError::BadTarget { table, index, target: t, targets })
            }
        };
        let stack_ok = |table, index, s: u32| {
            if (s as usize) < stacks { Ok(()) } else { Err(BatchError::BadStack { table, index, stack: s, stacks }) }
        };
        for (i, r) in batch.cpu.iter().enumerate() {
            target_ok("cpu", i, r.target.to_native())?;
            stack_ok("cpu", i, r.stack.to_native())?;
        }
        for (i, r) in batch.locks.iter().enumerate() {
            target_ok("lock", i, r.target.to_native())?;
            stack_ok("lock", i, r.stack.to_native())?;
        }
        for (i, r) in batch.syscalls.iter().enumerate() {
            target_ok("syscall", i, r.target.to_native())?;
        }
        for (i, r) in batch.slow_calls.iter().enumerate() {
            target_ok("slow_call", i, r.target.to_native())?;
            stack_ok("slow_call", i, r.stack.to_native())?;
        }
        Ok(())
    }

    /// Folds one validated batch into the shard. Nothing is folded if the
    /// batch fails [`Shard::check`].
    pub fn ingest(&mut self, now_ns: u64, frame: FrameId, batch: &ArchivedBatch) -> Result<(), BatchError> {
        Shard::check(batch)?;
        let intake = intake::new_stacks(batch, &self.known_stacks, self.config.max_stack_frames)?;
        let node = batch.node.as_str();
        let target_ids: Vec<LabelsId> = batch
            .targets
            .iter()
            .map(|t| {
                let target = Target {
                    pid: t.pid.to_native(),
                    process: t.process.as_str().to_owned(),
                    namespace: t.namespace.as_str().to_owned(),
                    pod: t.pod.as_str().to_owned(),
                    container: t.container.as_str().to_owned(),
                };
                self.intern(Labels::from_target(node, &target))
            })
            .collect();
        let stack_hash = |i: u32| StackHash(batch.stacks[i as usize].hash.0.to_native());
        self.stacks_truncated += intake.truncated;
        self.stack_frames_cut += intake.frames_cut;
        for stack in intake.stacks {
            self.known_stacks.insert(stack.hash);
            self.approx_bytes += stack_cost(&stack);
            self.new_stacks.push(stack);
        }
        for r in batch.cpu.iter() {
            let key = self.key(
                r.time_ns.to_native(),
                RowKind::Cpu,
                target_ids[r.target.to_native() as usize],
                stack_hash(r.stack.to_native()),
                0,
            );
            let count = u64::from(r.count.to_native());
            self.fold(key, "", count, count.saturating_mul(r.period_ns.to_native()), 0, 0, None);
        }
        for r in batch.locks.iter() {
            let kind = r.kind.to_native();
            let key = self.key(
                r.time_ns.to_native(),
                RowKind::Lock,
                target_ids[r.target.to_native() as usize],
                stack_hash(r.stack.to_native()),
                kind as u32,
            );
            self.fold(
                key,
                kind.as_str(),
                r.count.to_native(),
                r.wait_ns.to_native(),
                0,
                r.max_wait_ns.to_native(),
                None,
            );
        }
        for r in batch.syscalls.iter() {
            let key = self.key(
                r.time_ns.to_native(),
                RowKind::Syscall,
                target_ids[r.target.to_native() as usize],
                StackHash::NONE,
                r.nr.to_native(),
            );
            let hist: [u64; LATENCY_BUCKETS] = std::array::from_fn(|i| r.histogram[i].to_native());
            self.fold(
                key,
                r.name.as_str(),
                r.count.to_native(),
                r.total_ns.to_native(),
                r.errors.to_native(),
                0,
                Some(&hist),
            );
        }
        for r in batch.slow_calls.iter() {
            let key = self.key(
                r.time_ns.to_native(),
                RowKind::SlowCall,
                target_ids[r.target.to_native() as usize],
                stack_hash(r.stack.to_native()),
                r.nr.to_native(),
            );
            let d = r.duration_ns.to_native();
            self.fold(key, r.name.as_str(), 1, d, u64::from(r.ret.to_native() < 0), d, None);
        }
        let samples = batch.sample_count();
        self.samples = self.samples.saturating_add(samples);
        self.frames.push(frame);
        self.approx_bytes += std::mem::size_of::<FrameId>();
        self.oldest_ns.get_or_insert(now_ns);
        Ok(())
    }

    fn intern(&mut self, labels: Labels) -> LabelsId {
        if let Some(id) = self.label_ids.get(&labels) {
            return *id;
        }
        let id = self.labels.len() as LabelsId;
        // Held twice: in the list and as the lookup key.
        self.approx_bytes += 2 * labels_cost(&labels);
        self.labels.push(labels.clone());
        self.label_ids.insert(labels, id);
        id
    }

    fn key(&self, time_ns: u64, kind: RowKind, labels: LabelsId, stack: StackHash, detail: u32) -> RowKey {
        let window = self.config.window_ns.max(1);
        RowKey { window_start_s: time_ns / window * window / 1_000_000_000, kind, labels, stack, detail }
    }

    #[expect(clippy::too_many_arguments, reason = "one call per record kind; a struct would only rename the fields")]
    fn fold(
        &mut self,
        key: RowKey,
        name: &str,
        count: u64,
        total_ns: u64,
        errors: u64,
        max_ns: u64,
        hist: Option<&[u64]>,
    ) {
        let value = self.rows.entry(key).or_insert_with(|| {
            self.approx_bytes += ROW_COST + name.len();
            RowValue { name: name.to_owned(), ..RowValue::default() }
        });
        if hist.is_some() && value.histogram.is_empty() {
            self.approx_bytes += LATENCY_BUCKETS * 8;
        }
        value.merge(count, total_ns, errors, max_ns, hist);
    }

    /// Rows buffered.
    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    /// Approximate memory held by buffered rows, labels and stacks.
    pub fn approx_bytes(&self) -> usize {
        self.approx_bytes
    }

    /// Stacks cut to [`ShardConfig::max_stack_frames`] so far, and the
    /// frames cut from them.
    pub fn truncations(&self) -> (u64, u64) {
        (self.stacks_truncated, self.stack_frames_cut)
    }

    /// Frames folded in since the last flush.
    pub fn pending_frames(&self) -> usize {
        self.frames.len()
    }

    /// When the next flush is due by age, if anything is buffered.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.oldest_ns.map(|t| t.saturating_add(self.config.max_age_ns))
    }

    /// A flush, if one is due at `now_ns` by size or by age.
    pub fn poll_flush(&mut self, now_ns: u64) -> Option<Flush> {
        let due_by_size = self.rows.len() >= self.config.max_rows;
        let due_by_age = self.poll_timeout().is_some_and(|t| now_ns >= t);
        if due_by_size || due_by_age { self.take() } else { None }
    }

    /// Everything buffered, now (shutdown, or a driver that wants to drain).
    pub fn take(&mut self) -> Option<Flush> {
        if self.frames.is_empty() && self.rows.is_empty() {
            return None;
        }
        let mut rows: Vec<(RowKey, RowValue)> = self.rows.drain().collect();
        rows.sort_unstable_by_key(|a| a.0);
        if self.known_stacks.len() > KNOWN_STACKS_LIMIT {
            self.known_stacks.clear();
        }
        self.label_ids.clear();
        self.oldest_ns = None;
        self.approx_bytes = 0;
        Some(Flush {
            labels: std::mem::take(&mut self.labels),
            rows,
            stacks: std::mem::take(&mut self.new_stacks),
            frames: std::mem::take(&mut self.frames),
            samples: std::mem::take(&mut self.samples),
        })
    }

    /// Forgets that a stack was handed out (the flush carrying it failed for
    /// good), so it is handed out again with the next batch that uses it.
    pub fn forget_stacks(&mut self, stacks: &[StackHash]) {
        for hash in stacks {
            self.known_stacks.remove(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DecodeLimits, FrameBuf, decode, encode_batch};
    use crate::ids::{AgentId, BootId};
    use crate::model::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const SEC: u64 = 1_000_000_000;

    fn fid(seq: u64) -> FrameId {
        FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]), sequence: seq }
    }

    fn stack(name: &str) -> Stack {
        Stack::new(vec![StackFrame { symbol: name.into(), module: "app".into(), ..Default::default() }])
    }

    fn cpu_batch(samples: &[(u64, u32, &str, u32)]) -> Batch {
        // (time_ns, pid, stack symbol, count)
        let mut b = Batch { node: "n1".into(), ..Default::default() };
        for &(t, pid, sym, count) in samples {
            let target = b.targets.iter().position(|x| x.pid == pid).unwrap_or_else(|| {
                b.targets.push(Target { pid, process: format!("p{pid}"), ..Default::default() });
                b.targets.len() - 1
            }) as u32;
            let s = stack(sym);
            let si = b.stacks.iter().position(|x| x.hash == s.hash).unwrap_or_else(|| {
                b.stacks.push(s);
                b.stacks.len() - 1
            }) as u32;
            b.cpu.push(CpuSample { time_ns: t, target, stack: si, count, period_ns: 10_000_000 });
        }
        b
    }

    fn framed(b: &Batch, seq: u64) -> FrameBuf {
        encode_batch(b, fid(seq), 0, &DecodeLimits::default()).expect("encode")
    }

    fn ingest(shard: &mut Shard, now: u64, b: &Batch, seq: u64) {
        let buf = framed(b, seq);
        let view = decode(&buf, &DecodeLimits::default()).expect("decode");
        shard.ingest(now, fid(seq), view.batch).expect("ingest");
    }

    fn config(max_rows: usize, max_age_s: u64) -> ShardConfig {
        ShardConfig { window_ns: 10 * SEC, max_rows, max_age_ns: max_age_s * SEC, max_stack_frames: 1024 }
    }

    #[test]
    fn a_stack_whose_hash_is_not_its_frames_hash_is_rejected_before_folding() {
        let mut shard = Shard::new(config(100, 5));
        let mut b = cpu_batch(&[(100 * SEC, 1, "f", 1)]);
        b.stacks[0].hash = stack("g").hash;
        let buf = framed(&b, 1);
        let view = decode(&buf, &DecodeLimits::default()).expect("decode");
        let err = shard.ingest(0, fid(1), view.batch).expect_err("a lying hash");
        assert!(matches!(err, BatchError::StackHash { index: 0, .. }), "{err}");
        assert_eq!(shard.row_count(), 0);
        assert!(shard.take().is_none(), "nothing folded");
        // The honest stack is still taken afterwards.
        ingest(&mut shard, 0, &cpu_batch(&[(100 * SEC, 1, "g", 1)]), 2);
        assert_eq!(shard.take().expect("flush").stacks.len(), 1);
    }

    #[test]
    fn very_deep_stacks_are_cut_and_marked() {
        let mut shard = Shard::new(ShardConfig { max_stack_frames: 100, ..config(100, 5) });
        let deep = Stack::new(
            (0..80_000)
                .map(|i| StackFrame { symbol: format!("f{i}"), module: "app".into(), ..Default::default() })
                .collect(),
        );
        let b = Batch {
            node: "n1".into(),
            targets: vec![Target { pid: 1, ..Default::default() }],
            stacks: vec![deep.clone()],
            cpu: vec![CpuSample { time_ns: 100 * SEC, target: 0, stack: 0, count: 1, period_ns: 1 }],
            ..Default::default()
        };
        ingest(&mut shard, 0, &b, 1);
        let flush = shard.take().expect("flush");
        let kept = &flush.stacks[0];
        assert_eq!(kept.hash, deep.hash, "the stack keeps the identity the agent gave it");
        assert_eq!(kept.frames.len(), 100);
        assert_eq!(kept.frames[..99], deep.frames[..99], "leaf-most frames kept");
        assert_eq!(kept.frames[99], truncated_marker(80_000 - 99));
        assert_eq!(shard.truncations(), (1, 80_000 - 99));
        assert_eq!(flush.rows[0].0.stack, deep.hash);
    }

    #[test]
    fn the_size_estimate_counts_string_lengths() {
        let short = cpu_batch(&[(100 * SEC, 1, "f", 1)]);
        let mut long = cpu_batch(&[(100 * SEC, 1, &"f".repeat(50_000), 1)]);
        long.targets[0].process = "p".repeat(30_000);
        long.node = "n".repeat(10_000);
        let mut a = Shard::new(config(100, 5));
        ingest(&mut a, 0, &short, 1);
        let mut b = Shard::new(config(100, 5));
        ingest(&mut b, 0, &long, 1);
        // The long strings are held once in the stack and twice in the label set.
        assert!(b.approx_bytes() >= 50_000 + 2 * 40_000, "{} vs {}", b.approx_bytes(), a.approx_bytes());
        assert!(a.approx_bytes() < 1_000);
    }

    #[test]
    fn forgotten_stacks_are_handed_out_again() {
        let mut shard = Shard::new(config(100, 5));
        let b = cpu_batch(&[(100 * SEC, 1, "f", 1)]);
        ingest(&mut shard, 0, &b, 1);
        let first = shard.take().expect("flush");
        assert_eq!(first.stacks.len(), 1);
        ingest(&mut shard, 0, &b, 2);
        assert!(shard.take().expect("flush").stacks.is_empty(), "handed out once");
        // The flush carrying it was given up: it must travel again.
        shard.forget_stacks(&[first.stacks[0].hash]);
        ingest(&mut shard, 0, &b, 3);
        assert_eq!(shard.take().expect("flush").stacks, first.stacks);
    }

    #[test]
    fn same_window_labels_and_stack_fold_into_one_row() {
        let mut shard = Shard::new(config(100, 5));
        ingest(&mut shard, 0, &cpu_batch(&[(100 * SEC, 1, "f", 2), (101 * SEC, 1, "f", 3)]), 1);
        ingest(&mut shard, 0, &cpu_batch(&[(109 * SEC, 1, "f", 5), (110 * SEC, 1, "f", 7)]), 2);
        let flush = shard.take().expect("flush");
        assert_eq!(flush.rows.len(), 2, "two windows");
        let (k0, v0) = &flush.rows[0];
        assert_eq!(k0.window_start_s, 100);
        assert_eq!(v0.count, 10);
        assert_eq!(v0.total_ns, 10 * 10_000_000);
        assert_eq!(flush.rows[1].0.window_start_s, 110);
        assert_eq!(flush.rows[1].1.count, 7);
        assert_eq!(flush.frames, vec![fid(1), fid(2)]);
        assert_eq!(flush.samples, 17);
        assert_eq!(flush.stacks.len(), 1, "a stack is handed out once");
        assert_eq!(flush.labels[k0.labels as usize].pid, 1);
        assert_eq!(flush.labels[k0.labels as usize].node, "n1");
    }

    #[test]
    fn flushes_by_age_with_virtual_time() {
        let mut shard = Shard::new(config(1000, 5));
        assert_eq!(shard.poll_timeout(), None);
        assert!(shard.poll_flush(0).is_none());
        ingest(&mut shard, 10 * SEC, &cpu_batch(&[(0, 1, "f", 1)]), 1);
        ingest(&mut shard, 12 * SEC, &cpu_batch(&[(0, 2, "g", 1)]), 2);
        assert_eq!(shard.poll_timeout(), Some(15 * SEC), "age counts from the oldest contribution");
        assert!(shard.poll_flush(15 * SEC - 1).is_none());
        let flush = shard.poll_flush(15 * SEC).expect("due by age");
        assert_eq!(flush.frames, vec![fid(1), fid(2)]);
        assert_eq!(flush.rows.len(), 2);
        assert_eq!(shard.poll_timeout(), None);
        assert!(shard.poll_flush(100 * SEC).is_none(), "nothing left");
    }

    #[test]
    fn flushes_by_size_before_age() {
        let mut shard = Shard::new(config(3, 3600));
        ingest(&mut shard, 0, &cpu_batch(&[(0, 1, "a", 1), (0, 1, "b", 1)]), 1);
        assert!(shard.poll_flush(1).is_none());
        ingest(&mut shard, 1, &cpu_batch(&[(0, 1, "c", 1)]), 2);
        let flush = shard.poll_flush(2).expect("due by size");
        assert_eq!(flush.rows.len(), 3);
        assert_eq!(flush.frames, vec![fid(1), fid(2)]);
        // Stacks already handed out are not handed out again.
        ingest(&mut shard, 3, &cpu_batch(&[(0, 1, "a", 1)]), 3);
        let again = shard.take().expect("flush");
        assert!(again.stacks.is_empty());
        assert_eq!(again.frames, vec![fid(3)]);
    }

    #[test]
    fn bad_references_are_rejected_before_folding() {
        let mut shard = Shard::new(config(100, 5));
        let mut b = cpu_batch(&[(0, 1, "f", 1)]);
        b.cpu.push(CpuSample { time_ns: 0, target: 0, stack: 9, count: 1, period_ns: 1 });
        let buf = framed(&b, 1);
        let view = decode(&buf, &DecodeLimits::default()).expect("decode");
        let err = shard.ingest(0, fid(1), view.batch).unwrap_err();
        assert_eq!(err, BatchError::BadStack { table: "cpu", index: 1, stack: 9, stacks: 1 });
        assert_eq!(shard.row_count(), 0);
        assert!(shard.take().is_none(), "nothing was folded and no frame is owed an ack");
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        // Found by the decoder fuzz target: counts near u64::MAX from a
        // hostile agent must not panic (debug) or wrap (release).
        let mut shard = Shard::new(config(100, 5));
        let mut b = cpu_batch(&[(0, 1, "f", 1)]);
        b.locks.push(LockWait {
            time_ns: 0,
            target: 0,
            stack: 0,
            kind: LockKind::Futex,
            count: u64::MAX,
            wait_ns: u64::MAX,
            max_wait_ns: 1,
        });
        b.locks.push(LockWait {
            time_ns: 0,
            target: 0,
            stack: 0,
            kind: LockKind::Futex,
            count: u64::MAX,
            wait_ns: u64::MAX,
            max_wait_ns: 1,
        });
        ingest(&mut shard, 0, &b, 1);
        let flush = shard.take().expect("flush");
        assert_eq!(flush.samples, u64::MAX);
        let lock = flush.rows.iter().find(|(k, _)| k.kind == RowKind::Lock).expect("lock row");
        assert_eq!((lock.1.count, lock.1.total_ns), (u64::MAX, u64::MAX));
        assert_eq!(b.sample_count(), u64::MAX);
    }

    #[test]
    fn syscall_rows_merge_histograms_and_errors() {
        let mut shard = Shard::new(config(100, 5));
        let mut b = Batch {
            node: "n".into(),
            targets: vec![Target { pid: 7, process: "dd".into(), ..Default::default() }],
            ..Default::default()
        };
        let mut h = [0u64; LATENCY_BUCKETS];
        h[3] = 4;
        for _ in 0..2 {
            b.syscalls.push(SyscallStat {
                time_ns: 5,
                target: 0,
                nr: 0,
                name: "read".into(),
                count: 4,
                errors: 1,
                total_ns: 40,
                histogram: h,
            });
        }
        ingest(&mut shard, 0, &b, 1);
        let flush = shard.take().expect("flush");
        let (k, v) = &flush.rows[0];
        assert_eq!((k.kind, k.detail, k.stack), (RowKind::Syscall, 0, StackHash::NONE));
        assert_eq!((v.count, v.errors, v.total_ns), (8, 2, 80));
        assert_eq!(v.histogram[3], 8);
        assert_eq!(v.name, "read");
    }

    // Model-based property test: whatever the batches and flush points, the
    // rows handed out sum to what a plain map of (window, pid, stack) says.
    proptest! {
        #[test]
        fn flushed_rows_match_a_simple_model(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u64..40, 1u32..4, 0usize..3, 1u32..5), 1..6), 1..8),
            flush_after in proptest::collection::vec(any::<bool>(), 8),
            max_rows in 1usize..6,
        ) {
            let syms = ["a", "b", "c"];
            let mut shard = Shard::new(config(max_rows, 1000));
            let mut model: BTreeMap<(u64, u32, String), u64> = BTreeMap::new();
            let mut got: BTreeMap<(u64, u32, String), u64> = BTreeMap::new();
            let mut acked = Vec::new();
            let mut collect = |f: Flush, got: &mut BTreeMap<(u64, u32, String), u64>| {
                let names: HashMap<StackHash, String> =
                    [stack("a"), stack("b"), stack("c")].into_iter().map(|s| (s.hash, s.frames[0].symbol.clone())).collect();
                for (k, v) in f.rows {
                    let pid = f.labels[k.labels as usize].pid;
                    *got.entry((k.window_start_s, pid, names[&k.stack].clone())).or_default() += v.count;
                }
                acked.extend(f.frames);
            };
            for (seq, recs) in batches.iter().enumerate() {
                let recs: Vec<(u64, u32, &str, u32)> = recs.iter().map(|&(t, pid, s, c)| (t * SEC, pid, syms[s], c)).collect();
                for &(t, pid, s, c) in &recs {
                    *model.entry((t / (10 * SEC) * 10, pid, s.to_owned())).or_default() += u64::from(c);
                }
                ingest(&mut shard, seq as u64, &cpu_batch(&recs), seq as u64 + 1);
                if let Some(f) = shard.poll_flush(seq as u64) { collect(f, &mut got); }
                if flush_after[seq] && let Some(f) = shard.take() { collect(f, &mut got); }
            }
            if let Some(f) = shard.take() { collect(f, &mut got); }
            prop_assert_eq!(got, model);
            let want: Vec<FrameId> = (1..=batches.len() as u64).map(fid).collect();
            prop_assert_eq!(acked, want, "every frame reported exactly once, in order");
        }
    }
}
