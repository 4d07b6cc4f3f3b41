//! From perf-buffer records to frames, on one thread: records in, frames out.
//!
//! [`Pipeline`] takes the reader's [`RecordBatch`]es and the drained
//! in-kernel aggregates, attributes each record to its process (skipping
//! processes the filter does not select), symbolizes each unique stack once,
//! adds rows to the [`Batcher`] and encodes due batches into frames for a
//! [`FrameSink`]. It owns no thread, probe or socket, so it is tested with
//! hand-made records.

use std::borrow::Cow;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, encode_batch};
use aperture_core::model::{LATENCY_BUCKETS, Mode, SlowCall, SyscallStat};
use aperture_probes::abi::{COMM_LEN, EventKind};
use aperture_probes::{LockStats, RecordBatch, SyscallStats, syscall_name};

use crate::attribution::Attributor;
use crate::batcher::{Batcher, FlushReason, LockRecord, StackCache, Symbolize};
use crate::clock::{BootClock, unix_ns};
use crate::identity::Identity;

/// Where finished frames go: the transport client, or a test's recorder.
pub trait FrameSink: Send {
    /// Hands a frame over without blocking. An error means the frame was
    /// refused (and is lost); the message says why.
    fn send(&mut self, frame: FrameBuf) -> Result<(), String>;
}

/// Counters of the pipeline (mirrored into the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Events received, by [`Mode`] order (cpu, lock, syscall).
    pub captured: [u64; 3],
    /// Records the kernel reported lost.
    pub perf_lost: u64,
    /// Records that could not be decoded.
    pub malformed: u64,
    /// Events of unselected processes.
    pub filtered: u64,
    /// Individual lock events not batched (their totals come from the drain).
    pub lock_events_ignored: u64,
    /// Records added, by table (cpu, lock, syscall, slow_call); CPU samples
    /// count one each, before they merge into rows.
    pub rows: [u64; 4],
    /// Batches flushed by size, age, shutdown.
    pub batches: [u64; 3],
    /// Frames built and their bytes.
    pub frames: u64,
    /// Bytes of the frames built.
    pub frame_bytes: u64,
    /// Batches that could not be encoded.
    pub encode_errors: u64,
    /// Frames the sink refused.
    pub sink_errors: u64,
}

/// Records → frames, on the pipeline thread.
pub struct Pipeline {
    attributor: Attributor,
    stacks: StackCache,
    symbolizer: Box<dyn Symbolize>,
    batcher: Batcher,
    clock: BootClock,
    identity: Identity,
    sequence: u64,
    period_ns: u64,
    limits: DecodeLimits,
    stats: PipelineStats,
    symbolizer_swept_ns: u64,
}

/// How often the symbolizer forgets exited processes (it stats each one it
/// remembers, so not every tick; its caches are bounded regardless) and
/// releases the pages of the symbol files it read.
const SYMBOLIZER_SWEEP_NS: u64 = 10_000_000_000;

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("sequence", &self.sequence)
            .field("period_ns", &self.period_ns)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// A pipeline stamping frames with `identity`, sampling at `frequency_hz`.
    pub fn new(
        attributor: Attributor,
        symbolizer: Box<dyn Symbolize>,
        batcher: Batcher,
        identity: Identity,
        frequency_hz: u32,
    ) -> Pipeline {
        Pipeline {
            attributor,
            stacks: StackCache::new(),
            symbolizer,
            batcher,
            clock: BootClock::default(),
            identity,
            sequence: 0,
            period_ns: period_ns(frequency_hz),
            limits: DecodeLimits::default(),
            stats: PipelineStats::default(),
            symbolizer_swept_ns: 0,
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PipelineStats {
        self.stats
    }

    /// The attribution layer (for its counters).
    pub fn attributor(&self) -> &Attributor {
        &self.attributor
    }

    /// The stack cache (for its counters).
    pub fn stack_cache(&self) -> &StackCache {
        &self.stacks
    }

    /// The batcher (for its deadline).
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// Last sequence number used (0 before the first frame).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Records the sampling frequency now in effect (after a budget change).
    pub fn set_frequency(&mut self, frequency_hz: u32) {
        self.period_ns = period_ns(frequency_hz);
    }

    /// Periodic housekeeping: clock offset, forgotten processes.
    pub fn tick(&mut self, now_ns: u64) {
        self.clock.refresh();
        self.attributor.sweep(now_ns);
        if now_ns.saturating_sub(self.symbolizer_swept_ns) >= SYMBOLIZER_SWEEP_NS {
            self.symbolizer_swept_ns = now_ns;
            self.symbolizer.housekeeping();
        }
    }

    /// Adds the events of one reader batch, at monotonic time `now_ns`.
    pub fn handle_records(&mut self, batch: &RecordBatch, now_ns: u64) {
        self.stats.perf_lost += batch.lost;
        self.stats.malformed += batch.malformed;
        for ev in &batch.events {
            let mode = match ev.kind {
                EventKind::Cpu => Mode::Cpu,
                EventKind::LockKernel | EventKind::LockFutex => Mode::Lock,
                EventKind::SlowSyscall => Mode::Syscall,
            };
            self.stats.captured[mode as usize] += 1;
            if mode == Mode::Lock {
                self.stats.lock_events_ignored += 1;
                continue;
            }
            let raw = &ev.raw;
            let comm = comm_of(&raw.comm);
            let resolved = self.attributor.resolve(raw.pid, &comm, now_ns);
            if !resolved.selected {
                self.stats.filtered += 1;
                continue;
            }
            let time_ns = self.clock.to_unix_ns(raw.ts_ns);
            let stack = self.stacks.stack(&mut *self.symbolizer, raw.pid, batch.kernel_stack(ev), batch.user_stack(ev));
            if mode == Mode::Cpu {
                self.batcher.add_cpu(now_ns, &resolved.target, stack, time_ns, self.period_ns);
                self.stats.rows[0] += 1;
            } else {
                let call = SlowCall {
                    time_ns,
                    target: 0,
                    tid: raw.tid,
                    stack: 0,
                    nr: raw.arg,
                    name: syscall_name(raw.arg).unwrap_or_default().to_owned(),
                    duration_ns: raw.duration_ns,
                    ret: raw.ret,
                };
                self.batcher.add_slow_call(now_ns, &resolved.target, stack, call);
                self.stats.rows[3] += 1;
            }
        }
    }

    /// Adds drained syscall statistics.
    pub fn handle_syscall_stats(&mut self, stats: &[SyscallStats], now_ns: u64) {
        let time_ns = unix_ns();
        for s in stats {
            let resolved = self.attributor.resolve(s.pid, &s.comm, now_ns);
            if !resolved.selected {
                self.stats.filtered += 1;
                continue;
            }
            let mut histogram = [0u64; LATENCY_BUCKETS];
            histogram.copy_from_slice(&s.histogram[..LATENCY_BUCKETS]);
            let stat = SyscallStat {
                time_ns,
                target: 0,
                nr: s.nr,
                name: syscall_name(s.nr).unwrap_or_default().to_owned(),
                count: s.count,
                errors: s.errors,
                total_ns: s.total_ns,
                histogram,
            };
            self.batcher.add_syscall(now_ns, &resolved.target, stat);
            self.stats.rows[2] += 1;
        }
    }

    /// Adds drained lock-wait aggregates. Futex waits carry a user stack,
    /// kernel lock waits a kernel stack. A futex wait leaves here with its
    /// class (mutex, rwlock, condition variable, semaphore, join or other
    /// futex), told by the symbolized frames nearest the wait
    /// ([`aperture_probes::lock_class`]).
    pub fn handle_lock_stats(&mut self, stats: &[LockStats], now_ns: u64) {
        let time_ns = unix_ns();
        for l in stats {
            let resolved = self.attributor.resolve(l.pid, &l.comm, now_ns);
            if !resolved.selected {
                self.stats.filtered += 1;
                continue;
            }
            let (kernel, user): (&[u64], &[u64]) = if l.kind.is_kernel() { (&l.stack, &[]) } else { (&[], &l.stack) };
            let stack = self.stacks.stack(&mut *self.symbolizer, l.pid, kernel, user);
            let kind = aperture_probes::lock_class(l.kind, &stack.frames);
            let record = LockRecord { time_ns, kind, count: l.count, wait_ns: l.total_ns, max_wait_ns: l.max_ns };
            self.batcher.add_lock(now_ns, &resolved.target, stack, record);
            self.stats.rows[1] += 1;
        }
    }

    /// Why the batch should be sent now, if it should.
    pub fn due(&self, now_ns: u64) -> Option<FlushReason> {
        self.batcher.due(now_ns)
    }

    /// Encodes the current batch (if any) and hands the frame to `sink`.
    /// Returns the frame's sequence number.
    pub fn flush(&mut self, reason: FlushReason, sink: &mut dyn FrameSink) -> Option<u64> {
        let id =
            FrameId { agent_id: self.identity.agent_id, boot_id: self.identity.boot_id, sequence: self.sequence + 1 };
        let limits = self.limits;
        let encoded = self.batcher.flush(|batch| encode_batch(batch, id, unix_ns(), &limits))?;
        self.stats.batches[reason as usize] += 1;
        let frame = match encoded {
            Ok(frame) => frame,
            Err(e) => {
                self.stats.encode_errors += 1;
                tracing::warn!("dropping a batch that cannot be encoded: {e}; lower batch.max_records");
                return None;
            }
        };
        self.sequence = id.sequence;
        self.stats.frames += 1;
        self.stats.frame_bytes += frame.len() as u64;
        if let Err(e) = sink.send(frame) {
            self.stats.sink_errors += 1;
            tracing::warn!("frame {} was refused by the transport: {e}", id.sequence);
        }
        Some(id.sequence)
    }
}

/// Sampling period in ns for a frequency in Hz.
pub fn period_ns(frequency_hz: u32) -> u64 {
    1_000_000_000 / u64::from(frequency_hz.max(1))
}

/// The comm bytes up to the first NUL; borrowed unless not UTF-8.
fn comm_of(comm: &[u8; COMM_LEN]) -> Cow<'_, str> {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::Selection;
    use aperture_core::frame::decode_unaligned;
    use aperture_core::ids::{AgentId, BootId};
    use aperture_core::model::{LockKind, Stack, StackFrame};
    use aperture_probes::EventRecord;
    use aperture_probes::abi::RawEvent;

    struct NamedFrames;

    impl Symbolize for NamedFrames {
        fn stack(&mut self, _pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
            let k = kernel.iter().map(|a| StackFrame { symbol: format!("k{a}"), kernel: true, ..Default::default() });
            let u = user.iter().map(|a| StackFrame { symbol: format!("u{a}"), ..Default::default() });
            Stack::new(k.chain(u).collect())
        }
    }

    #[derive(Default)]
    struct Recorder(Vec<FrameBuf>);

    impl FrameSink for Recorder {
        fn send(&mut self, frame: FrameBuf) -> Result<(), String> {
            self.0.push(frame);
            Ok(())
        }
    }

    fn pipeline(proc_root: &std::path::Path, selection: Selection) -> Pipeline {
        let identity = Identity { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]) };
        Pipeline::new(
            Attributor::new(proc_root, None, selection),
            Box::new(NamedFrames),
            Batcher::new("node-1".into(), 1000, 10_000_000_000),
            identity,
            99,
        )
    }

    fn push(batch: &mut RecordBatch, kind: EventKind, pid: u32, comm: &str, kernel: &[u64], user: &[u64]) {
        let mut c = [0u8; COMM_LEN];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        let raw = RawEvent {
            ts_ns: BootClock::boot_now_ns(),
            duration_ns: 25_000_000,
            ret: -11,
            pid,
            tid: pid + 1,
            arg: 7,
            kind: kind as u16,
            n_kernel: kernel.len() as u16,
            n_user: user.len() as u16,
            comm: c,
            ..RawEvent::default()
        };
        let frames_start = batch.frames.len() as u32;
        batch.frames.extend_from_slice(kernel);
        batch.frames.extend_from_slice(user);
        batch.events.push(EventRecord { raw, kind, frames_start });
    }

    #[test]
    fn records_become_one_frame_with_deduplicated_tables() {
        let proc = tempfile::tempdir().expect("tempdir");
        let mut p = pipeline(proc.path(), Selection::default());
        let mut records = RecordBatch::default();
        for _ in 0..3 {
            push(&mut records, EventKind::Cpu, 100, "burner", &[1], &[10, 11]);
        }
        push(&mut records, EventKind::Cpu, 100, "burner", &[], &[12, 11]);
        push(&mut records, EventKind::SlowSyscall, 200, "sleeper", &[], &[20]);
        push(&mut records, EventKind::LockFutex, 300, "locker", &[], &[30]);
        records.lost = 4;
        p.handle_records(&records, 1);
        p.handle_lock_stats(
            &[LockStats {
                pid: 300,
                comm: "locker".into(),
                kind: LockKind::Futex,
                flags: 0,
                count: 5,
                total_ns: 5_000,
                max_ns: 2_000,
                stack: vec![30, 31],
            }],
            2,
        );
        let mut sink = Recorder::default();
        assert_eq!(p.flush(FlushReason::Age, &mut sink), Some(1));
        assert_eq!(p.flush(FlushReason::Age, &mut sink), None, "nothing left");
        let (header, batch) = decode_unaligned(&sink.0[0], &DecodeLimits::default()).expect("valid frame");
        assert_eq!(header.id, FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([2; 16]), sequence: 1 });
        assert_eq!(batch.node, "node-1");
        let names: Vec<&str> = batch.targets.iter().map(|t| t.process.as_str()).collect();
        assert_eq!(names, ["burner", "sleeper", "locker"]);
        assert_eq!(batch.stacks.len(), 4);
        assert_eq!(batch.cpu.len(), 2);
        assert_eq!(batch.cpu[0].count, 3);
        assert_eq!(batch.cpu[0].period_ns, 10_101_010);
        let leaf: Vec<&str> =
            batch.stacks[batch.cpu[0].stack as usize].frames.iter().map(|f| f.symbol.as_str()).collect();
        assert_eq!(leaf, ["k1", "u10", "u11"]);
        assert!(batch.cpu[0].time_ns.abs_diff(unix_ns()) < 5_000_000_000, "boot time converted to Unix time");
        let slow = &batch.slow_calls[0];
        assert_eq!(
            (slow.tid, slow.nr, slow.name.as_str(), slow.duration_ns, slow.ret),
            (201, 7, "poll", 25_000_000, -11)
        );
        assert_eq!(batch.locks.len(), 1);
        assert_eq!((batch.locks[0].count, batch.locks[0].wait_ns), (5, 5_000));
        let lock_stack: Vec<bool> =
            batch.stacks[batch.locks[0].stack as usize].frames.iter().map(|f| f.kernel).collect();
        assert_eq!(lock_stack, [false, false], "futex waits carry a user stack");
        let s = p.stats();
        assert_eq!(s.captured, [4, 1, 1]);
        assert_eq!((s.perf_lost, s.lock_events_ignored, s.rows), (4, 1, [4, 1, 0, 1]));
        assert_eq!(p.stack_cache().stats().hits, 2);
    }

    /// Names addresses from a table, so a stack can go through glibc.
    struct Table(&'static [(u64, &'static str)]);

    impl Symbolize for Table {
        fn stack(&mut self, _pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
            let name = |a: &u64| self.0.iter().find(|(k, _)| k == a).map_or("?", |(_, n)| n).to_owned();
            let k = kernel.iter().map(|a| StackFrame { symbol: name(a), kernel: true, ..Default::default() });
            let u = user.iter().map(|a| StackFrame { symbol: name(a), ..Default::default() });
            Stack::new(k.chain(u).collect())
        }
    }

    #[test]
    fn futex_waits_are_classified_and_kernel_lock_waits_keep_their_kind() {
        let proc = tempfile::tempdir().expect("tempdir");
        let mut p = pipeline(proc.path(), Selection::default());
        p.symbolizer = Box::new(Table(&[
            (1, "__lll_lock_wait"),
            (2, "pthread_mutex_lock"),
            (3, "__futex_abstimed_wait_common"),
            (4, "pthread_cond_wait"),
            (5, "pool_worker"),
            (6, "___pthread_barrier_wait"),
            (7, "mutex_lock"),
        ]));
        let wait = |kind, stack: &[u64]| LockStats {
            pid: 300,
            comm: "locker".into(),
            kind,
            flags: 0,
            count: 1,
            total_ns: 10,
            max_ns: 10,
            stack: stack.to_vec(),
        };
        p.handle_lock_stats(
            &[
                wait(LockKind::Futex, &[1, 2, 5]),
                wait(LockKind::Futex, &[3, 4, 5]),
                wait(LockKind::Futex, &[3, 6, 5]),
                // A kernel mutex whose stack has a name like a user lock's.
                wait(LockKind::KernelMutex, &[7, 2]),
            ],
            0,
        );
        let kinds: Vec<LockKind> = p.batcher().batch().locks.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, [LockKind::Mutex, LockKind::CondVar, LockKind::Futex, LockKind::KernelMutex]);
    }

    #[test]
    fn unselected_processes_are_counted_not_batched() {
        let proc = tempfile::tempdir().expect("tempdir");
        let filter = aperture_core::config::Filter { processes: vec!["wanted".into()], ..Default::default() };
        let mut p = pipeline(proc.path(), Selection::new(&filter).expect("valid"));
        let mut records = RecordBatch::default();
        push(&mut records, EventKind::Cpu, 1, "other", &[1], &[]);
        push(&mut records, EventKind::Cpu, 2, "wanted", &[1], &[]);
        p.handle_records(&records, 0);
        assert_eq!(p.stats().filtered, 1);
        assert_eq!(p.batcher().batch().targets.len(), 1);
    }

    #[test]
    fn sequences_increase_and_frequency_changes_are_recorded() {
        let proc = tempfile::tempdir().expect("tempdir");
        let mut p = pipeline(proc.path(), Selection::default());
        let mut sink = Recorder::default();
        let mut records = RecordBatch::default();
        push(&mut records, EventKind::Cpu, 1, "a", &[1], &[]);
        p.handle_records(&records, 0);
        p.flush(FlushReason::Size, &mut sink);
        p.set_frequency(49);
        p.handle_records(&records, 0);
        assert_eq!(p.flush(FlushReason::Shutdown, &mut sink), Some(2));
        let (_, batch) = decode_unaligned(&sink.0[1], &DecodeLimits::default()).expect("valid");
        assert_eq!(batch.cpu[0].period_ns, 20_408_163);
        assert_eq!(p.stats().batches, [1, 0, 1]);
    }
}
