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
//! Back-pressure: while the pipeline is above its high-water mark, or the
//! frame would take it past its capacity, or a shard queue is full, `admit`
//! answers [`Admission::Busy`] and takes nothing; the transport withholds
//! credit, keeps the frame parked to offer it again (within
//! `limits.max_parked_size` for all sessions together; beyond it the session
//! is closed), and the agent keeps it too. Parked frames are memory the aggregator holds, so they are counted
//! in the buffer (see [`super::state::Buffer`]) from the `Busy` answer until
//! they are offered again, or for at most [`PARKED_TTL`] if their session
//! ended. Nothing is dropped silently: every outcome is counted in
//! `aperture_ingress_frames_total{result}`.
//!
//! [`IngressSink`], [`ReceivedFrame`] and [`Admission`] are the transport
//! crate's server API (`aperture_transport::server`); the transport calls
//! `admit` from its session tasks, so it never blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_core::frame::FrameId;
use aperture_core::ledger::{Admit, RunKey};
use aperture_core::model::ProfileBatch;
use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use super::shard::ShardInput;
use super::state::{RunCheck, Shared};
use crate::metrics::frame_result;
use crate::store::Store;

pub use aperture_transport::Carrier;
pub use aperture_transport::server::{Admission, IngressSink, PeerInfo, ReceivedFrame};

/// How long a frame answered `Busy` counts as parked if it is not offered
/// again (its session ended). The transport offers parked frames again
/// every 200 ms by default.
pub const PARKED_TTL: Duration = Duration::from_secs(30);
/// Parked frames tracked at most; beyond, they are not counted.
const MAX_PARKED: usize = 1 << 16;

/// Frames answered `Busy` and their size, with when they were last offered.
#[derive(Debug)]
struct Parked {
    frames: HashMap<FrameId, (usize, Instant)>,
    swept: Instant,
}

/// The ingress: an [`IngressSink`] feeding the shard threads.
#[derive(Debug)]
pub struct ShardedIngress {
    shared: Arc<Shared>,
    queues: Vec<Sender<ShardInput>>,
    closed: AtomicBool,
    parked: Mutex<Parked>,
    /// Where runs to look up in the store go ([`check_runs`]); `None`: the
    /// lanes' ledgers answer alone.
    checks: Option<UnboundedSender<(usize, RunKey)>>,
}

impl ShardedIngress {
    pub(crate) fn new(
        shared: Arc<Shared>,
        queues: Vec<Sender<ShardInput>>,
        checks: Option<UnboundedSender<(usize, RunKey)>>,
    ) -> ShardedIngress {
        let parked = Mutex::new(Parked { frames: HashMap::new(), swept: Instant::now() });
        ShardedIngress { shared, queues, closed: AtomicBool::new(false), parked, checks }
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        // Plain data, consistent between statements: a poisoned lock is usable.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounts a frame answered `Busy` (once, however often it is offered).
    fn park(&self, id: FrameId, len: usize, now: Instant) {
        let mut parked = self.parked();
        if now.duration_since(parked.swept) >= Duration::from_secs(1) {
            parked.swept = now;
            let buffer = &self.shared.buffer;
            parked.frames.retain(|_, (n, seen)| {
                let keep = now.duration_since(*seen) < PARKED_TTL;
                if !keep {
                    buffer.unpark(*n);
                }
                keep
            });
        }
        if let Some((_, seen)) = parked.frames.get_mut(&id) {
            *seen = now;
        } else if parked.frames.len() < MAX_PARKED {
            parked.frames.insert(id, (len, now));
            self.shared.buffer.park(len);
        }
    }

    /// A frame is offered again: it is no longer parked.
    fn unpark(&self, id: &FrameId) {
        // Lock-free while nothing is parked, which is the normal case.
        if self.shared.buffer.parked() == 0 {
            return;
        }
        if let Some((len, _)) = self.parked().frames.remove(id) {
            self.shared.buffer.unpark(len);
        }
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

    /// Queues a pushed profile batch of about `charged` bytes like a frame,
    /// under the next frame id of this aggregator's push run. The receiver
    /// resolves once the rows are committed (or the batch was rejected);
    /// `Err(batch)` when the pipeline is too full to take it now.
    pub(crate) fn admit_profiles(
        &self,
        batch: ProfileBatch,
        charged: usize,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, ProfileBatch> {
        if self.closed.load(Ordering::Relaxed) || !self.shared.buffer.admits(charged) {
            return Err(batch);
        }
        let pushed = &self.shared.pushed;
        let id = pushed.next_id();
        let lane_index = self.shared.lane_of(&id.agent_id);
        {
            let mut lane = self.shared.lane(lane_index);
            // A run of this process alone: nothing of it can be stored yet.
            if lane.ledger.admit(id) != Admit::New {
                return Err(batch);
            }
            self.shared.buffer.charge(charged);
        }
        let done = pushed.wait(id);
        match self.queues[lane_index].try_send(ShardInput::Profiles { id, batch: Box::new(batch), charged }) {
            Ok(()) => {
                self.shared.metrics.ingress_bytes.inc_by(charged as u64);
                Ok(done)
            }
            Err(TrySendError::Full(input) | TrySendError::Disconnected(input)) => {
                pushed.forget(&id);
                self.shared.lane(lane_index).ledger.abandon(&[id]);
                self.shared.buffer.release(charged);
                match input {
                    ShardInput::Profiles { batch, .. } => Err(*batch),
                    _ => Err(ProfileBatch::default()),
                }
            }
        }
    }
}

/// Reads from the store the committed state of runs the ingress meets
/// after not serving them for a while ([`super::state::RUN_FRESH_FOR`]), and
/// merges it into their lane's ledger. With several replicas on one
/// database this is what keeps a frame another replica committed from
/// being admitted again. Runs until `stop` turns true or the ingress is dropped.
pub(crate) async fn check_runs(
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    mut runs: UnboundedReceiver<(usize, RunKey)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            next = runs.recv() => match next {
                Some(run) => run,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        // One query for every run waiting (many agents reconnect at once).
        let mut wanted = vec![first];
        while wanted.len() < MAX_RUNS_PER_CHECK {
            match runs.try_recv() {
                Ok(run) => wanted.push(run),
                Err(_) => break,
            }
        }
        let keys: Vec<RunKey> = wanted.iter().map(|(_, key)| *key).collect();
        let result = tokio::time::timeout(Duration::from_secs(5), store.load_runs(&keys)).await;
        let (mut found, ok) = match result {
            Ok(Ok(found)) => (found.into_iter().collect::<HashMap<_, _>>(), true),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, runs = keys.len(), "reading runs' committed frames failed; their frames wait");
                (HashMap::new(), false)
            }
            Err(_) => {
                tracing::warn!(runs = keys.len(), "reading runs' committed frames took over 5 s; their frames wait");
                (HashMap::new(), false)
            }
        };
        let now = Instant::now();
        for (lane, key) in wanted {
            shared.lane(lane).finish_check(key, found.remove(&key), ok, now);
        }
    }
}

/// Runs looked up in one store query at most.
const MAX_RUNS_PER_CHECK: usize = 512;

impl IngressSink for ShardedIngress {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        let id = frame.header.id;
        let charged = frame.bytes.len();
        self.unpark(&id);
        if self.closed.load(Ordering::Relaxed) || !self.shared.buffer.admits(charged) {
            self.park(id, charged, Instant::now());
            self.count(frame_result::BUSY);
            return Admission::Busy(frame);
        }
        let lane_index = self.shared.lane_of(&id.agent_id);
        {
            let now = Instant::now();
            let key = (id.agent_id, id.boot_id);
            let mut lane = self.shared.lane(lane_index);
            lane.heard_from(id.agent_id, frame.carrier, now);
            if let Some(checks) = &self.checks {
                let check = lane.run_check(&key, now);
                if check == RunCheck::Stale && checks.send((lane_index, key)).is_ok() {
                    lane.start_check(key);
                }
                if check != RunCheck::Fresh && lane.run_check(&key, now) == RunCheck::Checking {
                    // Offered again once the store said what it holds.
                    drop(lane);
                    self.park(id, charged, now);
                    self.count(frame_result::CHECKING);
                    return Admission::Busy(frame);
                }
            }
            lane.served(key, now);
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
                self.park(id, charged, Instant::now());
                self.count(frame_result::BUSY);
                match input {
                    ShardInput::Frame { bytes, .. } => Admission::Busy(ReceivedFrame { header, bytes, carrier, peer }),
                    // Only frames are sent by `admit`.
                    ShardInput::Stop | ShardInput::Profiles { .. } => Admission::Queued,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::pipeline::state::Buffer;
    use aperture_core::frame::{DecodeLimits, FrameHeader, encode_batch};
    use aperture_core::ids::{AgentId, BootId};
    use aperture_core::model::Batch;
    use crossbeam_channel::Receiver;

    fn received(seq: u64) -> ReceivedFrame {
        let id = FrameId { agent_id: AgentId([3; 16]), boot_id: BootId([4; 16]), sequence: seq };
        let batch = Batch { node: "n".repeat(500), ..Batch::default() };
        let bytes = encode_batch(&batch, id, 0, &DecodeLimits::default()).expect("encode");
        let header = FrameHeader::parse(&bytes, &DecodeLimits::default()).expect("header");
        let peer = Arc::new(PeerInfo {
            agent_id: id.agent_id,
            boot_id: id.boot_id,
            node: "n".into(),
            agent_version: "test".into(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
            carrier: Carrier::Grpc,
        });
        ReceivedFrame { header, bytes, carrier: Carrier::Grpc, peer }
    }

    /// An ingress with one lane whose queue holds `depth` frames (never drained
    /// unless the test does), over a buffer of `capacity` bytes without a
    /// lower high-water mark.
    fn ingress(capacity: usize, depth: usize) -> (ShardedIngress, Arc<Shared>, Receiver<ShardInput>) {
        let buffer = Buffer::new(capacity, capacity);
        let shared = Arc::new(Shared::new(1, 16, buffer, Metrics::new().expect("metrics"), Duration::from_secs(60)));
        let (tx, rx) = crossbeam_channel::bounded(depth);
        (ShardedIngress::new(Arc::clone(&shared), vec![tx], None), shared, rx)
    }

    #[test]
    fn a_frame_that_would_pass_the_capacity_is_refused_below_high_water() {
        let len = received(1).bytes.len();
        let (ingress, shared, _rx) = ingress(len + len / 2, 16);
        assert!(matches!(ingress.admit(received(1)), Admission::Queued));
        assert!(!shared.buffer.above_high_water());
        assert!(matches!(ingress.admit(received(2)), Admission::Busy(_)), "two frames do not fit");
        assert!(shared.buffer.pipeline() <= shared.buffer.capacity());
    }

    #[test]
    fn busy_frames_count_as_held_until_offered_again() {
        let len = received(1).bytes.len();
        let (ingress, shared, rx) = ingress(1 << 20, 1);
        assert!(matches!(ingress.admit(received(1)), Admission::Queued));
        // The queue is full: frame 2 is refused and parked by the transport.
        assert!(matches!(ingress.admit(received(2)), Admission::Busy(_)));
        assert_eq!(shared.buffer.used(), 2 * len, "the parked frame is held memory");
        assert!(matches!(ingress.admit(received(2)), Admission::Busy(_)));
        assert_eq!(shared.buffer.used(), 2 * len, "counted once however often it is offered");
        // The shard takes frame 1 and folds it.
        match rx.try_recv() {
            Ok(ShardInput::Frame { charged, .. }) => shared.buffer.release(charged),
            other => panic!("expected frame 1, got {other:?}"),
        }
        assert!(matches!(ingress.admit(received(2)), Admission::Queued));
        assert_eq!(shared.buffer.parked(), 0);
        assert_eq!(shared.buffer.used(), len);
    }

    #[test]
    fn parked_frames_of_ended_sessions_stop_counting_after_the_ttl() {
        let (ingress, shared, _rx) = ingress(1 << 20, 1);
        let t0 = Instant::now();
        ingress.park(FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([1; 16]), sequence: 1 }, 100, t0);
        assert_eq!(shared.buffer.parked(), 100);
        // Another frame parked after the TTL sweeps the first one out.
        ingress.park(
            FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([1; 16]), sequence: 2 },
            10,
            t0 + PARKED_TTL,
        );
        assert_eq!(shared.buffer.parked(), 10);
    }
}
