//! A real Pyroscope client: the `pyroscope-io` package from PyPI (its
//! native agent pushes gzipped pprof over `push.v1.PusherService/Push`
//! with basic auth) profiles a Python program with known function names;
//! they come out of `/api/v1/profile` under its service and tags.
//!
//! Needs python3 with `pyroscope-io` installed (`.ci/run` installs it in a
//! virtual environment and sets `APERTURE_TEST_PYTHON`); skipped otherwise.

mod common;

use std::time::{Duration, Instant};

use aperture_aggregator::Aggregator;
use common::folded;
use common::http::get;

const TOKEN: &str = "sdk-push-secret";
const APP: &str = "aperture-python-sdk-test";

/// Burns CPU in two known functions for a few seconds, then flushes.
const PROGRAM: &str = r#"
import os, sys, time
import pyroscope

pyroscope.configure(
    application_name=sys.argv[2],
    server_address=sys.argv[1],
    basic_auth_username="sdk",
    basic_auth_password=os.environ["APERTURE_TEST_TOKEN"],
    tags={"env": "ci", "team": "profiling"},
    upload_interval=1,
    sample_rate=100,
)

def aperture_known_leaf(n):
    x = 0
    for i in range(n):
        x += i * i
    return x

def aperture_known_caller(deadline):
    while time.time() < deadline:
        aperture_known_leaf(20000)

aperture_known_caller(time.time() + 4)
time.sleep(1.5)
pyroscope.shutdown()
"#;

/// The python to use and whether it has the package; `None` after reporting the skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_pushes_profiles_stored_under_its_service_and_tags() {
    let test = "the_python_sdk_pushes_profiles_stored_under_its_service_and_tags";
    let Some(python) = common::python_with(test, "import pyroscope", "pip install pyroscope-io") else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.ingest_token = Some(TOKEN.into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let out = tokio::process::Command::new(&python)
        .args(["-c", PROGRAM, &format!("http://{addr}"), APP])
        .env("APERTURE_TEST_TOKEN", TOKEN)
        .output()
        .await
        .expect("run the Python program");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Python program failed: {log}");

    // The SDK's last upload may still be in flight when it exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    let types = loop {
        let r = get(addr, &format!("/api/v1/labels/type/values?from=-10m&service={APP}")).await;
        let types: Vec<String> = r.json()["values"]
            .as_array()
            .map(|v| v.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if !types.is_empty() || Instant::now() > deadline {
            break types;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let m = get(addr, "/metrics").await.text();
    assert!(!types.is_empty(), "nothing stored for {APP}; push metrics: {}; SDK output: {log}", {
        m.lines().filter(|l| l.starts_with("aperture_push")).collect::<Vec<_>>().join(" | ")
    });
    let cpu =
        types.iter().find(|t| t.starts_with("process_cpu:")).unwrap_or_else(|| panic!("no CPU type in {types:?}"));
    let stacks = folded(addr, &format!("type={cpu}&service={APP}")).await;
    let known = stacks.lines().find(|l| l.contains("aperture_known_caller;aperture_known_leaf"));
    assert!(known.is_some(), "the known functions, caller then leaf, are not in the profile:\n{stacks}");
    assert_eq!(folded(addr, &format!("type={cpu}&service={APP}&tag.env=ci&tag.team=profiling")).await, stacks);
    assert_eq!(folded(addr, &format!("type={cpu}&service={APP}&tag.env=prod")).await, "");
    let r = get(addr, &format!("/api/v1/labels/tag.team/values?from=-10m&service={APP}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["profiling"]));
    let r = get(addr, &format!("/api/v1/top?type={cpu}&service={APP}&by=total&from=-10m&limit=50")).await;
    let top = r.json();
    let names: Vec<&str> =
        top["functions"].as_array().map(|f| f.iter().filter_map(|x| x["name"].as_str()).collect()).unwrap_or_default();
    assert!(names.contains(&"aperture_known_leaf"), "{names:?}");
    handle.shutdown().await.expect("shutdown");
}
