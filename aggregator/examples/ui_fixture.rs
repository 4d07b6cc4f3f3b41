//! An aggregator filled with known data, for the browser test of the web UI
//! (`aggregator/ui/tests/run.sh`).
//!
//! ```text
//! ui_fixture [--port N] [--token TOKEN]
//! ```
//!
//! Starts the in-process aggregator with the embedded store in a temporary
//! directory, HTTP on 127.0.0.1:N (0, the default, picks a free port) and
//! bearer-token auth on (default token `ui-test-token`). It then pushes the
//! frames below through the ingress, exactly as the transport would hand
//! them over, waits until every frame is acknowledged (its rows are
//! committed), prints `ready http://127.0.0.1:PORT` and serves until it gets
//! SIGTERM or SIGINT.
//!
//! The data, with the shares the test checks (stacks root first):
//!
//! Pushed like a Pyroscope SDK (`POST /ingest`), two minutes ago: service
//! `checkout` (tag `env=prod`), type `memory:alloc_space:bytes:space:bytes`,
//! `main;serve;parse_json` 3072 bytes (75 %), `main;serve;render` 1024.
//!
//! CPU, two minutes ago, 1000 samples (10 ms period):
//! - api on node-a: `main;worker_loop;handle_request;compute_checksum` 750
//!   (75 %): `crc32_update` 600 of it (520 self, `crc32_fold` 80), 150 self;
//!   `parse_request` 100; `write_response` 50 through kernel frames.
//! - db on node-b: `main;query_loop;execute_query;btree_search` 80 (80 % of
//!   db), `fsync_wal` 20.
//!
//! CPU, 22 minutes ago (the base of the default diff), 700 samples:
//! `crc32_update` only 200 (so it grows: red in the diff) and
//! `json_decode` 250 (it shrinks to 60: blue).
//!
//! Lock, two minutes ago, 40 ms of contention: 30 ms (75 %) in api's
//! `cache_lookup` (a mutex), 10 ms in db (a mutex and a kernel mutex); besides,
//! 200 ms of waiting on a condition variable in api's `pool_idle`, which
//! shows only with `lock_class=all` (or `waiting`). Syscall statistics for api and db; slow calls: db's `fsync`
//! 150 ms (75 %) and api's `read` 50 ms.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use aperture_aggregator::{
    Acknowledge, Admission, Aggregator, Carrier, IngressSink, PeerInfo, ReceivedFrame, Settings,
};
use aperture_core::frame::{DecodeLimits, FrameHeader, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{
    Batch, CpuSample, LATENCY_BUCKETS, LockKind, LockWait, SlowCall, Stack, StackFrame, SyscallStat, Target,
    latency_bucket,
};

const MS: u64 = 1_000_000;

/// Records acknowledged frames.
#[derive(Debug, Default)]
struct Acks(Mutex<Vec<FrameId>>);

impl Acknowledge for Acks {
    fn ack(&self, frames: &[FrameId]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(frames);
    }
}

impl Acks {
    fn all_in(&self, want: &[FrameId]) -> bool {
        let seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        want.iter().all(|id| seen.contains(id))
    }
}

/// Builds one batch: a node, its targets, and records that name stacks by
/// their frames (root first, `k:` marks a kernel frame).
struct BatchBuilder {
    batch: Batch,
    time_ns: u64,
}

impl BatchBuilder {
    fn new(node: &str, targets: Vec<Target>, time_s: u64) -> BatchBuilder {
        BatchBuilder {
            batch: Batch { node: node.to_owned(), targets, ..Default::default() },
            time_ns: time_s * 1_000_000_000,
        }
    }

    fn stack(&mut self, root_first: &str) -> u32 {
        let frames = root_first
            .split(';')
            .rev()
            .map(|f| {
                let (kernel, name) = match f.strip_prefix("k:") {
                    Some(n) => (true, n),
                    None => (false, f),
                };
                StackFrame {
                    symbol: name.to_owned(),
                    module: if kernel { "[kernel]".to_owned() } else { "app".to_owned() },
                    kernel,
                    ..Default::default()
                }
            })
            .collect();
        let stack = Stack::new(frames);
        match self.batch.stacks.iter().position(|s| s.hash == stack.hash) {
            Some(i) => i as u32,
            None => {
                self.batch.stacks.push(stack);
                (self.batch.stacks.len() - 1) as u32
            }
        }
    }

    fn cpu(&mut self, target: u32, stack: &str, count: u32) -> &mut Self {
        let stack = self.stack(stack);
        self.batch.cpu.push(CpuSample { time_ns: self.time_ns, target, stack, count, period_ns: 10 * MS });
        self
    }

    fn lock(&mut self, target: u32, stack: &str, kind: LockKind, count: u64, wait_ns: u64) -> &mut Self {
        let stack = self.stack(stack);
        let max_wait_ns = wait_ns / count * 3;
        self.batch.locks.push(LockWait { time_ns: self.time_ns, target, stack, kind, count, wait_ns, max_wait_ns });
        self
    }

    /// `count` calls of syscall `(nr, name)`, 95 % taking `fast_ns` and 5 % `slow_ns`.
    fn syscall(
        &mut self,
        target: u32,
        (nr, name): (u32, &str),
        count: u64,
        errors: u64,
        (fast_ns, slow_ns): (u64, u64),
    ) -> &mut Self {
        let mut histogram = [0u64; LATENCY_BUCKETS];
        let slow = count / 20;
        histogram[latency_bucket(fast_ns)] += count - slow;
        histogram[latency_bucket(slow_ns)] += slow;
        let total_ns = (count - slow) * fast_ns + slow * slow_ns;
        self.batch.syscalls.push(SyscallStat {
            time_ns: self.time_ns,
            target,
            nr,
            name: name.to_owned(),
            count,
            errors,
            total_ns,
            histogram,
        });
        self
    }

    fn slow_calls(&mut self, target: u32, stack: &str, nr: u32, name: &str, calls: u32, each_ns: u64) -> &mut Self {
        let stack = self.stack(stack);
        for i in 0..calls {
            self.batch.slow_calls.push(SlowCall {
                time_ns: self.time_ns,
                target,
                tid: 1000 + i,
                stack,
                nr,
                name: name.to_owned(),
                duration_ns: each_ns,
                ret: 0,
            });
        }
        self
    }

    fn build(&mut self) -> Batch {
        std::mem::take(&mut self.batch)
    }
}

fn target(pid: u32, process: &str, namespace: &str, pod: &str, container: &str) -> Target {
    Target {
        pid,
        process: process.to_owned(),
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        container: container.to_owned(),
    }
}

const API: &str = "main;worker_loop;handle_request";
const DB: &str = "main;query_loop";

/// node-a runs the api process; `current` selects the recent or the base data.
fn api_batch(time_s: u64, current: bool) -> Batch {
    let mut b = BatchBuilder::new("node-a", vec![target(4211, "api", "shop", "api-7f9c4", "api")], time_s);
    let checksum = format!("{API};compute_checksum");
    let parse = format!("{API};parse_request");
    let write = "main;worker_loop;write_response;k:__x64_sys_write;k:ksys_write;k:vfs_write";
    if current {
        b.cpu(0, &format!("{checksum};crc32_update"), 520)
            .cpu(0, &format!("{checksum};crc32_update;crc32_fold"), 80)
            .cpu(0, &checksum, 150)
            .cpu(0, &format!("{parse};json_decode"), 60)
            .cpu(0, &format!("{parse};utf8_validate"), 25)
            .cpu(0, &parse, 15)
            .cpu(0, write, 50);
        b.lock(0, "main;worker_loop;cache_lookup;std::sync::Mutex::lock;futex_wait", LockKind::Mutex, 40, 30 * MS);
        b.lock(0, "main;worker_pool;pool_idle;pthread_cond_wait", LockKind::CondVar, 12, 200 * MS);
        b.syscall(0, (0, "read"), 5000, 3, (8_000, 400_000))
            .syscall(0, (1, "write"), 2000, 0, (15_000, 200_000))
            .syscall(0, (202, "futex"), 800, 40, (25_000, 3 * MS))
            .syscall(0, (232, "epoll_wait"), 1200, 0, (500_000, 5 * MS));
        b.slow_calls(0, &format!("{API};read_body"), 0, "read", 5, 10 * MS);
    } else {
        b.cpu(0, &format!("{checksum};crc32_update"), 200)
            .cpu(0, &checksum, 50)
            .cpu(0, &format!("{parse};json_decode"), 250)
            .cpu(0, &format!("{parse};utf8_validate"), 35)
            .cpu(0, &parse, 15)
            .cpu(0, write, 50);
    }
    b.build()
}

/// node-b runs the db process.
fn db_batch(time_s: u64) -> Batch {
    let mut b = BatchBuilder::new("node-b", vec![target(977, "db", "shop", "db-0", "postgres")], time_s);
    b.cpu(0, &format!("{DB};execute_query;btree_search"), 80).cpu(0, &format!("{DB};fsync_wal;k:__x64_sys_fsync"), 20);
    b.lock(0, &format!("{DB};wal_append;LWLockAcquire;futex_wait"), LockKind::Mutex, 6, 6 * MS).lock(
        0,
        &format!("{DB};fsync_wal;k:__x64_sys_fsync;k:ext4_sync_file;k:mutex_lock"),
        LockKind::KernelMutex,
        4,
        4 * MS,
    );
    b.syscall(0, (74, "fsync"), 50, 0, (2 * MS, 10 * MS)).syscall(0, (17, "pread64"), 3000, 2, (5_000, 90_000));
    b.slow_calls(0, &format!("{DB};fsync_wal"), 74, "fsync", 15, 10 * MS);
    b.build()
}

struct Args {
    port: u16,
    token: String,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args { port: 0, token: "ui-test-token".to_owned() };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--port" => out.port = it.next().context("--port needs a value")?.parse().context("--port: a TCP port")?,
            "--token" => out.token = it.next().context("--token needs a value")?,
            other => bail!("unknown argument {other:?}; usage: ui_fixture [--port N] [--token TOKEN]"),
        }
    }
    Ok(out)
}

fn received(id: FrameId, batch: &Batch) -> anyhow::Result<ReceivedFrame> {
    let limits = DecodeLimits::default();
    let bytes = encode_batch(batch, id, 0, &limits).context("encoding a frame")?;
    let header = FrameHeader::parse(&bytes, &limits).context("parsing the frame header")?;
    let peer = Arc::new(PeerInfo {
        agent_id: id.agent_id,
        boot_id: id.boot_id,
        node: "fixture".into(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        addr: SocketAddr::from(([127, 0, 0, 1], 1)),
        carrier: Carrier::Grpc,
    });
    Ok(ReceivedFrame { header, bytes, carrier: Carrier::Grpc, peer })
}

/// Pushes the service `checkout`'s heap profile the way a Pyroscope SDK
/// does (`POST /ingest`, folded), answered once committed.
async fn push_profile(addr: SocketAddr, token: &str, time_s: u64) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = "main;serve;parse_json 3072\nmain;serve;render 1024\n";
    let request = format!(
        "POST /ingest?name=checkout.alloc_space%7Benv%3Dprod%7D&from={time_s}&format=folded&units=bytes HTTP/1.1\r\n\
         Host: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.context("connecting to the aggregator")?;
    stream.write_all(request.as_bytes()).await.context("sending the pushed profile")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.context("reading the answer to the push")?;
    let answer = String::from_utf8_lossy(&answer);
    if !answer.starts_with("HTTP/1.1 200") {
        bail!("the pushed profile was refused: {answer}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let dir = tempfile::tempdir().context("creating the data directory")?;
    let mut settings = Settings::new(dir.path());
    settings.http_listen = SocketAddr::from(([127, 0, 0, 1], args.port));
    let ingest_token = args.token.clone();
    settings.ingest_token = Some(args.token.clone());
    settings.auth_token = Some(args.token);
    settings.shards = 2;
    settings.flush_max_age = Duration::from_millis(100);
    settings.writer_max_delay = Duration::from_millis(100);
    let handle = Aggregator::start(settings).await?;
    let acks = Arc::new(Acks::default());
    handle.set_acker(acks.clone());

    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("clock before 1970")?.as_secs();
    let (current, base) = (now - 120, now - 22 * 60);
    let frames = [
        (FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([1; 16]), sequence: 1 }, api_batch(base, false)),
        (FrameId { agent_id: AgentId([1; 16]), boot_id: BootId([1; 16]), sequence: 2 }, api_batch(current, true)),
        (FrameId { agent_id: AgentId([2; 16]), boot_id: BootId([1; 16]), sequence: 1 }, db_batch(base)),
        (FrameId { agent_id: AgentId([2; 16]), boot_id: BootId([1; 16]), sequence: 2 }, db_batch(current)),
    ];
    let ingress = handle.ingress();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, batch) in &frames {
        loop {
            match ingress.admit(received(*id, batch)?) {
                Admission::Busy(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Admission::Busy(_) => bail!("the ingress stayed busy for 60 s"),
                Admission::Queued | Admission::AlreadyCommitted => break,
            }
        }
    }
    let ids: Vec<FrameId> = frames.iter().map(|(id, _)| *id).collect();
    while !acks.all_in(&ids) {
        if Instant::now() > deadline {
            bail!("frames not committed within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    push_profile(handle.http_addr(), &ingest_token, current).await?;
    println!("ready http://{}", handle.http_addr());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    handle.shutdown().await?;
    drop(dir);
    Ok(())
}
