//! The HTTP server on port 9090: probes, health, metrics, the query API
//! (documented in `docs/openapi.yaml`), Pyroscope's ingest routes and the
//! `querier.v1.QuerierService` Grafana reads (see [`crate::pyroscope`]), and
//! OTLP/HTTP profiles (`crate::otlp`).
//!
//! Every request passes through the same guards: headers over
//! [`HttpLimits::max_header_bytes`] get 431, a declared body over
//! [`HttpLimits::max_body_bytes`] gets 413, a request still running after
//! [`HttpLimits::request_timeout`] gets 503 (its store query is cancelled),
//! unknown paths get 404, and `/api/v1/*` requires `Authorization: Bearer
//! <read token>` when a token is set (the scheme in any case; compared as
//! SHA-256 digests in constant time). Every answer carries
//! `X-Content-Type-Options: nosniff` and a Content-Security-Policy: the UI's
//! own, or [`API_CONTENT_SECURITY_POLICY`] (no script at all, so an SVG
//! opened directly stays inert). Connections are limited in [`serve`].

pub(crate) mod api;
mod flame;
mod health;
pub mod params;
mod serve;
pub(crate) mod state;
mod ui;

pub(crate) use serve::serve;

use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;

use state::{AppState, authorized, error_response};

/// Policy of every answer but the UI's: nothing may load or run; inline
/// styles are allowed so an SVG flame graph renders when opened directly.
pub(crate) const API_CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Pyroscope's ingest routes; their body limit is `max_push_body_bytes`.
pub(crate) const PYROSCOPE_INGEST: &str = "/ingest";
pub(crate) const PYROSCOPE_PUSH: &str = "/push.v1.PusherService/Push";
/// OTLP/HTTP profiles export; the same body limit.
pub(crate) const OTLP_HTTP: &str = "/v1development/profiles";

/// Builds the router: the API, health, metrics and UI, and `protocols`,
/// the routes of other tools' protocols (Pyroscope's), all under the same
/// limits, timeouts and metrics.
pub(crate) fn router(state: AppState, protocols: Router<AppState>) -> Router {
    let api = Router::new()
        .route("/profile", get(api::profile))
        .route("/top", get(api::top))
        .route("/syscalls", get(api::syscalls))
        .route("/locks", get(api::locks))
        .route("/labels/{name}/values", get(api::label_values))
        .route("/diff", get(api::diff))
        .route("/types", get(api::types))
        .route("/flamegraph", get(flame::flamegraph))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/health", get(health::api_health))
        .route("/metrics", get(health::metrics))
        .merge(protocols)
        .nest("/api/v1", api)
        .merge(ui::router())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// `protocols` alone, under the same limits, timeouts and metrics: the
/// router of Pyroscope's own port.
pub(crate) fn protocol_router(state: AppState, protocols: Router<AppState>) -> Router {
    protocols
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
    let pushed = route == PYROSCOPE_INGEST || route == PYROSCOPE_PUSH || route == OTLP_HTTP;
    let max_body = if pushed { state.limits.max_push_body_bytes } else { state.limits.max_body_bytes };
    let response = if header_bytes > state.limits.max_header_bytes {
        error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers are {header_bytes} bytes, over the limit of {}", state.limits.max_header_bytes),
        )
    } else if declared_body > max_body {
        if pushed {
            let protocol = match route.as_str() {
                PYROSCOPE_PUSH => "pyroscope_push",
                OTLP_HTTP => "otlp_http",
                _ => "pyroscope_ingest",
            };
            state.shared.metrics.push_requests.with_label_values(&[protocol, "too_large"]).inc();
        }
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is {declared_body} bytes, over the limit of {max_body}"),
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
    let mut response = response;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(API_CONTENT_SECURITY_POLICY));
    }
    let m = &state.shared.metrics;
    m.http_requests.with_label_values(&[route.as_str(), response.status().as_str()]).inc();
    m.http_duration.with_label_values(&[route.as_str()]).observe(started.elapsed().as_secs_f64());
    response
}

/// Bearer-token check for `/api/v1`.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if authorized(&state, req.headers()) {
        return next.run(req).await;
    }
    let mut r = error_response(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token: send `Authorization: Bearer <token>` with the read token \
         (APERTURE_READ_TOKEN, or the shared APERTURE_AUTH_TOKEN)",
    );
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

#[cfg(test)]
mod tests {
    use super::state::bearer_token;

    #[test]
    fn the_bearer_scheme_matches_in_any_case() {
        for (value, want) in [
            ("Bearer tok", Some("tok")),
            ("bearer tok", Some("tok")),
            ("BEARER  tok ", Some("tok")),
            ("Basic tok", None),
            ("Bearer", None),
            ("Bearer ", None),
            ("Bearertok", None),
        ] {
            assert_eq!(bearer_token(value), want, "{value:?}");
        }
    }
}
