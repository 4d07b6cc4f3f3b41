//! Between the protobuf messages of `aperture.v1` and the session's control
//! messages. Frames are not converted: their bytes pass through as they are.

use aperture_core::frame::{self, DecodeLimits, FrameBuf};

use super::pb;
use crate::control::{Ack, Close, CloseReason, Control, Credit, Hello, SeqRange, Welcome};
use crate::server::Inbound;

/// A protobuf hello plus the token from the request metadata.
pub(crate) fn hello_from_pb(h: pb::Hello) -> Result<Hello, String> {
    let id = |name: &str, v: &[u8]| -> Result<[u8; 16], String> {
        v.try_into().map_err(|_| format!("hello.{name} must be 16 bytes, got {}", v.len()))
    };
    Ok(Hello {
        protocol: u16::try_from(h.protocol).map_err(|_| format!("hello.protocol {} is out of range", h.protocol))?,
        agent_id: id("agent_id", &h.agent_id)?,
        boot_id: id("boot_id", &h.boot_id)?,
        token: Vec::new(),
        node: h.node,
        agent_version: h.agent_version,
    })
}

/// The client's hello as protobuf (the token travels in metadata).
pub(crate) fn hello_to_pb(h: &Hello) -> pb::Hello {
    pb::Hello {
        protocol: u32::from(h.protocol),
        agent_id: h.agent_id.to_vec(),
        boot_id: h.boot_id.to_vec(),
        node: h.node.clone(),
        agent_version: h.agent_version.clone(),
    }
}

fn close_from_pb(c: pb::Close) -> Close {
    let reason = u16::try_from(c.reason).ok().and_then(CloseReason::from_u16).unwrap_or(CloseReason::ProtocolViolation);
    Close { reason, message: c.message }
}

fn close_to_pb(c: &Close) -> pb::Close {
    pb::Close { reason: u32::from(c.reason as u16), message: c.message.clone() }
}

fn credit_to_pb(c: Credit) -> pb::Credit {
    pb::Credit { frames: c.frames, bytes: c.bytes }
}

/// A request from a client, as the session driver wants it. Frames are
/// copied once into an aligned buffer and validated.
pub(crate) fn inbound_from_pb(req: pb::PushRequest, limits: &DecodeLimits) -> Inbound {
    use pb::push_request::Body;
    match req.body {
        Some(Body::Frame(bytes)) => {
            let header = match frame::FrameHeader::parse(&bytes, limits) {
                Ok(h) => h,
                Err(e) => return Inbound::Malformed { reason: e.reason(), detail: e.to_string() },
            };
            let mut buf = FrameBuf::with_capacity(bytes.len());
            buf.extend_from_slice(&bytes);
            match frame::decode(&buf, limits) {
                Ok(_) => Inbound::Frame(header, buf),
                Err(e) => Inbound::Malformed { reason: e.reason(), detail: e.to_string() },
            }
        }
        Some(Body::Close(c)) => Inbound::Control(Control::Close(close_from_pb(c))),
        Some(Body::Hello(_)) => {
            Inbound::Malformed { reason: "second_hello", detail: "a second hello in one call".into() }
        }
        None => Inbound::Malformed { reason: "empty_message", detail: "a PushRequest without a body".into() },
    }
}

/// A message the server session sends, as protobuf. `Reject` has no
/// protobuf form: it becomes the call's status.
pub(crate) fn response_to_pb(msg: &Control) -> Option<pb::PushResponse> {
    use pb::push_response::Body;
    let body = match msg {
        Control::Welcome(w) => Body::Welcome(pb::Welcome {
            max_frame_len: w.max_frame_len,
            credit: Some(credit_to_pb(w.credit)),
            server_version: w.server_version.clone(),
        }),
        Control::Ack(a) => Body::Ack(pb::Ack {
            ranges: a.ranges.iter().map(|r| pb::SeqRange { first: r.first, last: r.last }).collect(),
        }),
        Control::Credit(c) => Body::Credit(credit_to_pb(*c)),
        Control::Close(c) => Body::Close(close_to_pb(c)),
        Control::Hello(_) | Control::Reject(_) => return None,
    };
    Some(pb::PushResponse { body: Some(body) })
}

/// A server response as a control message for the client session; `Err`
/// when it is malformed.
pub(crate) fn response_from_pb(resp: pb::PushResponse) -> Result<Control, String> {
    use pb::push_response::Body;
    Ok(match resp.body {
        Some(Body::Welcome(w)) => Control::Welcome(Welcome {
            max_frame_len: w.max_frame_len,
            credit: w.credit.map(|c| Credit { frames: c.frames, bytes: c.bytes }).unwrap_or_default(),
            server_version: w.server_version,
        }),
        Some(Body::Ack(a)) => {
            let mut ranges: Vec<SeqRange> = Vec::with_capacity(a.ranges.len());
            for r in a.ranges {
                if r.last < r.first || ranges.last().is_some_and(|p| p.last >= r.first) {
                    return Err("ack ranges are not sorted and disjoint".into());
                }
                ranges.push(SeqRange { first: r.first, last: r.last });
            }
            Control::Ack(Ack { ranges })
        }
        Some(Body::Credit(c)) => Control::Credit(Credit { frames: c.frames, bytes: c.bytes }),
        Some(Body::Close(c)) => Control::Close(close_from_pb(c)),
        None => return Err("a PushResponse without a body".into()),
    })
}

/// A message the client session sends, as protobuf.
pub(crate) fn request_to_pb(msg: &Control) -> Option<pb::PushRequest> {
    use pb::push_request::Body;
    let body = match msg {
        Control::Hello(h) => Body::Hello(hello_to_pb(h)),
        Control::Close(c) => Body::Close(close_to_pb(c)),
        _ => return None,
    };
    Some(pb::PushRequest { body: Some(body) })
}
