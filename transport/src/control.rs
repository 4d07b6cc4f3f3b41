//! Control messages: the small messages of the session protocol, and their
//! compact binary encoding.
//!
//! On a QUIC stream, control messages and frames are interleaved. Frames
//! travel as their raw bytes (they start with [`aperture_core::frame::MAGIC`],
//! `APF\x01`); control messages start with [`CONTROL_MAGIC`], `APC\x01`, so a
//! reader tells them apart from the first four bytes. gRPC carries the same
//! messages as protobuf (see `proto/aperture/v1/ingest.proto`).
//!
//! All integers are little-endian. Every message is an 8-byte header and a body:
//!
//! | offset | size | field      | meaning                                          |
//! |-------:|-----:|------------|--------------------------------------------------|
//! | 0      | 4    | `magic`    | `b"APC\x01"` ([`CONTROL_MAGIC`])                  |
//! | 4      | 1    | `kind`     | [`ControlKind`]                                  |
//! | 5      | 1    | `flags`    | reserved, must be 0                              |
//! | 6      | 2    | `body_len` | bytes of body, at most [`MAX_CONTROL_BODY`]      |
//!
//! Bodies (`str16` is a `u16` length followed by that many bytes; text is UTF-8):
//!
//! | kind          | body                                                                          |
//! |---------------|-------------------------------------------------------------------------------|
//! | 1 `Hello`     | `protocol u16`, `agent_id [16]`, `boot_id [16]`, `token str16` (raw bytes), `node str16`, `agent_version str16` |
//! | 2 `Welcome`   | `max_frame_len u32`, `credit_frames u32`, `credit_bytes u64`, `server_version str16`, then, only for a client of protocol 2 or later, `capabilities u32` ([`Capabilities`]) |
//! | 3 `Reject`    | `reason u16` ([`RejectReason`]), `message str16`                              |
//! | 4 `Ack`       | `count u16`, then `count` inclusive ranges `first u64`, `last u64`            |
//! | 5 `Credit`    | `frames u32`, `bytes u64` (an increment added to what the client may send)    |
//! | 6 `Close`     | `reason u16` ([`CloseReason`]), `message str16`                               |
//!
//! A body must be consumed exactly: trailing bytes are an error, so the
//! encoding has one spelling per message.
//!
//! ## Versions and capabilities
//!
//! Decoders of protocol 1 (the first release) refuse any byte they do not
//! expect, and its servers refuse a `Hello` of another protocol. So a field
//! is never added to a message a peer might not expect:
//!
//! - The client offers [`PROTOCOL_VERSION`] (2) in its `Hello`. A server of
//!   protocol 1 rejects it (`UnsupportedProtocol`; over gRPC the call ends
//!   with `FAILED_PRECONDITION`); the client then connects again offering
//!   protocol 1, once, and offers 2 again on the connection after.
//! - A server answers a `Hello` of protocol 2 with the `capabilities` field,
//!   and one of protocol 1 without it, so an older agent reads the welcome it
//!   always did. A client decodes both layouts: a welcome without the field
//!   announces no capability.
//! - Capabilities are bits: later additions need neither a new field nor a
//!   new protocol, and a client ignores bits it does not know.

use std::fmt;

use aperture_core::ids::{AgentId, BootId};

/// First four bytes of every control message.
pub const CONTROL_MAGIC: [u8; 4] = *b"APC\x01";
/// Size of the control header.
pub const CONTROL_HEADER_LEN: usize = 8;
/// Largest control body accepted or produced.
pub const MAX_CONTROL_BODY: usize = 16 * 1024;
/// Newest version of the session protocol spoken by this build (offered in
/// `Hello`). Version 2 added `Welcome.capabilities`.
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest version this build still speaks: it serves clients of it, and
/// falls back to it when a server rejects [`PROTOCOL_VERSION`].
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// What a server reads beyond protocol 1, announced in its welcome: a set of
/// bits. A client sends a value added after the first release only to a
/// server that announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// No capability: what a server of protocol 1 announces by omission.
    pub const NONE: Capabilities = Capabilities(0);
    /// The server reads lock classes ([`aperture_core::model::LockKind`]
    /// 5..=9: mutex, rwlock, condvar, semaphore, join). To a server without
    /// it, the client sends every class as `Futex` (other futex).
    pub const LOCK_CLASSES: Capabilities = Capabilities(1);
    /// Everything this build reads: what its server announces.
    pub const SUPPORTED: Capabilities = Capabilities::LOCK_CLASSES;

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Which message a control header announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ControlKind {
    /// Client → server: identity and token.
    Hello = 1,
    /// Server → client: accepted, with limits and initial credit.
    Welcome = 2,
    /// Server → client: not accepted, and why.
    Reject = 3,
    /// Server → client: frames committed.
    Ack = 4,
    /// Server → client: more frames may be sent.
    Credit = 5,
    /// Either way: the session ends, and why.
    Close = 6,
}

impl ControlKind {
    fn from_u8(v: u8) -> Option<ControlKind> {
        Some(match v {
            1 => ControlKind::Hello,
            2 => ControlKind::Welcome,
            3 => ControlKind::Reject,
            4 => ControlKind::Ack,
            5 => ControlKind::Credit,
            6 => ControlKind::Close,
            _ => return None,
        })
    }
}

/// Why a server refused a session. The codes double as QUIC application
/// error codes when the server closes a rejected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum RejectReason {
    /// No token was presented and the server requires one.
    MissingToken = 0x101,
    /// The token does not match (includes empty and prefix tokens).
    WrongToken = 0x102,
    /// The token is longer than [`crate::auth::MAX_TOKEN_LEN`].
    OversizedToken = 0x103,
    /// The client speaks another protocol version.
    UnsupportedProtocol = 0x104,
    /// The server is at its connection limit; retry later.
    TooManyConnections = 0x105,
    /// The server is shutting down; retry later.
    ShuttingDown = 0x106,
    /// The hello was malformed or carried invalid fields.
    BadHello = 0x107,
}

impl RejectReason {
    /// Every reason, in code order.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::MissingToken,
        RejectReason::WrongToken,
        RejectReason::OversizedToken,
        RejectReason::UnsupportedProtocol,
        RejectReason::TooManyConnections,
        RejectReason::ShuttingDown,
        RejectReason::BadHello,
    ];

    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingToken => "missing_token",
            RejectReason::WrongToken => "wrong_token",
            RejectReason::OversizedToken => "oversized_token",
            RejectReason::UnsupportedProtocol => "unsupported_protocol",
            RejectReason::TooManyConnections => "too_many_connections",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::BadHello => "bad_hello",
        }
    }

    /// Decodes a code; `None` for codes this build does not know.
    pub fn from_u16(v: u16) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| *r as u16 == v)
    }

    /// Whether retrying with the same credentials can succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, RejectReason::TooManyConnections | RejectReason::ShuttingDown)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a session ended. The codes double as QUIC application error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum CloseReason {
    /// Orderly end (client shutdown).
    Normal = 0x0,
    /// The server cannot keep the session: it is shutting down, or it is
    /// overloaded (the message says which). Reconnect later; unacknowledged
    /// frames are sent again.
    ShuttingDown = 0x1,
    /// The peer broke the protocol (unexpected message, wrong identity in a frame...).
    ProtocolViolation = 0x2,
    /// A frame or control message failed to decode.
    Malformed = 0x3,
    /// The client sent beyond the credit it was granted.
    CreditExceeded = 0x4,
    /// No hello (server side) or no welcome (client side) in time.
    HandshakeTimeout = 0x5,
    /// A newer session of the same agent run replaced this one.
    Superseded = 0x6,
}

impl CloseReason {
    /// Every reason, in code order.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Normal,
        CloseReason::ShuttingDown,
        CloseReason::ProtocolViolation,
        CloseReason::Malformed,
        CloseReason::CreditExceeded,
        CloseReason::HandshakeTimeout,
        CloseReason::Superseded,
    ];

    /// Stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Normal => "normal",
            CloseReason::ShuttingDown => "shutting_down",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::Malformed => "malformed",
            CloseReason::CreditExceeded => "credit_exceeded",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Superseded => "superseded",
        }
    }

    /// Decodes a code; `None` for codes this build does not know.
    pub fn from_u16(v: u16) -> Option<CloseReason> {
        CloseReason::ALL.into_iter().find(|r| *r as u16 == v)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Client → server, first message of a session.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    /// Session protocol version, [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// Agent identity, as in every frame header.
    pub agent_id: AgentId,
    /// Agent run identity, as in every frame header.
    pub boot_id: BootId,
    /// Bearer token, raw bytes; empty when none is configured.
    pub token: Vec<u8>,
    /// Node name, for logs and peer info.
    pub node: String,
    /// Agent build version, for logs.
    pub agent_version: String,
}

impl fmt::Debug for Hello {
    // The token is a secret: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("agent_id", &self.agent_id)
            .field("boot_id", &self.boot_id)
            .field("token_len", &self.token.len())
            .field("node", &self.node)
            .field("agent_version", &self.agent_version)
            .finish()
    }
}

/// Server → client: the session is open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Largest frame (header + payload) the server accepts.
    pub max_frame_len: u32,
    /// Initial credit.
    pub credit: Credit,
    /// Server build version, for logs.
    pub server_version: String,
    /// What the server reads beyond protocol 1; `None` in a welcome of
    /// protocol 1 (to a client that offered 1, or from a server of 1): no
    /// capability, and the field is not encoded.
    pub capabilities: Option<Capabilities>,
}

impl Welcome {
    /// The capabilities announced (none when the field is absent).
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities.unwrap_or(Capabilities::NONE)
    }
}

/// Server → client: the session is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Why.
    pub reason: RejectReason,
    /// Human-readable detail (never contains the token).
    pub message: String,
}

/// An inclusive range of sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeqRange {
    /// First sequence in the range.
    pub first: u64,
    /// Last sequence in the range (inclusive, `>= first`).
    pub last: u64,
}

/// Server → client: these frames are committed and may be forgotten.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Ack {
    /// Sorted, disjoint, non-adjacent ranges.
    pub ranges: Vec<SeqRange>,
}

impl Ack {
    /// Most ranges one message can carry.
    pub const MAX_RANGES: usize = (MAX_CONTROL_BODY - 2) / 16;

    /// Builds acks from sequence numbers in any order, merged into as few
    /// ranges as possible and split into messages of at most
    /// [`Ack::MAX_RANGES`] ranges.
    pub fn from_sequences(seqs: impl IntoIterator<Item = u64>) -> Vec<Ack> {
        let mut sorted: Vec<u64> = seqs.into_iter().collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut ranges: Vec<SeqRange> = Vec::new();
        for s in sorted {
            match ranges.last_mut() {
                Some(r) if r.last.checked_add(1) == Some(s) => r.last = s,
                _ => ranges.push(SeqRange { first: s, last: s }),
            }
        }
        ranges.chunks(Ack::MAX_RANGES).map(|c| Ack { ranges: c.to_vec() }).collect()
    }

    /// Number of sequences covered.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.last - r.first + 1).sum()
    }

    /// Whether no sequence is covered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Server → client: an increment of what the client may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Credit {
    /// More frames.
    pub frames: u32,
    /// More bytes (frame header + payload).
    pub bytes: u64,
}

/// Either way: the session ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    /// Why.
    pub reason: CloseReason,
    /// Human-readable detail.
    pub message: String,
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Reject`].
    Reject(Reject),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Credit`].
    Credit(Credit),
    /// See [`Close`].
    Close(Close),
}

/// Why bytes were not accepted as a control message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// Fewer bytes than the header or the announced body.
    #[error("truncated control message: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        available: usize,
    },
    /// The bytes do not start with [`CONTROL_MAGIC`].
    #[error("bad control magic {found:02x?}: not an Aperture control message")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A kind this build does not know.
    #[error("unknown control message kind {found}")]
    UnknownKind {
        /// Kind byte.
        found: u8,
    },
    /// Reserved flags are set.
    #[error("reserved control flags {found:#x} are set")]
    ReservedFlags {
        /// Flags byte.
        found: u8,
    },
    /// The body is longer than [`MAX_CONTROL_BODY`].
    #[error("control body of {len} bytes exceeds the limit of {MAX_CONTROL_BODY} bytes")]
    Oversized {
        /// Announced body length.
        len: usize,
    },
    /// The body has bytes left after the last field.
    #[error("control message has {extra} bytes after its last field")]
    TrailingBytes {
        /// Unread bytes.
        extra: usize,
    },
    /// A text field is not UTF-8.
    #[error("control field `{field}` is not valid UTF-8")]
    BadText {
        /// Field name.
        field: &'static str,
    },
    /// A reason code this build does not know.
    #[error("unknown reason code {code:#x} in a {kind:?} message")]
    UnknownReason {
        /// Message kind.
        kind: ControlKind,
        /// The code.
        code: u16,
    },
    /// Ack ranges are empty, reversed, unsorted or overlapping.
    #[error("ack ranges are not sorted, disjoint and well-formed")]
    BadRanges,
}

impl ControlError {
    /// A short stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ControlError::Truncated { .. } => "control_truncated",
            ControlError::BadMagic { .. } => "control_bad_magic",
            ControlError::UnknownKind { .. } => "control_unknown_kind",
            ControlError::ReservedFlags { .. } => "control_reserved_flags",
            ControlError::Oversized { .. } => "control_oversized",
            ControlError::TrailingBytes { .. } => "control_trailing_bytes",
            ControlError::BadText { .. } => "control_bad_text",
            ControlError::UnknownReason { .. } => "control_unknown_reason",
            ControlError::BadRanges => "control_bad_ranges",
        }
    }
}

/// Why a message could not be encoded (a caller bug: fields over their limits).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlEncodeError {
    /// A `str16` field is longer than 65535 bytes.
    #[error("control field `{field}` is {len} bytes, more than a u16 length can carry")]
    FieldTooLong {
        /// Field name.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The body exceeds [`MAX_CONTROL_BODY`]; split acks with [`Ack::from_sequences`].
    #[error("control body of {len} bytes exceeds the limit of {MAX_CONTROL_BODY} bytes")]
    BodyTooLong {
        /// Body length.
        len: usize,
    },
}

/// Parses a control header: returns the kind and body length. The body
/// length is bounded by [`MAX_CONTROL_BODY`], so a reader may allocate for it.
pub fn parse_header(bytes: &[u8]) -> Result<(ControlKind, usize), ControlError> {
    let Some(h) = bytes.first_chunk::<CONTROL_HEADER_LEN>() else {
        return Err(ControlError::Truncated { needed: CONTROL_HEADER_LEN, available: bytes.len() });
    };
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != CONTROL_MAGIC {
        return Err(ControlError::BadMagic { found: magic });
    }
    let kind = ControlKind::from_u8(h[4]).ok_or(ControlError::UnknownKind { found: h[4] })?;
    if h[5] != 0 {
        return Err(ControlError::ReservedFlags { found: h[5] });
    }
    let len = usize::from(u16::from_le_bytes([h[6], h[7]]));
    if len > MAX_CONTROL_BODY {
        return Err(ControlError::Oversized { len });
    }
    Ok((kind, len))
}

/// Decodes exactly one control message (header and body) from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Control, ControlError> {
    let (kind, len) = parse_header(bytes)?;
    let needed = CONTROL_HEADER_LEN + len;
    if bytes.len() < needed {
        return Err(ControlError::Truncated { needed, available: bytes.len() });
    }
    if bytes.len() > needed {
        return Err(ControlError::TrailingBytes { extra: bytes.len() - needed });
    }
    decode_body(kind, &bytes[CONTROL_HEADER_LEN..])
}

/// Decodes a body whose header was checked with [`parse_header`].
pub fn decode_body(kind: ControlKind, body: &[u8]) -> Result<Control, ControlError> {
    let mut r = Reader { buf: body, pos: 0 };
    let msg = match kind {
        ControlKind::Hello => Control::Hello(Hello {
            protocol: r.u16()?,
            agent_id: AgentId(r.array()?),
            boot_id: BootId(r.array()?),
            token: r.bytes16()?.to_vec(),
            node: r.text16("node")?,
            agent_version: r.text16("agent_version")?,
        }),
        ControlKind::Welcome => Control::Welcome(Welcome {
            max_frame_len: r.u32()?,
            credit: Credit { frames: r.u32()?, bytes: r.u64()? },
            server_version: r.text16("server_version")?,
            // Protocol 1 ends here; protocol 2 adds the capabilities.
            capabilities: if r.pos == body.len() { None } else { Some(Capabilities(r.u32()?)) },
        }),
        ControlKind::Reject => {
            let code = r.u16()?;
            let reason = RejectReason::from_u16(code).ok_or(ControlError::UnknownReason { kind, code })?;
            Control::Reject(Reject { reason, message: r.text16("message")? })
        }
        ControlKind::Ack => {
            let count = usize::from(r.u16()?);
            let mut ranges = Vec::with_capacity(count.min(Ack::MAX_RANGES));
            for _ in 0..count {
                let range = SeqRange { first: r.u64()?, last: r.u64()? };
                let ordered = ranges.last().is_none_or(|p: &SeqRange| p.last.checked_add(1) < Some(range.first));
                if range.last < range.first || !ordered {
                    return Err(ControlError::BadRanges);
                }
                ranges.push(range);
            }
            Control::Ack(Ack { ranges })
        }
        ControlKind::Credit => Control::Credit(Credit { frames: r.u32()?, bytes: r.u64()? }),
        ControlKind::Close => {
            let code = r.u16()?;
            let reason = CloseReason::from_u16(code).ok_or(ControlError::UnknownReason { kind, code })?;
            Control::Close(Close { reason, message: r.text16("message")? })
        }
    };
    if r.pos != body.len() {
        return Err(ControlError::TrailingBytes { extra: body.len() - r.pos });
    }
    Ok(msg)
}

impl Control {
    /// The message's kind.
    pub fn kind(&self) -> ControlKind {
        match self {
            Control::Hello(_) => ControlKind::Hello,
            Control::Welcome(_) => ControlKind::Welcome,
            Control::Reject(_) => ControlKind::Reject,
            Control::Ack(_) => ControlKind::Ack,
            Control::Credit(_) => ControlKind::Credit,
            Control::Close(_) => ControlKind::Close,
        }
    }

    /// Appends the encoded message (header and body) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ControlEncodeError> {
        let start = out.len();
        out.extend_from_slice(&CONTROL_MAGIC);
        out.extend_from_slice(&[self.kind() as u8, 0, 0, 0]);
        let body_start = out.len();
        match self {
            Control::Hello(h) => {
                out.extend_from_slice(&h.protocol.to_le_bytes());
                out.extend_from_slice(&h.agent_id.0);
                out.extend_from_slice(&h.boot_id.0);
                put16(out, "token", &h.token)?;
                put16(out, "node", h.node.as_bytes())?;
                put16(out, "agent_version", h.agent_version.as_bytes())?;
            }
            Control::Welcome(w) => {
                out.extend_from_slice(&w.max_frame_len.to_le_bytes());
                out.extend_from_slice(&w.credit.frames.to_le_bytes());
                out.extend_from_slice(&w.credit.bytes.to_le_bytes());
                put16(out, "server_version", w.server_version.as_bytes())?;
                if let Some(c) = w.capabilities {
                    out.extend_from_slice(&c.0.to_le_bytes());
                }
            }
            Control::Reject(r) => {
                out.extend_from_slice(&(r.reason as u16).to_le_bytes());
                put16(out, "message", r.message.as_bytes())?;
            }
            Control::Ack(a) => {
                let count = u16::try_from(a.ranges.len())
                    .map_err(|_| ControlEncodeError::FieldTooLong { field: "ranges", len: a.ranges.len() })?;
                out.extend_from_slice(&count.to_le_bytes());
                for r in &a.ranges {
                    out.extend_from_slice(&r.first.to_le_bytes());
                    out.extend_from_slice(&r.last.to_le_bytes());
                }
            }
            Control::Credit(c) => {
                out.extend_from_slice(&c.frames.to_le_bytes());
                out.extend_from_slice(&c.bytes.to_le_bytes());
            }
            Control::Close(c) => {
                out.extend_from_slice(&(c.reason as u16).to_le_bytes());
                put16(out, "message", c.message.as_bytes())?;
            }
        }
        let len = out.len() - body_start;
        if len > MAX_CONTROL_BODY {
            out.truncate(start);
            return Err(ControlEncodeError::BodyTooLong { len });
        }
        // `len <= MAX_CONTROL_BODY < u16::MAX`, checked just above.
        out[start + 6..start + 8].copy_from_slice(&(len as u16).to_le_bytes());
        Ok(())
    }

    /// Encodes into a new buffer.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ControlEncodeError> {
        let mut out = Vec::with_capacity(64);
        self.encode(&mut out)?;
        Ok(out)
    }
}

fn put16(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), ControlEncodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| ControlEncodeError::FieldTooLong { field, len: bytes.len() })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ControlError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(ControlError::Truncated {
                needed: CONTROL_HEADER_LEN + self.pos + n,
                available: CONTROL_HEADER_LEN + self.buf.len(),
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ControlError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, ControlError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ControlError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ControlError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], ControlError> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    fn text16(&mut self, field: &'static str) -> Result<String, ControlError> {
        let b = self.bytes16()?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| ControlError::BadText { field })
    }
}

#[cfg(test)]
mod tests;
