//! Profile types, services and tags, in both stores: pushed profiles are
//! stored as the type they are, filtered by `type=`, `service=` and
//! `tag.<key>=`, listed by `/api/v1/types` and the label routes, and never
//! mix with the agent's profiles, which `mode=` reads exactly as before.

mod common;

use std::time::Duration;

use aperture_aggregator::store::WriteBatch;
use aperture_aggregator::{Aggregator, ClickHouseSettings, Settings};
use aperture_core::model::{Labels, ProfileType, Stack, StackFrame};
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};
use common::http::get;
use common::{Taken, acks, batch, frame_id, now_s, push};

const ALLOC: &str = "memory:alloc_space:bytes:space:bytes";
const GOROUTINES: &str = "goroutines:goroutine:count:goroutine:count";

fn stack(names: &[&str]) -> Stack {
    // Leaf first, as stored.
    Stack::new(names.iter().rev().map(|n| StackFrame { symbol: (*n).into(), ..StackFrame::default() }).collect())
}

fn pushed_labels(service: &str, env: &str, t: &str) -> Labels {
    Labels {
        service: service.into(),
        tags: vec![("env".into(), env.into()), ("region".into(), "eu".into())],
        profile_type: t.into(),
        ..Labels::default()
    }
}

/// Rows as the pipeline makes them of pushed profiles: `api` (env=prod)
/// allocates in `parse` and `render`, `worker` (env=dev) in `drain`; `api`
/// also has a goroutine profile.
fn pushed(t: u64) -> WriteBatch {
    let parse = stack(&["main", "serve", "parse"]);
    let render = stack(&["main", "serve", "render"]);
    let drain = stack(&["main", "drain"]);
    let row = |labels, stack: &Stack, count| {
        (
            RowKey { window_start_s: t, kind: RowKind::Profile, labels, stack: stack.hash, detail: 0 },
            RowValue { count, ..RowValue::default() },
        )
    };
    let mut rows = vec![row(0, &parse, 4096), row(0, &render, 1024), row(1, &drain, 512), row(2, &parse, 7)];
    rows.sort_by_key(|r| r.0);
    WriteBatch {
        flushes: vec![Flush {
            labels: vec![
                pushed_labels("api", "prod", ALLOC),
                pushed_labels("worker", "dev", ALLOC),
                pushed_labels("api", "prod", GOROUTINES),
            ],
            rows,
            stacks: vec![parse, render, drain],
            ..Flush::default()
        }],
        now_s: now_s(),
        ..WriteBatch::default()
    }
}

async fn suite(settings: Settings) {
    let handle = Aggregator::start(settings).await.expect("start");
    let acks = acks(&handle);
    let ingress = handle.ingress();
    let addr = handle.http_addr();
    let t0 = now_s() - 300;
    let range = format!("from={}&to={}", t0 - 60, t0 + 60);
    // The agent's data, through the ingress as always.
    let ids = tokio::task::spawn_blocking(move || {
        let ids: Vec<_> = (1..=3).map(|seq| frame_id(1, 1, seq)).collect();
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(push(&ingress, *id, &batch("n1", t0 + i as u64)), Taken::Queued);
        }
        ids
    })
    .await
    .expect("push");
    let a = acks.clone();
    tokio::task::spawn_blocking(move || a.wait_for(&ids, Duration::from_secs(60))).await.expect("acks");
    handle.store().write(&pushed(t0 / 10 * 10)).await.expect("write pushed rows");

    // `mode=` reads the agent's data only, as before; a built-in `type=` is the same.
    let agent = get(addr, &format!("/api/v1/profile?mode=cpu&format=folded&{range}")).await;
    assert_eq!(agent.text(), "main;handle;compute 9\nmain;handle;read_disk 6\n");
    for t in ["cpu", "cpu:samples:count:cpu:nanoseconds"] {
        let r = get(addr, &format!("/api/v1/profile?type={t}&format=folded&{range}")).await;
        assert_eq!(r.text(), agent.text(), "type={t}");
    }
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&{range}")).await;
    let j = r.json();
    assert_eq!(
        (j["mode"].as_str(), j["type"].as_str(), j["unit"].as_str()),
        (Some("cpu"), Some("cpu:samples:count:cpu:nanoseconds"), Some("samples"))
    );

    // A pushed type: its own stacks, unit and value.
    let r = get(addr, &format!("/api/v1/profile?type={ALLOC}&format=folded&{range}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "main;drain 512\nmain;serve;parse 4096\nmain;serve;render 1024\n");
    let r = get(addr, &format!("/api/v1/profile?type={ALLOC}&{range}")).await;
    let j = r.json();
    assert_eq!(j["mode"], serde_json::Value::Null);
    assert_eq!((j["type"].as_str(), j["unit"].as_str()), (Some(ALLOC), Some("bytes")));
    assert_eq!(j["root"]["value"], 4096 + 1024 + 512);
    let r = get(addr, &format!("/api/v1/flamegraph?type={ALLOC}&service=worker&{range}")).await;
    let j = r.json();
    assert_eq!(
        (j["root"]["value"].as_u64(), j["unit"].as_str(), j["count_unit"].as_str()),
        (Some(512), Some("bytes"), Some("bytes"))
    );
    let r =
        get(addr, &format!("/api/v1/diff?type={ALLOC}&{range}&base_from={}&base_to={}", t0 - 7200, t0 - 3600)).await;
    let j = r.json();
    assert_eq!(j["type"], ALLOC);
    assert_eq!(
        j["stacks"][0],
        serde_json::json!({ "stack": "main;serve;parse", "base": 0, "value": 4096, "delta": 4096 })
    );
    let r = get(addr, &format!("/api/v1/profile?type={GOROUTINES}&format=folded&{range}")).await;
    assert_eq!(r.text(), "main;serve;parse 7\n");

    // Service and tag filters.
    for (filter, want) in [
        ("service=api", "main;serve;parse 4096\nmain;serve;render 1024\n"),
        ("service=worker", "main;drain 512\n"),
        ("tag.env=dev", "main;drain 512\n"),
        ("tag.env=prod&tag.region=eu", "main;serve;parse 4096\nmain;serve;render 1024\n"),
        ("tag.env=staging", ""),
        ("tag.zone=eu", ""),
        ("service=api&tag.env=dev", ""),
    ] {
        let r = get(addr, &format!("/api/v1/profile?type={ALLOC}&format=folded&{range}&{filter}")).await;
        assert_eq!(r.status, 200, "{filter}: {}", r.text());
        assert_eq!(r.text(), want, "{filter}");
    }
    let r = get(addr, &format!("/api/v1/top?type={ALLOC}&{range}&service=api&limit=1")).await;
    assert_eq!(r.json()["functions"][0]["name"], "parse");
    assert_eq!(r.json()["functions"][0]["self"], 4096);
    assert_eq!(r.json()["unit"], "bytes");
    // The agent's rows carry no service: a service filter leaves none of them.
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&format=folded&{range}&service=api")).await;
    assert_eq!(r.text(), "");

    // Label values and the list of types.
    let values = |path: String| async move {
        let r = get(addr, &path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()["values"].clone()
    };
    assert_eq!(values(format!("/api/v1/labels/service/values?{range}")).await, serde_json::json!(["api", "worker"]));
    assert_eq!(
        values(format!("/api/v1/labels/service/values?type={GOROUTINES}&{range}")).await,
        serde_json::json!(["api"])
    );
    assert_eq!(values(format!("/api/v1/labels/tag.env/values?{range}")).await, serde_json::json!(["dev", "prod"]));
    assert_eq!(
        values(format!("/api/v1/labels/tag.env/values?service=worker&{range}")).await,
        serde_json::json!(["dev"])
    );
    assert_eq!(values(format!("/api/v1/labels/type/values?{range}")).await, serde_json::json!([GOROUTINES, ALLOC]));
    assert_eq!(values(format!("/api/v1/labels/node/values?mode=cpu&{range}")).await, serde_json::json!(["n1"]));
    let r = get(addr, &format!("/api/v1/types?{range}")).await;
    let ids: Vec<String> = r.json()["types"]
        .as_array()
        .expect("types")
        .iter()
        .map(|t| t["id"].as_str().unwrap_or("").to_owned())
        .collect();
    let mut want: Vec<String> = aperture_core::model::Mode::ALL.iter().map(|m| ProfileType::of_mode(*m).id()).collect();
    want.extend([GOROUTINES.to_owned(), ALLOC.to_owned()]);
    assert_eq!(ids, want);

    // Bad types and tags are refused naming the parameter.
    for (query, name) in
        [("type=gpu", "`type`"), (&format!("type={ALLOC}&mode=cpu") as &str, "`type`"), ("mode=cpu&tag.a%3Db=c", "tag")]
    {
        let r = get(addr, &format!("/api/v1/profile?{query}")).await;
        assert_eq!(r.status, 400, "{query}");
        assert!(r.json()["error"].as_str().unwrap_or("").contains(name), "{query}: {}", r.text());
    }
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_types_services_and_tags_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    suite(common::settings(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_types_services_and_tags_clickhouse() {
    let Some(server) = tokio::task::spawn_blocking(|| {
        aperture_testkit::clickhouse::start_or_skip("profile_types_services_and_tags_clickhouse")
    })
    .await
    .expect("start server") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.clickhouse = Some(ClickHouseSettings::new(server.endpoint()));
    suite(settings).await;
    drop(server);
}
