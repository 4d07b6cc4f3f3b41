//! What the daemon's `/metrics` exports beyond the aggregator's own
//! counters: the transport server's (sessions, rejections, decode errors,
//! sequence gaps) and the store's undecodable records.

mod common;

use aperture_aggregator::Daemon;
use aperture_core::config::{AggregatorConfig, FlagValue, load};
use common::http::get;

fn config(data_dir: &std::path::Path) -> AggregatorConfig {
    let env = |k: &str| (k == "APERTURE_AUTH_TOKEN").then(|| "tok".to_owned());
    let dir = data_dir.display().to_string();
    let flags = [
        FlagValue::new("--data-dir", "data_dir", &dir),
        FlagValue::new("--http-listen", "listen.http", "127.0.0.1:0"),
        FlagValue::new("--grpc-listen", "listen.grpc", "127.0.0.1:0"),
        FlagValue::new("--quic-listen", "listen.quic", "127.0.0.1:0"),
    ];
    load::<AggregatorConfig>(None, &env, &flags).expect("valid config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_counters_and_undecodable_records_reach_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&config(dir.path())).await.expect("start");
    let text = get(daemon.http_addr(), "/metrics").await.text();
    for name in [
        "aperture_transport_sessions_opened_total 0",
        "aperture_transport_sequence_gaps_total 0",
        "aperture_transport_frames_received_total 0",
        "aperture_http_connections_open 1",
        "aperture_store_undecodable_total{what=\"stack\"} 0",
        "aperture_store_undecodable_total{what=\"ledger_row\"} 0",
        "aperture_transport_unauthenticated_connections 0",
        "aperture_transport_preauth_refused_total 0",
        "aperture_transport_preauth_closed_total 0",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    daemon.shutdown().await.expect("shutdown");
}

/// `limits.max_unauthenticated` reaches the transport: with a limit of 2,
/// four connections that never start their TLS handshake leave two
/// waiting and two refused at once, and `/metrics` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_unauthenticated_limit_are_refused_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.limits.max_unauthenticated = 2;
    let daemon = Daemon::start(&c).await.expect("start");
    let grpc = daemon.grpc_addr().expect("gRPC listening");
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(tokio::net::TcpStream::connect(grpc).await.expect("connect"));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let text = get(daemon.http_addr(), "/metrics").await.text();
        if text.contains("aperture_transport_preauth_refused_total 2")
            && text.contains("aperture_transport_unauthenticated_connections 2")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "limit of 2 not applied to 4 stalled connections:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(stalled);
    daemon.shutdown().await.expect("shutdown");
}
