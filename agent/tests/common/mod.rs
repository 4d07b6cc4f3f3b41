//! Shared pieces of the agent's integration tests: root check, test
//! programs compiled at test time, and a transport server recording frames.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aperture_core::config::{AgentConfig, FlagValue, load};
use aperture_core::frame::{DecodeLimits, FrameId, decode_unaligned};
use aperture_core::model::Batch;
use aperture_transport::server::{Acker, Admission, IngressSink, ReceivedFrame, ServerConfig, ServerHandle, serve};

/// Whether the test runs as root; prints the skip line otherwise.
pub fn require_root(test: &str) -> bool {
    aperture_testkit::require_root(test)
}

/// Compiles `tests/programs/<name>.c` with frame pointers and debug info.
pub fn build_program(name: &str) -> PathBuf {
    aperture_testkit::build_c_program(env!("CARGO_MANIFEST_DIR"), env!("CARGO_TARGET_TMPDIR"), name)
}

/// A child process killed when dropped.
pub struct Program(pub Child);

impl Program {
    pub fn spawn(bin: &PathBuf, seconds: &str) -> Program {
        Program(Command::new(bin).arg(seconds).spawn().expect("spawn test program"))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Frames received, and when each was acknowledged.
#[derive(Default)]
pub struct Recorded {
    pub frames: Mutex<Vec<(FrameId, Batch)>>,
    pub acked: Mutex<Vec<FrameId>>,
}

struct RecordingSink {
    recorded: Arc<Recorded>,
    acker: Arc<OnceLock<Acker>>,
    ack_delay: Duration,
}

impl IngressSink for RecordingSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        let id = frame.header.id;
        let (_, batch) = decode_unaligned(&frame.bytes, &DecodeLimits::default()).expect("agent frames decode");
        self.recorded.frames.lock().expect("lock").push((id, batch));
        let (recorded, acker, delay) = (Arc::clone(&self.recorded), Arc::clone(&self.acker), self.ack_delay);
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            if let Some(a) = acker.get() {
                a.ack(&[id]);
                recorded.acked.lock().expect("lock").push(id);
            }
        });
        Admission::Queued
    }
}

/// A transport server on loopback recording every frame, acknowledging each
/// after `ack_delay`.
pub struct Server {
    pub runtime: tokio::runtime::Runtime,
    pub handle: Option<ServerHandle>,
    pub recorded: Arc<Recorded>,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn start(ack_delay: Duration) -> Server {
        Server::start_with(ack_delay, false)
    }

    /// A server that behaves like the first release: session protocol 1, no
    /// capabilities (it does not read lock classes).
    pub fn start_older(ack_delay: Duration) -> Server {
        Server::start_with(ack_delay, true)
    }

    fn start_with(ack_delay: Duration, older: bool) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
        let dir = tempfile::tempdir().expect("tempdir");
        let recorded = Arc::new(Recorded::default());
        let acker = Arc::new(OnceLock::new());
        let sink = Arc::new(RecordingSink { recorded: Arc::clone(&recorded), acker: Arc::clone(&acker), ack_delay });
        let loopback = "127.0.0.1:0".parse().expect("addr");
        let mut config = ServerConfig {
            quic_listen: Some(loopback),
            grpc_listen: Some(loopback),
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        };
        config.auth.token = Some("test-token".into());
        if older {
            config.limits.max_protocol = 1;
            config.limits.capabilities = aperture_transport::control::Capabilities::NONE;
        }
        let handle = runtime.block_on(serve(config, sink)).expect("transport server starts");
        let _ = acker.set(handle.acker());
        let address = format!("127.0.0.1:{}", handle.grpc_addr().expect("grpc addr").port());
        Server { runtime, handle: Some(handle), recorded, address, _dir: dir }
    }

    pub fn fingerprint(&self) -> String {
        self.handle.as_ref().expect("running").fingerprint()
    }

    /// Waits (bounded) until `found` holds for the frames received so far.
    pub fn wait_for<T>(&self, limit: Duration, mut found: impl FnMut(&[(FrameId, Batch)]) -> Option<T>) -> Option<T> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(t) = found(&self.recorded.frames.lock().expect("lock")) {
                return Some(t);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.runtime.block_on(h.shutdown(Duration::from_secs(1)));
        }
    }
}

/// An agent configuration for the local server, through the real config
/// layer (file + flags), as the binary builds it.
pub fn agent_config(server: &Server, data_dir: &std::path::Path, yaml: &str, mode: &str) -> AgentConfig {
    let flags = [
        FlagValue::new("--aggregator", "aggregator", server.address.clone()),
        FlagValue::new("--mode", "mode", mode),
        FlagValue::new("--data-dir", "data_dir", data_dir.display().to_string()),
        FlagValue::new("--metrics-listen", "metrics.listen", "127.0.0.1:0"),
        FlagValue::new("--fingerprint", "transport.fingerprint_sha256", server.fingerprint()),
    ];
    let mut config: AgentConfig = load(Some(("agent.yml", yaml)), &|_| None, &flags).expect("valid agent config");
    config.auth_token = aperture_core::config::Secret("test-token".into());
    config.transport.server_name = Some("localhost".into());
    config
}
