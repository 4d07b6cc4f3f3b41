//! Unwind tables in the kernel: which processes the walker knows, which
//! object tables are loaded, and the memory budget they share.
//!
//! Each object's table (built or read from the disk cache by
//! `aperture_symbolize::unwind`) becomes one BPF array of u64 rows, created
//! here with exactly its size and stored at one index of every loaded BPF
//! object's `ap_unwind_tables` map of maps: processes and modes mapping the
//! same file share it. A process is an `ap_unwind_procs` entry listing its
//! executable mappings with the table index and load bias of each.
//!
//! Processes are added explicitly ([`crate::Probes::unwind_process`]) or when
//! the walker met them without an entry or at an address outside their
//! known mappings (`ap_unwind_missing`, polled by
//! [`crate::Probes::unwind_refresh`]); exited ones are removed there too.
//! When the rows would pass the budget, the least recently sampled tables
//! are evicted; their mappings fall back to frame pointers and the walker
//! counts the frames that hit them.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aperture_core::model::Mode;
use aperture_symbolize::elf::{ElfFile, Segment, load_bias};
use aperture_symbolize::maps::{ExecMapping, exec_mappings};
use aperture_symbolize::unwind::{Origin, TableCache, TableKey};
use aya::maps::{Array, ArrayOfMaps, HashMap as BpfHashMap, MapData, MapError, PerCpuArray};

use super::LoadedObject;
use super::config::UnwindSettings;
use super::sys;
use crate::abi::{UNWIND_MAX_MAPPINGS, UNWIND_MAX_TABLES, UNWIND_NO_TABLE, UnwindMapping, UnwindProc, UnwindStat};

/// A mapping whose table was evicted (out of the outer map's range, so the
/// walker's lookup fails and is counted).
const UNWIND_EVICTED: u32 = u32::MAX - 1;
/// `BPF_F_INNER_MAP`: inner arrays of different sizes share one outer map.
const BPF_F_INNER_MAP: u32 = 1 << 12;
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
/// How long one refresh may spend installing what the builder prepared.
const REFRESH_BUDGET: Duration = Duration::from_millis(50);
/// A process's mappings are re-read at most this often on the walker's request.
const REREAD_EVERY: Duration = Duration::from_secs(1);
/// Tables larger than this many rows are not loaded (the walker's binary
/// search does 24 steps).
const MAX_ROWS: usize = 1 << 24;

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
    /// Objects without usable CFI (walked by frame pointers).
    pub without_table: u64,
    /// Tables evicted for the budget.
    pub evictions: u64,
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

/// A file the builder thread prepared.
struct BuiltFile {
    id: (u64, u64),
    /// `None`: no usable CFI.
    table: Option<(TableKey, Vec<aperture_symbolize::unwind::Row>, Origin)>,
    segments: Vec<Segment>,
}

/// What the builder thread prepared for one process.
struct Prepared {
    pid: u32,
    files: Vec<BuiltFile>,
}

/// The builder thread: reads the mappings of the processes it is sent and
/// builds (or reads from the disk cache) the table of every file it has not
/// seen before. It ends when the unwinder drops its sender.
fn spawn_builder(cache: TableCache) -> Option<(mpsc::Sender<u32>, mpsc::Receiver<Prepared>)> {
    let (req_tx, req_rx) = mpsc::channel::<u32>();
    let (done_tx, done_rx) = mpsc::channel();
    let spawned = std::thread::Builder::new().name("ap-unwind-build".into()).spawn(move || {
        let mut seen = std::collections::HashSet::new();
        for pid in req_rx {
            let Ok(maps) = exec_mappings(pid) else { continue };
            let mut files = Vec::new();
            for m in maps.iter().filter(|m| m.is_file()) {
                let id = (m.dev, m.inode);
                if !seen.insert(id) {
                    continue;
                }
                let path = open_path(pid, m);
                let (table, segments) = match cache.load(&path) {
                    Ok((key, table, origin)) => {
                        (Some((key, table.rows, origin)), ElfFile::open(&path).map(|e| e.segments).unwrap_or_default())
                    }
                    Err(e) => {
                        tracing::debug!(path = %m.path, error = %e, "no unwind table; frame pointers for this file");
                        (None, Vec::new())
                    }
                };
                files.push(BuiltFile { id, table, segments });
            }
            if done_tx.send(Prepared { pid, files }).is_err() {
                break;
            }
        }
    });
    match spawned {
        Ok(_) => Some((req_tx, done_rx)),
        Err(e) => {
            tracing::warn!(error = %e, "no unwind-table builder thread; processes are added only explicitly");
            None
        }
    }
}

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
}

pub(crate) struct Unwinder {
    /// The processes map every object reads through `ap_unwind_procs[0]`.
    procs_map: BpfHashMap<MapData, u32, UnwindProc>,
    cache: TableCache,
    budget: u64,
    files: HashMap<(u64, u64), FileInfo>,
    tables: HashMap<TableKey, Loaded>,
    free_slots: Vec<u32>,
    next_slot: u32,
    procs: HashMap<u32, Process>,
    bytes: u64,
    stats: UnwindStats,
    cache_dir: Option<PathBuf>,
    /// The vDSO image file, once looked for.
    vdso: Option<Option<PathBuf>>,
    /// The `sched_process_exec` hook is attached.
    pub(crate) exec_hooked: bool,
    /// Processes sent to the builder thread and not back yet.
    pending: std::collections::HashSet<u32>,
    builder: mpsc::Sender<u32>,
    built: mpsc::Receiver<Prepared>,
}

impl Unwinder {
    /// Creates the shared processes map and installs it in every object.
    pub(crate) fn new(settings: &UnwindSettings, objects: &mut [LoadedObject]) -> Result<Unwinder, UnwindError> {
        let create = |e: io::Error| UnwindError::Map {
            mode: objects.first().map_or(Mode::Cpu, |o| o.mode),
            map: "ap_unwind_procs",
            source: MapError::SyscallError(aya::sys::SyscallError { call: "bpf_map_create", io_error: e }),
        };
        let fd =
            sys::map_create("ap_unwind_procs", BPF_MAP_TYPE_HASH, 4, size_of::<UnwindProc>() as u32, MAX_PROCESSES, 0)
                .map_err(create)?;
        let data = MapData::from_fd(fd).map_err(|source| UnwindError::Map {
            mode: Mode::Cpu,
            map: "ap_unwind_procs",
            source,
        })?;
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
        }
        let procs_map = BpfHashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|source| UnwindError::Map {
            mode: Mode::Cpu,
            map: "ap_unwind_procs",
            source,
        })?;
        let cache = TableCache::new(settings.cache_dir.clone());
        let (builder, built) = spawn_builder(cache.clone()).unwrap_or_else(|| {
            // Without the thread: a sender nobody reads, a receiver nobody fills.
            let (tx, _) = mpsc::channel();
            let (_, rx) = mpsc::channel();
            (tx, rx)
        });
        Ok(Unwinder {
            exec_hooked: false,
            pending: std::collections::HashSet::new(),
            builder,
            built,
            procs_map,
            cache,
            budget: settings.budget_bytes,
            files: HashMap::new(),
            tables: HashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            procs: HashMap::new(),
            bytes: 0,
            stats: UnwindStats::default(),
            cache_dir: settings.cache_dir.clone(),
            vdso: None,
        })
    }

    /// Reads the mappings of `pid`, loads the tables they need and
    /// (re)writes its entry in every object. Returns the mappings with a table.
    pub(crate) fn add_process(&mut self, objects: &mut [LoadedObject], pid: u32) -> Result<usize, UnwindError> {
        let maps = exec_mappings(pid).map_err(|source| UnwindError::Maps { pid, source })?;
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
            if let Some((id, path)) = source
                && let Some((slot, rows, bias)) = self.table_for(objects, id, &path, m)
            {
                entry.table = slot;
                entry.rows = rows;
                entry.bias = bias;
                keys.push((value.n as usize, self.files.get(&id).and_then(|f| f.key.clone())));
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
        self.procs_map.insert(pid, value.as_ref(), 0).map_err(|source| UnwindError::Map {
            mode: objects.first().map_or(Mode::Cpu, |o| o.mode),
            map: "ap_unwind_procs",
            source,
        })?;
        self.procs.insert(pid, Process { value, read_at: Instant::now() });
        Ok(with_table)
    }

    /// Adds the processes the walker asked for and forgets exited ones.
    pub(crate) fn refresh(&mut self, objects: &mut [LoadedObject]) -> Result<(), UnwindError> {
        let mut wanted = Vec::new();
        for obj in objects.iter_mut() {
            let Some(map) = obj.ebpf.map_mut("ap_unwind_missing") else { continue };
            let Ok(mut missing) = BpfHashMap::<_, u32, u64>::try_from(map) else { continue };
            let pids: Vec<u32> = missing.keys().filter_map(Result::ok).collect();
            for pid in pids {
                let _ = missing.remove(&pid);
                wanted.push(pid);
            }
        }
        wanted.sort_unstable();
        wanted.dedup();
        // Building tables is the heaviest work here: the builder thread
        // does it; this thread only installs what it finished, and adds a
        // process once every file it maps is known (the last step reads
        // its maps again and writes its entry: cheap).
        for pid in wanted {
            // Read recently and still in the kernel (exec removes it): skip.
            let fresh = self.procs.get(&pid).is_some_and(|p| p.read_at.elapsed() < REREAD_EVERY)
                && self.procs_map.get(&pid, 0).is_ok();
            if fresh || !self.pending.insert(pid) {
                continue;
            }
            if self.builder.send(pid).is_err() {
                self.pending.remove(&pid);
            }
        }
        let deadline = Instant::now() + REFRESH_BUDGET;
        while Instant::now() < deadline {
            let Ok(prepared) = self.built.try_recv() else { break };
            for file in prepared.files {
                if self.files.contains_key(&file.id) {
                    continue;
                }
                let info = match file.table {
                    Some((key, rows, origin)) => {
                        match origin {
                            Origin::Disk => self.stats.from_disk += 1,
                            Origin::Built => self.stats.built += 1,
                        }
                        let key = self.load_table(objects, key, &rows);
                        FileInfo { key, segments: file.segments }
                    }
                    None => {
                        self.stats.without_table += 1;
                        FileInfo { key: None, segments: Vec::new() }
                    }
                };
                self.files.insert(file.id, info);
            }
            self.pending.remove(&prepared.pid);
            match self.add_process(objects, prepared.pid) {
                Ok(_) | Err(UnwindError::Maps { .. }) => {} // exited meanwhile
                Err(e) => return Err(e),
            }
        }
        let gone: Vec<u32> =
            self.procs.keys().copied().filter(|pid| !Path::new(&format!("/proc/{pid}")).exists()).collect();
        for pid in gone {
            self.procs.remove(&pid);
            let _ = self.procs_map.remove(&pid);
        }
        Ok(())
    }

    pub(crate) fn stats(&self, objects: &[LoadedObject]) -> UnwindStats {
        let mut s = self.stats.clone();
        s.processes = self.procs.len();
        s.tables = self.tables.len();
        s.table_bytes = self.bytes;
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

    /// The table slot, row count and load bias for a file mapping, loading
    /// the table if needed; `None` walks the mapping by frame pointers.
    fn table_for(
        &mut self,
        objects: &mut [LoadedObject],
        id: (u64, u64),
        path: &Path,
        m: &ExecMapping,
    ) -> Option<(u32, u32, u64)> {
        if !self.files.contains_key(&id) {
            let info = match self.cache.load(path) {
                Ok((key, table, origin)) => {
                    match origin {
                        Origin::Disk => self.stats.from_disk += 1,
                        Origin::Built => self.stats.built += 1,
                    }
                    let segments = ElfFile::open(path).map(|e| e.segments).unwrap_or_default();
                    let key = self.load_table(objects, key, &table.rows);
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
            // Evicted since: load it again (from the disk cache if kept).
            let (k, table, _) = self.cache.load(path).ok()?;
            self.load_table(objects, k, &table.rows)?;
        }
        let t = self.tables.get(&key)?;
        Some((t.slot, t.rows, bias))
    }

    /// This kernel's vDSO image as a file (written once, under the cache
    /// directory or the temporary one); `None` when it cannot be read.
    fn vdso_image(&mut self) -> Option<PathBuf> {
        if self.vdso.is_none() {
            let dir =
                self.cache_dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("vdso-{}", std::process::id()));
            self.vdso = Some(
                aperture_symbolize::vdso::dump_own(&dir)
                    .map_err(|e| {
                        tracing::debug!(error = %e, "no vDSO image; its frames are walked by frame pointers");
                    })
                    .ok(),
            );
        }
        self.vdso.clone().flatten()
    }

    /// Creates the inner map of a table and stores it in every object.
    fn load_table(
        &mut self,
        objects: &mut [LoadedObject],
        key: TableKey,
        rows: &[aperture_symbolize::unwind::Row],
    ) -> Option<TableKey> {
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
            if !self.evict_one(objects) {
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
                if !self.evict_one(objects) {
                    return None;
                }
                self.free_slots.pop()?
            }
        };
        let created = sys::array_u64_create("ap_unwind_rows", rows.len() as u32, BPF_F_INNER_MAP)
            .and_then(|fd| MapData::from_fd(fd).map_err(io::Error::other));
        let map = match created {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(key = key.as_str(), error = %e, "creating an unwind table map failed");
                self.free_slots.push(slot);
                return None;
            }
        };
        let keys: Vec<u32> = (0..rows.len() as u32).collect();
        let values: Vec<u64> = rows.iter().map(|r| r.to_u64()).collect();
        if let Err(e) = sys::array_update_batch(map.fd().as_fd(), &keys, &values) {
            tracing::warn!(key = key.as_str(), error = %e, "writing an unwind table failed");
            self.free_slots.push(slot);
            return None;
        }
        for obj in objects.iter_mut() {
            let Some(outer) = obj.ebpf.map_mut("ap_unwind_tables") else { continue };
            let Ok(mut outer) = ArrayOfMaps::<_, MapData>::try_from(outer) else { continue };
            if let Err(e) = outer.set(slot, &map, 0) {
                tracing::warn!(mode = %obj.mode, error = %e, "storing an unwind table failed");
            }
        }
        self.bytes += bytes;
        self.tables.insert(key.clone(), Loaded { slot, rows: rows.len() as u32, _map: map });
        Some(key)
    }

    /// Evicts the least recently sampled table; false when none is loaded.
    fn evict_one(&mut self, objects: &mut [LoadedObject]) -> bool {
        let used = |slot: u32| -> u64 {
            objects
                .iter()
                .filter_map(|o| o.ebpf.map("ap_unwind_used"))
                .filter_map(|m| Array::<_, u64>::try_from(m).ok())
                .filter_map(|a| a.get(&slot, 0).ok())
                .max()
                .unwrap_or(0)
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
            if changed {
                let _ = self.procs_map.insert(*pid, p.value.as_ref(), 0);
            }
        }
        for obj in objects.iter_mut() {
            if let Some(aya::maps::Map::ArrayOfMaps(outer)) = obj.ebpf.map("ap_unwind_tables") {
                let _ = sys::map_delete_u32(outer.fd().as_fd(), t.slot);
            }
        }
        self.bytes -= u64::from(t.rows) * 8;
        self.free_slots.push(t.slot);
        self.stats.evictions += 1;
        true
    }
}

/// A path that opens the mapped file from this mount namespace.
fn open_path(pid: u32, m: &ExecMapping) -> PathBuf {
    let via_map_files = m.map_file(pid);
    if std::fs::metadata(&via_map_files).is_ok() {
        return via_map_files;
    }
    PathBuf::from(format!("/proc/{pid}/root{}", m.path))
}
