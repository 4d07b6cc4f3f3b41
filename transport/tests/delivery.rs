//! Delivery over real QUIC and gRPC on loopback: byte-for-byte frames,
//! resend of exactly the unacknowledged frames after a reconnect, no
//! acknowledged frame lost across a server restart, fallback to gRPC.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aperture_transport::Carrier;
use aperture_transport::client::CarrierChoice;
use common::*;

async fn frames_arrive_byte_for_byte(carrier: Carrier) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    let client = start_client(client_config(&server, carrier, Some(TOKEN)), 1);
    let sent: Vec<_> = (1..=20).map(|seq| frame(1, seq)).collect();
    for f in &sent {
        client.send(f.clone()).unwrap();
    }
    eventually("20 frames admitted", || sink.count() == 20).await;
    let seen = sink.seen.lock().unwrap().clone();
    for (s, f) in seen.iter().zip(&sent) {
        assert_eq!(s.bytes, f.as_slice(), "frame {} differs", s.id.sequence);
        assert_eq!(s.carrier, carrier);
    }
    sink.commit_all(&server.acker());
    eventually("all acked", || client.stats().session.frames_acked == 20).await;
    let stats = client.stats();
    assert_eq!(stats.carrier, Some(carrier));
    assert_eq!((stats.session.unacked_frames, stats.session.frames_dropped, stats.session.frames_resent), (0, 0, 0));
    let report = tokio::task::block_in_place(|| client.shutdown(Duration::from_secs(5)));
    assert_eq!(report.acked, 20);
    assert!(report.unacked.is_empty());
    let s = server.stats();
    assert_eq!((s.frames_received, s.frames_queued, s.frames_acked), (20, 20, 20));
    assert_eq!(s.bytes_received, sent.iter().map(|f| f.len() as u64).sum::<u64>());
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_delivers_frames_byte_for_byte() {
    frames_arrive_byte_for_byte(Carrier::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_delivers_frames_byte_for_byte() {
    frames_arrive_byte_for_byte(Carrier::Grpc).await;
}

/// Sends 1..=10, commits some, restarts the server, and checks that the new
/// server sees exactly the uncommitted frames, in order, and that every
/// frame ends up committed once.
async fn restart_resends_exactly_the_unacked(carrier: Carrier) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    let (quic, grpc) = (server.quic_addr(), server.grpc_addr());
    let client = start_client(client_config(&server, carrier, Some(TOKEN)), 2);
    for seq in 1..=10 {
        client.send(frame(2, seq)).unwrap();
    }
    eventually("10 frames admitted", || sink.count() == 10).await;
    sink.commit(&server.acker(), &[1, 2, 5, 9]);
    eventually("4 acked", || client.stats().session.frames_acked == 4).await;
    // Frames acked so far must never be asked for again.
    let acked_before: Vec<u64> = vec![1, 2, 5, 9];

    server.shutdown(Duration::from_secs(2)).await;
    *sink.generation.lock().unwrap() = 1;
    let mut cfg = server_config(dir.path());
    cfg.quic_listen = quic;
    cfg.grpc_listen = grpc;
    let server = start(cfg, sink.clone()).await;
    // New frames while reconnecting.
    for seq in 11..=12 {
        client.send(frame(2, seq)).unwrap();
    }
    eventually("resent and new frames admitted", || sink.count() == 10 + 8).await;
    let after: Vec<u64> =
        sink.seen.lock().unwrap().iter().filter(|s| s.generation == 1).map(|s| s.id.sequence).collect();
    assert_eq!(after, vec![3, 4, 6, 7, 8, 10, 11, 12], "exactly the unacked frames, in order, then new ones");
    assert!(acked_before.iter().all(|s| !after.contains(s)));
    sink.commit_all(&server.acker());
    eventually("everything acked", || client.stats().session.unacked_frames == 0).await;
    let stats = client.stats();
    assert_eq!(stats.session.frames_acked, 12);
    assert!(stats.reconnects >= 1);
    assert_eq!(sink.committed.lock().unwrap().len(), 12, "every frame committed once");
    let report = tokio::task::block_in_place(|| client.shutdown(Duration::from_secs(5)));
    assert!(report.unacked.is_empty());
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_restart_resends_exactly_the_unacked_frames() {
    restart_resends_exactly_the_unacked(Carrier::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_restart_resends_exactly_the_unacked_frames() {
    restart_resends_exactly_the_unacked(Carrier::Grpc).await;
}

/// Committed but unacknowledged when the server died: the resend is
/// recognised and acknowledged without being taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_frames_resent_after_restart_are_acked_not_reingested() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    let (quic, grpc) = (server.quic_addr(), server.grpc_addr());
    let client = start_client(client_config(&server, Carrier::Quic, Some(TOKEN)), 3);
    for seq in 1..=5 {
        client.send(frame(3, seq)).unwrap();
    }
    eventually("5 frames admitted", || sink.count() == 5).await;
    // Committed to storage, but the server stops before acking.
    let ids: Vec<_> = sink.seen.lock().unwrap().iter().map(|s| s.id).collect();
    sink.committed.lock().unwrap().extend(ids);
    server.shutdown(Duration::from_secs(2)).await;
    let mut cfg = server_config(dir.path());
    cfg.quic_listen = quic;
    cfg.grpc_listen = grpc;
    let server = start(cfg, sink.clone()).await;
    eventually("resends acked", || client.stats().session.frames_acked == 5).await;
    assert_eq!(sink.count(), 5, "nothing taken twice");
    assert_eq!(sink.already_committed.lock().unwrap().len(), 5);
    assert_eq!(server.stats().frames_already_committed, 5);
    tokio::task::block_in_place(|| client.shutdown(Duration::from_secs(5)));
    server.shutdown(Duration::from_secs(2)).await;
}

/// Nothing on UDP: the client falls back to gRPC on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_quic_falls_back_to_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.quic_listen = None;
    let server = start(cfg, sink.clone()).await;
    let mut ccfg = client_config(&server, Carrier::Quic, Some(TOKEN));
    ccfg.carrier = CarrierChoice::Auto;
    ccfg.quic_port = None; // same port as gRPC, where nothing listens on UDP
    ccfg.connect_timeout_ms = 300;
    ccfg.quic_attempts_before_fallback = 2;
    let client = start_client(ccfg, 4);
    for seq in 1..=3 {
        client.send(frame(4, seq)).unwrap();
    }
    eventually("frames delivered over gRPC", || sink.count() == 3).await;
    assert!(sink.seen.lock().unwrap().iter().all(|s| s.carrier == Carrier::Grpc));
    sink.commit_all(&server.acker());
    eventually("acked", || client.stats().session.frames_acked == 3).await;
    let stats = client.stats();
    assert_eq!(stats.carrier, Some(Carrier::Grpc));
    assert!(stats.fallbacks_to_grpc >= 1);
    assert!(stats.connect_failures_quic >= 2);
    tokio::task::block_in_place(|| client.shutdown(Duration::from_secs(5)));
    server.shutdown(Duration::from_secs(2)).await;
}

/// The aggregator above its high-water mark withholds credit: the client
/// stops after its window and resumes when credit is granted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withheld_credit_pauses_and_resumes_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.limits.credit_frames = 4;
    let server = start(cfg, sink.clone()).await;
    server.set_accepting(false);
    let client = start_client(client_config(&server, Carrier::Quic, Some(TOKEN)), 5);
    for seq in 1..=10 {
        client.send(frame(5, seq)).unwrap();
    }
    eventually("the session is established", || client.stats().established).await;
    // No wall-clock assertion: a session opened while the server takes
    // nothing is welcomed without credit, so the client cannot have sent
    // anything, whatever the scheduling.
    assert_eq!(client.stats().session.frames_sent, 0);
    assert_eq!(sink.count(), 0);
    server.set_accepting(true);
    eventually("the rest arrives", || sink.count() == 10).await;
    tokio::task::block_in_place(|| drop(client));
    server.shutdown(Duration::from_secs(2)).await;
}

/// A frame larger than the server takes (its welcome says how large) is not
/// sent: it is dropped and counted, the session goes on, and it is not
/// offered again on the next connection.
async fn frames_above_the_servers_limit_are_dropped(carrier: Carrier) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    let small = frame(1, 1).len();
    let big = frame_with(1, 2, 4_000);
    assert!(big.len() > small * 2);
    cfg.limits.max_frame_bytes = (small * 2) as u32;
    let server = start(cfg, sink.clone()).await;
    let client = start_client(client_config(&server, carrier, Some(TOKEN)), 1);
    client.send(frame(1, 1)).unwrap();
    client.send(big).unwrap();
    client.send(frame(1, 3)).unwrap();
    eventually("the small frames arrive", || sink.count() == 2).await;
    assert_eq!(sink.seen_sequences(), vec![1, 3]);
    sink.commit_all(&server.acker());
    eventually("acked", || client.stats().session.frames_acked == 2).await;
    let stats = client.stats();
    assert_eq!(stats.session.frames_dropped_oversized, 1, "{stats:?}");
    assert_eq!((stats.session.unacked_frames, stats.reconnects), (0, 0), "{stats:?}");
    let s = server.stats();
    assert_eq!((s.decode_errors_total(), s.sessions_opened), (0, 1), "{s:?}");
    tokio::task::block_in_place(|| drop(client));
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_frames_above_the_servers_limit_are_dropped() {
    frames_above_the_servers_limit_are_dropped(Carrier::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frames_above_the_servers_limit_are_dropped() {
    frames_above_the_servers_limit_are_dropped(Carrier::Grpc).await;
}
