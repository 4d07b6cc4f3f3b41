//! The HTTP server on port 9090: probes, health, metrics and the query API
//! (documented in `docs/openapi.yaml`).
//!
//! Every request passes through the same guards: headers over
//! [`HttpLimits::max_header_bytes`] get 431, a declared body over
//! [`HttpLimits::max_body_bytes`] gets 413, a request still running after
//! [`HttpLimits::request_timeout`] gets 503, unknown paths get 404, and
//! `/api/v1/*` requires `Authorization: Bearer <token>` when a token is set
//! (compared as SHA-256 digests in constant time).

mod api;
mod flame;
mod health;
pub mod params;
mod ui;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::pipeline::state::Shared;
use crate::settings::HttpLimits;
use crate::store::Store;

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    pub store: Arc<dyn Store>,
    pub shared: Arc<Shared>,
    pub token_digest: Option<[u8; 32]>,
    pub limits: HttpLimits,
    pub started: Instant,
}

/// A JSON error body `{"error": "..."}` with a status.
pub(crate) fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Builds the router.
pub(crate) fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/profile", get(api::profile))
        .route("/top", get(api::top))
        .route("/syscalls", get(api::syscalls))
        .route("/locks", get(api::locks))
        .route("/labels/{name}/values", get(api::label_values))
        .route("/diff", get(api::diff))
        .route("/flamegraph", get(flame::flamegraph))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/health", get(health::api_health))
        .route("/metrics", get(health::metrics))
        .nest("/api/v1", api)
        .merge(ui::router())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

async fn not_found(req: Request) -> Response {
    error_response(StatusCode::NOT_FOUND, format!("no route for {} {}", req.method(), req.uri().path()))
}

/// Limits, timeout and request metrics.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let header_bytes: usize = req.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    let declared_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let response = if header_bytes > state.limits.max_header_bytes {
        error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers are {header_bytes} bytes, over the limit of {}", state.limits.max_header_bytes),
        )
    } else if declared_body > state.limits.max_body_bytes {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is {declared_body} bytes, over the limit of {}", state.limits.max_body_bytes),
        )
    } else {
        match tokio::time::timeout(state.limits.request_timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("request timed out after {:?}; narrow the time range or filters", state.limits.request_timeout),
            ),
        }
    };
    let m = &state.shared.metrics;
    m.http_requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    m.http_duration.with_label_values(&[route.as_str()]).observe(started.elapsed().as_secs_f64());
    response
}

/// Bearer-token check for `/api/v1`.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(want) = state.token_digest else { return next.run(req).await };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| token_digest(t.trim()));
    match given {
        Some(d) if bool::from(d.ct_eq(&want)) => next.run(req).await,
        _ => {
            let mut r = error_response(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <APERTURE_AUTH_TOKEN>`",
            );
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// SHA-256 of a token: what is compared, so the comparison takes the same
/// time whatever the lengths.
pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
