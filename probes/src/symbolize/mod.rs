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
//! - Each resolved function's range of file offsets is kept per file, so a
//!   new address inside a known function (another call site, another
//!   sample of a compiler's ever-different stacks) is named without
//!   blazesym's search of the symbols and its demangling (not with
//!   `debug_info`, where file and line differ inside a function).
//! - blazesym keeps every file it opened mapped and indexed; at most
//!   [`SymbolizerLimits::open_files`] stay open, the least recently used is
//!   evicted from blazesym's cache (its mapping is released).
//! - Frames in the vDSO are named from its exported functions (`.dynsym`):
//!   every 64-bit process maps the kernel's one image, so the agent reads
//!   its own once ([`aperture_symbolize::vdso::VdsoSymbols`]) and checks
//!   once per process that its `[vdso]` is that image (a 32-bit process's
//!   is not, and keeps its offsets).
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
//! The parts: [`maps`] (which file backs an address of a process),
//! [`debug`] (separate debug files of stripped files); every cache here is
//! an [`aperture_symbolize::Bounded`]; this module resolves with blazesym.
//!
//! Nothing here fails: a frame that cannot be resolved (exited process,
//! stripped binary, JIT code) is kept with its address and, when known, its
//! module and offset in the module.

mod debug;
mod maps;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aperture_core::model::{Stack, StackFrame};
use aperture_symbolize::Bounded;
use aperture_symbolize::vdso::{VDSO_PATH, VdsoSymbols};
use blazesym::MaybeDefault;
use blazesym::symbolize::evict::{self, Evict};
use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Symbolized};

use self::debug::DebugFile;
use self::maps::{Mapping, Processes, Span, parse_maps_line};

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
    /// Frames answered from the range of a function already resolved in
    /// the same file (a new address inside it), without blazesym.
    pub range_hits: u64,
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

/// What a lookup in an ELF file found.
struct ElfSymbol {
    symbol: String,
    file: String,
    line: u32,
    /// Offset of the address looked up into the symbol, and the symbol's size.
    range: Option<(u64, u64)>,
}

/// Identity of a code location independent of the process: file + offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FileOffsetKey {
    dev: u64,
    inode: u64,
    offset: u64,
}

/// Turns raw stacks into [`Stack`]s. One per symbolizing thread.
pub struct Symbolizer {
    inner: blazesym::symbolize::Symbolizer,
    limits: SymbolizerLimits,
    kernel: Bounded<u64, CachedFrame>,
    user: Bounded<FileOffsetKey, CachedFrame>,
    processes: Processes,
    /// A path blazesym can open for each (dev, inode), once found.
    file_paths: Bounded<(u64, u64), PathBuf>,
    /// The separate debug file of each (dev, inode) looked for, if installed.
    debug_files: Bounded<(u64, u64), Option<DebugFile>>,
    /// Whether the `[vdso]` of each (pid, mapping address) seen is the
    /// agent's own image.
    vdso_images: Bounded<(u32, u64), bool>,
    /// Files open in blazesym, least recently used first, with their identity.
    open_files: Vec<(PathBuf, (u64, u64))>,
    /// The file-offset range of each function resolved, per file: without
    /// DWARF every address inside a function is the same frame, so a new
    /// address inside a known function (another call site, another sample
    /// of a compiler's deep and ever-different stacks) skips blazesym's
    /// search of the file's symbols and its demangling. (A symbol that
    /// encloses others, which hand-written assembly can have, would name
    /// the inner ones' addresses too once it is known.) At most
    /// `user_frames` ranges; all are dropped at that bound.
    ranges: HashMap<(u64, u64), BTreeMap<u64, (u64, CachedFrame)>>,
    ranges_len: usize,
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
            processes: Processes::new(limits.processes),
            file_paths: Bounded::new(limits.processes.max(64) * 4),
            debug_files: Bounded::new(limits.processes.max(64) * 4),
            vdso_images: Bounded::new(limits.processes.max(64)),
            open_files: Vec::new(),
            ranges: HashMap::new(),
            ranges_len: 0,
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
                + self.debug_files.evicted()
                + self.vdso_images.evicted(),
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
            let Some(m) = self.processes.span(pid, addr) else {
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
            if m.inode != 0
                && let Some(f) = self.range_frame((m.dev, m.inode), lookup)
            {
                self.stats.range_hits += 1;
                out.push(f.frame(addr, file_offset, false));
                self.user.insert(key, f);
                continue;
            }
            let frame = self.resolve_user(pid, addr, m, file_offset, lookup);
            if m.inode != 0 {
                self.user.insert(key, CachedFrame::of(&frame));
            }
            out.push(frame);
        }
    }

    /// The frame of the known function of file `id` whose range holds
    /// file offset `lookup`.
    fn range_frame(&self, id: (u64, u64), lookup: u64) -> Option<CachedFrame> {
        let (_, (end, frame)) = self.ranges.get(&id)?.range(..=lookup).next_back()?;
        (lookup < *end).then(|| frame.clone())
    }

    /// Remembers that file offsets `range` of file `id` are `frame`.
    fn note_range(&mut self, id: (u64, u64), range: (u64, u64), frame: &StackFrame) {
        if self.ranges_len >= self.limits.user_frames.max(1) {
            self.ranges.clear();
            self.ranges_len = 0;
            self.stats.evictions += 1;
        }
        if self.ranges.entry(id).or_default().insert(range.0, (range.1, CachedFrame::of(frame))).is_none() {
            self.ranges_len += 1;
        }
    }

    /// Resolves one user frame that is not cached.
    fn resolve_user(&mut self, pid: u32, addr: u64, span: Span, file_offset: u64, lookup: u64) -> StackFrame {
        let Some(m) = self.processes.known(pid, addr).cloned() else {
            self.stats.unresolved += 1;
            return StackFrame { address: addr, module_offset: file_offset, ..StackFrame::default() };
        };
        let module = Path::new(&m.path).file_name().map_or_else(|| m.path.clone(), |n| n.to_string_lossy().into());
        let mut frame = StackFrame { address: addr, module_offset: file_offset, module, ..StackFrame::default() };
        if m.path == VDSO_PATH {
            match self.vdso_symbol(pid, &m, lookup) {
                Some(name) => {
                    self.stats.resolved += 1;
                    frame.symbol = name.to_owned();
                }
                None => self.stats.unresolved += 1,
            }
            return frame;
        }
        let id = (span.dev, span.inode);
        let path = if span.inode == 0 { None } else { self.openable_path(pid, &m) };
        let Some(path) = path else {
            self.stats.unresolved += 1;
            return frame;
        };
        let mut found = self.lookup_elf_at(&path, id, Input::FileOffset(lookup), self.limits.debug_info);
        // The function's range in file offsets (blazesym gives the lookup's
        // offset into the symbol and its size); with DWARF, file and line
        // differ inside a function, so no range is kept.
        let range = match &found {
            Some(Ok(f)) if !self.limits.debug_info => {
                f.range.map(|(into, size)| (lookup.saturating_sub(into), lookup.saturating_sub(into) + size))
            }
            _ => None,
        };
        if found.is_none()
            && !self.limits.debug_info
            && let Some((debug, vaddr)) = self.debug_offset(id, &path, &m.build_id, lookup)
        {
            // A stripped file (only .dynsym, like distribution libraries):
            // the .symtab of its separate debug file has the local symbols,
            // at the same virtual addresses (its file offsets differ: the
            // code is not in it). DWARF is still not read.
            found = self.lookup_elf_at(&debug, (id.0, !id.1), Input::VirtOffset(vaddr), false);
        }
        match found {
            Some(Ok(f)) => {
                self.stats.resolved += 1;
                (frame.symbol, frame.file, frame.line) = (f.symbol, f.file, f.line);
                if let Some(range) = range
                    && range.0 < range.1
                    && range.0 <= lookup
                    && lookup < range.1
                {
                    self.note_range(id, range, &frame);
                }
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
    fn lookup_elf_at(
        &mut self,
        path: &Path,
        id: (u64, u64),
        input: Input<u64>,
        debug_syms: bool,
    ) -> Option<Result<ElfSymbol, ()>> {
        self.note_open(path, id);
        let mut elf = Elf::new(path);
        elf.debug_syms = debug_syms;
        match self.inner.symbolize_single(&Source::Elf(elf), input) {
            Ok(Symbolized::Sym(sym)) => {
                let (file, line) = match &sym.code_info {
                    Some(ci) => (ci.to_path().to_string_lossy().into_owned(), ci.line.unwrap_or(0)),
                    None => (String::new(), 0),
                };
                let range = sym.size.filter(|&n| n > 0).map(|n| (sym.offset as u64, n as u64));
                Some(Ok(ElfSymbol { symbol: sym.name.into_owned(), file, line, range }))
            }
            Ok(_) => None,
            Err(_) => Some(Err(())),
        }
    }

    /// The separate debug file of the file `id` (at `path`, with
    /// `build_id`), if installed, and the virtual address in it of file
    /// offset `offset` of the file.
    fn debug_offset(&mut self, id: (u64, u64), path: &Path, build_id: &[u8], offset: u64) -> Option<(PathBuf, u64)> {
        if self.debug_files.get(&id).is_none() {
            self.debug_files.insert(id, DebugFile::find(path, build_id));
        }
        let debug = self.debug_files.get(&id)?.as_ref()?;
        Some((debug.path.clone(), debug.virtual_offset(offset)?))
    }

    /// The vDSO function at file offset `lookup` of `pid`'s `[vdso]`
    /// mapping `m`. The kernel maps one image into every 64-bit process,
    /// so the agent's own, parsed once, names them all; whether a
    /// process's mapping is that image (not a 32-bit process's) is checked
    /// once per process and mapping address.
    fn vdso_symbol(&mut self, pid: u32, m: &Mapping, lookup: u64) -> Option<&'static str> {
        let own = VdsoSymbols::own()?;
        let same = self.vdso_images.get_or_insert_with((pid, m.start), || own.is_image_of(pid, m.start, m.end));
        if !*same {
            return None;
        }
        own.at_offset(lookup).map(|s| &*s.name)
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
        self.processes.remove(pid);
    }

    /// Forgets the memory maps of processes that no longer exist.
    pub fn forget_exited(&mut self) {
        self.processes.retain(|pid| Path::new(&format!("/proc/{pid}")).exists());
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

/// Whether a kernel symbol is one of Aperture's BPF programs
/// (`bpf_prog_<tag>_ap_<name>`).
fn is_own_bpf_frame(symbol: &str) -> bool {
    symbol
        .strip_prefix("bpf_prog_")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(_, name)| name.starts_with("ap_"))
}

#[cfg(test)]
mod tests;
