//! Turning a [`WriteBatch`] into ClickHouse rows. The structs mirror the
//! tables of [`super::schema`] column by column, in order (rows are sent as
//! `RowBinary` without validation, so order and types must match exactly).

use aperture_core::shard::RowKind;
use clickhouse::Row;
use serde::Serialize;

use crate::store::{WriteBatch, WriteError};

/// A row of `samples`.
#[derive(Debug, Row, Serialize)]
pub(crate) struct SampleRow<'a> {
    pub window_start: u32,
    /// `Enum8`: the [`RowKind`] value.
    pub kind: i8,
    pub node: &'a str,
    pub namespace: &'a str,
    pub pod: &'a str,
    pub container: &'a str,
    pub process: &'a str,
    pub pid: u32,
    pub stack_hash: u64,
    pub detail: u32,
    pub name: &'a str,
    pub count: u64,
    pub total_ns: u64,
    pub errors: u64,
    pub max_ns: u64,
    pub histogram: &'a [u64],
    /// [`WriteBatch::batch_id`].
    pub batch_id: u64,
    pub service: &'a str,
    /// Tags, sorted by key, in two parallel arrays.
    pub tag_keys: Vec<&'a str>,
    pub tag_values: Vec<&'a str>,
    pub profile_type: &'a str,
}

/// A row of `stacks`; arrays are leaf first, one element per frame.
#[derive(Debug, Row, Serialize)]
pub(crate) struct StackRow<'a> {
    pub hash: u64,
    pub symbols: Vec<&'a str>,
    pub modules: Vec<&'a str>,
    pub files: Vec<&'a str>,
    pub lines: Vec<u32>,
    pub offsets: Vec<u64>,
    pub addresses: Vec<u64>,
    pub kernel: Vec<u8>,
    pub inserted: u32,
}

/// A row of `frame_ledger`.
#[derive(Debug, Row, Serialize)]
pub(crate) struct LedgerRow {
    pub agent_id: String,
    pub boot_id: String,
    pub watermark: u64,
    pub above: Vec<u64>,
    pub updated: u32,
    pub version: u64,
}

fn datetime(s: u64) -> u32 {
    // `DateTime` is 32-bit unsigned seconds; later times saturate (year 2106).
    u32::try_from(s).unwrap_or(u32::MAX)
}

fn kind_enum(kind: RowKind) -> i8 {
    kind as u8 as i8
}

/// The `samples` rows of a batch.
pub(crate) fn sample_rows(batch: &WriteBatch) -> Result<Vec<SampleRow<'_>>, WriteError> {
    let mut out = Vec::with_capacity(batch.row_count());
    for flush in &batch.flushes {
        for (key, value) in &flush.rows {
            let labels = flush.labels.get(key.labels as usize).ok_or_else(|| WriteError::Rejected {
                store: "clickhouse",
                reason: format!("row refers to label set {} of {}", key.labels, flush.labels.len()),
            })?;
            out.push(SampleRow {
                window_start: datetime(key.window_start_s),
                kind: kind_enum(key.kind),
                node: &labels.node,
                namespace: &labels.namespace,
                pod: &labels.pod,
                container: &labels.container,
                process: &labels.process,
                pid: labels.pid,
                stack_hash: key.stack.0,
                detail: key.detail,
                name: &value.name,
                count: value.count,
                total_ns: value.total_ns,
                errors: value.errors,
                max_ns: value.max_ns,
                histogram: &value.histogram,
                batch_id: batch.batch_id,
                service: &labels.service,
                tag_keys: labels.tags.iter().map(|(k, _)| k.as_str()).collect(),
                tag_values: labels.tags.iter().map(|(_, v)| v.as_str()).collect(),
                profile_type: &labels.profile_type,
            });
        }
    }
    Ok(out)
}

/// The `stacks` rows of a batch.
pub(crate) fn stack_rows(batch: &WriteBatch) -> Vec<StackRow<'_>> {
    batch
        .flushes
        .iter()
        .flat_map(|f| &f.stacks)
        .map(|s| StackRow {
            hash: s.hash.0,
            symbols: s.frames.iter().map(|f| f.symbol.as_str()).collect(),
            modules: s.frames.iter().map(|f| f.module.as_str()).collect(),
            files: s.frames.iter().map(|f| f.file.as_str()).collect(),
            lines: s.frames.iter().map(|f| f.line).collect(),
            offsets: s.frames.iter().map(|f| f.module_offset).collect(),
            addresses: s.frames.iter().map(|f| f.address).collect(),
            kernel: s.frames.iter().map(|f| u8::from(f.kernel)).collect(),
            inserted: datetime(batch.now_s),
        })
        .collect()
}

/// The `frame_ledger` rows of a batch. `version` orders the states of one
/// run: the latest write wins when ReplacingMergeTree merges, and readers
/// take `argMax(..., version)` in the meantime.
pub(crate) fn ledger_rows(batch: &WriteBatch, version: u64) -> Vec<LedgerRow> {
    batch
        .runs
        .iter()
        .map(|((agent, boot), state)| LedgerRow {
            agent_id: agent.to_hex(),
            boot_id: boot.to_hex(),
            watermark: state.watermark,
            above: state.above.iter().copied().collect(),
            updated: datetime(batch.now_s),
            version,
        })
        .collect()
}
