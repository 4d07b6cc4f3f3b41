//! Builds the unwind table of each file given and prints its size and the
//! time to build it cold and to read it back from the disk cache:
//!
//!     cargo run --release -p aperture-symbolize --example unwind_table -- /lib/x86_64-linux-gnu/libc.so.6

use std::path::PathBuf;
use std::time::Instant;

use aperture_symbolize::unwind::{Origin, Row, Table, TableCache};

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
