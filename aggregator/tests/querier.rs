//! Pyroscope's `querier.v1.QuerierService` over Connect, as Grafana's
//! Pyroscope data source calls it, against both stores: every method answers
//! requests shaped like Grafana's in JSON and in protobuf, the protobuf
//! answers decode with messages written from Pyroscope's `querier.proto`
//! and `types.proto`, and `SelectMergeStacktraces` gives the same flame
//! graph as `/api/v1/profile`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use aperture_aggregator::{Aggregator, Settings};
use common::http::{Response, get_with, post_with};
use common::{acks, batch, frame_id, now_s};
use prost::Message;
use serde_json::{Value, json};

const READ: &str = "read-secret";
const INGEST: &str = "push-secret";
const CPU: &str = "process_cpu:samples:count:cpu:nanoseconds";
const AGENT_CPU: &str = "cpu:samples:count:cpu:nanoseconds";
const AGENT_LOCK: &str = "lock:wait:nanoseconds:lock:count";

// Messages of `types/v1/types.proto` and `querier/v1/querier.proto`, every
// field the methods served carry, with Pyroscope's field numbers.

#[derive(Clone, PartialEq, prost::Message)]
struct LabelPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProfileType {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, tag = "4")]
    sample_type: String,
    #[prost(string, tag = "5")]
    sample_unit: String,
    #[prost(string, tag = "6")]
    period_type: String,
    #[prost(string, tag = "7")]
    period_unit: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProfileTypesRequest {
    #[prost(int64, tag = "1")]
    start: i64,
    #[prost(int64, tag = "2")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProfileTypesResponse {
    #[prost(message, repeated, tag = "1")]
    profile_types: Vec<ProfileType>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelValuesRequest {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, repeated, tag = "2")]
    matchers: Vec<String>,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelNamesRequest {
    #[prost(string, repeated, tag = "1")]
    matchers: Vec<String>,
    #[prost(int64, tag = "2")]
    start: i64,
    #[prost(int64, tag = "3")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NamesResponse {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SeriesRequest {
    #[prost(string, repeated, tag = "1")]
    matchers: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    label_names: Vec<String>,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Labels {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SeriesResponse {
    #[prost(message, repeated, tag = "2")]
    labels_set: Vec<Labels>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectMergeStacktracesRequest {
    #[prost(string, tag = "1")]
    profile_type_id: String,
    #[prost(string, tag = "2")]
    label_selector: String,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
    #[prost(int64, optional, tag = "5")]
    max_nodes: Option<i64>,
    #[prost(int32, tag = "6")]
    format: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Level {
    #[prost(int64, repeated, tag = "1")]
    values: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct FlameGraph {
    #[prost(string, repeated, tag = "1")]
    names: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    levels: Vec<Level>,
    #[prost(int64, tag = "3")]
    total: i64,
    #[prost(int64, tag = "4")]
    max_self: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectMergeStacktracesResponse {
    #[prost(message, optional, tag = "1")]
    flamegraph: Option<FlameGraph>,
    #[prost(bytes = "vec", tag = "2")]
    tree: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectSeriesRequest {
    #[prost(string, tag = "1")]
    profile_type_id: String,
    #[prost(string, tag = "2")]
    label_selector: String,
    #[prost(int64, tag = "3")]
    start: i64,
    #[prost(int64, tag = "4")]
    end: i64,
    #[prost(string, repeated, tag = "5")]
    group_by: Vec<String>,
    #[prost(double, tag = "6")]
    step: f64,
    #[prost(enumeration = "i32", optional, tag = "7")]
    aggregation: Option<i32>,
    #[prost(int64, optional, tag = "9")]
    limit: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Point {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Series {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    points: Vec<Point>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SelectSeriesResponse {
    #[prost(message, repeated, tag = "1")]
    series: Vec<Series>,
}

/// `google.v1.Profile` (pprof), the fields read here.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(message, repeated, tag = "4")]
    location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Location {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(message, repeated, tag = "4")]
    line: Vec<Line>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Line {
    #[prost(uint64, tag = "1")]
    function_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Function {
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(int64, tag = "2")]
    name: i64,
}

struct Client {
    addr: std::net::SocketAddr,
}

impl Client {
    async fn call(&self, method: &str, content_type: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {READ}");
        post_with(
            self.addr,
            &format!("/querier.v1.QuerierService/{method}"),
            &[("Authorization", &auth), ("Content-Type", content_type), ("Connect-Protocol-Version", "1")],
            body,
        )
        .await
    }

    /// A JSON call that must succeed.
    async fn json(&self, method: &str, body: Value) -> Value {
        let r = self.call(method, "application/json", body.to_string().as_bytes()).await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json()
    }

    /// A protobuf call that must succeed, decoded as `R`.
    async fn proto<R: Message + Default>(&self, method: &str, request: &impl Message) -> R {
        let r = self.call(method, "application/proto", &request.encode_to_vec()).await;
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/proto"));
        R::decode(&r.body[..]).expect("the answer decodes as the method's response message")
    }
}

/// Root-to-node paths of a Pyroscope flame graph, with (total, self).
fn flame_paths(names: &[String], levels: &[Vec<i64>]) -> BTreeMap<String, (i64, i64)> {
    let mut out = BTreeMap::new();
    // Per level: (x, total, path).
    let mut above: Vec<(i64, i64, String)> = Vec::new();
    for (depth, level) in levels.iter().enumerate() {
        let mut here = Vec::new();
        let mut end = 0;
        for node in level.chunks(4) {
            let x = end + node[0];
            let name = &names[node[3] as usize];
            let path = if depth == 0 {
                String::new()
            } else {
                let parent = above
                    .iter()
                    .find(|(px, pt, _)| *px <= x && x < px + pt)
                    .unwrap_or_else(|| panic!("node {name} at {x} has no parent"));
                if parent.2.is_empty() { name.clone() } else { format!("{};{name}", parent.2) }
            };
            if depth > 0 {
                out.insert(path.clone(), (node[1], node[2]));
            }
            here.push((x, node[1], path));
            end = x + node[1];
        }
        above = here;
    }
    out
}

/// The same from `/api/v1/profile`'s JSON tree.
fn api_paths(root: &Value) -> BTreeMap<String, (i64, i64)> {
    let mut out = BTreeMap::new();
    let mut todo: Vec<(String, &Value)> = vec![(String::new(), root)];
    while let Some((path, node)) = todo.pop() {
        for child in node["children"].as_array().into_iter().flatten() {
            let name = child["name"].as_str().unwrap_or_default();
            let p = if path.is_empty() { name.to_owned() } else { format!("{path};{name}") };
            out.insert(p.clone(), (child["value"].as_i64().unwrap_or(-1), child["self"].as_i64().unwrap_or(-1)));
            todo.push((p, child));
        }
    }
    out
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().into_iter().flatten().map(|x| x.as_str().and_then(|s| s.parse().ok()).unwrap_or(-1)).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|x| x.as_str().unwrap_or_default().to_owned()).collect()
}

async fn suite(mut settings: Settings) {
    settings.auth_token = Some(READ.into());
    settings.ingest_token = Some(INGEST.into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let client = Client { addr };
    let received = acks(&handle);
    let t = now_s() - 600;
    let (t1, t2) = (t - t % 60, t - t % 60 + 120);
    let (start, end) = ((t1 - 60) as i64 * 1000, (t2 + 120) as i64 * 1000);

    // Pushed CPU profiles of two services, and the agent's data.
    let bearer = format!("Bearer {INGEST}");
    for (name, from, body) in [
        ("checkout%7Benv%3Dprod%7D", t1, "main;serve;parse 30\nmain;serve;render 10\nmain;idle 5\n"),
        ("checkout%7Benv%3Ddev%7D", t2, "main;serve;parse 7\n"),
        ("search%7Benv%3Dprod%7D", t1, "main;query 4\n"),
    ] {
        let r = post_with(
            addr,
            &format!("/ingest?name={name}&from={from}&format=folded"),
            &[("Authorization", &bearer)],
            body.as_bytes(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ingress = handle.ingress();
    let id = frame_id(1, 1, 1);
    tokio::task::spawn_blocking(move || {
        common::push(&ingress, id, &batch("node-a", t1));
        received.wait_for(&[id], Duration::from_secs(60));
    })
    .await
    .expect("agent data");

    // ProfileTypes: the agent's modes and the pushed type.
    let v = client.json("ProfileTypes", json!({ "start": start.to_string(), "end": end.to_string() })).await;
    let types = v["profileTypes"].as_array().expect("profileTypes");
    let ids: Vec<&str> = types.iter().filter_map(|t| t["ID"].as_str()).collect();
    assert!(ids.contains(&CPU) && ids.contains(&AGENT_CPU), "{v}");
    let pushed = types.iter().find(|t| t["ID"] == CPU).expect("pushed type");
    assert_eq!(pushed["name"], "process_cpu");
    assert_eq!(pushed["sampleType"], "samples");
    assert_eq!(pushed["periodUnit"], "nanoseconds");
    let pb: ProfileTypesResponse = client.proto("ProfileTypes", &ProfileTypesRequest { start, end }).await;
    let cpu = pb.profile_types.iter().find(|t| t.id == CPU).expect("pushed type in protobuf");
    assert_eq!(
        (cpu.name.as_str(), cpu.sample_unit.as_str(), cpu.period_type.as_str()),
        ("process_cpu", "count", "cpu")
    );

    // LabelNames: the pushed type has a service and tags, no pods.
    let of_type = format!("{{__profile_type__=\"{CPU}\"}}");
    let v = client
        .json("LabelNames", json!({ "matchers": [of_type], "start": start.to_string(), "end": end.to_string() }))
        .await;
    let names = strings(&v["names"]);
    assert!(names.contains(&"service_name".to_owned()) && names.contains(&"__name__".to_owned()), "{v}");
    assert!(!names.contains(&"pod".to_owned()), "{v}");
    assert!(names.contains(&"env".to_owned()), "tag keys are label names: {v}");
    let pb: NamesResponse = client.proto("LabelNames", &LabelNamesRequest { matchers: vec![], start, end }).await;
    assert!(pb.names.contains(&"pod".to_owned()) && pb.names.contains(&"service_name".to_owned()), "{:?}", pb.names);
    let pb: NamesResponse = client
        .proto(
            "LabelNames",
            &LabelNamesRequest { matchers: vec![format!("{{__profile_type__=\"{AGENT_CPU}\"}}")], start, end },
        )
        .await;
    assert!(pb.names.contains(&"pod".to_owned()) && !pb.names.contains(&"env".to_owned()), "{:?}", pb.names);
    assert!(!pb.names.contains(&"lock_class".to_owned()), "CPU profiles have no lock class: {:?}", pb.names);
    // Lock profiles have a class per wait, listed and valued like any label.
    let of_lock = format!("{{__profile_type__=\"{AGENT_LOCK}\"}}");
    let pb: NamesResponse =
        client.proto("LabelNames", &LabelNamesRequest { matchers: vec![of_lock.clone()], start, end }).await;
    assert!(pb.names.contains(&"lock_class".to_owned()), "{:?}", pb.names);
    let v =
        client.json("LabelNames", json!({ "matchers": [], "start": start.to_string(), "end": end.to_string() })).await;
    assert!(strings(&v["names"]).contains(&"lock_class".to_owned()), "{v}");
    let pb: NamesResponse = client
        .proto("LabelValues", &LabelValuesRequest { name: "lock_class".into(), matchers: vec![of_lock], start, end })
        .await;
    assert_eq!(pb.names, ["mutex"]);
    let pb: NamesResponse = client
        .proto(
            "LabelValues",
            &LabelValuesRequest {
                name: "lock_class".into(),
                matchers: vec![format!("{{__profile_type__=\"{AGENT_CPU}\"}}")],
                start,
                end,
            },
        )
        .await;
    assert!(pb.names.is_empty(), "{:?}", pb.names);

    // LabelValues: services, tags, types, the agent's labels.
    let v = client
        .json(
            "LabelValues",
            json!({ "name": "service_name", "matchers": [of_type], "start": start.to_string(), "end": end.to_string() }),
        )
        .await;
    assert_eq!(strings(&v["names"]), ["checkout", "search"]);
    let pb: NamesResponse = client
        .proto(
            "LabelValues",
            &LabelValuesRequest {
                name: "env".into(),
                matchers: vec!["{service_name=\"checkout\"}".into()],
                start,
                end,
            },
        )
        .await;
    assert_eq!(pb.names, ["dev", "prod"]);
    let pb: NamesResponse =
        client.proto("LabelValues", &LabelValuesRequest { name: "pod".into(), matchers: vec![], start, end }).await;
    assert_eq!(pb.names, ["api-1", "db-0"]);
    let v = client
        .json("LabelValues", json!({ "name": "__profile_type__", "start": start.to_string(), "end": end.to_string() }))
        .await;
    assert!(strings(&v["names"]).contains(&CPU.to_owned()), "{v}");
    let v = client
        .json(
            "LabelValues",
            json!({ "name": "__profile_type__", "matchers": ["{service_name=\"checkout\"}"],
                    "start": start.to_string(), "end": end.to_string() }),
        )
        .await;
    assert_eq!(strings(&v["names"]), [CPU], "only the types with data of the service");
    let v = client
        .json(
            "LabelValues",
            json!({ "name": "__name__", "matchers": ["{pod=\"api-1\"}"], "start": start.to_string(), "end": end.to_string() }),
        )
        .await;
    assert_eq!(strings(&v["names"]), ["cpu", "lock", "syscall"], "the agent's types with data of the pod");

    // Series: one label set per type and service.
    let v = client
        .json(
            "Series",
            json!({ "matchers": ["{service_name=\"checkout\"}"], "labelNames": ["service_name", "__profile_type__"],
                    "start": start.to_string(), "end": end.to_string() }),
        )
        .await;
    assert_eq!(
        v["labelsSet"],
        json!([{ "labels": [{ "name": "__profile_type__", "value": CPU }, { "name": "service_name", "value": "checkout" }] }])
    );
    let pb: SeriesResponse = client
        .proto("Series", &SeriesRequest { matchers: vec![of_type.clone()], label_names: vec![], start, end })
        .await;
    let services: Vec<String> = pb
        .labels_set
        .iter()
        .flat_map(|s| s.labels.iter().filter(|l| l.name == "service_name").map(|l| l.value.clone()))
        .collect();
    assert_eq!(services, ["checkout", "search"]);

    // SelectMergeStacktraces, as Grafana asks for it.
    let v = client
        .json(
            "SelectMergeStacktraces",
            json!({ "profileTypeID": CPU, "labelSelector": "{service_name=\"checkout\"}",
                    "start": start.to_string(), "end": end.to_string(), "maxNodes": "16384" }),
        )
        .await;
    let fg = &v["flamegraph"];
    assert_eq!(fg["total"], "52");
    assert_eq!(fg["names"][0], "total");
    let levels: Vec<Vec<i64>> = fg["levels"].as_array().expect("levels").iter().map(|l| ints(&l["values"])).collect();
    let paths = flame_paths(&strings(&fg["names"]), &levels);
    assert_eq!(paths.get("main;serve;parse"), Some(&(37, 37)));
    assert_eq!(paths.get("main"), Some(&(52, 0)));
    // The same as /api/v1/profile over the same data, for a pushed and an agent type.
    for (type_id, selector, params) in [
        (CPU, "{service_name=\"checkout\", env=\"prod\"}", "service=checkout&tag.env=prod"),
        (AGENT_CPU, "{pod=\"api-1\"}", "pod=api-1"),
        (AGENT_CPU, "{}", "node=node-a"),
    ] {
        let pb: SelectMergeStacktracesResponse = client
            .proto(
                "SelectMergeStacktraces",
                &SelectMergeStacktracesRequest {
                    profile_type_id: type_id.into(),
                    label_selector: selector.into(),
                    start,
                    end,
                    max_nodes: Some(16384),
                    format: 0,
                },
            )
            .await;
        let fg = pb.flamegraph.expect("flamegraph");
        let levels: Vec<Vec<i64>> = fg.levels.iter().map(|l| l.values.clone()).collect();
        let r = get_with(
            addr,
            &format!("/api/v1/profile?type={type_id}&{params}&from={}&to={}", start / 1000, end / 1000),
            &[("Authorization", &format!("Bearer {READ}"))],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let api = r.json();
        assert!(fg.total > 0, "{type_id} {selector}: empty");
        assert_eq!(fg.total, api["root"]["value"].as_i64().unwrap_or(-1), "{type_id} {selector}");
        assert_eq!(flame_paths(&fg.names, &levels), api_paths(&api["root"]), "{type_id} {selector}");
    }
    // maxNodes keeps the largest nodes; what is left out stays in the parent's self.
    let pb: SelectMergeStacktracesResponse = client
        .proto(
            "SelectMergeStacktraces",
            &SelectMergeStacktracesRequest {
                profile_type_id: CPU.into(),
                label_selector: "{service_name=\"checkout\"}".into(),
                start,
                end,
                max_nodes: Some(3),
                format: 0,
            },
        )
        .await;
    let fg = pb.flamegraph.expect("flamegraph");
    let paths = flame_paths(&fg.names, &fg.levels.iter().map(|l| l.values.clone()).collect::<Vec<_>>());
    assert_eq!(paths.keys().collect::<Vec<_>>(), ["main", "main;serve"]);
    assert_eq!(paths["main"], (52, 5));
    assert_eq!(paths["main;serve"], (47, 47));

    // SelectSeries grouped by a tag, one-minute steps.
    let v = client
        .json(
            "SelectSeries",
            json!({ "profileTypeID": CPU, "labelSelector": "{service_name=\"checkout\"}", "start": start.to_string(),
                    "end": end.to_string(), "groupBy": ["env"], "step": 60.0 }),
        )
        .await;
    assert_eq!(
        v["series"],
        json!([
            { "labels": [{ "name": "env", "value": "dev" }], "points": [{ "value": 7.0, "timestamp": (t2 * 1000).to_string() }] },
            { "labels": [{ "name": "env", "value": "prod" }], "points": [{ "value": 45.0, "timestamp": (t1 * 1000).to_string() }] },
        ])
    );
    let pb: SelectSeriesResponse = client
        .proto(
            "SelectSeries",
            &SelectSeriesRequest {
                profile_type_id: AGENT_CPU.into(),
                label_selector: "{}".into(),
                start,
                end,
                group_by: vec!["pod".into()],
                step: 60.0,
                aggregation: None,
                limit: Some(1),
            },
        )
        .await;
    // The top series: api-1's 3 samples.
    assert_eq!(pb.series.len(), 1);
    assert_eq!(pb.series[0].labels, [LabelPair { name: "pod".into(), value: "api-1".into() }]);
    assert_eq!(pb.series[0].points, [Point { value: 3.0, timestamp: (t1 * 1000) as i64 }]);

    // SelectMergeProfile: pprof.
    let request = SelectMergeStacktracesRequest {
        profile_type_id: CPU.into(),
        label_selector: "{service_name=\"checkout\"}".into(),
        start,
        end,
        max_nodes: None,
        format: 0,
    };
    let p: Profile = client.proto("SelectMergeProfile", &request).await;
    assert_eq!(p.sample.iter().map(|s| s.value[0]).sum::<i64>(), 52);
    assert_eq!(p.string_table[p.sample_type[0].r#type as usize], "samples");
    let leaf = |s: &Sample| {
        let loc = p.location.iter().find(|l| l.id == s.location_id[0]).expect("location");
        let f = p.function.iter().find(|f| f.id == loc.line[0].function_id).expect("function");
        p.string_table[f.name as usize].clone()
    };
    let parse: i64 = p.sample.iter().filter(|s| leaf(s) == "parse").map(|s| s.value[0]).sum();
    assert_eq!(parse, 37);
    let v = client
        .json(
            "SelectMergeProfile",
            json!({ "profileTypeID": CPU, "labelSelector": "{service_name=\"checkout\"}",
                    "start": start.to_string(), "end": end.to_string() }),
        )
        .await;
    assert!(strings(&v["stringTable"]).contains(&"parse".to_owned()), "{v}");
    assert_eq!(v["sample"].as_array().map(Vec::len), Some(p.sample.len()));

    // /pyroscope/render: the same flame graph as flamebearer JSON, with its timeline.
    let render = format!(
        "/pyroscope/render?query={CPU}%7Bservice_name%3D%22checkout%22%7D&from={}&until={}&format=json",
        start / 1000,
        end / 1000
    );
    let r = get_with(addr, &render, &[("Authorization", &format!("Bearer {READ}"))]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["flamebearer"]["numTicks"], 52);
    assert_eq!(v["metadata"]["format"], "single");
    assert_eq!(v["metadata"]["units"], "samples");
    let names = strings(&v["flamebearer"]["names"]);
    let levels: Vec<Vec<i64>> = v["flamebearer"]["levels"]
        .as_array()
        .expect("levels")
        .iter()
        .map(|l| l.as_array().into_iter().flatten().map(|x| x.as_i64().unwrap_or(-1)).collect())
        .collect();
    assert_eq!(flame_paths(&names, &levels).get("main;serve;parse"), Some(&(37, 37)));
    let step = v["timeline"]["durationDelta"].as_u64().expect("durationDelta");
    let samples: Vec<u64> =
        v["timeline"]["samples"].as_array().expect("samples").iter().filter_map(Value::as_u64).collect();
    assert_eq!(samples.iter().sum::<u64>(), 52);
    let first = v["timeline"]["startTime"].as_u64().expect("startTime");
    let at = |i: usize| first + i as u64 * step;
    let nonzero: Vec<(u64, u64)> =
        samples.iter().enumerate().filter(|(_, s)| **s > 0).map(|(i, s)| (at(i), *s)).collect();
    assert_eq!(nonzero, [(t1, 45), (t2, 7)]);
    let r = get_with(addr, &render, &[]).await;
    assert_eq!(r.status, 401);

    let r = post_with(addr, "/querier.v1.QuerierService/ProfileTypes", &[("Content-Type", "application/json")], b"{}")
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["code"], "unauthenticated");
    let r = client
        .call(
            "SelectMergeStacktraces",
            "application/json",
            json!({ "profileTypeID": CPU, "labelSelector": "{service_name=~\"(a\"}" }).to_string().as_bytes(),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["code"], "invalid_argument");
    assert!(r.json()["message"].as_str().unwrap_or_default().contains("regular expression"), "{}", r.text());
    let r = client
        .call("SelectMergeStacktraces", "application/json", json!({ "profileTypeID": "cpu" }).to_string().as_bytes())
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = client.call("SelectHeatmap", "application/json", b"{}").await;
    assert_eq!(r.status, 501, "{}", r.text());
    assert_eq!(r.json()["code"], "unimplemented");
    let r = client.call("ProfileTypes", "text/plain", b"{}").await;
    assert_eq!(r.status, 415, "{}", r.text());
    let r = client.call("Series", "application/proto", b"\xff\xff\xff").await;
    assert_eq!(r.status, 400, "{}", r.text());

    handle.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn querier_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    suite(common::settings(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn querier_clickhouse() {
    let Some((server, _dir, settings)) = common::clickhouse_settings("querier_clickhouse").await else { return };
    suite(settings).await;
    drop(server);
}
