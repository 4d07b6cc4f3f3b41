//! Many clients on one shared runtime (`Client::start_on`), as a load
//! generator runs them: each keeps its own session, and every frame of every
//! client is admitted and acknowledged exactly once, on both carriers. Over
//! QUIC the clients also share two UDP endpoints; clients that shut down
//! must not close them under the others.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_core::frame::{DecodeLimits, FrameBuf, FrameId, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_core::model::{Batch, CpuSample, Stack, StackFrame, Target};
use aperture_transport::Carrier;
use aperture_transport::client::{AgentIdentity, Client, SharedRuntime};
use aperture_transport::server::{Admission, IngressSink, ReceivedFrame, serve};

const CLIENTS: usize = 50;
const FRAMES: u64 = 6;
const BOOT: BootId = BootId([0x5e; 16]);

/// Counts every frame id it admits and queues it for acknowledgement.
#[derive(Default)]
struct AckingSink {
    admitted: Mutex<BTreeMap<FrameId, u32>>,
    pending: Mutex<Vec<FrameId>>,
}

impl IngressSink for AckingSink {
    fn admit(&self, frame: ReceivedFrame) -> Admission {
        let id = frame.header.id;
        *self.admitted.lock().unwrap().entry(id).or_default() += 1;
        self.pending.lock().unwrap().push(id);
        Admission::Queued
    }
}

fn agent(i: usize) -> AgentId {
    let mut id = AgentId([0x77; 16]);
    id.0[..8].copy_from_slice(&(i as u64).to_le_bytes());
    id
}

fn frame(i: usize, seq: u64) -> FrameBuf {
    let stack = Stack::new(
        (0..8)
            .map(|d| StackFrame {
                address: 0x40_0000 + d,
                symbol: format!("fn_{d}"),
                module: "app".into(),
                ..Default::default()
            })
            .collect(),
    );
    let batch = Batch {
        node: format!("node-{i}"),
        targets: vec![Target { pid: 42, process: "app".into(), ..Default::default() }],
        cpu: (0..16)
            .map(|k| CpuSample { time_ns: seq * 1000 + k, target: 0, stack: 0, count: 1, period_ns: 10_101_010 })
            .collect(),
        stacks: vec![stack],
        ..Default::default()
    };
    let id = FrameId { agent_id: agent(i), boot_id: BOOT, sequence: seq };
    encode_batch(&batch, id, seq, &DecodeLimits::default()).expect("encode")
}

/// Waits for `cond` (a hang guard, not a timing assertion).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn acked(c: &Client) -> u64 {
    c.stats().session.frames_acked
}

fn many_clients_share_one_runtime(carrier: Carrier) {
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(AckingSink::default());
    let server = server_rt.block_on(serve(common::server_config(dir.path()), sink.clone())).expect("server starts");
    let ack_thread = {
        let sink = Arc::clone(&sink);
        common::AckLoop::start(server.acker(), move || std::mem::take(&mut *sink.pending.lock().unwrap()))
    };

    let shared = SharedRuntime::new(client_rt.handle().clone()).with_quic_endpoints(2);
    let cfg = common::client_config(&server, carrier, Some(common::TOKEN));
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|i| {
            let identity = AgentIdentity {
                agent_id: agent(i),
                boot_id: BOOT,
                node: format!("node-{i}"),
                agent_version: "test".into(),
            };
            Client::start_on(cfg.clone(), identity, &shared).expect("client starts")
        })
        .collect();
    wait_for("every client has a session", || clients.iter().all(|c| c.stats().established));
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.stats().carrier, Some(carrier));
        for seq in 1..=FRAMES {
            c.send(frame(i, seq)).expect("frame taken");
        }
    }
    wait_for("every frame acknowledged", || clients.iter().all(|c| acked(c) >= FRAMES));

    // Half the clients leave; the others (over QUIC, on the same UDP
    // sockets) keep delivering.
    let rest = clients.split_off(CLIENTS / 2);
    for c in clients {
        let report = c.shutdown(Duration::from_secs(5));
        assert_eq!(report.acked, FRAMES);
        assert!(report.unacked.is_empty(), "unacknowledged: {:?}", report.unacked);
    }
    for (k, c) in rest.iter().enumerate() {
        for seq in FRAMES + 1..=2 * FRAMES {
            c.send(frame(CLIENTS / 2 + k, seq)).expect("frame taken after other clients left");
        }
    }
    wait_for("the remaining clients' frames acknowledged", || rest.iter().all(|c| acked(c) >= 2 * FRAMES));
    for c in &rest {
        let s = c.stats();
        assert_eq!(s.session.frames_acked, 2 * FRAMES, "each frame acknowledged once");
        assert_eq!(s.session.unacked_frames, 0);
        assert_eq!(s.session.frames_dropped, 0);
        assert_eq!(s.reconnects, 0, "no client lost its connection");
    }
    for c in rest {
        assert!(c.shutdown(Duration::from_secs(5)).unacked.is_empty());
    }

    // Every frame of every client reached the sink exactly once.
    let admitted = sink.admitted.lock().unwrap().clone();
    for i in 0..CLIENTS {
        let last = if i < CLIENTS / 2 { FRAMES } else { 2 * FRAMES };
        for seq in 1..=last {
            let id = FrameId { agent_id: agent(i), boot_id: BOOT, sequence: seq };
            assert_eq!(admitted.get(&id), Some(&1), "client {i} frame {seq}");
        }
    }
    let expected = (CLIENTS / 2) as u64 * FRAMES + (CLIENTS - CLIENTS / 2) as u64 * 2 * FRAMES;
    assert_eq!(admitted.len() as u64, expected, "no frame the clients did not send");

    ack_thread.stop();
    server_rt.block_on(server.shutdown(Duration::from_secs(2)));
}

#[test]
fn a_client_on_a_shared_runtime_is_still_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Client>();
    shareable::<SharedRuntime>();
}

#[test]
fn fifty_quic_clients_on_one_runtime_and_two_sockets_each_get_every_frame_acknowledged_once() {
    many_clients_share_one_runtime(Carrier::Quic);
}

#[test]
fn fifty_grpc_clients_on_one_runtime_each_get_every_frame_acknowledged_once() {
    many_clients_share_one_runtime(Carrier::Grpc);
}
