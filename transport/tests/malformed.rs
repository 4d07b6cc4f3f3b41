//! Malformed input on both carriers: garbage, truncated, oversized and
//! wrong-version frames, a broken archive. Each is a connection-level error,
//! counted by reason, and the server keeps serving other clients.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::ids::BootId;

use aperture_transport::Carrier;
use aperture_transport::control::{self, CONTROL_HEADER_LEN, CloseReason, Control, Hello, PROTOCOL_VERSION};
use aperture_transport::server::ServerHandle;
use aperture_transport::tls::{self, ClientTlsConfig};
use aperture_transport::wire::grpc::pb;
use common::*;

const MAX_FRAME: u32 = 64 * 1024;

/// The malformed inputs: name, bytes, expected decode-error reason on QUIC
/// (a stream of messages) and on gRPC (a frame field).
fn cases() -> Vec<(&'static str, Vec<u8>, &'static str, &'static str)> {
    let good = frame(1, 1).to_vec();
    let mut wrong_version = good.clone();
    wrong_version[4] = 9;
    let mut oversized = good.clone();
    oversized[8..12].copy_from_slice(&(MAX_FRAME * 2).to_le_bytes());
    let mut broken_archive = good.clone();
    let n = broken_archive.len();
    broken_archive[n - 16..].fill(0xff);
    vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4), "garbage", "bad_magic"),
        ("truncated", good[..good.len() - 10].to_vec(), "truncated", "truncated"),
        ("oversized", oversized, "oversized", "oversized"),
        ("wrong version", wrong_version, "unsupported_version", "unsupported_version"),
        ("broken archive", broken_archive, "invalid_archive", "invalid_archive"),
    ]
}

fn hello(boot: u8) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: AGENT,
        boot_id: BootId([boot; 16]),
        token: TOKEN.as_bytes().to_vec(),
        node: "raw".into(),
        agent_version: "test".into(),
    }
}

/// Speaks raw QUIC: hello, then `bytes`, then finishes the stream. Returns
/// the control messages received and the connection's close code.
async fn quic_raw(server: &ServerHandle, bytes: &[u8]) -> (Vec<Control>, Option<u64>) {
    let trust = ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() };
    let (crypto, _) = tls::client_config(&trust, tls::QUIC_ALPN).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), server.quic_addr().unwrap(), "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&Control::Hello(hello(1)).to_bytes().unwrap()).await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let mut got = Vec::new();
    loop {
        let mut head = [0u8; CONTROL_HEADER_LEN];
        if recv.read_exact(&mut head).await.is_err() {
            break;
        }
        let (kind, len) = control::parse_header(&head).unwrap();
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await.unwrap();
        got.push(control::decode_body(kind, &body).unwrap());
    }
    let code = match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
        _ => None,
    };
    endpoint.close(0u32.into(), b"");
    (got, code)
}

/// Speaks raw gRPC: hello, then `bytes` as a frame. Returns the responses
/// and the final status.
async fn grpc_raw(server: &ServerHandle, bytes: Vec<u8>) -> (Vec<pb::PushResponse>, Option<tonic::Status>) {
    let mut client =
        pb::ingest_client::IngestClient::new(grpc_tls_channel(server).await).max_encoding_message_size(64 << 20);
    let h = hello(2);
    let reqs = vec![
        pb::PushRequest {
            body: Some(pb::push_request::Body::Hello(pb::Hello {
                protocol: 1,
                agent_id: h.agent_id.0.to_vec(),
                boot_id: h.boot_id.0.to_vec(),
                node: h.node,
                agent_version: h.agent_version,
            })),
        },
        pb::PushRequest { body: Some(pb::push_request::Body::Frame(bytes.into())) },
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for r in reqs {
        tx.send(r).await.unwrap();
    }
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut stream = client.push(req).await.unwrap().into_inner();
    let mut got = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => break None,
            Err(s) => break Some(s),
        }
    };
    drop(tx);
    (got, status)
}

async fn still_serves(server: &ServerHandle, sink: &RecordingSink, carrier: Carrier, boot: u8) {
    let before = sink.count();
    let client = start_client(client_config(server, carrier, Some(TOKEN)), boot);
    client.send(frame(boot, 1)).unwrap();
    eventually("a good client is still served", || sink.count() == before + 1).await;
    tokio::task::block_in_place(|| drop(client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_malformed_input_closes_the_connection_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.limits.max_frame_bytes = MAX_FRAME;
    let server = start(cfg, sink.clone()).await;
    for (i, (name, bytes, reason, _)) in cases().into_iter().enumerate() {
        let admitted = sink.count();
        let (got, code) = quic_raw(&server, &bytes).await;
        assert!(matches!(got.first(), Some(Control::Welcome(_))), "{name}: {got:?}");
        assert!(
            matches!(got.last(), Some(Control::Close(c)) if c.reason == CloseReason::Malformed),
            "{name}: expected a malformed close, got {got:?}"
        );
        assert_eq!(code, Some(CloseReason::Malformed as u64), "{name}: QUIC close code");
        let stats = server.stats();
        assert_eq!(stats.decode_errors.get(reason), Some(&1), "{name}: {:?}", stats.decode_errors);
        assert_eq!(sink.count(), admitted, "{name}: nothing admitted");
        still_serves(&server, &sink, Carrier::Quic, 50 + i as u8).await;
    }
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_malformed_input_ends_the_call_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.limits.max_frame_bytes = MAX_FRAME;
    let server = start(cfg, sink.clone()).await;
    let mut cases: Vec<_> = cases().into_iter().map(|(n, b, _, grpc)| (n, b, grpc)).collect();
    // A message over the gRPC size limit is refused by the protobuf decoder.
    let mut huge = frame(2, 1).to_vec();
    huge.resize(MAX_FRAME as usize * 2, 0);
    cases.push(("over the message limit", huge, "oversized"));
    for (i, (name, bytes, reason)) in cases.into_iter().enumerate() {
        let admitted = sink.count();
        let before = server.stats().decode_errors.get(reason).copied().unwrap_or(0);
        let (got, status) = grpc_raw(&server, bytes).await;
        assert!(
            matches!(got.first().and_then(|m| m.body.as_ref()), Some(pb::push_response::Body::Welcome(_))),
            "{name}: {got:?}"
        );
        let status = status.unwrap_or_else(|| panic!("{name}: the call must end with an error"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
        let after = server.stats().decode_errors.get(reason).copied().unwrap_or(0);
        assert_eq!(after, before + 1, "{name}: {:?}", server.stats().decode_errors);
        assert_eq!(sink.count(), admitted, "{name}: nothing admitted");
        still_serves(&server, &sink, Carrier::Grpc, 60 + i as u8).await;
    }
    server.shutdown(Duration::from_secs(2)).await;
}

/// A frame whose identity is not the session's is a protocol violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_from_another_agent_run_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    let (got, code) = quic_raw(&server, &frame(77, 1)).await; // hello says boot 1
    assert!(matches!(got.last(), Some(Control::Close(c)) if c.reason == CloseReason::ProtocolViolation), "{got:?}");
    assert_eq!(code, Some(CloseReason::ProtocolViolation as u64));
    assert_eq!(sink.count(), 0);
    server.shutdown(Duration::from_secs(2)).await;
}
