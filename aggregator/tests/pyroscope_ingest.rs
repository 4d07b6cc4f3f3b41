//! Pyroscope's `POST /ingest` against both stores: pprof (gzipped and raw)
//! and folded bodies are stored as their profile types with the service and
//! tags of their `name`, answered only once committed, and bad requests get
//! clear 4xx answers, counted.

mod common;

use aperture_aggregator::{Aggregator, Settings};
use base64::Engine;
use common::http::{get, post_with};
use common::pprof::{gzip, pprof};
use common::{metric, now_s};
use prost::Message;

const TOKEN: &str = "push-secret";

/// Pyroscope's push.v1 messages (`push/v1/push.proto`).
#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    series: Vec<PushSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PushSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<RawSample>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawSample {
    #[prost(bytes = "vec", tag = "1")]
    raw_profile: Vec<u8>,
    #[prost(string, tag = "2")]
    id: String,
}

fn basic(password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("app:{password}")))
}

async fn folded(addr: std::net::SocketAddr, query: &str) -> String {
    let r = get(addr, &format!("/api/v1/profile?format=folded&{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.text()
}

async fn suite(mut settings: Settings) {
    settings.ingest_token = Some(TOKEN.into());
    settings.http_limits.max_push_body_bytes = 64 * 1024;
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let t = now_s() - 120;
    let range = format!("from={}&to={}", t - 60, t + 60);
    let bearer = format!("Bearer {TOKEN}");

    // A Go heap profile, gzipped, with basic auth: four types at once.
    let heap = gzip(&pprof(
        &[("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")],
        ("space", "bytes"),
        &[(&["main", "serve", "parse"], &[3, 4096, 1, 512]), (&["main", "serve", "render"], &[1, 1024, 0, 0])],
        t,
    ));
    let auth = basic(TOKEN);
    let r = post_with(
        addr,
        "/ingest?name=goapp.alloc_space%7Benv%3Dprod%2Cregion%3Deu%7D&format=pprof&spyName=gospy",
        &[("Authorization", &auth), ("Content-Type", "application/octet-stream")],
        &heap,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Answered after the commit: the data is there at once.
    let alloc = format!("type=memory:alloc_space:bytes:space:bytes&service=goapp&{range}");
    assert_eq!(folded(addr, &alloc).await, "main;serve;parse 4096\nmain;serve;render 1024\n");
    assert_eq!(
        folded(addr, &format!("type=memory:inuse_objects:count:space:bytes&tag.env=prod&{range}")).await,
        "main;serve;parse 1\n"
    );
    assert_eq!(folded(addr, &format!("{alloc}&tag.region=us")).await, "");

    // A CPU profile, raw pprof, bearer token; `from` gives the time.
    let cpu = pprof(
        &[("samples", "count"), ("cpu", "nanoseconds")],
        ("cpu", "nanoseconds"),
        &[(&["main", "work", "hash"], &[7, 70_000_000])],
        0,
    );
    let r = post_with(
        addr,
        &format!("/ingest?name=pyapp.cpu%7Benv%3Ddev%7D&from={t}&until={}&format=pprof&sampleRate=100", t + 10),
        &[("Authorization", &bearer)],
        &cpu,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        folded(addr, &format!("type=process_cpu:cpu:nanoseconds:cpu:nanoseconds&service=pyapp&{range}")).await,
        "main;work;hash 70000000\n"
    );
    assert_eq!(
        folded(addr, &format!("type=process_cpu:samples:count:cpu:nanoseconds&tag.env=dev&{range}")).await,
        "main;work;hash 7\n"
    );

    // Folded text (the default format) and `lines`.
    let r = post_with(
        addr,
        &format!("/ingest?name=rbapp.cpu%7Bregion%3Deu%7D&from={t}&units=samples&aggregationType=sum&spyName=rbspy"),
        &[("Authorization", &bearer)],
        b"main;loop;tick 5\nmain;loop;tick 2\nmain;idle 1\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_with(
        addr,
        &format!("/ingest?name=rbapp.cpu%7Bregion%3Deu%7D&from={t}&format=lines"),
        &[("Authorization", &bearer)],
        b"main;idle\nmain;idle\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        folded(addr, &format!("type=process_cpu:samples:count:cpu:nanoseconds&service=rbapp&{range}")).await,
        "main;idle 3\nmain;loop;tick 7\n"
    );
    let r = get(addr, &format!("/api/v1/labels/service/values?{range}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["goapp", "pyapp", "rbapp"]));
    // The agent's profiles are untouched.
    assert_eq!(folded(addr, &format!("mode=cpu&{range}")).await, "");

    // Refusals: each a clear 4xx, nothing stored.
    for (auth, want) in [(None, 401), (Some("Bearer wrong".to_owned()), 401), (Some(basic("wrong")), 401)] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = post_with(addr, &format!("/ingest?name=evil.cpu&from={t}"), &headers, b"main;evil 1\n").await;
        assert_eq!(r.status, want, "{auth:?}: {}", r.text());
    }
    let big = vec![b'a'; 100 * 1024];
    let r = post_with(addr, "/ingest?name=big.cpu", &[("Authorization", &bearer)], &big).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap_or("").contains("limit"), "{}", r.text());
    let labels: Vec<String> = (0..40).map(|i| format!("k{i}%3Dv")).collect();
    let r = post_with(
        addr,
        &format!("/ingest?name=many.cpu%7B{}%7D", labels.join("%2C")),
        &[("Authorization", &bearer)],
        b"main 1\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].as_str().unwrap_or("").contains("limit of 32"), "{}", r.text());
    for (query, body, what) in [
        ("name=bad.cpu&format=pprof", &b"\xff\xff\xff not a profile"[..], "pprof"),
        ("name=bad.cpu&format=jfr", &b"x"[..], "format"),
        ("name=bad.cpu", &b"main;x notanumber\n"[..], "count"),
        ("format=folded", &b"main 1\n"[..], "name"),
    ] {
        let r = post_with(addr, &format!("/ingest?{query}"), &[("Authorization", &bearer)], body).await;
        assert_eq!(r.status, 400, "{query}: {}", r.text());
        assert!(r.json()["error"].as_str().unwrap_or("").contains(what), "{query}: {}", r.text());
    }
    let r = get(addr, &format!("/api/v1/labels/service/values?{range}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["goapp", "pyapp", "rbapp"]), "refused pushes stored nothing");

    // push.v1.PusherService/Push over Connect: protobuf (gzipped pprof inside) and JSON.
    let series = |service: &str, profile: Vec<u8>| PushSeries {
        labels: vec![
            LabelPair { name: "__name__".into(), value: "process_cpu".into() },
            LabelPair { name: "service_name".into(), value: service.into() },
            LabelPair { name: "env".into(), value: "stage".into() },
        ],
        samples: vec![RawSample { raw_profile: profile, id: "1".into() }],
    };
    let nodeish = pprof(&[("cpu", "nanoseconds")], ("cpu", "nanoseconds"), &[(&["main", "tick"], &[30])], t);
    let body = PushRequest { series: vec![series("nodeapp", gzip(&nodeish))] }.encode_to_vec();
    let r = post_with(
        addr,
        "/push.v1.PusherService/Push",
        &[("Authorization", &auth), ("Content-Type", "application/proto"), ("Connect-Protocol-Version", "1")],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/proto"));
    let raw = base64::engine::general_purpose::STANDARD.encode(&nodeish);
    let json = serde_json::json!({ "series": [{
        "labels": [{ "name": "service_name", "value": "jsonapp" }, { "name": "__name__", "value": "process_cpu" }],
        "samples": [{ "rawProfile": raw, "ID": "2" }],
    }]});
    let r = post_with(
        addr,
        "/push.v1.PusherService/Push",
        &[("Authorization", &bearer), ("Content-Type", "application/json")],
        json.to_string().as_bytes(),
    )
    .await;
    assert_eq!((r.status, r.text()), (200, "{}".to_owned()));
    for service in ["nodeapp", "jsonapp"] {
        assert_eq!(
            folded(addr, &format!("type=process_cpu:cpu:nanoseconds:cpu:nanoseconds&service={service}&{range}")).await,
            "main;tick 30\n",
            "{service}"
        );
    }
    let nameless = serde_json::json!({ "series": [{ "labels": [], "samples": [{ "rawProfile": raw }] }] });
    for (content_type, body, status, code) in [
        ("application/json", nameless.to_string().into_bytes(), 400, "invalid_argument"),
        ("application/proto", b"\xff\xff".to_vec(), 400, "invalid_argument"),
        ("text/plain", b"x".to_vec(), 415, "internal"),
    ] {
        let r = post_with(
            addr,
            "/push.v1.PusherService/Push",
            &[("Authorization", &bearer), ("Content-Type", content_type)],
            &body,
        )
        .await;
        assert_eq!(r.status, status, "{content_type}: {}", r.text());
        assert_eq!(r.json()["code"], code, "{content_type}: {}", r.text());
    }
    let r = post_with(addr, "/push.v1.PusherService/Push", &[("Content-Type", "application/proto")], &body).await;
    assert_eq!((r.status, r.json()["code"].as_str()), (401, Some("unauthenticated")));

    let m = get(addr, "/metrics").await.text();
    let push = |result: &str| {
        let labels = [r#"protocol="pyroscope_ingest""#.to_owned(), format!("result=\"{result}\"")];
        metric(&m, "aperture_push_requests_total", &[&labels[0], &labels[1]])
    };
    let connect = |result: &str| {
        let labels = [r#"protocol="pyroscope_push""#.to_owned(), format!("result=\"{result}\"")];
        metric(&m, "aperture_push_requests_total", &[&labels[0], &labels[1]])
    };
    assert_eq!((connect("ok"), connect("bad_request"), connect("unauthorized")), (2.0, 3.0, 1.0));
    assert_eq!(push("ok"), 4.0);
    assert_eq!(push("unauthorized"), 3.0);
    assert_eq!(push("too_large"), 2.0, "the body and the labels");
    assert_eq!(push("bad_request"), 4.0);
    // Non-zero (stack, type) values: heap 4 + 2, cpu 2, folded 2 stacks, lines 1, pushes 2.
    assert_eq!(metric(&m, "aperture_push_samples_total", &[]), 6.0 + 2.0 + 2.0 + 1.0 + 2.0);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyroscope_ingest_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    suite(common::settings(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyroscope_ingest_clickhouse() {
    let Some((server, _dir, settings)) = common::clickhouse_settings("pyroscope_ingest_clickhouse").await else {
        return;
    };
    suite(settings).await;
    drop(server);
}
