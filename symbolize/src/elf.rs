//! The little of ELF that unwinding needs: section contents by name, the
//! loadable segments (to turn a mapping into a load bias) and the GNU build
//! id. Only 64-bit little-endian files are read (x86_64); anything else is
//! an [`ElfError`], never a panic.
//!
//! Reads go through `pread` on the open file, so a large binary with debug
//! info costs the bytes of the sections asked for, not its size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Why an ELF file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// Opening or reading the file failed.
    #[error("reading {what} failed: {source}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a 64-bit little-endian ELF file, or its headers are
    /// inconsistent.
    #[error("not a usable ELF64 little-endian file: {0}")]
    Format(&'static str),
}

/// `PT_LOAD`.
const PT_LOAD: u32 = 1;
/// `PF_X`: the segment is executable.
pub const PF_X: u32 = 1;
/// `SHT_NOBITS`: the section has no bytes in the file.
const SHT_NOBITS: u32 = 8;
/// `SHT_NOTE`.
const SHT_NOTE: u32 = 7;
/// `NT_GNU_BUILD_ID`.
const NT_GNU_BUILD_ID: u32 = 3;
/// Sections larger than this are refused (a corrupt header must not make
/// the agent allocate gigabytes).
const MAX_SECTION: u64 = 512 << 20;

/// One section header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Its name from `.shstrtab`.
    pub name: String,
    /// `sh_type`.
    pub kind: u32,
    /// `sh_addr`: virtual address when loaded (0 for non-allocated sections).
    pub addr: u64,
    /// `sh_offset`.
    pub offset: u64,
    /// `sh_size`.
    pub size: u64,
}

/// One loadable segment (`PT_LOAD` program header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// `p_offset`.
    pub offset: u64,
    /// `p_vaddr`.
    pub vaddr: u64,
    /// `p_filesz`.
    pub filesz: u64,
    /// `p_memsz`.
    pub memsz: u64,
    /// `p_flags` (`PF_X` = 1).
    pub flags: u32,
    /// `p_align`.
    pub align: u64,
}

/// An open ELF file with its headers parsed.
#[derive(Debug)]
pub struct ElfFile {
    file: File,
    /// The section headers.
    pub sections: Vec<Section>,
    /// The `PT_LOAD` segments.
    pub segments: Vec<Segment>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

impl ElfFile {
    /// Opens `path` and reads its section and program headers.
    pub fn open(path: &Path) -> Result<ElfFile, ElfError> {
        let file = File::open(path).map_err(|source| ElfError::Io { what: "the ELF file", source })?;
        ElfFile::from_file(file)
    }

    /// Reads the headers of an already open file.
    pub fn from_file(file: File) -> Result<ElfFile, ElfError> {
        let mut ehdr = [0u8; 64];
        file.read_exact_at(&mut ehdr, 0).map_err(|source| ElfError::Io { what: "the ELF header", source })?;
        if &ehdr[..4] != b"\x7fELF" {
            return Err(ElfError::Format("no ELF magic"));
        }
        if ehdr[4] != 2 || ehdr[5] != 1 {
            return Err(ElfError::Format("not 64-bit little-endian"));
        }
        let phoff = u64_at(&ehdr, 32);
        let shoff = u64_at(&ehdr, 40);
        let phentsize = u64::from(u16_at(&ehdr, 54));
        let phnum = u64::from(u16_at(&ehdr, 56));
        let shentsize = u64::from(u16_at(&ehdr, 58));
        let shnum = u64::from(u16_at(&ehdr, 60));
        let shstrndx = u64::from(u16_at(&ehdr, 62));

        let mut segments = Vec::new();
        if phnum > 0 {
            if phentsize < 56 {
                return Err(ElfError::Format("program header entries too small"));
            }
            let mut ph = vec![0u8; (phentsize * phnum) as usize];
            file.read_exact_at(&mut ph, phoff)
                .map_err(|source| ElfError::Io { what: "the program headers", source })?;
            for i in 0..phnum as usize {
                let p = &ph[i * phentsize as usize..];
                if u32_at(p, 0) != PT_LOAD {
                    continue;
                }
                segments.push(Segment {
                    flags: u32_at(p, 4),
                    offset: u64_at(p, 8),
                    vaddr: u64_at(p, 16),
                    filesz: u64_at(p, 32),
                    memsz: u64_at(p, 40),
                    align: u64_at(p, 48),
                });
            }
        }

        let mut sections = Vec::new();
        if shnum > 0 && shoff > 0 {
            if shentsize < 64 || shstrndx >= shnum {
                return Err(ElfError::Format("bad section header table"));
            }
            let mut sh = vec![0u8; (shentsize * shnum) as usize];
            file.read_exact_at(&mut sh, shoff)
                .map_err(|source| ElfError::Io { what: "the section headers", source })?;
            let hdr = |i: usize| &sh[i * shentsize as usize..(i + 1) * shentsize as usize];
            let strtab = hdr(shstrndx as usize);
            let (str_off, str_size) = (u64_at(strtab, 24), u64_at(strtab, 32));
            if str_size > MAX_SECTION {
                return Err(ElfError::Format("section name table too large"));
            }
            let mut names = vec![0u8; str_size as usize];
            file.read_exact_at(&mut names, str_off)
                .map_err(|source| ElfError::Io { what: "the section name table", source })?;
            for i in 0..shnum as usize {
                let h = hdr(i);
                let name_at = u32_at(h, 0) as usize;
                let name = names
                    .get(name_at..)
                    .map(|s| &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())])
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .unwrap_or_default();
                sections.push(Section {
                    name,
                    kind: u32_at(h, 4),
                    addr: u64_at(h, 16),
                    offset: u64_at(h, 24),
                    size: u64_at(h, 32),
                });
            }
        }
        Ok(ElfFile { file, sections, segments })
    }

    /// The section called `name`, if present.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The bytes of `section` (empty for `SHT_NOBITS`).
    pub fn read(&self, section: &Section) -> Result<Vec<u8>, ElfError> {
        if section.kind == SHT_NOBITS {
            return Ok(Vec::new());
        }
        if section.size > MAX_SECTION {
            return Err(ElfError::Format("section too large"));
        }
        let mut buf = vec![0u8; section.size as usize];
        self.file
            .read_exact_at(&mut buf, section.offset)
            .map_err(|source| ElfError::Io { what: "a section", source })?;
        Ok(buf)
    }

    /// The GNU build id (`NT_GNU_BUILD_ID` note), if the file has one.
    pub fn build_id(&self) -> Option<Vec<u8>> {
        for s in self.sections.iter().filter(|s| s.kind == SHT_NOTE && s.size <= 1 << 16) {
            let Ok(notes) = self.read(s) else { continue };
            let mut at = 0usize;
            while at + 12 <= notes.len() {
                let namesz = u32_at(&notes, at) as usize;
                let descsz = u32_at(&notes, at + 4) as usize;
                let kind = u32_at(&notes, at + 8);
                let name_end = at + 12 + namesz.next_multiple_of(4);
                let desc_end = name_end + descsz.next_multiple_of(4);
                if desc_end > notes.len() {
                    break;
                }
                if kind == NT_GNU_BUILD_ID && notes.get(at + 12..at + 12 + namesz) == Some(b"GNU\0") {
                    return Some(notes[name_end..name_end + descsz].to_vec());
                }
                at = desc_end;
            }
        }
        None
    }

    /// The load bias of a mapping of this file at `start` from file offset
    /// `offset`: subtracting it from a runtime address gives the address
    /// the file's headers and unwind info use. `None` when no loadable
    /// segment covers `offset`.
    pub fn load_bias(&self, start: u64, offset: u64) -> Option<u64> {
        load_bias(&self.segments, start, offset)
    }
}

/// [`ElfFile::load_bias`] from the segments alone (kept without the open file).
///
/// Executable segments are preferred: when segments share a page (a
/// read-only segment ending inside the page where text starts, as lld lays
/// out Rust binaries), the page's executable mapping belongs to the text.
pub fn load_bias(segments: &[Segment], start: u64, offset: u64) -> Option<u64> {
    let covers = |s: &&Segment| {
        let first = s.offset - s.offset % s.align.clamp(1, 4096);
        offset >= first && offset < s.offset + s.filesz.max(1)
    };
    let seg = segments.iter().filter(|s| s.flags & PF_X != 0).find(covers).or_else(|| segments.iter().find(covers))?;
    // runtime = start + (file_off - offset), file_off = seg.offset + (vaddr - seg.vaddr)
    Some(start.wrapping_sub(offset).wrapping_add(seg.offset).wrapping_sub(seg.vaddr))
}

/// Lower-case hex of a build id, as in file names (`.build-id/` paths, the
/// unwind table cache).
pub fn build_id_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libc_has_eh_frame_segments_and_a_build_id() {
        let Some(libc) = crate::maps::find_libc() else {
            return;
        };
        let elf = ElfFile::open(&libc).expect("libc parses");
        assert!(elf.section(".eh_frame").is_some_and(|s| s.size > 1000));
        assert!(elf.segments.iter().any(|s| s.flags & PF_X != 0));
        assert_eq!(elf.build_id().map(|b| b.len()), Some(20));
    }

    #[test]
    fn not_elf_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x");
        std::fs::write(&p, b"#!/bin/sh\necho hi\n".repeat(10)).expect("write");
        assert!(matches!(ElfFile::open(&p), Err(ElfError::Format(_))));
        std::fs::write(&p, b"\x7fELF").expect("write");
        assert!(matches!(ElfFile::open(&p), Err(ElfError::Io { .. })));
    }

    #[test]
    fn load_bias_of_a_pie_text_mapping() {
        // A PIE text segment at vaddr 0x1000, offset 0x1000, mapped at
        // 0x5555_5555_5000 from file offset 0x1000: bias 0x5555_5555_4000.
        let seg = Segment { offset: 0x1000, vaddr: 0x1000, filesz: 0x2000, memsz: 0x2000, flags: PF_X, align: 0x1000 };
        let file = File::open("/proc/self/exe").expect("self");
        let elf = ElfFile { file, sections: vec![], segments: vec![seg] };
        assert_eq!(elf.load_bias(0x5555_5555_5000, 0x1000), Some(0x5555_5555_4000));
        assert_eq!(elf.load_bias(0x5555_5555_5000, 0x9000), None);
    }

    #[test]
    fn load_bias_prefers_the_text_segment_sharing_a_page() {
        // lld: read-only data up to 0x171a8, text from offset 0x171b0 at
        // vaddr 0x181b0; the r-x mapping starts at file offset 0x17000.
        let ro = Segment { offset: 0, vaddr: 0, filesz: 0x171a8, memsz: 0x171a8, flags: 4, align: 0x1000 };
        let text =
            Segment { offset: 0x171b0, vaddr: 0x181b0, filesz: 0x40230, memsz: 0x40230, flags: 5, align: 0x1000 };
        let bias = load_bias(&[ro, text], 0x5555_0001_8000, 0x17000);
        assert_eq!(bias, Some(0x5555_0000_0000), "text at vaddr 0x18000 runs at 0x5555_0001_8000");
    }
}
