//! The frame ledger: which frames the aggregator holds and which it has
//! committed, so a frame resent after a reconnect is acknowledged without
//! being counted twice.
//!
//! Frames of one agent run (agent id, boot id) carry sequence numbers from 1,
//! and agents resend in order, so committed frames are kept as a watermark
//! (every sequence at or below it is committed) plus the few committed above
//! it out of order.
//!
//! Agents also leave gaps for good: they drop their oldest frames when
//! their buffer overflows, and give up frames the transport refuses. A gap
//! would hold the watermark back forever and make every later frame pile up
//! above it, so a gap more than [`MAX_SPAN`] sequences behind the highest
//! committed frame is closed: the watermark moves past it. A frame that old
//! and never seen was dropped by its agent (an agent resends its oldest
//! unacknowledged frame first, before anything newer). This bounds
//! [`RunState::above`] to [`MAX_SPAN`] entries whatever an agent sends.
//!
//! Memory is bounded by the number of runs remembered ([`FrameLedger::new`]);
//! the least recently seen run without frames in flight is forgotten first.

use std::collections::{BTreeSet, HashMap};

use crate::frame::FrameId;
use crate::ids::{AgentId, BootId};

/// What the ledger says of an arriving frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Not seen before: fold it in. It is now in flight.
    New,
    /// Already folded in and not yet committed: drop the copy, the ack will follow.
    InFlight,
    /// Already committed: acknowledge again, do not fold.
    Committed,
}

/// Committed state of one agent run, as persisted by the stores.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RunState {
    /// Every sequence `<= watermark` is committed.
    pub watermark: u64,
    /// Committed sequences above the watermark.
    pub above: BTreeSet<u64>,
}

impl RunState {
    /// Whether `seq` is committed.
    pub fn is_committed(&self, seq: u64) -> bool {
        seq <= self.watermark || self.above.contains(&seq)
    }

    /// Records `seq` as committed, advancing the watermark over every
    /// contiguous sequence above it and over gaps more than [`MAX_SPAN`]
    /// behind the highest committed sequence. Returns how many sequences
    /// the watermark passed without their frames having been committed
    /// (gaps closed).
    pub fn commit(&mut self, seq: u64) -> u64 {
        if seq <= self.watermark {
            return 0;
        }
        self.above.insert(seq);
        self.settle()
    }

    /// Moves the watermark up as far as the rules allow; returns the
    /// sequences skipped.
    fn settle(&mut self) -> u64 {
        let mut skipped = 0;
        if let Some(&highest) = self.above.last() {
            let floor = highest.saturating_sub(MAX_SPAN);
            if floor > self.watermark {
                // Everything at or below `floor` is now covered.
                let kept = self.above.split_off(&(floor + 1));
                let committed_below = self.above.len() as u64;
                skipped = floor - self.watermark - committed_below;
                self.above = kept;
                self.watermark = floor;
            }
        }
        while let Some(next) = self.watermark.checked_add(1) {
            if !self.above.remove(&next) {
                break;
            }
            self.watermark = next;
        }
        skipped
    }
}

/// How far behind the highest committed sequence of a run a gap may stay
/// open; also the most sequences [`RunState::above`] holds.
pub const MAX_SPAN: u64 = 1024;

#[derive(Debug, Default)]
struct Run {
    committed: RunState,
    in_flight: BTreeSet<u64>,
    last_used: u64,
}

/// Key of an agent run.
pub type RunKey = (AgentId, BootId);

/// Tracks frames per agent run. Pure state: the caller persists
/// [`FrameLedger::committed_runs`] with its data and restores it at start.
#[derive(Debug)]
pub struct FrameLedger {
    runs: HashMap<RunKey, Run>,
    max_runs: usize,
    tick: u64,
}

impl FrameLedger {
    /// A ledger remembering at most `max_runs` agent runs.
    pub fn new(max_runs: usize) -> FrameLedger {
        FrameLedger { runs: HashMap::new(), max_runs: max_runs.max(1), tick: 0 }
    }

    /// Classifies an arriving frame and, if new, marks it in flight.
    pub fn admit(&mut self, id: FrameId) -> Admit {
        self.tick += 1;
        let tick = self.tick;
        let run = self.run_mut((id.agent_id, id.boot_id));
        run.last_used = tick;
        if run.committed.is_committed(id.sequence) {
            Admit::Committed
        } else if !run.in_flight.insert(id.sequence) {
            Admit::InFlight
        } else {
            Admit::New
        }
    }

    /// Records that the frames are committed to storage. Returns the
    /// sequences skipped by closing gaps (see the module documentation).
    pub fn commit(&mut self, ids: &[FrameId]) -> u64 {
        let mut skipped = 0;
        for id in ids {
            let run = self.run_mut((id.agent_id, id.boot_id));
            run.in_flight.remove(&id.sequence);
            skipped += run.committed.commit(id.sequence);
            // Frames in flight below the watermark are still stored when
            // they commit; only the set's bound matters here.
        }
        skipped
    }

    /// Forgets in-flight frames whose data was lost (so a resend is taken again).
    pub fn abandon(&mut self, ids: &[FrameId]) {
        for id in ids {
            if let Some(run) = self.runs.get_mut(&(id.agent_id, id.boot_id)) {
                run.in_flight.remove(&id.sequence);
            }
        }
    }

    /// Restores the committed state of a run (from storage, at start, or
    /// read from a store shared with other aggregators). Merges with what is
    /// known: nothing committed is ever forgotten this way.
    pub fn restore(&mut self, key: RunKey, state: RunState) {
        let run = self.run_mut(key);
        if state.watermark > run.committed.watermark {
            run.committed.watermark = state.watermark;
            let w = state.watermark;
            run.committed.above.retain(|s| *s > w);
        }
        let w = run.committed.watermark;
        run.committed.above.extend(state.above.into_iter().filter(|s| *s > w));
        run.committed.settle();
    }

    /// The committed state of the given runs, for persisting with a flush.
    pub fn committed_runs<'a>(&self, keys: impl IntoIterator<Item = &'a RunKey>) -> Vec<(RunKey, RunState)> {
        let mut out: Vec<(RunKey, RunState)> =
            keys.into_iter().filter_map(|k| self.runs.get(k).map(|r| (*k, r.committed.clone()))).collect();
        out.sort_by_key(|a| a.0);
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// Number of runs remembered.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether no run is remembered.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn run_mut(&mut self, key: RunKey) -> &mut Run {
        if !self.runs.contains_key(&key) && self.runs.len() >= self.max_runs {
            // Evict the least recently used run without frames in flight.
            let victim = self
                .runs
                .iter()
                .filter(|(_, r)| r.in_flight.is_empty())
                .min_by_key(|(_, r)| r.last_used)
                .map(|(k, _)| *k);
            if let Some(v) = victim {
                self.runs.remove(&v);
            }
        }
        self.runs.entry(key).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(boot: u8, seq: u64) -> FrameId {
        FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([boot; 16]), sequence: seq }
    }

    #[test]
    fn resent_frames_are_recognised() {
        let mut l = FrameLedger::new(16);
        assert_eq!(l.admit(id(1, 1)), Admit::New);
        assert_eq!(l.admit(id(1, 2)), Admit::New);
        assert_eq!(l.admit(id(1, 1)), Admit::InFlight);
        l.commit(&[id(1, 1)]);
        assert_eq!(l.admit(id(1, 1)), Admit::Committed);
        assert_eq!(l.admit(id(1, 2)), Admit::InFlight);
        // Another run of the same agent starts its sequence again.
        assert_eq!(l.admit(id(2, 1)), Admit::New);
    }

    #[test]
    fn out_of_order_commits_advance_the_watermark() {
        let mut l = FrameLedger::new(16);
        for s in 1..=4 {
            l.admit(id(1, s));
        }
        l.commit(&[id(1, 3), id(1, 4)]);
        let key = (AgentId([1; 16]), BootId([1; 16]));
        let state = &l.committed_runs([&key])[0].1;
        assert_eq!(state.watermark, 0);
        assert_eq!(state.above, BTreeSet::from([3, 4]));
        l.commit(&[id(1, 1), id(1, 2)]);
        let state = &l.committed_runs([&key])[0].1;
        assert_eq!(state.watermark, 4);
        assert!(state.above.is_empty());
    }

    #[test]
    fn abandoned_frames_are_taken_again() {
        let mut l = FrameLedger::new(16);
        l.admit(id(1, 1));
        l.abandon(&[id(1, 1)]);
        assert_eq!(l.admit(id(1, 1)), Admit::New);
    }

    #[test]
    fn restored_state_survives_a_restart() {
        let mut l = FrameLedger::new(16);
        l.restore((AgentId([1; 16]), BootId([1; 16])), RunState { watermark: 10, above: BTreeSet::from([12]) });
        assert_eq!(l.admit(id(1, 10)), Admit::Committed);
        assert_eq!(l.admit(id(1, 12)), Admit::Committed);
        assert_eq!(l.admit(id(1, 11)), Admit::New);
    }

    #[test]
    fn a_gap_left_by_dropped_frames_does_not_keep_later_frames_forever() {
        // Frame 2 was dropped by the agent during an outage; the run goes on.
        let mut l = FrameLedger::new(16);
        let key = (AgentId([1; 16]), BootId([1; 16]));
        let mut skipped = 0;
        for seq in (1..=100_000).filter(|s| *s != 2) {
            assert_eq!(l.admit(id(1, seq)), Admit::New);
            skipped += l.commit(&[id(1, seq)]);
            let state = &l.committed_runs([&key])[0].1;
            assert!(state.above.len() as u64 <= MAX_SPAN, "above holds {} at {seq}", state.above.len());
        }
        let state = &l.committed_runs([&key])[0].1;
        assert_eq!(state.watermark, 100_000, "the gap was closed and the watermark caught up");
        assert!(state.above.is_empty());
        assert_eq!(skipped, 1, "exactly the dropped frame was skipped");
        // Committed frames stay committed.
        assert_eq!(l.admit(id(1, 99_999)), Admit::Committed);
    }

    #[test]
    fn restoring_a_huge_persisted_set_is_bounded_too() {
        let mut l = FrameLedger::new(16);
        let above: BTreeSet<u64> = (10..50_000).collect();
        l.restore((AgentId([1; 16]), BootId([1; 16])), RunState { watermark: 5, above });
        let state = &l.committed_runs([&(AgentId([1; 16]), BootId([1; 16]))])[0].1;
        assert!(state.above.len() as u64 <= MAX_SPAN);
        assert_eq!(state.watermark, 49_999);
        assert_eq!(l.admit(id(1, 12)), Admit::Committed);
    }

    #[test]
    fn sequences_at_the_end_of_the_range_do_not_overflow() {
        let mut l = FrameLedger::new(16);
        for seq in [u64::MAX, u64::MAX - 1, 1, u64::MAX - 5000] {
            l.admit(id(1, seq));
            l.commit(&[id(1, seq)]);
        }
        assert_eq!(l.admit(id(1, u64::MAX)), Admit::Committed);
        assert_eq!(l.admit(id(1, 1)), Admit::Committed);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit(u64),
        Commit(u64),
        Abandon(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Mostly near the front of the run, sometimes far ahead or at the end of the range.
        let seq = prop_oneof![
            8 => 1u64..3_000,
            1 => 1u64..1_000_000,
            1 => (u64::MAX - 3_000)..=u64::MAX,
        ];
        prop_oneof![seq.clone().prop_map(Op::Admit), seq.clone().prop_map(Op::Commit), seq.prop_map(Op::Abandon),]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn bounded_and_never_readmits_a_committed_frame(ops in proptest::collection::vec(op(), 1..2_000)) {
            let mut l = FrameLedger::new(4);
            let key = (AgentId([1; 16]), BootId([1; 16]));
            let mut committed = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Admit(seq) => {
                        let got = l.admit(id(1, seq));
                        if committed.contains(&seq) {
                            prop_assert_eq!(got, Admit::Committed, "frame {} was committed", seq);
                        }
                    }
                    Op::Commit(seq) => {
                        l.commit(&[id(1, seq)]);
                        committed.insert(seq);
                    }
                    Op::Abandon(seq) => l.abandon(&[id(1, seq)]),
                }
                if let Some((_, state)) = l.committed_runs([&key]).first() {
                    prop_assert!(state.above.len() as u64 <= MAX_SPAN);
                    prop_assert!(state.above.iter().all(|s| *s > state.watermark));
                }
            }
        }
    }

    #[test]
    fn memory_is_bounded_by_runs() {
        let mut l = FrameLedger::new(2);
        for boot in 1..=3 {
            l.admit(id(boot, 1));
            l.commit(&[id(boot, 1)]);
        }
        assert_eq!(l.len(), 2);
        // The oldest run was forgotten.
        assert_eq!(l.admit(id(1, 1)), Admit::New);
    }
}
