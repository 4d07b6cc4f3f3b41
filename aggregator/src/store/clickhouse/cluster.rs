//! The schema on a ClickHouse cluster (`clickhouse.cluster`).
//!
//! Every table `t` of [`super::schema`] becomes two, both created
//! `ON CLUSTER`:
//! - `t_local`, the same columns on a `Replicated*MergeTree` engine whose
//!   ZooKeeper path is `/clickhouse/tables/{shard}/<database>/t` and
//!   replica `{replica}` (the servers' macros);
//! - `t`, a `Distributed(<cluster>, <database>, t_local, <sharding key>)`
//!   table: the name every read and insert of the store uses, unchanged.
//!
//! The migrations are the single-server ones, rewritten statement by
//! statement ([`Cluster::rewrite`]) to act on the local tables. The
//! `Distributed` tables are made to match their local tables at the end of
//! every start ([`Cluster::ensure_distributed`]): created if missing,
//! recreated if a migration changed the local columns. ClickHouse 18.16
//! refuses `ALTER ... ON CLUSTER` on a `Distributed` table of a cluster
//! with `internal_replication`, and inserts are synchronous, so a
//! `Distributed` table holds no data and recreating it loses nothing.
//!
//! Sharding keys ([`SHARDING`]):
//! - `samples` by `intHash64(batch_id)`: all rows of one write batch land
//!   on one shard, where an insert is committed part by part (one per day),
//!   each all or nothing, as on one server; so the retry check by batch id
//!   stays exact. (`batch_id` is always odd: hashed, not taken modulo.)
//! - `stacks` by `hash`: each stack always lands on the same shard, where
//!   ReplacingMergeTree keeps it once.
//! - `frame_ledger` by `cityHash64(agent_id, boot_id)`: the states of one
//!   agent run replace each other on one shard.
//! - `schema_migrations` by `version`.
//!
//! Every statement here is accepted by ClickHouse 18.16 (tested) and uses
//! syntax current releases still accept (`ON CLUSTER`, macros in the
//! replication path, `Distributed` with a sharding expression).

use clickhouse::Client;

use super::system::engine_of;
use crate::store::OpenError;

/// Suffix of the replicated tables behind the `Distributed` ones.
pub(crate) const LOCAL_SUFFIX: &str = "_local";

/// The `Distributed` tables and their sharding keys (see the module docs).
pub(crate) const SHARDING: &[(&str, &str)] = &[
    ("schema_migrations", "version"),
    ("samples", SAMPLES_SHARDING),
    ("stacks", "hash"),
    ("frame_ledger", "cityHash64(agent_id, boot_id)"),
];

/// The sharding key of `samples` (and of the old tables the upgrade to the
/// summing engine copies from).
pub(crate) const SAMPLES_SHARDING: &str = "intHash64(batch_id)";

/// The sharding key of the `Distributed` table `table`.
pub(crate) fn sharding_key(table: &str) -> Option<&'static str> {
    SHARDING.iter().find(|(t, _)| *t == table).map(|(_, key)| *key)
}

/// Whether `name` can be a cluster name in SQL as it is: letters, digits
/// and `_`, not starting with a digit.
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// One step of a migration on a cluster.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Run this statement.
    Execute(String),
    /// Add `column` (with its type and default) to the local `table`
    /// unless the server already has it.
    AddColumn {
        /// Local table name, without the database.
        table: String,
        /// `name TYPE [DEFAULT ...]`.
        column: String,
    },
    /// Rebuild `samples` on the summing engine ([`super::rebuild`]).
    RebuildSamples,
}

/// `s` after an opening parenthesis, split at its closing one: what is
/// inside, and what follows it.
fn split_at_closing(s: &str) -> Option<(&str, &str)> {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some((&s[..i], &s[i + 1..])),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// A cluster and the database the store uses on it.
#[derive(Clone, Debug)]
pub(crate) struct Cluster<'a> {
    /// Cluster name, checked by [`is_identifier`].
    pub name: &'a str,
    /// Database, checked by the client's construction.
    pub database: &'a str,
}

impl Cluster<'_> {
    fn local(&self, table: &str) -> String {
        format!("{}.{table}{LOCAL_SUFFIX}", self.database)
    }

    /// `CREATE DATABASE` on every server of the cluster.
    pub(crate) fn create_database(&self) -> String {
        format!("CREATE DATABASE IF NOT EXISTS {} ON CLUSTER {}", self.database, self.name)
    }

    /// The single-server statement `sql` rewritten for the cluster: table
    /// creation becomes the replicated local table, `ALTER TABLE` and
    /// `ADD COLUMN` act on the local table on every server. `None` for a
    /// statement of another shape (a unit test keeps every migration
    /// rewritable).
    pub(crate) fn rewrite(&self, sql: &str) -> Option<Step> {
        if let Some(rest) = sql.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            let (table, _) = rest.split_once(' ')?;
            return self.create_local(sql, table).map(Step::Execute);
        }
        if let Some(rest) = sql.strip_prefix("ALTER TABLE ") {
            let (table, rest) = rest.split_once(' ')?;
            return Some(Step::Execute(format!("ALTER TABLE {} ON CLUSTER {} {rest}", self.local(table), self.name)));
        }
        if let Some(spec) = sql.strip_prefix("ADD COLUMN ") {
            let (qualified, column) = spec.split_once(' ')?;
            let (table, name) = qualified.split_once('.')?;
            return Some(Step::AddColumn {
                table: format!("{table}{LOCAL_SUFFIX}"),
                column: format!("{name} {column}"),
            });
        }
        None
    }

    /// The single-server `CREATE TABLE IF NOT EXISTS t ...` statement `sql`
    /// as the replicated local table `t_local` of every server, replicated
    /// under the ZooKeeper path `/clickhouse/tables/{shard}/<database>/<path>`.
    pub(crate) fn create_local(&self, sql: &str, path: &str) -> Option<String> {
        let rest = sql.strip_prefix("CREATE TABLE IF NOT EXISTS ")?;
        let (table, rest) = rest.split_once(' ')?;
        let (columns, engine) = rest.split_once(" ENGINE = ")?;
        let name_len = engine.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(engine.len());
        let (engine_name, after) = engine.split_at(name_len);
        let replication = format!("'/clickhouse/tables/{{shard}}/{}/{path}', '{{replica}}'", self.database);
        let (args, tail) = match after.strip_prefix('(') {
            Some(inner) => {
                let (args, tail) = split_at_closing(inner)?;
                (format!("{replication}, {args}"), tail)
            }
            None => (replication, after),
        };
        Some(format!(
            "CREATE TABLE IF NOT EXISTS {} ON CLUSTER {} {columns} ENGINE = Replicated{engine_name}({args}){tail}",
            self.local(table),
            self.name
        ))
    }

    /// `ALTER TABLE` adding `column` to the local `table` on every server.
    pub(crate) fn add_column(&self, table: &str, column: &str) -> String {
        format!("ALTER TABLE {}.{table} ON CLUSTER {} ADD COLUMN {column}", self.database, self.name)
    }

    /// The statement creating the `Distributed` table `table`.
    pub(crate) fn create_distributed(&self, table: &str, key: &str) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{table} ON CLUSTER {c} AS {local} ENGINE = Distributed({c}, {db}, {table}{LOCAL_SUFFIX}, {key})",
            db = self.database,
            c = self.name,
            local = self.local(table),
        )
    }

    /// Creates the `Distributed` table `table` unless it exists with the
    /// columns of its local table; one with other columns (a migration
    /// changed the local table) is dropped and created again. A table of
    /// that name with another engine (a database made for one server) is an
    /// error naming it.
    pub(crate) async fn ensure_distributed(&self, db: &Client, table: &str, key: &str) -> Result<(), OpenError> {
        let failed = |e: clickhouse::error::Error| OpenError::Migration {
            store: "clickhouse",
            version: 0,
            name: "distributed tables",
            reason: format!("{table}: {e}"),
        };
        let columns = |name: String| async move {
            let mut cols = db
                .query("SELECT concat(name, ' ', type) FROM system.columns WHERE database = ? AND table = ?")
                .bind(self.database)
                .bind(name)
                .fetch_all::<String>()
                .await?;
            cols.sort();
            Ok::<_, clickhouse::error::Error>(cols)
        };
        let engine = engine_of(db, self.database, table).await.map_err(failed)?;
        if let Some(engine) = engine.filter(|e| e != "Distributed") {
            // A database made for one server: its tables would be written
            // as they are, on one shard, without a word.
            return Err(OpenError::Migration {
                store: "clickhouse",
                version: 0,
                name: "distributed tables",
                reason: format!(
                    "{}.{table} is a {engine} table, not Distributed: the database was created for one server; \
                     give the cluster a database of its own (clickhouse.database) or unset clickhouse.cluster",
                    self.database
                ),
            });
        }
        let local = columns(format!("{table}{LOCAL_SUFFIX}")).await.map_err(failed)?;
        let distributed = columns(table.to_owned()).await.map_err(failed)?;
        if distributed == local {
            return Ok(());
        }
        if !distributed.is_empty() {
            tracing::info!(table, "the columns of a ClickHouse Distributed table changed; creating it again");
            let drop = format!("DROP TABLE IF EXISTS {}.{table} ON CLUSTER {}", self.database, self.name);
            db.query(&drop).execute().await.map_err(failed)?;
        }
        db.query(&self.create_distributed(table, key)).execute().await.map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::clickhouse::schema::{MIGRATIONS, SCHEMA_MIGRATIONS};

    const C: Cluster<'static> = Cluster { name: "fleet", database: "aperture" };

    #[test]
    fn every_migration_statement_has_a_cluster_form() {
        for (version, name, statements) in MIGRATIONS {
            for sql in statements.iter().filter(|s| **s != crate::store::clickhouse::rebuild::REBUILD_SAMPLES) {
                assert!(C.rewrite(sql).is_some(), "migration {version} ({name}): no cluster form for {sql}");
            }
        }
        assert!(C.rewrite(SCHEMA_MIGRATIONS).is_some());
        for (table, _) in SHARDING {
            assert!(
                MIGRATIONS
                    .iter()
                    .flat_map(|(_, _, s)| s.iter())
                    .chain([&SCHEMA_MIGRATIONS])
                    .any(|s| s.starts_with(&format!("CREATE TABLE IF NOT EXISTS {table} "))),
                "{table}: sharded but never created"
            );
        }
    }

    #[test]
    fn tables_become_replicated_local_tables_on_the_cluster() {
        let Some(Step::Execute(sql)) = C.rewrite(SCHEMA_MIGRATIONS) else { panic!("not rewritten") };
        assert_eq!(
            sql,
            "CREATE TABLE IF NOT EXISTS aperture.schema_migrations_local ON CLUSTER fleet (version UInt32, name String, applied DateTime)
         ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/aperture/schema_migrations', '{replica}') ORDER BY version"
        );
        let Some(Step::Execute(sql)) = C.rewrite(MIGRATIONS[0].2[1]) else { panic!("not rewritten") };
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS aperture.stacks_local ON CLUSTER fleet (\n"), "{sql}");
        assert!(
            sql.contains(
                "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/aperture/stacks', '{replica}', inserted)\n"
            ),
            "{sql}"
        );
        assert!(sql.ends_with("ORDER BY hash"), "{sql}");
        let Some(Step::Execute(sql)) = C.rewrite(MIGRATIONS[0].2[0]) else { panic!("not rewritten") };
        assert!(sql.contains("ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/aperture/samples', '{replica}')\n        PARTITION BY toYYYYMMDD(window_start)"), "{sql}");
    }

    #[test]
    fn alters_act_on_the_local_tables_of_every_server() {
        assert_eq!(
            C.rewrite("ALTER TABLE samples MODIFY COLUMN kind Enum8('cpu' = 0)"),
            Some(Step::Execute(
                "ALTER TABLE aperture.samples_local ON CLUSTER fleet MODIFY COLUMN kind Enum8('cpu' = 0)".into()
            ))
        );
        assert_eq!(
            C.rewrite("ADD COLUMN samples.batch_id UInt64 DEFAULT 0"),
            Some(Step::AddColumn { table: "samples_local".into(), column: "batch_id UInt64 DEFAULT 0".into() })
        );
        assert_eq!(
            C.add_column("samples_local", "batch_id UInt64 DEFAULT 0"),
            "ALTER TABLE aperture.samples_local ON CLUSTER fleet ADD COLUMN batch_id UInt64 DEFAULT 0"
        );
        assert_eq!(C.rewrite("DROP TABLE samples"), None);
    }

    #[test]
    fn distributed_tables_front_the_local_ones_by_their_sharding_key() {
        assert_eq!(
            C.create_distributed("samples", "intHash64(batch_id)"),
            "CREATE TABLE IF NOT EXISTS aperture.samples ON CLUSTER fleet AS aperture.samples_local ENGINE = Distributed(fleet, aperture, samples_local, intHash64(batch_id))"
        );
        assert_eq!(C.create_database(), "CREATE DATABASE IF NOT EXISTS aperture ON CLUSTER fleet");
    }

    #[test]
    fn cluster_names_are_identifiers() {
        for ok in ["fleet", "_x", "a1_b"] {
            assert!(is_identifier(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "a'"] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }
}
