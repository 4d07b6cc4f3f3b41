//! Pyroscope's own port (`pyroscope.listen`, usually 4040): the SDKs'
//! routes and the querier answer there with the same tokens, what is pushed
//! there is stored like a push to the HTTP port, and nothing else is served.

mod common;

use aperture_aggregator::Aggregator;
use common::http::{get, get_with, post_with};
use common::now_s;

const READ: &str = "read-secret";
const INGEST: &str = "push-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_the_pyroscope_port_is_stored() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.auth_token = Some(READ.into());
    settings.ingest_token = Some(INGEST.into());
    settings.pyroscope_listen = Some("127.0.0.1:0".parse().expect("address"));
    let handle = Aggregator::start(settings).await.expect("start");
    let (http, port) = (handle.http_addr(), handle.pyroscope_addr().expect("the Pyroscope port is bound"));
    assert_ne!(http.port(), port.port());
    let t = now_s() - 60;
    let ingest = format!("/ingest?name=portapp.cpu%7Benv%3Dprod%7D&from={t}");
    let bearer = format!("Bearer {INGEST}");

    let r = post_with(port, &ingest, &[("Authorization", &bearer)], b"main;work 4\n").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let query = format!(
        "/api/v1/profile?format=folded&type=process_cpu:samples:count:cpu:nanoseconds&service=portapp&tag.env=prod&from={}&to={}",
        t - 60,
        t + 60
    );
    let r = get_with(http, &query, &[("Authorization", &format!("Bearer {READ}"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "main;work 4\n");

    // The same tokens: no push without the ingest token, no query without the read token.
    let r = post_with(port, &ingest, &[("Authorization", "Bearer wrong")], b"main;work 1\n").await;
    assert_eq!(r.status, 401);
    let types = "/querier.v1.QuerierService/ProfileTypes";
    let r = post_with(port, types, &[("Content-Type", "application/json")], b"{}").await;
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {READ}");
    let r = post_with(port, types, &[("Content-Type", "application/json"), ("Authorization", &auth)], b"{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("process_cpu:samples:count:cpu:nanoseconds"), "{}", r.text());
    // Only Pyroscope's routes.
    assert_eq!(get_with(port, &query, &[("Authorization", &auth)]).await.status, 404);
    assert_eq!(get(port, "/metrics").await.status, 404);
    handle.shutdown().await.expect("shutdown");
}
