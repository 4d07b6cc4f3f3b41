//! The frame format: the wire contract between agent and aggregator.
//!
//! A frame is a fixed 64-byte header followed by a payload. For
//! [`FrameKind::Batch`] the payload is an rkyv 0.8 archive of a
//! [`Batch`](crate::model::Batch) (format features pinned in the workspace
//! manifest: little-endian, aligned, 32-bit relative pointers), read in place
//! after validation. All integers are little-endian.
//!
//! | offset | size | field          | meaning                                                     |
//! |-------:|-----:|----------------|-------------------------------------------------------------|
//! | 0      | 4    | `magic`        | `b"APF\x01"` ([`MAGIC`])                                    |
//! | 4      | 2    | `version`      | format version, [`FORMAT_VERSION`]; others are rejected      |
//! | 6      | 2    | `kind`         | [`FrameKind`] as `u16`                                       |
//! | 8      | 4    | `payload_len`  | bytes following the header                                   |
//! | 12     | 4    | `flags`        | reserved, must be 0                                          |
//! | 16     | 16   | `agent_id`     | random id the agent keeps across restarts (UUID bytes)       |
//! | 32     | 16   | `boot_id`      | id of this agent process run; sequence restarts with it      |
//! | 48     | 8    | `sequence`     | position of the frame in this run, from 1, gap-free          |
//! | 56     | 8    | `sent_unix_ns` | agent wall clock when the frame was built                    |
//!
//! The payload starts at offset 64, so a frame held in a 16-byte aligned
//! buffer (see [`FrameBuf`]) has an aligned archive. Decoding never trusts
//! the bytes: the header is checked field by field, the payload length
//! against both the buffer and a configurable limit, and the archive with
//! rkyv's validator (`access`, never `access_unchecked`).
//!
//! Enum fields are validated too: a value this build does not know (a newer
//! agent's [`LockKind`](crate::model::LockKind), say) makes the whole frame
//! invalid. Enums only ever gain values with new numbers, so a newer
//! aggregator reads every older agent. The other way round, a value added
//! after the first release is sent only to an aggregator that announces it
//! reads it (a capability in the session's welcome, see
//! `aperture_transport::control`); for the lock classes (kinds 5..=9), the
//! transport client rewrites a frame for an aggregator that does not with
//! [`downgrade_lock_classes`], so agents and aggregators are upgraded in any
//! order.

use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::ids::{AgentId, BootId};
use crate::model::{ArchivedBatch, ArchivedLockKind, Batch, LockKind};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"APF\x01";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Default limit on a payload's size.
pub const DEFAULT_MAX_PAYLOAD: usize = 4 * 1024 * 1024;
/// Alignment a payload needs to be read in place.
pub const PAYLOAD_ALIGN: usize = 16;

/// An aligned byte buffer holding one whole frame.
pub type FrameBuf = AlignedVec<PAYLOAD_ALIGN>;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// An archived [`Batch`].
    Batch = 1,
}

impl FrameKind {
    fn from_u16(v: u16) -> Option<FrameKind> {
        match v {
            1 => Some(FrameKind::Batch),
            _ => None,
        }
    }
}

/// Identity of a frame across the whole fleet: which agent, which run of it,
/// which position in that run. Used to acknowledge and to de-duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FrameId {
    /// Agent identity (stable across restarts).
    pub agent_id: AgentId,
    /// Agent run identity.
    pub boot_id: BootId,
    /// Sequence number in the run, from 1.
    pub sequence: u64,
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload is.
    pub kind: FrameKind,
    /// Length of the payload in bytes.
    pub payload_len: u32,
    /// Who sent the frame and where it stands in their stream.
    pub id: FrameId,
    /// Agent wall clock when the frame was built, Unix ns.
    pub sent_unix_ns: u64,
}

/// Limits applied while decoding untrusted bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest payload accepted, bytes.
    pub max_payload: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_payload: DEFAULT_MAX_PAYLOAD }
    }
}

/// Why bytes were not accepted as a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the header or than the header says the payload has.
    #[error("truncated frame: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// More bytes than the header announces (the frame boundary is wrong).
    #[error("frame has {extra} bytes after its payload")]
    TrailingBytes {
        /// Bytes after the payload.
        extra: usize,
    },
    /// The payload exceeds the configured limit.
    #[error("frame payload of {len} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Announced payload length.
        len: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The bytes do not start with [`MAGIC`]: not an Aperture frame.
    #[error("bad magic {found:02x?}: not an Aperture frame")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A format version this build does not read.
    #[error("unsupported frame format version {found} (this build reads version {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
    },
    /// A frame kind this build does not know.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// Kind in the header.
        found: u16,
    },
    /// Reserved header bits are set.
    #[error("reserved header flags {found:#x} are set")]
    ReservedFlags {
        /// The flags word.
        found: u32,
    },
    /// The buffer is not aligned for in-place reading (a caller bug, not bad input).
    #[error("frame buffer is not {PAYLOAD_ALIGN}-byte aligned; receive into a FrameBuf")]
    Misaligned,
    /// The payload is not a valid archive of the announced kind.
    #[error("invalid archive: {reason}")]
    InvalidArchive {
        /// What the validator reported.
        reason: String,
    },
}

impl DecodeError {
    /// A short stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::BadMagic { .. } => "bad_magic",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
            DecodeError::UnknownKind { .. } => "unknown_kind",
            DecodeError::ReservedFlags { .. } => "reserved_flags",
            DecodeError::Misaligned => "misaligned",
            DecodeError::InvalidArchive { .. } => "invalid_archive",
        }
    }
}

/// Why a batch could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The archive would exceed what a frame may carry.
    #[error("batch archive of {len} bytes exceeds the frame limit of {limit} bytes; flush smaller batches")]
    TooLarge {
        /// Archive size.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// rkyv failed to serialize.
    #[error("serializing batch: {0}")]
    Serialize(#[from] rancor::Error),
}

impl FrameHeader {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn write(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
        out[16..32].copy_from_slice(&self.id.agent_id.0);
        out[32..48].copy_from_slice(&self.id.boot_id.0);
        out[48..56].copy_from_slice(&self.id.sequence.to_le_bytes());
        out[56..64].copy_from_slice(&self.sent_unix_ns.to_le_bytes());
    }

    /// Parses and checks a header; `limits` bounds the announced payload, so
    /// a reader can allocate for the payload safely after this returns.
    pub fn parse(bytes: &[u8], limits: &DecodeLimits) -> Result<FrameHeader, DecodeError> {
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Truncated { needed: HEADER_LEN, available: bytes.len() });
        };
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion { found: version });
        }
        let kind_raw = u16::from_le_bytes([h[6], h[7]]);
        let kind = FrameKind::from_u16(kind_raw).ok_or(DecodeError::UnknownKind { found: kind_raw })?;
        let payload_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        let flags = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if flags != 0 {
            return Err(DecodeError::ReservedFlags { found: flags });
        }
        if payload_len as usize > limits.max_payload {
            return Err(DecodeError::Oversized { len: payload_len as usize, limit: limits.max_payload });
        }
        let mut agent_id = AgentId::default();
        agent_id.0.copy_from_slice(&h[16..32]);
        let mut boot_id = BootId::default();
        boot_id.0.copy_from_slice(&h[32..48]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&h[48..56]);
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&h[56..64]);
        Ok(FrameHeader {
            kind,
            payload_len,
            id: FrameId { agent_id, boot_id, sequence: u64::from_le_bytes(seq) },
            sent_unix_ns: u64::from_le_bytes(sent),
        })
    }

    /// Total frame length: header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Encodes `batch` as a complete frame into an aligned buffer.
pub fn encode_batch(
    batch: &Batch,
    id: FrameId,
    sent_unix_ns: u64,
    limits: &DecodeLimits,
) -> Result<FrameBuf, EncodeError> {
    let mut out = FrameBuf::with_capacity(HEADER_LEN + 4096);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    // Serialize straight after the header: the writer keeps archive
    // positions relative to the start of the archive, and the header length
    // is a multiple of the alignment, so the payload lands aligned.
    let payload = rkyv::api::high::to_bytes_in::<_, rancor::Error>(batch, AlignedVec::<PAYLOAD_ALIGN>::new())?;
    let len = payload.len();
    if len > limits.max_payload || len > u32::MAX as usize {
        return Err(EncodeError::TooLarge { len, limit: limits.max_payload });
    }
    out.extend_from_slice(&payload);
    let header = FrameHeader { kind: FrameKind::Batch, payload_len: len as u32, id, sent_unix_ns };
    let mut h = [0u8; HEADER_LEN];
    header.write(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    Ok(out)
}

/// A validated frame borrowed from its buffer.
#[derive(Debug)]
pub struct FrameView<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The archived batch, read in place.
    pub batch: &'a ArchivedBatch,
}

/// Validates one complete frame (header, length, archive) and returns a view
/// of it without copying. `bytes` must be exactly one frame and start at a
/// [`PAYLOAD_ALIGN`]-aligned address (a [`FrameBuf`] is).
pub fn decode<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<FrameView<'a>, DecodeError> {
    let header = FrameHeader::parse(bytes, limits)?;
    let needed = header.frame_len();
    if bytes.len() < needed {
        return Err(DecodeError::Truncated { needed, available: bytes.len() });
    }
    if bytes.len() > needed {
        return Err(DecodeError::TrailingBytes { extra: bytes.len() - needed });
    }
    if !(bytes.as_ptr() as usize).is_multiple_of(PAYLOAD_ALIGN) {
        return Err(DecodeError::Misaligned);
    }
    let payload = &bytes[HEADER_LEN..];
    let batch = rkyv::access::<ArchivedBatch, rancor::Error>(payload)
        .map_err(|e| DecodeError::InvalidArchive { reason: e.to_string() })?;
    Ok(FrameView { header, batch })
}

/// Copies received bytes into an aligned buffer (for carriers that cannot
/// receive into one directly) and decodes them.
pub fn decode_unaligned(bytes: &[u8], limits: &DecodeLimits) -> Result<(FrameHeader, Batch), DecodeError> {
    // Check the header before copying so an oversized frame costs nothing.
    FrameHeader::parse(bytes, limits)?;
    let mut buf = FrameBuf::with_capacity(bytes.len());
    buf.extend_from_slice(bytes);
    let view = decode(&buf, limits)?;
    let batch = rkyv::deserialize::<Batch, rancor::Error>(view.batch)
        .map_err(|e| DecodeError::InvalidArchive { reason: e.to_string() })?;
    Ok((view.header, batch))
}

// The archived lock kind is the single `repr(u8)` byte that
// `downgrade_lock_classes` rewrites in place.
const _: () = assert!(std::mem::size_of::<ArchivedLockKind>() == 1);

/// A copy of `frame` in which every lock wait of a futex class (kinds 5..=9,
/// [`LockKind::is_futex_class`]) reads [`LockKind::Futex`], for an
/// aggregator that does not read lock classes; `Ok(None)` when the frame has
/// none (send it as it is).
///
/// The frame is validated first, then the kind bytes are rewritten in place
/// in the copy: the archive keeps its layout and length (so the credit the
/// frame costs does not change), and nothing else in it changes. Waits that
/// differed only by class are not merged; a reader adds them up as it adds
/// up waits of several batches. `frame` must be aligned like a [`FrameBuf`].
pub fn downgrade_lock_classes(frame: &[u8], limits: &DecodeLimits) -> Result<Option<FrameBuf>, DecodeError> {
    let view = decode(frame, limits)?;
    let base = frame.as_ptr() as usize;
    let offsets: Vec<usize> = view
        .batch
        .locks
        .iter()
        .filter(|w| w.kind.to_native().is_futex_class())
        // The field lies inside `frame` (the view borrows it), so this is
        // its offset from the frame's start.
        .map(|w| std::ptr::from_ref(&w.kind) as usize - base)
        .collect();
    if offsets.is_empty() {
        return Ok(None);
    }
    let mut out = FrameBuf::with_capacity(frame.len());
    out.extend_from_slice(frame);
    for at in offsets {
        out[at] = LockKind::Futex as u8;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use proptest::prelude::*;

    fn id(seq: u64) -> FrameId {
        FrameId { agent_id: AgentId([7; 16]), boot_id: BootId([9; 16]), sequence: seq }
    }

    pub(crate) fn sample_batch() -> Batch {
        let stack = Stack::new(vec![
            StackFrame {
                address: 0x401000,
                module_offset: 0x1000,
                symbol: "burn".into(),
                module: "app".into(),
                file: "app.c".into(),
                line: 12,
                kernel: false,
            },
            StackFrame { address: 0x402000, symbol: "main".into(), module: "app".into(), ..Default::default() },
        ]);
        Batch {
            node: "node-a".into(),
            targets: vec![Target {
                pid: 42,
                process: "app".into(),
                namespace: "default".into(),
                pod: "app-0".into(),
                container: "app".into(),
            }],
            stacks: vec![stack],
            cpu: vec![CpuSample {
                time_ns: 1_700_000_000_000_000_000,
                target: 0,
                stack: 0,
                count: 17,
                period_ns: 10_101_010,
            }],
            locks: vec![LockWait {
                time_ns: 1,
                target: 0,
                stack: 0,
                kind: LockKind::Futex,
                count: 3,
                wait_ns: 3_000,
                max_wait_ns: 2_000,
            }],
            syscalls: vec![SyscallStat {
                time_ns: 2,
                target: 0,
                nr: 0,
                name: "read".into(),
                count: 10,
                errors: 1,
                total_ns: 5_000,
                histogram: [1; LATENCY_BUCKETS],
            }],
            slow_calls: vec![SlowCall {
                time_ns: 3,
                target: 0,
                tid: 43,
                stack: 0,
                nr: 35,
                name: "nanosleep".into(),
                duration_ns: 20_000_000,
                ret: 0,
            }],
        }
    }

    fn encode(b: &Batch, seq: u64) -> FrameBuf {
        encode_batch(b, id(seq), 5, &DecodeLimits::default()).expect("encode")
    }

    #[test]
    fn round_trip_reads_in_place() {
        let b = sample_batch();
        let buf = encode(&b, 3);
        let view = decode(&buf, &DecodeLimits::default()).expect("decode");
        assert_eq!(view.header.id, id(3));
        assert_eq!(view.header.sent_unix_ns, 5);
        assert_eq!(view.header.frame_len(), buf.len());
        assert_eq!(view.batch.node.as_str(), "node-a");
        assert_eq!(view.batch.cpu[0].count.to_native(), 17);
        let back: Batch = rkyv::deserialize::<Batch, rancor::Error>(view.batch).expect("deserialize");
        assert_eq!(back, b);
    }

    #[test]
    fn truncated_frames_are_rejected() {
        let buf = encode(&sample_batch(), 1);
        let l = DecodeLimits::default();
        assert!(matches!(decode(&buf[..10], &l), Err(DecodeError::Truncated { needed: HEADER_LEN, available: 10 })));
        let cut = buf.len() - 1;
        let mut short = FrameBuf::new();
        short.extend_from_slice(&buf[..cut]);
        assert_eq!(decode(&short, &l).unwrap_err(), DecodeError::Truncated { needed: buf.len(), available: cut });
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let buf = encode(&sample_batch(), 1);
        let mut long = FrameBuf::new();
        long.extend_from_slice(&buf);
        long.extend_from_slice(&[0, 0, 0]);
        assert_eq!(decode(&long, &DecodeLimits::default()).unwrap_err(), DecodeError::TrailingBytes { extra: 3 });
    }

    #[test]
    fn oversized_payload_is_rejected_from_the_header_alone() {
        let buf = encode(&sample_batch(), 1);
        let small = DecodeLimits { max_payload: 64 };
        let err = FrameHeader::parse(&buf[..HEADER_LEN], &small).unwrap_err();
        assert!(matches!(err, DecodeError::Oversized { limit: 64, .. }), "{err}");
        // And encoding refuses to build one.
        assert!(matches!(
            encode_batch(&sample_batch(), id(1), 0, &small),
            Err(EncodeError::TooLarge { limit: 64, .. })
        ));
    }

    fn patched(f: impl FnOnce(&mut [u8])) -> FrameBuf {
        let mut buf = encode(&sample_batch(), 1);
        f(&mut buf);
        buf
    }

    #[test]
    fn header_fields_are_checked() {
        let l = DecodeLimits::default();
        let bad_magic = patched(|b| b[0] = b'X');
        assert_eq!(decode(&bad_magic, &l).unwrap_err(), DecodeError::BadMagic { found: [b'X', b'P', b'F', 1] });
        let bad_version = patched(|b| b[4] = 2);
        assert_eq!(decode(&bad_version, &l).unwrap_err(), DecodeError::UnsupportedVersion { found: 2 });
        let bad_kind = patched(|b| b[6] = 9);
        assert_eq!(decode(&bad_kind, &l).unwrap_err(), DecodeError::UnknownKind { found: 9 });
        let flags = patched(|b| b[12] = 1);
        assert_eq!(decode(&flags, &l).unwrap_err(), DecodeError::ReservedFlags { found: 1 });
    }

    #[test]
    fn corrupted_archive_is_rejected_not_trusted() {
        let l = DecodeLimits::default();
        // Point the root's relative pointers into nowhere.
        let garbage = patched(|b| {
            let n = b.len();
            for x in &mut b[n - 16..] {
                *x = 0xff;
            }
        });
        let err = decode(&garbage, &l).unwrap_err();
        assert_eq!(err.reason(), "invalid_archive", "{err}");
    }

    /// The lock kind's byte in an encoded frame of `sample_batch` with `kind`.
    fn lock_kind_offset(kind: LockKind) -> (FrameBuf, usize) {
        let mut b = sample_batch();
        b.locks[0].count = 0x5a5a_5a5a_5a5a_5a5a;
        b.locks[0].kind = kind;
        let buf = encode(&b, 1);
        let count = buf.windows(8).position(|w| w == [0x5a; 8]).expect("count in the archive");
        // `kind` follows `stack` and precedes `count` (padded to 8).
        let at = (HEADER_LEN..count).rev().find(|&i| buf[i] == kind as u8).expect("kind byte");
        (buf, at)
    }

    #[test]
    fn every_lock_kind_decodes_and_unknown_ones_are_rejected() {
        let l = DecodeLimits::default();
        for k in LockKind::ALL {
            let (buf, _) = lock_kind_offset(k);
            let batch = decode(&buf, &l).expect("valid").batch;
            assert_eq!(batch.locks[0].kind.to_native(), k);
        }
        // A kind this build does not know (a newer agent's): the validator
        // rejects the whole batch rather than misreading it.
        let (mut buf, at) = lock_kind_offset(LockKind::Join);
        buf[at] = LockKind::ALL.len() as u8;
        assert_eq!(decode(&buf, &l).unwrap_err().reason(), "invalid_archive");
    }

    #[test]
    fn lock_classes_are_downgraded_to_futex_and_nothing_else_changes() {
        let l = DecodeLimits::default();
        let mut b = sample_batch();
        let template = b.locks[0].clone();
        b.locks =
            LockKind::ALL.iter().map(|&kind| LockWait { kind, count: kind as u64 + 1, ..template.clone() }).collect();
        let buf = encode(&b, 4);
        let down = downgrade_lock_classes(&buf, &l).expect("valid").expect("has classes");
        assert_eq!(down.len(), buf.len());
        let view = decode(&down, &l).expect("still valid");
        assert_eq!(view.header.id, id(4));
        let back: Batch = rkyv::deserialize::<Batch, rancor::Error>(view.batch).expect("deserialize");
        let mut want = b.clone();
        for w in &mut want.locks {
            w.kind = w.kind.unclassed();
        }
        assert_eq!(back, want);
        // Only kinds 0..=4 remain: what an aggregator without lock classes reads.
        assert!(back.locks.iter().all(|w| (w.kind as u8) <= LockKind::KernelOther as u8));
        assert_eq!(back.locks.iter().filter(|w| w.kind == LockKind::Futex).count(), 6);
        // A frame without classes is left alone.
        assert!(downgrade_lock_classes(&encode(&sample_batch(), 1), &l).expect("valid").is_none());
        // Bytes that are not a frame are an error, not a rewrite.
        assert!(downgrade_lock_classes(&buf[..HEADER_LEN + 3], &l).is_err());
    }

    #[test]
    fn misaligned_buffer_is_reported() {
        let buf = encode(&sample_batch(), 1);
        let mut shifted = FrameBuf::new();
        shifted.push(0);
        shifted.extend_from_slice(&buf);
        assert_eq!(decode(&shifted[1..], &DecodeLimits::default()).unwrap_err(), DecodeError::Misaligned);
        // The copying decoder accepts the same bytes.
        let (h, b) = decode_unaligned(&shifted[1..], &DecodeLimits::default()).expect("decode");
        assert_eq!(h.id.sequence, 1);
        assert_eq!(b, sample_batch());
    }

    fn arb_frame() -> impl Strategy<Value = StackFrame> {
        (any::<u64>(), any::<u64>(), ".{0,12}", ".{0,8}", ".{0,8}", any::<u32>(), any::<bool>()).prop_map(
            |(address, module_offset, symbol, module, file, line, kernel)| StackFrame {
                address,
                module_offset,
                symbol,
                module,
                file,
                line,
                kernel,
            },
        )
    }

    fn arb_batch() -> impl Strategy<Value = Batch> {
        let targets = proptest::collection::vec(
            (any::<u32>(), ".{0,15}", ".{0,6}", ".{0,6}", ".{0,6}").prop_map(
                |(pid, process, namespace, pod, container)| Target { pid, process, namespace, pod, container },
            ),
            0..4,
        );
        let stacks = proptest::collection::vec(proptest::collection::vec(arb_frame(), 0..6).prop_map(Stack::new), 0..4);
        let cpu = proptest::collection::vec(
            (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
                |(time_ns, target, stack, count, period_ns)| CpuSample { time_ns, target, stack, count, period_ns },
            ),
            0..8,
        );
        let locks = proptest::collection::vec(
            (any::<u64>(), any::<u32>(), 0u8..LockKind::ALL.len() as u8, any::<u64>(), any::<u64>()).prop_map(
                |(time_ns, stack, kind, count, wait_ns)| LockWait {
                    time_ns,
                    target: 0,
                    stack,
                    kind: LockKind::from_u8(kind).expect("in range"),
                    count,
                    wait_ns,
                    max_wait_ns: wait_ns / 2,
                },
            ),
            0..4,
        );
        let syscalls = proptest::collection::vec(
            (any::<u32>(), ".{0,10}", any::<u64>(), any::<[u64; 4]>()).prop_map(|(nr, name, count, h)| {
                let mut histogram = [0; LATENCY_BUCKETS];
                histogram[..4].copy_from_slice(&h);
                SyscallStat {
                    time_ns: 9,
                    target: 0,
                    nr,
                    name,
                    count,
                    errors: count / 3,
                    total_ns: count.wrapping_mul(7),
                    histogram,
                }
            }),
            0..4,
        );
        let slow = proptest::collection::vec(
            (any::<u32>(), any::<u64>(), any::<i64>()).prop_map(|(nr, duration_ns, ret)| SlowCall {
                time_ns: 1,
                target: 0,
                tid: 2,
                stack: 0,
                nr,
                name: "x".into(),
                duration_ns,
                ret,
            }),
            0..3,
        );
        (".{0,10}", targets, stacks, cpu, locks, syscalls, slow).prop_map(
            |(node, targets, stacks, cpu, locks, syscalls, slow_calls)| Batch {
                node,
                targets,
                stacks,
                cpu,
                locks,
                syscalls,
                slow_calls,
            },
        )
    }

    proptest! {
        #[test]
        fn any_batch_round_trips(b in arb_batch(), seq in any::<u64>(), sent in any::<u64>()) {
            let buf = encode_batch(&b, id(seq), sent, &DecodeLimits::default()).expect("encode");
            let view = decode(&buf, &DecodeLimits::default()).expect("decode");
            prop_assert_eq!(view.header.id.sequence, seq);
            prop_assert_eq!(view.header.sent_unix_ns, sent);
            let back: Batch = rkyv::deserialize::<Batch, rancor::Error>(view.batch).expect("deserialize");
            prop_assert_eq!(back, b);
        }

        #[test]
        fn downgraded_batches_differ_only_in_lock_classes(b in arb_batch()) {
            let l = DecodeLimits::default();
            let buf = encode_batch(&b, id(1), 0, &l).expect("encode");
            let down = downgrade_lock_classes(&buf, &l).expect("valid");
            let mut want = b.clone();
            for w in &mut want.locks {
                w.kind = w.kind.unclassed();
            }
            prop_assert_eq!(down.is_some(), want != b);
            let bytes = down.unwrap_or(buf);
            let back: Batch = rkyv::deserialize::<Batch, rancor::Error>(decode(&bytes, &l).expect("decode").batch)
                .expect("deserialize");
            prop_assert_eq!(back, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = FrameBuf::new();
            buf.extend_from_slice(&bytes);
            let _ = decode(&buf, &DecodeLimits::default());
        }

        #[test]
        fn flipped_payload_bytes_never_panic(pos in 0usize..4096, val in any::<u8>()) {
            let mut buf = encode(&sample_batch(), 1);
            let len = buf.len();
            let i = HEADER_LEN + pos % (len - HEADER_LEN);
            buf[i] = val;
            // Either still valid (the byte did not matter) or a typed error.
            if let Err(e) = decode(&buf, &DecodeLimits::default()) {
                prop_assert_eq!(e.reason(), "invalid_archive");
            }
        }
    }
}
