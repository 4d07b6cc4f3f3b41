//! Stack symbolization with blazesym.
//!
//! Kernel frames are resolved through kallsyms. User frames are mapped to a
//! file and an offset in it, and resolved from the file's ELF symbol tables
//! (`.symtab`, else `.dynsym`), opened through `/proc/<pid>/root` so
//! binaries inside containers resolve, or through `/proc/<pid>/map_files`
//! when the file on disk was replaced since the process mapped it.
//!
//! Memory and CPU are bounded, because an always-on agent sees every
//! process of a busy node (compilers, linkers, test binaries...):
//!
//! - Results are cached by *file identity and offset* (device, inode, file
//!   offset), so one libc serves every process that maps it and an address
//!   is resolved once. The frame caches, the per-process memory maps and
//!   the paths found for files are bounded ([`SymbolizerLimits`]) and evict
//!   what was used least recently (two generations: an entry survives a
//!   rotation only if it was used since the previous one).
//! - blazesym keeps every file it opened mapped and indexed; at most
//!   [`SymbolizerLimits::open_files`] stay open, the least recently used is
//!   evicted from blazesym's cache (its mapping is released).
//! - DWARF is not read by default (file and line stay empty): parsing the
//!   debug information of large binaries cost more memory and CPU than all
//!   the rest of the agent, and the function name, which is what profiles
//!   aggregate on, comes from the ELF symbol table.
//! - A process's mappings are looked up one address at a time with the
//!   `PROCMAP_QUERY` ioctl (Linux 6.11+) and remembered, instead of reading
//!   and parsing all of `/proc/<pid>/maps`, whose cost grows with every
//!   mapping of the process (thousands for a compiler). Older kernels fall
//!   back to reading the whole file.
//!
//! Nothing here fails: a frame that cannot be resolved (exited process,
//! stripped binary, JIT code) is kept with its address and, when known, its
//! module and offset in the module.

use std::collections::HashMap;
use std::fs::File;
use std::hash::Hash;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aperture_core::model::{Stack, StackFrame};
use blazesym::MaybeDefault;
use blazesym::symbolize::evict::{self, Evict};
use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Symbolized};

/// Without `PROCMAP_QUERY`, a process's maps are re-read on a miss at most this often.
const MAPS_REFRESH: Duration = Duration::from_millis(200);

/// Bounds of a [`Symbolizer`]'s caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymbolizerLimits {
    /// Resolved user frames kept, by (file, offset).
    pub user_frames: usize,
    /// Resolved kernel frames kept, by address.
    pub kernel_frames: usize,
    /// Processes whose mappings are kept.
    pub processes: usize,
    /// Files blazesym keeps open and indexed.
    pub open_files: usize,
    /// Read DWARF for file and line (and names missing from the symbol tables).
    pub debug_info: bool,
}

impl Default for SymbolizerLimits {
    fn default() -> Self {
        SymbolizerLimits {
            user_frames: 16_384,
            kernel_frames: 4_096,
            processes: 512,
            open_files: 32,
            debug_info: false,
        }
    }
}

/// Counters of a [`Symbolizer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    /// Frames answered from a cache.
    pub cache_hits: u64,
    /// Frames resolved to a symbol by blazesym.
    pub resolved: u64,
    /// Frames kept without a symbol.
    pub unresolved: u64,
    /// Cache entries dropped at their bound (frames, processes, paths).
    pub evictions: u64,
    /// Files closed in blazesym because more than `open_files` were open.
    pub files_closed: u64,
}

/// A map bounded to `capacity` entries that forgets what was used least
/// recently: entries live in a current and a previous generation; a hit in
/// the previous one moves the entry to the current one, and when the
/// current one is full it becomes the previous one (the old previous one
/// is dropped). An entry used at least once per `capacity / 2` insertions
/// is never evicted.
#[derive(Debug)]
pub(crate) struct Bounded<K, V> {
    current: HashMap<K, V>,
    previous: HashMap<K, V>,
    half: usize,
    evicted: u64,
}

impl<K: Eq + Hash, V> Bounded<K, V> {
    pub(crate) fn new(capacity: usize) -> Bounded<K, V> {
        Bounded { current: HashMap::new(), previous: HashMap::new(), half: (capacity / 2).max(1), evicted: 0 }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<&mut V> {
        if !self.current.contains_key(key) {
            let (k, v) = self.previous.remove_entry(key)?;
            self.insert(k, v);
        }
        self.current.get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.current.len() >= self.half && !self.current.contains_key(&key) {
            self.evicted += self.previous.len() as u64;
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        self.current.remove(key).or_else(|| self.previous.remove(key))
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        self.current.retain(&mut keep);
        self.previous.retain(&mut keep);
    }

    pub(crate) fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    /// Entries dropped at the bound so far.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }
}

/// A resolved frame as cached (without the address, which differs between
/// processes for the same file offset).
#[derive(Clone, Debug)]
struct CachedFrame {
    symbol: Box<str>,
    module: Box<str>,
    file: Box<str>,
    line: u32,
}

impl CachedFrame {
    fn of(frame: &StackFrame) -> CachedFrame {
        CachedFrame {
            symbol: frame.symbol.as_str().into(),
            module: frame.module.as_str().into(),
            file: frame.file.as_str().into(),
            line: frame.line,
        }
    }

    fn frame(&self, address: u64, module_offset: u64, kernel: bool) -> StackFrame {
        StackFrame {
            address,
            symbol: self.symbol.to_string(),
            module: self.module.to_string(),
            module_offset,
            file: self.file.to_string(),
            line: self.line,
            kernel,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    inode: u64,
    /// Path as seen inside the process's mount namespace; empty for
    /// anonymous mappings, `[vdso]` and the like for special ones.
    path: String,
    /// The file's GNU build id, when the kernel reported it.
    build_id: Box<[u8]>,
}

/// The part of a [`Mapping`] needed on every frame (no allocation to copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u64,
    offset: u64,
    dev: u64,
    inode: u64,
}

impl Mapping {
    fn span(&self) -> Span {
        Span { start: self.start, offset: self.offset, dev: self.dev, inode: self.inode }
    }
}

#[derive(Debug)]
struct ProcessMaps {
    /// Executable mappings known so far, sorted by address.
    mappings: Vec<Mapping>,
    read_at: Instant,
}

impl ProcessMaps {
    fn find(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.end <= addr);
        self.mappings.get(i).filter(|m| m.start <= addr)
    }

    fn add(&mut self, m: Mapping) {
        let i = self.mappings.partition_point(|x| x.start < m.start);
        if self.mappings.get(i).is_some_and(|x| x.start == m.start) {
            self.mappings[i] = m;
        } else {
            self.mappings.insert(i, m);
        }
        // A remapped range may overlap what was known: drop the stale part.
        let mut last_end = 0;
        self.mappings.retain(|x| {
            let keep = x.start >= last_end;
            if keep {
                last_end = x.end;
            }
            keep
        });
    }
}

/// Identity of a code location independent of the process: file + offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileOffsetKey {
    dev: u64,
    inode: u64,
    offset: u64,
}

/// Whether `PROCMAP_QUERY` works on this kernel (unknown until first tried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Query {
    Unknown,
    Works,
    Unsupported,
}

/// Turns raw stacks into [`Stack`]s. One per symbolizing thread.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    limits: SymbolizerLimits,
    kernel: Bounded<u64, CachedFrame>,
    user: Bounded<FileOffsetKey, CachedFrame>,
    processes: Bounded<u32, ProcessMaps>,
    /// A path blazesym can open for each (dev, inode), once found.
    file_paths: Bounded<(u64, u64), PathBuf>,
    /// Whether each (dev, inode) looked for has a separate debug file
    /// (`/usr/lib/debug/.build-id/..`).
    debug_files: Bounded<(u64, u64), bool>,
    /// Loadable segments of the stripped files looked up in a debug file.
    segments: Bounded<(u64, u64), Vec<Segment>>,
    /// Files open in blazesym, least recently used first, with their identity.
    open_files: Vec<(PathBuf, (u64, u64))>,
    query: Query,
    name_buf: Vec<u8>,
    /// A file was opened (and its symbol table indexed, touching all of it)
    /// since the last [`Symbolizer::release_file_pages`].
    opened_since_release: bool,
    stats: SymbolizeStats,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer")
            .field("kernel_cached", &self.kernel.len())
            .field("user_cached", &self.user.len())
            .field("processes", &self.processes.len())
            .field("open_files", &self.open_files.len())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Symbolizer::new()
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches and the default [`SymbolizerLimits`].
    pub fn new() -> Symbolizer {
        Symbolizer::with_limits(SymbolizerLimits::default())
    }

    /// A symbolizer with empty caches bounded by `limits`.
    pub fn with_limits(limits: SymbolizerLimits) -> Symbolizer {
        let inner = blazesym::symbolize::Symbolizer::builder()
            // Files are identified by (dev, inode) here; a replaced file is
            // a new identity and its stale entry is evicted (see `note_open`),
            // so blazesym need not stat every file on every lookup.
            .enable_auto_reload(false)
            .enable_code_info(limits.debug_info)
            .enable_inlined_fns(false)
            .build();
        Symbolizer {
            inner,
            limits,
            kernel: Bounded::new(limits.kernel_frames),
            user: Bounded::new(limits.user_frames),
            processes: Bounded::new(limits.processes),
            file_paths: Bounded::new(limits.processes.max(64) * 4),
            debug_files: Bounded::new(limits.processes.max(64) * 4),
            segments: Bounded::new(limits.open_files.max(1) * 4),
            open_files: Vec::new(),
            query: Query::Unknown,
            name_buf: vec![0; 4096],
            opened_since_release: false,
            stats: SymbolizeStats::default(),
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> SymbolizeStats {
        SymbolizeStats {
            evictions: self.kernel.evicted()
                + self.user.evicted()
                + self.processes.evicted()
                + self.file_paths.evicted()
                + self.debug_files.evicted(),
            ..self.stats
        }
    }

    /// Cached frames (user, kernel) right now; at most the limits.
    pub fn cached_frames(&self) -> (usize, usize) {
        (self.user.len(), self.kernel.len())
    }

    /// Files open in blazesym right now; at most `open_files`.
    pub fn open_files(&self) -> usize {
        self.open_files.len()
    }

    /// The stack of one event: kernel frames (innermost) then user frames,
    /// leaf first, with its hash.
    pub fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
        let mut frames = Vec::with_capacity(kernel.len() + user.len());
        self.kernel_frames(kernel, &mut frames);
        // The stack was taken inside one of Aperture's own programs: its
        // frames say nothing about the profiled code.
        frames.retain(|f| !is_own_bpf_frame(&f.symbol));
        self.user_frames(pid, user, &mut frames);
        if self.opened_since_release {
            // Indexing a newly opened symbol table touched all of it; give
            // those pages back now rather than at the next periodic call.
            self.release_file_pages();
        }
        Stack::new(frames)
    }

    /// Appends the frames of kernel addresses (leaf first) to `out`.
    pub fn kernel_frames(&mut self, addrs: &[u64], out: &mut Vec<StackFrame>) {
        for (i, &addr) in addrs.iter().enumerate() {
            // Callers' addresses are return addresses: look up the call. The
            // cache is keyed by what was looked up, so a leaf and a return
            // address at the same place do not share an entry.
            let lookup = if i == 0 { addr } else { addr.saturating_sub(1) };
            if let Some(f) = self.kernel.get(&lookup) {
                self.stats.cache_hits += 1;
                out.push(f.frame(addr, 0, true));
                continue;
            }
            let src = Source::Kernel(Kernel {
                kallsyms: MaybeDefault::Default,
                vmlinux: MaybeDefault::None,
                debug_syms: false,
                ..Kernel::default()
            });
            let mut frame =
                StackFrame { address: addr, module: "[kernel]".to_owned(), kernel: true, ..StackFrame::default() };
            match self.inner.symbolize_single(&src, Input::AbsAddr(lookup)) {
                Ok(Symbolized::Sym(sym)) => {
                    self.stats.resolved += 1;
                    frame.symbol = sym.name.into_owned();
                    if let Some(m) = sym.module.as_deref() {
                        let m = m.to_string_lossy();
                        if !m.is_empty() {
                            frame.module = if m.starts_with('[') { m.into_owned() } else { format!("[{m}]") };
                        }
                    }
                }
                _ => self.stats.unresolved += 1,
            }
            self.kernel.insert(lookup, CachedFrame::of(&frame));
            out.push(frame);
        }
    }

    /// Appends the frames of user addresses of process `pid` (leaf first).
    pub fn user_frames(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<StackFrame>) {
        for (i, &addr) in addrs.iter().enumerate() {
            if let Some(name) = crate::abi::marker_frame(addr) {
                out.push(StackFrame { address: addr, symbol: name.to_owned(), ..StackFrame::default() });
                continue;
            }
            let Some(m) = self.mapping(pid, addr) else {
                self.stats.unresolved += 1;
                out.push(StackFrame { address: addr, ..StackFrame::default() });
                continue;
            };
            let file_offset = addr - m.start + m.offset;
            // As for kernel frames: callers are looked up (and cached) at
            // their return address minus one.
            let lookup = if i == 0 { file_offset } else { file_offset.saturating_sub(1) };
            let key = FileOffsetKey { dev: m.dev, inode: m.inode, offset: lookup };
            if m.inode != 0
                && let Some(f) = self.user.get(&key)
            {
                self.stats.cache_hits += 1;
                out.push(f.frame(addr, file_offset, false));
                continue;
            }
            let frame = self.resolve_user(pid, addr, m, file_offset, lookup);
            if m.inode != 0 {
                self.user.insert(key, CachedFrame::of(&frame));
            }
            out.push(frame);
        }
    }

    /// Resolves one user frame that is not cached.
    fn resolve_user(&mut self, pid: u32, addr: u64, span: Span, file_offset: u64, lookup: u64) -> StackFrame {
        let Some(m) = self.processes.get(&pid).and_then(|p| p.find(addr)).cloned() else {
            self.stats.unresolved += 1;
            return StackFrame { address: addr, module_offset: file_offset, ..StackFrame::default() };
        };
        let module = Path::new(&m.path).file_name().map_or_else(|| m.path.clone(), |n| n.to_string_lossy().into());
        let mut frame = StackFrame { address: addr, module_offset: file_offset, module, ..StackFrame::default() };
        let id = (span.dev, span.inode);
        let path = if span.inode == 0 { None } else { self.openable_path(pid, &m) };
        let Some(path) = path else {
            self.stats.unresolved += 1;
            return frame;
        };
        let mut found = self.lookup_elf_at(&path, id, Input::FileOffset(lookup), self.limits.debug_info);
        if found.is_none()
            && !self.limits.debug_info
            && let Some(debug) = self.debug_file(id, &m.build_id)
            && let Some(vaddr) = self.virtual_offset(id, &path, lookup)
        {
            // A stripped file (only .dynsym, like distribution libraries):
            // the .symtab of its separate debug file has the local symbols,
            // at the same virtual addresses (its file offsets differ: the
            // code is not in it). DWARF is still not read.
            found = self.lookup_elf_at(&debug, (id.0, !id.1), Input::VirtOffset(vaddr), false);
        }
        match found {
            Some(Ok((symbol, file, line))) => {
                self.stats.resolved += 1;
                (frame.symbol, frame.file, frame.line) = (symbol, file, line);
            }
            Some(Err(())) => {
                // The path no longer opens (the process that lent its
                // map_files entry exited...): find another next time.
                self.stats.unresolved += 1;
                self.file_paths.remove(&id);
            }
            None => self.stats.unresolved += 1,
        }
        frame
    }

    /// Looks `input` up in the ELF file at `path`: `Some(Ok)` with the
    /// symbol, file and line; `None` when the file has no symbol there;
    /// `Some(Err)` when the file cannot be read.
    #[allow(clippy::type_complexity, reason = "private helper")]
    fn lookup_elf_at(
        &mut self,
        path: &Path,
        id: (u64, u64),
        input: Input<u64>,
        debug_syms: bool,
    ) -> Option<Result<(String, String, u32), ()>> {
        self.note_open(path, id);
        let mut elf = Elf::new(path);
        elf.debug_syms = debug_syms;
        match self.inner.symbolize_single(&Source::Elf(elf), input) {
            Ok(Symbolized::Sym(sym)) => {
                let (file, line) = match &sym.code_info {
                    Some(ci) => (ci.to_path().to_string_lossy().into_owned(), ci.line.unwrap_or(0)),
                    None => (String::new(), 0),
                };
                Some(Ok((sym.name.into_owned(), file, line)))
            }
            Ok(_) => None,
            Err(_) => Some(Err(())),
        }
    }

    /// The separate debug file of the file `id` with `build_id`, if installed.
    fn debug_file(&mut self, id: (u64, u64), build_id: &[u8]) -> Option<PathBuf> {
        if let Some(known) = self.debug_files.get(&id) {
            return known.then(|| debug_file_path(build_id)).flatten();
        }
        let found = debug_file_path(build_id).filter(|p| p.is_file());
        self.debug_files.insert(id, found.is_some());
        found
    }

    /// The virtual address (as in the symbol tables) of `offset` in the
    /// file `id` at `path`, from its loadable segments.
    fn virtual_offset(&mut self, id: (u64, u64), path: &Path, offset: u64) -> Option<u64> {
        if self.segments.get(&id).is_none() {
            self.segments.insert(id, load_segments(path).unwrap_or_default());
        }
        let segments = self.segments.get(&id)?;
        segments
            .iter()
            .find(|s| s.offset <= offset && offset < s.offset + s.file_size)
            .map(|s| offset - s.offset + s.vaddr)
    }

    /// Drops this process's page-table references to the pages of the files
    /// blazesym has open (it maps each whole file read-only and shared, and
    /// indexing a symbol table touches all of it: 15 MiB for a compiler's
    /// `librustc_driver`). The pages stay in the page cache, so later
    /// lookups fault in only the few they read; until then they no longer
    /// count in the agent's resident memory. Returns the number of mappings
    /// advised. Call it from time to time (the agent does every 10 s).
    pub fn release_file_pages(&mut self) -> usize {
        self.opened_since_release = false;
        if self.open_files.is_empty() {
            return 0;
        }
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return 0 };
        let mut advised = 0;
        for line in maps.lines() {
            // Only read-only shared mappings (`r--s`) of the files open in blazesym.
            if line.split_whitespace().nth(1) != Some("r--s") {
                continue;
            }
            let Some((_, m)) = parse_maps_line(line) else { continue };
            if !self.open_files.iter().any(|(_, id)| *id == (m.dev, m.inode)) {
                continue;
            }
            let len = (m.end - m.start) as usize;
            // SAFETY: the range is a read-only shared file mapping of this
            // process (blazesym's): MADV_DONTNEED only drops the page-table
            // entries, and the next access reads the same file contents back
            // from the page cache. Nothing else runs in the symbolizer
            // concurrently (it is not Sync).
            if unsafe { libc::madvise(m.start as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0 {
                advised += 1;
            }
        }
        advised
    }

    /// Forgets a process's memory map (call when it exits).
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Forgets the memory maps of processes that no longer exist.
    pub fn forget_exited(&mut self) {
        self.processes.retain(|pid, _| Path::new(&format!("/proc/{pid}")).exists());
    }

    /// Records that blazesym is about to use `path` (file `id`): keeps the
    /// open files in least-recently-used order and evicts the oldest beyond
    /// the limit, or a stale entry for the same path naming another file.
    fn note_open(&mut self, path: &Path, id: (u64, u64)) {
        if let Some(i) = self.open_files.iter().position(|(p, _)| p == path) {
            let (p, old) = self.open_files.remove(i);
            if old != id {
                // Same path, another file (replaced on disk): drop the old one.
                let _ = self.inner.evict(&Evict::Elf(evict::Elf::new(&p)));
                self.stats.files_closed += 1;
            }
            self.open_files.push((p, id));
            return;
        }
        self.open_files.push((path.to_path_buf(), id));
        self.opened_since_release = true;
        while self.open_files.len() > self.limits.open_files.max(1) {
            let (p, _) = self.open_files.remove(0);
            let _ = self.inner.evict(&Evict::Elf(evict::Elf::new(p)));
            self.stats.files_closed += 1;
        }
    }

    fn mapping(&mut self, pid: u32, addr: u64) -> Option<Span> {
        if self.processes.get(&pid).is_none() {
            let entry = ProcessMaps { mappings: Vec::new(), read_at: Instant::now() };
            self.processes.insert(pid, entry);
            if self.query == Query::Unsupported {
                self.reread(pid);
            }
        }
        let query = self.query;
        let procs = &mut self.processes;
        let maps = procs.get(&pid)?;
        if let Some(m) = maps.find(addr) {
            return Some(m.span());
        }
        if query != Query::Unsupported {
            // Opened per miss rather than kept: misses are rare once a
            // process's mappings are known, and no descriptor is held for
            // processes that exited (or whose pid was reused).
            let file = File::open(format!("/proc/{pid}/maps")).ok()?; // None: exited
            match procmap_query(file.as_raw_fd(), addr, &mut self.name_buf) {
                QueryResult::Found(m) => {
                    self.query = Query::Works;
                    let found = m.span();
                    maps.add(m);
                    return Some(found);
                }
                QueryResult::NotMapped => {
                    self.query = Query::Works;
                    return None;
                }
                QueryResult::Unsupported if query == Query::Unknown => {
                    tracing::debug!("PROCMAP_QUERY not supported by this kernel; reading /proc/<pid>/maps");
                    self.query = Query::Unsupported;
                }
                QueryResult::Unsupported | QueryResult::Failed => return None,
            }
        }
        // Without PROCMAP_QUERY: a miss on old maps may be a new dlopen: re-read.
        if maps.read_at.elapsed() >= MAPS_REFRESH || maps.mappings.is_empty() {
            self.reread(pid);
        }
        self.processes.get(&pid)?.find(addr).map(Mapping::span)
    }

    /// Reads all of `/proc/<pid>/maps` into the process's entry (fallback).
    fn reread(&mut self, pid: u32) {
        let Some(mappings) = read_maps(pid) else { return }; // exited: keep what we had
        if let Some(p) = self.processes.get(&pid) {
            p.mappings = mappings;
            p.read_at = Instant::now();
        }
    }

    /// A path to the mapped file that blazesym can open: the host path when
    /// it is the same file (same dev+inode), else the path through the
    /// process's root (containers), else the process's `map_files` entry
    /// (the file was replaced or deleted since it was mapped).
    fn openable_path(&mut self, pid: u32, m: &Mapping) -> Option<PathBuf> {
        if let Some(p) = self.file_paths.get(&(m.dev, m.inode)) {
            return Some(p.clone());
        }
        let same_file = |p: &Path| std::fs::metadata(p).is_ok_and(|md| md.ino() == m.inode && md.dev() == m.dev);
        let path = m.path.strip_suffix(" (deleted)").unwrap_or(&m.path);
        let host = PathBuf::from(path);
        let through_root = PathBuf::from(format!("/proc/{pid}/root{path}"));
        let map_file = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
        let found = if same_file(&host) {
            Some(host)
        } else if same_file(&through_root) || std::fs::metadata(&through_root).is_ok_and(|md| md.ino() == m.inode) {
            Some(through_root)
        } else if std::fs::metadata(&map_file).is_ok_and(|md| md.ino() == m.inode) {
            Some(map_file)
        } else {
            None
        };
        // Only remember successes: a failure may be a process that exited.
        if let Some(p) = &found {
            self.file_paths.insert((m.dev, m.inode), p.clone());
        }
        found
    }
}

/// `struct procmap_query` (include/uapi/linux/fs.h), 104 bytes.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}
const _: () = assert!(size_of::<ProcmapQuery>() == 104);

/// `PROCMAP_QUERY`, `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: libc::c_ulong = 0xC068_6611;
/// `PROCMAP_QUERY_VMA_EXECUTABLE`.
const PROCMAP_QUERY_VMA_EXECUTABLE: u64 = 0x04;
/// `BUILD_ID_SIZE_MAX`.
const BUILD_ID_SIZE_MAX: usize = 20;

enum QueryResult {
    /// The executable mapping covering the address.
    Found(Mapping),
    /// Nothing executable is mapped there.
    NotMapped,
    /// The kernel has no `PROCMAP_QUERY` (before 6.11).
    Unsupported,
    /// Any other error (the process exited...).
    Failed,
}

/// Asks the kernel for the mapping covering `addr` through the open
/// `/proc/<pid>/maps` file `fd`; `name` receives the mapping's path.
fn procmap_query(fd: libc::c_int, addr: u64, name: &mut [u8]) -> QueryResult {
    let mut build_id = [0u8; BUILD_ID_SIZE_MAX];
    let mut q = ProcmapQuery {
        size: size_of::<ProcmapQuery>() as u64,
        query_flags: PROCMAP_QUERY_VMA_EXECUTABLE,
        query_addr: addr,
        vma_name_size: u32::try_from(name.len()).unwrap_or(u32::MAX),
        vma_name_addr: name.as_mut_ptr() as u64,
        build_id_size: BUILD_ID_SIZE_MAX as u32,
        build_id_addr: build_id.as_mut_ptr() as u64,
        ..ProcmapQuery::default()
    };
    // SAFETY: `q` is a valid procmap_query of the size it declares; the
    // kernel writes at most `vma_name_size` bytes to `name` and at most
    // `build_id_size` bytes to `build_id`, both live and that long.
    let ret = unsafe { libc::ioctl(fd, PROCMAP_QUERY, &raw mut q) };
    if ret < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) => QueryResult::NotMapped,
            Some(libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) => QueryResult::Unsupported,
            _ => QueryResult::Failed,
        };
    }
    let len = (q.vma_name_size as usize).min(name.len());
    let bytes = &name[..len];
    let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
    QueryResult::Found(Mapping {
        start: q.vma_start,
        end: q.vma_end,
        offset: q.vma_offset,
        dev: encode_dev(u64::from(q.dev_major), u64::from(q.dev_minor)),
        inode: q.inode,
        path: String::from_utf8_lossy(bytes).into_owned(),
        build_id: build_id[..(q.build_id_size as usize).min(BUILD_ID_SIZE_MAX)].into(),
    })
}

/// A `PT_LOAD` program header: where a file's bytes land in its virtual
/// address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    file_size: u64,
    vaddr: u64,
}

/// The `PT_LOAD` segments of the 64-bit little-endian ELF file at `path`,
/// from its file header and program header table only (a few hundred
/// bytes; symbols are blazesym's business).
fn load_segments(path: &Path) -> Option<Vec<Segment>> {
    use std::io::{Read, Seek, SeekFrom};
    const PT_LOAD: u32 = 1;
    let mut f = File::open(path).ok()?;
    let mut ehdr = [0u8; 64];
    f.read_exact(&mut ehdr).ok()?;
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let (phoff, entsize, count) = (u64_at(&ehdr, 32), usize::from(u16_at(&ehdr, 54)), usize::from(u16_at(&ehdr, 56)));
    if entsize < 56 || count == 0 || count == 0xffff {
        return None;
    }
    let mut table = vec![0u8; entsize * count];
    f.seek(SeekFrom::Start(phoff)).ok()?;
    f.read_exact(&mut table).ok()?;
    let segments = table
        .chunks_exact(entsize)
        .filter(|ph| u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == PT_LOAD)
        .map(|ph| Segment { offset: u64_at(ph, 8), vaddr: u64_at(ph, 16), file_size: u64_at(ph, 32) })
        .collect();
    Some(segments)
}

/// Where Debian, Fedora and others install the separate debug file of a
/// build id: `/usr/lib/debug/.build-id/<first byte>/<rest>.debug`.
fn debug_file_path(build_id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = build_id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let rest: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    Some(PathBuf::from(format!("/usr/lib/debug/.build-id/{first:02x}/{rest}.debug")))
}

/// The encoding of st_dev (new_encode_dev), so it compares with stat().
fn encode_dev(major: u64, minor: u64) -> u64 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Reads `/proc/<pid>/maps` (executable mappings only, sorted by address).
fn read_maps(pid: u32) -> Option<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut out: Vec<Mapping> =
        text.lines().filter_map(parse_maps_line).filter(|(exec, _)| *exec).map(|(_, m)| m).collect();
    out.sort_by_key(|m| m.start);
    Some(out)
}

/// Parses one `/proc/<pid>/maps` line: `start-end perms offset maj:min inode path`.
fn parse_maps_line(line: &str) -> Option<(bool, Mapping)> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, offset, dev, inode) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    let path = it.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let (major, minor) = (u64::from_str_radix(major, 16).ok()?, u64::from_str_radix(minor, 16).ok()?);
    let mapping = Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: encode_dev(major, minor),
        inode: inode.parse().ok()?,
        path,
        build_id: Box::default(),
    };
    Some((perms.as_bytes().get(2) == Some(&b'x'), mapping))
}

/// Whether a kernel symbol is one of Aperture's BPF programs
/// (`bpf_prog_<tag>_ap_<name>`).
fn is_own_bpf_frame(symbol: &str) -> bool {
    symbol
        .strip_prefix("bpf_prog_")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(_, name)| name.starts_with("ap_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_bpf_programs_are_recognised() {
        assert!(is_own_bpf_frame("bpf_prog_6deef7357e7b4530_ap_lockend_btf"));
        assert!(!is_own_bpf_frame("bpf_prog_6deef7357e7b4530_other_prog"));
        assert!(!is_own_bpf_frame("bpf_trace_run2"));
        assert!(!is_own_bpf_frame("ap_something"));
    }

    #[test]
    fn parses_maps_lines() {
        let (exec, m) =
            parse_maps_line("7f1c2a028000-7f1c2a1bd000 r-xp 00028000 fe:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6")
                .expect("parses");
        assert!(exec);
        assert_eq!((m.start, m.end, m.offset, m.inode), (0x7f1c2a028000, 0x7f1c2a1bd000, 0x28000, 1835));
        assert_eq!(m.dev, 0xfe01);
        assert_eq!(m.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let (exec, m) =
            parse_maps_line("7ffd5b1f0000-7ffd5b1f2000 r-xp 00000000 00:00 0                          [vdso]")
                .expect("parses");
        assert!(exec);
        assert_eq!(m.path, "[vdso]");
        let (exec, _) = parse_maps_line("55d0c0000000-55d0c0021000 rw-p 00000000 00:00 0 ").expect("parses");
        assert!(!exec);
    }

    #[inline(never)]
    fn symbolize_me() -> u64 {
        std::hint::black_box(7)
    }

    #[inline(never)]
    fn symbolize_me_too() -> u64 {
        std::hint::black_box(8)
    }

    #[test]
    fn own_function_resolves_and_unknown_addresses_are_kept() {
        let mut s = Symbolizer::new();
        let addr = symbolize_me as fn() -> u64 as usize as u64;
        let stack = s.stack(std::process::id(), &[], &[addr, 0x10]);
        assert_eq!(stack.frames.len(), 2);
        assert!(stack.frames[0].symbol.contains("symbolize_me"), "{:?}", stack.frames[0]);
        assert!(!stack.frames[0].module.is_empty());
        assert_eq!(stack.frames[1].address, 0x10);
        assert!(stack.frames[1].symbol.is_empty());
        // Second time from the cache.
        let again = s.stack(std::process::id(), &[], &[addr]);
        assert_eq!(again.frames[0].symbol, stack.frames[0].symbol);
        assert_eq!(again.frames[0].module_offset, stack.frames[0].module_offset);
        assert!(s.stats().cache_hits >= 1);
    }

    #[test]
    fn bounded_map_evicts_least_recently_used() {
        let mut b: Bounded<u32, u32> = Bounded::new(8);
        for k in 0..4 {
            b.insert(k, k);
        }
        // Keep 0 in use while 100 more keys pass through.
        for k in 10..110 {
            assert_eq!(b.get(&0).copied(), Some(0));
            b.insert(k, k);
            assert!(b.len() <= 8, "{} entries", b.len());
        }
        assert_eq!(b.get(&0).copied(), Some(0), "an entry in use survives");
        assert!(b.get(&1).is_none() && b.get(&50).is_none(), "unused ones were evicted");
        assert!(b.get(&109).is_some(), "the newest is there");
        assert!(b.evicted() >= 90);
        assert_eq!(b.remove(&0), Some(0));
        assert!(b.get(&0).is_none());
    }

    #[test]
    fn caches_stay_within_their_limits_and_still_resolve() {
        let limits =
            SymbolizerLimits { user_frames: 4, kernel_frames: 4, processes: 2, open_files: 1, debug_info: false };
        let mut s = Symbolizer::with_limits(limits);
        let pid = std::process::id();
        let a = symbolize_me as fn() -> u64 as usize as u64;
        let b = symbolize_me_too as fn() -> u64 as usize as u64;
        // Many distinct offsets in this binary and in libc.
        let libc_fn = libc::getpid as unsafe extern "C" fn() -> i32 as usize as u64;
        for i in 0..64u64 {
            s.stack(pid, &[], &[a + i, b + i, libc_fn + i]);
            let (user, kernel) = s.cached_frames();
            assert!(user <= 4 && kernel <= 4, "cache over its bound: {user} user, {kernel} kernel");
            assert!(s.open_files() <= 1, "{} files open", s.open_files());
        }
        assert!(s.stats().evictions > 0);
        // After all that eviction, symbols still resolve (files reopened).
        let first = s.stack(pid, &[], &[a]);
        assert!(first.frames[0].symbol.contains("symbolize_me"), "{:?}", first.frames[0]);
        let second = s.stack(pid, &[], &[b]);
        assert!(second.frames[0].symbol.contains("symbolize_me_too"), "{:?}", second.frames[0]);
    }

    #[test]
    fn procmap_query_agrees_with_the_maps_file() {
        let addr = symbolize_me as fn() -> u64 as usize as u64;
        let pid = std::process::id();
        let from_file = read_maps(pid)
            .and_then(|maps| maps.into_iter().find(|m| m.start <= addr && addr < m.end))
            .expect("own code is mapped");
        let file = File::open(format!("/proc/{pid}/maps")).expect("open maps");
        let mut name = vec![0u8; 4096];
        match procmap_query(file.as_raw_fd(), addr, &mut name) {
            QueryResult::Found(m) => {
                assert_eq!(Mapping { build_id: Box::default(), ..m.clone() }, from_file);
                assert!(!m.build_id.is_empty(), "rustc links with a build id");
            }
            QueryResult::Unsupported => eprintln!("PROCMAP_QUERY not supported by this kernel; fallback only"),
            QueryResult::NotMapped | QueryResult::Failed => panic!("own code not found by PROCMAP_QUERY"),
        }
        // An address nothing maps.
        assert!(matches!(
            procmap_query(file.as_raw_fd(), 0x1000, &mut name),
            QueryResult::NotMapped | QueryResult::Unsupported
        ));
    }

    #[test]
    fn replaced_files_resolve_through_map_files() {
        // The own binary is replaced on disk if the host path names another
        // inode; simulate by asking for a mapping whose host path is wrong.
        let addr = symbolize_me as fn() -> u64 as usize as u64;
        let pid = std::process::id();
        let mut m = read_maps(pid)
            .and_then(|maps| maps.into_iter().find(|m| m.start <= addr && addr < m.end))
            .expect("own code is mapped");
        m.path = "/nonexistent/replaced-binary".into();
        let mut s = Symbolizer::new();
        let is_root = unsafe_free_is_root();
        match s.openable_path(pid, &m) {
            Some(p) => assert!(p.starts_with(format!("/proc/{pid}/map_files")), "{}", p.display()),
            None => assert!(!is_root, "map_files is readable as root"),
        }
    }

    #[test]
    fn file_pages_are_released_and_symbols_still_resolve() {
        let mut s = Symbolizer::new();
        let addr = symbolize_me as fn() -> u64 as usize as u64;
        let pid = std::process::id();
        assert!(s.stack(pid, &[], &[addr]).frames[0].symbol.contains("symbolize_me"));
        assert!(!s.opened_since_release, "released right after the file was opened");
        assert!(s.release_file_pages() >= 1, "the test binary is mapped by blazesym");
        // Cached and fresh lookups work after the release.
        let again = s.stack(pid, &[], &[addr]);
        assert!(again.frames[0].symbol.contains("symbolize_me"));
        let other = symbolize_me_too as fn() -> u64 as usize as u64;
        assert!(s.stack(pid, &[], &[other]).frames[0].symbol.contains("symbolize_me_too"));
    }

    #[test]
    fn loadable_segments_of_the_own_binary() {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let segments = load_segments(&exe).expect("an ELF file");
        assert!(!segments.is_empty());
        // The code of this function is in a segment, at a consistent vaddr.
        let addr = symbolize_me as fn() -> u64 as usize as u64;
        let m = read_maps(std::process::id())
            .and_then(|maps| maps.into_iter().find(|m| m.start <= addr && addr < m.end))
            .expect("mapped");
        let offset = addr - m.start + m.offset;
        assert!(segments.iter().any(|s| s.offset <= offset && offset < s.offset + s.file_size));
        assert_eq!(load_segments(Path::new("/proc/self/status")), None, "not an ELF file");
    }

    #[test]
    fn debug_files_are_found_by_build_id() {
        assert_eq!(
            debug_file_path(&[0x93, 0xac, 0x61, 0x0e]),
            Some(PathBuf::from("/usr/lib/debug/.build-id/93/ac610e.debug"))
        );
        assert_eq!(debug_file_path(&[0x93]), None);
        assert_eq!(debug_file_path(&[]), None);
    }

    fn unsafe_free_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
            .unwrap_or(false)
    }
}
