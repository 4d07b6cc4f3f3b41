//! State shared by the pipeline's stages: the lanes (one per shard, each
//! with the frame ledger of the agents routed to it), the byte budget of
//! everything buffered, the acknowledgement path and the store's health.
//!
//! The ingress admits frames against a lane's ledger and charges the
//! [`Buffer`]; the shard threads release frame bytes as they fold them and
//! charge their aggregated state; the writer releases what it committed,
//! marks frames committed in their lanes and acknowledges them through
//! [`Acknowledge`]. Frames of one agent always meet the same lane
//! ([`lane_of`]), so each lane's ledger sees every frame of its runs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aperture_core::frame::FrameId;
use aperture_core::ids::AgentId;
use aperture_core::ledger::{FrameLedger, RunKey, RunState};
use aperture_core::model::StackHash;

use crate::metrics::Metrics;

pub use aperture_transport::Carrier;

/// Every carrier, for reporting connected agents.
pub const CARRIERS: [Carrier; 2] = [Carrier::Quic, Carrier::Grpc];

/// What acknowledgements are sent through: the transport's
/// [`aperture_transport::server::Acker`], or a recorder in tests.
pub trait Acknowledge: Send + Sync + 'static {
    /// Acknowledges committed frames to their agents.
    fn ack(&self, frames: &[FrameId]);
}

/// What sees every batch once the store committed it (the OTLP exporter).
/// Called on the writer thread: it must not block.
pub trait CommitTap: Send + Sync + std::fmt::Debug + 'static {
    /// `batch` is committed.
    fn committed(&self, batch: &crate::store::WriteBatch);
}

impl Acknowledge for aperture_transport::server::Acker {
    fn ack(&self, frames: &[FrameId]) {
        // Frames of agents no longer connected are not delivered; they resend
        // and get `AlreadyCommitted`.
        let _delivered = aperture_transport::server::Acker::ack(self, frames);
    }
}

/// Bytes held between the ingress and the store, against a capacity:
/// frames queued to the shards, the shards' aggregated state, flushes
/// waiting in the writer, and frames refused as busy that the transport
/// keeps parked to offer again.
#[derive(Debug)]
pub struct Buffer {
    /// Queued frames, shard state and the writer's flushes.
    used: AtomicUsize,
    /// Frames answered `Busy`, held by the transport until offered again.
    parked: AtomicUsize,
    capacity: usize,
    high_water: usize,
}

impl Buffer {
    /// A buffer of `capacity` bytes that pushes back above `high_water`.
    pub fn new(capacity: usize, high_water: usize) -> Buffer {
        Buffer {
            used: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            capacity,
            high_water: high_water.min(capacity),
        }
    }

    /// Bytes held now, parked frames included.
    pub fn used(&self) -> usize {
        self.pipeline().saturating_add(self.parked())
    }

    /// Bytes held by the pipeline (queues, shards, writer).
    pub fn pipeline(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes of frames parked as busy.
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The push-back level.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Whether everything held is at or above the high-water mark.
    pub fn above_high_water(&self) -> bool {
        self.used() >= self.high_water
    }

    /// Whether the pipeline takes a frame of `n` bytes: below the high-water
    /// mark, and within the capacity once it is added. An empty pipeline
    /// takes any frame, so a frame larger than the capacity cannot wedge it.
    /// Parked frames do not count here: they are in memory already, and
    /// admitting one only moves it into the pipeline.
    pub fn admits(&self, n: usize) -> bool {
        let used = self.pipeline();
        used == 0 || (used < self.high_water && used.saturating_add(n) <= self.capacity)
    }

    /// Accounts `n` more bytes.
    pub fn charge(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Accounts `n` bytes fewer.
    pub fn release(&self, n: usize) {
        // Saturating: accounting never goes below zero even if a caller
        // releases more than it charged.
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }

    /// Accounts a frame of `n` bytes parked by the transport.
    pub fn park(&self, n: usize) {
        self.parked.fetch_add(n, Ordering::Relaxed);
    }

    /// A parked frame of `n` bytes was offered again or dropped.
    pub fn unpark(&self, n: usize) {
        let _ = self.parked.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }
}

/// One lane: the ledger of the agents routed to one shard, and when each
/// of them was last heard from.
#[derive(Debug)]
pub(crate) struct Lane {
    pub ledger: FrameLedger,
    agents: HashMap<AgentId, (Carrier, Instant)>,
    /// Runs this aggregator served frames of, and when it last did.
    served: HashMap<RunKey, Instant>,
    /// Runs whose committed state is being read from the store.
    checking: HashSet<RunKey>,
}

/// Whether the lane's ledger can answer for a run on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunCheck {
    /// Served lately: the ledger knows what this aggregator committed.
    Fresh,
    /// Its state is being read from the store.
    Checking,
    /// Not served lately: another replica may have committed frames of it
    /// since this one last looked; the store must be asked first.
    Stale,
}

/// How long after its last frame a run's ledger state is trusted without
/// asking the store again (another replica may have served it meanwhile).
pub(crate) const RUN_FRESH_FOR: Duration = Duration::from_secs(10);
/// Runs remembered as served per lane; older ones are forgotten beyond it.
const MAX_SERVED: usize = 1 << 16;

impl Lane {
    /// Whether `key` needs a look at the store before its frames are admitted.
    pub fn run_check(&self, key: &RunKey, now: Instant) -> RunCheck {
        if self.checking.contains(key) {
            RunCheck::Checking
        } else if self.served.get(key).is_some_and(|t| now.saturating_duration_since(*t) < RUN_FRESH_FOR) {
            RunCheck::Fresh
        } else {
            RunCheck::Stale
        }
    }

    /// A store look-up for `key` started.
    pub fn start_check(&mut self, key: RunKey) {
        self.checking.insert(key);
    }

    /// The store's committed state of `key` arrived (`None`: nothing stored,
    /// or the look-up failed when `ok` is false).
    pub fn finish_check(&mut self, key: RunKey, state: Option<RunState>, ok: bool, now: Instant) {
        self.checking.remove(&key);
        if let Some(state) = state {
            self.ledger.restore(key, state);
        }
        if ok {
            self.served(key, now);
        }
    }

    /// A frame of `key` was served.
    pub fn served(&mut self, key: RunKey, now: Instant) {
        if self.served.len() >= MAX_SERVED && !self.served.contains_key(&key) {
            self.served.retain(|_, t| now.saturating_duration_since(*t) < RUN_FRESH_FOR);
            if self.served.len() >= MAX_SERVED {
                // Forgetting only means one more look at the store.
                self.served.clear();
            }
        }
        self.served.insert(key, now);
    }

    /// Records that an agent was heard from (at most 65 536 agents per lane
    /// are tracked for reporting; the ledger does not depend on this).
    pub fn heard_from(&mut self, agent_id: AgentId, carrier: Carrier, now: Instant) {
        if self.agents.len() < 1 << 16 || self.agents.contains_key(&agent_id) {
            self.agents.insert(agent_id, (carrier, now));
        }
    }
}

/// State shared by the ingress, the shard threads and the writer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub lanes: Vec<Mutex<Lane>>,
    pub buffer: Buffer,
    pub metrics: Metrics,
    pub acker: Mutex<Option<Arc<dyn Acknowledge>>>,
    /// Sees committed batches, when set.
    pub commit_tap: Mutex<Option<Arc<dyn CommitTap>>>,
    pub agent_idle: Duration,
    /// Set by [`crate::AggregatorHandle::abort`]: threads stop at once and
    /// write nothing more, as if the process had died.
    pub halted: AtomicBool,
    /// The last failure of the health checker's ping; `None` once a ping
    /// went through.
    ping_error: Mutex<Option<String>>,
    /// The last write failure; `None` once a write went through. A store
    /// that answers pings but cannot take writes is down.
    write_error: Mutex<Option<String>>,
    /// Per shard, stacks whose write was given up: the shard forgets it
    /// handed them out, so the next batch using them carries them again.
    forgotten_stacks: Vec<Mutex<Vec<StackHash>>>,
    /// Pushed profiles: their run and the requests waiting for a commit.
    pub pushed: super::pushed::Pushed,
}

impl std::fmt::Debug for dyn Acknowledge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Acknowledge")
    }
}

impl Shared {
    pub fn new(lanes: usize, ledger_max_runs: usize, buffer: Buffer, metrics: Metrics, agent_idle: Duration) -> Shared {
        Shared {
            lanes: (0..lanes)
                .map(|_| {
                    Mutex::new(Lane {
                        ledger: FrameLedger::new(ledger_max_runs / lanes.max(1)),
                        agents: HashMap::new(),
                        served: HashMap::new(),
                        checking: HashSet::new(),
                    })
                })
                .collect(),
            buffer,
            metrics,
            acker: Mutex::new(None),
            commit_tap: Mutex::new(None),
            agent_idle,
            halted: AtomicBool::new(false),
            ping_error: Mutex::new(None),
            write_error: Mutex::new(None),
            forgotten_stacks: (0..lanes).map(|_| Mutex::new(Vec::new())).collect(),
            pushed: super::pushed::Pushed::new(),
        }
    }

    /// The lane of an agent.
    pub fn lane_of(&self, agent_id: &AgentId) -> usize {
        lane_of(agent_id, self.lanes.len())
    }

    pub fn lane(&self, i: usize) -> MutexGuard<'_, Lane> {
        // The lane holds plain data that stays consistent between statements,
        // so a lock poisoned by a panicking holder is still usable.
        self.lanes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks frames committed in their lanes' ledgers.
    pub fn commit(&self, frames: &[FrameId]) {
        let mut skipped = 0;
        for (lane, ids) in self.group_by_lane(frames) {
            skipped += self.lane(lane).ledger.commit(&ids);
        }
        if skipped > 0 {
            // Frames their agents dropped long ago (see core's ledger).
            tracing::debug!(sequences = skipped, "frame ledger closed sequence gaps");
        }
    }

    /// Forgets in-flight frames whose data was dropped, so a resend is taken.
    pub fn abandon(&self, frames: &[FrameId]) {
        for (lane, ids) in self.group_by_lane(frames) {
            self.lane(lane).ledger.abandon(&ids);
        }
    }

    pub fn group_by_lane(&self, frames: &[FrameId]) -> HashMap<usize, Vec<FrameId>> {
        let mut by_lane: HashMap<usize, Vec<FrameId>> = HashMap::new();
        for id in frames {
            by_lane.entry(self.lane_of(&id.agent_id)).or_default().push(*id);
        }
        by_lane
    }

    /// Asks shard `lane` to hand these stacks out again.
    pub fn forget_stacks(&self, lane: usize, stacks: impl IntoIterator<Item = StackHash>) {
        if let Some(slot) = self.forgotten_stacks.get(lane) {
            slot.lock().unwrap_or_else(|p| p.into_inner()).extend(stacks);
        }
    }

    /// The stacks shard `lane` must forget, emptied.
    pub fn take_forgotten_stacks(&self, lane: usize) -> Vec<StackHash> {
        self.forgotten_stacks
            .get(lane)
            .map(|slot| std::mem::take(&mut *slot.lock().unwrap_or_else(|p| p.into_inner())))
            .unwrap_or_default()
    }

    /// Records whether the store answered the health checker just now.
    pub fn set_store_error(&self, error: Option<String>) {
        *self.ping_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        self.metrics.store_up.set(i64::from(self.store_error().is_none()));
    }

    /// Records whether the last write reached the store. A write that went
    /// through also proves the store reachable, clearing a failed ping.
    pub fn set_write_error(&self, error: Option<String>) {
        if error.is_none() {
            *self.ping_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        *self.write_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
        self.metrics.store_up.set(i64::from(self.store_error().is_none()));
    }

    /// Why the store is down: the last write failure if writes have not
    /// gone through since, else the last failed ping; `None` when up.
    pub fn store_error(&self) -> Option<String> {
        let write = self.write_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
        write.or_else(|| self.ping_error.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Whether [`Shared::halted`] is set.
    pub fn is_halted(&self) -> bool {
        self.halted.load(Ordering::SeqCst)
    }

    /// Sends acknowledgements, if a transport is attached.
    pub fn ack(&self, frames: &[FrameId]) {
        if frames.is_empty() || self.is_halted() {
            return;
        }
        self.pushed.committed(frames);
        let acker = self.acker.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(acker) = acker {
            acker.ack(frames);
        }
        self.metrics.writer_frames_acked.inc_by(frames.len() as u64);
    }

    /// Agents heard from within the idle time, by carrier; forgets older ones.
    pub fn connected_agents(&self) -> HashMap<Carrier, usize> {
        let mut out: HashMap<Carrier, usize> = CARRIERS.into_iter().map(|c| (c, 0)).collect();
        for i in 0..self.lanes.len() {
            let mut lane = self.lane(i);
            let idle = self.agent_idle;
            lane.agents.retain(|_, (_, seen)| seen.elapsed() < idle);
            for (carrier, _) in lane.agents.values() {
                *out.entry(*carrier).or_default() += 1;
            }
        }
        out
    }
}

/// Maps an agent id to one of `lanes` lanes. Agent ids are random, but the
/// bytes are mixed anyway so that ids differing in one byte spread.
pub fn lane_of(agent_id: &AgentId, lanes: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent_id.0 {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_spread_and_are_stable() {
        let mut hits = [0usize; 4];
        for i in 0..=255u8 {
            let mut id = AgentId::default();
            id.0[15] = i;
            let lane = lane_of(&id, 4);
            assert_eq!(lane, lane_of(&id, 4));
            hits[lane] += 1;
        }
        assert!(hits.iter().all(|&h| h > 30), "{hits:?}");
    }

    #[test]
    fn buffer_accounting_saturates_and_reports_high_water() {
        let b = Buffer::new(100, 80);
        b.charge(79);
        assert!(!b.above_high_water());
        b.charge(1);
        assert!(b.above_high_water());
        b.release(1000);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn admission_keeps_within_the_capacity_and_parked_frames_count_as_held() {
        let b = Buffer::new(100, 80);
        assert!(b.admits(500), "an empty pipeline takes any frame");
        b.charge(50);
        assert!(b.admits(50));
        assert!(!b.admits(51), "below high water but over the capacity once added");
        b.park(40);
        assert_eq!(b.used(), 90);
        assert!(b.above_high_water(), "parked frames are held memory");
        assert!(b.admits(10), "but do not block admission: they are in memory already");
        b.unpark(40);
        assert_eq!(b.used(), 50);
    }
}
