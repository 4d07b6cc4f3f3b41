//! Frames the sink refuses as busy stay within `limits.parked_bytes` however
//! many sessions push at once, and none is lost. Many clients each send more
//! than the server can park to a sink that takes nothing; with per-session
//! credit only, the server held every session's whole credit (sessions ×
//! `credit_frames` frames). Sessions whose frames do not fit are closed;
//! their clients keep the frames and send them again once the sink takes
//! frames, and every frame of every client is acknowledged.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aperture_core::frame::FrameId;
use aperture_transport::Carrier;
use aperture_transport::client::Client;
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, serve};
use common::*;

/// Refuses every frame as busy until opened; then takes each frame once and
/// has it acknowledged.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    busy_answers: AtomicU64,
    /// Frame → times it was queued (more than once would double count).
    queued: Mutex<HashMap<FrameId, u32>>,
    to_ack: Mutex<Vec<FrameId>>,
}

impl IngressSink for Gate {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        if !self.open.load(Relaxed) {
            self.busy_answers.fetch_add(1, Relaxed);
            return Admission::Busy(frame);
        }
        let id = frame.header.id;
        let mut queued = self.queued.lock().unwrap();
        let n = queued.entry(id).or_default();
        *n += 1;
        if *n > 1 {
            return Admission::AlreadyCommitted;
        }
        self.to_ack.lock().unwrap().push(id);
        Admission::Queued
    }
}

const SESSIONS: u8 = 60;
/// Within the session's credit (64 frames): each client offers all of them.
const FRAMES: u64 = 40;
const PARKED: u64 = 64 << 10;

async fn overload(carrier: Carrier) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    match carrier {
        Carrier::Quic => cfg.grpc_listen = None,
        Carrier::Grpc => cfg.quic_listen = None,
    }
    cfg.limits.max_frame_bytes = 16 << 10;
    cfg.limits.parked_bytes = PARKED;
    cfg.limits.busy_retry_ms = 20;
    let sink = Arc::new(Gate::default());
    let server = serve(cfg, sink.clone()).await.unwrap();
    let frame_len = frame(1, 1).len() as u64;
    assert!(u64::from(SESSIONS) * FRAMES * frame_len > 8 * PARKED, "the scenario exceeds the bound without it");
    let clients: Vec<Client> = (1..=SESSIONS)
        .map(|boot| {
            let client = start_client(client_config(&server, carrier, Some(TOKEN)), boot);
            for seq in 1..=FRAMES {
                client.send(frame(boot, seq)).unwrap();
            }
            client
        })
        .collect();
    eventually("sessions closed as overloaded", || server.stats().sessions_overloaded >= u64::from(SESSIONS)).await;
    let stats = server.stats();
    assert!(stats.parked_bytes_peak <= PARKED, "parked {} bytes > parked_bytes {PARKED}", stats.parked_bytes_peak);
    assert!(stats.parked_bytes_peak >= frame_len, "frames were parked: {stats:?}");
    assert!(stats.sessions_closed.get("overloaded").copied().unwrap_or(0) >= u64::from(SESSIONS), "{stats:?}");

    // The sink takes frames again: everything is delivered, once.
    sink.open.store(true, Relaxed);
    let acking = {
        let sink = Arc::clone(&sink);
        AckLoop::start(server.acker(), move || std::mem::take(&mut *sink.to_ack.lock().unwrap()))
    };
    eventually("every frame acknowledged", || clients.iter().all(|c| c.stats().session.frames_acked >= FRAMES)).await;
    acking.stop();
    let mut per_client: HashMap<_, u64> = HashMap::new();
    for id in sink.queued.lock().unwrap().keys() {
        *per_client.entry(id.boot_id).or_default() += 1;
    }
    assert_eq!(per_client.len(), usize::from(SESSIONS));
    assert!(per_client.values().all(|n| *n == FRAMES), "every frame of every client queued: {per_client:?}");
    assert_eq!(server.stats().parked_bytes, 0, "nothing stays parked");
    for c in &clients {
        let s = c.stats().session;
        assert_eq!(s.frames_dropped, 0, "no client dropped a frame: {s:?}");
    }
    // Each client waits a little for its connection to close: all at once.
    tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            for c in clients {
                scope.spawn(move || drop(c));
            }
        });
    });
    server.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_frames_stay_within_parked_bytes_across_many_grpc_sessions() {
    overload(Carrier::Grpc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_frames_stay_within_parked_bytes_across_many_quic_sessions() {
    overload(Carrier::Quic).await;
}
