//! The client end of a session: keep frames until acknowledged, send within
//! credit, resend what is unacknowledged after a reconnect.
//!
//! Frames are encoded once, by the agent, before any server is known, and
//! are held here until acknowledged, possibly across reconnects to other
//! aggregators (a rolling upgrade or rollback, a load balancer). So what a
//! server can read is decided per session, when a frame is sent: to a server
//! that does not announce [`Capabilities::LOCK_CLASSES`], a frame holding
//! lock classes is sent as a copy in which every class reads `Futex`
//! ([`aperture_core::frame::downgrade_lock_classes`]); the held frame keeps
//! its classes for the next server. Sending to such a server costs a
//! validation of each frame and a copy of each frame that holds classes;
//! sending to a server with the capability costs nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, HEADER_LEN, downgrade_lock_classes};
use aperture_core::ids::{AgentId, BootId};

use crate::control::{
    Capabilities, Close, CloseReason, Control, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Reject, RejectReason,
};
use crate::session::buffer::{PushError, PushReport, UnackedBuffer};

/// Identity and limits of the client end.
#[derive(Clone)]
pub struct ClientSessionConfig {
    /// Agent identity, stamped in every frame.
    pub agent_id: AgentId,
    /// Agent run identity, stamped in every frame.
    pub boot_id: BootId,
    /// Bearer token; empty for none.
    pub token: Vec<u8>,
    /// Node name sent in the hello.
    pub node: String,
    /// Agent version sent in the hello.
    pub agent_version: String,
    /// Bound of the unacknowledged-frame buffer, bytes.
    pub buffer_bytes: usize,
    /// Largest frame the client accepts from its producer.
    pub max_frame_len: usize,
    /// Time the server has to answer the hello.
    pub welcome_timeout: Duration,
}

impl std::fmt::Debug for ClientSessionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSessionConfig")
            .field("agent_id", &self.agent_id)
            .field("boot_id", &self.boot_id)
            .field("token_len", &self.token.len())
            .field("node", &self.node)
            .field("buffer_bytes", &self.buffer_bytes)
            .field("max_frame_len", &self.max_frame_len)
            .finish_non_exhaustive()
    }
}

/// What the client must send next.
#[derive(Debug)]
pub enum Transmit {
    /// A control message.
    Control(Control),
    /// A frame, as its raw bytes.
    Frame {
        /// Which frame.
        id: FrameId,
        /// Its bytes, shared with the buffer until acknowledged.
        bytes: Arc<FrameBuf>,
        /// It was sent before (in an earlier session).
        resend: bool,
    },
}

/// What happened, for the driver's logs and reconnect policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server welcomed the session.
    Established {
        /// The server's version.
        server_version: String,
        /// The session protocol spoken.
        protocol: u16,
        /// What the server announced it reads.
        capabilities: Capabilities,
    },
    /// The server does not speak the protocol offered (a server older than
    /// this client): the next connection offers [`MIN_PROTOCOL_VERSION`].
    /// Not a refusal: reconnect at once.
    OlderServer {
        /// The protocol offered.
        offered: u16,
        /// The server's explanation.
        message: String,
    },
    /// The server refused the session.
    Rejected(Reject),
    /// The session ended: by the server (`by_peer`) or here.
    Closed {
        /// Why.
        reason: CloseReason,
        /// The server closed it.
        by_peer: bool,
        /// Detail.
        message: String,
    },
}

/// Counters of one client session machine (they span reconnects).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientSessionStats {
    /// Frames taken into the buffer.
    pub frames_pushed: u64,
    /// Frames handed to a carrier (first sends and resends).
    pub frames_sent: u64,
    /// Of which resends after a reconnect.
    pub frames_resent: u64,
    /// Frames acknowledged and forgotten.
    pub frames_acked: u64,
    /// Frames dropped, oldest first, because the buffer was full.
    pub frames_dropped: u64,
    /// Their bytes.
    pub bytes_dropped: u64,
    /// Frames dropped unsent because they are larger than the server takes
    /// (`Welcome.max_frame_len`).
    pub frames_dropped_oversized: u64,
    /// Their bytes.
    pub bytes_dropped_oversized: u64,
    /// Frame bytes handed to a carrier.
    pub bytes_sent: u64,
    /// Frames sent with their lock classes as `Futex`, to a server that
    /// does not read lock classes.
    pub frames_downgraded: u64,
    /// Connections on which the server rejected the newest protocol and the
    /// next one offered the oldest.
    pub protocol_fallbacks: u64,
    /// Frames held now.
    pub unacked_frames: u64,
    /// Bytes held now.
    pub unacked_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Disconnected,
    AwaitingWelcome {
        deadline: Instant,
    },
    Established,
    /// Closed or rejected; waits for `handle_disconnected`.
    Closed,
}

/// One agent run's sending state, kept across connections.
#[derive(Debug)]
pub struct ClientSession {
    cfg: ClientSessionConfig,
    state: State,
    buffer: UnackedBuffer,
    /// Next sequence to consider sending in this connection.
    cursor: u64,
    credit_frames: u32,
    credit_bytes: i64,
    /// Largest frame the server of this connection takes (from its welcome).
    server_max_frame_len: usize,
    /// What the server of this connection reads (from its welcome).
    server_capabilities: Capabilities,
    /// Protocol offered on this connection.
    offered: u16,
    /// The last server rejected [`PROTOCOL_VERSION`]: offer the oldest on
    /// the next connection (only that one).
    fall_back: bool,
    /// Limits for reading held frames when downgrading them.
    limits: DecodeLimits,
    outbox: VecDeque<Control>,
    events: VecDeque<ClientEvent>,
    stats: ClientSessionStats,
}

impl ClientSession {
    /// A disconnected session with an empty buffer.
    pub fn new(cfg: ClientSessionConfig) -> ClientSession {
        let buffer = UnackedBuffer::new(cfg.agent_id, cfg.boot_id, cfg.buffer_bytes, cfg.max_frame_len);
        let limits = DecodeLimits { max_payload: cfg.max_frame_len.saturating_sub(HEADER_LEN) };
        ClientSession {
            cfg,
            state: State::Disconnected,
            buffer,
            cursor: 0,
            credit_frames: 0,
            credit_bytes: 0,
            server_max_frame_len: usize::MAX,
            server_capabilities: Capabilities::NONE,
            offered: PROTOCOL_VERSION,
            fall_back: false,
            limits,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            stats: ClientSessionStats::default(),
        }
    }

    /// Takes a frame from the producer into the unacknowledged buffer.
    pub fn push(&mut self, frame: FrameBuf) -> Result<PushReport, PushError> {
        let (_, report) = self.buffer.push(frame)?;
        self.stats.frames_pushed += 1;
        self.stats.frames_dropped += report.dropped_frames;
        self.stats.bytes_dropped += report.dropped_bytes;
        Ok(report)
    }

    /// A carrier connection is up: say hello; every held frame will be
    /// (re)sent in order once welcomed.
    ///
    /// The hello offers [`PROTOCOL_VERSION`], or [`MIN_PROTOCOL_VERSION`]
    /// right after a server rejected the newest: an aggregator may have
    /// been upgraded by the next reconnect, so the fallback lasts one
    /// connection.
    pub fn handle_connected(&mut self, now: Instant) {
        self.outbox.clear();
        self.cursor = 0;
        self.credit_frames = 0;
        self.credit_bytes = 0;
        self.server_capabilities = Capabilities::NONE;
        self.offered = if std::mem::take(&mut self.fall_back) { MIN_PROTOCOL_VERSION } else { PROTOCOL_VERSION };
        self.state = State::AwaitingWelcome { deadline: now + self.cfg.welcome_timeout };
        self.outbox.push_back(Control::Hello(Hello {
            protocol: self.offered,
            agent_id: self.cfg.agent_id,
            boot_id: self.cfg.boot_id,
            token: self.cfg.token.clone(),
            node: self.cfg.node.clone(),
            agent_version: self.cfg.agent_version.clone(),
        }));
    }

    /// The carrier connection is gone; frames in flight stay held.
    pub fn handle_disconnected(&mut self, _now: Instant) {
        self.state = State::Disconnected;
        self.outbox.clear();
        self.credit_frames = 0;
        self.credit_bytes = 0;
    }

    /// A control message arrived from the server.
    pub fn handle_control(&mut self, now: Instant, msg: Control) {
        match (self.state, msg) {
            (State::Disconnected | State::Closed, _) => {}
            (State::AwaitingWelcome { .. }, Control::Welcome(w)) => {
                self.state = State::Established;
                self.credit_frames = w.credit.frames;
                self.credit_bytes = i64::try_from(w.credit.bytes).unwrap_or(i64::MAX);
                self.server_max_frame_len = w.max_frame_len as usize;
                self.server_capabilities = w.capabilities();
                self.events.push_back(ClientEvent::Established {
                    server_version: w.server_version,
                    protocol: self.offered,
                    capabilities: self.server_capabilities,
                });
            }
            (State::AwaitingWelcome { .. }, Control::Reject(r))
                if r.reason == RejectReason::UnsupportedProtocol && self.offered > MIN_PROTOCOL_VERSION =>
            {
                self.state = State::Closed;
                self.fall_back = true;
                self.stats.protocol_fallbacks += 1;
                self.events.push_back(ClientEvent::OlderServer { offered: self.offered, message: r.message });
            }
            (State::AwaitingWelcome { .. }, Control::Reject(r)) => {
                self.state = State::Closed;
                self.events.push_back(ClientEvent::Rejected(r));
            }
            (State::Established, Control::Ack(a)) => {
                for r in &a.ranges {
                    self.stats.frames_acked += self.buffer.ack_range(r.first, r.last);
                }
            }
            (State::Established, Control::Credit(c)) => {
                self.credit_frames = self.credit_frames.saturating_add(c.frames);
                self.credit_bytes = self.credit_bytes.saturating_add(i64::try_from(c.bytes).unwrap_or(i64::MAX));
            }
            (_, Control::Close(c)) => {
                self.state = State::Closed;
                self.events.push_back(ClientEvent::Closed { reason: c.reason, by_peer: true, message: c.message });
            }
            (_, other) => {
                let msg = format!("unexpected {:?} from the server", other.kind());
                self.close(now, CloseReason::ProtocolViolation, &msg);
            }
        }
    }

    /// Time passed: enforce the welcome deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::AwaitingWelcome { deadline } = self.state
            && now >= deadline
        {
            self.close(now, CloseReason::HandshakeTimeout, "no welcome received in time");
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingWelcome { deadline } => Some(deadline),
            _ => None,
        }
    }

    /// Ends the session from this side.
    pub fn close(&mut self, _now: Instant, reason: CloseReason, message: &str) {
        if matches!(self.state, State::Disconnected | State::Closed) {
            return;
        }
        self.outbox.push_back(Control::Close(Close { reason, message: message.to_owned() }));
        self.state = State::Closed;
        self.events.push_back(ClientEvent::Closed { reason, by_peer: false, message: message.to_owned() });
    }

    /// The next thing to send: control messages first, then frames while
    /// credit lasts.
    pub fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit> {
        if let Some(c) = self.outbox.pop_front() {
            return Some(Transmit::Control(c));
        }
        if self.state != State::Established || self.credit_frames == 0 || self.credit_bytes <= 0 {
            return None;
        }
        // A frame the server would refuse is never sent: sending it would end
        // the session, and it would be resent first on every reconnect.
        if self.buffer.peek_len(self.cursor).is_some_and(|len| len > self.server_max_frame_len) {
            let (frames, bytes) = self.buffer.drop_longer_than(self.cursor, self.server_max_frame_len);
            self.stats.frames_dropped_oversized += frames;
            self.stats.bytes_dropped_oversized += bytes;
        }
        let (seq, mut bytes, resend) = self.buffer.next_to_send(self.cursor)?;
        if !self.server_capabilities.contains(Capabilities::LOCK_CLASSES) {
            // Same length, so the credit it costs is the same. A frame that
            // does not decode is sent as it is: this is no place to judge it.
            if let Ok(Some(down)) = downgrade_lock_classes(&bytes, &self.limits) {
                bytes = Arc::new(down);
                self.stats.frames_downgraded += 1;
            }
        }
        self.cursor = seq + 1;
        self.credit_frames -= 1;
        self.credit_bytes -= bytes.len() as i64;
        self.stats.frames_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        if resend {
            self.stats.frames_resent += 1;
        }
        let id = FrameId { agent_id: self.cfg.agent_id, boot_id: self.cfg.boot_id, sequence: seq };
        Some(Transmit::Frame { id, bytes, resend })
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Whether frames may flow now.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the session ended and the connection should be dropped.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether a frame is held that this connection has not sent yet.
    pub fn has_unsent(&self) -> bool {
        self.buffer.peek_len(self.cursor).is_some()
    }

    /// What the server of this session announced it reads (none while not
    /// established).
    pub fn server_capabilities(&self) -> Capabilities {
        self.server_capabilities
    }

    /// Credit left: (frames, bytes).
    pub fn credit(&self) -> (u32, i64) {
        (self.credit_frames, self.credit_bytes)
    }

    /// Ids of every unacknowledged frame, in order.
    pub fn unacked(&self) -> Vec<FrameId> {
        self.buffer.ids()
    }

    /// Counters.
    pub fn stats(&self) -> ClientSessionStats {
        ClientSessionStats {
            unacked_frames: self.buffer.len() as u64,
            unacked_bytes: self.buffer.bytes() as u64,
            ..self.stats
        }
    }
}
