//! Drives one [`ServerSession`] for one connection, whatever the carrier:
//! inbound messages arrive on a channel fed by the carrier's reader task,
//! outbound messages go through [`Outbound`], acks arrive from the
//! [`Acker`](super::Acker) through the [`Registry`]. [`Shared`] is the state
//! every session and carrier of one server shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader};
use tokio::sync::{mpsc, watch};

use super::config::ServerLimits;
use super::sink::{Admission, IngressSink, PeerInfo, ReceivedFrame};
use super::stats;
use crate::Carrier;
use crate::auth::Authenticator;
use crate::control::{CloseReason, Control, Hello, RejectReason};
use crate::session::{FrameOutcome, ServerEvent, ServerSession, ServerSessionConfig};

/// What every session and carrier of one server shares.
pub(crate) struct Shared {
    pub sink: Arc<dyn IngressSink>,
    pub auth: Authenticator,
    pub session_cfg: ServerSessionConfig,
    pub limits: ServerLimits,
    pub decode_limits: DecodeLimits,
    pub counters: Arc<stats::Counters>,
    pub registry: Registry,
    pub accepting: watch::Sender<bool>,
    pub shutdown: watch::Sender<bool>,
    pub live_quic: std::sync::atomic::AtomicUsize,
    pub live_grpc: std::sync::atomic::AtomicUsize,
}

/// What a carrier's reader produced.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A decoded control message.
    Control(Control),
    /// A validated frame.
    Frame(FrameHeader, FrameBuf),
    /// Bytes that failed to decode; the connection is closed.
    Malformed {
        /// Metrics label.
        reason: &'static str,
        /// Detail for the log and the close message.
        detail: String,
    },
}

/// Where a session's outbound messages go.
pub(crate) trait Outbound: Send {
    /// Sends one message; `Err` when the connection is gone.
    fn send(&mut self, msg: Control) -> impl Future<Output = Result<(), ()>> + Send;

    /// The hello was accepted: the carrier may now take frames.
    fn authenticated(&mut self) {}
}

/// Largest control message a client may send before it is authenticated
/// (a hello: ids, a token of at most [`crate::auth::MAX_TOKEN_LEN`] bytes,
/// node name and version).
pub(crate) const PREAUTH_MAX_CONTROL: usize = 4 * 1024;

/// A connection that has not authenticated yet: counted in
/// `unauthenticated_connections` while it lives, and in `preauth_closed`
/// when it ends without [`PreAuth::authenticated`].
pub(crate) struct PreAuth {
    shared: Arc<Shared>,
    done: bool,
}

impl std::fmt::Debug for PreAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreAuth").field("done", &self.done).finish_non_exhaustive()
    }
}

impl PreAuth {
    /// Admits one more authenticating connection, or counts a refusal and
    /// returns `None` when `max_unauthenticated` are already in progress.
    pub(crate) fn admit(shared: &Arc<Shared>) -> Option<PreAuth> {
        let c = &shared.counters;
        let limit = shared.limits.max_unauthenticated as u64;
        let admitted = c.unauthenticated.fetch_update(Relaxed, Relaxed, |n| (n < limit).then_some(n + 1)).is_ok();
        if admitted {
            Some(PreAuth { shared: Arc::clone(shared), done: false })
        } else {
            c.preauth_refused.fetch_add(1, Relaxed);
            None
        }
    }

    /// The connection authenticated.
    pub(crate) fn authenticated(mut self) {
        self.done = true;
        self.shared.counters.unauthenticated.fetch_sub(1, Relaxed);
    }
}

impl Drop for PreAuth {
    fn drop(&mut self) {
        if !self.done {
            self.shared.counters.unauthenticated.fetch_sub(1, Relaxed);
            self.shared.counters.preauth_closed.fetch_add(1, Relaxed);
        }
    }
}

/// Commands to a running session from outside.
#[derive(Debug)]
pub(crate) enum SessionCmd {
    /// The sink committed these sequences.
    Ack(Vec<u64>),
    /// A newer session of the same agent run took over.
    Superseded,
}

type RunKey = aperture_core::ledger::RunKey;

/// Routes acks to the live session of each (agent id, boot id).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    sessions: Mutex<HashMap<RunKey, (u64, mpsc::UnboundedSender<SessionCmd>)>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunKey, (u64, mpsc::UnboundedSender<SessionCmd>)>> {
        // A poisoned map is still a valid map: entries are inserted and
        // removed whole.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, key: RunKey, tx: mpsc::UnboundedSender<SessionCmd>) -> u64 {
        let id = self.next_id.fetch_add(1, Relaxed);
        if let Some((_, old)) = self.lock().insert(key, (id, tx)) {
            let _ = old.send(SessionCmd::Superseded);
        }
        id
    }

    fn deregister(&self, key: RunKey, id: u64) {
        let mut map = self.lock();
        if map.get(&key).is_some_and(|(i, _)| *i == id) {
            map.remove(&key);
        }
    }

    /// Delivers acks; returns how many sequences found a live session.
    pub(crate) fn route(&self, key: RunKey, seqs: Vec<u64>) -> usize {
        let map = self.lock();
        match map.get(&key) {
            Some((_, tx)) => {
                let n = seqs.len();
                if tx.send(SessionCmd::Ack(seqs)).is_ok() { n } else { 0 }
            }
            None => 0,
        }
    }
}

/// The frames one session holds because the sink refused them as busy,
/// counted against the server's `parked_bytes` until the sink takes them or
/// the session ends.
struct ParkedFrames<'a> {
    shared: &'a Shared,
    /// Sequence → bytes.
    held: HashMap<u64, u64>,
}

impl<'a> ParkedFrames<'a> {
    fn new(shared: &'a Shared) -> ParkedFrames<'a> {
        ParkedFrames { shared, held: HashMap::new() }
    }

    /// Whether the frame may stay parked: it already is, or it fits.
    fn hold(&mut self, sequence: u64, bytes: u64) -> bool {
        if self.held.contains_key(&sequence) {
            return true;
        }
        let fits = self.shared.counters.parked.try_add(bytes, self.shared.limits.parked_bytes);
        if fits {
            self.held.insert(sequence, bytes);
        }
        fits
    }

    /// The frame left the session's hands.
    fn release(&mut self, sequence: u64) {
        if let Some(bytes) = self.held.remove(&sequence) {
            self.shared.counters.parked.release(bytes);
        }
    }
}

impl Drop for ParkedFrames<'_> {
    fn drop(&mut self) {
        let bytes = self.held.values().sum();
        self.shared.counters.parked.release(bytes);
    }
}

/// How a session ended, for the carrier's connection close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The hello was refused.
    Rejected(RejectReason),
    /// The server closed the session.
    Closed(CloseReason, String),
    /// The client closed it, or the connection went away.
    Peer,
}

/// Runs a session to its end. `hello`: a hello the carrier already read and
/// authenticated (gRPC); `None` when the session must read its own (QUIC).
pub(crate) async fn run_session<O: Outbound>(
    shared: Arc<Shared>,
    carrier: Carrier,
    addr: SocketAddr,
    mut inbound: mpsc::Receiver<Inbound>,
    out: &mut O,
    hello: Option<Hello>,
) -> SessionEnd {
    let mut session = ServerSession::new(Instant::now(), shared.session_cfg.clone(), shared.auth.clone());
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
    let mut accepting = shared.accepting.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    session.set_accepting(Instant::now(), *accepting.borrow_and_update());
    if *shutdown.borrow_and_update() {
        session.close(Instant::now(), CloseReason::ShuttingDown, "server shutting down");
    } else if let Some(h) = hello {
        session.handle_preauthenticated_hello(Instant::now(), h);
    }
    let c = &shared.counters;
    let mut peer: Option<Arc<PeerInfo>> = None;
    let mut registration: Option<(RunKey, u64)> = None;
    let mut parked = ParkedFrames::new(&shared);
    let mut overloaded = false;
    let mut end = SessionEnd::Peer;
    'run: loop {
        while let Some(ev) = session.poll_event() {
            let now = Instant::now();
            match ev {
                ServerEvent::Authenticated(p) => {
                    let key = (p.agent_id, p.boot_id);
                    registration = Some((key, shared.registry.register(key, cmd_tx.clone())));
                    c.sessions_opened.fetch_add(1, Relaxed);
                    c.connected(carrier).fetch_add(1, Relaxed);
                    out.authenticated();
                    tracing::info!(
                        carrier = carrier.as_str(), %addr, node = %p.node, agent = %p.agent_id,
                        version = %p.agent_version, "agent session opened"
                    );
                    peer = Some(Arc::new(PeerInfo {
                        agent_id: p.agent_id,
                        boot_id: p.boot_id,
                        node: p.node,
                        agent_version: p.agent_version,
                        addr,
                        carrier,
                    }));
                }
                ServerEvent::Rejected(r) => {
                    c.rejection(r.as_str());
                    tracing::warn!(carrier = carrier.as_str(), %addr, reason = r.as_str(), "agent session rejected");
                    end = SessionEnd::Rejected(r);
                }
                ServerEvent::Admit { header, frame } => {
                    let Some(p) = &peer else { continue };
                    let rf = ReceivedFrame { header, bytes: frame, carrier, peer: Arc::clone(p) };
                    match shared.sink.admit(rf) {
                        Admission::Queued => {
                            c.frames_queued.fetch_add(1, Relaxed);
                            parked.release(header.id.sequence);
                            session.handle_admitted(now, &header, false);
                        }
                        Admission::AlreadyCommitted => {
                            c.frames_already_committed.fetch_add(1, Relaxed);
                            parked.release(header.id.sequence);
                            session.handle_admitted(now, &header, true);
                        }
                        Admission::Busy(rf) => {
                            c.frames_busy.fetch_add(1, Relaxed);
                            if session.is_closed() {
                                // Dropped with the session: the client still
                                // holds it unacknowledged.
                                parked.release(rf.header.id.sequence);
                            } else if parked.hold(rf.header.id.sequence, rf.bytes.len() as u64) {
                                session.handle_busy(now, rf.header, rf.bytes);
                            } else {
                                c.sessions_overloaded.fetch_add(1, Relaxed);
                                overloaded = true;
                                let limit = shared.limits.parked_bytes;
                                tracing::info!(
                                    carrier = carrier.as_str(), %addr, parked_bytes = limit,
                                    "frames awaiting admission fill parked_bytes; closing the session, its agent sends them again after reconnecting"
                                );
                                let msg = format!(
                                    "aggregator overloaded: frames awaiting admission fill its {limit} bytes; reconnect later"
                                );
                                session.close(now, CloseReason::ShuttingDown, &msg);
                            }
                        }
                    }
                }
                ServerEvent::Closed { reason, by_peer } => {
                    c.closed(if overloaded { "overloaded" } else { reason.as_str() }, by_peer);
                    if !by_peer {
                        end = SessionEnd::Closed(reason, String::new());
                    }
                }
            }
        }
        while let Some(msg) = session.poll_transmit() {
            if let Control::Ack(a) = &msg {
                c.frames_acked.fetch_add(a.len(), Relaxed);
            }
            if let (Control::Close(cl), SessionEnd::Closed(_, m)) = (&msg, &mut end) {
                m.clone_from(&cl.message);
            }
            if out.send(msg).await.is_err() {
                break 'run;
            }
        }
        if session.is_closed() {
            break;
        }
        let wake = session.poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            m = inbound.recv() => {
                let now = Instant::now();
                match m {
                    Some(Inbound::Control(msg)) => session.handle_control(now, msg),
                    Some(Inbound::Frame(header, frame)) => {
                        c.frames_received.fetch_add(1, Relaxed);
                        c.bytes_received.fetch_add(frame.len() as u64, Relaxed);
                        match session.handle_frame(now, header, frame) {
                            FrameOutcome::Admitted { gap: true } => { c.sequence_gaps.fetch_add(1, Relaxed); }
                            FrameOutcome::Duplicate => { c.frames_duplicate_in_session.fetch_add(1, Relaxed); }
                            FrameOutcome::Admitted { gap: false } | FrameOutcome::Refused(_) => {}
                        }
                    }
                    Some(Inbound::Malformed { reason, detail }) => {
                        c.decode_error(reason);
                        tracing::warn!(carrier = carrier.as_str(), %addr, reason, %detail, "malformed input; closing connection");
                        session.close(now, CloseReason::Malformed, &detail);
                    }
                    None => {
                        c.closed("connection_lost", true);
                        break 'run;
                    }
                }
            }
            Some(cmd) = cmd_rx.recv() => match cmd {
                SessionCmd::Ack(seqs) => session.handle_acks(Instant::now(), seqs),
                SessionCmd::Superseded => {
                    session.close(Instant::now(), CloseReason::Superseded, "a newer session of this agent run took over");
                }
            },
            Ok(()) = accepting.changed() => session.set_accepting(Instant::now(), *accepting.borrow_and_update()),
            _ = shutdown.changed() => session.close(Instant::now(), CloseReason::ShuttingDown, "server shutting down"),
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => session.handle_timeout(Instant::now()),
        }
    }
    if let Some((key, id)) = registration {
        shared.registry.deregister(key, id);
        c.connected(carrier).fetch_sub(1, Relaxed);
        tracing::info!(carrier = carrier.as_str(), %addr, "agent session ended");
    }
    end
}
