//! TLS trust on real connections: a CA-signed certificate loaded from files,
//! a pinned fingerprint (right and wrong), insecure mode, gRPC over TLS,
//! and a fallback from QUIC that never lowers security.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aperture_transport::Carrier;
use aperture_transport::client::{CarrierChoice, ClientConfig};
use aperture_transport::tls::{ClientTlsConfig, ServerTlsConfig};
use common::*;

/// Writes a CA and a server certificate for `localhost` signed by it;
/// returns (ca file, cert file, key file).
fn ca_signed_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "aperture test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let paths = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server-key.pem"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

async fn delivers(sink: &RecordingSink, cfg: aperture_transport::client::ClientConfig, boot: u8) {
    let before = sink.count();
    let client = start_client(cfg, boot);
    client.send(frame(boot, 1)).unwrap();
    eventually("delivered", || sink.count() == before + 1).await;
    tokio::task::block_in_place(|| drop(client));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signed_certificate_from_files_on_both_carriers() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_signed_files(dir.path());
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.tls = ServerTlsConfig { cert_file: Some(cert), key_file: Some(key), ..Default::default() };
    let server = start(cfg, sink.clone()).await;
    for (i, carrier) in [Carrier::Quic, Carrier::Grpc].into_iter().enumerate() {
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls =
            ClientTlsConfig { ca_file: Some(ca.clone()), server_name: Some("localhost".into()), ..Default::default() };
        delivers(&sink, c, 20 + i as u8).await;
    }
    assert!(sink.seen.lock().unwrap().iter().any(|s| s.carrier == Carrier::Grpc));
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_refused_and_insecure_mode_connects() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    for carrier in [Carrier::Quic, Carrier::Grpc] {
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls = ClientTlsConfig { fingerprint: Some("ab".repeat(32)), ..Default::default() };
        let client = start_client(c, 30);
        client.send(frame(30, 1)).unwrap();
        eventually("connect attempts fail", || {
            let s = client.stats();
            s.connect_failures_quic + s.connect_failures_grpc >= 2
        })
        .await;
        assert!(!client.stats().established);
        tokio::task::block_in_place(|| drop(client));
    }
    assert_eq!(sink.count(), 0, "nothing sent to an unverified server");
    for (i, carrier) in [Carrier::Quic, Carrier::Grpc].into_iter().enumerate() {
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls = ClientTlsConfig { insecure_skip_verify: true, ..Default::default() };
        delivers(&sink, c, 31 + i as u8).await;
        // And the pinned fingerprint works over gRPC/TLS too.
        delivers(&sink, client_config(&server, carrier, Some(TOKEN)), 41 + i as u8).await;
    }
    server.shutdown(Duration::from_secs(2)).await;
}

/// A UDP port where nothing answers: QUIC handshakes to it time out, as when
/// an on-path attacker drops UDP.
fn dead_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

fn falling_back(server_tls_addr: std::net::SocketAddr, fingerprint: String, dead_quic: u16) -> ClientConfig {
    ClientConfig {
        aggregator: server_tls_addr.to_string(),
        token: Some(TOKEN.into()),
        tls: ClientTlsConfig { fingerprint: Some(fingerprint), ..Default::default() },
        carrier: CarrierChoice::Auto,
        quic_port: Some(dead_quic),
        connect_timeout_ms: 300,
        quic_attempts_before_fallback: 1,
        reconnect_min_ms: 10,
        reconnect_max_ms: 100,
        ..ClientConfig::default()
    }
}

/// With UDP blocked, the agent falls back to gRPC, and that gRPC is TLS:
/// the first bytes on the TCP connection are a TLS handshake record, never
/// an HTTP/2 preface, and the token never appears on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_to_grpc_never_sends_the_token_in_cleartext() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let captured = Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let cap = Arc::clone(&captured);
    let capture = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let cap = Arc::clone(&cap);
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                // Whatever the client sends within a moment; it gets no answer.
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                }
                cap.lock().unwrap().push(all);
            });
        }
    });
    let client = start_client(falling_back(addr, "ab".repeat(32), dead_udp_port()), 50);
    client.send(frame(50, 1)).unwrap();
    eventually("fell back to gRPC and tried it twice", || {
        let s = client.stats();
        s.fallbacks_to_grpc >= 1 && captured.lock().unwrap().iter().filter(|c| !c.is_empty()).count() >= 2
    })
    .await;
    tokio::task::block_in_place(|| drop(client));
    capture.abort();
    for bytes in captured.lock().unwrap().iter().filter(|c| !c.is_empty()) {
        assert_eq!(
            bytes[0],
            0x16,
            "a TLS handshake record, not {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(24)])
        );
        assert!(!bytes.windows(3).any(|w| w == b"PRI"), "no HTTP/2 preface in the clear");
        assert!(!bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()), "the token is not on the wire");
    }
}

/// Against a server that only speaks plaintext gRPC, an agent that was not
/// told to use plaintext fails to connect with a TLS error: the server never
/// sees a call, let alone the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_never_speaks_plaintext_grpc_unless_configured() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.quic_listen = None;
    cfg.tls.insecure_plaintext = true;
    let server = start(cfg, sink.clone()).await;
    let grpc = server.grpc_addr().unwrap();
    let client = start_client(falling_back(grpc, server.fingerprint(), dead_udp_port()), 51);
    client.send(frame(51, 1)).unwrap();
    eventually("gRPC attempts fail", || client.stats().connect_failures_grpc >= 2).await;
    let stats = client.stats();
    assert!(!stats.established);
    let err = stats.last_connect_error.clone().unwrap_or_default();
    assert!(err.contains("TLS"), "the error says TLS failed: {err}");
    tokio::task::block_in_place(|| drop(client));
    let s = server.stats();
    assert_eq!((s.sessions_opened, s.rejections_total(), s.frames_received), (0, 0, 0), "{s:?}");
    assert_eq!(sink.count(), 0);

    // Told explicitly, it does connect in plaintext.
    let mut c = falling_back(grpc, server.fingerprint(), dead_udp_port());
    c.carrier = CarrierChoice::Grpc;
    c.tls.insecure_plaintext = true;
    delivers(&sink, c, 52).await;
    server.shutdown(Duration::from_secs(2)).await;
}

/// UDP blocked, TLS gRPC served: the agent falls back and delivers over gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_to_tls_grpc_delivers_when_udp_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let server = start(server_config(dir.path()), sink.clone()).await;
    let client = start_client(falling_back(server.grpc_addr().unwrap(), server.fingerprint(), dead_udp_port()), 53);
    client.send(frame(53, 1)).unwrap();
    eventually("delivered over gRPC", || sink.count() == 1).await;
    assert_eq!(sink.seen.lock().unwrap()[0].carrier, Carrier::Grpc);
    assert!(client.stats().fallbacks_to_grpc >= 1);
    tokio::task::block_in_place(|| drop(client));
    server.shutdown(Duration::from_secs(2)).await;
}
