//! Two aggregator replicas on one ClickHouse database: an agent moves from
//! one to the other (the first killed mid-stream) and resends; nothing is
//! counted twice, nothing acknowledged is lost.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use aperture_aggregator::{Aggregator, ClickHouseSettings};
use aperture_core::frame::FrameId;
use common::{Taken, acks, batch, cpu_total, frame_id, now_s, push};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_clickhouse_do_not_double_count() {
    let Some(server) = tokio::task::spawn_blocking(|| {
        aperture_testkit::clickhouse::start_or_skip("two_replicas_on_one_clickhouse_do_not_double_count")
    })
    .await
    .expect("start server") else {
        return;
    };
    let settings = |dir: &std::path::Path| {
        let mut s = common::settings(dir);
        let mut ch = ClickHouseSettings::new(server.endpoint());
        ch.database = "replicas".into();
        s.clickhouse = Some(ch);
        s
    };
    let (dir_a, dir_b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    // Both start before anything is committed: B's ledger loaded at start is empty.
    let a = Aggregator::start(settings(dir_a.path())).await.expect("start A");
    let b = Aggregator::start(settings(dir_b.path())).await.expect("start B");
    let acks_a = acks(&a);
    let acks_b = acks(&b);
    let t0 = now_s() - 600;
    const FRAMES: u64 = 120;
    let ids: Vec<FrameId> = (1..=FRAMES).map(|s| frame_id(4, 2, s)).collect();

    // The agent talks to A until 60 frames are acknowledged; A is then killed.
    let ingress = a.ingress();
    let early = ids[..60].to_vec();
    let wait = acks_a.clone();
    tokio::task::spawn_blocking(move || {
        for seq in 1..=80 {
            push(&ingress, frame_id(4, 2, seq), &batch("n1", t0 + seq));
        }
        wait.wait_for(&early, Duration::from_secs(60));
    })
    .await
    .expect("push to A");
    let acked_by_a: HashSet<FrameId> = acks_a.set();
    a.abort();

    // It moves to B and resends everything from frame 1.
    let ingress = b.ingress();
    let outcomes = tokio::task::spawn_blocking(move || {
        (1..=FRAMES).map(|seq| push(&ingress, frame_id(4, 2, seq), &batch("n1", t0 + seq))).collect::<Vec<_>>()
    })
    .await
    .expect("push to B");
    for (id, taken) in ids.iter().zip(&outcomes) {
        if acked_by_a.contains(id) {
            assert_eq!(*taken, Taken::AlreadyCommitted, "frame {} was committed by A", id.sequence);
        }
    }
    let pending: Vec<FrameId> =
        ids.iter().zip(&outcomes).filter(|(_, t)| **t == Taken::Queued).map(|(id, _)| *id).collect();
    let wait = acks_b.clone();
    tokio::task::spawn_blocking(move || wait.wait_for(&pending, Duration::from_secs(60))).await.expect("acks");
    assert_eq!(cpu_total(b.http_addr(), t0 - 20, t0 + FRAMES + 1).await, FRAMES * 5, "every frame exactly once");
    b.shutdown().await.expect("shutdown");
    drop(server);
}
