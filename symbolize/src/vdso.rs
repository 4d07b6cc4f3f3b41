//! The vDSO as a file: every process of a kernel maps the same image, so
//! this process's copy stands for all of them.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::maps::exec_mappings;

/// Writes this process's vDSO image to `dir/vdso.so` and returns the path.
pub fn dump_own(dir: &Path) -> io::Result<PathBuf> {
    let m = exec_mappings(std::process::id())?
        .into_iter()
        .find(|m| m.path == "[vdso]")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "this process maps no [vdso]"))?;
    let len = usize::try_from(m.end - m.start).map_err(io::Error::other)?;
    if len > 1 << 20 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a vDSO larger than 1 MiB"));
    }
    let mut image = vec![0u8; len];
    File::open("/proc/self/mem")?.read_exact_at(&mut image, m.start)?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("vdso.so");
    let tmp = dir.join(format!("vdso.so.tmp{}", std::process::id()));
    std::fs::write(&tmp, &image)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
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
}
