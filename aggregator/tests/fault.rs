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

/// The aggregator is SIGKILLed at fixed, uneven moments and restarted while
/// an agent pushes. Every frame the agent sent is acknowledged in the end,
/// and the store holds each exactly once (SQLite: no duplicate window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aggregator_sigkill_sqlite() {
    let scenario = "aggregator_sigkill_sqlite";
    let Some(bin) = aperture_bin("fault_aggregator_sigkill_sqlite") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut agg = AggregatorProcess {
        bin,
        dir: dir.path().to_path_buf(),
        http: SocketAddr::from(([127, 0, 0, 1], free_port())),
        ingest: free_port(),
        child: None,
        starts: 0,
    };
    agg.start();
    agg.wait_healthy().await;

    let config = ClientConfig {
        aggregator: format!("127.0.0.1:{}", agg.ingest),
        carrier: CarrierChoice::Quic,
        tls: ClientTlsConfig { insecure_skip_verify: true, ..ClientTlsConfig::default() },
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        connect_timeout_ms: 2_000,
        ..ClientConfig::default()
    };
    let identity =
        AgentIdentity { agent_id: [0xfa; 16], boot_id: [0x17; 16], node: "n1".into(), agent_version: "fault".into() };
    let client = Arc::new(Client::start(config, identity.clone()).expect("client"));
    let t0 = now_s() - 600;

    // The agent: one frame of 5 CPU samples every 5 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let pusher = {
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

    const KILLS: u32 = 10;
    for k in 0..KILLS {
        // Uneven, reproducible moments: 150..850 ms apart.
        let pause = 150 + (u64::from(k) * 389) % 700;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        agg.kill();
        tokio::time::sleep(Duration::from_millis(100)).await;
        agg.start();
        agg.wait_healthy().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    pusher.join().expect("pusher");
    let sent = sent.load(Ordering::Relaxed);

    // Everything sent is acknowledged in the end.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = client.stats();
        assert_eq!(s.frames_dropped, 0, "the agent's buffer never overflowed");
        if s.unacked_frames == 0 && s.frames_acked >= sent {
            break;
        }
        assert!(Instant::now() < deadline, "not all frames acknowledged: {s:?}, sent {sent}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = cpu_total(agg.http, t0 - 20, t0 + 400).await / 5;
    let (lost, duplicated) = (sent.saturating_sub(stored), stored.saturating_sub(sent));
    report(&format!("fault: {scenario} sent={sent} stored={stored} lost={lost} duplicated={duplicated}"));
    assert_eq!((lost, duplicated), (0, 0), "acknowledged must equal stored, once each (restarts: {})", agg.starts);
    let report = Arc::try_unwrap(client).map(|c| c.shutdown(Duration::from_secs(1)));
    if let Ok(r) = report {
        assert!(r.unacked.is_empty());
    }
}
