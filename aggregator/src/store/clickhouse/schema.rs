//! Versioned, idempotent migrations. Each runs once, in order, and is
//! recorded in `schema_migrations`; every statement is also written to be
//! harmless if run twice (`IF NOT EXISTS`), so two aggregators starting at
//! once against one database both succeed.
//!
//! The schema runs on ClickHouse 18.16 (Debian's package, used in tests) and
//! on current releases, which rules out `LowCardinality` (experimental
//! before 19.x) and table `TTL` (19.6+): retention drops daily partitions
//! instead. Column by column documentation is in `docs/storage.md`.
//!
//! On a cluster (`clickhouse.cluster`) the same migrations run rewritten by
//! [`super::cluster`]; the single-server statements below are sent as they
//! are when no cluster is set.

use clickhouse::Client;

use super::cluster::{Cluster, SHARDING, Step, sharding_key};
use super::rebuild::{REBUILD_SAMPLES, rebuild_samples};
use super::system::again_if_moved;
use crate::store::OpenError;

const STORE: &str = "clickhouse";

/// `(version, name, statements)`.
pub(crate) const MIGRATIONS: &[(u32, &str, &[&str])] = &[
    (
        1,
        "initial schema",
        &[
            "CREATE TABLE IF NOT EXISTS samples (
            window_start DateTime,
            kind Enum8('cpu' = 0, 'lock' = 1, 'syscall' = 2, 'slow_call' = 3),
            node String,
            namespace String,
            pod String,
            container String,
            process String,
            pid UInt32,
            stack_hash UInt64,
            detail UInt32,
            name String,
            count UInt64,
            total_ns UInt64,
            errors UInt64,
            max_ns UInt64,
            histogram Array(UInt64)
        ) ENGINE = MergeTree
        PARTITION BY toYYYYMMDD(window_start)
        ORDER BY (kind, window_start, node, namespace, pod, process, stack_hash)",
            "CREATE TABLE IF NOT EXISTS stacks (
            hash UInt64,
            symbols Array(String),
            modules Array(String),
            files Array(String),
            lines Array(UInt32),
            offsets Array(UInt64),
            addresses Array(UInt64),
            kernel Array(UInt8),
            inserted DateTime
        ) ENGINE = ReplacingMergeTree(inserted)
        ORDER BY hash",
            "CREATE TABLE IF NOT EXISTS frame_ledger (
            agent_id String,
            boot_id String,
            watermark UInt64,
            above Array(UInt64),
            updated DateTime,
            version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        ORDER BY (agent_id, boot_id)",
        ],
    ),
    (
        2,
        "samples.batch_id",
        // 18.16 has no `ADD COLUMN IF NOT EXISTS`: `add_column` checks first.
        &["ADD COLUMN samples.batch_id UInt64 DEFAULT 0"],
    ),
    (
        3,
        "pushed profiles: kind profile, service, tags, profile type",
        // No Map type on 18.16: tags are two parallel arrays, sorted by key.
        &[
            "ALTER TABLE samples MODIFY COLUMN kind
             Enum8('cpu' = 0, 'lock' = 1, 'syscall' = 2, 'slow_call' = 3, 'profile' = 4)",
            "ADD COLUMN samples.service String DEFAULT ''",
            "ADD COLUMN samples.tag_keys Array(String)",
            "ADD COLUMN samples.tag_values Array(String)",
            "ADD COLUMN samples.profile_type String DEFAULT ''",
        ],
    ),
    (
        4,
        "frame_ledger rows written ahead of their samples",
        // Rows from before (batch_id 0) hold only the committed state.
        &[
            "ADD COLUMN frame_ledger.batch_id UInt64 DEFAULT 0",
            "ADD COLUMN frame_ledger.batch_watermark UInt64 DEFAULT 0",
            "ADD COLUMN frame_ledger.batch_above Array(UInt64)",
            "ADD COLUMN frame_ledger.first_window UInt32 DEFAULT 0",
            "ADD COLUMN frame_ledger.last_window UInt32 DEFAULT 0",
            "ADD COLUMN frame_ledger.windows UInt32 DEFAULT 0",
        ],
    ),
    (
        5,
        "samples: rows of one key summed (SummingMergeTree)",
        // Creates the new table, copies the rows over: see `rebuild`.
        &[REBUILD_SAMPLES],
    ),
];

/// The table recording applied migrations.
pub(crate) const SCHEMA_MIGRATIONS: &str =
    "CREATE TABLE IF NOT EXISTS schema_migrations (version UInt32, name String, applied DateTime)
         ENGINE = MergeTree ORDER BY version";

fn failed(version: u32, name: &'static str, e: impl std::fmt::Display) -> OpenError {
    OpenError::Migration { store: STORE, version, name, reason: e.to_string() }
}

/// Creates the database if needed and applies missing migrations: on one
/// server, or on every server of `cluster` (see [`super::cluster`]).
pub(crate) async fn migrate(
    admin: &Client,
    db: &Client,
    database: &str,
    cluster: Option<&str>,
) -> Result<(), OpenError> {
    if let Some(name) = cluster {
        return migrate_cluster(admin, db, &Cluster { name, database }).await;
    }
    admin
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await
        .map_err(|e| failed(0, "create database", e))?;
    db.query(SCHEMA_MIGRATIONS).execute().await.map_err(|e| failed(0, "schema_migrations", e))?;
    let applied: Vec<u32> = db
        .query("SELECT DISTINCT version FROM schema_migrations")
        .fetch_all::<u32>()
        .await
        .map_err(|e| failed(0, "read schema_migrations", e))?;
    for &(version, name, statements) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        for sql in statements {
            // An aggregator starting at the same moment may be a migration
            // ahead, with `samples` renamed for an instant (migration 5).
            let done = match sql.strip_prefix("ADD COLUMN ") {
                Some(column) => again_if_moved(|| add_column(db, column)).await,
                None if *sql == REBUILD_SAMPLES => rebuild_samples(db, database, None).await,
                None => again_if_moved(|| db.query(sql).execute()).await,
            };
            done.map_err(|e| failed(version, name, e))?;
        }
        db.query("INSERT INTO schema_migrations (version, name, applied) SELECT ?, ?, now()")
            .bind(version)
            .bind(name)
            .execute()
            .await
            .map_err(|e| failed(version, name, e))?;
        tracing::info!(version, name, "ClickHouse migration applied");
    }
    Ok(())
}

/// [`migrate`] on a cluster: the same migrations, each statement rewritten
/// to act on the replicated local tables of every server, then the
/// `Distributed` tables made to match them. The ledger of applied versions
/// is itself a local table behind a `Distributed` one, so every aggregator
/// on any server of the cluster sees the same versions.
async fn migrate_cluster(admin: &Client, db: &Client, cluster: &Cluster<'_>) -> Result<(), OpenError> {
    admin.query(&cluster.create_database()).execute().await.map_err(|e| failed(0, "create database", e))?;
    let step = cluster.rewrite(SCHEMA_MIGRATIONS).ok_or_else(|| failed(0, "schema_migrations", "no cluster form"))?;
    run_step(db, cluster, step).await.map_err(|e| failed(0, "schema_migrations", e))?;
    let key = sharding_key("schema_migrations").unwrap_or("version");
    cluster.ensure_distributed(db, "schema_migrations", key).await?;
    let applied: Vec<u32> = db
        .query("SELECT DISTINCT version FROM schema_migrations")
        .fetch_all::<u32>()
        .await
        .map_err(|e| failed(0, "read schema_migrations", e))?;
    for &(version, name, statements) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        for sql in statements {
            let step = match *sql {
                REBUILD_SAMPLES => Step::RebuildSamples,
                _ => cluster.rewrite(sql).ok_or_else(|| failed(version, name, "no cluster form"))?,
            };
            run_step(db, cluster, step).await.map_err(|e| failed(version, name, e))?;
        }
        db.query("INSERT INTO schema_migrations (version, name, applied) SELECT ?, ?, now()")
            .bind(version)
            .bind(name)
            .execute()
            .await
            .map_err(|e| failed(version, name, e))?;
        tracing::info!(version, name, cluster = cluster.name, "ClickHouse migration applied on the cluster");
    }
    for &(table, key) in SHARDING {
        cluster.ensure_distributed(db, table, key).await?;
    }
    Ok(())
}

async fn run_step(db: &Client, cluster: &Cluster<'_>, step: Step) -> Result<(), clickhouse::error::Error> {
    match step {
        Step::Execute(sql) => again_if_moved(|| db.query(&sql).execute()).await,
        Step::AddColumn { table, column } => {
            let (name, _) = column.split_once(' ').unwrap_or((&column, ""));
            again_if_moved(|| if_column_missing(db, &table, name, cluster.add_column(&table, &column))).await
        }
        Step::RebuildSamples => rebuild_samples(db, cluster.database, Some(cluster)).await,
    }
}

/// Adds `table.column TYPE...` unless the column exists: idempotent, and
/// harmless when another aggregator adds it at the same moment.
async fn add_column(db: &Client, spec: &str) -> Result<(), clickhouse::error::Error> {
    let (qualified, definition) = spec.split_once(' ').unwrap_or((spec, ""));
    let (table, column) = qualified.split_once('.').unwrap_or(("", qualified));
    if_column_missing(db, table, column, format!("ALTER TABLE {table} ADD COLUMN {column} {definition}")).await
}

/// Runs `alter` unless `table` on this server has `column`; an error is
/// fine if the column is there afterwards (another aggregator added it at
/// the same moment).
async fn if_column_missing(
    db: &Client,
    table: &str,
    column: &str,
    alter: String,
) -> Result<(), clickhouse::error::Error> {
    let exists = || async {
        db.query("SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = ? AND name = ?")
            .bind(table)
            .bind(column)
            .fetch_one::<u64>()
            .await
            .map(|n| n > 0)
    };
    if exists().await? {
        return Ok(());
    }
    match db.query(&alter).execute().await {
        Ok(()) => Ok(()),
        // Lost a race with another aggregator: fine if the column is there now.
        Err(e) => {
            if exists().await? {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}
