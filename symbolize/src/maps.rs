//! Executable mappings of a process, from `/proc/<pid>/maps`.

use std::io;
use std::path::PathBuf;

/// One executable mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecMapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the file, `major:minor` as the kernel encodes it.
    pub dev: u64,
    /// Inode of the file; 0 for anonymous mappings.
    pub inode: u64,
    /// The path as the kernel prints it (`[vdso]` and similar for special
    /// mappings, empty for anonymous ones).
    pub path: String,
}

impl ExecMapping {
    /// Whether the mapping is backed by a file (not anonymous, not special).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    /// A path through which the mapped file can be opened from any mount
    /// namespace while the mapping exists (needs `CAP_SYS_ADMIN`).
    pub fn map_file(&self, pid: u32) -> PathBuf {
        PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", self.start, self.end))
    }
}

/// The executable mappings of `pid`, sorted by address.
pub fn exec_mappings(pid: u32) -> io::Result<Vec<ExecMapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out: Vec<ExecMapping> = text.lines().filter_map(parse_line).collect();
    out.sort_by_key(|m| m.start);
    Ok(out)
}

/// Parses one line of `/proc/<pid>/maps`; `None` for lines that are not
/// executable mappings or do not parse.
pub fn parse_line(line: &str) -> Option<ExecMapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?;
    let offset = it.next()?;
    let dev = it.next()?;
    let inode = it.next()?;
    let path = it.next().map(str::trim).unwrap_or("");
    if perms.as_bytes().get(2) != Some(&b'x') {
        return None;
    }
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let major = u64::from_str_radix(major, 16).ok()?;
    let minor = u64::from_str_radix(minor, 16).ok()?;
    Some(ExecMapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (major << 8) | (minor & 0xff) | ((minor & !0xff) << 12),
        inode: inode.parse().ok()?,
        path: path.to_owned(),
    })
}

/// The C library this process maps, if it maps one (tests and benchmarks).
pub fn find_libc() -> Option<PathBuf> {
    exec_mappings(std::process::id())
        .ok()?
        .into_iter()
        .find(|m| m.path.rsplit('/').next().is_some_and(|n| n.starts_with("libc.so") || n.starts_with("libc-")))
        .map(|m| PathBuf::from(m.path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exec_lines_and_skips_others() {
        let l = "7f1c2a028000-7f1c2a1bd000 r-xp 00028000 fe:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6";
        let m = parse_line(l).expect("parses");
        assert_eq!((m.start, m.end, m.offset, m.inode), (0x7f1c2a028000, 0x7f1c2a1bd000, 0x28000, 1835));
        assert_eq!(m.dev, 0xfe01);
        assert!(m.is_file());
        assert!(parse_line("7f1c2a000000-7f1c2a028000 r--p 00000000 fe:01 1835 /lib/libc.so.6").is_none());
        let vdso = parse_line("7ffd1b9e4000-7ffd1b9e6000 r-xp 00000000 00:00 0                          [vdso]");
        assert_eq!(vdso.map(|m| (m.is_file(), m.path)), Some((false, "[vdso]".to_owned())));
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn own_mappings_include_the_test_binary() {
        let maps = exec_mappings(std::process::id()).expect("own maps");
        assert!(maps.iter().any(|m| m.is_file()));
        assert!(maps.windows(2).all(|w| w[0].start <= w[1].start));
    }
}
