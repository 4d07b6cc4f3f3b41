//! Acknowledgements reach a busy client while it is still writing: several
//! QUIC clients each queue more frames than the connection carries at once,
//! an acking sink commits every frame it takes, and every client must take
//! in acks before it has handed its last frame to the connection. A client
//! that read the server's messages only between writes saw its first ack
//! only after the whole queue was written: under many agents, acks starved
//! behind data (seconds late, or none within a run).

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aperture_core::frame::FrameId;
use aperture_transport::Carrier;
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame};
use common::*;

/// Takes every frame; a thread acknowledges what was taken.
#[derive(Default)]
struct AckingSink {
    pending: Mutex<Vec<FrameId>>,
}

impl IngressSink for AckingSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        self.pending.lock().unwrap().push(frame.header.id);
        Admission::Queued
    }
}

const CLIENTS: u8 = 4;
/// Frames each client queues at once: within the session's credit (64
/// frames, 32 MiB), several times what QUIC lets a client have in flight.
const FRAMES: u64 = 24;
/// Samples per frame: about half a megabyte.
const SAMPLES: u64 = 16_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_clients_take_acks_while_their_queue_is_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AckingSink::default());
    let server = match aperture_transport::server::serve(server_config(dir.path()), sink.clone()).await {
        Ok(s) => s,
        Err(e) => panic!("server starts: {e}"),
    };
    let acking = {
        let sink = Arc::clone(&sink);
        AckLoop::start(server.acker(), move || std::mem::take(&mut *sink.pending.lock().unwrap()))
    };
    let clients: Vec<_> =
        (1..=CLIENTS).map(|boot| start_client(client_config(&server, Carrier::Quic, Some(TOKEN)), boot)).collect();
    eventually("every client connected", || clients.iter().all(|c| c.stats().established)).await;
    let frames: Vec<Vec<_>> =
        (1..=CLIENTS).map(|boot| (1..=FRAMES).map(|seq| frame_with(boot, seq, SAMPLES)).collect()).collect();
    assert!(
        frames[0][0].len() > 256 << 10,
        "frames of {} bytes are too small to fill the connection",
        frames[0][0].len()
    );
    for (client, frames) in clients.iter().zip(frames) {
        for f in frames {
            client.send(f).unwrap();
        }
    }
    // Watch each client: did it count an ack while frames of its queue were
    // still waiting to be handed to the connection?
    // Sampled on a thread of its own: the server runs on this runtime.
    let acked_while_writing = tokio::task::block_in_place(|| {
        let mut seen = vec![false; clients.len()];
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let stats: Vec<_> = clients.iter().map(|c| c.stats().session).collect();
            for (seen, s) in seen.iter_mut().zip(&stats) {
                *seen |= s.frames_acked > 0 && s.frames_sent < FRAMES;
            }
            if stats.iter().all(|s| s.frames_acked == FRAMES) {
                return seen;
            }
            assert!(std::time::Instant::now() < deadline, "hang guard: not every frame was acknowledged: {stats:?}");
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    assert_eq!(
        acked_while_writing,
        vec![true; clients.len()],
        "every client takes acks while its later frames are still being written"
    );
    acking.stop();
    for c in clients {
        tokio::task::block_in_place(|| c.shutdown(Duration::from_secs(2)));
    }
    server.shutdown(Duration::from_secs(2)).await;
}
