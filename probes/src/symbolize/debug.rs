//! Separate debug files. Distribution libraries are stripped to `.dynsym`,
//! which lacks their internal functions; the `.symtab` of the separate
//! debug file (`/usr/lib/debug/.build-id/..`, Debian's `-dbg` packages and
//! the like) has them, at the virtual addresses of the stripped file. Only
//! symbol tables are read from it, never DWARF.

use std::path::{Path, PathBuf};

use aperture_symbolize::elf::{ElfFile, Segment, build_id_hex};

/// The separate debug file of one mapped file.
#[derive(Debug)]
pub(super) struct DebugFile {
    /// Where it is installed.
    pub(super) path: PathBuf,
    /// The loadable segments of the mapped (stripped) file, to turn its file
    /// offsets into the virtual addresses both files' symbols use.
    segments: Vec<Segment>,
}

impl DebugFile {
    /// The installed debug file of the file at `path`, whose GNU build id
    /// is `build_id`, or, when that is empty (the mapping came from
    /// `/proc/<pid>/maps`, which has none), the build id in the file's notes.
    pub(super) fn find(path: &Path, build_id: &[u8]) -> Option<DebugFile> {
        let (debug, elf) = if build_id.is_empty() {
            let elf = ElfFile::open(path).ok()?;
            (debug_file_path(&elf.build_id()?).filter(|p| p.is_file())?, elf)
        } else {
            // Most files have no debug file installed: look before opening.
            (debug_file_path(build_id).filter(|p| p.is_file())?, ElfFile::open(path).ok()?)
        };
        Some(DebugFile { path: debug, segments: elf.segments })
    }

    /// The virtual address (as in the symbol tables) of file offset
    /// `offset` of the mapped file.
    pub(super) fn virtual_offset(&self, offset: u64) -> Option<u64> {
        virtual_offset(&self.segments, offset)
    }
}

/// The virtual address of file offset `offset` in a file with `segments`.
fn virtual_offset(segments: &[Segment], offset: u64) -> Option<u64> {
    segments.iter().find(|s| s.offset <= offset && offset < s.offset + s.filesz).map(|s| offset - s.offset + s.vaddr)
}

/// Where Debian, Fedora and others install the separate debug file of a
/// build id: `/usr/lib/debug/.build-id/<first byte>/<rest>.debug`.
pub(super) fn debug_file_path(build_id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = build_id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    Some(PathBuf::from(format!("/usr/lib/debug/.build-id/{first:02x}/{}.debug", build_id_hex(rest))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn in_a_segment() -> u64 {
        std::hint::black_box(10)
    }

    #[test]
    fn file_offsets_of_the_own_binary_become_virtual_addresses() {
        let addr = in_a_segment as fn() -> u64 as usize as u64;
        let m = super::super::maps::read_maps(std::process::id())
            .and_then(|maps| maps.into_iter().find(|m| m.start <= addr && addr < m.end))
            .expect("own code is mapped");
        let elf = ElfFile::open(Path::new(&m.path)).expect("the own binary is an ELF file");
        let bias = elf.load_bias(m.start, m.offset).expect("a segment covers the mapping");
        let offset = addr - m.start + m.offset;
        assert_eq!(virtual_offset(&elf.segments, offset), Some(addr - bias));
        assert_eq!(virtual_offset(&elf.segments, u64::MAX / 2), None, "past every segment");
    }

    #[test]
    fn the_build_id_is_read_from_the_file_when_the_mapping_has_none() {
        let Some(libc) = aperture_symbolize::maps::find_libc() else { return };
        let elf = ElfFile::open(&libc).expect("libc is an ELF file");
        let Some(installed) = elf.build_id().and_then(|id| debug_file_path(&id)).filter(|p| p.is_file()) else {
            eprintln!("no separate debug file for {} (libc6-dbg); nothing to check", libc.display());
            return;
        };
        let found = DebugFile::find(&libc, &[]).expect("found through the build id note");
        assert_eq!(found.path, installed);
        assert!(!found.segments.is_empty());
        assert!(DebugFile::find(&libc, &[0xde, 0xad, 0xbe, 0xef]).is_none(), "a given build id is used as is");
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
}
