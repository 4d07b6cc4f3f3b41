//! Before a session is authenticated, a client can make the server hold
//! almost nothing: no frame buffer, a bounded number of connections, and
//! only until its hello is due.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aperture_core::frame::HEADER_LEN;
use aperture_core::ids::BootId;
use aperture_transport::control::{Control, Hello, PROTOCOL_VERSION};
use aperture_transport::server::{ServerConfig, ServerHandle};
use aperture_transport::tls::{self, ClientTlsConfig};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STALLERS: usize = 16;

/// A header announcing the largest payload the server accepts, and nothing after it.
fn max_frame_header(cfg: &ServerConfig) -> Vec<u8> {
    let mut head = frame(1, 1)[..HEADER_LEN].to_vec();
    let max_payload = cfg.limits.max_frame_bytes - HEADER_LEN as u32;
    head[8..12].copy_from_slice(&max_payload.to_le_bytes());
    head
}

async fn quic_connect(server: &ServerHandle) -> quinn::Connection {
    let trust = ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() };
    let (crypto, _) = tls::client_config(&trust, tls::QUIC_ALPN).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), server.quic_addr().unwrap(), "localhost")
        .unwrap()
        .await
        .unwrap()
}

fn wrong_hello() -> Vec<u8> {
    Control::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        agent_id: AGENT,
        boot_id: BootId([1; 16]),
        token: b"not-the-token".to_vec(),
        node: "attacker".into(),
        agent_version: "x".into(),
    })
    .to_bytes()
    .unwrap()
}

/// Unauthenticated QUIC clients announce a maximal frame and stall: the
/// server allocates no frame buffer for them and closes every one.
#[tokio::test]
async fn quic_frames_before_the_hello_allocate_nothing_and_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    // Far beyond the test's run: only the pre-authentication rules may close them.
    cfg.limits.hello_timeout_ms = 600_000;
    let sink = Arc::new(RecordingSink::default());
    let server = start(cfg.clone(), sink.clone()).await;
    let head = max_frame_header(&cfg);
    let mut conns = Vec::new();
    for i in 0..STALLERS {
        let conn = quic_connect(&server).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        if i % 2 == 1 {
            // A wrong hello, then the frame header right behind it.
            send.write_all(&wrong_hello()).await.unwrap();
        }
        send.write_all(&head).await.unwrap();
        conns.push((conn, send));
    }
    for (conn, _send) in &conns {
        tokio::time::timeout(Duration::from_secs(20), conn.closed())
            .await
            .expect("the server closes a connection that sends a frame before authenticating");
    }
    let stats = server.stats();
    assert_eq!(stats.frame_read_bytes_peak, 0, "no frame buffer allocated before authentication: {stats:?}");
    assert_eq!(stats.frames_received, 0);
    assert_eq!(stats.sessions_opened, 0);
    eventually("every pre-auth connection counted closed", || server.stats().preauth_closed == STALLERS as u64).await;
    assert_eq!(server.stats().unauthenticated_connections, 0);
    assert_eq!(sink.count(), 0);
    // What a metrics exporter reads is the same snapshot.
    assert_eq!(server.stats_reader().snapshot(), server.stats());
}

/// A QUIC client that sends a partial hello and stalls is closed when its
/// hello is due.
#[tokio::test]
async fn quic_stalled_hello_is_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    cfg.limits.hello_timeout_ms = 200;
    let server = start(cfg, Arc::new(RecordingSink::default())).await;
    let conn = quic_connect(&server).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let hello = wrong_hello();
    send.write_all(&hello[..hello.len() / 2]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), conn.closed()).await.expect("a stalled hello is timed out");
    eventually("counted", || server.stats().preauth_closed == 1).await;
}

/// More unauthenticated QUIC connections than allowed: the extra ones are refused.
#[tokio::test]
async fn quic_unauthenticated_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    cfg.limits.hello_timeout_ms = 600_000;
    cfg.limits.max_unauthenticated = 4;
    let server = start(cfg, Arc::new(RecordingSink::default())).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        // Handshake done, no stream opened: authenticating.
        held.push(quic_connect(&server).await);
    }
    eventually("four authenticating", || server.stats().unauthenticated_connections == 4).await;
    let trust = ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() };
    let (crypto, _) = tls::client_config(&trust, tls::QUIC_ALPN).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let fifth = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), server.quic_addr().unwrap(), "localhost")
        .unwrap()
        .await;
    assert!(fifth.is_err(), "the fifth unauthenticated connection is refused");
    assert_eq!(server.stats().preauth_refused, 1);
    // A real agent still gets in once the others are gone.
    drop(held);
    let client = start_client(client_config(&server, aperture_transport::Carrier::Quic, Some(TOKEN)), 1);
    client.send(frame(1, 1)).unwrap();
    eventually("a real agent connects", || server.stats().sessions_opened == 1).await;
}

/// Unauthenticated TCP connections to the gRPC carrier that stall (nothing
/// sent, half a TLS handshake) are closed when their hello is due, and
/// bounded in number.
#[tokio::test]
async fn grpc_stalled_connections_are_timed_out_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = server_config(dir.path());
    cfg.limits.hello_timeout_ms = 2_000;
    cfg.limits.max_unauthenticated = 4;
    let server = start(cfg, Arc::new(RecordingSink::default())).await;
    let addr = server.grpc_addr().unwrap();
    let mut conns = Vec::new();
    for i in 0..4 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            // The start of a TLS handshake record; the others send nothing.
            s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
        }
        conns.push(s);
    }
    eventually("four authenticating", || server.stats().unauthenticated_connections == 4).await;
    // A fifth is refused at once: its stream ends without a byte.
    let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(20), fifth.read(&mut buf)).await.expect("refused").unwrap_or(0);
    assert_eq!(n, 0, "the fifth connection is closed without an answer");
    eventually("refusal counted", || server.stats().preauth_refused == 1).await;
    // The four stalled ones are closed when their hello is due.
    for s in &mut conns {
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "a stalled gRPC connection is closed");
    }
    eventually("counted closed", || server.stats().preauth_closed >= 4).await;
    assert_eq!(server.stats().unauthenticated_connections, 0);

    // A complete TLS handshake and HTTP/2 preface, then no call: closed too.
    let trust = ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() };
    let (tls, _) = tls::client_config(&trust, b"h2").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a TLS connection without an authenticated call is closed");
    eventually("counted closed", || server.stats().preauth_closed >= 5).await;
    assert_eq!(server.stats().unauthenticated_connections, 0);
}

/// An unauthenticated gRPC call carrying a maximal message is refused from
/// its metadata: nothing is decoded or received.
#[tokio::test]
async fn grpc_unauthenticated_call_is_refused_before_its_body() {
    use aperture_transport::wire::grpc::pb;
    let dir = tempfile::tempdir().unwrap();
    let cfg = server_config(dir.path());
    let server = start(cfg.clone(), Arc::new(RecordingSink::default())).await;
    let channel = grpc_tls_channel(&server).await;
    let mut client = pb::ingest_client::IngestClient::new(channel).max_encoding_message_size(8 << 20);
    let big = vec![7u8; cfg.limits.max_frame_bytes as usize];
    let req = pb::PushRequest { body: Some(pb::push_request::Body::Frame(big.into())) };
    let status = client.push(tokio_stream::iter(vec![req])).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let stats = server.stats();
    assert_eq!(stats.rejections.get("missing_token"), Some(&1));
    assert_eq!(stats.frames_received, 0);
    assert_eq!(stats.decode_errors_total(), 0);
}
