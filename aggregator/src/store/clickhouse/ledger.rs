//! The committed state of agent runs, read from `frame_ledger`: at start for
//! every recent run, and when an aggregator meets runs it has not served
//! lately (with several replicas on one database, the store is the shared
//! record of what is committed).
//!
//! A batch's ledger rows are written before its samples (see
//! [`super::service`]), each with the batch id, the run's state without the
//! batch (`watermark`, `above`) and with it committed (`batch_watermark`,
//! `batch_above`). For the latest row of each run the reader asks whether
//! every window of that batch has samples stored under its id, and takes
//! the one state or the other. A window's rows lie in one partition and are
//! committed all or nothing, so "every window stored" is "the batch is
//! committed". Rows from before that column existed (`batch_id` 0) hold the
//! committed state alone. An older aggregator reads `watermark` only, the
//! state without the batch: during a rolling upgrade it may take a batch's
//! frames again (a duplicate), never skip frames that are not stored.
//!
//! A writer that dies with its samples insert sent leaves that insert to
//! ClickHouse, which may commit it a moment after another reader looked.
//! So a batch whose samples are not all there is taken as not committed
//! only once its ledger row is [`IN_FLIGHT_S`] old; a younger one is looked
//! at again when that much time has passed (the reader waits; the frames of
//! the run stay parked meanwhile).

use std::collections::BTreeMap;

use aperture_core::ids::{AgentId, BootId};
use aperture_core::ledger::{RunKey, RunState};
use clickhouse::{Client, Row};
use serde::Deserialize;

use super::queries::query_err;
use crate::clock::unix_now_s;
use crate::store::{QueryError, UndecodableCounts};

const STORE: &str = "clickhouse";

/// Batches checked per samples query.
const CHECK_CHUNK: usize = 100;

/// Seconds after its ledger row within which a batch's samples insert may
/// still land, although its writer is gone.
const IN_FLIGHT_S: u32 = 5;

/// The latest ledger row of a run.
#[derive(Clone, Row, Deserialize)]
struct LatestRow {
    agent_id: String,
    boot_id: String,
    watermark: u64,
    above: Vec<u64>,
    batch_id: u64,
    batch_watermark: u64,
    batch_above: Vec<u64>,
    first_window: u32,
    last_window: u32,
    windows: u32,
    /// When the row was written (Unix seconds, the writer's clock).
    updated: u32,
}

/// The latest committed state of those of `keys` that have one stored.
pub(crate) async fn runs(
    client: &Client,
    keys: &[RunKey],
    undecodable: &UndecodableCounts,
) -> Result<Vec<(RunKey, RunState)>, QueryError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // Hex digits only: safe to format into the statement.
    let tuples: Vec<String> = keys.iter().map(|(a, b)| format!("('{a}', '{b}')")).collect();
    load(client, &format!("(agent_id, boot_id) IN ({})", tuples.join(", ")), undecodable).await
}

/// The latest committed state of every run whose ledger was written at or
/// after `since_s` (Unix seconds).
pub(crate) async fn since(
    client: &Client,
    since_s: u64,
    undecodable: &UndecodableCounts,
) -> Result<Vec<(RunKey, RunState)>, QueryError> {
    load(client, &format!("updated >= toDateTime({})", since_s.min(u64::from(u32::MAX))), undecodable).await
}

async fn load(
    client: &Client,
    filter: &str,
    undecodable: &UndecodableCounts,
) -> Result<Vec<(RunKey, RunState)>, QueryError> {
    let sql = format!(
        "SELECT agent_id, boot_id, argMax(watermark, version), argMax(above, version), argMax(batch_id, version),
                argMax(batch_watermark, version), argMax(batch_above, version), argMax(first_window, version),
                argMax(last_window, version), argMax(windows, version), toUInt32(argMax(updated, version))
         FROM frame_ledger WHERE {filter} GROUP BY agent_id, boot_id"
    );
    let rows = client.query(&sql).fetch_all::<LatestRow>().await.map_err(query_err)?;
    let mut committed = committed_batches(client, &rows).await?;
    let now = u32::try_from(unix_now_s()).unwrap_or(u32::MAX);
    let unsettled: Vec<LatestRow> = rows
        .iter()
        .filter(|r| committed.get(&r.batch_id) == Some(&false) && r.updated.saturating_add(IN_FLIGHT_S) > now)
        .cloned()
        .collect();
    if let Some(newest) = unsettled.iter().map(|r| r.updated).max() {
        let wait = newest.saturating_add(IN_FLIGHT_S).saturating_sub(now).min(IN_FLIGHT_S);
        tracing::debug!(
            batches = unsettled.len(),
            wait_s = wait,
            "recent batches without all their samples; looking again"
        );
        tokio::time::sleep(std::time::Duration::from_secs(u64::from(wait))).await;
        committed.extend(committed_batches(client, &unsettled).await?);
    }
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let ids = (r.agent_id.parse::<AgentId>(), r.boot_id.parse::<BootId>());
            let (Ok(agent), Ok(boot)) = ids else {
                undecodable.ledger_row(STORE, &r.agent_id, &r.boot_id, "agent or boot id is not 32 hex digits");
                return None;
            };
            let state = if r.batch_id == 0 {
                RunState { watermark: r.watermark, above: r.above.into_iter().collect() }
            } else if r.windows == 0 || committed.get(&r.batch_id).copied().unwrap_or(false) {
                RunState { watermark: r.batch_watermark, above: r.batch_above.into_iter().collect() }
            } else {
                RunState { watermark: r.watermark, above: r.above.into_iter().collect() }
            };
            Some(((agent, boot), state))
        })
        .collect())
}

/// For each batch named by `rows` (with samples to store), whether all of
/// its windows have samples stored under its id. One query per
/// [`CHECK_CHUNK`] batches, each bounded by the batch's windows so that it
/// reads only the partitions and key ranges the batch wrote.
async fn committed_batches(client: &Client, rows: &[LatestRow]) -> Result<BTreeMap<u64, bool>, QueryError> {
    let mut spans: BTreeMap<u64, (u32, u32, u32)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.batch_id != 0 && r.windows != 0) {
        spans.insert(r.batch_id, (r.first_window, r.last_window, r.windows));
    }
    let mut out = BTreeMap::new();
    let spans: Vec<_> = spans.into_iter().collect();
    for chunk in spans.chunks(CHECK_CHUNK) {
        let conditions: Vec<String> = chunk
            .iter()
            .map(|(id, (first, last, _))| {
                format!(
                    "(batch_id = {id} AND window_start >= toDateTime({first}) AND window_start <= toDateTime({last}))"
                )
            })
            .collect();
        let sql = format!(
            "SELECT batch_id, toUInt64(uniqExact(window_start)) FROM samples WHERE {} GROUP BY batch_id",
            conditions.join(" OR ")
        );
        let stored: BTreeMap<u64, u64> =
            client.query(&sql).fetch_all::<(u64, u64)>().await.map_err(query_err)?.into_iter().collect();
        for (id, (_, _, windows)) in chunk {
            out.insert(*id, stored.get(id).copied().unwrap_or(0) >= u64::from(*windows));
        }
    }
    Ok(out)
}
