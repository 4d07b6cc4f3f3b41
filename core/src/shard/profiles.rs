//! Folding a [`ProfileBatch`] (profiles pushed by SDKs and other profilers,
//! not agent frames) into the same rows, flushes and acknowledgements as
//! frames: one [`RowKind::Profile`] row per window, label set and stack.

use std::collections::HashSet;

use super::intake::truncated_marker;
use super::{BatchError, RowKind, Shard, stack_cost};
use crate::frame::FrameId;
use crate::model::{ProfileBatch, Stack, StackHash};

impl Shard {
    /// Checks that every sample of `batch` refers to a stack it carries and
    /// that every stack's hash is its frames' hash, before anything is folded.
    pub fn check_profiles(batch: &ProfileBatch) -> Result<(), BatchError> {
        let stacks = batch.stacks.len();
        for (index, s) in batch.stacks.iter().enumerate() {
            let computed = Stack::compute_hash(&s.frames);
            if computed != s.hash {
                return Err(BatchError::StackHash { index, claimed: s.hash, computed });
            }
        }
        for series in &batch.series {
            for (index, r) in series.samples.iter().enumerate() {
                if r.stack as usize >= stacks {
                    return Err(BatchError::BadStack { table: "profile", index, stack: r.stack, stacks });
                }
            }
        }
        Ok(())
    }

    /// Folds a pushed profile batch in, as [`Shard::ingest`] folds a frame:
    /// `frame` is acknowledged with the flush its rows go out in. Nothing is
    /// folded if the batch fails [`Shard::check_profiles`].
    pub fn ingest_profiles(&mut self, now_ns: u64, frame: FrameId, batch: &ProfileBatch) -> Result<(), BatchError> {
        Shard::check_profiles(batch)?;
        let max = self.config.max_stack_frames.max(2);
        let mut seen: HashSet<StackHash> = HashSet::new();
        for s in &batch.stacks {
            if s.hash == StackHash::NONE || self.known_stacks.contains(&s.hash) || !seen.insert(s.hash) {
                continue;
            }
            let mut stack = s.clone();
            if stack.frames.len() > max {
                let cut = stack.frames.len() - (max - 1);
                stack.frames.truncate(max - 1);
                stack.frames.push(truncated_marker(cut));
                self.stacks_truncated += 1;
                self.stack_frames_cut += cut as u64;
            }
            self.known_stacks.insert(stack.hash);
            self.approx_bytes += stack_cost(&stack);
            self.new_stacks.push(stack);
        }
        for series in &batch.series {
            let labels = self.intern(series.labels.clone());
            for r in &series.samples {
                let stack = batch.stacks[r.stack as usize].hash;
                let key = self.key(r.time_ns, RowKind::Profile, labels, stack, 0);
                self.fold(key, "", r.value, 0, 0, 0, None);
            }
        }
        self.samples = self.samples.saturating_add(batch.sample_count());
        self.frames.push(frame);
        self.approx_bytes += std::mem::size_of::<FrameId>();
        self.oldest_ns.get_or_insert(now_ns);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Labels, ProfileSample, ProfileSeries, ProfileType, StackFrame};
    use crate::shard::ShardConfig;

    fn stack(names: &[&str]) -> Stack {
        Stack::new(names.iter().map(|n| StackFrame { symbol: (*n).into(), ..StackFrame::default() }).collect())
    }

    fn labels(service: &str, t: &ProfileType) -> Labels {
        Labels {
            service: service.into(),
            tags: vec![("env".into(), "prod".into())],
            profile_type: t.id(),
            ..Labels::default()
        }
    }

    #[test]
    fn pushed_samples_fold_per_window_label_set_and_stack() {
        let mut shard = Shard::new(ShardConfig::default());
        let alloc = ProfileType::parse_id("memory:alloc_space:bytes:space:bytes").expect("type");
        let batch = ProfileBatch {
            stacks: vec![stack(&["leaf", "main"]), stack(&["other", "main"])],
            series: vec![ProfileSeries {
                labels: labels("api", &alloc),
                samples: vec![
                    ProfileSample { time_ns: 1_000_000_000, stack: 0, value: 100 },
                    ProfileSample { time_ns: 2_000_000_000, stack: 0, value: 50 },
                    ProfileSample { time_ns: 2_000_000_000, stack: 1, value: 7 },
                ],
            }],
        };
        let id = FrameId { agent_id: crate::ids::AgentId([1; 16]), boot_id: crate::ids::BootId([2; 16]), sequence: 1 };
        shard.ingest_profiles(0, id, &batch).expect("ingest");
        let flush = shard.take().expect("flush");
        assert_eq!(flush.frames, vec![id]);
        assert_eq!(flush.labels, vec![labels("api", &alloc)]);
        assert_eq!(flush.rows.len(), 2);
        assert!(flush.rows.iter().all(|(k, _)| k.kind == RowKind::Profile));
        let leaf = flush.rows.iter().find(|(k, _)| k.stack == batch.stacks[0].hash).expect("leaf row");
        assert_eq!(leaf.1.count, 150);
        assert_eq!(flush.stacks.len(), 2);
        assert_eq!(flush.samples, 3);
    }

    #[test]
    fn a_sample_outside_the_stacks_or_a_forged_hash_folds_nothing() {
        let mut shard = Shard::new(ShardConfig::default());
        let t = ProfileType::of_mode(crate::model::Mode::Cpu);
        let id = FrameId { agent_id: crate::ids::AgentId([1; 16]), boot_id: crate::ids::BootId([2; 16]), sequence: 1 };
        let bad_index = ProfileBatch {
            stacks: vec![stack(&["a"])],
            series: vec![ProfileSeries {
                labels: labels("s", &t),
                samples: vec![ProfileSample { time_ns: 0, stack: 1, value: 1 }],
            }],
        };
        assert!(matches!(shard.ingest_profiles(0, id, &bad_index), Err(BatchError::BadStack { .. })));
        let mut forged = stack(&["a"]);
        forged.hash = StackHash(42);
        let bad_hash = ProfileBatch { stacks: vec![forged], series: Vec::new() };
        assert!(matches!(shard.ingest_profiles(0, id, &bad_hash), Err(BatchError::StackHash { .. })));
        assert!(shard.take().is_none());
    }
}
