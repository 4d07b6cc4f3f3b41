//! Starting the ingress, and the handle the aggregator keeps: addresses,
//! acknowledgements, accepting/not accepting, counters, shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameId, HEADER_LEN};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{ServeError, ServerConfig};
use super::session::Shared;
use super::sink::IngressSink;
use super::stats::{Counters, ServerStats};
use crate::Carrier;
use crate::auth::Authenticator;
use crate::session::ServerSessionConfig;

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
        let mut by_run: std::collections::HashMap<aperture_core::ledger::RunKey, Vec<u64>> = Default::default();
        for id in ids {
            by_run.entry((id.agent_id, id.boot_id)).or_default().push(id.sequence);
        }
        by_run.into_iter().map(|(key, seqs)| self.shared.registry.route(key, seqs)).sum()
    }
}

/// Reads a server's counters; see [`ServerHandle::stats_reader`].
#[derive(Clone)]
pub struct StatsReader {
    counters: Arc<Counters>,
}

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsReader").finish_non_exhaustive()
    }
}

impl StatsReader {
    /// A snapshot of the counters (a few atomic loads and one short lock).
    pub fn snapshot(&self) -> ServerStats {
        self.counters.snapshot()
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

    /// A reader of the counters to keep elsewhere (a metrics exporter):
    /// cheap to clone, usable from any thread, and still readable after
    /// the server stopped.
    pub fn stats_reader(&self) -> StatsReader {
        StatsReader { counters: Arc::clone(&self.shared.counters) }
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
    if l.parked_bytes < u64::from(l.max_frame_bytes) {
        return Err(ServeError::Limit {
            name: "parked_bytes",
            value: l.parked_bytes,
            reason: format!("must hold at least one frame of max_frame_bytes ({})", l.max_frame_bytes),
        });
    }
    let session_cfg = ServerSessionConfig {
        max_frame_len: l.max_frame_bytes,
        credit_frames: l.credit_frames.max(1),
        credit_bytes: l.credit_bytes.max(1),
        hello_timeout: Duration::from_millis(l.hello_timeout_ms),
        busy_retry: Duration::from_millis(l.busy_retry_ms),
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        max_protocol: l.max_protocol,
        capabilities: l.capabilities,
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
        let endpoint = super::quic::endpoint(&shared, &identity, addr)?;
        let bound =
            endpoint.local_addr().map_err(|source| ServeError::Bind { carrier: Carrier::Quic, addr, source })?;
        quic = Some((endpoint, bound));
    }
    let quic_addr = quic.as_ref().map(|(_, a)| *a);
    let mut tasks = Vec::new();
    if let Some((listener, bound)) = grpc {
        let plaintext = config.tls.insecure_plaintext;
        if plaintext {
            tracing::warn!(
                addr = %bound,
                "gRPC ingress WITHOUT TLS (tls.insecure_plaintext): agent tokens and profiles cross the network in cleartext"
            );
        }
        tasks.push(super::grpc::spawn(Arc::clone(&shared), listener, (!plaintext).then_some(&identity))?);
        tracing::info!(addr = %bound, tls = !plaintext, "gRPC ingress listening");
    }
    let quic_endpoint = quic.map(|(endpoint, bound)| {
        tasks.push(super::quic::spawn(Arc::clone(&shared), endpoint.clone()));
        tracing::info!(addr = %bound, "QUIC ingress listening");
        endpoint
    });
    Ok(ServerHandle { shared, quic_addr, grpc_addr, fingerprint: identity.fingerprint, quic_endpoint, tasks })
}
