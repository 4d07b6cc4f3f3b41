//! The data model: what the agent captures and the aggregator stores.
//!
//! A [`Batch`] is what one agent ships in one frame. It carries tables rather
//! than self-contained events so that repeated strings and stacks travel once:
//! every record names its process by an index into [`Batch::targets`] and its
//! stack by an index into [`Batch::stacks`]. Timestamps are Unix nanoseconds
//! (the agent converts from the kernel's boot clock before batching).
//!
//! All types derive rkyv's `Archive` so a batch can be read in place from the
//! bytes of a frame (see [`crate::frame`]).

use rkyv::{Archive, Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// What a record measures. The aggregator keeps one profile per mode.
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum Mode {
    /// On-CPU time, sampled by the cpu-clock at a known frequency.
    Cpu = 0,
    /// Time spent waiting for a lock (kernel lock or futex).
    Lock = 1,
    /// Time spent in system calls.
    Syscall = 2,
}

impl Mode {
    /// Every mode, in a fixed order.
    pub const ALL: [Mode; 3] = [Mode::Cpu, Mode::Lock, Mode::Syscall];

    /// The name used in config, the query API and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cpu => "cpu",
            Mode::Lock => "lock",
            Mode::Syscall => "syscall",
        }
    }

    /// The inverse of [`Mode::as_str`].
    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Decodes the `repr(u8)` value used in storage.
    pub fn from_u8(v: u8) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| *m as u8 == v)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One frame of a stack, leaf or caller.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
#[rkyv(derive(Debug))]
pub struct StackFrame {
    /// Instruction address as captured (virtual address in the process, or
    /// kernel address). Not part of the stack hash: it varies with ASLR.
    pub address: u64,
    /// Offset of `address` inside `module`'s file, when known. Identifies an
    /// unsymbolized frame stably across restarts.
    pub module_offset: u64,
    /// Function name, demangled; empty when unknown.
    pub symbol: String,
    /// Binary or shared object (file name, no directory); `[kernel]` or a
    /// kernel module name for kernel frames; empty when unknown.
    pub module: String,
    /// Source file when debug info resolved it; empty otherwise.
    pub file: String,
    /// Source line, 0 when unknown.
    pub line: u32,
    /// True for kernel frames.
    pub kernel: bool,
}

impl StackFrame {
    /// The name shown in a flame graph: the symbol, or `module+0xoffset`, or
    /// the raw address.
    pub fn display_name(&self) -> String {
        if !self.symbol.is_empty() {
            self.symbol.clone()
        } else if !self.module.is_empty() {
            format!("{}+{:#x}", self.module, self.module_offset)
        } else {
            format!("{:#x}", self.address)
        }
    }
}

/// A stable 64-bit identity of a stack: the same frames give the same hash on
/// every agent and across restarts. Zero means "no stack".
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[rkyv(derive(Debug, PartialEq, Eq, Hash))]
pub struct StackHash(pub u64);

impl StackHash {
    /// The hash of the empty stack, used for records without a stack.
    pub const NONE: StackHash = StackHash(0);
}

impl std::fmt::Display for StackHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A call stack, leaf first.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Stack {
    /// See [`Stack::compute_hash`]; carried so the aggregator need not rehash.
    pub hash: StackHash,
    /// Frames, leaf (innermost) first.
    pub frames: Vec<StackFrame>,
}

impl Stack {
    /// Builds a stack and computes its hash.
    pub fn new(frames: Vec<StackFrame>) -> Stack {
        let hash = Stack::compute_hash(&frames);
        Stack { hash, frames }
    }

    /// xxh3 over what identifies each frame independently of where the binary
    /// was loaded: kernel flag, module, and the symbol when known, otherwise
    /// the offset in the module, otherwise the address. Never returns
    /// [`StackHash::NONE`] for a non-empty stack.
    pub fn compute_hash(frames: &[StackFrame]) -> StackHash {
        if frames.is_empty() {
            return StackHash::NONE;
        }
        let mut h = Xxh3::new();
        for f in frames {
            h.update(&[u8::from(f.kernel)]);
            h.update(f.module.as_bytes());
            h.update(&[0xff]);
            if !f.symbol.is_empty() {
                h.update(b"s");
                h.update(f.symbol.as_bytes());
            } else if !f.module.is_empty() {
                h.update(b"o");
                h.update(&f.module_offset.to_le_bytes());
            } else {
                h.update(b"a");
                h.update(&f.address.to_le_bytes());
            }
            h.update(&[0xfe]);
        }
        match h.digest() {
            0 => StackHash(1),
            v => StackHash(v),
        }
    }
}

/// Who a record belongs to. Node-level labels live on the [`Batch`].
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[rkyv(derive(Debug))]
pub struct Target {
    /// Process id in the host's pid namespace.
    pub pid: u32,
    /// Process name (`comm`, at most 15 bytes in the kernel).
    pub process: String,
    /// Kubernetes namespace; empty outside Kubernetes.
    pub namespace: String,
    /// Pod name; empty outside Kubernetes.
    pub pod: String,
    /// Container name (or id when the name is unknown); empty if not in a container.
    pub container: String,
}

/// The full label set of a stored row: node + target, and for profiles
/// that did not come from an agent, their service, tags and type.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Labels {
    /// Node (host) name.
    pub node: String,
    /// Kubernetes namespace or empty.
    pub namespace: String,
    /// Pod name or empty.
    pub pod: String,
    /// Container name or empty.
    pub container: String,
    /// Process name.
    pub process: String,
    /// Process id.
    pub pid: u32,
    /// Service (a Pyroscope application name, OpenTelemetry's
    /// `service.name`); empty for the agent's rows.
    pub service: String,
    /// Free-form tags, sorted by key, keys unique; empty for the agent's rows.
    pub tags: Vec<(String, String)>,
    /// [`ProfileType::id`] of a pushed profile; empty for the agent's rows,
    /// whose type is their mode's [`ProfileType::of_mode`].
    pub profile_type: String,
}

impl Labels {
    /// Joins a batch's node with one of its targets.
    pub fn from_target(node: &str, t: &Target) -> Labels {
        Labels {
            node: node.to_owned(),
            namespace: t.namespace.clone(),
            pod: t.pod.clone(),
            container: t.container.clone(),
            process: t.process.clone(),
            pid: t.pid,
            ..Labels::default()
        }
    }
}

/// What a profile measures, in Pyroscope's terms: a name, the type and unit
/// of its sample values, and the type and unit of its sampling period. The
/// agent's three modes are the built-in members ([`ProfileType::of_mode`]);
/// profiles pushed by SDKs keep their own (`memory:alloc_space:bytes:space:bytes`,
/// `goroutines:goroutine:count:goroutine:count`...).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ProfileType {
    /// Profile name (`process_cpu`, `memory`, `mutex`, `cpu`...).
    pub name: String,
    /// What a sample value counts (`cpu`, `alloc_space`, `contentions`...).
    pub sample_type: String,
    /// Its unit (`nanoseconds`, `bytes`, `count`...).
    pub sample_unit: String,
    /// What the sampling period measures.
    pub period_type: String,
    /// Its unit.
    pub period_unit: String,
}

/// Longest profile type id accepted ([`ProfileType::parse_id`]).
pub const MAX_PROFILE_TYPE_ID: usize = 512;

impl ProfileType {
    /// A type from its five parts.
    pub fn new(name: &str, sample_type: &str, sample_unit: &str, period_type: &str, period_unit: &str) -> ProfileType {
        ProfileType {
            name: name.to_owned(),
            sample_type: sample_type.to_owned(),
            sample_unit: sample_unit.to_owned(),
            period_type: period_type.to_owned(),
            period_unit: period_unit.to_owned(),
        }
    }

    /// The built-in type of an agent mode: `cpu:samples:count:cpu:nanoseconds`,
    /// `lock:wait:nanoseconds:lock:count`, `syscall:slow_call:nanoseconds:syscall:count`.
    pub fn of_mode(mode: Mode) -> ProfileType {
        match mode {
            Mode::Cpu => ProfileType::new("cpu", "samples", "count", "cpu", "nanoseconds"),
            Mode::Lock => ProfileType::new("lock", "wait", "nanoseconds", "lock", "count"),
            Mode::Syscall => ProfileType::new("syscall", "slow_call", "nanoseconds", "syscall", "count"),
        }
    }

    /// The mode this type is the built-in type of, if any.
    pub fn mode(&self) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| ProfileType::of_mode(*m) == *self)
    }

    /// `name:sample_type:sample_unit:period_type:period_unit`, Pyroscope's
    /// profile type id; what storage and the API's `type=` use.
    pub fn id(&self) -> String {
        format!("{}:{}:{}:{}:{}", self.name, self.sample_type, self.sample_unit, self.period_type, self.period_unit)
    }

    /// The inverse of [`ProfileType::id`]: five non-empty parts without
    /// control characters, at most [`MAX_PROFILE_TYPE_ID`] bytes.
    pub fn parse_id(id: &str) -> Option<ProfileType> {
        if id.len() > MAX_PROFILE_TYPE_ID || id.chars().any(char::is_control) {
            return None;
        }
        let parts: Vec<&str> = id.split(':').collect();
        match parts.as_slice() {
            [a, b, c, d, e] if parts.iter().all(|p| !p.is_empty()) => Some(ProfileType::new(a, b, c, d, e)),
            _ => None,
        }
    }
}

impl std::fmt::Display for ProfileType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.id())
    }
}

/// Samples pushed to the aggregator by something other than an agent (a
/// Pyroscope SDK, an OpenTelemetry profiler), already resolved to stacks.
/// Not part of the frame format: the aggregator builds it from the request
/// it accepted and folds it like a frame.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProfileBatch {
    /// Stacks referenced by the samples.
    pub stacks: Vec<Stack>,
    /// One series per label set (including its profile type).
    pub series: Vec<ProfileSeries>,
}

/// The samples of one label set in a [`ProfileBatch`].
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ProfileSeries {
    /// Labels, with [`Labels::profile_type`] set.
    pub labels: Labels,
    /// Samples.
    pub samples: Vec<ProfileSample>,
}

/// The value of one stack at one time in a [`ProfileSeries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSample {
    /// Unix time, ns.
    pub time_ns: u64,
    /// Index into [`ProfileBatch::stacks`].
    pub stack: u32,
    /// The value, in the series type's sample unit.
    pub value: u64,
}

impl ProfileBatch {
    /// Number of samples.
    pub fn sample_count(&self) -> u64 {
        self.series.iter().map(|s| s.samples.len() as u64).sum()
    }
}

/// Kind of lock a wait was observed on: its class.
///
/// The discriminants are part of the wire and storage formats and never
/// change; new kinds get new numbers. Futex waits leave the kernel as
/// [`LockKind::Futex`]; the agent then classifies them by the frames nearest
/// the wait (`pthread_mutex_lock`, `pthread_cond_wait`, Rust's
/// `Condvar::wait`...) into mutex, rwlock, condition variable, semaphore or
/// join, and leaves what it does not recognise as `Futex` ("other futex").
/// An aggregator older than kinds 5..=9 refuses a frame holding them as
/// malformed (its validator knows only 0..=4). So classes are sent only to an
/// aggregator that announces it reads them (the `lock_classes` capability of
/// the session's welcome); to any other, the transport sends each class as
/// [`LockKind::Futex`] ([`LockKind::unclassed`],
/// [`crate::frame::downgrade_lock_classes`]), and agents and aggregators can
/// be upgraded in any order (docs/deploy.md, "Upgrading").
#[derive(Archive, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[rkyv(derive(Debug, PartialEq, Eq))]
#[repr(u8)]
pub enum LockKind {
    /// A user-space futex wait of no recognised class ("other futex"), or
    /// of any class from an agent that does not classify.
    Futex = 0,
    /// A kernel spinning lock (spinlock, rwlock spinning).
    KernelSpin = 1,
    /// A kernel sleeping mutex.
    KernelMutex = 2,
    /// A kernel rw-semaphore.
    KernelRwsem = 3,
    /// A kernel lock of another or unknown kind.
    KernelOther = 4,
    /// A user-space mutex (`pthread_mutex_lock`, Rust's `Mutex`, parking_lot's).
    Mutex = 5,
    /// A user-space reader-writer lock (`pthread_rwlock_*`, Rust's `RwLock`).
    RwLock = 6,
    /// A condition variable wait (`pthread_cond_wait`, Rust's `Condvar`): waiting, not contention.
    CondVar = 7,
    /// A semaphore wait (`sem_wait`): waiting, not contention.
    Semaphore = 8,
    /// A thread waiting for another to end (`pthread_join`): waiting, not contention.
    Join = 9,
}

impl LockKind {
    /// Every kind, in a fixed order (by discriminant).
    pub const ALL: [LockKind; 10] = [
        LockKind::Futex,
        LockKind::KernelSpin,
        LockKind::KernelMutex,
        LockKind::KernelRwsem,
        LockKind::KernelOther,
        LockKind::Mutex,
        LockKind::RwLock,
        LockKind::CondVar,
        LockKind::Semaphore,
        LockKind::Join,
    ];

    /// The kinds that are contention for a lock (user mutexes and rwlocks,
    /// every kernel lock), as opposed to a thread waiting for work, a
    /// signal or another thread's end.
    pub const CONTENTION: [LockKind; 6] = [
        LockKind::Mutex,
        LockKind::RwLock,
        LockKind::KernelSpin,
        LockKind::KernelMutex,
        LockKind::KernelRwsem,
        LockKind::KernelOther,
    ];

    /// The name used in the API and storage.
    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::Futex => "futex",
            LockKind::KernelSpin => "kernel_spin",
            LockKind::KernelMutex => "kernel_mutex",
            LockKind::KernelRwsem => "kernel_rwsem",
            LockKind::KernelOther => "kernel_other",
            LockKind::Mutex => "mutex",
            LockKind::RwLock => "rwlock",
            LockKind::CondVar => "condvar",
            LockKind::Semaphore => "semaphore",
            LockKind::Join => "join",
        }
    }

    /// The kind named `name` (as [`LockKind::as_str`] writes it).
    pub fn from_name(name: &str) -> Option<LockKind> {
        LockKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Decodes the `repr(u8)` value.
    pub fn from_u8(v: u8) -> Option<LockKind> {
        LockKind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// Whether the lock lives in the kernel.
    pub fn is_kernel(self) -> bool {
        matches!(self, LockKind::KernelSpin | LockKind::KernelMutex | LockKind::KernelRwsem | LockKind::KernelOther)
    }

    /// Whether a wait of this kind is contention for a lock (see [`LockKind::CONTENTION`]).
    pub fn is_contention(self) -> bool {
        LockKind::CONTENTION.contains(&self)
    }

    /// Whether this is a class of user-space futex wait (kinds 5..=9): a
    /// value only aggregators that announce lock classes can read.
    pub fn is_futex_class(self) -> bool {
        matches!(self, LockKind::Mutex | LockKind::RwLock | LockKind::CondVar | LockKind::Semaphore | LockKind::Join)
    }

    /// The kind as an aggregator that does not read lock classes gets it:
    /// every class becomes [`LockKind::Futex`] (other futex), which is what
    /// an agent that does not classify would have sent; other kinds stay.
    pub fn unclassed(self) -> LockKind {
        if self.is_futex_class() { LockKind::Futex } else { self }
    }
}

impl ArchivedLockKind {
    /// The native value of an archived lock kind.
    pub fn to_native(&self) -> LockKind {
        match self {
            ArchivedLockKind::Futex => LockKind::Futex,
            ArchivedLockKind::KernelSpin => LockKind::KernelSpin,
            ArchivedLockKind::KernelMutex => LockKind::KernelMutex,
            ArchivedLockKind::KernelRwsem => LockKind::KernelRwsem,
            ArchivedLockKind::KernelOther => LockKind::KernelOther,
            ArchivedLockKind::Mutex => LockKind::Mutex,
            ArchivedLockKind::RwLock => LockKind::RwLock,
            ArchivedLockKind::CondVar => LockKind::CondVar,
            ArchivedLockKind::Semaphore => LockKind::Semaphore,
            ArchivedLockKind::Join => LockKind::Join,
        }
    }
}

/// On-CPU samples of one stack in one process.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct CpuSample {
    /// Unix time of the (last) sample, ns.
    pub time_ns: u64,
    /// Index into [`Batch::targets`].
    pub target: u32,
    /// Index into [`Batch::stacks`].
    pub stack: u32,
    /// Number of samples.
    pub count: u32,
    /// Sampling period in effect, ns (1e9 / frequency). `count * period_ns`
    /// is the CPU time the samples stand for, so values stay comparable when
    /// the agent changes its frequency.
    pub period_ns: u64,
}

/// Lock waits of one stack in one process, aggregated.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct LockWait {
    /// Unix time of the end of the (last) wait, ns.
    pub time_ns: u64,
    /// Index into [`Batch::targets`].
    pub target: u32,
    /// Index into [`Batch::stacks`] (the stack at the wait).
    pub stack: u32,
    /// What kind of lock.
    pub kind: LockKind,
    /// Number of waits.
    pub count: u64,
    /// Total time waited, ns.
    pub wait_ns: u64,
    /// Longest single wait, ns.
    pub max_wait_ns: u64,
}

/// Number of buckets in a log2 latency histogram: bucket `i` counts calls
/// whose latency in ns has its highest set bit at position `i` (bucket 0 also
/// holds 0 ns); the last bucket holds everything longer.
pub const LATENCY_BUCKETS: usize = 32;

/// System call statistics of one syscall in one process, aggregated in the kernel.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SyscallStat {
    /// Unix time the statistics were drained, ns.
    pub time_ns: u64,
    /// Index into [`Batch::targets`].
    pub target: u32,
    /// Syscall number on the agent's architecture.
    pub nr: u32,
    /// Syscall name (`read`, `futex`...), resolved by the agent.
    pub name: String,
    /// Number of completed calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Total time in the call, ns.
    pub total_ns: u64,
    /// Log2 latency histogram, see [`LATENCY_BUCKETS`].
    pub histogram: [u64; LATENCY_BUCKETS],
}

/// One system call slower than the configured threshold, with its stack.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SlowCall {
    /// Unix time the call returned, ns.
    pub time_ns: u64,
    /// Index into [`Batch::targets`].
    pub target: u32,
    /// Thread id.
    pub tid: u32,
    /// Index into [`Batch::stacks`] (user stack at the call).
    pub stack: u32,
    /// Syscall number.
    pub nr: u32,
    /// Syscall name.
    pub name: String,
    /// Time in the call, ns.
    pub duration_ns: u64,
    /// Return value (negative errno on failure).
    pub ret: i64,
}

/// What one agent ships in one frame.
#[derive(Archive, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct Batch {
    /// Node name (from `NODE_NAME`, else the host name).
    pub node: String,
    /// Processes referenced by the records below.
    pub targets: Vec<Target>,
    /// Stacks referenced by the records below.
    pub stacks: Vec<Stack>,
    /// On-CPU samples.
    pub cpu: Vec<CpuSample>,
    /// Lock waits.
    pub locks: Vec<LockWait>,
    /// Syscall statistics.
    pub syscalls: Vec<SyscallStat>,
    /// Individual slow system calls.
    pub slow_calls: Vec<SlowCall>,
}

impl Batch {
    /// Number of records of every kind. For CPU samples each record counts
    /// once however many samples it stands for; see [`Batch::sample_count`].
    pub fn record_count(&self) -> usize {
        self.cpu.len() + self.locks.len() + self.syscalls.len() + self.slow_calls.len()
    }

    /// Number of observations the batch stands for: CPU samples, lock waits,
    /// system calls and slow calls.
    pub fn sample_count(&self) -> u64 {
        // Saturating: a batch decoded from the network may carry any counts.
        self.cpu
            .iter()
            .map(|s| u64::from(s.count))
            .chain(self.locks.iter().map(|l| l.count))
            .chain(self.syscalls.iter().map(|s| s.count))
            .fold(self.slow_calls.len() as u64, u64::saturating_add)
    }

    /// Whether there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.record_count() == 0
    }
}

impl ArchivedBatch {
    /// [`Batch::sample_count`] of the archived batch, read in place; saturating,
    /// since a batch from the network may carry any counts.
    pub fn sample_count(&self) -> u64 {
        self.cpu
            .iter()
            .map(|s| u64::from(s.count.to_native()))
            .chain(self.locks.iter().map(|l| l.count.to_native()))
            .chain(self.syscalls.iter().map(|s| s.count.to_native()))
            .fold(self.slow_calls.len() as u64, u64::saturating_add)
    }
}

/// Maps a latency in ns to its log2 histogram bucket.
pub fn latency_bucket(ns: u64) -> usize {
    let bit = 63 - (ns | 1).leading_zeros() as usize;
    bit.min(LATENCY_BUCKETS - 1)
}

/// Lower bound in ns of histogram bucket `i`.
pub fn bucket_lower_ns(i: usize) -> u64 {
    if i == 0 { 0 } else { 1u64 << i }
}

/// Estimates the `q` quantile (0..=1) from a log2 histogram, interpolating
/// linearly inside the bucket. Returns 0 for an empty histogram.
pub fn histogram_quantile(hist: &[u64], q: f64) -> u64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0;
    }
    let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
    let mut seen = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = bucket_lower_ns(i) as f64;
            let hi = if i == 0 { 1.0 } else { (1u64 << (i + 1).min(63)) as f64 };
            let within = (rank - seen as f64) / n as f64;
            return (lo + (hi - lo) * within) as u64;
        }
        seen += n;
    }
    bucket_lower_ns(hist.len().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(sym: &str, module: &str, addr: u64) -> StackFrame {
        StackFrame {
            address: addr,
            module_offset: addr & 0xfff,
            symbol: sym.into(),
            module: module.into(),
            ..Default::default()
        }
    }

    #[test]
    fn stack_hash_ignores_load_address_of_symbolized_frames() {
        let a = Stack::new(vec![frame("leaf", "app", 0x5555_0000_1234), frame("main", "app", 0x5555_0000_2000)]);
        let b = Stack::new(vec![frame("leaf", "app", 0x7777_0000_1234), frame("main", "app", 0x7777_0000_2000)]);
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, StackHash::NONE);
    }

    #[test]
    fn stack_hash_distinguishes_order_kernel_flag_and_offsets() {
        let a = Stack::new(vec![frame("f", "m", 1), frame("g", "m", 2)]);
        let b = Stack::new(vec![frame("g", "m", 2), frame("f", "m", 1)]);
        assert_ne!(a.hash, b.hash);
        let mut k = frame("f", "m", 1);
        k.kernel = true;
        assert_ne!(Stack::new(vec![k]).hash, Stack::new(vec![frame("f", "m", 1)]).hash);
        let u1 = Stack::new(vec![frame("", "lib.so", 0x10)]);
        let u2 = Stack::new(vec![frame("", "lib.so", 0x20)]);
        assert_ne!(u1.hash, u2.hash);
        // Symbol boundaries matter: "ab"+"c" is not "a"+"bc".
        let s1 = Stack::new(vec![frame("ab", "m", 0), frame("c", "m", 0)]);
        let s2 = Stack::new(vec![frame("a", "m", 0), frame("bc", "m", 0)]);
        assert_ne!(s1.hash, s2.hash);
    }

    #[test]
    fn stack_hash_is_a_fixed_function() {
        // Pinned value: changing the hash function changes every stored
        // stack id, which must be a deliberate, versioned decision.
        let s = Stack::new(vec![frame("main", "app", 0)]);
        let again = Stack::compute_hash(&s.frames);
        assert_eq!(s.hash, again);
        assert_eq!(Stack::compute_hash(&[]), StackHash::NONE);
    }

    #[test]
    fn latency_buckets_are_log2() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(1), 0);
        assert_eq!(latency_bucket(2), 1);
        assert_eq!(latency_bucket(3), 1);
        assert_eq!(latency_bucket(1024), 10);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn quantiles_fall_in_the_right_bucket() {
        let mut h = [0u64; LATENCY_BUCKETS];
        h[latency_bucket(1_000)] = 90; // ~1 µs
        h[latency_bucket(20_000_000)] = 10; // ~20 ms
        let p50 = histogram_quantile(&h, 0.5);
        let p99 = histogram_quantile(&h, 0.99);
        assert!((512..2048).contains(&p50), "p50 {p50}");
        assert!((1 << 24..1 << 25).contains(&p99), "p99 {p99}");
        assert_eq!(histogram_quantile(&[0; 4], 0.5), 0);
    }

    #[test]
    fn mode_names_round_trip() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
            assert_eq!(Mode::from_u8(m as u8), Some(m));
        }
        assert_eq!(Mode::parse("gpu"), None);
    }

    #[test]
    fn lock_kinds_keep_their_numbers_and_names() {
        // Wire and storage values: a change here breaks older peers and stored rows.
        let fixed: Vec<(u8, &str)> = LockKind::ALL.iter().map(|k| (*k as u8, k.as_str())).collect();
        assert_eq!(
            fixed,
            [
                (0, "futex"),
                (1, "kernel_spin"),
                (2, "kernel_mutex"),
                (3, "kernel_rwsem"),
                (4, "kernel_other"),
                (5, "mutex"),
                (6, "rwlock"),
                (7, "condvar"),
                (8, "semaphore"),
                (9, "join"),
            ]
        );
        for k in LockKind::ALL {
            assert_eq!(LockKind::from_u8(k as u8), Some(k));
            assert_eq!(LockKind::from_name(k.as_str()), Some(k));
            assert_eq!(k.is_contention(), k.is_kernel() || matches!(k, LockKind::Mutex | LockKind::RwLock), "{k:?}");
        }
        assert_eq!(LockKind::from_u8(10), None);
        assert_eq!(LockKind::from_name("spin"), None);
    }

    #[test]
    fn profile_type_ids_round_trip_and_modes_are_members() {
        for m in Mode::ALL {
            let t = ProfileType::of_mode(m);
            assert_eq!(ProfileType::parse_id(&t.id()), Some(t.clone()));
            assert_eq!(t.mode(), Some(m));
        }
        let alloc = ProfileType::parse_id("memory:alloc_space:bytes:space:bytes").expect("valid");
        assert_eq!(alloc.sample_type, "alloc_space");
        assert_eq!(alloc.mode(), None);
        for bad in ["cpu", "a:b:c:d", "a:b:c:d:e:f", "a::c:d:e", "a:b:c:d:\n"] {
            assert_eq!(ProfileType::parse_id(bad), None, "{bad:?}");
        }
    }
}
