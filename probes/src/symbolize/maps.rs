//! The executable mappings of the processes being symbolized: looked up
//! one address at a time with the `PROCMAP_QUERY` ioctl (Linux 6.11+) and
//! remembered, or, on older kernels, read from all of `/proc/<pid>/maps`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use aperture_symbolize::Bounded;

/// Without `PROCMAP_QUERY`, a process's maps are re-read on a miss at most this often.
const MAPS_REFRESH: Duration = Duration::from_millis(200);

/// One executable mapping of a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Mapping {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) offset: u64,
    pub(super) dev: u64,
    pub(super) inode: u64,
    /// Path as seen inside the process's mount namespace; empty for
    /// anonymous mappings, `[vdso]` and the like for special ones.
    pub(super) path: String,
    /// The file's GNU build id, when the kernel reported it (`PROCMAP_QUERY`;
    /// `/proc/<pid>/maps` has none).
    pub(super) build_id: Box<[u8]>,
}

/// The part of a [`Mapping`] needed on every frame (no allocation to copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Span {
    pub(super) start: u64,
    pub(super) offset: u64,
    pub(super) dev: u64,
    pub(super) inode: u64,
}

impl Mapping {
    pub(super) fn span(&self) -> Span {
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

/// Whether `PROCMAP_QUERY` works on this kernel (unknown until first tried).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Query {
    Unknown,
    Works,
    Unsupported,
}

/// The mappings known of each process, bounded to a number of processes.
#[derive(Debug)]
pub(super) struct Processes {
    processes: Bounded<u32, ProcessMaps>,
    query: Query,
    name_buf: Vec<u8>,
}

impl Processes {
    /// Mappings of at most `capacity` processes.
    pub(super) fn new(capacity: usize) -> Processes {
        Processes { processes: Bounded::new(capacity), query: Query::Unknown, name_buf: vec![0; 4096] }
    }

    /// Reads `/proc/<pid>/maps` as on a kernel without `PROCMAP_QUERY`.
    #[cfg(test)]
    pub(super) fn without_procmap_query(mut self) -> Processes {
        self.query = Query::Unsupported;
        self
    }

    /// The mapping of `pid` covering `addr` if already known (after [`Processes::span`]).
    pub(super) fn known(&mut self, pid: u32, addr: u64) -> Option<&Mapping> {
        self.processes.get(&pid)?.find(addr)
    }

    /// Forgets a process.
    pub(super) fn remove(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Keeps the processes for which `keep` is true.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        self.processes.retain(|pid, _| keep(*pid));
    }

    /// Processes known.
    pub(super) fn len(&self) -> usize {
        self.processes.len()
    }

    /// Processes dropped at the bound so far.
    pub(super) fn evicted(&self) -> u64 {
        self.processes.evicted()
    }

    /// The mapping of `pid` covering `addr`, asking the kernel on a miss.
    pub(super) fn span(&mut self, pid: u32, addr: u64) -> Option<Span> {
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

/// The encoding of st_dev (new_encode_dev), so it compares with stat().
fn encode_dev(major: u64, minor: u64) -> u64 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Reads `/proc/<pid>/maps` (executable mappings only, sorted by address).
pub(super) fn read_maps(pid: u32) -> Option<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut out: Vec<Mapping> =
        text.lines().filter_map(parse_maps_line).filter(|(exec, _)| *exec).map(|(_, m)| m).collect();
    out.sort_by_key(|m| m.start);
    Some(out)
}

/// Parses one `/proc/<pid>/maps` line: `start-end perms offset maj:min inode path`.
pub(super) fn parse_maps_line(line: &str) -> Option<(bool, Mapping)> {
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
    fn mapped_code() -> u64 {
        std::hint::black_box(9)
    }

    #[test]
    fn procmap_query_agrees_with_the_maps_file() {
        let addr = mapped_code as fn() -> u64 as usize as u64;
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
}
