//! The vDSO: every process of a kernel maps the same image, so this
//! process's copy stands for all of them. It is written to a file to get an
//! unwind table like any object ([`dump_own`]), and its dynamic symbol
//! table names the frames in any process's `[vdso]` mapping
//! ([`VdsoSymbols`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use object::read::elf::ElfFile64;
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::maps::{ExecMapping, exec_mappings};

/// What `/proc/<pid>/maps` calls the vDSO mapping.
pub const VDSO_PATH: &str = "[vdso]";

/// A vDSO image larger than this is refused (it is two pages on x86_64).
const MAX_IMAGE: u64 = 1 << 20;

/// This process's vDSO mapping and its bytes, copied from where it is
/// mapped in this process (no system call reads it: going through
/// `/proc/self/mem` would take this process's own address-space lock and
/// fault the kernel's special mapping in page by page).
pub fn own_image() -> io::Result<(ExecMapping, Vec<u8>)> {
    let m = exec_mappings(std::process::id())?
        .into_iter()
        .find(|m| m.path == VDSO_PATH)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "this process maps no [vdso]"))?;
    let len = image_len(m.start, m.end)?;
    // SAFETY: `/proc/self/maps` lists `[vdso]` readable at `start..end` of
    // this process; the kernel maps it before the program starts and never
    // unmaps it, and nothing writes to it, so the bytes stay valid to read.
    let image = unsafe { std::slice::from_raw_parts(m.start as *const u8, len) }.to_vec();
    Ok((m, image))
}

/// The length of a vDSO mapped from `start` to `end`, refusing one larger
/// than [`MAX_IMAGE`].
fn image_len(start: u64, end: u64) -> io::Result<usize> {
    if end.saturating_sub(start) > MAX_IMAGE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a vDSO larger than 1 MiB"));
    }
    usize::try_from(end.saturating_sub(start)).map_err(io::Error::other)
}

/// The bytes of process `pid`'s (`"self"` or a number) vDSO mapped from
/// `start` to `end`, through `/proc/<pid>/mem` (another process's needs
/// ptrace access: root).
pub fn read_image(pid: &str, start: u64, end: u64) -> io::Result<Vec<u8>> {
    let mut image = vec![0u8; image_len(start, end)?];
    File::open(format!("/proc/{pid}/mem"))?.read_exact_at(&mut image, start)?;
    Ok(image)
}

/// Writes this process's vDSO image to `dir/vdso.so` and returns the path.
pub fn dump_own(dir: &Path) -> io::Result<PathBuf> {
    let (_, image) = own_image()?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("vdso.so");
    let tmp = dir.join(format!("vdso.so.tmp{}", std::process::id()));
    std::fs::write(&tmp, &image)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// One function the vDSO exports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdsoSymbol {
    /// Its name in `.dynsym` (without the symbol version).
    pub name: Box<str>,
    /// Its virtual address in the image.
    pub addr: u64,
    /// Its size in bytes; 0 when unknown (then only its first byte matches).
    pub size: u64,
    /// Whether it is a weak alias (`clock_gettime` of `__vdso_clock_gettime`).
    pub weak: bool,
}

impl VdsoSymbol {
    fn contains(&self, vaddr: u64) -> bool {
        vaddr == self.addr || (vaddr > self.addr && vaddr - self.addr < self.size)
    }
}

/// The functions of a vDSO image, from its dynamic symbol table, and its
/// loadable segments to turn a file offset into a symbol address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VdsoSymbols {
    /// Length of the mapping the image was read from.
    image_len: u64,
    /// xxh3 of the image's bytes.
    image_hash: u64,
    /// `PT_LOAD` segments: (file offset, file size, virtual address).
    segments: Vec<(u64, u64, u64)>,
    /// Exported functions, sorted by address.
    symbols: Vec<VdsoSymbol>,
}

impl VdsoSymbols {
    /// Reads the exported functions of a vDSO `image` (the bytes of its
    /// whole mapping).
    pub fn parse(image: &[u8]) -> io::Result<VdsoSymbols> {
        let bad = |e: object::Error| io::Error::new(io::ErrorKind::InvalidData, format!("the vDSO image: {e}"));
        let elf = ElfFile64::<object::Endianness>::parse(image).map_err(bad)?;
        let segments: Vec<(u64, u64, u64)> = elf
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        if segments.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the vDSO image has no loadable segment"));
        }
        let mut symbols: Vec<VdsoSymbol> = elf
            .dynamic_symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
            .filter_map(|s| {
                let name = s.name().ok().filter(|n| !n.is_empty())?;
                Some(VdsoSymbol { name: name.into(), addr: s.address(), size: s.size(), weak: s.is_weak() })
            })
            .collect();
        if symbols.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the vDSO image exports no function"));
        }
        symbols.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        let image_hash = xxhash_rust::xxh3::xxh3_64(image);
        Ok(VdsoSymbols { image_len: image.len() as u64, image_hash, segments, symbols })
    }

    /// This process's vDSO, read and parsed once for the life of the
    /// process (the kernel never changes it); `None`, logged once, when it
    /// cannot be read.
    pub fn own() -> Option<&'static VdsoSymbols> {
        static OWN: OnceLock<Option<VdsoSymbols>> = OnceLock::new();
        OWN.get_or_init(|| match own_image().and_then(|(_, image)| VdsoSymbols::parse(&image)) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this process's vDSO; frames in [vdso] keep their offsets");
                None
            }
        })
        .as_ref()
    }

    /// Length of the mapping the image came from: a `[vdso]` mapping of
    /// another length is another image (a 32-bit process's).
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// Whether `image` is the image these symbols were read from.
    pub fn is_image(&self, image: &[u8]) -> bool {
        image.len() as u64 == self.image_len && xxhash_rust::xxh3::xxh3_64(image) == self.image_hash
    }

    /// Whether process `pid`'s `[vdso]` mapping from `start` to `end` holds
    /// the image these symbols were read from. Every 64-bit process of a
    /// kernel maps the same one; a 32-bit process maps another. When its
    /// memory cannot be read (it exited, no ptrace access), the length
    /// decides.
    pub fn is_image_of(&self, pid: u32, start: u64, end: u64) -> bool {
        if end.saturating_sub(start) != self.image_len {
            return false;
        }
        match read_image(&pid.to_string(), start, end) {
            Ok(image) => self.is_image(&image),
            Err(_) => true,
        }
    }

    /// The exported functions, sorted by address.
    pub fn symbols(&self) -> &[VdsoSymbol] {
        &self.symbols
    }

    /// The virtual address of file offset `offset` of the image, through
    /// the loadable segment holding it.
    pub fn vaddr(&self, offset: u64) -> Option<u64> {
        let (seg_off, _, seg_vaddr) =
            self.segments.iter().find(|(o, size, _)| offset >= *o && offset - *o < (*size).max(1))?;
        Some(offset - seg_off + seg_vaddr)
    }

    /// The function at file offset `offset` of the image (an address in a
    /// `[vdso]` mapping minus the mapping's start, plus its offset). Of
    /// aliases, the strong symbol names it over its weak aliases; of
    /// nested symbols, the innermost.
    pub fn at_offset(&self, offset: u64) -> Option<&VdsoSymbol> {
        let vaddr = self.vaddr(offset)?;
        self.symbols
            .iter()
            .filter(|s| s.contains(vaddr))
            .min_by(|a, b| (vaddr - a.addr, a.weak, &a.name).cmp(&(vaddr - b.addr, b.weak, &b.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unwind::Table;

    #[test]
    fn the_vdso_has_an_unwind_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dump_own(dir.path()).expect("vdso dumped");
        let (table, stats) = Table::build(&path).expect("the vDSO has .eh_frame");
        println!("vdso: {} FDEs, {} rows", stats.fdes, table.rows.len());
        assert!(stats.fdes > 0 && !table.rows.is_empty());
    }

    #[test]
    fn the_own_image_is_the_mapping_as_the_kernel_reads_it() {
        let (m, image) = own_image().expect("this process maps a vDSO");
        assert!(image.starts_with(b"\x7fELF"), "the vDSO image is an ELF file");
        let through_proc = read_image("self", m.start, m.end).expect("/proc/self/mem reads the vDSO");
        assert!(image == through_proc, "the copy differs from the mapping's bytes");
    }

    #[test]
    fn frames_in_the_own_vdso_are_named_by_its_exported_functions() {
        let (m, image) = own_image().expect("this process maps a vDSO");
        let syms = VdsoSymbols::parse(&image).expect("the vDSO parses");
        println!("{:?}", syms.symbols());
        assert_eq!(syms.image_len(), m.end - m.start);
        assert!(VdsoSymbols::own().is_some_and(|own| *own == syms), "the cached parse is the same");
        // Every exported function is found at its first and last byte, by
        // its strong name when it has a weak alias.
        for s in syms.symbols().iter().filter(|s| s.size > 0) {
            // Linked at 0 and mapped from offset 0: file offset = address.
            assert_eq!(syms.vaddr(s.addr), Some(s.addr));
            for off in [s.addr, s.addr + s.size - 1] {
                let found = syms.at_offset(off).expect("an exported function is found");
                assert_eq!(found.addr, s.addr, "{off:#x}: {found:?} for {s:?}");
                let strong_alias = syms.symbols().iter().any(|o| o.addr == s.addr && !o.weak);
                assert!(!found.weak || !strong_alias, "{off:#x}: the weak alias {found:?} was chosen");
            }
        }
        assert!(syms.at_offset(m.end - m.start + 0x1000).is_none(), "past the image");
        assert!(syms.is_image_of(std::process::id(), m.start, m.end));
        let mut other = image.clone();
        other[0x10] ^= 1;
        assert!(syms.is_image(&image) && !syms.is_image(&other) && !syms.is_image(&image[..0x1000]));
        assert!(!syms.is_image_of(std::process::id(), m.start, m.end + 0x1000), "another length");
        // vdso(7): x86_64's vDSO exports __vdso_clock_gettime, with
        // clock_gettime its weak alias; the frame gets the strong name.
        if let Some(alias) = syms.symbols().iter().find(|s| &*s.name == "clock_gettime") {
            let named = syms.at_offset(alias.addr + 8).map(|s| &*s.name);
            assert_eq!(named, Some("__vdso_clock_gettime"));
        }
    }

    #[test]
    fn the_strong_name_and_the_innermost_symbol_win_whatever_the_names() {
        let sym = |name: &str, addr, size, weak| VdsoSymbol { name: name.into(), addr, size, weak };
        let syms = VdsoSymbols {
            image_len: 0x2000,
            image_hash: 0,
            // Mapped from offset 0x1000 at address 0x3000.
            segments: vec![(0x1000, 0x1000, 0x3000)],
            symbols: vec![
                sym("a_weak_alias", 0x3100, 0x80, true),
                sym("outer", 0x3200, 0x100, false),
                sym("inner", 0x3240, 0x10, false),
                sym("sizeless", 0x3400, 0, false),
                sym("z_strong", 0x3100, 0x80, false),
            ],
        };
        let name = |off| syms.at_offset(off).map(|s| &*s.name);
        assert_eq!(name(0x1100), Some("z_strong"));
        assert_eq!(name(0x117f), Some("z_strong"));
        assert_eq!(name(0x1180), None, "between functions");
        assert_eq!(name(0x1210), Some("outer"));
        assert_eq!(name(0x1244), Some("inner"));
        assert_eq!(name(0x1250), Some("outer"));
        assert_eq!(name(0x1400), Some("sizeless"));
        assert_eq!(name(0x1401), None, "a sizeless symbol only at its address");
        assert_eq!(name(0x0fff), None, "before the loadable segment");
        assert_eq!(syms.vaddr(0x1100), Some(0x3100));
    }

    #[test]
    fn a_damaged_image_is_an_error_not_a_panic() {
        let (_, image) = own_image().expect("this process maps a vDSO");
        assert!(VdsoSymbols::parse(&image[..32]).is_err());
        assert!(VdsoSymbols::parse(b"not an ELF image at all, just text").is_err());
        let mut cut = image.clone();
        cut.truncate(0x100);
        assert!(VdsoSymbols::parse(&cut).is_err(), "the symbol table is gone");
    }
}
