//! The processes of the suite: `aperture aggregator` children, synthetic
//! agents over the real transport (threads of this process, or a child
//! process of their own), and UDP/TCP relays standing in for the network
//! and a Kubernetes Service.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::Batch;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::tls::ClientTlsConfig;

use crate::common::http::{get, get_with};
use crate::common::{batch, now_s};

/// The `aperture` binary, if built.
pub fn aperture_bin(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("APERTURE_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/<profile>/deps/<test> → target/<profile>/aperture
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("aperture");
    if bin.is_file() {
        return Some(bin);
    }
    aperture_testkit::skip(test, "the aperture binary is not built (cargo build -p aperture, or set APERTURE_BIN)");
    None
}

/// Starts a throwaway ClickHouse server, or reports `test` skipped.
pub async fn clickhouse_or_skip(test: &'static str) -> Option<aperture_testkit::clickhouse::ClickHouseServer> {
    tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test)).await.expect("start server")
}

/// An `aperture aggregator` child process on fixed ports and data directory.
pub struct AggregatorProcess {
    pub bin: PathBuf,
    /// Extra arguments (the store, a config file).
    pub args: Vec<String>,
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub ingest: u16,
    /// The shared token; `None` runs with `--no-auth`.
    pub token: Option<String>,
    pub child: Option<Child>,
    pub starts: u32,
}

impl AggregatorProcess {
    pub fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("aggregator-{}.log", self.starts))).expect("log");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("aggregator")
            .args(["--http-listen", &self.http.to_string()])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", self.ingest)])
            .args(["--quic-listen", &format!("127.0.0.1:{}", self.ingest)])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(&self.args)
            .env_remove("APERTURE_AUTH_TOKEN")
            .env_remove("APERTURE_INGEST_TOKEN")
            .env_remove("APERTURE_READ_TOKEN")
            .env_remove("APERTURE_CLICKHOUSE_ENDPOINT")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        match &self.token {
            Some(token) => cmd.env("APERTURE_AUTH_TOKEN", token),
            None => cmd.arg("--no-auth"),
        };
        self.child = Some(cmd.spawn().expect("spawn aperture aggregator"));
    }

    /// Lines of every start's log that contain one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        (1..=self.starts)
            .filter_map(|n| std::fs::read_to_string(self.dir.join(format!("aggregator-{n}.log"))).ok())
            .flat_map(|log| {
                log.lines().filter(|l| needles.iter().any(|n| l.contains(n))).map(str::to_owned).collect::<Vec<_>>()
            })
            .collect()
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// `GET path`, with the token if there is one.
    pub async fn get(&self, path: &str) -> crate::common::http::Response {
        match &self.token {
            Some(t) => get_with(self.http, path, &[("authorization", &format!("Bearer {t}"))]).await,
            None => get(self.http, path).await,
        }
    }

    pub async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.dir.join(format!("aggregator-{}.log", self.starts)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
                panic!("aperture aggregator exited ({status}); the end of its log:\n{}", tail.join("\n"));
            }
            // `get` panics on a refused connection: look first.
            if std::net::TcpStream::connect_timeout(&self.http, Duration::from_secs(1)).is_ok()
                && tokio::time::timeout(Duration::from_secs(2), get(self.http, "/healthz"))
                    .await
                    .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(Instant::now() < deadline, "aperture aggregator not healthy within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }
}

impl Drop for AggregatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn free_port() -> u16 {
    aperture_testkit::clickhouse::free_port().expect("free port")
}

pub fn aggregator(bin: PathBuf, args: Vec<String>, dir: &Path) -> AggregatorProcess {
    AggregatorProcess {
        bin,
        args,
        dir: dir.to_path_buf(),
        http: SocketAddr::from(([127, 0, 0, 1], free_port())),
        ingest: free_port(),
        token: None,
        child: None,
        starts: 0,
    }
}

/// Writes `yaml` as the aggregator's config file in `dir` and returns the
/// `--config` arguments for it.
pub fn config_args(dir: &Path, yaml: &str) -> Vec<String> {
    let config = dir.join("aggregator.yaml");
    std::fs::write(&config, yaml).expect("config");
    vec!["--config".into(), config.display().to_string()]
}

/// Resident memory of a process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A synthetic agent's client: QUIC to `ingest` on loopback, quick to
/// reconnect after a kill.
pub fn client_config(ingest: u16) -> ClientConfig {
    ClientConfig {
        aggregator: format!("127.0.0.1:{ingest}"),
        carrier: CarrierChoice::Quic,
        tls: ClientTlsConfig { insecure_skip_verify: true, ..ClientTlsConfig::default() },
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        connect_timeout_ms: 2_000,
        ..ClientConfig::default()
    }
}

/// A synthetic agent over the real transport: one frame every 5 ms,
/// counting what it sent. [`batch`] frames carry 5 CPU samples each.
pub struct Agent {
    pub client: Arc<Client>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub t0: u64,
}

impl Agent {
    /// The usual agent: QUIC, agent id `fa…`, [`batch`] frames.
    pub fn start(ingest: u16) -> Agent {
        Agent::start_with(client_config(ingest), 0xfa, now_s() - 600, |t| batch("n1", t))
    }

    /// An agent with its own client config, agent id byte, time base and
    /// frame contents (`make(time_s)`).
    pub fn start_with(config: ClientConfig, id: u8, t0: u64, make: impl Fn(u64) -> Batch + Send + 'static) -> Agent {
        let identity = AgentIdentity {
            agent_id: AgentId([id; 16]),
            boot_id: BootId([0x17; 16]),
            node: "n1".into(),
            agent_version: "fault".into(),
        };
        let client = Arc::new(Client::start(config, identity.clone()).expect("client"));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (client, stop, sent) = (Arc::clone(&client), Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let id = FrameId { agent_id: identity.agent_id, boot_id: identity.boot_id, sequence: seq };
                    let frame = encode_batch(&make(t0 + seq % 300), id, 0, &DecodeLimits::default()).expect("encode");
                    client.send(frame).expect("send");
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Agent { client, stop, sent, thread: Some(thread), t0 }
    }

    /// Stops sending (without waiting for acknowledgements).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops sending, waits until every frame sent is acknowledged, and
    /// returns how many were sent.
    pub async fn finish(self) -> u64 {
        self.finish_with_stats().await.0
    }

    /// [`Agent::finish`], also returning the client's counters once
    /// everything was acknowledged.
    pub async fn finish_with_stats(mut self) -> (u64, aperture_transport::client::ClientStats) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("agent thread");
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.client.stats();
            assert_eq!(s.session.frames_dropped, 0, "the agent's buffer never overflowed");
            if s.session.unacked_frames == 0 && s.session.frames_acked >= sent {
                break;
            }
            assert!(Instant::now() < deadline, "not all frames acknowledged: {s:?}, sent {sent}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stats = self.client.stats();
        if let Ok(client) = Arc::try_unwrap(self.client) {
            assert!(client.shutdown(Duration::from_secs(1)).unacked.is_empty());
        }
        (sent, stats)
    }
}

/// The synthetic agent as a process of its own (this test binary, run as
/// [`crate::kills::fault_agent_child`]), so that it can be SIGKILLed.
pub struct AgentProcess {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

/// What an [`AgentProcess`] said of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentCounts {
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
}

impl AgentProcess {
    pub fn start(port: u16, t0: u64, boot: u8) -> AgentProcess {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args(["kills::fault_agent_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("APERTURE_FAULT_AGENT", format!("{port},{t0},{boot}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the fault agent child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("stdout")));
        AgentProcess { child, stdin, stdout }
    }

    /// Sends a command and reads its `stats` answer (blocking: called from
    /// `spawn_blocking`).
    pub fn ask(&mut self, command: &str) -> AgentCounts {
        writeln!(self.stdin, "{command}").expect("write to the fault agent child");
        for line in self.stdout.by_ref() {
            let line = line.expect("read the fault agent child");
            // The harness's `test fault_agent_child ... ` may start the line.
            let Some((_, rest)) = line.split_once("stats ") else { continue };
            let field = |name: &str| -> u64 {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in `{line}`"))
            };
            return AgentCounts { sent: field("sent"), acked: field("acked"), unacked: field("unacked") };
        }
        panic!("the fault agent child exited before answering `{command}`");
    }

    pub fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP relay in front of one or more aggregators' QUIC ports, like a
/// Kubernetes Service: each client address is pinned to one live backend
/// (round robin over clients, as conntrack keeps a flow on its endpoint);
/// a backend taken out of the Service loses its flows, and their next
/// packets go to a live one. It can also drop everything, like a network
/// partition.
pub struct Relay {
    pub port: u16,
    pub drop: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<Option<u16>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// One client flow of a [`Relay`]: its backend and the socket that talks to it.
struct Flow {
    backend: usize,
    back: Arc<tokio::net::UdpSocket>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: u16) -> Relay {
        Relay::service(&[upstream]).await
    }

    /// A relay spreading clients over `upstreams`.
    pub async fn service(upstreams: &[u16]) -> Relay {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("relay front"));
        let port = front.local_addr().expect("relay addr").port();
        let drop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(upstreams.iter().copied().map(Some).collect::<Vec<_>>()));
        let (dropping, backends) = (Arc::clone(&drop), Arc::clone(&live));
        let task = tokio::spawn(async move {
            let mut up = vec![0u8; 65_536];
            let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
            let mut next = 0usize;
            loop {
                let Ok((n, from)) = front.recv_from(&mut up).await else { continue };
                if dropping.load(Ordering::Relaxed) {
                    continue;
                }
                let live: Vec<Option<u16>> = backends.lock().expect("relay backends").clone();
                if flows.get(&from).is_some_and(|f| live[f.backend].is_none())
                    && let Some(f) = flows.remove(&from)
                {
                    f.task.abort();
                }
                #[allow(clippy::map_entry, reason = "the new flow needs awaits before it is inserted")]
                if !flows.contains_key(&from) {
                    let alive: Vec<usize> = (0..live.len()).filter(|i| live[*i].is_some()).collect();
                    let Some(&backend) = alive.get(next % alive.len().max(1)) else { continue };
                    next += 1;
                    let Some(port) = live[backend] else { continue };
                    let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("relay back"));
                    back.connect(("127.0.0.1", port)).await.expect("relay upstream");
                    let (back2, front2, dropping2) = (Arc::clone(&back), Arc::clone(&front), Arc::clone(&dropping));
                    let task = tokio::spawn(async move {
                        let mut down = vec![0u8; 65_536];
                        loop {
                            let Ok(n) = back2.recv(&mut down).await else { continue };
                            if !dropping2.load(Ordering::Relaxed) {
                                let _ = front2.send_to(&down[..n], from).await;
                            }
                        }
                    });
                    flows.insert(from, Flow { backend, back, task });
                }
                if let Some(f) = flows.get(&from) {
                    let _ = f.back.send(&up[..n]).await;
                }
            }
        });
        Relay { port, drop, live, task }
    }

    /// Takes backend `i` out of the Service (its pod was killed).
    pub fn remove(&self, i: usize) {
        self.live.lock().expect("relay backends")[i] = None;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A connection a [`TcpRelay`] carries: its backend and the task copying it.
type RelayedConnection = (usize, tokio::task::JoinHandle<()>);

/// A TCP relay in front of several aggregators' gRPC ports, like a
/// Kubernetes Service: connections are spread round robin over the live
/// backends; taking a backend out cuts its connections.
pub struct TcpRelay {
    pub port: u16,
    live: Arc<Mutex<Vec<Option<u16>>>>,
    conns: Arc<Mutex<Vec<RelayedConnection>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    pub async fn service(upstreams: &[u16]) -> TcpRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("tcp relay");
        let port = listener.local_addr().expect("tcp relay addr").port();
        let live = Arc::new(Mutex::new(upstreams.iter().copied().map(Some).collect::<Vec<_>>()));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (backends, held) = (Arc::clone(&live), Arc::clone(&conns));
        let task = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut client, _)) = listener.accept().await else { continue };
                let live: Vec<Option<u16>> = backends.lock().expect("relay backends").clone();
                let alive: Vec<usize> = (0..live.len()).filter(|i| live[*i].is_some()).collect();
                let Some(&backend) = alive.get(next % alive.len().max(1)) else { continue };
                next += 1;
                let Some(port) = live[backend] else { continue };
                let conn = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                held.lock().expect("relay conns").push((backend, conn));
            }
        });
        TcpRelay { port, live, conns, task }
    }

    /// Takes backend `i` out of the Service and cuts its connections.
    pub fn remove(&self, i: usize) {
        self.live.lock().expect("relay backends")[i] = None;
        for (b, conn) in self.conns.lock().expect("relay conns").iter() {
            if *b == i {
                conn.abort();
            }
        }
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.task.abort();
        for (_, conn) in self.conns.lock().expect("relay conns").iter() {
            conn.abort();
        }
    }
}
