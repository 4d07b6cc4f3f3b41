//! What the query API computes from a [`Store`]'s aggregates, once for both
//! stores: merged profiles (flame-graph tree, folded stacks, pprof, SVG), top
//! functions, per-stack diffs, syscall latency quantiles and lock call sites.
//!
//! The value of a stack in a profile depends on the mode: CPU profiles count
//! samples; lock profiles sum wait time in ns; syscall profiles sum the time
//! of slow calls in ns (see [`profile_value`]).

mod flame;
pub(crate) mod pprof;
mod profile;

pub use flame::{FlameNode, FlameTree, ROOT, flame_tree};
pub use pprof::encode_pprof;
pub use profile::{DiffEntry, TopEntry, diff, folded, svg, top};

use std::collections::HashMap;

use aperture_core::lockclass::wait_caller;
use aperture_core::model::{Mode, StackHash, histogram_quantile};
use serde::Serialize;

use aperture_core::shard::RowKind;

use crate::store::{QueryError, Selector, StackTotal, Store, profile_kind};

/// A merged profile: every selected stack with its frames resolved, root first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    /// What was profiled.
    pub mode: Option<Mode>,
    /// Stacks, each as function names from the root to the leaf, with the
    /// stack's frames for pprof (leaf first, as stored).
    pub stacks: Vec<ProfileStack>,
}

/// One stack of a [`Profile`].
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileStack {
    /// Stack identity.
    pub hash: StackHash,
    /// Frame names from the root (outermost caller) to the leaf.
    pub names: Vec<String>,
    /// Frames as stored, leaf first (empty when the stack is unknown to the store).
    pub frames: Vec<aperture_core::model::StackFrame>,
    /// Samples, waits or calls.
    pub count: u64,
    /// CPU, wait or call time, ns.
    pub total_ns: u64,
}

impl ProfileStack {
    /// The stack's value in a flame graph of `mode`.
    pub fn value(&self, mode: Mode) -> u64 {
        profile_value(mode, self.count, self.total_ns)
    }
}

/// Samples for CPU profiles; nanoseconds for lock and syscall profiles.
pub fn profile_value(mode: Mode, count: u64, total_ns: u64) -> u64 {
    match mode {
        Mode::Cpu => count,
        Mode::Lock | Mode::Syscall => total_ns,
    }
}

/// Unit of [`profile_value`].
pub fn profile_unit(mode: Mode) -> &'static str {
    match mode {
        Mode::Cpu => "samples",
        Mode::Lock | Mode::Syscall => "nanoseconds",
    }
}

/// Name shown for a stack the store has no frames for (should not happen;
/// visible rather than silently dropped).
fn unknown_stack(hash: StackHash) -> String {
    format!("[unknown stack {hash}]")
}

/// Resolves stack totals into a [`Profile`].
pub async fn resolve(store: &dyn Store, mode: Mode, totals: Vec<StackTotal>) -> Result<Profile, QueryError> {
    let hashes: Vec<StackHash> = totals.iter().map(|t| t.stack).collect();
    let stacks = store.stacks(&hashes).await?;
    let by_hash: HashMap<StackHash, aperture_core::model::Stack> = stacks.into_iter().map(|s| (s.hash, s)).collect();
    let mut out: Vec<ProfileStack> = totals
        .into_iter()
        .map(|t| {
            let (names, frames) = match by_hash.get(&t.stack) {
                Some(s) if !s.frames.is_empty() => {
                    (s.frames.iter().rev().map(|f| f.display_name()).collect(), s.frames.clone())
                }
                _ => (vec![unknown_stack(t.stack)], Vec::new()),
            };
            ProfileStack { hash: t.stack, names, frames, count: t.count, total_ns: t.total_ns }
        })
        .collect();
    out.sort_by(|a, b| a.names.cmp(&b.names).then(a.hash.cmp(&b.hash)));
    Ok(Profile { mode: Some(mode), stacks: out })
}

/// Loads the merged pushed profile selected by `sel` (whose filter names
/// the profile type). Its stacks' value is their `count`: use
/// [`Mode::Cpu`]'s value rule with it.
pub async fn load_pushed(store: &dyn Store, sel: &Selector) -> Result<Profile, QueryError> {
    let totals = store.stack_totals(RowKind::Profile, sel).await?;
    let mut profile = resolve(store, Mode::Cpu, totals).await?;
    profile.mode = None;
    Ok(profile)
}

/// Loads the merged profile of `mode` over `sel`.
pub async fn load_profile(store: &dyn Store, mode: Mode, sel: &Selector) -> Result<Profile, QueryError> {
    let totals = store.stack_totals(profile_kind(mode), sel).await?;
    resolve(store, mode, totals).await
}

/// Per-syscall summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallSummary {
    /// Syscall name.
    pub name: String,
    /// Calls.
    pub count: u64,
    /// Calls that returned an error.
    pub errors: u64,
    /// Time in the calls, ns.
    pub total_ns: u64,
    /// Median latency estimated from the merged log2 histogram, ns.
    pub p50_ns: u64,
    /// 90th percentile, ns.
    pub p90_ns: u64,
    /// 99th percentile, ns.
    pub p99_ns: u64,
}

/// Per-syscall counts and quantiles, by total time, largest first.
pub async fn syscalls(store: &dyn Store, sel: &Selector, limit: usize) -> Result<Vec<SyscallSummary>, QueryError> {
    let mut out: Vec<SyscallSummary> = store
        .syscall_totals(sel)
        .await?
        .into_iter()
        .map(|t| SyscallSummary {
            p50_ns: histogram_quantile(&t.histogram, 0.5),
            p90_ns: histogram_quantile(&t.histogram, 0.9),
            p99_ns: histogram_quantile(&t.histogram, 0.99),
            name: t.name,
            count: t.count,
            errors: t.errors,
            total_ns: t.total_ns,
        })
        .collect();
    out.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then_with(|| a.name.cmp(&b.name)));
    out.truncate(limit);
    Ok(out)
}

/// A contended call site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LockSite {
    /// The function that called into the lock implementation: the first
    /// frame past the wait entry points of glibc, C11, Rust's std and
    /// parking_lot ([`aperture_core::lockclass::wait_caller`]); the stack's
    /// leaf when none of them is recognised near the wait (kernel locks,
    /// other futex waits).
    pub function: String,
    /// The whole stack, root first, `;`-separated.
    pub stack: String,
    /// Lock kind.
    pub kind: String,
    /// Waits.
    pub count: u64,
    /// Time waited, ns.
    pub wait_ns: u64,
    /// Longest single wait, ns.
    pub max_wait_ns: u64,
}

/// Call sites by total wait time, longest first.
pub async fn locks(store: &dyn Store, sel: &Selector, limit: usize) -> Result<Vec<LockSite>, QueryError> {
    let totals = store.lock_totals(sel).await?;
    let mut hashes: Vec<StackHash> = totals.iter().map(|t| t.stack).collect();
    hashes.sort_unstable();
    hashes.dedup();
    let stacks = store.stacks(&hashes).await?;
    let by_hash: HashMap<StackHash, aperture_core::model::Stack> = stacks.into_iter().map(|s| (s.hash, s)).collect();
    let mut out: Vec<LockSite> = totals
        .into_iter()
        .map(|t| {
            let (function, stack) = match by_hash.get(&t.stack) {
                Some(s) if !s.frames.is_empty() => (
                    s.frames[wait_caller(&s.frames).unwrap_or(0)].display_name(),
                    s.frames.iter().rev().map(|f| f.display_name()).collect::<Vec<_>>().join(";"),
                ),
                _ => (unknown_stack(t.stack), unknown_stack(t.stack)),
            };
            LockSite { function, stack, kind: t.kind, count: t.count, wait_ns: t.total_ns, max_wait_ns: t.max_ns }
        })
        .collect();
    out.sort_by(|a, b| b.wait_ns.cmp(&a.wait_ns).then_with(|| a.stack.cmp(&b.stack)).then_with(|| a.kind.cmp(&b.kind)));
    out.truncate(limit);
    Ok(out)
}

/// Sorts label values for a picker: non-empty, numerically for pids, else lexically.
pub fn sort_label_values(mut values: Vec<String>, numeric: bool) -> Vec<String> {
    values.retain(|v| !v.is_empty());
    values.sort_unstable();
    values.dedup();
    if numeric {
        values.sort_by_key(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    }
    values
}

#[cfg(test)]
mod tests {
    use aperture_core::model::{Labels, Stack, StackFrame};
    use aperture_core::shard::{Flush, RowKey, RowValue};

    use super::*;
    use crate::store::WriteBatch;
    use crate::store::sqlite::SqliteStore;

    /// The lock table names the function that took the lock, not glibc's
    /// or std's wait internals at the leaf; stacks with no known wait entry
    /// point keep their leaf.
    #[test]
    fn lock_sites_are_named_by_the_caller_of_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let stack = |names: &[&str]| {
            Stack::new(names.iter().map(|n| StackFrame { symbol: (*n).into(), ..Default::default() }).collect())
        };
        let stacks = [
            stack(&["__lll_lock_wait", "pthread_mutex_lock", "mutex_site", "run", "start_thread"]),
            stack(&["<std::sys::sync::mutex::futex::Mutex>::lock_contended", "app::work", "main"]),
            stack(&["futex_wait", "lock_acquire", "main"]),
        ];
        let rows = stacks
            .iter()
            .zip([3000u64, 2000, 1000])
            .map(|(s, ns)| {
                (
                    RowKey { window_start_s: 100, kind: RowKind::Lock, labels: 0, stack: s.hash, detail: 0 },
                    RowValue { count: 1, total_ns: ns, max_ns: ns, name: "mutex".into(), ..Default::default() },
                )
            })
            .collect();
        let batch = WriteBatch {
            flushes: vec![Flush {
                labels: vec![Labels { node: "n".into(), ..Default::default() }],
                rows,
                stacks: stacks.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(store.write(&batch)).expect("write");
        let sel = Selector { from_s: 0, to_s: 1000, filter: Default::default() };
        let sites = rt.block_on(locks(&store, &sel, 10)).expect("locks");
        let names: Vec<(&str, &str)> = sites.iter().map(|s| (s.function.as_str(), s.stack.as_str())).collect();
        assert_eq!(
            names,
            [
                ("mutex_site", "start_thread;run;mutex_site;pthread_mutex_lock;__lll_lock_wait"),
                ("app::work", "main;app::work;<std::sys::sync::mutex::futex::Mutex>::lock_contended"),
                ("futex_wait", "main;lock_acquire;futex_wait"),
            ]
        );
    }
}
