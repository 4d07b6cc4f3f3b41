//! The agent's sender: a [`Client`] owns a tokio runtime on its own thread,
//! keeps frames until the aggregator acknowledges them, reconnects with
//! jittered exponential backoff, and falls back from QUIC to gRPC by itself.
//!
//! [`Client::send`] is non-blocking and callable from any thread: the agent's
//! hot path is plain threads.

mod driver;
pub(crate) mod link;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aperture_core::frame::{FrameBuf, FrameId, HEADER_LEN};
use serde::Deserialize;

use crate::Carrier;
use crate::session::{ClientSession, ClientSessionConfig, PushError};
use crate::tls::{ClientTlsConfig, TlsError};

/// Which carriers the client may use.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CarrierChoice {
    /// QUIC, falling back to gRPC when QUIC cannot connect (and back again).
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// gRPC only.
    Grpc,
}

/// Client configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Aggregator `host:port`; both carriers use the same port unless overridden.
    pub aggregator: String,
    /// Bearer token (`APERTURE_AUTH_TOKEN`).
    pub token: Option<String>,
    /// How to trust the server's certificate.
    pub tls: ClientTlsConfig,
    /// Which carriers to use.
    pub carrier: CarrierChoice,
    /// UDP port for QUIC, when not the aggregator's port.
    pub quic_port: Option<u16>,
    /// TCP port for gRPC, when not the aggregator's port.
    pub grpc_port: Option<u16>,
    /// Bound of the unacknowledged-frame buffer, bytes; the oldest frames are
    /// dropped (and counted) beyond it.
    pub buffer_bytes: usize,
    /// Largest frame accepted from the producer, bytes.
    pub max_frame_bytes: usize,
    /// Connect and handshake timeout, ms.
    pub connect_timeout_ms: u64,
    /// Failed QUIC connects in a row before switching to gRPC (`auto`).
    pub quic_attempts_before_fallback: u32,
    /// While on gRPC, how often to try QUIC again, ms.
    pub quic_retry_interval_ms: u64,
    /// First reconnect delay, ms; doubles per failure (with jitter).
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay, ms.
    pub reconnect_max_ms: u64,
    /// QUIC idle timeout, ms.
    pub idle_timeout_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            aggregator: format!("aperture-aggregator.aperture.svc.cluster.local:{}", crate::server::DEFAULT_PORT),
            token: None,
            tls: ClientTlsConfig::default(),
            carrier: CarrierChoice::Auto,
            quic_port: None,
            grpc_port: None,
            buffer_bytes: 64 << 20,
            max_frame_bytes: aperture_core::frame::DEFAULT_MAX_PAYLOAD + HEADER_LEN,
            connect_timeout_ms: 5_000,
            quic_attempts_before_fallback: 3,
            quic_retry_interval_ms: 60_000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            idle_timeout_ms: 30_000,
        }
    }
}

/// Who the client sends for; stamped in the hello (frames carry the ids too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Stable agent id.
    pub agent_id: [u8; 16],
    /// This run's id.
    pub boot_id: [u8; 16],
    /// Node name.
    pub node: String,
    /// Agent version.
    pub agent_version: String,
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS trust settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `aggregator` is not `host:port`.
    #[error("aggregator address {value:?} is not host:port")]
    BadAddress {
        /// The configured value.
        value: String,
    },
    /// The token cannot travel in an HTTP header or is too long.
    #[error("auth token is not usable: {reason}")]
    BadToken {
        /// Why.
        reason: String,
    },
    /// The runtime thread could not start.
    #[error("starting the transport runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Why a frame was not taken.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    /// The frame itself is unacceptable (see the inner error).
    #[error(transparent)]
    Frame(#[from] PushError),
    /// [`Client::shutdown`] has begun.
    #[error("the transport client is shutting down; the frame was not taken")]
    ShuttingDown,
}

/// Counters of a client.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    /// Carrier of the current connection, if connected.
    pub carrier: Option<Carrier>,
    /// Whether a session is established now.
    pub established: bool,
    /// Frames taken by `send`.
    pub frames_pushed: u64,
    /// Frames handed to a carrier (first sends and resends).
    pub frames_sent: u64,
    /// Of which resends after a reconnect.
    pub frames_resent: u64,
    /// Frames acknowledged.
    pub frames_acked: u64,
    /// Frames dropped, oldest first, because the buffer was full.
    pub frames_dropped: u64,
    /// Their bytes.
    pub bytes_dropped: u64,
    /// Frame bytes handed to a carrier.
    pub bytes_sent: u64,
    /// Frames waiting for an ack now.
    pub unacked_frames: u64,
    /// Their bytes.
    pub unacked_bytes: u64,
    /// Sessions established after the first.
    pub reconnects: u64,
    /// Failed QUIC connection attempts.
    pub connect_failures_quic: u64,
    /// Failed gRPC connection attempts.
    pub connect_failures_grpc: u64,
    /// Switches from QUIC to gRPC.
    pub fallbacks_to_grpc: u64,
    /// Sessions the server refused.
    pub rejections: u64,
}

/// What [`Client::shutdown`] left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Frames acknowledged over the client's life.
    pub acked: u64,
    /// Frames never acknowledged (lost with the process).
    pub unacked: Vec<FrameId>,
}

pub(crate) struct Inner {
    session: Mutex<ClientSession>,
    wake: tokio::sync::Notify,
    stopping: AtomicBool,
    stop_now: tokio::sync::watch::Sender<bool>,
    /// 0 none, 1 QUIC, 2 gRPC.
    carrier: AtomicU8,
    established: AtomicBool,
    sessions: AtomicU64,
    connect_failures_quic: AtomicU64,
    connect_failures_grpc: AtomicU64,
    fallbacks: AtomicU64,
    rejections: AtomicU64,
}

impl Inner {
    pub(crate) fn session(&self) -> MutexGuard<'_, ClientSession> {
        // Every session method leaves it consistent before returning, so a
        // panic elsewhere while holding the lock does not corrupt it.
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_carrier(&self, c: Option<Carrier>) {
        let v = match c {
            None => 0,
            Some(Carrier::Quic) => 1,
            Some(Carrier::Grpc) => 2,
        };
        self.carrier.store(v, Relaxed);
    }
}

/// The agent's transport client.
pub struct Client {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("stats", &self.stats()).finish()
    }
}

impl Client {
    /// Starts the client on its own runtime thread; it connects in the background.
    pub fn start(config: ClientConfig, identity: AgentIdentity) -> Result<Client, StartError> {
        let connectors = driver::Connectors::new(&config)?;
        let token = config.token.clone().unwrap_or_default().into_bytes();
        let session = ClientSession::new(ClientSessionConfig {
            agent_id: identity.agent_id,
            boot_id: identity.boot_id,
            token,
            node: identity.node,
            agent_version: identity.agent_version,
            buffer_bytes: config.buffer_bytes,
            max_frame_len: config.max_frame_bytes,
            welcome_timeout: Duration::from_millis(config.connect_timeout_ms),
        });
        let inner = Arc::new(Inner {
            session: Mutex::new(session),
            wake: tokio::sync::Notify::new(),
            stopping: AtomicBool::new(false),
            stop_now: tokio::sync::watch::Sender::new(false),
            carrier: AtomicU8::new(0),
            established: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            connect_failures_quic: AtomicU64::new(0),
            connect_failures_grpc: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
        });
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Runtime)?;
        let driver_inner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("aperture-transport".into())
            .spawn(move || runtime.block_on(driver::run(driver_inner, connectors)))
            .map_err(StartError::Runtime)?;
        Ok(Client { inner, thread: Some(thread) })
    }

    /// Queues a frame for delivery without blocking. When the buffer is full
    /// the oldest frames are dropped to make room (see [`ClientStats`]).
    pub fn send(&self, frame: FrameBuf) -> Result<(), SendError> {
        if self.inner.stopping.load(Relaxed) {
            return Err(SendError::ShuttingDown);
        }
        self.inner.session().push(frame)?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ClientStats {
        let s = self.inner.session().stats();
        let carrier = match self.inner.carrier.load(Relaxed) {
            1 => Some(Carrier::Quic),
            2 => Some(Carrier::Grpc),
            _ => None,
        };
        ClientStats {
            carrier,
            established: self.inner.established.load(Relaxed),
            frames_pushed: s.frames_pushed,
            frames_sent: s.frames_sent,
            frames_resent: s.frames_resent,
            frames_acked: s.frames_acked,
            frames_dropped: s.frames_dropped,
            bytes_dropped: s.bytes_dropped,
            bytes_sent: s.bytes_sent,
            unacked_frames: s.unacked_frames,
            unacked_bytes: s.unacked_bytes,
            reconnects: self.inner.sessions.load(Relaxed).saturating_sub(1),
            connect_failures_quic: self.inner.connect_failures_quic.load(Relaxed),
            connect_failures_grpc: self.inner.connect_failures_grpc.load(Relaxed),
            fallbacks_to_grpc: self.inner.fallbacks.load(Relaxed),
            rejections: self.inner.rejections.load(Relaxed),
        }
    }

    /// Stops taking frames, waits up to `deadline` for every held frame to
    /// be acknowledged, closes the session and stops the runtime thread.
    pub fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        self.stop(deadline)
    }

    fn stop(&mut self, deadline: Duration) -> ShutdownReport {
        self.inner.stopping.store(true, Relaxed);
        let until = Instant::now() + deadline;
        while Instant::now() < until && !self.inner.session().unacked().is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.stop_now.send_replace(true);
        self.inner.wake.notify_one();
        if let Some(t) = self.thread.take() {
            // A panicked driver thread has nothing left to report.
            let _ = t.join();
        }
        let session = self.inner.session();
        ShutdownReport { acked: session.stats().frames_acked, unacked: session.unacked() }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}
