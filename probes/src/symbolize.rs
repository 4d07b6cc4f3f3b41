//! Stack symbolization with blazesym.
//!
//! Kernel frames are resolved through kallsyms. User frames are mapped to a
//! file through `/proc/<pid>/maps` and resolved from the file's ELF symbols
//! and DWARF, opened through `/proc/<pid>/root` so binaries inside
//! containers resolve. Results are cached by *file identity and offset*
//! (device, inode, file offset), so one libc serves every process that maps
//! it and an address is resolved once.
//!
//! Nothing here fails: a frame that cannot be resolved (exited process,
//! stripped binary, JIT code) is kept with its address and, when known, its
//! module and offset in the module.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aperture_core::model::{Stack, StackFrame};
use blazesym::MaybeDefault;
use blazesym::symbolize::source::{Elf, Kernel, Source};
use blazesym::symbolize::{Input, Symbolized};

/// Cached frames beyond which a cache is cleared (bounds memory).
const CACHE_LIMIT: usize = 1 << 20;
/// A process's maps are re-read on a miss at most this often.
const MAPS_REFRESH: Duration = Duration::from_millis(200);

/// Counters of a [`Symbolizer`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    /// Frames answered from a cache.
    pub cache_hits: u64,
    /// Frames resolved to a symbol by blazesym.
    pub resolved: u64,
    /// Frames kept without a symbol.
    pub unresolved: u64,
}

#[derive(Clone, Debug)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    inode: u64,
    /// Path as seen inside the process's mount namespace; empty for
    /// anonymous mappings, `[vdso]` and the like for special ones.
    path: String,
}

#[derive(Debug)]
struct ProcessMaps {
    mappings: Vec<Mapping>,
    read_at: Instant,
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
    kernel: HashMap<u64, StackFrame>,
    user: HashMap<FileOffsetKey, StackFrame>,
    processes: HashMap<u32, ProcessMaps>,
    /// A path blazesym can open for each (dev, inode), once found.
    file_paths: HashMap<(u64, u64), Option<PathBuf>>,
    stats: SymbolizeStats,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer")
            .field("kernel_cached", &self.kernel.len())
            .field("user_cached", &self.user.len())
            .field("processes", &self.processes.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Symbolizer::new()
    }
}

impl Symbolizer {
    /// A symbolizer with empty caches.
    pub fn new() -> Symbolizer {
        Symbolizer {
            inner: blazesym::symbolize::Symbolizer::builder().enable_code_info(true).enable_inlined_fns(false).build(),
            kernel: HashMap::new(),
            user: HashMap::new(),
            processes: HashMap::new(),
            file_paths: HashMap::new(),
            stats: SymbolizeStats::default(),
        }
    }

    /// Counters since creation.
    pub fn stats(&self) -> SymbolizeStats {
        self.stats
    }

    /// The stack of one event: kernel frames (innermost) then user frames,
    /// leaf first, with its hash.
    pub fn stack(&mut self, pid: u32, kernel: &[u64], user: &[u64]) -> Stack {
        let mut frames = Vec::with_capacity(kernel.len() + user.len());
        self.kernel_frames(kernel, &mut frames);
        self.user_frames(pid, user, &mut frames);
        Stack::new(frames)
    }

    /// Appends the frames of kernel addresses (leaf first) to `out`.
    pub fn kernel_frames(&mut self, addrs: &[u64], out: &mut Vec<StackFrame>) {
        for (i, &addr) in addrs.iter().enumerate() {
            if let Some(f) = self.kernel.get(&addr) {
                self.stats.cache_hits += 1;
                out.push(f.clone());
                continue;
            }
            // Callers' addresses are return addresses: look up the call.
            let lookup = if i == 0 { addr } else { addr.saturating_sub(1) };
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
            if self.kernel.len() >= CACHE_LIMIT {
                self.kernel.clear();
            }
            self.kernel.insert(addr, frame.clone());
            out.push(frame);
        }
    }

    /// Appends the frames of user addresses of process `pid` (leaf first).
    pub fn user_frames(&mut self, pid: u32, addrs: &[u64], out: &mut Vec<StackFrame>) {
        for (i, &addr) in addrs.iter().enumerate() {
            let Some(m) = self.mapping(pid, addr) else {
                self.stats.unresolved += 1;
                out.push(StackFrame { address: addr, ..StackFrame::default() });
                continue;
            };
            let file_offset = addr - m.start + m.offset;
            let module = Path::new(&m.path).file_name().map_or_else(|| m.path.clone(), |n| n.to_string_lossy().into());
            let key = FileOffsetKey { dev: m.dev, inode: m.inode, offset: file_offset };
            if m.inode != 0
                && let Some(f) = self.user.get(&key)
            {
                self.stats.cache_hits += 1;
                out.push(StackFrame { address: addr, ..f.clone() });
                continue;
            }
            let mut frame = StackFrame { address: addr, module_offset: file_offset, module, ..StackFrame::default() };
            let path = if m.inode == 0 { None } else { self.openable_path(pid, &m) };
            if let Some(path) = path {
                let lookup = if i == 0 { file_offset } else { file_offset.saturating_sub(1) };
                let src = Source::Elf(Elf::new(path));
                match self.inner.symbolize_single(&src, Input::FileOffset(lookup)) {
                    Ok(Symbolized::Sym(sym)) => {
                        self.stats.resolved += 1;
                        frame.symbol = sym.name.into_owned();
                        if let Some(ci) = &sym.code_info {
                            frame.file = ci.to_path().to_string_lossy().into_owned();
                            frame.line = ci.line.unwrap_or(0);
                        }
                    }
                    _ => self.stats.unresolved += 1,
                }
            } else {
                self.stats.unresolved += 1;
            }
            if m.inode != 0 {
                if self.user.len() >= CACHE_LIMIT {
                    self.user.clear();
                }
                self.user.insert(key, frame.clone());
            }
            out.push(frame);
        }
    }

    /// Forgets a process's memory map (call when it exits).
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Forgets the memory maps of processes that no longer exist.
    pub fn forget_exited(&mut self) {
        self.processes.retain(|pid, _| Path::new(&format!("/proc/{pid}")).exists());
    }

    fn mapping(&mut self, pid: u32, addr: u64) -> Option<Mapping> {
        let find = |maps: &ProcessMaps| {
            let i = maps.mappings.partition_point(|m| m.end <= addr);
            maps.mappings.get(i).filter(|m| m.start <= addr).cloned()
        };
        if let Some(maps) = self.processes.get(&pid) {
            if let Some(m) = find(maps) {
                return Some(m);
            }
            if maps.read_at.elapsed() < MAPS_REFRESH {
                return None;
            }
        }
        // Unknown process, or a miss on old maps (a new dlopen): (re)read.
        match read_maps(pid) {
            Some(mappings) => {
                let maps = ProcessMaps { mappings, read_at: Instant::now() };
                let found = find(&maps);
                self.processes.insert(pid, maps);
                found
            }
            // Exited: keep what we had, if anything.
            None => self.processes.get(&pid).and_then(find),
        }
    }

    /// A path to the mapped file that blazesym can open: the host path when
    /// it is the same file (same dev+inode), else the path through the
    /// process's root (containers).
    fn openable_path(&mut self, pid: u32, m: &Mapping) -> Option<PathBuf> {
        if let Some(p) = self.file_paths.get(&(m.dev, m.inode)) {
            return p.clone();
        }
        let same_file = |p: &Path| std::fs::metadata(p).is_ok_and(|md| md.ino() == m.inode && md.dev() == m.dev);
        let host = PathBuf::from(&m.path);
        let through_root = PathBuf::from(format!("/proc/{pid}/root{}", m.path));
        let found = if same_file(&host) {
            Some(host)
        } else if same_file(&through_root) || std::fs::metadata(&through_root).is_ok_and(|md| md.ino() == m.inode) {
            Some(through_root)
        } else {
            None
        };
        // Only remember successes: a failure may be a process that exited.
        if found.is_some() {
            self.file_paths.insert((m.dev, m.inode), found.clone());
        }
        found
    }
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
        // The encoding of st_dev (new_encode_dev) so it compares with stat().
        dev: (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        inode: inode.parse().ok()?,
        path,
    };
    Some((perms.as_bytes().get(2) == Some(&b'x'), mapping))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(s.stats().cache_hits >= 1);
    }
}
