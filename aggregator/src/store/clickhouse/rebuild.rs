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
//! The migration itself only swaps the tables, on one server or on every
//! server of a cluster: the old table is renamed
//! `samples_before_summing_0_<id>` (when two aggregators start at once, one
//! rename wins and the other finds the table gone) and the new `samples` is
//! created (on a cluster replicated under a ZooKeeper path of its own, since
//! the renamed table keeps the old one). The batches the frame ledger names
//! last get their markers in the new table at once, so that the ledger's
//! look-ups at start find them committed; the rows are then copied in the
//! background while the aggregator serves ([`super::backfill`]).
//! Inserts of aggregators still running an older version fail while the
//! table is missing, between the two statements, and are retried.

use clickhouse::Client;

use super::cluster::{Cluster, LOCAL_SUFFIX, SAMPLES_SHARDING};
use super::service::server_code;
use super::system::{again_if_moved, engine_of, read_system_tables};

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
pub(crate) const COLUMNS: &str = "window_start, kind, node, namespace, pod, container, process, pid, stack_hash, detail, name, \
                       count, total_ns, errors, max_ns, histogram, batch_id, service, tag_keys, tag_values, profile_type";

/// Name prefix of old tables waiting to be copied.
pub(crate) const OLD_PREFIX: &str = "samples_before_summing_";

/// An old `samples` table, by its name `<prefix><claimed_at>_<id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OldTable {
    /// When its copier last renamed it (Unix seconds); 0 until one claims it.
    pub claimed_at: u64,
    /// Fixed for the table's life: names its copies of each day.
    pub id: u32,
}

impl OldTable {
    pub(crate) fn name(&self) -> String {
        format!("{OLD_PREFIX}{}_{:08x}", self.claimed_at, self.id)
    }

    pub(crate) fn parse(name: &str) -> Option<OldTable> {
        let (at, id) = name.strip_prefix(OLD_PREFIX)?.split_once('_')?;
        Some(OldTable { claimed_at: at.parse().ok()?, id: u32::from_str_radix(id, 16).ok()? })
    }
}

/// Where the tables are: one server, or every server of a cluster.
pub(crate) struct Target<'a> {
    pub database: &'a str,
    pub cluster: Option<&'a Cluster<'a>>,
}

impl Target<'_> {
    /// The table holding the rows of `table` (its local table on a cluster).
    pub(crate) fn storage(&self, table: &str) -> String {
        match self.cluster {
            Some(_) => format!("{table}{LOCAL_SUFFIX}"),
            None => table.to_owned(),
        }
    }

    pub(crate) fn on_cluster(&self) -> String {
        self.cluster.map(|c| format!(" ON CLUSTER {}", c.name)).unwrap_or_default()
    }

    pub(crate) fn qualified(&self, table: &str) -> String {
        format!("{}.{table}", self.database)
    }

    pub(crate) fn rename(&self, from: &str, to: &str) -> String {
        format!(
            "RENAME TABLE {} TO {}{}",
            self.qualified(&self.storage(from)),
            self.qualified(&self.storage(to)),
            self.on_cluster()
        )
    }

    pub(crate) fn drop(&self, table: &str) -> String {
        format!("DROP TABLE IF EXISTS {}{}", self.qualified(table), self.on_cluster())
    }

    /// On a cluster, the `Distributed` table `name` over the local tables
    /// `name_local` of every shard, to read them all; on one server the
    /// table itself is read.
    pub(crate) async fn create_reader(&self, db: &Client, name: &str) -> Result<(), clickhouse::error::Error> {
        match self.cluster {
            // Old `samples` tables were sharded as `samples` is.
            Some(c) => db.query(&c.create_distributed(name, SAMPLES_SHARDING)).execute().await,
            None => Ok(()),
        }
    }

    pub(crate) async fn drop_reader(&self, db: &Client, name: &str) -> Result<(), clickhouse::error::Error> {
        match self.cluster {
            Some(_) => db.query(&self.drop(name)).execute().await,
            None => Ok(()),
        }
    }

    /// Creates `table` with the columns and engine of the summing
    /// `samples` (on a cluster, its local tables, replicated under a path
    /// of their own: a renamed table keeps its path).
    pub(crate) fn create_like_samples(&self, table: &str) -> Result<String, clickhouse::error::Error> {
        let sql = CREATE_SAMPLES.replacen("samples", table, 1);
        match self.cluster {
            Some(c) => c
                .create_local(&sql, &format!("{table}_{:016x}", rand::random::<u64>()))
                .ok_or_else(|| clickhouse::error::Error::Custom(format!("{table}: no cluster form"))),
            None => Ok(sql),
        }
    }
}

fn is_summing(engine: Option<&str>) -> bool {
    engine.is_some_and(|e| e.ends_with("SummingMergeTree"))
}

/// Swaps the tables (see the module docs); harmless to run again.
pub(crate) async fn rebuild_samples(
    db: &Client,
    database: &str,
    cluster: Option<&Cluster<'_>>,
) -> Result<(), clickhouse::error::Error> {
    let t = Target { database, cluster };
    let storage = t.storage("samples");
    let mut renamed = None;
    if !is_summing(engine_of(db, database, &storage).await?.as_deref()) {
        let old = OldTable { claimed_at: 0, id: rand::random() };
        match db.query(&t.rename("samples", &old.name())).execute().await {
            Ok(()) => renamed = Some(old),
            Err(e) => {
                // Another aggregator renamed it first: fine once it is gone.
                let engine = engine_of(db, database, &storage).await?;
                if engine.is_some() && !is_summing(engine.as_deref()) {
                    return Err(e);
                }
            }
        }
    }
    if let Some(old) = renamed
        && is_summing(engine_of(db, database, &t.storage(&old.name())).await?.as_deref())
    {
        // Between the look and the rename another aggregator made the new
        // table: put it back (if that fails, it is copied like an old one).
        if db.query(&t.rename(&old.name(), "samples")).execute().await.is_ok() {
            renamed = None;
        }
    }
    db.query(&t.create_like_samples("samples")?).execute().await?;
    if let Some(c) = cluster {
        c.ensure_distributed(db, "samples", SAMPLES_SHARDING)
            .await
            .map_err(|e| clickhouse::error::Error::Custom(e.to_string()))?;
    }
    if let Some(old) = renamed {
        mark_last_batches(db, &t, old).await?;
    }
    Ok(())
}

/// Stores in `samples` the markers of the batches the ledger names last
/// for each agent run (see [`super::ledger`]) whose rows are in the old
/// table `old`: the ledger's look-ups ask for them as soon as the
/// aggregator starts, long before the backfill copies their days. The rows
/// themselves follow with the copy.
async fn mark_last_batches(db: &Client, t: &Target<'_>, old: OldTable) -> Result<(), clickhouse::error::Error> {
    if engine_of(db, t.database, "frame_ledger").await?.is_none() {
        return Ok(()); // A new database on a cluster: no ledger read yet.
    }
    let mut name = old.name();
    for _ in 0..5 {
        t.create_reader(db, &name).await?;
        let sql = format!(
            "INSERT INTO {samples} (window_start, kind, stack_hash, count, batch_id)
             SELECT window_start, 'batch', batch_id, 1, batch_id FROM {old}
             WHERE batch_id != 0 AND batch_id GLOBAL IN
                 (SELECT argMax(batch_id, version) FROM {ledger} GROUP BY agent_id, boot_id)
             GROUP BY window_start, batch_id",
            samples = t.qualified("samples"),
            old = t.qualified(&name),
            ledger = t.qualified("frame_ledger"),
        );
        // Another aggregator starting at once may hold the new table
        // renamed for a moment (see `rebuild_samples`).
        match again_if_moved(|| db.query(&sql).execute()).await {
            Err(clickhouse::error::Error::BadResponse(text)) if server_code(&text) == Some(60) => {
                // Or its copy claimed the old table, renaming it: read it
                // under its new name. Gone altogether, it was copied, and
                // its rows carry their batch ids in `samples`.
                t.drop_reader(db, &name).await?;
                match old_tables(db, t).await?.into_iter().find(|o| o.id == old.id) {
                    Some(now) => name = now.name(),
                    None => return Ok(()),
                }
            }
            done => return done,
        }
    }
    Err(clickhouse::error::Error::Custom(format!("the old samples table {name} kept being renamed")))
}

/// The old tables of the database.
pub(crate) async fn old_tables(db: &Client, t: &Target<'_>) -> Result<Vec<OldTable>, clickhouse::error::Error> {
    let sql = "SELECT name FROM system.tables WHERE database = ? AND startsWith(name, ?) ORDER BY name";
    let names = read_system_tables(db, sql, t.database, OLD_PREFIX).await?;
    let suffix = t.storage("");
    Ok(names.iter().filter_map(|n| n.strip_suffix(suffix.as_str())).filter_map(OldTable::parse).collect())
}
