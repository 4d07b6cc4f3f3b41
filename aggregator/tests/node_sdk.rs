//! A real Pyroscope client: `@pyroscope/nodejs` from npm (it pushes
//! gzipped pprof to `/ingest` with a bearer token; its tags ride in `name`,
//! and `wrapWithLabels` puts pprof labels on samples) profiles a Node
//! program with known function names; they come out of `/api/v1/profile`
//! under its service, its tags and its labels.
//!
//! Needs node (`APERTURE_TEST_NODE`, default `node`) and `@pyroscope/nodejs`
//! installed (`.ci/run` installs it with npm into a fixed directory and sets
//! `APERTURE_TEST_NODE_MODULES` to its `node_modules`); skipped otherwise.
//! The program is an ES module (linked to those modules), which the SDK's
//! CommonJS build cannot be loaded as on Node 18, Debian 12's.

mod common;

use std::time::{Duration, Instant};

use aperture_aggregator::Aggregator;
use common::folded;
use common::http::get;

const TOKEN: &str = "sdk-node-secret";
const APP: &str = "aperture-node-sdk-test";
const WALL: &str = "wall:samples:count:wall:nanoseconds";

/// Burns CPU in two known functions for a few seconds under a label, then
/// stops the profiler (which uploads what is left).
const PROGRAM: &str = r#"
import Pyroscope from '@pyroscope/nodejs';
const [server, app, token] = process.argv.slice(2);
Pyroscope.init({
  serverAddress: server,
  appName: app,
  authToken: token,
  tags: { env: 'ci', team: 'profiling' },
  flushIntervalMs: 1000,
});
Pyroscope.start();
function aperture_known_leaf(n) {
  let x = 0;
  for (let i = 0; i < n; i++) { x += Math.sqrt(i * i + x); }
  return x;
}
function aperture_known_caller(deadline) {
  let s = 0;
  while (Date.now() < deadline) { s += aperture_known_leaf(20000); }
  return s;
}
Pyroscope.wrapWithLabels({ handler: 'checkout' }, () => aperture_known_caller(Date.now() + 4000));
Pyroscope.stop().then(() => console.log('stopped'), (e) => { console.error(e); process.exit(1); });
"#;

/// The node to run when it can load the SDK from `dir` (whose
/// `node_modules` is linked to the installed modules); `None` after
/// reporting the skip.
fn node(test: &str, dir: &std::path::Path) -> Option<String> {
    let node = std::env::var("APERTURE_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
    let modules = std::env::var("APERTURE_TEST_NODE_MODULES").unwrap_or_default();
    if !std::path::Path::new(&modules).join("@pyroscope/nodejs").is_dir() {
        aperture_testkit::skip(
            test,
            &format!(
                "APERTURE_TEST_NODE_MODULES={modules:?} holds no @pyroscope/nodejs (npm install --prefix DIR \
                 @pyroscope/nodejs@0.6, then set it to DIR/node_modules)"
            ),
        );
        return None;
    }
    std::os::unix::fs::symlink(&modules, dir.join("node_modules")).expect("link node_modules");
    match std::process::Command::new(&node)
        .args(["--input-type=module", "-e", "await import('@pyroscope/nodejs')"])
        .current_dir(dir)
        .output()
    {
        Ok(out) if out.status.success() => Some(node),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let why = stderr.lines().find(|l| l.contains("Error")).unwrap_or(&stderr).to_owned();
            aperture_testkit::skip(test, &format!("{node} cannot load @pyroscope/nodejs from {modules}: {why}"));
            None
        }
        Err(e) => {
            aperture_testkit::skip(test, &format!("cannot run {node}: {e}"));
            None
        }
    }
}

/// Whether a stack has the caller, then (deeper) the leaf. The SDK names
/// functions `<file>:<name>:<line>`.
fn has_known(stacks: &str) -> bool {
    stacks.lines().any(|l| {
        let caller = l.find("aperture_known_caller");
        let leaf = l.rfind("aperture_known_leaf");
        matches!((caller, leaf), (Some(c), Some(f)) if c < f)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_sdk_pushes_profiles_stored_under_its_service_tags_and_labels() {
    let test = "the_node_sdk_pushes_profiles_stored_under_its_service_tags_and_labels";
    let dir = tempfile::tempdir().expect("temp dir");
    let Some(node) = node(test, dir.path()) else { return };
    let program = dir.path().join("program.mjs");
    std::fs::write(&program, PROGRAM).expect("write the program");
    let mut settings = common::settings(dir.path());
    settings.ingest_token = Some(TOKEN.into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let out = tokio::process::Command::new(&node)
        .arg(&program)
        .args([&format!("http://{addr}"), APP, TOKEN])
        .current_dir(dir.path())
        .env("DEBUG", "pyroscope*")
        .output()
        .await
        .expect("run the Node program");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Node program failed: {log}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let types = loop {
        let r = get(addr, &format!("/api/v1/labels/type/values?from=-10m&service={APP}")).await;
        let types: Vec<String> = r.json()["values"]
            .as_array()
            .map(|v| v.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if types.iter().any(|t| t == WALL) || Instant::now() > deadline {
            break types;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let m = get(addr, "/metrics").await.text();
    // Named as Pyroscope names the SDK's wall profile.
    assert!(types.iter().any(|t| t == "wall:wall:nanoseconds:wall:nanoseconds"), "{types:?}");
    let wall = types.iter().find(|t| *t == WALL).unwrap_or_else(|| {
        panic!(
            "no wall profile for {APP} in {types:?}; push metrics: {}; SDK output: {log}",
            m.lines().filter(|l| l.starts_with("aperture_push")).collect::<Vec<_>>().join(" | ")
        )
    });
    let stacks = folded(addr, &format!("type={wall}&service={APP}")).await;
    assert!(has_known(&stacks), "the known functions, caller then leaf, are not in the profile:\n{stacks}");

    // Tags from `init({tags})`, sent in `name`.
    assert_eq!(folded(addr, &format!("type={wall}&service={APP}&tag.env=ci&tag.team=profiling")).await, stacks);
    assert_eq!(folded(addr, &format!("type={wall}&service={APP}&tag.env=prod")).await, "");
    let r = get(addr, &format!("/api/v1/labels/tag.team/values?from=-10m&service={APP}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["profiling"]));

    // The label from `wrapWithLabels`, sent as pprof labels on samples.
    let labelled = folded(addr, &format!("type={wall}&service={APP}&tag.handler=checkout&tag.env=ci")).await;
    assert!(has_known(&labelled), "the labelled samples lack the known functions:\n{labelled}");
    assert_eq!(folded(addr, &format!("type={wall}&service={APP}&tag.handler=refund")).await, "");
    let r = get(addr, &format!("/api/v1/labels/tag.handler/values?from=-10m&service={APP}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["checkout"]));
    handle.shutdown().await.expect("shutdown");
}
