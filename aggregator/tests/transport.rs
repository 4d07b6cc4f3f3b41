//! End to end over real carriers on loopback: a transport client pushes
//! frames over QUIC or gRPC into the transport server, which hands them to
//! the aggregator's ingress; the aggregator acknowledges through the
//! transport's acker once the rows are committed, and the query API returns
//! exactly what was sent.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aperture_aggregator::{Aggregator, Carrier, IngressSink};
use aperture_core::frame::{DecodeLimits, encode_batch};
use aperture_core::ids::{AgentId, BootId};
use aperture_transport::auth::AuthConfig;
use aperture_transport::client::{AgentIdentity, CarrierChoice, Client, ClientConfig};
use aperture_transport::server::{ServerConfig, serve};
use aperture_transport::tls::ClientTlsConfig;
use common::http::get;
use common::{batch, frame_id, now_s};

const TOKEN: &str = "transport-test-token";

async fn end_to_end(carrier: Carrier) {
    let dir = tempfile::tempdir().expect("temp dir");
    let handle = Aggregator::start(common::settings(dir.path())).await.expect("aggregator");
    let sink: Arc<dyn IngressSink> = handle.ingress();
    let server = serve(
        ServerConfig {
            quic_listen: Some("127.0.0.1:0".parse().expect("addr")),
            grpc_listen: Some("127.0.0.1:0".parse().expect("addr")),
            auth: AuthConfig { token: Some(TOKEN.into()), disabled: false },
            data_dir: dir.path().to_owned(),
            ..ServerConfig::default()
        },
        sink,
    )
    .await
    .expect("transport server");
    handle.set_acker(Arc::new(server.acker()));

    let grpc = server.grpc_addr().expect("grpc address");
    let quic = server.quic_addr().expect("quic address");
    let config = ClientConfig {
        aggregator: format!("127.0.0.1:{}", grpc.port()),
        token: Some(TOKEN.into()),
        tls: ClientTlsConfig { fingerprint: Some(server.fingerprint()), ..Default::default() },
        carrier: match carrier {
            Carrier::Quic => CarrierChoice::Quic,
            Carrier::Grpc => CarrierChoice::Grpc,
        },
        quic_port: Some(quic.port()),
        grpc_port: Some(grpc.port()),
        connect_timeout_ms: 2_000,
        ..ClientConfig::default()
    };
    let identity = AgentIdentity {
        agent_id: AgentId([5; 16]),
        boot_id: BootId([1; 16]),
        node: "n1".into(),
        agent_version: "test".into(),
    };
    let client = Client::start(config, identity).expect("client");
    let t0 = now_s() - 120;
    const FRAMES: u64 = 50;
    for seq in 1..=FRAMES {
        let id = frame_id(5, 1, seq);
        let bytes = encode_batch(&batch("n1", t0 + seq), id, 0, &DecodeLimits::default()).expect("encode");
        client.send(bytes).expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.stats().session.frames_acked < FRAMES {
        assert!(
            Instant::now() < deadline,
            "only {} of {FRAMES} frames acknowledged",
            client.stats().session.frames_acked
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = handle.http_addr();
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&from={}&to={}", t0 - 20, t0 + 120)).await;
    assert_eq!(r.json()["root"]["value"], FRAMES * 5);
    let h = get(addr, "/api/health").await.json();
    assert_eq!(h["push_total_ok"], FRAMES);
    assert_eq!(h["agents"][carrier.as_str()], 1, "{h}");

    let report = tokio::task::block_in_place(|| client.shutdown(Duration::from_secs(5)));
    assert!(report.unacked.is_empty());
    server.shutdown(Duration::from_secs(2)).await;
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_frames_reach_the_store_and_are_acknowledged() {
    end_to_end(Carrier::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_frames_reach_the_store_and_are_acknowledged() {
    end_to_end(Carrier::Grpc).await;
}
