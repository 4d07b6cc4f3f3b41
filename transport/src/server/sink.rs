//! What the aggregator plugs into the ingress: the sink that takes frames,
//! and what it is given.

use std::net::SocketAddr;
use std::sync::Arc;

use aperture_core::frame::{FrameBuf, FrameHeader};
use aperture_core::ids::{AgentId, BootId};

use crate::Carrier;

/// Where the aggregator takes frames. A sink must not block: it queues the
/// frame or says it cannot.
pub trait IngressSink: Send + Sync + 'static {
    /// Offers one validated frame.
    fn admit(&self, frame: ReceivedFrame) -> Admission;
}

/// What the sink did with a frame.
#[derive(Debug)]
pub enum Admission {
    /// Taken; it will be acknowledged through the [`Acker`] once committed.
    Queued,
    /// A resend of a frame committed earlier: acknowledged at once, not taken again.
    AlreadyCommitted,
    /// Not taken (the sink is above its high-water mark); the frame is handed
    /// back. The session holds it, grants no more credit, and offers it again
    /// after `busy_retry_ms`.
    Busy(ReceivedFrame),
}

/// Who sent a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Agent identity.
    pub agent_id: AgentId,
    /// Agent run identity.
    pub boot_id: BootId,
    /// Node name from the hello.
    pub node: String,
    /// Agent version from the hello.
    pub agent_version: String,
    /// Remote address.
    pub addr: SocketAddr,
    /// Carrier of the session.
    pub carrier: Carrier,
}

/// A frame as the sink receives it: validated once (header, length, archive),
/// in an aligned buffer, ready for `aperture_core::frame::decode` in place.
#[derive(Debug)]
pub struct ReceivedFrame {
    /// The checked header.
    pub header: FrameHeader,
    /// The whole frame, byte for byte as the agent built it.
    pub bytes: FrameBuf,
    /// Carrier it came on.
    pub carrier: Carrier,
    /// Sender (shared by every frame of the session).
    pub peer: Arc<PeerInfo>,
}
