//! Rust mirrors of the layouts in `probes/bpf/aperture.h`.
//!
//! Every struct here is `#[repr(C)]` with the same fields, in the same order,
//! as its C counterpart, and a compile-time size assert: changing one side
//! without the other fails the build. Field documentation lives in the header.

use aya::Pod;

/// `AP_MAX_FRAMES`: deepest stack captured per side (kernel, user).
pub const MAX_FRAMES: usize = 127;
/// `AP_COMM_LEN`: a task's comm including the terminating NUL.
pub const COMM_LEN: usize = 16;
/// `AP_HIST_BUCKETS`: buckets of the log2 latency histogram.
pub const HIST_BUCKETS: usize = 32;

const _: () = assert!(HIST_BUCKETS == aperture_core::model::LATENCY_BUCKETS);

/// `enum ap_event_kind`: what an event record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum EventKind {
    /// `AP_EVENT_CPU`: a cpu-clock sample with both stacks.
    Cpu = 1,
    /// `AP_EVENT_LOCK_KERNEL`: a kernel lock wait above the threshold.
    LockKernel = 2,
    /// `AP_EVENT_LOCK_FUTEX`: a futex wait above the threshold.
    LockFutex = 3,
    /// `AP_EVENT_SLOW_SYSCALL`: a system call above the threshold.
    SlowSyscall = 4,
}

impl EventKind {
    /// Decodes the wire value; `None` for values this build does not know.
    pub fn from_u16(v: u16) -> Option<EventKind> {
        match v {
            1 => Some(EventKind::Cpu),
            2 => Some(EventKind::LockKernel),
            3 => Some(EventKind::LockFutex),
            4 => Some(EventKind::SlowSyscall),
            _ => None,
        }
    }
}

/// `struct ap_event`: header of every perf-buffer record, followed by
/// `n_kernel` then `n_user` u64 addresses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RawEvent {
    /// Boot-clock time of the sample or of the end of the wait/call, ns.
    pub ts_ns: u64,
    /// Wait or call duration, ns.
    pub duration_ns: u64,
    /// Return value (syscall, futex or contention_end).
    pub ret: i64,
    /// Lock or futex address.
    pub addr: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Thread group id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// CPU the record was written on.
    pub cpu: u32,
    /// Syscall number, futex op or lock flags, by kind.
    pub arg: u32,
    /// `enum ap_event_kind`.
    pub kind: u16,
    /// Kernel frames following the header.
    pub n_kernel: u16,
    /// User frames following the kernel frames.
    pub n_user: u16,
    /// Padding.
    pub pad: u16,
    /// Task comm, NUL padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<RawEvent>() == 80);

/// `enum ap_drop_reason`: why a program failed to record something.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DropReason {
    /// Capturing the user stack failed.
    UserStack = 0,
    /// Capturing the kernel stack failed.
    KernelStack = 1,
    /// An aggregate, stack or per-thread state map was full.
    MapFull = 2,
    /// `bpf_perf_event_output` failed: the perf buffer was full.
    Output = 3,
    /// An exit or end without a matching enter or begin.
    NoStart = 4,
    /// A stack map hash collision prevented taking a stack id.
    StackCollision = 5,
}

impl DropReason {
    /// Every reason, in counter-index order.
    pub const ALL: [DropReason; 6] = [
        DropReason::UserStack,
        DropReason::KernelStack,
        DropReason::MapFull,
        DropReason::Output,
        DropReason::NoStart,
        DropReason::StackCollision,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UserStack => "user_stack",
            DropReason::KernelStack => "kernel_stack",
            DropReason::MapFull => "map_full",
            DropReason::Output => "perf_output",
            DropReason::NoStart => "no_start",
            DropReason::StackCollision => "stack_collision",
        }
    }
}

/// `struct ap_lock_key`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct LockKey {
    /// Thread group id.
    pub pid: u32,
    /// Stack id in the slot's stack map; negative when none.
    pub stack_id: i32,
    /// `LCB_F_*` flags for kernel locks, 0 for futex.
    pub flags: u32,
    /// 1 for futex waits, 0 for kernel locks.
    pub futex: u32,
    /// Futex waits walked with unwind tables: key of the stack in
    /// `ap_ustacks_<slot>`; 0 when none.
    pub ustack: u64,
}
const _: () = assert!(size_of::<LockKey>() == 24);

/// A value of `ap_ustacks_<slot>`: user addresses, leaf first, ended by a
/// 0 when shorter than [`MAX_FRAMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct UserStack(pub [u64; MAX_FRAMES]);
const _: () = assert!(size_of::<UserStack>() == 8 * MAX_FRAMES);

impl UserStack {
    /// The addresses up to the first 0.
    pub fn frames(&self) -> &[u64] {
        let n = self.0.iter().position(|&a| a == 0).unwrap_or(MAX_FRAMES);
        &self.0[..n]
    }
}

/// `struct ap_lock_value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LockValue {
    /// Number of waits.
    pub count: u64,
    /// Sum of wait times, ns.
    pub total_ns: u64,
    /// Longest wait, ns.
    pub max_ns: u64,
    /// comm of the thread that created the entry.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<LockValue>() == 40);

/// `struct ap_syscall_key`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct SyscallKey {
    /// Thread group id.
    pub pid: u32,
    /// Syscall number.
    pub nr: u32,
}
const _: () = assert!(size_of::<SyscallKey>() == 8);

/// `struct ap_syscall_value` (one per CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct SyscallValue {
    /// Completed calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Sum of call durations, ns.
    pub total_ns: u64,
    /// Log2 latency histogram.
    pub hist: [u64; HIST_BUCKETS],
    /// comm of the thread that created the entry.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<SyscallValue>() == 296);

/// `struct ap_slot`: which aggregate slot the programs write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Slot {
    /// 0 or 1.
    pub active: u32,
    /// Padding.
    pub pad: u32,
}
const _: () = assert!(size_of::<Slot>() == 8);

/// `struct ap_settings`: thresholds the programs read on every event, so
/// user space can change them while attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Settings {
    /// Lock waits at least this long are also sent individually, ns; 0 disables.
    pub lock_threshold_ns: u64,
    /// System calls at least this long are also sent individually, ns; 0 disables.
    pub slow_threshold_ns: u64,
}
const _: () = assert!(size_of::<Settings>() == 16);

/// `AP_FRAME_TRUNCATED`: marker frame ending a user stack cut at the depth limit.
pub const FRAME_TRUNCATED: u64 = 0xffff_ffff_ffff_ff01;
/// `AP_FRAME_UNKNOWN`: marker frame ending a user stack whose next caller
/// could not be recovered.
pub const FRAME_UNKNOWN: u64 = 0xffff_ffff_ffff_ff02;
/// `AP_UNWIND_MAX_MAPPINGS`: executable mappings per process the walker knows.
pub const UNWIND_MAX_MAPPINGS: usize = 256;
/// `AP_UNWIND_MAX_TABLES`: unwind tables loaded at once.
pub const UNWIND_MAX_TABLES: u32 = 8192;
/// `AP_UNWIND_NO_TABLE`: a mapping walked by frame pointers.
pub const UNWIND_NO_TABLE: u32 = u32::MAX;

/// The marker frame name of a user address, if it is one.
pub fn marker_frame(addr: u64) -> Option<&'static str> {
    match addr {
        FRAME_TRUNCATED => Some("[truncated]"),
        FRAME_UNKNOWN => Some("[unknown]"),
        _ => None,
    }
}

/// `struct ap_unwind_row`: layout check only (rows travel as the u64 of
/// `aperture_symbolize::unwind::Row::to_u64`).
const _: () = assert!(size_of::<aperture_symbolize::unwind::Row>() == 8);

/// `struct ap_unwind_mapping`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UnwindMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Runtime address minus bias = table address.
    pub bias: u64,
    /// Index into `ap_unwind_tables`, or [`UNWIND_NO_TABLE`].
    pub table: u32,
    /// Rows of that table.
    pub rows: u32,
}
const _: () = assert!(size_of::<UnwindMapping>() == 32);

/// `struct ap_unwind_proc`: a process's executable mappings, sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct UnwindProc {
    /// Mappings in use.
    pub n: u32,
    /// Padding.
    pub pad: u32,
    /// Sorted by start.
    pub maps: [UnwindMapping; UNWIND_MAX_MAPPINGS],
}
const _: () = assert!(size_of::<UnwindProc>() == 8 + 32 * UNWIND_MAX_MAPPINGS);

impl Default for UnwindProc {
    fn default() -> Self {
        UnwindProc { n: 0, pad: 0, maps: [UnwindMapping::default(); UNWIND_MAX_MAPPINGS] }
    }
}

/// `enum ap_unwind_stat`: the walker's per-CPU counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum UnwindStat {
    /// Stacks walked with tables.
    Walked = 0,
    /// Stacks of processes without tables yet (frame-pointer stack kept).
    NoProcess = 1,
    /// Frames recovered from a table row.
    FramesTable = 2,
    /// Frames recovered by frame pointer.
    FramesFramePointer = 3,
    /// Stacks cut at the depth limit.
    Truncated = 4,
    /// Stacks cut at a pc in no known mapping.
    NoMapping = 5,
    /// Stacks cut at a rule the walker does not follow.
    Unsupported = 6,
    /// Stacks cut because stack memory could not be read.
    ReadFailed = 7,
    /// Frames whose table was evicted.
    Evicted = 8,
    /// Stacks cut where frame pointers ended early.
    FramePointerEnded = 9,
}

impl UnwindStat {
    /// Every counter, in index order.
    pub const ALL: [UnwindStat; 10] = [
        UnwindStat::Walked,
        UnwindStat::NoProcess,
        UnwindStat::FramesTable,
        UnwindStat::FramesFramePointer,
        UnwindStat::Truncated,
        UnwindStat::NoMapping,
        UnwindStat::Unsupported,
        UnwindStat::ReadFailed,
        UnwindStat::Evicted,
        UnwindStat::FramePointerEnded,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UnwindStat::Walked => "walked",
            UnwindStat::NoProcess => "no_process_table",
            UnwindStat::FramesTable => "frames_table",
            UnwindStat::FramesFramePointer => "frames_frame_pointer",
            UnwindStat::Truncated => "truncated",
            UnwindStat::NoMapping => "no_mapping",
            UnwindStat::Unsupported => "unsupported_rule",
            UnwindStat::ReadFailed => "read_failed",
            UnwindStat::Evicted => "evicted",
            UnwindStat::FramePointerEnded => "frame_pointer_ended",
        }
    }
}

// SAFETY: each type is `repr(C)`, `Copy`, made only of integers and byte
// arrays with explicit padding fields, so every bit pattern is a valid value
// and there are no implicit padding bytes.
unsafe impl Pod for LockKey {}
// SAFETY: as above.
unsafe impl Pod for LockValue {}
// SAFETY: as above.
unsafe impl Pod for SyscallKey {}
// SAFETY: as above.
unsafe impl Pod for SyscallValue {}
// SAFETY: as above.
unsafe impl Pod for Slot {}
// SAFETY: as above.
unsafe impl Pod for Settings {}
// SAFETY: as above.
unsafe impl Pod for UnwindMapping {}
// SAFETY: as above.
unsafe impl Pod for UserStack {}
// SAFETY: as above.
unsafe impl Pod for UnwindProc {}

/// The comm bytes up to the first NUL, lossily decoded.
pub fn comm_str(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}
