//! Server counters: hot ones as atomics, rare ones (by reason) behind a mutex.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::Carrier;
use crate::wire::quic::BytesGauge;

/// A snapshot of the server's counters. Counters only grow; `connected_*` are gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// Authenticated sessions open now on QUIC.
    pub connected_quic: u64,
    /// Authenticated sessions open now on gRPC.
    pub connected_grpc: u64,
    /// Sessions authenticated since start.
    pub sessions_opened: u64,
    /// Frames received and validated.
    pub frames_received: u64,
    /// Their bytes (header + payload).
    pub bytes_received: u64,
    /// Frames the sink queued.
    pub frames_queued: u64,
    /// Resent frames the sink had already committed (acknowledged at once).
    pub frames_already_committed: u64,
    /// Times the sink answered busy (the frame is retried later).
    pub frames_busy: u64,
    /// Frames ignored because their sequence was not above the session's last.
    pub frames_duplicate_in_session: u64,
    /// Frames that followed a skipped sequence (frames acked or dropped before a reconnect).
    pub sequence_gaps: u64,
    /// Frames acknowledged to clients.
    pub frames_acked: u64,
    /// Refused sessions, by [`crate::control::RejectReason`] label.
    pub rejections: BTreeMap<String, u64>,
    /// Frames or messages that failed to decode, by reason label (connection closed each time).
    pub decode_errors: BTreeMap<String, u64>,
    /// Ended sessions, by [`crate::control::CloseReason`] label (`peer_` prefix when the client ended it).
    pub sessions_closed: BTreeMap<String, u64>,
    /// Connections open now that have not authenticated yet (both carriers).
    pub unauthenticated_connections: u64,
    /// Connections that ended before authenticating: refused hello, stalled
    /// or malformed handshake, or the client went away.
    pub preauth_closed: u64,
    /// Connections refused at once because `max_unauthenticated` others were
    /// still authenticating.
    pub preauth_refused: u64,
    /// Bytes of frame buffers being filled by the carriers' readers now.
    pub frame_read_bytes: u64,
    /// The most [`frame_read_bytes`](Self::frame_read_bytes) ever held at once.
    pub frame_read_bytes_peak: u64,
    /// Bytes of frames held now because the sink refused them as busy.
    pub parked_bytes: u64,
    /// The most [`parked_bytes`](Self::parked_bytes) ever held at once.
    pub parked_bytes_peak: u64,
    /// Sessions closed because a busy frame did not fit in `parked_bytes`.
    pub sessions_overloaded: u64,
}

impl ServerStats {
    /// Total rejections of every reason.
    pub fn rejections_total(&self) -> u64 {
        self.rejections.values().sum()
    }

    /// Total decode errors of every reason.
    pub fn decode_errors_total(&self) -> u64 {
        self.decode_errors.values().sum()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connected_quic: AtomicU64,
    pub connected_grpc: AtomicU64,
    pub sessions_opened: AtomicU64,
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_queued: AtomicU64,
    pub frames_already_committed: AtomicU64,
    pub frames_busy: AtomicU64,
    pub frames_duplicate_in_session: AtomicU64,
    pub sequence_gaps: AtomicU64,
    pub frames_acked: AtomicU64,
    pub unauthenticated: AtomicU64,
    pub preauth_closed: AtomicU64,
    pub preauth_refused: AtomicU64,
    pub frame_reads: BytesGauge,
    pub parked: BytesGauge,
    pub sessions_overloaded: AtomicU64,
    by_reason: Mutex<ByReason>,
}

#[derive(Debug, Default)]
struct ByReason {
    rejections: BTreeMap<&'static str, u64>,
    decode_errors: BTreeMap<&'static str, u64>,
    sessions_closed: BTreeMap<String, u64>,
}

impl Counters {
    pub fn connected(&self, carrier: Carrier) -> &AtomicU64 {
        match carrier {
            Carrier::Quic => &self.connected_quic,
            Carrier::Grpc => &self.connected_grpc,
        }
    }

    fn with(&self, f: impl FnOnce(&mut ByReason)) {
        // A poisoned lock only means another thread panicked mid-increment;
        // the counts are still usable.
        let mut g = self.by_reason.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
    }

    pub fn rejection(&self, reason: &'static str) {
        self.with(|b| *b.rejections.entry(reason).or_default() += 1);
    }

    pub fn decode_error(&self, reason: &'static str) {
        self.with(|b| *b.decode_errors.entry(reason).or_default() += 1);
    }

    pub fn closed(&self, reason: &'static str, by_peer: bool) {
        let key = if by_peer { format!("peer_{reason}") } else { reason.to_owned() };
        self.with(|b| *b.sessions_closed.entry(key).or_default() += 1);
    }

    pub fn snapshot(&self) -> ServerStats {
        let mut s = ServerStats {
            connected_quic: self.connected_quic.load(Relaxed),
            connected_grpc: self.connected_grpc.load(Relaxed),
            sessions_opened: self.sessions_opened.load(Relaxed),
            frames_received: self.frames_received.load(Relaxed),
            bytes_received: self.bytes_received.load(Relaxed),
            frames_queued: self.frames_queued.load(Relaxed),
            frames_already_committed: self.frames_already_committed.load(Relaxed),
            frames_busy: self.frames_busy.load(Relaxed),
            frames_duplicate_in_session: self.frames_duplicate_in_session.load(Relaxed),
            sequence_gaps: self.sequence_gaps.load(Relaxed),
            frames_acked: self.frames_acked.load(Relaxed),
            unauthenticated_connections: self.unauthenticated.load(Relaxed),
            preauth_closed: self.preauth_closed.load(Relaxed),
            preauth_refused: self.preauth_refused.load(Relaxed),
            frame_read_bytes: self.frame_reads.now(),
            frame_read_bytes_peak: self.frame_reads.peak(),
            parked_bytes: self.parked.now(),
            parked_bytes_peak: self.parked.peak(),
            sessions_overloaded: self.sessions_overloaded.load(Relaxed),
            ..ServerStats::default()
        };
        self.with(|b| {
            s.rejections = b.rejections.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
            s.decode_errors = b.decode_errors.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
            s.sessions_closed = b.sessions_closed.clone();
        });
        s
    }
}
