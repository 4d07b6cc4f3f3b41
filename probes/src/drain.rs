//! Draining the in-kernel aggregates and reading the drop counters.
//!
//! # Why two slots
//!
//! The syscall and lock programs aggregate into one of two map slots
//! (`*_0`, `*_1`); a one-entry `ap_slot` array names the slot they write. A
//! drain flips `ap_slot`, waits [`SLOT_GRACE`] for programs that read the
//! old value to finish their update, then reads the now idle slot and
//! deletes what it read. Counts that arrive during the drain land in the
//! other slot and are returned by the next drain, so nothing is lost or
//! counted twice, and the maps stay as small as one interval's worth of
//! keys (exited processes disappear by themselves).
//!
//! The alternatives were worse: read-then-delete per key loses updates made
//! between the read and the delete; reading cumulative values and diffing
//! needs the maps to keep every key ever seen (they fill up) and user space
//! to keep a copy of all of them.

use std::collections::HashMap as StdHashMap;
use std::time::Duration;

use aperture_core::model::{LockKind, Mode};
use aya::Ebpf;
use aya::maps::{Array, HashMap, MapError, PerCpuArray, PerCpuHashMap, StackTraceMap};

use crate::abi::{DropReason, HIST_BUCKETS, LockKey, LockValue, Slot, SyscallKey, SyscallValue, UserStack, comm_str};
use crate::loader::Probes;

/// How long a drain waits after flipping the slot. BPF programs run for
/// microseconds; a program that read the old slot and was then preempted
/// for longer than this could still add to the drained slot after it was
/// read (that update is then lost). 10 ms makes this practically
/// impossible while keeping drains cheap.
pub const SLOT_GRACE: Duration = Duration::from_millis(10);

/// Why a drain failed.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The mode's programs are not loaded.
    #[error("{0} mode is not loaded; add it to APERTURE_MODE to drain its statistics")]
    NotLoaded(Mode),
    /// A map was missing or of another type than expected.
    #[error("map {map} of the {mode} object is missing or has an unexpected type: {source}")]
    Map {
        /// The mode of the object.
        mode: Mode,
        /// The map.
        map: &'static str,
        /// aya's error.
        #[source]
        source: MapError,
    },
}

/// Statistics of one syscall in one process over one drain interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallStats {
    /// Thread group id.
    pub pid: u32,
    /// Process name (comm of the first thread seen making the call).
    pub comm: String,
    /// Syscall number (x86_64), see [`crate::syscall_name`].
    pub nr: u32,
    /// Completed calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Total time in the calls, ns.
    pub total_ns: u64,
    /// Log2 latency histogram (see [`aperture_core::model::LATENCY_BUCKETS`]).
    pub histogram: [u64; HIST_BUCKETS],
}

/// Lock waits of one (process, stack, lock kind) over one drain interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockStats {
    /// Thread group id.
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// Kind of lock.
    pub kind: LockKind,
    /// `LCB_F_*` flags of kernel locks; 0 for futex.
    pub flags: u32,
    /// Number of waits.
    pub count: u64,
    /// Total wait, ns.
    pub total_ns: u64,
    /// Longest wait, ns.
    pub max_ns: u64,
    /// The stack at the wait, leaf first: kernel addresses for kernel locks,
    /// user addresses for futex waits. Empty if it could not be captured.
    pub stack: Vec<u64>,
}

/// One drop counter of one program, summed over CPUs (monotonic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropCount {
    /// The program's mode.
    pub mode: Mode,
    /// The reason.
    pub reason: DropReason,
    /// Events not recorded for that reason since load.
    pub count: u64,
}

/// `lock:contention_begin` flags (include/trace/events/lock.h).
const LCB_F_SPIN: u32 = 1 << 0;
const LCB_F_READ: u32 = 1 << 1;
const LCB_F_WRITE: u32 = 1 << 2;
const LCB_F_MUTEX: u32 = 1 << 5;

/// Classifies a wait from its aggregate key, as far as the kernel can:
/// every user-space wait is a [`LockKind::Futex`] here, which
/// [`crate::lockclass::lock_class`] then tells apart by its symbolized stack.
pub fn lock_kind(futex: bool, flags: u32) -> LockKind {
    if futex {
        LockKind::Futex
    } else if flags & LCB_F_MUTEX != 0 {
        LockKind::KernelMutex
    } else if flags & LCB_F_SPIN != 0 {
        LockKind::KernelSpin
    } else if flags & (LCB_F_READ | LCB_F_WRITE) != 0 {
        LockKind::KernelRwsem
    } else {
        LockKind::KernelOther
    }
}

fn map_err(mode: Mode, map: &'static str) -> impl Fn(MapError) -> DrainError {
    move |source| DrainError::Map { mode, map, source }
}

fn missing(name: &'static str) -> MapError {
    MapError::InvalidName { name: name.into() }
}

/// Flips `ap_slot` and returns the slot to drain, after the grace period.
fn flip_slot(ebpf: &mut Ebpf, mode: Mode) -> Result<u32, DrainError> {
    let err = map_err(mode, "ap_slot");
    let mut slot: Array<_, Slot> =
        Array::try_from(ebpf.map_mut("ap_slot").ok_or_else(|| missing("ap_slot")).map_err(&err)?).map_err(&err)?;
    let old = slot.get(&0, 0).map_err(&err)?.active & 1;
    slot.set(0, Slot { active: old ^ 1, pad: 0 }, 0).map_err(&err)?;
    std::thread::sleep(SLOT_GRACE);
    Ok(old)
}

impl Probes {
    /// Returns the syscall statistics gathered since the previous drain.
    pub fn drain_syscall_stats(&mut self) -> Result<Vec<SyscallStats>, DrainError> {
        const MAPS: [&str; 2] = ["ap_sys_stats_0", "ap_sys_stats_1"];
        let mode = Mode::Syscall;
        let ebpf = self.object_mut(mode).ok_or(DrainError::NotLoaded(mode))?;
        let idle = flip_slot(ebpf, mode)? as usize;
        let name = MAPS[idle];
        let err = map_err(mode, name);
        let mut map: PerCpuHashMap<_, SyscallKey, SyscallValue> =
            PerCpuHashMap::try_from(ebpf.map_mut(name).ok_or_else(|| missing(name)).map_err(&err)?).map_err(&err)?;
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(&err)?;
            let mut s = SyscallStats {
                pid: key.pid,
                comm: String::new(),
                nr: key.nr,
                count: 0,
                errors: 0,
                total_ns: 0,
                histogram: [0; HIST_BUCKETS],
            };
            for v in per_cpu.iter() {
                if s.comm.is_empty() && v.count > 0 {
                    s.comm = comm_str(&v.comm);
                }
                s.count += v.count;
                s.errors += v.errors;
                s.total_ns += v.total_ns;
                for (h, x) in s.histogram.iter_mut().zip(v.hist) {
                    *h += x;
                }
            }
            keys.push(key);
            if s.count > 0 {
                out.push(s);
            }
        }
        for key in &keys {
            // A key can only vanish if another drain raced this one; ignore.
            let _ = map.remove(key);
        }
        Ok(out)
    }

    /// Returns the lock waits gathered since the previous drain, with their
    /// stacks.
    pub fn drain_lock_stats(&mut self) -> Result<Vec<LockStats>, DrainError> {
        const AGG: [&str; 2] = ["ap_lock_agg_0", "ap_lock_agg_1"];
        const STACKS: [&str; 2] = ["ap_stacks_0", "ap_stacks_1"];
        const USTACKS: [&str; 2] = ["ap_ustacks_0", "ap_ustacks_1"];
        let mode = Mode::Lock;
        let ebpf = self.object_mut(mode).ok_or(DrainError::NotLoaded(mode))?;
        let idle = flip_slot(ebpf, mode)? as usize;
        let [agg, stacks, ustacks] = ebpf.maps_disjoint_mut([AGG[idle], STACKS[idle], USTACKS[idle]]);
        let ustack_err = map_err(mode, USTACKS[idle]);
        let mut ustacks: HashMap<_, u64, UserStack> =
            HashMap::try_from(ustacks.ok_or_else(|| missing(USTACKS[idle])).map_err(&ustack_err)?)
                .map_err(&ustack_err)?;
        let agg_err = map_err(mode, AGG[idle]);
        let stack_err = map_err(mode, STACKS[idle]);
        let mut agg: HashMap<_, LockKey, LockValue> =
            HashMap::try_from(agg.ok_or_else(|| missing(AGG[idle])).map_err(&agg_err)?).map_err(&agg_err)?;
        let mut stacks = StackTraceMap::try_from(stacks.ok_or_else(|| missing(STACKS[idle])).map_err(&stack_err)?)
            .map_err(&stack_err)?;

        let mut resolved: StdHashMap<i32, Vec<u64>> = StdHashMap::new();
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for entry in agg.iter() {
            let (key, value) = entry.map_err(&agg_err)?;
            keys.push(key);
            let stack = if key.ustack != 0 {
                ustacks.get(&key.ustack, 0).map(|st| st.frames().to_vec()).unwrap_or_default()
            } else if key.stack_id < 0 {
                Vec::new()
            } else {
                resolved
                    .entry(key.stack_id)
                    .or_insert_with(|| {
                        stacks
                            .get(&(key.stack_id as u32), 0)
                            .map(|st| st.frames().iter().map(|f| f.ip).collect())
                            .unwrap_or_default()
                    })
                    .clone()
            };
            out.push(LockStats {
                pid: key.pid,
                comm: comm_str(&value.comm),
                kind: lock_kind(key.futex != 0, key.flags),
                flags: key.flags,
                count: value.count,
                total_ns: value.total_ns,
                max_ns: value.max_ns,
                stack,
            });
        }
        for key in &keys {
            let _ = agg.remove(key);
        }
        let hashes: Vec<u64> = ustacks.keys().filter_map(Result::ok).collect();
        for h in hashes {
            let _ = ustacks.remove(&h);
        }
        let ids: Vec<u32> = stacks.stack_ids().filter_map(Result::ok).collect();
        for id in ids {
            let _ = stacks.remove(&id);
        }
        Ok(out)
    }

    /// Every program's drop counters, summed over CPUs, since load.
    pub fn drop_counts(&mut self) -> Result<Vec<DropCount>, DrainError> {
        let mut out = Vec::new();
        for (mode, ebpf) in self.objects_mut() {
            let err = map_err(mode, "ap_drops");
            let drops: PerCpuArray<_, u64> =
                PerCpuArray::try_from(ebpf.map("ap_drops").ok_or_else(|| missing("ap_drops")).map_err(&err)?)
                    .map_err(&err)?;
            for reason in DropReason::ALL {
                let per_cpu = drops.get(&(reason as u32), 0).map_err(&err)?;
                out.push(DropCount { mode, reason, count: per_cpu.iter().sum() });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_kinds_follow_the_contention_flags() {
        assert_eq!(lock_kind(true, 0), LockKind::Futex);
        assert_eq!(lock_kind(false, LCB_F_SPIN), LockKind::KernelSpin);
        assert_eq!(lock_kind(false, LCB_F_SPIN | LCB_F_READ), LockKind::KernelSpin);
        assert_eq!(lock_kind(false, LCB_F_MUTEX | LCB_F_SPIN), LockKind::KernelMutex);
        assert_eq!(lock_kind(false, LCB_F_WRITE), LockKind::KernelRwsem);
        assert_eq!(lock_kind(false, 0), LockKind::KernelOther);
    }
}
