//! Two aggregators on a ClickHouse cluster of two shards (`clickhouse.cluster`),
//! real processes on loopback: ZooKeeper and two `clickhouse-server`s from
//! `aperture_testkit::clickhouse_cluster`. Both aggregators start at once
//! (they race through the migrations), each talks to a different server,
//! and synthetic agents push to both. Every sample sent is stored exactly
//! once, rows land on both shards, a query through either aggregator reads
//! both shards, frames resent to the other aggregator are recognised as
//! committed, a retried batch is not stored twice, a column added to the
//! local tables reaches the Distributed ones at the next start, the rows of a
//! `samples` table from before the summing engine are copied over, and
//! retention empties both shards. A database
//! made for one server is refused in cluster mode.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use aperture_aggregator::store::clickhouse::ClickHouseStore;
use aperture_aggregator::store::{Store, WriteBatch};
use aperture_aggregator::{Aggregator, ClickHouseSettings};
use aperture_core::frame::FrameId;
use aperture_core::model::{Labels, StackHash};
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};
use aperture_testkit::clickhouse::ClickHouseServer;
use aperture_testkit::clickhouse_cluster::{ClickHouseCluster, start_or_skip};
use common::{SAMPLES_PER_BATCH, Taken, acks, batch, cpu_total, frame_id, now_s, push};

const TEST: &str = "two_aggregators_on_a_two_shard_cluster_store_every_sample_once";
const DATABASE: &str = "fleet";
/// Agents 1, 3, 5 push to the first aggregator, 2, 4, 6 to the second.
const AGENTS: u8 = 6;
/// Frames are pushed in rounds, each waiting for its acknowledgements, so
/// that each aggregator commits at least this many write batches: each
/// batch lands on one shard chosen by its random id, so all of them on one
/// shard has a chance of 2^-19.
const ROUNDS: u64 = 10;
const FRAMES_PER_ROUND: u64 = 4;
const FRAMES_PER_AGENT: u64 = ROUNDS * FRAMES_PER_ROUND;
/// CPU samples in one frame of [`batch`].
const CPU_PER_FRAME: u64 = 5;

fn settings(endpoint: String, dir: &std::path::Path) -> aperture_aggregator::Settings {
    let mut s = common::settings(dir);
    s.clickhouse = Some(ClickHouseSettings {
        database: DATABASE.into(),
        cluster: Some(ClickHouseCluster::NAME.into()),
        ..ClickHouseSettings::new(endpoint)
    });
    s
}

/// A number the server answers to `sql`.
fn number(server: &ClickHouseServer, sql: &str) -> u64 {
    let text = server.query(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    text.trim().parse().unwrap_or_else(|e| panic!("{sql}: {text:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregators_on_a_two_shard_cluster_store_every_sample_once() {
    let Some(cluster) = tokio::task::spawn_blocking(|| start_or_skip(TEST, 2)).await.expect("start cluster") else {
        return;
    };
    let (dir_a, dir_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    let (a, b) = tokio::join!(
        Aggregator::start(settings(cluster.servers[0].endpoint(), dir_a.path())),
        Aggregator::start(settings(cluster.servers[1].endpoint(), dir_b.path())),
    );
    let (a, b) = (a.expect("start aggregator A"), b.expect("start aggregator B"));
    for server in &cluster.servers {
        let sql = format!("SELECT count() FROM system.tables WHERE database = '{DATABASE}' AND engine = 'Distributed'");
        assert_eq!(number(server, &sql), 4, "{}: schema_migrations, samples, stacks, frame_ledger", server.endpoint());
    }
    let (acks_a, acks_b) = (acks(&a), acks(&b));
    let t0 = now_s() - 600;
    let home = |agent: u8| if agent % 2 == 1 { (&a, &acks_a) } else { (&b, &acks_b) };

    for round in 0..ROUNDS {
        let seqs = round * FRAMES_PER_ROUND + 1..=(round + 1) * FRAMES_PER_ROUND;
        let mut waits = Vec::new();
        for agent in 1..=AGENTS {
            let (aggregator, acker) = home(agent);
            let ingress = aggregator.ingress();
            let seqs = seqs.clone();
            let acker = acker.clone();
            waits.push(tokio::task::spawn_blocking(move || {
                let ids: Vec<FrameId> = seqs.clone().map(|seq| frame_id(agent, 1, seq)).collect();
                for (id, seq) in ids.iter().zip(seqs) {
                    let taken = push(&ingress, *id, &batch(&format!("node-{agent}"), t0 + seq));
                    assert_eq!(taken, Taken::Queued, "agent {agent} frame {seq} is new");
                }
                acker.wait_for(&ids, Duration::from_secs(60));
            }));
        }
        for w in waits {
            w.await.expect("agent");
        }
    }
    let frames = u64::from(AGENTS) * FRAMES_PER_AGENT;

    // Every agent moves to the other aggregator and resends its whole run:
    // the other server's ledger look-up (through the Distributed table) must
    // find every frame committed, whichever shard holds the run's state.
    for agent in 1..=AGENTS {
        let (other, _) = home(agent + 1);
        let ingress = other.ingress();
        tokio::task::spawn_blocking(move || {
            for seq in 1..=FRAMES_PER_AGENT {
                let taken = push(&ingress, frame_id(agent, 1, seq), &batch(&format!("node-{agent}"), t0 + seq));
                assert_eq!(taken, Taken::AlreadyCommitted, "agent {agent} frame {seq} resent to the other aggregator");
            }
        })
        .await
        .expect("resend");
    }

    // A query through either aggregator reads both shards.
    let (from, to) = (t0 - 20, t0 + FRAMES_PER_AGENT + 1);
    assert_eq!(cpu_total(a.http_addr(), from, to).await, frames * CPU_PER_FRAME, "through A");
    assert_eq!(cpu_total(b.http_addr(), from, to).await, frames * CPU_PER_FRAME, "through B");

    // Rows are on both shards, and together they hold every sample once.
    let mut stored = 0;
    for server in &cluster.servers {
        let local = number(server, &format!("SELECT sum(count) FROM {DATABASE}.samples_local WHERE kind != 'batch'"));
        let batches = number(server, &format!("SELECT uniqExact(batch_id) FROM {DATABASE}.samples_local"));
        eprintln!("{}: {local} samples in {batches} write batches", server.endpoint());
        assert!(local > 0, "{} holds no rows: the writes did not spread over the shards", server.endpoint());
        stored += local;
        let total = number(server, &format!("SELECT sum(count) FROM {DATABASE}.samples WHERE kind != 'batch'"));
        assert_eq!(total, frames * SAMPLES_PER_BATCH, "{}: the Distributed table reads every shard", server.endpoint());
    }
    assert_eq!(stored, frames * SAMPLES_PER_BATCH, "every sample sent is stored exactly once");
    eprintln!("cluster: sent={} stored={stored} frames={frames}", frames * SAMPLES_PER_BATCH);
    a.shutdown().await.expect("shutdown A");
    b.shutdown().await.expect("shutdown B");

    // A write batch whose first attempt was committed but whose answer was
    // lost is retried through the other server: the retry finds the rows
    // by batch id on whichever shard holds them and inserts nothing. The
    // retried rows differ (count 4, not 3) so that ClickHouse's own
    // deduplication of identical replicated blocks cannot be what saves it.
    let cluster_settings = |endpoint: String| ClickHouseSettings {
        database: DATABASE.into(),
        cluster: Some(ClickHouseCluster::NAME.into()),
        ..ClickHouseSettings::new(endpoint)
    };
    let first_server = ClickHouseStore::open(&cluster_settings(cluster.servers[0].endpoint())).await.expect("open");
    let other_server = ClickHouseStore::open(&cluster_settings(cluster.servers[1].endpoint())).await.expect("open");
    let day = t0 / 86_400 * 86_400;
    let written = |count: u64| {
        let rows = (0..20)
            .map(|i| {
                let key = RowKey {
                    window_start_s: day - 100 + i * 10,
                    kind: RowKind::Cpu,
                    labels: 0,
                    stack: StackHash(1000 + i),
                    detail: 0,
                };
                (key, RowValue { count, total_ns: 30, ..RowValue::default() })
            })
            .collect();
        let labels = vec![Labels { node: "retried".into(), ..Labels::default() }];
        WriteBatch {
            flushes: vec![Flush { labels, rows, ..Flush::default() }],
            batch_id: 0x5eed,
            ..WriteBatch::default()
        }
    };
    first_server.write(&written(3)).await.expect("first attempt");
    let retry = written(4);
    retry.rows_sent.store(true, Ordering::Release);
    other_server.write(&retry).await.expect("retry");
    let sql = format!("SELECT sum(count) FROM {DATABASE}.samples WHERE node = 'retried' AND kind != 'batch'");
    assert_eq!(number(&cluster.servers[0], &sql), 20 * 3, "the retry inserted nothing again");

    // A later migration that adds a column to a local table: the next start
    // gives the Distributed tables of every server the new column.
    let name = ClickHouseCluster::NAME;
    cluster.servers[0]
        .query(&format!("ALTER TABLE {DATABASE}.samples_local ON CLUSTER {name} ADD COLUMN later UInt8 DEFAULT 7"))
        .expect("add a column");
    // A `samples` table from before the summing engine, its rows on both
    // shards over two days: the next start copies them in the background.
    let old = "samples_before_summing_0_0000c0de";
    // From yesterday noon to today 21:20 UTC: two days, both before the
    // retention cutoff below whatever the time of day.
    let noon = t0 / 86_400 * 86_400 - 43_200;
    cluster.servers[0]
        .query(&format!(
            "CREATE TABLE {DATABASE}.{old}_local ON CLUSTER {name} AS {DATABASE}.samples_local \
             ENGINE = ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{DATABASE}/{old}', '{{replica}}') \
             PARTITION BY toYYYYMMDD(window_start) ORDER BY (kind, window_start, stack_hash)"
        ))
        .expect("an old table");
    for (i, server) in cluster.servers.iter().enumerate() {
        let insert = format!(
            "INSERT INTO {DATABASE}.{old}_local (window_start, kind, node, stack_hash, count, batch_id) \
             SELECT toDateTime({noon} + number * 600), 'cpu', 'old', number % 5, 2, 2 * number + 1 \
             FROM system.numbers LIMIT {i}00, 100"
        );
        server.query(&insert).expect("old rows");
    }
    let mut ch = ClickHouseSettings::new(cluster.servers[1].endpoint());
    ch.database = DATABASE.into();
    ch.cluster = Some(name.into());
    let store = ClickHouseStore::open(&ch).await.expect("open the store again");
    for server in &cluster.servers {
        let sql = format!("SELECT sum(later) = 7 * count() FROM {DATABASE}.samples");
        assert_eq!(number(server, &sql), 1, "{}: the Distributed table has the new column", server.endpoint());
    }
    let old_left = || {
        let sql = format!(
            "SELECT count() FROM system.tables WHERE database = '{DATABASE}' AND startsWith(name, 'samples_before')"
        );
        cluster.servers.iter().map(|s| number(s, &sql)).sum::<u64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while old_left() > 0 {
        assert!(std::time::Instant::now() < deadline, "the old table was not copied within a minute");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let copied = |table: &str, server: &ClickHouseServer| {
        number(server, &format!("SELECT sum(count) FROM {DATABASE}.{table} WHERE node = 'old'"))
    };
    assert_eq!(copied("samples", &cluster.servers[0]), 400, "every old row, once, through the Distributed table");
    for server in &cluster.servers {
        assert!(copied("samples_local", server) > 0, "{}: no old rows copied to this shard", server.endpoint());
    }

    // Retention drops the old days on every shard.
    let report = store.apply_retention(t0 + 2 * 86_400).await.expect("retention");
    assert!(report.removed >= 1, "{report:?}");
    for server in &cluster.servers {
        let left = number(server, &format!("SELECT count() FROM {DATABASE}.samples_local"));
        assert_eq!(left, 0, "{}: retention reached this shard", server.endpoint());
    }

    // A database made for one server is refused in cluster mode, by name,
    // rather than written on one shard.
    let mut single = ClickHouseSettings::new(cluster.servers[0].endpoint());
    single.database = "single".into();
    ClickHouseStore::open(&single).await.expect("a database for one server");
    single.cluster = Some(ClickHouseCluster::NAME.into());
    let e = ClickHouseStore::open(&single).await.expect_err("refused in cluster mode").to_string();
    assert!(e.contains("single.schema_migrations is a MergeTree table, not Distributed"), "{e}");
    drop(cluster);
}
