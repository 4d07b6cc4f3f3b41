//! OTLP export: the aggregator forwards what it commits to an OTLP
//! profiles endpoint. The receiver is a real one, a `grpcio` server with the
//! `opentelemetry-proto` package from PyPI, which prints what it got; a
//! profile pushed to the aggregator arrives there with its stack, value,
//! type and labels as resource attributes, and the configured token, after
//! a retry the receiver asked for.
//!
//! Needs python3 with `opentelemetry-proto` and `grpcio` (`.ci/run` installs
//! them and sets `APERTURE_TEST_PYTHON`); skipped otherwise.

mod common;

use std::time::Duration;

use aperture_aggregator::{Aggregator, OtlpExportSettings};
use common::http::{get, post_with};
use tokio::io::{AsyncBufReadExt, BufReader};

const TOKEN: &str = "push-secret";
const DOWNSTREAM: &str = "downstream-secret";

/// Serves `ProfilesService/Export` on a free port, prints `{"port": n}`,
/// then one JSON line per request: its authorization and its samples with
/// resolved function names (leaf first) and resource attributes. The first
/// call is answered `UNAVAILABLE`, as an overloaded receiver would.
const RECEIVER: &str = r#"
import json
from concurrent import futures
import grpc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2 as svc
from opentelemetry.proto.collector.profiles.v1development import profiles_service_pb2_grpc as svc_grpc

def value(v):
    return v.string_value if v.HasField("string_value") else v.int_value

class Receiver(svc_grpc.ProfilesServiceServicer):
    calls = 0
    def Export(self, request, context):
        Receiver.calls += 1
        if Receiver.calls == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        d = request.dictionary
        s = d.string_table
        samples = []
        for rp in request.resource_profiles:
            attrs = {kv.key: value(kv.value) for kv in rp.resource.attributes}
            for sp in rp.scope_profiles:
                for p in sp.profiles:
                    ty = s[p.sample_type.type_strindex] + ":" + s[p.sample_type.unit_strindex]
                    for smp in p.samples:
                        locs = [d.location_table[i] for i in d.stack_table[smp.stack_index].location_indices]
                        stack = [s[d.function_table[l.lines[0].function_index].name_strindex] for l in locs]
                        samples.append({"attrs": attrs, "type": ty, "stack": stack, "value": sum(smp.values)})
        auth = dict(context.invocation_metadata()).get("authorization")
        print(json.dumps({"auth": auth, "samples": samples}), flush=True)
        return svc.ExportProfilesServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
svc_grpc.add_ProfilesServiceServicer_to_server(Receiver(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(json.dumps({"port": port}), flush=True)
server.wait_for_termination()
"#;

fn python(test: &str) -> Option<String> {
    common::python_with(
        test,
        "import grpc, opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc",
        "pip install opentelemetry-proto grpcio",
    )
}

type Lines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// The receiver's next line, as JSON.
async fn next(lines: &mut Lines) -> serde_json::Value {
    let line =
        tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.expect("the receiver printed nothing");
    serde_json::from_str(&line.expect("read").expect("a line")).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_profiles_reach_an_otlp_receiver() {
    let test = "committed_profiles_reach_an_otlp_receiver";
    let Some(python) = python(test) else { return };
    let mut receiver = tokio::process::Command::new(&python)
        .args(["-u", "-c", RECEIVER])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the receiver");
    let mut lines = BufReader::new(receiver.stdout.take().expect("stdout")).lines();
    let port = next(&mut lines).await["port"].as_u64().expect("port");

    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.ingest_token = Some(TOKEN.into());
    settings.otlp_export = Some(OtlpExportSettings {
        token: DOWNSTREAM.into(),
        min_backoff: Duration::from_millis(50),
        ..OtlpExportSettings::new(format!("http://127.0.0.1:{port}"))
    });
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let r = post_with(
        addr,
        "/ingest?name=exported.app.cpu%7Benv%3Dci%7D&format=folded",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"main;work 5\nmain;idle 2\n",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let got = next(&mut lines).await;
    assert_eq!(got["auth"], format!("Bearer {DOWNSTREAM}"), "{got}");
    let mut samples: Vec<(Vec<String>, u64)> = got["samples"]
        .as_array()
        .expect("samples")
        .iter()
        .map(|s| {
            assert_eq!(s["attrs"]["service.name"], "exported.app", "{s}");
            assert_eq!(s["attrs"]["env"], "ci", "{s}");
            assert_eq!(s["type"], "samples:count", "{s}");
            let stack = s["stack"].as_array().expect("stack").iter().map(|f| f.as_str().unwrap_or("").to_owned());
            (stack.collect(), s["value"].as_u64().expect("value"))
        })
        .collect();
    samples.sort();
    let want = |a: &str, n: u64| (vec![a.to_owned(), "main".to_owned()], n);
    assert_eq!(samples, [want("idle", 2), want("work", 5)], "leaf first, as committed");

    // The receiver prints before it answers: wait for the answer to be counted.
    let want = [
        "aperture_otlp_export_requests_total{result=\"retry\"} 1",
        "aperture_otlp_export_requests_total{result=\"ok\"} 1",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(addr, "/metrics").await.text();
        if want.iter().all(|w| metrics.lines().any(|l| l == *w)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{want:?} not in {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.shutdown().await.expect("shutdown");
}
