//! Unwind tables on disk, so a restart does not rebuild them.
//!
//! One file per object under the cache directory, named by the object's
//! [`TableKey`]: its GNU build id, or, for files without one, a hash of
//! device, inode, size and modification time (a rebuilt file gets a new
//! name). A file is a 16-byte header (`APUNW001`, row count) then the rows
//! as little-endian u64s; anything else is ignored and rebuilt.
//!
//! The directory is bounded: after each write, the least recently used
//! files (by modification time, which a read renews) are removed until the
//! files fit the limit; the file just written stays.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use super::{BuildError, Row, Table};
use crate::elf::{ElfFile, build_id_hex};

const MAGIC: &[u8; 8] = b"APUNW001";

/// Identity of an object's unwind table.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableKey(String);

impl TableKey {
    /// The key of an opened ELF file: build id if it has one, else its
    /// file identity from `meta`.
    pub fn of(elf: &ElfFile, meta: &fs::Metadata) -> TableKey {
        match elf.build_id() {
            Some(id) if !id.is_empty() => TableKey(format!("b-{}", build_id_hex(&id))),
            _ => {
                let ident = format!("{}:{}:{}:{}", meta.dev(), meta.ino(), meta.size(), meta.mtime());
                TableKey(format!("f-{:016x}", xxhash_rust::xxh3::xxh3_64(ident.as_bytes())))
            }
        }
    }

    /// The key as text (also the cache file name).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why the disk cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Building the table failed.
    #[error("building the unwind table of {path} failed: {source}")]
    Build {
        /// The object.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: BuildError,
    },
    /// Reading the object's metadata failed.
    #[error("reading {path} failed: {source}")]
    Io {
        /// The object.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Tables on disk under one directory; `None` directory keeps nothing.
#[derive(Clone, Debug)]
pub struct TableCache {
    dir: Option<PathBuf>,
    /// Bytes of cache files kept at most.
    max_bytes: u64,
    /// Files removed to stay within `max_bytes`.
    removed: Arc<AtomicU64>,
}

/// The default bound on the cache directory.
pub const DEFAULT_CACHE_BYTES: u64 = 256 << 20;

/// Where a table came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from the disk cache.
    Disk,
    /// Built from the object's CFI.
    Built,
}

impl TableCache {
    /// A cache in `dir` (created on first write), or none, holding at most
    /// [`DEFAULT_CACHE_BYTES`].
    pub fn new(dir: Option<PathBuf>) -> TableCache {
        TableCache { dir, max_bytes: DEFAULT_CACHE_BYTES, removed: Arc::default() }
    }

    /// The same cache holding at most `max_bytes` of files.
    pub fn with_limit(self, max_bytes: u64) -> TableCache {
        TableCache { max_bytes, ..self }
    }

    /// Files removed so far to stay within the limit.
    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }

    /// The table of the ELF file at `path` (any path that opens it, e.g.
    /// `/proc/<pid>/map_files/...`), from disk when cached, else built and
    /// stored. A failed write only loses the cache entry.
    pub fn load(&self, path: &Path) -> Result<(TableKey, Table, Origin), CacheError> {
        let io_err = |source| CacheError::Io { path: path.to_owned(), source };
        let file = fs::File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        let elf = ElfFile::from_file(file)
            .map_err(|e| CacheError::Build { path: path.to_owned(), source: BuildError::Elf(e) })?;
        let key = TableKey::of(&elf, &meta);
        if let Some(table) = self.read(&key) {
            return Ok((key, table, Origin::Disk));
        }
        let (table, _) =
            Table::build_elf(&elf).map_err(|source| CacheError::Build { path: path.to_owned(), source })?;
        if let Err(e) = self.write(&key, &table) {
            tracing::debug!(key = key.as_str(), error = %e, "could not store an unwind table on disk");
        }
        Ok((key, table, Origin::Built))
    }

    fn file(&self, key: &TableKey) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{}.unw", key.as_str())))
    }

    /// The cached table of `key`, if a valid one is on disk. Read a block
    /// at a time straight into rows (no copy of the whole file besides them).
    pub fn read(&self, key: &TableKey) -> Option<Table> {
        let file = fs::File::open(self.file(key)?).ok()?;
        let len = file.metadata().ok()?.len();
        // Renewed use: the file is among the last to be removed. Without
        // the right to set the time it is only removed sooner.
        let _ = file.set_modified(SystemTime::now());
        read_table(io::BufReader::with_capacity(BLOCK, file), len)
    }

    /// Stores `table` under `key` (write then rename, so a reader never
    /// sees half a file), a block at a time.
    pub fn write(&self, key: &TableKey, table: &Table) -> io::Result<()> {
        let (Some(dir), Some(path)) = (&self.dir, self.file(key)) else { return Ok(()) };
        fs::create_dir_all(dir)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::File::create(&tmp).and_then(|f| write_table(io::BufWriter::with_capacity(BLOCK, f), table));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path)?;
        self.prune(dir, &path);
        Ok(())
    }

    /// Removes the least recently used cache files, except `keep`, until
    /// the files fit [`TableCache::max_bytes`].
    fn prune(&self, dir: &Path, keep: &Path) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        let mut files: Vec<(SystemTime, u64, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "unw"))
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((meta.modified().ok()?, meta.len(), e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        if total <= self.max_bytes {
            return;
        }
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    total -= len;
                    self.removed.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "could not remove an unwind cache file"),
            }
        }
    }
}

/// Bytes read or written per system call.
const BLOCK: usize = 64 << 10;

fn write_table(mut out: impl Write, table: &Table) -> io::Result<()> {
    out.write_all(MAGIC)?;
    out.write_all(&(table.rows.len() as u64).to_le_bytes())?;
    for r in &table.rows {
        out.write_all(&r.to_u64().to_le_bytes())?;
    }
    out.flush()
}

/// The table in a cache file of `len` bytes; `None` unless it is one.
fn read_table(mut input: impl Read, len: u64) -> Option<Table> {
    let mut head = [0u8; 16];
    input.read_exact(&mut head).ok()?;
    if &head[..8] != MAGIC {
        return None;
    }
    let n = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if len.checked_sub(16)? != n.checked_mul(8)? {
        return None;
    }
    let mut rows: Vec<Row> = Vec::with_capacity(usize::try_from(n).ok()?);
    let mut word = [0u8; 8];
    for _ in 0..n {
        input.read_exact(&mut word).ok()?;
        let row = Row::from_u64(u64::from_le_bytes(word));
        if rows.last().is_some_and(|l| l.pc >= row.pc) {
            return None;
        }
        rows.push(row);
    }
    Some(Table { rows })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_survives_the_disk_and_corrupt_files_are_ignored() {
        let Some(libc) = crate::maps::find_libc() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = TableCache::new(Some(dir.path().to_owned()));
        let (key, built, origin) = cache.load(&libc).expect("builds");
        assert_eq!(origin, Origin::Built);
        assert!(key.as_str().starts_with("b-"), "libc has a build id: {key:?}");
        let (key2, read, origin) = cache.load(&libc).expect("reads");
        assert_eq!((key2, origin), (key.clone(), Origin::Disk));
        assert_eq!(read, built);

        let file = dir.path().join(format!("{}.unw", key.as_str()));
        let mut bytes = fs::read(&file).expect("cache file");
        bytes.truncate(bytes.len() - 3);
        fs::write(&file, &bytes).expect("corrupt");
        assert_eq!(cache.read(&key), None, "a truncated file is not a table");
        let (_, rebuilt, origin) = cache.load(&libc).expect("rebuilds");
        assert_eq!((origin, rebuilt), (Origin::Built, built));
    }

    #[test]
    fn the_least_recently_used_files_go_when_the_cache_is_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let table = |n: u32| Table {
            rows: (0..n).map(|i| Row { pc: i * 16, cfa_offset: 8, rbp_offset: 0, kind: 0 }).collect(),
        };
        let file_len = 16 + 8 * 100;
        // Room for two files of 100 rows, not three.
        let cache = TableCache::new(Some(dir.path().to_owned())).with_limit(2 * file_len + 10);
        let key = |k: &str| TableKey(k.to_owned());
        let old = SystemTime::now() - std::time::Duration::from_secs(600);
        cache.write(&key("a"), &table(100)).expect("a");
        cache.write(&key("b"), &table(100)).expect("b");
        for k in ["a", "b"] {
            fs::File::options()
                .write(true)
                .open(dir.path().join(format!("{k}.unw")))
                .expect("open")
                .set_modified(old)
                .expect("age");
        }
        // Reading `a` makes `b` the least recently used.
        assert!(cache.read(&key("a")).is_some());
        cache.write(&key("c"), &table(100)).expect("c");
        assert!(cache.read(&key("b")).is_none(), "the least recently used file was removed");
        assert!(cache.read(&key("a")).is_some() && cache.read(&key("c")).is_some());
        assert_eq!(cache.removed(), 1);

        // A file larger than the limit by itself is kept until the next write.
        let small = TableCache::new(Some(dir.path().to_owned())).with_limit(10);
        small.write(&key("d"), &table(100)).expect("d");
        assert!(small.read(&key("d")).is_some(), "the file just written stays");
        assert_eq!(small.removed(), 2, "both other files (a, c) were removed");
    }
}
