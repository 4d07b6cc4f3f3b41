//! Pushes into a real aggregator, for the `ingest_formats` scenario: K
//! clients, each with a fixed number of requests (or frames) outstanding,
//! push copies of one body until told to stop or until each has sent its
//! bound, then wait for every answer. Every answer the aggregator gives
//! means committed, so what is counted is what was committed.
//!
//! Three kinds of client, all to loopback only:
//! - Aperture agents ([`Client`], QUIC or gRPC), a thread each;
//! - HTTP/1.1 POSTs (Pyroscope `/ingest`, OTLP/HTTP), one kept-alive
//!   connection per outstanding request, on a tokio runtime;
//! - OTLP gRPC `ProfilesService/Export` (tonic, gzip), one channel per
//!   client with its requests multiplexed on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use aperture_core::frame::{FrameBuf, FrameId};
use aperture_core::ids::{AgentId, BootId};
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::server::otlp::proto::collector::ExportProfilesServiceRequest;
use aperture_transport::server::otlp::proto::collector::profiles_service_client::ProfilesServiceClient;
use aperture_transport::tls::ClientTlsConfig;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::load::restamp;

/// How long the pushers keep going, and how many each keeps outstanding.
#[derive(Clone, Copy, Debug)]
pub struct PushLimits {
    /// Clients pushing in parallel.
    pub clients: usize,
    /// Requests (frames) each client keeps outstanding.
    pub in_flight: usize,
    /// How long they push.
    pub duration: Duration,
    /// Upper bound on requests per client, whatever the duration.
    pub max_per_client: u64,
    /// Longest wait for the answers still outstanding after the push.
    pub drain_timeout: Duration,
}

/// What the clients saw.
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// Requests (frames) answered with success: committed.
    pub committed: u64,
    /// Requests refused, failed, dropped or unanswered.
    pub errors: u64,
    /// The first error, for the log.
    pub first_error: Option<String>,
}

/// Counters the pushers share.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Pushers that reached their bound or were stopped.
    finished: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Relaxed);
        self.first_error.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(what);
    }

    fn outcome(&self) -> PushOutcome {
        PushOutcome {
            committed: self.ok.load(Relaxed),
            errors: self.errors.load(Relaxed),
            first_error: self.first_error.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }
}

/// What the caller wraps around the push proper, to read its clocks and
/// counters before and after: it is given a function that runs the push
/// (connections already set up) and returns what the clients saw.
pub type Measure<'a> = &'a mut dyn FnMut(&mut dyn FnMut() -> anyhow::Result<PushOutcome>) -> anyhow::Result<()>;

fn agent_id(i: usize) -> AgentId {
    let mut id = AgentId([0xf0; 16]);
    id.0[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    id
}

/// Aperture agents over QUIC (`grpc` false) or gRPC push copies of
/// `template`; a frame acknowledged is a frame committed.
pub fn frames(
    addr: SocketAddr,
    grpc: bool,
    token: &str,
    fingerprint: &str,
    template: &FrameBuf,
    limits: PushLimits,
    measure: Measure,
) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "refusing to push to {addr}: loopback only");
    let mut clients = Vec::with_capacity(limits.clients);
    for i in 0..limits.clients {
        let cfg = ClientConfig {
            aggregator: addr.to_string(),
            token: Some(token.into()),
            tls: ClientTlsConfig {
                fingerprint: Some(fingerprint.into()),
                insecure_plaintext: grpc,
                ..Default::default()
            },
            carrier: if grpc { CarrierChoice::Grpc } else { CarrierChoice::Quic },
            quic_port: (!grpc).then_some(addr.port()),
            ..ClientConfig::default()
        };
        let identity = AgentIdentity {
            agent_id: agent_id(i),
            boot_id: BootId([0xb1; 16]),
            node: format!("bench-{i}"),
            agent_version: "perf".into(),
        };
        clients.push(Arc::new(Client::start(cfg, identity).context("starting a simulated agent")?));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while clients.iter().any(|c| !c.stats().established) {
        anyhow::ensure!(Instant::now() < deadline, "simulated agents did not connect within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut push = || -> anyhow::Result<PushOutcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let producers: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let (client, template, stop, tally) =
                    (Arc::clone(client), template.clone(), Arc::clone(&stop), Arc::clone(&tally));
                std::thread::spawn(move || -> anyhow::Result<()> {
                    let acked0 = client.stats().session.frames_acked;
                    let mut seq = 0u64;
                    while !stop.load(Relaxed) && seq < limits.max_per_client {
                        let acked = client.stats().session.frames_acked - acked0;
                        if seq - acked < limits.in_flight as u64 {
                            seq += 1;
                            let id = FrameId { agent_id: agent_id(i), boot_id: BootId([0xb1; 16]), sequence: seq };
                            client.send(restamp(&template, id, seq)?).context("queueing a frame")?;
                        } else {
                            std::thread::sleep(Duration::from_micros(200));
                        }
                    }
                    let deadline = Instant::now() + limits.drain_timeout;
                    while client.stats().session.frames_acked - acked0 < seq && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    let s = client.stats();
                    let acked = s.session.frames_acked - acked0;
                    tally.ok.fetch_add(acked, Relaxed);
                    if acked < seq {
                        let missing = seq - acked;
                        tally.errors.fetch_add(missing - 1, Relaxed);
                        tally.error(format!(
                            "{missing} frames unacknowledged after the drain ({} dropped by the client, {} sessions \
                             refused)",
                            s.session.frames_dropped, s.rejections
                        ));
                    }
                    Ok(())
                })
            })
            .collect();
        wait_then_stop(&stop, limits.duration, || producers.iter().all(|p| p.is_finished()));
        for p in producers {
            p.join().map_err(|_| anyhow::anyhow!("a simulated agent panicked"))??;
        }
        Ok(tally.outcome())
    };
    let result = measure(&mut push);
    let closing: Vec<_> = clients
        .into_iter()
        .filter_map(|c| Arc::try_unwrap(c).ok())
        .map(|c| std::thread::spawn(move || c.shutdown(Duration::from_secs(2))))
        .collect();
    for c in closing {
        let _ = c.join();
    }
    result
}

/// Sleeps until `duration` has passed or `done` says every pusher
/// finished, then raises `stop`.
fn wait_then_stop(stop: &AtomicBool, duration: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while started.elapsed() < duration && !done() {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Relaxed);
}

/// One HTTP POST to send again and again.
#[derive(Clone, Debug)]
pub struct HttpPost {
    /// Path and query, e.g. `/ingest?name=...`.
    pub path: String,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// `Content-Encoding`, if any.
    pub content_encoding: Option<&'static str>,
    /// The body.
    pub body: Bytes,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; `Err` with the status and body when refused.
async fn post(sender: &mut Sender, addr: SocketAddr, token: &str, req: &HttpPost) -> anyhow::Result<()> {
    sender.ready().await.context("connection closed")?;
    let mut b = hyper::Request::post(&req.path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", req.content_type);
    if let Some(e) = req.content_encoding {
        b = b.header("content-encoding", e);
    }
    let response = sender.send_request(b.body(Full::new(req.body.clone()))?).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    anyhow::ensure!(status.is_success(), "HTTP {status}: {}", String::from_utf8_lossy(&body));
    Ok(())
}

/// HTTP/1.1 clients POST `req` to `addr`, each outstanding request on a
/// connection of its own, kept alive.
pub fn http(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: &str,
    req: &HttpPost,
    limits: PushLimits,
    measure: Measure,
) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "refusing to push to {addr}: loopback only");
    let workers = limits.clients * limits.in_flight.max(1);
    let mut senders = Vec::with_capacity(workers);
    for _ in 0..workers {
        senders.push(rt.block_on(connect(addr))?);
    }
    let per_worker = limits.max_per_client.div_ceil(limits.in_flight.max(1) as u64);
    let mut senders = Some(senders);
    let mut push = || -> anyhow::Result<PushOutcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = tokio::task::JoinSet::new();
        for mut sender in senders.take().context("the push runs once")? {
            let (stop, tally, req, token) = (Arc::clone(&stop), Arc::clone(&tally), req.clone(), token.to_owned());
            tasks.spawn_on(
                async move {
                    let mut sent = 0u64;
                    while !stop.load(Relaxed) && sent < per_worker {
                        sent += 1;
                        match post(&mut sender, addr, &token, &req).await {
                            Ok(()) => {
                                tally.ok.fetch_add(1, Relaxed);
                            }
                            Err(e) => {
                                tally.error(format!("{e:#}"));
                                if sender.is_closed() {
                                    match connect(addr).await {
                                        Ok(s) => sender = s,
                                        Err(e) => {
                                            tally.error(format!("reconnecting: {e:#}"));
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                    }
                    tally.finished.fetch_add(1, Relaxed);
                },
                rt.handle(),
            );
        }
        drain(rt, tasks, &stop, &tally, limits)
    };
    measure(&mut push)
}

/// Waits the push out (duration or bounds), then for the last answers.
fn drain(
    rt: &tokio::runtime::Runtime,
    mut tasks: tokio::task::JoinSet<()>,
    stop: &AtomicBool,
    tally: &Tally,
    limits: PushLimits,
) -> anyhow::Result<PushOutcome> {
    let n = tasks.len() as u64;
    wait_then_stop(stop, limits.duration, || tally.finished.load(Relaxed) == n);
    let joined = async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r {
                tally.error(format!("a pusher failed: {e}"));
            }
        }
    };
    // The timer is made inside the runtime's context.
    let drained = rt.block_on(async { tokio::time::timeout(limits.drain_timeout, joined).await });
    if drained.is_err() {
        tasks.abort_all();
        tally
            .error(format!("{} pushers still waiting for an answer after the drain", n - tally.finished.load(Relaxed)));
    }
    Ok(tally.outcome())
}

/// OTLP gRPC exporters (tonic, gzip-compressed requests) call
/// `ProfilesService/Export` with `request`; `in_flight` calls share each
/// client's channel.
pub fn otlp_grpc(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: &str,
    request: &ExportProfilesServiceRequest,
    limits: PushLimits,
    measure: Measure,
) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "refusing to push to {addr}: loopback only");
    let mut channels = Vec::with_capacity(limits.clients);
    for _ in 0..limits.clients {
        let c = rt
            .block_on(ProfilesServiceClient::connect(format!("http://{addr}")))
            .with_context(|| format!("connecting to the OTLP gRPC listener {addr}"))?;
        channels.push(c.send_compressed(tonic::codec::CompressionEncoding::Gzip));
    }
    let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {token}").parse().context("token as gRPC metadata")?;
    let per_task = limits.max_per_client.div_ceil(limits.in_flight.max(1) as u64);
    let mut push = || -> anyhow::Result<PushOutcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = tokio::task::JoinSet::new();
        for channel in &channels {
            for _ in 0..limits.in_flight.max(1) {
                let (mut client, stop, tally) = (channel.clone(), Arc::clone(&stop), Arc::clone(&tally));
                let (request, bearer) = (request.clone(), bearer.clone());
                tasks.spawn_on(
                    async move {
                        let mut sent = 0u64;
                        while !stop.load(Relaxed) && sent < per_task {
                            sent += 1;
                            let mut r = tonic::Request::new(request.clone());
                            r.metadata_mut().insert("authorization", bearer.clone());
                            match client.export(r).await {
                                Ok(_) => {
                                    tally.ok.fetch_add(1, Relaxed);
                                }
                                Err(status) => tally.error(format!("gRPC {:?}: {}", status.code(), status.message())),
                            }
                        }
                        tally.finished.fetch_add(1, Relaxed);
                    },
                    rt.handle(),
                );
            }
        }
        drain(rt, tasks, &stop, &tally, limits)
    };
    measure(&mut push)
}
