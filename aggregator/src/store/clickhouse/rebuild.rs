//! Migration 5: `samples` rebuilt on a `SummingMergeTree`, so that the
//! rows of one key are merged into one.
//!
//! Why: a shard flush writes what arrived since the previous one, so a
//! (window, labels, stack) seen all through a window is written once per
//! flush: about once per window with 10 s agent batches, up to 20 times
//! with 500 ms ones. A plain `MergeTree` keeps every one of those rows.
//! The summing engine adds up `count`, `total_ns` and `errors` of rows
//! whose sorting key is equal when it merges parts, and queries sum anyway,
//! so what they return is unchanged.
//!
//! The sorting key is every column that tells rows apart (the old key,
//! then the other labels, `detail`, `name`, tags), and last a term that is
//! 0 for `cpu` and `profile` rows and the batch id for the others: lock,
//! syscall and slow-call rows carry `max_ns` and `histogram`, which must not
//! be summed or taken from one row, so their rows of different batches stay
//! apart. The primary key is the old sorting key, so reads use the same
//! index. The retry and ledger checks ask for rows tagged with a batch id,
//! which a merge can take away; each batch therefore stores marker rows
//! that are never merged (see [`super::request_builder::sample_rows`]).
//!
//! The rebuild, on one server or on every server of a cluster:
//! 1. the old table is renamed `samples_before_summing_<random>` (on a
//!    cluster its local tables `..._local`, with a `Distributed` table over
//!    them for the copy); when two aggregators start at once, one rename
//!    wins and the other finds the table gone;
//! 2. the new `samples` is created (on a cluster, replicated under a ZooKeeper
//!    path of its own, since the renamed table keeps the old one);
//! 3. the aggregator whose rename won copies the old table one day
//!    (partition) at a time: `INSERT ... SELECT` of the day, the day
//!    dropped from the old table, then the old table renamed again with the
//!    time in its name, as a sign of life; at the end it is dropped;
//! 4. an old table not renamed for [`ABANDONED_AFTER_S`] was left by an
//!    aggregator that stopped while copying: the next aggregator to start
//!    claims it by renaming it (one rename wins) and copies the days left.
//!    A day whose insert completed but which was not yet dropped when the
//!    copier stopped is copied twice (the log names each day as its copy
//!    starts).
//!
//! Inserts of aggregators that are still running an older version fail
//! while the table is missing (between steps 1 and 2) and are retried.

use clickhouse::Client;

use super::cluster::{Cluster, LOCAL_SUFFIX};

/// The migration statement that stands for this rebuild.
pub(crate) const REBUILD_SAMPLES: &str = "REBUILD TABLE samples";

/// The summing `samples`, as created on one server.
pub(crate) const CREATE_SAMPLES: &str = "CREATE TABLE IF NOT EXISTS samples (
            window_start DateTime,
            kind Enum8('cpu' = 0, 'lock' = 1, 'syscall' = 2, 'slow_call' = 3, 'profile' = 4, 'batch' = 5),
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
            histogram Array(UInt64),
            batch_id UInt64 DEFAULT 0,
            service String DEFAULT '',
            tag_keys Array(String),
            tag_values Array(String),
            profile_type String DEFAULT ''
        ) ENGINE = SummingMergeTree((count, total_ns, errors))
        PARTITION BY toYYYYMMDD(window_start)
        PRIMARY KEY (kind, window_start, node, namespace, pod, process, stack_hash)
        ORDER BY (kind, window_start, node, namespace, pod, process, stack_hash,
                  container, pid, detail, name, service, profile_type, tag_keys, tag_values,
                  if(kind IN ('cpu', 'profile'), 0, batch_id))";

/// Every column of `samples`, old and new alike.
const COLUMNS: &str = "window_start, kind, node, namespace, pod, container, process, pid, stack_hash, detail, name, \
                       count, total_ns, errors, max_ns, histogram, batch_id, service, tag_keys, tag_values, profile_type";

/// Name prefix of old tables waiting to be copied.
const OLD_PREFIX: &str = "samples_before_summing_";

/// Where the rebuild runs: one server, or every server of a cluster.
struct Target<'a> {
    database: &'a str,
    cluster: Option<&'a Cluster<'a>>,
}

impl Target<'_> {
    /// The table holding the rows of `table` (its local table on a cluster).
    fn storage(&self, table: &str) -> String {
        match self.cluster {
            Some(_) => format!("{table}{LOCAL_SUFFIX}"),
            None => table.to_owned(),
        }
    }

    fn on_cluster(&self) -> String {
        self.cluster.map(|c| format!(" ON CLUSTER {}", c.name)).unwrap_or_default()
    }

    fn qualified(&self, table: &str) -> String {
        format!("{}.{table}", self.database)
    }

    fn rename(&self, from: &str, to: &str) -> String {
        format!(
            "RENAME TABLE {} TO {}{}",
            self.qualified(&self.storage(from)),
            self.qualified(&self.storage(to)),
            self.on_cluster()
        )
    }

    fn drop(&self, table: &str) -> String {
        format!("DROP TABLE IF EXISTS {}{}", self.qualified(table), self.on_cluster())
    }

    /// On a cluster, the `Distributed` table `name` over the local tables
    /// `name_local` of every shard, to read them all; on one server the
    /// table itself is read.
    async fn create_reader(&self, db: &Client, name: &str) -> Result<(), clickhouse::error::Error> {
        match self.cluster {
            Some(c) => db.query(&c.create_distributed(name, "intHash64(batch_id)")).execute().await,
            None => Ok(()),
        }
    }

    async fn drop_reader(&self, db: &Client, name: &str) -> Result<(), clickhouse::error::Error> {
        match self.cluster {
            Some(_) => db.query(&self.drop(name)).execute().await,
            None => Ok(()),
        }
    }

    fn create_samples(&self) -> Option<String> {
        match self.cluster {
            // The renamed old table keeps the replication path `samples`.
            Some(c) => c.create_local(CREATE_SAMPLES, &format!("samples_{:016x}", rand::random::<u64>())),
            None => Some(CREATE_SAMPLES.to_owned()),
        }
    }
}

/// A name for an old table, claimed now: `<prefix><unix seconds>_<random>`.
fn fresh_old_name() -> String {
    format!("{OLD_PREFIX}{}_{:08x}", crate::clock::unix_now_s(), rand::random::<u32>())
}

/// When the old table `name` was last claimed (Unix seconds).
fn claimed_at(name: &str) -> Option<u64> {
    name.strip_prefix(OLD_PREFIX)?.split('_').next()?.parse().ok()
}

/// An old table whose copier has not renamed it for this long is taken to
/// be abandoned (its aggregator died); a copier renames it after every day.
const ABANDONED_AFTER_S: u64 = 3600;

/// The engine of `table` in `database`, `None` if there is no such table.
async fn engine_of(db: &Client, database: &str, table: &str) -> Result<Option<String>, clickhouse::error::Error> {
    let engines = db
        .query("SELECT engine FROM system.tables WHERE database = ? AND name = ?")
        .bind(database)
        .bind(table)
        .fetch_all::<String>()
        .await?;
    Ok(engines.into_iter().next())
}

fn is_summing(engine: Option<&str>) -> bool {
    engine.is_some_and(|e| e.ends_with("SummingMergeTree"))
}

/// Runs the rebuild (see the module docs); harmless to run again.
pub(crate) async fn rebuild_samples(
    db: &Client,
    database: &str,
    cluster: Option<&Cluster<'_>>,
) -> Result<(), clickhouse::error::Error> {
    let t = Target { database, cluster };
    let storage = t.storage("samples");
    let mut mine = None;
    if !is_summing(engine_of(db, database, &storage).await?.as_deref()) {
        let name = fresh_old_name();
        match db.query(&t.rename("samples", &name)).execute().await {
            Ok(()) => mine = Some(name),
            Err(e) => {
                // Another aggregator renamed it first (and copies it): fine
                // once it is gone.
                let engine = engine_of(db, database, &storage).await?;
                if engine.is_some() && !is_summing(engine.as_deref()) {
                    return Err(e);
                }
            }
        }
    }
    let create = t.create_samples().ok_or_else(|| clickhouse::error::Error::Custom("no cluster form".into()))?;
    db.query(&create).execute().await?;
    if let Some(c) = cluster {
        let key = super::cluster::SHARDING.iter().find(|(t, _)| *t == "samples").map_or("rand()", |(_, k)| *k);
        c.ensure_distributed(db, "samples", key).await.map_err(|e| clickhouse::error::Error::Custom(e.to_string()))?;
    }
    if let Some(name) = mine {
        copy_old(db, &t, name).await?;
    }
    let now = crate::clock::unix_now_s();
    for old in old_tables(db, &t).await? {
        if claimed_at(&old).is_some_and(|at| at.saturating_add(ABANDONED_AFTER_S) <= now) {
            let name = fresh_old_name();
            if let Err(e) = db.query(&t.rename(&old, &name)).execute().await {
                tracing::info!(table = old, error = %e, "an abandoned old samples table was taken by another aggregator");
                continue;
            }
            tracing::warn!(table = old, "resuming the copy of an old samples table left by an aggregator that stopped");
            t.drop_reader(db, &old).await?;
            copy_old(db, &t, name).await?;
        } else {
            tracing::info!(table = old, "an old samples table is being copied by another aggregator");
        }
    }
    Ok(())
}

/// Old tables left to copy (by the name their rows are read through).
async fn old_tables(db: &Client, t: &Target<'_>) -> Result<Vec<String>, clickhouse::error::Error> {
    let names = db
        .query("SELECT name FROM system.tables WHERE database = ? AND startsWith(name, ?) ORDER BY name")
        .bind(t.database)
        .bind(OLD_PREFIX)
        .fetch_all::<String>()
        .await?;
    let suffix = t.storage("");
    Ok(names.into_iter().filter_map(|n| n.strip_suffix(suffix.as_str()).map(str::to_owned)).collect())
}

/// Copies the old table `name`, claimed by this aggregator, into `samples`
/// a day at a time, renaming it after every day (a sign of life to other
/// aggregators); stops if another aggregator took it over meanwhile.
async fn copy_old(db: &Client, t: &Target<'_>, mut name: String) -> Result<(), clickhouse::error::Error> {
    t.create_reader(db, &name).await?;
    let days = db
        .query(&format!("SELECT DISTINCT toYYYYMMDD(window_start) AS day FROM {} ORDER BY day", t.qualified(&name)))
        .fetch_all::<u32>()
        .await?;
    for day in days {
        tracing::info!(day, table = %name, "copying a day of samples into the summing table");
        let insert = format!(
            "INSERT INTO {} ({COLUMNS}) SELECT {COLUMNS} FROM {} WHERE toYYYYMMDD(window_start) = {day}",
            t.qualified("samples"),
            t.qualified(&name)
        );
        db.query(&insert).execute().await?;
        let storage = t.qualified(&t.storage(&name));
        db.query(&format!("ALTER TABLE {storage}{} DROP PARTITION {day}", t.on_cluster())).execute().await?;
        let next = fresh_old_name();
        if let Err(e) = db.query(&t.rename(&name, &next)).execute().await {
            tracing::warn!(table = %name, error = %e, "an old samples table was taken over by another aggregator");
            return Ok(());
        }
        t.drop_reader(db, &name).await?;
        t.create_reader(db, &next).await?;
        name = next;
    }
    t.drop_reader(db, &name).await?;
    db.query(&t.drop(&t.storage(&name))).execute().await?;
    tracing::info!(table = %name, "old samples table copied and dropped");
    Ok(())
}
