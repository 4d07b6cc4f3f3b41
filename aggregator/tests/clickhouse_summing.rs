//! `samples` on ClickHouse sums the rows of one key (`SummingMergeTree`):
//! CPU rows of different write batches become one, lock rows keep their
//! longest wait, the retry check still finds every batch after a merge,
//! and a database made before the summing table is rebuilt with its rows.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aperture_aggregator::ClickHouseSettings;
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::{LabelFilter, LabelName, Selector, Store, WriteBatch};
use aperture_core::model::{Labels, StackHash};
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};
use aperture_testkit::clickhouse::ClickHouseServer;

const KEYS: u64 = 10;

/// A write batch of one flush per wait in `waits` (one flush if there are
/// none), each holding one CPU row (count 3) for each of [`KEYS`] stacks in
/// the window `t` and, with a wait, one lock row (a wait that long) for each.
fn batch(batch_id: u64, t: u64, waits: &[u64]) -> WriteBatch {
    let flush = |wait_ns: Option<u64>| {
        let mut rows = Vec::new();
        for i in 0..KEYS {
            let key = |kind| RowKey { window_start_s: t, kind, labels: 0, stack: StackHash(100 + i), detail: 0 };
            rows.push((key(RowKind::Cpu), RowValue { count: 3, total_ns: 30, ..RowValue::default() }));
            if let Some(ns) = wait_ns {
                let lock = RowValue { count: 1, total_ns: ns, max_ns: ns, name: "futex".into(), ..RowValue::default() };
                rows.push((key(RowKind::Lock), lock));
            }
        }
        let labels = vec![Labels { node: "n1".into(), ..Labels::default() }];
        Flush { labels, rows, ..Flush::default() }
    };
    let flushes = if waits.is_empty() { vec![flush(None)] } else { waits.iter().map(|&w| flush(Some(w))).collect() };
    WriteBatch { flushes, batch_id, now_s: t, ..WriteBatch::default() }
}

/// Polls `done` every 100 ms for up to a minute.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within a minute");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn number(server: &ClickHouseServer, sql: &str) -> u64 {
    let v = server.query(sql).expect("query");
    v.trim().parse().unwrap_or_else(|_| panic!("{sql}: {v:?}"))
}

/// A ClickHouse server of the test's own, or `None` (reported skipped by
/// `test`'s name).
async fn server(test: &'static str) -> Option<ClickHouseServer> {
    tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test)).await.expect("start server")
}

async fn open(server: &ClickHouseServer, database: &str) -> ClickHouseStore {
    let mut settings = ClickHouseSettings::new(server.endpoint());
    settings.database = database.into();
    ClickHouseStore::open(&settings).await.expect("open store")
}

fn window(from_s: u64, to_s: u64) -> Selector {
    Selector { from_s, to_s, filter: LabelFilter::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_one_key_are_summed_and_every_batch_is_still_found_by_its_id() {
    let Some(server) = server("rows_of_one_key_are_summed_and_every_batch_is_still_found_by_its_id").await else {
        return;
    };
    let store = open(&server, "summed").await;
    let t = common::now_s() / 10 * 10 - 3_600;
    // Batch a's two flushes repeat each key; its longest wait is in the second.
    let (a, b) = (batch(0xa1, t, &[5_000, 9_000]), batch(0xb1, t, &[1_000]));
    store.write(&a).await.expect("batch a");
    store.write(&b).await.expect("batch b");
    server.query("OPTIMIZE TABLE summed.samples FINAL").expect("merge");

    let rows = |kind: &str| number(&server, &format!("SELECT count() FROM summed.samples WHERE kind = '{kind}'"));
    assert_eq!(rows("cpu"), KEYS, "the CPU rows of the two batches are one row per key");
    assert_eq!(rows("lock"), 2 * KEYS, "lock rows of different batches stay apart, of one batch are one");

    let sel = window(t, t + 10);
    let cpu = store.stack_totals(RowKind::Cpu, &sel).await.expect("cpu totals");
    assert_eq!(cpu.len() as u64, KEYS);
    assert!(cpu.iter().all(|s| (s.count, s.total_ns) == (9, 90)), "{cpu:?}");
    let locks = store.lock_totals(&sel).await.expect("lock totals");
    assert!(locks.iter().all(|l| (l.count, l.total_ns, l.max_ns) == (3, 15_000, 9_000)), "{locks:?}");
    let nodes = store.label_values(LabelName::Node, None, &sel).await.expect("nodes");
    assert_eq!(nodes, vec!["n1".to_owned()], "the batches' marker rows are no one's labels");

    // Batches of CPU rows alone: a merged row keeps the batch id of one of
    // them; both retries must still find their batch committed.
    store.write(&batch(0xc1, t + 10, &[])).await.expect("batch c");
    store.write(&batch(0xd1, t + 10, &[])).await.expect("batch d");
    server.query("OPTIMIZE TABLE summed.samples FINAL").expect("merge");
    for id in [0xc1, 0xd1] {
        // The retry of a batch whose answer was lost: rows sent, no answer.
        let retried = batch(id, t + 10, &[]);
        retried.rows_sent.store(true, Ordering::Release);
        store.write(&retried).await.expect("retry");
    }
    let sel = window(t + 10, t + 20);
    let cpu = store.stack_totals(RowKind::Cpu, &sel).await.expect("cpu totals");
    assert!(cpu.iter().all(|s| s.count == 6), "a retry inserted its rows again: {cpu:?}");
}

/// `samples` as migrations 1 to 4 left it: a plain `MergeTree`.
const OLD_SAMPLES: &str = "CREATE TABLE {t} (
    window_start DateTime,
    kind Enum8('cpu' = 0, 'lock' = 1, 'syscall' = 2, 'slow_call' = 3, 'profile' = 4),
    node String, namespace String, pod String, container String, process String, pid UInt32,
    stack_hash UInt64, detail UInt32, name String,
    count UInt64, total_ns UInt64, errors UInt64, max_ns UInt64, histogram Array(UInt64),
    batch_id UInt64 DEFAULT 0, service String DEFAULT '',
    tag_keys Array(String), tag_values Array(String), profile_type String DEFAULT ''
) ENGINE = MergeTree PARTITION BY toYYYYMMDD(window_start)
ORDER BY (kind, window_start, node, namespace, pod, process, stack_hash)";

/// `frame_ledger` as migrations 1 to 4 left it.
const OLD_LEDGER: &str = "CREATE TABLE old.frame_ledger (
    agent_id String, boot_id String, watermark UInt64, above Array(UInt64), updated DateTime, version UInt64,
    batch_id UInt64 DEFAULT 0, batch_watermark UInt64 DEFAULT 0, batch_above Array(UInt64),
    first_window UInt32 DEFAULT 0, last_window UInt32 DEFAULT 0, windows UInt32 DEFAULT 0
) ENGINE = ReplacingMergeTree(version) ORDER BY (agent_id, boot_id)";

/// `rows` CPU rows of count 2, node `node`, every 10 minutes from `t` (so
/// over more than one day when there are enough).
fn old_rows(table: &str, node: &str, t: u64, rows: u64) -> String {
    let values: Vec<String> = (0..rows)
        .map(|i| format!("({}, 'cpu', '{node}', {}, 2, 20, {})", t + i * 600, 100 + i % 7, 1 + 2 * i))
        .collect();
    format!(
        "INSERT INTO {table} (window_start, kind, node, stack_hash, count, total_ns, batch_id) VALUES {}",
        values.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_from_before_the_summing_table_keeps_its_rows() {
    let Some(server) = server("a_database_from_before_the_summing_table_keeps_its_rows").await else {
        return;
    };
    let now = common::now_s();
    let t = now / 86_400 * 86_400 - 2 * 86_400;
    server.query("CREATE DATABASE old").expect("database");
    server.query(&OLD_SAMPLES.replace("{t}", "old.samples")).expect("old samples");
    server.query(&old_rows("old.samples", "before", t, 250)).expect("rows");
    // Two lock rows of one key and batch (as several flushes of one batch
    // wrote them), the longer wait second.
    server
        .query(&format!(
            "INSERT INTO old.samples (window_start, kind, node, stack_hash, count, total_ns, max_ns) \
             VALUES ({w}, 'lock', 'locks', 7, 1, 5000, 5000), ({w}, 'lock', 'locks', 7, 1, 9000, 9000)",
            w = t + 3_600
        ))
        .expect("lock rows");
    // The ledger's last batch of one agent run is old row 100 (batch 201):
    // it must read as committed from the start, before its day is copied.
    server.query(OLD_LEDGER).expect("old ledger");
    let w = t + 100 * 600;
    let run = "07070707070707070707070707070707";
    server
        .query(&format!(
            "INSERT INTO old.frame_ledger VALUES ('{run}', '{run}', 3, [], {now}, 1, 201, 9, [], {w}, {w}, 1)"
        ))
        .expect("ledger row");
    // The copy of an aggregator that died seven hours ago is taken over; one
    // that was renamed a minute ago belongs to an aggregator still copying.
    let abandoned = format!("old.samples_before_summing_{}_0000dead", now - 7 * 3_600);
    let busy = format!("old.samples_before_summing_{}_0000beef", now - 60);
    for (table, node) in [(&abandoned, "abandoned"), (&busy, "busy")] {
        server.query(&OLD_SAMPLES.replace("{t}", table)).expect("leftover");
        server.query(&old_rows(table, node, t, 50)).expect("leftover rows");
    }

    let store = open(&server, "old").await;
    let marker = number(&server, "SELECT count() FROM old.samples WHERE kind = 'batch' AND stack_hash = 201");
    assert_eq!(marker, 1, "the ledger's last batch is marked in the new table");
    let runs = store.load_ledger(t).await.expect("ledger");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].1.watermark, 9, "the run's last batch reads as committed");
    let engine = server.query("SELECT engine FROM system.tables WHERE database = 'old' AND name = 'samples'");
    assert_eq!(engine.expect("engine").trim(), "SummingMergeTree");
    let sum = |node: &str| number(&server, &format!("SELECT sum(count) FROM old.samples WHERE node = '{node}'"));
    let left = |pattern: &str| {
        number(&server, &format!("SELECT count() FROM system.tables WHERE database = 'old' AND name LIKE '{pattern}'"))
    };
    // The rows are copied in the background, once only the busy copy is left.
    wait_until("the old tables copied", || left("samples_before_summing_%") == 1);
    assert_eq!(left("%0000beef"), 1, "a copy in progress elsewhere is left to its aggregator");
    assert_eq!(left("samples_copy_%"), 0, "no staging table is left");
    assert_eq!(sum("before"), 500, "every row of the old table, over its two days");
    assert_eq!(sum("abandoned"), 100, "the abandoned copy was finished");
    assert_eq!(sum("busy"), 0);
    server.query("OPTIMIZE TABLE old.samples FINAL").expect("merge");
    let locks = server.query("SELECT sum(count), max(max_ns) FROM old.samples WHERE node = 'locks'").expect("locks");
    assert_eq!(locks.trim(), "2\t9000", "the old lock rows of one key keep their longest wait");

    let sel = window(t, now);
    let cpu = store.stack_totals(RowKind::Cpu, &sel).await.expect("cpu totals");
    assert_eq!(cpu.iter().map(|s| s.count).sum::<u64>(), 600, "the API reads the copied rows");
    // New writes land in the summing table; opening again changes nothing.
    store.write(&batch(0xc1, now / 10 * 10, &[1_000])).await.expect("write");
    drop(store);
    let _again = open(&server, "old").await;
    assert_eq!(sum("before"), 500);
    assert_eq!(sum("n1"), 3 * KEYS + KEYS, "the new batch: CPU and lock rows");
    let versions = number(&server, "SELECT count() FROM old.schema_migrations WHERE version = 5");
    assert!(versions >= 1, "migration 5 is recorded");
}

/// The marker of day `day` of old table `id`, as the copy computes it.
fn day_marker(id: u32, day: u32) -> u64 {
    ((u64::from(id) << 32) | u64::from(day)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_stopped_after_a_day_was_attached_does_not_store_it_twice() {
    let Some(server) = server("a_copy_stopped_after_a_day_was_attached_does_not_store_it_twice").await else {
        return;
    };
    drop(open(&server, "resumed").await);
    let now = common::now_s();
    let t = now / 86_400 * 86_400 - 2 * 86_400;
    // An old table left by a copier that stopped between attaching the
    // first day (rows and marker are in `samples`) and dropping it.
    let old = format!("resumed.samples_before_summing_{}_0000a77a", now - 7 * 3_600);
    server.query(&OLD_SAMPLES.replace("{t}", &old)).expect("old table");
    server.query(&old_rows(&old, "stopped", t, 200)).expect("old rows");
    let first_day = number(&server, &format!("SELECT min(toYYYYMMDD(window_start)) FROM {old}"));
    let day = u32::try_from(first_day).expect("day");
    server
        .query(&format!("INSERT INTO resumed.samples SELECT * FROM {old} WHERE toYYYYMMDD(window_start) = {day}"))
        .expect("the attached day");
    let marker = day_marker(0xa77a, day);
    server
        .query(&format!(
            "INSERT INTO resumed.samples (window_start, kind, stack_hash, count, batch_id) \
             SELECT min(window_start), 'batch', {marker}, 1, {marker} FROM {old} WHERE toYYYYMMDD(window_start) = {day}"
        ))
        .expect("its marker");

    let _store = open(&server, "resumed").await;
    let left =
        || number(&server, "SELECT count() FROM system.tables WHERE database = 'resumed' AND name LIKE 'samples_%'");
    wait_until("the old table copied", || left() == 0);
    let sum = number(&server, "SELECT sum(count) FROM resumed.samples WHERE node = 'stopped'");
    assert_eq!(sum, 400, "each of the 200 rows once: the attached day was not copied again");
}

/// Aggregators look for old tables while another renames and drops tables
/// of the same database, as a copy does with old tables. ClickHouse 18.16
/// now and then fails a read of `system.tables` meanwhile (`UNKNOWN_TABLE`);
/// opening the store must still succeed every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_opens_while_another_aggregator_renames_and_drops_tables() {
    const TEST: &str = "the_store_opens_while_another_aggregator_renames_and_drops_tables";
    let Some(server) = server(TEST).await else { return };
    let server = Arc::new(server);
    drop(open(&server, "churning").await);
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let churn = {
        let (server, stop, changes) = (server.clone(), stop.clone(), changes.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let n = changes.load(Ordering::Relaxed);
                server.query(&format!(
                    "CREATE TABLE churning.churn_{n} (d Date, x UInt8) ENGINE = MergeTree(d, x, 8192)"
                ))?;
                server.query(&format!("RENAME TABLE churning.churn_{n} TO churning.churned_{n}"))?;
                server.query(&format!("DROP TABLE churning.churned_{n}"))?;
                changes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    let mut settings = ClickHouseSettings::new(server.endpoint());
    settings.database = "churning".into();
    let (mut opened, mut failed) = (0, Vec::new());
    while opened < 600 || changes.load(Ordering::Relaxed) < 400 {
        match ClickHouseStore::open(&settings).await {
            Ok(_) => opened += 1,
            Err(e) => {
                failed.push(e.to_string());
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().expect("the churning thread").expect("tables created, renamed and dropped");
    println!("{opened} opens during {} table changes", changes.load(Ordering::Relaxed));
    assert!(failed.is_empty(), "opening the store failed after {opened} opens: {failed:?}");
}
