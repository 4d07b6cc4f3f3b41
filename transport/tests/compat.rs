//! Mixed fleets over real carriers: a client of this build and a server
//! that behaves like the first release (session protocol 1, no
//! capabilities, a frame validator that knows lock kinds 0..=4 only).

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::Arc;

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, decode, encode_batch};
use aperture_core::ids::BootId;
use aperture_core::model::{Batch, LockKind, LockWait, Stack, StackFrame, Target};
use aperture_transport::Carrier;
use aperture_transport::control::Capabilities;
use common::*;

/// A frame with one lock wait of every kind.
fn classed_frame(boot: u8, seq: u64) -> FrameBuf {
    let batch = Batch {
        node: "node-test".into(),
        targets: vec![Target { pid: 42, process: "app".into(), ..Default::default() }],
        stacks: vec![Stack::new(vec![StackFrame { symbol: "pthread_mutex_lock".into(), ..Default::default() }])],
        locks: LockKind::ALL
            .iter()
            .map(|&kind| LockWait { time_ns: 1, target: 0, stack: 0, kind, count: 1, wait_ns: 10, max_wait_ns: 10 })
            .collect(),
        ..Default::default()
    };
    let id = FrameId { agent_id: AGENT, boot_id: BootId([boot; 16]), sequence: seq };
    encode_batch(&batch, id, seq, &DecodeLimits::default()).expect("encode")
}

fn kinds(bytes: &[u8]) -> Vec<u8> {
    let mut buf = FrameBuf::new();
    buf.extend_from_slice(bytes);
    let view = decode(&buf, &DecodeLimits::default()).expect("valid frame");
    view.batch.locks.iter().map(|w| w.kind.to_native() as u8).collect()
}

async fn classes_follow_the_server(carrier: Carrier, older: bool) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    if older {
        cfg.limits.max_protocol = 1;
        cfg.limits.capabilities = Capabilities::NONE;
    }
    let server = start(cfg, sink.clone()).await;
    let client = start_client(client_config(&server, carrier, Some(TOKEN)), 1);
    for seq in 1..=3 {
        client.send(classed_frame(1, seq)).expect("send");
    }
    eventually("three frames", || sink.count() == 3).await;
    sink.commit_all(&server.acker());
    eventually("all acked", || client.stats().session.unacked_frames == 0).await;
    let want: Vec<u8> = if older {
        LockKind::ALL.iter().map(|k| k.unclassed() as u8).collect()
    } else {
        LockKind::ALL.iter().map(|&k| k as u8).collect()
    };
    for seen in sink.seen.lock().unwrap().iter() {
        assert_eq!(seen.carrier, carrier);
        assert_eq!(kinds(&seen.bytes), want, "{carrier} older={older}");
    }
    let stats = client.stats();
    assert_eq!(stats.session.frames_downgraded, if older { 3 } else { 0 });
    // The older server refused protocol 2 once; the client was not treated
    // as refused (no rejection, no long backoff), and nothing was resent.
    assert_eq!(stats.session.protocol_fallbacks, u64::from(older));
    assert_eq!(stats.rejections, 0);
    assert_eq!(stats.session.frames_resent, 0);
    client.shutdown(std::time::Duration::from_secs(2));
    server.shutdown(std::time::Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_older_server_gets_only_kinds_it_knows() {
    classes_follow_the_server(Carrier::Quic, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_older_server_gets_only_kinds_it_knows() {
    classes_follow_the_server(Carrier::Grpc, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_current_server_gets_lock_classes() {
    classes_follow_the_server(Carrier::Quic, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_current_server_gets_lock_classes() {
    classes_follow_the_server(Carrier::Grpc, false).await;
}
