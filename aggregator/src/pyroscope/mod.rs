//! Pyroscope ingest on the HTTP port: `push.v1.PusherService/Push` over
//! Connect ([`push`]), and `POST /ingest` with the query
//! parameters Pyroscope's SDKs send (`name=app.cpu{k=v,...}`, `from`,
//! `until`, `sampleRate`, `spyName`, `units`, `aggregationType`, `format`)
//! and a pprof body (raw or gzipped: the Node SDK's), the Go SDK's
//! multipart form ([`form`]: `profile`, `sample_type_config`) or folded text
//! (`format=folded`, the default for text, or `lines`). pprof labels on
//! samples become tags ([`pprof`]).
//!
//! Auth is the ingest token (as agents use): `Authorization: Bearer <token>`
//! or Basic auth whose password is the token. An accepted request becomes a
//! [`aperture_core::model::ProfileBatch`] that goes through the same ledger,
//! shards and writer as an agent frame, and is answered 200 only once its
//! rows are committed. Every outcome is counted in
//! `aperture_push_requests_total{protocol, result}`.
//!
//! The read side Grafana's Pyroscope data source uses,
//! `querier.v1.QuerierService`, is in [`querier`]; it takes the read token.

mod convert;
mod form;
mod pprof;
mod push;
mod querier;

use push::push;
use querier::{querier, render};

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::http::state::{AppState, bearer_token, error_response, token_digest};
pub(crate) use convert::ConvertError;
use convert::{from_folded, gunzip, parse_name};
use pprof::from_pprof;

/// Label values of `aperture_push_requests_total{result}`.
pub mod push_result {
    /// Committed and answered 200.
    pub const OK: &str = "ok";
    /// No or a wrong token: 401.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// Malformed parameters or body: 400.
    pub const BAD_REQUEST: &str = "bad_request";
    /// Over a limit (body size, labels per series): 413 or 400.
    pub const TOO_LARGE: &str = "too_large";
    /// The pipeline is full: 503, retry later.
    pub const BUSY: &str = "busy";
    /// Not committed in time (the store is down): 503; it may still be stored.
    pub const TIMEOUT: &str = "timeout";
}

/// A decompressed body may be this many times the body limit at most.
pub(crate) const MAX_INFLATE: usize = 8;

fn count(state: &AppState, result: &str) {
    state.shared.metrics.push_requests.with_label_values(&["pyroscope_ingest", result]).inc();
}

/// Reads a body of at most `limit` bytes; `None` when over it or unreadable.
pub(crate) async fn read_body(body: Body, limit: usize) -> Option<axum::body::Bytes> {
    axum::body::to_bytes(body, limit).await.ok()
}

/// Whether the request carries the ingest token (or none is required).
pub(crate) fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(want) = state.ingest_digest else { return true };
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let given = bearer_token(value).map(str::to_owned).or_else(|| basic_password(value));
    given.is_some_and(|t| bool::from(token_digest(&t).ct_eq(&want)))
}

/// The password of `Authorization: Basic base64(user:password)`.
fn basic_password(value: &str) -> Option<String> {
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (_, password) = text.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// `from` as Pyroscope's SDKs send it: Unix seconds (milli-, micro- or
/// nanoseconds are recognised by their size).
fn parse_from(v: &str) -> Result<u64, ConvertError> {
    let n: u64 = v.trim().parse().map_err(|_| ConvertError::Bad(format!("`from` {v:?} is not a Unix time")))?;
    Ok(match n {
        0..=99_999_999_999 => n.saturating_mul(1_000_000_000),
        100_000_000_000..=99_999_999_999_999 => n.saturating_mul(1_000_000),
        100_000_000_000_000..=99_999_999_999_999_999 => n.saturating_mul(1_000),
        _ => n,
    })
}

/// Pyroscope's routes, for the HTTP router: the SDKs' ingest and push, and
/// the querier and render endpoints Grafana reads.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route(crate::http::PYROSCOPE_INGEST, post(ingest))
        .route(crate::http::PYROSCOPE_PUSH, post(push))
        .route("/querier.v1.QuerierService/{method}", post(querier))
        .route("/pyroscope/render", get(render))
}

/// `POST /ingest`.
async fn ingest(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !authorized(&state, &headers) {
        count(&state, push_result::UNAUTHORIZED);
        let mut r = error_response(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send `Authorization: Bearer <token>` or Basic auth with the token as the \
             password (the ingest token: APERTURE_INGEST_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
        );
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"aperture\""));
        return r;
    }
    let limit = state.limits.max_push_body_bytes;
    let body = match read_body(body, limit).await {
        Some(b) => b,
        None => {
            count(&state, push_result::TOO_LARGE);
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over the limit of {limit} bytes, or could not be read; send smaller profiles"),
            );
        }
    };
    let charged = body.len();
    let batch = match convert(&params, &headers, body, limit.saturating_mul(MAX_INFLATE)).await {
        Ok(b) => b,
        Err(ConvertError::Bad(m)) => {
            count(&state, push_result::BAD_REQUEST);
            return error_response(StatusCode::BAD_REQUEST, m);
        }
        Err(ConvertError::TooLarge(m)) => {
            count(&state, push_result::TOO_LARGE);
            return error_response(StatusCode::BAD_REQUEST, m);
        }
    };
    match commit(&state, batch, charged).await {
        Ok(()) => {
            count(&state, push_result::OK);
            StatusCode::OK.into_response()
        }
        Err(refusal) => {
            count(&state, refusal.result);
            let mut r = error_response(refusal.status, refusal.message);
            if refusal.status == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            r
        }
    }
}

/// Why a converted batch was not committed.
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub message: String,
    /// `aperture_push_requests_total{result}`.
    pub result: &'static str,
}

/// Queues `batch` (about `charged` bytes) into the pipeline and waits for
/// its commit, within the request timeout.
pub(crate) async fn commit(
    state: &AppState,
    batch: aperture_core::model::ProfileBatch,
    charged: usize,
) -> Result<(), Refusal> {
    let samples = batch.sample_count();
    if samples == 0 {
        return Ok(());
    }
    let charged = charged.max(batch.stacks.len() * 64);
    let Ok(done) = state.ingress.admit_profiles(batch, charged) else {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the aggregator's buffer is full (the store is slow or down); retry later".into(),
            result: push_result::BUSY,
        });
    };
    // Answer before the HTTP layer's own timeout does, with a clearer message.
    let wait = state.limits.request_timeout.saturating_sub(Duration::from_secs(1)).max(Duration::from_millis(100));
    match tokio::time::timeout(wait, done).await {
        Ok(Ok(Ok(()))) => {
            state.shared.metrics.push_samples.inc_by(samples);
            Ok(())
        }
        Ok(Ok(Err(why))) => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            message: format!("the profile was refused: {why}"),
            result: push_result::BAD_REQUEST,
        }),
        Ok(Err(_)) | Err(_) => Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "the profile was not committed within {wait:?} (is the store down? see /api/health); it may \
                 still be stored, and a retry may store it twice"
            ),
            result: push_result::TIMEOUT,
        }),
    }
}

async fn convert(
    params: &HashMap<String, String>,
    headers: &HeaderMap,
    body: axum::body::Bytes,
    max_inflated: usize,
) -> Result<aperture_core::model::ProfileBatch, ConvertError> {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let key = parse_name(get("name"))?;
    let from = match get("from") {
        "" => None,
        v => Some(parse_from(v)?),
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.starts_with("multipart/") {
        // The Go SDK's form: pprof (it sends no `format`); the Java SDK's
        // JFR forms are not read.
        if !matches!(get("format"), "" | "pprof") {
            return Err(ConvertError::Bad(format!(
                "`format` {:?} is not supported in a multipart body: only pprof (the Go SDK's form)",
                get("format")
            )));
        }
        let form = form::read_form(content_type, body).await?;
        let profile = gunzip(&form.profile, max_inflated)?;
        return from_pprof(&profile, &key, from, crate::clock::unix_now_ns(), form.sample_types.as_ref());
    }
    let body = gunzip(&body, max_inflated)?;
    match get("format") {
        "pprof" => from_pprof(&body, &key, from, crate::clock::unix_now_ns(), None),
        "" | "folded" | "lines" => {
            let t = convert::folded_type(&key, get("units"));
            from_folded(&body, &key, &t, get("format") == "lines", from.unwrap_or_else(crate::clock::unix_now_ns))
        }
        other => Err(ConvertError::Bad(format!(
            "`format` {other:?} is not supported: pprof, folded or lines (trie, tree and jfr are not)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_carries_the_token_as_password() {
        let v = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("app:tok"));
        assert_eq!(basic_password(&v).as_deref(), Some("tok"));
        assert_eq!(basic_password("Basic !!!"), None);
        assert_eq!(basic_password("Bearer tok"), None);
        let empty = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("app:"));
        assert_eq!(basic_password(&empty), None);
    }

    #[test]
    fn from_accepts_seconds_and_finer_units() {
        assert_eq!(parse_from("1700000000"), Ok(1_700_000_000_000_000_000));
        assert_eq!(parse_from("1700000000000"), Ok(1_700_000_000_000_000_000));
        assert_eq!(parse_from("1700000000000000000"), Ok(1_700_000_000_000_000_000));
        assert!(parse_from("soon").is_err());
    }
}
