//! Reading messages off a QUIC receive stream: a frame is read header first
//! (checked and bounded before its payload is allocated), straight into an
//! aligned buffer, and validated once.

use aperture_core::frame::{self, DecodeLimits, FrameBuf, FrameHeader, HEADER_LEN, MAGIC};
use quinn::{ReadExactError, RecvStream};

use crate::control::{self, CONTROL_HEADER_LEN, CONTROL_MAGIC, Control};

/// One message from the stream.
#[derive(Debug)]
pub(crate) enum WireMsg {
    Control(Control),
    Frame(FrameHeader, FrameBuf),
}

/// Why no message was read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer finished the stream between two messages.
    End,
    /// The connection or stream failed.
    Lost(String),
    /// The bytes are not a valid message.
    Malformed { reason: &'static str, detail: String },
}

fn read_err(e: ReadExactError, at_start: bool) -> ReadError {
    match e {
        ReadExactError::FinishedEarly(0) if at_start => ReadError::End,
        ReadExactError::FinishedEarly(n) => ReadError::Malformed {
            reason: "truncated",
            detail: format!("stream ended inside a message after {n} bytes"),
        },
        ReadExactError::ReadError(e) => ReadError::Lost(e.to_string()),
    }
}

/// Reads one message. `frames_allowed`: whether frames may arrive here (only
/// client to server).
pub(crate) async fn read_message(
    recv: &mut RecvStream,
    limits: &DecodeLimits,
    frames_allowed: bool,
) -> Result<WireMsg, ReadError> {
    // Eight bytes is both the control header and a prefix of a frame header.
    let mut head = [0u8; CONTROL_HEADER_LEN];
    recv.read_exact(&mut head).await.map_err(|e| read_err(e, true))?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic == CONTROL_MAGIC {
        let (kind, len) = control::parse_header(&head)
            .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.map_err(|e| read_err(e, false))?;
        let msg = control::decode_body(kind, &body)
            .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
        return Ok(WireMsg::Control(msg));
    }
    if magic != MAGIC || !frames_allowed {
        return Err(ReadError::Malformed {
            reason: "garbage",
            detail: format!("stream bytes {magic:02x?} start neither a frame nor a control message"),
        });
    }
    let mut buf = FrameBuf::with_capacity(HEADER_LEN);
    buf.extend_from_slice(&head);
    buf.resize(HEADER_LEN, 0);
    recv.read_exact(&mut buf[CONTROL_HEADER_LEN..]).await.map_err(|e| read_err(e, false))?;
    let header = FrameHeader::parse(&buf, limits)
        .map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
    // `parse` bounded payload_len by the limit: this allocation is safe.
    buf.reserve_exact(header.payload_len as usize);
    buf.resize(header.frame_len(), 0);
    recv.read_exact(&mut buf[HEADER_LEN..]).await.map_err(|e| read_err(e, false))?;
    frame::decode(&buf, limits).map_err(|e| ReadError::Malformed { reason: e.reason(), detail: e.to_string() })?;
    Ok(WireMsg::Frame(header, buf))
}
