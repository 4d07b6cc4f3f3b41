//! Aperture symbols and unwinding: what user space knows about the code a
//! process maps.
//!
//! - [`Bounded`] — the bounded two-generation cache the symbolizer's and
//!   the agent's caches are made of.
//! - [`elf`] — the parts of an ELF file unwinding needs: sections, loadable
//!   segments (load bias), build id.
//! - [`maps`] — a process's executable mappings from `/proc/<pid>/maps`.
//! - [`unwind`] — unwind tables built from `.eh_frame`/`.debug_frame` with
//!   gimli: compact 8-byte rows the in-kernel walker searches, keyed by
//!   build id and cached on disk.
//! - [`vdso`] — the vDSO image as a file, so it gets a table like any object,
//!   and its exported functions, which name the frames in `[vdso]`.
//!
//! Nothing here touches BPF: `aperture-probes` loads the tables into the
//! kernel.

mod bounded;
pub mod elf;
pub mod maps;
pub mod unwind;
pub mod vdso;

pub use bounded::Bounded;
