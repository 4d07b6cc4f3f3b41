//! The aggregator's ingress: both carriers on one tokio runtime, feeding an
//! [`IngressSink`], with acknowledgements routed back through an [`Acker`].
//!
//! ```text
//! QUIC udp/50051 ─┐                        ┌─► IngressSink::admit(frame) ─► Queued | AlreadyCommitted | Busy
//!                 ├─► ServerSession (each) ┤
//! gRPC tcp/50051 ─┘                        └─◄ Acker::ack(ids)  (after the store committed)
//! ```

mod driver;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader, FrameId, HEADER_LEN};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub(crate) use driver::{Inbound, Outbound, SessionEnd, run_session};
pub use stats::ServerStats;

use crate::Carrier;
use crate::auth::{AuthConfig, AuthConfigError, Authenticator};
use crate::session::ServerSessionConfig;
use crate::tls::{ServerTlsConfig, TlsError};

/// Default port of both carriers.
pub const DEFAULT_PORT: u16 = 50051;

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
    pub agent_id: [u8; 16],
    /// Agent run identity.
    pub boot_id: [u8; 16],
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

/// Limits of the ingress. Every one of them bounds memory or work a client can cause.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Largest frame accepted, header + payload, bytes.
    pub max_frame_bytes: u32,
    /// Most concurrent connections per carrier; more are refused.
    pub max_connections: usize,
    /// Most concurrent streams per connection (QUIC bidirectional streams,
    /// HTTP/2 streams). A session uses one.
    pub max_streams_per_connection: u32,
    /// QUIC per-stream receive window, bytes.
    pub stream_receive_window: u32,
    /// QUIC per-connection receive window, bytes.
    pub connection_receive_window: u32,
    /// A connection without traffic for this long is closed, ms.
    pub idle_timeout_ms: u64,
    /// Time a client has to send its hello, ms.
    pub hello_timeout_ms: u64,
    /// Credit window per session, frames.
    pub credit_frames: u32,
    /// Credit window per session, bytes.
    pub credit_bytes: u64,
    /// Delay before a frame the sink refused as busy is offered again, ms.
    pub busy_retry_ms: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_frame_bytes: (aperture_core::frame::DEFAULT_MAX_PAYLOAD + HEADER_LEN) as u32,
            max_connections: 10_000,
            max_streams_per_connection: 1,
            stream_receive_window: 8 << 20,
            connection_receive_window: 16 << 20,
            idle_timeout_ms: 30_000,
            hello_timeout_ms: 10_000,
            credit_frames: 64,
            credit_bytes: 32 << 20,
            busy_retry_ms: 200,
        }
    }
}

/// Server configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// QUIC listen address; `None` disables the carrier.
    pub quic_listen: Option<SocketAddr>,
    /// gRPC listen address; `None` disables the carrier. When both use port
    /// 0 on the same IP, QUIC takes the port gRPC got (tests get one address).
    pub grpc_listen: Option<SocketAddr>,
    /// Token check.
    pub auth: AuthConfig,
    /// Certificate (QUIC always uses TLS; gRPC when `tls.grpc`).
    pub tls: ServerTlsConfig,
    /// Where a self-signed certificate is created and kept.
    pub data_dir: PathBuf,
    /// Limits.
    pub limits: ServerLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let any = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT));
        ServerConfig {
            quic_listen: Some(any),
            grpc_listen: Some(any),
            auth: AuthConfig::default(),
            tls: ServerTlsConfig::default(),
            data_dir: PathBuf::from("/var/lib/aperture"),
            limits: ServerLimits::default(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The auth settings are unusable (no token, and auth not disabled...).
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// The certificate could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A listen address could not be bound.
    #[error("binding {carrier} on {addr}: {source}; is another aggregator running, or is the port privileged?")]
    Bind {
        /// Which carrier.
        carrier: Carrier,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A limit is out of the range the carrier accepts.
    #[error("invalid limit {name} = {value}: {reason}")]
    Limit {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: u64,
        /// Why it does not work.
        reason: String,
    },
    /// Both carriers are disabled.
    #[error("both quic_listen and grpc_listen are disabled; enable at least one")]
    NothingToServe,
}

pub(crate) struct Shared {
    pub sink: Arc<dyn IngressSink>,
    pub auth: Authenticator,
    pub session_cfg: ServerSessionConfig,
    pub limits: ServerLimits,
    pub decode_limits: DecodeLimits,
    pub counters: stats::Counters,
    pub registry: driver::Registry,
    pub accepting: watch::Sender<bool>,
    pub shutdown: watch::Sender<bool>,
    pub live_quic: std::sync::atomic::AtomicUsize,
    pub live_grpc: std::sync::atomic::AtomicUsize,
}

/// Sends acknowledgements to the sessions of the frames' agents.
#[derive(Clone)]
pub struct Acker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker").finish_non_exhaustive()
    }
}

impl Acker {
    /// Acknowledges committed frames. Each id goes to the live session of
    /// its (agent id, boot id); ids whose agent is not connected are dropped
    /// (the agent resends them and gets `AlreadyCommitted`). Returns how
    /// many ids reached a session.
    pub fn ack(&self, ids: &[FrameId]) -> usize {
        let mut by_run: std::collections::HashMap<([u8; 16], [u8; 16]), Vec<u64>> = Default::default();
        for id in ids {
            by_run.entry((id.agent_id, id.boot_id)).or_default().push(id.sequence);
        }
        by_run.into_iter().map(|(key, seqs)| self.shared.registry.route(key, seqs)).sum()
    }
}

/// A running server.
pub struct ServerHandle {
    shared: Arc<Shared>,
    quic_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    fingerprint: [u8; 32],
    quic_endpoint: Option<quinn::Endpoint>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("quic_addr", &self.quic_addr)
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// Address QUIC is bound to (the real port when configured with 0).
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    /// Address gRPC is bound to.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// SHA-256 fingerprint of the certificate, as clients pin it.
    pub fn fingerprint(&self) -> String {
        crate::tls::format_fingerprint(&self.fingerprint)
    }

    /// The ack router for the sink's writer.
    pub fn acker(&self) -> Acker {
        Acker { shared: Arc::clone(&self.shared) }
    }

    /// Whether sessions grant credit. Set `false` above the aggregator's
    /// high-water mark: agents then stop sending after their current window
    /// (and buffer on their side); set `true` again to resume.
    pub fn set_accepting(&self, accepting: bool) {
        self.shared.accepting.send_replace(accepting);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        self.shared.counters.snapshot()
    }

    /// Graceful stop: sessions send their pending acks and a `Close`
    /// (shutting down), listeners stop, then connections close. Waits at
    /// most `grace` for sessions to end.
    pub async fn shutdown(self, grace: Duration) {
        self.shared.shutdown.send_replace(true);
        let deadline = tokio::time::Instant::now() + grace;
        while self.live_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(ep) = &self.quic_endpoint {
            ep.close(quinn::VarInt::from_u32(crate::control::CloseReason::ShuttingDown as u32), b"shutting down");
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(ep) = self.quic_endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
    }

    fn live_connections(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        self.shared.live_quic.load(Relaxed) + self.shared.live_grpc.load(Relaxed)
    }
}

/// Starts both carriers on the current tokio runtime.
pub async fn serve(config: ServerConfig, sink: Arc<dyn IngressSink>) -> Result<ServerHandle, ServeError> {
    if config.quic_listen.is_none() && config.grpc_listen.is_none() {
        return Err(ServeError::NothingToServe);
    }
    let auth = Authenticator::new(&config.auth)?;
    if !auth.is_enabled() {
        tracing::warn!("auth is disabled: any client reaching this port can push frames");
    }
    let identity = crate::tls::load_or_create_identity(&config.tls, &config.data_dir)?;
    let fp = crate::tls::format_fingerprint(&identity.fingerprint);
    if identity.generated {
        tracing::info!(fingerprint = %fp, dir = %config.data_dir.display(), "created a self-signed TLS certificate; pin this fingerprint in agents");
    } else {
        tracing::info!(fingerprint = %fp, "TLS certificate loaded");
    }
    let l = &config.limits;
    if (l.max_frame_bytes as usize) < HEADER_LEN {
        return Err(ServeError::Limit {
            name: "max_frame_bytes",
            value: l.max_frame_bytes.into(),
            reason: format!("must be at least the {HEADER_LEN}-byte header"),
        });
    }
    let session_cfg = ServerSessionConfig {
        max_frame_len: l.max_frame_bytes,
        credit_frames: l.credit_frames.max(1),
        credit_bytes: l.credit_bytes.max(1),
        hello_timeout: Duration::from_millis(l.hello_timeout_ms),
        busy_retry: Duration::from_millis(l.busy_retry_ms),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let shared = Arc::new(Shared {
        sink,
        auth,
        session_cfg,
        limits: l.clone(),
        decode_limits: DecodeLimits { max_payload: l.max_frame_bytes as usize - HEADER_LEN },
        counters: Default::default(),
        registry: Default::default(),
        accepting: watch::Sender::new(true),
        shutdown: watch::Sender::new(false),
        live_quic: Default::default(),
        live_grpc: Default::default(),
    });
    // Bind everything before spawning anything, so a failed bind leaves no
    // listener running behind an error.
    let mut grpc = None;
    if let Some(addr) = config.grpc_listen {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind {
            carrier: Carrier::Grpc,
            addr,
            source,
        })?;
        let bound =
            listener.local_addr().map_err(|source| ServeError::Bind { carrier: Carrier::Grpc, addr, source })?;
        grpc = Some((listener, bound));
    }
    let grpc_addr = grpc.as_ref().map(|(_, a)| *a);
    let mut quic = None;
    if let Some(mut addr) = config.quic_listen {
        if addr.port() == 0
            && let Some(g) = grpc_addr.filter(|g| g.ip() == addr.ip())
        {
            // Same port as gRPC when possible; any port otherwise.
            addr.set_port(g.port());
            if std::net::UdpSocket::bind(addr).is_err() {
                addr.set_port(0);
            }
        }
        let endpoint = crate::quic::server::endpoint(&shared, &identity, addr)?;
        let bound =
            endpoint.local_addr().map_err(|source| ServeError::Bind { carrier: Carrier::Quic, addr, source })?;
        quic = Some((endpoint, bound));
    }
    let quic_addr = quic.as_ref().map(|(_, a)| *a);
    let mut tasks = Vec::new();
    if let Some((listener, bound)) = grpc {
        let tls = config.tls.grpc.then_some(&identity);
        tasks.push(crate::grpc::server::spawn(Arc::clone(&shared), listener, tls)?);
        tracing::info!(addr = %bound, tls = config.tls.grpc, "gRPC ingress listening");
    }
    let quic_endpoint = quic.map(|(endpoint, bound)| {
        tasks.push(crate::quic::server::spawn(Arc::clone(&shared), endpoint.clone()));
        tracing::info!(addr = %bound, "QUIC ingress listening");
        endpoint
    });
    Ok(ServerHandle { shared, quic_addr, grpc_addr, fingerprint: identity.fingerprint, quic_endpoint, tasks })
}
