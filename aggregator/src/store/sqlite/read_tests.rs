use super::*;

/// A query whose caller went away (its HTTP request timed out) is
/// interrupted, so the single reader is free again for the next query.
/// The runtime is shut down with a timeout: without the interrupt the
/// endless query would keep its blocking thread forever.
#[test]
fn a_dropped_query_is_interrupted_and_frees_the_reader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("open");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (freed, endless_result) = rt.block_on(async {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let endless = store.read(move |conn| {
            let _ = started_tx.send(());
            conn.query_row(
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                [],
                |r| r.get::<_, i64>(0),
            )
        });
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let caller = tokio::spawn(async move {
            let _ = result_tx.send(endless.await);
        });
        started_rx.await.expect("the query started");
        caller.abort(); // as a request timeout drops its handler
        let freed = matches!(tokio::time::timeout(Duration::from_secs(20), store.ping()).await, Ok(Ok(())));
        (freed, result_rx.await.is_err())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    assert!(endless_result, "the aborted caller never saw a result");
    assert!(freed, "the reader is still held by a query whose caller went away");
}

/// Rows whose counts saturated at `i64::MAX` sum without an error.
#[test]
fn sums_over_saturated_rows_do_not_fail() {
    use aperture_core::model::Labels;
    use aperture_core::shard::{Flush, RowKey, RowValue};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("open");
    let stack = Stack::new(vec![StackFrame { symbol: "f".into(), ..Default::default() }]);
    let row = |window_start_s, kind: RowKind, name: &str| {
        (
            RowKey { window_start_s, kind, labels: 0, stack: stack.hash, detail: 0 },
            RowValue {
                count: u64::MAX,
                total_ns: u64::MAX,
                errors: u64::MAX,
                max_ns: 7,
                histogram: if kind == RowKind::Syscall { vec![u64::MAX; 2] } else { Vec::new() },
                name: name.into(),
            },
        )
    };
    let mut rows = Vec::new();
    for kind in [RowKind::Cpu, RowKind::Lock, RowKind::Syscall] {
        let name = if kind == RowKind::Cpu { "" } else { "read" };
        rows.extend([row(100, kind, name), row(110, kind, name), row(120, kind, name)]);
    }
    let batch = WriteBatch {
        flushes: vec![Flush {
            labels: vec![Labels { node: "n".into(), ..Default::default() }],
            rows,
            stacks: vec![stack.clone()],
            ..Default::default()
        }],
        ..Default::default()
    };
    store.write_sync(&batch).expect("write");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let sel = Selector { from_s: 0, to_s: 1000, filter: Default::default() };
    let totals = rt.block_on(store.stack_totals(RowKind::Cpu, &sel)).expect("cpu sums");
    assert_eq!((totals[0].count, totals[0].total_ns), (u64::MAX, u64::MAX));
    let locks = rt.block_on(store.lock_totals(&sel)).expect("lock sums");
    assert_eq!((locks[0].count, locks[0].max_ns), (u64::MAX, 7));
    let calls = rt.block_on(store.syscall_totals(&sel)).expect("syscall sums");
    assert_eq!((calls[0].count, calls[0].errors, calls[0].histogram[1]), (u64::MAX, u64::MAX, u64::MAX));
}

/// Rows of one key written by several flushes are merged into one once
/// a newer window is written; totals are unchanged, syscall rows keep
/// their rows, the newest window is left alone.
#[test]
fn rows_of_closed_windows_are_merged_per_key() {
    use aperture_core::model::Labels;
    use aperture_core::shard::{Flush, RowKey, RowValue};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("open");
    let stack = Stack::new(vec![StackFrame { symbol: "f".into(), ..Default::default() }]);
    let row = |window_start_s, kind: RowKind, pid_labels: u32, count: u64, max_ns: u64| {
        (
            RowKey { window_start_s, kind, labels: pid_labels, stack: stack.hash, detail: 0 },
            RowValue {
                count,
                total_ns: count * 10,
                errors: 0,
                max_ns,
                histogram: if kind == RowKind::Syscall { vec![count; 2] } else { Vec::new() },
                name: if kind == RowKind::Cpu { String::new() } else { "read".into() },
            },
        )
    };
    let labels = vec![
        Labels { node: "n".into(), pid: 1, ..Default::default() },
        Labels { node: "n".into(), pid: 2, ..Default::default() },
    ];
    let write = |rows| {
        let flush = Flush { labels: labels.clone(), rows, stacks: vec![stack.clone()], ..Default::default() };
        store.write_sync(&WriteBatch { flushes: vec![flush], ..Default::default() }).expect("write");
    };
    let rows_in = |window: i64| -> i64 {
        let conn = lock(&store.writer);
        conn.query_row("SELECT count(*) FROM samples WHERE window_start = ?1", [window], |r| r.get(0)).expect("count")
    };
    // Window 100, in three flushes: two processes' CPU rows, lock rows, syscall rows.
    write(vec![row(100, RowKind::Cpu, 0, 2, 0), row(100, RowKind::Lock, 0, 1, 5), row(100, RowKind::Syscall, 0, 1, 0)]);
    write(vec![row(100, RowKind::Cpu, 0, 3, 0), row(100, RowKind::Cpu, 1, 4, 0), row(100, RowKind::Lock, 0, 1, 9)]);
    write(vec![row(100, RowKind::Cpu, 0, 5, 0), row(100, RowKind::Syscall, 0, 2, 0)]);
    assert_eq!(rows_in(100), 8, "nothing merged while 100 is the newest window");
    write(vec![row(110, RowKind::Cpu, 0, 1, 0), row(110, RowKind::Cpu, 0, 1, 0)]);
    // cpu pid 1 (one row), cpu pid 2 (one row), lock (one row), syscall (two rows).
    assert_eq!(rows_in(100), 5, "window 100 merged per key");
    assert_eq!(rows_in(110), 2, "the newest window is left alone");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let sel = Selector { from_s: 100, to_s: 110, filter: Default::default() };
    let totals = rt.block_on(store.stack_totals(RowKind::Cpu, &sel)).expect("cpu sums");
    assert_eq!((totals[0].count, totals[0].total_ns), (14, 140));
    let locks = rt.block_on(store.lock_totals(&sel)).expect("lock sums");
    assert_eq!((locks[0].count, locks[0].total_ns, locks[0].max_ns), (2, 20, 9));
    let calls = rt.block_on(store.syscall_totals(&sel)).expect("syscall sums");
    assert_eq!((calls[0].count, calls[0].histogram[1]), (3, 3));
    // A late row for window 100 is merged by the next pass.
    write(vec![row(100, RowKind::Cpu, 0, 6, 0)]);
    write(vec![row(120, RowKind::Cpu, 0, 1, 0)]);
    assert_eq!(rows_in(100), 5);
    assert_eq!(rt.block_on(store.stack_totals(RowKind::Cpu, &sel)).expect("cpu sums")[0].count, 20);
}

/// A stack or ledger row that no longer decodes is left out, counted
/// and logged, not skipped silently.
#[test]
fn undecodable_stacks_and_ledger_rows_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(dir.path()).expect("open");
    {
        let conn = lock(&store.writer);
        conn.execute_batch(
            "INSERT INTO stacks (hash, frames) VALUES (7, 'not json'), (8, '[]');
             INSERT INTO frame_ledger (agent_id, boot_id, watermark, above, updated_s) VALUES
                ('zz', '00000000000000000000000000000000', 5, '[]', 100),
                ('11111111111111111111111111111111', '22222222222222222222222222222222', 9, 'oops', 100),
                ('33333333333333333333333333333333', '44444444444444444444444444444444', 3, '[5]', 100);",
        )
        .expect("insert");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let stacks = rt.block_on(store.stacks(&[StackHash(7), StackHash(8)])).expect("stacks");
    assert_eq!(stacks.iter().map(|s| s.hash).collect::<Vec<_>>(), [StackHash(8)]);
    let runs = rt.block_on(store.load_ledger(0)).expect("ledger");
    assert_eq!(runs.len(), 2, "the row with a bad `above` keeps its watermark");
    assert_eq!(store.undecodable(), Undecodable { stacks: 1, ledger_rows: 2 });
}
