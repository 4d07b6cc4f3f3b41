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

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use aperture_core::ledger::Admit;
use crossbeam_channel::{Sender, TrySendError};

use super::shard::ShardInput;
use super::state::Shared;
use crate::metrics::frame_result;

pub use aperture_transport::Carrier;
pub use aperture_transport::server::{Admission, IngressSink, PeerInfo, ReceivedFrame};

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
            lane.heard_from(id.agent_id, frame.carrier, Instant::now());
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
