//! The [`Client`] the agent holds: takes frames from any thread, reports
//! counters, shuts down.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aperture_core::frame::{FrameBuf, FrameId};

use super::config::{AgentIdentity, ClientConfig, StartError};
use super::driver;
use super::runtime::SharedRuntime;
use super::shared::Inner;
use crate::Carrier;
use crate::session::{ClientSession, ClientSessionConfig, ClientSessionStats, PushError};

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

/// Counters of a client: the session's (spanning reconnects) and the
/// connection loop's.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    /// Carrier of the current connection, if connected.
    pub carrier: Option<Carrier>,
    /// Whether a session is established now.
    pub established: bool,
    /// Frames and bytes taken, sent, acknowledged, dropped and held.
    #[serde(flatten)]
    pub session: ClientSessionStats,
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
    /// Why the last connection attempt failed, if one did.
    pub last_connect_error: Option<String>,
}

/// What [`Client::shutdown`] left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Frames acknowledged over the client's life.
    pub acked: u64,
    /// Frames never acknowledged (lost with the process).
    pub unacked: Vec<FrameId>,
}

/// The agent's transport client.
pub struct Client {
    inner: Arc<Inner>,
    runner: Option<Runner>,
}

/// What runs the connection loop.
enum Runner {
    /// Its own thread and runtime (an agent).
    Thread(JoinHandle<()>),
    /// A task on a shared runtime; the sender's end is dropped when the
    /// task ends or the runtime drops it. (In a mutex so that the client
    /// stays `Sync`.)
    Task(Mutex<std::sync::mpsc::Receiver<()>>),
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("stats", &self.stats()).finish()
    }
}

impl Client {
    /// Starts the client on its own runtime thread; it connects in the background.
    pub fn start(config: ClientConfig, identity: AgentIdentity) -> Result<Client, StartError> {
        let (inner, connectors) = prepare(&config, identity)?;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Runtime)?;
        let driver_inner = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("aperture-transport".into())
            .spawn(move || {
                runtime.block_on(driver::drive_connections(driver_inner, connectors, driver::Endpoints::default()))
            })
            .map_err(StartError::Runtime)?;
        Ok(Client { inner, runner: Some(Runner::Thread(thread)) })
    }

    /// Starts the client as a task on a runtime shared with other clients
    /// (a load generator simulating many agents; an agent uses
    /// [`Client::start`]). It behaves as a client on its own thread: its
    /// own connection and session. [`Client::shutdown`] and dropping the
    /// client wait for the task to end, so call them from outside that
    /// runtime's threads.
    pub fn start_on(config: ClientConfig, identity: AgentIdentity, on: &SharedRuntime) -> Result<Client, StartError> {
        let (inner, connectors) = prepare(&config, identity)?;
        let eps = match &on.endpoints {
            Some(pool) => driver::Endpoints::shared(Arc::clone(pool), pool.assign()),
            None => driver::Endpoints::default(),
        };
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let driver_inner = Arc::clone(&inner);
        on.handle.spawn(async move {
            driver::drive_connections(driver_inner, connectors, eps).await;
            drop(done);
        });
        Ok(Client { inner, runner: Some(Runner::Task(Mutex::new(finished))) })
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
            session: s,
            reconnects: self.inner.sessions.load(Relaxed).saturating_sub(1),
            connect_failures_quic: self.inner.connect_failures_quic.load(Relaxed),
            connect_failures_grpc: self.inner.connect_failures_grpc.load(Relaxed),
            fallbacks_to_grpc: self.inner.fallbacks.load(Relaxed),
            rejections: self.inner.rejections.load(Relaxed),
            last_connect_error: self.inner.last_connect_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
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
        match self.runner.take() {
            // A panicked driver thread has nothing left to report.
            Some(Runner::Thread(t)) => drop(t.join()),
            // Returns when the task has ended (or was dropped with its runtime).
            Some(Runner::Task(finished)) => drop(finished.into_inner().unwrap_or_else(|p| p.into_inner()).recv()),
            None => {}
        }
        let session = self.inner.session();
        ShutdownReport { acked: session.stats().frames_acked, unacked: session.unacked() }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.runner.is_some() {
            self.stop(Duration::ZERO);
        }
    }
}

/// The session and connectors of a new client.
fn prepare(config: &ClientConfig, identity: AgentIdentity) -> Result<(Arc<Inner>, driver::Connectors), StartError> {
    let connectors = driver::Connectors::new(config)?;
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
        last_connect_error: Mutex::new(None),
    });
    Ok((inner, connectors))
}
