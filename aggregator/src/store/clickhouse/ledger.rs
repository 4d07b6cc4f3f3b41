//! The committed state of one agent run, read when an aggregator meets a
//! run it has not served lately: with several replicas on one database, the
//! store is the shared record of what is committed.

use aperture_core::ledger::{RunKey, RunState};
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::queries::query_err;
use crate::store::{QueryError, id_hex};

#[derive(Row, Deserialize)]
struct RunRow {
    watermark: u64,
    above: Vec<u64>,
}

/// The latest committed state of `key`, if any was stored.
pub(crate) async fn run(client: &Client, key: RunKey) -> Result<Option<RunState>, QueryError> {
    let rows = client
        .query(
            "SELECT argMax(watermark, version), argMax(above, version) FROM frame_ledger
             WHERE agent_id = ? AND boot_id = ? GROUP BY agent_id, boot_id",
        )
        .bind(id_hex(&key.0))
        .bind(id_hex(&key.1))
        .fetch_all::<RunRow>()
        .await
        .map_err(query_err)?;
    Ok(rows.into_iter().next().map(|r| RunState { watermark: r.watermark, above: r.above.into_iter().collect() }))
}
