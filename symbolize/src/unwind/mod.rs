//! Unwind tables for the in-kernel stack walker, built from an object's
//! `.eh_frame` (or `.debug_frame` when only that exists) with gimli.
//!
//! A table is a sorted list of 8-byte [`Row`]s: from its `pc` (an address
//! in the file's own address space, before load bias) up to the next row's
//! `pc`, the canonical frame address (CFA) is `rsp` or `rbp` plus an offset,
//! the return address is at CFA-8 (x86_64 calls push it there; rows where
//! the CFI says otherwise are marked [`CfaKind::Unsupported`]), and the
//! caller's `rbp` is either unchanged or saved at CFA+`8 * rbp_offset`.
//!
//! The few rules that do not fit are kept apart: the expression every PLT
//! on x86_64 uses (`rsp + 8`, plus 8 more past the stub's push) is
//! [`CfaKind::Plt`]; any other expression or register rule (signal
//! trampolines, `setcontext`, hand-written assembly) is
//! [`CfaKind::Unsupported`], which the walker reports as a cut stack. A
//! row of kind [`CfaKind::None`] ends the range of one FDE where no other
//! starts (addresses without unwind info); [`CfaKind::End`] marks the
//! outermost frame (return address undefined: `_start`, thread entry).

mod cache;

use std::path::Path;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Reader, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};

pub use cache::{CacheError, DEFAULT_CACHE_BYTES, Origin, TableCache, TableKey};

use crate::elf::{ElfError, ElfFile};

/// How a row computes the CFA (`Row::kind & KIND_CFA_MASK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CfaKind {
    /// No unwind information covers this address.
    None = 0,
    /// CFA = rsp + `cfa_offset`.
    Rsp = 1,
    /// CFA = rbp + `cfa_offset`.
    Rbp = 2,
    /// A PLT stub: CFA = rsp + 8, plus 8 when `(pc & 15) >= cfa_offset`.
    Plt = 3,
    /// A rule the walker does not evaluate (expression or register based).
    Unsupported = 4,
    /// The outermost frame: there is no caller.
    End = 5,
}

impl CfaKind {
    fn from_bits(b: u8) -> CfaKind {
        match b & KIND_CFA_MASK {
            1 => CfaKind::Rsp,
            2 => CfaKind::Rbp,
            3 => CfaKind::Plt,
            4 => CfaKind::Unsupported,
            5 => CfaKind::End,
            _ => CfaKind::None,
        }
    }
}

/// Bits of [`Row::kind`] holding the [`CfaKind`].
pub const KIND_CFA_MASK: u8 = 0x07;
/// [`Row::kind`] bit: the caller's rbp is saved at CFA + 8 * `rbp_offset`.
pub const KIND_RBP_SAVED: u8 = 0x08;
/// [`Row::kind`] bit: the caller's rbp is recovered in a way the walker
/// does not follow (another register, an expression); it becomes unknown.
pub const KIND_RBP_UNKNOWN: u8 = 0x10;

/// One unwind row, 8 bytes, the layout of `struct ap_unwind_row` in
/// `probes/bpf/aperture.h` (as one little-endian u64 in the BPF map).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Row {
    /// First address (file address space) the row applies to.
    pub pc: u32,
    /// Offset added to the CFA base register (or the PLT threshold).
    pub cfa_offset: i16,
    /// Where the caller's rbp is saved, in units of 8 bytes from the CFA.
    pub rbp_offset: i8,
    /// [`CfaKind`] in the low 3 bits plus `KIND_RBP_*` flags.
    pub kind: u8,
}
const _: () = assert!(size_of::<Row>() == 8);

impl Row {
    /// The CFA rule.
    pub fn cfa(&self) -> CfaKind {
        CfaKind::from_bits(self.kind)
    }

    /// Where the caller's rbp is saved, bytes from the CFA, if it is.
    pub fn rbp_saved_at(&self) -> Option<i32> {
        (self.kind & KIND_RBP_SAVED != 0).then(|| i32::from(self.rbp_offset) * 8)
    }

    /// The row as the u64 the BPF map holds.
    pub fn to_u64(self) -> u64 {
        u64::from(self.pc)
            | u64::from(self.cfa_offset as u16) << 32
            | u64::from(self.rbp_offset as u8) << 48
            | u64::from(self.kind) << 56
    }

    /// The inverse of [`Row::to_u64`].
    pub fn from_u64(v: u64) -> Row {
        Row {
            pc: v as u32,
            cfa_offset: (v >> 32) as u16 as i16,
            rbp_offset: (v >> 48) as u8 as i8,
            kind: (v >> 56) as u8,
        }
    }

    fn same_rule(&self, other: &Row) -> bool {
        self.cfa_offset == other.cfa_offset && self.rbp_offset == other.rbp_offset && self.kind == other.kind
    }
}

/// Why a table could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The file could not be read as ELF.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// The file has neither `.eh_frame` nor `.debug_frame`.
    #[error("no .eh_frame or .debug_frame section")]
    NoCfi,
    /// The CFI does not parse.
    #[error("malformed call frame information: {0}")]
    Cfi(#[from] gimli::Error),
    /// An address does not fit the rows' 32-bit pc.
    #[error("code at {0:#x} lies above 4 GiB; 32-bit row addresses cannot hold it")]
    AddressTooHigh(u64),
}

/// The rows of one object, sorted by `pc`, plus what they were built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Sorted by `pc`, no two adjacent rows with the same rule.
    pub rows: Vec<Row>,
}

/// Counts of what a build met (for tests and benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildStats {
    /// FDEs read.
    pub fdes: u64,
    /// CFI rows read, before merging.
    pub cfi_rows: u64,
    /// Rows with the PLT expression.
    pub plt_rows: u64,
    /// Rows with a rule the walker does not evaluate.
    pub unsupported_rows: u64,
}

impl Table {
    /// The row covering `pc` (file address space), if any row starts at or
    /// before it.
    pub fn lookup(&self, pc: u64) -> Option<&Row> {
        let pc = u32::try_from(pc).ok()?;
        let i = self.rows.partition_point(|r| r.pc <= pc);
        i.checked_sub(1).map(|i| &self.rows[i])
    }

    /// Size of the rows in bytes.
    pub fn bytes(&self) -> usize {
        self.rows.len() * size_of::<Row>()
    }

    /// Builds the table of the ELF file at `path`.
    pub fn build(path: &Path) -> Result<(Table, BuildStats), BuildError> {
        Table::build_elf(&ElfFile::open(path)?)
    }

    /// Builds the table of an opened ELF file.
    pub fn build_elf(elf: &ElfFile) -> Result<(Table, BuildStats), BuildError> {
        let text = elf.section(".text").map_or(0, |s| s.addr);
        let got = elf.section(".got").map_or(0, |s| s.addr);
        let mut raw: Vec<Row> = Vec::new();
        let mut stats = BuildStats::default();
        if let Some(s) = elf.section(".eh_frame").filter(|s| s.size > 0) {
            let data = elf.read(s)?;
            let bases = BaseAddresses::default().set_eh_frame(s.addr).set_text(text).set_got(got);
            let section = EhFrame::new(&data, LittleEndian);
            collect(&section, &bases, &mut raw, &mut stats)?;
        } else if let Some(s) = elf.section(".debug_frame").filter(|s| s.size > 0) {
            let data = elf.read(s)?;
            let bases = BaseAddresses::default().set_text(text).set_got(got);
            let section = DebugFrame::new(&data, LittleEndian);
            collect(&section, &bases, &mut raw, &mut stats)?;
        } else {
            return Err(BuildError::NoCfi);
        }
        Ok((Table { rows: compact(raw) }, stats))
    }
}

/// Reads every FDE's rows into `out`, unsorted, each FDE followed by a
/// [`CfaKind::None`] row at its end (which loses to a real row at the same
/// pc). Rows at or above 4 GiB are left out (their addresses do not fit a
/// row; the walker finds no row there). Rows are collected in their final
/// 8-byte form: a large library has millions, and this buffer is the
/// build's peak memory.
fn collect<'d, S>(
    section: &S,
    bases: &BaseAddresses,
    out: &mut Vec<Row>,
    stats: &mut BuildStats,
) -> Result<(), BuildError>
where
    S: UnwindSection<EndianSlice<'d, LittleEndian>>,
{
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else { continue };
        let fde = match partial.parse(S::cie_from_offset) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "skipping an FDE that does not parse");
                continue;
            }
        };
        if fde.len() == 0 {
            continue;
        }
        stats.fdes += 1;
        let mut table = fde.rows(section, bases, &mut ctx)?;
        while let Some(r) = table.next_row()? {
            stats.cfi_rows += 1;
            let Ok(pc) = u32::try_from(r.start_address()) else { continue };
            let row = encode(section, r.cfa(), r.register(X86_64::RBP), r.register(X86_64::RA), stats);
            out.push(Row { pc, ..row });
        }
        if let Ok(pc) = u32::try_from(fde.end_address()) {
            out.push(Row { pc, kind: CfaKind::None as u8, ..Row::default() });
        }
    }
    Ok(())
}

/// The bytes of the expression every x86_64 PLT's FDE uses, `N` at index 6
/// (`DW_OP_lit<N>`): `breg7 8; breg16 0; lit15; and; lit<N>; ge; lit3;
/// shl; plus`.
const PLT_EXPR: [u8; 11] = [0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x30, 0x2a, 0x33, 0x24, 0x22];

fn plt_threshold(expr: &[u8]) -> Option<i16> {
    if expr.len() != PLT_EXPR.len() {
        return None;
    }
    let same = expr.iter().zip(PLT_EXPR).enumerate().all(|(i, (&a, b))| if i == 6 { a & 0xf0 == 0x30 } else { a == b });
    same.then(|| i16::from(expr[6] - 0x30))
}

fn encode<'d, S>(
    section: &S,
    cfa: &CfaRule<usize>,
    rbp: Option<RegisterRule<usize>>,
    ra: Option<RegisterRule<usize>>,
    stats: &mut BuildStats,
) -> Row
where
    S: UnwindSection<EndianSlice<'d, LittleEndian>>,
{
    let unsupported = |stats: &mut BuildStats| {
        stats.unsupported_rows += 1;
        Row { kind: CfaKind::Unsupported as u8, ..Row::default() }
    };
    let mut row = Row::default();
    match ra {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => {
            row.kind = CfaKind::End as u8;
            return row;
        }
        _ => return unsupported(stats),
    }
    match cfa {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = if *register == X86_64::RSP {
                CfaKind::Rsp
            } else if *register == X86_64::RBP {
                CfaKind::Rbp
            } else {
                return unsupported(stats);
            };
            let Ok(off) = i16::try_from(*offset) else { return unsupported(stats) };
            row.kind = kind as u8;
            row.cfa_offset = off;
        }
        CfaRule::Expression(e) => {
            let bytes = e.get(section).ok().and_then(|x| x.0.to_slice().ok().map(|s| s.to_vec()));
            match bytes.as_deref().and_then(plt_threshold) {
                Some(n) => {
                    stats.plt_rows += 1;
                    row.kind = CfaKind::Plt as u8;
                    row.cfa_offset = n;
                }
                None => return unsupported(stats),
            }
        }
    }
    match rbp {
        None | Some(RegisterRule::Undefined | RegisterRule::SameValue) => {}
        Some(RegisterRule::Offset(off)) if off % 8 == 0 && i8::try_from(off / 8).is_ok() => {
            row.kind |= KIND_RBP_SAVED;
            row.rbp_offset = (off / 8) as i8;
        }
        Some(_) => row.kind |= KIND_RBP_UNKNOWN,
    }
    row
}

/// Sorts, drops gap rows that a real row replaces or that only cover
/// padding, and merges runs with the same rule, in place (no second buffer
/// the size of the raw rows).
fn compact(mut raw: Vec<Row>) -> Vec<Row> {
    // At equal pc a real row sorts after the gap row, and the last wins.
    raw.sort_by_key(|r| (r.pc, r.cfa() != CfaKind::None));
    let mut kept = 0usize;
    for i in 0..raw.len() {
        let r = raw[i];
        let next = raw.get(i + 1);
        if next.is_some_and(|n| n.pc == r.pc) {
            continue;
        }
        // The end of an FDE followed within 16 bytes by the next function
        // is alignment padding no thread executes: no row needed.
        if r.cfa() == CfaKind::None && next.is_some_and(|n| n.pc - r.pc < 16) {
            continue;
        }
        if kept > 0 && raw[kept - 1].same_rule(&r) {
            continue;
        }
        // `kept <= i`: the rows still to be read are not overwritten.
        raw[kept] = r;
        kept += 1;
    }
    raw.truncate(kept);
    raw.shrink_to_fit();
    raw
}

#[cfg(test)]
mod tests;
