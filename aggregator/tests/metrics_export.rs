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
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
    daemon.shutdown().await.expect("shutdown");
}
