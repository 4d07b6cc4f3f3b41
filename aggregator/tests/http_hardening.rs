//! The HTTP server against hostile or careless clients: half-sent requests,
//! more connections than allowed, huge time ranges, stored stacks tens of
//! thousands of frames deep, and what unauthenticated callers may learn.

mod common;

use std::sync::Arc;
use std::time::Duration;

use aperture_aggregator::store::sqlite::SqliteStore;
use aperture_aggregator::store::{
    LabelName, LockTotal, QueryError, RetentionReport, Selector, StackTotal, Store, StoreFuture, StoreKind,
    SyscallTotal, WriteBatch, WriteError,
};
use aperture_aggregator::{Aggregator, AggregatorHandle, HttpLimits, Settings};
use aperture_core::ledger::{RunKey, RunState};
use aperture_core::model::{Labels, Mode, Stack, StackFrame, StackHash};
use aperture_core::shard::{Flush, RowKey, RowKind, RowValue};
use common::http::{get, get_with};
use common::{batch, frame, frame_id, now_s};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the tests wait for something the server must do soon; a bound
/// on waiting, not a timing assertion.
const PATIENCE: Duration = Duration::from_secs(30);

fn settings(dir: &std::path::Path, limits: HttpLimits) -> Settings {
    let mut s = common::settings(dir);
    s.http_limits = limits;
    s
}

/// The value of an unlabelled metric in `/metrics`.
async fn metric(handle: &AggregatorHandle, name: &str) -> f64 {
    let text = get(handle.http_addr(), "/metrics").await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
}

/// Connects and sends the start of a request that never ends.
async fn half_sent(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: aperture\r\nX-Slow: ").await.expect("write");
    s
}

/// Waits until the server closes `s` (EOF or an error answer), returning
/// what it sent.
async fn closed_by_server(mut s: TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    match tokio::time::timeout(PATIENCE, s.read_to_end(&mut got)).await {
        Ok(_) => Some(got),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_closed_and_connections_over_the_cap_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits =
        HttpLimits { header_read_timeout: Duration::from_secs(2), max_connections: 8, ..HttpLimits::default() };
    let handle = Aggregator::start(settings(dir.path(), limits)).await.expect("start");
    let addr = handle.http_addr();

    // Eight half-sent requests take every slot...
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(half_sent(addr).await);
    }
    // ...so further connections are answered 503 at once, naming the limit.
    for _ in 0..3 {
        let r = get(addr, "/healthz").await;
        assert_eq!(r.status, 503, "a connection over the cap was served: {}", r.text());
        assert!(r.text().contains("limits.http_max_connections"), "{}", r.text());
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert!(r.header("content-security-policy").is_some_and(|c| c.contains("default-src 'none'")));
    }
    // The server closes every half-sent request once the header timeout passes.
    for (i, s) in held.into_iter().enumerate() {
        assert!(closed_by_server(s).await.is_some(), "half-sent request {i} still open after {PATIENCE:?}");
    }
    // The slots are free again: a normal request succeeds, and the counts say what happened.
    let r = get(addr, "/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    assert_eq!(metric(&handle, "aperture_http_connections_refused_total").await, 3.0);
    assert_eq!(metric(&handle, "aperture_http_header_timeouts_total").await, 8.0);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_connections_are_all_closed_after_the_header_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = HttpLimits { header_read_timeout: Duration::from_secs(1), ..HttpLimits::default() };
    let handle = Aggregator::start(settings(dir.path(), limits)).await.expect("start");
    let addr = handle.http_addr();
    let mut idle = Vec::new();
    for i in 0..200 {
        // Half of them send nothing at all, half a partial request line.
        let s = if i % 2 == 0 { TcpStream::connect(addr).await.expect("connect") } else { half_sent(addr).await };
        idle.push(s);
    }
    let mut still_open = 0;
    for s in idle {
        if closed_by_server(s).await.is_none() {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle connections the server kept open");
    assert_eq!(get(addr, "/healthz").await.status, 200);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_over_the_limit_is_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = HttpLimits { max_query_range: Duration::from_secs(3600), ..HttpLimits::default() };
    let handle = Aggregator::start(settings(dir.path(), limits)).await.expect("start");
    let addr = handle.http_addr();
    for path in [
        "/api/v1/profile?mode=cpu&from=0",
        "/api/v1/flamegraph?mode=cpu&from=-2h",
        "/api/v1/top?mode=cpu&from=-1d",
        "/api/v1/syscalls?from=-90m",
        "/api/v1/diff?mode=cpu&from=-30m&base_from=-3h&base_to=-30m",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let msg = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(msg.contains("limits.http_max_query_range") && msg.contains("3600"), "{path}: {msg}");
    }
    assert_eq!(get(addr, "/api/v1/profile?mode=cpu&from=-59m").await.status, 200);
    handle.shutdown().await.expect("shutdown");
}

fn frame_named(i: usize) -> StackFrame {
    StackFrame { symbol: format!("f{i}"), module: "app".into(), kernel: i < 3, ..Default::default() }
}

/// One stored CPU row on an 80 000-frame stack, written straight into the
/// store (as any agent with the token could make it hold one).
async fn store_with_a_deep_stack(dir: &std::path::Path, window_s: u64) -> Arc<dyn Store> {
    let store = Arc::new(SqliteStore::open(dir).expect("open"));
    let stack = Stack::new((0..80_000).map(frame_named).collect());
    let key = RowKey { window_start_s: window_s, kind: RowKind::Cpu, labels: 0, stack: stack.hash, detail: 0 };
    let value = RowValue { count: 5, total_ns: 50_000_000, ..RowValue::default() };
    let batch = WriteBatch {
        flushes: vec![Flush {
            labels: vec![Labels { node: "n1".into(), process: "deep".into(), pid: 1, ..Labels::default() }],
            rows: vec![(key, value)],
            stacks: vec![stack],
            ..Flush::default()
        }],
        ..WriteBatch::default()
    };
    store.write(&batch).await.expect("write the deep stack");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_80k_frame_stack_is_served_in_every_format_without_crashing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = now_s() - 120;
    let store = store_with_a_deep_stack(dir.path(), t).await;
    let handle = Aggregator::start_with_store(settings(dir.path(), HttpLimits::default()), store).await.expect("start");
    let addr = handle.http_addr();
    let range = format!("from={}&to={}", t - 10, t + 10);
    for format in ["json", "folded", "pprof", "svg"] {
        let r = get(addr, &format!("/api/v1/profile?mode=cpu&format={format}&{range}")).await;
        assert_eq!(r.status, 200, "{format}: {}", String::from_utf8_lossy(&r.body[..r.body.len().min(300)]));
        assert!(r.body.len() > 80_000, "{format}: {} bytes", r.body.len());
    }
    let r = get(addr, &format!("/api/v1/flamegraph?mode=cpu&{range}")).await;
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(body.starts_with("{\"") && body.contains("\"count_unit\":\"samples\"") && body.ends_with("]}]}}"));
    let r = get(addr, &format!("/api/v1/top?mode=cpu&by=total&limit=3&{range}")).await;
    assert_eq!(r.json()["functions"][0]["total"], 5);
    // Still alive.
    assert_eq!(get(addr, "/healthz").await.status, 200);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_nosniff_and_a_content_security_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(dir.path(), HttpLimits::default());
    s.auth_token = Some("read-secret".into());
    let handle = Aggregator::start(s).await.expect("start");
    let addr = handle.http_addr();
    let auth = [("Authorization", "Bearer read-secret")];
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/health",
        "/nowhere",
        "/",
        "/api/v1/profile?mode=cpu",
        "/api/v1/profile?mode=cpu&format=svg",
        "/api/v1/profile?mode=gpu",
        "/api/v1/flamegraph?mode=cpu",
    ] {
        let r = get_with(addr, path, &auth).await;
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{path}");
        let csp = r.header("content-security-policy").unwrap_or_else(|| panic!("{path}: no CSP"));
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        if path.contains("svg") {
            assert_eq!(r.header("content-type"), Some("image/svg+xml"));
            assert!(!csp.contains("script-src"), "scripts in an SVG opened directly must not run: {csp}");
        }
    }
    let r = get(addr, "/api/v1/top?mode=cpu").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_is_accepted_with_the_scheme_in_any_case() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(dir.path(), HttpLimits::default());
    s.auth_token = Some("read-secret".into());
    let handle = Aggregator::start(s).await.expect("start");
    let addr = handle.http_addr();
    for (value, want) in [
        ("Bearer read-secret", 200),
        ("bearer read-secret", 200),
        ("BEARER read-secret", 200),
        ("Bearer push-secret", 401),
        ("Basic read-secret", 401),
    ] {
        let r = get_with(addr, "/api/v1/top?mode=cpu", &[("Authorization", value)]).await;
        assert_eq!(r.status, want, "{value}: {}", r.text());
    }
    handle.shutdown().await.expect("shutdown");
}

/// What a failing store says, with details no unauthenticated caller may see.
const SECRET_DETAIL: &str = "cannot open /srv/secret-volume/aperture.db as user svc-prof";

/// A store that is down: every call fails with [`SECRET_DETAIL`].
#[derive(Debug)]
struct DownStore;

fn down<T: Send + 'static>() -> StoreFuture<'static, Result<T, QueryError>> {
    Box::pin(async { Err(QueryError::Store { store: "sqlite", reason: SECRET_DETAIL.into() }) })
}

impl Store for DownStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }
    fn write<'a>(&'a self, _: &'a WriteBatch) -> StoreFuture<'a, Result<(), WriteError>> {
        Box::pin(async { Err(WriteError::Unavailable { store: "sqlite", reason: SECRET_DETAIL.into() }) })
    }
    fn load_ledger(&self, _: u64) -> StoreFuture<'_, Result<Vec<(RunKey, RunState)>, QueryError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn load_runs<'a>(&'a self, _: &'a [RunKey]) -> StoreFuture<'a, Result<Vec<(RunKey, RunState)>, QueryError>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn ping(&self) -> StoreFuture<'_, Result<(), QueryError>> {
        down()
    }
    fn stack_totals<'a>(&'a self, _: RowKind, _: &'a Selector) -> StoreFuture<'a, Result<Vec<StackTotal>, QueryError>> {
        down()
    }
    fn stacks<'a>(&'a self, _: &'a [StackHash]) -> StoreFuture<'a, Result<Vec<Stack>, QueryError>> {
        down()
    }
    fn syscall_totals<'a>(&'a self, _: &'a Selector) -> StoreFuture<'a, Result<Vec<SyscallTotal>, QueryError>> {
        down()
    }
    fn lock_totals<'a>(&'a self, _: &'a Selector) -> StoreFuture<'a, Result<Vec<LockTotal>, QueryError>> {
        down()
    }
    fn label_values<'a>(
        &'a self,
        _: LabelName,
        _: Option<Mode>,
        _: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        down()
    }
    fn tag_values<'a>(
        &'a self,
        _: &'a str,
        _: Option<Mode>,
        _: &'a Selector,
    ) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        down()
    }
    fn tag_keys<'a>(&'a self, _: Option<Mode>, _: &'a Selector) -> StoreFuture<'a, Result<Vec<String>, QueryError>> {
        down()
    }
    fn apply_retention(&self, _: u64) -> StoreFuture<'_, Result<RetentionReport, QueryError>> {
        down()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_health_endpoints_do_not_echo_store_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = settings(dir.path(), HttpLimits::default());
    s.auth_token = Some("read-secret".into());
    s.buffer_capacity_bytes = 64 * 1024;
    s.high_water_percent = 1;
    let handle = Aggregator::start_with_store(s, Arc::new(DownStore)).await.expect("start");
    let addr = handle.http_addr();
    // A frame the store cannot take keeps the buffer above its high-water mark.
    let ingress = handle.ingress();
    tokio::task::spawn_blocking(move || {
        use aperture_aggregator::IngressSink;
        let _ = ingress.admit(frame(frame_id(1, 1, 1), &batch("n1", now_s())));
    })
    .await
    .expect("push");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let r = get(addr, "/api/health").await;
        if r.json()["store"]["status"] == "down" && get(addr, "/readyz").await.status == 503 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "store never reported down: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = get(addr, "/readyz").await;
    assert!(ready.text().contains("unreachable"), "{}", ready.text());
    let health = get(addr, "/api/health").await;
    for (path, body) in [("/readyz", ready.text()), ("/api/health", health.text())] {
        assert!(!body.contains("secret-volume") && !body.contains("svc-prof"), "{path} leaks store details: {body}");
    }
    // The read token shows the details.
    let detailed = get_with(addr, "/api/health", &[("Authorization", "Bearer read-secret")]).await;
    assert!(detailed.json()["store"]["error"].as_str().unwrap_or_default().contains("secret-volume"));
    handle.abort();
}
