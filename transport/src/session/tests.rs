//! Both ends of the protocol wired back to back, with virtual time and no
//! sockets. Control messages go through their byte encoding on the way.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use aperture_core::frame::{FrameBuf, FrameHeader, FrameId, FrameKind, HEADER_LEN};
use aperture_core::ids::{AgentId, BootId};

use super::*;
use crate::auth::Authenticator;
use crate::control::{self, CloseReason, Control, RejectReason};

const AGENT: AgentId = AgentId([0xa; 16]);
const BOOT: BootId = BootId([0xb; 16]);
const TOKEN: &str = "t0ken";

/// A frame of `len` bytes in total (the payload is filler: the session does
/// not look inside it).
fn frame(seq: u64, len: usize) -> FrameBuf {
    let header = FrameHeader {
        kind: FrameKind::Batch,
        payload_len: (len - HEADER_LEN) as u32,
        id: FrameId { agent_id: AGENT, boot_id: BOOT, sequence: seq },
        sent_unix_ns: seq,
    };
    let mut h = [0u8; HEADER_LEN];
    header.write(&mut h);
    let mut buf = FrameBuf::with_capacity(len);
    buf.extend_from_slice(&h);
    buf.resize(len, 0x5a);
    buf
}

fn client_cfg(buffer_bytes: usize) -> ClientSessionConfig {
    ClientSessionConfig {
        agent_id: AGENT,
        boot_id: BOOT,
        token: TOKEN.as_bytes().to_vec(),
        node: "node-a".into(),
        agent_version: "test".into(),
        buffer_bytes,
        max_frame_len: 1 << 20,
        welcome_timeout: Duration::from_secs(5),
    }
}

fn server_cfg(credit_frames: u32, credit_bytes: u64) -> ServerSessionConfig {
    ServerSessionConfig { credit_frames, credit_bytes, ..ServerSessionConfig::default() }
}

/// What the fake sink answers for each frame.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SinkMode {
    Queue,
    Busy,
}

/// One client session connected to one server session through memory.
struct Link {
    now: Instant,
    client: ClientSession,
    server: ServerSession,
    /// Sequences the sink has taken, in arrival order (all sessions).
    admitted: Vec<u64>,
    /// Sequences the sink has committed (survives reconnects, like storage).
    committed: BTreeSet<u64>,
    mode: SinkMode,
    /// Every frame sequence that crossed the link, in order.
    wire: Vec<u64>,
    /// And their bytes.
    received: Vec<FrameBuf>,
    rejected: Vec<RejectReason>,
    server_closed: Vec<CloseReason>,
}

impl Link {
    fn new(client: ClientSession, scfg: ServerSessionConfig) -> Link {
        let now = Instant::now();
        let server = ServerSession::new(now, scfg, Authenticator::with_token(TOKEN));
        let mut link = Link {
            now,
            client,
            server,
            admitted: vec![],
            committed: BTreeSet::new(),
            mode: SinkMode::Queue,
            wire: vec![],
            received: vec![],
            rejected: vec![],
            server_closed: vec![],
        };
        link.client.handle_connected(now);
        link
    }

    /// Drops the connection and opens a new one to a fresh server session.
    fn reconnect(&mut self, scfg: ServerSessionConfig) {
        self.client.handle_disconnected(self.now);
        self.server = ServerSession::new(self.now, scfg, Authenticator::with_token(TOKEN));
        self.client.handle_connected(self.now);
    }

    /// Moves everything both ways until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.client.poll_transmit(self.now) {
                moved = true;
                match t {
                    Transmit::Control(c) => {
                        let bytes = c.to_bytes().expect("encode");
                        self.server.handle_control(self.now, control::decode(&bytes).expect("decode"));
                    }
                    Transmit::Frame { id, bytes, .. } => {
                        self.wire.push(id.sequence);
                        let header = FrameHeader::parse(&bytes, &Default::default()).expect("header");
                        let mut copy = FrameBuf::new();
                        copy.extend_from_slice(&bytes);
                        self.received.push(copy.clone());
                        self.server.handle_frame(self.now, header, copy);
                    }
                }
            }
            while let Some(ev) = self.server.poll_event() {
                moved = true;
                match ev {
                    ServerEvent::Admit { header, frame } => match self.mode {
                        SinkMode::Busy => self.server.handle_busy(self.now, header, frame),
                        SinkMode::Queue => {
                            let seq = header.id.sequence;
                            self.admitted.push(seq);
                            let already = self.committed.contains(&seq);
                            self.server.handle_admitted(self.now, &header, already);
                        }
                    },
                    ServerEvent::Rejected(r) => self.rejected.push(r),
                    ServerEvent::Closed { reason, .. } => self.server_closed.push(reason),
                    ServerEvent::Authenticated(_) => {}
                }
            }
            while let Some(c) = self.server.poll_transmit() {
                moved = true;
                let bytes = c.to_bytes().expect("encode");
                self.client.handle_control(self.now, control::decode(&bytes).expect("decode"));
            }
            if !moved {
                return;
            }
        }
    }

    /// The sink commits these sequences and acks them.
    fn commit(&mut self, seqs: &[u64]) {
        self.committed.extend(seqs);
        self.server.handle_acks(self.now, seqs.iter().copied());
        self.pump();
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.client.handle_timeout(self.now);
        self.server.handle_timeout(self.now);
        self.pump();
    }

    fn unacked(&self) -> Vec<u64> {
        self.client.unacked().iter().map(|id| id.sequence).collect()
    }
}

fn events(c: &mut ClientSession) -> Vec<ClientEvent> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

#[test]
fn frames_flow_and_selective_acks_release_them() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    for seq in 1..=5 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    assert!(matches!(events(&mut link.client)[..], [ClientEvent::Established { .. }]));
    assert_eq!(link.admitted, vec![1, 2, 3, 4, 5]);
    // Committed out of order across shards.
    link.commit(&[4, 2]);
    assert_eq!(link.unacked(), vec![1, 3, 5]);
    link.commit(&[5, 1, 3]);
    assert!(link.unacked().is_empty());
    let s = link.client.stats();
    assert_eq!((s.frames_pushed, s.frames_sent, s.frames_acked, s.frames_resent), (5, 5, 5, 0));
}

#[test]
fn reconnect_resends_exactly_the_unacked_frames_in_order() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    for seq in 1..=6 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    link.commit(&[1, 3, 4]);
    link.wire.clear();
    link.reconnect(server_cfg(16, 1 << 20));
    link.pump();
    assert_eq!(link.wire, vec![2, 5, 6], "only the unacked frames, in order");
    assert_eq!(link.client.stats().frames_resent, 3);
    // A new frame after the reconnect follows the resent ones.
    link.client.push(frame(7, 100)).expect("push");
    link.pump();
    assert_eq!(link.wire, vec![2, 5, 6, 7]);
}

#[test]
fn resent_frames_already_committed_are_acked_without_reingesting() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    for seq in 1..=3 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    // Committed to storage, but the acks were lost with the connection.
    link.committed.extend([1, 2, 3]);
    link.reconnect(server_cfg(16, 1 << 20));
    link.pump();
    // The sink saw them again (it answered AlreadyCommitted), the client is released.
    assert!(link.unacked().is_empty());
    assert_eq!(link.client.stats().frames_acked, 3);
}

#[test]
fn sequence_gaps_are_accepted_and_in_session_duplicates_ignored() {
    let now = Instant::now();
    let mut server = ServerSession::new(now, server_cfg(16, 1 << 20), Authenticator::with_token(TOKEN));
    let hello = Control::Hello(crate::control::Hello {
        protocol: crate::control::PROTOCOL_VERSION,
        agent_id: AGENT,
        boot_id: BOOT,
        token: TOKEN.into(),
        node: "n".into(),
        agent_version: "v".into(),
    });
    server.handle_control(now, hello);
    let mut send = |seq| {
        let f = frame(seq, 100);
        let h = FrameHeader::parse(&f, &Default::default()).expect("header");
        server.handle_frame(now, h, f)
    };
    assert_eq!(send(3), FrameOutcome::Admitted { gap: false }, "a session may start anywhere");
    assert_eq!(send(4), FrameOutcome::Admitted { gap: false });
    assert_eq!(send(9), FrameOutcome::Admitted { gap: true });
    assert_eq!(send(9), FrameOutcome::Duplicate);
    assert_eq!(send(5), FrameOutcome::Duplicate);
    let admitted: Vec<u64> = std::iter::from_fn(|| server.poll_event())
        .filter_map(|e| match e {
            ServerEvent::Admit { header, .. } => Some(header.id.sequence),
            _ => None,
        })
        .collect();
    assert_eq!(admitted, vec![3, 4, 9]);
    assert!(!server.is_closed());
}

#[test]
fn full_buffer_drops_the_oldest_and_counts_it() {
    let mut client = ClientSession::new(client_cfg(350));
    for seq in 1..=3 {
        assert_eq!(client.push(frame(seq, 100)).expect("push").dropped_frames, 0);
    }
    let report = client.push(frame(4, 200)).expect("push");
    assert_eq!((report.dropped_frames, report.dropped_bytes), (2, 200));
    let held: Vec<u64> = client.unacked().iter().map(|i| i.sequence).collect();
    assert_eq!(held, vec![3, 4]);
    let s = client.stats();
    assert_eq!((s.frames_dropped, s.bytes_dropped, s.unacked_frames, s.unacked_bytes), (2, 200, 2, 300));
    // A frame larger than the whole buffer is refused, nothing dropped.
    assert!(matches!(client.push(frame(5, 400)), Err(PushError::TooLarge { len: 400, limit: 350 })));
    assert_eq!(client.stats().unacked_frames, 2);
}

#[test]
fn push_checks_identity_and_order() {
    let mut client = ClientSession::new(client_cfg(1 << 20));
    client.push(frame(2, 100)).expect("push");
    assert!(matches!(client.push(frame(2, 100)), Err(PushError::SequenceNotIncreasing { sequence: 2, last: 2 })));
    let mut other = frame(3, 100);
    other[16] ^= 1;
    assert!(matches!(client.push(other), Err(PushError::WrongIdentity { .. })));
    let mut short = frame(3, 100);
    short.resize(90, 0);
    assert!(matches!(client.push(short), Err(PushError::LengthMismatch { announced: 100, actual: 90 })));
}

#[test]
fn credit_runs_out_then_refills_as_the_sink_takes_frames() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(4, 1 << 20));
    link.mode = SinkMode::Busy;
    for seq in 1..=10 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    // Four frames of credit: four sent, all parked by the busy sink, no grant.
    assert_eq!(link.wire, vec![1, 2, 3, 4]);
    assert_eq!(link.client.credit().0, 0);
    assert_eq!(link.server.parked(), 4);
    link.advance(Duration::from_millis(50));
    assert_eq!(link.wire.len(), 4, "still busy before the retry delay");
    // The sink frees up: parked frames are admitted after the retry delay,
    // credit flows back, and the rest follows.
    link.mode = SinkMode::Queue;
    link.advance(Duration::from_secs(1));
    assert_eq!(link.admitted, (1..=10).collect::<Vec<_>>());
    assert_eq!(link.wire, (1..=10).collect::<Vec<_>>());
    assert!(!link.server.is_closed());
}

#[test]
fn byte_credit_bounds_frames_in_flight() {
    // 250 bytes of credit: two 100-byte frames, the third overshoots, the fourth waits.
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(100, 250));
    link.mode = SinkMode::Busy;
    for seq in 1..=5 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    assert_eq!(link.wire, vec![1, 2, 3]);
    link.mode = SinkMode::Queue;
    link.advance(Duration::from_secs(1));
    assert_eq!(link.wire, vec![1, 2, 3, 4, 5]);
}

#[test]
fn withholding_credit_while_not_accepting() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(2, 1 << 20));
    link.pump();
    link.server.set_accepting(link.now, false);
    for seq in 1..=6 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    assert_eq!(link.wire, vec![1, 2], "the initial window only");
    link.server.set_accepting(link.now, true);
    link.pump();
    assert_eq!(link.wire, (1..=6).collect::<Vec<_>>());
}

#[test]
fn a_session_opened_while_not_accepting_gets_its_window_once_the_sink_takes_frames() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(2, 1 << 20));
    link.server.set_accepting(link.now, false);
    for seq in 1..=6 {
        link.client.push(frame(seq, 100)).expect("push");
    }
    link.pump();
    assert!(link.wire.is_empty(), "no credit in the welcome: {:?}", link.wire);
    assert_eq!(link.client.credit(), (0, 0));
    link.server.set_accepting(link.now, true);
    link.pump();
    assert_eq!(link.wire, (1..=6).collect::<Vec<_>>());
    assert_eq!(link.admitted, (1..=6).collect::<Vec<_>>());
}

#[test]
fn sending_beyond_credit_closes_the_session() {
    let now = Instant::now();
    let mut server = ServerSession::new(now, server_cfg(1, 1 << 20), Authenticator::disabled());
    server.handle_control(
        now,
        Control::Hello(crate::control::Hello {
            protocol: crate::control::PROTOCOL_VERSION,
            agent_id: AGENT,
            boot_id: BOOT,
            token: vec![],
            node: String::new(),
            agent_version: String::new(),
        }),
    );
    for seq in 1..=2 {
        let f = frame(seq, 100);
        let h = FrameHeader::parse(&f, &Default::default()).expect("header");
        let outcome = server.handle_frame(now, h, f);
        if seq == 2 {
            assert_eq!(outcome, FrameOutcome::Refused(CloseReason::CreditExceeded));
        }
    }
    assert!(server.is_closed());
}

#[test]
fn auth_failures_are_rejected_with_a_reason_and_nothing_admitted() {
    let long = "x".repeat(crate::auth::MAX_TOKEN_LEN + 1);
    let cases: &[(&str, RejectReason)] = &[
        ("", RejectReason::MissingToken),
        ("wrong", RejectReason::WrongToken),
        ("t0kem", RejectReason::WrongToken),
        ("t0k", RejectReason::WrongToken),
        (&long, RejectReason::OversizedToken),
    ];
    for (token, want) in cases {
        let mut cfg = client_cfg(1 << 20);
        cfg.token = token.as_bytes().to_vec();
        let mut link = Link::new(ClientSession::new(cfg), server_cfg(16, 1 << 20));
        link.client.push(frame(1, 100)).expect("push");
        link.pump();
        assert_eq!(link.rejected, vec![*want], "token {token:?}");
        assert!(link.admitted.is_empty());
        assert!(link.wire.is_empty(), "nothing sent after a reject");
        let evs = events(&mut link.client);
        assert!(matches!(&evs[..], [ClientEvent::Rejected(r)] if r.reason == *want), "{evs:?}");
        assert!(link.client.is_closed() && link.server.is_closed());
    }
}

#[test]
fn frames_before_hello_or_from_another_agent_close_the_session() {
    let now = Instant::now();
    let mut server = ServerSession::new(now, server_cfg(16, 1 << 20), Authenticator::disabled());
    let f = frame(1, 100);
    let h = FrameHeader::parse(&f, &Default::default()).expect("header");
    assert_eq!(server.handle_frame(now, h, f), FrameOutcome::Refused(CloseReason::ProtocolViolation));
    assert!(server.is_closed());

    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    link.pump();
    let mut f = frame(1, 100);
    f[32] ^= 1; // another boot id
    let h = FrameHeader::parse(&f, &Default::default()).expect("header");
    assert_eq!(link.server.handle_frame(link.now, h, f), FrameOutcome::Refused(CloseReason::ProtocolViolation));
}

#[test]
fn handshake_deadlines_on_both_ends() {
    let now = Instant::now();
    let mut server = ServerSession::new(now, server_cfg(16, 1 << 20), Authenticator::disabled());
    assert_eq!(server.poll_timeout(), Some(now + Duration::from_secs(10)));
    server.handle_timeout(now + Duration::from_secs(11));
    assert!(server.is_closed());
    assert!(matches!(server.poll_transmit(), Some(Control::Close(c)) if c.reason == CloseReason::HandshakeTimeout));

    let mut client = ClientSession::new(client_cfg(1 << 20));
    client.handle_connected(now);
    client.handle_timeout(now + Duration::from_secs(6));
    assert!(client.is_closed());
    let evs = events(&mut client);
    assert!(matches!(&evs[..], [ClientEvent::Closed { reason: CloseReason::HandshakeTimeout, by_peer: false, .. }]));
}

#[test]
fn server_close_sends_pending_acks_first() {
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), server_cfg(16, 1 << 20));
    link.client.push(frame(1, 100)).expect("push");
    link.pump();
    link.server.handle_acks(link.now, [1]);
    link.server.close(link.now, CloseReason::ShuttingDown, "bye");
    link.pump();
    assert!(link.unacked().is_empty());
    assert!(link.client.is_closed());
    assert_eq!(link.server_closed, vec![CloseReason::ShuttingDown]);
}

#[test]
fn frames_above_the_servers_limit_are_dropped_unsent_and_counted() {
    let small = ServerSessionConfig { max_frame_len: 500, ..server_cfg(16, 1 << 20) };
    let mut link = Link::new(ClientSession::new(client_cfg(1 << 20)), small.clone());
    link.client.push(frame(1, 100)).expect("push");
    link.client.push(frame(2, 900)).expect("push");
    link.client.push(frame(3, 100)).expect("push");
    link.pump();
    assert_eq!(link.wire, vec![1, 3], "the oversized frame never crosses the link");
    assert!(link.server_closed.is_empty(), "the session survives: {:?}", link.server_closed);
    let s = link.client.stats();
    assert_eq!((s.frames_dropped_oversized, s.bytes_dropped_oversized), (1, 900));
    assert_eq!(link.unacked(), vec![1, 3]);
    // Not resent on a later session either.
    link.wire.clear();
    link.reconnect(small);
    link.pump();
    assert_eq!(link.wire, vec![1, 3]);
    assert_eq!(link.client.stats().frames_dropped_oversized, 1);
}

#[path = "compat_tests.rs"]
mod compat;
