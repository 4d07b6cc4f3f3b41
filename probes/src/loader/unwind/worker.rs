//! The unwind thread's state and loop: reads mappings, loads tables into
//! their BPF maps, writes process entries, evicts for the budget.
//!
//! It owns its own handles (duplicated fds) on the maps of every loaded
//! object it needs, so it never touches the objects the caller keeps.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use aperture_core::model::Mode;
use aperture_symbolize::elf::{ElfFile, Segment, load_bias};
use aperture_symbolize::maps::{ExecMapping, exec_mappings};
use aperture_symbolize::unwind::{Origin, Row, TableCache, TableKey};
use aya::maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, Map, MapData, MapError};

use super::super::LoadedObject;
use super::super::config::UnwindSettings;
use super::super::sys;
use super::{Request, Shared, UnwindError, UnwindStats};
use crate::abi::{UNWIND_MAX_MAPPINGS, UNWIND_MAX_TABLES, UNWIND_NO_TABLE, UnwindMapping, UnwindProc};

/// A mapping whose table was evicted (out of the outer map's range, so the
/// walker's lookup fails and is counted).
const UNWIND_EVICTED: u32 = u32::MAX - 1;
/// `BPF_F_INNER_MAP`: inner arrays of different sizes share one outer map.
const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the array's values can be mapped into user space.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The file identity standing for the vDSO (no file has inode 0).
const VDSO_ID: (u64, u64) = (u64::MAX, 0);
/// `BPF_MAP_TYPE_HASH`.
const BPF_MAP_TYPE_HASH: u32 = 1;
/// Processes the walker knows at most. The map is preallocated (kernels
/// before 6.1 refuse perf_event programs that reach a run-time allocated
/// hash map, even as the inner map of a map of maps), at about 8 KiB a
/// process, so this costs 8 MiB of kernel memory. Processes beyond it are
/// walked with frame pointers and counted (`AP_UNW_NO_PROC`).
const MAX_PROCESSES: u32 = 1024;
/// How often the walker's requests are taken: a new process is walked by
/// frame pointers until then, so short-lived ones want this short. A poll
/// that finds nothing costs one map lookup per loaded object.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// How often exited processes are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// A process's mappings are re-read at most this often on the walker's
/// request; each read that finds them unchanged doubles the wait, up to
/// 2^[`MAX_BACKOFF_SHIFT`] times this (a process whose frame-pointer chain
/// leads outside its mappings asks for it at every sample).
const REREAD_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF_SHIFT: u32 = 6;
/// An evicted table is not loaded again for this long (so two sets of
/// processes whose tables do not fit together do not take turns evicting
/// each other's at every new process).
const RELOAD_AFTER: Duration = Duration::from_secs(30);
/// Tables larger than this many rows are not loaded (the walker's binary
/// search does 24 steps).
const MAX_ROWS: usize = 1 << 24;
/// Rows written to a table map per `BPF_MAP_UPDATE_BATCH` call (fallback).
const ROWS_PER_WRITE: usize = 1 << 16;

/// What is known about one file (by device and inode).
struct FileInfo {
    /// `None`: no table (no CFI, unreadable, too large).
    key: Option<TableKey>,
    segments: Vec<Segment>,
}

struct Loaded {
    slot: u32,
    rows: u32,
    /// Keeps the inner map alive; the outer maps hold references too.
    _map: MapData,
}

struct Process {
    value: Box<UnwindProc>,
    read_at: Instant,
    /// Reads in a row that found the mappings unchanged.
    unchanged: u32,
    /// The kernel's map took the entry.
    in_kernel: bool,
}

impl Process {
    /// Whether the walker's request to re-read it can wait.
    fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.read_at) < REREAD_EVERY * (1 << self.unchanged.min(MAX_BACKOFF_SHIFT))
    }
}

/// This thread's handles on one loaded object's maps.
struct ObjectMaps {
    mode: Mode,
    tables: Option<MapData>,
    used: Option<Array<MapData, u64>>,
    missing: Option<BpfHashMap<MapData, u32, u64>>,
}

pub(super) struct Worker {
    /// The processes map every object reads through `ap_unwind_procs[0]`.
    procs_map: BpfHashMap<MapData, u32, UnwindProc>,
    objects: Vec<ObjectMaps>,
    cache: TableCache,
    budget: u64,
    files: HashMap<(u64, u64), FileInfo>,
    tables: HashMap<TableKey, Loaded>,
    evicted_at: HashMap<TableKey, Instant>,
    free_slots: Vec<u32>,
    next_slot: u32,
    procs: HashMap<u32, Process>,
    bytes: u64,
    stats: UnwindStats,
    cache_dir: Option<PathBuf>,
    /// The vDSO image file, once looked for.
    vdso: Option<Option<PathBuf>>,
    /// Without a cache directory, the temporary one holding the vDSO image,
    /// removed with the worker.
    vdso_temp: Option<tempfile::TempDir>,
}

/// Removes the `vdso-<pid>` directories that earlier agents left in the
/// cache directory, one per run.
fn remove_per_process_vdso_dirs(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let per_process = name
            .to_str()
            .and_then(|n| n.strip_prefix("vdso-"))
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        if per_process && let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::debug!(path = %entry.path().display(), error = %e, "could not remove an old vDSO image");
        }
    }
}

/// A new handle on the map `data` (a duplicated fd).
fn duplicate(data: &MapData) -> Option<MapData> {
    let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
    MapData::from_fd(fd).ok()
}

impl Worker {
    /// Creates the shared processes map and installs it in every object.
    pub(super) fn new(settings: &UnwindSettings, objects: &mut [LoadedObject]) -> Result<Worker, UnwindError> {
        let first_mode = objects.first().map_or(Mode::Cpu, |o| o.mode);
        let map_err = |source| UnwindError::Map { mode: first_mode, map: "ap_unwind_procs", source };
        let fd =
            sys::map_create("ap_unwind_procs", BPF_MAP_TYPE_HASH, 4, size_of::<UnwindProc>() as u32, MAX_PROCESSES, 0)
                .map_err(|e| {
                    map_err(MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_create", io_error: e }))
                })?;
        let data = MapData::from_fd(fd).map_err(map_err)?;
        let mut handles = Vec::new();
        for obj in objects.iter_mut() {
            let mode = obj.mode;
            let err = |source| UnwindError::Map { mode, map: "ap_unwind_procs", source };
            let outer = obj
                .ebpf
                .map_mut("ap_unwind_procs")
                .ok_or(MapError::InvalidName { name: "ap_unwind_procs".into() })
                .map_err(err)?;
            let mut outer = ArrayOfMaps::<_, MapData>::try_from(outer).map_err(err)?;
            outer.set(0, &data, 0).map_err(err)?;
            let tables = match obj.ebpf.map("ap_unwind_tables") {
                Some(Map::ArrayOfMaps(d)) => duplicate(d),
                _ => None,
            };
            let used = match obj.ebpf.map("ap_unwind_used") {
                Some(Map::Array(d)) => duplicate(d).and_then(|d| Array::try_from(Map::Array(d)).ok()),
                _ => None,
            };
            let missing = match obj.ebpf.map("ap_unwind_missing") {
                Some(Map::LruHashMap(d)) => duplicate(d).and_then(|d| BpfHashMap::try_from(Map::LruHashMap(d)).ok()),
                Some(Map::HashMap(d)) => duplicate(d).and_then(|d| BpfHashMap::try_from(Map::HashMap(d)).ok()),
                _ => None,
            };
            handles.push(ObjectMaps { mode, tables, used, missing });
        }
        let procs_map = BpfHashMap::try_from(Map::HashMap(data)).map_err(map_err)?;
        Ok(Worker {
            procs_map,
            objects: handles,
            cache: TableCache::new(settings.cache_dir.clone()).with_limit(settings.cache_max_bytes),
            budget: settings.budget_bytes,
            files: HashMap::new(),
            tables: HashMap::new(),
            evicted_at: HashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            procs: HashMap::new(),
            bytes: 0,
            stats: UnwindStats::default(),
            cache_dir: settings.cache_dir.clone(),
            vdso: None,
            vdso_temp: None,
        })
    }

    /// The thread's loop: answers requests, polls the walker's requests
    /// every [`POLL_EVERY`], forgets exited processes every
    /// [`SWEEP_EVERY`]; ends when the caller drops its sender.
    pub(super) fn run(mut self, requests: mpsc::Receiver<Request>, shared: &Shared) {
        let mut next_poll = Instant::now();
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut warned = false;
        loop {
            match requests.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
                Ok(Request::Add { pid, reply }) => {
                    let result = self.add_process(pid);
                    self.publish(shared);
                    let _ = reply.send(result);
                    continue;
                }
                Ok(Request::Poll) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if let Err(e) = self.poll() {
                // Counted (`refused`); said once, not at every poll.
                if !warned {
                    tracing::warn!("loading unwind tables failed: {e}; such processes are walked by frame pointers");
                    warned = true;
                }
            }
            if Instant::now() >= next_sweep {
                self.forget_exited();
                next_sweep = Instant::now() + SWEEP_EVERY;
            }
            self.publish(shared);
            next_poll = Instant::now() + POLL_EVERY;
        }
    }

    fn publish(&mut self, shared: &Shared) {
        let mut s = self.stats.clone();
        s.processes = self.procs.values().filter(|p| p.in_kernel).count();
        s.tables = self.tables.len();
        s.table_bytes = self.bytes;
        s.cache_removed = self.cache.removed();
        s.thread_cpu_ns = thread_cpu_ns();
        *shared.stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = s;
    }

    /// Takes the processes the walker asked for and adds those whose
    /// mappings may have changed. The first error other than an exited
    /// process is returned after the others were tried.
    fn poll(&mut self) -> Result<(), UnwindError> {
        let mut wanted = Vec::new();
        for obj in self.objects.iter_mut() {
            let Some(missing) = obj.missing.as_mut() else { continue };
            let pids: Vec<u32> = missing.keys().filter_map(Result::ok).collect();
            for pid in pids {
                let _ = missing.remove(&pid);
                wanted.push(pid);
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        let now = Instant::now();
        let mut first_error = None;
        for pid in wanted {
            // Read recently and still in the kernel (exec removes it): wait.
            if let Some(p) = self.procs.get(&pid)
                && p.fresh(now)
                && (!p.in_kernel || self.procs_map.get(&pid, 0).is_ok())
            {
                self.stats.rereads_skipped += 1;
                continue;
            }
            match self.add_process(pid) {
                Ok(_) | Err(UnwindError::Maps { .. }) => {} // exited meanwhile
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn forget_exited(&mut self) {
        let gone: Vec<u32> =
            self.procs.keys().copied().filter(|pid| !Path::new(&format!("/proc/{pid}")).exists()).collect();
        for pid in gone {
            self.procs.remove(&pid);
            let _ = self.procs_map.remove(&pid);
        }
    }

    /// Reads the mappings of `pid`, loads the tables they need and
    /// (re)writes its entry unless it is unchanged. Returns the mappings
    /// with a table.
    pub(super) fn add_process(&mut self, pid: u32) -> Result<usize, UnwindError> {
        let maps = exec_mappings(pid).map_err(|source| UnwindError::Maps { pid, source })?;
        self.stats.maps_read += 1;
        let mut value = Box::new(UnwindProc::default());
        let mut keys = Vec::new();
        for m in maps.iter().take(UNWIND_MAX_MAPPINGS) {
            let mut entry = UnwindMapping { start: m.start, end: m.end, bias: 0, table: UNWIND_NO_TABLE, rows: 0 };
            let source = if m.is_file() {
                Some(((m.dev, m.inode), open_path(pid, m)))
            } else if m.path == "[vdso]" {
                self.vdso_image().map(|p| (VDSO_ID, p))
            } else {
                None
            };
            if let Some((id, path)) = &source
                && let Some((slot, rows, bias)) = self.table_for(*id, path, m)
            {
                entry.table = slot;
                entry.rows = rows;
                entry.bias = bias;
                keys.push((value.n as usize, self.files.get(id).and_then(|f| f.key.clone())));
            } else if let Some((id, _)) = &source
                && self.files.get(id).and_then(|f| f.key.as_ref()).is_some_and(|k| !self.tables.contains_key(k))
            {
                // Its table was evicted recently and is not loaded again yet.
                entry.table = UNWIND_EVICTED;
            }
            value.maps[value.n as usize] = entry;
            value.n += 1;
        }
        // Loading a later mapping's table may have evicted an earlier one's.
        let mut with_table = 0;
        for (i, key) in keys {
            let loaded = key.and_then(|k| self.tables.get(&k)).map(|t| t.slot);
            if loaded == Some(value.maps[i].table) {
                with_table += 1;
            } else {
                value.maps[i].table = UNWIND_EVICTED;
            }
        }
        let now = Instant::now();
        if let Some(p) = self.procs.get_mut(&pid)
            && p.in_kernel
            && p.value == value
            && self.procs_map.get(&pid, 0).is_ok()
        {
            p.read_at = now;
            p.unchanged = p.unchanged.saturating_add(1);
            return Ok(with_table);
        }
        let inserted = self.procs_map.insert(pid, value.as_ref(), 0);
        let in_kernel = inserted.is_ok();
        let unchanged = match self.procs.get(&pid) {
            // Refused again: wait longer before the next try.
            Some(p) if !p.in_kernel && !in_kernel => p.unchanged.saturating_add(1),
            _ => 0,
        };
        self.procs.insert(pid, Process { value, read_at: now, unchanged, in_kernel });
        inserted.map_err(|source| {
            self.stats.refused += 1;
            UnwindError::Map {
                mode: self.objects.first().map_or(Mode::Cpu, |o| o.mode),
                map: "ap_unwind_procs",
                source,
            }
        })?;
        Ok(with_table)
    }

    /// The table slot, row count and load bias for a file mapping, loading
    /// the table if needed; `None` walks the mapping by frame pointers.
    fn table_for(&mut self, id: (u64, u64), path: &Path, m: &ExecMapping) -> Option<(u32, u32, u64)> {
        if !self.files.contains_key(&id) {
            let info = match self.cache.load(path) {
                Ok((key, table, origin)) => {
                    match origin {
                        Origin::Disk => self.stats.from_disk += 1,
                        Origin::Built => self.stats.built += 1,
                    }
                    let segments = ElfFile::open(path).map(|e| e.segments).unwrap_or_default();
                    let key = self.load_table(key, &table.rows);
                    FileInfo { key, segments }
                }
                Err(e) => {
                    tracing::debug!(path = %m.path, error = %e, "no unwind table; frame pointers for this file");
                    self.stats.without_table += 1;
                    FileInfo { key: None, segments: Vec::new() }
                }
            };
            self.files.insert(id, info);
        }
        let info = self.files.get(&id)?;
        let key = info.key.clone()?;
        let bias = load_bias(&info.segments, m.start, m.offset)?;
        if !self.tables.contains_key(&key) {
            // Evicted since: load it again (from the disk cache if kept),
            // unless that was recent.
            if self.evicted_at.get(&key).is_some_and(|at| at.elapsed() < RELOAD_AFTER) {
                return None;
            }
            let (k, table, _) = self.cache.load(path).ok()?;
            self.load_table(k, &table.rows)?;
        }
        let t = self.tables.get(&key)?;
        Some((t.slot, t.rows, bias))
    }

    /// This kernel's vDSO image as a file (written once per worker); `None`
    /// when it cannot be read. Under the cache directory every run of the
    /// agent rewrites the same file (atomically: one kernel, one image), so
    /// restarts leave nothing behind; without one it goes to a temporary
    /// directory of the worker's own.
    fn vdso_image(&mut self) -> Option<PathBuf> {
        if self.vdso.is_none() {
            let dumped = self.vdso_dir().and_then(|dir| aperture_symbolize::vdso::dump_own(&dir));
            self.vdso = Some(
                dumped
                    .map_err(|e| {
                        tracing::debug!(error = %e, "no vDSO image; its frames are walked by frame pointers");
                    })
                    .ok(),
            );
        }
        self.vdso.clone().flatten()
    }

    fn vdso_dir(&mut self) -> io::Result<PathBuf> {
        if let Some(dir) = &self.cache_dir {
            remove_per_process_vdso_dirs(dir);
            return Ok(dir.join("vdso"));
        }
        let temp = tempfile::Builder::new().prefix("aperture-vdso-").tempdir()?;
        let dir = temp.path().to_owned();
        self.vdso_temp = Some(temp);
        Ok(dir)
    }

    /// Creates the inner map of a table and stores it in every object.
    fn load_table(&mut self, key: TableKey, rows: &[Row]) -> Option<TableKey> {
        if self.tables.contains_key(&key) {
            return Some(key);
        }
        if rows.is_empty() || rows.len() > MAX_ROWS {
            return None;
        }
        let bytes = rows.len() as u64 * 8;
        if bytes > self.budget {
            tracing::warn!(
                key = key.as_str(),
                bytes,
                budget = self.budget,
                "unwind table larger than the whole budget"
            );
            return None;
        }
        while self.bytes + bytes > self.budget {
            if !self.evict_one() {
                return None;
            }
        }
        let slot = self.free_slots.pop().or_else(|| {
            (self.next_slot < UNWIND_MAX_TABLES).then(|| {
                self.next_slot += 1;
                self.next_slot - 1
            })
        });
        let slot = match slot {
            Some(s) => s,
            None => {
                if !self.evict_one() {
                    return None;
                }
                self.free_slots.pop()?
            }
        };
        let map = match fill_table(rows) {
            Ok((m, mapped)) => {
                if mapped {
                    self.stats.filled_mapped += 1;
                } else {
                    self.stats.filled_batched += 1;
                }
                m
            }
            Err(e) => {
                tracing::warn!(key = key.as_str(), error = %e, "creating an unwind table map failed");
                self.free_slots.push(slot);
                return None;
            }
        };
        for obj in &self.objects {
            let Some(outer) = &obj.tables else { continue };
            if let Err(e) = sys::map_update_fd(outer.fd().as_fd(), slot, map.fd().as_fd()) {
                tracing::warn!(mode = %obj.mode, error = %e, "storing an unwind table failed");
            }
        }
        self.bytes += bytes;
        self.evicted_at.remove(&key);
        self.tables.insert(key.clone(), Loaded { slot, rows: rows.len() as u32, _map: map });
        Some(key)
    }

    /// Evicts the least recently sampled table; false when none is loaded.
    fn evict_one(&mut self) -> bool {
        let objects = &self.objects;
        let used = |slot: u32| -> u64 {
            objects.iter().filter_map(|o| o.used.as_ref()).filter_map(|a| a.get(&slot, 0).ok()).max().unwrap_or(0)
        };
        // Least recently sampled first; among never-sampled ones the largest.
        let Some(key) =
            self.tables.iter().min_by_key(|(_, t)| (used(t.slot), u32::MAX - t.rows)).map(|(k, _)| k.clone())
        else {
            return false;
        };
        let Some(t) = self.tables.remove(&key) else { return false };
        // Mappings that point at the slot stop using it before it is reused.
        for (pid, p) in self.procs.iter_mut() {
            let mut changed = false;
            for m in p.value.maps.iter_mut().take(p.value.n as usize) {
                if m.table == t.slot {
                    m.table = UNWIND_EVICTED;
                    changed = true;
                }
            }
            if changed && p.in_kernel {
                let _ = self.procs_map.insert(*pid, p.value.as_ref(), 0);
            }
        }
        for obj in &self.objects {
            if let Some(outer) = &obj.tables {
                let _ = sys::map_delete_u32(outer.fd().as_fd(), t.slot);
            }
        }
        self.bytes -= u64::from(t.rows) * 8;
        self.free_slots.push(t.slot);
        self.evicted_at.insert(key, Instant::now());
        self.stats.evictions += 1;
        true
    }
}

/// A new table map holding `rows`. The maps are memory-mappable (as the
/// inner map template in `unwind.bpf.h` says): the rows are copied in
/// through a mapping, without a batch update's copy and checks per row; a
/// batch update a chunk at a time is the fallback.
/// The bool says whether the mapping was used.
fn fill_table(rows: &[Row]) -> io::Result<(MapData, bool)> {
    let fd = sys::array_u64_create("ap_unwind_rows", rows.len() as u32, BPF_F_INNER_MAP | BPF_F_MMAPABLE)?;
    let map = MapData::from_fd(fd).map_err(io::Error::other)?;
    if sys::mmapped_array_fill(map.fd().as_fd(), rows.iter().map(|r| r.to_u64())).is_ok() {
        return Ok((map, true));
    }
    let mut keys = Vec::with_capacity(ROWS_PER_WRITE.min(rows.len()));
    let mut values = Vec::with_capacity(ROWS_PER_WRITE.min(rows.len()));
    for (i, chunk) in rows.chunks(ROWS_PER_WRITE).enumerate() {
        let first = (i * ROWS_PER_WRITE) as u32;
        keys.clear();
        values.clear();
        keys.extend((0..chunk.len() as u32).map(|k| first + k));
        values.extend(chunk.iter().map(|r| r.to_u64()));
        sys::array_update_batch(map.fd().as_fd(), &keys, &values)?;
    }
    Ok((map, false))
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec.max(0) as u64) * 1_000_000_000 + ts.tv_nsec.max(0) as u64
}

/// A path that opens the mapped file from this mount namespace.
fn open_path(pid: u32, m: &ExecMapping) -> PathBuf {
    let via_map_files = m.map_file(pid);
    if std::fs::metadata(&via_map_files).is_ok() {
        return via_map_files;
    }
    PathBuf::from(format!("/proc/{pid}/root{}", m.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(unchanged: u32, read_at: Instant) -> Process {
        Process { value: Box::default(), read_at, unchanged, in_kernel: true }
    }

    #[test]
    fn unchanged_mappings_are_reread_ever_less_often_up_to_a_minute() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let fresh = process(0, t0);
        assert!(fresh.fresh(at(0)));
        assert!(!fresh.fresh(at(1)), "a changed or new process is re-read after a second");
        let thrice = process(3, t0);
        assert!(thrice.fresh(at(7)));
        assert!(!thrice.fresh(at(8)), "three unchanged reads: eight seconds");
        let many = process(40, t0);
        assert!(many.fresh(at(63)));
        assert!(!many.fresh(at(64)), "never longer than 64 s");
    }
}
