//! The embedded store: one SQLite file (`<data_dir>/aperture.db`, WAL mode,
//! `synchronous=FULL` so an acknowledged batch survives a power cut), used
//! when no ClickHouse endpoint is configured.
//!
//! Tables (see `docs/storage.md` for the SQL a user would run):
//! - `samples`: one row per (window, kind, labels, stack, detail), values
//!   summed; `histogram` is a JSON array of the 32 log2 latency buckets.
//! - `stacks`: one row per stack hash; `frames` is a JSON array, leaf first.
//! - `frame_ledger`: committed frames per agent run (watermark + the few
//!   committed above it), written in the same transaction as the rows.
//! - `schema_migrations`: applied schema versions.
//!
//! SQLite integers are signed 64-bit: stack hashes are stored bit-cast to
//! `i64` (so they may read negative in SQL), other counters saturate.
//!
//! Writes run on the caller's thread (the dedicated writer thread); reads run
//! on tokio's blocking pool over a second connection, which WAL lets proceed
//! while a write is in progress.
//!
//! Rows are appended per shard flush, so one key gets a row per flush that
//! carried it (up to ~20 per 10 s window with 500 ms agent batches). Once a
//! write brings rows of a newer window, the rows of each key in the windows
//! before it are merged into one (cpu, lock and slow-call rows, whose
//! values add up; syscall rows keep their rows), in their own transaction
//! after the write committed; windows up to [`COMPACT_LATE_S`] older are
//! merged again for rows that arrive late.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aperture_core::ids::{AgentId, BootId};
use aperture_core::ledger::{RunKey, RunState};
use aperture_core::model::{LATENCY_BUCKETS, Mode, Stack, StackFrame, StackHash};
use aperture_core::shard::RowKind;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OpenFlags, params, params_from_iter};
use serde::{Deserialize, Serialize};

use super::{
    LabelName, LockTotal, OpenError, QueryError, RetentionReport, Selector, SetLabel, StackTotal, Store, StoreFuture,
    StoreKind, SyscallTotal, Undecodable, UndecodableCounts, WriteBatch, WriteError, mode_kinds, tags_text,
};
use crate::clock::unix_now_s;

mod migrations;

use migrations::MIGRATIONS;

const STORE: &str = "sqlite";

/// One stack frame as stored in `stacks.frames`.
#[derive(Serialize, Deserialize)]
struct FrameJson {
    symbol: String,
    module: String,
    file: String,
    line: u32,
    offset: u64,
    address: u64,
    kernel: bool,
}

/// The embedded SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    reader: Arc<Mutex<Connection>>,
    undecodable: Arc<UndecodableCounts>,
    /// Windows starting before this (Unix s) are compacted; 0 before the first write.
    compacted_below_s: Arc<AtomicU64>,
}

/// Windows this much older than the last compacted one are compacted
/// again, for rows written late (frames resent after a reconnect).
pub const COMPACT_LATE_S: u64 = 60;

/// The identity of a row: window, kind, labels, stack, detail, name.
type RowIdentity = (i64, i64, String, String, String, String, String, i64, i64, i64, String);

/// The merged values of the rows of one identity.
#[derive(Default)]
struct MergedRow {
    rowids: Vec<i64>,
    count: u64,
    total_ns: u64,
    errors: u64,
    max_ns: u64,
}

/// Virtual-machine steps between two checks of a query's cancel flag
/// (microseconds of work each).
const PROGRESS_OPS: std::ffi::c_int = 10_000;

/// Sets its flag when dropped: the future waiting for a query went away.
#[derive(Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn open_err(path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Sqlite { path: path.display().to_string(), reason: e.to_string() }
}

fn query_err(e: impl std::fmt::Display) -> QueryError {
    QueryError::Store { store: STORE, reason: e.to_string() }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A panic while holding the connection leaves it usable (every write is a
    // transaction that rolls back on drop), so a poisoned lock is recovered.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Reads a `TOTAL(...)`: SQLite's `SUM` fails on integer overflow (stored
/// values saturate at `i64::MAX`, so two saturated rows overflow), `TOTAL`
/// sums as a double. Sums up to 2^53 are exact; larger ones saturate at
/// `u64::MAX` (`as` saturates, and maps NaN to 0).
fn from_total(v: f64) -> u64 {
    v as u64
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/aperture.db` and applies migrations.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, OpenError> {
        std::fs::create_dir_all(data_dir).map_err(|e| open_err(data_dir, e))?;
        let path = data_dir.join("aperture.db");
        let writer = Connection::open(&path).map_err(|e| open_err(&path, e))?;
        configure(&writer).map_err(|e| open_err(&path, e))?;
        migrate(&writer)?;
        let reader = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(|e| open_err(&path, e))?;
        reader.busy_timeout(Duration::from_secs(5)).map_err(|e| open_err(&path, e))?;
        Ok(SqliteStore {
            path,
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            undecodable: Arc::default(),
            compacted_below_s: Arc::default(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the reader connection, on tokio's blocking pool. When
    /// the returned future is dropped (its HTTP request timed out or was
    /// cancelled), the query is interrupted at its next progress check, or
    /// not started, so it does not hold the single reader.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreFuture<'static, Result<T, QueryError>> {
        let reader = Arc::clone(&self.reader);
        Box::pin(async move {
            let cancel = CancelOnDrop::default();
            let cancelled = Arc::clone(&cancel.0);
            tokio::task::spawn_blocking(move || {
                let conn = lock(&reader);
                if cancelled.load(Ordering::Relaxed) {
                    return Err(query_err("the query was cancelled before it started: its request ended"));
                }
                let flag = Arc::clone(&cancelled);
                conn.progress_handler(PROGRESS_OPS, Some(move || flag.load(Ordering::Relaxed)));
                let result = f(&conn);
                conn.progress_handler(0, None::<fn() -> bool>);
                result.map_err(|e| match e.sqlite_error_code() {
                    Some(ErrorCode::OperationInterrupted) => {
                        query_err("the query was interrupted: its request timed out or was cancelled")
                    }
                    _ => query_err(e),
                })
            })
            .await
            .map_err(|e| query_err(format!("query task failed: {e}")))?
        })
    }

    fn write_sync(&self, batch: &WriteBatch) -> Result<(), WriteError> {
        let mut conn = lock(&self.writer);
        let tx = conn.transaction().map_err(classify)?;
        {
            let mut insert_row = tx
                .prepare_cached(
                    "INSERT INTO samples (window_start, kind, node, namespace, pod, container, process, pid,
                        stack_hash, detail, name, count, total_ns, errors, max_ns, histogram,
                        service, tags, profile_type)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                )
                .map_err(classify)?;
            for flush in &batch.flushes {
                for (key, value) in &flush.rows {
                    let Some(labels) = flush.labels.get(key.labels as usize) else {
                        return Err(WriteError::Rejected {
                            store: STORE,
                            reason: format!("row refers to label set {} of {}", key.labels, flush.labels.len()),
                        });
                    };
                    let histogram = histogram_json(&value.histogram);
                    insert_row
                        .execute(params![
                            to_i64(key.window_start_s),
                            key.kind as u8,
                            labels.node,
                            labels.namespace,
                            labels.pod,
                            labels.container,
                            labels.process,
                            labels.pid,
                            key.stack.0 as i64, // bit cast, see the module doc
                            key.detail,
                            value.name,
                            to_i64(value.count),
                            to_i64(value.total_ns),
                            to_i64(value.errors),
                            to_i64(value.max_ns),
                            histogram,
                            labels.service,
                            tags_text(&labels.tags),
                            labels.profile_type,
                        ])
                        .map_err(classify)?;
                }
            }
            let mut insert_stack =
                tx.prepare_cached("INSERT OR IGNORE INTO stacks (hash, frames) VALUES (?1, ?2)").map_err(classify)?;
            for stack in batch.flushes.iter().flat_map(|f| &f.stacks) {
                insert_stack.execute(params![stack.hash.0 as i64, frames_json(stack)]).map_err(classify)?;
            }
            let mut upsert_run = tx
                .prepare_cached(
                    "INSERT INTO frame_ledger (agent_id, boot_id, watermark, above, updated_s)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (agent_id, boot_id) DO UPDATE SET
                        watermark = excluded.watermark, above = excluded.above, updated_s = excluded.updated_s",
                )
                .map_err(classify)?;
            for ((agent, boot), state) in &batch.runs {
                let above = serde_json::to_string(&state.above).unwrap_or_else(|_| "[]".into());
                upsert_run
                    .execute(params![
                        agent.to_hex(),
                        boot.to_hex(),
                        to_i64(state.watermark),
                        above,
                        to_i64(batch.now_s)
                    ])
                    .map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)?;
        self.compact_after(&mut conn, batch);
        Ok(())
    }

    /// Compacts the windows before the newest one `batch` wrote, once per
    /// new window. A failure is logged and left for the next pass: the rows
    /// are committed either way, compaction only saves space.
    fn compact_after(&self, conn: &mut Connection, batch: &WriteBatch) {
        let Some(newest) = batch.flushes.iter().flat_map(|f| &f.rows).map(|(k, _)| k.window_start_s).max() else {
            return;
        };
        let below = self.compacted_below_s.load(Ordering::Relaxed);
        if below == 0 {
            // Nothing older is scanned at start-up: only what this run writes.
            self.compacted_below_s.store(newest, Ordering::Relaxed);
            return;
        }
        if newest <= below {
            return;
        }
        match compact(conn, below.saturating_sub(COMPACT_LATE_S), newest) {
            Ok(removed) => tracing::debug!(removed, below = newest, "embedded store compacted"),
            Err(e) => {
                tracing::warn!("compacting the embedded store's rows before {newest} failed (retried later): {e}")
            }
        }
        self.compacted_below_s.store(newest, Ordering::Relaxed);
    }
}

/// Merges the rows of each identity in the windows `[from_s, to_s)` into
/// one, for the kinds whose values add up: counts, times and errors summed
/// (saturating, as written), the longest wait or call kept. Syscall rows
/// (JSON histograms) are left as they are; queries sum them anyway.
/// Returns the number of rows removed.
fn compact(conn: &mut Connection, from_s: u64, to_s: u64) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut groups: HashMap<RowIdentity, MergedRow> = HashMap::new();
    {
        let mut stmt = tx.prepare_cached(
            "SELECT rowid, window_start, kind, node, namespace, pod, container, process, pid, stack_hash, detail, name,
                    count, total_ns, errors, max_ns
             FROM samples WHERE window_start >= ?1 AND window_start < ?2 AND kind IN (?3, ?4, ?5)",
        )?;
        let kinds = [RowKind::Cpu as u8, RowKind::Lock as u8, RowKind::SlowCall as u8];
        let mut rows = stmt.query(params![to_i64(from_s), to_i64(to_s), kinds[0], kinds[1], kinds[2]])?;
        while let Some(r) = rows.next()? {
            let identity: RowIdentity = (
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
            );
            let m = groups.entry(identity).or_default();
            m.rowids.push(r.get(0)?);
            m.count = m.count.saturating_add(from_i64(r.get(12)?));
            m.total_ns = m.total_ns.saturating_add(from_i64(r.get(13)?));
            m.errors = m.errors.saturating_add(from_i64(r.get(14)?));
            m.max_ns = m.max_ns.max(from_i64(r.get(15)?));
        }
    }
    let mut removed = 0;
    {
        let mut update = tx.prepare_cached(
            "UPDATE samples SET count = ?2, total_ns = ?3, errors = ?4, max_ns = ?5 WHERE rowid = ?1",
        )?;
        let mut delete = tx.prepare_cached("DELETE FROM samples WHERE rowid = ?1")?;
        for m in groups.values().filter(|m| m.rowids.len() > 1) {
            update.execute(params![
                m.rowids[0],
                to_i64(m.count),
                to_i64(m.total_ns),
                to_i64(m.errors),
                to_i64(m.max_ns)
            ])?;
            for id in &m.rowids[1..] {
                delete.execute([id])?;
                removed += 1;
            }
        }
    }
    tx.commit()?;
    Ok(removed)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<(), OpenError> {
    let fail =
        |version, name, e: rusqlite::Error| OpenError::Migration { store: STORE, version, name, reason: e.to_string() };
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_s INTEGER NOT NULL)",
    )
    .map_err(|e| fail(0, "schema_migrations", e))?;
    for &(version, name, sql) in MIGRATIONS {
        let applied: bool = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = ?1)", [version], |r| r.get(0))
            .map_err(|e| fail(version, name, e))?;
        if applied {
            continue;
        }
        let now = unix_now_s();
        let run = || -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            conn.execute_batch(sql)?;
            conn.execute(
                "INSERT OR IGNORE INTO schema_migrations (version, name, applied_s) VALUES (?1, ?2, ?3)",
                params![version, name, to_i64(now)],
            )?;
            conn.execute_batch("COMMIT")
        };
        if let Err(e) = run() {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(fail(version, name, e));
        }
    }
    Ok(())
}

/// Only errors about the values being written mean the rows themselves
/// cannot be stored (a string or blob over SQLite's size limit, a violated
/// constraint, a type mismatch): they are rejected. Everything else is the
/// store failing (busy, locked, read-only, full, I/O, corrupt, not a
/// database, permission, out of memory...) and is retried: the batch is
/// kept, nothing is acknowledged, and the store is reported down.
pub(crate) fn classify(e: rusqlite::Error) -> WriteError {
    let rows_invalid = match &e {
        rusqlite::Error::SqliteFailure(_, _) => matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::TooBig | ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch)
        ),
        rusqlite::Error::ToSqlConversionFailure(_) | rusqlite::Error::IntegralValueOutOfRange(_, _) => true,
        _ => false,
    };
    if rows_invalid {
        WriteError::Rejected { store: STORE, reason: e.to_string() }
    } else {
        WriteError::Unavailable { store: STORE, reason: e.to_string() }
    }
}

fn histogram_json(h: &[u64]) -> String {
    if h.is_empty() { "[]".to_owned() } else { serde_json::to_string(h).unwrap_or_else(|_| "[]".to_owned()) }
}

fn frames_json(stack: &Stack) -> String {
    let frames: Vec<FrameJson> = stack
        .frames
        .iter()
        .map(|f| FrameJson {
            symbol: f.symbol.clone(),
            module: f.module.clone(),
            file: f.file.clone(),
            line: f.line,
            offset: f.module_offset,
            address: f.address,
            kernel: f.kernel,
        })
        .collect();
    serde_json::to_string(&frames).unwrap_or_else(|_| "[]".to_owned())
}

fn frames_from_json(hash: i64, text: &str) -> Option<Stack> {
    let frames: Vec<FrameJson> = serde_json::from_str(text).ok()?;
    Some(Stack {
        hash: StackHash(hash as u64),
        frames: frames
            .into_iter()
            .map(|f| StackFrame {
                address: f.address,
                module_offset: f.offset,
                symbol: f.symbol,
                module: f.module,
                file: f.file,
                line: f.line,
                kernel: f.kernel,
            })
            .collect(),
    })
}

/// `WHERE` clause and parameters for a selector over the given kinds.
fn where_clause(kinds: &[RowKind], sel: &Selector) -> (String, Vec<Value>) {
    let mut sql = String::from("window_start >= ? AND window_start < ?");
    let mut params = vec![Value::Integer(to_i64(sel.from_s)), Value::Integer(to_i64(sel.to_s))];
    if !kinds.is_empty() {
        let marks = vec!["?"; kinds.len()].join(", ");
        sql.push_str(&format!(" AND kind IN ({marks})"));
        params.extend(kinds.iter().map(|k| Value::Integer(i64::from(*k as u8))));
    }
    for (column, value) in sel.filter.string_columns() {
        sql.push_str(&format!(" AND {column} = ?"));
        params.push(Value::Text(value.to_owned()));
    }
    if let Some(pid) = sel.filter.pid {
        sql.push_str(" AND pid = ?");
        params.push(Value::Integer(i64::from(pid)));
    }
    if let Some(details) = sel.filter.lock_details_sql() {
        // Lock rows keep their kind in `detail`.
        sql.push_str(&format!(" AND (kind != {} OR detail IN ({details}))", RowKind::Lock as u8));
    }
    for (key, value) in &sel.filter.tags {
        // See `tags_text`: keys hold no `=` and nothing a newline, so this
        // matches exactly one whole tag.
        sql.push_str(" AND instr(char(10) || tags, ?) > 0");
        params.push(Value::Text(format!("\n{key}={value}\n")));
    }
    for set in &sel.filter.sets {
        if set.values.is_empty() {
            if !set.exclude {
                sql.push_str(" AND 0");
            }
            continue;
        }
        let test = match &set.label {
            SetLabel::Column(column) => {
                // The name comes from SetLabel::column's list, never from a request.
                let column = if *column == "pid" { "CAST(pid AS TEXT)" } else { column };
                params.extend(set.values.iter().map(|v| Value::Text(v.clone())));
                format!("{column} IN ({})", vec!["?"; set.values.len()].join(", "))
            }
            SetLabel::Tag(key) => {
                // As for `tags` above: one whole tag per value.
                params.extend(set.values.iter().map(|v| Value::Text(format!("\n{key}={v}\n"))));
                vec!["instr(char(10) || tags, ?) > 0"; set.values.len()].join(" OR ")
            }
        };
        sql.push_str(&format!(" AND {}({test})", if set.exclude { "NOT " } else { "" }));
    }
    (sql, params)
}

impl Store for SqliteStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }

    fn write<'a>(&'a self, batch: &'a WriteBatch) -> StoreFuture<'a, Result<(), WriteError>> {
        // Runs on the calling thread: the writer thread owns the write path
        // and blocks on it by design.
        Box::pin(async move { self.write_sync(batch) })
    }

    fn load_ledger(&self, since_s: u64) -> StoreFuture<'_, Result<Vec<(RunKey, RunState)>, QueryError>> {
        let undecodable = Arc::clone(&self.undecodable);
        self.read(move |conn| {
            let mut stmt =
                conn.prepare("SELECT agent_id, boot_id, watermark, above FROM frame_ledger WHERE updated_s >= ?1")?;
            let rows = stmt.query_map([to_i64(since_s)], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (agent_hex, boot_hex, watermark, above) = row?;
                let (Ok(agent), Ok(boot)) = (agent_hex.parse::<AgentId>(), boot_hex.parse::<BootId>()) else {
                    undecodable.ledger_row(STORE, &agent_hex, &boot_hex, "agent or boot id is not 32 hex digits");
                    continue;
                };
                let above: BTreeSet<u64> = match serde_json::from_str(&above) {
                    Ok(above) => above,
                    Err(e) => {
                        // The watermark still holds; only the few frames
                        // committed above it are forgotten.
                        undecodable.ledger_row(STORE, &agent_hex, &boot_hex, &format!("`above` is not a list: {e}"));
                        BTreeSet::new()
                    }
                };
                out.push(((agent, boot), RunState { watermark: from_i64(watermark), above }));
            }
            Ok(out)
        })
    }

    fn load_runs<'a>(&'a self, keys: &'a [RunKey]) -> StoreFuture<'a, Result<Vec<(RunKey, RunState)>, QueryError>> {
        let keys = keys.to_vec();
        self.read(move |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT watermark, above FROM frame_ledger WHERE agent_id = ?1 AND boot_id = ?2")?;
            let mut out = Vec::new();
            for key in keys {
                let row = stmt.query_row(params![key.0.to_hex(), key.1.to_hex()], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
                });
                match row {
                    Ok((watermark, above)) => out.push((
                        key,
                        RunState {
                            watermark: from_i64(watermark),
                            above: serde_json::from_str(&above).unwrap_or_default(),
                        },
                    )),
                    Err(rusqlite::Error::QueryReturnedNoRows) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
    }

    fn ping(&self) -> StoreFuture<'_, Result<(), QueryError>> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())))
    }

    fn stack_totals<'a>(
        &'a self,
        kind: RowKind,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<StackTotal>, QueryError>> {
        let (cond, params) = where_clause(&[kind], sel);
        self.read(move |conn| {
            let sql = format!(
                "SELECT stack_hash, TOTAL(count), TOTAL(total_ns) FROM samples WHERE {cond} AND stack_hash != 0
                 GROUP BY stack_hash"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params), |r| {
                Ok(StackTotal {
                    stack: StackHash(r.get::<_, i64>(0)? as u64),
                    count: from_total(r.get(1)?),
                    total_ns: from_total(r.get(2)?),
                })
            })?;
            rows.collect()
        })
    }

    fn stacks<'a>(&'a self, hashes: &'a [StackHash]) -> StoreFuture<'a, Result<Vec<Stack>, QueryError>> {
        let hashes: Vec<i64> = hashes.iter().map(|h| h.0 as i64).collect();
        let undecodable = Arc::clone(&self.undecodable);
        self.read(move |conn| {
            let mut out = Vec::with_capacity(hashes.len());
            for chunk in hashes.chunks(500) {
                let marks = vec!["?"; chunk.len()].join(", ");
                let mut stmt = conn.prepare(&format!("SELECT hash, frames FROM stacks WHERE hash IN ({marks})"))?;
                let rows =
                    stmt.query_map(params_from_iter(chunk), |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
                for row in rows {
                    let (hash, text) = row?;
                    match frames_from_json(hash, &text) {
                        Some(stack) => out.push(stack),
                        None => undecodable.stack(STORE, StackHash(hash as u64), "`frames` is not a JSON frame list"),
                    }
                }
            }
            Ok(out)
        })
    }

    fn syscall_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<SyscallTotal>, QueryError>> {
        let (cond, params) = where_clause(&[RowKind::Syscall], sel);
        self.read(move |conn| {
            let sql = format!(
                "SELECT name, TOTAL(count), TOTAL(errors), TOTAL(total_ns) FROM samples WHERE {cond} GROUP BY name"
            );
            let mut totals: BTreeMap<String, SyscallTotal> = BTreeMap::new();
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params.iter()), |r| {
                Ok(SyscallTotal {
                    name: r.get(0)?,
                    count: from_total(r.get(1)?),
                    errors: from_total(r.get(2)?),
                    total_ns: from_total(r.get(3)?),
                    histogram: vec![0; LATENCY_BUCKETS],
                })
            })?;
            for row in rows {
                let row = row?;
                totals.insert(row.name.clone(), row);
            }
            let sql = format!(
                "SELECT name, CAST(b.key AS INTEGER), TOTAL(b.value) FROM samples, json_each(samples.histogram) AS b
                 WHERE {cond} GROUP BY name, b.key"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params.iter()), |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, f64>(2)?))
            })?;
            for row in rows {
                let (name, bucket, n) = row?;
                if let (Some(t), Ok(bucket)) = (totals.get_mut(&name), usize::try_from(bucket))
                    && let Some(slot) = t.histogram.get_mut(bucket)
                {
                    *slot = from_total(n);
                }
            }
            Ok(totals.into_values().collect())
        })
    }

    fn lock_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<LockTotal>, QueryError>> {
        let (cond, params) = where_clause(&[RowKind::Lock], sel);
        self.read(move |conn| {
            let sql = format!(
                "SELECT stack_hash, name, TOTAL(count), TOTAL(total_ns), MAX(max_ns) FROM samples WHERE {cond}
                 GROUP BY stack_hash, name"
            );
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params), |r| {
                Ok(LockTotal {
                    stack: StackHash(r.get::<_, i64>(0)? as u64),
                    kind: r.get(1)?,
                    count: from_total(r.get(2)?),
                    total_ns: from_total(r.get(3)?),
                    max_ns: from_i64(r.get(4)?),
                })
            })?;
            rows.collect()
        })
    }

    fn label_values<'a>(
        &'a self,
        label: LabelName,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        let kinds = mode.map(mode_kinds).unwrap_or(&[]);
        let (cond, params) = where_clause(kinds, sel);
        let column = label.column();
        self.read(move |conn| {
            let sql = format!("SELECT DISTINCT CAST({column} AS TEXT) FROM samples WHERE {cond}");
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params), |r| r.get::<_, String>(0))?;
            rows.collect()
        })
    }

    fn tag_values<'a>(
        &'a self,
        key: &'a str,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        let kinds = mode.map(mode_kinds).unwrap_or(&[]);
        let (cond, mut params) = where_clause(kinds, sel);
        params.push(Value::Text(format!("\n{key}=")));
        let prefix = format!("{key}=");
        self.read(move |conn| {
            let sql = format!("SELECT DISTINCT tags FROM samples WHERE {cond} AND instr(char(10) || tags, ?) > 0");
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params), |r| r.get::<_, String>(0))?;
            let mut out = BTreeSet::new();
            for tags in rows {
                for line in tags?.lines() {
                    if let Some(v) = line.strip_prefix(&prefix) {
                        out.insert(v.to_owned());
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
    }

    fn tag_keys<'a>(
        &'a self,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        let kinds = mode.map(mode_kinds).unwrap_or(&[]);
        let (cond, params) = where_clause(kinds, sel);
        self.read(move |conn| {
            let sql = format!("SELECT DISTINCT tags FROM samples WHERE {cond} AND tags != ''");
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map(params_from_iter(params), |r| r.get::<_, String>(0))?;
            let mut out = BTreeSet::new();
            for tags in rows {
                for line in tags?.lines() {
                    if let Some((k, _)) = line.split_once('=') {
                        out.insert(k.to_owned());
                    }
                }
            }
            Ok(out.into_iter().collect())
        })
    }

    fn undecodable(&self) -> Undecodable {
        self.undecodable.snapshot()
    }

    fn apply_retention(&self, cutoff_s: u64) -> StoreFuture<'_, Result<RetentionReport, QueryError>> {
        let writer = Arc::clone(&self.writer);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = lock(&writer);
                let rows = conn.execute("DELETE FROM samples WHERE window_start < ?1", [to_i64(cutoff_s)])?;
                let runs = conn.execute("DELETE FROM frame_ledger WHERE updated_s < ?1", [to_i64(cutoff_s)])?;
                Ok::<_, rusqlite::Error>(RetentionReport { removed: (rows + runs) as u64 })
            })
            .await
            .map_err(|e| query_err(format!("retention task failed: {e}")))?
            .map_err(query_err)
        })
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod read_tests;
