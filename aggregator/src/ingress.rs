//! The ingress: where validated frames from the transport enter the
//! aggregator.
//!
//! [`ShardedIngress::admit`] is called by the transport for every frame. It
//! routes the frame to a shard by its agent id (so one agent's frames stay in
//! order on one shard thread), asks that lane's [`FrameLedger`] whether the
//! frame is new, and queues it on the shard's bounded queue. There is no
//! global lock: each lane has its own ledger behind its own mutex, locked
//! once per frame (not per event), and only agents hashed to the same lane
//! ever contend. Sharding the ledger by agent id works because a frame's
//! identity starts with its agent id, so every frame of a run meets the same
//! ledger.
//!
//! Back-pressure: while the buffer is above its high-water mark, or a shard
//! queue is full, `admit` answers [`Admission::Busy`] and takes nothing; the
//! transport withholds credit and the agent keeps the frame. Nothing is
//! dropped silently: every outcome is counted in
//! `aperture_ingress_frames_total{result}`.
//!
//! [`IngressSink`], [`ReceivedFrame`] and [`Admission`] are the transport
//! crate's server API (`aperture_transport::server`); the transport calls
//! `admit` from its session tasks, so it never blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aperture_core::frame::{FrameBuf, FrameId};
use aperture_core::ledger::{Admit, FrameLedger};
use crossbeam_channel::{Sender, TrySendError};

use crate::metrics::{Metrics, frame_result};

pub use aperture_transport::Carrier;
pub use aperture_transport::server::{Admission, IngressSink, PeerInfo, ReceivedFrame};

/// Every carrier, for reporting connected agents.
pub const CARRIERS: [Carrier; 2] = [Carrier::Quic, Carrier::Grpc];

/// What acknowledgements are sent through: the transport's
/// [`aperture_transport::server::Acker`], or a recorder in tests.
pub trait Acknowledge: Send + Sync + 'static {
    /// Acknowledges committed frames to their agents.
    fn ack(&self, frames: &[FrameId]);
}

impl Acknowledge for aperture_transport::server::Acker {
    fn ack(&self, frames: &[FrameId]) {
        // Frames of agents no longer connected are not delivered; they resend
        // and get `AlreadyCommitted`.
        let _delivered = aperture_transport::server::Acker::ack(self, frames);
    }
}

/// Bytes held between the ingress and the store, against a capacity.
#[derive(Debug)]
pub struct Buffer {
    used: AtomicUsize,
    capacity: usize,
    high_water: usize,
}

impl Buffer {
    /// A buffer of `capacity` bytes that pushes back above `high_water`.
    pub fn new(capacity: usize, high_water: usize) -> Buffer {
        Buffer { used: AtomicUsize::new(0), capacity, high_water: high_water.min(capacity) }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Configured capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The push-back level.
    pub fn high_water(&self) -> usize {
        self.high_water
    }

    /// Whether the ingress is pushing back.
    pub fn above_high_water(&self) -> bool {
        self.used() >= self.high_water
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
}

/// One lane: the ledger of the agents routed to one shard, and when each
/// of them was last heard from.
#[derive(Debug)]
pub(crate) struct Lane {
    pub ledger: FrameLedger,
    agents: HashMap<[u8; 16], (Carrier, Instant)>,
}

/// A frame queued to a shard thread.
#[derive(Debug)]
pub(crate) enum ShardInput {
    /// A frame to fold in; `charged` bytes were accounted for it.
    Frame { id: FrameId, bytes: FrameBuf, charged: usize },
    /// Flush everything and stop.
    Stop,
}

/// State shared by the ingress, the shard threads and the writer.
#[derive(Debug)]
pub(crate) struct Shared {
    pub lanes: Vec<Mutex<Lane>>,
    pub buffer: Buffer,
    pub metrics: Metrics,
    pub acker: Mutex<Option<Arc<dyn Acknowledge>>>,
    pub agent_idle: Duration,
    /// Set by [`crate::AggregatorHandle::abort`]: threads stop at once and
    /// write nothing more, as if the process had died.
    pub halted: AtomicBool,
    /// The last store failure seen by the writer or the health checker;
    /// `None` once either reached the store again.
    pub store_error: Mutex<Option<String>>,
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
                    })
                })
                .collect(),
            buffer,
            metrics,
            acker: Mutex::new(None),
            agent_idle,
            halted: AtomicBool::new(false),
            store_error: Mutex::new(None),
        }
    }

    /// The lane of an agent.
    pub fn lane_of(&self, agent_id: &[u8; 16]) -> usize {
        lane_of(agent_id, self.lanes.len())
    }

    pub fn lane(&self, i: usize) -> MutexGuard<'_, Lane> {
        // The lane holds plain data that stays consistent between statements,
        // so a lock poisoned by a panicking holder is still usable.
        self.lanes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks frames committed in their lanes' ledgers.
    pub fn commit(&self, frames: &[FrameId]) {
        for (lane, ids) in self.group_by_lane(frames) {
            self.lane(lane).ledger.commit(&ids);
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

    /// Records whether the store was reachable just now.
    pub fn set_store_error(&self, error: Option<String>) {
        self.metrics.store_up.set(i64::from(error.is_none()));
        *self.store_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    /// The last store failure, if the store has not been reached since.
    pub fn store_error(&self) -> Option<String> {
        self.store_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
pub fn lane_of(agent_id: &[u8; 16], lanes: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent_id {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % lanes.max(1) as u64) as usize
}

/// The ingress: an [`IngressSink`] feeding the shard threads.
#[derive(Debug)]
pub struct ShardedIngress {
    shared: Arc<Shared>,
    queues: Vec<Sender<ShardInput>>,
    closed: AtomicBool,
}

impl ShardedIngress {
    pub(crate) fn new(shared: Arc<Shared>, queues: Vec<Sender<ShardInput>>) -> ShardedIngress {
        ShardedIngress { shared, queues, closed: AtomicBool::new(false) }
    }

    /// Stops taking frames and tells every shard to flush and stop.
    pub(crate) fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for q in &self.queues {
            // Blocking send: the shard thread keeps draining its queue, so
            // this returns once there is room. An error means the thread
            // has already stopped, which is what we want.
            let _ = q.send(ShardInput::Stop);
        }
    }

    fn count(&self, result: &str) {
        self.shared.metrics.ingress_frames.with_label_values(&[result]).inc();
    }
}

impl IngressSink for ShardedIngress {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        let id = frame.header.id;
        if self.closed.load(Ordering::Relaxed) || self.shared.buffer.above_high_water() {
            self.count(frame_result::BUSY);
            return Admission::Busy(frame);
        }
        let lane_index = self.shared.lane_of(&id.agent_id);
        let charged = frame.bytes.len();
        {
            let mut lane = self.shared.lane(lane_index);
            if lane.agents.len() < 1 << 16 || lane.agents.contains_key(&id.agent_id) {
                lane.agents.insert(id.agent_id, (frame.carrier, Instant::now()));
            }
            match lane.ledger.admit(id) {
                Admit::Committed => {
                    drop(lane);
                    self.count(frame_result::COMMITTED);
                    return Admission::AlreadyCommitted;
                }
                Admit::InFlight => {
                    drop(lane);
                    self.count(frame_result::IN_FLIGHT);
                    return Admission::Queued;
                }
                Admit::New => {}
            }
            // Charged while the lane is held so that a racing admit of the
            // same frame sees it in flight and the buffer in one state.
            self.shared.buffer.charge(charged);
        }
        let ReceivedFrame { header, bytes, carrier, peer } = frame;
        match self.queues[lane_index].try_send(ShardInput::Frame { id, bytes, charged }) {
            Ok(()) => {
                self.shared.metrics.ingress_bytes.inc_by(charged as u64);
                self.count(frame_result::QUEUED);
                Admission::Queued
            }
            Err(TrySendError::Full(input) | TrySendError::Disconnected(input)) => {
                self.shared.lane(lane_index).ledger.abandon(&[id]);
                self.shared.buffer.release(charged);
                self.count(frame_result::BUSY);
                match input {
                    ShardInput::Frame { bytes, .. } => Admission::Busy(ReceivedFrame { header, bytes, carrier, peer }),
                    // Only frames are sent by `admit`.
                    ShardInput::Stop => Admission::Queued,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_spread_and_are_stable() {
        let mut hits = [0usize; 4];
        for i in 0..=255u8 {
            let mut id = [0u8; 16];
            id[15] = i;
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
}
