//! The Go SDK's `/ingest` requests (pyroscope-go 1.x's `upstream/remote`),
//! byte for byte as Go's `mime/multipart` writer builds them: a `profile`
//! part with gzipped pprof, the `sample_type_config` part that tells mutex
//! from block profiles, pprof labels from `pprof.Do` that become tags, and
//! the refusals of what is not supported.

mod common;

use aperture_aggregator::Aggregator;
use common::http::{get, post_with};
use common::now_s;
use common::pprof::{gzip, pprof, pprof_labelled};

const TOKEN: &str = "go-sdk-secret";
/// What Go's `multipart.Writer` draws: 30 random bytes in hex.
const BOUNDARY: &str = "9b1e5f0c3a7d2e8b4c6f1a0d5e9b3c7f2a8d4e6b1c0f5a9e3d7b2c8f4a6e";

const HEAP_CONFIG: &str = r#"{"alloc_objects":{"units":"objects"},"alloc_space":{"units":"bytes"},"inuse_objects":{"units":"objects","aggregation":"average"},"inuse_space":{"units":"bytes","aggregation":"average"}}"#;
const MUTEX_CONFIG: &str = r#"{"contentions":{"units":"lock_samples","display-name":"mutex_count"},"delay":{"units":"lock_nanoseconds","display-name":"mutex_duration"}}"#;
const BLOCK_CONFIG: &str = r#"{"contentions":{"units":"lock_samples","display-name":"block_count"},"delay":{"units":"lock_nanoseconds","display-name":"block_duration"}}"#;

/// The body of `uploadProfile`: `CreateFormFile` parts, then `Close`.
fn form(parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, (name, file, data)) in parts.iter().enumerate() {
        let lead = if i == 0 { "" } else { "\r\n" };
        body.extend_from_slice(
            format!(
                "{lead}--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
    }
    body.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    body
}

/// The URL of `uploadProfile`: Go's `url.Values.Encode` sorts the keys;
/// `from` and `until` are Unix nanoseconds.
fn ingest_url(name: &str, t: u64) -> String {
    let ns = t * 1_000_000_000;
    format!(
        "/ingest?aggregationType=&from={ns}&name={}&sampleRate=100&spyName=gospy&units=&until={}",
        name.replace('{', "%7B").replace('}', "%7D").replace('=', "%3D").replace(',', "%2C"),
        ns + 10_000_000_000
    )
}

async fn folded(addr: std::net::SocketAddr, query: &str) -> String {
    let r = get(addr, &format!("/api/v1/profile?format=folded&{query}")).await;
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    r.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_sdk_multipart_form_is_stored_as_its_profile_types() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = common::settings(dir.path());
    settings.ingest_token = Some(TOKEN.into());
    let handle = Aggregator::start(settings).await.expect("start");
    let addr = handle.http_addr();
    let t = now_s() - 120;
    let range = format!("from={}&to={}", t - 60, t + 60);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let bearer = format!("Bearer {TOKEN}");
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", content_type.as_str())];
    let name = "goapp{env=prod,region=eu}";

    // The heap profile: four sample types and their configuration.
    let heap = gzip(&pprof(
        &[("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")],
        ("space", "bytes"),
        &[(&["main", "serve", "parse"], &[3, 4096, 1, 512])],
        t,
    ));
    let body = form(&[
        ("profile", "profile.pprof", &heap),
        ("sample_type_config", "sample_type_config.json", HEAP_CONFIG.as_bytes()),
    ]);
    let r = post_with(addr, &ingest_url(name, t), &headers, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let alloc = format!("type=memory:alloc_space:bytes:space:bytes&service=goapp&tag.env=prod&{range}");
    assert_eq!(folded(addr, &alloc).await, "main;serve;parse 4096\n");
    assert_eq!(
        folded(addr, &format!("type=memory:inuse_space:bytes:space:bytes&service=goapp&{range}")).await,
        "main;serve;parse 512\n"
    );

    // Mutex and block profiles have the same sample types: the
    // configuration's display names tell them apart.
    let contention = |leaf: &str| {
        gzip(&pprof(
            &[("contentions", "count"), ("delay", "nanoseconds")],
            ("contentions", "count"),
            &[(&["main", leaf], &[2, 9000])],
            t,
        ))
    };
    for (config, leaf) in [(MUTEX_CONFIG, "lock"), (BLOCK_CONFIG, "chan_recv")] {
        let p = contention(leaf);
        let body = form(&[
            ("profile", "profile.pprof", &p),
            ("sample_type_config", "sample_type_config.json", config.as_bytes()),
        ]);
        let r = post_with(addr, &ingest_url(name, t), &headers, &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(
        folded(addr, &format!("type=mutex:delay:nanoseconds:contentions:count&service=goapp&{range}")).await,
        "main;lock 9000\n"
    );
    assert_eq!(
        folded(addr, &format!("type=block:contentions:count:contentions:count&service=goapp&{range}")).await,
        "main;chan_recv 2\n"
    );

    // The CPU profile (no configuration) with labels from `pprof.Do`.
    let cpu = gzip(&pprof_labelled(
        &[("samples", "count"), ("cpu", "nanoseconds")],
        ("cpu", "nanoseconds"),
        &[
            (&["main", "checkout"], &[5, 50_000_000], &[("handler", "checkout")]),
            (&["main", "refund"], &[1, 10_000_000], &[("handler", "refund"), ("env", "canary")]),
            (&["main", "gc"], &[2, 20_000_000], &[]),
        ],
        t,
    ));
    let body = form(&[("profile", "profile.pprof", &cpu)]);
    let r = post_with(addr, &ingest_url(name, t), &headers, &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let cpu_type = format!("type=process_cpu:cpu:nanoseconds:cpu:nanoseconds&service=goapp&{range}");
    assert_eq!(folded(addr, &cpu_type).await, "main;checkout 50000000\nmain;gc 20000000\nmain;refund 10000000\n");
    assert_eq!(folded(addr, &format!("{cpu_type}&tag.handler=checkout")).await, "main;checkout 50000000\n");
    // A label overrides the request's tag of the same key.
    assert_eq!(folded(addr, &format!("{cpu_type}&tag.env=canary")).await, "main;refund 10000000\n");
    assert_eq!(folded(addr, &format!("{cpu_type}&tag.env=prod")).await, "main;checkout 50000000\nmain;gc 20000000\n");

    // The tag keys, for the UI's tag filter, and a label's values.
    let r = get(addr, &format!("/api/v1/labels/tag/values?service=goapp&{range}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["env", "handler", "region"]), "{}", r.text());
    let r = get(addr, &format!("/api/v1/labels/tag.handler/values?service=goapp&{range}")).await;
    assert_eq!(r.json()["values"], serde_json::json!(["checkout", "refund"]), "{}", r.text());

    // Refusals: cumulative profiles to subtract, no profile part, a broken form.
    let prev = form(&[("profile", "profile.pprof", &heap), ("prev_profile", "profile.pprof", &heap)]);
    let r = post_with(addr, &ingest_url(name, t), &headers, &prev).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("prev_profile"), "{}", r.text());
    let none = form(&[("sample_type_config", "sample_type_config.json", HEAP_CONFIG.as_bytes())]);
    let r = post_with(addr, &ingest_url(name, t), &headers, &none).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("`profile` part"), "{}", r.text());
    let jfr = form(&[("jfr", "jfr", b"FLR\0"), ("labels", "labels", b"")]);
    let r = post_with(addr, &format!("{}&format=jfr", ingest_url(name, t)), &headers, &jfr).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("jfr") && r.text().contains("not supported"), "{}", r.text());
    let r = post_with(addr, &ingest_url(name, t), &headers, b"not a form").await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("multipart"), "{}", r.text());
    handle.shutdown().await.expect("shutdown");
}
