//! What a shard takes from a batch's stacks the first time it sees them:
//! each is copied out of the archive, its hash checked against its frames
//! (an agent cannot file frames under another stack's hash) and its depth
//! capped at [`super::ShardConfig::max_stack_frames`]. Also the memory
//! costs used for buffer accounting.

use std::collections::HashSet;

use super::BatchError;
use crate::model::{ArchivedBatch, Labels, Stack, StackFrame, StackHash};

/// Fixed cost of a `String` (pointer, length, capacity).
const STRING_COST: usize = 24;

/// Memory held by a label set: its strings' bytes and headers.
pub(super) fn labels_cost(l: &Labels) -> usize {
    [&l.node, &l.namespace, &l.pod, &l.container, &l.process, &l.service, &l.profile_type]
        .iter()
        .map(|s| STRING_COST + s.len())
        .sum::<usize>()
        + l.tags.iter().map(|(k, v)| 2 * STRING_COST + k.len() + v.len()).sum::<usize>()
        + 32
}

/// Memory held by a stack: per frame the fixed fields and the strings' bytes.
pub(super) fn stack_cost(s: &Stack) -> usize {
    48 + s.frames.iter().map(|f| 24 + 3 * STRING_COST + f.symbol.len() + f.module.len() + f.file.len()).sum::<usize>()
}

/// The root-most frame of a truncated stack, replacing the `cut` frames
/// that were dropped: module `[aperture]`, symbol `[N frames truncated]`.
pub fn truncated_marker(cut: usize) -> StackFrame {
    StackFrame { symbol: format!("[{cut} frames truncated]"), module: "[aperture]".to_owned(), ..StackFrame::default() }
}

/// The stacks of a batch new to a shard, checked and capped.
pub(super) struct Intake {
    pub stacks: Vec<Stack>,
    /// Stacks cut to the limit.
    pub truncated: u64,
    /// Frames cut from them.
    pub frames_cut: u64,
}

/// Reads the stacks of `batch` not in `known`; fails on the first stack
/// that cannot be read or whose hash is not its frames' hash.
pub(super) fn new_stacks(
    batch: &ArchivedBatch,
    known: &HashSet<StackHash>,
    max_frames: usize,
) -> Result<Intake, BatchError> {
    let max = max_frames.max(2);
    let mut out = Intake { stacks: Vec::new(), truncated: 0, frames_cut: 0 };
    let mut seen: HashSet<StackHash> = HashSet::new();
    for (index, s) in batch.stacks.iter().enumerate() {
        let hash = StackHash(s.hash.0.to_native());
        if known.contains(&hash) || !seen.insert(hash) || (hash == StackHash::NONE && s.frames.is_empty()) {
            continue;
        }
        let mut stack =
            rkyv::deserialize::<Stack, rkyv::rancor::Error>(s).map_err(|_| BatchError::BadStackData { index })?;
        let computed = Stack::compute_hash(&stack.frames);
        if computed != hash {
            return Err(BatchError::StackHash { index, claimed: hash, computed });
        }
        if stack.frames.len() > max {
            let cut = stack.frames.len() - (max - 1);
            stack.frames.truncate(max - 1);
            stack.frames.push(truncated_marker(cut));
            out.truncated += 1;
            out.frames_cut += cut as u64;
        }
        out.stacks.push(stack);
    }
    Ok(out)
}
