//! The ClickHouse store, split by concern:
//! - [`config`]: endpoint checks and client construction;
//! - [`schema`]: versioned, idempotent migrations;
//! - [`rebuild`]: the migration that moved `samples` to a summing engine,
//!   and [`backfill`], which copies the older rows over in the background;
//! - [`cluster`]: the same schema on a ClickHouse cluster (replicated local
//!   tables behind `Distributed` ones) when `clickhouse.cluster` is set;
//! - [`request_builder`]: rows of each table, built from a write batch;
//! - [`service`]: the staged insert and failure classification (retry or reject);
//! - [`ledger`]: the committed state of agent runs, as the store records it;
//! - [`queries`]: the reads behind the API, and retention.
//!
//! Integration tests against real servers: `tests/replicas.rs`,
//! `tests/clickhouse_retries.rs`, `tests/resilience.rs`,
//! `tests/clickhouse_summing.rs` (the summing table and the upgrade to it)
//! and, on a cluster of two shards, `tests/clickhouse_cluster.rs`.

mod backfill;
mod cluster;
mod config;
mod ledger;
mod queries;
mod rebuild;
mod request_builder;
pub(crate) mod schema;
mod service;
mod system;

use std::time::Duration;

use aperture_core::ledger::{RunKey, RunState};
use aperture_core::model::{Mode, Stack, StackHash};
use aperture_core::shard::RowKind;
use clickhouse::Client;

use super::{
    LabelName, LockTotal, OpenError, QueryError, RetentionReport, Selector, StackTotal, Store, StoreFuture, StoreKind,
    SyscallTotal, Undecodable, UndecodableCounts, WriteBatch, WriteError,
};
use crate::settings::ClickHouseSettings;

/// The ClickHouse store.
#[derive(Clone)]
pub struct ClickHouseStore {
    client: Client,
    /// The client for API reads: queries stop at `max_execution_time`.
    reads: Client,
    database: String,
    /// `clickhouse.cluster`; `None`: one server.
    cluster: Option<String>,
    timeout: Duration,
    undecodable: std::sync::Arc<UndecodableCounts>,
}

impl std::fmt::Debug for ClickHouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseStore").field("database", &self.database).finish_non_exhaustive()
    }
}

impl ClickHouseStore {
    /// Connects, creates the database if needed and applies migrations.
    pub async fn open(settings: &ClickHouseSettings) -> Result<ClickHouseStore, OpenError> {
        let (admin, client) = config::clients(settings)?;
        schema::migrate(&admin, &client, &settings.database, settings.cluster.as_deref()).await?;
        let old_rows =
            backfill::pending(&client, &settings.database, settings.cluster.as_deref()).await.map_err(|e| {
                OpenError::Migration {
                    store: "clickhouse",
                    version: 5,
                    name: "old samples tables",
                    reason: e.to_string(),
                }
            })?;
        if old_rows {
            backfill::spawn(client.clone(), settings.database.clone(), settings.cluster.clone());
        }
        let reads = queries::read_client(&client, settings.max_query_time);
        Ok(ClickHouseStore {
            client,
            reads,
            database: settings.database.clone(),
            cluster: settings.cluster.clone(),
            timeout: settings.request_timeout,
            undecodable: Default::default(),
        })
    }
}

impl Store for ClickHouseStore {
    fn kind(&self) -> StoreKind {
        StoreKind::ClickHouse
    }

    fn write<'a>(&'a self, batch: &'a WriteBatch) -> StoreFuture<'a, Result<(), WriteError>> {
        Box::pin(service::write(&self.client, batch, self.timeout))
    }

    fn load_ledger(&self, since_s: u64) -> StoreFuture<'_, Result<Vec<(RunKey, RunState)>, QueryError>> {
        Box::pin(ledger::since(&self.client, since_s, &self.undecodable))
    }

    fn load_runs<'a>(&'a self, keys: &'a [RunKey]) -> StoreFuture<'a, Result<Vec<(RunKey, RunState)>, QueryError>> {
        Box::pin(ledger::runs(&self.client, keys, &self.undecodable))
    }

    fn ping(&self) -> StoreFuture<'_, Result<(), QueryError>> {
        Box::pin(async move {
            self.client.query("SELECT 1").fetch_one::<u8>().await.map(|_| ()).map_err(queries::query_err)
        })
    }

    fn stack_totals<'a>(
        &'a self,
        kind: RowKind,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<StackTotal>, QueryError>> {
        Box::pin(queries::stack_totals(&self.reads, kind, sel))
    }

    fn stacks<'a>(&'a self, hashes: &'a [StackHash]) -> StoreFuture<'a, Result<Vec<Stack>, QueryError>> {
        Box::pin(queries::stacks(&self.reads, hashes, &self.undecodable))
    }

    fn syscall_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<SyscallTotal>, QueryError>> {
        Box::pin(queries::syscall_totals(&self.reads, sel))
    }

    fn lock_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<LockTotal>, QueryError>> {
        Box::pin(queries::lock_totals(&self.reads, sel))
    }

    fn label_values<'a>(
        &'a self,
        label: LabelName,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        Box::pin(queries::label_values(&self.reads, label, mode, sel))
    }

    fn tag_values<'a>(
        &'a self,
        key: &'a str,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        Box::pin(queries::tag_values(&self.reads, key, mode, sel))
    }

    fn tag_keys<'a>(
        &'a self,
        mode: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        Box::pin(queries::tag_keys(&self.reads, mode, sel))
    }

    fn undecodable(&self) -> Undecodable {
        self.undecodable.snapshot()
    }

    fn apply_retention(&self, cutoff_s: u64) -> StoreFuture<'_, Result<RetentionReport, QueryError>> {
        Box::pin(async move {
            let removed = queries::retention(&self.client, &self.database, self.cluster.as_deref(), cutoff_s).await?;
            Ok(RetentionReport { removed })
        })
    }
}
