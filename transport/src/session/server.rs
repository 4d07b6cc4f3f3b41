//! The server end of a session: authenticate, grant credit, pass frames to
//! the sink, send acknowledgements.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use aperture_core::frame::{FrameBuf, FrameHeader};
use aperture_core::ids::{AgentId, BootId};

use crate::auth::Authenticator;
use crate::control::{
    Ack, Capabilities, Close, CloseReason, Control, Credit, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Reject,
    RejectReason, Welcome,
};

/// Limits and policies of server sessions.
#[derive(Clone, Debug)]
pub struct ServerSessionConfig {
    /// Largest frame accepted (header + payload).
    pub max_frame_len: u32,
    /// Credit window in frames: most frames a client may have in flight unadmitted.
    pub credit_frames: u32,
    /// Credit window in bytes.
    pub credit_bytes: u64,
    /// Time a client has to send its hello after connecting.
    pub hello_timeout: Duration,
    /// Delay before offering a frame the sink refused as busy again.
    pub busy_retry: Duration,
    /// Version announced in the welcome.
    pub server_version: String,
    /// Newest session protocol served ([`PROTOCOL_VERSION`]); a hello
    /// offering a newer one is rejected as unsupported. Lower only to behave
    /// like an older server (tests of mixed fleets).
    pub max_protocol: u16,
    /// Capabilities announced to clients of protocol 2 or later
    /// ([`Capabilities::SUPPORTED`]: what this build's frame decoder reads).
    pub capabilities: Capabilities,
}

impl Default for ServerSessionConfig {
    fn default() -> Self {
        ServerSessionConfig {
            max_frame_len: (aperture_core::frame::DEFAULT_MAX_PAYLOAD + aperture_core::frame::HEADER_LEN) as u32,
            credit_frames: 64,
            credit_bytes: 32 << 20,
            hello_timeout: Duration::from_secs(10),
            busy_retry: Duration::from_millis(200),
            server_version: env!("CARGO_PKG_VERSION").to_owned(),
            max_protocol: PROTOCOL_VERSION,
            capabilities: Capabilities::SUPPORTED,
        }
    }
}

/// Who is on the other end, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Agent identity.
    pub agent_id: AgentId,
    /// Agent run identity.
    pub boot_id: BootId,
    /// Node name from the hello.
    pub node: String,
    /// Agent version from the hello.
    pub agent_version: String,
}

/// What the driver must act on.
#[derive(Debug)]
pub enum ServerEvent {
    /// The hello was accepted: route acks for this identity to this session.
    Authenticated(PeerIdentity),
    /// The hello was refused: count it; close the connection once the
    /// `Reject` is sent. Nothing was, or will be, admitted.
    Rejected(RejectReason),
    /// Offer this frame to the sink, then report with
    /// [`ServerSession::handle_admitted`] or [`ServerSession::handle_busy`].
    Admit {
        /// Its checked header.
        header: FrameHeader,
        /// The whole validated frame.
        frame: FrameBuf,
    },
    /// The session is over; close the connection once the outbox is drained.
    Closed {
        /// Why.
        reason: CloseReason,
        /// Whether the client closed it.
        by_peer: bool,
    },
}

/// What became of one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameOutcome {
    /// Passed on as [`ServerEvent::Admit`]; `gap` when sequences were skipped before it.
    Admitted {
        /// Sequences between the previous frame of the session and this one were skipped.
        gap: bool,
    },
    /// Its sequence is not above the last one of this session: ignored.
    Duplicate,
    /// The frame broke the protocol; the session is closing.
    Refused(CloseReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello { deadline: Instant },
    Open,
    Closed,
}

/// One session, server side.
#[derive(Debug)]
pub struct ServerSession {
    cfg: ServerSessionConfig,
    auth: Authenticator,
    state: State,
    peer: Option<PeerIdentity>,
    accepting: bool,
    /// The welcome granted no credit because the sink was not accepting:
    /// the first window is granted once it is.
    window_owed: bool,
    /// Credit the client still holds.
    window_frames: u32,
    window_bytes: i64,
    /// Taken by the sink and not granted back yet.
    release_frames: u32,
    release_bytes: u64,
    highest_sequence: u64,
    parked: VecDeque<(FrameHeader, FrameBuf)>,
    retry_at: Option<Instant>,
    pending_acks: BTreeSet<u64>,
    outbox: VecDeque<Control>,
    events: VecDeque<ServerEvent>,
}

impl ServerSession {
    /// A session for a connection that just opened.
    pub fn new(now: Instant, cfg: ServerSessionConfig, auth: Authenticator) -> ServerSession {
        let deadline = now + cfg.hello_timeout;
        ServerSession {
            cfg,
            auth,
            state: State::AwaitingHello { deadline },
            peer: None,
            accepting: true,
            window_owed: false,
            window_frames: 0,
            window_bytes: 0,
            release_frames: 0,
            release_bytes: 0,
            highest_sequence: 0,
            parked: VecDeque::new(),
            retry_at: None,
            pending_acks: BTreeSet::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A control message arrived from the client.
    pub fn handle_control(&mut self, now: Instant, msg: Control) {
        match (self.state, msg) {
            (State::Closed, _) => {}
            (State::AwaitingHello { .. }, Control::Hello(h)) => self.handle_hello(now, h),
            (_, Control::Close(c)) => {
                self.flush_acks();
                self.state = State::Closed;
                self.events.push_back(ServerEvent::Closed { reason: c.reason, by_peer: true });
            }
            (State::Open, Control::Hello(_)) => {
                self.close(now, CloseReason::ProtocolViolation, "second hello in one session");
            }
            (_, other) => {
                let msg = format!("{:?} is a server-to-client message", other.kind());
                self.close(now, CloseReason::ProtocolViolation, &msg);
            }
        }
    }

    /// Like [`handle_control`](Self::handle_control) for a hello whose token
    /// the carrier already checked (gRPC checks request metadata before the
    /// stream starts); the hello's own token field is ignored.
    pub fn handle_preauthenticated_hello(&mut self, now: Instant, hello: Hello) {
        if let State::AwaitingHello { .. } = self.state {
            self.accept_hello(now, hello, true);
        } else {
            self.close(now, CloseReason::ProtocolViolation, "second hello in one session");
        }
    }

    fn handle_hello(&mut self, now: Instant, hello: Hello) {
        self.accept_hello(now, hello, false);
    }

    fn accept_hello(&mut self, _now: Instant, hello: Hello, preauthenticated: bool) {
        let max = self.cfg.max_protocol;
        let verdict = if !(MIN_PROTOCOL_VERSION..=max).contains(&hello.protocol) {
            Err((
                RejectReason::UnsupportedProtocol,
                format!(
                    "session protocol {} is not supported; this server speaks {MIN_PROTOCOL_VERSION} to {max}",
                    hello.protocol
                ),
            ))
        } else if preauthenticated {
            Ok(())
        } else {
            // An empty token counts as none: the encoding does not tell them apart.
            let presented = (!hello.token.is_empty()).then_some(&hello.token[..]);
            self.auth.verify(presented).map_err(|r| (r, format!("authentication failed: {r}")))
        };
        match verdict {
            Err((reason, message)) => {
                self.outbox.push_back(Control::Reject(Reject { reason, message }));
                self.state = State::Closed;
                self.events.push_back(ServerEvent::Rejected(reason));
            }
            Ok(()) => {
                let peer = PeerIdentity {
                    agent_id: hello.agent_id,
                    boot_id: hello.boot_id,
                    node: hello.node,
                    agent_version: hello.agent_version,
                };
                self.state = State::Open;
                // A session opened while the sink takes nothing gets no
                // credit yet: an overloaded server would only have to hold
                // or refuse what it sent.
                let credit = if self.accepting {
                    Credit { frames: self.cfg.credit_frames, bytes: self.cfg.credit_bytes }
                } else {
                    self.window_owed = true;
                    Credit { frames: 0, bytes: 0 }
                };
                self.window_frames = credit.frames;
                self.window_bytes = i64::try_from(credit.bytes).unwrap_or(i64::MAX);
                self.outbox.push_back(Control::Welcome(Welcome {
                    max_frame_len: self.cfg.max_frame_len,
                    credit,
                    server_version: self.cfg.server_version.clone(),
                    // A client of protocol 1 refuses any field it does not
                    // expect: it gets the welcome of protocol 1.
                    capabilities: (hello.protocol >= 2).then_some(self.cfg.capabilities),
                }));
                self.peer = Some(peer.clone());
                self.events.push_back(ServerEvent::Authenticated(peer));
            }
        }
    }

    /// A validated frame arrived. On [`FrameOutcome::Admitted`] it is queued
    /// as [`ServerEvent::Admit`]; otherwise it is dropped here.
    pub fn handle_frame(&mut self, now: Instant, header: FrameHeader, frame: FrameBuf) -> FrameOutcome {
        let Some(peer) = &self.peer else {
            let reason = CloseReason::ProtocolViolation;
            if self.state != State::Closed {
                self.close(now, reason, "frame before hello");
            }
            return FrameOutcome::Refused(reason);
        };
        if self.state != State::Open {
            return FrameOutcome::Refused(CloseReason::ProtocolViolation);
        }
        let id = header.id;
        if id.agent_id != peer.agent_id || id.boot_id != peer.boot_id {
            let msg = format!(
                "frame from agent {}/{} on the session of {}/{}",
                id.agent_id, id.boot_id, peer.agent_id, peer.boot_id
            );
            self.close(now, CloseReason::ProtocolViolation, &msg);
            return FrameOutcome::Refused(CloseReason::ProtocolViolation);
        }
        if frame.len() > self.cfg.max_frame_len as usize {
            let msg = format!("frame of {} bytes exceeds the limit of {}", frame.len(), self.cfg.max_frame_len);
            self.close(now, CloseReason::Malformed, &msg);
            return FrameOutcome::Refused(CloseReason::Malformed);
        }
        if self.window_frames == 0 || self.window_bytes <= 0 {
            self.close(now, CloseReason::CreditExceeded, "frame sent without credit");
            return FrameOutcome::Refused(CloseReason::CreditExceeded);
        }
        self.window_frames -= 1;
        self.window_bytes -= frame.len() as i64;
        if id.sequence <= self.highest_sequence {
            // Nothing to admit, but the credit it used comes back.
            self.release(frame.len());
            return FrameOutcome::Duplicate;
        }
        let gap = self.highest_sequence != 0 && id.sequence > self.highest_sequence + 1;
        self.highest_sequence = id.sequence;
        self.events.push_back(ServerEvent::Admit { header, frame });
        FrameOutcome::Admitted { gap }
    }

    /// The sink took the frame. `already_committed`: it was committed in an
    /// earlier session, so it is acknowledged now.
    pub fn handle_admitted(&mut self, _now: Instant, header: &FrameHeader, already_committed: bool) {
        if already_committed && self.state == State::Open {
            self.pending_acks.insert(header.id.sequence);
        }
        self.release(header.frame_len());
    }

    /// The sink was busy: keep the frame (it is within the credit granted)
    /// and offer it again after the retry delay. No credit is granted while
    /// frames are parked.
    pub fn handle_busy(&mut self, now: Instant, header: FrameHeader, frame: FrameBuf) {
        if self.state == State::Closed {
            return;
        }
        self.parked.push_back((header, frame));
        self.retry_at.get_or_insert(now + self.cfg.busy_retry);
    }

    /// The sink committed frames of this session's agent run.
    pub fn handle_acks(&mut self, _now: Instant, sequences: impl IntoIterator<Item = u64>) {
        if self.state == State::Open {
            self.pending_acks.extend(sequences);
        }
    }

    /// Whether the sink takes more frames; while not, no credit is granted.
    pub fn set_accepting(&mut self, _now: Instant, accepting: bool) {
        self.accepting = accepting;
    }

    /// Time passed: enforce the hello deadline, retry parked frames.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let State::AwaitingHello { deadline } = self.state
            && now >= deadline
        {
            self.close(now, CloseReason::HandshakeTimeout, "no hello received in time");
        }
        if self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            while let Some((header, frame)) = self.parked.pop_front() {
                self.events.push_back(ServerEvent::Admit { header, frame });
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hello = match self.state {
            State::AwaitingHello { deadline } => Some(deadline),
            _ => None,
        };
        [hello, self.retry_at].into_iter().flatten().min()
    }

    /// Ends the session: pending acks go out first, then `Close`.
    pub fn close(&mut self, _now: Instant, reason: CloseReason, message: &str) {
        if self.state == State::Closed {
            return;
        }
        self.flush_acks();
        self.outbox.push_back(Control::Close(Close { reason, message: message.to_owned() }));
        self.state = State::Closed;
        self.events.push_back(ServerEvent::Closed { reason, by_peer: false });
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Control> {
        if self.state == State::Open {
            self.flush_acks();
            self.maybe_grant();
        }
        self.outbox.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Whether the session is over (drain the outbox, then close).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The authenticated peer.
    pub fn peer(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }

    /// Frames held back because the sink was busy.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    fn release(&mut self, len: usize) {
        self.release_frames = self.release_frames.saturating_add(1);
        self.release_bytes = self.release_bytes.saturating_add(len as u64);
    }

    fn flush_acks(&mut self) {
        if self.pending_acks.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.pending_acks);
        for ack in Ack::from_sequences(seqs) {
            self.outbox.push_back(Control::Ack(ack));
        }
    }

    fn maybe_grant(&mut self) {
        if self.accepting && self.window_owed {
            self.window_owed = false;
            self.grant(Credit { frames: self.cfg.credit_frames, bytes: self.cfg.credit_bytes });
        }
        if !self.accepting || !self.parked.is_empty() || self.release_frames == 0 {
            return;
        }
        // Grant in batches rather than per frame, but before the client's
        // window runs dry: when half of either window is used up, or half
        // of the frame window is waiting to be granted back.
        let low_frames = self.window_frames <= self.cfg.credit_frames / 2;
        let low_bytes = self.window_bytes <= (self.cfg.credit_bytes / 2) as i64;
        let many = self.release_frames >= (self.cfg.credit_frames / 2).max(1);
        if !(low_frames || low_bytes || many) {
            return;
        }
        let grant = Credit { frames: self.release_frames, bytes: self.release_bytes };
        self.release_frames = 0;
        self.release_bytes = 0;
        self.grant(grant);
    }

    fn grant(&mut self, grant: Credit) {
        self.window_frames = self.window_frames.saturating_add(grant.frames);
        self.window_bytes = self.window_bytes.saturating_add(i64::try_from(grant.bytes).unwrap_or(i64::MAX));
        self.outbox.push_back(Control::Credit(grant));
    }
}
