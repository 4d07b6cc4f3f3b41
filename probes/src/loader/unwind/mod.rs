//! Unwind tables in the kernel: which processes the walker knows, which
//! object tables are loaded, and the memory budget they share.
//!
//! Each object's table (built or read from the disk cache by
//! `aperture_symbolize::unwind`) becomes one BPF array of u64 rows, created
//! with exactly its size and stored at one index of every loaded BPF
//! object's `ap_unwind_tables` map of maps: processes and modes mapping the
//! same file share it. A process is an `ap_unwind_procs` entry listing its
//! executable mappings with the table index and load bias of each.
//!
//! All of that work — reading `/proc/<pid>/maps`, building or reading
//! tables, creating and filling their maps, evicting — runs on one thread
//! of its own, `ap-unwind` ([`worker`]), so the thread that drains events
//! never waits for it. That thread polls the walker's `ap_unwind_missing`
//! map (processes met without an entry, or at an address outside their
//! known mappings) every 50 ms and forgets exited processes.
//! The caller talks to it through a bounded queue that never blocks:
//! [`Unwinder::poke`] asks for a poll now, [`Unwinder::add_process`] (an
//! explicit request, which waits for its answer) adds one process; requests
//! that find the queue full are dropped and counted.
//!
//! When the rows would pass the budget, the least recently sampled tables
//! are evicted; their mappings fall back to frame pointers and the walker
//! counts the frames that hit them.

mod worker;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use aperture_core::model::Mode;
use aya::maps::{MapError, PerCpuArray};

use super::LoadedObject;
use super::config::UnwindSettings;
use crate::abi::UnwindStat;

/// Requests queued for the unwind thread at most; more are dropped.
const QUEUE: usize = 64;

/// Why a process's tables could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    /// Reading `/proc/<pid>/maps` failed (the process exited, or no access).
    #[error("reading the mappings of process {pid} failed: {source}")]
    Maps {
        /// The process.
        pid: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A BPF map update failed.
    #[error("updating unwind map {map} of the {mode} object failed: {source}")]
    Map {
        /// The mode of the object.
        mode: Mode,
        /// The map.
        map: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
    /// The unwind thread's queue was full; the request was dropped (and counted).
    #[error("the unwind-table thread is busy ({QUEUE} requests queued); process {pid} was not added, try again later")]
    Busy {
        /// The process.
        pid: u32,
    },
    /// The unwind thread is not running (it could not be started).
    #[error(
        "the unwind-table thread is not running: {0}; stacks are walked by frame pointers (`unwind: frame_pointers` says so explicitly)"
    )]
    Stopped(String),
}

/// What the unwinder holds and did, plus the walker's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Processes the walker knows.
    pub processes: usize,
    /// Object tables loaded.
    pub tables: usize,
    /// Bytes of rows loaded (8 per row).
    pub table_bytes: u64,
    /// Tables built from CFI.
    pub built: u64,
    /// Tables read from the disk cache.
    pub from_disk: u64,
    /// Disk cache files removed to keep the cache within its bound.
    pub cache_removed: u64,
    /// Objects without usable CFI (walked by frame pointers).
    pub without_table: u64,
    /// Tables evicted for the budget.
    pub evictions: u64,
    /// Tables copied into their map through a memory mapping of it.
    pub filled_mapped: u64,
    /// Tables written with batch updates (the mapping failed).
    pub filled_batched: u64,
    /// Times a process's mappings were read (`/proc/<pid>/maps`).
    pub maps_read: u64,
    /// Requests of the walker to re-read a process's mappings that were
    /// not followed, because the last reads found them unchanged (each
    /// unchanged read doubles the wait, up to a minute; exec resets it).
    pub rereads_skipped: u64,
    /// Processes the kernel's processes map had no room for (walked by frame pointers).
    pub refused: u64,
    /// Requests to the unwind thread dropped because its queue was full.
    pub requests_dropped: u64,
    /// CPU time of the unwind thread so far, ns.
    pub thread_cpu_ns: u64,
    /// Whether exec is followed at once (`sched_process_exec` hook attached).
    pub exec_hook: bool,
    /// The walker's counters summed over CPUs and modes.
    pub kernel: Vec<(UnwindStat, u64)>,
}

impl UnwindStats {
    /// One walker counter.
    pub fn get(&self, stat: UnwindStat) -> u64 {
        self.kernel.iter().filter(|(s, _)| *s == stat).map(|(_, n)| n).sum()
    }
}

/// What the caller asks of the unwind thread.
enum Request {
    /// Poll the walker's requests now.
    Poll,
    /// Add this process now and answer.
    Add { pid: u32, reply: mpsc::SyncSender<Result<usize, UnwindError>> },
}

/// What the unwind thread publishes for the caller.
#[derive(Default)]
struct Shared {
    stats: Mutex<UnwindStats>,
    dropped: AtomicU64,
}

/// The caller's side of the unwind thread. Dropping it stops the thread
/// (after the work in hand; nothing waits for it).
pub(crate) struct Unwinder {
    requests: Option<mpsc::SyncSender<Request>>,
    shared: Arc<Shared>,
    /// Why the thread is not running, when it is not.
    stopped: Option<String>,
    /// The thread's kernel id (0 when unknown).
    thread_id: u32,
    /// The `sched_process_exec` hook is attached.
    pub(crate) exec_hooked: bool,
}

impl Unwinder {
    /// Creates the shared processes map, installs it in every object and
    /// starts the unwind thread.
    pub(crate) fn new(settings: &UnwindSettings, objects: &mut [LoadedObject]) -> Result<Unwinder, UnwindError> {
        let worker = worker::Worker::new(settings, objects)?;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let thread_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new().name("ap-unwind".into()).spawn(move || {
            crate::threads::started();
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() } as u32);
            worker.run(rx, &thread_shared);
        });
        let (requests, stopped, thread_id) = match spawned {
            Ok(_) => (Some(tx), None, tid_rx.recv().unwrap_or(0)),
            Err(e) => {
                tracing::warn!(error = %e, "no unwind-table thread; stacks are walked by frame pointers");
                (None, Some(e.to_string()), 0)
            }
        };
        Ok(Unwinder { requests, shared, stopped, thread_id, exec_hooked: false })
    }

    /// The unwind thread's kernel thread id (0 when it is not running), so
    /// its CPU time can be accounted.
    pub(crate) fn thread_id(&self) -> u32 {
        self.thread_id
    }

    /// Adds `pid` on the unwind thread and waits for it: its mappings are
    /// read, the tables they need loaded and its entry written. Returns the
    /// mappings with a table.
    pub(crate) fn add_process(&mut self, pid: u32) -> Result<usize, UnwindError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Request::Add { pid, reply })
            .map_err(|full| if full { UnwindError::Busy { pid } } else { self.gone() })?;
        answer.recv().map_err(|_| self.gone())?
    }

    /// Asks the unwind thread to take the walker's requests now (it also
    /// does every few hundred ms on its own). Never blocks.
    pub(crate) fn poke(&mut self) -> Result<(), UnwindError> {
        match self.send(Request::Poll) {
            Ok(()) | Err(true) => Ok(()),
            Err(false) => Err(self.gone()),
        }
    }

    /// `Err(true)`: the queue is full (counted); `Err(false)`: no thread.
    fn send(&self, request: Request) -> Result<(), bool> {
        let Some(tx) = &self.requests else { return Err(false) };
        match tx.try_send(request) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                Err(true)
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(false),
        }
    }

    fn gone(&self) -> UnwindError {
        UnwindError::Stopped(self.stopped.clone().unwrap_or_else(|| "it ended".to_owned()))
    }

    /// The unwinder's state and the walker's counters in `objects`.
    pub(crate) fn stats(&self, objects: &[LoadedObject]) -> UnwindStats {
        let mut s = self.shared.stats.lock().unwrap_or_else(PoisonError::into_inner).clone();
        s.requests_dropped = self.shared.dropped.load(Ordering::Relaxed);
        s.exec_hook = self.exec_hooked;
        s.kernel = UnwindStat::ALL.iter().map(|&st| (st, 0)).collect();
        for obj in objects {
            let Some(map) = obj.ebpf.map("ap_unwind_stats") else { continue };
            let Ok(counters) = PerCpuArray::<_, u64>::try_from(map) else { continue };
            for (stat, n) in s.kernel.iter_mut() {
                if let Ok(per_cpu) = counters.get(&(*stat as u32), 0) {
                    *n += per_cpu.iter().sum::<u64>();
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unwinder whose thread never reads its queue.
    fn stalled() -> (Unwinder, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let u = Unwinder {
            requests: Some(tx),
            shared: Arc::new(Shared::default()),
            stopped: None,
            thread_id: 0,
            exec_hooked: false,
        };
        (u, rx)
    }

    #[test]
    fn a_busy_unwind_thread_never_blocks_the_caller_and_drops_are_counted() {
        let (mut u, rx) = stalled();
        for _ in 0..QUEUE + 5 {
            u.poke().expect("a full queue is not an error for a poll");
        }
        assert_eq!(u.stats(&[]).requests_dropped, 5);
        assert!(matches!(u.add_process(1), Err(UnwindError::Busy { pid: 1 })));
        assert_eq!(u.stats(&[]).requests_dropped, 6);
        drop(rx);
        assert!(matches!(u.poke(), Err(UnwindError::Stopped(_))), "a gone thread is reported");
    }
}
