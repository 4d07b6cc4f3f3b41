//! The conformance suite, written once and run against both stores: what
//! goes in through the ingress comes out of every endpoint with the right
//! values and filters.

mod common;

use std::time::Duration;

use aperture_aggregator::{Aggregator, Settings};
use common::http::{get, get_with};
use common::{SAMPLES_PER_BATCH, Taken, acks, batch, frame_id, now_s, push};

const FRAMES_PER_AGENT: u64 = 5;

async fn suite(settings: Settings, store_kind: &str) {
    let handle = Aggregator::start(settings).await.expect("start");
    let acks = acks(&handle);
    let ingress = handle.ingress();
    let addr = handle.http_addr();
    // Data a few minutes old, so both explicit ranges and the default
    // (last 15 minutes) cover it.
    let t0 = now_s() - 300;
    let from = t0 - 60;
    let to = t0 + 60;
    let mut ids = Vec::new();
    let pushed = tokio::task::spawn_blocking(move || {
        for (agent, node) in [(1u8, "n1"), (2u8, "n2")] {
            for seq in 1..=FRAMES_PER_AGENT {
                let id = frame_id(agent, 1, seq);
                assert_eq!(push(&ingress, id, &batch(node, t0 + seq)), Taken::Queued);
                ids.push(id);
            }
        }
        ids
    })
    .await
    .expect("push");
    let acks2 = acks.clone();
    let ids2 = pushed.clone();
    tokio::task::spawn_blocking(move || acks2.wait_for(&ids2, Duration::from_secs(60))).await.expect("acks");

    let range = format!("from={from}&to={to}");
    let frames = 2 * FRAMES_PER_AGENT;

    // Profile: JSON tree, with filters.
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&{range}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["root"]["value"], frames * 5);
    assert_eq!(j["unit"], "samples");
    let main = &j["root"]["children"][0];
    assert_eq!(main["name"], "main");
    assert_eq!(main["children"][0]["name"], "handle");
    assert_eq!(main["children"][0]["children"][0]["name"], "compute");
    assert_eq!(main["children"][0]["children"][0]["self"], frames * 3);
    for (filter, want) in [
        ("node=n1", FRAMES_PER_AGENT * 5),
        ("pod=api-1", frames * 3),
        ("namespace=prod", frames * 5),
        ("container=pg", frames * 2),
        ("process=db", frames * 2),
        ("pid=200", frames * 2),
        ("node=n2&pid=100", FRAMES_PER_AGENT * 3),
        ("node=nowhere", 0),
    ] {
        let r = get(addr, &format!("/api/v1/profile?mode=cpu&{range}&{filter}")).await;
        assert_eq!(r.json()["root"]["value"], want, "filter {filter}");
    }
    // Default range: the last 15 minutes.
    let r = get(addr, "/api/v1/profile?mode=cpu").await;
    assert_eq!(r.json()["root"]["value"], frames * 5);
    let r = get(addr, "/api/v1/profile?mode=cpu&from=-2m").await;
    assert_eq!(r.json()["root"]["value"], 0, "data is 5 minutes old");

    // Folded, root first.
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&format=folded&{range}")).await;
    assert_eq!(r.text(), format!("main;handle;compute {}\nmain;handle;read_disk {}\n", frames * 3, frames * 2));
    let r = get(addr, &format!("/api/v1/profile?mode=lock&format=folded&{range}")).await;
    assert_eq!(r.text(), format!("main;lock_acquire;futex_wait {}\n", frames * 1000));
    let r = get(addr, &format!("/api/v1/profile?mode=syscall&format=folded&{range}")).await;
    assert_eq!(r.text(), format!("main;read_disk;sys_read {}\n", frames * 2_000_000));

    // pprof and SVG.
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&format=pprof&{range}")).await;
    assert_eq!(r.status, 200);
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut raw).expect("gzip");
    assert!(raw.windows(7).any(|w| w == b"compute"), "pprof names the functions");
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&format=svg&{range}")).await;
    assert_eq!(r.header("content-type"), Some("image/svg+xml"));
    assert!(r.text().contains("<svg") && r.text().contains("compute"));

    // Top.
    let r = get(addr, &format!("/api/v1/top?mode=cpu&by=self&{range}")).await;
    let f = &r.json()["functions"];
    assert_eq!((f[0]["name"].as_str(), f[0]["self"].as_u64()), (Some("compute"), Some(frames * 3)));
    assert_eq!((f[1]["name"].as_str(), f[1]["self"].as_u64()), (Some("read_disk"), Some(frames * 2)));
    let r = get(addr, &format!("/api/v1/top?mode=cpu&by=total&limit=2&{range}")).await;
    let f = r.json()["functions"].as_array().cloned().unwrap_or_default();
    assert_eq!(f.len(), 2);
    assert_eq!(f[0]["total"], frames * 5);
    assert_eq!(f[0]["name"], "handle", "ties by name: handle before main");

    // Syscalls.
    let r = get(addr, &format!("/api/v1/syscalls?{range}")).await;
    let s = &r.json()["syscalls"][0];
    assert_eq!(s["name"], "read");
    assert_eq!(
        (s["count"].as_u64(), s["errors"].as_u64(), s["total_ns"].as_u64()),
        (Some(frames * 10), Some(frames), Some(frames * 5000))
    );
    for q in ["p50_ns", "p90_ns", "p99_ns"] {
        let v = s[q].as_u64().unwrap_or(0);
        assert!((256..=512).contains(&v), "{q} = {v} lies in bucket 8");
    }
    let r = get(addr, &format!("/api/v1/syscalls?{range}&pod=db-0")).await;
    assert_eq!(r.json()["syscalls"].as_array().map(Vec::len), Some(0));

    // Locks.
    let r = get(addr, &format!("/api/v1/locks?{range}")).await;
    let l = &r.json()["sites"][0];
    assert_eq!(l["function"], "futex_wait");
    assert_eq!(l["stack"], "main;lock_acquire;futex_wait");
    assert_eq!(l["kind"], "mutex");
    assert_eq!(
        (l["count"].as_u64(), l["wait_ns"].as_u64(), l["max_wait_ns"].as_u64()),
        (Some(frames * 2), Some(frames * 1000), Some(700))
    );

    // Label values.
    for (label, query, want) in [
        ("node", "", vec!["n1", "n2"]),
        ("pod", "", vec!["api-1", "db-0"]),
        ("pid", "", vec!["100", "200"]),
        ("pod", "&mode=lock", vec!["api-1"]),
        ("process", "&mode=syscall", vec!["api", "db"]),
        ("container", "&node=n1&pid=200", vec!["pg"]),
    ] {
        let r = get(addr, &format!("/api/v1/labels/{label}/values?{range}{query}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let got: Vec<String> = serde_json::from_value(r.json()["values"].clone()).expect("values");
        assert_eq!(got, want, "{label}{query}");
    }

    // Diff: the base range (before the data) is empty.
    let r = get(addr, &format!("/api/v1/diff?mode=cpu&{range}&base_from={}&base_to={from}", from - 600)).await;
    let d = &r.json()["stacks"];
    assert_eq!(d[0]["stack"], "main;handle;compute");
    assert_eq!((d[0]["base"].as_u64(), d[0]["delta"].as_i64()), (Some(0), Some((frames * 3) as i64)));
    // Diff of the range against itself is all zero deltas.
    let r = get(addr, &format!("/api/v1/diff?mode=cpu&{range}&base_from={from}&base_to={to}")).await;
    assert!(r.json()["stacks"].as_array().into_iter().flatten().all(|e| e["delta"] == 0));

    // Resent frames are acknowledged again, not counted again.
    let ingress = handle.ingress();
    let again = tokio::task::spawn_blocking(move || push(&ingress, frame_id(1, 1, 1), &batch("n1", t0 + 1)))
        .await
        .expect("resend");
    assert_eq!(again, Taken::AlreadyCommitted);
    let r = get(addr, &format!("/api/v1/profile?mode=cpu&{range}")).await;
    assert_eq!(r.json()["root"]["value"], frames * 5);

    // Health and metrics.
    let h = get(addr, "/api/health").await.json();
    assert_eq!(h["push_total_ok"], frames + 1);
    assert_eq!(h["push_total_err"], 0);
    assert_eq!(h["frames_received"], frames + 1);
    assert_eq!(h["samples_received"], frames * SAMPLES_PER_BATCH);
    assert_eq!(h["store"]["status"], "up");
    assert_eq!(h["store"]["kind"], store_kind);
    assert!(h["store"]["last_write_unix_s"].as_u64().is_some());
    assert_eq!(h["agents"]["grpc"], 2);

    lock_classes(&handle, acks.clone(), t0, &range).await;

    // Bad requests.
    for (path, param) in [
        ("/api/v1/profile?mode=gpu", "mode"),
        ("/api/v1/profile", "mode"),
        ("/api/v1/profile?mode=cpu&from=soon", "from"),
        ("/api/v1/profile?mode=cpu&format=png", "format"),
        ("/api/v1/profile?mode=cpu&pid=x", "pid"),
        ("/api/v1/top?mode=cpu&by=both", "by"),
        ("/api/v1/top?mode=cpu&limit=0", "limit"),
        ("/api/v1/labels/colour/values", "name"),
        ("/api/v1/profile?mode=cpu&nod=n1", "nod"),
        ("/api/v1/diff?mode=cpu&base_from=100&base_to=50", "base_from"),
        ("/api/v1/locks?lock_class=spin", "lock_class"),
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert!(r.json()["error"].as_str().unwrap_or("").contains(&format!("`{param}`")), "{path}: {}", r.text());
    }
    assert_eq!(get(addr, "/api/v1/nothing").await.status, 404);
    assert_eq!(get(addr, "/nothing").await.status, 404);
    let big = "x".repeat(20_000);
    assert_eq!(get_with(addr, "/healthz", &[("x-big", &big)]).await.status, 431);

    handle.shutdown().await.expect("shutdown");
}

/// Lock waits of every user class and a kernel mutex, besides the data
/// set's mutex (10 frames x 1000 ns): the lock data shows contention by
/// default, the rest one `lock_class` away.
async fn lock_classes(
    handle: &aperture_aggregator::AggregatorHandle,
    recorder: std::sync::Arc<common::Acks>,
    t0: u64,
    range: &str,
) {
    let addr = handle.http_addr();
    use aperture_core::model::{LockKind, LockWait};
    let waits = [
        (LockKind::RwLock, 20_000),
        (LockKind::KernelMutex, 30_000),
        (LockKind::CondVar, 40_000),
        (LockKind::Semaphore, 50_000),
        (LockKind::Join, 60_000),
        (LockKind::Futex, 70_000),
    ];
    let mut b = batch("n3", t0);
    b.cpu.clear();
    b.syscalls.clear();
    b.slow_calls.clear();
    b.locks = waits
        .iter()
        .map(|&(kind, ns)| LockWait {
            time_ns: t0 * 1_000_000_000,
            target: 0,
            stack: 2,
            kind,
            count: 1,
            wait_ns: ns,
            max_wait_ns: ns,
        })
        .collect();
    let ingress = handle.ingress();
    let id = frame_id(3, 1, 1);
    let taken = tokio::task::spawn_blocking(move || push(&ingress, id, &b)).await.expect("push");
    assert_eq!(taken, Taken::Queued);
    tokio::task::spawn_blocking(move || recorder.wait_for(&[id], Duration::from_secs(60))).await.expect("ack");

    let sites = |class: &'static str| {
        let path = format!("/api/v1/locks?{range}{class}");
        async move {
            let r = get(addr, &path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
            let sites = r.json()["sites"].as_array().cloned().unwrap_or_default();
            sites
                .iter()
                .map(|s| (s["kind"].as_str().unwrap_or("").to_owned(), s["wait_ns"].as_u64().unwrap_or(0)))
                .collect::<Vec<_>>()
        }
    };
    let kinds = |v: &[(String, u64)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(kinds(&sites("").await), ["kernel_mutex", "rwlock", "mutex"], "contention by default");
    assert_eq!(kinds(&sites("&lock_class=contention").await), ["kernel_mutex", "rwlock", "mutex"]);
    assert_eq!(kinds(&sites("&lock_class=waiting").await), ["futex", "join", "semaphore", "condvar"]);
    assert_eq!(sites("&lock_class=condvar").await, [("condvar".to_owned(), 40_000)]);
    assert_eq!(sites("&lock_class=all").await.len(), 7);
    let profile = |class: &'static str| {
        let path = format!("/api/v1/profile?mode=lock&{range}{class}");
        async move { get(addr, &path).await.json()["root"]["value"].as_u64() }
    };
    assert_eq!(profile("").await, Some(10_000 + 20_000 + 30_000));
    assert_eq!(profile("&lock_class=all").await, Some(280_000));
    assert_eq!(profile("&lock_class=join,semaphore").await, Some(110_000));
    let r = get(addr, &format!("/api/v1/labels/node/values?{range}&mode=lock&lock_class=waiting")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["n3"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    suite(common::settings(dir.path()), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_clickhouse() {
    let Some((server, _dir, settings)) = common::clickhouse_settings("conformance_clickhouse").await else { return };
    suite(settings, "clickhouse").await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_guards_the_query_api_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.auth_token = Some("s3cret".into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let r = get(addr, "/api/v1/profile?mode=cpu").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let wrong = get_with(addr, "/api/v1/profile?mode=cpu", &[("authorization", "Bearer nope")]).await;
    assert_eq!(wrong.status, 401);
    let ok = get_with(addr, "/api/v1/profile?mode=cpu", &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(get(addr, "/healthz").await.text(), "ok");
    assert_eq!(get(addr, "/metrics").await.status, 200);
    handle.shutdown().await.expect("shutdown");
}
