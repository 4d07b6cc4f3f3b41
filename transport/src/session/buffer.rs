//! The client's bounded buffer of unacknowledged frames.

use std::collections::BTreeMap;
use std::sync::Arc;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader, FrameId, HEADER_LEN};
use aperture_core::ids::{AgentId, BootId};

/// A frame waiting for its acknowledgement.
#[derive(Debug)]
struct Entry {
    bytes: Arc<FrameBuf>,
    /// How many times it was handed to a carrier.
    sends: u32,
}

/// Frames kept until acknowledged, ordered by sequence, bounded in bytes.
/// When a new frame does not fit, the oldest frames are dropped (and counted)
/// to make room: recent data is worth more than old data to a profiler.
#[derive(Debug)]
pub struct UnackedBuffer {
    entries: BTreeMap<u64, Entry>,
    bytes: usize,
    limit: usize,
    agent_id: AgentId,
    boot_id: BootId,
    last_sequence: u64,
    max_frame_len: usize,
}

/// Why a frame was not taken into the buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    /// The bytes are not a frame with a valid header.
    #[error("not a valid frame: {0}")]
    InvalidFrame(#[source] aperture_core::frame::DecodeError),
    /// The buffer length does not match the header's announced length.
    #[error("frame buffer holds {actual} bytes but its header announces {announced}")]
    LengthMismatch {
        /// Header + payload length from the header.
        announced: usize,
        /// Bytes in the buffer.
        actual: usize,
    },
    /// The frame belongs to another agent or run than this client.
    #[error("frame is from agent/boot {found_agent}/{found_boot}, this client sends for {agent}/{boot}")]
    WrongIdentity {
        /// The client's agent id.
        agent: AgentId,
        /// The client's boot id.
        boot: BootId,
        /// The frame's agent id.
        found_agent: AgentId,
        /// The frame's boot id.
        found_boot: BootId,
    },
    /// Sequences must increase strictly.
    #[error("frame sequence {sequence} is not after the last one pushed ({last}); sequences must increase")]
    SequenceNotIncreasing {
        /// The frame's sequence.
        sequence: u64,
        /// The last sequence pushed.
        last: u64,
    },
    /// The frame alone is larger than the whole buffer or the frame limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes; build smaller batches or raise the limit")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// The smaller of the buffer size and the frame limit.
        limit: usize,
    },
}

/// What pushing one frame did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushReport {
    /// Oldest frames dropped to make room.
    pub dropped_frames: u64,
    /// Their bytes.
    pub dropped_bytes: u64,
}

impl UnackedBuffer {
    /// An empty buffer for frames of one agent run.
    pub fn new(agent_id: AgentId, boot_id: BootId, limit_bytes: usize, max_frame_len: usize) -> UnackedBuffer {
        UnackedBuffer {
            entries: BTreeMap::new(),
            bytes: 0,
            limit: limit_bytes,
            agent_id,
            boot_id,
            last_sequence: 0,
            max_frame_len,
        }
    }

    /// Takes a frame, dropping the oldest frames if it does not fit otherwise.
    pub fn push(&mut self, frame: FrameBuf) -> Result<(FrameId, PushReport), PushError> {
        let limits = DecodeLimits { max_payload: self.max_frame_len.saturating_sub(HEADER_LEN) };
        let limit = self.limit.min(self.max_frame_len);
        let header = FrameHeader::parse(&frame, &limits).map_err(|e| match e {
            aperture_core::frame::DecodeError::Oversized { len, .. } => {
                PushError::TooLarge { len: len.saturating_add(HEADER_LEN), limit }
            }
            e => PushError::InvalidFrame(e),
        })?;
        if header.frame_len() != frame.len() {
            return Err(PushError::LengthMismatch { announced: header.frame_len(), actual: frame.len() });
        }
        let id = header.id;
        if id.agent_id != self.agent_id || id.boot_id != self.boot_id {
            return Err(PushError::WrongIdentity {
                agent: self.agent_id,
                boot: self.boot_id,
                found_agent: id.agent_id,
                found_boot: id.boot_id,
            });
        }
        if id.sequence <= self.last_sequence {
            return Err(PushError::SequenceNotIncreasing { sequence: id.sequence, last: self.last_sequence });
        }
        if frame.len() > limit {
            return Err(PushError::TooLarge { len: frame.len(), limit });
        }
        let mut report = PushReport::default();
        while self.bytes + frame.len() > self.limit {
            let Some((_, old)) = self.entries.pop_first() else { break };
            self.bytes -= old.bytes.len();
            report.dropped_frames += 1;
            report.dropped_bytes += old.bytes.len() as u64;
        }
        self.last_sequence = id.sequence;
        self.bytes += frame.len();
        self.entries.insert(id.sequence, Entry { bytes: Arc::new(frame), sends: 0 });
        Ok((id, report))
    }

    /// Forgets acknowledged frames in `first..=last`; returns how many were held.
    pub fn ack_range(&mut self, first: u64, last: u64) -> u64 {
        let seqs: Vec<u64> = self.entries.range(first..=last).map(|(s, _)| *s).collect();
        for s in &seqs {
            if let Some(e) = self.entries.remove(s) {
                self.bytes -= e.bytes.len();
            }
        }
        seqs.len() as u64
    }

    /// The first held frame with a sequence `>= from`, marked as sent once more.
    /// Returns its sequence, bytes and whether it had been sent before.
    pub fn next_to_send(&mut self, from: u64) -> Option<(u64, Arc<FrameBuf>, bool)> {
        let (seq, entry) = self.entries.range_mut(from..).next()?;
        let resend = entry.sends > 0;
        entry.sends = entry.sends.saturating_add(1);
        Some((*seq, Arc::clone(&entry.bytes), resend))
    }

    /// Drops every held frame with a sequence `>= from` longer than
    /// `max_len` bytes; returns how many frames and bytes went.
    pub fn drop_longer_than(&mut self, from: u64, max_len: usize) -> (u64, u64) {
        let seqs: Vec<u64> =
            self.entries.range(from..).filter(|(_, e)| e.bytes.len() > max_len).map(|(s, _)| *s).collect();
        let mut bytes = 0;
        for s in &seqs {
            if let Some(e) = self.entries.remove(s) {
                self.bytes -= e.bytes.len();
                bytes += e.bytes.len() as u64;
            }
        }
        (seqs.len() as u64, bytes)
    }

    /// Length of the first held frame with a sequence `>= from`.
    pub fn peek_len(&self, from: u64) -> Option<usize> {
        self.entries.range(from..).next().map(|(_, e)| e.bytes.len())
    }

    /// Ids of every held frame, in order.
    pub fn ids(&self) -> Vec<FrameId> {
        self.entries
            .keys()
            .map(|&sequence| FrameId { agent_id: self.agent_id, boot_id: self.boot_id, sequence })
            .collect()
    }

    /// Frames held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Agent id of the frames.
    pub fn agent_id(&self) -> AgentId {
        self.agent_id
    }

    /// Boot id of the frames.
    pub fn boot_id(&self) -> BootId {
        self.boot_id
    }
}
