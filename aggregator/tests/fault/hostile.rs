//! Hostile clients against the real aggregator process, each while a
//! legitimate agent pushes: the aggregator's RSS growth stays under a bound
//! derived from its configured limits, the agent's frames are all
//! acknowledged and stored exactly once, and `/healthz` and a query answer
//! within a generous liveness bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aperture_core::frame::{DecodeLimits, FrameId, HEADER_LEN, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{Batch, CpuSample, LockKind, LockWait, Stack, StackFrame, Target};
use aperture_transport::client::{AgentIdentity, Client};
use aperture_transport::control::{Control, Hello, PROTOCOL_VERSION};
use aperture_transport::tls::{self, ClientTlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{batch, now_s};
use crate::oracle::{Conservation, cpu_total, live_within, scrape};
use crate::process::{Agent, AggregatorProcess, aggregator, aperture_bin, client_config, config_args, rss_bytes};

const TOKEN: &str = "fault-suite-token";
const MIB: u64 = 1024 * 1024;
/// Liveness, not latency: how long `/healthz` and a query may take under attack.
const LIVE: Duration = Duration::from_secs(10);

/// An aggregator with a token and `yaml` as its config, healthy.
async fn hostile_aggregator(bin: std::path::PathBuf, dir: &std::path::Path, yaml: &str) -> AggregatorProcess {
    let mut agg = aggregator(bin, config_args(dir, yaml), dir);
    agg.token = Some(TOKEN.into());
    agg.start();
    agg.wait_healthy().await;
    agg
}

/// The legitimate agent of a scenario: QUIC with the token.
fn legit_agent(agg: &AggregatorProcess, t0: u64) -> Agent {
    let config = aperture_transport::client::ClientConfig { token: Some(TOKEN.into()), ..client_config(agg.ingest) };
    Agent::start_with(config, 0xb0, t0, |t| batch("n1", t))
}

/// Samples a process's RSS every 50 ms, keeping the peak.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(rss_bytes(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        RssWatch { peak, stop, task }
    }

    async fn peak(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// Runs a hostile scenario around `attack`: a legitimate agent warms up,
/// the baseline RSS is taken, `attack` runs while RSS is watched and
/// liveness checked, then the agent's frames are counted in the store.
/// Prints the scenario line with the RSS numbers and asserts growth under
/// `bound` (whose derivation `why` names) and exact conservation.
async fn under_attack<F>(name: &str, agg: &AggregatorProcess, bound: u64, why: &str, attack: F) -> String
where
    F: std::future::Future<Output = String>,
{
    let t0 = now_s() - 600;
    let agent = legit_agent(agg, t0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agg.pid();
    let before = rss_bytes(pid);
    let watch = RssWatch::start(pid);
    let (what, live) = tokio::join!(attack, async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        live_within(agg, t0 - 20, t0 + 400, LIVE).await
    });
    let peak = watch.peak().await;
    let sent = agent.finish().await;
    let stored = cpu_total(agg, t0 - 20, t0 + 400).await / 5;
    let c = Conservation { sent, stored, restarts: 0 };
    let growth = peak.saturating_sub(before);
    c.report_with(
        name,
        &format!(
            " rss_before={before} rss_peak={peak} rss_growth={growth} rss_bound={bound} ({why}) \
             live_ms={} {what}",
            live.as_millis()
        ),
    );
    assert_eq!((c.lost(), c.duplicated()), (0, 0), "the legitimate agent's frames are stored exactly once");
    assert!(growth < bound, "RSS grew by {growth} bytes under attack, bound {bound} ({why})");
    what
}

/// A QUIC client endpoint trusting any certificate.
fn quic_client() -> (quinn::Endpoint, quinn::ClientConfig) {
    let trust = ClientTlsConfig { insecure_skip_verify: true, ..Default::default() };
    let (crypto, _) = tls::client_config(&trust, tls::QUIC_ALPN).expect("client tls");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).expect("quic tls");
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("endpoint");
    (endpoint, quinn::ClientConfig::new(Arc::new(crypto)))
}

/// A frame header announcing a payload of `payload` bytes.
fn header_announcing(payload: u32) -> Vec<u8> {
    let id = FrameId { agent_id: AgentId([0xee; 16]), boot_id: BootId([1; 16]), sequence: 1 };
    let frame = encode_batch(&batch("x", 1), id, 0, &DecodeLimits::default()).expect("encode");
    let mut head = frame[..HEADER_LEN].to_vec();
    head[8..12].copy_from_slice(&payload.to_le_bytes());
    head
}

fn hello(boot: u32, token: &str) -> Vec<u8> {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&boot.to_le_bytes());
    Control::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: AgentId([0xee; 16]),
        boot_id: BootId(b),
        token: token.as_bytes().to_vec(),
        node: "attacker".into(),
        agent_version: "x".into(),
    })
    .to_bytes()
    .expect("hello")
}

/// Many unauthenticated connections that stall: QUIC ones (half a hello,
/// or a maximal frame header where the hello belongs) and TCP ones on the
/// gRPC port (the start of a TLS record, or nothing), four times
/// `limits.max_unauthenticated` in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hostile_stalled_connections() {
    let Some(bin) = aperture_bin("fault_hostile_stalled_connections") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    const MAX_UNAUTH: u64 = 64;
    const MAX_FRAME: u64 = 4 * MIB;
    let agg = hostile_aggregator(
        bin,
        dir.path(),
        &format!("limits:\n  max_unauthenticated: {MAX_UNAUTH}\n  max_frame_size: {}MiB\n", MAX_FRAME / MIB),
    )
    .await;
    let attackers = 4 * MAX_UNAUTH;
    // An authenticating connection holds its handshake state and at most
    // the 8 KiB pre-authentication receive window, never a frame buffer;
    // each of the admitted ones is allowed 1/16 of a frame. Holding one
    // frame buffer per staller would be `attackers` × 4 MiB = 1 GiB.
    let bound = MAX_UNAUTH * MAX_FRAME / 16;
    let why = format!("max_unauthenticated {MAX_UNAUTH} x max_frame_size/16");
    let (ingest, addr) = (agg.ingest, SocketAddr::from(([127, 0, 0, 1], agg.ingest)));
    let what = under_attack("hostile_stalled_connections", &agg, bound, &why, async move {
        let (endpoint, config) = quic_client();
        let head = header_announcing(u32::try_from(MAX_FRAME).expect("small") - HEADER_LEN as u32);
        let half_hello = hello(1, "wrong")[..20].to_vec();
        let mut held_quic = Vec::new();
        let mut refused = 0;
        for i in 0..attackers / 2 {
            let connecting = endpoint.connect_with(config.clone(), addr, "localhost").expect("connect");
            match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                Ok(Ok(conn)) => {
                    if let Ok((mut send, recv)) = conn.open_bi().await {
                        let bytes = if i % 2 == 0 { &half_hello } else { &head };
                        let _ = send.write_all(bytes).await;
                        held_quic.push((conn, send, recv));
                    }
                }
                _ => refused += 1,
            }
        }
        let mut held_tcp = Vec::new();
        for i in 0..attackers / 2 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", ingest)).await {
                if i % 2 == 0 {
                    let _ = s.write_all(&[0x16, 0x03, 0x01]).await;
                }
                held_tcp.push(s);
            }
        }
        // Stall, holding everything, while liveness is checked.
        tokio::time::sleep(Duration::from_secs(4)).await;
        drop(held_tcp);
        drop(held_quic);
        format!("attackers={attackers} quic_refused_at_connect={refused}")
    })
    .await;
    let refused = scrape(&agg, "aperture_transport_preauth_refused_total", &[]).await;
    crate::oracle::report(&format!("fault: hostile_stalled_connections {what} preauth_refused={refused}"));
    assert!(refused > 0.0, "connections over limits.max_unauthenticated are refused");
}

/// HTTP slowloris: four times `limits.http_max_connections` connections
/// each sending a request head one line every 500 ms, reconnecting when
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hostile_slowloris() {
    let Some(bin) = aperture_bin("fault_hostile_slowloris") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    const MAX_CONNS: u64 = 64;
    let agg = hostile_aggregator(
        bin,
        dir.path(),
        &format!("limits:\n  http_max_connections: {MAX_CONNS}\n  http_header_timeout: 2s\n"),
    )
    .await;
    // hyper buffers a request head up to 8 KiB + 100 x 4 KiB per connection
    // (its default read buffer limit); at most `http_max_connections` are served.
    const HEAD_BUFFER: u64 = 8192 + 4096 * 100;
    let bound = MAX_CONNS * HEAD_BUFFER;
    let why = format!("http_max_connections {MAX_CONNS} x hyper head buffer {HEAD_BUFFER}");
    let http = agg.http;
    let what = under_attack("hostile_slowloris", &agg, bound, &why, async move {
        let stop = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..4 * MAX_CONNS {
            let (stop, closed) = (Arc::clone(&stop), Arc::clone(&closed));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = tokio::net::TcpStream::connect(http).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    let _ = s.write_all(b"GET /api/v1/profile?mode=cpu HTTP/1.1\r\nHost: x\r\n").await;
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                            Ok(Ok(0) | Err(_)) => break,
                            Ok(Ok(_)) => {}
                            Err(_) => {
                                if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    closed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        format!("slow_connections={} closed_by_server={}", 4 * MAX_CONNS, closed.load(Ordering::Relaxed))
    })
    .await;
    let timeouts = scrape(&agg, "aperture_http_header_timeouts_total", &[]).await;
    let refused = scrape(&agg, "aperture_http_connections_refused_total", &[]).await;
    crate::oracle::report(&format!("fault: hostile_slowloris {what} header_timeouts={timeouts} refused={refused}"));
    assert!(timeouts > 0.0 && refused > 0.0, "slow heads are timed out and connections over the cap refused");
}

/// An 80,000-frame stack with maximal counts (`u32::MAX` CPU samples, a
/// lock wait of `u64::MAX` waits and nanoseconds).
fn hostile_batch(time_s: u64) -> Batch {
    let frames = (0..80_000).map(|i| StackFrame { symbol: format!("f{i}"), module: "m".into(), ..Default::default() });
    let t = time_s * 1_000_000_000;
    Batch {
        node: "hostile".into(),
        targets: vec![Target { pid: 9, process: "deep".into(), ..Default::default() }],
        stacks: vec![Stack::new(frames.collect())],
        cpu: vec![CpuSample { time_ns: t, target: 0, stack: 0, count: u32::MAX, period_ns: u64::MAX }],
        locks: vec![LockWait {
            time_ns: t,
            target: 0,
            stack: 0,
            kind: LockKind::Mutex,
            count: u64::MAX,
            wait_ns: u64::MAX,
            max_wait_ns: u64::MAX,
        }],
        ..Default::default()
    }
}

/// A valid agent (the token, well-formed frames) sending 80k-frame stacks
/// with maximal counts: stacks are cut to `limits.max_stack_frames`, sums
/// saturate, queries over that range answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hostile_deep_stacks() {
    let Some(bin) = aperture_bin("fault_hostile_deep_stacks") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    const CAPACITY: u64 = 16 * MIB;
    const MAX_FRAME: u64 = 4 * MIB;
    let agg = hostile_aggregator(
        bin,
        dir.path(),
        &format!("buffer:\n  capacity: {}MiB\nlimits:\n  max_frame_size: {}MiB\n", CAPACITY / MIB, MAX_FRAME / MIB),
    )
    .await;
    // The buffer, what QUIC may hold for a session before the aggregator
    // reads it (the transport's 16 MiB connection receive window), and a
    // frame being read plus one being decoded.
    const QUIC_CONNECTION_WINDOW: u64 = 16 * MIB;
    let bound = CAPACITY + QUIC_CONNECTION_WINDOW + 2 * MAX_FRAME;
    let why = "buffer.capacity + QUIC connection window + 2 x max_frame_size";
    const FRAMES: u64 = 8;
    let th = now_s() - 3000;
    let port = agg.ingest;
    let what = under_attack("hostile_deep_stacks", &agg, bound, why, async move {
        let sent = tokio::task::spawn_blocking(move || {
            let config = aperture_transport::client::ClientConfig { token: Some(TOKEN.into()), ..client_config(port) };
            let identity = AgentIdentity {
                agent_id: AgentId([0xb1; 16]),
                boot_id: BootId([1; 16]),
                node: "hostile".into(),
                agent_version: "fault".into(),
            };
            let client = Client::start(config, identity.clone()).expect("client");
            let mut bytes = 0;
            for seq in 1..=FRAMES {
                let id = FrameId { agent_id: identity.agent_id, boot_id: identity.boot_id, sequence: seq };
                let frame =
                    encode_batch(&hostile_batch(th + seq % 5), id, 0, &DecodeLimits::default()).expect("encode");
                bytes = frame.len();
                client.send(frame).expect("send");
                // A few at a time: the agent's own buffer holds only a
                // handful of near-maximal frames.
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while client.stats().session.frames_acked + 2 < seq
                    || (seq == FRAMES && client.stats().session.frames_acked < FRAMES)
                {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "hostile frames not acknowledged: {:?}",
                        client.stats()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            assert_eq!(client.stats().session.frames_dropped, 0, "the hostile agent dropped nothing itself");
            bytes
        })
        .await
        .expect("hostile agent");
        format!("deep_frames={FRAMES} deep_frame_bytes={sent}")
    })
    .await;
    // The hostile range: stored, cut, saturated, and queryable (folded:
    // the JSON tree of a 1024-deep stack is deeper than the test's parser goes).
    let folded = |mode: &'static str| {
        let path = format!("/api/v1/profile?mode={mode}&format=folded&from={}&to={}", th - 20, th + 20);
        let agg = &agg;
        async move {
            let r = tokio::time::timeout(LIVE, agg.get(&path)).await.expect("a query over the hostile range answers");
            assert_eq!(r.status, 200, "{}", r.text());
            let text = r.text();
            let lines: Vec<(usize, u64)> = text
                .lines()
                .filter_map(|l| l.rsplit_once(' '))
                .map(|(stack, n)| (stack.split(';').count(), n.parse().expect("folded count")))
                .collect();
            lines
        }
    };
    let cpu = folded("cpu").await;
    assert_eq!(cpu.iter().map(|l| l.1).sum::<u64>(), FRAMES * u64::from(u32::MAX), "every deep frame's samples");
    assert!(cpu.iter().all(|l| l.0 <= 1024 + 2), "stacks cut to limits.max_stack_frames: {:?}", cpu);
    let locks = folded("lock").await;
    assert_eq!(locks.iter().map(|l| l.1).collect::<Vec<_>>(), vec![u64::MAX], "lock counts saturate");
    let cpu = cpu.iter().map(|l| l.1).sum::<u64>();
    let truncated = scrape(&agg, "aperture_ingress_stacks_truncated_total", &[]).await;
    crate::oracle::report(&format!("fault: hostile_deep_stacks {what} stacks_truncated={truncated} cpu_stored={cpu}"));
    assert!(truncated >= 1.0, "deep stacks are cut and counted");
}

/// Authenticated sessions that send a frame one byte over
/// `limits.max_frame_size`: each is refused from its header, before its
/// payload is read or allocated, and the session closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_hostile_oversized_frames() {
    let Some(bin) = aperture_bin("fault_hostile_oversized_frames") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    const MAX_FRAME: u64 = MIB;
    const ATTACKERS: u32 = 128;
    let agg =
        hostile_aggregator(bin, dir.path(), &format!("limits:\n  max_frame_size: {}MiB\n", MAX_FRAME / MIB)).await;
    // Were each oversized frame buffered, 128 of them would hold 128 MiB.
    let bound = 16 * MAX_FRAME;
    let why = "16 x max_frame_size";
    let addr = SocketAddr::from(([127, 0, 0, 1], agg.ingest));
    let what = under_attack("hostile_oversized_frames", &agg, bound, why, async move {
        let (endpoint, config) = quic_client();
        // One byte over: header and payload together are max_frame_size + 1.
        let payload = u32::try_from(MAX_FRAME).expect("small") + 1 - HEADER_LEN as u32;
        let mut frame = header_announcing(payload);
        frame.resize(HEADER_LEN + payload as usize, 0);
        let frame = Arc::new(frame);
        let closed = Arc::new(AtomicU64::new(0));
        for wave in 0..ATTACKERS / 16 {
            let mut tasks = Vec::new();
            for i in 0..16 {
                let (endpoint, config, frame, closed) =
                    (endpoint.clone(), config.clone(), Arc::clone(&frame), Arc::clone(&closed));
                tasks.push(tokio::spawn(async move {
                    let conn = endpoint.connect_with(config, addr, "localhost").ok()?.await.ok()?;
                    let (mut send, _recv) = conn.open_bi().await.ok()?;
                    send.write_all(&hello(wave * 16 + i + 2, TOKEN)).await.ok()?;
                    let _ = tokio::time::timeout(Duration::from_secs(10), send.write_all(&frame)).await;
                    tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.ok()?;
                    closed.fetch_add(1, Ordering::Relaxed);
                    Some(())
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        format!("oversized_sessions={ATTACKERS} closed_by_server={}", closed.load(Ordering::Relaxed))
    })
    .await;
    let received = scrape(&agg, "aperture_transport_frames_received_total", &[]).await;
    crate::oracle::report(&format!("fault: hostile_oversized_frames {what} transport_frames_received={received}"));
    assert!(what.ends_with(&format!("closed_by_server={ATTACKERS}")), "every oversized session is closed: {what}");
}
