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
//! row: a retry after a lost answer first asks which windows of the batch
//! the server already holds and inserts only the others
//! ([`stored_windows`]). That check is exact only once the earlier attempt
//! can no longer commit, so an attempt that times out is not dropped: its
//! connection stays open and its answer is awaited ([`insert_samples`]),
//! and the batch is not sent again until that answer came, or the
//! connection failed, or [`ANSWER_WAIT_LIMIT`] passed. A server frozen
//! with the request in its socket commits it when it resumes, and the
//! answer says so.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clickhouse::insert::Insert;
use clickhouse::{Client, Row, RowWrite};

use super::request_builder::{LedgerRow, SampleRow, StackRow, WindowSpan, ledger_rows, sample_rows, stack_rows};
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

/// Starts an insert into `table` and writes `rows` into it; `None` when
/// there are none. Every send must finish within `timeout`: a body cut
/// short is never committed.
async fn start_insert<T: Row + RowWrite>(
    client: &Client,
    table: &str,
    rows: &[T::Value<'_>],
    timeout: Duration,
) -> Result<Option<Insert<T>>, WriteError> {
    if rows.is_empty() {
        return Ok(None);
    }
    let mut insert = client.insert::<T>(table).await.map_err(classify)?.with_timeouts(Some(timeout), None);
    for row in rows {
        insert.write(row).await.map_err(classify)?;
    }
    Ok(Some(insert))
}

/// Inserts `rows` into a table where inserting them twice is harmless.
async fn insert_all<T: Row + RowWrite + 'static>(
    client: &Client,
    table: &str,
    rows: &[T::Value<'_>],
    timeout: Duration,
) -> Result<(), WriteError> {
    let Some(insert) = start_insert::<T>(client, table, rows, timeout).await? else { return Ok(()) };
    tokio::time::timeout(timeout, insert.end())
        .await
        .map_err(|_| unavailable(format!("no answer to the {table} insert within {timeout:?}")))?
        .map_err(classify)
}

/// Runs the inserts of `batch` not yet done.
pub(crate) async fn write(client: &Client, batch: &WriteBatch, timeout: Duration) -> Result<(), WriteError> {
    if batch.progress.load(Ordering::Acquire) < 1 {
        let rows = stack_rows(batch);
        insert_all::<StackRow<'static>>(client, "stacks", &rows, timeout).await?;
        batch.progress.store(1, Ordering::Release);
    }
    if batch.progress.load(Ordering::Acquire) < 2 {
        let rows = ledger_rows(batch, WindowSpan::of(batch), crate::clock::unix_now_ns());
        insert_all::<LedgerRow>(client, "frame_ledger", &rows, timeout).await?;
        batch.progress.store(2, Ordering::Release);
    }
    if batch.progress.load(Ordering::Acquire) < 3 {
        if earlier_attempt_committed(batch).await? {
            batch.progress.store(3, Ordering::Release);
            return Ok(());
        }
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
        insert_samples(client, batch, &rows, timeout).await?;
        batch.progress.store(3, Ordering::Release);
    }
    Ok(())
}

/// How long a samples insert that timed out is waited for before the
/// writer stops waiting and goes by the batch-id check alone. Longer than
/// Linux takes to give up on a connection whose data is not acknowledged
/// (about 15 minutes with the default `tcp_retries2`), so a connection
/// still alive is given up only when the server holds a request it does
/// not answer.
const ANSWER_WAIT_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Inserts the samples. An answer not back within `timeout` is still
/// awaited, on the same connection, by a task of its own kept in the batch
/// ([`earlier_attempt_committed`] reads it on the next try): a server that
/// was frozen, or slow to commit, commits the rows when it resumes, and
/// only that answer says so exactly.
async fn insert_samples(
    client: &Client,
    batch: &WriteBatch,
    rows: &[SampleRow<'_>],
    timeout: Duration,
) -> Result<(), WriteError> {
    let Some(insert) = start_insert::<SampleRow<'static>>(client, "samples", rows, timeout).await? else {
        return Ok(());
    };
    let sent = Instant::now();
    let mut answer = tokio::spawn(async move { insert.end().await.map_err(classify) });
    match tokio::time::timeout(timeout, &mut answer).await {
        Ok(joined) => joined.unwrap_or_else(|e| Err(unavailable(format!("the samples insert's task ended: {e}")))),
        Err(_) => {
            batch.unanswered.put(sent, answer);
            Err(unavailable(format!(
                "no answer to the samples insert within {timeout:?}; its answer is awaited before the batch is sent again"
            )))
        }
    }
}

/// Whether an earlier samples insert of `batch`, left waiting for its answer
/// by [`insert_samples`], was committed. `Ok(false)` when there was none, or
/// it failed or was given up on: whatever of it was stored is then found by
/// the batch-id check. An error while it still waits.
async fn earlier_attempt_committed(batch: &WriteBatch) -> Result<bool, WriteError> {
    let Some((sent, answer)) = batch.unanswered.take() else { return Ok(false) };
    let waited = sent.elapsed();
    if !answer.is_finished() {
        if waited < ANSWER_WAIT_LIMIT {
            batch.unanswered.put(sent, answer);
            return Err(unavailable(format!(
                "the samples insert sent {}s ago has no answer yet; the batch is sent again only once it has one",
                waited.as_secs()
            )));
        }
        answer.abort();
        tracing::warn!(
            batch_id = batch.batch_id,
            waited_s = waited.as_secs(),
            "gave up waiting for the answer to a samples insert; retrying after checking its batch id"
        );
        return Ok(false);
    }
    match answer.await {
        Ok(Ok(())) => {
            tracing::info!(
                batch_id = batch.batch_id,
                waited_s = waited.as_secs(),
                "a samples insert that timed out was committed"
            );
            Ok(true)
        }
        Ok(Err(e)) => {
            tracing::info!(batch_id = batch.batch_id, error = %e, "a samples insert that timed out failed; retrying after checking its batch id");
            Ok(false)
        }
        Err(e) => {
            tracing::warn!(batch_id = batch.batch_id, error = %e, "the task awaiting a samples insert ended; retrying after checking its batch id");
            Ok(false)
        }
    }
}

fn unavailable(reason: String) -> WriteError {
    WriteError::Unavailable { store: STORE, reason }
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
    rows: &[SampleRow<'_>],
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
        .map_err(|_| unavailable(format!("no answer within {timeout:?} to the check of a retried batch")))?
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
