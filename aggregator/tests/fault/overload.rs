//! Many agents against an aggregator whose store is frozen, each sending
//! frames as agents do while their store is down, more in all than the
//! aggregator may hold. What the pipeline refuses as busy is held within
//! `limits.max_parked_size`, agents beyond it are disconnected and keep their
//! frames, so the aggregator's RSS stays under a bound that does not grow
//! with what the agents send; once the store is back every frame is stored
//! exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{Batch, CpuSample};
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};

use crate::common::{batch, now_s};
use crate::oracle::{Conservation, cpu_total, report, scrape};
use crate::process::{aggregator, aperture_bin, clickhouse_or_skip, client_config, config_args, rss_bytes};

const MIB: u64 = 1024 * 1024;
const AGENTS: u8 = 48;
/// Frames each agent sends during the outage, one every [`SEND_EVERY`]:
/// within the session's credit (64 frames), so without a shared bound the
/// aggregator would hold them all.
const FRAMES: u64 = 48;
const SEND_EVERY: Duration = Duration::from_millis(250);
/// CPU samples per frame on top of [`batch`]'s: frames of about 100 KB.
const EXTRA_SAMPLES: u64 = 4_000;
const PARKED: u64 = 4 * MIB;
const CAPACITY: u64 = MIB;
/// What each connected agent may cost the aggregator besides its frames
/// (TLS and QUIC or HTTP/2 state, buffers), generously.
const PER_AGENT: u64 = MIB / 2;
/// Allocator and runtime slack.
const SLACK: u64 = 24 * MIB;

fn big_batch(time_s: u64) -> Batch {
    let mut b = batch("n1", time_s);
    let t = time_s * 1_000_000_000;
    b.cpu.extend((0..EXTRA_SAMPLES).map(|i| CpuSample {
        time_ns: t + i,
        target: (i % 2) as u32,
        stack: (i % 2) as u32,
        count: 1,
        period_ns: 10_000_000,
    }));
    b
}

/// Samples in one [`big_batch`] frame, as `cpu_total` counts them.
fn samples_per_frame() -> u64 {
    big_batch(0).cpu.iter().map(|s| u64::from(s.count)).sum()
}

fn agent_config(ingest: u16, carrier: CarrierChoice) -> ClientConfig {
    ClientConfig { carrier, ..client_config(ingest) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_many_agents_store_frozen() {
    let Some(bin) = aperture_bin("fault_many_agents_store_frozen") else { return };
    let Some(server) = clickhouse_or_skip("fault_many_agents_store_frozen").await else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let yaml = format!(
        "buffer:\n  capacity: {}MiB\n  high_water_percent: 50\nlimits:\n  max_frame_size: 1MiB\n  max_parked_size: {}MiB\n",
        CAPACITY / MIB,
        PARKED / MIB
    );
    let mut args = config_args(dir.path(), &yaml);
    args.extend(["--clickhouse-endpoint".into(), server.endpoint()]);
    let mut agg = aggregator(bin, args, dir.path());
    agg.start();
    agg.wait_healthy().await;
    let t0 = now_s() - 600;

    // Half the agents on each carrier, connected before the store freezes.
    let clients: Vec<Arc<Client>> = (0..AGENTS)
        .map(|i| {
            let carrier = if i % 2 == 0 { CarrierChoice::Quic } else { CarrierChoice::Grpc };
            let identity = AgentIdentity {
                agent_id: AgentId([0x40 + i; 16]),
                boot_id: BootId([0x17; 16]),
                node: "n1".into(),
                agent_version: "fault".into(),
            };
            Arc::new(Client::start(agent_config(agg.ingest, carrier), identity).expect("client"))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !clients.iter().all(|c| c.stats().established) {
        assert!(Instant::now() < deadline, "agents connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = agg.pid();
    let before = rss_bytes(pid);

    server.pause();
    // Every agent sends a frame every 250 ms for 12 s, as agents do while
    // their store is down: without a shared bound the aggregator would keep
    // them all.
    let frame_len = encode_batch(
        &big_batch(t0),
        FrameId { agent_id: AgentId([0x40; 16]), boot_id: BootId([0x17; 16]), sequence: 1 },
        0,
        &DecodeLimits::default(),
    )
    .expect("encode")
    .len() as u64;
    let senders: Vec<_> = (0..AGENTS)
        .map(|i| {
            let c = Arc::clone(&clients[usize::from(i)]);
            std::thread::spawn(move || {
                for seq in 1..=FRAMES {
                    let id = FrameId { agent_id: AgentId([0x40 + i; 16]), boot_id: BootId([0x17; 16]), sequence: seq };
                    let f = encode_batch(&big_batch(t0 + seq), id, 0, &DecodeLimits::default()).expect("encode");
                    c.send(f).expect("send");
                    std::thread::sleep(SEND_EVERY);
                }
            })
        })
        .collect();
    let unbounded = u64::from(AGENTS) * FRAMES * frame_len;
    let bound = CAPACITY + PARKED + u64::from(AGENTS) * PER_AGENT + SLACK;
    assert!(unbounded > 2 * bound, "the scenario exceeds the bound without max_parked_size");
    let mut peak = before;
    let mut parked_peak = 0.0_f64;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_bytes(pid));
        parked_peak = parked_peak.max(scrape(&agg, "aperture_transport_parked_bytes", &[]).await);
    }
    for t in senders {
        t.join().expect("sender");
    }
    let overloaded = scrape(&agg, "aperture_transport_sessions_closed_total", &["reason=\"overloaded\""]).await;
    server.unpause();

    let deadline = Instant::now() + Duration::from_secs(120);
    while !clients.iter().all(|c| c.stats().session.frames_acked >= FRAMES) {
        assert!(Instant::now() < deadline, "every frame acknowledged after the store came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped: u64 = clients.iter().map(|c| c.stats().session.frames_dropped).sum();
    let sent = u64::from(AGENTS) * FRAMES;
    let stored = cpu_total(&agg, t0 - 20, t0 + 400).await / samples_per_frame();
    let c = Conservation { sent, stored, restarts: 0 };
    let growth = peak.saturating_sub(before);
    c.report_with(
        "many_agents_store_frozen",
        &format!(
            " agents={AGENTS} frame_bytes={frame_len} offered_bytes={unbounded} rss_growth={growth} \
             rss_bound={bound} parked_peak={parked_peak} sessions_overloaded={overloaded}"
        ),
    );
    report(&format!("fault: many_agents_store_frozen rss_before={before} rss_peak={peak}"));
    assert_eq!(dropped, 0, "no agent dropped a frame");
    assert_eq!((c.lost(), c.duplicated()), (0, 0));
    assert!(parked_peak <= PARKED as f64, "parked bytes above limits.max_parked_size: {parked_peak}");
    assert!(overloaded >= 1.0, "agents beyond the parking space were disconnected");
    assert!(
        growth < bound,
        "RSS grew by {growth} bytes with the store frozen, bound {bound} (capacity + max_parked_size + agents x {PER_AGENT} + {SLACK})"
    );
    for c in clients {
        if let Ok(client) = Arc::try_unwrap(c) {
            tokio::task::spawn_blocking(move || drop(client.shutdown(Duration::from_secs(1)))).await.expect("shutdown");
        }
    }
    drop(server);
}
