//! Aperture probes: the kernel side of the profiler.
//!
//! This crate loads Aperture's BPF programs (C, CO-RE, compiled by
//! `probes/build-bpf.sh` and embedded), attaches them per mode, reads their
//! per-CPU perf buffers with batched wakeups, drains their in-kernel
//! aggregates, symbolizes stacks and checks at start-up that the node can
//! run them.
//!
//! It is **not** where records are batched for the network, labelled with
//! Kubernetes metadata or shipped: that is the agent's job. Nothing here
//! allocates per event on the hot path or runs an async runtime.
//!
//! Entry types:
//! - [`preflight::check`] — start-up checks with distinct exit codes.
//! - [`Probes`] — load ([`Probes::load`]), [`Probes::start_reader`],
//!   [`Probes::attach`]; drop to detach everything.
//! - [`PerfReader`] / [`BatchSink`] / [`RecordBatch`] — decoded events
//!   (cpu samples, slow lock waits, slow syscalls) with raw stacks.
//! - [`Probes::drain_syscall_stats`], [`Probes::drain_lock_stats`],
//!   [`Probes::drop_counts`] — in-kernel aggregates and drop counters.
//! - [`Probes::unwind_process`], [`Probes::unwind_refresh`],
//!   [`Probes::unwind_stats`], [`Probes::unwind_thread_id`] — the unwind
//!   tables the in-kernel walker uses for user stacks, kept by a thread of
//!   their own ([`UnwindSettings`]: tables or frame pointers, disk cache,
//!   memory budget).
//! - [`Symbolizer`] — raw stacks to [`aperture_core::model::Stack`]
//!   (marker frames `[truncated]`, `[unknown]` included).
//! - [`lock_class`] — the class of a futex wait (mutex, rwlock, condition
//!   variable, semaphore, join or other) from its symbolized stack.
//! - [`syscall_name`] — x86_64 syscall numbers to names.
//! - `bench` (with the `bench` feature, which only `aperture-perf` turns
//!   on) — pieces for the perf harness (BPF run-time stats, reader
//!   throughput).

pub mod abi;
#[cfg(feature = "bench")]
pub mod bench;
mod drain;
pub mod features;
mod loader;
pub mod lockclass;
pub mod preflight;
pub mod reader;
mod symbolize;
mod syscalls;
mod threads;

pub use drain::{DrainError, DropCount, LockStats, SLOT_GRACE, SyscallStats, lock_kind};
pub use loader::{
    AttachError, Attachment, Filter, Flavour, LoadError, Modes, ProbeConfig, Probes, SettingsError, UnwindError,
    UnwindMode, UnwindSettings, UnwindStats, object_bytes,
};
pub use lockclass::{futex_wait_class, lock_class};
pub use reader::{
    BatchSink, EventRecord, INITIAL_BATCH_EVENTS, PerfReader, ReaderConfig, ReaderError, ReaderStats, RecordBatch,
};
pub use symbolize::{SymbolizeStats, Symbolizer, SymbolizerLimits};
pub use syscalls::syscall_name;
pub use threads::set_thread_start;
