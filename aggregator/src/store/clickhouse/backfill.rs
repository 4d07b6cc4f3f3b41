//! Copying the rows of `samples` tables from before migration 5 (see
//! [`super::rebuild`]) into the summing `samples`, in the background while
//! the aggregator serves. Until a day is copied, queries do not see it.
//!
//! An old table is copied by one aggregator at a time. It claims the table
//! by renaming it with the time in its name (of two renames of one name,
//! one wins), and renames it again after every day it copies, as a sign of
//! life. A table not renamed for [`ABANDONED_AFTER_S`] was left by an
//! aggregator that stopped, and is claimed by the next one that looks
//! (every aggregator looks at start and every [`LOOK_AGAIN`] while old
//! tables are left).
//!
//! Each day (partition) is copied exactly once, even if the copier stops at
//! any point:
//! 1. its rows are copied into a staging table of the summing form
//!    (`INSERT ... SELECT`), with one marker row naming the old table and
//!    the day (a `batch` row, never merged with another, see
//!    [`super::request_builder::sample_rows`]);
//! 2. if the old table is still this copier's and the day's marker is not
//!    in `samples` yet, the staging partition is attached to `samples`
//!    (`ATTACH PARTITION ... FROM`: all its parts at once, so the marker
//!    lands with the rows), and the staging table dropped;
//! 3. the day is dropped from the old table.
//!
//! A copier that finds the day's marker in `samples` knows step 2 was done,
//! and only does step 3. Staging tables left by copiers that stopped are
//! dropped with their old table.
//!
//! On a cluster the old tables' rows are read through a `Distributed` table
//! over their local tables, and the days dropped `ON CLUSTER`; ClickHouse
//! 18.16 runs no `ATTACH PARTITION ... FROM` `ON CLUSTER`, so there the day's
//! rows are inserted straight into `samples` and the marker after them. A
//! copier that stops within that insert, or between it and the marker,
//! leaves rows that its successor copies again: part of that day is then
//! stored twice.

use std::time::Duration;

use clickhouse::Client;

use super::cluster::Cluster;
use super::rebuild::{COLUMNS, OldTable, Target, old_tables};
use super::system::read_system_tables;
use crate::clock::unix_now_s;

/// An old table its copier has not renamed for this long is taken over.
const ABANDONED_AFTER_S: u64 = 6 * 3600;

/// How often an aggregator looks again while old tables are left.
const LOOK_AGAIN: Duration = Duration::from_secs(600);

/// Whether old tables are left to copy.
pub(crate) async fn pending(
    db: &Client,
    database: &str,
    cluster: Option<&str>,
) -> Result<bool, clickhouse::error::Error> {
    let c = cluster.map(|name| Cluster { name, database });
    Ok(!old_tables(db, &Target { database, cluster: c.as_ref() }).await?.is_empty())
}

/// Starts the copy in the background, on the current tokio runtime; it
/// ends once no old table is left.
pub(crate) fn spawn(db: Client, database: String, cluster: Option<String>) {
    tokio::spawn(async move {
        loop {
            let c = cluster.as_deref().map(|name| Cluster { name, database: &database });
            let t = Target { database: &database, cluster: c.as_ref() };
            match copy_claimable(&db, &t).await {
                Ok(0) => return,
                Ok(left) => tracing::info!(left, "old samples tables left to copy; looking again later"),
                Err(e) => tracing::warn!(error = %e, "copying old samples rows failed; trying again later"),
            }
            tokio::time::sleep(LOOK_AGAIN).await;
        }
    });
}

/// Copies every old table no other aggregator is copying; returns how many
/// old tables are left.
pub(crate) async fn copy_claimable(db: &Client, t: &Target<'_>) -> Result<usize, clickhouse::error::Error> {
    for old in old_tables(db, t).await? {
        let now = unix_now_s();
        if old.claimed_at.saturating_add(ABANDONED_AFTER_S) > now {
            continue;
        }
        let mine = OldTable { claimed_at: now, ..old };
        if let Err(e) = db.query(&t.rename(&old.name(), &mine.name())).execute().await {
            tracing::info!(table = old.name(), error = %e, "another aggregator took an old samples table to copy");
            continue;
        }
        if old.claimed_at != 0 {
            tracing::warn!(
                table = old.name(),
                "taking over the copy of an old samples table from a stopped aggregator"
            );
        }
        t.drop_reader(db, &old.name()).await?;
        copy_table(db, t, mine).await?;
    }
    Ok(old_tables(db, t).await?.len())
}

/// Copies the claimed old table `old` day by day, the newest first (what
/// people look at), renaming it after each; stops if another aggregator
/// took it over meanwhile.
async fn copy_table(db: &Client, t: &Target<'_>, mut old: OldTable) -> Result<(), clickhouse::error::Error> {
    // A statement running longer than this would let another aggregator
    // take the table over while it runs.
    let db = &db.clone().with_setting("max_execution_time", MAX_STATEMENT_S.to_string());
    t.create_reader(db, &old.name()).await?;
    let sql =
        format!("SELECT DISTINCT toYYYYMMDD(window_start) AS day FROM {} ORDER BY day DESC", t.qualified(&old.name()));
    let days = db.query(&sql).fetch_all::<u32>().await?;
    for day in days {
        if !copy_day(db, t, old, day).await? {
            return Ok(());
        }
        let next = OldTable { claimed_at: unix_now_s(), ..old };
        if next == old {
            continue; // Renamed within this second.
        }
        if let Err(e) = db.query(&t.rename(&old.name(), &next.name())).execute().await {
            tracing::warn!(table = old.name(), error = %e, "an old samples table was taken over by another aggregator");
            return Ok(());
        }
        t.drop_reader(db, &old.name()).await?;
        t.create_reader(db, &next.name()).await?;
        old = next;
    }
    t.drop_reader(db, &old.name()).await?;
    db.query(&t.drop(&t.storage(&old.name()))).execute().await?;
    if t.cluster.is_none() {
        // Staging tables of copiers that stopped.
        let sql = "SELECT name FROM system.tables WHERE database = ? AND startsWith(name, ?)";
        let prefix = format!("samples_copy_{:08x}_", old.id);
        for name in read_system_tables(db, sql, t.database, &prefix).await? {
            db.query(&t.drop(&name)).execute().await?;
        }
    }
    tracing::info!(table = old.name(), "old samples table copied and dropped");
    Ok(())
}

/// Longest a statement of the copy may run, seconds: well below
/// [`ABANDONED_AFTER_S`].
const MAX_STATEMENT_S: u64 = ABANDONED_AFTER_S * 5 / 6;

/// The marker of day `day` of the old table `id`: odd, like batch ids.
fn day_marker(id: u32, day: u32) -> u64 {
    ((u64::from(id) << 32) | u64::from(day)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// The statement copying rows of `source` matching `filter` into `into`.
/// `cpu` and `profile` rows go as they are (the summing engine adds them
/// up); the others are first merged per key of the summing table: the old
/// table may hold several rows of one key and batch, whose `max_ns` and
/// `histogram` the engine would take from one row only.
fn copy_statements(into: &str, source: &str, filter: &str) -> [String; 2] {
    let keys = "window_start, kind, node, namespace, pod, container, process, pid, stack_hash, detail, name, \
                service, tag_keys, tag_values, profile_type";
    [
        format!(
            "INSERT INTO {into} ({COLUMNS}) SELECT {COLUMNS} FROM {source} WHERE {filter} AND kind IN ('cpu', 'profile')"
        ),
        format!(
            "INSERT INTO {into} ({keys}, count, total_ns, errors, max_ns, histogram, batch_id) \
             SELECT {keys}, sum(count), sum(total_ns), sum(errors), max(max_ns), sumForEach(histogram), any(batch_id) \
             FROM {source} WHERE {filter} AND kind NOT IN ('cpu', 'profile') GROUP BY {keys}, batch_id"
        ),
    ]
}

/// Copies one day of `old` (see the module docs); `false` if another
/// aggregator took the table over meanwhile.
async fn copy_day(db: &Client, t: &Target<'_>, old: OldTable, day: u32) -> Result<bool, clickhouse::error::Error> {
    let source = t.qualified(&old.name());
    let marker = day_marker(old.id, day);
    // The day's first window: where the marker goes (in the day's partition).
    let sql = format!("SELECT toUInt32(min(window_start)) FROM {source} WHERE toYYYYMMDD(window_start) = {day}");
    let window = db.query(&sql).fetch_one::<u32>().await?;
    let attached = format!(
        "SELECT count() FROM {} WHERE kind = 'batch' AND window_start = toDateTime({window}) AND stack_hash = {marker}",
        t.qualified("samples")
    );
    if db.query(&attached).fetch_one::<u64>().await? == 0 {
        tracing::info!(day, table = old.name(), "copying a day of samples into the summing table");
        let filter = format!("toYYYYMMDD(window_start) = {day}");
        let mark = |into: &str| {
            format!(
                "INSERT INTO {into} (window_start, kind, stack_hash, count, batch_id) \
                 VALUES (toDateTime({window}), 'batch', {marker}, 1, {marker})"
            )
        };
        if t.cluster.is_some() {
            // 18.16 runs no `ATTACH PARTITION ... FROM` `ON CLUSTER`: the
            // rows go straight in, then the marker (see the module docs).
            let samples = t.qualified("samples");
            for sql in copy_statements(&samples, &source, &filter) {
                db.query(&sql).execute().await?;
            }
            db.query(&mark(&samples)).execute().await?;
        } else {
            let staging = format!("samples_copy_{:08x}_{}_{day}", old.id, old.claimed_at);
            db.query(&t.drop(&staging)).execute().await?;
            db.query(&t.create_like_samples(&staging)?).execute().await?;
            for sql in copy_statements(&staging, &source, &filter) {
                db.query(&sql).execute().await?;
            }
            db.query(&mark(&staging)).execute().await?;
            // Still this aggregator's table, and the day not attached by
            // another that took it over while the rows were copied?
            let still_mine = format!("EXISTS TABLE {source}");
            if db.query(&still_mine).fetch_one::<u8>().await? == 0 || db.query(&attached).fetch_one::<u64>().await? > 0
            {
                db.query(&t.drop(&staging)).execute().await?;
                return Ok(false);
            }
            db.query(&format!("ALTER TABLE samples ATTACH PARTITION {day} FROM {staging}")).execute().await?;
            db.query(&t.drop(&staging)).execute().await?;
        }
    }
    let storage = t.qualified(&t.storage(&old.name()));
    db.query(&format!("ALTER TABLE {storage}{} DROP PARTITION {day}", t.on_cluster())).execute().await?;
    Ok(true)
}
