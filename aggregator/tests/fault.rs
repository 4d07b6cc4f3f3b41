//! The fault suite: the real `aperture` binary as a child process, an agent
//! pushing synthetic frames over the real transport, and faults injected
//! from outside (SIGKILL). A conservation oracle compares what the agent
//! sent with what the store holds; each scenario prints
//! `fault: <scenario> sent=N stored=N lost=N duplicated=N`.
//!
//! The binary is `$APERTURE_BIN`, or `aperture` next to this test's
//! directory in the target dir (built by `cargo build -p aperture`, and by
//! any workspace test run); without it the scenarios are reported skipped.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::tls::ClientTlsConfig;
use common::http::get;
use common::{batch, cpu_total, now_s};

/// The `aperture` binary, if built.
fn aperture_bin(test: &str) -> Option<PathBuf> {
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

/// An `aperture aggregator` child process on fixed ports and data directory.
struct AggregatorProcess {
    bin: PathBuf,
    /// Extra arguments (the store).
    args: Vec<String>,
    dir: PathBuf,
    http: SocketAddr,
    ingest: u16,
    child: Option<Child>,
    starts: u32,
}

impl AggregatorProcess {
    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("aggregator-{}.log", self.starts))).expect("log");
        let child = Command::new(&self.bin)
            .arg("aggregator")
            .args(["--http-listen", &self.http.to_string()])
            .args(["--grpc-listen", &format!("127.0.0.1:{}", self.ingest)])
            .args(["--quic-listen", &format!("127.0.0.1:{}", self.ingest)])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--no-auth")
            .args(&self.args)
            .env_remove("APERTURE_AUTH_TOKEN")
            .env_remove("APERTURE_CLICKHOUSE_ENDPOINT")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn aperture aggregator");
        self.child = Some(child);
    }

    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("aperture aggregator exited ({status}); see {}", self.dir.display());
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

    fn kill(&mut self) {
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

fn free_port() -> u16 {
    aperture_testkit::clickhouse::free_port().expect("free port")
}

fn report(line: &str) {
    // Straight to the process's stderr, past the harness's capture.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// What a scenario observed.
struct Conservation {
    sent: u64,
    stored: u64,
    restarts: u32,
}

impl Conservation {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.stored)
    }

    fn duplicated(&self) -> u64 {
        self.stored.saturating_sub(self.sent)
    }

    fn report(&self, scenario: &str) {
        report(&format!(
            "fault: {scenario} sent={} stored={} lost={} duplicated={}",
            self.sent,
            self.stored,
            self.lost(),
            self.duplicated()
        ));
    }
}

/// A synthetic agent's client: QUIC to `ingest` on loopback, quick to
/// reconnect after a kill.
fn client_config(ingest: u16) -> ClientConfig {
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

/// A synthetic agent over the real transport (QUIC): one frame of 5 CPU
/// samples every 5 ms, counting what it sent.
struct Agent {
    client: Arc<Client>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    t0: u64,
}

impl Agent {
    fn start(ingest: u16) -> Agent {
        let config = client_config(ingest);
        let identity = AgentIdentity {
            agent_id: AgentId([0xfa; 16]),
            boot_id: BootId([0x17; 16]),
            node: "n1".into(),
            agent_version: "fault".into(),
        };
        let client = Arc::new(Client::start(config, identity.clone()).expect("client"));
        let t0 = now_s() - 600;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (client, stop, sent) = (Arc::clone(&client), Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let id = FrameId { agent_id: identity.agent_id, boot_id: identity.boot_id, sequence: seq };
                    let frame =
                        encode_batch(&batch("n1", t0 + seq % 300), id, 0, &DecodeLimits::default()).expect("encode");
                    client.send(frame).expect("send");
                    sent.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Agent { client, stop, sent, thread: Some(thread), t0 }
    }

    /// Stops sending, waits until every frame sent is acknowledged, and
    /// returns how many were sent.
    async fn finish(mut self) -> u64 {
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
        if let Ok(client) = Arc::try_unwrap(self.client) {
            assert!(client.shutdown(Duration::from_secs(1)).unacked.is_empty());
        }
        sent
    }
}

fn aggregator(bin: PathBuf, args: Vec<String>, dir: &std::path::Path) -> AggregatorProcess {
    AggregatorProcess {
        bin,
        args,
        dir: dir.to_path_buf(),
        http: SocketAddr::from(([127, 0, 0, 1], free_port())),
        ingest: free_port(),
        child: None,
        starts: 0,
    }
}

/// SIGKILLs the aggregator `kills` times at fixed, uneven moments and
/// restarts it while an agent pushes; waits until the agent has every frame
/// acknowledged and counts what the store holds.
async fn sigkill_scenario(bin: PathBuf, args: Vec<String>, kills: u32) -> Conservation {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agg = aggregator(bin, args, dir.path());
    agg.start();
    agg.wait_healthy().await;
    let agent = Agent::start(agg.ingest);
    let t0 = agent.t0;
    for k in 0..kills {
        // Uneven, reproducible moments: 150..850 ms apart.
        let pause = 150 + (u64::from(k) * 389) % 700;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        agg.kill();
        tokio::time::sleep(Duration::from_millis(100)).await;
        agg.start();
        agg.wait_healthy().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = agent.finish().await;
    let stored = cpu_total(agg.http, t0 - 20, t0 + 400).await / 5;
    Conservation { sent, stored, restarts: agg.starts - 1 }
}

/// Resident memory of a process, bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// ClickHouse is frozen (SIGSTOP) for 20 s under load. The aggregator's
/// buffer (1 MiB here) fills, `/readyz` turns 503, its memory stays bounded
/// while the agent keeps what was refused; after SIGCONT the backlog drains
/// and the totals are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_clickhouse_outage() {
    let Some(bin) = aperture_bin("fault_clickhouse_outage") else { return };
    let Some(server) =
        tokio::task::spawn_blocking(|| aperture_testkit::clickhouse::start_or_skip("fault_clickhouse_outage"))
            .await
            .expect("start server")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("aggregator.yaml");
    std::fs::write(&config, "buffer:\n  capacity: 1MiB\n  high_water_percent: 50\n").expect("config");
    let args = vec!["--config".into(), config.display().to_string(), "--clickhouse-endpoint".into(), server.endpoint()];
    let mut agg = aggregator(bin, args, dir.path());
    agg.start();
    agg.wait_healthy().await;
    let agent = Agent::start(agg.ingest);
    let t0 = agent.t0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agg.child.as_ref().map(Child::id).expect("running");
    let before = rss_bytes(pid);

    server.pause();
    let mut not_ready = false;
    let mut peak = before;
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_bytes(pid));
        if !not_ready {
            let r = tokio::time::timeout(Duration::from_secs(2), get(agg.http, "/readyz")).await;
            not_ready = r.is_ok_and(|r| r.status == 503);
        }
    }
    server.unpause();
    assert!(not_ready, "/readyz never answered 503 while ClickHouse was frozen");
    // The agent produced ~6 MB meanwhile; the aggregator holds at most its
    // 1 MiB buffer of it (plus allocator slack), the rest waits in the agent.
    assert!(peak < before + 48 * 1024 * 1024, "RSS grew from {before} to {peak} bytes during the outage");

    let sent = agent.finish().await;
    let stored = cpu_total(agg.http, t0 - 20, t0 + 400).await / 5;
    let c = Conservation { sent, stored, restarts: 0 };
    c.report("clickhouse_outage");
    report(&format!("fault: clickhouse_outage rss_before={before} rss_peak={peak}"));
    assert_eq!((c.lost(), c.duplicated()), (0, 0));
    let ready = get(agg.http, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    drop(server);
}

/// SQLite: rows and ledger state commit in one transaction, so after 10
/// SIGKILLs acknowledged == stored and nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aggregator_sigkill_sqlite() {
    let Some(bin) = aperture_bin("fault_aggregator_sigkill_sqlite") else { return };
    let c = sigkill_scenario(bin, Vec::new(), 10).await;
    c.report("aggregator_sigkill_sqlite");
    assert_eq!(
        (c.lost(), c.duplicated()),
        (0, 0),
        "acknowledged must equal stored, once each ({} restarts)",
        c.restarts
    );
}

/// ClickHouse: nothing acknowledged is lost; a kill between a batch's
/// samples insert and its ledger insert may store that batch twice
/// (`docs/storage.md`), so duplicates are bounded by one writer batch per
/// kill — here at most the frames of one flush interval (1 s, 200 frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aggregator_sigkill_clickhouse() {
    let Some(bin) = aperture_bin("fault_aggregator_sigkill_clickhouse") else { return };
    let Some(server) = tokio::task::spawn_blocking(|| {
        aperture_testkit::clickhouse::start_or_skip("fault_aggregator_sigkill_clickhouse")
    })
    .await
    .expect("start server") else {
        return;
    };
    const KILLS: u32 = 10;
    let c = sigkill_scenario(bin, vec!["--clickhouse-endpoint".into(), server.endpoint()], KILLS).await;
    c.report("aggregator_sigkill_clickhouse");
    assert_eq!(c.lost(), 0, "nothing acknowledged is lost ({} restarts)", c.restarts);
    assert!(c.duplicated() <= u64::from(KILLS) * 400, "duplicates beyond one batch per kill: {}", c.duplicated());
    drop(server);
}

/// Agent run ids for the agent-restart scenario: one agent id, a boot id per
/// run, as the real agent does.
const CHILD_AGENT: AgentId = AgentId([0xac; 16]);

/// The synthetic agent as a process of its own (this test binary, run with
/// `APERTURE_FAULT_AGENT=<ingest port>,<t0>,<boot byte>`), so that it can be
/// SIGKILLed. It reads commands from stdin and answers each with one line,
/// `stats sent=N acked=N unacked=N`:
/// - `send N`: queues N frames (one every 5 ms) and answers at once;
/// - `settle`: waits until every frame is acknowledged, then answers.
#[test]
#[ignore = "the child process of fault_agent_sigkill, started by it"]
fn fault_agent_child() {
    let Ok(spec) = std::env::var("APERTURE_FAULT_AGENT") else { return };
    let parts: Vec<u64> = spec.split(',').map(|p| p.parse().expect("APERTURE_FAULT_AGENT: numbers")).collect();
    let [port, t0, boot] = parts[..] else { panic!("APERTURE_FAULT_AGENT: port,t0,boot") };
    let config = client_config(u16::try_from(port).expect("APERTURE_FAULT_AGENT: a port"));
    let boot_id = BootId([u8::try_from(boot).expect("boot byte"); 16]);
    let identity =
        AgentIdentity { agent_id: CHILD_AGENT, boot_id, node: "n1".into(), agent_version: "fault-child".into() };
    let client = Client::start(config, identity).expect("client");
    let mut seq = 0u64;
    let answer = |client: &Client, seq: u64| {
        let s = client.stats().session;
        println!("stats sent={seq} acked={} unacked={}", s.frames_acked, s.unacked_frames);
    };
    for line in std::io::stdin().lines() {
        let line = line.expect("stdin");
        let mut words = line.split_whitespace();
        match (words.next(), words.next().and_then(|n| n.parse::<u64>().ok())) {
            (Some("send"), Some(n)) => {
                for _ in 0..n {
                    seq += 1;
                    let id = FrameId { agent_id: CHILD_AGENT, boot_id, sequence: seq };
                    let frame =
                        encode_batch(&batch("n1", t0 + seq % 300), id, 0, &DecodeLimits::default()).expect("encode");
                    client.send(frame).expect("send");
                    std::thread::sleep(Duration::from_millis(5));
                }
                answer(&client, seq);
            }
            (Some("settle"), _) => {
                let deadline = Instant::now() + Duration::from_secs(60);
                while client.stats().session.unacked_frames > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                answer(&client, seq);
            }
            _ => panic!("fault agent child: unknown command `{line}`"),
        }
    }
}

/// A running [`fault_agent_child`].
struct AgentProcess {
    child: Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

/// What an [`AgentProcess`] said of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentCounts {
    sent: u64,
    acked: u64,
    unacked: u64,
}

impl AgentProcess {
    fn start(port: u16, t0: u64, boot: u8) -> AgentProcess {
        let exe = std::env::current_exe().expect("test binary");
        let mut child = Command::new(exe)
            .args(["fault_agent_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
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
    fn ask(&mut self, command: &str) -> AgentCounts {
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

    fn sigkill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A UDP relay between the agent and the aggregator's QUIC port that can be
/// told to drop everything, like a network partition.
struct Relay {
    port: u16,
    drop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: u16) -> Relay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("relay front");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("relay back");
        back.connect(("127.0.0.1", upstream)).await.expect("relay upstream");
        let port = front.local_addr().expect("relay addr").port();
        let drop = Arc::new(AtomicBool::new(false));
        let dropping = Arc::clone(&drop);
        let task = tokio::spawn(async move {
            let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client: Option<SocketAddr> = None;
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        if !dropping.load(Ordering::Relaxed) {
                            let _ = back.send(&up[..n]).await;
                        }
                    }
                    r = back.recv(&mut down) => {
                        let Ok(n) = r else { continue };
                        if let (Some(to), false) = (client, dropping.load(Ordering::Relaxed)) {
                            let _ = front.send_to(&down[..n], to).await;
                        }
                    }
                }
            }
        });
        Relay { port, drop, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An agent is SIGKILLed while frames are unacknowledged (the link to the
/// aggregator is cut first, so they cannot arrive), then restarted as a new
/// run. What is lost is exactly what the agent's counters called
/// unacknowledged at the kill; everything acknowledged, before and after
/// the restart, is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_agent_sigkill() {
    let Some(bin) = aperture_bin("fault_agent_sigkill") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agg = aggregator(bin, Vec::new(), dir.path());
    agg.start();
    agg.wait_healthy().await;
    let relay = Relay::start(agg.ingest).await;
    let t0 = now_s() - 600;
    let port = relay.port;
    let blocking = |f: Box<dyn FnOnce() -> (AgentProcess, AgentCounts) + Send>| tokio::task::spawn_blocking(f);

    // Run 1: 200 frames, all acknowledged.
    let (agent, settled) = blocking(Box::new(move || {
        let mut a = AgentProcess::start(port, t0, 1);
        a.ask("send 200");
        let c = a.ask("settle");
        (a, c)
    }))
    .await
    .expect("run 1");
    assert_eq!(settled, AgentCounts { sent: 200, acked: 200, unacked: 0 }, "run 1 settles");

    // The link goes down; 50 more frames wait in the agent; SIGKILL.
    relay.drop.store(true, Ordering::Relaxed);
    let (agent, at_kill) = blocking(Box::new(move || {
        let mut a = agent;
        let c = a.ask("send 50");
        (a, c)
    }))
    .await
    .expect("run 1, cut off");
    agent.sigkill();
    relay.drop.store(false, Ordering::Relaxed);
    assert_eq!(at_kill.sent - at_kill.acked, at_kill.unacked, "the counters agree with themselves");

    // Run 2: a new boot id, 100 frames, all acknowledged.
    let (agent, run2) = blocking(Box::new(move || {
        let mut a = AgentProcess::start(port, t0, 2);
        a.ask("send 100");
        let c = a.ask("settle");
        (a, c)
    }))
    .await
    .expect("run 2");
    agent.sigkill();
    assert_eq!(run2, AgentCounts { sent: 100, acked: 100, unacked: 0 }, "run 2 settles");

    let sent = at_kill.sent + run2.sent;
    let stored = cpu_total(agg.http, t0 - 20, t0 + 400).await / 5;
    let c = Conservation { sent, stored, restarts: 1 };
    c.report("agent_sigkill");
    report(&format!("fault: agent_sigkill unacked_at_kill={}", at_kill.unacked));
    assert_eq!(c.lost(), at_kill.unacked, "the loss is exactly what the agent called unacknowledged at the kill");
    assert_eq!(c.duplicated(), 0);
}
