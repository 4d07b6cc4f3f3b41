//! Records → [`Batch`]: the tables of one frame.
//!
//! Targets and stacks are stored once per batch and referenced by index;
//! CPU samples of the same (target, stack, period) are merged into one row
//! with a count, as are lock waits of the same (target, stack, kind). A
//! batch is due when it holds `max_records` rows or its first row is
//! `max_age` old. [`Batcher::flush`] lends the batch to the encoder and
//! then clears it, keeping every table's allocation for the next one; in a
//! steady state adding a record allocates only when it brings a target or
//! stack new to this batch (which is cloned in, once).

mod stacks;

use std::collections::HashMap;

use aperture_core::model::{Batch, CpuSample, LockKind, LockWait, SlowCall, Stack, StackHash, SyscallStat, Target};

pub use stacks::{StackCache, StackCacheStats, Symbolize};

/// What made a batch due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// It reached `batch.max_records`.
    Size,
    /// Its first record reached `batch.max_age`.
    Age,
    /// The agent is shutting down.
    Shutdown,
}

impl FlushReason {
    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Size => "size",
            FlushReason::Age => "age",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

/// A lock wait aggregate to add.
#[derive(Clone, Copy, Debug)]
pub struct LockRecord {
    /// Unix time of the end of the last wait, ns.
    pub time_ns: u64,
    /// Lock kind.
    pub kind: LockKind,
    /// Number of waits.
    pub count: u64,
    /// Total wait, ns.
    pub wait_ns: u64,
    /// Longest wait, ns.
    pub max_wait_ns: u64,
}

/// Approximate bytes of distinct stacks after which a batch is due (by
/// size) whatever its row count. On a busy node most CPU samples bring a
/// stack new to the batch (~4 KiB each with names), so rows alone let a
/// batch — and the frame it is encoded into — reach tens of MiB of agent
/// memory within `batch.max_age`.
pub const MAX_STACK_BYTES: usize = 2 << 20;

/// Builds batches.
#[derive(Debug)]
pub struct Batcher {
    batch: Batch,
    max_records: usize,
    max_stack_bytes: usize,
    stack_bytes: usize,
    max_age_ns: u64,
    first_at_ns: Option<u64>,
    targets: HashMap<u32, u32>,
    stacks: HashMap<StackHash, u32>,
    cpu: HashMap<(u32, u32, u64), u32>,
    locks: HashMap<(u32, u32, LockKind), u32>,
}

impl Batcher {
    /// A batcher for `node`, due at `max_records` rows or `max_age_ns`.
    pub fn new(node: String, max_records: usize, max_age_ns: u64) -> Batcher {
        Batcher {
            batch: Batch { node, ..Batch::default() },
            max_records: max_records.max(1),
            max_stack_bytes: MAX_STACK_BYTES,
            stack_bytes: 0,
            max_age_ns,
            first_at_ns: None,
            targets: HashMap::new(),
            stacks: HashMap::new(),
            cpu: HashMap::new(),
            locks: HashMap::new(),
        }
    }

    /// Makes the batch due once its distinct stacks hold about `bytes`.
    #[must_use]
    pub fn with_max_stack_bytes(mut self, bytes: usize) -> Batcher {
        self.max_stack_bytes = bytes.max(1);
        self
    }

    /// The batch being built.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// Rows so far.
    pub fn record_count(&self) -> usize {
        self.batch.record_count()
    }

    /// Why the batch should be sent now, at monotonic time `now_ns`, if it should.
    pub fn due(&self, now_ns: u64) -> Option<FlushReason> {
        if self.batch.record_count() >= self.max_records || self.stack_bytes >= self.max_stack_bytes {
            return Some(FlushReason::Size);
        }
        let first = self.first_at_ns?;
        (now_ns.saturating_sub(first) >= self.max_age_ns).then_some(FlushReason::Age)
    }

    /// When the current batch becomes due by age (monotonic ns), if it holds anything.
    pub fn deadline(&self) -> Option<u64> {
        self.first_at_ns.map(|f| f.saturating_add(self.max_age_ns))
    }

    /// Lends the batch to `encode` if it holds anything, then starts a new one.
    pub fn flush<R>(&mut self, encode: impl FnOnce(&Batch) -> R) -> Option<R> {
        if self.batch.is_empty() {
            return None;
        }
        let out = encode(&self.batch);
        self.clear();
        Some(out)
    }

    fn clear(&mut self) {
        let b = &mut self.batch;
        b.targets.clear();
        b.stacks.clear();
        b.cpu.clear();
        b.locks.clear();
        b.syscalls.clear();
        b.slow_calls.clear();
        self.first_at_ns = None;
        self.stack_bytes = 0;
        self.targets.clear();
        self.stacks.clear();
        self.cpu.clear();
        self.locks.clear();
    }

    fn touch(&mut self, now_ns: u64) {
        self.first_at_ns.get_or_insert(now_ns);
    }

    fn target_index(&mut self, target: &Target) -> u32 {
        if let Some(&i) = self.targets.get(&target.pid)
            && self.batch.targets.get(i as usize) == Some(target)
        {
            return i;
        }
        // New to this batch, or the pid now names another process (exec).
        let i = self.batch.targets.len() as u32;
        self.batch.targets.push(target.clone());
        self.targets.insert(target.pid, i);
        i
    }

    fn stack_index(&mut self, stack: &Stack) -> u32 {
        if let Some(&i) = self.stacks.get(&stack.hash) {
            return i;
        }
        let i = self.batch.stacks.len() as u32;
        self.stack_bytes += stacks::stack_bytes(stack);
        self.batch.stacks.push(stack.clone());
        self.stacks.insert(stack.hash, i);
        i
    }

    /// Adds one CPU sample taken at `period_ns` (1e9 / frequency in effect).
    pub fn add_cpu(&mut self, now_ns: u64, target: &Target, stack: &Stack, time_ns: u64, period_ns: u64) {
        self.touch(now_ns);
        let t = self.target_index(target);
        let s = self.stack_index(stack);
        match self.cpu.get(&(t, s, period_ns)) {
            Some(&i) => {
                let row = &mut self.batch.cpu[i as usize];
                row.count = row.count.saturating_add(1);
                row.time_ns = row.time_ns.max(time_ns);
            }
            None => {
                self.cpu.insert((t, s, period_ns), self.batch.cpu.len() as u32);
                self.batch.cpu.push(CpuSample { time_ns, target: t, stack: s, count: 1, period_ns });
            }
        }
    }

    /// Adds lock waits aggregated in the kernel.
    pub fn add_lock(&mut self, now_ns: u64, target: &Target, stack: &Stack, r: LockRecord) {
        self.touch(now_ns);
        let t = self.target_index(target);
        let s = self.stack_index(stack);
        match self.locks.get(&(t, s, r.kind)) {
            Some(&i) => {
                let row = &mut self.batch.locks[i as usize];
                row.count += r.count;
                row.wait_ns += r.wait_ns;
                row.max_wait_ns = row.max_wait_ns.max(r.max_wait_ns);
                row.time_ns = row.time_ns.max(r.time_ns);
            }
            None => {
                self.locks.insert((t, s, r.kind), self.batch.locks.len() as u32);
                self.batch.locks.push(LockWait {
                    time_ns: r.time_ns,
                    target: t,
                    stack: s,
                    kind: r.kind,
                    count: r.count,
                    wait_ns: r.wait_ns,
                    max_wait_ns: r.max_wait_ns,
                });
            }
        }
    }

    /// Adds one syscall's statistics (its `target` field is set here).
    pub fn add_syscall(&mut self, now_ns: u64, target: &Target, mut stat: SyscallStat) {
        self.touch(now_ns);
        stat.target = self.target_index(target);
        self.batch.syscalls.push(stat);
    }

    /// Adds one slow call (its `target` and `stack` fields are set here).
    pub fn add_slow_call(&mut self, now_ns: u64, target: &Target, stack: &Stack, mut call: SlowCall) {
        self.touch(now_ns);
        call.target = self.target_index(target);
        call.stack = self.stack_index(stack);
        self.batch.slow_calls.push(call);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::model::{LATENCY_BUCKETS, StackFrame};

    fn target(pid: u32, name: &str) -> Target {
        Target { pid, process: name.into(), ..Target::default() }
    }

    fn stack(symbols: &[&str]) -> Stack {
        Stack::new(symbols.iter().map(|s| StackFrame { symbol: (*s).into(), ..StackFrame::default() }).collect())
    }

    #[test]
    fn dedupes_targets_and_stacks_and_merges_samples() {
        let mut b = Batcher::new("node-a".into(), 100, 10);
        let (burner, other) = (target(10, "burner"), target(11, "other"));
        let (s1, s2) = (stack(&["spin", "main"]), stack(&["wait", "main"]));
        b.add_cpu(0, &burner, &s1, 100, 10_101_010);
        b.add_cpu(1, &burner, &s1, 200, 10_101_010);
        b.add_cpu(2, &burner, &s2, 300, 10_101_010);
        b.add_cpu(3, &other, &s1, 400, 10_101_010);
        b.add_cpu(4, &burner, &s1, 500, 20_408_163); // frequency changed: a new row
        let batch = b.batch();
        assert_eq!(batch.node, "node-a");
        assert_eq!(batch.targets.len(), 2);
        assert_eq!(batch.stacks.len(), 2);
        assert_eq!(batch.cpu.len(), 4);
        assert_eq!(batch.cpu[0], CpuSample { time_ns: 200, target: 0, stack: 0, count: 2, period_ns: 10_101_010 });
        assert_eq!(batch.sample_count(), 5);
    }

    #[test]
    fn exec_under_the_same_pid_is_a_new_target() {
        let mut b = Batcher::new("n".into(), 100, 10);
        let s = stack(&["f"]);
        b.add_cpu(0, &target(10, "sh"), &s, 1, 1);
        b.add_cpu(0, &target(10, "python3"), &s, 2, 1);
        assert_eq!(b.batch().targets.len(), 2);
        assert_eq!(b.batch().cpu[1].target, 1);
    }

    #[test]
    fn due_by_size_and_by_age() {
        let mut b = Batcher::new("n".into(), 3, 1_000);
        assert_eq!(b.due(1_000_000), None, "an empty batch is never due");
        let s = stack(&["f"]);
        b.add_cpu(500, &target(1, "a"), &s, 1, 1);
        assert_eq!(b.deadline(), Some(1_500));
        assert_eq!(b.due(1_499), None);
        assert_eq!(b.due(1_500), Some(FlushReason::Age));
        b.add_cpu(600, &target(2, "b"), &s, 1, 1);
        b.add_cpu(700, &target(3, "c"), &s, 1, 1);
        assert_eq!(b.due(700), Some(FlushReason::Size));
    }

    #[test]
    fn due_by_size_when_distinct_stacks_fill_the_byte_budget() {
        let one = stacks::stack_bytes(&stack(&["f0", "main"]));
        let mut b = Batcher::new("n".into(), 1_000, 1_000_000).with_max_stack_bytes(3 * one);
        let t = target(1, "a");
        b.add_cpu(0, &t, &stack(&["f0", "main"]), 1, 1);
        b.add_cpu(0, &t, &stack(&["f0", "main"]), 1, 1);
        b.add_cpu(0, &t, &stack(&["f1", "main"]), 1, 1);
        assert_eq!(b.due(0), None, "two distinct stacks fit; repeats cost nothing");
        b.add_cpu(0, &t, &stack(&["f2", "main"]), 1, 1);
        assert_eq!(b.due(0), Some(FlushReason::Size));
        assert!(b.flush(|batch| batch.stacks.len()) == Some(3));
        assert_eq!(b.due(0), None, "the byte count restarts with the next batch");
    }

    #[test]
    fn flush_lends_then_clears_keeping_capacity() {
        let mut b = Batcher::new("n".into(), 100, 10);
        assert_eq!(b.flush(|_| ()), None, "nothing to send");
        let s = stack(&["f"]);
        for i in 0..50 {
            b.add_cpu(0, &target(i, "p"), &s, 1, 1);
        }
        let rows = b.flush(|batch| batch.cpu.len());
        assert_eq!(rows, Some(50));
        assert!(b.batch().is_empty() && b.batch().targets.is_empty() && b.batch().stacks.is_empty());
        assert!(b.batch().cpu.capacity() >= 50, "allocation kept");
        assert_eq!(b.deadline(), None);
        // Indices start over in the next batch.
        b.add_cpu(0, &target(7, "p"), &s, 1, 1);
        assert_eq!((b.batch().cpu[0].target, b.batch().cpu[0].stack), (0, 0));
    }

    #[test]
    fn locks_syscalls_and_slow_calls() {
        let mut b = Batcher::new("n".into(), 100, 10);
        let t = target(5, "db");
        let s = stack(&["pthread_mutex_lock", "work"]);
        let r = LockRecord { time_ns: 9, kind: LockKind::Futex, count: 3, wait_ns: 300, max_wait_ns: 200 };
        b.add_lock(0, &t, &s, r);
        b.add_lock(0, &t, &s, LockRecord { count: 1, wait_ns: 500, max_wait_ns: 500, ..r });
        assert_eq!(b.batch().locks.len(), 1);
        assert_eq!(
            (b.batch().locks[0].count, b.batch().locks[0].wait_ns, b.batch().locks[0].max_wait_ns),
            (4, 800, 500)
        );
        let stat = SyscallStat {
            time_ns: 1,
            target: 99,
            nr: 0,
            name: "read".into(),
            count: 10,
            errors: 1,
            total_ns: 1000,
            histogram: [0; LATENCY_BUCKETS],
        };
        b.add_syscall(0, &t, stat);
        assert_eq!(b.batch().syscalls[0].target, 0);
        let call = SlowCall {
            time_ns: 1,
            target: 99,
            tid: 6,
            stack: 99,
            nr: 7,
            name: "poll".into(),
            duration_ns: 20_000_000,
            ret: 0,
        };
        b.add_slow_call(0, &t, &s, call);
        assert_eq!((b.batch().slow_calls[0].target, b.batch().slow_calls[0].stack), (0, 0));
        assert_eq!(b.batch().targets.len(), 1);
    }
}
