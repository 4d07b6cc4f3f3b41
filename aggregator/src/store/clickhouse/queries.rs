//! Reads: the aggregate queries behind the API, retention.
//!
//! Label filter values are bound as parameters (the client escapes them);
//! stack hashes and times are integers formatted into the SQL. API reads run
//! on a client with `max_execution_time` set (see [`read_client`]), and their
//! sums saturate at `u64::MAX` rather than wrap (see [`sat_sum`]).

use aperture_core::model::{Mode, StackHash};
use aperture_core::shard::RowKind;
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::request_builder::BATCH_MARKER_KIND;
use crate::store::{
    LabelName, LockTotal, QueryError, Selector, SetLabel, StackTotal, SyscallTotal, UndecodableCounts, mode_kinds,
};

const STORE: &str = "clickhouse";

/// The client for API reads: ClickHouse stops a query after `timeout`
/// (`max_execution_time`, whole seconds, at least 1), so a query whose HTTP
/// request has timed out does not keep running on the server.
pub(crate) fn read_client(client: &Client, timeout: std::time::Duration) -> Client {
    client.clone().with_setting("max_execution_time", timeout.as_secs().max(1).to_string())
}

/// `sum(column)` of a `UInt64` column, saturating at `u64::MAX`: ClickHouse's
/// `sum` of `UInt64` wraps around, so the exact sum is kept unless a second
/// sum, in `Float64`, reaches 2^64 (works on every server version). Rows
/// the summing engine has already merged hold their own sum, which wraps
/// past 2^64 (see `docs/storage.md`).
fn sat_sum(column: &str) -> String {
    format!("if(sum(toFloat64({column})) >= {SAT_F64}, {max}, sum({column}))", max = u64::MAX)
}

/// 2^64 as a ClickHouse `Float64` literal.
const SAT_F64: &str = "18446744073709551616.0";

pub(crate) fn query_err(e: impl std::fmt::Display) -> QueryError {
    QueryError::Store { store: STORE, reason: e.to_string() }
}

/// A `WHERE` clause over `samples` with `?` placeholders, and the values to bind.
pub(crate) struct Where {
    pub sql: String,
    pub binds: Vec<String>,
    pub pid: Option<u32>,
}

pub(crate) fn where_clause(kinds: &[RowKind], sel: &Selector) -> Where {
    let mut sql = format!(
        "window_start >= toDateTime({}) AND window_start < toDateTime({})",
        sel.from_s.min(u64::from(u32::MAX)),
        sel.to_s.min(u64::from(u32::MAX))
    );
    if kinds.is_empty() {
        sql.push_str(&format!(" AND kind != '{BATCH_MARKER_KIND}'"));
    } else {
        let names: Vec<String> = kinds.iter().map(|k| format!("'{}'", k.as_str())).collect();
        sql.push_str(&format!(" AND kind IN ({})", names.join(", ")));
    }
    let mut binds = Vec::new();
    for (column, value) in sel.filter.string_columns() {
        sql.push_str(&format!(" AND {column} = ?"));
        binds.push(value.to_owned());
    }
    for (key, value) in &sel.filter.tags {
        sql.push_str(" AND has(tag_keys, ?) AND tag_values[indexOf(tag_keys, ?)] = ?");
        binds.extend([key.clone(), key.clone(), value.clone()]);
    }
    for set in &sel.filter.sets {
        if set.values.is_empty() {
            if !set.exclude {
                sql.push_str(" AND 0");
            }
            continue;
        }
        let marks = vec!["?"; set.values.len()].join(", ");
        let test = match &set.label {
            // The name comes from SetLabel::column's list, never from a request.
            SetLabel::Column(column) => format!("toString({column}) IN ({marks})"),
            SetLabel::Tag(key) => {
                binds.extend([key.clone(), key.clone()]);
                format!("has(tag_keys, ?) AND tag_values[indexOf(tag_keys, ?)] IN ({marks})")
            }
        };
        binds.extend(set.values.iter().cloned());
        sql.push_str(&format!(" AND {}({test})", if set.exclude { "NOT " } else { "" }));
    }
    if let Some(details) = sel.filter.lock_details_sql() {
        // Lock rows keep their kind in `detail`.
        sql.push_str(&format!(" AND (kind != '{}' OR detail IN ({details}))", RowKind::Lock.as_str()));
    }
    if sel.filter.pid.is_some() {
        sql.push_str(" AND pid = ?");
    }
    Where { sql, binds, pid: sel.filter.pid }
}

fn bound(client: &Client, sql: &str, w: &Where) -> clickhouse::query::Query {
    let mut q = client.query(sql);
    for b in &w.binds {
        q = q.bind(b.as_str());
    }
    if let Some(pid) = w.pid {
        q = q.bind(pid);
    }
    q
}

#[derive(Row, Deserialize)]
struct StackSum {
    stack_hash: u64,
    count: u64,
    total_ns: u64,
}

pub(crate) async fn stack_totals(
    client: &Client,
    kind: RowKind,
    sel: &Selector,
) -> Result<Vec<StackTotal>, QueryError> {
    let w = where_clause(&[kind], sel);
    let sql = format!(
        "SELECT stack_hash, {} AS count, {} AS total_ns FROM samples
         WHERE {} AND stack_hash != 0 GROUP BY stack_hash",
        sat_sum("count"),
        sat_sum("total_ns"),
        w.sql
    );
    let rows = bound(client, &sql, &w).fetch_all::<StackSum>().await.map_err(query_err)?;
    Ok(rows
        .into_iter()
        .map(|r| StackTotal { stack: StackHash(r.stack_hash), count: r.count, total_ns: r.total_ns })
        .collect())
}

#[derive(Row, Deserialize)]
struct StackFrames {
    hash: u64,
    symbols: Vec<String>,
    modules: Vec<String>,
    files: Vec<String>,
    lines: Vec<u32>,
    offsets: Vec<u64>,
    addresses: Vec<u64>,
    kernel: Vec<u8>,
}

pub(crate) async fn stacks(
    client: &Client,
    hashes: &[StackHash],
    undecodable: &UndecodableCounts,
) -> Result<Vec<aperture_core::model::Stack>, QueryError> {
    let mut out = Vec::with_capacity(hashes.len());
    for chunk in hashes.chunks(5000) {
        let list: Vec<String> = chunk.iter().map(|h| h.0.to_string()).collect();
        let sql = format!(
            "SELECT hash, any(symbols), any(modules), any(files), any(lines), any(offsets), any(addresses), any(kernel)
             FROM stacks WHERE hash IN ({}) GROUP BY hash",
            list.join(",")
        );
        let rows = client.query(&sql).fetch_all::<StackFrames>().await.map_err(query_err)?;
        for r in rows {
            let n = r.symbols.len();
            let lens =
                [r.modules.len(), r.files.len(), r.lines.len(), r.offsets.len(), r.addresses.len(), r.kernel.len()];
            if lens.iter().any(|l| *l != n) {
                undecodable.stack(STORE, StackHash(r.hash), "its frame arrays differ in length");
                continue;
            }
            let frames = (0..n)
                .map(|i| aperture_core::model::StackFrame {
                    address: r.addresses.get(i).copied().unwrap_or(0),
                    module_offset: r.offsets.get(i).copied().unwrap_or(0),
                    symbol: r.symbols[i].clone(),
                    module: r.modules.get(i).cloned().unwrap_or_default(),
                    file: r.files.get(i).cloned().unwrap_or_default(),
                    line: r.lines.get(i).copied().unwrap_or(0),
                    kernel: r.kernel.get(i).is_some_and(|k| *k != 0),
                })
                .collect();
            out.push(aperture_core::model::Stack { hash: StackHash(r.hash), frames });
        }
    }
    Ok(out)
}

#[derive(Row, Deserialize)]
struct SyscallSum {
    name: String,
    count: u64,
    errors: u64,
    total_ns: u64,
    histogram: Vec<u64>,
}

pub(crate) async fn syscall_totals(client: &Client, sel: &Selector) -> Result<Vec<SyscallTotal>, QueryError> {
    let w = where_clause(&[RowKind::Syscall], sel);
    let sql = format!(
        "SELECT name, {}, {}, {},
            arrayMap((n, f) -> if(f >= {SAT_F64}, {max}, n),
                sumForEach(histogram), sumForEach(arrayMap(x -> toFloat64(x), histogram)))
         FROM samples WHERE {} GROUP BY name",
        sat_sum("count"),
        sat_sum("errors"),
        sat_sum("total_ns"),
        w.sql,
        max = u64::MAX,
    );
    let rows = bound(client, &sql, &w).fetch_all::<SyscallSum>().await.map_err(query_err)?;
    Ok(rows
        .into_iter()
        .map(|r| SyscallTotal {
            name: r.name,
            count: r.count,
            errors: r.errors,
            total_ns: r.total_ns,
            histogram: r.histogram,
        })
        .collect())
}

#[derive(Row, Deserialize)]
struct LockSum {
    stack_hash: u64,
    name: String,
    count: u64,
    total_ns: u64,
    max_ns: u64,
}

pub(crate) async fn lock_totals(client: &Client, sel: &Selector) -> Result<Vec<LockTotal>, QueryError> {
    let w = where_clause(&[RowKind::Lock], sel);
    let sql = format!(
        "SELECT stack_hash, name, {}, {}, max(max_ns) FROM samples
         WHERE {} GROUP BY stack_hash, name",
        sat_sum("count"),
        sat_sum("total_ns"),
        w.sql
    );
    let rows = bound(client, &sql, &w).fetch_all::<LockSum>().await.map_err(query_err)?;
    Ok(rows
        .into_iter()
        .map(|r| LockTotal {
            stack: StackHash(r.stack_hash),
            kind: r.name,
            count: r.count,
            total_ns: r.total_ns,
            max_ns: r.max_ns,
        })
        .collect())
}

pub(crate) async fn label_values(
    client: &Client,
    label: LabelName,
    mode: Option<Mode>,
    sel: &Selector,
) -> Result<Vec<String>, QueryError> {
    let kinds = mode.map(mode_kinds).unwrap_or(&[]);
    let w = where_clause(kinds, sel);
    let sql = format!("SELECT DISTINCT toString({}) FROM samples WHERE {}", label.column(), w.sql);
    bound(client, &sql, &w).fetch_all::<String>().await.map_err(query_err)
}

pub(crate) async fn tag_values(
    client: &Client,
    key: &str,
    mode: Option<Mode>,
    sel: &Selector,
) -> Result<Vec<String>, QueryError> {
    let kinds = mode.map(mode_kinds).unwrap_or(&[]);
    let mut w = where_clause(kinds, sel);
    // The key's placeholders come first in the SQL, so they are bound first.
    let sql =
        format!("SELECT DISTINCT tag_values[indexOf(tag_keys, ?)] FROM samples WHERE has(tag_keys, ?) AND {}", w.sql);
    w.binds.splice(0..0, [key.to_owned(), key.to_owned()]);
    bound(client, &sql, &w).fetch_all::<String>().await.map_err(query_err)
}

pub(crate) async fn tag_keys(client: &Client, mode: Option<Mode>, sel: &Selector) -> Result<Vec<String>, QueryError> {
    let kinds = mode.map(mode_kinds).unwrap_or(&[]);
    let w = where_clause(kinds, sel);
    let sql = format!("SELECT DISTINCT arrayJoin(tag_keys) AS k FROM samples WHERE {} ORDER BY k", w.sql);
    bound(client, &sql, &w).fetch_all::<String>().await.map_err(query_err)
}

/// Days since 1970-01-01 to a `YYYYMMDD` number (proleptic Gregorian, UTC),
/// matching ClickHouse's `toYYYYMMDD`.
pub(crate) fn yyyymmdd(unix_s: u64) -> u32 {
    let days = (unix_s / 86_400) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y * 10_000 + m * 100 + d) as u32
}

/// Drops every daily partition of `samples` entirely older than `cutoff_s`
/// and ledger rows not updated since then. Returns partitions dropped. On a
/// cluster the partitions of every shard's local table are listed and
/// dropped `ON CLUSTER` (a `Distributed` table holds none).
pub(crate) async fn retention(
    client: &Client,
    database: &str,
    cluster: Option<&str>,
    cutoff_s: u64,
) -> Result<u64, QueryError> {
    let cutoff_day = yyyymmdd(cutoff_s);
    let (parts, samples, ledger) = match cluster {
        None => ("system.parts".to_owned(), "samples".to_owned(), "frame_ledger".to_owned()),
        // Names checked at start-up: identifiers, safe to format in.
        Some(c) => (
            format!("cluster('{c}', system, parts)"),
            format!("{database}.samples_local ON CLUSTER {c}"),
            format!("{database}.frame_ledger_local ON CLUSTER {c}"),
        ),
    };
    let local = if cluster.is_some() { "samples_local" } else { "samples" };
    let partitions: Vec<String> = client
        .query(&format!("SELECT DISTINCT partition FROM {parts} WHERE database = ? AND table = ? AND active"))
        .bind(database)
        .bind(local)
        .fetch_all::<String>()
        .await
        .map_err(query_err)?;
    let mut dropped = 0;
    for p in partitions {
        let Ok(day) = p.trim_matches('\'').parse::<u32>() else { continue };
        if day < cutoff_day {
            client.query(&format!("ALTER TABLE {samples} DROP PARTITION {day}")).execute().await.map_err(query_err)?;
            dropped += 1;
        }
    }
    client
        .query(&format!(
            "ALTER TABLE {ledger} DELETE WHERE updated < toDateTime({})",
            cutoff_s.min(u64::from(u32::MAX))
        ))
        .execute()
        .await
        .map_err(query_err)?;
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::model::LockKind;

    #[test]
    fn days_match_clickhouse_partition_ids() {
        assert_eq!(yyyymmdd(0), 19_700_101);
        assert_eq!(yyyymmdd(951_782_400), 20_000_229); // leap day 2000
        assert_eq!(yyyymmdd(1_714_564_800), 20_240_501);
        assert_eq!(yyyymmdd(1_735_689_599), 20_241_231);
    }

    #[test]
    fn filters_become_bound_parameters() {
        let sel = Selector {
            from_s: 10,
            to_s: 20,
            filter: crate::store::LabelFilter { pod: Some("p'; DROP".into()), pid: Some(3), ..Default::default() },
        };
        let w = where_clause(&[RowKind::Cpu], &sel);
        assert!(w.sql.contains("pod = ?") && w.sql.contains("pid = ?") && w.sql.contains("kind IN ('cpu')"));
        assert_eq!(w.binds, vec!["p'; DROP".to_owned()]);
        let mut sel = sel;
        sel.filter.lock_kinds = Some(vec![LockKind::Mutex, LockKind::KernelSpin]);
        let w = where_clause(&[RowKind::Lock], &sel);
        assert!(w.sql.contains("AND (kind != 'lock' OR detail IN (5, 1))"), "{}", w.sql);
        sel.filter.lock_kinds = Some(Vec::new());
        assert!(where_clause(&[], &sel).sql.contains("detail IN (256)"), "no kind matches nothing");
    }
}
