//! Turning a [`WriteBatch`] into ClickHouse rows. The structs mirror the
//! tables of [`super::schema`] column by column, in order (rows are sent as
//! `RowBinary` without validation, so order and types must match exactly).

use std::collections::HashMap;

use aperture_core::model::Labels;
use aperture_core::shard::{RowKind, RowValue};
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
    pub histogram: std::borrow::Cow<'a, [u64]>,
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

/// A row of `frame_ledger`: the state of a run if batch `batch_id` is not
/// committed (`watermark`, `above`: what an older aggregator reads, so that
/// it may take frames twice but never skip one) and if it is (`batch_*`);
/// which one holds is told by the samples stored under `batch_id` (see
/// [`super::ledger`]).
#[derive(Debug, Row, Serialize)]
pub(crate) struct LedgerRow {
    pub agent_id: String,
    pub boot_id: String,
    pub watermark: u64,
    pub above: Vec<u64>,
    pub updated: u32,
    pub version: u64,
    /// [`WriteBatch::batch_id`]; 0 in rows written before it was stored.
    pub batch_id: u64,
    pub batch_watermark: u64,
    pub batch_above: Vec<u64>,
    /// The batch's first and last `window_start` (Unix seconds): bounds the
    /// look-up of its samples.
    pub first_window: u32,
    pub last_window: u32,
    /// Distinct windows of the batch's samples: all stored means committed.
    pub windows: u32,
}

/// The windows a batch's samples cover: first, last, how many distinct.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowSpan {
    pub first: u32,
    pub last: u32,
    pub count: u32,
}

impl WindowSpan {
    /// The span of the samples of `batch`; all zero without rows.
    pub(crate) fn of(batch: &WriteBatch) -> WindowSpan {
        let windows: std::collections::BTreeSet<u32> =
            batch.flushes.iter().flat_map(|f| &f.rows).map(|(key, _)| datetime(key.window_start_s)).collect();
        WindowSpan {
            first: windows.first().copied().unwrap_or(0),
            last: windows.last().copied().unwrap_or(0),
            count: u32::try_from(windows.len()).unwrap_or(u32::MAX),
        }
    }
}

fn datetime(s: u64) -> u32 {
    // `DateTime` is 32-bit unsigned seconds; later times saturate (year 2106).
    u32::try_from(s).unwrap_or(u32::MAX)
}

fn kind_enum(kind: RowKind) -> i8 {
    kind as u8 as i8
}

/// `kind` of a batch's marker rows (`'batch'` in the `Enum8`): store
/// bookkeeping, never a profile row. Read by no query of the API.
pub(crate) const BATCH_MARKER_KIND: &str = "batch";
const BATCH_MARKER_ENUM: i8 = 5;

/// The `samples` rows of a batch, then one marker row per window they
/// cover.
///
/// `samples` sums the rows of one key (`SummingMergeTree`), so after a
/// merge a row keeps the `batch_id` of just one of the batches it sums.
/// The marker of batch B in window W is a row of its own key
/// (`kind = 'batch'`, `stack_hash` = B), inserted with B's rows and never
/// merged with another: "rows tagged B are stored in W" stays exactly
/// "B's insert was committed in W", which the retry and ledger checks ask.
/// `count` is 1 because the engine drops rows whose summed columns are all
/// zero.
///
/// Lock, syscall and slow-call rows of one key from several flushes of the
/// batch are merged here: the engine keeps their rows of different batches
/// apart, but would take `max_ns` and `histogram` of rows of one key and
/// batch from one row.
pub(crate) fn sample_rows(batch: &WriteBatch) -> Result<Vec<SampleRow<'_>>, WriteError> {
    let mut out: Vec<SampleRow<'_>> = Vec::with_capacity(batch.row_count() + 2);
    let mut seen: HashMap<(u64, RowKind, &Labels, u64, u32, &str), usize> = HashMap::new();
    for flush in &batch.flushes {
        for (key, value) in &flush.rows {
            let labels = flush.labels.get(key.labels as usize).ok_or_else(|| WriteError::Rejected {
                store: "clickhouse",
                reason: format!("row refers to label set {} of {}", key.labels, flush.labels.len()),
            })?;
            if !matches!(key.kind, RowKind::Cpu | RowKind::Profile) {
                // CPU and profile rows the engine sums as they should be.
                let id = (key.window_start_s, key.kind, labels, key.stack.0, key.detail, value.name.as_str());
                if let Some(&i) = seen.get(&id) {
                    merge_into(&mut out[i], value);
                    continue;
                }
                seen.insert(id, out.len());
            }
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
                histogram: std::borrow::Cow::Borrowed(&value.histogram),
                batch_id: batch.batch_id,
                service: &labels.service,
                tag_keys: labels.tags.iter().map(|(k, _)| k.as_str()).collect(),
                tag_values: labels.tags.iter().map(|(_, v)| v.as_str()).collect(),
                profile_type: &labels.profile_type,
            });
        }
    }
    if batch.batch_id != 0 {
        let windows: std::collections::BTreeSet<u32> = out.iter().map(|r| r.window_start).collect();
        out.extend(windows.into_iter().map(|window_start| batch_marker(window_start, batch.batch_id)));
    }
    Ok(out)
}

/// Adds `value` to `row`, as the shards merge rows of one key.
fn merge_into(row: &mut SampleRow<'_>, value: &RowValue) {
    row.count = row.count.saturating_add(value.count);
    row.total_ns = row.total_ns.saturating_add(value.total_ns);
    row.errors = row.errors.saturating_add(value.errors);
    row.max_ns = row.max_ns.max(value.max_ns);
    if !value.histogram.is_empty() {
        let histogram = row.histogram.to_mut();
        if histogram.len() < value.histogram.len() {
            histogram.resize(value.histogram.len(), 0);
        }
        for (acc, v) in histogram.iter_mut().zip(&value.histogram) {
            *acc = acc.saturating_add(*v);
        }
    }
}

fn batch_marker(window_start: u32, batch_id: u64) -> SampleRow<'static> {
    SampleRow {
        window_start,
        kind: BATCH_MARKER_ENUM,
        node: "",
        namespace: "",
        pod: "",
        container: "",
        process: "",
        pid: 0,
        stack_hash: batch_id,
        detail: 0,
        name: "",
        count: 1,
        total_ns: 0,
        errors: 0,
        max_ns: 0,
        histogram: std::borrow::Cow::Borrowed(&[]),
        batch_id,
        service: "",
        tag_keys: Vec::new(),
        tag_values: Vec::new(),
        profile_type: "",
    }
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

/// The `frame_ledger` rows of a batch whose samples cover `span`.
/// `version` orders the states of one run: the latest write wins when
/// ReplacingMergeTree merges, and readers take `argMax(..., version)` in
/// the meantime. Each row holds the state before the batch too, so the
/// latest row alone tells the committed state whether or not the batch's
/// samples made it.
pub(crate) fn ledger_rows(batch: &WriteBatch, span: WindowSpan, version: u64) -> Vec<LedgerRow> {
    batch
        .runs
        .iter()
        .map(|(key, state)| {
            let before = batch.runs_before.iter().find(|(k, _)| k == key).map(|(_, s)| s);
            LedgerRow {
                agent_id: key.0.to_hex(),
                boot_id: key.1.to_hex(),
                watermark: before.map_or(0, |s| s.watermark),
                above: before.map(|s| s.above.iter().copied().collect()).unwrap_or_default(),
                updated: datetime(batch.now_s),
                version,
                batch_id: batch.batch_id,
                batch_watermark: state.watermark,
                batch_above: state.above.iter().copied().collect(),
                first_window: span.first,
                last_window: span.last,
                windows: span.count,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use aperture_core::ids::{AgentId, BootId};
    use aperture_core::ledger::RunState;
    use aperture_core::model::{Labels, StackHash};
    use aperture_core::shard::{Flush, RowKey, RowValue};

    use super::*;

    fn row(window_start_s: u64) -> (RowKey, RowValue) {
        let key = RowKey { window_start_s, kind: RowKind::Cpu, labels: 0, stack: StackHash(1), detail: 0 };
        (key, RowValue::default())
    }

    #[test]
    fn ledger_rows_carry_the_batch_its_windows_and_the_state_before_it() {
        let flush = |rows| Flush { labels: vec![Labels::default()], rows, ..Flush::default() };
        let (r1, r2) = ((AgentId([1; 16]), BootId([1; 16])), (AgentId([2; 16]), BootId([2; 16])));
        let state = |watermark, above: &[u64]| RunState { watermark, above: above.iter().copied().collect() };
        let batch = WriteBatch {
            flushes: vec![flush(vec![row(100), row(110)]), flush(vec![row(100), row(90)])],
            runs: vec![(r1, state(7, &[9])), (r2, state(3, &[]))],
            runs_before: vec![(r1, state(4, &[9]))],
            batch_id: 0x51,
            ..WriteBatch::default()
        };
        let span = WindowSpan::of(&batch);
        assert_eq!(span, WindowSpan { first: 90, last: 110, count: 3 });
        let rows = ledger_rows(&batch, span, 5);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].batch_id, rows[0].batch_watermark, rows[0].batch_above.as_slice()), (0x51, 7, &[9][..]));
        assert_eq!((rows[0].watermark, rows[0].above.as_slice()), (4, &[9][..]));
        assert_eq!((rows[1].watermark, rows[1].above.len()), (0, 0), "r2 had nothing committed");
        assert_eq!((rows[1].first_window, rows[1].last_window, rows[1].windows), (90, 110, 3));
        assert_eq!(WindowSpan::of(&WriteBatch::default()), WindowSpan::default());
    }
}
