//! Executing a write against ClickHouse and deciding what a failure means.
//!
//! A batch is three inserts: stacks, then ledger state, then samples.
//! ClickHouse has no transaction across them, so progress is recorded in
//! [`WriteBatch::progress`] and a retry of the same batch resumes after the
//! last insert that succeeded. Stacks go first so that rows never reference
//! a stack that is missing; re-inserting a stack is harmless
//! (ReplacingMergeTree keeps one per hash).
//!
//! The ledger rows go before the samples and carry the batch id, the state
//! of each run with the batch committed and without it, and the windows the
//! batch's samples cover. A reader takes one or the other by looking for
//! those samples ([`super::ledger`]), so whenever the process dies, the
//! ledger in the store says "committed" exactly for frames whose samples are
//! stored: frames resent to a restarted aggregator or to another replica are
//! neither counted twice nor lost. (Except a batch spanning two days, which
//! is committed in two parts, and a look-up made while the server is still
//! committing an insert whose client died: see `docs/storage.md`.) The
//! ledger insert is idempotent by itself (ReplacingMergeTree, latest
//! version wins).
//!
//! The samples insert is made idempotent by the batch id stored with each
//! row: a retry after a timeout or a lost answer first asks which windows of
//! the batch the server already holds and inserts only the others
//! ([`stored_windows`]).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clickhouse::{Client, Row, RowWrite};

use super::request_builder::{WindowSpan, ledger_rows, sample_rows, stack_rows};
use crate::store::{WriteBatch, WriteError};

const STORE: &str = "clickhouse";

/// Server error codes that mean the rows themselves cannot be inserted
/// (values that do not parse or convert, out of range, too large). Anything
/// else (network, timeouts, a body cut short — 32 "attempt to read after
/// EOF" and 33 "cannot read all data" —, memory limits, too many parts,
/// missing tables) is the store failing: retried, never acknowledged.
const DATA_ERROR_CODES: &[u32] = &[6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 128, 131];

/// Classifies a client error.
pub(crate) fn classify(e: clickhouse::error::Error) -> WriteError {
    use clickhouse::error::Error as E;
    let reason = e.to_string();
    let rejected = match &e {
        E::BadResponse(text) => server_code(text).is_some_and(|c| DATA_ERROR_CODES.contains(&c)),
        E::DataFormat(_) | E::Custom(_) | E::SequenceMustHaveLength | E::InvalidUtf8Encoding(_) => true,
        _ => false,
    };
    if rejected {
        WriteError::Rejected { store: STORE, reason }
    } else {
        WriteError::Unavailable { store: STORE, reason }
    }
}

/// Extracts `N` from a ClickHouse error text `Code: N, ...`.
pub(crate) fn server_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

async fn insert_all<T: Row + RowWrite>(
    client: &Client,
    table: &str,
    rows: &[T::Value<'_>],
    timeout: Duration,
) -> Result<(), WriteError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<T>(table).await.map_err(classify)?.with_timeouts(Some(timeout), Some(timeout));
    for row in rows {
        insert.write(row).await.map_err(classify)?;
    }
    insert.end().await.map_err(classify)
}

/// Runs the inserts of `batch` not yet done.
pub(crate) async fn write(client: &Client, batch: &WriteBatch, timeout: Duration) -> Result<(), WriteError> {
    if batch.progress.load(Ordering::Acquire) < 1 {
        let rows = stack_rows(batch);
        insert_all::<super::request_builder::StackRow<'static>>(client, "stacks", &rows, timeout).await?;
        batch.progress.store(1, Ordering::Release);
    }
    if batch.progress.load(Ordering::Acquire) < 2 {
        let rows = ledger_rows(batch, WindowSpan::of(batch), crate::clock::unix_now_ns());
        insert_all::<super::request_builder::LedgerRow>(client, "frame_ledger", &rows, timeout).await?;
        batch.progress.store(2, Ordering::Release);
    }
    if batch.progress.load(Ordering::Acquire) < 3 {
        let mut rows = sample_rows(batch)?;
        if batch.batch_id != 0 && batch.rows_sent.load(Ordering::Acquire) {
            // An earlier attempt may have been committed without its answer
            // reaching us: skip what is already stored under this batch id.
            let stored = stored_windows(client, batch.batch_id, &rows, timeout).await?;
            if !stored.is_empty() {
                tracing::info!(
                    batch_id = batch.batch_id,
                    windows = stored.len(),
                    "part of a retried batch was already committed; not inserting it again"
                );
            }
            rows.retain(|r| !stored.contains(&r.window_start));
        }
        batch.rows_sent.store(true, Ordering::Release);
        insert_all::<super::request_builder::SampleRow<'static>>(client, "samples", &rows, timeout).await?;
        batch.progress.store(3, Ordering::Release);
    }
    Ok(())
}

/// The windows of `rows` for which rows tagged `batch_id` are stored.
///
/// An insert is committed part by part, one part per partition (day), each
/// part all or nothing; every row of one window lies in one partition. So a
/// window with any row of the batch stored has all of them stored, and a
/// window with none has none: filtering by window is exact.
async fn stored_windows(
    client: &Client,
    batch_id: u64,
    rows: &[super::request_builder::SampleRow<'_>],
    timeout: Duration,
) -> Result<HashSet<u32>, WriteError> {
    let (Some(from), Some(to)) = (rows.iter().map(|r| r.window_start).min(), rows.iter().map(|r| r.window_start).max())
    else {
        return Ok(HashSet::new());
    };
    let sql = format!(
        "SELECT DISTINCT toUInt32(window_start) FROM samples
         WHERE window_start >= toDateTime({from}) AND window_start <= toDateTime({to}) AND batch_id = {batch_id}"
    );
    let windows = tokio::time::timeout(timeout, client.query(&sql).fetch_all::<u32>())
        .await
        .map_err(|_| WriteError::Unavailable {
            store: STORE,
            reason: format!("no answer within {timeout:?} to the check of a retried batch"),
        })?
        .map_err(classify)?;
    Ok(windows.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_are_read_from_error_text() {
        assert_eq!(server_code("bad response: Code: 27, e.displayText() = DB::Exception: Cannot parse"), Some(27));
        assert_eq!(server_code("Code: 241. DB::Exception: Memory limit"), Some(241));
        assert_eq!(server_code("connection refused"), None);
    }

    #[test]
    fn parse_errors_are_rejected_and_overload_is_retried() {
        let bad = classify(clickhouse::error::Error::BadResponse("Code: 27, Cannot parse input".into()));
        assert!(!bad.is_retryable());
        let busy = classify(clickhouse::error::Error::BadResponse("Code: 252, Too many parts".into()));
        assert!(busy.is_retryable());
        assert!(classify(clickhouse::error::Error::TimedOut).is_retryable());
    }

    #[test]
    fn a_body_cut_short_is_retried_not_rejected() {
        for text in [
            "Code: 32, e.displayText() = DB::Exception: Attempt to read after eof",
            "Code: 33, e.displayText() = DB::Exception: Cannot read all data",
        ] {
            assert!(classify(clickhouse::error::Error::BadResponse(text.into())).is_retryable(), "{text}");
        }
    }
}
