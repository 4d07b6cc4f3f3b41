//! The committed state of given agent runs, read when an aggregator meets
//! runs it has not served lately: with several replicas on one database,
//! the store is the shared record of what is committed.

use aperture_core::ids::{AgentId, BootId};
use aperture_core::ledger::{RunKey, RunState};
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::queries::query_err;
use crate::store::QueryError;

#[derive(Row, Deserialize)]
struct RunRow {
    agent_id: String,
    boot_id: String,
    watermark: u64,
    above: Vec<u64>,
}

/// The latest committed state of those of `keys` that have one stored.
pub(crate) async fn runs(client: &Client, keys: &[RunKey]) -> Result<Vec<(RunKey, RunState)>, QueryError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Hex digits only: safe to format into the statement.
    let tuples: Vec<String> = keys.iter().map(|(a, b)| format!("('{a}', '{b}')")).collect();
    let sql = format!(
        "SELECT agent_id, boot_id, argMax(watermark, version), argMax(above, version) FROM frame_ledger
         WHERE (agent_id, boot_id) IN ({}) GROUP BY agent_id, boot_id",
        tuples.join(", ")
    );
    let rows = client.query(&sql).fetch_all::<RunRow>().await.map_err(query_err)?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let key = (r.agent_id.parse::<AgentId>().ok()?, r.boot_id.parse::<BootId>().ok()?);
            Some((key, RunState { watermark: r.watermark, above: r.above.into_iter().collect() }))
        })
        .collect())
}
