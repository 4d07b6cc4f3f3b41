//! Builds the unwind table of each file given and prints its size and the
//! time to build it cold and to read it back from the disk cache:
//!
//!     cargo run --release -p aperture-symbolize --example unwind_table -- /lib/x86_64-linux-gnu/libc.so.6
//!
//! With `--all`, sums the tables of every file mapped executable by any
//! process on the machine (each file once).

use std::path::PathBuf;
use std::time::Instant;

use aperture_symbolize::unwind::{Origin, Row, Table, TableCache};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("--all") {
        return all();
    }
    let dir = std::env::temp_dir().join(format!("aperture-unwind-example-{}", std::process::id()));
    let cache = TableCache::new(Some(dir.clone()));
    for path in std::env::args().skip(1).map(PathBuf::from) {
        let t0 = Instant::now();
        let (table, stats) = Table::build(&path)?;
        let cold = t0.elapsed();
        let (_, _, origin) = cache.load(&path)?;
        assert_eq!(origin, Origin::Built);
        let t1 = Instant::now();
        let (_, cached, origin) = cache.load(&path)?;
        let warm = t1.elapsed();
        assert_eq!((origin, &cached), (Origin::Disk, &table));
        println!(
            "{}: {} FDEs, {} CFI rows -> {} rows x {} B = {} bytes; {} PLT, {} unsupported; build {:.1} ms, from disk {:.1} ms",
            path.display(),
            stats.fdes,
            stats.cfi_rows,
            table.rows.len(),
            size_of::<Row>(),
            table.bytes(),
            stats.plt_rows,
            stats.unsupported_rows,
            cold.as_secs_f64() * 1e3,
            warm.as_secs_f64() * 1e3
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

fn all() -> Result<(), Box<dyn std::error::Error>> {
    let mut seen = std::collections::HashSet::new();
    let (mut files, mut rows, mut failed, mut processes) = (0usize, 0usize, 0usize, 0usize);
    let t0 = Instant::now();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(maps) = aperture_symbolize::maps::exec_mappings(pid) else { continue };
        processes += 1;
        for m in maps.iter().filter(|m| m.is_file()) {
            if !seen.insert((m.dev, m.inode)) {
                continue;
            }
            match Table::build(&m.map_file(pid)) {
                Ok((t, _)) => {
                    files += 1;
                    rows += t.rows.len();
                }
                Err(_) => failed += 1,
            }
        }
    }
    println!(
        "{processes} processes, {files} files with tables ({failed} without): {rows} rows, {} bytes; built in {:.0} ms",
        rows * size_of::<Row>(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
