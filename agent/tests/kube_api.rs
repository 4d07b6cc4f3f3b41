//! The Kubernetes pod watcher against a local HTTP server replaying
//! recorded API responses: list, watch events, a malformed line, a 410
//! expiry with re-list, bookmarks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aperture_agent::kube::{KubeClient, KubeStats, PodDirectory, run_pod_watcher};
use axum::Router;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::get;

const LIST_1: &str = include_str!("fixtures/k8s/podlist.json");
const LIST_2: &str = include_str!("fixtures/k8s/podlist-after-expiry.json");
const WATCH_1: &str = include_str!("fixtures/k8s/watch-1.jsonl");
const WATCH_2: &str = include_str!("fixtures/k8s/watch-2.jsonl");

const BATCH_JOB: &str = "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf";
const REDIS: &str = "4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f";
const API: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff00010203040506070809101112131415";

#[derive(Default)]
struct Recorded {
    lists: AtomicUsize,
    watches: AtomicUsize,
    queries: Mutex<Vec<String>>,
    auth: Mutex<Vec<String>>,
    // Keeps the last watch open until the test ends.
    held: Mutex<Vec<tokio::sync::mpsc::Sender<Result<String, std::io::Error>>>>,
}

async fn pods(State(rec): State<Arc<Recorded>>, RawQuery(q): RawQuery, headers: HeaderMap) -> Body {
    let q = q.unwrap_or_default();
    rec.queries.lock().expect("lock").push(q.clone());
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    rec.auth.lock().expect("lock").push(auth);
    if !q.contains("watch=true") {
        let n = rec.lists.fetch_add(1, Ordering::SeqCst);
        return Body::from(if n == 0 { LIST_1 } else { LIST_2 });
    }
    match rec.watches.fetch_add(1, Ordering::SeqCst) {
        0 => Body::from(format!("this line is not JSON\n{WATCH_1}")),
        _ => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let _ = tx.send(Ok(WATCH_2.to_owned())).await;
            rec.held.lock().expect("lock").push(tx);
            Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        }
    }
}

#[tokio::test]
async fn list_watch_expiry_and_relist() {
    let rec = Arc::new(Recorded::default());
    let app = Router::new().route("/api/v1/pods", get(pods)).with_state(Arc::clone(&rec));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });

    let token = tempfile::NamedTempFile::new().expect("token file");
    std::fs::write(token.path(), "s3cret-token\n").expect("write token");
    let client =
        KubeClient::new(&format!("http://{addr}"), Some(token.path().to_owned()), None, "worker-1").expect("client");
    let dir = Arc::new(PodDirectory::default());
    let stats = Arc::new(KubeStats::default());
    let task = tokio::spawn(run_pod_watcher(client, Arc::clone(&dir), Arc::clone(&stats)));

    // Wait (bounded, not timed) for the re-list after the 410 to be applied.
    let mut view = dir.view();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        view.refresh();
        if view.index().container(API).is_some() && rec.watches.load(Ordering::SeqCst) >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the watcher never re-listed; stats: {stats:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();

    let index = view.index();
    assert_eq!(index.pod_count(), 3);
    let job = index.container(BATCH_JOB).expect("pod added by the watch survives the re-list");
    assert_eq!(
        (job.namespace.as_str(), job.pod.as_str(), job.container.as_str()),
        ("jobs", "batch-job-8k2lp", "worker")
    );
    assert!(index.container(REDIS).is_none(), "deleted pod is gone");
    assert_eq!(index.container(API).map(|c| c.pod.as_str()), Some("api-5c4b3"));

    assert_eq!(stats.lists.load(Ordering::SeqCst), 2);
    assert_eq!(stats.expired.load(Ordering::SeqCst), 1);
    assert_eq!(stats.malformed.load(Ordering::SeqCst), 1);
    assert_eq!(stats.errors.load(Ordering::SeqCst), 0);

    let queries = rec.queries.lock().expect("lock").clone();
    assert_eq!(queries[0], "fieldSelector=spec.nodeName%3Dworker-1");
    assert!(
        queries[1].ends_with("&watch=true&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion=48213"),
        "{}",
        queries[1]
    );
    assert!(queries[3].ends_with("resourceVersion=48260"), "watch resumes from the new list: {}", queries[3]);
    assert!(rec.auth.lock().expect("lock").iter().all(|a| a == "Bearer s3cret-token"));
}

#[tokio::test]
async fn api_errors_are_named() {
    let app = Router::new().route(
        "/api/v1/pods",
        get(|| async { (axum::http::StatusCode::FORBIDDEN, r#"{"kind":"Status","message":"pods is forbidden"}"#) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = KubeClient::new(&format!("http://{addr}"), None, None, "n1").expect("client");
    let err = client.list_pods().await.expect_err("forbidden");
    let msg = err.to_string();
    assert!(msg.starts_with("the Kubernetes API answered 403 Forbidden to http://127.0.0.1:"), "{msg}");
    assert!(msg.ends_with("pods is forbidden\"}; check the agent's RBAC (list and watch pods)"), "{msg}");
}
