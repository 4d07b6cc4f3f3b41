//! CPU time of the agent's own threads only.
//!
//! Under `aperture up` the aggregator runs in the same process, so the
//! process's CPU time (`getrusage(RUSAGE_SELF)`) is not the agent's. Every
//! agent thread is therefore registered by its kernel thread id as it
//! starts — the thread that runs the agent, the pipeline thread, the
//! perf-buffer reader, the transport client's thread and the I/O runtime's
//! workers — and [`ThreadCost`] sums their CPU time from
//! `/proc/self/task/<tid>/schedstat` (ns on the CPU), or from the `utime`
//! and `stime` of `/proc/self/task/<tid>/stat` (clock ticks) where
//! schedstat is missing.
//!
//! Threads that end keep counting: a thread that unregisters itself adds
//! its final CPU time ([`AgentThreads::unregister_current`]); one that
//! vanishes without doing so keeps the last value read. The total only
//! grows, so the budget loop never sees a counter go backwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::controller::CostTotals;
use super::cost::{CostSource, ProcessCost};

/// The kernel thread id of the calling thread.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// CPU time of the calling thread, ns (`CLOCK_THREAD_CPUTIME_ID`).
pub fn current_thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec.max(0) as u64) * 1_000_000_000 + ts.tv_nsec.max(0) as u64
}

#[derive(Debug, Default)]
struct Registry {
    tids: Mutex<Vec<u32>>,
    /// CPU time of threads that unregistered themselves, ns.
    retired_ns: AtomicU64,
}

/// The set of the agent's threads. Cheap to clone; registering happens
/// once per thread start, never on the hot path.
#[derive(Clone, Debug, Default)]
pub struct AgentThreads(Arc<Registry>);

impl AgentThreads {
    /// An empty set.
    pub fn new() -> AgentThreads {
        AgentThreads::default()
    }

    /// Adds thread `tid` (a thread of this process).
    pub fn register(&self, tid: u32) {
        let mut tids = self.0.tids.lock().unwrap_or_else(PoisonError::into_inner);
        if tid != 0 && !tids.contains(&tid) {
            tids.push(tid);
        }
    }

    /// Adds the calling thread.
    pub fn register_current(&self) {
        self.register(current_tid());
    }

    /// Removes the calling thread, keeping its CPU time in the total (call
    /// it as the thread ends, e.g. from a runtime's `on_thread_stop`).
    pub fn unregister_current(&self) {
        let tid = current_tid();
        let mut tids = self.0.tids.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = tids.iter().position(|&t| t == tid) {
            tids.swap_remove(i);
            self.0.retired_ns.fetch_add(current_thread_cpu_ns(), Ordering::Relaxed);
        }
    }

    /// Removes thread `tid` (it ended; its time is accounted elsewhere).
    fn remove(&self, tid: u32) {
        self.0.tids.lock().unwrap_or_else(PoisonError::into_inner).retain(|&t| t != tid);
    }

    /// The registered thread ids.
    pub fn tids(&self) -> Vec<u32> {
        self.0.tids.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn retired_ns(&self) -> u64 {
        self.0.retired_ns.load(Ordering::Relaxed)
    }
}

/// Ids of this process's threads whose name starts with `prefix` (names
/// are cut to 15 bytes by the kernel).
pub fn threads_named(proc_self: &Path, prefix: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_self.join("task")) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|tid| {
            std::fs::read_to_string(proc_self.join(format!("task/{tid}/comm")))
                .is_ok_and(|comm| comm.trim_end().starts_with(prefix))
        })
        .collect()
}

/// The costs of the agent's threads (and of its BPF programs).
#[derive(Debug)]
pub struct ThreadCost {
    proc_self: PathBuf,
    threads: AgentThreads,
    /// Last CPU time read per thread, ns.
    last: HashMap<u32, u64>,
    /// CPU time of threads that vanished without unregistering, ns.
    vanished_ns: u64,
    ticks_per_sec: u64,
    bpf: ProcessCost,
}

impl ThreadCost {
    /// Measures `threads` of this process.
    pub fn new(threads: AgentThreads) -> ThreadCost {
        ThreadCost::with_proc("/proc/self", threads)
    }

    /// Measures `threads` under `proc_self` (normally `/proc/self`; a fake
    /// directory in tests).
    pub fn with_proc(proc_self: impl Into<PathBuf>, threads: AgentThreads) -> ThreadCost {
        let proc_self = proc_self.into();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ThreadCost {
            bpf: ProcessCost::new(&proc_self),
            proc_self,
            threads,
            last: HashMap::new(),
            vanished_ns: 0,
            ticks_per_sec: u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100),
        }
    }

    /// Total CPU time of the agent's threads so far, ns.
    pub fn agent_cpu_ns(&mut self) -> u64 {
        let tids = self.threads.tids();
        let mut now = HashMap::with_capacity(tids.len());
        for &tid in &tids {
            let Some(ns) = self.thread_cpu_ns(tid) else {
                // Registered but gone: it ended without unregistering. Its
                // last value stays in the total; forget the id, which the
                // kernel may give to another thread.
                self.vanished_ns += self.last.get(&tid).copied().unwrap_or(0);
                self.threads.remove(tid);
                continue;
            };
            if let Some(&before) = self.last.get(&tid)
                && ns < before
            {
                // The id names a new thread (the old one ended unnoticed):
                // keep the old one's time.
                self.vanished_ns += before;
            }
            now.insert(tid, ns);
        }
        // Threads that unregistered themselves are in the registry's total.
        let live: u64 = now.values().sum();
        self.last = now;
        self.vanished_ns + self.threads.retired_ns() + live
    }

    fn thread_cpu_ns(&self, tid: u32) -> Option<u64> {
        let task = self.proc_self.join(format!("task/{tid}"));
        if let Some(ns) = std::fs::read_to_string(task.join("schedstat")).ok().as_deref().and_then(parse_schedstat) {
            return Some(ns);
        }
        let ticks = std::fs::read_to_string(task.join("stat")).ok().as_deref().and_then(parse_stat_ticks)?;
        Some(ticks * 1_000_000_000 / self.ticks_per_sec)
    }
}

impl CostSource for ThreadCost {
    fn totals(&mut self) -> CostTotals {
        CostTotals { agent_cpu_ns: self.agent_cpu_ns(), kernel_ns: self.bpf.bpf_run_time_ns() }
    }
}

/// Time on the CPU from a `schedstat` file: its first field, ns.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `utime + stime` (clock ticks) from a `stat` file. The command name may
/// hold spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // After the name: state(3) ... utime(14) stime(15), i.e. the 12th and 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (aperture pipe) (x) S 1 4200 4200 0 -1 4194368 1200 0 0 0 153 27 0 0 20 0 12 0 \
        3391 1263370240 20000 18446744073709551615 1 1 0 0 0 0 0 4096 1260 0 0 0 -1 1 0 0 0 0 0\n";

    #[test]
    fn stat_and_schedstat_are_parsed() {
        assert_eq!(parse_stat_ticks(STAT), Some(180));
        assert_eq!(parse_stat_ticks("12 (short) S 1"), None);
        assert_eq!(parse_schedstat("1834570022 2810041 913\n"), Some(1_834_570_022));
        assert_eq!(parse_schedstat(""), None);
    }

    fn write_task(proc: &Path, tid: u32, schedstat: Option<u64>, ticks: u64) {
        let task = proc.join(format!("task/{tid}"));
        std::fs::create_dir_all(&task).expect("mkdir");
        match schedstat {
            Some(ns) => std::fs::write(task.join("schedstat"), format!("{ns} 0 0\n")).expect("write"),
            None => {
                let _ = std::fs::remove_file(task.join("schedstat"));
            }
        }
        let stat = format!("{tid} (t) S 1 1 1 0 -1 0 0 0 0 0 {ticks} 0 0 0 20 0 1 0 1 1 1\n");
        std::fs::write(task.join("stat"), stat).expect("write");
    }

    #[test]
    fn only_registered_threads_count_and_ended_ones_keep_counting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let proc = dir.path();
        std::fs::create_dir_all(proc.join("fdinfo")).expect("mkdir");
        // 10: agent thread (schedstat), 11: agent thread (stat only),
        // 12: another component's thread in the same process.
        write_task(proc, 10, Some(5_000_000), 0);
        write_task(proc, 11, None, 3);
        write_task(proc, 12, Some(900_000_000), 0);
        let threads = AgentThreads::new();
        threads.register(10);
        threads.register(11);
        threads.register(11);
        assert_eq!(threads.tids(), vec![10, 11]);
        let mut cost = ThreadCost::with_proc(proc, threads.clone());
        cost.ticks_per_sec = 100;
        assert_eq!(cost.totals().agent_cpu_ns, 5_000_000 + 30_000_000, "thread 12 is not the agent's");

        write_task(proc, 10, Some(8_000_000), 0);
        assert_eq!(cost.agent_cpu_ns(), 8_000_000 + 30_000_000);
        // Thread 11 ends without unregistering: its last value stays.
        std::fs::remove_dir_all(proc.join("task/11")).expect("rm");
        assert_eq!(cost.agent_cpu_ns(), 8_000_000 + 30_000_000);
        // Thread id 10 is reused by a new thread: the old one's time stays.
        write_task(proc, 10, Some(1_000_000), 0);
        assert_eq!(cost.agent_cpu_ns(), 8_000_000 + 30_000_000 + 1_000_000);
        assert_eq!(threads.tids(), vec![10], "the ended thread's id is forgotten");
    }

    #[test]
    fn threads_unregistering_themselves_keep_their_time() {
        let threads = AgentThreads::new();
        let t = threads.clone();
        std::thread::spawn(move || {
            t.register_current();
            let mut x = 0u64;
            for i in 0..2_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            t.unregister_current();
        })
        .join()
        .expect("thread");
        assert!(threads.tids().is_empty());
        let mut cost = ThreadCost::new(threads);
        assert!(cost.agent_cpu_ns() > 0, "the ended thread's CPU time is kept");
    }

    #[test]
    fn own_threads_are_found_by_name() {
        let me = current_tid();
        let comm = std::fs::read_to_string(format!("/proc/self/task/{me}/comm")).expect("comm");
        let found = threads_named(Path::new("/proc/self"), comm.trim_end());
        assert!(found.contains(&me), "{found:?} lacks {me}");
    }
}
