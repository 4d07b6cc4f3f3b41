//! TLS trust on real connections: a CA-signed certificate loaded from files,
//! a pinned fingerprint (right and wrong), insecure mode, gRPC over TLS.

#![allow(clippy::unwrap_used, reason = "test code")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aperture_transport::Carrier;
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
    cfg.tls = ServerTlsConfig { cert_file: Some(cert), key_file: Some(key), names: vec![], grpc: true };
    let server = start(cfg, sink.clone()).await;
    for (i, carrier) in [Carrier::Quic, Carrier::Grpc].into_iter().enumerate() {
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls = ClientTlsConfig {
            ca_file: Some(ca.clone()),
            server_name: Some("localhost".into()),
            grpc: true,
            ..Default::default()
        };
        delivers(&sink, c, 20 + i as u8).await;
    }
    assert!(sink.seen.lock().unwrap().iter().any(|s| s.carrier == Carrier::Grpc));
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_refused_and_insecure_mode_connects() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(RecordingSink::default());
    let mut cfg = server_config(dir.path());
    cfg.tls.grpc = true;
    let server = start(cfg, sink.clone()).await;
    for carrier in [Carrier::Quic, Carrier::Grpc] {
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls = ClientTlsConfig { fingerprint: Some("ab".repeat(32)), grpc: true, ..Default::default() };
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
        c.tls = ClientTlsConfig { insecure_skip_verify: true, grpc: true, ..Default::default() };
        delivers(&sink, c, 31 + i as u8).await;
        // And the pinned fingerprint works over gRPC/TLS too.
        let mut c = client_config(&server, carrier, Some(TOKEN));
        c.tls.grpc = true;
        delivers(&sink, c, 41 + i as u8).await;
    }
    server.shutdown(Duration::from_secs(2)).await;
}
