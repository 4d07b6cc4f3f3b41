//! The client's connection loop: connect, run the session until the
//! connection ends, back off, reconnect; QUIC first, gRPC when QUIC keeps
//! failing, QUIC again when it comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::config::{CarrierChoice, ClientConfig, StartError};
use super::connect::{ConnectError, LinkEvent};
use super::grpc::GrpcConnector;
use super::link::Link;
use super::quic::QuicConnector;
use super::runtime::EndpointPool;
use super::shared::Inner;
use crate::Carrier;
use crate::control::{Capabilities, CloseReason};
use crate::session::ClientEvent;
use crate::tls::{self, TlsError, TrustMode};

/// Everything needed to connect, prepared once at start.
pub(crate) struct Connectors {
    host: String,
    quic_port: u16,
    grpc_port: u16,
    choice: CarrierChoice,
    quic: Option<QuicConnector>,
    grpc: GrpcConnector,
    fallback_after: u32,
    quic_retry: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

impl Connectors {
    pub(crate) fn new(cfg: &ClientConfig) -> Result<Connectors, StartError> {
        let (host, port) =
            split_host_port(&cfg.aggregator).ok_or_else(|| StartError::BadAddress { value: cfg.aggregator.clone() })?;
        let timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let server_name = cfg.tls.server_name.clone().unwrap_or_else(|| host.clone());
        let quic = if cfg.carrier == CarrierChoice::Grpc {
            None
        } else {
            let (crypto, mode) = tls::client_config(&cfg.tls, tls::QUIC_ALPN)?;
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
                .map_err(|e| TlsError::Rustls(rustls::Error::General(format!("TLS config unusable for QUIC: {e}"))))?;
            let idle = Duration::from_millis(cfg.idle_timeout_ms);
            Some(QuicConnector {
                crypto: Arc::new(crypto),
                transport: Arc::new(crate::wire::quic::transport_config(1 << 20, 2 << 20, idle, 0, Some(idle / 3))),
                server_name: server_name.clone(),
                timeout,
                insecure: mode == TrustMode::Insecure,
            })
        };
        let authorization = match cfg.token.as_deref().filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| StartError::BadToken {
                reason: "it must be printable ASCII to travel in a gRPC header".into(),
            })?),
        };
        let (grpc_tls, insecure) = if cfg.tls.insecure_plaintext {
            tracing::warn!(
                "gRPC carrier WITHOUT TLS (insecure_plaintext): the auth token and profiles cross the network in cleartext"
            );
            (None, false)
        } else {
            let (c, mode) = tls::client_config(&cfg.tls, b"h2")?;
            let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|_| StartError::BadAddress { value: server_name.clone() })?;
            (Some((Arc::new(c), name)), mode == TrustMode::Insecure)
        };
        Ok(Connectors {
            host,
            quic_port: cfg.quic_port.unwrap_or(port),
            grpc_port: cfg.grpc_port.unwrap_or(port),
            choice: cfg.carrier,
            quic,
            grpc: GrpcConnector {
                authorization,
                tls: grpc_tls,
                insecure,
                timeout,
                max_message: cfg.max_frame_bytes + 1024,
            },
            fallback_after: cfg.quic_attempts_before_fallback.max(1),
            quic_retry: Duration::from_millis(cfg.quic_retry_interval_ms),
            backoff_min: Duration::from_millis(cfg.reconnect_min_ms.max(1)),
            backoff_max: Duration::from_millis(cfg.reconnect_max_ms.max(cfg.reconnect_min_ms).max(1)),
        })
    }

    async fn resolve(&self, port: u16) -> Result<SocketAddr, ConnectError> {
        let mut addrs = tokio::net::lookup_host((self.host.as_str(), port))
            .await
            .map_err(|e| ConnectError::Unreachable(format!("resolving {}: {e}", self.host)))?;
        addrs.next().ok_or_else(|| ConnectError::Unreachable(format!("{} resolves to no address", self.host)))
    }
}

/// The QUIC endpoint a client connects from: its own, bound on first use
/// and rebound when the address family changes (an agent), or one of a
/// pool many clients share (a load generator), which it never closes.
#[derive(Default)]
pub(crate) struct Endpoints {
    quic: Option<quinn::Endpoint>,
    shared: Option<(Arc<EndpointPool>, usize)>,
}

impl Endpoints {
    /// Slot `slot` of `pool`.
    pub(crate) fn shared(pool: Arc<EndpointPool>, slot: usize) -> Endpoints {
        Endpoints { quic: None, shared: Some((pool, slot)) }
    }

    fn for_addr(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
        let ep = self.existing_or_new(addr)?;
        if self.shared.is_none() {
            self.quic = Some(ep.clone());
        }
        Ok(ep)
    }

    /// An endpoint for `addr`'s family without changing this one's own:
    /// the shared one, its own when it matches, or a fresh one.
    fn existing_or_new(&self, addr: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
        if let Some((pool, slot)) = &self.shared {
            return pool
                .endpoint(*slot, addr)
                .map_err(|e| ConnectError::Unreachable(format!("binding a shared UDP socket: {e}")));
        }
        if let Some(ep) = &self.quic
            && ep.local_addr().is_ok_and(|l| l.is_ipv6() == addr.is_ipv6())
        {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .map_err(|e| ConnectError::Unreachable(format!("{e}")))?;
        crate::wire::quic::client_endpoint(bind)
            .map_err(|e| ConnectError::Unreachable(format!("binding a UDP socket on {bind}: {e}")))
    }
}

async fn connect(c: &Connectors, eps: &mut Endpoints, carrier: Carrier) -> Result<Link, ConnectError> {
    match carrier {
        Carrier::Quic => {
            let Some(q) = &c.quic else {
                return Err(ConnectError::Unreachable("QUIC is disabled (carrier: grpc)".into()));
            };
            let addr = c.resolve(c.quic_port).await?;
            q.connect(&eps.for_addr(addr)?, addr).await.map(Link::quic)
        }
        Carrier::Grpc => {
            let addr = c.resolve(c.grpc_port).await?;
            c.grpc.connect(addr).await.map(Link::grpc)
        }
    }
}

/// Jittered exponential backoff: each delay is drawn from the upper half of
/// `min * 2^failures`, capped at `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = self.min.saturating_mul(1u32 << self.failures.min(20)).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let ms = base.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    fn saturate(&mut self) {
        self.failures = 20;
    }
}

enum LinkEnd {
    /// The connection ended; `established`: a session had been welcomed.
    Lost { established: bool },
    /// The server refused the session.
    Rejected,
    /// The server closed the session to be left alone for a while (shutting
    /// down, or overloaded): reconnect with a growing delay.
    Deferred,
    /// The server is older than this client: reconnect at once, offering
    /// its protocol.
    OlderServer,
    /// QUIC works again: continue on this link.
    Switch(Link),
    /// Shutdown.
    Stopped,
}

/// Connects, sends and reconnects until the client stops: the client's
/// thread runs this on its own runtime, or a shared runtime as a task.
pub(crate) async fn drive_connections(inner: Arc<Inner>, c: Connectors, mut eps: Endpoints) {
    let mut stop = inner.stop_now.subscribe();
    let mut backoff = Backoff { min: c.backoff_min, max: c.backoff_max, failures: 0 };
    let mut on_grpc = c.choice == CarrierChoice::Grpc;
    let mut quic_failures = 0u32;
    let mut next: Option<Link> = None;
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        let carrier = if on_grpc { Carrier::Grpc } else { Carrier::Quic };
        let attempt = match next.take() {
            Some(link) => Ok(link),
            None => tokio::select! {
                r = connect(&c, &mut eps, carrier) => r,
                _ = stop.changed() => break,
            },
        };
        match attempt {
            Ok(link) => {
                let carrier = link.carrier;
                if carrier == Carrier::Quic {
                    quic_failures = 0;
                    if on_grpc && c.choice == CarrierChoice::Auto {
                        tracing::info!("QUIC is reachable again; leaving gRPC");
                        on_grpc = false;
                    }
                }
                let probe = (on_grpc && c.choice == CarrierChoice::Auto && c.quic.is_some()).then_some(Probe {
                    connectors: &c,
                    eps: &eps,
                    every: c.quic_retry,
                });
                match run_link(&inner, link, &mut stop, probe).await {
                    LinkEnd::Stopped => break,
                    LinkEnd::Switch(l) => {
                        next = Some(l);
                        continue;
                    }
                    LinkEnd::Lost { established: true } => backoff.reset(),
                    LinkEnd::Lost { established: false } | LinkEnd::Deferred => {}
                    LinkEnd::OlderServer => {
                        backoff.reset();
                        continue;
                    }
                    LinkEnd::Rejected => {
                        inner.rejections.fetch_add(1, Relaxed);
                        backoff.saturate();
                    }
                }
            }
            Err(e) => {
                let counter = match carrier {
                    Carrier::Quic => &inner.connect_failures_quic,
                    Carrier::Grpc => &inner.connect_failures_grpc,
                };
                counter.fetch_add(1, Relaxed);
                *inner.last_connect_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{carrier}: {e}"));
                if let ConnectError::Rejected(reason, _) = &e {
                    inner.rejections.fetch_add(1, Relaxed);
                    tracing::error!(carrier = carrier.as_str(), reason = reason.as_str(), error = %e, "aggregator refused the session; check the auth token");
                    backoff.saturate();
                } else {
                    tracing::warn!(carrier = carrier.as_str(), error = %e, "cannot connect to the aggregator");
                }
                if carrier == Carrier::Quic && c.choice == CarrierChoice::Auto {
                    quic_failures += 1;
                    if quic_failures >= c.fallback_after && !matches!(e, ConnectError::Rejected(..)) {
                        tracing::warn!(
                            attempts = quic_failures,
                            "QUIC handshake keeps failing (UDP blocked?); falling back to gRPC on the same address"
                        );
                        inner.fallbacks.fetch_add(1, Relaxed);
                        on_grpc = true;
                        quic_failures = 0;
                        continue;
                    }
                }
            }
        }
        let delay = backoff.next();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => break,
        }
    }
    inner.set_carrier(None);
    if let Some(ep) = eps.quic {
        ep.close(quinn::VarInt::from_u32(0), b"");
        let _ = tokio::time::timeout(Duration::from_millis(500), ep.wait_idle()).await;
    }
}

/// Periodic QUIC attempts while the session runs on gRPC.
struct Probe<'a> {
    connectors: &'a Connectors,
    eps: &'a Endpoints,
    every: Duration,
}

async fn run_link(
    inner: &Inner,
    mut link: Link,
    stop: &mut watch::Receiver<bool>,
    probe: Option<Probe<'_>>,
) -> LinkEnd {
    let carrier = link.carrier;
    inner.session().handle_connected(Instant::now());
    inner.set_carrier(Some(carrier));
    let mut established = false;
    let mut probe_at = probe.as_ref().map(|p| Instant::now() + p.every);
    let mut probe_task: Option<JoinHandle<Result<Link, ConnectError>>> = None;
    let end = 'run: loop {
        if let Err(e) = flush(inner, &mut link).await {
            tracing::warn!(carrier = carrier.as_str(), error = %e, "connection to the aggregator lost");
            break 'run LinkEnd::Lost { established };
        }
        let events: Vec<ClientEvent> = {
            let mut s = inner.session();
            std::iter::from_fn(|| s.poll_event()).collect()
        };
        for ev in events {
            match ev {
                ClientEvent::Established { server_version, protocol, capabilities } => {
                    established = true;
                    inner.established.store(true, Relaxed);
                    inner.sessions.fetch_add(1, Relaxed);
                    let unacked = inner.session().stats().unacked_frames;
                    let lock_classes = capabilities.contains(Capabilities::LOCK_CLASSES);
                    tracing::info!(carrier = carrier.as_str(), %server_version, protocol, lock_classes, unacked, "connected to the aggregator");
                    if !lock_classes {
                        tracing::info!(
                            %server_version,
                            "the aggregator does not read lock classes; lock waits are sent as other futex until it is upgraded"
                        );
                    }
                }
                ClientEvent::OlderServer { offered, message } => {
                    tracing::info!(carrier = carrier.as_str(), offered, %message, "the aggregator is older than this agent; connecting again with its session protocol");
                    break 'run LinkEnd::OlderServer;
                }
                ClientEvent::Rejected(r) => {
                    tracing::error!(carrier = carrier.as_str(), reason = r.reason.as_str(), message = %r.message, "aggregator refused the session; check the auth token");
                    break 'run LinkEnd::Rejected;
                }
                ClientEvent::Closed { reason, by_peer, message } => {
                    tracing::info!(carrier = carrier.as_str(), reason = reason.as_str(), by_peer, %message, "session closed");
                    if by_peer && reason == CloseReason::ShuttingDown {
                        break 'run LinkEnd::Deferred;
                    }
                    break 'run LinkEnd::Lost { established };
                }
            }
        }
        let wake = inner.session().poll_timeout().unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let probe_wake =
            probe_at.filter(|_| probe_task.is_none()).unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            ev = link.rx.recv() => match ev {
                Some(LinkEvent::Control(c)) => inner.session().handle_control(Instant::now(), c),
                Some(LinkEvent::Lost(why)) => {
                    tracing::warn!(carrier = carrier.as_str(), %why, "connection to the aggregator lost");
                    break 'run LinkEnd::Lost { established };
                }
                None => break 'run LinkEnd::Lost { established },
            },
            () = inner.wake.notified() => {}
            () = tokio::time::sleep_until(wake.into()) => inner.session().handle_timeout(Instant::now()),
            _ = stop.changed() => {
                inner.session().close(Instant::now(), CloseReason::Normal, "agent shutting down");
                let _ = flush(inner, &mut link).await;
                break 'run LinkEnd::Stopped;
            }
            () = tokio::time::sleep_until(probe_wake.into()), if probe_at.is_some() && probe_task.is_none() => {
                if let Some(p) = &probe {
                    let conn = p.connectors;
                    let endpoint = match conn.resolve(conn.quic_port).await {
                        Ok(addr) => probe_endpoint(p, addr).map(|ep| (ep, addr)),
                        Err(e) => Err(e),
                    };
                    probe_task = Some(match (endpoint, conn.quic.clone()) {
                        (Ok((ep, addr)), Some(q)) => tokio::spawn(async move { q.connect(&ep, addr).await.map(Link::quic) }),
                        (Err(e), _) => tokio::spawn(async move { Err(e) }),
                        (_, None) => tokio::spawn(async { Err(ConnectError::Unreachable("QUIC disabled".into())) }),
                    });
                }
            }
            r = async { match probe_task.as_mut() { Some(t) => t.await, None => std::future::pending().await } }, if probe_task.is_some() => {
                probe_task = None;
                match r {
                    Ok(Ok(quic)) => {
                        tracing::info!("QUIC is reachable again; moving the session off gRPC");
                        inner.session().close(Instant::now(), CloseReason::Normal, "switching to QUIC");
                        let _ = flush(inner, &mut link).await;
                        break 'run LinkEnd::Switch(quic);
                    }
                    Ok(Err(e)) => {
                        inner.connect_failures_quic.fetch_add(1, Relaxed);
                        tracing::debug!(error = %e, "QUIC still unreachable; staying on gRPC");
                        probe_at = probe.as_ref().map(|p| Instant::now() + p.every);
                    }
                    Err(_) => probe_at = probe.as_ref().map(|p| Instant::now() + p.every),
                }
            }
        }
    };
    if let Some(t) = probe_task {
        t.abort();
    }
    let now = Instant::now();
    inner.session().handle_disconnected(now);
    inner.established.store(false, Relaxed);
    inner.set_carrier(None);
    link.tx.close().await;
    end
}

/// Sends everything the session has to send now. The session lock is taken
/// per item and never held across an await.
///
/// While a write waits (QUIC or HTTP/2 flow control, a full send buffer),
/// the server's messages are still read and handed to the session: acks
/// and credit take effect as they arrive, not after the last queued frame
/// is written. Without this, a client with a deep queue behind a busy
/// aggregator saw no ack until its whole credit window had been written.
async fn flush(inner: &Inner, link: &mut Link) -> Result<(), String> {
    let Link { tx, rx, .. } = link;
    let mut rx_open = true;
    loop {
        let next = inner.session().poll_transmit(Instant::now());
        let Some(t) = next else { return Ok(()) };
        let send = tx.send(t);
        tokio::pin!(send);
        loop {
            tokio::select! {
                biased;
                r = &mut send => {
                    r?;
                    break;
                }
                ev = rx.recv(), if rx_open => match ev {
                    Some(LinkEvent::Control(c)) => inner.session().handle_control(Instant::now(), c),
                    Some(LinkEvent::Lost(why)) => return Err(why),
                    // The reader is gone; the write will fail or finish,
                    // and the caller sees the closed channel next.
                    None => rx_open = false,
                },
            }
        }
    }
}

fn probe_endpoint(p: &Probe<'_>, addr: SocketAddr) -> Result<quinn::Endpoint, ConnectError> {
    // The probe borrows the endpoints immutably: reuse a matching one, or
    // bind a fresh one for this attempt.
    p.eps.existing_or_new(addr)
}
