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
//! - OTLP gRPC `ProfilesService/Export` (gzip), one HTTP/2 connection per
//!   client with its requests multiplexed on it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use aperture_core::frame::{FrameBuf, FrameId};
use aperture_core::ids::BootId;
use aperture_transport::client::CarrierChoice;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::load::{agent_id, connect_agents, restamp};

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
    let carrier = if grpc { CarrierChoice::Grpc } else { CarrierChoice::Quic };
    let quic = (!grpc).then_some(addr);
    let clients = connect_agents(limits.clients, addr, quic, carrier, grpc, token, fingerprint, 0xb1, None)?;
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

/// The gRPC path of OTLP's `ProfilesService/Export`.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export";

/// A gzip-compressed gRPC message: the compressed flag, the length, the bytes.
pub fn grpc_message(gzipped: &[u8]) -> anyhow::Result<Bytes> {
    let len = u32::try_from(gzipped.len()).context("message over 4 GiB")?;
    let mut m = Vec::with_capacity(5 + gzipped.len());
    m.push(1);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(gzipped);
    Ok(Bytes::from(m))
}

type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// One unary gRPC call over HTTP/2; `Err` with the status when refused.
async fn grpc_call(sender: &mut Sender2, addr: SocketAddr, token: &str, message: &Bytes) -> anyhow::Result<()> {
    sender.ready().await.context("connection closed")?;
    let req = hyper::Request::post(format!("http://{addr}{EXPORT_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "gzip")
        .header("grpc-accept-encoding", "gzip")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(message.clone()))?;
    let response = sender.send_request(req).await?;
    let (head, body) = response.into_parts();
    let collected = body.collect().await?;
    // A trailers-only answer carries the status in its headers.
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        trailers.get(name).or_else(|| head.headers.get(name)).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
    };
    let status = field("grpc-status");
    anyhow::ensure!(
        head.status.is_success() && status == "0",
        "HTTP {} grpc-status {status:?}: {}",
        head.status,
        field("grpc-message")
    );
    Ok(())
}

/// OTLP gRPC exporters call `ProfilesService/Export` with `message` (see
/// [`grpc_message`]: the request protobuf, gzipped once); each client has
/// one HTTP/2 connection with its `in_flight` calls multiplexed on it. The
/// gRPC framing is written here rather than by a gRPC library: only the
/// transport crate may use tonic, and a message compressed once keeps the
/// clients' CPU (on the same machine) out of the aggregator's way.
pub fn otlp_grpc(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: &str,
    message: &Bytes,
    limits: PushLimits,
    measure: Measure,
) -> anyhow::Result<()> {
    anyhow::ensure!(addr.ip().is_loopback(), "refusing to push to {addr}: loopback only");
    let mut senders = Vec::with_capacity(limits.clients);
    for _ in 0..limits.clients {
        let sender = rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream))
                    .await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            anyhow::Ok(sender)
        });
        senders.push(sender.with_context(|| format!("connecting to the OTLP gRPC listener {addr}"))?);
    }
    let per_task = limits.max_per_client.div_ceil(limits.in_flight.max(1) as u64);
    let mut push = || -> anyhow::Result<PushOutcome> {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = tokio::task::JoinSet::new();
        for sender in &senders {
            for _ in 0..limits.in_flight.max(1) {
                let (mut sender, stop, tally) = (sender.clone(), Arc::clone(&stop), Arc::clone(&tally));
                let (message, token) = (message.clone(), token.to_owned());
                tasks.spawn_on(
                    async move {
                        let mut sent = 0u64;
                        while !stop.load(Relaxed) && sent < per_task {
                            sent += 1;
                            match grpc_call(&mut sender, addr, &token, &message).await {
                                Ok(()) => {
                                    tally.ok.fetch_add(1, Relaxed);
                                }
                                Err(e) => tally.error(format!("{e:#}")),
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
