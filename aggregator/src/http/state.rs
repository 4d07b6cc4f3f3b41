//! What every handler shares: the state, JSON errors, and the bearer-token
//! check of the read side.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
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
    /// Digest of the read token (`/api/v1/*`); `None` when auth is off.
    pub token_digest: Option<[u8; 32]>,
    /// Digest of the ingest token (pushed profiles); `None` when auth is off.
    pub ingest_digest: Option<[u8; 32]>,
    /// Where pushed profiles enter the pipeline.
    pub ingress: Arc<crate::pipeline::ingress::ShardedIngress>,
    pub limits: HttpLimits,
    pub started: Instant,
}

/// A JSON error body `{"error": "..."}` with a status.
pub(crate) fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Whether the request may read: no token is configured, or it carries the
/// read token.
pub(crate) fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(want) = state.token_digest else { return true };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
    given.is_some_and(|t| bool::from(token_digest(t).ct_eq(&want)))
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// matched in any case (RFC 9110 §11.1).
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// SHA-256 of a token: what is compared, so the comparison takes the same
/// time whatever the lengths.
pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}
