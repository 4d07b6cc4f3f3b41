//! Stored data at the edges of its types, on both stores: counts saturated
//! at the top of their range sum to `u64::MAX` instead of failing (SQLite's
//! `SUM` overflows) or wrapping around (ClickHouse's `sum` of `UInt64`).

mod common;

use std::sync::Arc;

use aperture_aggregator::ClickHouseSettings;
use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::sqlite::SqliteStore;
use aperture_aggregator::store::{Selector, Store, WriteBatch};
use aperture_core::model::{Labels, Stack, StackFrame};
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};

/// Three windows of the same stack, each with every counter at `u64::MAX`
/// (SQLite stores them as `i64::MAX`, ClickHouse as `u64::MAX`).
fn saturated_batch() -> WriteBatch {
    let stack = Stack::new(vec![StackFrame { symbol: "hot".into(), ..Default::default() }]);
    let mut rows = Vec::new();
    for kind in [RowKind::Cpu, RowKind::Lock, RowKind::Syscall] {
        for window_start_s in [100, 110, 120] {
            let key = RowKey {
                window_start_s,
                kind,
                labels: 0,
                stack: if kind == RowKind::Syscall { Default::default() } else { stack.hash },
                detail: 0,
            };
            let value = RowValue {
                count: u64::MAX,
                total_ns: u64::MAX,
                errors: u64::MAX,
                max_ns: 7,
                histogram: if kind == RowKind::Syscall { vec![u64::MAX; 32] } else { Vec::new() },
                name: if kind == RowKind::Cpu { String::new() } else { "read".into() },
            };
            rows.push((key, value));
        }
    }
    WriteBatch {
        flushes: vec![Flush {
            labels: vec![Labels { node: "n1".into(), process: "p".into(), pid: 1, ..Labels::default() }],
            rows,
            stacks: vec![stack],
            ..Flush::default()
        }],
        ..WriteBatch::default()
    }
}

async fn sums_saturate(store: Arc<dyn Store>) {
    store.write(&saturated_batch()).await.expect("write");
    let sel = Selector { from_s: 0, to_s: 1000, filter: Default::default() };
    let cpu = store.stack_totals(RowKind::Cpu, &sel).await.expect("cpu sums");
    assert_eq!(cpu.len(), 1);
    assert_eq!((cpu[0].count, cpu[0].total_ns), (u64::MAX, u64::MAX), "{cpu:?}");
    let locks = store.lock_totals(&sel).await.expect("lock sums");
    assert_eq!((locks[0].count, locks[0].total_ns, locks[0].max_ns), (u64::MAX, u64::MAX, 7), "{locks:?}");
    let calls = store.syscall_totals(&sel).await.expect("syscall sums");
    let c = &calls[0];
    assert_eq!((c.count, c.errors, c.total_ns), (u64::MAX, u64::MAX, u64::MAX), "{c:?}");
    assert!(c.histogram.iter().all(|b| *b == u64::MAX), "{:?}", c.histogram);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_counts_sum_without_failing_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    sums_saturate(Arc::new(SqliteStore::open(dir.path()).expect("open"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_counts_sum_without_wrapping_clickhouse() {
    let test = "saturated_counts_sum_without_wrapping_clickhouse";
    let Some(server) =
        tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test)).await.expect("start")
    else {
        return;
    };
    let store = ClickHouseStore::open(&ClickHouseSettings::new(server.endpoint())).await.expect("open");
    sums_saturate(Arc::new(store)).await;
    tokio::task::spawn_blocking(move || drop(server)).await.expect("stop");
}
