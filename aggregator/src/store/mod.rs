//! Storage: one [`Store`] trait, two implementations.
//!
//! - [`sqlite::SqliteStore`]: the embedded default, `<data_dir>/aperture.db`.
//! - [`clickhouse::ClickHouseStore`]: production, when a ClickHouse endpoint is set.
//!
//! Both store the same three things: aggregated rows (one per window, kind,
//! label set, stack and detail, see [`aperture_core::shard::RowKey`]), stacks
//! (once per [`StackHash`]) and the committed state of the frame ledger, so a
//! restart knows which frames it has already stored. The query side of the
//! trait returns small, store-independent aggregates; everything the HTTP API
//! derives from them (flame graphs, top functions, diffs, quantiles) is
//! computed once, in [`crate::query`], so both stores give the same answers.
//! The schemas are documented in `docs/storage.md`.

pub mod clickhouse;
pub mod sqlite;

use std::future::Future;
use std::pin::Pin;

use aperture_core::ledger::{RunKey, RunState};
use aperture_core::model::{LockKind, Mode, Stack, StackHash};
use aperture_core::shard::{Flush, RowKind};

/// A boxed future borrowing the store: what every [`Store`] method returns,
/// so the trait stays object-safe (`Arc<dyn Store>`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which implementation is behind a [`Store`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The embedded SQLite store.
    Sqlite,
    /// ClickHouse.
    ClickHouse,
}

impl StoreKind {
    /// Name used in `/api/health` and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::ClickHouse => "clickhouse",
        }
    }
}

/// What the writer commits in one go: the rows of one or more shard flushes
/// and the ledger state of every agent run that contributed to them
/// (already including the frames of these flushes).
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Flushes, written in order.
    pub flushes: Vec<Flush>,
    /// Committed state of each run touched by the flushes, after this batch.
    pub runs: Vec<(RunKey, RunState)>,
    /// Committed state of the same runs before this batch, in the same
    /// order, for stores that record a batch's ledger state before its rows
    /// (ClickHouse): a reader finding the rows absent falls back to it. A
    /// run missing here had nothing committed.
    pub runs_before: Vec<(RunKey, RunState)>,
    /// Commit time, Unix seconds (stored with ledger rows for retention).
    pub now_s: u64,
    /// Steps of a multi-step write already done, for stores that cannot
    /// commit a batch atomically (ClickHouse): a retry of the same batch
    /// skips them. Zero for a fresh batch.
    pub progress: std::sync::atomic::AtomicU8,
    /// Identifies the batch in stores whose inserts may commit without the
    /// writer learning it (ClickHouse: a timeout or a lost response after
    /// the server committed). Stored with the rows; a retry first looks for
    /// rows already stored under it. 0: no id, retries are plain re-inserts.
    pub batch_id: u64,
    /// Set once a rows insert of this batch may have reached the store, so
    /// a retry checks [`WriteBatch::batch_id`] before inserting again.
    pub rows_sent: std::sync::atomic::AtomicBool,
    /// A rows insert of this batch that timed out and still waits for its
    /// answer (ClickHouse): a retry waits for that answer instead of
    /// sending the rows again beside it.
    pub unanswered: Unanswered,
}

/// A rows insert whose attempt timed out before the store answered, kept
/// open and awaited. Its answer is the only exact word on whether it was
/// committed: a store that was frozen or slow commits it when it resumes,
/// so sending the rows again meanwhile, even after a check that found none
/// of them, could store them twice.
#[derive(Debug, Default)]
pub struct Unanswered(std::sync::Mutex<Option<Pending>>);

/// When an unanswered insert was sent, and the task waiting for its answer.
type Pending = (std::time::Instant, tokio::task::JoinHandle<Result<(), WriteError>>);

impl Unanswered {
    pub(crate) fn put(&self, sent: std::time::Instant, answer: tokio::task::JoinHandle<Result<(), WriteError>>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((sent, answer));
    }

    pub(crate) fn take(&self) -> Option<Pending> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

impl WriteBatch {
    /// Number of data rows.
    pub fn row_count(&self) -> usize {
        self.flushes.iter().map(|f| f.rows.len()).sum()
    }

    /// Number of stacks carried.
    pub fn stack_count(&self) -> usize {
        self.flushes.iter().map(|f| f.stacks.len()).sum()
    }

    /// Removes rows no store can hold (a label set index outside the
    /// flush's label sets) and returns how many went, so one bad row does
    /// not make the store refuse the rows around it.
    pub fn remove_invalid_rows(&mut self) -> usize {
        let mut removed = 0;
        for flush in &mut self.flushes {
            let labels = flush.labels.len();
            let before = flush.rows.len();
            flush.rows.retain(|(key, _)| (key.labels as usize) < labels);
            removed += before - flush.rows.len();
        }
        removed
    }
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The store could not be reached or failed in a way that may pass
    /// (network, server restarting, disk busy): keep the batch and retry.
    #[error("{store} is unavailable: {reason}; the batch is kept and retried")]
    Unavailable {
        /// Which store.
        store: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The store refused the data itself: retrying cannot help. The rows are
    /// counted as rejected and their frames acknowledged.
    #[error("{store} rejected the data: {reason}; the rows are dropped and counted")]
    Rejected {
        /// Which store.
        store: &'static str,
        /// What the store said.
        reason: String,
    },
}

impl WriteError {
    /// Whether the same batch may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, WriteError::Unavailable { .. })
    }
}

/// Why a read (query, ledger load, health check, retention) failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The store could not answer.
    #[error("{store} query failed: {reason}")]
    Store {
        /// Which store.
        store: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// Why opening a store (connecting, migrating) failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The SQLite file could not be opened or created.
    #[error("cannot open the embedded store at {path}: {reason}; check that the data directory exists and is writable")]
    Sqlite {
        /// Database file.
        path: String,
        /// What SQLite said.
        reason: String,
    },
    /// A schema migration failed.
    #[error("{store} migration {version} ({name}) failed: {reason}")]
    Migration {
        /// Which store.
        store: &'static str,
        /// Migration version.
        version: u32,
        /// Migration name.
        name: &'static str,
        /// What the store said.
        reason: String,
    },
    /// The ClickHouse endpoint is not a usable URL.
    #[error("ClickHouse endpoint {endpoint:?} is invalid: {reason}; expected e.g. http://clickhouse:8123")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The ClickHouse cluster name cannot be used.
    #[error(
        "ClickHouse cluster name {name:?} is invalid: use the name of a cluster in the servers' remote_servers (letters, digits and `_`, not starting with a digit)"
    )]
    Cluster {
        /// The name as configured.
        name: String,
    },
}

/// Filters on the labels of stored rows; `None` matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelFilter {
    /// Node name.
    pub node: Option<String>,
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    /// Pod name.
    pub pod: Option<String>,
    /// Container name.
    pub container: Option<String>,
    /// Process name.
    pub process: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Service (pushed profiles).
    pub service: Option<String>,
    /// Profile type id of pushed profiles ([`aperture_core::model::ProfileType::id`]).
    pub profile_type: Option<String>,
    /// Tags every selected row must carry, `(key, value)`.
    pub tags: Vec<(String, String)>,
    /// Labels whose value must (or must not) be one of a set.
    pub sets: Vec<SetFilter>,
    /// Lock rows whose kind is one of these (`None`: every kind); rows of
    /// other kinds are not affected.
    pub lock_kinds: Option<Vec<LockKind>>,
}

/// A label that a [`SetFilter`] tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetLabel {
    /// A label column: `node`, `namespace`, `pod`, `container`, `process`,
    /// `pid` or `service` (its name is written into the SQL, so only these).
    Column(&'static str),
    /// A tag, by its key.
    Tag(String),
}

/// Rows whose label value is in `values` (`exclude: false`) or is not
/// (`exclude: true`). A row without the tag has no value: an including set
/// never selects it, an excluding set always does. An empty including set
/// selects nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetFilter {
    /// The label tested.
    pub label: SetLabel,
    /// The values.
    pub values: Vec<String>,
    /// Whether the values are the ones left out.
    pub exclude: bool,
}

impl SetLabel {
    /// The column of a label the querier can name, `None` for a tag.
    pub fn column(name: &str) -> Option<SetLabel> {
        ["node", "namespace", "pod", "container", "process", "pid", "service"]
            .into_iter()
            .find(|c| *c == name)
            .map(SetLabel::Column)
    }
}

impl LabelFilter {
    /// The `detail` values of the lock rows [`LabelFilter::lock_kinds`]
    /// keeps, as a SQL list (`5, 6`), or `None` when it keeps every kind.
    /// Numbers from [`LockKind`], never user text; keeping no kind is `256`,
    /// a value no kind has (`IN ()` is not SQL everywhere).
    pub fn lock_details_sql(&self) -> Option<String> {
        let kinds = self.lock_kinds.as_ref()?;
        if kinds.is_empty() {
            return Some("256".to_owned());
        }
        Some(kinds.iter().map(|k| (*k as u8).to_string()).collect::<Vec<_>>().join(", "))
    }

    /// The string-valued filters as (column, value) pairs, in a fixed order.
    pub fn string_columns(&self) -> Vec<(&'static str, &str)> {
        [
            ("node", &self.node),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
            ("process", &self.process),
            ("service", &self.service),
            ("profile_type", &self.profile_type),
        ]
        .into_iter()
        .filter_map(|(c, v)| v.as_deref().map(|v| (c, v)))
        .collect()
    }
}

/// Which rows a query reads: a time range and label filters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    /// Rows whose window starts at or after this, Unix seconds.
    pub from_s: u64,
    /// Rows whose window starts before this, Unix seconds.
    pub to_s: u64,
    /// Label filters.
    pub filter: LabelFilter,
}

/// The row kind whose stacks make up a mode's profile: CPU samples, lock
/// waits, and for syscalls the individual slow calls (syscall statistics
/// carry no stack).
pub fn profile_kind(mode: Mode) -> RowKind {
    match mode {
        Mode::Cpu => RowKind::Cpu,
        Mode::Lock => RowKind::Lock,
        Mode::Syscall => RowKind::SlowCall,
    }
}

/// Sum over the selected rows of one stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackTotal {
    /// The stack.
    pub stack: StackHash,
    /// Samples, waits or calls.
    pub count: u64,
    /// CPU time, wait time or call time, ns.
    pub total_ns: u64,
}

/// Sum over the selected syscall-statistics rows of one syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallTotal {
    /// Syscall name.
    pub name: String,
    /// Calls.
    pub count: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Time in the calls, ns.
    pub total_ns: u64,
    /// Merged log2 latency histogram.
    pub histogram: Vec<u64>,
}

/// Sum over the selected lock rows of one (stack, lock kind).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockTotal {
    /// Stack at the wait.
    pub stack: StackHash,
    /// Lock kind name (`futex`, `kernel_mutex`...).
    pub kind: String,
    /// Waits.
    pub count: u64,
    /// Time waited, ns.
    pub total_ns: u64,
    /// Longest single wait, ns.
    pub max_ns: u64,
}

/// A label a filter picker can list values of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelName {
    /// Node name.
    Node,
    /// Kubernetes namespace.
    Namespace,
    /// Pod name.
    Pod,
    /// Container name.
    Container,
    /// Process name.
    Process,
    /// Process id.
    Pid,
    /// Service of pushed profiles.
    Service,
    /// Profile type id of pushed profiles (empty for the agent's rows).
    Type,
}

impl LabelName {
    /// Every label.
    pub const ALL: [LabelName; 8] = [
        LabelName::Node,
        LabelName::Namespace,
        LabelName::Pod,
        LabelName::Container,
        LabelName::Process,
        LabelName::Pid,
        LabelName::Service,
        LabelName::Type,
    ];

    /// API name.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelName::Node => "node",
            LabelName::Namespace => "namespace",
            LabelName::Pod => "pod",
            LabelName::Container => "container",
            LabelName::Process => "process",
            LabelName::Pid => "pid",
            LabelName::Service => "service",
            LabelName::Type => "type",
        }
    }

    /// Column name in both stores.
    pub fn column(self) -> &'static str {
        match self {
            LabelName::Type => "profile_type",
            other => other.as_str(),
        }
    }

    /// The inverse of [`LabelName::as_str`].
    pub fn parse(s: &str) -> Option<LabelName> {
        LabelName::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// Tag keys and values: at most this many tags per label set.
pub const MAX_TAGS: usize = 32;

/// Checks one tag as stored: a key of letters, digits, `_`, `.`, `-` (at
/// most 128 bytes) and a value without control characters (at most 1 KiB).
pub fn valid_tag(key: &str, value: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && value.len() <= 1024
        && !value.chars().any(char::is_control)
}

/// What a retention pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Rows, partitions or ledger entries removed (store-specific unit, for logs).
    pub removed: u64,
}

/// Stored records a store could not decode and left out of its answers,
/// since it was opened (exported as `aperture_store_undecodable_total`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Undecodable {
    /// Stacks whose frames could not be read (their rows show as an
    /// unknown stack).
    pub stacks: u64,
    /// Frame-ledger rows that could not be read (that run's committed
    /// frames are not known as committed).
    pub ledger_rows: u64,
}

/// Counters behind [`Undecodable`], shared with a store's query tasks.
#[derive(Debug, Default)]
pub struct UndecodableCounts {
    stacks: std::sync::atomic::AtomicU64,
    ledger_rows: std::sync::atomic::AtomicU64,
}

impl UndecodableCounts {
    /// Counts a stack that could not be decoded, and logs it.
    pub fn stack(&self, store: &str, hash: StackHash, why: &str) {
        self.stacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(store, stack = %hash, "a stored stack cannot be decoded ({why}); it shows as an unknown stack");
    }

    /// Counts a ledger row that could not be decoded, and logs it.
    pub fn ledger_row(&self, store: &str, agent: &str, boot: &str, why: &str) {
        self.ledger_rows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            store,
            agent,
            boot,
            "a frame-ledger row cannot be decoded ({why}); frames of that run may be stored again if resent"
        );
    }

    /// The counts so far.
    pub fn snapshot(&self) -> Undecodable {
        use std::sync::atomic::Ordering::Relaxed;
        Undecodable { stacks: self.stacks.load(Relaxed), ledger_rows: self.ledger_rows.load(Relaxed) }
    }
}

/// A place rows are written to and read from. Methods return boxed futures
/// so the trait can be used as `Arc<dyn Store>`; blocking implementations
/// move their work to tokio's blocking pool.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Which implementation this is.
    fn kind(&self) -> StoreKind;

    /// Commits a batch: rows, new stacks and ledger state. SQLite does it in
    /// one transaction; ClickHouse inserts stacks, then rows, then ledger
    /// state (see `docs/storage.md` for the crash window this leaves).
    fn write<'a>(&'a self, batch: &'a WriteBatch) -> StoreFuture<'a, Result<(), WriteError>>;

    /// The committed ledger state of every run updated at or after `since_s`.
    fn load_ledger(&self, since_s: u64) -> StoreFuture<'_, Result<Vec<(RunKey, RunState)>, QueryError>>;

    /// The committed ledger state of the given runs that have one stored.
    /// Asked when the aggregator meets runs it has not served lately, so
    /// replicas sharing one database never admit a frame another replica
    /// committed.
    fn load_runs<'a>(&'a self, keys: &'a [RunKey]) -> StoreFuture<'a, Result<Vec<(RunKey, RunState)>, QueryError>>;

    /// Cheap round trip proving the store answers.
    fn ping(&self) -> StoreFuture<'_, Result<(), QueryError>>;

    /// Per-stack sums of the rows of `kind` selected by `sel`.
    fn stack_totals<'a>(
        &'a self,
        kind: RowKind,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<StackTotal>, QueryError>>;

    /// The frames of the given stacks; unknown hashes are left out.
    fn stacks<'a>(&'a self, hashes: &'a [StackHash]) -> StoreFuture<'a, Result<Vec<Stack>, QueryError>>;

    /// Per-syscall sums of the syscall-statistics rows selected by `sel`.
    fn syscall_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<SyscallTotal>, QueryError>>;

    /// Per (stack, lock kind) sums of the lock rows selected by `sel`.
    fn lock_totals<'a>(&'a self, sel: &'a Selector) -> StoreFuture<'a, Result<Vec<LockTotal>, QueryError>>;

    /// Distinct values of `label` among rows of `kind` (all kinds if `None`) selected by `sel`, sorted.
    fn label_values<'a>(
        &'a self,
        label: LabelName,
        kind: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>>;

    /// Distinct values of tag `key` among rows of `kind` (all kinds if
    /// `None`) selected by `sel` that carry the tag.
    fn tag_values<'a>(
        &'a self,
        key: &'a str,
        kind: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>>;

    /// Distinct tag keys among rows of `kind` (all kinds if `None`) selected by `sel`, sorted.
    fn tag_keys<'a>(
        &'a self,
        kind: Option<Mode>,
        sel: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>>;

    /// Removes rows whose window started before `cutoff_s`, and ledger state
    /// not updated since then.
    fn apply_retention(&self, cutoff_s: u64) -> StoreFuture<'_, Result<RetentionReport, QueryError>>;

    /// Stored records left out of answers so far because they could not be decoded.
    fn undecodable(&self) -> Undecodable {
        Undecodable::default()
    }
}

/// The embedded store's text form of tags: `key=value\n` per tag, sorted by
/// key (keys hold no `=`, nothing holds a newline: see [`valid_tag`]). A
/// tag filter looks for `\nkey=value\n` in `\n` + this.
pub fn tags_text(tags: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in tags {
        out.push_str(k);
        out.push('=');
        out.push_str(v);
        out.push('\n');
    }
    out
}

/// Row kinds belonging to a mode, for label listing.
pub fn mode_kinds(mode: Mode) -> &'static [RowKind] {
    match mode {
        Mode::Cpu => &[RowKind::Cpu],
        Mode::Lock => &[RowKind::Lock],
        Mode::Syscall => &[RowKind::Syscall, RowKind::SlowCall],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rows_with_a_missing_label_set_are_removed() {
        use aperture_core::model::Labels;
        use aperture_core::shard::{RowKey, RowValue};
        let key = |labels| RowKey { window_start_s: 0, kind: RowKind::Cpu, labels, stack: StackHash(1), detail: 0 };
        let flush = Flush {
            labels: vec![Labels::default()],
            rows: vec![(key(0), RowValue::default()), (key(1), RowValue::default()), (key(0), RowValue::default())],
            ..Flush::default()
        };
        let mut batch = WriteBatch { flushes: vec![flush], ..WriteBatch::default() };
        assert_eq!(batch.remove_invalid_rows(), 1);
        assert_eq!(batch.row_count(), 2);
    }
}
