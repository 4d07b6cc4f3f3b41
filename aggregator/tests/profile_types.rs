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
    let Some((server, _dir, settings)) =
        common::clickhouse_settings("profile_types_services_and_tags_clickhouse").await
    else {
        return;
    };
    suite(settings).await;
    drop(server);
}

/// A database created before profile types (migrations 1 and 2 only, with
/// an agent row in it) is migrated on start: its rows read as before (once
/// copied into the summing table) and pushed rows can be written next to
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_database_from_before_profile_types_is_migrated_in_place() {
    let test = "a_clickhouse_database_from_before_profile_types_is_migrated_in_place";
    let Some(server) =
        tokio::task::spawn_blocking(move || aperture_testkit::clickhouse::start_or_skip(test)).await.expect("start")
    else {
        return;
    };
    let database = "aperture_old";
    let admin = clickhouse::Client::default().with_url(server.endpoint());
    admin.query(&format!("CREATE DATABASE {database}")).execute().await.expect("create database");
    let db = admin.clone().with_database(database);
    let t0 = now_s() - 300;
    let window = t0 / 10 * 10;
    let old = stack(&["main", "old_work"]);
    for sql in [
        "CREATE TABLE schema_migrations (version UInt32, name String, applied DateTime) ENGINE = MergeTree ORDER BY version".to_owned(),
        "INSERT INTO schema_migrations VALUES (1, 'initial schema', now()), (2, 'samples.batch_id', now())".to_owned(),
        "CREATE TABLE samples (window_start DateTime, kind Enum8('cpu' = 0, 'lock' = 1, 'syscall' = 2, 'slow_call' = 3),
            node String, namespace String, pod String, container String, process String, pid UInt32,
            stack_hash UInt64, detail UInt32, name String, count UInt64, total_ns UInt64, errors UInt64,
            max_ns UInt64, histogram Array(UInt64), batch_id UInt64 DEFAULT 0)
         ENGINE = MergeTree PARTITION BY toYYYYMMDD(window_start)
         ORDER BY (kind, window_start, node, namespace, pod, process, stack_hash)"
            .to_owned(),
        "CREATE TABLE stacks (hash UInt64, symbols Array(String), modules Array(String), files Array(String),
            lines Array(UInt32), offsets Array(UInt64), addresses Array(UInt64), kernel Array(UInt8), inserted DateTime)
         ENGINE = ReplacingMergeTree(inserted) ORDER BY hash"
            .to_owned(),
        "CREATE TABLE frame_ledger (agent_id String, boot_id String, watermark UInt64, above Array(UInt64),
            updated DateTime, version UInt64) ENGINE = ReplacingMergeTree(version) ORDER BY (agent_id, boot_id)"
            .to_owned(),
        format!(
            "INSERT INTO samples VALUES (toDateTime({window}), 'cpu', 'n1', '', '', '', 'old', 1, {}, 0, '', 4, 40, 0, 0, [], 0)",
            old.hash.0
        ),
        format!(
            "INSERT INTO stacks VALUES ({}, ['old_work', 'main'], ['', ''], ['', ''], [0, 0], [0, 0], [0, 0], [0, 0], now())",
            old.hash.0
        ),
    ] {
        db.query(&sql).execute().await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.clickhouse =
        Some(ClickHouseSettings { database: database.into(), ..ClickHouseSettings::new(server.endpoint()) });
    let handle = Aggregator::start(settings).await.expect("start on the old database");
    let addr = handle.http_addr();
    let range = format!("from={}&to={}", t0 - 60, t0 + 60);
    // The old rows reach the new `samples` table in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let folded = get(addr, &format!("/api/v1/profile?mode=cpu&format=folded&{range}")).await.text();
        if folded == "main;old_work 4\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the old rows were not readable within a minute: {folded:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    handle.store().write(&pushed(window)).await.expect("write pushed rows after the migration");
    assert_eq!(
        get(addr, &format!("/api/v1/profile?type={GOROUTINES}&format=folded&{range}")).await.text(),
        "main;serve;parse 7\n"
    );
    assert_eq!(get(addr, &format!("/api/v1/profile?mode=cpu&format=folded&{range}")).await.text(), "main;old_work 4\n");
    handle.shutdown().await.expect("shutdown");
    drop(server);
}
