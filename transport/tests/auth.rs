//! The auth matrix on both carriers: every bad token is rejected, counted by
//! reason, and nothing from it reaches the sink; the right token is accepted.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aperture_transport::Carrier;
use aperture_transport::auth::MAX_TOKEN_LEN;
use common::*;

fn cases() -> Vec<(&'static str, Option<String>, &'static str)> {
    let mut same_len = TOKEN.to_owned().into_bytes();
    *same_len.last_mut().unwrap() ^= 1;
    vec![
        ("no token", None, "missing_token"),
        ("empty", Some(String::new()), "missing_token"),
        ("wrong", Some("not-the-token".into()), "wrong_token"),
        ("same length, wrong", Some(String::from_utf8(same_len).unwrap()), "wrong_token"),
        ("prefix of the right one", Some(TOKEN[..TOKEN.len() - 3].to_owned()), "wrong_token"),
        ("right one plus more", Some(format!("{TOKEN}x")), "wrong_token"),
        ("oversized", Some("x".repeat(MAX_TOKEN_LEN + 100)), "oversized_token"),
    ]
}

async fn auth_matrix(carrier: Carrier) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    for (i, (name, token, reason)) in cases().into_iter().enumerate() {
        let before = server.stats().rejections.get(reason).copied().unwrap_or(0);
        let client = start_client(client_config(&server, carrier, token.as_deref()), 10 + i as u8);
        client.send(frame(10 + i as u8, 1)).unwrap();
        eventually(&format!("{carrier}: {name} rejected"), || client.stats().rejections >= 1).await;
        let after = server.stats().rejections.get(reason).copied().unwrap_or(0);
        assert!(
            after > before,
            "{carrier}: {name}: rejection not counted as {reason}: {:?}",
            server.stats().rejections
        );
        let stats = client.stats();
        assert_eq!(stats.session.frames_acked, 0, "{carrier}: {name}");
        assert!(!stats.established, "{carrier}: {name}");
        tokio::task::block_in_place(|| drop(client));
    }
    assert_eq!(sink.count(), 0, "{carrier}: nothing from a rejected client reaches the sink");
    assert_eq!(server.stats().frames_received, 0, "{carrier}: nothing received from a rejected client");
    assert_eq!(server.stats().sessions_opened, 0);

    let client = start_client(client_config(&server, carrier, Some(TOKEN)), 99);
    client.send(frame(99, 1)).unwrap();
    eventually(&format!("{carrier}: right token accepted"), || sink.count() == 1).await;
    assert_eq!(client.stats().rejections, 0);
    tokio::task::block_in_place(|| drop(client));
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_auth_matrix() {
    auth_matrix(Carrier::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_auth_matrix() {
    auth_matrix(Carrier::Grpc).await;
}

/// Without a token a server refuses to start, unless auth is explicitly disabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    cfg.auth.token = None;
    let err = aperture_transport::server::serve(cfg.clone(), Arc::new(RecordingSink::default())).await.unwrap_err();
    assert!(err.to_string().contains("no auth token configured"), "{err}");
    cfg.auth.disabled = true;
    let sink = Arc::new(RecordingSink::default());
    let server = start(cfg, sink.clone()).await;
    let client = start_client(client_config(&server, Carrier::Quic, None), 7);
    client.send(frame(7, 1)).unwrap();
    eventually("accepted without a token", || sink.count() == 1).await;
    tokio::task::block_in_place(|| drop(client));
    server.shutdown(Duration::from_secs(2)).await;
}
