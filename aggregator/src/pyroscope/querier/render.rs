//! `GET /pyroscope/render`, the flame-graph endpoint of Pyroscope's HTTP API
//! that older clients and plugins read: `query=<profile type id>{<label
//! selector>}`, `from` and `until` (`now`, `now-1h`, Unix seconds or
//! milliseconds), `format=json` (the only one), `maxNodes`. The answer is
//! a flamebearer profile (`format: single`) with its timeline. Same labels
//! and read token as the querier.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{Failure, bucket_sum, flame_graph, load};
use crate::http::params::parse_time;
use crate::http::state::{AppState, error_response};
use crate::query;

/// Reads `now`, `now-<duration>`, Unix seconds or milliseconds.
fn time(value: &str, now_s: u64) -> Option<u64> {
    let v = value.trim();
    let v = match v.strip_prefix("now") {
        Some("") => return Some(now_s),
        Some(rest) => rest,
        None => v,
    };
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = v.parse().ok()?;
        return Some(if n >= 100_000_000_000 { n / 1000 } else { n });
    }
    parse_time(v, now_s)
}

/// Pyroscope's name for the unit of a type's values.
fn units(t: &aperture_core::model::ProfileType) -> &'static str {
    match (t.sample_type.as_str(), t.sample_unit.as_str()) {
        (_, "bytes") => "bytes",
        ("alloc_objects" | "inuse_objects", _) => "objects",
        ("goroutine" | "goroutines", _) => "goroutines",
        (_, "nanoseconds") if matches!(t.name.as_str(), "mutex" | "block" | "lock") => "lock_nanoseconds",
        (_, "count") if matches!(t.name.as_str(), "mutex" | "block") => "lock_samples",
        _ => "samples",
    }
}

/// `GET /pyroscope/render`.
pub(crate) async fn render(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !crate::http::state::authorized(&state, &headers) {
        let mut r = error_response(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: send `Authorization: Bearer <token>` with the read token \
             (APERTURE_READ_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
        );
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match answer(&state, &params).await {
        Ok(r) => r,
        Err(Failure(status, message)) => error_response(status, message),
    }
}

async fn answer(state: &AppState, params: &HashMap<String, String>) -> Result<Response, Failure> {
    let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
    if let Some(f) = get("format").filter(|f| *f != "json") {
        return Err(Failure::bad(format!("`format` {f:?} is not supported: json")));
    }
    let q = get("query").ok_or_else(|| {
        Failure::bad("`query` is required: <profile type id>{<label selector>}, e.g. process_cpu:cpu:nanoseconds:cpu:nanoseconds{service_name=\"app\"}")
    })?;
    let (type_id, selector) = match q.find('{') {
        Some(i) => (q[..i].trim(), &q[i..]),
        None => (q.trim(), ""),
    };
    let now_s = crate::clock::unix_now_ns() / 1_000_000_000;
    let read = |name: &'static str, default: u64| match get(name) {
        None => Ok(default),
        Some(v) => time(v, now_s).ok_or_else(|| {
            Failure::bad(format!("`{name}` {v:?} is not a time: now, now-1h, Unix seconds or milliseconds"))
        }),
    };
    let until = read("until", now_s)?;
    let from = read("from", until.saturating_sub(3600))?;
    let to_ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let (w, profile, sel) = load(state, type_id, selector, to_ms(from), to_ms(until)).await?;
    let max_nodes = match get("maxNodes").or_else(|| get("max-nodes")) {
        None => 0,
        Some(v) => v.parse::<usize>().map_err(|_| Failure::bad(format!("`maxNodes` {v:?} is not a number")))?,
    };
    let mode = crate::http::api::value_mode(&w);
    let fg = flame_graph(&query::flame_tree(&profile, mode), max_nodes);
    // The timeline: 10 s steps (more when the range needs over 1000).
    let step = 10u64.max((sel.to_s - sel.from_s).div_ceil(1000));
    let start = sel.from_s - sel.from_s % step;
    let mut samples = Vec::new();
    let mut t = start;
    while t < sel.to_s {
        let mut s = sel.clone();
        s.from_s = t.max(sel.from_s);
        s.to_s = (t + step).min(sel.to_s);
        samples.push(bucket_sum(state, &w, mode, &s).await?);
        t += step;
    }
    let t = w.profile_type();
    let sample_rate: u64 = if t.sample_unit == "nanoseconds" && units(&t) == "samples" { 1_000_000_000 } else { 100 };
    let levels: Vec<&Vec<i64>> = fg.levels.iter().map(|l| &l.values).collect();
    let body = json!({
        "version": 1,
        "flamebearer": { "names": fg.names, "levels": levels, "numTicks": fg.total, "maxSelf": fg.max_self },
        "metadata": { "format": "single", "name": t.id(), "spyName": "", "sampleRate": sample_rate, "units": units(&t) },
        "timeline": { "startTime": start, "samples": samples, "durationDelta": step },
    });
    Ok(axum::Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_pyroscope_forms() {
        assert_eq!(time("now", 1000), Some(1000));
        assert_eq!(time("now-1h", 10_000), Some(6400));
        assert_eq!(time("1700000000", 0), Some(1_700_000_000));
        assert_eq!(time("1700000000000", 0), Some(1_700_000_000));
        assert_eq!(time("soon", 0), None);
    }
}
