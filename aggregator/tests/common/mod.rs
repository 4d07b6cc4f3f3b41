//! Shared helpers of the integration tests: a deterministic data set with
//! known totals, frame building, an acknowledgement recorder, a minimal HTTP
//! client. The throwaway ClickHouse server is `aperture_testkit::clickhouse`.

#![allow(dead_code, reason = "each test binary uses a different subset of the helpers")]

pub mod http;
pub mod pprof;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aperture_aggregator::{Acknowledge, Admission, Carrier, IngressSink, PeerInfo, ReceivedFrame, ShardedIngress};
use aperture_core::frame::{DecodeLimits, FrameBuf, FrameHeader, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{
    Batch, CpuSample, LATENCY_BUCKETS, LockKind, LockWait, SlowCall, Stack, StackFrame, SyscallStat, Target,
};

/// Records every acknowledged frame.
#[derive(Debug, Default)]
pub struct Acks {
    seen: Mutex<Vec<FrameId>>,
}

impl Acknowledge for Acks {
    fn ack(&self, frames: &[FrameId]) {
        self.seen.lock().expect("acks lock").extend_from_slice(frames);
    }
}

impl Acks {
    pub fn set(&self) -> HashSet<FrameId> {
        self.seen.lock().expect("acks lock").iter().copied().collect()
    }

    /// Waits until every frame in `want` is acknowledged; panics after `limit`.
    pub fn wait_for(&self, want: &[FrameId], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let seen = self.set();
            let missing = want.iter().filter(|f| !seen.contains(f)).count();
            if missing == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{missing} of {} frames not acknowledged within {limit:?}", want.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs()
}

pub fn frame_id(agent: u8, boot: u8, seq: u64) -> FrameId {
    FrameId { agent_id: AgentId([agent; 16]), boot_id: BootId([boot; 16]), sequence: seq }
}

pub fn frame(id: FrameId, batch: &Batch) -> ReceivedFrame {
    let bytes: FrameBuf = encode_batch(batch, id, 0, &DecodeLimits::default()).expect("encode");
    let header = FrameHeader::parse(&bytes, &DecodeLimits::default()).expect("header");
    let peer = Arc::new(PeerInfo {
        agent_id: id.agent_id,
        boot_id: id.boot_id,
        node: "test".into(),
        agent_version: "test".into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        carrier: Carrier::Grpc,
    });
    ReceivedFrame { header, bytes, carrier: Carrier::Grpc, peer }
}

/// What the ingress finally did with a pushed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Queued; an ack follows once committed.
    Queued,
    /// Committed earlier; acknowledged again.
    AlreadyCommitted,
}

/// Offers a frame until the ingress takes it (it may push back).
pub fn push(ingress: &ShardedIngress, id: FrameId, batch: &Batch) -> Taken {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match ingress.admit(frame(id, batch)) {
            Admission::Busy(_) => {
                assert!(Instant::now() < deadline, "ingress stayed busy for 120 s");
                std::thread::sleep(Duration::from_millis(10));
            }
            Admission::Queued => return Taken::Queued,
            Admission::AlreadyCommitted => return Taken::AlreadyCommitted,
        }
    }
}

fn stack(names: &[&str]) -> Stack {
    Stack::new(
        names
            .iter()
            .map(|n| StackFrame { symbol: (*n).into(), module: "app".into(), line: 1, ..Default::default() })
            .collect(),
    )
}

/// The data set: every frame of every agent carries the same records, so
/// totals are simple multiples. Stacks are leaf first.
///
/// per frame:
/// - cpu: api (pid 100, pod api-1) `main;handle;compute` x3; db (pid 200, pod db-0) `main;handle;read_disk` x2
/// - lock: api `main;lock_acquire;futex_wait`, a mutex, 2 waits, 1000 ns, max 700 ns
/// - syscall stats: api `read`, 10 calls, 1 error, 5000 ns, all in bucket 8
/// - slow call: db `read` at `main;read_disk;sys_read`, 2 ms, failed
pub fn batch(node: &str, time_s: u64) -> Batch {
    let t = time_s * 1_000_000_000;
    let mut hist = [0u64; LATENCY_BUCKETS];
    hist[8] = 10;
    Batch {
        node: node.into(),
        targets: vec![
            Target {
                pid: 100,
                process: "api".into(),
                namespace: "prod".into(),
                pod: "api-1".into(),
                container: "api".into(),
            },
            Target {
                pid: 200,
                process: "db".into(),
                namespace: "prod".into(),
                pod: "db-0".into(),
                container: "pg".into(),
            },
        ],
        stacks: vec![
            stack(&["compute", "handle", "main"]),
            stack(&["read_disk", "handle", "main"]),
            stack(&["futex_wait", "lock_acquire", "main"]),
            stack(&["sys_read", "read_disk", "main"]),
        ],
        cpu: vec![
            CpuSample { time_ns: t, target: 0, stack: 0, count: 3, period_ns: 10_000_000 },
            CpuSample { time_ns: t, target: 1, stack: 1, count: 2, period_ns: 10_000_000 },
        ],
        locks: vec![LockWait {
            time_ns: t,
            target: 0,
            stack: 2,
            kind: LockKind::Mutex,
            count: 2,
            wait_ns: 1000,
            max_wait_ns: 700,
        }],
        syscalls: vec![SyscallStat {
            time_ns: t,
            target: 0,
            nr: 0,
            name: "read".into(),
            count: 10,
            errors: 1,
            total_ns: 5000,
            histogram: hist,
        }],
        slow_calls: vec![SlowCall {
            time_ns: t,
            target: 1,
            tid: 201,
            stack: 3,
            nr: 0,
            name: "read".into(),
            duration_ns: 2_000_000,
            ret: -5,
        }],
    }
}

/// Samples (observations) in one [`batch`]: 3 + 2 cpu, 2 waits, 10 calls, 1 slow call.
pub const SAMPLES_PER_BATCH: u64 = 18;

/// Installs the recorder as the aggregator's acker.
pub fn acks(handle: &aperture_aggregator::AggregatorHandle) -> Arc<Acks> {
    let acks = Arc::new(Acks::default());
    handle.set_acker(acks.clone());
    acks
}

/// Settings for a test: loopback HTTP on a free port, two shards, short delays.
/// A ClickHouse server of the test's own and [`settings`] that store in
/// it, in a fresh data directory; `None` when no server can be started
/// (reported skipped by `test`'s name). Keep the three alive for the test.
#[allow(dead_code)] // Not every test file runs on ClickHouse.
pub async fn clickhouse_settings(
    test: &'static str,
) -> Option<(aperture_testkit::clickhouse::ClickHouseServer, tempfile::TempDir, aperture_aggregator::Settings)> {
    let server = tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test))
        .await
        .expect("start server")?;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings(dir.path());
    settings.clickhouse = Some(aperture_aggregator::ClickHouseSettings::new(server.endpoint()));
    Some((server, dir, settings))
}

pub fn settings(data_dir: &std::path::Path) -> aperture_aggregator::Settings {
    let mut s = aperture_aggregator::Settings::new(data_dir);
    s.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    s.shards = 2;
    s.flush_max_age = Duration::from_millis(100);
    s.writer_max_delay = Duration::from_millis(100);
    s.writer_max_backoff = Duration::from_millis(500);
    s
}

/// Total CPU samples the store holds for `[from, to)`, through the API.
pub async fn cpu_total(addr: SocketAddr, from: u64, to: u64) -> u64 {
    let r = http::get(addr, &format!("/api/v1/profile?mode=cpu&from={from}&to={to}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["root"]["value"].as_u64().unwrap_or(0)
}

/// The value of an unlabelled metric, or of the first series whose labels
/// contain every `key="value"` in `labels`; 0 if absent.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|kv| rest.contains(kv))
        })
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

/// The Python interpreter of the SDK tests (`APERTURE_TEST_PYTHON`, else
/// `python3`) if it can run `import_line`; otherwise the test is reported
/// skipped by name, with `install` as what to do.
pub fn python_with(test: &str, import_line: &str, install: &str) -> Option<String> {
    let python = std::env::var("APERTURE_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    match std::process::Command::new(&python).args(["-c", import_line]).output() {
        Ok(out) if out.status.success() => Some(python),
        Ok(_) => {
            aperture_testkit::skip(test, &format!("{python} cannot `{import_line}` ({install})"));
            None
        }
        Err(e) => {
            aperture_testkit::skip(test, &format!("cannot run {python}: {e}"));
            None
        }
    }
}

/// The folded profile of the last ten minutes matching `query`, from an
/// aggregator without a read token.
pub async fn folded(addr: SocketAddr, query: &str) -> String {
    let r = http::get(addr, &format!("/api/v1/profile?format=folded&from=-10m&{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.text()
}
