//! `push.v1.PusherService/Push` over the Connect protocol (unary: HTTP POST
//! of one message, `application/proto` or `application/json`, optionally
//! `Content-Encoding: gzip`), as the Pyroscope SDKs that left `/ingest`
//! send it: series of label pairs (`service_name`, `__name__`, tags), each
//! with pprof profiles (usually gzipped). Message shapes follow Pyroscope's
//! `push/v1/push.proto` and `types/v1/types.proto`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use prost::Message;
use serde_json::json;

use super::convert::{ConvertError, append, gunzip, key_from_labels};
use super::pprof::from_pprof;
use super::{MAX_INFLATE, Refusal, authorized, commit, push_result, read_body};
use crate::http::state::AppState;

#[derive(Clone, PartialEq, prost::Message)]
struct PushRequest {
    #[prost(message, repeated, tag = "1")]
    series: Vec<RawProfileSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawProfileSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<LabelPair>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<RawSample>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LabelPair {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawSample {
    #[prost(bytes = "vec", tag = "1")]
    raw_profile: Vec<u8>,
    #[prost(string, tag = "2")]
    id: String,
}

fn count(state: &AppState, result: &str) {
    state.shared.metrics.push_requests.with_label_values(&["pyroscope_push", result]).inc();
}

/// A Connect error: `{"code", "message"}` with the code's HTTP status.
pub(crate) fn connect_error(status: StatusCode, message: impl Into<String>) -> Response {
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_argument",
        StatusCode::UNAUTHORIZED => "unauthenticated",
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => "resource_exhausted",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "internal",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::NOT_IMPLEMENTED => "unimplemented",
        _ => "internal",
    };
    let mut r = (status, axum::Json(json!({ "code": code, "message": message.into() }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"aperture\""));
    }
    r
}

/// Reads the JSON form: `{"series": [{"labels": [{"name", "value"}],
/// "samples": [{"rawProfile": "<base64>", "ID": "..."}]}]}`.
fn from_json(body: &[u8]) -> Result<PushRequest, ConvertError> {
    let bad = |m: &str| ConvertError::Bad(format!("the JSON body is not a PushRequest: {m}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    let mut out = PushRequest::default();
    for s in v.get("series").and_then(|s| s.as_array()).into_iter().flatten() {
        let mut series = RawProfileSeries::default();
        for l in s.get("labels").and_then(|l| l.as_array()).into_iter().flatten() {
            let text = |k: &str| l.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
            series.labels.push(LabelPair { name: text("name"), value: text("value") });
        }
        for r in s.get("samples").and_then(|l| l.as_array()).into_iter().flatten() {
            let raw = r.get("rawProfile").or_else(|| r.get("raw_profile")).and_then(|x| x.as_str()).unwrap_or("");
            let raw_profile = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(raw))
                .map_err(|_| bad("`rawProfile` is not base64"))?;
            let id = r.get("ID").or_else(|| r.get("id")).and_then(|x| x.as_str()).unwrap_or("").to_owned();
            series.samples.push(RawSample { raw_profile, id });
        }
        out.series.push(series);
    }
    Ok(out)
}

/// `POST /push.v1.PusherService/Push`.
pub(crate) async fn push(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&state, &headers) {
        count(&state, push_result::UNAUTHORIZED);
        return connect_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` or Basic auth with the token as the \
             password (the ingest token: APERTURE_INGEST_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
        );
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let json = content_type.starts_with("application/json");
    if !json && !content_type.starts_with("application/proto") {
        count(&state, push_result::BAD_REQUEST);
        return connect_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type:?} is not supported: application/proto or application/json"),
        );
    }
    let limit = state.limits.max_push_body_bytes;
    let Some(body) = read_body(body, limit).await else {
        count(&state, push_result::TOO_LARGE);
        return connect_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the limit of {limit} bytes, or could not be read; send smaller profiles"),
        );
    };
    let charged = body.len();
    let batch = match convert(&body, json, limit.saturating_mul(MAX_INFLATE)) {
        Ok(b) => b,
        Err(e) => {
            let (status, result) = match e {
                ConvertError::Bad(_) => (StatusCode::BAD_REQUEST, push_result::BAD_REQUEST),
                ConvertError::TooLarge(_) => (StatusCode::BAD_REQUEST, push_result::TOO_LARGE),
            };
            count(&state, result);
            return connect_error(status, e.to_string());
        }
    };
    match commit(&state, batch, charged).await {
        Ok(()) => {
            count(&state, push_result::OK);
            // An empty PushResponse in the request's encoding.
            let (ct, body): (&'static str, Vec<u8>) =
                if json { ("application/json", b"{}".to_vec()) } else { ("application/proto", Vec::new()) };
            let mut r = body.into_response();
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            r
        }
        Err(Refusal { status, message, result }) => {
            count(&state, result);
            connect_error(status, message)
        }
    }
}

fn convert(body: &[u8], json: bool, max_inflated: usize) -> Result<aperture_core::model::ProfileBatch, ConvertError> {
    // Connect's unary compression; gzip is recognised by its magic bytes.
    let body = gunzip(body, max_inflated)?;
    let request = if json {
        from_json(&body)?
    } else {
        PushRequest::decode(&body[..])
            .map_err(|e| ConvertError::Bad(format!("the body is not a push.v1.PushRequest: {e}")))?
    };
    let now = crate::clock::unix_now_ns();
    let mut batch = aperture_core::model::ProfileBatch::default();
    let mut inflated = 0usize;
    for series in &request.series {
        let key = key_from_labels(series.labels.iter().map(|l| (l.name.as_str(), l.value.as_str())))?;
        for sample in &series.samples {
            let raw = gunzip(&sample.raw_profile, max_inflated)?;
            inflated = inflated.saturating_add(raw.len());
            if inflated > max_inflated {
                return Err(ConvertError::TooLarge(format!(
                    "the profiles decompress to more than the limit of {max_inflated} bytes"
                )));
            }
            append(&mut batch, from_pprof(&raw, &key, None, now, None)?);
        }
    }
    Ok(batch)
}
