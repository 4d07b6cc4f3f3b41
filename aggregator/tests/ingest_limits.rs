//! Hostile or oversized input at the ingress: the shards decode with the
//! configured frame limit, deep stacks are cut and counted, and lying stack
//! hashes are rejected and counted.

mod common;

use std::time::{Duration, Instant};

use aperture_aggregator::Aggregator;
use aperture_aggregator::store::{LabelFilter, Selector};
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};
use aperture_core::shard::RowKind;
use common::http::get;
use common::{acks, batch, cpu_total, frame_id, metric, now_s, push};

async fn wait_metric(addr: std::net::SocketAddr, name: &str, labels: &[&str], want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = get(addr, "/metrics").await.text();
        if metric(&m, name, labels) >= want {
            return m;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} never reached {want}:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn deep_batch(time_s: u64, depth: usize) -> Batch {
    let frames = (0..depth).map(|i| StackFrame { symbol: format!("f{i}"), module: "app".into(), ..Default::default() });
    Batch {
        node: "n1".into(),
        targets: vec![Target { pid: 1, process: "deep".into(), ..Default::default() }],
        stacks: vec![Stack::new(frames.collect())],
        cpu: vec![CpuSample { time_ns: time_s * 1_000_000_000, target: 0, stack: 0, count: 7, period_ns: 1 }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_decode_with_the_configured_frame_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.max_frame_bytes = 2048;
    let handle = Aggregator::start(settings).await.expect("start");
    let acks = acks(&handle);
    let addr = handle.http_addr();
    let t0 = now_s() - 600;
    let ingress = handle.ingress();
    // About 20 KiB: over the configured 2 KiB, well under the default 4 MiB.
    let big = frame_id(2, 1, 1);
    tokio::task::spawn_blocking(move || push(&ingress, big, &deep_batch(t0, 300))).await.expect("push");
    wait_metric(addr, "aperture_ingress_frames_total", &["result=\"rejected\""], 1.0).await;
    // Rejected frames are acknowledged (resending cannot help) and never stored.
    let a = acks.clone();
    tokio::task::spawn_blocking(move || a.wait_for(&[big], Duration::from_secs(30))).await.expect("ack");
    assert_eq!(cpu_total(addr, t0 - 20, t0 + 20).await, 0);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_stacks_are_cut_and_lying_hashes_rejected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let handle = Aggregator::start(common::settings(dir.path())).await.expect("start");
    let acks = acks(&handle);
    let addr = handle.http_addr();
    let t0 = now_s() - 600;
    let ingress = handle.ingress();
    let mut lying = batch("n1", t0);
    lying.stacks[0].hash = lying.stacks[1].hash;
    let ids = [frame_id(3, 1, 1), frame_id(3, 1, 2)];
    tokio::task::spawn_blocking(move || {
        push(&ingress, ids[0], &deep_batch(t0, 5000));
        push(&ingress, ids[1], &lying);
    })
    .await
    .expect("push");
    let a = acks.clone();
    tokio::task::spawn_blocking(move || a.wait_for(&ids, Duration::from_secs(30))).await.expect("acks");
    let m = wait_metric(addr, "aperture_ingress_stacks_truncated_total", &[], 1.0).await;
    assert_eq!(metric(&m, "aperture_ingress_stack_frames_cut_total", &[]), (5000 - 1023) as f64);
    assert_eq!(metric(&m, "aperture_ingress_frames_total", &["result=\"rejected\""]), 1.0, "the lying frame");
    // The deep stack's samples are stored; the lying frame's are not. (Read
    // from the store: the query layer's tree builders are not what is tested.)
    let store = handle.store();
    let sel = Selector { from_s: t0 - 20, to_s: t0 + 20, filter: LabelFilter::default() };
    let totals = store.stack_totals(RowKind::Cpu, &sel).await.expect("totals");
    assert_eq!(totals.iter().map(|t| t.count).sum::<u64>(), 7, "{totals:?}");
    let deep = deep_batch(t0, 5000).stacks[0].clone();
    let stored = store.stacks(&[deep.hash]).await.expect("stacks");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].frames.len(), 1024);
    assert_eq!(stored[0].frames[..1023], deep.frames[..1023]);
    assert_eq!(stored[0].frames[1023].symbol, "[3977 frames truncated]");
    handle.shutdown().await.expect("shutdown");
}
