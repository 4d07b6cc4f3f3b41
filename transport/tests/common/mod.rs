//! Shared pieces of the integration tests: a recording sink, servers and
//! clients on loopback with port 0, realistic frames.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};
use aperture_transport::Carrier;
use aperture_transport::auth::AuthConfig;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::server::{Acker, Admission, IngressSink, ReceivedFrame, ServerConfig, ServerHandle, serve};
use aperture_transport::tls::ClientTlsConfig;

pub const TOKEN: &str = "integration-token-0123456789";
pub const AGENT: AgentId = AgentId([0x11; 16]);

/// What the sink saw of one frame.
#[derive(Clone, Debug)]
pub struct Seen {
    pub id: FrameId,
    pub bytes: Vec<u8>,
    pub carrier: Carrier,
    /// Server generation (bumped by tests across restarts).
    pub generation: u32,
}

/// Records every frame it takes; "commits" on demand. The committed set
/// outlives servers, like storage does.
#[derive(Default)]
pub struct RecordingSink {
    pub seen: Mutex<Vec<Seen>>,
    pub committed: Mutex<BTreeSet<FrameId>>,
    pub already_committed: Mutex<Vec<FrameId>>,
    pub generation: Mutex<u32>,
}

impl IngressSink for RecordingSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        let id = frame.header.id;
        if self.committed.lock().unwrap().contains(&id) {
            self.already_committed.lock().unwrap().push(id);
            return Admission::AlreadyCommitted;
        }
        let generation = *self.generation.lock().unwrap();
        self.seen.lock().unwrap().push(Seen { id, bytes: frame.bytes.to_vec(), carrier: frame.carrier, generation });
        Admission::Queued
    }
}

impl RecordingSink {
    /// Commits the given sequences of `AGENT`'s frames seen so far and acks them.
    pub fn commit(&self, acker: &Acker, seqs: &[u64]) {
        let ids: Vec<FrameId> = {
            let seen = self.seen.lock().unwrap();
            seen.iter().map(|s| s.id).filter(|id| seqs.contains(&id.sequence)).collect()
        };
        self.committed.lock().unwrap().extend(ids.iter().copied());
        acker.ack(&ids);
    }

    /// Commits and acks every frame seen so far.
    pub fn commit_all(&self, acker: &Acker) {
        let ids: Vec<FrameId> = self.seen.lock().unwrap().iter().map(|s| s.id).collect();
        self.committed.lock().unwrap().extend(ids.iter().copied());
        acker.ack(&ids);
    }

    pub fn seen_sequences(&self) -> Vec<u64> {
        self.seen.lock().unwrap().iter().map(|s| s.id.sequence).collect()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

pub fn server_config(data_dir: &Path) -> ServerConfig {
    ServerConfig {
        quic_listen: Some("127.0.0.1:0".parse().unwrap()),
        grpc_listen: Some("127.0.0.1:0".parse().unwrap()),
        auth: AuthConfig { token: Some(TOKEN.into()), disabled: false },
        data_dir: data_dir.to_owned(),
        ..ServerConfig::default()
    }
}

pub async fn start(cfg: ServerConfig, sink: Arc<RecordingSink>) -> ServerHandle {
    // A restarted server rebinds the ports of the previous one; quinn
    // releases its UDP socket shortly after shutdown, so retry a little.
    let mut tries = 0;
    loop {
        match serve(cfg.clone(), sink.clone()).await {
            Ok(s) => return s,
            Err(aperture_transport::server::ServeError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse && tries < 100 =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("server starts: {e}"),
        }
    }
}

/// A client pinned to the server's certificate, using only `carrier`.
pub fn client_config(server: &ServerHandle, carrier: Carrier, token: Option<&str>) -> ClientConfig {
    let grpc = server.grpc_addr();
    let quic = server.quic_addr();
    let host = grpc.or(quic).expect("a carrier").ip();
    ClientConfig {
        aggregator: format!("{host}:{}", grpc.or(quic).unwrap().port()),
        token: token.map(str::to_owned),
        tls: ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() },
        carrier: match carrier {
            Carrier::Quic => CarrierChoice::Quic,
            Carrier::Grpc => CarrierChoice::Grpc,
        },
        quic_port: quic.map(|a| a.port()),
        grpc_port: grpc.map(|a| a.port()),
        connect_timeout_ms: 2_000,
        reconnect_min_ms: 10,
        reconnect_max_ms: 200,
        ..ClientConfig::default()
    }
}

pub fn identity(boot: u8) -> AgentIdentity {
    AgentIdentity {
        agent_id: AGENT,
        boot_id: BootId([boot; 16]),
        node: "node-test".into(),
        agent_version: "test".into(),
    }
}

pub fn start_client(cfg: ClientConfig, boot: u8) -> Client {
    Client::start(cfg, identity(boot)).expect("client starts")
}

/// A realistic frame: a few stacks and samples.
pub fn frame(boot: u8, seq: u64) -> FrameBuf {
    frame_with(boot, seq, 32)
}

/// A realistic frame with `samples` CPU samples.
pub fn frame_with(boot: u8, seq: u64, samples: u64) -> FrameBuf {
    let stacks: Vec<Stack> = (0..8)
        .map(|i| {
            Stack::new(
                (0..12)
                    .map(|d| StackFrame {
                        address: 0x40_0000 + i * 0x100 + d,
                        module_offset: d * 16,
                        symbol: format!("fn_{i}_{d}"),
                        module: "app".into(),
                        ..Default::default()
                    })
                    .collect(),
            )
        })
        .collect();
    let batch = Batch {
        node: "node-test".into(),
        targets: vec![Target { pid: 42, process: "app".into(), ..Default::default() }],
        cpu: (0..samples)
            .map(|i| CpuSample {
                time_ns: seq * 1000 + i,
                target: 0,
                stack: (i % 8) as u32,
                count: 3,
                period_ns: 10_101_010,
            })
            .collect(),
        stacks,
        ..Default::default()
    };
    let id = FrameId { agent_id: AGENT, boot_id: BootId([boot; 16]), sequence: seq };
    encode_batch(&batch, id, seq, &DecodeLimits::default()).expect("encode")
}

/// Acknowledges, from a thread of its own, the frame ids `take` hands it,
/// every millisecond or two, until stopped.
pub struct AckLoop {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AckLoop {
    pub fn start(acker: Acker, take: impl Fn() -> Vec<FrameId> + Send + 'static) -> AckLoop {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let ids = take();
                if !ids.is_empty() {
                    acker.ack(&ids);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        AckLoop { stop, thread: Some(thread) }
    }

    pub fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// Waits for `cond`, failing with `what` after a generous deadline (a hang
/// guard, not a timing assertion).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A raw gRPC channel over TLS to `server`, pinned to its certificate.
pub async fn grpc_tls_channel(server: &ServerHandle) -> tonic::transport::Channel {
    let addr = server.grpc_addr().unwrap();
    let trust = ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() };
    let (tls, _) = aperture_transport::tls::client_config(&trust, b"h2").unwrap();
    let tls = Arc::new(tls);
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let tls = Arc::clone(&tls);
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let s = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap()
}
