//! The querier's label matchers other than `=`, as Grafana sends them
//! (`{service_name="x", env=~"p.*"}`), against both stores: `!=`, `=~` and
//! `!~` select what Prometheus' rules select (whole-value regexes; a label a
//! row lacks is ""), and a bad regex is a 400 Connect error naming it.

mod common;

use aperture_aggregator::{Aggregator, Settings};
use std::time::Duration;

use common::http::post_with;
use common::{acks, batch, frame_id, now_s};
use serde_json::{Value, json};

const READ: &str = "read-secret";
const INGEST: &str = "push-secret";
const CPU: &str = "process_cpu:samples:count:cpu:nanoseconds";
const AGENT_CPU: &str = "cpu:samples:count:cpu:nanoseconds";

async fn call(addr: std::net::SocketAddr, method: &str, body: Value) -> common::http::Response {
    let auth = format!("Bearer {READ}");
    post_with(
        addr,
        &format!("/querier.v1.QuerierService/{method}"),
        &[("Authorization", &auth), ("Content-Type", "application/json"), ("Connect-Protocol-Version", "1")],
        body.to_string().as_bytes(),
    )
    .await
}

async fn suite(mut settings: Settings) {
    settings.auth_token = Some(READ.into());
    settings.ingest_token = Some(INGEST.into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let received = acks(&handle);
    let t = now_s() - 120;
    let bearer = format!("Bearer {INGEST}");
    for (name, body) in [
        ("checkout.cpu%7Benv%3Dprod%2Cregion%3Deu%7D", "main;a 10\n"),
        ("checkout.cpu%7Benv%3Ddev%2Cregion%3Deu%7D", "main;b 5\n"),
        ("checkout.cpu%7Bregion%3Dus%7D", "main;c 2\n"),
        ("billing.cpu%7Benv%3Dprod%7D", "main;d 1\n"),
    ] {
        let r =
            post_with(addr, &format!("/ingest?name={name}&from={t}"), &[("Authorization", &bearer)], body.as_bytes())
                .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The agent's data: api (pid 100, pod api-1) 3 samples, db (pid 200, pod db-0) 2.
    let ingress = handle.ingress();
    let id = frame_id(1, 1, 1);
    tokio::task::spawn_blocking(move || {
        common::push(&ingress, id, &batch("node-a", t));
        received.wait_for(&[id], Duration::from_secs(60));
    })
    .await
    .expect("agent data");
    let (start, end) = ((t - 60) * 1000, (t + 60) * 1000);
    let total_of = |type_id: &'static str, selector: &'static str| async move {
        let body = json!({ "profileTypeID": type_id, "labelSelector": selector,
                           "start": start.to_string(), "end": end.to_string() });
        let r = call(addr, "SelectMergeStacktraces", body).await;
        assert_eq!(r.status, 200, "{selector}: {}", r.text());
        r.json()["flamegraph"]["total"].as_str().unwrap_or("0").parse::<u64>().expect("total")
    };
    let total = |selector: &'static str| total_of(CPU, selector);
    assert_eq!(total(r#"{service_name="checkout"}"#).await, 17);
    // `!=` keeps the rows without the label.
    assert_eq!(total(r#"{service_name="checkout", env!="prod"}"#).await, 5 + 2);
    assert_eq!(total(r#"{service_name="checkout", env=~"pro.*"}"#).await, 10);
    // Whole values only: `pro` is not `prod`.
    assert_eq!(total(r#"{service_name="checkout", env=~"pro"}"#).await, 0);
    // A regex that matches "" keeps the rows without the label.
    assert_eq!(total(r#"{service_name="checkout", env=~"prod|"}"#).await, 10 + 2);
    assert_eq!(total(r#"{service_name="checkout", env!~"d.*"}"#).await, 10 + 2);
    assert_eq!(total(r#"{service_name="checkout", env!~"d.*|"}"#).await, 10);
    assert_eq!(total(r#"{service_name=~"check.*|bill.*", env="prod"}"#).await, 11);
    assert_eq!(total(r#"{service_name!="checkout"}"#).await, 1);
    assert_eq!(total(r#"{env!=""}"#).await, 16);
    assert_eq!(total(r#"{env=~"nothing"}"#).await, 0);
    assert_eq!(total(r#"{region!~"eu", __name__=~"process_.*"}"#).await, 2 + 1);

    // The agent's labels are columns: the same rules.
    assert_eq!(total_of(AGENT_CPU, "{}").await, 5);
    assert_eq!(total_of(AGENT_CPU, r#"{pod=~"api-.*"}"#).await, 3);
    assert_eq!(total_of(AGENT_CPU, r#"{pod!="api-1", namespace="prod"}"#).await, 2);
    assert_eq!(total_of(AGENT_CPU, r#"{pid=~"2.."}"#).await, 2);
    assert_eq!(total_of(AGENT_CPU, r#"{pid!~"1.*|3.*"}"#).await, 2);
    // The agent's rows have no service: `!=` keeps them, `=~".+"` does not.
    assert_eq!(total_of(AGENT_CPU, r#"{service_name!="checkout"}"#).await, 5);
    assert_eq!(total_of(AGENT_CPU, r#"{service_name=~".+"}"#).await, 0);

    let r = call(
        addr,
        "LabelValues",
        json!({ "name": "env", "matchers": [r#"{service_name=~"check.*", region!="us"}"#],
                "start": start.to_string(), "end": end.to_string() }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["names"], json!(["dev", "prod"]));
    let r = call(
        addr,
        "SelectSeries",
        json!({ "profileTypeID": CPU, "labelSelector": r#"{env=~".+"}"#, "groupBy": ["service_name"],
                "step": 60.0, "start": start.to_string(), "end": end.to_string() }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let sums: Vec<(String, f64)> = r.json()["series"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let points = s["points"].as_array().into_iter().flatten();
            (
                s["labels"][0]["value"].as_str().unwrap_or("").to_owned(),
                points.filter_map(|p| p["value"].as_f64()).sum(),
            )
        })
        .collect();
    assert_eq!(sums, [("billing".to_owned(), 1.0), ("checkout".to_owned(), 15.0)]);

    let r =
        call(addr, "SelectMergeStacktraces", json!({ "profileTypeID": CPU, "labelSelector": r#"{env=~"(p"}"# })).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["code"], "invalid_argument");
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("env=~") && message.contains("regular expression"), "{message}");
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn querier_matchers_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    suite(common::settings(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn querier_matchers_clickhouse() {
    let Some((server, _dir, settings)) = common::clickhouse_settings("querier_matchers_clickhouse").await else {
        return;
    };
    suite(settings).await;
    drop(server);
}
