//! Reusable batches of decoded event records.
//!
//! A [`RecordBatch`] holds fixed-size [`EventRecord`]s and one flat vector of
//! stack addresses they index into, so decoding an event allocates nothing
//! once the batch's vectors have grown to their working size. Batches are
//! handed to the caller's [`crate::reader::BatchSink`] and may be given back
//! for reuse.

use std::ops::Range;

use aperture_core::ring::Weighted;

use crate::abi::{EventKind, MAX_FRAMES, RawEvent};
use crate::reader::ring::SplitBytes;

/// One decoded event: the record header and where its stacks are in
/// [`RecordBatch::frames`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// The header as the program wrote it.
    pub raw: RawEvent,
    /// What the record describes (checked when decoding).
    pub kind: EventKind,
    /// Index of the first kernel frame in [`RecordBatch::frames`]; the
    /// kernel frames (`raw.n_kernel`) are followed by the user frames
    /// (`raw.n_user`). Both leaf first.
    pub frames_start: u32,
}

impl EventRecord {
    /// Range of the kernel frames in [`RecordBatch::frames`].
    pub fn kernel_range(&self) -> Range<usize> {
        let s = self.frames_start as usize;
        s..s + usize::from(self.raw.n_kernel)
    }

    /// Range of the user frames in [`RecordBatch::frames`].
    pub fn user_range(&self) -> Range<usize> {
        let s = self.frames_start as usize + usize::from(self.raw.n_kernel);
        s..s + usize::from(self.raw.n_user)
    }
}

/// Why a sample could not be decoded (counted, never fatal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header or than the stacks it announces.
    Truncated,
    /// An `ap_event.kind` this build does not know.
    UnknownKind(u16),
    /// More frames than `AP_MAX_FRAMES` on one side.
    TooManyFrames,
}

/// Events decoded from the perf buffers during one wakeup of the reader.
#[derive(Clone, Debug, Default)]
pub struct RecordBatch {
    /// The events, in the order read (per CPU in time order; CPUs interleave).
    pub events: Vec<EventRecord>,
    /// Stack addresses of all events, see [`EventRecord::frames_start`].
    pub frames: Vec<u64>,
    /// Records the kernel reported lost (perf buffer full) while this batch
    /// was read.
    pub lost: u64,
    /// Samples that could not be decoded while this batch was read.
    pub malformed: u64,
}

impl RecordBatch {
    /// An empty batch with room for `events` events of typical depth.
    pub fn with_capacity(events: usize) -> RecordBatch {
        RecordBatch {
            events: Vec::with_capacity(events),
            frames: Vec::with_capacity(events * 32),
            lost: 0,
            malformed: 0,
        }
    }

    /// Empties the batch and gives back memory beyond room for `events`
    /// events of typical depth (after a burst made it grow).
    pub fn clear_and_shrink(&mut self, events: usize) {
        self.clear();
        self.events.shrink_to(events);
        self.frames.shrink_to(events * 32);
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.events.clear();
        self.frames.clear();
        self.lost = 0;
        self.malformed = 0;
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch carries nothing (no event, no loss, no error).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.lost == 0 && self.malformed == 0
    }

    /// The kernel frames of `event`, leaf first.
    pub fn kernel_stack(&self, event: &EventRecord) -> &[u64] {
        self.frames.get(event.kernel_range()).unwrap_or(&[])
    }

    /// The user frames of `event`, leaf first.
    pub fn user_stack(&self, event: &EventRecord) -> &[u64] {
        self.frames.get(event.user_range()).unwrap_or(&[])
    }

    /// Decodes one raw sample (an `ap_event` and its frames) and appends it.
    pub fn push_sample(&mut self, raw: SplitBytes<'_>) -> Result<(), DecodeError> {
        let mut hdr = [0u8; size_of::<RawEvent>()];
        if !raw.copy_to(0, &mut hdr) {
            return Err(DecodeError::Truncated);
        }
        // SAFETY: RawEvent is repr(C), made only of integers and byte arrays
        // (every bit pattern is valid), and `hdr` is exactly its size;
        // read_unaligned has no alignment requirement.
        let ev: RawEvent = unsafe { std::ptr::read_unaligned(hdr.as_ptr().cast::<RawEvent>()) };
        let kind = EventKind::from_u16(ev.kind).ok_or(DecodeError::UnknownKind(ev.kind))?;
        let (nk, nu) = (usize::from(ev.n_kernel), usize::from(ev.n_user));
        if nk > MAX_FRAMES || nu > MAX_FRAMES {
            return Err(DecodeError::TooManyFrames);
        }
        let start = self.frames.len();
        if !raw.extend_u64(size_of::<RawEvent>(), nk + nu, &mut self.frames) {
            return Err(DecodeError::Truncated);
        }
        self.events.push(EventRecord { raw: ev, kind, frames_start: start as u32 });
        Ok(())
    }
}

impl Weighted for RecordBatch {
    fn weight(&self) -> u64 {
        self.events.len() as u64
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes an `ap_event` with the given stacks as a program would.
    pub(crate) fn encode(ev: &RawEvent, kernel: &[u64], user: &[u64]) -> Vec<u8> {
        let mut ev = *ev;
        ev.n_kernel = kernel.len() as u16;
        ev.n_user = user.len() as u16;
        let mut out = Vec::new();
        out.extend_from_slice(&ev.ts_ns.to_le_bytes());
        out.extend_from_slice(&ev.duration_ns.to_le_bytes());
        out.extend_from_slice(&ev.ret.to_le_bytes());
        out.extend_from_slice(&ev.addr.to_le_bytes());
        out.extend_from_slice(&ev.cgroup_id.to_le_bytes());
        for v in [ev.pid, ev.tid, ev.cpu, ev.arg] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [ev.kind, ev.n_kernel, ev.n_user, ev.pad] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&ev.comm);
        assert_eq!(out.len(), size_of::<RawEvent>());
        for a in kernel.iter().chain(user) {
            out.extend_from_slice(&a.to_le_bytes());
        }
        out
    }

    pub(crate) fn event(pid: u32, kind: EventKind) -> RawEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"test");
        RawEvent { ts_ns: 123, pid, tid: pid + 1, cpu: 1, kind: kind as u16, comm, ..Default::default() }
    }

    #[test]
    fn decodes_header_and_both_stacks() {
        let bytes = encode(&event(7, EventKind::Cpu), &[0xffff_0001, 0xffff_0002], &[0x401000, 0x402000, 0x403000]);
        let mut batch = RecordBatch::default();
        batch.push_sample(SplitBytes::new(&bytes[..50], &bytes[50..])).expect("decodes");
        let e = batch.events[0];
        assert_eq!(e.raw.pid, 7);
        assert_eq!(e.kind, EventKind::Cpu);
        assert_eq!(batch.kernel_stack(&e), &[0xffff_0001, 0xffff_0002]);
        assert_eq!(batch.user_stack(&e), &[0x401000, 0x402000, 0x403000]);
    }

    #[test]
    fn rejects_truncated_and_unknown_records() {
        let bytes = encode(&event(7, EventKind::Cpu), &[1, 2], &[3]);
        let mut batch = RecordBatch::default();
        let short = &bytes[..bytes.len() - 8];
        assert_eq!(batch.push_sample(SplitBytes::new(short, &[])), Err(DecodeError::Truncated));
        let mut unknown = event(7, EventKind::Cpu);
        unknown.kind = 99;
        let bytes = encode(&unknown, &[], &[]);
        assert_eq!(batch.push_sample(SplitBytes::new(&bytes, &[])), Err(DecodeError::UnknownKind(99)));
        assert!(batch.events.is_empty() && batch.frames.is_empty());
    }
}
