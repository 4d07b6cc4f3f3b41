//! Store failures are the store being down, never bad data: nothing is
//! acknowledged or dropped while the store cannot take writes, `/readyz`
//! and `aperture_store_up` say so, and once the store is back every frame is
//! stored exactly once.

mod common;

use std::time::{Duration, Instant};

use aperture_aggregator::{Admission, Aggregator, IngressSink};
use aperture_core::frame::FrameId;
use common::http::get;
use common::{acks, batch, cpu_total, frame, frame_id, metric, now_s, push};

/// The SQLite file is overwritten with garbage while the aggregator runs.
/// Writes fail with "file is not a database"; the frames that arrive stay
/// unacknowledged and buffered until the ingress pushes back. The file is
/// then put back (as an operator restoring a backup would) and the agent
/// resends: everything is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_file_replaced_by_garbage_is_an_outage_not_a_loss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.buffer_capacity_bytes = 64 * 1024;
    settings.high_water_percent = 50;
    let t0 = now_s() - 600;
    let db = dir.path().join("aperture.db");

    let first = Aggregator::start(settings.clone()).await.expect("start");
    let acks_first = acks(&first);
    let addr = first.http_addr();
    let ingress = first.ingress();
    let id1 = frame_id(5, 1, 1);
    push(&ingress, id1, &batch("n1", t0));
    let a = acks_first.clone();
    tokio::task::spawn_blocking(move || a.wait_for(&[id1], Duration::from_secs(60))).await.expect("ack");
    // Wait for the write to settle, then keep a copy of the good files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let backup: Vec<(std::path::PathBuf, Vec<u8>)> = ["aperture.db", "aperture.db-wal", "aperture.db-shm"]
        .iter()
        .map(|n| dir.path().join(n))
        .filter(|p| p.exists())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read store file");
            (p, bytes)
        })
        .collect();
    for (path, bytes) in &backup {
        // In place, as a failing disk or a stray writer would.
        std::fs::write(path, vec![0x5a; bytes.len().max(4096)]).expect("overwrite");
    }
    let _ = &db;

    // The agent keeps offering frames 2.. until the ingress pushes back.
    let mut offered: Vec<FrameId> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seq = 1;
    loop {
        seq += 1;
        let id = frame_id(5, 1, seq);
        match ingress.admit(frame(id, &batch("n1", t0 + seq))) {
            Admission::Busy(_) => break,
            _ => offered.push(id),
        }
        assert!(Instant::now() < deadline, "the ingress never pushed back while the store was broken");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The store is reported down, readiness fails, nothing new is acknowledged or rejected.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = get(addr, "/metrics").await.text();
        if metric(&m, "aperture_store_up", &[]) == 0.0 {
            assert_eq!(metric(&m, "aperture_writer_rows_rejected_total", &[]), 0.0, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "aperture_store_up stayed 1 with a broken store file");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = get(addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("sqlite unreachable"), "{}", ready.text());
    let acked = acks_first.set();
    assert!(offered.iter().all(|f| !acked.contains(f)), "a frame was acknowledged but the store cannot hold it");
    assert!(first.buffered_bytes() > 0, "the frames must still be held");
    first.abort();

    // The file comes back; the agent resends what was not acknowledged.
    for (path, bytes) in &backup {
        std::fs::write(path, bytes).expect("restore");
    }
    let second = Aggregator::start(settings).await.expect("restart on the restored file");
    let acks_second = acks(&second);
    let addr = second.http_addr();
    let ingress = second.ingress();
    let resend = offered.clone();
    tokio::task::spawn_blocking(move || {
        for id in resend {
            push(&ingress, id, &batch("n1", t0 + id.sequence));
        }
    })
    .await
    .expect("resend");
    let a = acks_second.clone();
    let want = offered.clone();
    tokio::task::spawn_blocking(move || a.wait_for(&want, Duration::from_secs(60))).await.expect("acks");
    let frames = offered.len() as u64 + 1;
    assert_eq!(cpu_total(addr, t0 - 20, t0 + frames + 10).await, frames * 5, "every frame exactly once");
    second.shutdown().await.expect("shutdown");
}
